"""The original ClusterMoE package's quick-start API, on top of the Hugging Face classes."""

from .configuration_clustermoe import ClusterMoEConfig
from .modeling_clustermoe import ClusterMoEForCausalLM


# The original package called its configuration `CoEConfig`; its field names (`d_model`, `d_ff`, `num_layers`,
# `load_balancing_weight`, `router_z_loss_weight`, `dropout`) are aliases on ClusterMoEConfig.
CoEConfig = ClusterMoEConfig


def create_coe_model(
    d_model: int | None = None,
    num_layers: int | None = None,
    num_clusters: int = 4,
    experts_per_cluster: int = 4,
    vocab_size: int = 32000,
    **config_kwargs,
) -> ClusterMoEForCausalLM:
    """Build a randomly initialised ClusterMoE causal LM; extra keyword arguments go to `ClusterMoEConfig`, which
    also takes the transformers names (`hidden_size`, `num_hidden_layers`, ...) instead of the original ones.

    As in the original package, every forward returns `out["aux_loss"]` and, with `use_reliability_routing=True`
    (the default), `out["model_reliability"]`, also under `torch.no_grad()`: the config sets
    `output_router_logits=True` unless told otherwise. (Models built from a plain `ClusterMoEConfig` skip the router
    losses in pure inference such as `generate`, which is faster.) With `use_reliability_routing=False` no reliability
    is tracked: `out.model_reliability` is None, so `out` has no `"model_reliability"` key. A model with no MoE layer at
    all (`first_k_dense_layers` = all layers, which the original package could not build) has no router losses to
    return.
    """
    for alias, value in (("d_model", d_model), ("num_layers", num_layers)):
        if value is not None:  # otherwise the config's default, or the transformers name if given
            config_kwargs[alias] = value
    config_kwargs.setdefault("output_router_logits", True)
    config = ClusterMoEConfig(
        num_clusters=num_clusters, experts_per_cluster=experts_per_cluster, vocab_size=vocab_size, **config_kwargs
    )
    return ClusterMoEForCausalLM(config)
