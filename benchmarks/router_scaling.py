"""Routing time alone for N = 16 ... 4096 experts, hierarchical vs flat, next to the expert compute it serves.

Each N has sqrt(N) clusters of sqrt(N) experts; a token picks 1 cluster and 2 experts in it. The router's forward
(eval mode, no gradient) is timed for both implementations, interleaved, and so is the fused experts call that
serves the routed (token, expert) pairs. The smallest N from which the hierarchical router is faster is what
`HIERARCHICAL_ROUTER_MIN_EXPERTS` in `clustermoe_hf/modeling_clustermoe.py` should be.

Decoding's forwards hold a few tokens, for which the hierarchical router gathers the chosen clusters' rows instead of
grouping the tokens by cluster: the routers are also timed alone at 1, 8 and 64 tokens, with the implementation that
`router_implementation="auto"` runs at each N.

    python benchmarks/router_scaling.py                # full sweep, writes benchmarks/results/router_scaling.*
    python benchmarks/router_scaling.py --quick        # small sizes, about 10 s
"""

import argparse
import copy
import json
import math
import platform
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    benchmark_device,
    count_at_least,
    default_output_dir,
    device_clock,
    keep_freed_memory,
    machine_description,
    median_times,
    prepare_output_dir,
    ratio,
)

from clustermoe_hf import ClusterMoEConfig  # noqa: E402
from clustermoe_hf.modeling_clustermoe import (  # noqa: E402
    HIERARCHICAL_ROUTER_MIN_EXPERTS,
    ClusterMoEExperts,
    ClusterMoERouter,
)


EXPERT_COUNTS = (16, 64, 256, 1024, 4096)
SMALL_FORWARD_TOKENS = (1, 8, 64)  # decoding's forwards


def build_router(config: ClusterMoEConfig, implementation: str) -> ClusterMoERouter:
    config = copy.deepcopy(config)
    config.router_implementation = implementation
    torch.manual_seed(0)
    router = ClusterMoERouter(config)
    torch.nn.init.normal_(router.cluster_weight, std=config.initializer_range)
    torch.nn.init.normal_(router.expert_weight, std=config.initializer_range)
    return router.eval()


def sweep_config(num_experts: int, hidden_size: int, expert_width: int) -> ClusterMoEConfig:
    side = math.isqrt(num_experts)
    return ClusterMoEConfig(
        vocab_size=32, hidden_size=hidden_size, intermediate_size=expert_width, num_hidden_layers=1,
        num_attention_heads=1, num_clusters=side, experts_per_cluster=side, top_k_clusters=1, top_k_experts=2,
    )  # fmt: skip


def time_routers(routers: dict, hidden_states: torch.Tensor, warmup: int, repeats: int, clock) -> dict[str, float]:
    """Median ms per call of each router (eval, no gradient) on `hidden_states`, interleaved."""

    def route(router):
        def run():
            with torch.no_grad():
                router(hidden_states)

        return run

    times = median_times({name: route(router) for name, router in routers.items()}, warmup, repeats, clock)
    return {name: value["median_s"] * 1e3 for name, value in times.items()}


def measure_small_forwards(num_experts, hidden_size, warmup, repeats, clock, device, dtype) -> list[dict]:
    """Both routers at decoding's forward sizes, and which one `router_implementation="auto"` runs there."""
    config = sweep_config(num_experts, hidden_size, expert_width=hidden_size)
    routers = {name: build_router(config, name).to(device, dtype) for name in ("hierarchical", "flat")}
    auto = "hierarchical" if build_router(config, "auto").hierarchical else "flat"
    rows = []
    for tokens in SMALL_FORWARD_TOKENS:
        hidden_states = torch.randn(tokens, hidden_size, device=device, dtype=dtype)
        medians = time_routers(routers, hidden_states, warmup, repeats, clock)
        rows.append({
            "num_experts": num_experts,
            "tokens": tokens,
            "hierarchical_ms": medians["hierarchical"],
            "flat_ms": medians["flat"],
            "hierarchical_over_flat": ratio(medians["hierarchical"], medians["flat"]),
            "auto": auto,
        })  # fmt: skip
    return rows


def measure(num_experts, tokens, hidden_size, expert_width, warmup, repeats, clock, device, dtype) -> dict:
    side = math.isqrt(num_experts)
    config = sweep_config(num_experts, hidden_size, expert_width)
    routers = {name: build_router(config, name).to(device, dtype) for name in ("hierarchical", "flat")}
    hidden_states = torch.randn(tokens, hidden_size, device=device, dtype=dtype)
    with torch.no_grad():
        routing = routers["flat"](hidden_states)
        hierarchical_routing = routers["hierarchical"](hidden_states)
    cluster_index, candidates = routing.cluster_index, routing.expert_candidates
    same_routing = torch.equal(hierarchical_routing.cluster_index, cluster_index) and torch.equal(
        hierarchical_routing.expert_candidates, candidates
    )
    top_k_index = (cluster_index.unsqueeze(-1) * side + candidates).view(tokens, -1)
    top_k_weights = torch.full(top_k_index.shape, 0.5, device=device, dtype=dtype)
    experts = ClusterMoEExperts(config)  # the model's default experts implementation, `config` went through no model
    experts.config._experts_implementation = "sorted_mm"
    torch.nn.init.normal_(experts.gate_up_proj, std=0.02)
    torch.nn.init.normal_(experts.down_proj, std=0.02)
    experts.to(device, dtype)

    def serve(hidden_states):
        return experts(hidden_states, top_k_index, top_k_weights)

    medians = time_routers({**routers, "experts": serve}, hidden_states, warmup, repeats, clock)
    return {
        "num_experts": num_experts,
        "num_clusters": side,
        "experts_per_cluster": side,
        "hierarchical_ms": medians["hierarchical"],
        "flat_ms": medians["flat"],
        "experts_ms": medians["experts"],
        "hierarchical_over_flat": ratio(medians["hierarchical"], medians["flat"]),
        "same_routing": same_routing,
    }


def write_outputs(result: dict, output_dir: Path, plot: bool) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "router_scaling.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"Tokens: {result['tokens']}, hidden size {result['hidden_size']}, expert width {result['expert_width']}, "
        f"top-1 cluster x top-2 experts, {result['dtype']}; router forward, medians of {result['repeats']} interleaved "
        f"runs ({result['machine']['description']}, {result['threads']} thread(s), {result['clock']}).",
        "",
        "| experts N | clusters x experts | hierarchical (ms) | flat (ms) | hierarchical / flat "
        "| experts served (ms) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['num_experts']} | {row['num_clusters']} x {row['experts_per_cluster']} | "
            f"{row['hierarchical_ms']:.3f} | {row['flat_ms']:.3f} | {row['hierarchical_over_flat']:.2f} | "
            f"{row['experts_ms']:.3f} |"
        )
    lines += ["", f"Hierarchical faster from N = {result['crossover_num_experts']} experts on."]
    lines += [
        "",
        f"Routers alone at decoding's forward sizes, medians of {result['small_forward_repeats']} interleaved runs; "
        "`auto`: the router `router_implementation=\"auto\"` runs at that N.",
        "",
        "| experts N | tokens | hierarchical (ms) | flat (ms) | hierarchical / flat | auto |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["small_forwards"]:
        lines.append(
            f"| {row['num_experts']} | {row['tokens']} | {row['hierarchical_ms']:.4f} | {row['flat_ms']:.4f} | "
            f"{row['hierarchical_over_flat']:.2f} | {row['auto']} |"
        )
    (output_dir / "router_scaling.md").write_text("\n".join(lines) + "\n")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = result["rows"]
        counts = [row["num_experts"] for row in rows]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(counts, [row["hierarchical_ms"] for row in rows], "o-", label="hierarchical router")
        ax.plot(counts, [row["flat_ms"] for row in rows], "s-", label="flat router")
        ax.plot(counts, [row["experts_ms"] for row in rows], "^--", label="experts it serves (sorted_mm)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("experts N (sqrt(N) clusters x sqrt(N) experts)")
        ax.set_ylabel(f"ms per forward, {result['tokens']} tokens")
        ax.set_title("Routing time vs number of experts")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(output_dir / "router_scaling.png", dpi=120)
        plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for CI (about 10 s)")
    parser.add_argument(
        "--output-dir", type=Path, help="default: benchmarks/results, with --device cuda .../cuda; --quick: .../partial"
    )
    parser.add_argument(
        "--threads", type=count_at_least(1), default=1, help="torch intra-op threads (default 1, see README)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), help="default: float32 on the CPU, bfloat16 (fast kernels) on CUDA"
    )
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    try:
        device = benchmark_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    args.output_dir = prepare_output_dir(parser, args.output_dir or default_output_dir(device, partial=args.quick))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    tokens, hidden_size, expert_width, warmup, repeats = (256, 64, 32, 1, 5) if args.quick else (2048, 256, 64, 3, 15)
    clock_name, clock = device_clock(device, args.threads)
    rows = [
        measure(n, tokens, hidden_size, expert_width, warmup, repeats, clock, device, dtype) for n in EXPERT_COUNTS
    ]
    small_forward_repeats = 20 if args.quick else 200
    small_forwards = [
        row
        for n in EXPERT_COUNTS
        for row in measure_small_forwards(n, hidden_size, warmup, small_forward_repeats, clock, device, dtype)
    ]
    faster = [row["num_experts"] for row in rows if row["hierarchical_ms"] < row["flat_ms"]]
    # The crossover is the smallest N from which the hierarchical router stays faster.
    crossover = next((n for n in faster if all(m in faster for m in EXPERT_COUNTS if m >= n)), None)
    result = {
        "benchmark": "router_scaling",
        "quick": args.quick,
        "tokens": tokens,
        "hidden_size": hidden_size,
        "expert_width": expert_width,
        "repeats": repeats,
        "threads": args.threads,
        "clock": clock_name,
        "machine": {
            "description": machine_description(device), "platform": platform.platform(), "torch": torch.__version__
        },
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "rows": rows,
        "crossover_num_experts": crossover,
        "small_forward_repeats": small_forward_repeats,
        "small_forwards": small_forwards,
        "hierarchical_router_min_experts": HIERARCHICAL_ROUTER_MIN_EXPERTS,
    }
    write_outputs(result, args.output_dir, plot=not args.no_plot)
    print((args.output_dir / "router_scaling.md").read_text())
    return result


if __name__ == "__main__":
    main()
