"""The original ClusterMoE package's quick-start API, on top of the Hugging Face classes."""

from .configuration_clustermoe import ClusterMoEConfig
from .modeling_clustermoe import ClusterMoEForCausalLM


# The original package called its configuration `CoEConfig`; its field names (`d_model`, `d_ff`, `num_layers`,
# `load_balancing_weight`, `router_z_loss_weight`, `dropout`) are aliases on ClusterMoEConfig.
CoEConfig = ClusterMoEConfig


# The original package's defaults (its `create_coe_model` and `CoEConfig` dataclass) for the architecture and the
# fields where ClusterMoEConfig's differ; its width happens to be ClusterMoEConfig's too.
ORIGINAL_DEFAULTS = {
    "hidden_size": 512,
    "num_hidden_layers": 6,
    "intermediate_size": 2048,
    "top_k_clusters": 2,
    "expert_capacity_factor": 1.25,
    "attention_dropout": 0.1,
    # The original's adaptive routing was on by default; here the name is the bias-based balancing (DeepSeek-V3's
    # auxiliary-loss-free biases), which the original's learned output gate is not.
    "use_adaptive_routing": True,
}


def create_coe_model(
    d_model: int | None = None,
    num_layers: int | None = None,
    num_clusters: int = 4,
    experts_per_cluster: int = 8,
    vocab_size: int = 32000,
    **config_kwargs,
) -> ClusterMoEForCausalLM:
    """Build a randomly initialised ClusterMoE causal LM; extra keyword arguments go to `ClusterMoEConfig`, which
    also takes the transformers names (`hidden_size`, `num_hidden_layers`, ...) instead of the original ones. A name
    that is neither is refused, as the original `CoEConfig` dataclass refused it.

    The defaults are the original package's: d_model 512, 6 layers, 4 clusters of 8 experts, d_ff 2048, top-2
    clusters and top-2 experts in each, capacity factor 1.25, dropout 0.1 (here on the attention weights: the experts
    have no dropout), adaptive routing on (here the balancing biases that name stands for). A plain
    `ClusterMoEConfig()` (also spelt `CoEConfig()`) keeps its own, smaller defaults.

    As in the original package, every forward returns `out["aux_loss"]` and, with `use_reliability_routing=True`
    (the default), `out["model_reliability"]`, also under `torch.no_grad()`: the config sets
    `output_router_logits=True` unless told otherwise. (Models built from a plain `ClusterMoEConfig` skip the router
    losses in pure inference such as `generate`, which is faster.) With `use_reliability_routing=False` no reliability
    is tracked: `out.model_reliability` is None, so `out` has no `"model_reliability"` key. A model with no MoE layer at
    all (`first_k_dense_layers` = all layers, which the original package could not build) has no router losses to
    return.
    """
    named = {"d_model": d_model, "num_layers": num_layers}
    settings = {
        **{name: value for name, value in named.items() if value is not None},
        "num_clusters": num_clusters,
        "experts_per_cluster": experts_per_cluster,
        "vocab_size": vocab_size,
        **config_kwargs,
    }
    defaults = {**ORIGINAL_DEFAULTS, "output_router_logits": True}
    config = ClusterMoEConfig.from_settings(settings, "create_coe_model", defaults=defaults)
    return ClusterMoEForCausalLM._from_config(config)  # in `config.dtype` when one is given
