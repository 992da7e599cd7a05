"""Where the time goes: torch profiler self-CPU time per op, side by side, for a training step or a decode token.

Compares ClusterMoE in its default experts implementation (`sorted_mm`), a transformers MoE peer in the same one (so
that both run the same experts kernels) and the dense model, on the default benchmark shape, one thread. Ops are
grouped so that the table reads as a budget: the experts' GEMMs sit inside the `aten::mm` row (with the attention and
LM-head GEMMs), the optimizer in `aten::_fused_adamw_`, and so on.

    python benchmarks/profile_step.py                      # training step (fp32)
    python benchmarks/profile_step.py --dtype bfloat16     # training step, bf16 weights and optimizer state
    python benchmarks/profile_step.py --mode decode        # one decode token (KV cache) at batch 1
    python benchmarks/profile_step.py --mode memory        # a training step's peak memory, by category
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import make_training_steps, workload_inputs  # noqa: E402
from common import CLUSTERMOE, DEFAULT_SHAPE, DENSE, build_configs, build_model, keep_freed_memory  # noqa: E402
from common import EXPERTS_IMPLEMENTATIONS, MOE_PEERS, count_at_least, tensor_bytes  # noqa: E402


def profiled_ms(fn, steps: int) -> tuple[dict[str, float], int]:
    """Self-CPU milliseconds per op averaged over `steps` calls, and the number of aten ops one call runs."""
    totals, calls = {}, 0
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        for event in prof.key_averages():
            totals[event.key] = totals.get(event.key, 0.0) + event.self_cpu_time_total / 1e3 / steps
            calls += event.count if event.key.startswith("aten::") else 0
    return totals, calls // steps


def peak_memory_by_category(fn) -> dict[str, int]:
    """Bytes allocated while `fn` runs and alive at its peak, by the torch profiler's memory categories (activation,
    gradient, autograd_detail, ...). Uses the profiler's memory profile, a private torch API."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    memory = prof._memory_profile()
    live, total, peak, at_peak = {}, 0, 0, {}
    for _, action, (key, _), size in memory.timeline:
        if action == Action.CREATE:
            live[key] = size
            total += size
        elif action == Action.DESTROY:
            total -= live.pop(key, 0)
        if total > peak:
            peak, at_peak = total, dict(live)
    by_category = {}
    for key, size in at_peak.items():
        category = memory._categories.get(key, 0)
        name = "unknown" if category is None else category.name.lower()
        by_category[name] = by_category.get(name, 0) + size
    return by_category


def print_memory_table(columns: dict[str, dict[str, int]]):
    labels = list(columns)
    names = {name for column in columns.values() for name in column}
    categories = sorted(names, key=lambda name: -columns[labels[0]].get(name, 0))
    print("Peak training-step memory (fp32) in KiB: parameters, buffers and optimizer state, then what the step")
    print("allocates and still holds at its peak, by the torch profiler's memory categories.\n")
    print("| | " + " | ".join(labels) + " |")
    print("|---|" + "---:|" * len(labels))
    for name in categories:
        print(f"| {name} | " + " | ".join(f"{columns[label].get(name, 0) / 1024:,.1f}" for label in labels) + " |")
    print("| **total** | " + " | ".join(f"**{sum(columns[label].values()) / 1024:,.1f}**" for label in labels) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("train", "decode", "memory"), default="train")
    parser.add_argument("--peer", choices=MOE_PEERS, default="Qwen3-MoE", help="MoE peer to compare with")
    parser.add_argument(
        "--peer-implementation", choices=EXPERTS_IMPLEMENTATIONS, default="sorted_mm", help="the peer's experts backend"
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="training mode only: the models' dtype"
    )
    parser.add_argument("--steps", type=count_at_least(1), default=5)
    parser.add_argument("--rows", type=count_at_least(1), default=18)
    args = parser.parse_args(argv)
    if args.dtype != "float32" and args.mode != "train":
        parser.error("--dtype applies to --mode train only (decoding and the memory profile run in float32)")
    timing = [name for name in ("steps", "rows") if getattr(args, name) != parser.get_default(name)]
    if args.mode == "memory" and timing:
        parser.error(f"--{timing[0]} applies to the timed modes only (the memory profile is of one step, in full)")
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(1)
    keep_freed_memory()
    shape = DEFAULT_SHAPE
    configs = build_configs(shape)
    inputs = workload_inputs("train_fp32", shape, torch.device("cpu"))  # bench_models.py's training batch and prompt
    batch, prompt = inputs["batch"], inputs["decode_prompt"]
    columns, calls = {}, {}
    for name, implementation in ((CLUSTERMOE, None), (args.peer, args.peer_implementation), (DENSE, None)):
        model = build_model(name, configs[name], dtype=dtype, experts_implementation=implementation)
        label = f"{name} [{model.config._experts_implementation}]" if name != DENSE else name
        if args.mode == "memory":
            (fn,), optimizer = make_training_steps(model, batch)
            fn()  # creates the optimizer state
            state = [t for group in optimizer.state.values() for t in group.values() if isinstance(t, torch.Tensor)]
            resident = tensor_bytes([*model.parameters(), *model.buffers(), *state])
            columns[label] = {"resident (parameters, buffers, optimizer)": resident, **peak_memory_by_category(fn)}
            continue
        if args.mode == "train":
            (fn,), _ = make_training_steps(model, batch)
        else:
            model.eval()
            with torch.no_grad():
                cache = model(input_ids=prompt, use_cache=True).cache
            token = prompt[:, -1:]

            def fn(model=model, cache=cache, token=token):
                with torch.no_grad():
                    model(input_ids=token, cache=cache, use_cache=True)

        for _ in range(2):
            fn()
        columns[label], calls[label] = profiled_ms(fn, args.steps)
    if args.mode == "memory":
        print_memory_table(columns)
        return
    labels = list(columns)
    ops = sorted({op for totals in columns.values() for op in totals}, key=lambda op: -columns[labels[0]].get(op, 0))
    unit = f"ms per training step ({args.dtype})" if args.mode == "train" else "ms per decode token (batch 1, KV cache)"
    print(f"Self-CPU {unit}, torch profiler, mean of {args.steps}, 1 thread.\n")
    print("| op | " + " | ".join(labels) + " |")
    print("|---|" + "---:|" * len(labels))
    for op in ops[: args.rows]:
        print(f"| `{op[:60]}` | " + " | ".join(f"{columns[label].get(op, 0.0):.2f}" for label in labels) + " |")
    rest = [sum(v for op, v in columns[label].items() if op not in ops[: args.rows]) for label in labels]
    print("| (all other ops) | " + " | ".join(f"{value:.2f}" for value in rest) + " |")
    print("| **total** | " + " | ".join(f"**{sum(columns[label].values()):.2f}**" for label in labels) + " |")
    print("| ops called | " + " | ".join(str(calls[label]) for label in labels) + " |")


if __name__ == "__main__":
    main()
