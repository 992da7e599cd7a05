"""Auxiliary-loss-free balancing (`use_adaptive_routing`) and when routing state is updated."""

import copy

import pytest
import torch
import torch.nn.functional as F

from clustermoe_hf import ClusterMoEConfig, ClusterMoEForCausalLM


CONFIG = {
    "vocab_size": 64, "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_clusters": 2, "experts_per_cluster": 4, "top_k_clusters": 1, "top_k_experts": 2,
}  # fmt: skip


def adaptive_model(rate=0.01, **overrides):
    torch.manual_seed(0)
    config = ClusterMoEConfig(**{**CONFIG, "use_adaptive_routing": True, "adaptive_routing_rate": rate, **overrides})
    return ClusterMoEForCausalLM(config).train()


def routers(model):
    return [layer.mlp.router for layer in model.model.layers]


def biases(model):
    return [(router.cluster_bias.clone(), router.expert_bias.clone()) for router in routers(model)]


def expected_bias_step(counts, num_clusters, rate):
    """DeepSeek-V3 update, computed independently: +rate below the mean load, -rate above, per level."""
    load = counts.float().view(num_clusters, -1)
    cluster_load = load.sum(-1)
    cluster_step = rate * torch.sign(cluster_load.mean() - cluster_load)
    expert_step = rate * torch.sign(load.mean(-1, keepdim=True) - load)
    return cluster_step, expert_step.flatten()


@pytest.mark.parametrize("reliability_routing", [True, False], ids=["with reliability", "without reliability"])
def test_biases_move_toward_uniform_load_after_each_optimizer_step(reliability_routing):
    model = adaptive_model(rate=0.01, use_reliability_routing=reliability_routing)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for _ in range(2):
        before = biases(model)
        counts_before = [router.expert_token_counts.clone() for router in routers(model)]
        input_ids = torch.randint(3, 64, (4, 16))
        model(input_ids, labels=input_ids).loss.backward()
        assert all(torch.equal(a, b) for pair_a, pair_b in zip(before, biases(model)) for a, b in zip(pair_a, pair_b))
        optimizer.step()
        for router, (cluster_bias, expert_bias), old_counts in zip(routers(model), before, counts_before):
            cluster_step, expert_step = expected_bias_step(router.expert_token_counts - old_counts, 2, 0.01)
            torch.testing.assert_close(router.cluster_bias - cluster_bias, cluster_step)
            torch.testing.assert_close(router.expert_bias - expert_bias, expert_step)
            assert expert_step.abs().sum() > 0
            assert torch.equal(router.selection_token_counts, router.expert_token_counts)
    assert int(model.model.routing_state.training_step) == 2


def test_biases_choose_experts_but_do_not_change_combine_weights():
    model = adaptive_model(norm_topk_prob=False).eval()
    block = model.model.layers[0].mlp
    router = block.router
    router.cluster_bias.copy_(torch.tensor([0.0, 10.0]))
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 10.0, 8.0, 0.0]))
    hidden = torch.randn(1, 10, 32)
    flat = hidden.view(10, 32)
    output, _ = block(hidden)

    routing = router(flat)
    assert torch.all(routing.cluster_index == 1)
    assert torch.all(routing.expert_candidates.sort(-1).values == torch.tensor([1, 2]))
    expected = torch.zeros_like(flat)
    with torch.no_grad():
        cluster_prob = F.softmax(flat @ router.cluster_weight.T, -1)[:, 1]  # the raw probabilities
        expert_probs = F.softmax(flat @ router.expert_weight[4:].T, -1)
        for expert in (5, 6):
            gate, up = F.linear(flat, block.experts.gate_up_proj[expert]).chunk(2, dim=-1)
            expert_out = F.linear(F.silu(gate) * up, block.experts.down_proj[expert])
            expected += (cluster_prob * expert_probs[:, expert - 4])[:, None] * expert_out
    torch.testing.assert_close(output.view(10, 32), expected)


def test_selection_follows_every_change_of_the_routing_state_between_forwards():
    """The selection terms are reused between forwards (decoding), but never once a buffer or setting changed."""
    model = adaptive_model(reliability_threshold=0.0).eval()  # degraded experts deprioritised, never excluded
    router = routers(model)[0]
    flat = torch.randn(6, 32)

    def clusters():
        with torch.no_grad():
            return router(flat).cluster_index.view(-1)

    clusters()
    router.cluster_bias.copy_(torch.tensor([3.0, 0.0]))  # in place, as the optimizer-step hook does
    assert torch.all(clusters() == 0)
    router.expert_reliability[:4] = 1e-3  # cluster 0 degrades: log-reliability -6.9 outweighs the bias
    assert torch.all(clusters() == 1)
    replacement = torch.zeros(2)  # a new tensor, not an in-place update, with the same version counter as the old
    while replacement._version < router.cluster_bias._version:
        replacement.copy_(torch.tensor([10.0, 0.0]))
    router.cluster_bias = replacement
    assert torch.all(clusters() == 0)
    model.config.use_adaptive_routing = False  # a setting: the reliability term alone now decides
    assert torch.all(clusters() == 1)
    model.config.use_adaptive_routing = True
    router.expert_reliability[:4] = 0.3  # cluster 0 mildly degraded: its bias still outweighs log(0.3)
    assert torch.all(clusters() == 0)
    model.config.reliability_threshold = 0.5  # a setting: cluster 0's experts fall below it, it cannot be chosen
    assert torch.all(clusters() == 1)
    router.expert_reliability.data = torch.ones(8)  # cluster 0 repaired, in new storage with the same version counter
    assert torch.all(clusters() == 0)
    router.expert_reliability[:3] = 0.1  # one expert of cluster 0 left selectable: too few for top-2 experts
    assert torch.all(clusters() == 1)
    model.config.top_k_experts = 1  # a setting: one selectable expert is enough now
    assert torch.all(clusters() == 0)
    # Two views of one storage: the same address and version counter, other values (told apart by the tensor itself).
    storage = torch.tensor([-10.0, 10.0, 0.0, -20.0])
    router.expert_reliability.fill_(1.0)
    router.cluster_bias = storage[0:2]
    assert torch.all(clusters() == 1)
    router.cluster_bias = storage[0::3]
    assert torch.all(clusters() == 0)  # [-10, -20]: cluster 0 now
    # The counts reliability is weighed by, changed in place: a source of the selection terms too.
    model.config.use_adaptive_routing = False
    router.expert_reliability[0] = router.expert_reliability[4] = 1e-3
    router.selection_token_counts.fill_(1)
    router.selection_token_counts[0] = 1000  # cluster 0's reliability is mostly its degraded expert's
    assert torch.all(clusters() == 1)
    router.selection_token_counts[0], router.selection_token_counts[4] = 1, 1000
    assert torch.all(clusters() == 0)


def test_a_model_built_in_inference_mode_routes_by_its_current_state():
    """Inference tensors have no version counters: selection is then recomputed on every forward."""
    with torch.inference_mode():
        model = adaptive_model().eval()
        router = routers(model)[0]
        flat = torch.randn(6, 32)
        router.cluster_bias.copy_(torch.tensor([3.0, 0.0]))
        assert torch.all(router(flat).cluster_index == 0)
        router.cluster_bias.copy_(torch.tensor([0.0, 3.0]))
        assert torch.all(router(flat).cluster_index == 1)


def load_imbalance(adaptive: bool, steps: int = 40) -> float:
    """Coefficient of variation of layer-0 expert loads over the last steps of a run with a skewed router."""
    model = adaptive_model(rate=0.05) if adaptive else adaptive_model(rate=0.05, use_adaptive_routing=False)
    with torch.no_grad():  # skew: expert 0 (cluster 0) and its cluster attract most tokens
        mean_embedding = model.model.embed_tokens.weight.mean(0)
        routers(model)[0].cluster_weight[0] += 40 * mean_embedding
        routers(model)[0].expert_weight[0] += 40 * mean_embedding
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # only the balancing biases change
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        if step == steps - 10:
            model.reset_expert_utilization()
        model(torch.randint(3, 64, (4, 16), generator=generator))
        optimizer.step()
    counts = routers(model)[0].expert_token_counts.float()
    return (counts.std(unbiased=False) / counts.mean()).item()


def test_excluded_experts_and_clusters_keep_their_biases():
    """An expert below the reliability threshold gets no tokens because it is excluded, not because it is
    underloaded: its bias must not rise at every step (and make it take over once selectable again). Likewise a
    cluster left with too few selectable experts. The others balance among themselves."""
    model = adaptive_model(rate=0.01)
    router = routers(model)[0]
    router.expert_reliability[0] = 0.1  # cluster 0: expert 0 excluded, 3 selectable (top_k_experts = 2)
    router.expert_reliability[4:7] = 0.1  # cluster 1: 1 selectable expert left, the cluster is excluded
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for _ in range(3):
        input_ids = torch.randint(3, 64, (4, 16))
        model(input_ids, labels=input_ids).loss.backward()
        optimizer.step()
    assert router.expert_token_counts[0] == 0 and router.expert_token_counts[4:].sum() == 0
    assert router.expert_bias[0] == 0 and router.expert_bias[4:].abs().sum() == 0 and router.cluster_bias[1] == 0
    assert router.expert_bias[1:4].abs().sum() > 0 and router.cluster_bias[0] == 0  # one selectable cluster: no step


def test_the_mean_load_is_taken_over_selectable_experts_and_clusters():
    model = adaptive_model(rate=0.01, num_clusters=3)  # 3 clusters x 4 experts
    block = model.model.layers[0].mlp
    block.router.expert_reliability[0] = 0.1  # cluster 0: expert 0 excluded
    block.router.expert_reliability[8:11] = 0.1  # cluster 2: excluded
    counts = torch.tensor([0, 10, 25, 55, 20, 20, 20, 20, 0, 0, 0, 30], dtype=torch.float32)
    model.model._step_balancing_biases(block, counts)
    # cluster 0: mean over experts 1-3 is 30 (over all four, 22.5 would put expert 2 above it)
    assert (block.router.expert_bias / 0.01).tolist() == pytest.approx([0, 1, 1, -1, 0, 0, 0, 0, 0, 0, 0, 0])
    # clusters 0 and 1 (loads 90 and 80; with cluster 2's 30, the mean 66.7 would be below both)
    assert (block.router.cluster_bias / 0.01).tolist() == pytest.approx([-1, 1, 0])


def test_a_cluster_with_exactly_top_k_selectable_experts_is_still_selectable():
    """The router can still serve a cluster whose reliable experts just fill top_k_experts, so the bias step must keep
    it among the selectable clusters: its load counts towards the mean and its bias moves (here down, overloaded)."""
    model = adaptive_model(rate=0.01)  # 2 clusters x 4 experts, top_k_experts=2
    block = model.model.layers[0].mlp
    block.router.expert_reliability[:2] = 0.1  # cluster 0: experts 2 and 3 left, exactly top_k_experts
    counts = torch.tensor([0, 0, 30, 30, 10, 10, 10, 10], dtype=torch.float32)
    model.model._step_balancing_biases(block, counts)
    assert (block.router.cluster_bias / 0.01).tolist() == pytest.approx([-1, 1])  # loads 60 and 40, mean 50

def test_a_reinitialized_expert_starts_from_its_peers_mean_bias():
    model = adaptive_model()
    router = routers(model)[1]
    router.expert_bias.copy_(torch.tensor([3.0, -1.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]))
    model.reinitialize_expert(layer_idx=1, cluster_idx=0, expert_idx=0)
    assert router.expert_bias.tolist() == [0.0, -1.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]


def test_a_reinitialized_expert_without_peers_keeps_its_bias(tmp_path):
    """With one expert per cluster there are no peers to average: the bias stays as it was (a mean over no peers
    would be NaN, which the routing-state check then refuses to save)."""
    model = adaptive_model(num_clusters=4, experts_per_cluster=1, top_k_clusters=2, top_k_experts=1)
    router = routers(model)[0]
    router.expert_bias.copy_(torch.tensor([0.3, -0.1, 0.2, 0.0]))
    model.reinitialize_expert(layer_idx=0, cluster_idx=1, expert_idx=0)
    assert router.expert_bias.tolist() == pytest.approx([0.3, -0.1, 0.2, 0.0])
    model.save_pretrained(tmp_path)

def test_adaptive_routing_evens_out_a_skewed_load():
    without, with_balancing = load_imbalance(adaptive=False), load_imbalance(adaptive=True)
    assert without > 0.8
    assert with_balancing < without / 3


def test_gradient_accumulation_counts_the_global_batch():
    input_ids = torch.randint(3, 64, (8, 16))
    accumulated = adaptive_model()
    optimizer = torch.optim.SGD(accumulated.parameters(), lr=0.0)
    for micro_batch in input_ids.chunk(2):
        accumulated(micro_batch, labels=micro_batch).loss.backward()
    assert accumulated.get_reliability_stats()["training_step"] == 0
    optimizer.step()

    full_batch = adaptive_model()
    full_batch(input_ids, labels=input_ids).loss.backward()
    torch.optim.SGD(full_batch.parameters(), lr=0.0).step()
    for (cluster_a, expert_a), (cluster_b, expert_b) in zip(biases(accumulated), biases(full_batch)):
        assert torch.equal(cluster_a, cluster_b) and torch.equal(expert_a, expert_b)
    assert accumulated.get_reliability_stats()["training_step"] == 1


def test_gradient_checkpointing_counts_each_token_once(monkeypatch):
    model = adaptive_model()
    model.activation_checkpointing_enable()
    block_class = type(model.model.layers[0].mlp)
    calls = []

    def counted_forward(self, *args, **kwargs):
        calls.append(self)
        return block_forward(self, *args, **kwargs)

    block_forward = block_class.forward
    monkeypatch.setattr(block_class, "forward", counted_forward)
    input_ids = torch.randint(3, 64, (2, 16))
    model(input_ids, labels=input_ids).loss.backward()
    assert len(calls) == 4  # each MoE block ran twice: forward and recomputation
    for router in routers(model):
        assert router.expert_token_counts.sum() == 2 * 16 * 2
    assert torch.all(model.model.routing_state.pending_counts.sum(-1) == 2 * 16 * 2)


def test_optimizer_steps_without_a_training_forward_change_nothing():
    model = adaptive_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    input_ids = torch.randint(3, 64, (2, 16))
    before = biases(model)
    model.eval()
    model(input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    model.train()
    with torch.no_grad():
        model(input_ids)
        model(input_ids, labels=input_ids)  # computes the routing statistics, but is no training forward either
        model.generate(input_ids[:, :4], max_new_tokens=3, do_sample=False)
    optimizer.step()
    assert model.get_reliability_stats()["training_step"] == 0
    assert all(torch.equal(a, b) for pair_a, pair_b in zip(before, biases(model)) for a, b in zip(pair_a, pair_b))
    assert all(router.expert_token_counts.sum() == 0 for router in routers(model))


def test_each_model_is_updated_by_the_steps_of_its_own_optimizer_only():
    """A GAN-style loop: the discriminator's optimizer steps between the generator's forward and its backward. Once
    a model's own optimizer stepped, others' steps leave its accumulation alone (and its gradient guard up)."""
    generator = adaptive_model()
    generator_optimizer = torch.optim.SGD(generator.parameters(), lr=0.0)
    discriminator = torch.nn.Linear(4, 1)
    discriminator_optimizer = torch.optim.SGD(discriminator.parameters(), lr=0.1)
    input_ids = torch.randint(3, 64, (2, 16))
    experts = generator.model.layers[0].mlp.experts
    for step in range(1, 4):
        if step == 3:
            with torch.no_grad():
                experts.down_proj.fill_(float("nan"))  # broken: masked in the forward, its gradients cleaned
        loss = generator(input_ids, labels=input_ids).loss
        discriminator(torch.randn(2, 4)).sum().backward()
        discriminator_optimizer.step()
        if step > 1:  # the first time, the generator's optimizer is not known yet
            assert generator.get_reliability_stats()["training_step"] == step - 1
            assert generator.model.routing_state.has_pending_updates
        loss.backward()
        assert experts.down_proj.grad.isfinite().all()
        generator_optimizer.step()
        generator_optimizer.zero_grad()
        assert generator.get_reliability_stats()["training_step"] == step


@pytest.mark.parametrize("second_model", ["built", "copied"])  # a copy registers no parameter while it is made
def test_one_optimizer_over_two_models_updates_both_also_one_made_after_its_first_step(second_model):
    first, input_ids = adaptive_model(), torch.randint(3, 64, (2, 16))
    optimizer = torch.optim.SGD(first.parameters(), lr=0.0)
    first(input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    second = adaptive_model() if second_model == "built" else copy.deepcopy(first)
    optimizer.add_param_group({"params": list(second.parameters())})
    for _ in range(2):
        (first(input_ids, labels=input_ids).loss + second(input_ids, labels=input_ids).loss).backward()
        optimizer.step()
    assert first.get_reliability_stats()["training_step"] == 3
    assert second.get_reliability_stats()["training_step"] == (2 if second_model == "built" else 3)


def test_an_optimizer_of_the_head_alone_updates_the_model_it_heads():
    """Linear probing after full training, in one process: the head's optimizer steps none of the base model's own
    parameters, but trains the model."""
    model = adaptive_model(tie_word_embeddings=False)
    input_ids = torch.randint(3, 64, (2, 16))
    full = torch.optim.SGD(model.parameters(), lr=0.0)
    model(input_ids, labels=input_ids).loss.backward()
    full.step()
    head = torch.optim.SGD(model.lm_head.parameters(), lr=0.0)
    for step in (2, 3):
        model(input_ids, labels=input_ids).loss.backward()
        head.step()
        assert model.get_reliability_stats()["training_step"] == step


def test_a_head_trained_on_its_own_then_attached_trains_the_model_it_heads():
    """A linear probe trained on frozen features, then attached as the head: attaching registers no parameter."""
    model = adaptive_model(tie_word_embeddings=False)
    input_ids = torch.randint(3, 64, (2, 16))
    full = torch.optim.SGD(model.parameters(), lr=0.0)
    model(input_ids, labels=input_ids).loss.backward()
    full.step()
    probe = torch.nn.Linear(32, 64, bias=False)
    head = torch.optim.SGD(probe.parameters(), lr=0.0)
    probe(torch.randn(2, 32)).sum().backward()
    head.step()  # steps a parameter of no ClusterMoE model
    model.lm_head = probe
    model(input_ids, labels=input_ids).loss.backward()
    head.step()
    assert model.get_reliability_stats()["training_step"] == 2


def test_a_model_built_in_inference_mode_does_not_break_other_models_optimizer_steps():
    with torch.inference_mode():
        reference = adaptive_model().eval().requires_grad_(False)  # a frozen reference model, built in inference_mode
    input_ids = torch.randint(3, 64, (2, 16))
    reference(input_ids)  # with gradients enabled: a forward that may mask faults
    model = adaptive_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    other = torch.nn.Linear(4, 1)
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.0)  # steps no ClusterMoE model's parameters
    model(input_ids, labels=input_ids).loss.backward()
    other(torch.randn(2, 4)).sum().backward()
    other_optimizer.step()
    optimizer.step()
    assert model.get_reliability_stats()["training_step"] == 1


def test_an_optimizer_step_lowers_the_fault_flag_of_a_block_called_on_its_own():
    """E.g. a pipeline stage running a block: the flag would otherwise keep the gradient guard raised for good, and
    hide an fp16 overflow from the gradient scaler."""
    model = adaptive_model()
    block = model.model.layers[0].mlp
    with torch.no_grad():
        block.experts.down_proj.fill_(float("nan"))
    output, _ = block(torch.randn(1, 4, 32))
    output.sum().backward()
    assert block.masked_faulty_expert
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    assert not block.masked_faulty_expert



def test_discarding_a_step_that_never_came_forgets_its_statistics_and_lowers_its_fault_flags():
    """Its gradients are gone (the Trainer zeroes them before beginning a run again): the next step's update and
    gradient guard are its own."""
    model = adaptive_model()
    block = model.model.layers[0].mlp
    with torch.no_grad():
        block.experts.down_proj[0].fill_(float("nan"))
    input_ids = torch.randint(0, CONFIG["vocab_size"], (4, 16))
    model(input_ids, labels=input_ids).loss.backward()
    assert model.model.routing_state.has_pending_updates and block.masked_faulty_expert
    before = biases(model)

    model.model.discard_pending_routing_updates()
    assert not model.model.routing_state.has_pending_updates and not block.masked_faulty_expert
    assert not block.may_have_masked_fault
    assert model.model.routing_state.pending_counts.sum() == 0
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    assert model.get_reliability_stats()["training_step"] == 0
    assert all(torch.equal(a, b) for pair, other in zip(biases(model), before) for a, b in zip(pair, other))


def test_plain_trainer_updates_routing_state_per_optimizer_step(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = adaptive_model(rate=0.01)
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 64, (24, 16), generator=generator)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        report_to="none", use_cpu=True, save_strategy="no", logging_steps=100, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4])
    trainer.train()

    assert model.get_reliability_stats()["training_step"] == 3  # one update per optimizer step, not per micro-batch
    for router in routers(model):
        assert router.expert_token_counts.sum() == 3 * 2 * 2 * 16 * 2
        steps = router.cluster_bias / 0.01  # three +-1 (or 0) steps
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 3
        assert router.expert_bias.abs().sum() > 0

    state = [tensor.clone() for tensor in model.model.buffers()]
    trainer.evaluate()
    assert all(torch.equal(a, b) for a, b in zip(state, model.model.buffers()))


class _LanguageModelLoss(torch.nn.Module):
    """A module that contains the model, as a value head or a reward wrapper does."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels):
        return self.model(input_ids, labels=labels)


def _distributed_worker(rank, input_ids, output_dir, wrapped_in_a_container):
    model = adaptive_model()
    # DDP broadcasts rank 0's buffers before every forward that syncs gradients: it must leave the statistics
    # each process gathers since the last step alone, also when accumulating without `no_sync`. It reads the buffers
    # to leave alone from the module it wraps: around a container of the model, without broadcasting any (as
    # examples/README.md says).
    if wrapped_in_a_container:
        ddp_model = torch.nn.parallel.DistributedDataParallel(_LanguageModelLoss(model), broadcast_buffers=False)
    else:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model)
    for micro_batch in input_ids.chunk(2)[rank].chunk(2):
        ddp_model(micro_batch, labels=micro_batch).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    # Each process counted its own tokens; pruning sums the counts, so that every replica keeps the same experts.
    learnt = biases(model)
    kept = model.prune_experts(experts_per_cluster_keep=2, rank_by="utilization")
    torch.save((learnt, kept), f"{output_dir}/rank{rank}.pt")


@pytest.mark.parametrize("wrapped_in_a_container", [False, True], ids=["the model", "a container of it"])
def test_multi_process_training_counts_the_global_batch(tmp_path, run_two_processes, wrapped_in_a_container):
    """Two gloo processes under DDP, each with half the batch in two micro-batches, end up with the biases of one
    process seeing all of it, and prune the experts it would prune."""
    input_ids = torch.randint(3, 64, (8, 16))
    run_two_processes(_distributed_worker, input_ids, str(tmp_path), wrapped_in_a_container)

    reference = adaptive_model()
    reference(input_ids, labels=input_ids).loss.backward()
    torch.optim.SGD(reference.parameters(), lr=0.0).step()
    reference_biases = biases(reference)
    reference_kept = reference.prune_experts(experts_per_cluster_keep=2, rank_by="utilization")
    for rank in range(2):
        result, kept = torch.load(tmp_path / f"rank{rank}.pt")
        for (cluster_a, expert_a), (cluster_b, expert_b) in zip(result, reference_biases):
            assert torch.equal(cluster_a, cluster_b) and torch.equal(expert_a, expert_b)
        assert kept == reference_kept


def _calibrated_pruning_worker(rank, input_ids, output_dir, rank_by):
    model = adaptive_model().eval()
    # Process 1's calibration shard is all padding: only the sum over processes has tokens to rank by.
    shard = {"input_ids": input_ids, "attention_mask": torch.full_like(input_ids, rank == 0)}
    kept = model.prune_experts(experts_per_cluster_keep=2, rank_by=rank_by, calibration_data=[shard])
    torch.save(kept, f"{output_dir}/rank{rank}.pt")


@pytest.mark.parametrize("rank_by", ["utilization", "utilization_x_reliability"])  # every ranking that uses counts
def test_multi_process_calibrated_pruning_sums_the_shards(tmp_path, rank_by, run_two_processes):
    input_ids = torch.randint(3, 64, (4, 16))
    run_two_processes(_calibrated_pruning_worker, input_ids, str(tmp_path), rank_by)
    reference = adaptive_model().eval().prune_experts(
        experts_per_cluster_keep=2, rank_by=rank_by, calibration_data=[input_ids]
    )
    assert [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)] == [reference, reference]


def test_negative_update_rate_is_rejected():
    with pytest.raises(ValueError, match="adaptive_routing_rate"):
        ClusterMoEConfig(use_adaptive_routing=True, adaptive_routing_rate=-1e-3)


def test_a_zero_update_rate_keeps_the_learnt_biases_applied_and_fixed():
    """E.g. a head-only fine-tune or a probe on a frozen model: its routing must not drift step after step."""
    model = adaptive_model(rate=0.01)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    input_ids = torch.randint(3, 64, (4, 16))
    model(input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    learnt = biases(model)
    assert any(bias.abs().sum() > 0 for pair in learnt for bias in pair)
    model.config.adaptive_routing_rate = 0.0  # as the config accepts it:
    assert ClusterMoEConfig(use_adaptive_routing=True, adaptive_routing_rate=0.0).adaptive_routing_rate == 0.0
    for _ in range(2):
        model(input_ids, labels=input_ids).loss.backward()
        optimizer.step()
    assert all(torch.equal(a, b) for pair_a, pair_b in zip(learnt, biases(model)) for a, b in zip(pair_a, pair_b))
    block = model.model.layers[0].mlp
    cluster_term, _ = block.router.selection_bias()
    assert torch.equal(cluster_term, block.router.cluster_bias)  # still applied to the selection
