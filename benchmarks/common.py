"""Shared pieces of the benchmarks: matched model shapes, model builders, parameter counts, timing and memory.

Every model is built from a config (random weights, nothing is downloaded). The MoE models share the hidden size,
layers, heads, vocabulary, total experts, active experts per token and expert width; the dense Qwen3 model's MLP is
as wide as the active experts together, so all of them spend the same MLP FLOPs per token. DeepSeek-V3's MLA
attention compresses keys and values to `kv_lora_rank` = 3/4 of the hidden size, which gives it the others' attention
parameters (at hidden / 2 it had 16% fewer).
"""

import argparse
import copy
import ctypes
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DeepseekV3Config, MixtralConfig, OlmoeConfig, Qwen3Config, Qwen3MoeConfig

from clustermoe_hf import ClusterMoEConfig, ClusterMoEForCausalLM


# Every MoE model, ClusterMoE and peers alike, is measured in each of these: transformers' own three, and `sorted_mm`,
# which `clustermoe_hf` registers in transformers' `ExpertsInterface` for any gated, bias-free fused experts module (the
# peers' included: tests/test_benchmarks.py checks it matches `grouped_mm` there). Results compare ClusterMoE with the
# peers in their fastest of all four, and in their fastest of transformers' own (the peers as transformers runs them).
TRANSFORMERS_EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
EXPERTS_IMPLEMENTATIONS = (*TRANSFORMERS_EXPERTS_IMPLEMENTATIONS, "sorted_mm")


@dataclass(frozen=True)
class Shape:
    """The matched architecture and the workload sizes of one benchmark run."""

    hidden_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 1024
    num_clusters: int = 4
    experts_per_cluster: int = 4
    top_k_clusters: int = 1
    top_k_experts: int = 2
    expert_width: int = 256
    train_batch: int = 4
    train_seq: int = 128
    prefill_seq: int = 128
    decode_prompt: int = 16
    decode_tokens: int = 32

    @property
    def num_experts(self) -> int:
        return self.num_clusters * self.experts_per_cluster

    @property
    def experts_per_token(self) -> int:
        return self.top_k_clusters * self.top_k_experts

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_SHAPE = Shape()
QUICK_SHAPE = Shape(
    hidden_size=64, num_heads=2, vocab_size=128, expert_width=64, train_batch=2, train_seq=32, prefill_seq=32,
    decode_prompt=8, decode_tokens=8,
)  # fmt: skip


def factor_at_least(minimum: float) -> Callable[[str], float]:
    """An argparse `type` for a finite number that must be `minimum` or more (see `count_at_least`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value >= minimum or value == float("inf"):  # also refuses NaN
            raise argparse.ArgumentTypeError(f"{text} is not a finite number of at least {minimum}")
        return value

    return parse


def count_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse `type` for a count that must be `minimum` or more, so that a bad value is an error that names it
    rather than a silent default or a crash later."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    return parse


def _common_kwargs(shape: Shape) -> dict:
    return {
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_heads,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "pad_token_id": None,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def build_configs(shape: Shape) -> dict:
    """One config per model, matched as described in the module docstring."""
    common = _common_kwargs(shape)
    num_experts, top_k, width = shape.num_experts, shape.experts_per_token, shape.expert_width
    return {
        "ClusterMoE": ClusterMoEConfig(
            **common,
            head_dim=shape.head_dim,
            intermediate_size=width,
            num_clusters=shape.num_clusters,
            experts_per_cluster=shape.experts_per_cluster,
            top_k_clusters=shape.top_k_clusters,
            top_k_experts=shape.top_k_experts,
        ),
        "Qwen3-MoE": Qwen3MoeConfig(
            **common,
            head_dim=shape.head_dim,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=width,
            intermediate_size=width * top_k,
            norm_topk_prob=True,
        ),
        "Mixtral": MixtralConfig(
            **common,
            head_dim=shape.head_dim,
            num_local_experts=num_experts,
            num_experts_per_tok=top_k,
            intermediate_size=width,
        ),
        "OLMoE": OlmoeConfig(
            **common, num_experts=num_experts, num_experts_per_tok=top_k, intermediate_size=width, norm_topk_prob=True
        ),
        # Group-limited routing (pick top_k_clusters of num_clusters groups, then experts inside them) is DeepSeek-V3's
        # closest analogue of the hierarchical router. Its attention is MLA; head sizes are matched to the others.
        "DeepSeek-V3": DeepseekV3Config(
            **common,
            n_routed_experts=num_experts,
            num_experts_per_tok=top_k,
            n_group=shape.num_clusters,
            topk_group=shape.top_k_clusters,
            moe_intermediate_size=width,
            intermediate_size=width * top_k,
            n_shared_experts=0,
            first_k_dense_replace=0,
            routed_scaling_factor=1.0,
            q_lora_rank=None,
            kv_lora_rank=3 * shape.hidden_size // 4,  # the others' attention parameters (module docstring)
            qk_rope_head_dim=shape.head_dim // 2,
            qk_nope_head_dim=shape.head_dim // 2,
            v_head_dim=shape.head_dim,
            num_mtp_layers=0,
        ),
        "Qwen3 (dense)": Qwen3Config(**common, head_dim=shape.head_dim, intermediate_size=width * top_k),
    }


MOE_PEERS = ("Qwen3-MoE", "Mixtral", "OLMoE", "DeepSeek-V3")
DENSE = "Qwen3 (dense)"
CLUSTERMOE = "ClusterMoE"


def build_model(name: str, config, dtype: torch.dtype = torch.float32, experts_implementation: str | None = None):
    """A randomly initialised causal LM in `dtype`; `experts_implementation` goes through transformers' own switch."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = copy.deepcopy(config)  # `from_config` records the implementations on the config it is given
    kwargs = {"attn_implementation": "sdpa"}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    if name == CLUSTERMOE:
        model = ClusterMoEForCausalLM._from_config(config, **kwargs)
    else:
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.to(dtype)


def parameter_counts(model, shape: Shape) -> dict[str, int]:
    """Total parameters, and those one token uses (the routed experts it does not pick left out)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        gate_up = getattr(module, "gate_up_proj", None)
        if isinstance(gate_up, torch.nn.Parameter) and gate_up.dim() == 3:
            expert_params = gate_up.numel() + module.down_proj.numel()
            inactive += expert_params * (1 - shape.experts_per_token / gate_up.shape[0])
    return {"total": total, "active": round(total - inactive)}


def keep_freed_memory() -> str:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the kernel, and say so.

    By default glibc returns a freed buffer of a few MiB to the kernel (unmapping it, or trimming the top of the
    heap), and the next one of that size faults its pages in again one by one. An MoE training step here frees and
    reallocates expert-gradient-sized buffers (4-8 MiB): 2,500-6,000 page faults per step for the MoE models, none
    for the dense one, and 5-15 ms of a ~110 ms step whose share changed from run to run with the allocation order.
    Caching allocators (jemalloc, tcmalloc, PyTorch's own on GPUs) behave like this setting."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "system malloc"  # not glibc: nothing to set
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters, <malloc.h>
    applied = libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 32 << 20)
    return "glibc malloc, freed memory kept (mallopt)" if applied else "glibc malloc"


def cpu_or_wall_clock(threads: int) -> tuple[str, Callable[[], float]]:
    """Process CPU time when torch runs on one thread: what a dedicated core would measure, and not inflated by other
    processes on a shared machine. Wall-clock time with more threads (CPU time would add the threads up)."""
    return ("process CPU time", time.process_time) if threads == 1 else ("wall-clock time", time.perf_counter)


def device_clock(device: torch.device, threads: int) -> tuple[str, Callable[[], float]]:
    """On a CUDA device, wall-clock time read after synchronising it (its kernels run asynchronously); on the CPU,
    `cpu_or_wall_clock`."""
    if device.type != "cuda":
        return cpu_or_wall_clock(threads)

    def now() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return "wall-clock time, CUDA synchronised", now


def benchmark_device(name: str) -> torch.device:
    """`torch.device(name)`, or a ValueError saying why it cannot run here."""
    try:
        device = torch.device(name)
    except RuntimeError as error:  # e.g. "cuda:x"
        raise ValueError(f"--device {name}: {error}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: the benchmarks run on 'cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch {torch.__version__} sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    return device


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} GPU on a {os.cpu_count()}-core host, {platform.system()}"
    model_name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({model_name}), {platform.system()}"


def default_output_dir(device: torch.device, partial: bool = False) -> Path:
    """benchmarks/results for full CPU runs (what the docs cite), benchmarks/results/cuda for GPU runs, and `partial`
    runs (--quick, or some of the workloads or models) in a `partial` folder inside: none overwrites another."""
    results = Path(__file__).resolve().parent / "results"
    results = results / "cuda" if device.type == "cuda" else results
    return results / "partial" if partial else results


def prepare_output_dir(parser: argparse.ArgumentParser, output_dir: Path) -> Path:
    """Create `output_dir` before anything is measured (a full run takes minutes), or stop naming --output-dir."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--output-dir {output_dir}: {error}")
    if not os.access(output_dir, os.W_OK):
        parser.error(f"--output-dir {output_dir}: not writable")
    return output_dir


def median_times(
    benchmarks: dict[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    clock: Callable[[], float] = time.process_time,
) -> dict[str, dict[str, float]]:
    """Seconds per call of each benchmark, interleaved (A B C A B C ...) so that machine load hits all alike."""
    for _ in range(warmup):
        for fn in benchmarks.values():
            fn()
    samples = {name: [] for name in benchmarks}
    for _ in range(repeats):
        for name, fn in benchmarks.items():
            start = clock()
            fn()
            samples[name].append(clock() - start)
    return {
        name: {"median_s": statistics.median(values), "min_s": min(values), "samples": len(values)}
        for name, values in samples.items()
    }


def tensor_bytes(tensors) -> int:
    """Bytes held by distinct storages among `tensors`."""
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def peak_allocated_bytes(fn: Callable[[], object], device: torch.device = torch.device("cpu")) -> int:
    """Highest net tensor memory allocated while `fn` runs, in the bytes the tensors asked for: on a CUDA device from
    its allocator's statistics (requested bytes: the allocated ones are rounded up to 512-byte blocks, which would
    count a model's many small tensors at up to 512 bytes more each), on the CPU from the profiler's allocation events
    (CPU tensors have no allocator statistics; process RSS would also count the allocator's caching and the
    interpreter)."""
    if device.type == "cuda":
        # cudaMallocAsync (PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync) keeps no requested-bytes statistics
        counted = "requested_bytes" if torch.cuda.get_allocator_backend() == "native" else "allocated_bytes"
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_stats(device)[f"{counted}.all.current"]
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.memory_stats(device)[f"{counted}.all.peak"] - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def ratio(value: float, reference: float) -> float:
    return value / reference if reference and not math.isnan(reference) else float("nan")
