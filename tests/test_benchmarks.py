"""The benchmark suite keeps working: matched models, every experts implementation, outputs written (--quick)."""

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_models  # noqa: E402
from common import CLUSTERMOE, DENSE, MOE_PEERS, QUICK_SHAPE, build_configs, build_model, parameter_counts  # noqa: E402

import clustermoe_hf.modeling_clustermoe as modeling  # noqa: E402


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
    # Active parameters agree within the routers and norms (DeepSeek-V3's MLA has the others' attention parameters);
    # the dense model has no router.
    reference = counts[CLUSTERMOE]["active"]
    for name in [*MOE_PEERS, DENSE]:
        tolerance = 0.03 if name == DENSE else 0.01
        assert abs(counts[name]["active"] - reference) / reference < tolerance, (name, counts[name], reference)
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
        # Only the models that need them for their loss record router logits, which costs hooks and memory.
        assert (output.get("router_logits") is not None) == (name in ("Qwen3-MoE", "Mixtral", "OLMoE")), name


def test_every_moe_model_is_measured_in_the_same_experts_implementations():
    """The peers are offered ClusterMoE's `sorted_mm` too: compared in their fastest setting, and given as many noisy
    medians to pick the best of."""
    candidates = {name: bench_models.experts_implementations(name) for name in (CLUSTERMOE, *MOE_PEERS)}
    assert set(candidates.values()) == {("eager", "grouped_mm", "batched_mm", "sorted_mm")}
    assert bench_models.experts_implementations(DENSE) == (None,)


@pytest.mark.parametrize("name", MOE_PEERS)
def test_sorted_mm_runs_its_own_paths_for_every_peer_and_matches_grouped_mm(name, monkeypatch):
    """`sorted_mm` is offered to the peers: it must serve their experts modules, through its own paths (bf16
    training: per-expert GEMMs; fp32 inference on a few pairs: one pair at a time), as `grouped_mm` does."""
    calls = {"per-expert GEMMs": 0, "per pair": 0}

    def counted(key, fn):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(modeling, "_grouped_matmul", counted("per-expert GEMMs", modeling._grouped_matmul))
    monkeypatch.setattr(modeling, "_per_pair_experts_forward", counted("per pair", modeling._per_pair_experts_forward))
    # bf16 training takes the per-expert path where the CPU emulates bf16 GEMMs: take it on any CPU.
    monkeypatch.setattr(modeling, "_CPU_DTYPES_WITHOUT_FAST_GEMM", frozenset({torch.bfloat16}))
    config = build_configs(QUICK_SHAPE)[name]
    batch = torch.randint(3, QUICK_SHAPE.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    losses, gradients, logits = {}, {}, {}
    for implementation in ("grouped_mm", "sorted_mm"):
        model = build_model(name, config, dtype=torch.bfloat16, experts_implementation=implementation).train()
        losses[implementation] = bench_models.training_forward(model, batch).loss
        losses[implementation].backward()
        experts = [p for n, p in model.named_parameters() if ".experts." in n and p.grad is not None]
        gradients[implementation] = torch.cat([p.grad.float().flatten() for p in experts])
        model = build_model(name, config, experts_implementation=implementation).eval()
        with torch.no_grad():  # 3 tokens x 2 experts: few enough pairs for the per-pair path
            logits[implementation] = model(input_ids=batch[:1, :3]).logits
    assert calls["per-expert GEMMs"] > 0 and calls["per pair"] > 0
    assert losses["sorted_mm"].item() == pytest.approx(losses["grouped_mm"].item(), abs=1e-3)
    difference = (gradients["sorted_mm"] - gradients["grouped_mm"]).norm() / gradients["grouped_mm"].norm()
    assert difference < 2e-2  # bf16 rounding: sorted_mm rounds once from float32, grouped_mm per op
    torch.testing.assert_close(logits["sorted_mm"], logits["grouped_mm"], rtol=1e-5, atol=1e-5)


def test_compiled_decode_runs_every_moe_model_in_the_same_experts_implementation(monkeypatch):
    import compiled_decode

    requested = {}

    def record(name, config, experts_implementation=None):
        requested[name] = experts_implementation
        return torch.nn.Module()

    monkeypatch.setattr(compiled_decode, "build_model", record)
    for name in (CLUSTERMOE, *MOE_PEERS, DENSE):
        compiled_decode.decode_runs(name, None, torch.zeros(1, 1, dtype=torch.long), new_tokens=1)
    assert {requested[name] for name in (CLUSTERMOE, *MOE_PEERS)} == {"sorted_mm"}
    assert requested[DENSE] is None


def test_targets_table_shows_values_that_agree_with_the_verdict():
    """A strict `>=` next to rounded values: 0.996 against 1 must not read "1.00 | 1.00 | no"."""
    kinds = ("train_fp32", "train_bf16", "decode_b1", "decode_b8", "memory")
    summary = {kind: {"best_peer": "Mixtral", "vs_best_peer": 1.0, "vs_dense": 1.0} for kind in kinds}
    summary["train_fp32"].update(vs_best_peer=1.1496, vs_dense=0.9)  # short of 1.15 by 0.0004; 0.9 exactly is met
    summary["train_bf16"].update(vs_best_peer=1.15 + 1e-9, vs_dense=0.9 - 1e-12)
    summary["decode_b1"]["vs_best_peer"] = 0.996
    summary["decode_b8"]["vs_best_peer"] = 1.0004
    summary["memory"]["vs_best_peer"] = 100 / (100 + 2**-10)  # ClusterMoE heavier by 1 KiB in 100 MiB
    implementations = {CLUSTERMOE: {"implementation": "sorted_mm"}, "Mixtral": {"implementation": "grouped_mm"}}
    best = dict.fromkeys(kinds, implementations)
    best["memory"] = {"Mixtral": {"value": 100.0}, CLUSTERMOE: {"value": 100 + 2**-10}}
    router = {"rows": [{"num_experts": 4096, "hierarchical_over_flat": 0.3 * (1 + 1e-6)}]}
    targets = bench_models.check_targets(summary, best, router)
    assert [target["met"] for target in targets] == [False, True, True, False, False, True, False, False]
    # The second comparison's values differ, and need fewer digits: the row's one threshold must suit both.
    others = [{**target, "value": target["threshold"] + 1, "met": True} for target in targets]
    rows = bench_models.targets_markdown(targets, others)[2:]
    assert len(rows) == len(targets)
    for row, target, other in zip(rows, targets, others):
        _, threshold, value, met, other_value, other_met = (cell.strip() for cell in row.strip("|").split("|"))
        assert (float(value.split()[0]) >= float(threshold)) == target["met"] == (met == "yes"), row
        assert (float(other_value.split()[0]) >= float(threshold)) == other["met"] == (other_met == "yes"), row
    assert "(ClusterMoE / Mixtral; ClusterMoE 1.0 KiB heavier)" in rows[6]
    # Each value names the configurations it compares: a lead of one experts kernel over another shows.
    assert "(ClusterMoE [sorted_mm] / Mixtral [grouped_mm])" in rows[2]
    assert "(ClusterMoE [sorted_mm] / Qwen3 (dense))" in rows[3]


def test_peers_are_compared_in_every_backend_and_in_transformers_own():
    """sorted_mm is registered for every fused experts module: one comparison gives it to the peers too (equal
    kernels), the other keeps them to transformers' backends (the peers as transformers runs them)."""
    names = (CLUSTERMOE, "Mixtral", DENSE)
    tokens_per_second = {"eager": 1.0, "grouped_mm": 2.0, "batched_mm": 1.5, "sorted_mm": 3.0}
    measurements = {"train_fp32": {}}
    for name in names:
        for implementation in bench_models.experts_implementations(name):
            value = 2.5 if name == DENSE else tokens_per_second[implementation]
            measurements["train_fp32"][bench_models.config_label(name, implementation)] = {"value": value}
    every = bench_models.best_configurations(measurements, dict.fromkeys(names))
    transformers_own = bench_models.best_configurations(
        measurements, dict.fromkeys(names), bench_models.TRANSFORMERS_EXPERTS_IMPLEMENTATIONS
    )
    assert every["train_fp32"]["Mixtral"] == {"value": 3.0, "implementation": "sorted_mm"}
    assert transformers_own["train_fp32"]["Mixtral"] == {"value": 2.0, "implementation": "grouped_mm"}
    assert every["train_fp32"][CLUSTERMOE] == transformers_own["train_fp32"][CLUSTERMOE]  # ClusterMoE: all four

    for implementation in bench_models.TRANSFORMERS_EXPERTS_IMPLEMENTATIONS:  # all left out next to sorted_mm
        measurements["train_fp32"][bench_models.config_label("Mixtral", implementation)] = {"excluded": True}
    transformers_own = bench_models.best_configurations(
        measurements, dict.fromkeys(names), bench_models.TRANSFORMERS_EXPERTS_IMPLEMENTATIONS
    )
    assert "Mixtral" not in transformers_own["train_fp32"]  # no configuration to compare with, rather than a crash
    summary = bench_models.summarise(transformers_own)["train_fp32"]  # and no peer at all left in that comparison
    assert summary["best_peer"] is None and summary["vs_best_peer"] is None and summary["vs_dense"] == 1.2
    targets = bench_models.check_targets(
        {kind: summary for kind in ("train_fp32", "train_bf16", "decode_b1", "decode_b8", "memory")},
        {"memory": {CLUSTERMOE: {"value": 1.0}}},
        None,
    )
    assert {target["met"] for target in targets if "dense" not in target["target"]} == {None}  # nothing to compare
    assert "| n/a (no peer) | n/a |" in bench_models.targets_markdown(targets, targets)[2]


def test_warmup_zero_is_kept_and_counts_below_their_minimum_are_refused(capsys):
    arguments = bench_models.parse_arguments(["--quick", "--warmup", "0"])
    assert (arguments.warmup, arguments.repeats) == (0, 3)
    assert bench_models.parse_arguments(["--repeats", "1"]).repeats == 1
    for option, value, message in (("--repeats", "0", "0 is less than 1"), ("--warmup", "-1", "-1 is less than 0")):
        with pytest.raises(SystemExit):
            bench_models.parse_arguments([option, value])
        assert f"argument {option}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "script, option, value, message",
    [
        ("bench_models", "--slow-factor", "0.5", "0.5 is not a finite number of at least 1.0"),  # drops every model
        ("bench_models", "--slow-factor", "nan", "nan is not a finite number of at least 1.0"),
        ("bench_models", "--threads", "0", "0 is less than 1"),
        ("router_scaling", "--threads", "-2", "-2 is less than 1"),
        ("profile_step", "--peer", "Foo", "invalid choice: 'Foo'"),
        ("profile_step", "--peer-implementation", "fast", "invalid choice: 'fast'"),
        ("profile_step", "--steps", "0", "0 is less than 1"),
        ("pair_call_cost", "--repeats", "0", "0 is less than 1"),
    ],
)
def test_bad_benchmark_arguments_are_refused_by_name_before_anything_runs(script, option, value, message, capsys):
    main = __import__(script).main
    with pytest.raises(SystemExit):
        main([option, value])
    assert f"argument {option}: {message}" in capsys.readouterr().err



def test_quick_and_partial_runs_do_not_overwrite_the_results_the_docs_cite():
    results = BENCHMARKS / "results"
    assert bench_models.parse_arguments([]).output_dir == results
    assert bench_models.parse_arguments(["--quick"]).output_dir == results / "partial"
    assert bench_models.parse_arguments(["--kinds", "train_fp32"]).output_dir == results / "partial"


@pytest.mark.parametrize("script", ["bench_models", "router_scaling"])
def test_an_output_dir_that_cannot_be_made_is_refused_before_anything_is_measured(script, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        __import__(script).main(["--quick", "--output-dir", str(tmp_path / "file" / "results"), "--no-plot"])
    assert f"--output-dir {tmp_path / 'file' / 'results'}: [Errno 20] Not a directory" in capsys.readouterr().err


def test_profile_steps_memory_mode_refuses_the_timing_options(capsys):
    import profile_step

    for option, value in (("--steps", "9"), ("--rows", "3")):
        with pytest.raises(SystemExit):
            profile_step.main(["--mode", "memory", option, value])
        assert f"{option} applies to the timed modes only" in capsys.readouterr().err


def test_a_cuda_device_index_past_the_devices_is_refused_by_name(monkeypatch):
    from common import benchmark_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert benchmark_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"--device cuda:7: torch sees 1 CUDA device\(s\), numbered from 0"):
        benchmark_device("cuda:7")


def test_interleaved_median_of_an_even_count_is_the_mean_of_the_middle_two():
    durations = iter([1.0, 4.0, 1.0, 2.0, 3.0])  # the probe, then four timed runs

    class ScriptedClock:
        def time(self, fn):
            fn()
            return next(durations)

    result = bench_models.interleaved(
        {"a": lambda: None}, ScriptedClock(), warmup=0, repeats=4, slow_factor=2, probes={"a": lambda: None},
        groups={"a": "model"},
    )  # fmt: skip
    assert result["a"]["median_s"] == statistics.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert result["a"]["min_s"] == 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("script", ["bench_models", "router_scaling"])
def test_a_device_the_benchmarks_cannot_use_is_refused_by_name(script, capsys):
    main = __import__(script).main
    for device, reason in (
        ("cuda", "sees no CUDA device"),
        ("mps", "run on 'cpu' or 'cuda'"),
        ("cuda:x", "Invalid device string: 'cuda:x'"),
    ):
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
        for name in (CLUSTERMOE, *MOE_PEERS):  # every experts implementation was run (or left out as far slower)
            for implementation in ("eager", "grouped_mm", "batched_mm", "sorted_mm"):
                assert f"{name} [{implementation}]" in measured
        assert DENSE in measured
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
    assert len(targets) == 8 and "router N=4096: flat / hierarchical >= 3.33 (hierarchical <= 0.3x flat)" in targets
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


def test_profile_step_profiles_bf16_training_only():
    """Decoding and the memory profile run in float32: a dtype there is refused, not ignored."""
    import profile_step

    for mode in ("decode", "memory"):
        with pytest.raises(SystemExit):
            profile_step.main(["--mode", mode, "--dtype", "bfloat16"])


def test_cuda_peak_memory_counts_the_bytes_tensors_asked_for(monkeypatch):
    """On CUDA the peak comes from the allocator's requested-bytes statistics, not its 512-byte-rounded blocks, which
    would count a model's many small tensors larger than the CPU measurement does (simulated allocator)."""
    import common

    stats = {"requested_bytes.all.current": 1000, "requested_bytes.all.peak": 1000}

    def step():  # allocates 300 bytes in small tensors and frees 100 of them
        stats["requested_bytes.all.peak"] = 1300
        stats["requested_bytes.all.current"] = 1200

    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native")
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: dict(stats))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 1 << 20)  # rounded blocks: not read
    assert common.peak_allocated_bytes(step, torch.device("cuda")) == 300


def test_instruction_counts_need_clustermoe_in_the_comparison_and_valgrind_installed(monkeypatch, capsys):
    import count_instructions

    with pytest.raises(SystemExit):
        count_instructions.parse_arguments(["--models", "Mixtral", "Qwen3 (dense)"])
    assert "--models must include ClusterMoE" in capsys.readouterr().err
    monkeypatch.setattr(count_instructions.shutil, "which", lambda tool: None)
    with pytest.raises(SystemExit):
        count_instructions.parse_arguments([])
    assert "valgrind and callgrind_control not found: install valgrind" in capsys.readouterr().err


def test_instruction_ratios_compare_each_models_fewest_and_read_like_speed_ratios():
    """A peer's (or the dense model's) instructions over ClusterMoE's: > 1 where ClusterMoE executes fewer, as a
    tokens/s ratio > 1 means it runs faster; every model in its implementation with the fewest."""
    import count_instructions

    def entry(model, implementation, per_token):
        return {"model": model, "implementation": implementation, "per_token": per_token}

    counts = {
        "decode_b1": {
            "ClusterMoE [grouped_mm]": entry(CLUSTERMOE, "grouped_mm", 9e6),
            "ClusterMoE [sorted_mm]": entry(CLUSTERMOE, "sorted_mm", 8e6),
            "Mixtral [grouped_mm]": entry("Mixtral", "grouped_mm", 10e6),
            "Mixtral [sorted_mm]": entry("Mixtral", "sorted_mm", 6e6),
            "OLMoE [sorted_mm]": entry("OLMoE", "sorted_mm", 7e6),
            DENSE: entry(DENSE, None, 4e6),
        }
    }
    best = count_instructions.best_configurations(counts, [CLUSTERMOE, "Mixtral", "OLMoE", DENSE])
    assert best["decode_b1"][CLUSTERMOE] == {"per_token": 8e6, "implementation": "sorted_mm"}
    summary = count_instructions.summarise(best)["decode_b1"]
    assert summary == {
        "best_peer": "Mixtral", "best_peer_implementation": "sorted_mm", "vs_best_peer": 0.75, "vs_dense": 0.5
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind")
def test_instruction_count_covers_the_counted_runs_and_not_the_process_start(tmp_path):
    import count_instructions

    arguments = ["--quick", "--kinds", "decode_b1", "--models", CLUSTERMOE, DENSE, "--implementations", "sorted_mm"]
    result = count_instructions.main(arguments + ["--warmup", "1", "--repeats", "1", "--output-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "instructions.json").read_text())
    assert saved == json.loads(json.dumps(result))
    counts = saved["counts"]["decode_b1"]
    assert set(counts) == {f"{CLUSTERMOE} [sorted_mm]", DENSE}
    for entry in counts.values():
        # Starting Python and importing torch alone take billions of instructions; one quick `generate` (8 tokens)
        # takes tens of millions.
        assert 1e6 < entry["per_token"] < 5e7 and entry["instructions"] < 4e8
        assert entry["per_token"] == entry["instructions"] / QUICK_SHAPE.decode_tokens
    summary = saved["summary"]["decode_b1"]
    assert summary["best_peer"] is None
    ours = counts[f"{CLUSTERMOE} [sorted_mm]"]["per_token"]
    assert summary["vs_dense"] == pytest.approx(counts[DENSE]["per_token"] / ours)
    table = (tmp_path / "instructions.md").read_text()
    assert "| per generated token, greedy decode batch 1 | sorted_mm | n/a | n/a |" in table
