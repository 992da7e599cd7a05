"""ClusterMoE for Hugging Face Transformers.

Importing this package registers `model_type="clustermoe"` with the Auto classes, so `AutoConfig.for_model`,
`AutoModelForCausalLM.from_config` and `from_pretrained` work. The classes are registered for `auto_map` by their own
(self-contained) files, so that `save_pretrained` copies those files next to the weights.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .compat import CoEConfig, create_coe_model
from .configuration_clustermoe import ClusterMoEConfig
from .modeling_clustermoe import (
    ClusterMoEForCausalLM,
    ClusterMoEForQuestionAnswering,
    ClusterMoEForSequenceClassification,
    ClusterMoEForTokenClassification,
    ClusterMoEModel,
    ClusterMoEPreTrainedModel,
)


AutoConfig.register(ClusterMoEConfig.model_type, ClusterMoEConfig, exist_ok=True)
AutoModel.register(ClusterMoEConfig, ClusterMoEModel, exist_ok=True)
AutoModelForCausalLM.register(ClusterMoEConfig, ClusterMoEForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(ClusterMoEConfig, ClusterMoEForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(ClusterMoEConfig, ClusterMoEForTokenClassification, exist_ok=True)
AutoModelForQuestionAnswering.register(ClusterMoEConfig, ClusterMoEForQuestionAnswering, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "ClusterMoEConfig",
    "ClusterMoEModel",
    "ClusterMoEPreTrainedModel",
    "ClusterMoEForCausalLM",
    "ClusterMoEForSequenceClassification",
    "ClusterMoEForTokenClassification",
    "ClusterMoEForQuestionAnswering",
    "CoEConfig",
    "create_coe_model",
]
