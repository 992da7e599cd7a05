# Copyright 2026 The ClusterMoE authors. Licensed under the Apache License, Version 2.0.
"""ClusterMoE: a decoder-only transformer whose MLPs are hierarchical (cluster -> expert) mixtures of experts.

Self-contained (imports only torch, transformers and `configuration_clustermoe`) so that `save_pretrained` can copy
it next to the weights and `from_pretrained(..., trust_remote_code=True)` works without this package installed.

Routing state (utilisation counts, reliability scores, balancing biases) lives in buffers. The forward pass only
*returns* routing statistics (each decoder layer next to its hidden states, so a layer recomputed by gradient
checkpointing is never counted twice), and sets each block's `masked_faulty_expert` flag for the gradient guard;
the statistics are folded into the buffers by a forward hook on the base model (counts, training forwards only) and
by a global optimizer-step hook (EMAs and biases).
"""

import contextlib
import copy
import functools
import inspect
import itertools
import math
import numbers
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)
from torch.optim.optimizer import register_optimizer_step_post_hook

from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, StaticLayer
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.integrations.moe import (
    ExpertsInterface,
    _can_use_grouped_mm,
    _grouped_mm,
    grouped_mm_experts_forward,
)
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    ModelOutput,
    MoeModelOutputWithPast,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.modeling_utils import PreTrainedModel, _add_variant, slice_logits_to_keep
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.import_utils import is_torchdynamo_compiling
from transformers.utils.output_capturing import OutputRecorder, capture_outputs, maybe_install_capturing_hooks

from .configuration_clustermoe import _CHANGED_SINCE_CHECK, ClusterMoEConfig, RoutingSettings, _is_int


logger = logging.get_logger(__name__)


# `router_implementation="auto"` scores experts only inside the chosen clusters from this many experts on; below it
# one dense matmul over all experts is cheaper than grouping tokens by cluster. Measured by
# benchmarks/router_scaling.py (docs/benchmarks.md): on CPU, at 2,048 tokens, the hierarchical router takes 1.1-1.4x
# the flat one's time at 64 experts, 0.6-0.75x at 256 and 0.09-0.15x at 4096 (at 1-64 tokens: 1.0-1.3x at 256,
# 0.4-0.7x at 4096).
HIERARCHICAL_ROUTER_MIN_EXPERTS = 256


# The most router weight values a forward gathers, one copy of its cluster's E x H rows per (token, cluster) pair,
# instead of grouping the pairs by cluster: decoding's few tokens then skip grouping's sort, offsets and scatter. Past
# it the copies cost more than grouping (one-off timings, docs/benchmarks.md: at 4,096 experts and hidden size 256,
# gathering 64 tokens' rows, 1M values, took 3.7 ms against grouping's 1.5).
GATHERED_ROUTER_ROWS_MAX = 2**17


def _uses_hierarchical_router(config: ClusterMoEConfig) -> bool:
    if config.router_implementation == "auto":
        return config.num_experts >= HIERARCHICAL_ROUTER_MIN_EXPERTS
    return config.router_implementation == "hierarchical"


class ClusterMoERMSNorm(LlamaRMSNorm):
    pass


class ClusterMoERotaryEmbedding(LlamaRotaryEmbedding):
    def __init__(self, config: ClusterMoEConfig):
        super().__init__(config)
        self.rope_parameters = copy.deepcopy(config.rope_parameters)  # what the frequencies were computed from


class ClusterMoEAttention(LlamaAttention):
    """Grouped-query attention with RoPE, dispatched through transformers' attention interface."""


class ClusterMoEMLP(nn.Module):
    """SwiGLU MLP, used for dense layers and the shared expert."""

    def __init__(self, config: ClusterMoEConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.hidden_act = config.hidden_act
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@use_experts_implementation
class ClusterMoEExperts(nn.Module):
    """All `num_clusters * experts_per_cluster` experts as fused 3D weights; cluster `c` owns ids `c*E ... c*E+E-1`."""

    def __init__(self, config: ClusterMoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.hidden_act = config.hidden_act
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """Eager reference: loop over the experts that received tokens."""
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            if expert_idx == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            current = F.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
        return final_hidden_states


# The `forward` transformers' `use_experts_implementation` puts on an experts class (the same code for every class),
# which dispatches to the experts implementation the config names.
_DISPATCHING_FORWARD = ClusterMoEExperts.forward.__code__


def _cpu_dtypes_without_fast_gemm() -> frozenset:
    """Half-precision dtypes this CPU multiplies far slower than float32: on x86 without AVX512-BF16/AMX (bf16) or
    AMX-FP16 (fp16) torch emulates them (~50x slower than float32 on the AVX2 CPU of docs/benchmarks.md)."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        return frozenset()  # other architectures: keep the native kernels
    slow = set()
    if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        slow.add(torch.bfloat16)
    if not torch.cpu._is_amx_fp16_supported():
        slow.add(torch.float16)
    return frozenset(slow)


_CPU_DTYPES_WITHOUT_FAST_GEMM = _cpu_dtypes_without_fast_gemm()
# The dtypes torch's grouped_mm kernels take.
_GROUPED_MM_KERNEL_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})


def _at_least_float32(tensor: torch.Tensor) -> torch.dtype:
    """The dtype to sum or measure floating-point `tensor` in: float32 for half precision, whose sums overflow easily,
    else its own. Compared in Python: `torch.promote_types` is a dispatched op, which shows in per-token decoding."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out = a @ b`; in half precision computed in float32 and rounded once to `out.dtype`, as a native
    half-precision GEMM (which accumulates in float32) does."""
    if out.dtype in (torch.float32, torch.float64):
        return torch.mm(a, b, out=out)
    with torch.autocast(a.device.type, enabled=False):  # autocast would cast the float32 operands back
        return out.copy_(torch.mm(a.float(), b.float()))


def _grouped_matmul(inputs, weights, groups: list[tuple[int, int]], transpose: bool) -> torch.Tensor:
    """`rows of group g @ weights[expert of g]` (`.T` if `transpose`) for consecutive groups of rows, one GEMM
    each; `groups` lists the (expert, rows) of the experts that received rows, so idle experts cost nothing."""
    weights = weights.transpose(1, 2) if transpose else weights
    out = inputs.new_empty(inputs.shape[0], weights.shape[2])
    row_counts = [rows for _, rows in groups]
    for (expert, _), rows_in, rows_out in zip(groups, inputs.split(row_counts), out.split(row_counts)):
        _mm_into(rows_in, weights[expert], rows_out)
    return out


def _grouped_weight_grad(inputs, grad_outputs, groups: list[tuple[int, int]], transpose: bool, weights_shape):
    """Gradient of `_grouped_matmul`'s weights: `grad_outputs[g].T @ inputs[g]` for transposed weights, else
    `inputs[g].T @ grad_outputs[g]`, written in place; zero for the experts that received no rows."""
    grad_weights = inputs.new_empty(weights_shape)
    idle = sorted(set(range(weights_shape[0])) - {expert for expert, _ in groups})
    if idle:
        grad_weights[idle] = 0  # one op, however many experts are idle
    row_counts = [rows for _, rows in groups]
    for (expert, _), rows_in, rows_grad in zip(groups, inputs.split(row_counts), grad_outputs.split(row_counts)):
        if transpose:
            _mm_into(rows_grad.t(), rows_in, grad_weights[expert])
        else:
            _mm_into(rows_in.t(), rows_grad, grad_weights[expert])
    return grad_weights


class _SortedGroupedLinear(torch.autograd.Function):
    """`_grouped_matmul` with its backward: one GEMM per active expert for the input gradient and one for each
    weight gradient (the group sizes are already on the host, so the backward needs no sync)."""

    @staticmethod
    def forward(ctx, inputs, weights, groups, transpose):
        # inputs (S, K) sorted by expert; weights (N, M, K) if `transpose` else (N, K, M) -> (S, M)
        ctx.save_for_backward(inputs, weights)
        ctx.groups, ctx.transpose = groups, transpose
        return _grouped_matmul(inputs, weights, groups, transpose)

    @staticmethod
    def backward(ctx, grad_out):
        inputs, weights = ctx.saved_tensors
        groups, transpose = ctx.groups, ctx.transpose
        grad_inputs = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_inputs = _grouped_matmul(grad_out, weights, groups, not transpose)
        if ctx.needs_input_grad[1]:
            grad_weights = _grouped_weight_grad(inputs, grad_out, groups, transpose, weights.shape)
        return grad_inputs, grad_weights, None, None


# Up to this many (token, expert) pairs, inference on CPU in a dtype with fast GEMMs (not those in
# `_CPU_DTYPES_WITHOUT_FAST_GEMM`) multiplies each pair on its own (two matrix-vector products), which skips
# grouped_mm's sort and scatter bookkeeping and its pass over every expert: at 2 pairs (batch-1 decoding here) it
# takes 0.4x grouped_mm's time, at 8 pairs 0.9x, from ~10 pairs it is slower (benchmarks/pair_call_cost.py).
PER_PAIR_MAX_PAIRS = 8


def _per_pair_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Inference for a handful of pairs: each pair's expert applied to its token's vector, no sorting or grouping.
    Per token, outputs are weighted and summed in pair order, in at least float32 and rounded once, as the MoE block
    combines per-pair outputs (and transformers' `grouped_mm` its weighted call); a weight of 1 (the block's per-pair
    call) is not multiplied."""
    # Read once, not per pair: each parameter read goes through `nn.Module.__getattr__`.
    gate_up_proj, down_proj, apply_gate = self.gate_up_proj, self.down_proj, self._apply_gate
    num_experts, is_transposed = self.num_experts, self.is_transposed
    dtype = gate_up_proj.dtype
    inputs = hidden_states if hidden_states.dtype == dtype else hidden_states.to(dtype)  # as grouped_mm computes
    weighted_dtype = _at_least_float32(inputs)
    token_outputs = []
    for token_input, experts, weights in zip(inputs, top_k_index.tolist(), top_k_weights.tolist()):
        token_output = None
        for expert, weight in zip(experts, weights):
            if expert == num_experts:  # a pair the model does not serve (see `SENTINEL_SKIPPING_EXPERTS`)
                continue
            if is_transposed:  # (N, H, 2I) and (N, I, H)
                expert_out = apply_gate(token_input @ gate_up_proj[expert]) @ down_proj[expert]
            else:  # (N, 2I, H) and (N, H, I): matrix-vector products, without transposing the weights
                gated = apply_gate(torch.mv(gate_up_proj[expert], token_input))  # (I,)
                expert_out = torch.mv(down_proj[expert], gated)  # (H,)
            if expert_out.dtype != weighted_dtype:
                expert_out = expert_out.to(weighted_dtype)
            expert_out = expert_out if weight == 1.0 else expert_out * weight
            token_output = expert_out if token_output is None else token_output + expert_out
        if token_output is None:  # every pair of the token unserved
            token_output = torch.zeros_like(token_input, dtype=weighted_dtype)
        token_outputs.append(token_output)
    output = torch.stack(token_outputs)  # (tokens, H)
    return output if output.dtype == hidden_states.dtype else output.to(hidden_states.dtype)


def _eager_experts_loop(experts: nn.Module, hidden_states, top_k_index, top_k_weights):
    """The experts' own eager loop: the `forward` that transformers' dispatcher (`use_experts_implementation`) wraps,
    of the most derived decorated class. A subclass decorated again may wrap its parent's `forward`, whose dispatcher
    then comes back here: each such return runs the next loop up the class hierarchy."""
    loops = []  # most derived first
    for cls in type(experts).__mro__:
        loop = cls.__dict__.get("forward")
        if getattr(loop, "__code__", None) is not _DISPATCHING_FORWARD:
            continue
        while getattr(loop, "__code__", None) is _DISPATCHING_FORWARD:
            loop = loop.__wrapped__
        if loop not in loops:
            loops.append(loop)
    depth = experts.__dict__.get("_eager_loop_depth", 0)
    experts.__dict__["_eager_loop_depth"] = depth + 1
    try:
        return loops[min(depth, len(loops) - 1)](experts, hidden_states, top_k_index, top_k_weights)
    finally:
        experts.__dict__["_eager_loop_depth"] = depth


def _grouped_mm_kernels_would_refuse(experts: nn.Module, hidden_states: torch.Tensor) -> bool:
    """Whether transformers' `grouped_mm` would hand torch's grouped_mm kernels what they raise for: float64, or rows
    that are not 16-byte aligned (e.g. a hidden size of 34 in float32, or an intermediate size of 12 in bf16). Where
    it would not run them for either weight (e.g. float32 under compilation: its fallback loop), anything is fine."""
    weights = (experts.gate_up_proj if experts.has_gate else experts.up_proj, experts.down_proj)
    aligned = all(size * weight.element_size() % 16 == 0 for weight in weights for size in weight.shape[1:])
    if aligned and weights[0].dtype in _GROUPED_MM_KERNEL_DTYPES:
        return False
    return any(_can_use_grouped_mm(hidden_states, weight, None) for weight in weights)


def sorted_mm_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`experts_implementation="sorted_mm"`, ClusterMoE's default: transformers' `grouped_mm`, with two CPU paths
    where it is slow. Without gradients, for at most `PER_PAIR_MAX_PAIRS` pairs (decoding) and in a dtype with fast
    GEMMs, each pair runs on its own. For weights in a half-precision dtype the CPU emulates
    (`_CPU_DTYPES_WITHOUT_FAST_GEMM`), or that `grouped_mm`'s kernels cannot take (float64, or rows not 16-byte
    aligned; on any device), it sorts the (token, expert) pairs by expert once and runs one GEMM per expert that
    received pairs (half precision in float32), forward and backward; per token, outputs are summed in the eager
    reference's order. Both read the routing on the host
    (free on CPU; one sync elsewhere, and a graph break under compilation), which their per-expert GEMMs need. Experts
    that loop does not implement (biases, no gate) take their own eager loop at such sizes. Measured against
    `grouped_mm` in docs/benchmarks.md."""
    if not self.has_gate or self.has_bias or self.has_post_expert_norm or self._is_expert_parallel:
        if not self._is_expert_parallel and _grouped_mm_kernels_would_refuse(self, hidden_states):
            return _eager_experts_loop(self, hidden_states, top_k_index, top_k_weights)
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    cpu_eager = _host_reads_are_free(hidden_states)  # on CPU, outside torch.compile
    fast_dtype = not cpu_eager or self.gate_up_proj.dtype not in _CPU_DTYPES_WITHOUT_FAST_GEMM
    if cpu_eager and fast_dtype and not torch.is_grad_enabled() and top_k_index.numel() <= PER_PAIR_MAX_PAIRS:
        return _per_pair_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    if fast_dtype and not _grouped_mm_kernels_would_refuse(self, hidden_states):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    num_tokens, hidden_dim = hidden_states.shape
    pair_experts = top_k_index.reshape(-1)  # (S,), S = tokens * top_k
    sorted_experts, order = torch.sort(pair_experts, stable=True)  # stable: per token, the eager summation order
    group_sizes = torch.bincount(sorted_experts, minlength=self.num_experts).tolist()
    # The experts that received pairs; pairs sent to the id `num_experts` sort last and are skipped.
    groups = [(expert, rows) for expert, rows in enumerate(group_sizes[: self.num_experts]) if rows]
    order = order[: sum(rows for _, rows in groups)]  # (S',)
    pair_tokens = order // top_k_index.shape[-1]  # (S',) token of each sorted pair
    inputs = hidden_states[pair_tokens].to(self.gate_up_proj.dtype)
    transpose = not self.is_transposed
    # Without gradients, skip the autograd.Function wrapper (its overhead shows in per-token decoding).
    linear = _SortedGroupedLinear.apply if torch.is_grad_enabled() else _grouped_matmul
    gate_up = linear(inputs, self.gate_up_proj, groups, transpose)  # (S', 2I)
    outputs = linear(self._apply_gate(gate_up), self.down_proj, groups, transpose)  # (S', H)
    # Weighed and summed in the weights' precision (float32 from a router), then rounded once, as `grouped_mm` does.
    outputs = outputs * top_k_weights.reshape(-1)[order, None]
    return outputs.new_zeros(num_tokens, hidden_dim).index_add_(0, pair_tokens, outputs).to(hidden_states.dtype)


ExpertsInterface.register("sorted_mm", sorted_mm_experts_forward)

# Experts implementations that skip (token, expert) pairs sent to the id `num_experts` (transformers' expert-parallel
# sentinel). The MoE block sends the pairs it does not serve there (dropped by capacity limits, of padding tokens), so
# that they cost no expert compute. Other implementations (`batched_mm` indexes the weights with every id), and expert
# parallelism (its dispatch counts pairs per expert id), get the pairs' real ids, and the block zeroes those outputs.
SENTINEL_SKIPPING_EXPERTS = frozenset({"eager", "grouped_mm", "sorted_mm"})


def _is_expert_parallel(experts: nn.Module) -> bool:
    """Whether transformers' expert parallelism shards these experts over processes (also under adapters: peft)."""
    experts = experts.get_base_layer() if hasattr(experts, "get_base_layer") else experts
    return getattr(experts, "_is_expert_parallel", False)


def _position_in_group(group_ids: torch.Tensor, num_groups: int) -> torch.Tensor:
    """For each entry, how many earlier entries (in order) share its group id. No host sync."""
    sorted_ids, perm = torch.sort(group_ids, stable=True)
    counts = torch.zeros(num_groups, dtype=torch.long, device=group_ids.device)
    counts.index_add_(0, group_ids, torch.ones_like(group_ids))
    starts = counts.cumsum(0) - counts
    position_sorted = torch.arange(group_ids.numel(), device=group_ids.device) - starts[sorted_ids]
    return torch.empty_like(position_sorted).scatter_(0, perm, position_sorted)


class ClusterMoERouting(NamedTuple):
    """What `ClusterMoERouter` decides for a batch of tokens (kc = top_k_clusters, E = experts_per_cluster).

    cluster_logits      (tokens, C)       raw cluster-router logits (recorded as `router_logits`)
    cluster_log_probs   (tokens, C)       log P(cluster) at the routing temperature
    cluster_index       (tokens, kc)      chosen clusters
    expert_logits       (tokens, kc, E)   raw expert logits inside each chosen cluster
    expert_log_probs    (tokens, kc, E)   log P(expert | cluster) at the routing temperature
    expert_candidates   (tokens, kc, E')  local expert ids, best first by selection score (E' = top_k_experts, or
                                          all E when capacity limits may need the next-best experts)
    candidate_log_probs (tokens, kc, E')  log P(expert | cluster) of each candidate
    chosen_cluster_log_probs (tokens, kc) log P(cluster) of each chosen cluster
    """

    cluster_logits: torch.Tensor
    cluster_log_probs: torch.Tensor
    cluster_index: torch.Tensor
    expert_logits: torch.Tensor
    expert_log_probs: torch.Tensor
    expert_candidates: torch.Tensor
    candidate_log_probs: torch.Tensor
    chosen_cluster_log_probs: torch.Tensor


def _distributed_is_running() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _is_dtensor(tensor: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


@torch.no_grad()
def _set_expert_row(tensor: torch.Tensor, expert: int, row: torch.Tensor | None):
    """`tensor[expert] = row` (zeros for None) in place, also where `tensor` is a DTensor sharded over processes
    (tensor or expert parallelism, FSDP2), whose `tensor[expert]` is a copy: each process then writes the part of the
    row its shard holds, with pointwise ops against replicated operands (no gathering)."""
    local = tensor.data
    if not _is_dtensor(local):
        if row is None:
            local[expert].zero_()
        else:
            local[expert] = row
        return
    from torch.distributed.tensor import DTensor, Replicate

    replicated = [Replicate()] * local.device_mesh.ndim
    selected = torch.zeros((local.shape[0],) + (1,) * (local.dim() - 1), dtype=torch.bool, device=local.device)
    selected[expert] = True  # (N, 1, ...)
    selected = DTensor.from_local(selected, local.device_mesh, replicated, run_check=False)
    if row is None:
        local.masked_fill_(selected, 0)
    else:
        row = DTensor.from_local(row.unsqueeze(0), local.device_mesh, replicated, run_check=False)  # (1, ...)
        local.copy_(torch.where(selected, row, local))


def _broadcast_from_first_process(tensor: torch.Tensor):
    """Process 0's `tensor` on every process, through a device the default group serves: its backend configuration
    reads e.g. "cpu:gloo,cuda:gloo", or "cuda:nccl" for NCCL alone, which a CPU tensor (offloaded weights) then goes
    through the accelerator for."""
    if tensor.device.type not in torch.distributed.get_backend_config():
        on_device = tensor.to(torch.accelerator.current_accelerator())
        torch.distributed.broadcast(on_device, src=0)
        tensor.copy_(on_device)
    else:
        torch.distributed.broadcast(tensor, src=0)


def _host_reads_are_free(tensor: torch.Tensor) -> bool:
    """Whether reading `tensor`'s values on the host costs no device sync: on CPU, outside `torch.compile`. There the
    model reads values to skip work they show to be unnecessary; elsewhere it reads none for that. (Input checks on
    devices without asynchronous assertions, e.g. MPS, and `sorted_mm`'s loop for weights `grouped_mm` refuses read
    on the host anyway: see there.)"""
    return tensor.device.type == "cpu" and not is_torchdynamo_compiling()


# A finite stand-in for log(0), exp() of which is 0 in float32, so that sums over it and their gradients stay finite: a
# padding token's log-probability in the balancing loss, and, divided by a routing temperature below 1 as the logits
# are, the log-reliability of an expert that selection must not choose (or of a cluster left with too few selectable
# ones). Any real score then lies above it (of logits less than 1e4 apart), and the excluded still rank by theirs, to
# float32's resolution there (about 1e-3; more at routing temperatures below 1).
_LOG_ZERO = -1e4


def _router_linear(hidden_states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits `hidden_states @ weight.T` (weight (out, H), or batched (..., out, H) against hidden states
    (..., H)) in the router weights' dtype, also under autocast: transformers' `_grouped_mm`, which the hierarchical
    router uses, is not autocast, so all router paths then decide alike."""
    if torch.is_autocast_enabled(hidden_states.device.type):
        with torch.autocast(hidden_states.device.type, enabled=False):
            return _router_linear(hidden_states.to(weight.dtype), weight)
    if weight.dim() == 2:
        return F.linear(hidden_states, weight)
    return (weight @ hidden_states.unsqueeze(-1)).squeeze(-1)


def _at_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax input in float32 (float64 in a float64 model): `logits / temperature`, without the no-op cast and
    division (each a dispatched op, which shows in per-token decoding) at float32 and temperature 1."""
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return logits if temperature == 1.0 else logits / temperature


class _KeepsBufferDtypes(nn.Module):
    """A module of routing state, whose buffers keep the dtype they were registered with: device moves apply to them,
    dtype casts do not (`model.to(torch.bfloat16)`, `.half()`, and `.type()`, which casts integer buffers too). Bias
    steps of `adaptive_routing_rate` and the reliability EMA would round away in 16-bit floats, and counts would stop
    being exact. A buffer that something else left in another dtype (`load_state_dict(assign=True)` of a cast state)
    gets its own back at the next cast or move."""

    def __init__(self):
        super().__init__()
        self._buffer_dtypes = {}

    def register_buffer(self, name, tensor, persistent=True):
        super().register_buffer(name, tensor, persistent)
        if tensor is not None:  # the first registration's: `load_state_dict(assign=True)` registers loaded tensors
            self._buffer_dtypes.setdefault(name, tensor.dtype)

    def _apply(self, fn, recurse=True):
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        # A module pickled before buffer dtypes were recorded keeps those of its buffers as they are.
        for name, dtype in self.__dict__.get("_buffer_dtypes", {}).items():
            after = self._buffers.get(name)
            if after is None or after.dtype == dtype:
                continue
            # From the tensor before the cast, which a 16-bit cast would have rounded (or overflowed, for counts).
            source = before[name] if before.get(name) is not None else after
            self._buffers[name] = source.to(device=after.device, dtype=dtype)
        return self


class ClusterMoERouter(_KeepsBufferDtypes):
    """Two-level router: `top_k_clusters` clusters per token, then experts scored inside those clusters only.

    Selection scores add, to the log-probabilities, the adaptive balancing biases, the log-reliability of the
    experts/clusters (experts below `reliability_threshold` excluded), and training-time jitter; the combine weights
    use the plain probabilities. Returns a `ClusterMoERouting`.
    """

    def __init__(self, config: ClusterMoEConfig):
        super().__init__()
        self.config = config
        self.num_clusters = config.num_clusters
        self.experts_per_cluster = config.experts_per_cluster
        self.cluster_weight = nn.Parameter(torch.zeros(config.num_clusters, config.hidden_size))
        self.expert_weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))
        # Adaptive (auxiliary-loss-free) balancing biases, nudged after each optimizer step.
        self.register_buffer("cluster_bias", torch.zeros(config.num_clusters, dtype=torch.float32))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        # EMA health score in [0, 1] per expert, and its token counts (for utilisation-weighted aggregation).
        self.register_buffer("expert_reliability", torch.ones(config.num_experts, dtype=torch.float32))
        self.register_buffer("expert_token_counts", torch.zeros(config.num_experts, dtype=torch.long))
        # The counts summed over processes as of the last optimizer step: what selection weighs reliability by. Like
        # every input of selection it changes only at optimizer steps, so a forward that gradient checkpointing
        # re-runs routes as the original did, and data-parallel replicas route alike.
        self.register_buffer("selection_token_counts", torch.zeros(config.num_experts, dtype=torch.long))
        self.hierarchical = _uses_hierarchical_router(config)
        self._cached_selection_bias = None  # see `selection_bias`

    _FLOAT32_STATE = ("cluster_bias", "expert_bias", "expert_reliability")
    _SELECTION_SOURCES = ("cluster_bias", "expert_bias", "expert_reliability", "selection_token_counts")

    def selectable_experts(self) -> torch.Tensor:
        """(N,) bool: the experts selection may choose, those whose reliability is at least `reliability_threshold`
        (all of them without reliability routing)."""
        if not self.config.use_reliability_routing:
            return torch.ones_like(self.expert_reliability, dtype=torch.bool)
        return self.expert_reliability >= self.config.reliability_threshold

    def reliability_scores(self) -> torch.Tensor:
        """The experts' reliabilities, (N,), with NaN (only a corrupted buffer holds one) read as 0: selection already
        excludes such an expert, and its cluster's and layer's reliability must stay finite, or `topk` would rank
        the NaN cluster first."""
        return self.expert_reliability.nan_to_num(nan=0.0)

    def layer_reliability(self) -> torch.Tensor:
        """Utilisation-weighted mean reliability of all the experts, 0-d, weighted by the training counts + 1."""
        weights = self.expert_token_counts.float() + 1.0
        return (weights * self.reliability_scores()).sum() / weights.sum()

    def cluster_reliability(self, token_counts: torch.Tensor | None = None) -> torch.Tensor:
        """Utilisation-weighted mean expert reliability of each cluster, shape (C,), weighted by `token_counts`
        (N,) + 1, by default the training counts so far."""
        token_counts = self.expert_token_counts if token_counts is None else token_counts
        weights = (token_counts.float() + 1.0).view(self.num_clusters, -1)
        scores = self.reliability_scores().view(self.num_clusters, -1)
        return (weights * scores).sum(-1) / weights.sum(-1)

    def selection_bias(self, settings: RoutingSettings | None = None) -> tuple[torch.Tensor | None, ...]:
        """The terms selection adds to the log-probabilities, per cluster (C,) and per expert (C, E), or None: the
        adaptive balancing biases and the log-reliability, with experts below the reliability threshold excluded.
        `settings`: the config's `routing_settings`, where the caller has read them already.

        Reused until a buffer they are computed from changes, so that decoding does not rebuild them for every token:
        in-place updates bump a tensor's version counter, and `buffer.data = ...` (or swapping tensors) replaces its
        storage. An in-place write to `buffer.data` changes neither: write to the buffer itself."""
        if is_torchdynamo_compiling():
            return self._compute_selection_bias()
        # Read in every forward (per token in decoding): the buffers straight from `_buffers`, without nn.Module's
        # `__getattr__` for each, and the key compared as one tuple of plain values.
        buffers = self._buffers
        sources = tuple(buffers[name] for name in self._SELECTION_SOURCES)
        if any(map(torch.Tensor.is_inference, sources)):
            return self._compute_selection_bias()  # no version counters to key a cache on
        settings = self.config.routing_settings if settings is None else settings
        key = (
            settings.use_adaptive_routing,
            settings.use_reliability_routing,
            settings.reliability_threshold,
            settings.top_k_experts,  # clusters with fewer selectable experts are excluded
            settings.routing_temperature,  # the excluded ones' terms scale with it below 1
            # The cache keeps the sources alive, so their ids cannot be reused by other tensors meanwhile.
            *map(id, sources),
            *(source._version for source in sources),
            *map(torch.Tensor.data_ptr, sources),
        )
        cached = self._cached_selection_bias
        if cached is None or cached[0] != key:
            cached = self._cached_selection_bias = (key, sources, self._compute_selection_bias())
        return cached[2]

    def _compute_selection_bias(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        config = self.config
        cluster_term = expert_term = None
        if config.use_adaptive_routing:
            cluster_term, expert_term = self.cluster_bias, self.expert_bias
        if config.use_reliability_routing:
            excluded = ~self.selectable_experts()
            # Below the log-probabilities at temperatures under 1, which spread them; above 1 they only narrow.
            log_zero = _LOG_ZERO / min(config.routing_temperature, 1.0)
            expert_log_reliability = self.expert_reliability.clamp_min(1e-6).log().masked_fill(excluded, log_zero)
            # A cluster with fewer than top_k_experts selectable experts would have to fill its choice with excluded
            # ones: exclude the cluster instead.
            too_few = (~excluded).view(self.num_clusters, -1).sum(-1) < config.top_k_experts
            cluster_log_reliability = self.cluster_reliability(self.selection_token_counts).clamp_min(1e-6).log()
            cluster_log_reliability = cluster_log_reliability.masked_fill(too_few, log_zero)
            if cluster_term is None:
                cluster_term, expert_term = cluster_log_reliability, expert_log_reliability
            else:
                cluster_term, expert_term = cluster_term + cluster_log_reliability, expert_term + expert_log_reliability
        # All-zero terms (no bias yet, every expert fully reliable) change no score: none spares the additions, and
        # lets the router read the chosen log-probabilities off top-k. Read on the host where that costs no sync.
        if cluster_term is not None and _host_reads_are_free(cluster_term):
            cluster_term = cluster_term if cluster_term.any() else None
            expert_term = expert_term if expert_term.any() else None
        return cluster_term, None if expert_term is None else expert_term.view(self.num_clusters, -1)

    def _expert_logits(self, hidden_states: torch.Tensor, cluster_index: torch.Tensor) -> torch.Tensor:
        """Expert logits inside the chosen clusters, (tokens, kc, E)."""
        num_tokens, top_k_clusters = cluster_index.shape
        if not self.hierarchical:
            all_logits = _router_linear(hidden_states, self.expert_weight).view(num_tokens, self.num_clusters, -1)
            # Indexing rather than `gather`: its backward keeps the indices, not all C * E logits per token.
            token_index = torch.arange(num_tokens, device=hidden_states.device).unsqueeze(-1)  # (tokens, 1)
            return all_logits[token_index, cluster_index]
        expert_weight = self.expert_weight.view(self.num_clusters, self.experts_per_cluster, -1)  # (C, E, H)
        pairs = num_tokens * top_k_clusters
        gathered = pairs * self.experts_per_cluster * expert_weight.shape[-1]  # values copied: E x H per pair
        if pairs <= self.num_clusters and gathered <= GATHERED_ROUTER_ROWS_MAX:
            # Few (token, cluster) pairs, as in decoding: each pair's cluster rows, gathered (no more than the C*E*H
            # weights grouping reads), in one batched product, without grouping's sort, offsets and scatter.
            rows = expert_weight[cluster_index]  # (tokens, kc, E, H)
            return _router_linear(hidden_states.unsqueeze(1), rows)  # (tokens, kc, E)
        # Group (token, cluster) pairs by cluster and multiply each group by its own cluster's expert rows only:
        # cost grows with top_k_clusters * E instead of C * E.
        flat_clusters = cluster_index.reshape(-1)  # (tokens * kc,)
        sorted_clusters, perm = torch.sort(flat_clusters)
        cluster_ids = torch.arange(self.num_clusters, device=flat_clusters.device)
        # (C,) where each cluster's group ends: exact (a float histogram misbins from ~8k clusters), no host sync
        offsets = torch.searchsorted(sorted_clusters, cluster_ids, right=True, out_int32=True)
        inputs = hidden_states[perm // top_k_clusters]  # (tokens*kc, H)
        weight = expert_weight.transpose(1, 2)  # (C, H, E)
        # grouped_mm needs 16-byte aligned rows, also in the backward for the gradient of its (tokens*kc, E) output:
        # zero-pad E (and H) where they are not, and slice the padding off again. That copies the router weights in
        # every forward; at aligned sizes (E and H multiples of 4 in float32, of 8 in 16-bit dtypes) they are used as
        # they are.
        align = 16 // weight.element_size()
        pad_experts, pad_hidden = -self.experts_per_cluster % align, -weight.shape[1] % align
        if pad_experts or pad_hidden:
            weight = F.pad(weight, (0, pad_experts, 0, pad_hidden))
            inputs = F.pad(inputs, (0, pad_hidden))
        grouped_mm = _grouped_mm  # torch's kernels; transformers' fallback loop (with a backward) for float64
        if weight.dtype not in _GROUPED_MM_KERNEL_DTYPES:
            grouped_mm = torch.ops.transformers.grouped_mm_fallback
        sorted_logits = grouped_mm(inputs, weight, offs=offsets)[:, : self.experts_per_cluster]  # (tokens*kc, E)
        logits = torch.empty_like(sorted_logits).index_copy_(0, perm, sorted_logits)
        return logits.view(num_tokens, top_k_clusters, self.experts_per_cluster)

    def forward(self, hidden_states: torch.Tensor, settings: RoutingSettings | None = None) -> ClusterMoERouting:
        """`settings`: the config's `routing_settings`, where the caller has read them already."""
        settings = self.config.routing_settings if settings is None else settings
        temperature = settings.routing_temperature
        noise = settings.router_jitter_noise if self.training else 0.0
        cluster_term, expert_term = self.selection_bias(settings)

        cluster_logits = _router_linear(hidden_states, self.cluster_weight)  # (tokens, C)
        cluster_log_probs = F.log_softmax(_at_temperature(cluster_logits, temperature), dim=-1)
        cluster_scores = cluster_log_probs if cluster_term is None else cluster_log_probs + cluster_term
        if noise > 0:
            cluster_scores = cluster_scores + torch.randn_like(cluster_scores) * noise
        cluster_choice = torch.topk(cluster_scores, settings.top_k_clusters, dim=-1)
        cluster_index = cluster_choice.indices  # (tokens, kc)

        expert_logits = self._expert_logits(hidden_states, cluster_index)  # (tokens, kc, E)
        expert_log_probs = F.log_softmax(_at_temperature(expert_logits, temperature), dim=-1)
        expert_scores = expert_log_probs if expert_term is None else expert_log_probs + expert_term[cluster_index]
        if noise > 0:
            expert_scores = expert_scores + torch.randn_like(expert_scores) * noise
        num_candidates = settings.top_k_experts if settings.expert_capacity_factor is None else self.experts_per_cluster
        expert_choice = torch.topk(expert_scores, num_candidates, dim=-1)
        expert_candidates = expert_choice.indices  # (tokens, kc, E')

        # Where nothing was added to the log-probabilities, top-k's values are the chosen ones' log-probabilities.
        if cluster_scores is cluster_log_probs:
            chosen_cluster_log_probs = cluster_choice.values
        else:
            chosen_cluster_log_probs = cluster_log_probs.gather(1, cluster_index)
        if expert_scores is expert_log_probs:
            candidate_log_probs = expert_choice.values
        else:
            candidate_log_probs = expert_log_probs.gather(-1, expert_candidates)
        return ClusterMoERouting(
            cluster_logits,
            cluster_log_probs,
            cluster_index,
            expert_logits,
            expert_log_probs,
            expert_candidates,
            candidate_log_probs,
            chosen_cluster_log_probs,
        )


class _PairInputGradientGate(torch.autograd.Function):
    """Identity on the experts' inputs (pairs, H) that zeroes, in the backward, the input gradient of the pairs whose
    outputs `_MaskExcludedPairOutputs` zeroed: faulty pairs, whose broken expert gives its inputs non-finite gradients
    even for zeroed outputs (0 * NaN), and pairs not computed, whose input gradient rows `grouped_mm` leaves
    uninitialised.

    Which pairs are faulty is known only after the experts ran, so the mask travels back as the gradient of this
    function's second output, a dummy (pairs,): autograd runs this backward once both gradients have arrived. Unlike
    `Tensor.register_hook`, this also holds under `torch.compile` (in torch 2.13, a hook registered on an intermediate
    tensor drops the attribute writes that follow it in the compiled frame, e.g. transformers' reset of its
    output-recording state)."""

    @staticmethod
    def forward(ctx, pair_inputs):
        ctx.set_materialize_grads(False)  # no mask arrives when no pair was excluded
        return pair_inputs.view_as(pair_inputs), pair_inputs.new_zeros(pair_inputs.shape[0])

    @staticmethod
    def backward(ctx, grad_inputs, excluded_mask):
        if grad_inputs is None or excluded_mask is None:
            return grad_inputs
        return grad_inputs.masked_fill(excluded_mask.bool().unsqueeze(-1), 0.0)


class _MaskExcludedPairOutputs(torch.autograd.Function):
    """Zeroes the outputs (pairs, H) of the `excluded` pairs and their gradients, and returns the mask as the gradient
    of the dummy that `_PairInputGradientGate` created."""

    @staticmethod
    def forward(ctx, pair_outputs, gate_dummy, excluded):
        ctx.save_for_backward(excluded)
        ctx.mask_dtype = gate_dummy.dtype
        return pair_outputs.masked_fill(excluded.unsqueeze(-1), 0.0)

    @staticmethod
    def backward(ctx, grad_outputs):
        (excluded,) = ctx.saved_tensors
        return grad_outputs.masked_fill(excluded.unsqueeze(-1), 0.0), excluded.to(ctx.mask_dtype), None


def _zero_non_finite_grad(block_ref: "weakref.ref[ClusterMoESparseMoeBlock]", parameter: nn.Parameter):
    """Only after the block masked a faulty expert: other non-finite gradients (an fp16 loss-scale overflow) must reach
    the gradient scaler, which then skips the step and lowers the scale."""
    block, grad = block_ref(), parameter.grad
    if block is None or grad is None:  # None: an optimizer stepping in the backward took the gradient already
        return
    masked = block.masked_faulty_expert
    if _host_reads_are_free(grad):  # read the flag: `isfinite` is ~20x slower on CPUs
        if masked:
            grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    else:
        grad.masked_fill_(masked & ~grad.isfinite(), 0.0)


# Expert outputs of a smaller norm are all-zero to the health check, which leaves them out. Shared with its fast
# sufficient condition (`_all_pairs_healthy`): a higher floor there would pass what it flags.
_MIN_OUTPUT_NORM = 1e-12


class ClusterMoESparseMoeBlock(_KeepsBufferDtypes):
    """Hierarchical MoE block: route, (optionally) enforce capacity, run the fused experts, combine.

    Returns `(hidden_states, routing_stats)`; `routing_stats` (a dict of tensors, or None without
    `output_routing_stats`) carries this layer's balancing and z losses and the counts/health observations the model
    folds into its buffers outside the recomputed path.
    """

    def __init__(self, config: ClusterMoEConfig):
        super().__init__()
        self.config = config
        self.num_clusters = config.num_clusters
        self.experts_per_cluster = config.experts_per_cluster
        self.num_experts = config.num_experts
        self.router = ClusterMoERouter(config)
        self.experts = ClusterMoEExperts(config)
        self.shared_expert = (
            ClusterMoEMLP(config, config.shared_expert_intermediate_size)
            if config.shared_expert_intermediate_size > 0
            else None
        )
        # Whether a forward with gradients masked a faulty expert since the last optimizer step (see
        # `_guard_expert_gradients`).
        self.register_buffer("masked_faulty_expert", torch.zeros((), dtype=torch.bool), persistent=False)
        self.may_have_masked_fault = False  # whether the flag may be set: the optimizer-step hook then clears it

    @torch.no_grad()
    def keep_experts(self, clusters: torch.Tensor, experts: torch.Tensor):
        """Prune this block in place (its hooks stay) down to the local `experts` (C', E') of the kept `clusters`
        (C',): fused expert weights, router rows and routing buffers. `self.config` must already describe C' x E'."""
        keep = (clusters[:, None] * self.experts_per_cluster + experts).reshape(-1)  # (C' * E',) old global ids
        router = self.router
        for module, name, index in (
            (self.experts, "gate_up_proj", keep),
            (self.experts, "down_proj", keep),
            (router, "cluster_weight", clusters),
            (router, "expert_weight", keep),
            (router, "cluster_bias", clusters),
            (router, "expert_bias", keep),
            (router, "expert_reliability", keep),
            (router, "expert_token_counts", keep),
            (router, "selection_token_counts", keep),
        ):
            old = getattr(module, name)
            new = old[index]
            setattr(module, name, nn.Parameter(new, old.requires_grad) if isinstance(old, nn.Parameter) else new)
        self.num_clusters = router.num_clusters = clusters.numel()
        self.experts_per_cluster = router.experts_per_cluster = experts.shape[1]
        self.num_experts = self.experts.num_experts = keep.numel()
        router.hierarchical = _uses_hierarchical_router(self.config)

    def _guard_expert_gradients(self):
        """A broken (e.g. NaN) expert gets non-finite weight gradients even when its outputs are masked (0 * NaN);
        once a forward masked one, zero them so it cannot poison the whole update, e.g. through gradient clipping's
        global norm. Registered lazily because loading or pruning replaces the Parameter objects. All parameters of
        `self.experts`, so that adapters wrapping it (peft's LoRA `target_parameters`) are covered too. In place on
        the accumulated `.grad`: a copy of every expert gradient in each backward cost ~6% of a CPU training step
        (docs/benchmarks.md)."""
        weights = list(self.experts.parameters())
        if not weights or not all(weight.is_leaf for weight in weights):
            raise NotImplementedError(
                "The expert weights are not parameters of their own (leaf tensors) in this forward, as under FSDP1 "
                "(which flattens them, or with use_orig_params=True makes them views) or torch.func.functional_call: "
                "the guard that zeroes a faulty expert's non-finite gradients needs them. Train with FSDP2 "
                "(`fully_shard`; the Trainer's default fsdp version 2)."
            )
        for weight in weights:
            if weight.requires_grad and not getattr(weight, "_clustermoe_finite_grad", False):
                weight.register_post_accumulate_grad_hook(functools.partial(_zero_non_finite_grad, weakref.ref(self)))
                weight._clustermoe_finite_grad = True

    def _limit_capacity(self, candidates: torch.Tensor, token_mask: torch.Tensor | None):
        """Keep at most `capacity` (token, expert) pairs per expert, in token order; re-route the overflow to the next
        best expert inside the same chosen cluster, and drop what still does not fit. Padding tokens take no
        capacity (with left padding they would otherwise come first); their pairs are simply not served.

        candidates: (tokens, kc, E) global expert ids, best first. Returns the chosen experts' positions among the
        candidates (tokens, kc, ke), a served mask of the same shape and the number of re-routed pairs.
        """
        num_tokens, _, num_in_cluster = candidates.shape
        top_k_experts = self.config.top_k_experts
        # An expert serves a token at most once: a capacity of num_tokens or more (from factor * k >= N; computed, it
        # can exceed int64 or overflow to inf) limits nothing.
        factor, top_k = self.config.expert_capacity_factor, self.config.num_experts_per_tok
        if factor * top_k >= self.num_experts:
            capacity = num_tokens
        else:
            capacity = math.ceil(factor * num_tokens * top_k / self.num_experts)
        primary = candidates[..., :top_k_experts]
        real = torch.ones_like(primary, dtype=torch.bool) if token_mask is None else token_mask.view(-1, 1, 1)
        groups = primary.masked_fill(~real, self.num_experts)  # padding goes to a sentinel group
        kept = real & (_position_in_group(groups.reshape(-1), self.num_experts + 1).view_as(primary) < capacity)
        load = torch.zeros(self.num_experts + 1, dtype=torch.long, device=candidates.device)
        load.index_add_(0, primary.reshape(-1), kept.reshape(-1).long())  # no boolean indexing: it syncs on GPUs
        # The j-th overflowing slot of a (token, cluster) tries the j-th expert after the selected ones.
        overflow = real & ~kept
        alternative_rank = top_k_experts + overflow.long().cumsum(-1) - 1
        has_alternative = overflow & (alternative_rank < num_in_cluster)
        alternative = candidates.gather(-1, alternative_rank.clamp(max=num_in_cluster - 1))
        if self.config.use_reliability_routing:  # excluded experts are ranked last; they are no alternative either
            has_alternative = has_alternative & self.router.selectable_experts()[alternative]
        alternative = alternative.masked_fill(~has_alternative, self.num_experts)  # sentinel group
        position = _position_in_group(alternative.reshape(-1), self.num_experts + 1).view_as(alternative)
        accepted = has_alternative & (position + load[alternative] < capacity)
        chosen_rank = torch.where(accepted, alternative_rank, torch.arange(top_k_experts, device=candidates.device))
        return chosen_rank, kept | accepted, accepted.sum()

    def _balance_losses(self, routing: ClusterMoERouting, local_index: torch.Tensor, token_mask: torch.Tensor | None):
        """Switch-style balancing at both levels plus the router z-loss, with padding tokens excluded.
        local_index (tokens, kc, ke) holds the selected experts' ids inside their clusters."""
        cluster_logits, expert_logits = routing.cluster_logits, routing.expert_logits
        cluster_index = routing.cluster_index
        cluster_log_probs = routing.cluster_log_probs
        expert_probs = routing.expert_log_probs.exp()
        num_tokens, top_k_clusters = cluster_index.shape
        mask = cluster_log_probs.new_ones(num_tokens) if token_mask is None else token_mask.to(cluster_log_probs.dtype)
        num_valid = mask.sum().clamp_min(1.0)
        # Cluster level: fraction of (token, cluster) choices per cluster x mean cluster probability.
        pair_mask = mask[:, None].expand(-1, top_k_clusters)  # (tokens, kc)
        cluster_choices = torch.zeros_like(cluster_log_probs).scatter_add_(1, cluster_index, pair_mask.contiguous())
        cluster_fraction = cluster_choices.sum(0) / (num_valid * top_k_clusters)
        # Summed probabilities as exp(logsumexp(log-probabilities)): its backward keeps the log-probabilities (kept
        # anyway), not a (tokens, C) tensor of probabilities.
        real_log_probs = cluster_log_probs  # padding tokens' at probability 0
        if token_mask is not None:
            real_log_probs = cluster_log_probs.masked_fill(~token_mask[:, None], _LOG_ZERO)
        cluster_prob = torch.logsumexp(real_log_probs, dim=0).exp() / num_valid
        cluster_balance = self.num_clusters * (cluster_fraction * cluster_prob).sum()
        # Expert level, inside each cluster, weighted by the cluster's share of (token, cluster) pairs.
        expert_choices = torch.zeros_like(expert_probs).scatter_add_(
            2, local_index, pair_mask[..., None].expand_as(local_index).contiguous()
        )
        cluster_rows = cluster_index.reshape(-1, 1).expand(-1, self.experts_per_cluster)

        def per_cluster(values):  # (tokens, kc, E) -> (C, E) sums; scatter_add's backward keeps only the cluster ids
            sums = values.new_zeros(self.num_clusters, self.experts_per_cluster)
            return sums.scatter_add_(0, cluster_rows, values.reshape(-1, self.experts_per_cluster))

        choices = per_cluster(expert_choices)
        probs = per_cluster(expert_probs * pair_mask[..., None])
        pairs = choices.sum(-1, keepdim=True) / self.config.top_k_experts  # (C, 1) pairs routed to each cluster
        expert_fraction = choices / (pairs * self.config.top_k_experts).clamp_min(1.0)
        expert_prob = probs / pairs.clamp_min(1.0)
        cluster_share = pairs.squeeze(-1) / pairs.sum().clamp_min(1.0)
        expert_balance = self.experts_per_cluster * (cluster_share * (expert_fraction * expert_prob).sum(-1)).sum()
        # z-loss (ST-MoE) on both levels' softmax inputs (logits / temperature) keeps the logits small. Their
        # logsumexp is any input minus its log-probability; taking entry 0 keeps nothing new alive for the backward.
        temperature = self.config.routing_temperature
        z_cluster = (_at_temperature(cluster_logits[:, 0], temperature) - cluster_log_probs[:, 0]).square()
        z_expert = (_at_temperature(expert_logits[..., 0], temperature) - routing.expert_log_probs[..., 0]).square()
        z_expert = z_expert.mean(-1)
        router_z = ((z_cluster + z_expert) * mask).sum() / num_valid
        return cluster_balance, expert_balance, router_z

    def _faulty_experts(self, expert_out: torch.Tensor, expert_ids: torch.Tensor, valid: torch.Tensor | None):
        """Which experts misbehaved in this forward, (N,) bool: any non-finite output, or a mean log output norm more
        than log(`reliability_max_norm_ratio`) above the median of the *other* healthy experts of its cluster (leaving
        itself out, an outsized expert cannot raise its own bar; the median, the upper one of an even count, so that a
        dead expert with near-zero outputs cannot make its healthy peers look outsized). All-zero outputs and pairs
        where `valid` (pairs,) is False are not judged. None when no expert can be faulty (`_all_pairs_healthy`)."""
        norms = torch.linalg.vector_norm(expert_out.detach(), dim=-1, dtype=_at_least_float32(expert_out))  # (pairs,)
        if self._all_pairs_healthy(norms, valid):
            return None
        # An all-zero output (a ReLU expert's gates all off for the token, a dead expert) has no scale to compare:
        # left out, as its log would pull its expert's mean down by orders of magnitude and make the peers judged
        # against it look outsized. Non-finite norms compare False, and stay.
        scaled = ~(norms < _MIN_OUTPUT_NORM) if valid is None else valid & ~(norms < _MIN_OUTPUT_NORM)
        log_norms = torch.where(scaled, norms.log(), 0.0)  # inf or NaN where an output is not finite
        per_pair = torch.stack([scaled.to(log_norms.dtype), log_norms], dim=-1)  # (pairs, 2)
        per_expert = per_pair.new_zeros(self.num_experts, 2).index_add_(0, expert_ids, per_pair)
        pair_count, log_norm_sum = per_expert.view(self.num_clusters, -1, 2).unbind(-1)  # (C, E) each
        observed = pair_count > 0
        finite = log_norm_sum < math.inf  # a sum over pairs is non-finite if any of its terms is
        healthy = observed & finite
        mean_log_norm = log_norm_sum / pair_count.clamp_min(1.0)
        # Row j of cluster c: the mean log-norms of c's healthy experts other than j, NaN elsewhere. (C, E, E)
        not_self = ~torch.eye(self.experts_per_cluster, dtype=torch.bool, device=healthy.device)
        others = torch.where(healthy[:, None, :] & not_self, mean_log_norm[:, None, :], math.nan)
        reference = others.nanquantile(0.5, dim=-1, interpolation="higher")  # (C, E); NaN without healthy others
        outsized = mean_log_norm - reference > math.log(self.config.reliability_max_norm_ratio)
        return (observed & (~finite | outsized)).view(-1)

    @staticmethod
    def _non_finite_pairs(pair_outputs: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor | None:
        """Outside training forwards, which pairs (tokens*k,) have a non-finite output, or None when none has (read on
        the host on CPU, where that costs no sync). Each pair is judged on its own, so that a token's output depends
        only on its own sequence: no later token, and no other sequence of the batch, can mask one of its experts.
        Pairs where `valid` is False are not judged (`grouped_mm` leaves their rows uninitialised)."""
        outputs = pair_outputs.detach()
        if _host_reads_are_free(outputs):
            judged = outputs if valid is None else outputs[valid]
            if math.isfinite(judged.sum().item()):
                return None  # a sum of finite values can still overflow; then the exact check below runs
        non_finite = ~torch.isfinite(outputs).all(-1)
        return non_finite if valid is None else non_finite & valid

    def _all_pairs_healthy(self, norms: torch.Tensor, valid: torch.Tensor | None) -> bool:
        """A sufficient condition for no faulty expert, read on the host, on CPU only (no device sync there): every
        judged pair's output norm (where `valid`; the others may be uninitialised) is finite and the largest is at most
        half `reliability_max_norm_ratio` times the smallest. Then no expert's mean log-norm can exceed its peers' by
        log(max ratio); the factor 2 is far above the float32 rounding of the full check. Spares a training step the
        full check's ~40 small ops and the masking after it."""
        if not _host_reads_are_free(norms):
            return False
        norms = norms if valid is None else norms[valid]
        if norms.numel() == 0:
            return False
        smallest, largest = (value.item() for value in torch.aminmax(norms))
        bound = max(smallest, _MIN_OUTPUT_NORM) * self.config.reliability_max_norm_ratio / 2
        return math.isfinite(largest) and largest <= bound

    def _may_skip_pair_checks(self, hidden_flat: torch.Tensor, judges_experts: bool, settings: RoutingSettings) -> bool:
        """Whether the experts may run as one weighted call over the tokens, without per-pair outputs: without
        reliability routing nothing is judged; outside training forwards only non-finite pair outputs are masked, and
        on CPU, where reading a value costs no sync, a finite combined output shows that there is none."""
        if not settings.use_reliability_routing:
            return True
        return not judges_experts and _host_reads_are_free(hidden_flat)

    def _combine_weights(self, chosen_log_probs, cluster_log_probs, settings: RoutingSettings) -> torch.Tensor:
        """Combine weights (tokens, k) from the pairs' log P(expert | cluster) (tokens, kc, ke) and the chosen clusters'
        log P(cluster) (tokens, kc): P(cluster) * P(expert | cluster), the latter renormalised over the cluster's chosen
        experts with `norm_topk_prob`. P(cluster) is not renormalised: over one chosen cluster it would be 1, and the
        cluster router would get no gradient from the task loss (as Switch Transformer keeps its top-1 probability)."""
        if settings.norm_topk_prob:
            weights = chosen_log_probs.softmax(-1) * cluster_log_probs.exp().unsqueeze(-1)
        else:
            weights = (chosen_log_probs + cluster_log_probs.unsqueeze(-1)).exp()
        return weights.view(chosen_log_probs.shape[0], -1)

    def _judge_pairs(self, pair_outputs, pair_ids, valid_pairs, judges_experts: bool):
        """The (N,) experts and (tokens*k,) pairs to mask, or None for none: in training forwards, the experts that
        misbehaved and all their pairs; otherwise the pairs with a non-finite output, and their experts."""
        if judges_experts:
            # Padding tokens are neither counted nor judged: their (often all-zero) outputs must not skew the health
            # reference of their cluster and mask experts for the real tokens of the batch.
            faulty = self._faulty_experts(pair_outputs, pair_ids, valid_pairs)
            if faulty is None:
                return None, None
            # Only pairs that ran are masked: an excluded pair of a faulty expert keeps its weight, as excluded
            # pairs of healthy experts do (its output is zeroed anyway).
            pair_faulty = faulty[pair_ids]
            return faulty, pair_faulty if valid_pairs is None else pair_faulty & valid_pairs
        pair_faulty = self._non_finite_pairs(pair_outputs, valid_pairs)
        if pair_faulty is None:
            return None, None
        return pair_ids.new_zeros(self.num_experts).index_add_(0, pair_ids, pair_faulty.long()) > 0, pair_faulty

    def _run_experts(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        """The experts call. transformers' `grouped_mm` hands torch's grouped GEMM kernels any weights, and they refuse
        some (float64, rows not 16-byte aligned) with an error that names neither the sizes nor the setting: named
        here. (`sorted_mm`, the default, runs such experts with its own loop.)"""
        try:
            return self.experts(hidden_states, top_k_index, top_k_weights)
        except RuntimeError as error:
            experts = _inside_peft_wrappers(self.experts)
            if self.config._experts_implementation != "grouped_mm" or not _grouped_mm_kernels_would_refuse(
                experts, hidden_states
            ):
                raise
            raise ValueError(
                "experts_implementation='grouped_mm' cannot run these experts: torch's grouped GEMM kernels take "
                "float32, bfloat16 or float16 weights whose rows are multiples of 16 bytes, and these are "
                f"{experts.down_proj.dtype} of hidden_size {self.config.hidden_size} and intermediate_size "
                f"{self.config.intermediate_size}. Use 'sorted_mm' (the default), which runs them with its own loop, "
                "or 'eager'."
            ) from error

    def _experts_per_pair(
        self,
        hidden_flat,
        top_k_index,
        chosen_log_probs,
        cluster_log_probs,
        valid_pairs,
        judges_experts: bool,
        settings: RoutingSettings,
    ):
        """One fused-experts call over all (token, expert) pairs, unweighted, so that each pair's output can be judged
        and masked before it is combined; works with every experts backend (eager, grouped_mm, batched_mm, ...).
        Pairs where `valid_pairs` (tokens*k,) is False (dropped by capacity limits, of padding tokens) are zeroed.
        Returns the combined output (tokens, H) and the (N,) experts masked as faulty, or None."""
        num_tokens, top_k = top_k_index.shape
        pair_inputs = hidden_flat.repeat_interleave(top_k, dim=0)  # (tokens*k, H)
        pair_ids = top_k_index.reshape(-1)  # (tokens*k,)
        expert_ids, excluded = pair_ids, None  # excluded: (tokens*k,) pairs whose outputs are zeroed, or None
        if valid_pairs is not None:
            excluded = ~valid_pairs
            # The implementation is read from the config: the experts may be wrapped (peft).
            skips = self.config._experts_implementation in SENTINEL_SKIPPING_EXPERTS
            if skips and not _is_expert_parallel(self.experts):  # whose dispatch takes real ids only
                expert_ids = pair_ids.masked_fill(excluded, self.num_experts)
        gate_dummy = None
        if (settings.use_reliability_routing or excluded is not None) and pair_inputs.requires_grad:
            pair_inputs, gate_dummy = _PairInputGradientGate.apply(pair_inputs)
        # Unit weights in the router's precision (float32 for half-precision models), as a weighted call gets: the
        # backends then weigh and sum each pair's output in float32 and round it back exactly, where a bf16 sum over
        # the single pair of each row runs torch's slow reduced-precision reduction (~5x slower on CPU).
        unit_weights = pair_inputs.new_ones(pair_ids.shape[0], 1, dtype=_at_least_float32(pair_inputs))
        pair_outputs = self._run_experts(pair_inputs, expert_ids[:, None], unit_weights)

        faulty = pair_faulty = None  # (N,) experts and (tokens*k,) pairs masked in this forward, or None for none
        if settings.use_reliability_routing:
            if torch.is_grad_enabled():
                self._guard_expert_gradients()
            faulty, pair_faulty = self._judge_pairs(pair_outputs, pair_ids, valid_pairs, judges_experts)
        if pair_faulty is not None:
            if pair_outputs.requires_grad:  # the expert weights get gradients (not, e.g., in a frozen model)
                self.masked_faulty_expert |= pair_faulty.any()  # idempotent when checkpointing re-runs the forward
                self.may_have_masked_fault = True
            excluded = pair_faulty if excluded is None else excluded | pair_faulty
            # exp(finfo.min) is 0; a token whose pairs are all faulty gets finite weights (uniform with norm_topk_prob,
            # else 0) for zeroed outputs
            impossible = torch.finfo(chosen_log_probs.dtype).min
            chosen_log_probs = chosen_log_probs.masked_fill(pair_faulty.view_as(chosen_log_probs), impossible)
        if excluded is not None:
            if gate_dummy is None:
                pair_outputs = pair_outputs.masked_fill(excluded.unsqueeze(-1), 0.0)
            else:
                pair_outputs = _MaskExcludedPairOutputs.apply(pair_outputs, gate_dummy, excluded)
        # Dropped pairs' outputs are zero: they contribute nothing, and the token keeps its residual path.
        weights = self._combine_weights(chosen_log_probs, cluster_log_probs, settings)

        # (tokens, k, 1) * (tokens, k, H) summed over k -> (tokens, H), with the router's float32 weights, as
        # transformers' `grouped_mm` and `batched_mm` combine a weighted call: a token's output rounds alike on either
        # path. Not `bmm`: on CPU its backward for these (1 x k) @ (k x H) batches copies every token's slices one by
        # one.
        output = (weights.unsqueeze(-1) * pair_outputs.view(num_tokens, top_k, -1)).sum(1)
        return output.to(pair_outputs.dtype), faulty

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        output_routing_stats: bool = True,
        training_forward: bool | None = None,
    ):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_flat = hidden_states.reshape(-1, hidden_dim)  # (tokens, H)
        num_tokens = hidden_flat.shape[0]
        settings = self.config.routing_settings
        routing = self.router(hidden_flat, settings)
        cluster_index = routing.cluster_index  # (tokens, kc)

        # Global expert ids: cluster c's experts are c*E ... c*E+E-1.
        chosen_clusters = cluster_index.unsqueeze(-1)  # (tokens, kc, 1)
        if settings.expert_capacity_factor is None:
            local_index, served, rerouted = routing.expert_candidates, None, None  # (tokens, kc, ke)
            # (tokens, kc, ke): log P(expert | cluster), at the routing temperature
            chosen_log_probs = routing.candidate_log_probs
        else:
            # (tokens, kc, E) global ids, best first
            candidates = routing.expert_candidates.add(chosen_clusters, alpha=self.experts_per_cluster)
            chosen_rank, served, rerouted = self._limit_capacity(candidates, token_mask)  # (tokens, kc, ke)
            local_index = routing.expert_candidates.gather(-1, chosen_rank)
            chosen_log_probs = routing.candidate_log_probs.gather(-1, chosen_rank)
        expert_index = local_index.add(chosen_clusters, alpha=self.experts_per_cluster)
        top_k_index = expert_index.view(num_tokens, -1)  # (tokens, k)
        top_k = top_k_index.shape[1]

        # Built before the experts run, so that their backward runs after the experts' (autograd runs later nodes
        # first): their gradients then do not wait through the experts' backward, where training memory peaks.
        balance = self._balance_losses(routing, local_index, token_mask) if output_routing_stats else None
        # Pairs that count, (tokens*k,) or None for all: those served within capacity (which serves no padding
        # token's pairs), or else those of real (not padding) tokens.
        if served is not None:
            valid_pairs = served.reshape(-1)
        elif token_mask is not None:
            valid_pairs = token_mask.view(-1, 1).expand(-1, top_k).reshape(-1)
        else:
            valid_pairs = None

        # Only training forwards judge experts against each other across the batch: in train mode with gradients, as
        # the model decides once per forward (the no-gradient first pass of reentrant checkpointing belongs to one).
        # Pure inference, e.g. `generate`, in either mode judges each pair on its own, so that a token's output
        # depends only on its own sequence.
        if training_forward is None:
            training_forward = self.training and torch.is_grad_enabled()
        judges_experts = self.training and training_forward
        output = faulty = None  # faulty: (N,) experts whose outputs this forward masked, or None for none
        if valid_pairs is None and self._may_skip_pair_checks(hidden_flat, judges_experts, settings):
            # Nothing to exclude and nothing to judge per pair: one weighted experts call over the tokens.
            weights = self._combine_weights(chosen_log_probs, routing.chosen_cluster_log_probs, settings)
            output = self._run_experts(hidden_flat, top_k_index, weights)
            if settings.use_reliability_routing:
                # Summed in float32: a half-precision sum of a layer's finite outputs overflows easily.
                if not math.isfinite(output.sum(dtype=_at_least_float32(output)).item()):
                    output = None  # some pair's output is not finite (or the sum overflowed): judge each pair
        if output is None:
            cluster_log_probs = routing.chosen_cluster_log_probs
            output, faulty = self._experts_per_pair(
                hidden_flat, top_k_index, chosen_log_probs, cluster_log_probs, valid_pairs, judges_experts, settings
            )
        output = output.view(batch_size, sequence_length, hidden_dim)
        if self.shared_expert is not None:
            output = output + self.shared_expert(hidden_states)
        if not output_routing_stats:
            return output, None
        stats = self._routing_stats(balance, top_k_index, valid_pairs, served, rerouted, token_mask, faulty, settings)
        return output, stats

    def _routing_stats(self, balance, top_k_index, valid_pairs, served, rerouted, token_mask, faulty, settings) -> dict:
        """This layer's losses and observations for the model to fold in (see the class docstring)."""
        cluster_balance, expert_balance, router_z = balance
        pair_ids = top_k_index.reshape(-1)  # (tokens*k,)
        expert_counts = torch.zeros(self.num_experts, dtype=torch.long, device=pair_ids.device)
        expert_counts.index_add_(0, pair_ids, torch.ones_like(pair_ids) if valid_pairs is None else valid_pairs.long())
        dropped = pair_ids.new_zeros(())
        if served is not None:
            unserved = ~served.view_as(top_k_index)  # (tokens, k)
            dropped = (unserved if token_mask is None else unserved & token_mask.view(-1, 1)).sum()
        routing_stats = {
            "cluster_balance_loss": cluster_balance,
            "expert_balance_loss": expert_balance,
            "router_z_loss": router_z,
            "expert_counts": expert_counts,
            "dropped_pairs": dropped,
            "rerouted_pairs": pair_ids.new_zeros(()) if rerouted is None else rerouted,
        }
        if settings.use_reliability_routing:
            observed = expert_counts > 0
            routing_stats["expert_observed"] = observed
            routing_stats["expert_faulty"] = torch.zeros_like(observed) if faulty is None else faulty
        return routing_stats


class ClusterMoEDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: ClusterMoEConfig, layer_idx: int):
        super().__init__()
        self.self_attn = ClusterMoEAttention(config, layer_idx)
        self.is_moe = layer_idx >= config.first_k_dense_layers
        if self.is_moe:
            self.mlp = ClusterMoESparseMoeBlock(config)
        else:
            self.mlp = ClusterMoEMLP(config, config.dense_intermediate_size)
        self.input_layernorm = ClusterMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = ClusterMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        token_mask: torch.Tensor | None = None,
        output_routing_stats: bool = True,
        training_forward: bool | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Returns the hidden states and this layer's routing statistics (None for a dense layer or when not asked
        for): returned, not recorded by an output-recording hook, which transformers installs only once an output is
        recorded."""
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        routing_stats = None
        if self.is_moe:
            hidden_states, routing_stats = self.mlp(hidden_states, token_mask, output_routing_stats, training_forward)
        else:
            hidden_states = self.mlp(hidden_states)
        return residual + hidden_states, routing_stats


def _routing_buffer_problem(name: str, value: torch.Tensor) -> str | None:
    """What is wrong with the value of routing buffer `name` (see `_routing_state_problems`), or None."""
    if name == "expert_reliability" and not ((value >= 0) & (value <= 1)).all():
        return "has values outside [0, 1]"
    if value.is_floating_point() and not value.isfinite().all():
        return "has values that are not finite"
    if not value.is_floating_point() and (value < 0).any():
        return "has negative counts"
    return None


# Components of module names that a wrapper's state dict leaves out of its keys: torch's activation checkpointing
# (`checkpoint_wrapper`) and FSDP1 (`FullyShardedDataParallel`).
_UNNAMED_WRAPPERS = r"(_checkpoint_wrapped_module|_fsdp_wrapped_module)\."


def _refuse_invalid_routing_state(model: "ClusterMoEModel", state_dict, prefix: str, *args):
    """Before `load_state_dict` (e.g. the Trainer resuming from a checkpoint) copies anything into the model, as
    `from_pretrained` checks after loading: an invalid routing state is refused, and the model keeps its own."""
    incoming = {prefix + name: state_dict.get(prefix + name) for name in model._routing_state()}
    problems = _routing_state_problems({name: value for name, value in incoming.items() if value is not None})
    if problems:
        raise ValueError(
            f"load_state_dict refused an invalid routing state, and this call loaded nothing into the ClusterMoE "
            f"model: {'; '.join(problems)}."
        )


def _check_loaded_routing_state(model: "ClusterMoEModel", incompatible_keys):
    """After `load_state_dict`: what the check before it could not match to the model's buffers (a wrapper that
    names them otherwise) is still refused, if only once loaded. The loaded state starts a new accumulation:
    statistics gathered since the last optimizer step belong to the state it replaces (e.g. a step interrupted before
    its optimizer step, then resumed in the same process)."""
    problems = _routing_state_problems(model._routing_state())
    if problems:
        raise ValueError(f"load_state_dict loaded an invalid routing state: {'; '.join(problems)}.")
    model.routing_state.discard_pending()


def _routing_state_problems(state: Mapping[str, torch.Tensor]) -> list[str]:
    """What is wrong with routing buffers' values, by name (see `ClusterMoEPreTrainedModel._routing_state`): biases
    must be finite, reliabilities in [0, 1], counts non-negative. One host read per buffer."""
    problems = []
    for name, value in state.items():
        if not isinstance(value, torch.Tensor) or value.is_meta:
            continue
        problem = _routing_buffer_problem(name.rpartition(".")[2], value.full_tensor() if _is_dtensor(value) else value)
        if problem is not None:
            problems.append(f"{name} {problem}")
    return problems


def _inside_peft_wrappers(module: nn.Module) -> nn.Module:
    """The module that peft's wrappers hold: adapter layers' `base_layer`; `modules_to_save` and trainable tokens'
    `original_module` (whose sizes the trained copy shares)."""
    while True:
        inner = getattr(module, "base_layer", None) or getattr(module, "original_module", None)
        if inner is None:
            return module
        module = inner


def _check_experts_can_change(layers: list[tuple[int, "ClusterMoESparseMoeBlock"]], action: str):
    """The fused expert weights must be this model's own parameters, not wrapped by an adapter; and they and the
    routing state must be loaded, not on the meta device, where accelerate's offloading keeps them between forwards
    (and would bring the old weights back at the next one)."""
    if not all(isinstance(block.experts, ClusterMoEExperts) for _, block in layers):
        raise ValueError(
            f"{action} needs the plain fused expert weights, which an adapter wraps here (e.g. peft's LoRA with "
            "`target_parameters`): merge it into the model first (`merge_and_unload()`)."
        )
    tensors = (tensor for _, block in layers for tensor in (*block.parameters(), *block.buffers()))
    if any(tensor.is_meta for tensor in tensors):
        raise ValueError(
            f"{action} needs the expert weights and routing state, which are on the meta device here: offloaded by "
            "accelerate (a device_map with 'cpu' or 'disk' entries), which would bring the old weights back at the "
            "next forward, or not loaded at all. Load the model without offloading first."
        )


# Per-parameter optimizer state that torch's optimizers create as zeros: what `reinitialize_expert` resets (and
# Adagrad's `sum`, which starts at its group's `initial_accumulator_value`).
ZERO_STARTING_OPTIMIZER_STATE = frozenset(
    {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "momentum_buffer", "square_avg", "grad_avg", "acc_delta",
     "prev", "ax"}  # fmt: skip
)


def _fresh_optimizer_state(optimizer: torch.optim.Optimizer, parameter: nn.Parameter, name: str) -> float | None:
    """The value `optimizer` starts its per-parameter state `name` at, or None where that is not known."""
    if name in ZERO_STARTING_OPTIMIZER_STATE:
        return 0.0
    group = next((group for group in optimizer.param_groups if any(p is parameter for p in group["params"])), {})
    if name == "sum" and "initial_accumulator_value" in group:  # Adagrad
        return float(group["initial_accumulator_value"])
    return None


_NO_PIPELINE_PARALLELISM = (
    "ClusterMoE does not support pipeline parallelism ({}): its routing state and statistics span every layer, and "
    "pipeline parallelism leaves each process some of them."
)


def _is_weights_file(name: str, variant: str | None) -> bool:
    """Whether `name` is one of the safetensors weights files `save_pretrained(variant=variant)` writes: the single
    file (`model.safetensors`), or the shard index and the shards (`model-00001-of-00003.safetensors`)."""
    single, index = (_add_variant(file, variant) for file in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME))
    shard = rf"{re.escape(single.removesuffix('.safetensors'))}-\d{{5}}-of-\d{{5}}\.safetensors"
    return name in (single, index) or re.fullmatch(shard, name) is not None


def _is_folder(path: str) -> bool:
    """A folder itself, not a link to one: a file moves onto a link by replacing it, and removing a link works too."""
    return os.path.isdir(path) and not os.path.islink(path)


# The prefix of a save's staging folder inside its target. One that a killed save left behind is not removed by the
# next save, which cannot tell it from the folder of a save still running (e.g. in another container): delete it.
_STAGING_PREFIX = ".clustermoe-saving-"
# The prefix of the folder inside the target where a save moves the files it replaces while its own move into place:
# removed once they are replaced. One left behind (the save was killed, or could not move them back) holds the earlier
# checkpoint's files.
_EARLIER_PREFIX = ".clustermoe-earlier-"


def _replace_files(target: str, staging: str, new: set[str], earlier: set[str]):
    """Moves the files `new` from `staging` into `target` in place of the files `earlier` there, all or none as far as
    exceptions go (a full disk, a file another program holds open, Ctrl-C): the earlier files are first moved aside,
    and if a move fails, what moved goes back (`_move_back`). The earlier config.json goes first and the new one last,
    so that a folder caught in between (a killed process) holds no config rather than a mix of the two checkpoints;
    the earlier files are then in the `_EARLIER_PREFIX` folder next to them."""
    aside = tempfile.mkdtemp(prefix=_EARLIER_PREFIX, dir=target)
    try:
        for name in sorted(earlier, key=lambda name: name != CONFIG_NAME):
            try:
                os.replace(os.path.join(target, name), os.path.join(aside, name))
            except FileNotFoundError:  # gone meanwhile, e.g. moved aside by another save into the folder
                pass
        for name in sorted(new, key=lambda name: name == CONFIG_NAME):
            os.replace(os.path.join(staging, name), os.path.join(target, name))
    except BaseException as error:
        _move_back(target, staging, aside, new, error)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _move_back(target: str, staging: str, aside: str, new: set[str], error: BaseException):
    """Undoes `_replace_files` as far as it went, read from the folders rather than from a record of the moves (an
    exception may arrive between a move and its record), file by file: one that cannot move back stays where it is.
    The new config.json leaves first and the earlier one returns last, so that a folder caught in between holds no
    config. Earlier files that did not go back stay in `aside`, which the propagating error names."""
    try:
        for name in sorted(new, key=lambda name: name != CONFIG_NAME):  # moved in: in the target, no longer staged
            if os.path.lexists(os.path.join(target, name)) and not os.path.lexists(os.path.join(staging, name)):
                with contextlib.suppress(OSError):
                    os.replace(os.path.join(target, name), os.path.join(staging, name))
        for name in sorted(os.listdir(aside), key=lambda name: name == CONFIG_NAME):
            with contextlib.suppress(OSError):
                os.replace(os.path.join(aside, name), os.path.join(target, name))
    except BaseException as second:  # e.g. Ctrl-C again
        error = second
        raise
    finally:
        with contextlib.suppress(OSError):
            if os.listdir(aside):
                error.add_note(f"The files of the checkpoint in {target} before this save are in {aside}.")
            else:
                os.rmdir(aside)


class ClusterMoEPreTrainedModel(PreTrainedModel):
    config: ClusterMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ClusterMoEDecoderLayer"]
    # Routing state accumulates small updates (bias steps, reliability EMAs) that bf16/fp16 would round away; the
    # router also keeps it in float32 through `model.to(dtype)` (`ClusterMoERouter._apply`).
    _keep_in_fp32_modules_strict = list(ClusterMoERouter._FLOAT32_STATE)
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    # Routing, capacity limits and health checks have static shapes and no host syncs. Under gradient checkpointing a
    # training forward compiles with graph breaks only (`fullgraph=False`, as the Trainer's `torch_compile` does): the
    # expert-gradient guard's registration and its fault flag, inside the checkpointed layer, are side effects dynamo
    # refuses there.
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(ClusterMoERouter, index=0),
        "hidden_states": ClusterMoEDecoderLayer,
        "attentions": ClusterMoEAttention,
    }

    # Buffers each process accumulates on its own between optimizer steps (summed over processes at the step) or
    # keeps for itself. DistributedDataParallel broadcasts rank 0's buffers before forwards: not these.
    _PER_PROCESS_BUFFERS = frozenset(
        {"pending_counts", "pending_observed", "pending_healthy", "rerouted_pair_counts", "dropped_pair_counts",
         "expert_token_counts", "masked_faulty_expert"}
    )  # fmt: skip

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """Read by `DistributedDataParallel` when it wraps this model, with any names
        `DistributedDataParallel._set_params_and_buffers_to_ignore_for_model` added. Names are relative to this model,
        and repeated as a peft model names them: DDP wrapping a peft model reads this attribute through it, and names
        its buffers from the peft model down (names it does not have are never looked up)."""
        own = [name for name, _ in self.named_buffers() if name.rpartition(".")[2] in self._PER_PROCESS_BUFFERS]
        own += [f"base_model.model.{name}" for name in own]
        return own + [name for name in self.__dict__.get("_ddp_ignored_by_user", ()) if name not in own]

    @_ddp_params_and_buffers_to_ignore.setter
    def _ddp_params_and_buffers_to_ignore(self, names):
        self.__dict__["_ddp_ignored_by_user"] = list(names)

    def post_init(self):
        super().post_init()
        _register_live_model(self)

    def __setstate__(self, state):
        """A copy (`copy.deepcopy`, e.g. an EMA or teacher model) never ran `__init__`: register it with the
        optimizer-step hook here. (Not in the forward, where `torch.compile` drops the registration.)"""
        super().__setstate__(state)
        _register_live_model(self)
        _PARAMETER_OWNERS.mark_stale()  # its parameters are new, but copying registers none

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' `from_pretrained`, which then checks the loaded routing state (`_routing_state_problems`):
        the weights loader checks shapes only, and a corrupted reliability or count would otherwise route (and report
        statistics) from nonsense."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading info) with output_loading_info
        problems = _routing_state_problems(model._routing_state())
        if problems:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds an invalid routing state, a corrupted checkpoint: "
                f"{'; '.join(problems)}."
            )
        return loaded

    def _routing_state(self) -> dict[str, torch.Tensor]:
        """The saved routing buffers (balancing biases, reliabilities, token counts, training step) by their names in
        the state dict, which wrappers that activation checkpointing and FSDP1 put around layers leave out."""
        return {
            re.sub(_UNNAMED_WRAPPERS, "", f"{module_name}.{name}"): buffer
            for module_name, module in self.named_modules()
            if isinstance(module, (ClusterMoERouter, ClusterMoERoutingState))
            for name, buffer in module.named_buffers(recurse=False)
            if name not in module._non_persistent_buffers_set
        }

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`, made safe for a checkpoint already in the folder: the files are written to
        a staging folder inside it and moved into place once all of them were written, so that a save that fails
        halfway (an invalid setting or argument, a full disk, Ctrl-C) leaves the earlier checkpoint as it was
        (`_replace_files`). Weights files of the earlier save that the new one does not replace are removed with it: a
        sharded save over a single file (or the reverse) would otherwise leave both, and `from_pretrained` load the
        stale one. Pushing to the Hub (`push_to_hub=True`) and distributed checkpoints (`distributed_checkpoint=True`,
        written by every rank) write in place, as in transformers, after the same checks. The `auto_map` of a ClusterMoE
        class's checkpoint names every ClusterMoE Auto class, not only the saved class's."""
        self._check_config()
        # What is written: the model's state, or the state dict passed (as the Trainer does). Not gathered from other
        # processes, which need not be saving too.
        state = self._routing_state()
        state_dict = inspect.signature(PreTrainedModel.save_pretrained).bind(self, save_directory, *args, **kwargs)
        state_dict = state_dict.arguments.get("state_dict")
        if state_dict is not None:
            state = {name: state_dict[name] for name in state if name in state_dict}
        problems = _routing_state_problems({name: value for name, value in state.items() if not _is_dtensor(value)})
        if problems:  # e.g. a bias set to -inf by hand: the model runs, but from_pretrained would refuse the checkpoint
            raise ValueError(
                f"The routing state is invalid, and from_pretrained would refuse the checkpoint, so nothing was saved: "
                f"{'; '.join(problems)}."
            )
        compiled = next((name for name, module in self.named_modules() if hasattr(module, "_orig_mod")), None)
        if compiled is not None:
            raise ValueError(
                f"{compiled} is a torch.compile wrapper (`torch.compile(module)`): its weights would be saved under "
                "`_orig_mod` names that no model loads. Compile it in place (`module.compile()`), or put the original "
                "module back before saving."
            )
        if self.can_generate():
            with tempfile.TemporaryDirectory() as scratch:
                self.generation_config.save_pretrained(scratch)  # runs the checks its own save refuses to save with
            _check_generation_token_ids(self.generation_config, self.config.vocab_size)
        model_class = self._model_class()
        if model_class in _AUTO_CLASSES:  # not a subclass in another module, whose code the checkpoint then holds
            module = model_class.__module__.rsplit(".", 1)[-1]  # also for code loaded from a checkpoint
            auto_map = {cls._auto_class: f"{module}.{cls.__name__}" for cls in _AUTO_CLASSES}
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **auto_map}
        with self._as_model_class(model_class):
            result = self._save_in_place_of_earlier_files(save_directory, *args, **kwargs)
        # transformers' own barrier for a sharded model's save (every process saves, one writes) ran before the writing
        # process moved the files into place: the others must not return (and, e.g., load them) before that.
        self.barrier_after_gathered_checkpoint_save(getattr(self.config, "distributed_config", None))
        return result

    def _model_class(self) -> type:
        """The class whose code a checkpoint holds: the model's own, not the subclass that torch's FSDP2 (`fully_shard`,
        also through transformers' or accelerate's FSDP2) swaps in, which is defined in a torch module."""
        return next(cls for cls in type(self).__mro__ if not cls.__module__.startswith("torch."))

    @contextlib.contextmanager
    def _as_model_class(self, model_class: type):
        """transformers copies the code of the instance's class into the checkpoint and names it in `auto_map`: for the
        duration of a save, the instance is of `model_class` (FSDP2's subclass only adds methods, unused in a save)."""
        wrapper_class, self.__class__ = type(self), model_class
        try:
            yield
        finally:
            self.__class__ = wrapper_class

    def _save_in_place_of_earlier_files(self, save_directory, *args, **kwargs):
        options = inspect.signature(PreTrainedModel.save_pretrained).bind(self, save_directory, *args, **kwargs)
        options.apply_defaults()
        options = options.arguments
        target = os.fspath(save_directory)
        if (
            options["push_to_hub"]
            or options["distributed_checkpoint"]
            or not self.should_save_on_this_rank(options["is_main_process"])
            or os.path.isfile(target)  # transformers reports it
        ):
            return super().save_pretrained(save_directory, *args, **kwargs)
        os.makedirs(target, exist_ok=True)
        variant = options["variant"]
        # On the target's file system, so that the files move into place by renaming.
        with tempfile.TemporaryDirectory(prefix=_STAGING_PREFIX, dir=target, ignore_cleanup_errors=True) as staging:
            result = super().save_pretrained(staging, *args, **kwargs)
            written = set(os.listdir(staging))
            present = set(os.listdir(target))
            # The earlier save's weights files that this one, if it writes weights (not, e.g., only an adapter's), does
            # not replace: removed, as `from_pretrained` would load a single file rather than new shards.
            stale = set()
            if any(_is_weights_file(name, variant) for name in written):
                stale = {name for name in present if _is_weights_file(name, variant)} - written
            # Found before any file moves: folders where a file of this save goes, or named as a file it removes.
            blocked = {name for name in (written | stale) & present if _is_folder(os.path.join(target, name))}
            if blocked:
                raise IsADirectoryError(
                    f"Cannot save into {target}: it holds folders named as files of the checkpoint "
                    f"({', '.join(sorted(blocked))}); nothing in it was changed."
                )
            _replace_files(target, staging, written, (written | stale) & present)
        return result

    def _check_config(self, config: ClusterMoEConfig | None = None):
        """The config's values (`ClusterMoEConfig.validate`), and that its sizes still describe the modules. Run when
        saving, and before a forward after a setting changed. `config`: a stand-in checked instead (see `forward`),
        which leaves the model's config marked as changed."""
        checked = self.config if config is None else config
        checked.validate()
        self._check_config_describes_modules(checked)
        if config is None:
            self.config.__dict__[_CHANGED_SINCE_CHECK] = False

    def _check_config_describes_modules(self, config: ClusterMoEConfig | None = None):
        """The sizes and settings the modules were built with must still be the config's: a size changed afterwards
        (e.g. `model.config.num_clusters = 8`) would save weights that its config does not describe, and the
        checkpoint would not load; a setting the modules copied (e.g. `rms_norm_eps`) would be ignored by this model
        and saved for the one reloaded from the checkpoint."""
        # Read from the modules' size attributes, not their weights' shapes: adapters (peft) wrap modules, and
        # DeepSpeed ZeRO-3 partitions the weights (the Trainer saves it that way, with a gathered state dict).
        unwrap = _inside_peft_wrappers
        embeddings, layers = unwrap(self.get_input_embeddings()), self._decoder_layers()
        attention = layers[0].self_attn
        head_dim = attention.head_dim
        built = {
            "vocab_size": embeddings.num_embeddings,
            "hidden_size": embeddings.embedding_dim,
            "num_hidden_layers": len(layers),
            "first_k_dense_layers": sum(not layer.is_moe for layer in layers),
            "head_dim": head_dim,
            "num_attention_heads": unwrap(attention.q_proj).out_features // head_dim,
            "num_key_value_heads": unwrap(attention.k_proj).out_features // head_dim,
            "attention_dropout": attention.attention_dropout,
            "attention_bias": unwrap(attention.q_proj).bias is not None,
            "rms_norm_eps": unwrap(layers[0].input_layernorm).variance_epsilon,
            "rope_parameters": self.base_model.rotary_emb.rope_parameters,
        }
        for layer in layers:
            if not layer.is_moe:
                built["dense_intermediate_size"] = unwrap(layer.mlp.gate_proj).out_features
                built["hidden_act"] = layer.mlp.hidden_act
                continue
            block = layer.mlp
            built.update(num_clusters=block.num_clusters, experts_per_cluster=block.experts_per_cluster)
            if isinstance(block.experts, ClusterMoEExperts):
                built["intermediate_size"] = block.experts.intermediate_dim
                built["hidden_act"] = block.experts.hidden_act
            shared = block.shared_expert
            built["shared_expert_intermediate_size"] = 0 if shared is None else unwrap(shared.gate_proj).out_features
        config = self.config if config is None else config
        self._check_built_with({**built, **self._head_settings()}, config)
        self._check_head_is_saved(config)

    def _head_settings(self) -> dict:
        """The settings a task head's modules were built with, which the base model's forward does not see: the
        classifiers check them before it (`_check_head_settings`), and `save_pretrained` with the rest."""
        unwrap, built = _inside_peft_wrappers, {}
        score = getattr(self, "score", None)  # the classifiers' head
        if score is not None:
            built["num_labels"] = unwrap(score).out_features
        dropout = getattr(self, "dropout", None)  # the token classifier's; the config's None reads as 0.1
        if dropout is not None:
            unset = dropout.p == 0.1 and self.config.classifier_dropout is None
            built["classifier_dropout"] = None if unset else dropout.p
        return built

    def _check_head_is_saved(self, config: ClusterMoEConfig):
        """An LM head that shares the embeddings' weights is saved as the embeddings alone: with a config that says
        they are untied, the reloaded model's head would be random. (The other way round, a config that says tied over
        separate weights, as `from_pretrained(..., tie_word_embeddings=True)` of an untied checkpoint gives, is safe:
        both are saved, and transformers does not tie different weights when loading them.)"""
        lm_head = getattr(self, "lm_head", None)
        if lm_head is None or config.tie_word_embeddings:
            return
        # The local shards of DTensors (FSDP2, tensor parallelism), whose own storage cannot be read.
        weights = (_inside_peft_wrappers(lm_head).weight, _inside_peft_wrappers(self.get_input_embeddings()).weight)
        head, embeddings = (weight.to_local() if _is_dtensor(weight) else weight for weight in weights)
        shared = head is embeddings or (  # also two Parameters over one storage (e.g. `load_state_dict(assign=True)`)
            head.numel() > 0 and head.untyped_storage().data_ptr() == embeddings.untyped_storage().data_ptr()
        )
        if shared:
            raise ValueError(
                "The config says tie_word_embeddings=False, but the LM head shares the input embeddings' weights: the "
                "checkpoint would hold the embeddings alone, and the model reloaded from it a random LM head. Set "
                "model.config.tie_word_embeddings = True, or give the head weights of its own (lm_head.weight = "
                "nn.Parameter(lm_head.weight.clone()))."
            )

    def _check_head_settings(self):
        """Before a classifier's forward, once a setting changed (the base model's forward checks the rest)."""
        if not is_torchdynamo_compiling() and self.config.__dict__.get(_CHANGED_SINCE_CHECK, True):
            self._check_built_with(self._head_settings())

    def _check_built_with(self, built: dict, config: ClusterMoEConfig | None = None):
        config = self.config if config is None else config
        changed = [name for name, value in built.items() if getattr(config, name) != value]
        if changed:
            raise ValueError(
                f"The config no longer describes this model: it says "
                f"{', '.join(f'{name}={getattr(config, name)!r}' for name in changed)}, the model was built with "
                f"{', '.join(f'{name}={built[name]!r}' for name in changed)}. These cannot change after a model is "
                "built: build a new model from the changed config (to remove experts, use `prune_experts`)."
            )

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """Default to `sorted_mm` (see `sorted_mm_experts_forward`): transformers' `grouped_mm`, with two CPU paths,
        float32 GEMMs over the active experts where this CPU would emulate half-precision ones (~1.7x faster bf16
        training here, docs/benchmarks.md) and, in the other dtypes, one pair at a time for inference over a few pairs
        (decoding)."""
        return super().get_correct_experts_implementation(requested_experts or "sorted_mm")

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, ClusterMoEExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, ClusterMoERouter):
            init.normal_(module.cluster_weight, mean=0.0, std=std)
            init.normal_(module.expert_weight, mean=0.0, std=std)
            init.zeros_(module.cluster_bias)
            init.zeros_(module.expert_bias)
            init.ones_(module.expert_reliability)
            init.zeros_(module.expert_token_counts)
            init.zeros_(module.selection_token_counts)
        elif isinstance(module, ClusterMoESparseMoeBlock):
            init.zeros_(module.masked_faulty_expert)
        elif isinstance(module, ClusterMoERoutingState):
            for buffer in module.buffers():
                init.zeros_(buffer)

    # ----- routing state and statistics API (read on demand), resets, pruning -----

    def _decoder_layers(self) -> nn.ModuleList:
        """The decoder layers, all of which the routing state and statistics span: pipeline parallelism, which replaces
        the layers of other stages with placeholders, is refused here rather than failing inside."""
        base_model = self.base_model  # read once: checked before every forward
        layers = base_model.layers
        num_moe_layers = 0
        for idx, layer in enumerate(layers):
            is_moe = getattr(layer, "is_moe", None)  # wrappers (activation checkpointing, torch.compile) pass it on
            if is_moe is None:
                placeholder = f"decoder layer {idx} is a {type(layer).__name__}"
                raise NotImplementedError(_NO_PIPELINE_PARALLELISM.format(placeholder))
            num_moe_layers += bool(is_moe)
        # Fewer layers than the config names were removed; more are run partly (early-exit decoding lowers
        # `num_hidden_layers` for a while), which the forward allows, as long as the MoE layers are those the routing
        # state was built for.
        built_moe_layers = base_model.routing_state.pending_counts.shape[0]
        if len(layers) < self.config.num_hidden_layers or num_moe_layers != built_moe_layers:
            raise ValueError(
                f"The model has {len(layers)} decoder layers ({num_moe_layers} MoE), its config num_hidden_layers="
                f"{self.config.num_hidden_layers} and its routing state {built_moe_layers} MoE layers: the routing "
                "state and statistics span the layers the model was built with. Layers cannot be removed or added "
                "afterwards (as a pipeline stage that deletes the other stages' layers: pipeline parallelism is not "
                "supported)."
            )
        return layers

    def _moe_layers(self) -> list[tuple[int, "ClusterMoESparseMoeBlock"]]:
        return [(idx, layer.mlp) for idx, layer in enumerate(self._decoder_layers()) if layer.is_moe]

    def get_expert_utilization(self) -> dict[str, float]:
        """Fraction of each MoE layer's (non-padding) token assignments that went to each expert during training,
        keyed `layer_{l}_cluster_{c}_expert_{e}`."""
        stats = {}
        for layer_idx, block in self._moe_layers():
            counts = block.router.expert_token_counts.double()
            shares = (counts / counts.sum().clamp_min(1)).view(block.num_clusters, -1).tolist()
            for c, row in enumerate(shares):
                for e, share in enumerate(row):
                    stats[f"layer_{layer_idx}_cluster_{c}_expert_{e}"] = share
        return stats

    def reset_expert_utilization(self):
        """Restart the utilisation statistics: the experts' token counts and the capacity counts. Routing is not
        affected: selection weighs cluster reliability by the counts as of the last optimizer step
        (`selection_token_counts`), which keep accumulating."""
        for _, block in self._moe_layers():
            block.router.expert_token_counts.zero_()
        state = self.base_model.routing_state
        state.dropped_pair_counts.zero_()
        state.rerouted_pair_counts.zero_()

    def get_capacity_stats(self) -> dict[str, int]:
        """(token, expert) pairs that capacity limits re-routed or dropped during training, per MoE layer
        (`layer_{l}_rerouted_pairs`, `layer_{l}_dropped_pairs`) and in total. All zero when dropless."""
        state = self.base_model.routing_state
        stats = {}
        for row, (layer_idx, _) in enumerate(self._moe_layers()):
            stats[f"layer_{layer_idx}_rerouted_pairs"] = int(state.rerouted_pair_counts[row])
            stats[f"layer_{layer_idx}_dropped_pairs"] = int(state.dropped_pair_counts[row])
        stats["rerouted_pairs"] = int(state.rerouted_pair_counts.sum())
        stats["dropped_pairs"] = int(state.dropped_pair_counts.sum())
        return stats

    def get_reliability_stats(self) -> dict[str, float]:
        """Reliability scores per expert, cluster (utilisation weighted), layer and model."""
        stats = {"training_step": int(self.base_model.routing_state.training_step)}
        layer_scores = []
        for layer_idx, block in self._moe_layers():
            router = block.router
            layer_score = float(router.layer_reliability())
            layer_scores.append(layer_score)
            stats[f"layer_{layer_idx}_reliability"] = layer_score
            experts = router.expert_reliability.view(block.num_clusters, -1).tolist()
            for c, cluster_score in enumerate(router.cluster_reliability().tolist()):
                stats[f"layer_{layer_idx}_cluster_{c}_reliability"] = cluster_score
                for e, score in enumerate(experts[c]):
                    stats[f"layer_{layer_idx}_cluster_{c}_expert_{e}_reliability"] = score
        stats["model_reliability"] = sum(layer_scores) / len(layer_scores) if layer_scores else 1.0
        return stats

    def reset_reliability(self):
        """Forget past faults: every expert's reliability back to 1, and the health observations gathered since the
        last optimizer step dropped (the next step would fold them in again). Under torch.distributed, call it on every
        process, so that all route alike."""
        for _, block in self._moe_layers():
            block.router.expert_reliability.fill_(1.0)
        state = self.base_model.routing_state
        state.pending_observed.zero_()
        state.pending_healthy.zero_()

    @torch.no_grad()
    def reinitialize_expert(
        self, layer_idx: int, cluster_idx: int, expert_idx: int, optimizer: torch.optim.Optimizer | None = None
    ):
        """Re-draw the weights of expert `expert_idx` of cluster `cluster_idx` in MoE layer `layer_idx` (e.g. after
        they were corrupted) and reset its reliability to 1, so that the router selects it again, and its balancing
        bias to the mean of its cluster peers' (the one it has was learnt for the old weights).

        The old expert's accumulated gradient, if any (a call between a backward and the optimizer step), is zeroed.
        `optimizer`: the one training the model, whose state of the old expert's weights is set back to where torch's
        optimizers start it (`ZERO_STARTING_OPTIMIZER_STATE`: Adam's moments, which would keep moving the new weights,
        SGD's momentum, ...; Adagrad's sums). Other per-expert state (Rprop's step sizes, Adafactor's factored
        statistics: zeros there freeze the expert or divide by zero) is left as it is, with a warning. Adam's step
        count is one per tensor: the new expert's moments are bias-corrected as the others', so its first steps are
        larger than a fresh Adam's. Under `torch.distributed`, call it on every process: the new weights are process
        0's draw, so that the replicas stay equal, also in the shards of DTensor weights (tensor or expert
        parallelism, FSDP2)."""
        indices = {"layer_idx": layer_idx, "cluster_idx": cluster_idx, "expert_idx": expert_idx}
        if not all(_is_integral(value) for value in indices.values()):
            raise TypeError(f"reinitialize_expert takes integer indices, got {indices}.")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"reinitialize_expert's optimizer must be the torch.optim.Optimizer training the model (or None), got "
                f"{optimizer!r}."
            )
        layers = self._moe_layers()
        blocks = dict(layers)
        if layer_idx not in blocks:
            raise ValueError(f"Layer {layer_idx} is not a MoE layer; MoE layers are {sorted(blocks)}.")
        block = blocks[layer_idx]
        if not (0 <= cluster_idx < block.num_clusters and 0 <= expert_idx < block.experts_per_cluster):
            raise ValueError(
                f"No expert {expert_idx} in cluster {cluster_idx}: layer {layer_idx} has {block.num_clusters} "
                f"clusters of {block.experts_per_cluster} experts."
            )
        _check_experts_can_change(layers, "reinitialize_expert")
        expert = cluster_idx * block.experts_per_cluster + expert_idx
        std = self.config.initializer_range
        distributed = _distributed_is_running()
        for weights in (block.experts.gate_up_proj, block.experts.down_proj):  # (N, ...) fused expert weights
            drawn = torch.empty(weights.shape[1:], dtype=weights.dtype, device=weights.device)
            drawn.normal_(mean=0.0, std=std)
            if distributed:  # each process draws from its own generator
                _broadcast_from_first_process(drawn)
            _set_expert_row(weights, expert, drawn)
            if weights.grad is not None:  # called between a backward and the step: the gradient is the old expert's
                _set_expert_row(weights.grad, expert, None)
            for name, value in (optimizer.state.get(weights, {}) if optimizer is not None else {}).items():
                if not (torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == weights.shape[0]):
                    continue  # not per expert (e.g. a step count)
                fresh = _fresh_optimizer_state(optimizer, weights, name)
                if value.shape == weights.shape and fresh is not None:
                    fresh_row = torch.full(value.shape[1:], fresh, dtype=value.dtype, device=value.device)
                    _set_expert_row(value, expert, None if fresh == 0 else fresh_row)
                else:
                    logger.warning(
                        f"reinitialize_expert: left the optimizer's {name} {tuple(value.shape)} of the old expert as "
                        "it was: its starting value is not known (e.g. Rprop's step sizes), or it is not shaped like "
                        "the weights (e.g. Adafactor's factored statistics)."
                    )
        block.router.expert_reliability[expert] = 1.0
        peers = block.router.expert_bias.view(block.num_clusters, -1)[cluster_idx]  # (E,)
        if peers.numel() > 1:
            block.router.expert_bias[expert] = (peers.sum() - peers[expert_idx]) / (peers.numel() - 1)
        state, row = self.base_model.routing_state, list(blocks).index(layer_idx)
        state.pending_observed[row, expert] = 0  # its faults since the last optimizer step are of the old weights
        state.pending_healthy[row, expert] = 0

    def model_reliability(self) -> torch.Tensor:
        """Mean over MoE layers of the utilisation-weighted expert reliability, as a 0-d tensor (no host sync)."""
        scores = [block.router.layer_reliability() for _, block in self._moe_layers()]
        if not scores:
            return torch.ones((), device=self.device)
        return torch.stack([score.to(scores[0].device) for score in scores]).mean()  # layers may sit on other devices

    def get_model_summary(self) -> dict:
        """Sizes, layout and statistics. The original ClusterMoE package's keys come first (`total_params`,
        `expert_params`, `num_layers`, `num_clusters`, `experts_per_cluster`, `total_experts` over all MoE layers,
        `model_reliability`, `training_step`)."""
        config = self.config
        moe_layers = self._moe_layers()
        total = sum(p.numel() for p in self.parameters())
        expert_params = sum(sum(p.numel() for p in block.experts.parameters()) for _, block in moe_layers)
        active_expert_params = expert_params * config.num_experts_per_tok // config.num_experts  # equal-sized experts
        reliability = self.get_reliability_stats()
        return {
            "total_params": total,
            "expert_params": expert_params,
            "num_layers": config.num_hidden_layers,
            "num_clusters": config.num_clusters,
            "experts_per_cluster": config.experts_per_cluster,
            "total_experts": len(moe_layers) * config.num_experts,
            "model_reliability": reliability["model_reliability"],
            "training_step": reliability["training_step"],
            "model_type": config.model_type,
            "active_params_per_token": total - expert_params + active_expert_params,
            "hidden_size": config.hidden_size,
            "num_moe_layers": len(moe_layers),
            "num_experts": config.num_experts,
            "top_k_clusters": config.top_k_clusters,
            "top_k_experts": config.top_k_experts,
            "experts_per_token": config.num_experts_per_tok,
            "expert_intermediate_size": config.intermediate_size,
            "reliability": reliability,
            "expert_utilization": self.get_expert_utilization(),
        }

    @torch.no_grad()
    def prune_experts(
        self,
        experts_per_cluster_keep: int | None = None,
        clusters_keep: int | None = None,
        calibration_data: Iterable[torch.Tensor | dict[str, torch.Tensor]] | None = None,
        rank_by: Literal["utilization", "reliability", "utilization_x_reliability"] = "utilization_x_reliability",
    ) -> dict[int, list[int]]:
        """Physically remove experts: in every MoE layer keep the `clusters_keep` best clusters and, inside each, the
        `experts_per_cluster_keep` best experts (`None` keeps all), slicing the fused expert weights, router rows and
        routing buffers, and update the config so that the pruned model saves, reloads and generates. Refused while
        another model shares the config object (built from the same one), which the change would reach too.
        `top_k_clusters`/`top_k_experts` are lowered if fewer clusters/experts remain.

        Experts are ranked by their utilisation (share of the layer's token assignments), their reliability, or the
        product of both; clusters by the sum of their experts' scores. Utilisation is measured on `calibration_data`
        (an iterable of `input_ids` tensors or of dicts with `input_ids` and optionally `attention_mask`) when given,
        else taken from the counts accumulated in training. Under torch.distributed both are summed over the processes,
        so that every replica keeps the same experts: call it on every process. Everything is checked before anything
        is changed.

        Returns the global ids before this call (`cluster * experts_per_cluster + expert`) of the kept experts of each
        MoE layer, in their new order. The kept weights are new `Parameter`s: create the optimizer (and its scheduler,
        or the `Trainer`) after pruning, as one created before keeps stepping the old tensors.
        """
        config = self.config
        for name, value, limit in (
            ("experts_per_cluster_keep", experts_per_cluster_keep, config.experts_per_cluster),
            ("clusters_keep", clusters_keep, config.num_clusters),
        ):
            if value is not None and not (_is_integral(value) and 1 <= value <= limit):
                raise ValueError(f"{name} must be an integer in [1, {limit}] (or None to keep all), got {value!r}.")
        # Python ints from here on (NumPy's too): they go into the config, which saves as JSON.
        experts_per_cluster_keep = None if experts_per_cluster_keep is None else int(experts_per_cluster_keep)
        clusters_keep = None if clusters_keep is None else int(clusters_keep)
        if experts_per_cluster_keep is None and clusters_keep is None:
            raise ValueError("Nothing to prune: pass experts_per_cluster_keep and/or clusters_keep.")
        if rank_by not in ("utilization", "reliability", "utilization_x_reliability"):
            raise ValueError(
                f"rank_by must be 'utilization', 'reliability' or 'utilization_x_reliability', got {rank_by!r}."
            )
        if rank_by == "reliability" and calibration_data is not None:
            raise ValueError(
                "rank_by='reliability' ranks by the reliability scores only; calibration_data measures utilisation, "
                "which it would ignore. Pass rank_by='utilization' or 'utilization_x_reliability' to use it."
            )
        layers = self._moe_layers()
        if not layers:
            raise ValueError("This model has no MoE layers to prune.")
        _check_experts_can_change(layers, "prune_experts")
        base = self.base_model
        if any(other.base_model is not base and other.config is config for other in list(_LIVE_MODELS.values())):
            raise ValueError(
                "Another live ClusterMoE model shares this model's config object, and pruning changes the config, so "
                "that model would no longer match it. Build each model from its own config "
                "(`Model(copy.deepcopy(config))`), or delete the other model first."
            )
        calibrated = calibration_data is not None
        if calibrated:
            counts = self._calibration_counts(calibration_data)
        else:
            counts = [block.router.expert_token_counts.clone() for _, block in layers]
        if rank_by != "reliability" and _distributed_is_running():
            for layer_counts in counts:  # per process (training counts, each process's calibration data): summed, so
                torch.distributed.all_reduce(layer_counts)  # that every replica keeps the same experts
        if rank_by != "reliability" and any(int(layer_counts.sum()) == 0 for layer_counts in counts):
            if calibrated:
                raise ValueError("`calibration_data` has no (non-padding) tokens to measure the utilisation on.")
            raise ValueError(
                "No utilisation data to rank the experts by: pass `calibration_data`, train the model first (counts "
                "accumulate in training mode) or use rank_by='reliability'."
            )

        new_clusters = clusters_keep or config.num_clusters
        new_experts = experts_per_cluster_keep or config.experts_per_cluster
        selections = []
        for (_, block), layer_counts in zip(layers, counts):
            utilization = layer_counts.double() / layer_counts.sum().clamp_min(1)
            reliability = block.router.reliability_scores().double()
            if rank_by == "utilization":
                score = utilization
            elif rank_by == "reliability":
                score = reliability
            else:
                score = utilization * reliability
            score = score.view(block.num_clusters, block.experts_per_cluster)
            # Stable ranking (ties keep the lower id), then the kept ids in their original order.
            clusters = score.sum(-1).argsort(descending=True, stable=True)[:new_clusters].sort().values
            experts = score[clusters].argsort(dim=-1, descending=True, stable=True)[:, :new_experts].sort(-1).values
            selections.append((clusters, experts))

        kept = {
            layer_idx: (clusters[:, None] * block.experts_per_cluster + experts).reshape(-1).tolist()
            for (layer_idx, block), (clusters, experts) in zip(layers, selections)
        }
        config.num_clusters, config.experts_per_cluster = new_clusters, new_experts
        config.top_k_clusters = min(config.top_k_clusters, new_clusters)
        config.top_k_experts = min(config.top_k_experts, new_experts)
        # Called inside `torch.inference_mode`, the new weights and buffers would be inference tensors, which no later
        # training forward could save for its backward.
        with torch.inference_mode(False):
            for (_, block), (clusters, experts) in zip(layers, selections):
                block.keep_experts(clusters, experts)
            # The statistics gathered before pruning are of experts that may be gone, and the kept weights are new
            # parameters, without the gradients that the guard watched.
            self.base_model.routing_state.discard_pending(config.num_experts)
        _lift_gradient_guard(self.base_model)
        return kept

    @torch.no_grad()
    def _calibration_counts(self, calibration_data) -> list[torch.Tensor]:
        """Per MoE layer, how many (non-padding) token assignments each expert received over `calibration_data`,
        in eval mode (nothing is folded into the training state)."""
        counts = [torch.zeros_like(block.router.expert_token_counts) for _, block in self._moe_layers()]
        with _in_eval_mode(self):
            for batch in _batches(calibration_data, "calibration_data"):
                attention_mask = batch.get("attention_mask")
                outputs = self.base_model(
                    input_ids=batch["input_ids"].to(self.device),
                    attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                    use_cache=False,
                    return_dict=True,  # also where the config asks for tuples
                )
                for layer_counts, layer_stats in zip(counts, outputs.routing_stats):
                    layer_counts += layer_stats["expert_counts"]
        return counts


@contextlib.contextmanager
def _in_eval_mode(model: nn.Module):
    """`model` in eval mode while the block runs, then every module back in its own mode: `model.train(was_training)`
    would also switch submodules the caller keeps in eval mode (e.g. frozen ones) to training."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _batches(data, name: str) -> Iterator[Mapping]:
    """The batches of `data` (an iterable of batches, or one batch: a tensor or a mapping such as a tokenizer's
    output), each as a mapping with a (batch, seq) `input_ids` tensor and, if any, an `attention_mask` of its shape.
    `name` names `data` in errors."""
    if isinstance(data, Mapping) or (isinstance(data, torch.Tensor) and data.dim() <= 2):
        data = [data]  # a 1-D tensor too, to be refused below by its shape rather than by its elements'
    if not isinstance(data, Iterable):
        raise TypeError(
            f"{name} must be an iterable of batches, or one batch (an input_ids tensor or a dict with one); got a "
            f"{type(data).__name__}."
        )
    for batch in data:
        batch = {"input_ids": batch} if isinstance(batch, torch.Tensor) else batch
        if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
            raise TypeError(
                f"{name} must be an iterable of input_ids tensors (batch, seq) or of dicts with an `input_ids` tensor "
                f"(and optionally `attention_mask`), or one such batch; got a batch of {type(batch).__name__}"
                + (f" with keys {list(batch)}." if isinstance(batch, Mapping) else ".")
            )
        input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq); got shape {tuple(input_ids.shape)}.")
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a tensor; got {type(attention_mask).__name__}.")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}; got "
                f"{tuple(attention_mask.shape)}."
            )
        yield batch


# Every live ClusterMoE model, base models and the models with a head around them: the optimizer-step hook folds the
# pending routing statistics of the base models that an optimizer trains into their buffers. In the order they were
# built (or copied), the same on every process of a distributed run, where each model's update is a collective.
_LIVE_MODELS: "weakref.WeakValueDictionary[int, ClusterMoEPreTrainedModel]" = weakref.WeakValueDictionary()
_MODEL_SERIAL_NUMBERS = itertools.count()


def _register_live_model(model: "ClusterMoEPreTrainedModel"):
    if not any(live is model for live in _LIVE_MODELS.values()):
        _LIVE_MODELS[next(_MODEL_SERIAL_NUMBERS)] = model


@dataclass
class ClusterMoEModelOutputWithPast(MoeModelOutputWithPast):
    """`routing_stats`: one dict per MoE layer with its balancing/z losses and routing counts."""

    routing_stats: tuple[dict[str, torch.Tensor], ...] | None = None


class ClusterMoERoutingState(_KeepsBufferDtypes):
    """Model-level routing state, in a leaf module so that device maps place its buffers: the optimizer-step count
    and the pairs capacity limits re-routed/dropped in training (saved), and the statistics gathered since the last
    optimizer step over every micro-batch (token counts, observed and healthy forwards per expert, (moe_layers, N)).
    All integer counts, which dtype casts of the model leave alone."""

    def __init__(self, num_moe_layers: int, num_experts: int):
        super().__init__()
        self.register_buffer("training_step", torch.zeros((), dtype=torch.long))
        for name in ("pending_counts", "pending_observed", "pending_healthy"):
            self.register_buffer(name, torch.zeros(num_moe_layers, num_experts, dtype=torch.long), persistent=False)
        # Saved, like the experts' token counts they are reset with (`reset_expert_utilization`).
        self.register_buffer("rerouted_pair_counts", torch.zeros(num_moe_layers, dtype=torch.long))
        self.register_buffer("dropped_pair_counts", torch.zeros(num_moe_layers, dtype=torch.long))
        # Set by a training forward: only then does an optimizer step update the routing state and step count.
        self.has_pending_updates = False

    def discard_pending(self, num_experts: int | None = None):
        """Forget the statistics gathered since the last optimizer step, in place (references to the buffers stay
        valid), or as new zeros for `num_experts` experts per layer (after pruning)."""
        for name in ("pending_counts", "pending_observed", "pending_healthy"):
            pending = getattr(self, name)
            if num_experts is None:
                pending.zero_()
            else:
                setattr(self, name, pending.new_zeros(pending.shape[0], num_experts))
        self.has_pending_updates = False


# Devices with a kernel for `torch._assert_async` (native_functions.yaml: CPU and CUDA, which ROCm builds share).
_DEVICES_WITH_ASYNC_ASSERT = frozenset({"cpu", "cuda"})


def _is_integral(value) -> bool:
    """An integer argument: Python's or NumPy's, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_integer_tensor(tensor: torch.Tensor) -> bool:
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


# The token-id dtypes `nn.Embedding` takes; transformers' losses take int64 labels only.
_TOKEN_ID_DTYPES = (torch.int64, torch.int32)


def _new_tokens_mask(attention_mask: torch.Tensor, cache: Cache | None, sequence_length: int) -> torch.Tensor:
    """(batch, new tokens): a 2-D mask's columns at the new tokens' positions, before the cache stores them. As in
    transformers' masks, column j is position j: a mask wider than the cached and new tokens (e.g. as wide as a static
    cache, one shape for every compiled step) has the future positions' zeros after them, and positions past a
    narrower one are padding. Found without a host read of a cache length kept on the device."""
    width = attention_mask.shape[1]
    # No cached tokens, or none that can be placed; narrower than the new tokens, the model's input check refuses it.
    if width <= sequence_length or not isinstance(cache, Cache):
        return attention_mask[:, -sequence_length:]
    offset = cache.get_query_offset()  # how many tokens the cache holds before these
    if not isinstance(offset, torch.Tensor) or _host_reads_are_free(offset):
        offset = int(offset)
        columns = attention_mask[:, offset : offset + sequence_length]
        missing = sequence_length - columns.shape[1]
        return F.pad(columns, (0, missing)) if missing else columns
    columns = torch.arange(sequence_length, device=attention_mask.device) + offset.to(attention_mask.device)
    inside = columns < width  # (new tokens,)
    return attention_mask[:, columns.clamp_max(width - 1)] * inside


def _check_tensor_inputs(**inputs):
    """Each input that is given must be a tensor: a list (or a NumPy array) fails deep inside with an AttributeError."""
    for name, value in inputs.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got a {type(value).__name__}.")


def _check_token_ids(
    ids: torch.Tensor, name: str, vocab_size: int, ignore_index: int | None = None, bound: str = "vocab_size"
):
    """Token ids (or labels, which may also be `ignore_index`; or class ids, below `bound="num_labels"`) must lie in
    [0, vocab_size). On CPU the range is read directly. On CUDA an asynchronous device assertion checks it without
    waiting for the device; other accelerators (e.g. MPS) have no such assertion, and there the check costs one host
    read."""
    if is_torchdynamo_compiling() or ids.numel() == 0:
        return
    message = f"{name} must be in [0, {bound}={vocab_size})" + (
        "" if ignore_index is None else f" or be the ignore index {ignore_index}"
    )
    checked = ids if ignore_index is None else ids.masked_fill(ids == ignore_index, 0)
    if _host_reads_are_free(ids) or ids.device.type not in _DEVICES_WITH_ASYNC_ASSERT:
        low, high = torch.stack(torch.aminmax(checked)).tolist()  # one read on the host
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{message}; got values from {low} to {high}.")
    else:
        torch._assert_async(((checked >= 0) & (checked < vocab_size)).all(), message)


class ClusterMoEModel(ClusterMoEPreTrainedModel):
    def __init__(self, config: ClusterMoEConfig):
        config.validate()  # values set after the config was built, e.g. `from_pretrained(path, top_k_experts=...)`
        distributed_config = getattr(config, "distributed_config", None)  # from_pretrained's, before it loads weights
        if distributed_config is not None and distributed_config.pp_size > 1:
            raise NotImplementedError(_NO_PIPELINE_PARALLELISM.format(f"pp_size={distributed_config.pp_size}"))
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [ClusterMoEDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = ClusterMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = ClusterMoERotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        num_moe_layers = config.num_hidden_layers - config.first_k_dense_layers
        self.routing_state = ClusterMoERoutingState(num_moe_layers, config.num_experts)
        # The backward whose end folds the statistics (`_after_optimizer_step`).
        self._accumulation_ends_after_backward = None
        self.register_forward_hook(_record_training_statistics)
        self.register_load_state_dict_pre_hook(_refuse_invalid_routing_state)
        self.register_load_state_dict_post_hook(_check_loaded_routing_state)
        # The keys a cache for this model holds per layer, for `_check_cache_fits_model` (read in every decoding step,
        # where config reads cost more than the check): key/value heads, or None under tensor parallelism (which shards
        # them), and head size.
        kv_heads = config.num_key_value_heads if _processes_per_batch(config) == 1 else None
        self._cache_key_layout = (kv_heads, config.head_dim)
        self.post_init()
        if any(getattr(config, f"output_{name}", False) for name in self._can_record_outputs):
            # A config that records outputs in every forward: install the recording hooks now, not in the first
            # forward, where `torch.compile(fullgraph=True)` cannot trace their installation (a lock).
            maybe_install_capturing_hooks(self)

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, cache):
        """Clear errors for inputs that would otherwise fail deep inside the embedding or attention, or, for token ids
        past the vocabulary, read out of bounds on accelerators: shapes, dtypes and the token-id range. The mask is
        checked before the positions, which `generate` derives from it."""
        self._decoder_layers()  # all of them: no pipeline parallelism
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        _check_tensor_inputs(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids)
        if attention_mask is not None and not isinstance(attention_mask, (torch.Tensor, BlockMask)):
            raise ValueError(
                f"attention_mask must be a torch.Tensor (or flex attention's BlockMask), got a "
                f"{type(attention_mask).__name__}."
            )
        if input_ids is not None:
            if input_ids.dim() != 2 or input_ids.dtype not in _TOKEN_ID_DTYPES:
                raise ValueError(
                    "input_ids must be int64 (or int32) token ids of shape (batch_size, sequence_length); got a "
                    f"{input_ids.dtype} tensor of shape {tuple(input_ids.shape)}."
                )
            batch_size, sequence_length = input_ids.shape
            _check_token_ids(input_ids, "input_ids", self.config.vocab_size)
        else:
            hidden_size = self.config.hidden_size
            embeds_shape = tuple(inputs_embeds.shape)
            if len(embeds_shape) != 3 or embeds_shape[-1] != hidden_size or not inputs_embeds.is_floating_point():
                raise ValueError(
                    f"inputs_embeds must be floating-point vectors of shape (batch_size, sequence_length, hidden_size="
                    f"{hidden_size}); got a {inputs_embeds.dtype} tensor of shape {embeds_shape}."
                )
            # Under autocast the layers cast their inputs; otherwise another dtype fails in the first projection.
            model_dtype = self.embed_tokens.weight.dtype
            if inputs_embeds.dtype != model_dtype and not torch.is_autocast_enabled(inputs_embeds.device.type):
                raise ValueError(
                    f"inputs_embeds must be in the model's dtype, {model_dtype}; got {inputs_embeds.dtype}. Cast them "
                    "with `.to(model.dtype)`."
                )
            batch_size, sequence_length = inputs_embeds.shape[:2]
        if batch_size == 0 or sequence_length == 0:
            raise ValueError(
                f"The input has no tokens (batch size {batch_size}, sequence length {sequence_length}); pass at least "
                "one token per sequence."
            )
        self._check_cache_fits_model(cache, batch_size)
        cached = self._cached_length(cache)
        self._check_cache_room(cache, cached, sequence_length)
        self._check_attention_mask(attention_mask, batch_size, sequence_length, cache, cached)
        if position_ids is not None and (
            position_ids.dim() != 2
            or position_ids.shape[0] not in (1, batch_size)
            or position_ids.shape[1] != sequence_length
            or not _is_integer_tensor(position_ids)
        ):
            raise ValueError(
                f"position_ids must be integer positions of shape (batch_size={batch_size} or 1, sequence_length="
                f"{sequence_length}); got a {position_ids.dtype} tensor of shape {tuple(position_ids.shape)}. "
                "(`generate` derives them from attention_mask, which must then have one entry per token: shape "
                "(batch_size, prompt length).)"
            )

    def _check_cache_fits_model(self, cache: Cache | None, batch_size: int):
        """A cache made for another model or batch fails deep in the attention (a size mismatch, or an IndexError for
        a missing layer): its number of layers, and once it holds keys their batch size, number of key/value heads
        (not under tensor parallelism, which shards them) and head size, must be this model's and these inputs'."""
        layers = getattr(cache, "layers", None) if isinstance(cache, Cache) else None
        if layers is None:
            return
        num_layers = self.config.num_hidden_layers  # as the forward runs them: early-exit drafting lowers it
        num_kv_heads, model_head_dim = self._cache_key_layout
        grows = getattr(cache, "layer_class_to_replicate", None) is not None  # `DynamicCache()` adds layers as used
        if len(layers) > num_layers or (len(layers) < num_layers and not grows):
            raise ValueError(
                f"The cache has {len(layers)} layers and this model {num_layers}: pass a cache made for this model "
                "(the `cache` of its own outputs, or e.g. DynamicCache(config=model.config))."
            )
        keys = getattr(layers[0], "keys", None) if layers and getattr(layers[0], "is_initialized", False) else None
        if isinstance(keys, torch.Tensor) and keys.dim() == 4:
            cache_batch, heads, _, head_dim = keys.shape
            heads_differ = num_kv_heads is not None and heads != num_kv_heads
            if cache_batch != batch_size or heads_differ or head_dim != model_head_dim:
                raise ValueError(
                    f"The cache holds keys of shape (batch {cache_batch}, key/value heads {heads}, head_dim "
                    f"{head_dim}); these inputs have a batch of {batch_size}, and this model has "
                    f"{self.config.num_key_value_heads} key/value heads of head_dim {model_head_dim}. Pass the cache "
                    "of these sequences and this model (for a larger batch, repeat it: "
                    "`cache.batch_repeat_interleave(n)`)."
                )

    @staticmethod
    def _cached_length(cache: Cache | None) -> int | None:
        """How many tokens the cache holds, or None where reading that would cost a device sync: a static cache
        counts them in a tensor on its device (read on the host on CPU only), and under torch.compile a guard on the
        count would recompile every step. None too for caches other than transformers' `Cache` (continuous
        batching's paged cache)."""
        if cache is None:
            return 0
        if not isinstance(cache, Cache) or is_torchdynamo_compiling():
            return None
        cached = cache.get_seq_length()
        if isinstance(cached, torch.Tensor):
            return int(cached) if _host_reads_are_free(cached) else None
        return cached

    @staticmethod
    def _check_cache_room(cache: Cache | None, cached: int | None, sequence_length: int):
        """A static cache holds a fixed number of positions per sequence: more tokens would fail in its update, or
        first in the attention-mask check, whose message would blame the mask. Where its length is not read
        (`_cached_length`), its update's index check is the one left."""
        if cached is None or not isinstance(cache, Cache):
            return
        layers = getattr(cache, "layers", ())
        sizes = [layer.max_cache_len for layer in layers if isinstance(layer, StaticLayer) and not layer.is_sliding]
        if sizes and cached + sequence_length > min(sizes):
            raise ValueError(
                f"The static cache holds {min(sizes)} positions; {cached} cached and {sequence_length} new tokens do "
                "not fit. Pass a larger cache (e.g. StaticCache(config, max_cache_len=...)) or generate fewer tokens."
            )

    def _check_attention_mask(
        self, attention_mask, batch_size: int, sequence_length: int, cache: Cache | None, cached: int | None
    ):
        """A 2-D padding mask has one column per cached and new token; a 4-D mask one row per new token and a column
        per key (a static cache has a key slot for every position it can hold), as booleans or additive floats. Where
        the cached length is not read (`_cached_length`), the columns are checked against the new tokens only."""
        if not isinstance(attention_mask, torch.Tensor):
            return  # None, or flex attention's BlockMask
        shape = tuple(attention_mask.shape)
        if attention_mask.dim() == 2:
            valid = shape[0] == batch_size and (
                shape[1] == cached + sequence_length if cached is not None else shape[1] >= sequence_length
            )
            columns = f"cached + new tokens = {cached} + {sequence_length}" if cached is not None else "all tokens"
            expected = f"(batch_size={batch_size}, {columns}): one column per token the inputs attend to"
        elif attention_mask.dim() == 4:
            heads, keys = self.config.num_attention_heads, (cached or 0) + sequence_length
            valid = (
                shape[0] in (1, batch_size)
                and shape[1] in (1, heads)
                and shape[2] == sequence_length
                and (shape[3] == keys or (cache is not None and shape[3] > keys))
                and (attention_mask.dtype == torch.bool or attention_mask.is_floating_point())
            )
            expected = (
                f"a boolean or (additive) floating-point mask of shape (batch_size={batch_size} or 1, heads={heads} or "
                f"1, new tokens={sequence_length}, keys={keys}{' or more' if cache is not None else ''})"
            )
            shape = f"{shape} ({attention_mask.dtype})"
        else:
            valid, expected = False, "a 2-D padding mask or a 4-D (batch, heads, queries, keys) mask"
        if not valid:
            raise ValueError(f"attention_mask has shape {shape}; expected {expected}.")

    def _check_checkpointing_recomputes_the_forward(self):
        """Reentrant checkpointing runs each layer's forward without gradients and only its output gets them back; the
        router losses, computed inside the layers, would silently get none. Without `preserve_rng_state`, the
        recomputation draws other router jitter (other experts) and attention dropout than the forward did, and the
        gradients silently belong to neither. transformers' checkpointing function is a `functools.partial` of torch's
        `checkpoint`, whose default (no `use_reentrant`) is reentrant."""
        config = self.config
        keywords = getattr(self._gradient_checkpointing_func, "keywords", None)
        if keywords is not None and not keywords.get("preserve_rng_state", True):  # torch reads it as a truth value
            random = {"attention_dropout": config.attention_dropout}
            if self._moe_layers():
                random = {"router_jitter_noise": config.router_jitter_noise, **random}
            random = {name: value for name, value in random.items() if value > 0}
            if random:
                raise ValueError(
                    f"Gradient checkpointing with preserve_rng_state={keywords['preserve_rng_state']!r} would "
                    "recompute the layers with other random draws than their forward "
                    f"({', '.join(f'{name}={value}' for name, value in random.items())}"
                    "): the gradients would belong to neither. Keep preserve_rng_state=True (the default), or set "
                    "those to 0."
                )
        reentrant = keywords is not None and keywords.get("use_reentrant") in (None, True)
        router_losses = (config.router_aux_loss_coef, config.cluster_aux_loss_coef, config.router_z_loss_coef)
        if reentrant and self._moe_layers() and any(coef != 0 for coef in router_losses):
            raise ValueError(
                "Gradient checkpointing with use_reentrant=True would train the routers without their balancing and "
                "z-losses: it runs each layer's forward without gradients, and only the layer's hidden states get "
                "them back, not the router losses it returns. Enable it with use_reentrant=False (transformers' "
                "default, e.g. gradient_checkpointing_kwargs={'use_reentrant': False}), or set router_aux_loss_coef, "
                "router_cluster_aux_loss_coef and router_z_loss_coef to 0."
            )

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_routing_stats: bool = True,
        **kwargs,
    ) -> ClusterMoEModelOutputWithPast:
        """`output_routing_stats`: return each MoE layer's balancing and z losses and routing counts, which training
        forwards fold into the routing state. The causal LM turns them off for pure inference."""
        config = self.config
        if not is_torchdynamo_compiling() and config.__dict__.get(_CHANGED_SINCE_CHECK, True):
            num_layers = config.num_hidden_layers
            if _is_integral(num_layers) and 0 < num_layers < len(self.layers):
                # Early-exit drafting runs the first layers, lowering `num_hidden_layers` meanwhile, which the checks
                # would refuse (e.g. below `first_k_dense_layers`): the other settings are checked as the whole
                # model's, and the whole model's next forward checks the config itself.
                whole_model = copy.copy(config)
                whole_model.__dict__["num_hidden_layers"] = len(self.layers)
                self._check_config(whole_model)
            else:
                self._check_config()
            for _, block in self._moe_layers():  # a choice of kernels over the same weights: follows the config
                block.router.hierarchical = _uses_hierarchical_router(config)
        self._check_inputs(input_ids, inputs_embeds, attention_mask, position_ids, cache)
        sequence_length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        # Decided here, outside the layers, which reentrant checkpointing first runs without gradients.
        training_forward = self.training and torch.is_grad_enabled()
        if self.gradient_checkpointing and training_forward:
            self._check_checkpointing_recomputes_the_forward()
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(sequence_length, device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        # Padding tokens are excluded from the balancing losses and the routing statistics.
        token_mask = None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:  # not flex attention's BlockMask
            token_mask = _new_tokens_mask(attention_mask, cache, sequence_length).reshape(-1).bool()
            if _host_reads_are_free(token_mask) and bool(token_mask.all()):
                token_mask = None  # no padding: skip the per-pair masking in every layer

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        routing_stats = []
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states, layer_stats = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                token_mask=token_mask,
                output_routing_stats=output_routing_stats,
                training_forward=training_forward,
                **kwargs,
            )
            if layer_stats is not None:
                routing_stats.append(layer_stats)
        hidden_states = self.norm(hidden_states)
        return ClusterMoEModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache,
            routing_stats=tuple(routing_stats) if output_routing_stats else None,
        )

    @torch.no_grad()
    def discard_pending_routing_updates(self):
        """Forget what the training forwards since the last optimizer step gathered, for a step that will not come
        (interrupted, or out of memory before a retry; their gradients discarded): the statistics, and the guard that
        zeroes the non-finite gradients of the experts they masked."""
        self.routing_state.discard_pending()
        _lift_gradient_guard(self)

    @torch.no_grad()
    def apply_pending_routing_updates(self):
        """Fold the statistics gathered since the last optimizer step into the reliability EMAs and balancing
        biases, and count one training step. Called by a global optimizer-step hook after each step that had a
        training forward; summed over processes when torch.distributed is running."""
        state = self.routing_state
        pending = torch.stack([state.pending_counts, state.pending_observed, state.pending_healthy])
        if _distributed_is_running():
            torch.distributed.all_reduce(pending)
            pending //= _processes_per_batch(self.config)  # each batch once (sums of equal counts divide exactly)
        counts, observed, healthy = pending
        config = self.config
        for row, (_, block) in enumerate(self._moe_layers()):
            router = block.router
            device = router.expert_bias.device
            if config.use_adaptive_routing and config.adaptive_routing_rate > 0:
                self._step_balancing_biases(block, counts[row].to(device, torch.float32))
            router.selection_token_counts.add_(counts[row].to(device))
            if config.use_reliability_routing:
                seen = observed[row].to(device) > 0
                health = (healthy[row] / observed[row].clamp_min(1)).to(device)
                updated = config.reliability_decay * router.expert_reliability + (1 - config.reliability_decay) * health
                router.expert_reliability.copy_(torch.where(seen, updated, router.expert_reliability))
        state.training_step.add_(1)
        state.discard_pending()


    def _step_balancing_biases(self, block: ClusterMoESparseMoeBlock, counts: torch.Tensor):
        """Nudge the selection biases toward uniform load, given the token counts (N,) of the last step: a bias goes
        up where its load is below the mean, down where above. Only among the experts (clusters) that selection could
        choose in that step: an excluded one has no load because it was excluded, and raising its bias at every step
        would make it take over once it is selectable again."""
        config, router = self.config, block.router
        load = counts.view(block.num_clusters, -1)  # (C, E)
        selectable = router.selectable_experts().view_as(load)
        cluster_selectable = selectable.sum(-1) >= config.top_k_experts  # (C,)
        cluster_load = load.sum(-1)  # (C,)
        mean_cluster_load = (cluster_load * cluster_selectable).sum() / cluster_selectable.sum().clamp_min(1)
        cluster_step = torch.sign(mean_cluster_load - cluster_load) * cluster_selectable
        mean_load = (load * selectable).sum(-1, keepdim=True) / selectable.sum(-1, keepdim=True).clamp_min(1)
        expert_step = torch.sign(mean_load - load) * selectable  # 0 in a cluster without tokens: all its loads are 0
        router.cluster_bias.add_(config.adaptive_routing_rate * cluster_step)
        router.expert_bias.add_(config.adaptive_routing_rate * expert_step.reshape(-1))


def _processes_per_batch(config: ClusterMoEConfig) -> int:
    """How many processes see each batch: 1 under data parallelism (FSDP included, and expert parallelism over its
    processes, which route their own batches); under transformers' tensor parallelism (`DistributedConfig`), the
    processes that shard one replica share its batch."""
    distributed_config = getattr(config, "distributed_config", None)
    return 1 if distributed_config is None else distributed_config.tp_size


def _record_training_statistics(model: ClusterMoEModel, args, output):
    """Forward hook on the base model: runs once per forward, outside every (possibly recomputed) layer. Only
    training forwards count: a model left in train mode must not count `no_grad` inference or `generate`."""
    if not (model.training and torch.is_grad_enabled()):
        return
    stats = routing_stats_of(output)
    if stats is None:  # the caller asked for no routing statistics
        return
    state = model.routing_state
    device = state.pending_counts.device  # layers may live on other devices under a device map
    with torch.no_grad():
        for row, ((_, block), layer_stats) in enumerate(zip(model._moe_layers(), stats)):
            counts = layer_stats["expert_counts"]
            block.router.expert_token_counts.add_(counts)
            state.pending_counts[row].add_(counts.to(device))
            state.rerouted_pair_counts[row].add_(layer_stats["rerouted_pairs"].to(device))
            state.dropped_pair_counts[row].add_(layer_stats["dropped_pairs"].to(device))
            if "expert_faulty" in layer_stats:
                observed, faulty = layer_stats["expert_observed"].to(device), layer_stats["expert_faulty"].to(device)
                state.pending_observed[row].add_(observed.long())
                state.pending_healthy[row].add_((observed & ~faulty).long())
    state.has_pending_updates = True


def routing_stats_of(output) -> tuple[dict[str, torch.Tensor], ...] | None:
    """The per-layer routing statistics of a base-model output: a `ModelOutput`, or with `return_dict=False` a tuple
    whose layout depends on what else was recorded (the one tuple of dicts)."""
    if isinstance(output, dict):
        return output.get("routing_stats")
    return next((item for item in output if isinstance(item, tuple) and item and isinstance(item[0], dict)), None)


class _ParameterOwners:
    """The base model owning each parameter of the live ClusterMoE models (its own or its head's), by parameter id,
    with weak references, for the optimizer-step hook. Read again after any module registered a parameter or a module
    (new models, loading, pruning, adapters, an attached head: `mark_stale` is a global registration hook; copies
    register none, and mark it too), and when a parameter is neither found nor known to belong to no model (one set
    directly in a module's `_parameters`). So optimizers that step one parameter each (in the backward) cost a lookup
    each, not a scan of every model."""

    def __init__(self):
        self.stale = True
        self.owners: dict[int, tuple[weakref.ref, weakref.ref]] = {}  # id -> (parameter, base model)
        self.not_owned: dict[int, weakref.ref] = {}  # id -> parameter stepped that no live model owns

    def mark_stale(self, *args):
        self.stale = True

    def _read(self):
        self.owners = {
            id(parameter): (weakref.ref(parameter), weakref.ref(model.base_model))
            for model in list(_LIVE_MODELS.values())
            for parameter in model.parameters()
        }

    def bases_of(self, parameters: list[torch.Tensor]) -> list["ClusterMoEModel"]:
        """The base models owning `parameters`, in the order of their first parameter there."""
        def owner(parameter):
            entry = self.owners.get(id(parameter))
            return entry[1]() if entry is not None and entry[0]() is parameter else None

        def known_not_owned(parameter):
            entry = self.not_owned.get(id(parameter))
            return entry is not None and entry() is parameter

        if self.stale or any(owner(parameter) is None and not known_not_owned(parameter) for parameter in parameters):
            self.stale = False
            self._read()
            self.not_owned = {key: stepped for key, stepped in self.not_owned.items() if key not in self.owners}
        owners = {parameter: owner(parameter) for parameter in parameters}
        self.not_owned.update((id(found), weakref.ref(found)) for found, base in owners.items() if base is None)
        return list(dict.fromkeys(base for base in owners.values() if base is not None))


_PARAMETER_OWNERS = _ParameterOwners()
_REGISTRATION_HOOKS = (  # a module attached to a model (`model.lm_head = probe`) registers no parameter
    register_module_parameter_registration_hook(_PARAMETER_OWNERS.mark_stale),
    register_module_module_registration_hook(_PARAMETER_OWNERS.mark_stale),
)
# Base models an optimizer stepping their parameters (or their head's) was seen to train.
_MODELS_WITH_A_KNOWN_OPTIMIZER: "weakref.WeakSet[ClusterMoEModel]" = weakref.WeakSet()


def _models_trained_by(optimizer: torch.optim.Optimizer) -> list["ClusterMoEModel"]:
    """The live base models an optimizer's step ends the accumulation of: those whose parameters, or whose head's,
    it steps. If it steps none, it steps copies of a model's parameters (DeepSpeed's and FSDP's flat ones) or trains
    another model: then the base models no optimizer was seen to train. (So another model's optimizer, e.g. a GAN's
    discriminator's, stepping between a forward and its backward neither cuts the accumulation short nor lifts the
    gradient guard.) In the order the optimizer lists their parameters, or else the order they were built in: the same
    on every process, where each model's update all-reduces its statistics."""
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    trained = _PARAMETER_OWNERS.bases_of(parameters)
    _MODELS_WITH_A_KNOWN_OPTIMIZER.update(trained)
    if trained:
        return trained
    return [
        model for model in list(_LIVE_MODELS.values())
        if isinstance(model, ClusterMoEModel) and model not in _MODELS_WITH_A_KNOWN_OPTIMIZER
    ]  # fmt: skip


def _end_accumulation(model: "ClusterMoEModel"):
    """Fold the statistics of the steps' forwards into the routing state, and lift the gradient guard."""
    if model.routing_state.has_pending_updates:  # set by training forwards only; the mode may have changed since
        model.apply_pending_routing_updates()
    _lift_gradient_guard(model)


def _lift_gradient_guard(model: "ClusterMoEModel"):
    """Let non-finite expert gradients through again (to a gradient scaler): no gradient of a masked expert is due."""
    for _, block in model._moe_layers():
        # (A Python flag first: most blocks masked no expert.)
        if block.may_have_masked_fault:
            block.masked_faulty_expert.zero_()
            block.may_have_masked_fault = False


def _end_accumulation_after_backward(model_ref: "weakref.ref[ClusterMoEModel]"):
    model = model_ref()
    if model is not None:
        _end_accumulation(model)


def _after_optimizer_step(optimizer, args, kwargs):
    # An optimizer that steps inside the backward (one per parameter, from gradient hooks) ends the accumulation once
    # that backward has finished: the layers gradient checkpointing recomputes later in it must route as their forward
    # did, and the gradients still to come must be guarded alike.
    backward = torch._C._current_graph_task_id()
    for model in _models_trained_by(optimizer):
        if backward == -1:
            _end_accumulation(model)
        elif model._accumulation_ends_after_backward != backward:
            model._accumulation_ends_after_backward = backward
            callback = functools.partial(_end_accumulation_after_backward, weakref.ref(model))
            torch.autograd.Variable._execution_engine.queue_callback(callback)


_STEP_HOOK = register_optimizer_step_post_hook(_after_optimizer_step)


@dataclass
class ClusterMoECausalLMOutputWithPast(ModelOutput):
    """Causal-LM output of ClusterMoE. The router losses come after `logits` so that without labels `out[0]` is
    still the logits. They, `model_reliability` and the capacity counts are returned whenever gradients are enabled,
    labels are given or `output_router_logits` is set (so the original ClusterMoE API's `out["aux_loss"]` works for
    training forwards); pure inference (`no_grad` without labels, as in `generate`) skips them and leaves them `None`.

    aux_loss: weighted sum of the router losses below, already included in `loss` when labels are given.
    cluster_balance_loss, expert_balance_loss, router_z_loss: the unweighted parts, averaged over MoE layers.
    router_logits: per MoE layer, the cluster router's logits (tokens, num_clusters), with `output_router_logits`.
    model_reliability: utilisation-weighted mean expert reliability (with `use_reliability_routing`).
    rerouted_pairs, dropped_pairs: with capacity limits, the (token, expert) pairs each MoE layer re-routed and
        dropped in this forward, (moe_layers,).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None
    cluster_balance_loss: torch.Tensor | None = None
    expert_balance_loss: torch.Tensor | None = None
    router_z_loss: torch.Tensor | None = None
    model_reliability: torch.Tensor | None = None
    rerouted_pairs: torch.Tensor | None = None
    dropped_pairs: torch.Tensor | None = None


class ClusterMoEForCausalLM(ClusterMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _fsdp_plan = {"lm_head": "keep_full_weight"}

    def __init__(self, config: ClusterMoEConfig):
        super().__init__(config)
        self.model = ClusterMoEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> ClusterMoECausalLMOutputWithPast:
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        # (tie_word_embeddings changes nothing in a forward: checked when saving, `_check_head_is_saved`.)
        inputs = input_ids if input_ids is not None else inputs_embeds
        _check_logits_to_keep(logits_to_keep, inputs)
        if labels is not None:
            _check_causal_lm_labels(labels, inputs, logits_to_keep, self.config.vocab_size)
        # Pure inference (no gradients, no labels, no router logits asked for, e.g. `generate`) skips the router
        # losses and routing counts: they would only cost time.
        output_routing_stats = torch.is_grad_enabled() or labels is not None or output_router_logits
        outputs: ClusterMoEModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            output_routing_stats=output_routing_stats,
            return_dict=True,  # also where the config asks for tuples: this head returns what it asks for
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        parts = combine_router_losses(outputs.routing_stats)
        capacity_counts = {}
        if outputs.routing_stats and self.config.expert_capacity_factor is not None:
            capacity_counts = {
                name: _stack_layers(outputs.routing_stats, name) for name in ("rerouted_pairs", "dropped_pairs")
            }
        aux_loss = None if parts is None else weighted_router_loss(self.config, parts)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
            if aux_loss is not None:
                loss = loss + aux_loss.to(loss.device) * _aux_loss_share(labels, kwargs.get("num_items_in_batch"), loss)

        return ClusterMoECausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            cluster_balance_loss=None if parts is None else parts[0],
            expert_balance_loss=None if parts is None else parts[1],
            router_z_loss=None if parts is None else parts[2],
            model_reliability=(
                self.model_reliability() if output_routing_stats and self.config.use_reliability_routing else None
            ),
            rerouted_pairs=capacity_counts.get("rerouted_pairs"),
            dropped_pairs=capacity_counts.get("dropped_pairs"),
        )

    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs):
        """Also checks the depth of early-exit drafting (`assistant_early_exit`) before transformers lowers
        `num_hidden_layers` to it for each draft, which it does not restore when the draft fails: the model would keep
        refusing every later forward."""
        super()._validate_generation_mode(generation_mode, generation_config, generation_mode_kwargs)
        depth, num_layers = generation_config.assistant_early_exit, len(self.model.layers)
        # A Python int, as the config's `num_hidden_layers` must be
        if depth is not None and not (_is_int(depth) and 0 < depth <= num_layers):
            raise ValueError(
                f"assistant_early_exit={depth!r}: early-exit drafting runs the first n decoder layers, n an int from 1 "
                f"to the model's {num_layers}."
            )


# `generate` checks the forward of remote-code models (ClusterMoE is one: its code travels with its checkpoints) for a
# `cache_position` argument at every step, through `inspect.signature`: ~35 us per token, 2% of a CPU decoding step
# (docs/benchmarks.md). A stored signature, which `inspect` returns as it is, makes that check free. Stored on the
# undecorated function, where `inspect` arrives whatever wraps the forward: decorators copy a wrapped function's
# attributes, and would carry an unbound signature (with `self`) onto wrappers of the bound method.
inspect.unwrap(ClusterMoEForCausalLM.forward).__signature__ = inspect.signature(ClusterMoEForCausalLM.forward)


def _check_generation_token_ids(generation_config, vocab_size: int):
    """A saved generation config's special token ids must be tokens of the vocabulary: `generate` feeds the model its
    BOS (to start without inputs) and its pad id, or without one its first EOS id (after a finished sequence). The
    forward would otherwise refuse them as if the caller's `input_ids` held them. The one exception is EOS -1 alone,
    no EOS, which transformers' continuous batching writes into a generation config without one."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(generation_config, name, None)
        if value is None:
            continue
        ids = value.reshape(-1).tolist() if isinstance(value, torch.Tensor) else value
        ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
        if name == "eos_token_id" and len(ids) == 1 and _is_integral(ids[0]) and ids[0] == -1:
            continue
        if not (ids and all(_is_integral(token_id) and 0 <= token_id < vocab_size for token_id in ids)):
            allowed = f"in [0, vocab_size={vocab_size})"
            if name == "eos_token_id":
                allowed += ", a non-empty list of such ids, or -1 (no EOS)"
            raise ValueError(f"generation_config.{name} ({value}) must be None or {allowed}: nothing was saved.")


def _check_logits_to_keep(logits_to_keep, inputs: torch.Tensor | None):
    """transformers' `slice_logits_to_keep` reads an int n as the last n positions (0: all) and a tensor as the
    positions to keep: a negative int would silently drop the first positions, a float fail as an index, a position
    past the inputs fail as an index after the forward (and its cache update) ran, and a negative one count from the
    end. Checked before the forward, against the sequence length of `inputs` (ids or embeddings) when they are given."""
    if isinstance(logits_to_keep, torch.Tensor):
        valid = logits_to_keep.dim() == 1 and _is_integer_tensor(logits_to_keep)
    else:
        valid = _is_integral(logits_to_keep) and logits_to_keep >= 0
    if not valid:
        raise ValueError(
            "logits_to_keep must be an integer >= 0 (compute the logits of the last n positions; 0 for all) or a 1-D "
            f"tensor of the positions to keep; got {logits_to_keep!r}."
        )
    if isinstance(logits_to_keep, torch.Tensor) and isinstance(inputs, torch.Tensor) and inputs.dim() >= 2:
        _check_token_ids(logits_to_keep, "logits_to_keep", inputs.shape[1], bound="sequence_length")


def _check_per_token_labels(labels: torch.Tensor, inputs: torch.Tensor | None, what: str) -> bool:
    """Labels of every input position: int64, of the inputs' (batch_size, sequence_length). Checked before the
    forward, so that a refused call counts no routing statistics. False (nothing checked) for inputs of another kind,
    which the forward refuses."""
    _check_tensor_inputs(labels=labels)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        return False
    batch_size, sequence_length = inputs.shape[:2]
    if labels.shape != (batch_size, sequence_length) or labels.dtype != torch.int64:
        raise ValueError(
            f"labels must be int64 {what} of the inputs' shape (batch_size={batch_size}, sequence_length="
            f"{sequence_length}), or -100 (ignored); got a {labels.dtype} tensor of shape {tuple(labels.shape)}."
        )
    return True


def _check_causal_lm_labels(labels: torch.Tensor, inputs: torch.Tensor | None, logits_to_keep, vocab_size: int):
    """Labels name the next token of every input position, whose logits must all be kept."""
    if not _check_per_token_labels(labels, inputs, "token ids"):
        return
    sequence_length = labels.shape[-1]
    if isinstance(logits_to_keep, torch.Tensor):
        kept = logits_to_keep.numel()
    else:
        kept = sequence_length if logits_to_keep == 0 else min(logits_to_keep, sequence_length)
    if kept != sequence_length:
        raise ValueError(
            f"labels need the logits of every position, but logits_to_keep={logits_to_keep!r} keeps {kept} of "
            f"{sequence_length}: leave logits_to_keep at 0 when passing labels."
        )
    _check_token_ids(labels, "labels", vocab_size, ignore_index=-100)


def _stack_layers(routing_stats, name: str) -> torch.Tensor:
    """One statistic of every MoE layer, (moe_layers,), on the first layer's device (a device map spreads them)."""
    device = routing_stats[0][name].device
    return torch.stack([layer[name].to(device) for layer in routing_stats])


# The router losses each MoE layer returns, in the order `combine_router_losses` returns their means.
ROUTER_LOSS_NAMES = ("cluster_balance_loss", "expert_balance_loss", "router_z_loss")


def combine_router_losses(routing_stats):
    """Average each router loss (`ROUTER_LOSS_NAMES`) over the MoE layers; `None` for a model without MoE layers."""
    if not routing_stats:
        return None
    return tuple(_stack_layers(routing_stats, name).mean() for name in ROUTER_LOSS_NAMES)


def weighted_router_loss(config: ClusterMoEConfig, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The auxiliary loss added to a task loss: the router losses of `combine_router_losses`, weighted by the config."""
    cluster_balance, expert_balance, router_z = parts
    return (
        config.cluster_aux_loss_coef * cluster_balance
        + config.router_aux_loss_coef * expert_balance
        + config.router_z_loss_coef * router_z
    )


def _aux_loss_share(
    labels: torch.Tensor, num_items_in_batch, loss: torch.Tensor, shifted: bool = True
) -> torch.Tensor | float:
    """With gradient accumulation the Trainer sums per-micro-batch losses normalised by the global token count (of the
    labels after the first position where they are `shifted`, as a causal LM's); weight this micro-batch's aux loss by
    its share of those tokens so the accumulated aux loss is an average. On the loss's device: under a device map, the
    labels (and the count) sit on the first device, the logits on the last."""
    if num_items_in_batch is None:
        return 1.0
    counted = labels[..., 1:] if shifted else labels
    micro_batch_items = (counted != -100).sum().to(loss.device, torch.float32)
    return micro_batch_items / torch.as_tensor(num_items_in_batch, dtype=torch.float32).to(loss.device)


def _base_model_forward(head: ClusterMoEPreTrainedModel, labels_given: bool, output_router_logits, **inputs):
    """A task head's base-model forward: `(outputs, aux_loss)`, the weighted router losses that the head adds to its
    loss so that fine-tuning keeps the routers balanced, or None in pure inference (no gradients, no labels, no
    `output_router_logits`), which skips them."""
    head._check_head_settings()
    if output_router_logits is None:
        output_router_logits = head.config.output_router_logits
    outputs: ClusterMoEModelOutputWithPast = head.model(
        output_router_logits=output_router_logits,
        output_routing_stats=torch.is_grad_enabled() or labels_given or output_router_logits,
        return_dict=True,  # also where the config asks for tuples: the head returns what it asks for
        **inputs,
    )
    parts = combine_router_losses(outputs.routing_stats)
    return outputs, None if parts is None else weighted_router_loss(head.config, parts)


@dataclass
class ClusterMoESequenceClassifierOutputWithPast(SequenceClassifierOutputWithPast):
    """`aux_loss`: the weighted router losses, already included in `loss` when labels are given; `None` in pure
    inference (no gradients, no labels, no `output_router_logits`). `router_logits`: per MoE layer, the cluster
    router's logits (tokens, num_clusters), with `output_router_logits`."""

    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


class ClusterMoEForSequenceClassification(ClusterMoEPreTrainedModel):
    """transformers' sequence classification head (the last non-padding token's hidden state, scored), whose loss also
    carries the router losses, as the causal LM's does, so that fine-tuning keeps the routers balanced."""

    # Its loss is a mean over the batch, not normalised by a token count the Trainer passes: the Trainer must not
    # pass `num_items_in_batch` and must average over gradient accumulation itself (else the loss grows with it).
    accepts_loss_kwargs = False

    def __init__(self, config: ClusterMoEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        # Built directly, not through `AutoModel` as transformers' generic head does: from a checkpoint's copied code,
        # without this package, nothing has registered the config with `AutoModel`.
        self.model = ClusterMoEModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def _last_real_token(self, input_ids, new_tokens_mask, batch_size: int, sequence_length: int, device):
        """Each sequence's last real (not padding) position, (batch,), or -1 for the last position of all."""
        # Which positions are real: by the 2-D attention mask's columns of the new tokens, else the ids that are not
        # padding (a pad id that is also a real token, e.g. EOS, can only be told by the mask).
        if new_tokens_mask is not None:
            is_real = new_tokens_mask.bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            is_real = input_ids != self.config.pad_token_id
        elif batch_size == 1:
            return -1
        elif input_ids is None:  # as transformers' heads: embeddings carry no pad ids (prompt tuning, ...)
            logger.warning_once(
                "Sequence classification of inputs_embeds without a 2-D attention_mask pools the last position of "
                "each sequence, padding or not: pass the attention_mask if the batch is padded."
            )
            return -1
        else:
            raise ValueError(
                "Cannot tell the last real token of each sequence in a batch of more than one: set the config's "
                "pad_token_id, or pass a 2-D attention_mask."
            )
        # The rightmost real position, for left and right padding alike.
        positions = torch.arange(sequence_length, device=device, dtype=torch.int32)
        return (positions * is_real.to(device, torch.int32)).argmax(-1)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> ClusterMoESequenceClassifierOutputWithPast:
        if labels is not None:
            _check_tensor_inputs(labels=labels)
            class_ids = labels.dtype in (torch.long, torch.int) and self.num_labels > 1  # transformers' single-label
            if class_ids and self.config.problem_type in (None, "single_label_classification"):
                _check_token_ids(labels, "labels", self.num_labels, ignore_index=-100, bound="num_labels")
        new_tokens_mask = None  # read before the model's forward adds the tokens to the cache
        inputs = input_ids if input_ids is not None else inputs_embeds
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and getattr(inputs, "ndim", 0) >= 2:
            new_tokens_mask = _new_tokens_mask(attention_mask, cache, inputs.shape[1])
        outputs, aux_loss = _base_model_forward(
            self,
            labels is not None,
            output_router_logits,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)  # (batch, seq, num_labels)
        batch_size, sequence_length = logits.shape[:2]
        last_real_token = self._last_real_token(input_ids, new_tokens_mask, batch_size, sequence_length, logits.device)
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last_real_token]

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)
            if aux_loss is not None:
                loss = loss + aux_loss.to(loss.device)
        return ClusterMoESequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aux_loss=aux_loss,
            router_logits=outputs.router_logits,
        )


@dataclass
class ClusterMoETokenClassifierOutput(TokenClassifierOutput):
    """`aux_loss` and `router_logits` as in `ClusterMoESequenceClassifierOutputWithPast`."""

    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


class ClusterMoEForTokenClassification(ClusterMoEPreTrainedModel):
    """transformers' token classification head (a label per token, from its hidden state after dropout:
    `config.classifier_dropout` if set, else 0.1, as transformers' heads), whose loss also carries the router losses.
    Under gradient accumulation it takes the Trainer's count of labelled tokens (`num_items_in_batch`), as the causal
    LM does, so that the accumulated loss weighs every token alike."""

    def __init__(self, config: ClusterMoEConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = ClusterMoEModel(config)
        self.dropout = nn.Dropout(0.1 if config.classifier_dropout is None else config.classifier_dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> ClusterMoETokenClassifierOutput:
        if labels is not None:
            if _check_per_token_labels(labels, input_ids if input_ids is not None else inputs_embeds, "class ids"):
                _check_token_ids(labels, "labels", self.num_labels, ignore_index=-100, bound="num_labels")
        outputs, aux_loss = _base_model_forward(
            self,
            labels is not None,
            output_router_logits,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.score(self.dropout(outputs.last_hidden_state))  # (batch, seq, num_labels)
        loss = None
        if labels is not None:
            num_items_in_batch = kwargs.get("num_items_in_batch")
            loss = self.loss_function(logits, labels, self.config, num_items_in_batch=num_items_in_batch)
            if aux_loss is not None:
                share = _aux_loss_share(labels, num_items_in_batch, loss, shifted=False)
                loss = loss + aux_loss.to(loss.device) * share
        return ClusterMoETokenClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aux_loss=aux_loss,
            router_logits=outputs.router_logits,
        )


@dataclass
class ClusterMoEQuestionAnsweringModelOutput(QuestionAnsweringModelOutput):
    """`aux_loss` and `router_logits` as in `ClusterMoESequenceClassifierOutputWithPast`."""

    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


class ClusterMoEForQuestionAnswering(ClusterMoEPreTrainedModel):
    """transformers' extractive question answering head (start and end logits per token), whose loss also carries the
    router losses. As in transformers, a start or end position at or past the sequence length (an answer cut off by
    truncation) is left out of the loss; a negative one is refused (transformers would clamp it to position 0)."""

    accepts_loss_kwargs = False  # a mean over the batch, as the sequence classifier's (see there)

    def __init__(self, config: ClusterMoEConfig):
        super().__init__(config)
        self.model = ClusterMoEModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> ClusterMoEQuestionAnsweringModelOutput:
        if (start_positions is None) != (end_positions is None):
            raise ValueError("Pass both start_positions and end_positions for a loss, or neither.")
        if start_positions is not None:  # before the forward, so that a refused call counts no routing statistics
            for name, positions in (("start_positions", start_positions), ("end_positions", end_positions)):
                _check_answer_positions(positions, name, input_ids if input_ids is not None else inputs_embeds)
        outputs, aux_loss = _base_model_forward(
            self,
            start_positions is not None,
            output_router_logits,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        logits = self.qa_outputs(outputs.last_hidden_state)  # (batch, seq, 2)
        start_logits, end_logits = (part.squeeze(-1).contiguous() for part in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None:
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions)
            if aux_loss is not None:
                loss = loss + aux_loss.to(loss.device)
        return ClusterMoEQuestionAnsweringModelOutput(
            loss=loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            aux_loss=aux_loss,
            router_logits=outputs.router_logits,
        )


def _check_answer_positions(positions: torch.Tensor, name: str, inputs: torch.Tensor | None):
    """One int64 position per sequence of `inputs`, (batch,) or (batch, 1), not negative: transformers' loss would
    clamp it to position 0. Checked as token ids are (`_check_token_ids`): on CPU and other devices read on the host,
    on CUDA by an asynchronous device assertion, under `torch.compile` not at all."""
    _check_tensor_inputs(**{name: positions})
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        return  # the forward's to refuse
    batch_size = inputs.shape[0]
    if positions.shape not in ((batch_size,), (batch_size, 1)) or positions.dtype != torch.int64:
        raise ValueError(
            f"{name} must be int64 token positions, one per sequence: shape ({batch_size},) or ({batch_size}, 1); "
            f"got a {positions.dtype} tensor of shape {tuple(positions.shape)}."
        )
    if is_torchdynamo_compiling() or positions.numel() == 0:
        return
    message = f"{name} must be >= 0 (positions at or past the sequence length are ignored)"
    if _host_reads_are_free(positions) or positions.device.type not in _DEVICES_WITH_ASYNC_ASSERT:
        lowest = int(positions.min())
        if lowest < 0:
            raise ValueError(f"{message}; got {lowest}.")
    else:
        torch._assert_async((positions >= 0).all(), message)


# Custom code wherever these classes are loaded from, this package or a checkpoint's copy of this file: whichever of
# them saves (also the base model of a loaded causal LM), `save_pretrained` copies this file next to the weights and
# its `auto_map` names all of them, so that each Auto class loads the checkpoint without this package.
_AUTO_CLASSES = (
    ClusterMoEModel,
    ClusterMoEForCausalLM,
    ClusterMoEForSequenceClassification,
    ClusterMoEForTokenClassification,
    ClusterMoEForQuestionAnswering,
)
ClusterMoEModel.register_for_auto_class("AutoModel")
ClusterMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")
ClusterMoEForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
ClusterMoEForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
ClusterMoEForQuestionAnswering.register_for_auto_class("AutoModelForQuestionAnswering")
# The Trainer's built-in label smoothing (`label_smoothing_factor`) shifts the labels for the causal LMs named in this
# mapping only (Auto-class registration does not add a name): listed, this one is shifted too, instead of learning to
# predict each token from itself. (As for transformers' MoE models, that loss leaves out the router losses.)
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(ClusterMoEConfig.model_type, ClusterMoEForCausalLM.__name__)

__all__ = [
    "ClusterMoEPreTrainedModel",
    "ClusterMoEModel",
    "ClusterMoEForCausalLM",
    "ClusterMoEForSequenceClassification",
    "ClusterMoEForTokenClassification",
    "ClusterMoEForQuestionAnswering",
]
