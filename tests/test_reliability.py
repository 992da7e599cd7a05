"""Reliability tracking and fault tolerance (`use_reliability_routing`)."""

import math

import pytest
import torch
import torch.nn.functional as F

from clustermoe_hf import ClusterMoEConfig, ClusterMoEForCausalLM, modeling_clustermoe


def expert_output(experts, expert, x):
    """One expert's SwiGLU output computed straight from the fused weights."""
    gate, up = F.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, experts.down_proj[expert])


def random_ids(batch_size, length):
    return torch.randint(3, 64, (batch_size, length))


def sequences(generator, batch_size=8, length=16):
    """Learnable data: runs of consecutive token ids."""
    start = torch.randint(3, 60, (batch_size, 1), generator=generator)
    return (start + torch.arange(length)) % 61 + 3


def train_step(model, optimizer, input_ids):
    """One plain-PyTorch step with gradient clipping (as Trainer's max_grad_norm); returns (loss, grad norm)."""
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach(), grad_norm


@pytest.mark.parametrize("host_reads", [True, False], ids=["CPU", "accelerator-like"])
def test_nan_expert_contributes_nothing_and_its_tokens_use_the_other_selected_expert(
    tiny_model, monkeypatch, host_reads
):
    """On an accelerator (no host reads) the gradient guard masks non-finite entries on the device instead."""
    if not host_reads:
        monkeypatch.setattr(modeling_clustermoe, "_host_reads_are_free", lambda tensor: False)
    model = tiny_model()
    block = model.model.layers[0].mlp
    hidden = torch.randn(1, 12, model.config.hidden_size)
    flat = hidden.view(12, -1)
    routing = block.router(flat)
    cluster_logits, cluster_index, expert_logits = routing.cluster_logits, routing.cluster_index, routing.expert_logits
    candidates = routing.expert_candidates
    chosen = cluster_index[:, 0, None] * block.experts_per_cluster + candidates[:, 0]  # (tokens, 2), kc = 1
    broken = int(chosen[0, 0])
    with torch.no_grad():
        block.experts.gate_up_proj[broken] = float("nan")

    hidden.requires_grad_(True)
    output, stats = block(hidden)
    assert bool(stats["expert_faulty"][broken]) and int(stats["expert_faulty"].sum()) == 1

    cluster_probs = F.softmax(cluster_logits, -1).gather(1, cluster_index)[:, 0]
    expert_probs = F.softmax(expert_logits[:, 0], -1).gather(1, candidates[:, 0])
    expert_probs = expert_probs.masked_fill(chosen == broken, 0.0)  # renormalised over the cluster's other experts
    weights = cluster_probs[:, None] * expert_probs / expert_probs.sum(-1, keepdim=True)
    expected = torch.zeros_like(flat)
    with torch.no_grad():
        for token, slot in torch.nonzero(chosen != broken).tolist():
            expected[token] += weights[token, slot] * expert_output(block.experts, chosen[token, slot], flat[token])
    assert (chosen == broken).sum() > 0
    torch.testing.assert_close(output.view(12, -1), expected)

    output.sum().backward()
    assert torch.isfinite(hidden.grad).all()
    for parameter in block.parameters():
        assert torch.isfinite(parameter.grad).all()


def test_a_token_whose_selected_experts_are_all_faulty_gets_a_zero_output_and_finite_gradients(tiny_model):
    model = tiny_model()
    block = model.model.layers[0].mlp
    hidden = torch.randn(1, 12, model.config.hidden_size, requires_grad=True)
    routing = block.router(hidden.detach().view(12, -1))
    chosen = routing.cluster_index[:, 0, None] * block.experts_per_cluster + routing.expert_candidates[:, 0]
    with torch.no_grad():
        block.experts.down_proj[chosen[0]] = float("nan")  # both experts of token 0

    output, stats = block(hidden)
    assert stats["expert_faulty"][chosen[0]].all()
    assert torch.equal(output[0, 0], torch.zeros_like(output[0, 0]))
    untouched = ~torch.isin(chosen, chosen[0]).any(-1)  # tokens that use neither broken expert
    assert untouched.any() and (output[0, untouched] != 0).all(-1).all()
    output.sum().backward()
    assert torch.isfinite(hidden.grad).all()
    assert torch.isfinite(block.router.cluster_weight.grad).all()
    assert torch.isfinite(block.router.expert_weight.grad).all()


def test_non_finite_expert_gradients_of_healthy_experts_reach_the_gradient_scaler(tiny_model):
    """Expert gradients are cleaned only after a faulty expert was masked: a loss-scale overflow must reach the
    scaler, which then skips the step and lowers the scale."""
    model = tiny_model().train()
    ids = sequences(torch.Generator().manual_seed(0), batch_size=2, length=8)
    down_proj = model.model.layers[0].mlp.experts.down_proj
    before = down_proj.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # the scaled loss overflows: infinite gradients
    scaler.scale(model(ids, labels=ids).loss).backward()
    assert not down_proj.grad.isfinite().all()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**126 and torch.equal(down_proj, before)  # the step was skipped


def test_broken_experts_do_not_reach_real_tokens_through_padding(tiny_model):
    """Padding tokens' pairs are neither computed nor judged. Here the padding token goes to a cluster whose experts
    are all broken and which no real token uses: a NaN output at the padding positions would reach the real tokens in
    the next layer's attention, whose masked keys still weigh their values by zero (0 * NaN is NaN)."""
    model = tiny_model(use_adaptive_routing=True)
    router = model.model.layers[0].mlp.router
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.0
        model.model.embed_tokens.weight[model.config.pad_token_id, 0] = 10.0  # the padding token points along dim 0
        router.cluster_weight[1] = 0.0
        router.cluster_weight[1, 0] = 50.0  # dim 0 -> cluster 1 ...
        router.cluster_bias[1] = -100.0  # ... strongly enough for the padding token only
        model.model.layers[0].mlp.experts.down_proj[4:] = float("nan")  # every expert of cluster 1
    ids = torch.randint(3, 64, (2, 8))
    ids[0, :3] = model.config.pad_token_id
    attention_mask = (ids != model.config.pad_token_id).long()
    assert model.model(ids, attention_mask=attention_mask).routing_stats[0]["expert_counts"][4:].sum() == 0
    logits = model(ids, attention_mask=attention_mask).logits
    assert torch.isfinite(logits[attention_mask.bool()]).all()


def test_without_reliability_routing_a_nan_expert_poisons_the_output(tiny_model):
    """Counterpart of the test above: the masking is what keeps the output finite."""
    model = tiny_model(use_reliability_routing=False)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.gate_up_proj.fill_(float("nan"))
    assert torch.isnan(model(torch.randint(3, 64, (1, 8))).logits).all()


def _count_per_pair_calls(monkeypatch, model) -> list:
    """Spy: one entry per MoE block forward that ran its experts pair by pair (`_experts_per_pair`)."""
    calls = []
    for layer in model.model.layers:
        per_pair = layer.mlp._experts_per_pair
        monkeypatch.setattr(layer.mlp, "_experts_per_pair", lambda *args, f=per_pair: calls.append(1) or f(*args))
    return calls


def _judge_every_pair(monkeypatch, model):
    for layer in model.model.layers:
        monkeypatch.setattr(layer.mlp, "_may_skip_pair_checks", lambda hidden, judges_experts, settings: False)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm", "sorted_mm"])
def test_inference_calls_the_experts_once_weighted_and_gives_what_judging_each_pair_gives(
    tiny_model, monkeypatch, implementation
):
    """Outside training only non-finite pair outputs are masked. On CPU, where reading a value costs no sync, the
    experts run as one weighted call over the tokens, as other MoE models call them, and a finite output shows that
    there was nothing to mask."""
    model = tiny_model()
    model.set_experts_implementation(implementation)
    ids = random_ids(2, 12)
    per_pair_calls = _count_per_pair_calls(monkeypatch, model)
    with torch.no_grad():
        weighted = model(ids).logits
    assert per_pair_calls == []
    _judge_every_pair(monkeypatch, model)
    with torch.no_grad():
        judged = model(ids).logits
    assert len(per_pair_calls) == 2
    torch.testing.assert_close(weighted, judged, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm", "sorted_mm"])
def test_in_half_precision_the_per_pair_path_rounds_as_the_weighted_call_does(tiny_model, monkeypatch, implementation):
    """Both weigh the outputs with the float32 weights and round once, so that a token's output does not depend on
    which path its layer took, which the rest of the batch decides (a non-finite output elsewhere, padding)."""
    model = tiny_model().to(torch.bfloat16)
    model.set_experts_implementation(implementation)
    ids = random_ids(2, 12)  # 48 pairs: more than sorted_mm's per-pair inference path takes
    with torch.no_grad():
        weighted = model(ids).logits
    _judge_every_pair(monkeypatch, model)
    with torch.no_grad():
        judged = model(ids).logits
    assert torch.equal(weighted, judged)


def test_a_half_precision_training_step_hands_the_experts_float32_unit_weights(tiny_model, monkeypatch):
    """Training forwards judge each pair, so the experts run with a weight of 1 per pair. In the router's float32, as
    a weighted call's weights are, the backends sum each pair's single output in float32, not in torch's bf16
    reduction (~5x slower on CPU); the outputs are the same, as the test above shows."""
    model = tiny_model().to(torch.bfloat16).train()
    experts = model.model.layers[0].mlp.experts
    forward, weight_dtypes = experts.forward, []
    monkeypatch.setattr(experts, "forward", lambda h, i, w: weight_dtypes.append(w.dtype) or forward(h, i, w))
    model(random_ids(2, 12), labels=random_ids(2, 12)).loss.backward()
    assert weight_dtypes == [torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_in_half_precision_decodings_per_pair_experts_round_as_the_weighted_call_does(tiny_model, monkeypatch, dtype):
    """Where the CPU has half-precision GEMMs, `sorted_mm` runs decoding's few pairs one by one: there too the outputs
    are weighted in float32 and summed before rounding once (the sum was in 16 bits, off by up to 0.03), as the block
    combines what each pair gives, and `grouped_mm` its weighted call."""
    functions = modeling_clustermoe.sorted_mm_experts_forward.__globals__
    monkeypatch.setitem(functions, "_CPU_DTYPES_WITHOUT_FAST_GEMM", frozenset())  # a CPU with native 16-bit GEMMs
    per_pair_experts, pairs = functions["_per_pair_experts_forward"], []
    monkeypatch.setitem(functions, "_per_pair_experts_forward", lambda *a: pairs.append(1) or per_pair_experts(*a))
    model = tiny_model(initializer_range=0.2).to(dtype).eval()
    ids = random_ids(1, 4)  # 4 tokens x 2 experts: the per-pair path's 8 pairs at most
    with torch.no_grad():
        weighted = model(ids).logits
        model.set_experts_implementation("grouped_mm")
        grouped = model(ids).logits
        model.set_experts_implementation("sorted_mm")
        _judge_every_pair(monkeypatch, model)
        judged = model(ids).logits
    assert pairs  # the path under test ran
    assert torch.equal(weighted, grouped) and torch.equal(weighted, judged)


def _break_cluster_0(monkeypatch, experts, how: str):
    """Every expert of cluster 0 (ids 0-3) gives non-finite outputs: NaN weights, or outputs of +inf."""
    if how == "nan weights":
        with torch.no_grad():
            experts.down_proj[:4] = float("nan")
        return
    forward = experts.forward

    def infinite_outputs(hidden, top_k_index, top_k_weights):
        output = forward(hidden, top_k_index, top_k_weights)
        return output.masked_fill((top_k_index < 4).any(-1, keepdim=True), float("inf"))

    monkeypatch.setattr(experts, "forward", infinite_outputs)


@pytest.mark.parametrize("how", ["nan weights", "infinite outputs"])
def test_a_non_finite_output_in_inference_is_judged_pair_by_pair(tiny_model, monkeypatch, how):
    """The weighted call cannot tell which pair was not finite: that layer runs again pair by pair, which masks the
    broken pairs only."""
    model = tiny_model()
    _break_cluster_0(monkeypatch, model.model.layers[0].mlp.experts, how)
    ids = random_ids(2, 12)
    per_pair_calls = _count_per_pair_calls(monkeypatch, model)
    with torch.no_grad():
        logits = model(ids).logits
        counts = model.model(ids, output_routing_stats=True).routing_stats[0]["expert_counts"]
    assert counts[:4].sum() > 0 and counts[4:].sum() > 0  # both clusters serve tokens
    assert len(per_pair_calls) == 1 + 1  # layer 0 in each forward; layer 1 is finite
    assert torch.isfinite(logits).all()
    _judge_every_pair(monkeypatch, model)
    with torch.no_grad():
        judged = model(ids).logits
    torch.testing.assert_close(logits, judged, rtol=1e-6, atol=1e-6)


def test_finite_half_precision_outputs_whose_sum_overflows_are_not_judged_again(tiny_model, monkeypatch):
    """The finiteness check sums in float32: 24 tokens x 32 channels of 3000 overflow a float16 sum (max 65504)."""
    model = tiny_model().to(torch.float16)
    experts = model.model.layers[0].mlp.experts
    forward = experts.forward
    monkeypatch.setattr(experts, "forward", lambda *args: forward(*args) + 3000.0)
    per_pair_calls = _count_per_pair_calls(monkeypatch, model)
    with torch.no_grad():
        logits = model(random_ids(2, 12)).logits
    assert torch.isfinite(logits).all()
    assert per_pair_calls == []


def test_without_reliability_routing_training_calls_the_experts_once_weighted(tiny_model, monkeypatch):
    """Nothing is judged without reliability routing, in training too: the loss, the gradients and the routing
    statistics are those of the per-pair call."""
    model = tiny_model(use_reliability_routing=False).train()
    ids = random_ids(2, 12)

    def run():
        torch.manual_seed(0)  # router jitter
        model.zero_grad()
        output = model(ids, labels=ids)
        output.loss.backward()
        return output.loss, [p.grad.clone() for p in model.parameters()]

    per_pair_calls = _count_per_pair_calls(monkeypatch, model)
    weighted = run()
    assert per_pair_calls == []
    _judge_every_pair(monkeypatch, model)
    judged = run()
    assert len(per_pair_calls) == 2
    torch.testing.assert_close(weighted[0], judged[0], rtol=1e-6, atol=1e-6)
    for weighted_grad, judged_grad in zip(weighted[1], judged[1]):
        torch.testing.assert_close(weighted_grad, judged_grad, rtol=1e-5, atol=1e-6)


def _outsized_expert_model(tiny_model):
    """A model whose layer-0 expert 1 gives outputs 300x too large (> reliability_max_norm_ratio = 100), but finite."""
    model = tiny_model(top_k_experts=1, router_jitter_noise=0.0, initializer_range=0.2)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[1] *= 300.0
    return model


def test_a_training_forward_masks_an_outsized_expert(tiny_model):
    """Training forwards judge each expert against the other experts of its cluster over the batch."""
    block = _outsized_expert_model(tiny_model).model.layers[0].mlp
    hidden = torch.randn(1, 32, block.config.hidden_size)
    with torch.no_grad():
        routing = block.router(hidden.view(32, -1))
        chosen = routing.cluster_index[:, 0] * block.experts_per_cluster + routing.expert_candidates[:, 0, 0]
        served_by_outsized = (chosen == 1).nonzero().view(-1)
        inference = block(hidden)[0].view(32, -1)
    assert len(served_by_outsized) > 0
    training, stats = block.train()(hidden)
    training = training.detach().view(32, -1)
    assert stats["expert_faulty"].nonzero().view(-1).tolist() == [1]
    assert (training[served_by_outsized] == 0).all()  # its tokens' only expert contributed nothing
    assert (inference[served_by_outsized].norm(dim=-1) > 10 * training.norm(dim=-1).max()).all()  # served in inference


def test_inference_outputs_do_not_depend_on_other_tokens(tiny_model):
    """Outside training, an expert is never judged against other tokens' outputs: with an outsized expert, a token's
    logits still depend only on its own sequence up to it, so cached decoding matches the full forward and a batch
    matches its rows run alone. (Only non-finite outputs are masked there, pair by pair.)"""
    model = _outsized_expert_model(tiny_model)
    ids = random_ids(2, 12)
    with torch.no_grad():
        full = model(ids).logits
        prefix = model(ids[:, :3]).logits
        alone = model(ids[:1]).logits
        step = model(ids[:, :1], use_cache=True)
        incremental = [step.logits]
        for position in range(1, ids.shape[1]):
            step = model(ids[:, position : position + 1], cache=step.cache, use_cache=True)
            incremental.append(step.logits)
    tokens_of_the_outsized_expert = model.model.layers[0].mlp.router.expert_token_counts  # not counted in eval
    assert tokens_of_the_outsized_expert.sum() == 0
    torch.testing.assert_close(prefix, full[:, :3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, full[:1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(incremental, dim=1), full, rtol=1e-5, atol=1e-5)


def test_forwards_without_gradients_in_train_mode_judge_pairs_as_in_eval_mode(tiny_model):
    """`generate` on a model left in train mode (e.g. sampling mid-training) is not a training forward, whatever it
    asks for: it must not mask the outsized expert batch-wide as one does."""
    model = _outsized_expert_model(tiny_model)
    ids = random_ids(2, 12)
    with torch.no_grad():
        evaluated = model(ids).logits
        model.train()
        for inferred in (
            model(ids).logits,
            model(ids, output_router_logits=True).logits,
            model(ids, labels=ids).logits,
            model.lm_head(model.model(ids).last_hidden_state),
        ):
            torch.testing.assert_close(inferred, evaluated, rtol=1e-6, atol=1e-6)
        sequences = model.generate(ids[:, :4], max_new_tokens=4, do_sample=False, output_router_logits=True)
    trained = model(ids).logits.detach()  # with gradients: a training forward, which masks the outsized expert
    assert not torch.allclose(trained, evaluated, rtol=1e-3, atol=1e-3)
    model.eval()
    assert torch.equal(sequences, model.generate(ids[:, :4], max_new_tokens=4, do_sample=False))


def test_health_check_flags_outputs_far_larger_than_the_other_experts_of_the_cluster(tiny_model):
    block = tiny_model().model.layers[0].mlp  # 2 clusters x 4 experts
    direction = torch.nn.functional.normalize(torch.randn(32), dim=0)
    # Cluster 0: experts 0 and 1 observed, expert 1 is 150x larger (> reliability_max_norm_ratio = 100): with only one
    # healthy peer it must still be caught, which needs a reference that leaves the judged expert out.
    # Cluster 1: expert 4 at 50x expert 5: sane. Expert 6 emits inf, expert 7 is not observed.
    norms = {0: 1.0, 1: 150.0, 4: 50.0, 5: 1.0, 6: float("inf")}
    ids = torch.tensor([e for e in norms for _ in range(3)])
    outputs = torch.stack([direction * norms[int(e)] for e in ids])
    faulty = block._faulty_experts(outputs, ids, torch.ones(len(ids), dtype=torch.bool))
    assert faulty.tolist() == [False, True, False, False, False, False, True, False]


@pytest.mark.parametrize("scale, verdict", [(4.0, False), (8.0, True)])
def test_an_expert_exactly_the_max_norm_ratio_above_its_peers_is_healthy(tiny_model, scale, verdict):
    """Faulty means strictly more than `reliability_max_norm_ratio` above the peers' median norm: an expert exactly at
    that ratio is healthy, one above it faulty. Exact in float32: the norms are 1 and powers of two, log(1) = 0, and
    float32's log(4) equals log(4) rounded to float32, the bound the comparison reads. Norms 1 and 4 are past the
    shortcut's bound (4 / 2): the full check decides."""
    block = tiny_model(reliability_max_norm_ratio=4.0).model.layers[0].mlp  # 2 clusters x 4 experts
    unit = torch.zeros(32)
    unit[0] = 1.0
    ids = torch.tensor([0, 1, 2, 3])
    outputs = torch.stack([unit, unit, unit, scale * unit])
    faulty = block._faulty_experts(outputs, ids, None)
    assert faulty.tolist() == [False, False, False, verdict] + [False] * 4


def test_a_non_finite_expert_is_left_out_of_the_reference_its_peers_are_judged_against(tiny_model):
    """An inf output is faulty on its own; as a reference it would raise the bar for its peers, so that an outsized
    expert beside it (1000x its one healthy peer) would pass."""
    block = tiny_model().model.layers[0].mlp  # 2 clusters x 4 experts, reliability_max_norm_ratio = 100
    direction = torch.nn.functional.normalize(torch.randn(32), dim=0)
    norms = {0: 1.0, 1: 1000.0, 2: float("inf")}
    ids = torch.tensor([e for e in norms for _ in range(2)])
    outputs = torch.stack([direction * norms[int(e)] for e in ids])
    assert block._faulty_experts(outputs, ids, None).tolist() == [False, True, True] + [False] * 5

def test_a_dead_expert_does_not_make_its_healthy_peers_look_outsized(tiny_model):
    """An expert with all-zero outputs (zeroed or corrupted weights) is no reference: the median of the others keeps
    its log-norm of ~-28 out of its peers' bar. Two outsized experts among three still vouch for each other."""
    block = tiny_model().model.layers[0].mlp  # 2 clusters x 4 experts, reliability_max_norm_ratio = 100
    direction = torch.nn.functional.normalize(torch.randn(32), dim=0)
    norms = {0: 0.0, 1: 1.0, 2: 1.5, 3: 2.0, 4: 1.0, 5: 500.0, 6: 700.0}  # cluster 1: expert 7 not observed
    ids = torch.tensor([e for e in norms for _ in range(2)])
    outputs = torch.stack([direction * norms[int(e)] for e in ids])
    faulty = block._faulty_experts(outputs, ids, None)
    assert faulty.tolist() == [False] * 8

    # An even number of others: the upper of the two middle ones (here the healthy peer, not the dead one).
    block = tiny_model(experts_per_cluster=3).model.layers[0].mlp
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    outputs = torch.stack([direction * (0.0 if int(e) == 0 else 1.0) for e in ids])
    assert block._faulty_experts(outputs, ids, None).tolist() == [False] * 6


def test_all_zero_outputs_have_no_scale_to_judge_by(tiny_model):
    """A ReLU expert's output is exactly zero for a token whose gates are all off: left out of its expert's geometric
    mean, which one such pair of two would drop a million-fold, so that its healthy peer looked outsized. An expert
    with only all-zero outputs is no reference either, also as the only other expert of its cluster. Outsized
    experts are still flagged next to them."""
    block = tiny_model(experts_per_cluster=2).model.layers[0].mlp  # 2 clusters x 2 experts, max norm ratio 100
    direction = torch.nn.functional.normalize(torch.randn(32), dim=0)
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    cases = {
        (1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0): [False] * 4,  # a ReLU zero; a dead expert next to a healthy one
        (1.0, 0.0, 500.0, 500.0, 0.0, 0.0, 1.0, 1.0): [False, True, False, False],
    }
    for norms, faulty in cases.items():
        outputs = torch.stack([direction * norm for norm in norms])
        assert block._faulty_experts(outputs, ids, None).tolist() == faulty


def test_a_dead_expert_keeps_its_cluster_in_training(tiny_model):
    model = tiny_model(num_hidden_layers=1, reliability_decay=0.5).train()
    block = model.model.layers[0].mlp
    with torch.no_grad():
        block.experts.down_proj[0].zero_()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        train_step(model, optimizer, sequences(generator))
    assert block.router.selection_token_counts[0] > 0  # the dead expert was selected
    assert block.router.expert_reliability.tolist() == [1.0] * 8


@pytest.mark.parametrize(
    "largest, verdict",
    [
        (49.0, None),  # spread <= max ratio / 2: no expert can be outsized, the full check is skipped
        (51.0, [False] * 8),  # beyond the shortcut's bound: the full check runs, and finds nothing
        (99.0, [False] * 8),
        (101.0, [False, True] + [False] * 6),
        (float("nan"), [False, True] + [False] * 6),
    ],
)
def test_health_check_is_skipped_only_when_no_expert_can_be_faulty(tiny_model, largest, verdict):
    """On CPU, when every output norm is finite and within half the max ratio of every other, the full check cannot
    flag anything and is skipped (None). Otherwise it runs, with the verdicts of the test above."""
    block = tiny_model().model.layers[0].mlp  # reliability_max_norm_ratio = 100
    direction = torch.nn.functional.normalize(torch.randn(32), dim=0)
    ids = torch.tensor([0, 0, 1, 1, 2, 3])
    outputs = torch.stack([direction * (largest if int(e) == 1 else 1.0) for e in ids])
    faulty = block._faulty_experts(outputs, ids, None)
    assert (faulty if faulty is None else faulty.tolist()) == verdict


def test_pairs_that_are_not_served_are_not_judged(tiny_model):
    """Pairs of padding tokens or dropped by capacity skip the experts, and `grouped_mm` leaves their output rows
    uninitialised. Whatever those rows hold must decide nothing: otherwise a layer that gradient checkpointing re-runs
    could take another branch than in its forward, and the recomputation fails."""
    block = tiny_model().model.layers[0].mlp
    direction = torch.nn.functional.normalize(torch.randn(32), dim=0)
    ids = torch.tensor([0, 0, 1, 1, 2, 3])
    outputs = torch.stack([direction] * 4 + [direction * float("nan"), direction * 1e30])
    served = torch.tensor([True, True, True, True, False, False])
    assert block._faulty_experts(outputs, ids, served) is None  # the healthy shortcut, as if the rows were absent
    assert block._non_finite_pairs(outputs, served) is None


def test_a_non_finite_pair_that_is_not_served_is_not_reported_beside_one_that_is(tiny_model):
    """With a served pair non-finite, the check past the finite-sum shortcut runs: it must still leave the pairs that
    were not served alone, whose rows `grouped_mm` leaves uninitialised (NaN here), or a pair of padding or dropped by
    capacity would be reported as faulty."""
    direction = torch.nn.functional.normalize(torch.randn(32), dim=0)
    outputs = torch.stack([direction, direction, direction * float("nan"), direction * float("nan")])
    served = torch.tensor([True, True, True, False])
    block = tiny_model().model.layers[0].mlp
    assert block._non_finite_pairs(outputs, served).tolist() == [False, False, True, False]


def test_a_non_finite_row_that_is_not_served_does_not_make_its_expert_faulty_when_the_full_check_runs(tiny_model):
    """Expert 3's outsized outputs (1e6x) make the full check run; expert 0's one NaN row was not served (an
    uninitialised `grouped_mm` row) and must not mark it faulty, while its served rows are healthy."""
    block = tiny_model().model.layers[0].mlp  # 2 clusters x 4 experts, reliability_max_norm_ratio = 100
    direction = torch.nn.functional.normalize(torch.randn(32), dim=0)
    scales = [1.0, 1.0, 1.0, float("nan"), 1e6, 1.0]
    outputs = torch.stack([direction * scale for scale in scales])
    ids = torch.tensor([0, 1, 2, 0, 3, 3])
    served = torch.tensor([True, True, True, False, True, True])
    faulty = block._faulty_experts(outputs, ids, served)
    assert faulty.tolist() == [False, False, False, True] + [False] * 4


def test_skipping_the_health_check_changes_no_output_gradient_or_statistic(tiny_model, monkeypatch):
    model = tiny_model()
    input_ids = torch.randint(3, 64, (2, 12))

    def run():
        torch.manual_seed(0)  # router jitter
        model.zero_grad()
        out = model(input_ids, labels=input_ids)
        out.loss.backward()
        return out, [p.grad.clone() for p in model.parameters()], model.model(input_ids).routing_stats

    model.train()
    blocks = [layer.mlp for layer in model.model.layers]
    shortcuts = []
    for block in blocks:
        original = block._all_pairs_healthy
        shortcut = lambda norms, valid, f=original: shortcuts.append(f(norms, valid)) or True  # noqa: E731
        monkeypatch.setattr(block, "_all_pairs_healthy", shortcut)
    skipped = run()
    assert shortcuts and all(shortcuts)  # these healthy experts are within the shortcut's bound
    for block in blocks:
        monkeypatch.setattr(block, "_all_pairs_healthy", lambda norms, valid: False)
    checked = run()
    assert torch.equal(skipped[0].logits, checked[0].logits) and torch.equal(skipped[0].loss, checked[0].loss)
    assert all(torch.equal(a, b) for a, b in zip(skipped[1], checked[1]))
    for stats_skipped, stats_checked in zip(skipped[2], checked[2]):
        assert stats_skipped.keys() == stats_checked.keys()
        assert all(torch.equal(stats_skipped[key], stats_checked[key]) for key in stats_skipped)


def test_the_gradient_guard_stands_down_after_the_step_of_a_masked_fault(tiny_model):
    """Once the step after a masked fault is taken, non-finite expert gradients reach the gradient scaler again."""
    model = tiny_model().train()
    experts = model.model.layers[0].mlp.experts
    weights = experts.down_proj.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    ids = torch.randint(3, 64, (2, 8))
    with torch.no_grad():
        experts.down_proj.fill_(float("nan"))  # every expert faulty: masked, its gradients cleaned
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        experts.down_proj.copy_(weights)  # repaired
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # the scaled loss overflows
    scaler.scale(model(ids, labels=ids).loss).backward()
    assert not experts.down_proj.grad.isfinite().all()  # left for the scaler, not cleaned
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**126  # the overflow was seen: step skipped, scale lowered


def test_an_optimizer_stepping_in_the_backward_does_not_trip_the_gradient_guard(tiny_model):
    """PyTorch's optimizer-in-backward pattern: a per-parameter optimizer steps and clears `.grad` from a
    post-accumulate-grad hook that runs before the guard's (registered in the first training forward)."""
    model = tiny_model().train()
    optimizers = {parameter: torch.optim.SGD([parameter], lr=1e-3) for parameter in model.parameters()}

    def step_in_backward(parameter):
        optimizers[parameter].step()
        optimizers[parameter].zero_grad(set_to_none=True)

    for parameter in model.parameters():
        parameter.register_post_accumulate_grad_hook(step_in_backward)
    weights = model.model.layers[0].mlp.experts.down_proj.detach().clone()
    ids = torch.randint(3, 64, (2, 8))
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
    assert not torch.equal(model.model.layers[0].mlp.experts.down_proj, weights)
    assert model.get_reliability_stats()["training_step"] == 2  # once per backward, not per parameter stepped


@pytest.mark.parametrize("fault", [False, True], ids=["healthy", "faulty-expert"])
def test_an_optimizer_stepping_in_the_backward_updates_routing_after_a_checkpointed_backward(tiny_model, fault):
    """Under (non-reentrant) gradient checkpointing the layers' forwards re-run inside the backward, after the first
    per-parameter step: the balancing biases and reliabilities they route by must not have changed by then, or the
    recomputation routes differently (torch's checkpoint raises). They change once that backward has finished."""
    model = tiny_model(use_adaptive_routing=True, adaptive_routing_rate=0.1).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    experts = model.model.layers[0].mlp.experts
    if fault:
        with torch.no_grad():
            experts.down_proj[1] = float("nan")
    optimizers = {parameter: torch.optim.SGD([parameter], lr=1e-3) for parameter in model.parameters()}
    guarded_grads_finite = []

    def step_in_backward(parameter):
        if parameter is experts.down_proj:
            guarded_grads_finite.append(bool(parameter.grad[0].isfinite().all()))
        optimizers[parameter].step()
        optimizers[parameter].zero_grad(set_to_none=True)

    for parameter in model.parameters():
        parameter.register_post_accumulate_grad_hook(step_in_backward)
    router = model.model.layers[0].mlp.router
    ids = torch.randint(3, 64, (4, 16))
    for step in (1, 2):
        bias_before = router.expert_bias.clone()
        model(ids, labels=ids).loss.backward()
        assert model.get_reliability_stats()["training_step"] == step  # once per backward, not per parameter
        assert not torch.equal(router.expert_bias, bias_before)
    if fault:
        assert router.expert_reliability[1] < 1.0
    assert all(guarded_grads_finite)  # a healthy expert's rows stay finite


def test_reliability_moves_by_the_healthy_fraction_of_a_steps_observations(tiny_model):
    """Faulty in one of two accumulated micro-batches and healthy in the other: r <- d * r + (1 - d) * 1/2."""
    model = tiny_model(reliability_decay=0.8).train()
    experts = model.model.layers[0].mlp.experts
    weights = experts.down_proj.detach().clone()
    ids = torch.randint(3, 64, (1, 3))  # 6 (token, expert) pairs: some of the 8 experts are not observed
    with torch.no_grad():
        experts.down_proj.fill_(float("nan"))
    model(ids, labels=ids).loss.backward()
    with torch.no_grad():
        experts.down_proj.copy_(weights)
    model(ids, labels=ids).loss.backward()  # the same tokens: the same experts observed, now healthy
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    router = model.model.layers[0].mlp.router
    observed = router.expert_token_counts > 0
    assert observed.any() and not observed.all()
    torch.testing.assert_close(router.expert_reliability[observed], torch.full((int(observed.sum()),), 0.9))
    assert torch.all(router.expert_reliability[~observed] == 1.0)


def test_reliability_ema_after_one_optimizer_step(tiny_model):
    model = tiny_model(reliability_decay=0.8)
    routers = [layer.mlp.router for layer in model.model.layers]
    excluded = 3  # below reliability_threshold: never selected, so never observed, so left alone
    routers[0].expert_reliability[excluded] = 0.3
    input_ids = torch.randint(3, 64, (4, 16))
    broken = int(model.model(input_ids).routing_stats[0]["expert_counts"].argmax())
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[broken] = float("nan")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    counts = routers[0].expert_token_counts.clone()
    assert torch.all(routers[0].selection_token_counts == 0)  # selection's inputs change only at optimizer steps
    optimizer.step()

    assert torch.equal(routers[0].selection_token_counts, counts)
    assert counts[excluded] == 0 and counts[broken] > 0
    reliability = routers[0].expert_reliability
    assert reliability[broken].item() == pytest.approx(0.8)  # 0.8 * 1 + 0.2 * (healthy = 0)
    assert reliability[excluded].item() == pytest.approx(0.3)
    others = [e for e in range(8) if e not in (broken, excluded)]
    assert torch.all(reliability[others] == 1.0)
    assert torch.all(routers[1].expert_reliability == 1.0)
    assert model.get_reliability_stats()["training_step"] == 1


def test_degraded_experts_are_deprioritised_and_excluded_below_the_threshold(tiny_model):
    model = tiny_model(top_k_experts=1)
    router = model.model.layers[0].mlp.router
    with torch.no_grad():
        router.expert_weight.mul_(25)  # spread the router scores (about 1 nat) so a mild penalty shifts, not erases
    hidden = torch.randn(512, model.config.hidden_size)

    def share(expert):
        routing = router(hidden)
        cluster_index, candidates = routing.cluster_index, routing.expert_candidates
        chosen = cluster_index[:, 0] * router.experts_per_cluster + candidates[:, 0, 0]
        return (chosen == expert).float().mean().item()

    def cluster_share(cluster):
        return (router(hidden).cluster_index == cluster).float().mean().item()

    target = max(range(8), key=share)
    partner = (target + 4) % 8  # same place in the other cluster: the clusters stay equally reliable
    healthy, clusters = share(target), router(hidden).cluster_index
    router.expert_reliability[[target, partner]] = 0.6  # above the threshold: a log(0.6) selection penalty
    assert torch.equal(router(hidden).cluster_index, clusters)  # same cluster choices...
    degraded = share(target)  # ...but inside its cluster the expert is chosen less
    router.expert_reliability[[target, partner]] = 0.4  # below the threshold: never selected
    assert 0 < degraded < healthy and share(target) == 0.0

    router.expert_reliability.fill_(1.0)
    healthy_cluster = cluster_share(0)
    router.expert_reliability[:4] = 0.6  # a degraded cluster is deprioritised too
    assert cluster_share(0) < healthy_cluster
    model.config.use_reliability_routing = False
    assert share(target) == pytest.approx(healthy) and cluster_share(0) == pytest.approx(healthy_cluster)


def test_an_expert_exactly_at_the_threshold_stays_selectable(tiny_model):
    """Excluded only below `reliability_threshold`: one faulty step at decay 0.5 lands exactly on a 0.5 threshold."""
    router = tiny_model(reliability_threshold=0.5).model.layers[0].mlp.router
    router.expert_reliability[3] = 0.5
    assert router.selectable_experts()[3]
    router.expert_reliability[3] = 0.4999
    assert not router.selectable_experts()[3]


def test_a_cluster_without_enough_selectable_experts_is_not_chosen(tiny_model):
    model = tiny_model()  # 2 clusters x 4 experts, top-1 cluster, top-2 experts
    router = model.model.layers[0].mlp.router
    with torch.no_grad():
        router.cluster_weight.mul_(50)  # confident cluster preferences: both clusters are wanted by many tokens
    hidden = torch.randn(256, model.config.hidden_size)
    assert (router(hidden).cluster_index == 0).any()
    router.expert_reliability[:3] = 0.4  # one selectable expert left in cluster 0, but a token needs two
    routing = router(hidden)
    assert (routing.cluster_index == 1).all()


@pytest.mark.parametrize("temperature", [1.0, 1e-4])
def test_exclusion_holds_at_every_routing_temperature(tiny_model, temperature):
    """At the lowest temperature a logit gap of 2 is a log-probability gap of 2e4: more than a fixed -1e4 exclusion
    term, which then let the excluded expert (and cluster) win."""
    model = tiny_model(top_k_experts=1)  # 2 clusters x 4 experts
    router = model.model.layers[0].mlp.router
    hidden = torch.zeros(1, model.config.hidden_size)
    hidden[0, 0] = 1.0
    with torch.no_grad():
        router.cluster_weight.zero_()
        router.expert_weight.zero_()
        router.cluster_weight[:, 0] = torch.tensor([3.0, 1.0])  # cluster 0 best by 2 logits
        router.expert_weight[:4, 0] = torch.tensor([3.0, 1.0, 0.0, 0.0])  # in it, expert 0 best by 2
    router.expert_reliability[0] = 0.1
    assert router(hidden).expert_candidates.item() == 1  # selection terms cached at temperature 1...
    model.config.routing_temperature = temperature  # ...and recomputed for this one
    routing = router(hidden)
    assert routing.cluster_index.item() == 0 and routing.expert_candidates.item() == 1
    router.expert_reliability[:4] = 0.1  # no selectable expert left in cluster 0
    assert router(hidden).cluster_index.item() == 1


@pytest.mark.parametrize("temperature", [1.0, 100.0, 1e4])
def test_exclusion_outweighs_the_other_selection_terms_at_high_temperatures(tiny_model, temperature):
    """High temperatures flatten the log-probabilities; the exclusion term must still outweigh the log-reliability of
    the selectable experts (here log 0.3) and their biases."""
    model = tiny_model(reliability_threshold=0.25, routing_temperature=temperature, top_k_clusters=2)
    router = model.model.layers[0].mlp.router
    router.expert_reliability.copy_(torch.tensor([0.0, 0.3, 0.3, 0.3, 1.0, 1.0, 1.0, 1.0]))  # expert 0 excluded
    routing = router(torch.randn(64, model.config.hidden_size))
    chosen = routing.cluster_index[..., None] * router.experts_per_cluster + routing.expert_candidates
    assert not (chosen == 0).any()


def test_a_nan_reliability_reads_as_zero(tiny_model):
    """Only a corrupted buffer holds a NaN reliability. Its expert must count as failed, not poison its cluster's
    score: `topk` would rank a NaN cluster first and send every token to it."""
    corrupted, zeroed = tiny_model(), tiny_model()
    zeroed.load_state_dict(corrupted.state_dict())
    with torch.no_grad():
        for model in (corrupted, zeroed):
            model.model.layers[0].mlp.router.cluster_weight.mul_(50)  # both clusters wanted by many tokens
    corrupted.model.layers[0].mlp.router.expert_reliability[1] = float("nan")
    zeroed.model.layers[0].mlp.router.expert_reliability[1] = 0.0
    hidden = torch.randn(256, corrupted.config.hidden_size)

    routing = corrupted.model.layers[0].mlp.router(hidden)
    expected = zeroed.model.layers[0].mlp.router(hidden)
    assert (routing.cluster_index == 1).any() and (routing.cluster_index == 0).any()
    assert torch.equal(routing.cluster_index, expected.cluster_index)
    assert torch.equal(routing.expert_candidates, expected.expert_candidates)
    stats, expected_stats = corrupted.get_reliability_stats(), zeroed.get_reliability_stats()
    assert math.isnan(stats.pop("layer_0_cluster_0_expert_1_reliability"))  # the expert's own entry shows the fault
    expected_stats.pop("layer_0_cluster_0_expert_1_reliability")
    assert stats == pytest.approx(expected_stats)  # clusters, layers and the model: finite, as if it were 0
    assert corrupted.prune_experts(experts_per_cluster_keep=3, rank_by="reliability")[0][:3] == [0, 2, 3]


def test_capacity_overflow_is_not_rerouted_to_an_excluded_expert(tiny_model):
    model = tiny_model(expert_capacity_factor=1.0, num_clusters=1, experts_per_cluster=2, top_k_experts=1)
    block = model.model.layers[0].mlp
    block.router.expert_reliability[1] = 0.1  # below the threshold: never selected
    _, stats = block(torch.randn(1, 32, model.config.hidden_size))
    assert stats["expert_counts"].tolist() == [16, 0]  # capacity 16 for 32 tokens: expert 0 takes its share...
    assert stats["rerouted_pairs"] == 0 and stats["dropped_pairs"] == 16  # ...the rest is dropped, not re-routed


def test_a_dropped_pair_of_a_faulty_expert_keeps_its_weight_in_training_forwards_too(tiny_model):
    """A pair the capacity limit drops contributes nothing and the token's other pairs keep their weights, also where
    a training forward judges the dropped pair's expert faulty (from its other pairs): the dropped pair never ran, so
    it is not masked as faulty, which would renormalise the token's other weights. Training and eval forwards then
    agree."""
    model = tiny_model(num_clusters=1, experts_per_cluster=4, top_k_experts=2, expert_capacity_factor=0.5)
    block = model.model.layers[0].mlp  # capacity: 1 pair per expert for 2 tokens x 2 pairs
    with torch.no_grad():
        block.router.expert_weight.zero_()
        block.router.expert_weight[:, :4].copy_(torch.eye(4))  # expert logits: a token's first four hidden values
        block.experts.down_proj[0] = float("nan")
    hidden = torch.zeros(1, 2, model.config.hidden_size)
    hidden[0, 0, :4] = torch.tensor([2.0, 1.0, 0.5, 0.0])  # experts 0 and 1, both served
    hidden[0, 1, :4] = torch.tensor([2.0, 0.5, 1.0, 0.0])  # expert 0 full, so dropped; expert 2 served
    with torch.no_grad():
        eval_output, eval_stats = block.eval()(hidden)
    training_output, training_stats = block.train()(hidden.requires_grad_())
    assert training_stats["dropped_pairs"] == eval_stats["dropped_pairs"] == 1
    assert training_stats["expert_faulty"].tolist() == [True, False, False, False]
    probs = hidden[0, 1, :4].detach().softmax(-1)  # P(expert), in the one cluster
    token_output = probs[2] / (probs[0] + probs[2]) * expert_output(block.experts, 2, hidden[0, 1])
    torch.testing.assert_close(eval_output[0, 1], token_output)
    torch.testing.assert_close(training_output[0, 1], token_output)


def test_reliability_stats_aggregate_by_utilisation(tiny_model):
    model = tiny_model()
    for layer_idx, layer in enumerate(model.model.layers):
        router = layer.mlp.router
        router.expert_reliability.copy_(torch.tensor([1.0, 0.5, 1.0, 1.0, 0.2, 1.0, 1.0, 1.0]))
        router.expert_token_counts.copy_(torch.tensor([9, 29, 0, 0, 99, 0, 0, layer_idx]))
    stats = model.get_reliability_stats()

    # Weights are counts + 1, so unused experts still count.
    cluster_0 = (10 * 1.0 + 30 * 0.5 + 1 + 1) / 42
    cluster_1 = (100 * 0.2 + 1 + 1 + 1) / 103
    layer_0 = (10 + 15 + 2 + 20 + 3) / 145
    layer_1 = (10 + 15 + 2 + 20 + 2 + 2) / 146
    assert stats["layer_0_cluster_0_reliability"] == pytest.approx(cluster_0)
    assert stats["layer_0_cluster_1_reliability"] == pytest.approx(cluster_1)
    assert stats["layer_0_cluster_0_expert_1_reliability"] == pytest.approx(0.5)
    assert stats["layer_1_cluster_1_expert_0_reliability"] == pytest.approx(0.2)
    assert stats["layer_0_reliability"] == pytest.approx(layer_0)
    assert stats["layer_1_reliability"] == pytest.approx(layer_1)
    assert stats["model_reliability"] == pytest.approx((layer_0 + layer_1) / 2)
    assert stats["training_step"] == 0
    assert model(torch.randint(3, 64, (1, 4))).model_reliability.item() == pytest.approx(stats["model_reliability"])

    summary = model.get_model_summary()
    assert summary["reliability"] == stats
    assert (summary["num_clusters"], summary["experts_per_cluster"], summary["num_experts"]) == (2, 4, 8)


def test_model_summary_parameter_counts(tiny_model):
    model = tiny_model()
    summary = model.get_model_summary()
    expert_size = 3 * 32 * 16  # gate, up, down of one expert
    assert summary["total_params"] == sum(p.numel() for p in model.parameters())
    # A token runs 2 of the 8 experts in each of the 2 MoE layers.
    assert summary["active_params_per_token"] == summary["total_params"] - 2 * 6 * expert_size

    # 4 of 12 experts: a third, which float arithmetic can round down (one parameter short).
    model = tiny_model(num_clusters=3, experts_per_cluster=4, top_k_clusters=2, top_k_experts=2)
    summary = model.get_model_summary()
    assert summary["active_params_per_token"] == summary["total_params"] - 2 * (12 - 4) * expert_size


def test_fault_injection_during_training(tiny_config):
    """NaN, then huge weights injected into one expert mid-run: the loss stays finite, training goes on, the expert
    stops receiving tokens within a few steps, its score shows it, and re-initialising it lets it recover."""
    torch.manual_seed(0)
    model = ClusterMoEForCausalLM(tiny_config(reliability_decay=0.5)).train()
    block = model.model.layers[1].mlp
    router = block.router
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []

    def run(steps):
        """Train; returns each step's share of layer 1's token assignments per expert, (steps, N)."""
        shares = []
        for _ in range(steps):
            before = router.expert_token_counts.clone()
            loss, grad_norm = train_step(model, optimizer, sequences(generator))
            assert torch.isfinite(loss) and torch.isfinite(grad_norm)
            losses.append(loss.item())
            counts = (router.expert_token_counts - before).float()
            shares.append(counts / counts.sum())
        return torch.stack(shares)

    run(4)
    target = int(router.expert_token_counts.argmax())  # the busiest expert
    cluster, expert = divmod(target, block.experts_per_cluster)
    key = f"layer_1_cluster_{cluster}_expert_{expert}_reliability"
    for corrupt in (lambda: block.experts.down_proj[target].fill_(float("nan")),
                    lambda: block.experts.gate_up_proj[target].mul_(1e3)):  # fmt: skip
        with torch.no_grad():
            corrupt()
        shares = run(8)
        # decay 0.5: 0.5 after one faulty step (a log(0.5) selection penalty), excluded once chosen again.
        assert shares[0, target] > 0.05
        assert shares[1:, target].mean() < 0.01 and shares[-3:, target].sum() == 0
        stats = model.get_reliability_stats()
        assert stats[key] <= 0.5
        assert stats["layer_1_reliability"] < 1.0 and stats["layer_0_reliability"] == 1.0
        assert model(sequences(generator)).model_reliability < 1.0
        for name, parameter in model.named_parameters():  # nothing else was damaged
            if name.startswith("model.layers.1.mlp.experts."):
                parameter = torch.cat([parameter[:target], parameter[target + 1 :]])
            assert torch.isfinite(parameter).all(), name

        model.reinitialize_expert(1, cluster, expert)
        assert model.get_reliability_stats()[key] == 1.0
        shares = run(4)
        assert shares[:, target].mean() > 0.02
        assert model.get_reliability_stats()[key] == 1.0
    assert losses[-1] < losses[0] - 0.5  # training went on


@pytest.mark.parametrize(
    "indices, error",
    [((0, 0, 0), "Layer 0 is not a MoE layer; MoE layers are \\[1\\]"), ((1, 2, 0), "No expert 0 in cluster 2"),
     ((1, 0, -1), "No expert -1"), ((1, True, 0), "integer indices"), ((1, 0, 1.0), "integer indices"),
     ((torch.tensor(1), 0, 0), "integer indices")],
)  # fmt: skip
def test_reinitialize_expert_rejects_an_expert_that_does_not_exist_and_changes_nothing(tiny_model, indices, error):
    model = tiny_model(first_k_dense_layers=1)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=error):
        model.reinitialize_expert(*indices)
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_reinitialize_expert_rejects_an_optimizer_that_is_not_one_and_changes_nothing(tiny_model):
    """A name or a scheduler where the optimizer goes failed with an AttributeError after the weights were redrawn."""
    model = tiny_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"optimizer must be the torch.optim.Optimizer training the model .*'adam'"):
        model.reinitialize_expert(0, 0, 0, optimizer="adam")
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_reinitialize_expert_clears_the_optimizer_state_of_the_old_expert(tiny_model):
    """Adam's moments of the broken expert kept moving the new weights, step after step, with zero gradients."""
    model = tiny_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    ids = random_ids(2, 8)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    experts = model.model.layers[1].mlp.experts
    model.reinitialize_expert(1, 1, 1, optimizer=optimizer)  # global expert 5
    drawn = [experts.gate_up_proj[5].clone(), experts.down_proj[5].clone()]
    for weights in (experts.gate_up_proj, experts.down_proj):
        state = optimizer.state[weights]
        assert state["exp_avg"][5].eq(0).all() and state["exp_avg_sq"][5].eq(0).all()
        assert state["exp_avg"][4].ne(0).any()  # its neighbours keep theirs
    optimizer.zero_grad(set_to_none=False)  # a step without gradients leaves the new expert as drawn
    optimizer.step()
    assert torch.equal(experts.gate_up_proj[5], drawn[0]) and torch.equal(experts.down_proj[5], drawn[1])


def test_reinitialize_expert_between_backward_and_step_drops_the_old_experts_gradient(tiny_model):
    model = tiny_model().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    ids = random_ids(2, 8)
    model(ids, labels=ids).loss.backward()
    block = model.model.layers[1].mlp
    experts = block.experts
    target, neighbour = experts.down_proj.grad.flatten(1).ne(0).any(-1).nonzero().flatten()[:2].tolist()
    model.reinitialize_expert(1, *divmod(target, block.experts_per_cluster), optimizer=optimizer)
    drawn = [experts.gate_up_proj[target].clone(), experts.down_proj[target].clone()]
    kept = experts.down_proj[neighbour].clone()
    optimizer.step()
    assert torch.equal(experts.gate_up_proj[target], drawn[0]) and torch.equal(experts.down_proj[target], drawn[1])
    assert not torch.equal(experts.down_proj[neighbour], kept)  # the other experts' gradients are kept


def _reinitialize_worker(rank, output_dir, config):
    torch.manual_seed(0)
    model = ClusterMoEForCausalLM(config).train()
    torch.manual_seed(rank)  # e.g. set_seed(..., device_specific=True): each process draws differently
    model.reinitialize_expert(1, 0, 1)
    torch.save(model.model.layers[1].mlp.experts.state_dict(), f"{output_dir}/rank{rank}.pt")


def test_reinitialize_expert_gives_every_process_the_same_new_expert(tiny_config, tmp_path, run_two_processes):
    """DDP synchronises gradients, not weights: replicas that drew different experts stayed different for good."""
    run_two_processes(_reinitialize_worker, str(tmp_path), tiny_config())
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2))
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_reinitialize_expert_zeroes_only_optimizer_state_that_starts_at_zero(tiny_model, caplog):
    """Rprop starts its step sizes at the learning rate: zeroed, they froze the new expert."""
    model = tiny_model().train()
    optimizer = torch.optim.Rprop(model.parameters(), lr=1e-2)
    ids = random_ids(2, 8)
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    state = optimizer.state[model.model.layers[1].mlp.experts.down_proj]
    step_sizes = state["step_size"].clone()
    with caplog.at_level("WARNING"):
        model.reinitialize_expert(1, 1, 1, optimizer=optimizer)  # global expert 5
    assert state["prev"][5].eq(0).all() and state["prev"][4].ne(0).any()
    assert torch.equal(state["step_size"], step_sizes)
    assert "left the optimizer's step_size" in caplog.text


def test_reinitialize_expert_sets_adagrad_sums_back_to_their_starting_value(tiny_model, caplog):
    model = tiny_model().train()
    optimizer = torch.optim.Adagrad(model.parameters(), lr=1e-2, initial_accumulator_value=0.5)
    ids = random_ids(2, 8)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    state = optimizer.state[model.model.layers[1].mlp.experts.down_proj]
    with caplog.at_level("WARNING"):
        model.reinitialize_expert(1, 1, 1, optimizer=optimizer)  # global expert 5
    assert state["sum"][5].eq(0.5).all() and state["sum"][4].gt(0.5).any()
    assert "left the optimizer's" not in caplog.text


def test_reinitialize_expert_leaves_factored_optimizer_statistics_with_a_warning(tiny_model, caplog):
    """Adafactor's row/column variances are not shaped like the weights; zeros there would divide by zero."""
    model = tiny_model().train()
    optimizer = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    ids = random_ids(2, 8)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    state = optimizer.state[model.model.layers[1].mlp.experts.down_proj]
    before = {name: value.clone() for name, value in state.items() if torch.is_tensor(value)}
    with caplog.at_level("WARNING"):
        model.reinitialize_expert(1, 1, 1, optimizer=optimizer)
    assert "left the optimizer's row_var" in caplog.text
    assert all(torch.equal(state[name], value) for name, value in before.items())


def _sharded_reinitialize_worker(rank, checkpoint, sharding, output_dir):
    from torch.distributed.tensor.debug import CommDebugMode
    from transformers.distributed import DistributedConfig

    parallel = {
        "tensor": DistributedConfig(tp_size=2),
        "fsdp2": DistributedConfig(fsdp_size=2),
        "expert": DistributedConfig(tp_size=2, ep_size=2, enable_expert_parallel=True),
    }[sharding]
    model = ClusterMoEForCausalLM.from_pretrained(checkpoint, distributed_config=parallel).train()
    experts = model.model.layers[1].mlp.experts
    assert all(type(weights.data).__name__ == "DTensor" for weights in (experts.gate_up_proj, experts.down_proj))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    fused = (experts.gate_up_proj, experts.down_proj)
    old = [weights.data.full_tensor() for weights in fused]
    # On a sharded DTensor, `weights[expert]` is a copy: the draw was lost (or a broadcast of it raised).
    with CommDebugMode() as communication:
        model.reinitialize_expert(1, 0, 1, optimizer=optimizer)
    # One broadcast of each new row; each process writes the part its shard holds, nothing is gathered.
    assert communication.get_comm_counts() == {torch.ops.c10d.broadcast_: 2}, communication.get_comm_counts()
    new = [weights.data.full_tensor() for weights in fused]
    moments = [optimizer.state[weights]["exp_avg"].full_tensor() for weights in fused]
    torch.save((old, new, moments), f"{output_dir}/rank{rank}.pt")


@pytest.mark.parametrize("sharding", ["tensor", "fsdp2", "expert"])
def test_reinitialize_expert_of_a_sharded_model(tiny_config, tmp_path, run_two_processes, sharding):
    ClusterMoEForCausalLM(tiny_config(num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "model")
    run_two_processes(_sharded_reinitialize_worker, str(tmp_path / "model"), sharding, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for old, new, moments in results:
        for before, after, moment in zip(old, new, moments):
            assert not torch.equal(before[1], after[1]) and torch.equal(before[[0, 2, 3]], after[[0, 2, 3]])
            assert moment[1].eq(0).all() and moment[[0, 2, 3]].ne(0).any()
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_reinitialize_expert_takes_numpy_integers(tiny_model):
    """As `np.argmax` or `divmod` over numpy counts return them."""
    np = pytest.importorskip("numpy")
    model = tiny_model()
    router = model.model.layers[1].mlp.router
    router.expert_reliability[5] = 0.2
    model.reinitialize_expert(np.int64(1), np.int64(1), np.int64(1))
    assert router.expert_reliability[5] == 1.0


def test_reset_reliability_readmits_an_excluded_expert(tiny_model):
    model = tiny_model().train()
    router = model.model.layers[0].mlp.router
    router.expert_reliability[:4] = 0.1  # cluster 0 fully excluded from expert selection
    input_ids = torch.randint(3, 64, (4, 16))
    model(input_ids)
    assert router.expert_token_counts[:4].sum() == 0  # (cluster 0 is also deprioritised at the cluster level)
    model.reset_reliability()
    assert torch.all(router.expert_reliability == 1.0)
    model(input_ids)
    assert router.expert_token_counts[:4].sum() > 0


@pytest.mark.parametrize("forget", ["reset_reliability", "reinitialize_expert"])
def test_forgetting_faults_between_backward_and_step_is_not_undone_by_the_step(tiny_model, forget):
    model = tiny_model().train()
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[:4] = float("nan")  # every expert of cluster 0
    ids = torch.randint(3, 64, (4, 16))
    model(ids, labels=ids).loss.backward()
    assert model.model.routing_state.pending_observed[0, :4].sum() > 0  # faults observed, pending for the step
    if forget == "reset_reliability":
        model.reset_reliability()
    else:
        for expert in range(4):
            model.reinitialize_expert(0, 0, expert)
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    assert torch.all(model.model.layers[0].mlp.router.expert_reliability[:4] == 1.0)


def test_eval_inference_and_no_grad_do_not_update_reliability(tiny_model):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[:2] = float("nan")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    input_ids = torch.randint(3, 64, (2, 8))
    model.eval()
    model(input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    model.train()
    with torch.no_grad():
        model(input_ids)
        model(input_ids, labels=input_ids)  # observes the experts' health, but is no training forward either
    optimizer.step()
    assert model.get_reliability_stats()["training_step"] == 0
    assert torch.all(model.model.layers[0].mlp.router.expert_reliability == 1.0)
    assert model.model.layers[0].mlp.router.expert_token_counts.sum() == 0


def test_a_training_forward_is_applied_at_the_next_step_even_after_switching_to_eval(tiny_model):
    """E.g. a validation forward between the backward and the optimizer step."""
    model = tiny_model(use_adaptive_routing=True).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    input_ids = torch.randint(3, 64, (2, 8))
    model(input_ids, labels=input_ids).loss.backward()
    model.eval()
    with torch.no_grad():
        model(input_ids)
    optimizer.step()
    assert model.get_reliability_stats()["training_step"] == 1
    assert not model.model.routing_state.has_pending_updates
    assert model.model.layers[0].mlp.router.expert_bias.abs().sum() > 0  # the balancing biases took their step


def test_reliability_state_survives_save_and_load(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    router = model.model.layers[1].mlp.router
    router.expert_reliability.copy_(torch.linspace(0.2, 1.0, 8))
    router.expert_token_counts.copy_(torch.arange(8))
    # and every other piece of routing state, each away from its initial value
    router.selection_token_counts.copy_(torch.arange(10, 18))
    router.expert_bias.copy_(torch.linspace(-0.1, 0.1, 8))
    router.cluster_bias.copy_(torch.tensor([0.05, -0.05]))
    model.model.routing_state.rerouted_pair_counts.copy_(torch.tensor([3, 4]))
    model.model.routing_state.dropped_pair_counts.copy_(torch.tensor([5, 6]))
    model.model.routing_state.training_step.fill_(17)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.get_reliability_stats() == pytest.approx(model.get_reliability_stats())
    assert reloaded.get_reliability_stats()["training_step"] == 17
    saved = model.state_dict()
    assert all(torch.equal(tensor, saved[name]) for name, tensor in reloaded.state_dict().items())
    routing_buffers = {name for name, _ in model.named_buffers() if ".router." in name or "routing_state." in name}
    pending = {f"model.routing_state.pending_{name}" for name in ("counts", "observed", "healthy")}  # per step only
    assert routing_buffers - saved.keys() == pending


def test_trainer_resume_restores_reliability_state(tiny_config, tmp_path):
    from transformers import Trainer, TrainingArguments

    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 64, (16, 16), generator=generator)]

    def trainer(model, max_steps):
        args = TrainingArguments(
            output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4, save_steps=2,
            report_to="none", use_cpu=True, logging_steps=100, disable_tqdm=True,
        )  # fmt: skip
        return Trainer(model=model, args=args, train_dataset=data)

    model = ClusterMoEForCausalLM(tiny_config())
    model.model.layers[0].mlp.router.expert_reliability[5] = 0.3  # excluded, so it keeps this value
    trainer(model, max_steps=2).train()
    saved = model.get_reliability_stats()
    assert saved["training_step"] == 2

    resumed = ClusterMoEForCausalLM(tiny_config())
    assert resumed.get_reliability_stats()["training_step"] == 0
    trainer(resumed, max_steps=3).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    stats = resumed.get_reliability_stats()
    assert stats["training_step"] == 3
    assert stats["layer_0_cluster_1_expert_1_reliability"] == pytest.approx(0.3)
    counts = resumed.model.layers[0].mlp.router.expert_token_counts.sum()
    assert counts == 3 * 4 * 16 * 2  # 2 restored steps + 1 new one, 4 x 16 tokens, 2 experts each


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5, -0.1])
def test_reliability_decay_outside_open_unit_interval_is_rejected(decay):
    with pytest.raises(ValueError, match="reliability_decay"):
        ClusterMoEConfig(reliability_decay=decay)



def test_reinitialize_expert_clears_the_pending_faults_of_its_own_layer(tiny_model):
    """The routing state has one row per MoE layer: with a dense first layer, MoE layer l is row l - 1."""
    model = tiny_model(num_hidden_layers=3, first_k_dense_layers=1)
    state = model.model.routing_state
    state.pending_observed.fill_(5)
    state.pending_healthy.fill_(2)
    model.reinitialize_expert(1, 0, 0)  # the first MoE layer: row 0
    assert state.pending_observed[0, 0] == 0 and state.pending_healthy[0, 0] == 0
    assert state.pending_observed[1, 0] == 5 and state.pending_healthy[1, 0] == 2  # the other layer's expert 0
    model.reinitialize_expert(2, 0, 1)  # the last MoE layer: row 1
    assert state.pending_observed[1, 1] == 0
