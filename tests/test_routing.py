"""Routing invariants of the hierarchical (cluster -> expert) router, checked against direct computations from the
router and expert weights."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from clustermoe_hf import ClusterMoEConfig, ClusterMoEForCausalLM, modeling_clustermoe
from clustermoe_hf.modeling_clustermoe import ClusterMoERouter


VOCAB_SIZE = 64
PAD = 0


def random_ids(batch_size, length):
    return torch.randint(3, VOCAB_SIZE, (batch_size, length))


def expert_forward(experts, expert_id, hidden):
    gate, up = F.linear(hidden, experts.gate_up_proj[expert_id]).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, experts.down_proj[expert_id])


def reference_routing(block, hidden):
    """Token by token: top clusters by P(cluster), top experts of each by P(expert | cluster), weight = P(cluster) *
    P(expert | cluster), the latter renormalised over the cluster's chosen experts with `norm_topk_prob`.
    Returns (expert ids (tokens, k), combine weights (tokens, k)) with the experts in routing order."""
    config = block.config
    router = block.router
    temperature = config.routing_temperature
    expert_weight = router.expert_weight.view(config.num_clusters, config.experts_per_cluster, -1)
    all_ids, all_weights = [], []
    for token in hidden:
        cluster_probs = F.softmax(router.cluster_weight @ token / temperature, dim=-1)
        ids, weights = [], []
        for cluster in cluster_probs.topk(config.top_k_clusters).indices:
            expert_probs = F.softmax(expert_weight[cluster] @ token / temperature, dim=-1)
            top = expert_probs.topk(config.top_k_experts)
            ids += [cluster * config.experts_per_cluster + top.indices]
            expert_weights = top.values / top.values.sum() if config.norm_topk_prob else top.values
            weights += [cluster_probs[cluster] * expert_weights]
        all_ids.append(torch.cat(ids))
        all_weights.append(torch.cat(weights))
    return torch.stack(all_ids), torch.stack(all_weights)


def capture_expert_ids(block):
    """Records the expert id of every (token, expert) pair the block sends to its experts."""
    captured = []
    handle = block.experts.register_forward_pre_hook(lambda module, args: captured.append(args[1].reshape(-1)))
    return captured, handle


# ----- which experts a token uses -----


@pytest.mark.parametrize("router_implementation", ["hierarchical", "flat"])
def test_each_token_uses_distinct_experts_of_its_chosen_clusters(tiny_model, router_implementation):
    model = tiny_model(
        num_clusters=4, experts_per_cluster=3, top_k_clusters=2, top_k_experts=2,
        router_implementation=router_implementation, initializer_range=0.2,
    )  # fmt: skip
    block = model.model.layers[1].mlp
    clusters = []
    block.router.register_forward_hook(lambda module, args, output: clusters.append(output.cluster_index))
    expert_ids, _ = capture_expert_ids(block)
    model(random_ids(3, 10))

    cluster_index = clusters[0]  # (tokens, kc)
    ids = expert_ids[0].view(30, 2, 2)  # (tokens, kc, ke)
    assert torch.equal(ids // 3, cluster_index[..., None].expand_as(ids)), "expert outside its chosen cluster"
    for per_token, name in ((cluster_index, "clusters"), (ids.flatten(1), "experts")):
        distinct = per_token.sort(-1).values.diff(dim=-1) != 0
        assert distinct.all(), f"a token chose the same {name} twice"
    assert cluster_index.unique().numel() > 1 and ids.unique().numel() > 4  # routing depends on the token


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_combine_weights_are_cluster_times_expert_probability(tiny_model, norm_topk_prob):
    model = tiny_model(
        num_clusters=3, experts_per_cluster=4, top_k_clusters=2, top_k_experts=2, routing_temperature=0.7,
        norm_topk_prob=norm_topk_prob, initializer_range=0.2,
    )  # fmt: skip
    block = model.model.layers[0].mlp
    hidden = torch.randn(12, 32)
    with torch.no_grad():
        output, _ = block(hidden[None])
        ids, weights = reference_routing(block, hidden)
        expected = torch.stack(
            [
            sum(w * expert_forward(block.experts, e, h) for e, w in zip(*row))
            for *row, h in zip(ids, weights, hidden)
        ]
        )
    torch.testing.assert_close(output[0], expected, rtol=1e-4, atol=1e-6)
    if not norm_topk_prob:
        assert (weights.sum(-1) < 0.99).all()  # otherwise this would not tell the two modes apart


@pytest.mark.parametrize("top_k_clusters", [3, 1])
def test_normalised_combine_weights_sum_to_the_chosen_clusters_probability(tiny_model, top_k_clusters):
    """With every expert identical, the block returns that expert's output times the sum of the weights: each chosen
    cluster's P(cluster), its chosen experts' weights renormalised to it (1 when every cluster is chosen)."""
    model = tiny_model(num_clusters=3, experts_per_cluster=4, top_k_clusters=top_k_clusters, top_k_experts=3)
    block = model.model.layers[0].mlp
    with torch.no_grad():
        block.experts.gate_up_proj.copy_(block.experts.gate_up_proj[:1].expand_as(block.experts.gate_up_proj))
        block.experts.down_proj.copy_(block.experts.down_proj[:1].expand_as(block.experts.down_proj))
        hidden = torch.randn(10, 32)
        output, _ = block(hidden[None])
        chosen_clusters = block.router.cluster_weight.matmul(hidden.T).T.softmax(-1).topk(top_k_clusters).values
        expected = expert_forward(block.experts, 0, hidden) * chosen_clusters.sum(-1, keepdim=True)
        torch.testing.assert_close(output[0], expected, rtol=1e-4, atol=1e-6)


def test_the_task_loss_trains_the_cluster_router_with_one_cluster_per_token(tiny_config):
    """Renormalised over the pairs of one cluster, P(cluster) would cancel from the combine weights, and the cluster
    router learn from the router losses only, not which cluster serves a token best (its task-loss gradient was
    ~1e-11, rounding)."""
    config = tiny_config(
        top_k_clusters=1, router_aux_loss_coef=0.0, router_cluster_aux_loss_coef=0.0, router_z_loss_coef=0.0
    )
    model = ClusterMoEForCausalLM(config).train()
    ids = torch.randint(0, config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    router = model.model.layers[0].mlp.router
    assert router.cluster_weight.grad.abs().max() > 1e-3 * router.expert_weight.grad.abs().max()


# ----- hierarchical and flat router paths -----


@pytest.mark.parametrize(
    "num_clusters, experts_per_cluster, top_k_clusters, top_k_experts", [(2, 4, 1, 2), (4, 3, 2, 2), (8, 16, 3, 4)]
)
def test_hierarchical_and_flat_routers_agree(
    tiny_config, num_clusters, experts_per_cluster, top_k_clusters, top_k_experts
):
    sizes = {
        "num_clusters": num_clusters, "experts_per_cluster": experts_per_cluster, "top_k_clusters": top_k_clusters,
        "top_k_experts": top_k_experts, "intermediate_size": 8, "initializer_range": 0.2,
    }  # fmt: skip
    hierarchical = ClusterMoEForCausalLM(tiny_config(router_implementation="hierarchical", **sizes)).train()
    flat = ClusterMoEForCausalLM(tiny_config(router_implementation="flat", **sizes)).train()
    flat.load_state_dict(hierarchical.state_dict())
    router, flat_router = hierarchical.model.layers[0].mlp.router, flat.model.layers[0].mlp.router
    assert router.hierarchical and not flat_router.hierarchical

    hidden = torch.randn(40, 32)
    routing, flat_routing = router(hidden), flat_router(hidden)
    assert torch.equal(routing.cluster_index, flat_routing.cluster_index)
    assert torch.equal(routing.expert_candidates, flat_routing.expert_candidates)
    for name in ("cluster_logits", "cluster_log_probs", "expert_logits", "expert_log_probs"):
        torch.testing.assert_close(getattr(routing, name), getattr(flat_routing, name))

    with torch.autocast("cpu", dtype=torch.bfloat16):  # `_grouped_mm` is not autocast: the routers stay in float32
        routing, flat_routing = router(hidden), flat_router(hidden)
    assert routing.expert_logits.dtype == flat_routing.expert_logits.dtype == torch.float32
    assert torch.equal(routing.expert_candidates, flat_routing.expert_candidates)

    ids = random_ids(2, 9)
    out, flat_out = hierarchical(ids, labels=ids), flat(ids, labels=ids)
    torch.testing.assert_close(out.logits, flat_out.logits)
    torch.testing.assert_close(out.aux_loss, flat_out.aux_loss)
    out.loss.backward()
    flat_out.loss.backward()
    for name, param in hierarchical.named_parameters():
        torch.testing.assert_close(param.grad, flat.get_parameter(name).grad, msg=name)


def _hierarchical_and_flat_routers(tiny_config, monkeypatch, rows_max: int | None):
    """Layer 0's routers of two models with the same weights, 8 clusters x 4 experts (top 2 x 2), H = 32, one of them
    hierarchical with `GATHERED_ROUTER_ROWS_MAX` set to `rows_max` (unless None)."""
    if rows_max is not None:
        monkeypatch.setattr(modeling_clustermoe, "GATHERED_ROUTER_ROWS_MAX", rows_max)
    sizes = {"num_clusters": 8, "experts_per_cluster": 4, "top_k_clusters": 2, "top_k_experts": 2}
    sizes["initializer_range"] = 0.2
    hierarchical = ClusterMoEForCausalLM(tiny_config(router_implementation="hierarchical", **sizes))
    flat = ClusterMoEForCausalLM(tiny_config(router_implementation="flat", **sizes))
    flat.load_state_dict(hierarchical.state_dict())
    return hierarchical.model.layers[0].mlp.router, flat.model.layers[0].mlp.router


# 4 tokens: C = 8 pairs, whose rows are 8 x E x H = 1024 values: both bounds of the gather path, reached
@pytest.mark.parametrize("num_tokens, rows_max", [(1, None), (4, None), (4, 8 * 4 * 32)], ids=["1", "4", "4-at-limit"])
def test_a_few_tokens_are_scored_against_their_clusters_gathered_rows(tiny_config, monkeypatch, num_tokens, rows_max):
    """Forwards of at most C (token, cluster) pairs, as in decoding, gather the chosen clusters' expert rows instead of
    grouping the pairs by cluster (no sort): the logits and gradients of the flat router, also under autocast."""
    router, flat_router = _hierarchical_and_flat_routers(tiny_config, monkeypatch, rows_max)
    hidden = torch.randn(num_tokens, 32, requires_grad=True)
    flat_routing = flat_router(hidden)
    monkeypatch.setattr(torch, "sort", lambda *args, **kwargs: pytest.fail("grouped the pairs by cluster"))
    routing = router(hidden)
    assert torch.equal(routing.expert_candidates, flat_routing.expert_candidates)
    torch.testing.assert_close(routing.expert_logits, flat_routing.expert_logits)
    upstream = torch.randn_like(routing.expert_log_probs)
    grads = torch.autograd.grad((routing.expert_log_probs * upstream).sum(), [hidden, router.expert_weight])
    flat_loss = (flat_routing.expert_log_probs * upstream).sum()
    for grad, flat_grad in zip(grads, torch.autograd.grad(flat_loss, [hidden, flat_router.expert_weight])):
        torch.testing.assert_close(grad, flat_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert router(hidden).expert_logits.dtype == torch.float32


@pytest.mark.parametrize("num_tokens, rows_max", [(5, None), (2, 2 * 2 * 4 * 32 - 1)], ids=["pairs", "values"])
def test_more_pairs_than_clusters_or_too_many_gathered_values_group_the_pairs_by_cluster(
    tiny_config, monkeypatch, num_tokens, rows_max
):
    """The mirror of the test above: gathering rows is for few pairs only. Past C (token, cluster) pairs (5 tokens x 2
    clusters > 8), or past `GATHERED_ROUTER_ROWS_MAX` gathered values (2 tokens' 4 pairs x E x H = 512 here, one more
    than the limit), the pairs are grouped by cluster (sorted): either bound alone must send them there, since gathering
    costs more than grouping past it. The logits are the flat router's either way."""
    router, flat_router = _hierarchical_and_flat_routers(tiny_config, monkeypatch, rows_max)
    hidden = torch.randn(num_tokens, 32)
    flat_routing = flat_router(hidden)
    sorts, sort = [], torch.sort
    monkeypatch.setattr(torch, "sort", lambda *args, **kwargs: sorts.append(args) or sort(*args, **kwargs))
    routing = router(hidden)
    assert len(sorts) == 1, "gathered the chosen clusters' rows instead of grouping the pairs by cluster"
    assert torch.equal(routing.expert_candidates, flat_routing.expert_candidates)
    torch.testing.assert_close(routing.expert_logits, flat_routing.expert_logits)


@pytest.mark.parametrize(
    "hidden_size, intermediate_size, dtype", [(34, 6, torch.float32), (32, 6, torch.float32), (36, 12, torch.bfloat16)]
)
def test_sizes_that_grouped_mm_cannot_take_still_route_and_run(tiny_config, hidden_size, intermediate_size, dtype):
    """grouped_mm needs rows of a multiple of 16 bytes: hidden sizes (and experts per cluster, intermediate sizes)
    that are not multiples of 4 in float32 or 8 in bf16 raised in the hierarchical router and the experts."""
    sizes = {"hidden_size": hidden_size, "head_dim": 8, "experts_per_cluster": 5}
    sizes["intermediate_size"] = intermediate_size
    hierarchical = ClusterMoEForCausalLM(tiny_config(router_implementation="hierarchical", **sizes)).to(dtype).train()
    flat = ClusterMoEForCausalLM(tiny_config(router_implementation="flat", **sizes)).to(dtype).train()
    flat.load_state_dict(hierarchical.state_dict())
    ids = random_ids(2, 9)
    out, flat_out = hierarchical(ids, labels=ids), flat(ids, labels=ids)
    torch.testing.assert_close(out.logits, flat_out.logits)
    out.loss.backward()
    flat_out.loss.backward()
    for name, param in hierarchical.named_parameters():
        torch.testing.assert_close(param.grad, flat.get_parameter(name).grad, msg=name)


class LargestOutputSpy(TorchDispatchMode):
    """Records the largest tensor an op (not a view) creates."""

    def __init__(self):
        super().__init__()
        self.largest = (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        if not func.is_view:
            for tensor in output if isinstance(output, (tuple, list)) else (output,):
                if isinstance(tensor, torch.Tensor) and tensor.numel() > self.largest[0]:
                    self.largest = (tensor.numel(), str(func))
        return output


def test_hierarchical_routing_of_a_token_creates_nothing_the_size_of_all_experts(tiny_config):
    """Sub-linear routing: a token is scored against its chosen clusters' experts only, and nothing per forward is
    sized by all experts (the router weights were copied in every forward; they still are where their rows need
    padding for grouped_mm). A forward of a few tokens gathers its chosen cluster's rows, E x H = 1,024 values here.
    The selection terms (one per expert) are built in the first forward and reused while the routing state does not
    change."""
    experts_per_cluster = 64
    model = ClusterMoEForCausalLM(
        tiny_config(num_clusters=64, experts_per_cluster=experts_per_cluster, hidden_size=16, head_dim=4)
    ).eval()
    router = model.model.layers[0].mlp.router
    assert router.hierarchical  # "auto", from 256 experts on
    hidden = torch.randn(1, 16)
    with torch.no_grad():
        router(hidden)
        with LargestOutputSpy() as spy:
            router(hidden)
    assert spy.largest[0] <= experts_per_cluster * 16, spy.largest  # N = 4,096 logits, flat


@pytest.mark.slow  # compiles (~10 s each)
@pytest.mark.parametrize(
    "dtype, hidden_size, intermediate_size, fullgraph", [(torch.bfloat16, 36, 12, False), (torch.float32, 34, 6, True)]
)
def test_unaligned_experts_compile(tiny_config, dtype, hidden_size, intermediate_size, fullgraph):
    """Compiled (as on an accelerator), `sorted_mm` is grouped_mm, whose kernels raise for rows that are not 16-byte
    aligned (here bf16 rows of 36 and 12 values): those take its per-expert loop. In float32, compiled, transformers
    runs its own fallback loop, which takes any size and traces into one graph."""
    config = tiny_config(hidden_size=hidden_size, head_dim=8, intermediate_size=intermediate_size, num_hidden_layers=1)
    model = ClusterMoEForCausalLM(config).to(dtype).eval()
    ids = random_ids(2, 9)
    torch._dynamo.reset()  # nothing compiled before (other shapes, dtypes) may stand in for this graph
    with torch.no_grad():
        compiled = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits)


def test_hierarchical_router_groups_tokens_of_every_one_of_many_clusters(monkeypatch):
    """The (token, cluster) groups' boundaries are counted exactly: a float histogram put cluster C-2's tokens into
    cluster C-1's group from ~8k clusters on, scoring them with another cluster's expert rows. (Four tokens would
    gather their clusters' rows instead of being grouped: not here.)"""
    monkeypatch.setattr(modeling_clustermoe, "GATHERED_ROUTER_ROWS_MAX", 0)
    config = ClusterMoEConfig(
        vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, num_clusters=8192, experts_per_cluster=2, top_k_clusters=1, top_k_experts=1,
        router_implementation="hierarchical",
    )  # fmt: skip
    router = ClusterMoERouter(config)
    torch.nn.init.normal_(router.expert_weight)
    hidden = torch.randn(4, 8)
    with torch.no_grad():
        router.cluster_weight.zero_()
        router.cluster_weight[[5, 8189, 8190, 8191], torch.arange(4)] = 100.0  # token i picks the i-th of these
        hidden[:, :4] = torch.eye(4)
        routing = router(hidden)
        router.hierarchical = False
        expected = router(hidden)
    assert routing.cluster_index.view(-1).tolist() == [5, 8189, 8190, 8191]
    torch.testing.assert_close(routing.expert_logits, expected.expert_logits)


def test_jitter_changes_training_selection_only(tiny_model):
    """`router_jitter_noise` perturbs the selection scores of training forwards; eval routing and the combine weights
    (the plain log-probabilities) ignore it."""
    jittered, plain = tiny_model(router_jitter_noise=5.0), tiny_model()
    jittered.load_state_dict(plain.state_dict())
    router, plain_router = jittered.model.layers[0].mlp.router, plain.model.layers[0].mlp.router
    hidden = torch.randn(64, 32)
    with torch.no_grad():
        reference = plain_router(hidden)
        assert torch.equal(router(hidden).expert_candidates, reference.expert_candidates)  # eval: no jitter
        router.train()
        training = router(hidden)
    assert not torch.equal(training.cluster_index, reference.cluster_index)
    torch.testing.assert_close(training.cluster_log_probs, reference.cluster_log_probs)
    # Both levels: with a single cluster only the experts' scores can change the choice.
    one_cluster = tiny_model(num_clusters=1, experts_per_cluster=8, router_jitter_noise=5.0)
    router = one_cluster.model.layers[0].mlp.router
    with torch.no_grad():
        reference = router(hidden)
        training = router.train()(hidden)
    assert not torch.equal(training.expert_candidates, reference.expert_candidates)
    torch.testing.assert_close(training.expert_log_probs, reference.expert_log_probs)


@pytest.mark.parametrize("state", ["fresh", "biased", "degraded", "jitter"])
def test_candidates_carry_their_plain_log_probabilities(tiny_model, state):
    """Each candidate's log P(expert | cluster) and each chosen cluster's log P(cluster), what the combine weights
    are built from, are the plain log-probabilities whatever selection adds to them (biases, log-reliability, jitter).
    Selection adds nothing while every term is zero: top-k's values are then the log-probabilities."""
    model = tiny_model(
        num_clusters=3, experts_per_cluster=4, top_k_clusters=2, top_k_experts=2, use_adaptive_routing=True,
        router_jitter_noise=1.0, initializer_range=0.2,
    )  # fmt: skip
    router = model.model.layers[0].mlp.router
    if state == "biased":
        router.expert_bias.copy_(torch.linspace(-1, 1, 12))
    elif state == "degraded":
        router.expert_reliability[5] = 0.7
    router.train(state == "jitter")
    hidden = torch.randn(16, 32)
    with torch.no_grad():
        routing = router(hidden)
    expected_clusters = routing.cluster_log_probs.gather(1, routing.cluster_index)
    assert torch.equal(routing.chosen_cluster_log_probs, expected_clusters)
    assert torch.equal(routing.candidate_log_probs, routing.expert_log_probs.gather(-1, routing.expert_candidates))
    cluster_term, expert_term = router.selection_bias()
    assert (cluster_term is None and expert_term is None) == (state in ("fresh", "jitter"))


def test_the_shared_expert_adds_its_output_to_the_routed_experts(tiny_model):
    block = tiny_model(shared_expert_intermediate_size=8).model.layers[0].mlp
    hidden = torch.randn(1, 10, 32)
    with torch.no_grad():
        output, _ = block(hidden)
        shared, block.shared_expert = block.shared_expert, None
        routed, _ = block(hidden)
        torch.testing.assert_close(output, routed + shared(hidden))
    assert shared(hidden).abs().sum() > 0


# ----- balancing and z losses -----


def test_padding_is_excluded_from_block_losses(tiny_model):
    model = tiny_model(num_clusters=3, experts_per_cluster=3, top_k_clusters=2, top_k_experts=2)
    block = model.model.layers[0].mlp
    hidden = torch.randn(2, 7, 32)
    token_mask = torch.ones(2, 7, dtype=torch.bool)
    token_mask[0, :3] = False
    token_mask[1, 5:] = False
    with torch.no_grad():
        _, masked = block(hidden, token_mask.view(-1))
        _, real_only = block(hidden[token_mask][None])
        _, unmasked = block(hidden)
    for name in ("cluster_balance_loss", "expert_balance_loss", "router_z_loss"):
        torch.testing.assert_close(masked[name], real_only[name], msg=name)
        assert not torch.allclose(unmasked[name], real_only[name]), f"padding does not affect {name}"
    assert torch.equal(masked["expert_counts"], real_only["expert_counts"])


def test_a_batch_of_only_padding_has_zero_balance_losses_and_finite_gradients(tiny_model):
    model = tiny_model(num_clusters=3, experts_per_cluster=3, top_k_clusters=2, top_k_experts=2)
    block = model.model.layers[0].mlp
    hidden = torch.randn(1, 5, 32, requires_grad=True)
    _, stats = block(hidden, torch.zeros(5, dtype=torch.bool))
    losses = torch.stack([stats[name] for name in ("cluster_balance_loss", "expert_balance_loss", "router_z_loss")])
    assert torch.equal(losses, torch.zeros(3))
    losses.sum().backward()
    for name, gradient in (("input", hidden.grad), *((n, p.grad) for n, p in block.router.named_parameters())):
        assert torch.isfinite(gradient).all(), name


def test_padding_is_excluded_from_model_aux_losses(tiny_model):
    model = tiny_model(top_k_clusters=2)
    ids = random_ids(2, 6)
    padded = F.pad(ids, (0, 3), value=PAD)  # right padding leaves the real tokens' hidden states unchanged
    attention_mask = (padded != PAD).long()
    other_padding = padded.clone()
    other_padding[:, 6:] = random_ids(2, 3)

    def router_losses(input_ids, attention_mask=None):
        with torch.no_grad():
            out = model(input_ids, attention_mask=attention_mask, output_router_logits=True)
        return torch.stack([out.cluster_balance_loss, out.expert_balance_loss, out.router_z_loss])

    unpadded = router_losses(ids)
    torch.testing.assert_close(router_losses(padded, attention_mask), unpadded)
    torch.testing.assert_close(router_losses(other_padding, attention_mask), unpadded)
    assert not torch.allclose(router_losses(other_padding), unpadded)  # without the mask, pad tokens would count


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_router_loss_formulas(tiny_model, temperature):
    model = tiny_model(
        num_clusters=3, experts_per_cluster=4, top_k_clusters=2, top_k_experts=2, initializer_range=0.2,
        routing_temperature=temperature,
    )  # fmt: skip
    block = model.model.layers[0].mlp
    router = block.router
    hidden = torch.randn(20, 32)
    with torch.no_grad():
        _, stats = block(hidden[None])
        # the softmax inputs of both levels: logits / temperature
        cluster_logits = hidden @ router.cluster_weight.T / temperature  # (tokens, C)
        expert_logits = (hidden @ router.expert_weight.T).view(20, 3, 4) / temperature  # (tokens, C, E)
        chosen = cluster_logits.topk(2).indices  # (tokens, kc)
        chosen_expert_logits = expert_logits.gather(1, chosen[..., None].expand(-1, -1, 4))  # (tokens, kc, E)

    # ST-MoE z-loss on both levels' softmax inputs: logsumexp(cluster)^2 + mean over chosen clusters of logsumexp^2
    z_loss = cluster_logits.logsumexp(-1).square() + chosen_expert_logits.logsumexp(-1).square().mean(-1)
    torch.testing.assert_close(stats["router_z_loss"], z_loss.mean())

    # Switch balancing over clusters: C * sum_c (share of cluster choices) * (mean cluster probability)
    choice_share = F.one_hot(chosen, 3).float().sum((0, 1)) / chosen.numel()
    mean_prob = F.softmax(cluster_logits, -1).mean(0)
    torch.testing.assert_close(stats["cluster_balance_loss"], 3 * (choice_share * mean_prob).sum())

    # Switch balancing inside each cluster, weighted by the cluster's share of the (token, cluster) pairs:
    # E * sum_c share_c * sum_e (share of c's expert choices going to e) * (mean P(e | c) over c's pairs)
    chosen_experts = chosen_expert_logits.topk(2).indices  # (tokens, kc, ke) local ids
    expert_probs = F.softmax(chosen_expert_logits, -1)  # (tokens, kc, E)
    expected = 0.0
    for cluster in range(3):
        pairs = chosen == cluster  # (tokens, kc)
        if pairs.any():
            experts_share = F.one_hot(chosen_experts[pairs], 4).float().sum((0, 1)) / (pairs.sum() * 2)
            expected += pairs.float().mean() * 4 * (experts_share * expert_probs[pairs].mean(0)).sum()
    torch.testing.assert_close(stats["expert_balance_loss"], expected)


# ----- no host syncs -----


class HostSyncSpy(TorchDispatchMode):
    """Records the ops that make the host wait for the device: reading a value (`.item()`, `.tolist()`, `if t:`),
    and those whose output size depends on values (`nonzero`, boolean-mask indexing)."""

    SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func is torch.ops.aten.index.Tensor and any(
            index is not None and index.dtype == torch.bool for index in args[1]
        )
        if str(func) in self.SYNCING or boolean_index:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"expert_capacity_factor": 1.0}, {"router_implementation": "hierarchical"}, {"use_adaptive_routing": True}],
)
def test_moe_block_forward_and_backward_issue_no_host_syncs(tiny_config, overrides, training, monkeypatch):
    """With a sync-free experts kernel (grouped_mm), routing, capacity limits, the health check and the losses never
    make the host wait for the device. The shortcuts that read values where that is free (CPU) are turned off, as on
    an accelerator. (Gradients are returned, not accumulated: the expert-gradient guard that runs on accumulation
    reads its flag on the host where the device is the host, a CPU.)"""
    monkeypatch.setattr(modeling_clustermoe, "_host_reads_are_free", lambda tensor: False)
    model = ClusterMoEForCausalLM._from_config(tiny_config(**overrides), experts_implementation="grouped_mm")
    block = model.train(training).model.layers[0].mlp
    hidden = torch.randn(2, 8, model.config.hidden_size, requires_grad=training)
    spy = HostSyncSpy()
    with spy, torch.set_grad_enabled(training):
        output, stats = block(hidden, token_mask=torch.ones(16, dtype=torch.bool), output_routing_stats=training)
        if training:
            loss = output.sum() + stats["expert_balance_loss"] + stats["router_z_loss"]
            torch.autograd.grad(loss, [hidden, *(p for p in block.parameters() if p.requires_grad)])
    assert spy.ops == []
