# Copyright 2026 The ClusterMoE authors. Licensed under the Apache License, Version 2.0.
"""ClusterMoE configuration.

Self-contained (imports only transformers) so that `save_pretrained` can copy it next to the weights and
`from_pretrained(..., trust_remote_code=True)` works where `clustermoe_hf` is not installed.
"""

import copy
import dataclasses
import difflib
import math
import re
from typing import Literal, NamedTuple, get_args

import transformers


# Checked first, where both the package and a checkpoint's copied code start (the config loads first), on the
# transformers that is imported: the model passes its attention and mask utilities the `cache` argument that 5.24
# introduced. Earlier releases fail further on, with less clear errors (4.x on the imports below).
if tuple(map(int, re.match(r"(\d+)\.(\d+)", transformers.__version__).groups())) < (5, 24):
    raise ImportError(
        f"ClusterMoE needs transformers >= 5.24, found {transformers.__version__}: pip install 'transformers>=5.24,<6'"
    )

from transformers import GenerationConfig
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters
from transformers.utils import logging


logger = logging.get_logger(__name__)


class ClusterMoEConfig(PreTrainedConfig):
    r"""
    Configuration of a ClusterMoE decoder-only language model: a Llama-style transformer (RMSNorm, RoPE,
    grouped-query attention) whose MLPs are hierarchical mixture-of-experts blocks. The
    `num_clusters * experts_per_cluster` experts are grouped into clusters; each token picks `top_k_clusters`
    clusters, then `top_k_experts` experts inside each chosen cluster.

    Args:
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, hidden_act,
        max_position_embeddings, initializer_range, rms_norm_eps, use_cache, tie_word_embeddings, rope_parameters,
        attention_bias, attention_dropout, pad_token_id, bos_token_id, eos_token_id:
            As in transformers' Llama/Qwen3-MoE configurations.
        intermediate_size (`int`): width of ONE expert's SwiGLU MLP.
        num_clusters (`int`): number of expert clusters `C`.
        experts_per_cluster (`int`): experts per cluster `E`; expert `c * E + e` is expert `e` of cluster `c`.
        top_k_clusters (`int`): clusters chosen per token.
        top_k_experts (`int`): experts chosen inside each chosen cluster. A token uses
            `top_k_clusters * top_k_experts` distinct experts.
        norm_topk_prob (`bool`): in the combine weights `P(cluster) * P(expert | cluster)`, renormalise
            `P(expert | cluster)` over each chosen cluster's chosen experts (`P(cluster)` is not renormalised: over
            one chosen cluster it would be 1, and the cluster router would get no gradient from the task loss).
        routing_temperature (`float`): softmax temperature of both router levels, at least 1e-4.
        router_jitter_noise (`float`): std of Gaussian noise added to the selection scores while training
            (exploration); 0 disables it. Never applied in eval.
        router_implementation (`"auto"`, `"hierarchical"`, `"flat"`): `hierarchical` scores experts only inside the
            chosen clusters (cost ~ `C + top_k_clusters * E` per token), `flat` scores all `C * E` experts and
            gathers the chosen clusters. Both route identically; `auto` picks by the number of experts, hierarchical
            from 256 on, where it is the faster at 2,048 tokens per forward (docs/benchmarks.md).
        shared_expert_intermediate_size (`int`): width of an always-on shared expert MLP; 0 means none.
        first_k_dense_layers (`int`): the first k decoder layers use a dense MLP instead of a MoE block.
        dense_intermediate_size (`int`, *optional*): width of those dense MLPs; defaults to the active expert width
            `intermediate_size * top_k_clusters * top_k_experts`, filled in at construction (as `head_dim` is), so
            that a saved model keeps its dense width when the top-k values change later (pruning, overrides when
            loading).
        router_aux_loss_coef (`float`): weight of the expert-level load-balancing loss (within clusters).
        router_cluster_aux_loss_coef (`float`, *optional*): weight of the cluster-level load-balancing loss; None
            (the default) follows `router_aux_loss_coef`, also when that is changed later (e.g. the original
            package's `load_balancing_weight=0` passed to `from_pretrained` turns all balancing off).
        router_z_loss_coef (`float`): weight of the router z-loss (squared logsumexp of the softmax inputs, logits /
            `routing_temperature`) on both router levels.
        output_router_logits (`bool`): return each MoE layer's cluster-router logits, and the router losses (with
            `model_reliability`) also in pure inference.
        use_reliability_routing (`bool`): track an EMA health score per expert, mask the output of experts that
            produce non-finite or outsized outputs in a training forward (in inference, of each pair whose output is
            non-finite), and deprioritise degraded experts when routing.
        reliability_decay (`float`): EMA decay of the reliability scores, in (0, 1).
        reliability_threshold (`float`): experts whose reliability falls below this are not selected, nor are clusters
            left with fewer than `top_k_experts` selectable experts.
        reliability_max_norm_ratio (`float`): an expert whose (geometric) mean output norm exceeds the median of those
            of the other healthy experts of its cluster by this factor in a training forward is treated as faulty
            there.
        use_adaptive_routing (`bool`): auxiliary-loss-free balancing: per-cluster and per-expert selection biases
            nudged toward uniform load after every optimizer step (DeepSeek-V3 style).
        adaptive_routing_rate (`float`): bias update step size; 0 keeps the biases as they are (they still apply), e.g.
            to keep the routing fixed while training something else.
        expert_capacity_factor (`float`, *optional*): `None` is dropless; otherwise each expert takes at most
            `ceil(factor * tokens * k / num_experts)` tokens per forward, overflow is re-routed inside the chosen
            cluster, then dropped (the token keeps its residual path). Also in inference, where a token's output then
            depends on the other tokens of the forward (batch rows, beams).

    `num_experts` (`num_clusters * experts_per_cluster`) and `num_experts_per_tok` (`top_k_clusters * top_k_experts`)
    are derived, read-only: set the fields they are computed from.

    The names of the original ClusterMoE package are accepted as aliases: `d_model`, `d_ff`, `num_layers`,
    `load_balancing_weight` (`router_aux_loss_coef`, which the cluster-level weight follows unless that is given),
    `router_z_loss_weight`, `dropout` (`attention_dropout`: the experts have no dropout). Giving an alias and its
    field different values is an error, unless the field's value is its default: a dataclass cannot tell a default
    passed explicitly from one not passed, and then the alias sets the field.

    Values are checked at construction, when a model is built from the config and when it is saved, so overrides set
    after construction (`from_pretrained(path, top_k_experts=...)`) are checked too, and once after a change on a live
    model, before its next forward (the model reads its routing settings live). Those checks include transformers'
    own config checks (e.g. `output_attentions=True` needs the eager attention, `layer_types` entries must be known).
    RoPE rotates the whole `head_dim`: `rope_parameters['partial_rotary_factor']` other than 1 is rejected.
    """

    model_type = "clustermoe"
    # What the Trainer leaves out of evaluation predictions (`ignore_keys`' default): everything but the logits, so that
    # `compute_metrics` gets the logits array as for other models, not a tuple with the router losses and statistics.
    keys_to_ignore_at_inference = [
        "past_key_values", "cache", "aux_loss", "cluster_balance_loss", "expert_balance_loss", "router_z_loss",
        "model_reliability", "rerouted_pairs", "dropped_pairs", "router_logits",
    ]  # fmt: skip
    attribute_map = {
        "d_model": "hidden_size",
        "d_ff": "intermediate_size",
        "num_layers": "num_hidden_layers",
        "load_balancing_weight": "router_aux_loss_coef",
        "router_z_loss_weight": "router_z_loss_coef",
        "dropout": "attention_dropout",
    }

    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
        "layers.*.mlp.shared_expert.gate_proj": "colwise",
        "layers.*.mlp.shared_expert.up_proj": "colwise",
        "layers.*.mlp.shared_expert.down_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_ep_plan = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0

    num_clusters: int = 4
    experts_per_cluster: int = 4
    top_k_clusters: int = 1
    top_k_experts: int = 2
    norm_topk_prob: bool = True
    routing_temperature: float | int = 1.0
    router_jitter_noise: float | int = 0.0
    router_implementation: Literal["auto", "hierarchical", "flat"] = "auto"
    shared_expert_intermediate_size: int = 0
    first_k_dense_layers: int = 0
    dense_intermediate_size: int | None = None

    router_aux_loss_coef: float | int = 0.01
    router_cluster_aux_loss_coef: float | int | None = None
    router_z_loss_coef: float | int = 0.001
    output_router_logits: bool = False

    use_reliability_routing: bool = True
    reliability_decay: float = 0.9
    reliability_threshold: float = 0.5
    reliability_max_norm_ratio: float | int = 100.0
    use_adaptive_routing: bool = False
    adaptive_routing_rate: float = 1e-3
    expert_capacity_factor: float | int | None = None
    classifier_dropout: float | int | None = None

    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        # transformers' RoPE standardisation below fails with an AttributeError on a non-dict.
        for name, value in (("rope_parameters", self.rope_parameters), ("rope_scaling", kwargs.get("rope_scaling"))):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"Invalid ClusterMoEConfig: {name} must be a dict or None, got {value!r}.")
        for name, reason in _ORIGINAL_OPTIONS_WITHOUT_EFFECT.items():
            if name in kwargs:
                kwargs.pop(name)
                logger.warning(f"ClusterMoEConfig ignores the original package's `{name}`: {reason}")
        for alias, name in self.attribute_map.items():
            given, default = getattr(self, name), self.__dataclass_fields__[name].default
            if alias in kwargs and given != default and given != kwargs[alias]:
                raise ValueError(
                    f"Invalid ClusterMoEConfig: {alias}={kwargs[alias]!r} is an alias of {name}, which is given as "
                    f"{given!r}; pass one of them."
                )
        # transformers' handling of these fails with an AttributeError or a TypeError that names no field.
        dtype = self.dtype if self.dtype is not None else kwargs.get("torch_dtype")
        dtype_problem = None if dtype is None else _dtype_problem(dtype)
        if dtype_problem is not None:
            raise ValueError(f"Invalid ClusterMoEConfig: dtype {dtype_problem}, got {dtype!r}.")
        if self.id2label is not None and not isinstance(self.id2label, dict):
            raise ValueError(
                f"Invalid ClusterMoEConfig: id2label must map class ids to names (a dict), got {self.id2label!r}."
            )
        num_labels = kwargs.get("num_labels")
        if num_labels is not None and not (_is_int(num_labels) and num_labels > 0):
            raise ValueError(f"Invalid ClusterMoEConfig: num_labels must be a positive integer, got {num_labels!r}.")
        super().__post_init__(**kwargs)  # also applies the alias kwargs (d_model=...) through `attribute_map`
        # As transformers' `output_attentions` setter does (its `__post_init__` bypasses it): attention weights need the
        # eager attention. Otherwise the model would pick sdpa, which `validate` rejects when the model is built.
        if self.output_attentions and self._attn_implementation is None:
            self._attn_implementation = "eager"
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        # Derived defaults are computed from integers only; `validate` names a field of another type.
        # A non-positive size is reported by `validate` as such, not as a divisibility error.
        heads = self.num_attention_heads
        sizes_are_positive = all(_is_int(value) and value > 0 for value in (self.hidden_size, heads))
        if self.head_dim is None and sizes_are_positive:
            if self.hidden_size % heads != 0:
                raise ValueError(
                    f"Invalid ClusterMoEConfig: hidden_size ({self.hidden_size}) must be divisible by "
                    f"num_attention_heads ({self.num_attention_heads}) unless head_dim is given explicitly."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        factors = (self.intermediate_size, self.top_k_clusters, self.top_k_experts)  # of the dense width
        if self.dense_intermediate_size is None and all(_is_int(value) for value in factors):
            self.dense_intermediate_size = self.intermediate_size * self.num_experts_per_tok
        self.validate()
        self.__dict__[_CHANGED_SINCE_CHECK] = False

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        self.__dict__.pop(_ROUTING_SETTINGS, None)
        # A model checks a changed setting before its next forward (`ClusterMoEModel.forward`), as at construction:
        # settings are read live, and e.g. `top_k_experts=5` would otherwise fail inside top-k, or
        # `routing_temperature=0` give NaN outputs. Early-exit drafting lowers `num_hidden_layers` for every draft,
        # which the model checks against its layers itself: only a depth that is not a positive integer marks it.
        if name != "num_hidden_layers" or not (_is_int(value) and value > 0):
            self.__dict__[_CHANGED_SINCE_CHECK] = True

    def __delattr__(self, name):
        super().__delattr__(name)  # a deleted setting reads as the class default from now on
        self.__dict__.pop(_ROUTING_SETTINGS, None)
        self.__dict__[_CHANGED_SINCE_CHECK] = True

    def to_json_file(self, json_file_path, use_diff: bool = True):
        """Checked first, as `save_pretrained` is: the file would hold a config no model can be built from (and
        transformers opens it for writing before serialising, so a value JSON cannot hold left it empty)."""
        self.validate()
        super().to_json_file(json_file_path, use_diff=use_diff)

    def _remove_keys_not_serialized(self, d: dict):
        super()._remove_keys_not_serialized(d)
        for key in _PRIVATE_STATE:
            d.pop(key, None)

    @property
    def routing_settings(self) -> "RoutingSettings":
        """The settings the MoE blocks read in every forward, in one read: each attribute of a transformers config
        is read through two Python `__getattribute__` layers (~13 k instructions), ~16 reads per layer in per-token
        decoding. Kept until any setting changes."""
        settings = self.__dict__.get(_ROUTING_SETTINGS)
        if settings is None:
            settings = RoutingSettings(*(getattr(self, name) for name in RoutingSettings._fields))
            self.__dict__[_ROUTING_SETTINGS] = settings
        return settings

    @property
    def cluster_aux_loss_coef(self) -> float:
        """The weight the cluster-level balancing loss gets: `router_cluster_aux_loss_coef`, or when that is None,
        `router_aux_loss_coef`."""
        if self.router_cluster_aux_loss_coef is None:
            return self.router_aux_loss_coef
        return self.router_cluster_aux_loss_coef

    @cluster_aux_loss_coef.setter
    def cluster_aux_loss_coef(self, value):
        _reject_derived("cluster_aux_loss_coef", value, "router_cluster_aux_loss_coef, or router_aux_loss_coef if None")

    @property
    def num_experts(self) -> int:
        """Total number of routed experts, `num_clusters * experts_per_cluster`."""
        return self.num_clusters * self.experts_per_cluster

    @num_experts.setter
    def num_experts(self, value):
        # Qwen3-MoE/OLMoE name a field `num_experts`; here it is derived. A setter turns the AttributeError of the
        # constructor, `from_pretrained(..., num_experts=...)` and `update` into an error that says what to set.
        _reject_derived("num_experts", value, "num_clusters * experts_per_cluster")

    @property
    def num_experts_per_tok(self) -> int:
        """Distinct experts each token uses, `top_k_clusters * top_k_experts`."""
        return self.top_k_clusters * self.top_k_experts

    @num_experts_per_tok.setter
    def num_experts_per_tok(self, value):
        _reject_derived("num_experts_per_tok", value, "top_k_clusters * top_k_experts")

    @classmethod
    def from_settings(cls, settings: dict, origin: str, defaults: dict | None = None) -> "ClusterMoEConfig":
        """A config from settings named by hand (`create_coe_model`'s keywords, run_clm's `--config_overrides`), over
        `defaults` (e.g. a saved config): an alias (`d_model`, ...) replaces its field's default. The constructor
        keeps unknown names as attributes and drops generation settings, as transformers configs do (a checkpoint may
        carry such keys); here either is refused, with the closest names, instead of building the default the user
        meant to change."""
        defaults = {
            cls.attribute_map.get(name, name): dict(value) if isinstance(value, dict) else value
            for name, value in (defaults or {}).items()
        }
        by_field = {}
        for name, value in settings.items():
            field = cls.attribute_map.get(name, name)
            if field in by_field and by_field[field] != value:
                raise ValueError(
                    f"{origin}: {field} is given twice, as {by_field[field]!r} and as {value!r} (one of them through "
                    "its alias); pass one of them."
                )
            by_field[field] = dict(value) if isinstance(value, dict) else value  # transformers edits RoPE dicts
        fields = {field.name for field in dataclasses.fields(cls)}
        generation = sorted(set(by_field) & set(GenerationConfig._get_default_generation_params()) - fields)
        if generation:
            raise ValueError(
                f"{origin}: {', '.join(generation)}: generation settings, which the model config does not keep; set "
                "them on the model's generation_config, or pass them to generate."
            )
        # A RoPE setting given replaces the defaults' (transformers would let a legacy `rope_scaling` there win), and
        # keeps their rope_theta unless it sets one (or rope_theta is given): None drops the scaling, not the theta.
        rope_keys = ("rope_parameters", "rope_scaling")
        if by_field.keys() & set(rope_keys):
            saved_theta = next(
                (defaults[key]["rope_theta"] for key in rope_keys if "rope_theta" in (defaults.get(key) or {})),
                defaults.get("rope_theta"),
            )
            defaults = {key: value for key, value in defaults.items() if key not in rope_keys}
            for key in rope_keys:
                if key not in by_field or saved_theta is None or "rope_theta" in by_field:
                    continue
                given = by_field[key]
                if given is None and not any(by_field.get(other) is not None for other in rope_keys):
                    given = {"rope_type": "default"}  # unless the other key sets the RoPE parameters
                if isinstance(given, dict):
                    by_field[key] = {**given, "rope_theta": given.get("rope_theta", saved_theta)}
        # transformers' legacy names, which would lose to a saved config's `dtype` and `rope_parameters`.
        if "torch_dtype" in by_field:
            by_field.setdefault("dtype", by_field.pop("torch_dtype"))
        theta = by_field.pop("rope_theta", None)
        if theta is not None:  # into the RoPE dict that wins: a given one, else the defaults' (a legacy rope_scaling)
            given = next((key for key in ("rope_scaling", "rope_parameters") if by_field.get(key)), None)
            if given is not None and by_field[given].get("rope_theta", theta) != theta:
                raise ValueError(
                    f"{origin}: rope_theta is given twice, as {theta!r} and in {given} as "
                    f"{by_field[given]['rope_theta']!r}; pass one of them."
                )
            key = given or next((key for key in ("rope_scaling", "rope_parameters") if defaults.get(key)), None)
            rope = (by_field.get(key) or defaults.get(key)) if key else {"rope_type": "default"}
            by_field[key or "rope_parameters"] = {**rope, "rope_theta": theta}
        config = cls(**{**defaults, **by_field})
        unknown = [name for name in by_field if name not in fields and name in vars(config)]
        if unknown:
            names = sorted(fields | set(cls.attribute_map))
            described = []
            for name in unknown:
                close = difflib.get_close_matches(name, names, n=2)
                described.append(f"{name} (did you mean {' or '.join(close)}?)" if close else name)
            raise ValueError(f"{origin}: ClusterMoEConfig has no setting {', '.join(described)}.")
        return config

    def update_from_string(self, update_str: str):
        """transformers' `update_from_string` (run_clm's `--config_overrides`), which parses by the current value's
        type: it cannot set a field whose value is None, and reads "0.5" as an int where a float field holds 0 (e.g.
        from a config.json). Here a field whose annotation admits a number (`expert_capacity_factor`,
        `routing_temperature`, `pad_token_id`, ...) or whose value is None takes a number of the type its annotation
        allows; "None" keeps or resets it where the annotation allows None. Aliases (`d_model`, ...) parse as their
        fields, spaces around names and values are ignored, and a bad item changes nothing, not even the items before
        it."""
        copy.deepcopy(self)._apply_update_string(update_str)  # all or nothing: a bad item raises before any is set
        self._apply_update_string(update_str)

    def _apply_update_string(self, update_str: str):
        rest = []
        for item in update_str.split(","):
            key, _, text = item.partition("=")
            key, text = self.attribute_map.get(key.strip(), key.strip()), text.strip()  # d_model=... sets hidden_size
            item = f"{key}={text}"
            field = self.__dataclass_fields__.get(key)
            types = (get_args(field.type) or (field.type,)) if field is not None else ()  # float | None, or float
            resets = text in ("None", "none", "null") and type(None) in types
            numeric = int in types or float in types
            if not (resets or (field is not None and (numeric or getattr(self, key) is None))):
                rest.append(item)
                continue
            if resets:
                value = None
            elif int in types and text.lstrip("+-").isdigit():
                value = int(text)
            elif float in types and _is_float_literal(text):
                value = float(text)
            else:
                raise ValueError(f"Invalid ClusterMoEConfig: {key} ({field.type}) cannot be set from {text!r}.")
            setattr(self, key, value)
        if rest:
            super().update_from_string(",".join(rest))

    def validate(self):
        """Reject impossible values, naming the field and the constraint. Runs at construction, when a model is built,
        in `save_pretrained`, and before a model's next forward once a setting changed."""

        def require(condition: bool, message: str):
            if not condition:
                raise ValueError(f"Invalid ClusterMoEConfig: {message}")

        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "num_clusters", "experts_per_cluster",
            "top_k_clusters", "top_k_experts", "dense_intermediate_size",
        ):  # fmt: skip
            value = getattr(self, name)
            require(_is_int(value) and value > 0, f"{name} must be a positive integer, got {value!r}.")
        require(
            self.top_k_clusters <= self.num_clusters,
            f"top_k_clusters ({self.top_k_clusters}) must be <= num_clusters ({self.num_clusters}).",
        )
        require(
            self.top_k_experts <= self.experts_per_cluster,
            f"top_k_experts ({self.top_k_experts}) must be <= experts_per_cluster ({self.experts_per_cluster}).",
        )
        require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
            f"({self.num_attention_heads}).",
        )
        require(self.head_dim % 2 == 0, f"head_dim must be even for rotary embeddings, got {self.head_dim}.")
        for name in ("shared_expert_intermediate_size", "first_k_dense_layers"):
            value = getattr(self, name)
            require(_is_int(value) and value >= 0, f"{name} must be a non-negative integer, got {value!r}.")
        require(
            self.first_k_dense_layers <= self.num_hidden_layers,
            f"first_k_dense_layers ({self.first_k_dense_layers}) must be <= num_hidden_layers "
            f"({self.num_hidden_layers}).",
        )
        require(
            isinstance(self.hidden_act, str) and self.hidden_act in ACT2FN,
            f"hidden_act must be the name of one of transformers' activations, got {self.hidden_act!r}.",
        )
        dtype_problem = None if self.dtype is None else _dtype_problem(self.dtype)
        require(dtype_problem is None, f"dtype {dtype_problem}, got {self.dtype!r}.")
        # The classification head's size; transformers' `num_labels` setter turns a negative count into no labels.
        require(
            isinstance(self.id2label, dict) and len(self.id2label) > 0,
            f"num_labels must be a positive integer (id2label must name at least one class), got id2label "
            f"{self.id2label!r}.",
        )
        require(
            self.problem_type in _PROBLEM_TYPES,
            f"problem_type must be None or one of {list(_PROBLEM_TYPES[1:])}, got {self.problem_type!r}.",
        )
        require(
            self.router_implementation in ("auto", "hierarchical", "flat"),
            f"router_implementation must be 'auto', 'hierarchical' or 'flat', got {self.router_implementation!r}.",
        )
        for name in (
            "norm_topk_prob", "output_router_logits", "use_reliability_routing", "use_adaptive_routing", "use_cache",
            "tie_word_embeddings", "attention_bias",
        ):  # fmt: skip
            value = getattr(self, name)
            require(isinstance(value, bool), f"{name} must be True or False, got {value!r}.")

        def require_number(name: str, constraint: str, holds):
            value = getattr(self, name)
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            require(is_number and holds(value), f"{name} must be a finite number {constraint}, got {value!r}.")

        # Below this the softmax is one-hot already, and `logits / temperature` overflows float32 long before 0.
        require_number(
            "routing_temperature", f">= {MIN_ROUTING_TEMPERATURE}", lambda value: value >= MIN_ROUTING_TEMPERATURE
        )
        require_number("router_jitter_noise", ">= 0", lambda value: value >= 0)
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            require_number(name, ">= 0 (0 disables it)", lambda value: value >= 0)
        if self.router_cluster_aux_loss_coef is not None:
            require_number(
                "router_cluster_aux_loss_coef", ">= 0 (0 disables it), or None (router_aux_loss_coef's)",
                lambda value: value >= 0,
            )  # fmt: skip
        require_number("attention_dropout", "in [0, 1)", lambda value: 0 <= value < 1)
        if self.classifier_dropout is not None:
            require_number("classifier_dropout", "in [0, 1), or None (0.1)", lambda value: 0 <= value < 1)
        require_number("rms_norm_eps", "> 0", lambda value: value > 0)
        # 0 would leave the experts and routers (initialised here) all-zero: they would never learn.
        require_number("initializer_range", "> 0", lambda value: value > 0)
        require_number("reliability_decay", "in (0, 1)", lambda value: 0 < value < 1)
        require_number("reliability_threshold", "in [0, 1)", lambda value: 0 <= value < 1)
        require_number("reliability_max_norm_ratio", "> 1", lambda value: value > 1)
        require_number("adaptive_routing_rate", ">= 0", lambda value: value >= 0)
        if self.expert_capacity_factor is not None:
            require_number("expert_capacity_factor", "> 0, or None (dropless)", lambda value: value > 0)
        rope_parameters = self.rope_parameters
        require(isinstance(rope_parameters, dict), f"rope_parameters must be a dict, got {rope_parameters!r}.")
        # transformers' per-layer-type form ({"full_attention": {...}}) gets top-level defaults, which RoPE would use.
        nested = [key for key, value in rope_parameters.items() if isinstance(value, dict)]
        require(
            not nested,
            f"rope_parameters must be one flat dict (every layer has the same full attention), got settings per layer "
            f"type {nested}: pass {rope_parameters[nested[0]] if nested else None!r} itself.",
        )
        rope_type, rope_theta = rope_parameters.get("rope_type", "default"), rope_parameters.get("rope_theta")
        require(
            rope_type == "default" or rope_type in ROPE_INIT_FUNCTIONS,
            f"rope_parameters['rope_type'] must be 'default' or one of {sorted(ROPE_INIT_FUNCTIONS)}, got "
            f"{rope_type!r}.",
        )
        require(
            isinstance(rope_theta, (int, float)) and not isinstance(rope_theta, bool) and 0 < rope_theta < math.inf,
            f"rope_parameters['rope_theta'] must be a finite number > 0, got {rope_theta!r}.",
        )
        # The attention (Llama's) rotates the whole head_dim: a partial factor is ignored or breaks the shapes.
        partial_rotary_factor = rope_parameters.get("partial_rotary_factor", 1)
        require(
            partial_rotary_factor == 1 and not isinstance(partial_rotary_factor, bool),
            f"rope_parameters['partial_rotary_factor'] must be 1 or absent (RoPE rotates the whole head_dim), got "
            f"{partial_rotary_factor!r}.",
        )
        try:
            self.validate_rope()
        except (KeyError, TypeError, ValueError, ArithmeticError) as error:
            raise ValueError(f"Invalid ClusterMoEConfig: rope_parameters {rope_parameters!r}: {error}") from error
        # transformers only logs a warning for scaling parameters it cannot use (a `factor` of 0, factor lists of the
        # wrong length, ...); the model would then compute NaN or fail while being built.
        if rope_type != "default":
            problem = _rope_frequencies_problem(self, rope_type)
            require(problem is None, f"rope_parameters {rope_parameters!r} {problem}.")
        # Every layer attends to every earlier token. transformers' caches read these settings from any config and
        # would keep only a window of keys, so that cached decoding silently disagreed with the full forward.
        for name in ("sliding_window", "attention_chunk_size", "kv_sharing_modes"):
            value = getattr(self, name, None)
            require(
                value is None,
                f"{name}={value!r}: ClusterMoE has full causal attention in every layer (no "
                "sliding-window, chunked or shared-cache attention); leave it unset (remove it from a saved "
                "config.json that holds it: the model was trained with full attention).",
            )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) and name == "eos_token_id" else [value]
            require(
                value is None
                or (ids and all(_is_int(token_id) and 0 <= token_id < self.vocab_size for token_id in ids)),
                f"{name} ({value}) must be None or in [0, vocab_size={self.vocab_size})"
                + (", or a non-empty list of such ids." if name == "eos_token_id" else "."),
            )
        # transformers' own checks (`@strict` class validators), which overriding `validate` would otherwise skip;
        # resolved by name so that overrides apply. The token ids and RoPE are checked above, with field names.
        for validator in type(self).__class_validators__:
            if validator.__name__ in _VALIDATORS_RUN_ABOVE:
                continue
            try:
                getattr(self, validator.__name__)()
            except (TypeError, ValueError) as error:
                raise ValueError(f"Invalid ClusterMoEConfig: {error}") from error
        layer_types = getattr(self, "layer_types", None)  # entries and length checked by transformers' validator
        require(
            layer_types is None or all(layer_type == "full_attention" for layer_type in layer_types),
            f"layer_types={layer_types!r}: ClusterMoE has full causal attention in every layer; leave it unset or "
            "'full_attention' throughout.",
        )

# Whether a setting changed since the config was last checked, in the instance's `__dict__` (not saved).
_CHANGED_SINCE_CHECK = "_changed_since_check"
# The cached `routing_settings`, in the instance's `__dict__` (not saved), dropped whenever a setting changes.
_ROUTING_SETTINGS = "_routing_settings"
_PRIVATE_STATE = (_CHANGED_SINCE_CHECK, _ROUTING_SETTINGS)


class RoutingSettings(NamedTuple):
    """The routing settings of a `ClusterMoEConfig` as plain values (`ClusterMoEConfig.routing_settings`)."""

    top_k_clusters: int
    top_k_experts: int
    norm_topk_prob: bool
    routing_temperature: float
    router_jitter_noise: float
    expert_capacity_factor: float | None
    use_reliability_routing: bool
    reliability_threshold: float
    reliability_max_norm_ratio: float
    use_adaptive_routing: bool


# The lowest `routing_temperature`: a softmax at 1e-4 is one-hot for logits that differ by 0.01.
MIN_ROUTING_TEMPERATURE = 1e-4

# Options of the original ClusterMoE package with no counterpart here: dropped (not saved) with a warning.
_ORIGINAL_OPTIONS_WITHOUT_EFFECT = {
    "max_tree_depth": "routing is exactly two levels (clusters, then experts).",
    "search_beam_width": "routing picks the top-k clusters and experts; there is no beam search.",
    "use_expert_selection_cache": "there is no selection cache to turn on or off.",
    "enable_expert_pruning": "pruning is an explicit call, `model.prune_experts(...)`.",
}


# transformers' `problem_type`s of the sequence-classification head (its annotation lists them).
_PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")


# transformers' class validators that `validate` runs its own way, before the others: the token ids by its own checks,
# `validate_rope` with its error naming `rope_parameters`.
_VALIDATORS_RUN_ABOVE = {"validate_token_ids", "validate_rope"}


def _reject_derived(name: str, value, fields: str):
    raise ValueError(
        f"Invalid ClusterMoEConfig: {name} is derived, {name} = {fields}; set those fields instead of {name}={value!r}."
    )


def _is_float_literal(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _dtype_problem(dtype) -> str | None:
    """What keeps `dtype` (a torch dtype or its name, as in config.json) from being the model's dtype, or None."""
    import torch  # lazily, as transformers' configs do

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype):
        return "must be a torch dtype or its name, e.g. 'bfloat16'"
    if not dtype.is_floating_point:
        return "must be a floating-point dtype (float32, bfloat16, float16, ...)"
    return None


def _rope_frequencies_problem(config: "ClusterMoEConfig", rope_type: str) -> str | None:
    """Why the RoPE frequencies of a scaled `rope_type` cannot be computed, or are not finite and positive, or None."""
    import torch  # lazily, as transformers' configs do

    if rope_type == "longrope":  # one factor per frequency, or the frequencies fail to compute with a shape error
        for name in ("short_factor", "long_factor"):
            factors = config.rope_parameters.get(name)
            if not (isinstance(factors, list) and len(factors) == config.head_dim // 2):
                return f"need {name} to be a list of head_dim // 2 = {config.head_dim // 2} numbers, got {factors!r}"
    try:
        with torch.device("cpu"):  # also where models are built on the meta device (`from_pretrained`)
            inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    except (KeyError, TypeError, ValueError, RuntimeError, ArithmeticError) as error:
        return f"give no RoPE frequencies ({type(error).__name__}: {error})"
    if inv_freq.shape != (config.head_dim // 2,) or not (torch.isfinite(inv_freq).all() and (inv_freq > 0).all()):
        return f"give RoPE inverse frequencies that are not {config.head_dim // 2} finite positive numbers: {inv_freq}"
    if not math.isfinite(attention_scaling):
        return f"give a non-finite attention scaling ({attention_scaling})"
    if rope_type == "dynamic":
        # Computed above at max_position_embeddings, where "dynamic" does not scale yet. Past it, at length L, the
        # base is rope_theta * (1 + factor * (L / max_position_embeddings - 1)) ** (d / (d - 2)): finite and positive
        # at every length only for a finite factor >= 0 (factor -1 gave NaN logits from twice the context on).
        factor = config.rope_parameters["factor"]
        if not (math.isfinite(factor) and factor >= 0):
            return (
                f"give no finite RoPE frequencies past max_position_embeddings: dynamic scaling needs a finite "
                f"factor >= 0, got {factor}"
            )
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


ClusterMoEConfig.register_for_auto_class()  # custom code, also as a checkpoint's copy (see modeling_clustermoe)

__all__ = ["ClusterMoEConfig"]
