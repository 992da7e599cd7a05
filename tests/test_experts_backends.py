"""The `sorted_mm` experts implementation: transformers' `grouped_mm`, except for dtypes this CPU only emulates, where
it runs float32 GEMMs over the active experts, and for inference on a handful of pairs, which it runs one by one; both
against the eager reference, in outputs and (for the loop) gradients."""

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen3MoeConfig
from transformers.integrations import use_experts_implementation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from clustermoe_hf import ClusterMoEConfig, ClusterMoEForCausalLM, ClusterMoEForSequenceClassification
from clustermoe_hf.modeling_clustermoe import ClusterMoEExperts, _SortedGroupedLinear


def gemm_loop_for(monkeypatch, *dtypes):
    """Make `sorted_mm` take its GEMM loop for `dtypes` (on this CPU it does for the emulated ones only). The module
    that registered "sorted_mm" last (a checkpoint's copy, after trust_remote_code loads) is the one that serves it."""
    functions = ALL_EXPERTS_FUNCTIONS["sorted_mm"].__globals__
    monkeypatch.setitem(functions, "_CPU_DTYPES_WITHOUT_FAST_GEMM", frozenset(dtypes))


@pytest.fixture
def float32_gemm_loop(monkeypatch):
    gemm_loop_for(monkeypatch, torch.float32)


def experts_pair(experts_class, config, seed=0):
    """The same experts (same weights) once with the eager forward and once with `sorted_mm`."""
    pair = {}
    for implementation in ("eager", "sorted_mm"):
        config = copy.deepcopy(config)
        config._experts_implementation = implementation
        torch.manual_seed(seed)
        module = experts_class(config)
        for weight in module.parameters():
            nn.init.normal_(weight, std=0.1)
        pair[implementation] = module
    return pair["eager"], pair["sorted_mm"]


def run_with_grads(module, hidden, top_k_index, top_k_weights):
    hidden = hidden.clone().requires_grad_()
    top_k_weights = top_k_weights.clone().requires_grad_()
    out = module(hidden, top_k_index, top_k_weights)
    grads = torch.autograd.grad(out.square().sum(), [hidden, top_k_weights, *module.parameters()])
    return out, grads


def routing(num_tokens, num_experts, top_k, used_experts=None):
    """Distinct experts per token, drawn from `used_experts` (so the others receive no tokens)."""
    generator = torch.Generator().manual_seed(1)
    pool = torch.arange(num_experts) if used_experts is None else torch.tensor(used_experts)
    index = torch.stack([pool[torch.randperm(len(pool), generator=generator)[:top_k]] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=generator)
    return index, weights


def assert_sorted_mm_matches_eager(experts_class, config, num_tokens):
    """Outputs and gradients (inputs, routing weights, expert weights) of `sorted_mm` match the eager forward."""
    eager, fast = experts_pair(experts_class, config)
    hidden = torch.randn(num_tokens, config.hidden_size)
    top_k_index, top_k_weights = routing(num_tokens, config.num_experts, top_k=config.num_experts_per_tok)
    eager_out, eager_grads = run_with_grads(eager, hidden, top_k_index, top_k_weights)
    fast_out, fast_grads = run_with_grads(fast, hidden, top_k_index, top_k_weights)
    torch.testing.assert_close(fast_out, eager_out)
    for fast_grad, eager_grad in zip(fast_grads, eager_grads):
        torch.testing.assert_close(fast_grad, eager_grad)


def clustermoe_config(**overrides):
    sizes = {
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_clusters": 2, "experts_per_cluster": 4, "top_k_clusters": 1, "top_k_experts": 2,
    }  # fmt: skip
    return ClusterMoEConfig(**{**sizes, **overrides})


def test_sorted_mm_is_registered_in_transformers_experts_interface():
    assert "sorted_mm" in ALL_EXPERTS_FUNCTIONS


@pytest.mark.parametrize("used_experts", [None, [1, 2, 5, 6]], ids=["all-experts", "some-experts-idle"])
def test_sorted_mm_matches_eager_clustermoe_experts(float32_gemm_loop, used_experts):
    eager, fast = experts_pair(ClusterMoEExperts, clustermoe_config())
    hidden = torch.randn(13, 32)
    top_k_index, top_k_weights = routing(13, 8, top_k=2, used_experts=used_experts)
    eager_out, eager_grads = run_with_grads(eager, hidden, top_k_index, top_k_weights)
    fast_out, fast_grads = run_with_grads(fast, hidden, top_k_index, top_k_weights)
    # Same GEMMs on the same rows, summed per token in the same (ascending expert) order: identical outputs.
    assert torch.equal(fast_out, eager_out)
    for name, fast_grad, eager_grad in zip(
        ["hidden", "weights", "gate_up_proj", "down_proj"], fast_grads, eager_grads
    ):
        torch.testing.assert_close(fast_grad, eager_grad, msg=name)
    if used_experts is not None:  # idle experts get an exact zero gradient, not uninitialised memory
        idle = [e for e in range(8) if e not in used_experts]
        assert torch.count_nonzero(fast_grads[2][idle]) == 0 and torch.count_nonzero(fast_grads[3][idle]) == 0


def test_sorted_mm_matches_eager_for_transformers_moe_experts(float32_gemm_loop):
    """Registered in transformers' interface, it serves other models' experts too (here Qwen3-MoE's)."""
    config = Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=6, num_experts_per_tok=3)
    assert_sorted_mm_matches_eager(Qwen3MoeExperts, config, num_tokens=11)


@use_experts_implementation(is_transposed=True)
class TransposedExperts(nn.Module):
    """Experts stored as (N, H, 2I) and (N, I, H), the layout some models use."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.gate_up_proj = nn.Parameter(
            torch.empty(config.num_experts, config.hidden_size, 2 * config.moe_intermediate_size)
        )
        self.down_proj = nn.Parameter(
            torch.empty(config.num_experts, config.moe_intermediate_size, config.hidden_size)
        )
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for expert in range(self.num_experts):
            token, slot = torch.where(top_k_index == expert)
            gate, up = (hidden_states[token] @ self.gate_up_proj[expert]).chunk(2, dim=-1)
            expert_out = (self.act_fn(gate) * up) @ self.down_proj[expert]
            out.index_add_(0, token, expert_out * top_k_weights[token, slot, None])
        return out


def test_sorted_mm_matches_eager_with_transposed_weights(float32_gemm_loop):
    config = Qwen3MoeConfig(hidden_size=24, moe_intermediate_size=8, num_experts=5, num_experts_per_tok=2)
    assert_sorted_mm_matches_eager(TransposedExperts, config, num_tokens=9)


@use_experts_implementation(is_transposed=True, has_bias=True)
class BiasedExperts(TransposedExperts):
    """A subclass of decorated experts, decorated again, with an eager loop of its own."""

    def __init__(self, config):
        super().__init__(config)
        self.gate_up_proj_bias = nn.Parameter(torch.empty(config.num_experts, 2 * config.moe_intermediate_size))
        self.down_proj_bias = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for expert in range(self.num_experts):
            token, slot = torch.where(top_k_index == expert)
            gate_up = hidden_states[token] @ self.gate_up_proj[expert] + self.gate_up_proj_bias[expert]
            gate, up = gate_up.chunk(2, dim=-1)
            expert_out = (self.act_fn(gate) * up) @ self.down_proj[expert] + self.down_proj_bias[expert]
            out.index_add_(0, token, expert_out * top_k_weights[token, slot, None])
        return out


def test_sorted_mm_serves_experts_its_loop_does_not_implement_through_grouped_mm(float32_gemm_loop):
    """With biases, or without a gate (transformers' NemotronH experts: an `up_proj`, no `gate_up_proj`)."""
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    config = Qwen3MoeConfig(hidden_size=24, moe_intermediate_size=8, num_experts=5, num_experts_per_tok=2)
    ungated = NemotronHConfig(hidden_size=24, moe_intermediate_size=8, n_routed_experts=5, num_experts_per_tok=2)
    for experts in (BiasedExperts(config), NemotronHExperts(ungated)):
        experts.config._experts_implementation = "sorted_mm"
        for weight in experts.parameters():
            nn.init.normal_(weight, std=0.1)
        top_k_index, top_k_weights = routing(4, 5, top_k=2)
        hidden = torch.randn(4, 24)
        expected = grouped_mm_experts_forward(experts, hidden, top_k_index, top_k_weights)
        assert torch.equal(experts(hidden, top_k_index, top_k_weights), expected)


def test_sorted_mm_serves_them_at_sizes_grouped_mm_kernels_cannot_take_by_their_eager_loop():
    """Rows of 34 float32 values are not 16-byte aligned: grouped_mm's kernels raise, the experts' own loop does not."""
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    config = Qwen3MoeConfig(hidden_size=34, moe_intermediate_size=8, num_experts=5, num_experts_per_tok=2)
    ungated = NemotronHConfig(hidden_size=34, moe_intermediate_size=6, n_routed_experts=5, num_experts_per_tok=2)
    for experts in (BiasedExperts(config), NemotronHExperts(ungated)):
        assert_sorted_mm_matches_the_eager_loop(experts, hidden_size=34)


@pytest.mark.parametrize(
    "sizes, dtype",
    [({"intermediate_size": 10}, torch.float32), ({"hidden_size": 20, "num_attention_heads": 2}, torch.bfloat16),
     ({}, torch.float64)],
    ids=["unaligned float32", "unaligned bf16", "float64"],
)  # fmt: skip
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_a_clustermoe_whose_experts_grouped_mm_cannot_run_names_the_setting(sizes, dtype, grad):
    """torch's kernels raised "strides should be multiple of 16 bytes" (or about a Double matrix), naming neither."""
    sizes = {"hidden_size": 32, "intermediate_size": 16, "num_attention_heads": 4, **sizes}
    config = ClusterMoEConfig(
        vocab_size=64, num_hidden_layers=1, num_clusters=2, experts_per_cluster=2, top_k_experts=1, **sizes
    )
    model = ClusterMoEForCausalLM(config).to(dtype).train(grad)
    ids = torch.randint(0, 64, (2, 8))
    model.set_experts_implementation("grouped_mm")
    with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=rf"'grouped_mm' cannot run .* {dtype} of "):
        model(ids)
    model.set_experts_implementation("sorted_mm")
    with torch.set_grad_enabled(grad):
        assert model(ids).logits.isfinite().all()


def assert_sorted_mm_matches_the_eager_loop(experts, hidden_size):
    for weight in experts.parameters():
        nn.init.normal_(weight, std=0.1)
    top_k_index, top_k_weights = routing(4, 5, top_k=2)
    hidden = torch.randn(4, hidden_size)
    experts.config._experts_implementation = "eager"
    expected = experts(hidden, top_k_index, top_k_weights)
    experts.config._experts_implementation = "sorted_mm"
    torch.testing.assert_close(experts(hidden, top_k_index, top_k_weights), expected)


class ScaledExperts(BiasedExperts):
    """A subclass that wraps its parent's dispatching forward without being decorated itself."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return 2 * super().forward(hidden_states, top_k_index, top_k_weights)


@use_experts_implementation(is_transposed=True, has_bias=True)
class RedecoratedScaledExperts(BiasedExperts):
    """Decorated again, around a forward that calls its parent's dispatching forward."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return 2 * super().forward(hidden_states, top_k_index, top_k_weights)


@pytest.mark.parametrize("experts_class", [ScaledExperts, RedecoratedScaledExperts])
def test_sorted_mm_at_unaligned_sizes_runs_each_subclass_loop_once(experts_class):
    """The fallback for rows grouped_mm's kernels cannot take runs the class's own loop, without coming back to itself
    forever through a forward that calls its parent's."""
    config = Qwen3MoeConfig(hidden_size=34, moe_intermediate_size=8, num_experts=5, num_experts_per_tok=2)
    assert_sorted_mm_matches_the_eager_loop(experts_class(config), hidden_size=34)


def test_sorted_mm_is_grouped_mm_for_dtypes_with_fast_gemms(monkeypatch):
    gemm_loop_for(monkeypatch)  # no emulated dtype
    experts = experts_pair(ClusterMoEExperts, clustermoe_config())[1]
    hidden = torch.randn(13, 32)
    top_k_index, top_k_weights = routing(13, 8, top_k=2)
    expected = grouped_mm_experts_forward(experts, hidden, top_k_index, top_k_weights)
    assert torch.equal(experts(hidden, top_k_index, top_k_weights), expected)


@pytest.mark.parametrize(
    "experts_class, config",
    [
        (ClusterMoEExperts, clustermoe_config()),
        (TransposedExperts, Qwen3MoeConfig(hidden_size=24, moe_intermediate_size=8, num_experts=5)),
    ],
    ids=["clustermoe", "transposed-weights"],
)
def test_sorted_mm_runs_a_few_pairs_without_gradients_one_by_one(monkeypatch, experts_class, config):
    """Batch-1 decoding: up to PER_PAIR_MAX_PAIRS (token, expert) pairs are multiplied one by one, with the eager
    reference's results; more pairs, or gradients, go to grouped_mm."""
    functions = ALL_EXPERTS_FUNCTIONS["sorted_mm"].__globals__
    gemm_loop_for(monkeypatch)  # no emulated dtype
    grouped_mm_calls = []

    def recording_grouped_mm(*args):
        grouped_mm_calls.append(args[2].numel())
        return grouped_mm_experts_forward(*args)

    monkeypatch.setitem(functions, "grouped_mm_experts_forward", recording_grouped_mm)
    eager, fast = experts_pair(experts_class, config)
    max_pairs = functions["PER_PAIR_MAX_PAIRS"]
    for num_tokens in (1, max_pairs // 2, max_pairs // 2 + 1):
        hidden = torch.randn(num_tokens, config.hidden_size)
        top_k_index, top_k_weights = routing(num_tokens, config.num_experts, top_k=2)
        with torch.no_grad():
            expected = eager(hidden, top_k_index, top_k_weights)
            torch.testing.assert_close(fast(hidden, top_k_index, top_k_weights), expected)
    assert grouped_mm_calls == [2 * (max_pairs // 2 + 1)]  # only the call over the threshold
    run_with_grads(fast, hidden[:1], top_k_index[:1], top_k_weights[:1])
    assert grouped_mm_calls[1:] == [2]
    with torch.no_grad():  # inputs in another dtype are computed in the weights' dtype, as grouped_mm does
        half_inputs = hidden[:1].bfloat16()
        expected = grouped_mm_experts_forward(fast, half_inputs, top_k_index[:1], top_k_weights[:1])
        torch.testing.assert_close(fast(half_inputs, top_k_index[:1], top_k_weights[:1]), expected)


def test_clustermoe_decodes_through_the_per_pair_path_as_eager_does(monkeypatch):
    """Batch-1 greedy decoding (2 pairs per token) takes the per-pair path and generates eager's tokens."""
    gemm_loop_for(monkeypatch)  # no emulated dtype
    per_pair_calls = []
    functions = ALL_EXPERTS_FUNCTIONS["sorted_mm"].__globals__
    per_pair = functions["_per_pair_experts_forward"]
    monkeypatch.setitem(
        functions, "_per_pair_experts_forward", lambda *args: per_pair_calls.append(1) or per_pair(*args)
    )
    model = ClusterMoEForCausalLM(clustermoe_config(initializer_range=0.2)).eval()
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(3))
    generated = {}
    for implementation in ("eager", "sorted_mm"):
        model.set_experts_implementation(implementation)
        output = model.generate(
            prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True
        )
        generated[implementation] = output
    assert len(per_pair_calls) == 5 * 2  # every decoded token after the prompt, in both MoE layers
    assert torch.equal(generated["sorted_mm"].sequences, generated["eager"].sequences)
    torch.testing.assert_close(torch.stack(generated["sorted_mm"].logits), torch.stack(generated["eager"].logits))


def logits_and_gradients_per_backend(model) -> dict:
    """A training step's logits and parameter gradients with the eager experts and with `sorted_mm`."""
    model.train()
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(2))
    results = {}
    for implementation in ("eager", "sorted_mm"):
        model.set_experts_implementation(implementation)
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results[implementation] = (out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    return results


def test_clustermoe_model_with_sorted_mm_matches_eager_in_loss_and_gradients(float32_gemm_loop):
    """The whole model, reliability health checks included, trains identically with either backend."""
    results = logits_and_gradients_per_backend(ClusterMoEForCausalLM(clustermoe_config(initializer_range=0.2)))
    eager_logits, eager_grads = results["eager"]
    fast_logits, fast_grads = results["sorted_mm"]
    torch.testing.assert_close(fast_logits, eager_logits)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, msg=name)


def test_sorted_mm_is_clustermoes_default_and_an_explicit_choice_is_kept():
    assert ClusterMoEForCausalLM(clustermoe_config()).config._experts_implementation == "sorted_mm"
    config = clustermoe_config()
    config._experts_implementation = "grouped_mm"
    assert ClusterMoEForCausalLM(config).config._experts_implementation == "grouped_mm"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("emulated", [True, False], ids=["emulated-gemm", "fast-gemm"])
def test_sorted_mm_in_half_precision_matches_eager(monkeypatch, dtype, emulated):
    """Half-precision GEMMs run in float32 on CPUs that emulate them (rounded once, like a native kernel that
    accumulates in float32), as grouped_mm otherwise; both agree with eager to half precision, gradients included."""
    gemm_loop_for(monkeypatch, *([dtype] if emulated else []))
    float32_mms, real_mm = [], torch.mm

    def recording_mm(a, b, **kwargs):
        float32_mms.append(a.dtype == torch.float32)
        return real_mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "mm", recording_mm)
    eager, fast = experts_pair(ClusterMoEExperts, clustermoe_config())
    eager, fast = eager.to(dtype), fast.to(dtype)
    hidden = torch.randn(13, 32).to(dtype)
    top_k_index, top_k_weights = routing(13, 8, top_k=2)
    eager_out, eager_grads = run_with_grads(eager, hidden, top_k_index, top_k_weights.to(dtype))
    float32_mms.clear()
    fast_out, fast_grads = run_with_grads(fast, hidden, top_k_index, top_k_weights.to(dtype))
    if emulated:
        assert float32_mms and all(float32_mms)  # every per-expert GEMM in float32
    else:
        assert not float32_mms  # grouped_mm: no per-expert GEMMs
    assert fast_out.dtype == dtype and all(grad.dtype == dtype for grad in fast_grads)
    tolerance = {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(fast_out, eager_out, **tolerance)
    for fast_grad, eager_grad in zip(fast_grads, eager_grads):
        torch.testing.assert_close(fast_grad, eager_grad, **tolerance)


class MatmulDtypes(TorchDispatchMode):
    """Records the dtypes of every `aten.mm`'s operands."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default:
            self.dtypes.update(arg.dtype for arg in args[:2])
        return func(*args, **(kwargs or {}))


def test_sorted_mm_half_precision_gemms_stay_float32_under_autocast(monkeypatch):
    """`Trainer(bf16=True)` on a bf16 model runs under autocast, which would cast the loop's float32 GEMM operands back
    to the emulated bf16 (several times slower here): every GEMM, forward and backward, still gets float32 operands,
    and the results are those without autocast, to the bit."""
    gemm_loop_for(monkeypatch, torch.bfloat16)
    _, experts = experts_pair(ClusterMoEExperts, clustermoe_config())
    experts = experts.to(torch.bfloat16)
    hidden = torch.randn(13, 32, dtype=torch.bfloat16)
    top_k_index, top_k_weights = routing(13, 8, top_k=2)
    plain = run_with_grads(experts, hidden, top_k_index, top_k_weights.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16), MatmulDtypes() as matmuls:
        autocast = run_with_grads(experts, hidden, top_k_index, top_k_weights.bfloat16())
    assert matmuls.dtypes == {torch.float32}
    assert torch.equal(autocast[0], plain[0])
    assert all(torch.equal(a, b) for a, b in zip(autocast[1], plain[1]))



@pytest.mark.parametrize("router_implementation", ["flat", "hierarchical"])
@pytest.mark.parametrize("intermediate_size", [16, 15], ids=["aligned", "unaligned"])
def test_a_float64_model_trains_with_sorted_mm_as_with_eager(router_implementation, intermediate_size):
    """torch's grouped_mm kernels take no float64 (they raised at the first forward, for the hierarchical router with
    any experts backend); the GEMM loop rounded float64 to float32. A float64 model (e.g. for `gradcheck`) now
    computes in float64 throughout, routing included, and matches the eager experts to float64 rounding."""
    config = clustermoe_config(intermediate_size=intermediate_size, router_implementation=router_implementation)
    results = logits_and_gradients_per_backend(ClusterMoEForCausalLM(config).double())
    assert results["sorted_mm"][0].dtype == torch.float64
    torch.testing.assert_close(results["sorted_mm"][0], results["eager"][0], rtol=1e-12, atol=1e-12)
    for name, grad in results["eager"][1].items():
        torch.testing.assert_close(results["sorted_mm"][1][name], grad, rtol=1e-12, atol=1e-12, msg=name)


def test_a_float64_model_trains_and_classifies_padded_batches():
    """The balancing losses weighed the tokens by a float32 padding mask, which float64 scatters refused."""
    model = ClusterMoEForCausalLM(clustermoe_config()).double().train()
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    assert out.aux_loss.dtype == torch.float64 and torch.isfinite(out.loss)
    classifier = ClusterMoEForSequenceClassification(clustermoe_config(num_labels=2, pad_token_id=0)).double()
    assert classifier(ids, attention_mask=mask, labels=torch.tensor([0, 1])).loss.dtype == torch.float64


def test_the_gemm_loop_has_exact_float64_gradients():
    """`gradcheck` of the sorted GEMM loop's autograd.Function (its own backward), with an idle expert."""
    inputs = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)  # rows sorted by expert
    groups = [(0, 2), (2, 4)]  # (expert, rows); expert 1 receives none
    for transpose, weight_shape in ((False, (3, 5, 4)), (True, (3, 4, 5))):
        weights = torch.randn(weight_shape, dtype=torch.float64, requires_grad=True)
        grouped = lambda inputs, weights: _SortedGroupedLinear.apply(inputs, weights, groups, transpose)  # noqa: E731
        assert torch.autograd.gradcheck(grouped, (inputs, weights))


def test_a_float64_models_router_z_loss_is_computed_in_float64(tiny_config):
    """The z-loss, logsumexp(logits)^2 on both levels, cast the float64 logits to float32 (off by 1e-9 here)."""
    model = ClusterMoEForCausalLM(clustermoe_config(num_clusters=3, top_k_clusters=2)).double()
    block = model.model.layers[0].mlp
    routing = block.router(torch.randn(6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    z_loss = block._balance_losses(routing, routing.expert_candidates, None)[2]
    expected = routing.cluster_logits.logsumexp(-1).square() + routing.expert_logits.logsumexp(-1).square().mean(-1)
    torch.testing.assert_close(z_loss, expected.mean(), rtol=1e-14, atol=0)
