"""Capacity limits (`expert_capacity_factor`): exact capacity, re-routing inside the chosen cluster, dropping."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from clustermoe_hf import ClusterMoEConfig


def skewed_block(tiny_model, **overrides):
    """A MoE block whose router sends most tokens to the same experts, so that capacity limits bite."""
    model = tiny_model(**{"use_reliability_routing": False, **overrides})
    block = model.model.layers[0].mlp
    with torch.no_grad():
        block.router.cluster_weight[0] += 2.0
        block.router.expert_weight[:, :] *= 20
        block.router.expert_weight[[0, 1, 4, 5]] += 1.0
    return model, block


def reference_capacity(candidates, capacity, top_k_experts, valid):
    """Python re-statement of the rule: primary choices in token order up to `capacity` per expert; then, in token
    order, each overflowing slot of a (token, cluster) tries the next unused candidate of that cluster; the rest is
    dropped. Padding takes no capacity and is not served."""
    num_tokens, top_k_clusters, _ = candidates.shape
    chosen = candidates[..., :top_k_experts].clone()
    served = torch.zeros_like(chosen, dtype=torch.bool)
    load = {}
    for t in range(num_tokens):
        for c in range(top_k_clusters):
            for j in range(top_k_experts):
                expert = int(chosen[t, c, j])
                if valid[t] and load.get(expert, 0) < capacity:
                    load[expert] = load.get(expert, 0) + 1
                    served[t, c, j] = True
    rerouted = 0
    for t in range(num_tokens):
        for c in range(top_k_clusters):
            next_rank = top_k_experts
            for j in range(top_k_experts):
                if not valid[t] or served[t, c, j]:
                    continue
                if next_rank < candidates.shape[2]:
                    alternative = int(candidates[t, c, next_rank])
                    next_rank += 1
                    if load.get(alternative, 0) < capacity:
                        load[alternative] = load.get(alternative, 0) + 1
                        chosen[t, c, j], served[t, c, j] = alternative, True
                        rerouted += 1
    return chosen, served, rerouted


@pytest.mark.parametrize(
    "factor, overrides",
    [(0.5, {}), (1.0, {}), (1.25, {}), (1.0, {"top_k_clusters": 2, "top_k_experts": 1}), (0.75, {"top_k_experts": 3})],
)
def test_capacity_arithmetic_and_rerouting_match_the_reference(tiny_model, factor, overrides):
    model, block = skewed_block(tiny_model, expert_capacity_factor=factor, **overrides)
    config = model.config
    hidden = torch.randn(30, config.hidden_size)
    valid = torch.ones(30, dtype=torch.bool)
    valid[:4] = False  # leading padding
    routing = block.router(hidden)
    cluster_index, candidates = routing.cluster_index, routing.expert_candidates
    assert candidates.shape[-1] == config.experts_per_cluster  # all experts ranked, for re-routing
    candidates = cluster_index.unsqueeze(-1) * config.experts_per_cluster + candidates

    chosen_rank, served, rerouted = block._limit_capacity(candidates, valid)
    chosen = candidates.gather(-1, chosen_rank)
    capacity = math.ceil(factor * 30 * config.num_experts_per_tok / config.num_experts)
    ref_chosen, ref_served, ref_rerouted = reference_capacity(candidates, capacity, config.top_k_experts, valid)
    assert torch.equal(served, ref_served)
    assert torch.equal(chosen[served], ref_chosen[ref_served])
    assert rerouted.item() == ref_rerouted
    load = torch.bincount(chosen[served], minlength=config.num_experts)
    assert load.max() <= capacity
    assert (load == capacity).any()  # the skewed router fills some experts up
    assert torch.all(chosen // config.experts_per_cluster == cluster_index.unsqueeze(-1))  # never leaves its cluster
    for row in chosen.flatten(0, 1):  # a token never uses the same expert twice in a cluster
        assert row.unique().numel() == row.numel()


def test_rerouting_never_goes_past_the_last_expert_of_the_cluster(tiny_model):
    """When every candidate after the first choices is tried (top_k_experts = E - 1, all tokens alike), a pair whose
    alternatives run out is dropped, not re-routed to a candidate rank beyond the cluster's experts."""
    model = tiny_model(num_clusters=1, top_k_experts=3, expert_capacity_factor=1.0, use_reliability_routing=False)
    block = model.model.layers[0].mlp
    candidates = torch.tensor([[[0, 1, 2, 3]]] * 4)  # capacity 3: token 3's three first choices all overflow
    chosen_rank, served, rerouted = block._limit_capacity(candidates, None)
    ref_chosen, ref_served, ref_rerouted = reference_capacity(candidates, 3, 3, torch.ones(4, dtype=torch.bool))
    assert torch.equal(served, ref_served) and rerouted.item() == ref_rerouted == 1
    assert torch.equal(candidates.gather(-1, chosen_rank)[served], ref_chosen[ref_served])

def test_every_token_is_served_rerouted_or_reported_dropped(tiny_model):
    model, block = skewed_block(tiny_model, expert_capacity_factor=0.75)
    hidden = torch.randn(2, 12, model.config.hidden_size)
    flat = hidden.view(24, -1)
    output, stats = block(hidden)

    routing = block.router(flat)
    cluster_index, candidates = routing.cluster_index, routing.expert_candidates
    candidates = cluster_index.unsqueeze(-1) * 4 + candidates
    chosen_rank, served, rerouted = block._limit_capacity(candidates, None)
    chosen = candidates.gather(-1, chosen_rank)
    chosen, served = chosen.view(24, -1), served.view(24, -1)
    assert stats["expert_counts"].sum() + stats["dropped_pairs"] == 24 * 2
    assert stats["dropped_pairs"] == (~served).sum() > 0 and stats["rerouted_pairs"] == rerouted > 0

    # Combine weights of all chosen pairs (re-routed ones at their new expert's probability): P(cluster) times
    # P(expert | cluster) normalised over the cluster's pairs; a dropped pair then contributes nothing and the token
    # keeps its residual path.
    cluster_prob = F.softmax(routing.cluster_logits, -1).gather(1, cluster_index)
    expert_prob = F.softmax(routing.expert_logits[:, 0], -1).gather(1, chosen - cluster_index * 4)
    weights = cluster_prob * expert_prob / expert_prob.sum(-1, keepdim=True) * served
    expected = torch.zeros_like(flat)
    with torch.no_grad():
        for token, slot in torch.nonzero(served).tolist():
            expert = chosen[token, slot]
            gate, up = F.linear(flat[token], block.experts.gate_up_proj[expert]).chunk(2, dim=-1)
            expected[token] += weights[token, slot] * F.linear(F.silu(gate) * up, block.experts.down_proj[expert])
    torch.testing.assert_close(output.view(24, -1), expected)
    fully_dropped = ~served.any(-1)
    assert torch.all(output.view(24, -1)[fully_dropped] == 0)


def expert_balance_reference(cluster_index, local_choices, expert_probs):
    """Switch balancing inside each cluster, weighted by the cluster's share of the (token, cluster) pairs (as in
    test_routing.py): E * sum_c share_c * sum_e (share of c's expert choices going to e) * (mean P(e | c))."""
    num_experts, top_k_experts = expert_probs.shape[-1], local_choices.shape[-1]
    expected = 0.0
    for cluster in cluster_index.unique().tolist():
        pairs = cluster_index == cluster  # (tokens, kc)
        experts_share = F.one_hot(local_choices[pairs], num_experts).float().sum((0, 1)) / (pairs.sum() * top_k_experts)
        expected += pairs.float().mean() * num_experts * (experts_share * expert_probs[pairs].mean(0)).sum()
    return expected


def test_expert_balance_loss_counts_the_experts_pairs_are_served_by_after_rerouting(tiny_model):
    """With capacity limits, the balancing loss sees the load the experts really get: a re-routed pair counts for the
    expert it was moved to, not for the overloaded first choice (which would keep pushing the same experts down)."""
    model, block = skewed_block(tiny_model, expert_capacity_factor=0.75)
    hidden = torch.randn(2, 12, model.config.hidden_size)
    _, stats = block(hidden)
    assert stats["rerouted_pairs"] > 0

    routing = block.router(hidden.view(24, -1))
    cluster_index, candidates = routing.cluster_index, routing.expert_candidates
    chosen_rank, _, _ = block._limit_capacity(cluster_index.unsqueeze(-1) * 4 + candidates, None)
    expert_probs = F.softmax(routing.expert_logits, -1)
    expected = expert_balance_reference(cluster_index, candidates.gather(-1, chosen_rank), expert_probs)
    torch.testing.assert_close(stats["expert_balance_loss"], expected)
    first_choices = expert_balance_reference(cluster_index, candidates[..., :2], expert_probs)
    assert not torch.allclose(first_choices, expected)  # the case tells the two apart

def test_counts_are_reported_per_forward_and_accumulated_in_training(tiny_model, tmp_path):
    model, _ = skewed_block(tiny_model, expert_capacity_factor=0.5)
    input_ids = torch.randint(3, 64, (2, 16))
    outputs = model(input_ids)  # eval: reported, not accumulated
    routing_stats = model.model(input_ids).routing_stats
    assert outputs.dropped_pairs.tolist() == [int(layer["dropped_pairs"]) for layer in routing_stats]
    assert outputs.rerouted_pairs.tolist() == [int(layer["rerouted_pairs"]) for layer in routing_stats]
    assert model.get_capacity_stats()["dropped_pairs"] == 0

    model.train()
    totals = torch.zeros(2, dtype=torch.long)
    for _ in range(2):
        outputs = model(input_ids, labels=input_ids)
        totals += outputs.dropped_pairs
        # half the capacity of the 64 pairs: at least 32 pairs must be dropped in each layer
        assert torch.all(outputs.dropped_pairs >= 32)
    stats = model.get_capacity_stats()
    assert [stats["layer_0_dropped_pairs"], stats["layer_1_dropped_pairs"]] == totals.tolist()
    assert stats["dropped_pairs"] == totals.sum()
    model.save_pretrained(tmp_path)  # saved like the experts' token counts, so that a resumed run keeps counting
    assert type(model).from_pretrained(tmp_path).get_capacity_stats() == stats
    model.reset_expert_utilization()
    assert model.get_capacity_stats()["dropped_pairs"] == 0


def test_padding_takes_no_capacity_and_is_not_reported(tiny_model):
    model, block = skewed_block(tiny_model, expert_capacity_factor=1.0)
    hidden = torch.randn(2, 16, model.config.hidden_size)
    token_mask = torch.ones(2, 16, dtype=torch.bool)
    token_mask[:, :8] = False  # left padding, first in token order
    token_mask = token_mask.flatten()
    _, stats = block(hidden, token_mask)

    routing = block.router(hidden.view(32, -1))
    cluster_index, candidates = routing.cluster_index, routing.expert_candidates
    candidates = cluster_index.unsqueeze(-1) * 4 + candidates
    capacity = math.ceil(1.0 * 32 * 2 / 8)
    _, served, rerouted = reference_capacity(candidates, capacity, 2, token_mask)
    _, served_if_padding_counted, _ = reference_capacity(candidates, capacity, 2, torch.ones(32, dtype=torch.bool))
    real_pairs_dropped = (~served[token_mask]).sum()
    assert real_pairs_dropped < (~served_if_padding_counted[token_mask]).sum()  # padding would cost real tokens
    assert stats["dropped_pairs"] == real_pairs_dropped and stats["rerouted_pairs"] == rerouted
    assert stats["expert_counts"].sum() + stats["dropped_pairs"] == 16 * 2


def run_block(block, hidden, token_mask):
    """Output, input gradient, parameter gradients and the expert ids the experts module was called with."""
    sent = []
    handle = block.experts.register_forward_hook(lambda module, args, output: sent.append(args[1].flatten()))
    hidden = hidden.clone().requires_grad_(torch.is_grad_enabled())
    output, _ = block(hidden, token_mask)
    handle.remove()
    if not torch.is_grad_enabled():
        return output, sent[0]
    output.square().sum().backward()
    grads = {name: parameter.grad for name, parameter in block.named_parameters()}
    block.zero_grad(set_to_none=True)
    return output, sent[0], hidden.grad, grads


@pytest.mark.parametrize("use_reliability_routing", [False, True], ids=["plain", "reliability"])
@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "sorted_mm", "sorted_mm-loop"])
def test_dropped_and_padding_pairs_skip_the_experts(tiny_model, monkeypatch, implementation, use_reliability_routing):
    """Pairs dropped by capacity limits, and those of padding tokens, go to the id `num_experts`, which these experts
    implementations skip: they cost no expert compute. Outputs and gradients are those of `batched_mm`, which is given
    every pair's real id and computes it (the block then zeroes what it does not serve)."""
    if implementation == "sorted_mm-loop":  # its per-expert GEMM loop, taken on this CPU for emulated dtypes only
        functions = ALL_EXPERTS_FUNCTIONS["sorted_mm"].__globals__
        monkeypatch.setitem(functions, "_CPU_DTYPES_WITHOUT_FAST_GEMM", frozenset({torch.float32}))
    model, block = skewed_block(tiny_model, expert_capacity_factor=0.5, use_reliability_routing=use_reliability_routing)
    hidden = torch.randn(2, 16, model.config.hidden_size)
    token_mask = torch.ones(2, 16, dtype=torch.bool)
    token_mask[1, :4] = False
    token_mask = token_mask.flatten()

    model.set_experts_implementation("batched_mm")
    expected_output, all_ids, expected_hidden_grad, expected_grads = run_block(block, hidden, token_mask)
    model.set_experts_implementation(implementation.removesuffix("-loop"))
    output, sent_ids, hidden_grad, grads = run_block(block, hidden, token_mask)

    assert (all_ids < block.num_experts).all()
    _, stats = block(hidden, token_mask)
    skipped = sent_ids == block.num_experts
    assert skipped.sum() == stats["dropped_pairs"] + 4 * 2 > 8  # dropped pairs, and the 4 padding tokens' pairs
    assert torch.equal(sent_ids[~skipped], all_ids[~skipped])
    torch.testing.assert_close(output, expected_output)
    torch.testing.assert_close(hidden_grad, expected_hidden_grad)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)


def test_inference_on_a_few_pairs_skips_padding_pairs(tiny_model):
    """`sorted_mm` runs a handful of pairs one by one without gradients (decoding); it skips the padding's pairs."""
    model = tiny_model()
    block = model.model.layers[0].mlp
    hidden, token_mask = torch.randn(1, 3, model.config.hidden_size), torch.tensor([False, True, True])
    with torch.no_grad():
        model.set_experts_implementation("batched_mm")
        expected, _ = run_block(block, hidden, token_mask)
        model.set_experts_implementation("sorted_mm")
        output, sent_ids = run_block(block, hidden, token_mask)
    assert (sent_ids[:2] == block.num_experts).all() and (sent_ids[2:] < block.num_experts).all()
    torch.testing.assert_close(output, expected)


# 1e20: a capacity beyond int64, 1e307: an infinite one, used to raise an OverflowError
@pytest.mark.parametrize("factor", [4.0, 1e20, 1e307])
def test_large_capacity_matches_dropless_routing(tiny_model, factor):
    input_ids = torch.randint(3, 64, (2, 16))
    torch.manual_seed(0)
    dropless = tiny_model()
    torch.manual_seed(0)
    limited = tiny_model(expert_capacity_factor=factor)  # capacity >= all tokens: nothing can overflow
    outputs = limited(input_ids)
    torch.testing.assert_close(outputs.logits, dropless(input_ids).logits)
    assert outputs.dropped_pairs.sum() == 0 and outputs.rerouted_pairs.sum() == 0
    assert dropless(input_ids).dropped_pairs is None


@pytest.mark.parametrize("factor", [0, 0.0, -1.0])
def test_non_positive_capacity_factor_is_rejected(factor):
    with pytest.raises(ValueError, match="expert_capacity_factor"):
        ClusterMoEConfig(expert_capacity_factor=factor)


def test_capacity_stats_are_per_moe_layer_and_reset_with_the_utilisation(tiny_model):
    model = tiny_model(num_hidden_layers=3, first_k_dense_layers=1)
    state = model.model.routing_state
    state.rerouted_pair_counts.copy_(torch.tensor([3, 5]))
    state.dropped_pair_counts.copy_(torch.tensor([1, 4]))
    assert model.get_capacity_stats() == {
        "layer_1_rerouted_pairs": 3, "layer_1_dropped_pairs": 1, "layer_2_rerouted_pairs": 5,
        "layer_2_dropped_pairs": 4, "rerouted_pairs": 8, "dropped_pairs": 5,
    }  # fmt: skip
    model.reset_expert_utilization()
    assert set(model.get_capacity_stats().values()) == {0}
