"""Greedy decoding compiled with torch.compile, next to the same decoding in eager mode.

`bench_models.py` compares eager generation, where ClusterMoE's two-level router and the pair bookkeeping around its
experts call cost Python and dispatcher time for every small op. This measures how much of that gap compilation
closes: each model decodes with a static KV cache, once eager and once through generate's
`CompileConfig(fullgraph=True, dynamic=False)` (inductor), interleaved, medians after warm-up (the warm-up includes
compilation). Every MoE model, ClusterMoE and peers alike, runs `sorted_mm` (registered by `clustermoe_hf` for any
fused experts module): `grouped_mm` under compilation, and in eager decoding `grouped_mm` or, over a handful of pairs,
its faster per-pair path: in both columns ClusterMoE and the peers run the same experts kernels.

    python benchmarks/compiled_decode.py             # batch 1 and 8, all models; ~3 min here, mostly compilation
    python benchmarks/compiled_decode.py --quick     # small shape, ClusterMoE, Mixtral and dense at batch 1 (CI)
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import CompileConfig


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CLUSTERMOE, DEFAULT_SHAPE, DENSE, MOE_PEERS, QUICK_SHAPE, build_configs, build_model  # noqa: E402
from common import count_at_least, keep_freed_memory, median_times  # noqa: E402
from bench_models import workload_inputs  # noqa: E402


def decode_runs(name: str, config, prompt: torch.Tensor, new_tokens: int) -> dict:
    """`{"eager": run, "compiled": run}` for one model: greedy generation of `new_tokens` with a static cache."""
    # The same experts implementation for every MoE model, so that the ratios measure the models and not the kernels:
    # `sorted_mm`, which decodes eagerly as fast as `grouped_mm` or faster (its per-pair path at batch 1) for every
    # one of them and is `grouped_mm` when compiled. The dense model has no experts.
    model = build_model(name, config, experts_implementation=None if name == DENSE else "sorted_mm")
    model.eval()
    compile_config = CompileConfig(fullgraph=True, dynamic=False)
    compile_config._compile_all_devices = True  # generate compiles only on accelerators otherwise

    def run(compiled: bool):
        extra = {"compile_config": compile_config} if compiled else {}
        with torch.no_grad():
            model.generate(
                prompt,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                cache_implementation="static",
                **extra,
            )

    return {"eager": lambda: run(False), "compiled": lambda: run(True)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=count_at_least(1), help="timed runs per configuration (default 7, quick 2)")
    parser.add_argument("--output-dir", type=Path, help="also write compiled_decode.json there")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # process CPU time, as in bench_models.py
    keep_freed_memory()
    # Every model and batch size is one more compiled variant of transformers' shared forward wrappers: lift dynamo's
    # per-code-object limit (8), which fullgraph turns into an error.
    torch._dynamo.config.recompile_limit = 64
    shape = QUICK_SHAPE if args.quick else DEFAULT_SHAPE
    names = (CLUSTERMOE, "Mixtral", DENSE) if args.quick else (CLUSTERMOE, *MOE_PEERS, DENSE)
    batch_sizes = (1,) if args.quick else (1, 8)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 7)
    configs = build_configs(shape)
    runs = {}
    for batch_size in batch_sizes:
        prompt = workload_inputs(f"decode_b{batch_size}", shape, torch.device("cpu"))["decode_prompt"]  # bench_models'
        for name in names:
            for mode, run in decode_runs(name, configs[name], prompt, shape.decode_tokens).items():
                runs[(batch_size, name, mode)] = run
    times = median_times(runs, warmup=2, repeats=repeats)  # the first warm-up run compiles
    tokens_per_s = {key: key[0] * shape.decode_tokens / value["median_s"] for key, value in times.items()}

    print(f"Greedy decode tokens/s, static cache, {shape.decode_tokens} new tokens after {shape.decode_prompt}; "
          f"medians of {repeats} interleaved runs, 1 thread, process CPU time.\n")  # fmt: skip
    header = "| model | " + " | ".join(f"batch {b}, eager | batch {b}, compiled" for b in batch_sizes) + " |"
    print(header)
    print("|---|" + "---:|" * 2 * len(batch_sizes))
    for name in names:
        cells = [f"{tokens_per_s[(b, name, mode)]:.0f}" for b in batch_sizes for mode in ("eager", "compiled")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n| ClusterMoE / fastest MoE peer | eager | compiled |")
    print("|---|---:|---:|")
    ratios = {}
    for b in batch_sizes:
        row = []
        for mode in ("eager", "compiled"):
            peers = [n for n in names if n not in (CLUSTERMOE, DENSE)]
            best_peer = max(peers, key=lambda n: tokens_per_s[(b, n, mode)])
            ratio = tokens_per_s[(b, CLUSTERMOE, mode)] / tokens_per_s[(b, best_peer, mode)]
            ratios[f"batch_{b}_{mode}"] = {"best_peer": best_peer, "ratio": ratio}
            row.append(f"{ratio:.2f} ({best_peer})")
        print(f"| batch {b} | " + " | ".join(row) + " |")

    result = {
        "shape": shape.to_dict(),
        "tokens_per_s": {f"{name} | batch {b} | {mode}": v for (b, name, mode), v in tokens_per_s.items()},
        "clustermoe_over_best_peer": ratios,
    }
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "compiled_decode.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
