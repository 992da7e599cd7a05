"""The original ClusterMoE package's quick-start API, on top of the Hugging Face classes."""

from .configuration_clustermoe import ClusterMoEConfig
from .modeling_clustermoe import ClusterMoEForCausalLM


# The original package called its configuration `CoEConfig`; its field names (`d_model`, `d_ff`, `num_layers`,
# `load_balancing_weight`, `router_z_loss_weight`, `dropout`) are aliases on ClusterMoEConfig.
CoEConfig = ClusterMoEConfig


def create_coe_model(
    d_model: int = 512,
    num_layers: int = 4,
    num_clusters: int = 4,
    experts_per_cluster: int = 4,
    vocab_size: int = 32000,
    **config_kwargs,
) -> ClusterMoEForCausalLM:
    """Build a randomly initialised ClusterMoE causal LM; extra keyword arguments go to `ClusterMoEConfig`.

    The returned model's outputs support `out["logits"]` and `out["aux_loss"]` as in the original package.
    """
    config = ClusterMoEConfig(
        d_model=d_model,
        num_layers=num_layers,
        num_clusters=num_clusters,
        experts_per_cluster=experts_per_cluster,
        vocab_size=vocab_size,
        **config_kwargs,
    )
    return ClusterMoEForCausalLM(config)
