"""Instructions per token, counted by valgrind's callgrind: ClusterMoE against the peers, independent of machine load.

`bench_models.py` times medians of interleaved runs; on a shared machine the load still moves them (a whole run at
1.8x the usual times, the same fp32 kernels 10% apart within it). The instructions a workload executes do not move
with the load. They weigh every instruction alike (a cache miss counts as one), so they complement the timings rather
than replace them: on this project's CPU, ClusterMoE's ratios to the peers agreed with the timed ones within 0.03, but
in fp32 training against the dense model they read 0.91 where the timings read 0.79, as the MoE step's extra cost is
mostly memory traffic (docs/benchmarks.md).

Each configuration (model, experts implementation, workload) runs in a process of its own under callgrind, with
instrumentation off while Python, torch and the model start and the workload warms up. The process then switches it
on (`callgrind_control --instr=on`), runs the workload `--repeats` times and exits at once, so the count covers the
workload plus a fixed ~0.2 M instructions of switching on (under 0.1% of one batch-1 `generate`). The workloads and
their inputs are `bench_models.py`'s, on one thread, in float32. Needs valgrind (a system package, not a Python
dependency: e.g. `apt install valgrind`).

    python benchmarks/count_instructions.py                    # decode at batch 1 and 8; ~25 min on 2 cores
    python benchmarks/count_instructions.py --kinds train_fp32 --models ClusterMoE Mixtral --warmup 1 --repeats 1
    python benchmarks/count_instructions.py --kinds decode_b1 --models ClusterMoE Mixtral --implementations sorted_mm
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import config_label, make_workload, tokens_per_run, workload_inputs  # noqa: E402
from common import (  # noqa: E402
    CLUSTERMOE,
    DEFAULT_SHAPE,
    DENSE,
    EXPERTS_IMPLEMENTATIONS,
    MOE_PEERS,
    QUICK_SHAPE,
    build_configs,
    build_model,
    count_at_least,
    default_output_dir,
    prepare_output_dir,
    keep_freed_memory,
    machine_description,
    ratio,
)


KINDS = ("train_fp32", "prefill", "decode_b1", "decode_b8")
KIND_LABELS = {
    "train_fp32": "per trained token, fp32 training step",
    "prefill": "per prompt token, prefill",
    "decode_b1": "per generated token, greedy decode batch 1",
    "decode_b8": "per generated token, greedy decode batch 8",
}
# The fastest implementations of every model in every timed run so far (docs/benchmarks.md); the others can be added.
DEFAULT_IMPLEMENTATIONS = ("grouped_mm", "sorted_mm")
COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def count_in_this_process(name: str, implementation: str | None, kind: str, quick: bool, warmup: int, repeats: int):
    """Run under callgrind (instrumentation off): warm up, switch instrumentation on, run, exit without cleanup."""
    torch.set_num_threads(1)
    keep_freed_memory()
    shape = QUICK_SHAPE if quick else DEFAULT_SHAPE
    model = build_model(name, build_configs(shape)[name], experts_implementation=implementation)
    run = make_workload(kind, model, shape, workload_inputs(kind, shape, torch.device("cpu")))[0]  # holds the model
    for _ in range(warmup):
        run()
    subprocess.run(["callgrind_control", "--instr=on", str(os.getpid())], check=True, capture_output=True)
    for _ in range(repeats):
        run()
    sys.stdout.flush()
    os._exit(0)  # no interpreter shutdown in the count


def count(name: str, implementation: str | None, kind: str, args) -> dict:
    """Instructions per token of one configuration, counted in a child process under callgrind."""
    command = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--callgrind-out-file=/dev/null",
        sys.executable, __file__, "--child", name, implementation or "none", kind,
        "--warmup", str(args.warmup), "--repeats", str(args.repeats), *(["--quick"] if args.quick else []),
    ]  # fmt: skip
    started = time.perf_counter()
    child = subprocess.run(command, capture_output=True, text=True)
    collected = COLLECTED.findall(child.stderr)
    if child.returncode != 0 or not collected:
        raise RuntimeError(
            f"counting {config_label(name, implementation)} ({kind}) failed (exit status {child.returncode}):\n"
            + child.stderr[-3000:]
        )
    shape = QUICK_SHAPE if args.quick else DEFAULT_SHAPE
    instructions = int(collected[-1])
    per_token, seconds = instructions / (args.repeats * tokens_per_run(kind, shape)), time.perf_counter() - started
    print(f"{kind:10s} {config_label(name, implementation):28s} {per_token:>14,.0f} per token ({seconds:.0f} s)")
    return {"instructions": instructions, "per_token": per_token, "seconds": seconds}


def best_configurations(counts: dict, models: list[str]) -> dict:
    """For each kind and model, its implementation with the fewest instructions per token."""
    best = {}
    for kind, entries in counts.items():
        best[kind] = {}
        for name in models:
            fewest = min((entry for entry in entries.values() if entry["model"] == name), key=lambda e: e["per_token"])
            best[kind][name] = {"per_token": fewest["per_token"], "implementation": fewest["implementation"]}
    return best


def summarise(best: dict) -> dict:
    """ClusterMoE's ratios, best peer's (or dense model's) instructions per token over ClusterMoE's: > 1 means
    ClusterMoE executes fewer, as a tokens/s ratio > 1 means it runs faster."""
    summary = {}
    for kind, values in best.items():
        ours = values[CLUSTERMOE]["per_token"]
        peers = {name: values[name]["per_token"] for name in MOE_PEERS if name in values}
        row = {"best_peer": None, "best_peer_implementation": None, "vs_best_peer": None, "vs_dense": None}
        if peers:
            best_peer = min(peers, key=peers.get)
            row.update(
                best_peer=best_peer,
                best_peer_implementation=values[best_peer]["implementation"],
                vs_best_peer=ratio(peers[best_peer], ours),
            )
        if DENSE in values:
            row["vs_dense"] = ratio(values[DENSE]["per_token"], ours)
        summary[kind] = row
    return summary


def markdown(result: dict) -> str:
    shape = result["shape"]
    lines = [
        f"Machine: {result['machine']['description']}; torch {result['machine']['torch']}, transformers "
        f"{result['machine']['transformers']}; 1 thread, float32; instructions counted by valgrind's callgrind over "
        f"{result['repeats']} runs after {result['warmup']} warm-up run(s).",
        f"Shape: hidden {shape['hidden_size']}, {shape['num_layers']} layers, vocab {shape['vocab_size']}, "
        f"{shape['num_clusters'] * shape['experts_per_cluster']} experts, "
        f"{shape['top_k_clusters'] * shape['top_k_experts']} active per token; training batch {shape['train_batch']} x "
        f"{shape['train_seq']}, prefill {shape['prefill_seq']} tokens, decode {shape['decode_tokens']} new tokens "
        f"after {shape['decode_prompt']}.",
        "",
        "Instructions per token (thousands), every configuration counted:",
        "",
        "| configuration | " + " | ".join(KIND_LABELS[kind] for kind in result["counts"]) + " |",
        "|---|" + "---:|" * len(result["counts"]),
    ]
    labels = {label: None for values in result["counts"].values() for label in values}
    for label in labels:
        cells = []
        for values in result["counts"].values():
            cells.append(f"{values[label]['per_token'] / 1e3:,.1f}" if label in values else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "ClusterMoE (in its implementation with the fewest) against the peer with the fewest and the dense model: "
        "their instructions over ClusterMoE's (> 1 means ClusterMoE executes fewer):",
        "",
        "| workload | ClusterMoE | best peer | best peer / ClusterMoE | dense / ClusterMoE |",
        "|---|---|---|---:|---:|",
    ]
    for kind, row in result["summary"].items():
        ours = result["best"][kind][CLUSTERMOE]
        peer = "n/a" if row["best_peer"] is None else f"{row['best_peer']} ({row['best_peer_implementation']})"
        cells = ["n/a" if row[key] is None else f"{row[key]:.3f}" for key in ("vs_best_peer", "vs_dense")]
        lines.append(f"| {KIND_LABELS[kind]} | {ours['implementation']} | {peer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="bench_models.py's quick shape (a test runs it)")
    parser.add_argument(
        "--output-dir", type=Path, help="default: benchmarks/results; --quick, other kinds or models: .../partial"
    )
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=["decode_b1", "decode_b8"])
    parser.add_argument(
        "--models", nargs="+", choices=[CLUSTERMOE, *MOE_PEERS, DENSE], default=[CLUSTERMOE, *MOE_PEERS, DENSE]
    )
    parser.add_argument(
        "--implementations", nargs="+", choices=EXPERTS_IMPLEMENTATIONS, default=list(DEFAULT_IMPLEMENTATIONS),
        help="experts implementations of the MoE models (default: grouped_mm sorted_mm)",
    )  # fmt: skip
    parser.add_argument("--warmup", type=count_at_least(1), default=2, help="uncounted runs first (default 2)")
    parser.add_argument("--repeats", type=count_at_least(1), default=2, help="counted runs (default 2)")
    parser.add_argument("--jobs", type=count_at_least(1), default=os.cpu_count() or 1, help="processes at once")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "IMPLEMENTATION", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is None:
        if CLUSTERMOE not in args.models:
            parser.error(f"--models must include {CLUSTERMOE}: the ratios are ClusterMoE's")
        missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
        if missing:
            parser.error(f"{' and '.join(missing)} not found: install valgrind (e.g. `apt install valgrind`)")
        defaults = {name: parser.get_default(name) for name in ("kinds", "models", "implementations")}
        partial = args.quick or any(set(getattr(args, name)) != set(value) for name, value in defaults.items())
        output_dir = args.output_dir or default_output_dir(torch.device("cpu"), partial)
        args.output_dir = prepare_output_dir(parser, output_dir)
    return args


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    if args.child is not None:
        name, implementation, kind = args.child
        count_in_this_process(
            name, None if implementation == "none" else implementation, kind, args.quick, args.warmup, args.repeats
        )
    configurations = [
        (name, implementation, kind)
        for kind in args.kinds
        for name in args.models
        for implementation in ((None,) if name == DENSE else args.implementations)
    ]
    with ThreadPoolExecutor(args.jobs) as pool:
        entries = list(pool.map(lambda configuration: count(*configuration, args), configurations))
    counts = {kind: {} for kind in args.kinds}
    for (name, implementation, kind), entry in zip(configurations, entries):
        counts[kind][config_label(name, implementation)] = {"model": name, "implementation": implementation, **entry}

    import transformers

    best = best_configurations(counts, args.models)
    result = {
        "benchmark": "instructions",
        "quick": args.quick,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (sys.argv[1:] if argv is None else argv)),
        "machine": {
            "description": machine_description(torch.device("cpu")),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "valgrind": subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip(),
        },
        "shape": (QUICK_SHAPE if args.quick else DEFAULT_SHAPE).to_dict(),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "counts": counts,
        "best": best,
        "summary": summarise(best),
    }
    (args.output_dir / "instructions.json").write_text(json.dumps(result, indent=2))
    (args.output_dir / "instructions.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
