"""Expert pruning (`model.prune_experts`)."""

import copy
import gc
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from clustermoe_hf.analysis import perplexity


ROUTING_BUFFERS = ("expert_bias", "expert_reliability", "expert_token_counts", "selection_token_counts")


def with_utilization(model, counts_per_layer):
    for layer, counts in zip(model.model.layers, counts_per_layer):
        layer.mlp.router.expert_token_counts.copy_(torch.tensor(counts))
    return model


def test_prune_keeps_the_most_used_experts_of_each_cluster_and_slices_everything(tiny_model):
    model = with_utilization(tiny_model(), [[5, 9, 1, 7, 0, 3, 8, 2], [1, 2, 3, 4, 40, 30, 20, 10]])
    for layer in model.model.layers:
        layer.mlp.router.expert_bias.copy_(torch.arange(8.0))
        layer.mlp.router.expert_reliability.copy_(torch.linspace(0.6, 1.0, 8))
        layer.mlp.router.selection_token_counts.copy_(torch.arange(10, 18))
        layer.mlp.router.cluster_bias.copy_(torch.tensor([0.5, -0.5]))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    num_parameters = model.num_parameters()

    kept = model.prune_experts(experts_per_cluster_keep=2, rank_by="utilization")

    assert kept == {0: [1, 3, 5, 6], 1: [2, 3, 4, 5]}
    assert (model.config.num_clusters, model.config.experts_per_cluster, model.config.num_experts) == (2, 2, 4)
    for layer_idx, ids in kept.items():
        prefix = f"model.layers.{layer_idx}.mlp."
        sliced = ("experts.gate_up_proj", "experts.down_proj", "router.expert_weight")
        for name in sliced + tuple(f"router.{buffer}" for buffer in ROUTING_BUFFERS):
            torch.testing.assert_close(model.state_dict()[prefix + name], before[prefix + name][ids])
        for name in ("router.cluster_weight", "router.cluster_bias"):
            torch.testing.assert_close(model.state_dict()[prefix + name], before[prefix + name])
    assert model.num_parameters() == num_parameters - 2 * 4 * (3 * 32 * 16 + 32)  # 4 experts + router rows per layer
    assert model.model.routing_state.pending_counts.shape == (2, 4)


def test_pruned_model_computes_what_the_original_computed_with_the_kept_experts(tiny_model):
    model = tiny_model()
    input_ids = torch.randint(3, 64, (2, 12))
    # Below reliability_threshold: the original never selects experts 0, 3 (cluster 0) and 5, 6 (cluster 1).
    for layer in model.model.layers:
        layer.mlp.router.expert_reliability.copy_(torch.tensor([0.1, 1.0, 1.0, 0.1, 1.0, 0.1, 0.1, 1.0]))
    expected = model(input_ids).logits

    kept = model.prune_experts(experts_per_cluster_keep=2, rank_by="reliability")
    assert kept == {0: [1, 2, 4, 7], 1: [1, 2, 4, 7]}
    torch.testing.assert_close(model(input_ids).logits, expected)


def test_prune_counts_may_be_numpy_integers(tiny_model, tmp_path):
    import numpy as np

    model = tiny_model()
    model.prune_experts(clusters_keep=np.int64(1), experts_per_cluster_keep=np.int32(2), rank_by="reliability")
    assert (type(model.config.num_clusters), type(model.config.experts_per_cluster)) == (int, int)
    model.save_pretrained(tmp_path)  # the config still saves as JSON
    assert json.loads((tmp_path / "config.json").read_text())["experts_per_cluster"] == 2


def test_prune_whole_clusters(tiny_model):
    model = with_utilization(tiny_model(top_k_clusters=2), [[1, 1, 1, 1, 5, 5, 5, 5], [9, 9, 9, 9, 1, 1, 1, 1]])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    kept = model.prune_experts(clusters_keep=1, rank_by="utilization")
    assert kept == {0: [4, 5, 6, 7], 1: [0, 1, 2, 3]}
    assert (model.config.num_clusters, model.config.top_k_clusters, model.config.experts_per_cluster) == (1, 1, 4)
    cluster_weight = before["model.layers.0.mlp.router.cluster_weight"]
    torch.testing.assert_close(model.model.layers[0].mlp.router.cluster_weight, cluster_weight[1:])
    assert torch.isfinite(model(torch.randint(3, 64, (1, 8))).logits).all()


def test_prune_ranks_by_utilisation_times_reliability_by_default(tiny_model):
    """The default `rank_by` weighs how much an expert is used by how reliable it is. In cluster 0 a busy but
    unreliable expert (10 x 0.6) ranks below slightly less used reliable ones (8, 7), where utilisation alone would
    keep experts 0 and 2; in cluster 1 it ranks above a reliable one used half as much (5), where reliability alone,
    or a sum (the utilisation shares are small), would keep experts 5 and 6."""
    model = with_utilization(tiny_model(), [[10, 1, 8, 7, 10, 5, 9, 1]] * 2)
    for layer in model.model.layers:
        layer.mlp.router.expert_reliability.copy_(torch.tensor([0.6, 1.0, 1.0, 1.0, 0.6, 1.0, 1.0, 1.0]))
    assert model.prune_experts(experts_per_cluster_keep=2) == {0: [2, 3, 4, 6], 1: [2, 3, 4, 6]}


def test_whole_clusters_are_ranked_by_the_sum_of_their_experts_scores(tiny_model):
    """A cluster's rank is its total score: one busy expert (20 tokens) does not outrank a cluster whose four experts
    share more (24 tokens)."""
    model = with_utilization(tiny_model(), [[20, 0, 0, 0, 6, 6, 6, 6]] * 2)
    assert model.prune_experts(clusters_keep=1, rank_by="utilization") == {0: [4, 5, 6, 7], 1: [4, 5, 6, 7]}

def test_calibration_data_ranks_the_experts_and_leaves_the_training_state_alone(tiny_model):
    model = tiny_model(top_k_experts=1)
    generator = torch.Generator().manual_seed(0)
    padded = {"input_ids": torch.randint(3, 64, (2, 12), generator=generator), "attention_mask": torch.ones(2, 12)}
    padded["attention_mask"][0, :5] = 0
    batches = [torch.randint(3, 64, (2, 12), generator=generator), padded]  # tensors or dicts
    usage = sum(
        torch.stack([layer["expert_counts"] for layer in model.model(**batch).routing_stats])
        for batch in ({"input_ids": batches[0]}, padded)
    )  # (layers, experts), padding excluded
    expected = {}
    for layer_idx, counts in enumerate(usage):
        best = counts.view(2, 4).argsort(dim=-1, descending=True, stable=True)[:, :2].sort(-1).values
        expected[layer_idx] = (best + torch.tensor([[0], [4]])).flatten().tolist()
    model.model.layers[0].mlp.router.expert_token_counts.fill_(3)  # training counts: sliced, not changed

    kept = model.prune_experts(experts_per_cluster_keep=2, calibration_data=batches, rank_by="utilization")
    assert kept == expected
    assert torch.all(model.model.layers[0].mlp.router.expert_token_counts == 3)
    assert model.get_reliability_stats()["training_step"] == 0
    assert not model.training


def test_pruned_model_saves_reloads_and_generates(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model = with_utilization(tiny_model(), [[5, 9, 1, 7, 0, 3, 8, 2]] * 2)
    model.save_pretrained(tmp_path / "full")
    model.prune_experts(experts_per_cluster_keep=1)
    model.save_pretrained(tmp_path / "pruned")

    size = lambda name: os.path.getsize(tmp_path / name / "model.safetensors")  # noqa: E731
    assert size("pruned") < size("full")
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["experts_per_cluster"] == 1
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert reloaded.config.top_k_experts == 1 and reloaded.config.num_experts == 2
    input_ids = torch.randint(3, 64, (2, 6))
    torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids).logits)
    generated = reloaded.generate(input_ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, model.generate(input_ids, max_new_tokens=5, do_sample=False))
    assert torch.all(reloaded.model.layers[1].mlp.router.expert_token_counts == torch.tensor([9, 8]))


def test_pruning_a_model_on_the_meta_device_is_refused_before_the_config_changes(tiny_model):
    """A meta model has no routing state to rank by: refused up front, not half-pruned (a config that no longer
    describes its weights)."""
    model = tiny_model().to("meta")
    with pytest.raises(ValueError, match="routing state, which are on the meta device"):
        model.prune_experts(experts_per_cluster_keep=1, clusters_keep=1, rank_by="reliability")
    assert (model.config.num_clusters, model.config.experts_per_cluster) == (2, 4)



def test_pruning_lowers_the_gradient_guard_of_the_step_it_abandons(tiny_model):
    """The kept weights are new parameters, without the gradients it guarded: a non-finite gradient of the pruned
    model's next step (an fp16 overflow) must reach the gradient scaler."""
    model = tiny_model().train()
    block = model.model.layers[1].mlp
    with torch.no_grad():
        block.experts.down_proj[0].fill_(float("nan"))
    input_ids = torch.randint(3, 64, (4, 12))
    model(input_ids, labels=input_ids).loss.backward()
    assert block.masked_faulty_expert
    model.prune_experts(experts_per_cluster_keep=2, rank_by="reliability")
    assert not block.masked_faulty_expert and not block.may_have_masked_fault


def test_pruning_a_model_whose_config_another_model_shares_is_refused(tiny_config):
    """Pruning changes the config: two models built from one config object would no longer both match it."""
    from clustermoe_hf import ClusterMoEForCausalLM

    config = tiny_config()
    pruned, other = ClusterMoEForCausalLM(config).eval(), ClusterMoEForCausalLM(config).eval()
    with_utilization(pruned, [[5, 9, 1, 7, 0, 3, 8, 2]] * 2)
    for model in (pruned, pruned.model):
        calibration = iter([torch.randint(3, 64, (2, 6))])
        with pytest.raises(ValueError, match="Another live ClusterMoE model shares this model's config object"):
            model.prune_experts(experts_per_cluster_keep=1, calibration_data=calibration)
        assert next(calibration, None) is not None  # refused before the calibration pass
    assert config.experts_per_cluster == 4 and pruned.model.layers[0].mlp.experts.num_experts == 8
    del other
    gc.collect()
    pruned.prune_experts(experts_per_cluster_keep=1)  # the config is this model's alone now
    assert config.experts_per_cluster == 1


def test_a_pruned_model_with_dense_layers_saves_and_reloads(tiny_model, tmp_path):
    """Pruning lowers top_k_experts; the dense layers keep the width they were built with (the active expert width
    then), which the saved config records."""
    from clustermoe_hf import ClusterMoEForCausalLM

    model = tiny_model(num_hidden_layers=3, first_k_dense_layers=1)
    for layer in model.model.layers[1:]:
        layer.mlp.router.expert_token_counts.copy_(torch.tensor([5, 9, 1, 7, 0, 3, 8, 2]))
    model.prune_experts(experts_per_cluster_keep=1)
    model.save_pretrained(tmp_path)
    reloaded = ClusterMoEForCausalLM.from_pretrained(tmp_path)
    assert reloaded.model.layers[0].mlp.gate_proj.out_features == 16 * 2  # intermediate_size x the original top-k
    input_ids = torch.randint(3, 64, (2, 6))
    torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids).logits)


def test_pruning_the_base_model_updates_the_causal_lm_around_it(tiny_model, tmp_path):
    from clustermoe_hf import ClusterMoEForCausalLM

    model = tiny_model()
    with_utilization(model, [[5, 9, 1, 7, 0, 3, 8, 2]] * 2).model.prune_experts(experts_per_cluster_keep=2)
    assert model.config is model.model.config and model.config.experts_per_cluster == 2
    model.save_pretrained(tmp_path)
    assert ClusterMoEForCausalLM.from_pretrained(tmp_path).config.num_experts == 4


@pytest.mark.slow
def test_prune_a_model_loaded_with_remote_code_only(tiny_model, tmp_path):
    """Load, prune, save and reload through `trust_remote_code`, without the `clustermoe_hf` package."""
    with_utilization(tiny_model(), [[5, 9, 1, 7, 0, 3, 8, 2]] * 2).save_pretrained(tmp_path / "full")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "full")!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        print(model.prune_experts(experts_per_cluster_keep=2, rank_by="utilization"))
        model.save_pretrained({str(tmp_path / "pruned")!r})
        reloaded = AutoModelForCausalLM.from_pretrained({str(tmp_path / "pruned")!r}, trust_remote_code=True)
        ids = torch.tensor([[5, 6, 7]])
        assert torch.equal(reloaded.generate(ids, max_new_tokens=4, do_sample=False),
                           model.generate(ids, max_new_tokens=4, do_sample=False))
        assert "clustermoe_hf" not in sys.modules
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "{0: [1, 3, 5, 6], 1: [1, 3, 5, 6]}" in result.stdout


@pytest.mark.parametrize("pruned_in", ["a plain call", "torch.inference_mode"])
def test_pruned_model_keeps_training(tiny_model, pruned_in):
    """Also pruned inside `torch.inference_mode`, whose new tensors could not be saved for a backward."""
    model = with_utilization(tiny_model(use_adaptive_routing=True), [[5, 9, 1, 7, 0, 3, 8, 2]] * 2)
    with torch.inference_mode(pruned_in == "torch.inference_mode"):
        model.prune_experts(experts_per_cluster_keep=3)
    assert not any(tensor.is_inference() for tensor in [*model.parameters(), *model.buffers()])
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    input_ids = torch.randint(3, 64, (2, 12))
    model(input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    router = model.model.layers[0].mlp.router
    assert model.get_reliability_stats()["training_step"] == 1
    assert router.expert_bias.abs().sum() > 0 and router.expert_bias.shape == (6,)
    assert model.model.layers[0].mlp.experts.gate_up_proj.grad.shape[0] == 6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"experts_per_cluster_keep": 0}, "experts_per_cluster_keep"),
        ({"experts_per_cluster_keep": 5}, "experts_per_cluster_keep"),
        ({"clusters_keep": 0}, "clusters_keep"),
        ({"experts_per_cluster_keep": 1.5}, "experts_per_cluster_keep"),
        ({"experts_per_cluster_keep": True}, "experts_per_cluster_keep"),
        ({}, "Nothing to prune"),
        ({"experts_per_cluster_keep": 2, "rank_by": "size"}, "rank_by"),
        ({"experts_per_cluster_keep": 2}, "No utilisation data"),
        ({"experts_per_cluster_keep": 2, "calibration_data": []}, "`calibration_data` has no"),
        (
            {"experts_per_cluster_keep": 2, "rank_by": "reliability", "calibration_data": [torch.tensor([[3, 4]])]},
            "calibration_data measures utilisation, which it would ignore",
        ),
    ],
)
def test_bad_prune_requests_raise_and_change_nothing(tiny_model, tmp_path, kwargs, message):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    config = model.config.to_dict()
    with pytest.raises(ValueError, match=message):
        model.prune_experts(**kwargs)
    assert model.config.to_dict() == config
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    model.save_pretrained(tmp_path)
    AutoModelForCausalLM.from_pretrained(tmp_path)


def test_pruning_or_reinitialising_experts_under_an_adapter_asks_to_merge_it_first(tiny_model):
    from peft import get_peft_model

    from clustermoe_hf.training import lora_config

    model = get_peft_model(tiny_model(), lora_config(rank=2))  # LoRA on the fused experts too
    config = model.config.to_dict()
    with pytest.raises(ValueError, match=r"prune_experts needs the plain fused expert weights.*merge_and_unload"):
        model.prune_experts(experts_per_cluster_keep=2, rank_by="reliability")
    with pytest.raises(ValueError, match=r"reinitialize_expert needs the plain fused expert weights"):
        model.reinitialize_expert(0, 0, 0)
    assert model.config.to_dict() == config


def test_calibration_data_may_be_one_batch_and_other_formats_are_named(tiny_model):
    model, ids = tiny_model(), torch.randint(3, 64, (2, 8))
    as_dict = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # e.g. a tokenizer's output
    kept = [copy.deepcopy(model).prune_experts(experts_per_cluster_keep=2, calibration_data=data) for data in (
        [ids], ids, as_dict
    )]  # fmt: skip
    assert kept[1] == kept[0] and kept[2] == kept[0]
    with pytest.raises(TypeError, match="calibration_data must be an iterable of input_ids tensors"):
        model.prune_experts(experts_per_cluster_keep=2, calibration_data=[[3, 4, 5]])
    with pytest.raises(TypeError, match="calibration_data must be an iterable of batches, or one batch .*; got a int"):
        model.prune_experts(experts_per_cluster_keep=2, calibration_data=5)
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq\); got shape \(8,\)"):
        model.prune_experts(experts_per_cluster_keep=2, calibration_data=ids[0])  # one sequence
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids \(2, 8\); got \(2, 7\)"):
        model.prune_experts(experts_per_cluster_keep=2, calibration_data={**as_dict, "attention_mask": ids[:, 1:]})


def test_pruning_drops_the_statistics_gathered_before_it(tiny_model):
    """Pruning between a backward and its optimizer step: the step has nothing to fold in and does not count."""
    model = tiny_model().train()
    ids = torch.randint(3, 64, (2, 8))
    model(ids, labels=ids).loss.backward()
    model.prune_experts(experts_per_cluster_keep=2)
    torch.optim.SGD(model.parameters(), lr=1e-3).step()
    assert int(model.model.routing_state.training_step) == 0


def test_pruning_a_model_without_moe_layers_raises(tiny_model):
    with pytest.raises(ValueError, match="no MoE layers"):
        tiny_model(first_k_dense_layers=2).prune_experts(experts_per_cluster_keep=1)


def test_perplexity_is_the_exponential_of_the_language_model_loss_on_real_tokens(tiny_model):
    model = tiny_model(router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
    input_ids = torch.randint(3, 64, (3, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[0, 4] = -100  # the first real token of the left-padded row would be predicted from padding
    loss = model(input_ids, attention_mask=attention_mask, labels=labels).loss
    value = perplexity(model, [{"input_ids": input_ids, "attention_mask": attention_mask}])
    assert value == pytest.approx(torch.exp(loss).item(), rel=1e-5)
    padded_row = {"input_ids": input_ids[:1], "attention_mask": attention_mask[:1]}
    assert perplexity(model, [padded_row]) == pytest.approx(perplexity(model, [input_ids[:1, 4:]]), rel=1e-5)


def test_calibration_counts_leave_out_padding(tiny_model):
    model = tiny_model()
    input_ids = torch.randint(3, 64, (2, 8))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # 12 real tokens
    counts = model._calibration_counts([{"input_ids": input_ids, "attention_mask": attention_mask}])
    assert [int(layer.sum()) for layer in counts] == [12 * model.config.num_experts_per_tok] * 2
