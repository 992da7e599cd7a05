"""ClusterMoE against transformers' Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3 and a dense Qwen3, on matched shapes.

Every model is built from a config (nothing is downloaded) with the same hidden size, layers, heads, vocabulary, total
experts, active experts per token and expert width; the dense model's MLP is as wide as the active experts together.
Each MoE model, ClusterMoE and peers alike, runs in the same experts implementations: transformers' eager, grouped_mm
and batched_mm, and the `sorted_mm` that `clustermoe_hf` registers for every fused experts module. ClusterMoE (in its
fastest) is compared with each peer in its fastest of all four, which measures the models on equal kernels, and in its
fastest of transformers' three, the peers as transformers runs them. Measured, all configurations interleaved in one
run, after warm-up, as medians:

- training tokens/s (forward + backward + fused AdamW step) in fp32 and in bf16 (bf16 weights and optimizer state);
- prefill latency (one sequence, fp32, no gradient) and greedy decode tokens/s with the KV cache at batch 1 and 8;
- peak training memory (fp32): parameters and optimizer state plus the highest tensor memory allocated in a step.

    python benchmarks/bench_models.py            # default (tiny) shape, writes benchmarks/results/models.{json,md,png}
    python benchmarks/bench_models.py --quick    # smaller shape and fewer repeats, about a minute (CI)

Timing uses the process CPU time when torch runs on one thread (the default): it is what a dedicated core would
measure, and other processes on a shared machine do not inflate it. With `--threads N > 1`, wall-clock time. With
`--device cuda`, every model runs on the GPU (CUDA kernels; `sorted_mm` is transformers' `grouped_mm` there), timed by
wall clock with the device synchronised, and peak memory comes from the CUDA allocator's statistics.
"""

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CLUSTERMOE,
    DEFAULT_SHAPE,
    DENSE,
    EXPERTS_IMPLEMENTATIONS,
    MOE_PEERS,
    QUICK_SHAPE,
    TRANSFORMERS_EXPERTS_IMPLEMENTATIONS,
    Shape,
    benchmark_device,
    build_configs,
    build_model,
    count_at_least,
    factor_at_least,
    default_output_dir,
    device_clock,
    keep_freed_memory,
    machine_description,
    parameter_counts,
    peak_allocated_bytes,
    prepare_output_dir,
    ratio,
    tensor_bytes,
)


KINDS = ("train_fp32", "train_bf16", "prefill", "decode_b1", "decode_b8")
KIND_LABELS = {
    "train_fp32": "training tokens/s, fp32",
    "train_bf16": "training tokens/s, bf16",
    "prefill": "prefill latency (ms)",
    "decode_b1": "greedy decode tokens/s, batch 1",
    "decode_b8": "greedy decode tokens/s, batch 8",
    "memory": "peak training memory (MiB), fp32",
}
HIGHER_IS_BETTER = {"train_fp32": True, "train_bf16": True, "prefill": False, "decode_b1": True, "decode_b8": True}


def experts_implementations(name: str) -> tuple:
    """The same candidates for every MoE model, so that each is compared in its fastest setting; none for the dense
    model, which has no experts."""
    return (None,) if name == DENSE else EXPERTS_IMPLEMENTATIONS


def config_label(name: str, implementation: str | None) -> str:
    return name if implementation is None else f"{name} [{implementation}]"


# The models that add their load-balancing loss only when asked for the router logits. ClusterMoE computes its own in
# every training forward, and DeepSeek-V3 balances without one: asking them would only record logits nothing uses.
ROUTER_LOSS_NEEDS_LOGITS = frozenset({"qwen3_moe", "mixtral", "olmoe"})


def training_forward(model, batch: torch.Tensor):
    """The training forward, whose loss includes each model's own auxiliary router losses."""
    router_losses = {"output_router_logits": True} if model.config.model_type in ROUTER_LOSS_NEEDS_LOGITS else {}
    return model(input_ids=batch, labels=batch, **router_losses)


def make_training_steps(model, *batches: torch.Tensor):
    """One training step function per batch, all on the same model and optimizer."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step_on(batch):
        def step():
            loss = training_forward(model, batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    return [step_on(batch) for batch in batches], optimizer


def make_prefill(model, prompt: torch.Tensor):
    model.eval()

    def run():
        with torch.no_grad():
            model(input_ids=prompt, use_cache=True)

    return run


def make_decode(model, prompt: torch.Tensor, new_tokens: int):
    model.eval()

    def run():
        with torch.no_grad():
            model.generate(
                prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
            )

    return run


class Clock:
    def __init__(self, threads: int, device: torch.device):
        self.name, self.now = device_clock(device, threads)

    def time(self, fn) -> float:
        start = self.now()
        fn()
        return self.now() - start


def interleaved(
    runs: dict, clock: Clock, warmup: int, repeats: int, slow_factor: float, probes: dict, groups: dict
) -> dict:
    """Time each configuration's probe (a smaller workload, or the run itself) once, after an untimed call (the first
    call of a process or of a kernel pays one-off setup), and leave out those more than `slow_factor` times slower
    than the fastest of their group (the same model's other experts implementations); warm the rest up, then time
    them interleaved (A B C A B C ...) and keep medians."""
    for label in runs:
        probes[label]()
    probe_times = {label: clock.time(probes[label]) for label in runs}
    fastest = {}
    for label, seconds in probe_times.items():
        fastest[groups[label]] = min(seconds, fastest.get(groups[label], seconds))
    kept = {label: fn for label, fn in runs.items() if probe_times[label] <= slow_factor * fastest[groups[label]]}
    for _ in range(warmup):
        for fn in kept.values():
            fn()
    samples = {label: [] for label in kept}
    for _ in range(repeats):
        for label, fn in kept.items():
            samples[label].append(clock.time(fn))
    result = {}
    for label in runs:
        if label in kept:
            values = samples[label]
            result[label] = {"median_s": statistics.median(values), "min_s": min(values), "samples": len(values)}
        else:
            result[label] = {"excluded": True, "probe_s": probe_times[label]}
    return result


DECODE_BATCH = {"decode_b1": 1, "decode_b8": 8}


def workload_inputs(kind: str, shape: Shape, device: torch.device) -> dict[str, torch.Tensor]:
    """The token ids of `kind`'s workload, drawn from one seeded generator: the same for every model and script."""
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(3, shape.vocab_size, (shape.train_batch, shape.train_seq), generator=generator)
    prompt = torch.randint(3, shape.vocab_size, (1, shape.prefill_seq), generator=generator)
    decode_shape = (DECODE_BATCH.get(kind, 1), shape.decode_prompt)
    decode_prompt = torch.randint(3, shape.vocab_size, decode_shape, generator=generator)
    probe_batch = batch[:1, : shape.train_seq // 2]
    inputs = {"batch": batch, "probe_batch": probe_batch, "prompt": prompt, "decode_prompt": decode_prompt}
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def make_workload(kind: str, model, shape: Shape, inputs: dict[str, torch.Tensor]) -> tuple:
    """`(run, probe, keep_alive)`: the workload `kind` runs on `model`, a smaller one that screens out far slower
    configurations cheaply (the run itself where that is cheap already), and what they need kept alive."""
    if kind.startswith("train"):
        (run, probe), optimizer = make_training_steps(model, inputs["batch"], inputs["probe_batch"])
        return run, probe, (model, optimizer)
    if kind == "prefill":
        run = make_prefill(model, inputs["prompt"])
    else:
        run = make_decode(model, inputs["decode_prompt"], shape.decode_tokens)
    return run, run, (model,)


def tokens_per_run(kind: str, shape: Shape) -> int:
    """The tokens one run of `kind` trains on, reads (prefill) or generates."""
    if kind.startswith("train"):
        return shape.train_batch * shape.train_seq
    if kind == "prefill":
        return shape.prefill_seq
    return DECODE_BATCH[kind] * shape.decode_tokens


def measure_kind(
    kind: str,
    shape: Shape,
    configs: dict,
    clock: Clock,
    warmup: int,
    repeats: int,
    slow_factor: float,
    device: torch.device,
):
    dtype = torch.bfloat16 if kind == "train_bf16" else torch.float32
    inputs = workload_inputs(kind, shape, device)
    runs, probes, groups, keep_alive = {}, {}, {}, []
    for name, config in configs.items():
        for implementation in experts_implementations(name):
            label = config_label(name, implementation)
            groups[label] = name
            model = build_model(name, config, dtype=dtype, experts_implementation=implementation).to(device)
            runs[label], probes[label], alive = make_workload(kind, model, shape, inputs)
            keep_alive.append(alive)
    times = interleaved(runs, clock, warmup, repeats, slow_factor, probes, groups)
    work = tokens_per_run(kind, shape)
    for value in times.values():
        if "median_s" in value:
            value["value"] = value["median_s"] * 1e3 if kind == "prefill" else work / value["median_s"]
    del runs, probes, keep_alive
    gc.collect()
    return times


def measure_memory(shape: Shape, configs: dict, training_times: dict, device: torch.device) -> dict:
    """Peak training memory of every configuration that was fast enough to be timed, fp32."""
    batch = workload_inputs("train_fp32", shape, device)["batch"]  # the batch training was timed on
    result = {}
    for name, config in configs.items():
        for implementation in experts_implementations(name):
            label = config_label(name, implementation)
            if training_times[label].get("excluded"):
                result[label] = {"excluded": True}
                continue
            model = build_model(name, config, experts_implementation=implementation).to(device)
            (step,), optimizer = make_training_steps(model, batch)
            step()  # creates the optimizer state
            resident = tensor_bytes(list(model.parameters()) + list(model.buffers())) + tensor_bytes(
                t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)
            )
            peak = resident + peak_allocated_bytes(step, device)
            result[label] = {"value": peak / 2**20, "resident_MiB": resident / 2**20}
            del model, step, optimizer
            gc.collect()
    return result


def best_configurations(measurements: dict, configs: dict, peer_implementations=EXPERTS_IMPLEMENTATIONS) -> dict:
    """For each kind and model, the fastest (or leanest) of its experts implementations; for the MoE peers, of
    `peer_implementations` only."""
    best = {}
    for kind, values in measurements.items():
        higher = HIGHER_IS_BETTER.get(kind, False)
        best[kind] = {}
        for name in configs:
            allowed = peer_implementations if name in MOE_PEERS else experts_implementations(name)
            candidates = [
                (values[config_label(name, impl)]["value"], impl)
                for impl in allowed
                if "value" in values[config_label(name, impl)]
            ]
            if kind == "memory" and name in best["train_fp32"]:  # compared in the configuration that trains fastest
                fastest = best["train_fp32"][name]["implementation"]
                candidates = [c for c in candidates if c[1] == fastest] or candidates
            if not candidates:  # all left out as too slow next to a backend this comparison does not allow
                continue
            # The best of several noisy medians favours a model with more candidates (on most paths `sorted_mm` runs
            # `grouped_mm`, a second draw of the same kernel): every MoE model has the same candidates, so the same
            # number of draws.
            value, impl = (max if higher else min)(candidates)
            best[kind][name] = {"value": value, "implementation": impl}
    return best


def summarise(best: dict) -> dict:
    """ClusterMoE's ratios to the best MoE peer and to the dense model (> 1 is better for ClusterMoE)."""
    summary = {}
    for kind, values in best.items():
        higher = HIGHER_IS_BETTER.get(kind, False)
        peers = {name: values[name]["value"] for name in MOE_PEERS if name in values}
        ours, dense = values[CLUSTERMOE]["value"], values[DENSE]["value"]
        orient = (lambda a, b: ratio(a, b)) if higher else (lambda a, b: ratio(b, a))
        summary[kind] = {"best_peer": None, "best_peer_implementation": None, "vs_best_peer": None}
        if peers:  # none when every peer's allowed configurations were left out as too slow
            best_peer = (max if higher else min)(peers, key=peers.get)
            summary[kind].update(
                best_peer=best_peer,
                best_peer_implementation=values[best_peer]["implementation"],
                vs_best_peer=orient(ours, peers[best_peer]),
            )
        summary[kind]["vs_dense"] = orient(ours, dense)
    return summary


def check_targets(summary: dict, best: dict, router: dict | None) -> list:
    def target(name: str, value: float | None, threshold: float, **details) -> dict:
        """`met` is None where there is nothing to compare with (no peer left in the comparison)."""
        met = None if value is None else value >= threshold
        return {"target": name, "value": value, "threshold": threshold, "met": met, **details}

    def compared(kind: str, other: str | None) -> dict:
        """The configurations a ratio compares, so that a win of one experts kernel over another shows in the table."""
        if other is None:
            return {}
        labels = []
        for name in (CLUSTERMOE, other):
            implementation = best.get(kind, {}).get(name, {}).get("implementation")
            labels.append(name if implementation is None else f"{name} [{implementation}]")
        return {"compared": tuple(labels)}

    targets = []
    for kind in ("train_fp32", "train_bf16"):
        peer = summary[kind]["best_peer"]
        targets.append(
            target(f"{kind}: >= 1.15x fastest MoE peer", summary[kind]["vs_best_peer"], 1.15, **compared(kind, peer))
        )
        targets.append(target(f"{kind}: >= 0.9x dense", summary[kind]["vs_dense"], 0.9, **compared(kind, DENSE)))
    for kind in ("decode_b1", "decode_b8"):
        peer = summary[kind]["best_peer"]
        targets.append(
            target(f"{kind}: >= 1.0x fastest MoE peer", summary[kind]["vs_best_peer"], 1.0, **compared(kind, peer))
        )
    # A leanness ratio near 1 hides how many bytes decide it: also the best peer's peak minus ClusterMoE's (> 0:
    # ClusterMoE is leaner).
    memory = best["memory"]
    best_peer = summary["memory"]["best_peer"]
    margin_kib = None if best_peer is None else (memory[best_peer]["value"] - memory[CLUSTERMOE]["value"]) * 1024
    targets.append(
        target(
            "peak training memory <= best peer's (leanness ratio >= 1)",
            summary["memory"]["vs_best_peer"],
            1.0,
            margin_KiB=margin_kib,
            **compared("memory", best_peer),
        )
    )
    if router is not None:
        last = router["rows"][-1]
        # Expressed as flat / hierarchical so that, like the others, larger is better: <= 0.3x means >= 3.33.
        targets.append(
            target(
                f"router N={last['num_experts']}: flat / hierarchical >= 3.33 (hierarchical <= 0.3x flat)",
                1 / last["hierarchical_over_flat"],
                1 / 0.3,
            )
        )
    return targets


def decisive_digits(targets: list) -> int:
    """How many decimals the targets' values and threshold need, 3 or more, so that every printed value compares with
    the printed threshold as the verdict says (0.9996 against 1 is not met, yet both read 1.000)."""
    for digits in range(3, 18):
        rounded = lambda number: float(f"{number:.{digits}f}")  # noqa: E731
        if all((rounded(t["value"]) >= rounded(t["threshold"])) == t["met"] for t in targets if t["met"] is not None):
            return digits
    return 17


def targets_markdown(targets: list, targets_in_transformers_backends: list) -> list[str]:
    """One row per target: its value and verdict with the peers in every backend, then in transformers' own."""
    lines = [
        "| target | threshold | peers in every backend | met | peers in transformers' backends | met |",
        "|---|---:|---:|---|---:|---|",
    ]
    for target, other in zip(targets, targets_in_transformers_backends):
        digits = decisive_digits([target, other])
        cells = []
        for entry in (target, other):
            if entry["met"] is None:
                cells += ["n/a (no peer)", "n/a"]
                continue
            notes = []
            if "compared" in entry:
                notes.append("{} / {}".format(*entry["compared"]))
            if "margin_KiB" in entry:
                margin = entry["margin_KiB"]
                notes.append(f"ClusterMoE {abs(margin):,.1f} KiB {'leaner' if margin >= 0 else 'heavier'}")
            value = f"{entry['value']:.{digits}f}" + (f" ({'; '.join(notes)})" if notes else "")
            cells += [value, "yes" if entry["met"] else "no"]
        lines.append(f"| {target['target']} | {target['threshold']:.{digits}f} | " + " | ".join(cells) + " |")
    return lines


def _ratio_cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _peer_cell(row: dict) -> str:
    return "n/a (no peer)" if row["best_peer"] is None else f"{row['best_peer']} ({row['best_peer_implementation']})"


def markdown(result: dict) -> str:
    shape, best, summary = result["shape"], result["best"], result["summary"]
    names = list(result["parameters"])
    lines = [
        f"Machine: {result['machine']['description']}; torch {result['machine']['torch']}, transformers "
        f"{result['machine']['transformers']}; {result['threads']} thread(s), {result['clock']}; "
        f"{result['allocator']}.",
        f"Shape: hidden {shape['hidden_size']}, {shape['num_layers']} layers, {shape['num_heads']} heads, vocab "
        f"{shape['vocab_size']}, {shape['num_clusters'] * shape['experts_per_cluster']} experts "
        f"({shape['num_clusters']} clusters x {shape['experts_per_cluster']}), "
        f"{shape['top_k_clusters'] * shape['top_k_experts']} active per token, expert width {shape['expert_width']}; "
        f"training batch {shape['train_batch']} x {shape['train_seq']}, prefill {shape['prefill_seq']} tokens, decode "
        f"{shape['decode_tokens']} new tokens after {shape['decode_prompt']}. Medians of {result['repeats']} "
        "interleaved runs after warm-up.",
        "",
        "| model | total params | active params | " + " | ".join(KIND_LABELS[k] for k in best) + " |",
        "|---|---:|---:|" + "---:|" * len(best),
    ]
    for name in names:
        counts = result["parameters"][name]
        cells = []
        for kind in best:
            entry = best[kind][name]
            impl = f" ({entry['implementation']})" if entry["implementation"] else ""
            cells.append(
                f"{entry['value']:.1f}{impl}" if kind in ("prefill", "memory") else f"{entry['value']:.0f}{impl}"
            )
        lines.append(f"| {name} | {counts['total']:,} | {counts['active']:,} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "ClusterMoE relative to the fastest MoE peer, in every backend and in transformers' own, and to the dense "
        "model (> 1 means ClusterMoE is better):",
        "",
    ]
    lines += [
        "| measurement | best peer | ClusterMoE / best peer | best peer, transformers' backends | ClusterMoE / it | "
        "ClusterMoE / dense |",
        "|---|---|---:|---|---:|---:|",
    ]
    transformers_summary = result["peers_in_transformers_backends"]["summary"]
    for kind, row in summary.items():
        other = transformers_summary[kind]
        lines.append(
            f"| {KIND_LABELS[kind]} | {_peer_cell(row)} | "
            f"{_ratio_cell(row['vs_best_peer'])} | {_peer_cell(other)} | {_ratio_cell(other['vs_best_peer'])} | "
            f"{row['vs_dense']:.2f} |"
        )
    lines += ["", "Every experts implementation (tokens/s; prefill in ms; memory in MiB; '-' = left out as over "
              f"{result['slow_factor']:g}x slower than the model's fastest in a probe run):", ""]  # fmt: skip
    kinds = list(result["measurements"])
    lines += ["| configuration | " + " | ".join(KIND_LABELS[k] for k in kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for label in result["measurements"]["train_fp32"]:
        cells = []
        for kind in kinds:
            entry = result["measurements"][kind][label]
            cells.append(
                "-"
                if "value" not in entry
                else f"{entry['value']:.1f}"
                if kind in ("prefill", "memory")
                else f"{entry['value']:.0f}"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if result.get("targets"):
        lines += [""] + targets_markdown(result["targets"], result["peers_in_transformers_backends"]["targets"])
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = result["best"]
    names = list(result["parameters"])
    colors = ["tab:red" if name == CLUSTERMOE else "tab:gray" if name == DENSE else "tab:blue" for name in names]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, kind in zip(axes.flat, best):
        values = [best[kind][name]["value"] for name in names]
        ax.bar(range(len(names)), values, color=colors)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(
            [f"{n}\n{best[kind][n]['implementation'] or ''}" for n in names], rotation=30, ha="right", fontsize=8
        )
        better = "higher" if HIGHER_IS_BETTER.get(kind, False) else "lower"
        ax.set_title(f"{KIND_LABELS[kind]} ({better} is better)", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"Matched models, fastest experts implementation each; {result['machine']['description']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_arguments(argv=None) -> argparse.Namespace:
    """The command line, with `device` a `torch.device` and the defaults of `--output-dir` and `--repeats` (they
    depend on other options) filled in."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller shape and fewer repeats, about a minute (CI)")
    parser.add_argument(
        "--output-dir", type=Path,
        help="default: benchmarks/results, with --device cuda .../cuda; --quick or some --kinds: .../partial",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=count_at_least(1), default=1, help="torch intra-op threads (default 1: see the docstring)"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--repeats", type=count_at_least(1), help="timed runs per configuration (default 9, quick 3)")
    parser.add_argument(
        "--warmup", type=count_at_least(0), default=1, help="untimed runs per configuration after the probe (default 1)"
    )
    parser.add_argument(
        "--slow-factor",
        type=factor_at_least(1.0),
        default=4.0,
        help="leave out configurations whose probe is this much slower than the model's fastest (at least 1)",
    )
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--no-router", action="store_true", help="skip the router scaling sweep")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if "train_fp32" not in args.kinds:
        parser.error("train_fp32 is needed: each model's memory is compared in its fastest training configuration")

    try:
        args.device = benchmark_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    partial = args.quick or set(args.kinds) != set(KINDS)
    args.output_dir = prepare_output_dir(parser, args.output_dir or default_output_dir(args.device, partial))
    if args.repeats is None:
        args.repeats = 3 if args.quick else 9
    return args


def main(argv=None) -> dict:
    args = parse_arguments(argv)
    device, repeats, warmup = args.device, args.repeats, args.warmup
    torch.set_num_threads(args.threads)
    allocator = keep_freed_memory() if device.type == "cpu" else "PyTorch's CUDA caching allocator"
    shape = QUICK_SHAPE if args.quick else DEFAULT_SHAPE
    clock = Clock(args.threads, device)
    configs = build_configs(shape)

    parameters = {}
    for name, config in configs.items():
        parameters[name] = parameter_counts(build_model(name, config), shape)
        print(f"{name:15s} total {parameters[name]['total']:>12,}  active {parameters[name]['active']:>12,}")

    measurements = {}
    for kind in args.kinds:
        started = time.perf_counter()
        measurements[kind] = measure_kind(kind, shape, configs, clock, warmup, repeats, args.slow_factor, device)
        print(f"{kind}: {time.perf_counter() - started:.0f} s")
    measurements["memory"] = measure_memory(shape, configs, measurements["train_fp32"], device)

    router = None
    if not args.no_router:
        import router_scaling

        router = router_scaling.main(
            (["--quick"] if args.quick else [])
            + ["--output-dir", str(args.output_dir), "--threads", str(args.threads), "--device", str(device)]
            + (["--no-plot"] if args.no_plot else [])
        )

    import transformers

    best = best_configurations(measurements, configs)
    summary = summarise(best)
    best_in_transformers_backends = best_configurations(measurements, configs, TRANSFORMERS_EXPERTS_IMPLEMENTATIONS)
    summary_in_transformers_backends = summarise(best_in_transformers_backends)
    all_kinds = set(KINDS) <= set(args.kinds)
    result = {
        "benchmark": "models",
        "quick": args.quick,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (sys.argv[1:] if argv is None else argv)),
        "machine": {
            "description": machine_description(device),
            "device": str(device),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "threads": args.threads,
        "clock": clock.name,
        "allocator": allocator,
        "repeats": repeats,
        "warmup": warmup,
        "slow_factor": args.slow_factor,
        "shape": shape.to_dict(),
        "parameters": parameters,
        "measurements": measurements,
        "best": best,
        "summary": summary,
        "targets": check_targets(summary, best, router) if all_kinds else [],
        "peers_in_transformers_backends": {
            "best": best_in_transformers_backends,
            "summary": summary_in_transformers_backends,
            "targets": (
                check_targets(summary_in_transformers_backends, best_in_transformers_backends, router)
                if all_kinds
                else []
            ),
        },
    }
    (args.output_dir / "models.json").write_text(json.dumps(result, indent=2))
    (args.output_dir / "models.md").write_text(markdown(result))
    if not args.no_plot:
        plot(result, args.output_dir / "models.png")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
