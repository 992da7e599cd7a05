"""The benchmark suite keeps working: matched models, every experts implementation, outputs written (--quick)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_models  # noqa: E402
from common import CLUSTERMOE, DENSE, MOE_PEERS, QUICK_SHAPE, build_configs, build_model, parameter_counts  # noqa: E402


def test_models_are_matched_in_shape_and_active_parameters():
    configs = build_configs(QUICK_SHAPE)
    assert set(configs) == {CLUSTERMOE, DENSE, *MOE_PEERS}
    counts = {name: parameter_counts(build_model(name, config), QUICK_SHAPE) for name, config in configs.items()}
    for name, config in configs.items():
        assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.vocab_size) == (
            QUICK_SHAPE.hidden_size, QUICK_SHAPE.num_layers, QUICK_SHAPE.num_heads, QUICK_SHAPE.vocab_size,
        ), name  # fmt: skip
    moe = [CLUSTERMOE, *MOE_PEERS]
    for name in moe:
        model = build_model(name, configs[name])
        experts = [m for m in model.modules() if getattr(m, "gate_up_proj", None) is not None]
        assert len(experts) == QUICK_SHAPE.num_layers, name
        # Same total experts and expert width everywhere: (N, 2 * width, hidden).
        expected = (QUICK_SHAPE.num_experts, 2 * QUICK_SHAPE.expert_width, QUICK_SHAPE.hidden_size)
        assert all(tuple(e.gate_up_proj.shape) == expected for e in experts), name
    # Active parameters agree within the attention differences (DeepSeek-V3's MLA, Qwen's q/k norms).
    reference = counts[CLUSTERMOE]["active"]
    for name in [*MOE_PEERS, DENSE]:
        assert abs(counts[name]["active"] - reference) / reference < 0.05, (name, counts[name], reference)
    assert counts[DENSE]["total"] == counts[DENSE]["active"]
    assert counts[CLUSTERMOE]["total"] > 3 * counts[CLUSTERMOE]["active"] // 2


def test_every_model_trains_with_its_own_router_losses():
    """Qwen3-MoE, Mixtral and OLMoE add their load-balancing loss only when asked for the router logits; the timed
    and memory-measured training steps ask, as ClusterMoE always computes its own. DeepSeek-V3 has none by design."""
    configs = build_configs(QUICK_SHAPE)
    batch = torch.randint(3, QUICK_SHAPE.vocab_size, (1, 8))
    for name in (CLUSTERMOE, *MOE_PEERS):
        output = bench_models.training_forward(build_model(name, configs[name]).train(), batch)
        if name == "DeepSeek-V3":
            assert output.get("aux_loss") is None
        else:
            assert output.aux_loss is not None and output.aux_loss > 0, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("script", ["bench_models", "router_scaling"])
def test_a_device_the_benchmarks_cannot_use_is_refused_by_name(script, capsys):
    main = __import__(script).main
    for device, reason in (("cuda", "sees no CUDA device"), ("mps", "run on 'cpu' or 'cuda'")):
        with pytest.raises(SystemExit):
            main(["--quick", "--device", device, "--no-plot"])
        error = capsys.readouterr().err
        assert f"--device {device}: " in error and reason in error


def test_interleaved_leaves_out_configurations_far_slower_than_the_fastest():
    calls = []

    def workload(name, seconds):
        def run():
            calls.append(name)
            end = bench_models.time.process_time() + seconds
            while bench_models.time.process_time() < end:
                pass

        return run

    def slow_first_call(name, seconds):  # one-off setup, as a process's or a kernel's first call pays
        fast = workload(name, seconds)
        return lambda: workload(name, 0.05)() if name not in calls else fast()

    runs = {
        "fast": workload("fast", 0.002), "slow": workload("slow", 0.05), "cold start": slow_first_call("cold", 0.002),
        "other model": workload("other", 0.05),
    }  # fmt: skip
    groups = {"fast": "model A", "slow": "model A", "cold start": "model A", "other model": "model B"}
    clock = bench_models.Clock(1, torch.device("cpu"))
    result = bench_models.interleaved(runs, clock, warmup=1, repeats=3, slow_factor=5, probes=runs, groups=groups)
    assert result["slow"]["excluded"] and result["slow"]["probe_s"] >= 0.05
    assert calls.count("slow") == 2  # probed (an untimed call, then a timed one), never run again
    assert result["fast"]["samples"] == 3 and result["fast"]["median_s"] < 0.05
    assert result["cold start"]["samples"] == 3  # its slow first call is not the probe's timing
    # Only the same model's implementations are compared: another model's slower workload is still measured.
    assert result["other model"]["samples"] == 3


FAULTS_PER_TRAINING_STEP = """
import resource, sys, torch
from bench_models import make_training_steps
from common import CLUSTERMOE, DEFAULT_SHAPE, build_configs, build_model, keep_freed_memory
print(keep_freed_memory())
torch.set_num_threads(1)
model = build_model(CLUSTERMOE, build_configs(DEFAULT_SHAPE)[CLUSTERMOE])
batch = torch.randint(3, DEFAULT_SHAPE.vocab_size, (DEFAULT_SHAPE.train_batch, DEFAULT_SHAPE.train_seq))
(step,), _ = make_training_steps(model, batch)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_benchmarks_keep_freed_memory_so_training_steps_do_not_fault_pages_in_again():
    """With glibc's default thresholds an MoE training step of the default shape faults 2,500-6,000 pages (10-25
    MiB) back in, step after step; the benchmarks ask malloc to keep freed memory instead (a fresh process: the
    setting is global)."""
    run = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_TRAINING_STEP], cwd=BENCHMARKS, capture_output=True, text=True, check=True
    )
    setting, faults_per_step = run.stdout.split("\n")[-3:-1]
    if setting == "system malloc":
        pytest.skip("not glibc (e.g. musl): nothing to set")
    assert setting == "glibc malloc, freed memory kept (mallopt)"
    assert float(faults_per_step) < 1000


@pytest.mark.slow
def test_quick_benchmark_writes_json_markdown_and_plots(tmp_path):
    torch_threads = torch.get_num_threads()
    try:
        result = bench_models.main(["--quick", "--repeats", "1", "--output-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(torch_threads)
    saved = json.loads((tmp_path / "models.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    for kind in bench_models.KINDS + ("memory",):
        measured = saved["measurements"][kind]
        for name in MOE_PEERS:  # every transformers experts implementation was run (or left out as far slower)
            for implementation in ("eager", "grouped_mm", "batched_mm"):
                assert f"{name} [{implementation}]" in measured
        assert f"{CLUSTERMOE} [sorted_mm]" in measured and DENSE in measured
        best = saved["best"][kind][CLUSTERMOE]
        if kind == "memory":  # memory is compared in the configuration that trains fastest
            fastest = saved["best"]["train_fp32"][CLUSTERMOE]["implementation"]
            assert best["value"] == measured[f"{CLUSTERMOE} [{fastest}]"]["value"]
        else:  # the compared configuration is the best of the model's measured ones
            values = [v["value"] for label, v in measured.items() if label.startswith(CLUSTERMOE) and "value" in v]
            assert best["value"] == (max(values) if bench_models.HIGHER_IS_BETTER[kind] else min(values))
    summary = saved["summary"]["train_fp32"]
    peers = {name: saved["best"]["train_fp32"][name]["value"] for name in MOE_PEERS}
    assert summary["best_peer"] == max(peers, key=peers.get)
    assert summary["vs_dense"] == pytest.approx(
        saved["best"]["train_fp32"][CLUSTERMOE]["value"] / saved["best"]["train_fp32"][DENSE]["value"]
    )
    router = json.loads((tmp_path / "router_scaling.json").read_text())
    assert [row["num_experts"] for row in router["rows"]] == [16, 64, 256, 1024, 4096]
    assert all(row["same_routing"] for row in router["rows"])  # both routers pick the same experts
    table = (tmp_path / "models.md").read_text()
    assert "| ClusterMoE |" in table and "ClusterMoE / best peer" in table
    assert saved["allocator"] in table.splitlines()[0]  # the machine line says how memory was allocated
    targets = {target["target"]: target for target in saved["targets"]}
    assert len(targets) == 8 and "router N=4096: hierarchical <= 0.3x flat" in targets
    assert all(target["met"] == (target["value"] >= target["threshold"]) for target in targets.values())
    for name in ("models.png", "router_scaling.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_compiled_decode_benchmark_really_compiles_and_writes_its_ratios(tmp_path):
    import compiled_decode

    torch._dynamo.reset()
    torch_threads, recompile_limit = torch.get_num_threads(), torch._dynamo.config.recompile_limit
    try:
        result = compiled_decode.main(["--quick", "--repeats", "1", "--output-dir", str(tmp_path)])
        captured_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch.set_num_threads(torch_threads)
        torch._dynamo.config.recompile_limit = recompile_limit
        torch._dynamo.reset()
    assert captured_graphs >= 3  # the compiled runs went through torch.compile, one graph per model at least
    saved = json.loads((tmp_path / "compiled_decode.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert set(saved["clustermoe_over_best_peer"]) == {"batch_1_eager", "batch_1_compiled"}
    for mode in ("eager", "compiled"):
        ratio = saved["clustermoe_over_best_peer"][f"batch_1_{mode}"]
        tokens_per_s = saved["tokens_per_s"]
        expected = tokens_per_s[f"{CLUSTERMOE} | batch 1 | {mode}"] / tokens_per_s[f"Mixtral | batch 1 | {mode}"]
        assert ratio == {"best_peer": "Mixtral", "ratio": pytest.approx(expected)}


def test_peak_memory_by_category_sees_what_a_training_step_holds_at_its_peak():
    """`profile_step.py --mode memory` reads the profiler's private memory profile: keep it working."""
    import profile_step

    weight = torch.randn(64, 64, requires_grad=True)

    def step():
        activation = torch.tanh(torch.randn(256, 64) @ weight)  # 64 KiB saved for the backward
        activation.square().sum().backward()

    by_category = profile_step.peak_memory_by_category(step)
    assert sum(by_category.values()) >= 256 * 64 * 4 + 64 * 64 * 4  # the saved activation and the weight's gradient
    assert by_category and "unknown" not in by_category  # every allocation alive at the peak got a category


def test_pair_call_cost_times_every_variant_it_reports(capsys):
    """`pair_call_cost.py` calls the MoE block's internals (health check, per-pair path): keep it working."""
    import pair_call_cost

    result = pair_call_cost.main(["--repeats", "1"])
    variants = {(row["mode"], row["variant"]) for row in result["rows"]}
    assert ("forward", "health check + masking") in variants and ("forward", "health check, CPU shortcut") in variants
    assert [row["pairs"] for row in result["few_pairs"]][:2] == [1, 2]
    assert "Health check + masking" in capsys.readouterr().out
