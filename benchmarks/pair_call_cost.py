"""What ClusterMoE's per-pair experts call costs next to a direct weighted call.

In training with reliability routing, `ClusterMoESparseMoeBlock` runs the fused experts once over all (token, expert)
pairs, unweighted (inputs repeated per pair, one expert per row, unit weights), so that each pair's output can be
health-checked before the weighted combine. When no pair is excluded (no padding, no capacity limit), it makes one
weighted call over the tokens instead without reliability routing, and in inference on CPU while every output is
finite. This times both, on the
default benchmark shape (fp32, where ClusterMoE's default `sorted_mm` is transformers' `grouped_mm`), forward +
backward and forward only; and the training forwards' health check itself (`_faulty_experts` plus masking, and its
CPU shortcut), timed without gradients so that only the check counts.

It also times an inference experts call over a handful of pairs (decoding), `grouped_mm` against the per-pair path of
`sorted_mm`, which sets `PER_PAIR_MAX_PAIRS`.

    python benchmarks/pair_call_cost.py
"""

import argparse
import copy
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CLUSTERMOE, DEFAULT_SHAPE, build_configs, count_at_least, keep_freed_memory, median_times  # noqa: E402

from transformers.integrations.moe import grouped_mm_experts_forward  # noqa: E402

from clustermoe_hf.modeling_clustermoe import (  # noqa: E402
    PER_PAIR_MAX_PAIRS,
    ClusterMoESparseMoeBlock,
    _per_pair_experts_forward,
)


def few_pairs_table(experts, hidden_size: int, repeats: int, calls: int = 100) -> list[dict]:
    """Microseconds per inference experts call over S pairs, one expert per row (ClusterMoE's per-pair call)."""
    generator = torch.Generator().manual_seed(0)
    runs = {}
    for num_pairs in (1, 2, 3, 4, 5, 6, 8, 16):
        hidden = torch.randn(num_pairs, hidden_size, generator=generator)
        index = torch.randint(0, experts.num_experts, (num_pairs, 1), generator=generator)
        ones = hidden.new_ones(num_pairs, 1)
        for name, forward in (("grouped_mm", grouped_mm_experts_forward), ("per pair", _per_pair_experts_forward)):
            runs[(num_pairs, name)] = lambda f=forward, h=hidden, i=index, w=ones: [
                f(experts, h, i, w) for _ in range(calls)
            ]
    with torch.no_grad():
        times = median_times(runs, warmup=2, repeats=repeats)
    return [
        {
            "pairs": num_pairs,
            "grouped_mm_us": times[(num_pairs, "grouped_mm")]["median_s"] / calls * 1e6,
            "per_pair_us": times[(num_pairs, "per pair")]["median_s"] / calls * 1e6,
        }
        for num_pairs in sorted({pairs for pairs, _ in runs})
    ]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=count_at_least(1), default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    keep_freed_memory()
    shape = DEFAULT_SHAPE
    config = build_configs(shape)[CLUSTERMOE]
    num_tokens = shape.train_batch * shape.train_seq
    torch.manual_seed(0)
    hidden = torch.randn(num_tokens, shape.hidden_size)
    top_k_index = torch.stack(
        [torch.randperm(shape.num_experts)[: shape.experts_per_token] for _ in range(num_tokens)]
    )
    weights = torch.rand(num_tokens, shape.experts_per_token)
    pair_ids = top_k_index.reshape(-1)
    pair_outputs = torch.randn(pair_ids.shape[0], shape.hidden_size)
    served = torch.ones_like(pair_ids, dtype=torch.bool)

    block_config = copy.deepcopy(config)
    block_config._experts_implementation = "grouped_mm"
    block = ClusterMoESparseMoeBlock(block_config)
    for weight in block.parameters():
        torch.nn.init.normal_(weight, std=0.02)
    experts = block.experts

    def direct(grad):
        with torch.set_grad_enabled(grad):
            inputs = hidden.clone().requires_grad_(grad)
            out = experts(inputs, top_k_index, weights)
            if grad:
                out.sum().backward()

    def per_pair(grad):
        with torch.set_grad_enabled(grad):
            inputs = hidden.clone().requires_grad_(grad)
            pair_inputs = inputs.repeat_interleave(shape.experts_per_token, dim=0)
            pair_out = experts(pair_inputs, pair_ids[:, None], pair_inputs.new_ones(pair_ids.shape[0], 1))
            out = (pair_out.view(num_tokens, -1, shape.hidden_size) * weights.unsqueeze(-1)).sum(1)
            if grad:
                out.sum().backward()

    def health_check(full: bool):
        if full:  # turn off the CPU shortcut that skips the check for outputs whose norms are all close
            block._all_pairs_healthy = lambda norms, valid: False
        try:
            with torch.no_grad():
                faulty = block._faulty_experts(pair_outputs, pair_ids, served)
                if faulty is not None:
                    pair_outputs.masked_fill(faulty[pair_ids][:, None], 0.0)
        finally:
            block.__dict__.pop("_all_pairs_healthy", None)

    runs = {
        ("forward", "health check + masking"): lambda: health_check(full=True),
        ("forward", "health check, CPU shortcut"): lambda: health_check(full=False),
    }
    for grad in (True, False):
        mode = "forward+backward" if grad else "forward"
        runs[(mode, "direct weighted call")] = lambda g=grad: direct(g)
        runs[(mode, "per-pair call + combine")] = lambda g=grad: per_pair(g)

    times = median_times(runs, warmup=3, repeats=args.repeats)
    rows = [
        {"mode": mode, "variant": variant, "ms": value["median_s"] * 1e3} for (mode, variant), value in times.items()
    ]
    print(f"{num_tokens} tokens x {shape.experts_per_token} experts, hidden {shape.hidden_size}, expert width "
          f"{shape.expert_width}, grouped_mm; medians of {args.repeats} interleaved runs, 1 thread.\n")  # fmt: skip
    print("| mode | direct weighted call (ms) | per-pair call + combine (ms) | overhead |")
    print("|---|---:|---:|---:|")
    for mode in ("forward+backward", "forward"):
        direct_ms = times[(mode, "direct weighted call")]["median_s"] * 1e3
        pair_ms = times[(mode, "per-pair call + combine")]["median_s"] * 1e3
        print(f"| {mode} | {direct_ms:.2f} | {pair_ms:.2f} | {pair_ms / direct_ms - 1:+.0%} |")
    health_ms = times[("forward", "health check + masking")]["median_s"] * 1e3
    shortcut_ms = times[("forward", "health check, CPU shortcut")]["median_s"] * 1e3
    print(f"\nHealth check + masking: {health_ms:.2f} ms; CPU shortcut (all norms within half the max ratio, nothing")
    print(f"to check or mask): {shortcut_ms:.2f} ms")

    few_pairs = few_pairs_table(experts, shape.hidden_size, args.repeats)
    print("\nInference experts call over a few pairs, us per call ", end="")
    print(f"(sorted_mm runs up to PER_PAIR_MAX_PAIRS = {PER_PAIR_MAX_PAIRS} pairs one by one):\n")
    print("| pairs | grouped_mm | per pair | per pair / grouped_mm |")
    print("|---:|---:|---:|---:|")
    for row in few_pairs:
        ratio = row["per_pair_us"] / row["grouped_mm_us"]
        print(f"| {row['pairs']} | {row['grouped_mm_us']:.0f} | {row['per_pair_us']:.0f} | {ratio:.2f} |")
    return {"rows": rows, "few_pairs": few_pairs}


if __name__ == "__main__":
    main()
