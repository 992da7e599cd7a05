import copy
import functools
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache, modeling_utils

from clustermoe_hf import (
    ClusterMoEConfig,
    ClusterMoEForCausalLM,
    ClusterMoEForSequenceClassification,
    ClusterMoEModel,
    create_coe_model,
    modeling_clustermoe,
)


VOCAB_SIZE = 64
PAD = 0


def random_ids(batch_size, length):
    """Token ids that avoid the pad/bos/eos ids, so masking is the only thing that marks padding."""
    return torch.randint(3, VOCAB_SIZE, (batch_size, length))


def lm_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def expert_counts(model):
    """(MoE layers, experts) utilisation counts."""
    return torch.stack([block.router.expert_token_counts for _, block in model._moe_layers()])


def clone_model(model, **from_config_kwargs):
    """Same weights and buffers, possibly another attention/experts backend."""
    clone = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), **from_config_kwargs)
    clone.load_state_dict(model.state_dict())
    return clone.train(model.training)


# ----- Auto classes and the original package's API -----


def test_auto_classes():
    config = AutoConfig.for_model(
        "clustermoe", vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_clusters=2, experts_per_cluster=2,
    )  # fmt: skip
    assert isinstance(config, ClusterMoEConfig)
    assert (config.hidden_size, config.num_experts) == (32, 4)
    assert isinstance(AutoModelForCausalLM.from_config(config), ClusterMoEForCausalLM)
    assert isinstance(AutoModel.from_config(config), ClusterMoEModel)


def test_create_coe_model_accepts_original_names():
    model = create_coe_model(
        d_model=32, num_layers=1, num_clusters=2, experts_per_cluster=2, vocab_size=VOCAB_SIZE, d_ff=16,
        num_attention_heads=4,
    )  # fmt: skip
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (32, 1, 16)
    assert config.num_experts == 4

    with torch.no_grad():  # as the original package's example runs it
        out = model(random_ids(2, 5))
    assert out["logits"].shape == (2, 5, VOCAB_SIZE)
    assert out["aux_loss"].shape == ()
    assert out["aux_loss"] is out.aux_loss
    assert out["model_reliability"].item() == 1.0

    summary = model.get_model_summary()  # the original package's keys
    assert summary["total_params"] == sum(p.numel() for p in model.parameters())
    assert summary["expert_params"] == 4 * 3 * 32 * 16  # gate, up and down of the 4 experts of the one layer
    assert (summary["num_layers"], summary["num_clusters"], summary["experts_per_cluster"]) == (1, 2, 2)
    assert summary["total_experts"] == 4
    assert (summary["model_reliability"], summary["training_step"]) == (1.0, 0)


def test_create_coe_model_defaults_are_the_original_packages():
    with torch.device("meta"):  # 6 layers of 32 experts of width 2048: built without memory
        config = create_coe_model().config
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (512, 6, 2048)
    assert (config.num_clusters, config.experts_per_cluster, config.vocab_size) == (4, 8, 32000)
    assert (config.top_k_clusters, config.top_k_experts) == (2, 2)
    assert (config.expert_capacity_factor, config.attention_dropout, config.use_adaptive_routing) == (1.25, 0.1, True)
    with torch.device("meta"):  # a transformers name replaces the original default as its alias would
        config = create_coe_model(hidden_size=64, num_hidden_layers=1, d_ff=32, top_k_clusters=1).config
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.top_k_clusters) == (
        64, 1, 32, 1,
    )  # fmt: skip


def test_create_coe_model_refuses_a_name_the_config_would_only_store():
    with pytest.raises(ValueError, match=re.escape("ClusterMoEConfig has no setting num_cluster (did you mean "
                                                   "num_clusters")):  # fmt: skip
        create_coe_model(num_cluster=8)
    with pytest.raises(ValueError, match="hidden_size is given twice, as 64 and as 32"):
        create_coe_model(d_model=64, hidden_size=32)
    with torch.device("meta"):  # transformers' own settings, which the config consumes, still pass
        config = create_coe_model(attn_implementation="eager", rope_theta=5e5, experts_implementation="eager").config
    assert (config._attn_implementation, config.rope_parameters["rope_theta"]) == ("eager", 5e5)
    assert config._experts_implementation == "eager"


def test_create_coe_model_builds_the_weights_in_the_dtype_it_is_given():
    model = create_coe_model(d_model=32, num_layers=1, d_ff=16, num_attention_heads=4, vocab_size=VOCAB_SIZE,
                             experts_per_cluster=2, dtype="bfloat16")  # fmt: skip
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    assert model.model.layers[0].mlp.router.expert_bias.dtype == torch.float32  # routing state stays float32


def test_create_coe_model_accepts_transformers_names():
    model = create_coe_model(
        hidden_size=32, num_hidden_layers=2, intermediate_size=16, num_attention_heads=4, vocab_size=VOCAB_SIZE
    )
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (32, 2)


# ----- losses -----


def test_loss_is_lm_loss_plus_weighted_router_losses(tiny_model):
    model = tiny_model(router_cluster_aux_loss_coef=0.3, router_aux_loss_coef=0.2, router_z_loss_coef=0.1)
    ids = random_ids(2, 7)
    out = model(ids, labels=ids)

    parts = (out.cluster_balance_loss, out.expert_balance_loss, out.router_z_loss)
    assert all(part.shape == () and part > 0 for part in parts)
    expected_aux = 0.3 * out.cluster_balance_loss + 0.2 * out.expert_balance_loss + 0.1 * out.router_z_loss
    torch.testing.assert_close(out.aux_loss, expected_aux)
    torch.testing.assert_close(out.loss, lm_loss(out.logits, ids) + out.aux_loss)
    assert out["logits"] is out.logits and out["aux_loss"] is out.aux_loss


@pytest.mark.parametrize(
    "loss, trained", [("cluster_balance_loss", "cluster_weight"), ("expert_balance_loss", "expert_weight")]
)
def test_each_balancing_loss_trains_its_router_level(tiny_model, loss, trained):
    model = tiny_model().train()
    getattr(model(random_ids(2, 7)), loss).backward()
    assert getattr(model.model.layers[0].mlp.router, trained).grad.abs().sum() > 0


def test_router_losses_train_both_router_levels(tiny_model):
    model = tiny_model().train()
    model(random_ids(2, 7)).aux_loss.backward()
    router = model.model.layers[0].mlp.router
    assert router.cluster_weight.grad.abs().sum() > 0
    assert router.expert_weight.grad.abs().sum() > 0


def test_zero_coefficients_disable_router_losses(tiny_model):
    model = tiny_model(router_aux_loss_coef=0.0, router_cluster_aux_loss_coef=0.0, router_z_loss_coef=0.0)
    ids = random_ids(2, 7)
    out = model(ids, labels=ids)
    assert out.aux_loss == 0
    torch.testing.assert_close(out.loss, lm_loss(out.logits, ids), rtol=0, atol=0)
    assert out.cluster_balance_loss > 0  # still reported


def test_pure_inference_skips_router_losses_but_not_routing(tiny_model):
    """`no_grad` without labels (as in `generate`) returns the same logits without the router diagnostics; labels
    or `output_router_logits` bring them back."""
    model = tiny_model(use_reliability_routing=True)
    ids = random_ids(2, 7)
    with torch.no_grad():
        inference = model(ids)
        with_labels = model(ids, labels=ids)
        with_router_logits = model(ids, output_router_logits=True)
    assert inference.aux_loss is None and inference.router_z_loss is None and inference.model_reliability is None
    torch.testing.assert_close(inference.logits, with_labels.logits, rtol=0, atol=0)
    torch.testing.assert_close(with_labels.aux_loss, with_router_logits.aux_loss)
    assert with_labels.model_reliability is not None
    assert model(ids).aux_loss.requires_grad  # a forward with gradients always has them


@pytest.mark.parametrize("bad_id", [-1, VOCAB_SIZE, VOCAB_SIZE + 10])
def test_out_of_range_token_ids_are_rejected(tiny_model, bad_id):
    model = tiny_model()
    ids = random_ids(1, 6)
    ids[0, 3] = bad_id
    with pytest.raises(ValueError, match=f"vocab_size={VOCAB_SIZE}"):
        model(ids)


@pytest.mark.parametrize("shape", [(1, 0), (0, 6)])
def test_inputs_without_tokens_are_rejected(tiny_model, shape):
    with pytest.raises(ValueError, match=rf"no tokens \(batch size {shape[0]}, sequence length {shape[1]}\)"):
        tiny_model()(torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize(
    "input_ids",
    [torch.ones(6, dtype=torch.long), torch.ones(1, 2, 6, dtype=torch.long), torch.ones(2, 6), torch.ones(2, 6) > 0,
     torch.ones(2, 6, dtype=torch.complex64), torch.ones(2, 6, dtype=torch.int8), torch.ones(2, 6, dtype=torch.uint8),
     torch.ones(2, 6, dtype=torch.int16)],
    ids=["1-d", "3-d", "float", "bool", "complex", "int8", "uint8", "int16"],  # the embedding takes int64 and int32
)  # fmt: skip
def test_input_ids_that_are_not_a_batch_of_token_ids_are_rejected(tiny_model, input_ids):
    shape = r"of shape \(batch_size, sequence_length\)"
    expected = rf"input_ids must be int64 \(or int32\) token ids {shape}; got a {input_ids.dtype}"
    with pytest.raises(ValueError, match=expected):
        tiny_model()(input_ids)


@pytest.mark.parametrize("given", [(), ("input_ids", "inputs_embeds")], ids=["neither", "both"])
def test_exactly_one_of_input_ids_and_inputs_embeds_is_taken(tiny_model, given):
    model, ids = tiny_model(), random_ids(2, 6)
    inputs = {"input_ids": ids, "inputs_embeds": model.get_input_embeddings()(ids)}
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(**{name: inputs[name] for name in given})


def test_int32_token_ids_give_the_int64_ids_logits(tiny_model):
    model, ids = tiny_model(), random_ids(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids.int()).logits, model(ids).logits)


@pytest.mark.parametrize("name", ["input_ids", "attention_mask", "position_ids", "labels"])
def test_inputs_that_are_not_tensors_are_rejected_by_name(tiny_model, name):
    """A nested list failed deep inside with `'list' object has no attribute 'dim'` (or 'ndim')."""
    inputs = {"input_ids": random_ids(2, 6)}
    inputs[name] = inputs.get(name, random_ids(2, 6)).tolist() if name != "attention_mask" else [[1] * 6] * 2
    if name == "position_ids":
        inputs[name] = [list(range(6))] * 2
    with pytest.raises(ValueError, match=rf"{name} must be a torch.Tensor.*got a list"):
        tiny_model()(**inputs)


def test_inputs_embeds_that_are_not_a_tensor_are_rejected_by_name(tiny_model):
    with pytest.raises(ValueError, match=r"inputs_embeds must be a torch.Tensor.*got a list"):
        tiny_model()(inputs_embeds=torch.randn(2, 6, 32).tolist())


def test_inputs_embeds_in_another_dtype_than_the_model_are_rejected_outside_autocast(tiny_model):
    """Without autocast the first projection failed with "expected m1 and m2 to have the same dtype"."""
    model = tiny_model()
    embeds = model.get_input_embeddings()(random_ids(2, 6)).detach()
    with pytest.raises(ValueError, match=r"inputs_embeds must be in the model's dtype, torch.float32; got .*float64"):
        model(inputs_embeds=embeds.double())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts them: accepted
        assert model(inputs_embeds=embeds.bfloat16()).logits.shape == (2, 6, VOCAB_SIZE)


@pytest.mark.parametrize(
    "inputs_embeds", [torch.randn(2, 6, 7), torch.randn(2, 32), torch.ones(2, 6, 32, dtype=torch.long)]
)
def test_inputs_embeds_of_the_wrong_shape_or_dtype_are_rejected(tiny_model, inputs_embeds):
    expected = rf"inputs_embeds must be floating-point vectors of shape .*hidden_size=32\); got a {inputs_embeds.dtype}"
    with pytest.raises(ValueError, match=expected):
        tiny_model()(inputs_embeds=inputs_embeds)


@pytest.mark.parametrize(
    "position_ids", [torch.zeros(1, 3, dtype=torch.long), torch.zeros(3, 6, dtype=torch.long), torch.zeros(6),
                     torch.zeros(2, 6), torch.zeros(2, 6, dtype=torch.complex64)],
)  # fmt: skip
def test_position_ids_of_the_wrong_shape_or_dtype_are_rejected(tiny_model, position_ids):
    expected = r"position_ids must be integer positions of shape \(batch_size=2 or 1, sequence_length=6\)"
    with pytest.raises(ValueError, match=expected):
        tiny_model()(random_ids(2, 6), position_ids=position_ids)


def test_position_ids_of_one_row_apply_to_every_sequence_of_the_batch(tiny_model):
    """Position ids of shape (1, sequence_length) broadcast over the batch, as in transformers' models."""
    model = tiny_model()
    ids = random_ids(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, position_ids=torch.arange(6)[None]).logits, model(ids).logits)


@pytest.mark.parametrize(
    "labels, problem",
    [
        (torch.ones(2, 4, dtype=torch.long), r"of the inputs' shape \(batch_size=2, sequence_length=6\)"),
        (torch.ones(2, 6), r"of the inputs' shape .*got a torch.float32 tensor"),
        # transformers' loss takes int64 targets only: int32 failed in the cross-entropy
        (torch.ones(2, 6, dtype=torch.int32), r"int64 token ids of the inputs' shape .*got a torch.int32 tensor"),
        (torch.full((2, 6), VOCAB_SIZE), rf"in \[0, vocab_size={VOCAB_SIZE}\) or be the ignore index -100"),
        (torch.full((2, 6), -2), rf"in \[0, vocab_size={VOCAB_SIZE}\) or be the ignore index -100"),
    ],
    ids=["shape", "dtype", "int32", "past the vocabulary", "negative"],
)
def test_bad_labels_are_rejected(tiny_model, labels, problem):
    with pytest.raises(ValueError, match=rf"labels must .*{problem}"):
        tiny_model()(random_ids(2, 6), labels=labels)


@pytest.mark.parametrize("has_async_assert", [True, False], ids=["CUDA-like", "MPS-like"])
def test_token_ids_and_labels_are_checked_on_accelerators(tiny_model, monkeypatch, has_async_assert):
    """Where reading values would make the host wait for the device, an asynchronous device assertion checks them (on
    CPU it fails at once). Devices without one (MPS) read the range on the host instead of failing to dispatch."""
    monkeypatch.setattr(modeling_clustermoe, "_host_reads_are_free", lambda tensor: False)
    if not has_async_assert:
        monkeypatch.setattr(modeling_clustermoe, "_DEVICES_WITH_ASYNC_ASSERT", frozenset())
    error = RuntimeError if has_async_assert else ValueError
    model, ids = tiny_model(), random_ids(2, 6)
    with pytest.raises(error, match=rf"input_ids must be in \[0, vocab_size={VOCAB_SIZE}\)"):
        model(torch.full_like(ids, VOCAB_SIZE))
    with pytest.raises(error, match=rf"labels must be in \[0, vocab_size={VOCAB_SIZE}\) or be the ignore"):
        model(ids, labels=torch.full_like(ids, -2))
    labels = ids.clone()
    labels[:, -1] = -100
    model(ids, labels=labels)  # the ignore index passes


@pytest.mark.parametrize("logits_to_keep", [-1, 1.5, True, torch.tensor([[5]]), torch.tensor([0.5])])
def test_logits_to_keep_must_count_last_positions_or_list_them(tiny_model, logits_to_keep):
    """-1 silently dropped the first position; a float failed as an index."""
    with pytest.raises(ValueError, match=r"logits_to_keep must be an integer >= 0 .* or a 1-D tensor of the positions"):
        tiny_model()(random_ids(2, 6), logits_to_keep=logits_to_keep)


@pytest.mark.parametrize("positions", [[6], [0, -1]])
def test_logits_to_keep_positions_must_lie_in_the_inputs_before_the_cache_takes_them(tiny_model, positions):
    """A position past the inputs failed with torch's bare IndexError after the forward had added the tokens to the
    cache; a negative one silently counted from the end."""
    model, ids = tiny_model().eval(), random_ids(2, 6)
    cache = DynamicCache(config=model.config)
    with pytest.raises(ValueError, match=r"logits_to_keep must be in \[0, sequence_length=6\); got values from"):
        model(ids, cache=cache, use_cache=True, logits_to_keep=torch.tensor(positions))
    assert cache.get_seq_length() == 0
    with pytest.raises(ValueError, match=r"logits_to_keep must be in \[0, sequence_length=6\)"):
        model(inputs_embeds=model.get_input_embeddings()(ids), logits_to_keep=torch.tensor(positions))


def test_labels_need_the_logits_of_every_position(tiny_model):
    """The loss then failed with "Expected input batch_size (2) to match target batch_size (10)"."""
    model, ids = tiny_model(), random_ids(2, 6)
    with torch.no_grad():
        assert model(ids, logits_to_keep=1).logits.shape == (2, 1, VOCAB_SIZE)
        assert model(ids, logits_to_keep=torch.tensor([0, 5])).logits.shape == (2, 2, VOCAB_SIZE)
        torch.testing.assert_close(model(ids, labels=ids, logits_to_keep=6).loss, model(ids, labels=ids).loss)
        with pytest.raises(ValueError, match=r"labels need the logits of every position, but logits_to_keep=1 keeps 1"):
            model(ids, labels=ids, logits_to_keep=1)


def test_ignored_label_positions_are_accepted_and_left_out_of_the_loss(tiny_model):
    ids, labels = random_ids(2, 6), random_ids(2, 6)
    labels[:, :2] = -100
    output = tiny_model()(ids, labels=labels)
    next_tokens = output.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()  # each position predicts the next
    expected = torch.nn.functional.cross_entropy(*next_tokens, ignore_index=-100) + output.aux_loss
    torch.testing.assert_close(output.loss, expected)


@pytest.mark.parametrize("mask_shape", [(1, 8), (2, 5), (3, 8), (2, 9), (8,), (2, 8, 8), (3, 1, 8, 8), (2, 1, 7, 8)])
def test_attention_mask_of_the_wrong_shape_is_rejected(tiny_model, mask_shape):
    with pytest.raises(ValueError, match=rf"attention_mask has shape {re.escape(str(mask_shape))}"):
        tiny_model()(random_ids(2, 8), attention_mask=torch.ones(mask_shape, dtype=torch.long))


@pytest.mark.parametrize(
    "mask", [torch.ones(2, 3, 8, 8, dtype=torch.bool), torch.ones(2, 1, 8, 5, dtype=torch.bool), torch.ones(2, 1, 8, 8)]
)  # 3 of 4 heads, 5 of 8 keys, and integers (eager attention would add them to the scores)
def test_a_4d_attention_mask_must_give_each_head_query_and_key_a_boolean_or_additive_float(tiny_model, mask):
    model, ids = tiny_model(), random_ids(2, 8)
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(model(ids, attention_mask=causal.expand(2, 4, 8, 8)).logits, expected)
        additive = torch.zeros(1, 1, 8, 8).masked_fill(~causal, torch.finfo(torch.float32).min)
        torch.testing.assert_close(model(ids, attention_mask=additive).logits, expected)
    mask = mask if mask.dtype == torch.bool else mask.long()
    with pytest.raises(ValueError, match=r"attention_mask has shape .*boolean or \(additive\) floating-point"):
        model(ids, attention_mask=mask)


def test_generate_names_the_attention_mask_it_was_given_of_the_wrong_shape(tiny_model):
    """`generate` derives the positions from a padding mask: the error must name the mask, not the positions."""
    mask = torch.ones(2, 3, dtype=torch.long)
    mask[0, 0] = 0  # (an all-ones mask, transformers drops before the model sees it)
    with pytest.raises(ValueError, match=r"^attention_mask has shape \(2, 3\)"):
        tiny_model().generate(random_ids(2, 5), attention_mask=mask, max_new_tokens=2)
    # An all-ones mask never reaches the model, only the positions derived from it: their error points at the mask.
    with pytest.raises(ValueError, match=r"position_ids must .*got .* shape \(2, 3\)\. \(`generate` derives them"):
        tiny_model().generate(random_ids(2, 5), attention_mask=torch.ones(2, 3, dtype=torch.long), max_new_tokens=2)


@pytest.mark.parametrize("mask_length", [1, 6])  # only the new token, or more columns than tokens
def test_attention_mask_must_cover_the_cached_and_the_new_tokens(tiny_model, mask_length):
    model = tiny_model()
    with torch.no_grad():
        cache = model(random_ids(2, 3), use_cache=True).cache
        model(random_ids(2, 1), cache=cache, attention_mask=torch.ones(2, 4, dtype=torch.long))  # 3 cached + 1 new
        with pytest.raises(ValueError, match=r"cached \+ new tokens = 4 \+ 1"):
            model(random_ids(2, 1), cache=cache, attention_mask=torch.ones(2, mask_length, dtype=torch.long))


# ----- generation and attention backends -----


def test_greedy_generation_with_and_without_cache(tiny_model):
    model = tiny_model(initializer_range=0.2)
    ids = random_ids(2, 5)
    with_cache = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True)
    without_cache = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False)
    assert with_cache.shape == (2, 15)
    assert torch.equal(with_cache, without_cache)



def test_generate_reads_the_stored_signature_of_the_forward(tiny_model, monkeypatch):
    """transformers' `generate` checks a remote-code model's forward for a `cache_position` argument at every step;
    the stored signature, the forward's own, answers without inspecting the function again."""
    assert ClusterMoEForCausalLM.is_remote_code()  # the check runs for ClusterMoE
    model = tiny_model()
    inspected = []  # functions whose signature `inspect` computed

    def spy(signature_class, function, *args, **kwargs):
        inspected.append(function.__qualname__)
        return original(signature_class, function, *args, **kwargs)

    original = inspect._signature_from_function
    monkeypatch.setattr(inspect, "_signature_from_function", spy)
    model.generate(random_ids(1, 3), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert "ClusterMoEForCausalLM.forward" not in inspected
    stored = inspect.signature(model.forward)

    @functools.wraps(model.forward)  # as accelerate's hooks and `torch.compile(model.forward)` wrap it
    def wrapped(*args, **kwargs):
        return model.forward(*args, **kwargs)

    assert inspect.signature(wrapped) == stored  # bound: no `self`
    monkeypatch.delattr(inspect.unwrap(ClusterMoEForCausalLM.forward), "__signature__")
    assert stored == inspect.signature(model.forward)  # the forward's own


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])  # static: the model gets a 4D mask
def test_left_padded_batch_generation_matches_per_sample(tiny_model, cache_implementation):
    model = tiny_model(initializer_range=0.2)
    prompts = [random_ids(1, 7), random_ids(1, 4), random_ids(1, 2)]
    longest = max(prompt.shape[1] for prompt in prompts)
    batch = torch.cat([F.pad(prompt, (longest - prompt.shape[1], 0), value=PAD) for prompt in prompts])
    attention_mask = (batch != PAD).long()

    options = {"max_new_tokens": 6, "do_sample": False, "cache_implementation": cache_implementation}
    generated = model.generate(batch, attention_mask=attention_mask, **options)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt, **options)
        assert torch.equal(generated[row, longest:], alone[0, prompt.shape[1] :]), f"prompt {row}"


def test_eager_and_sdpa_attention_agree_on_padded_batch(tiny_model):
    sdpa = tiny_model(initializer_range=0.2)
    eager = clone_model(sdpa, attn_implementation="eager")
    assert (sdpa.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")

    ids = random_ids(2, 9)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :4] = 0
    with torch.no_grad():
        sdpa_logits = sdpa(ids, attention_mask=attention_mask).logits
        eager_logits = eager(ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(sdpa_logits[real], eager_logits[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("experts_implementation", ["grouped_mm", "batched_mm"])
def test_experts_backends_match_eager(tiny_model, experts_implementation):
    reference = tiny_model(top_k_clusters=2, experts_per_cluster=3, initializer_range=0.1).train()
    eager = clone_model(reference, experts_implementation="eager")
    other = clone_model(reference, experts_implementation=experts_implementation)
    assert other.config._experts_implementation == experts_implementation
    assert eager.config._experts_implementation == "eager"

    ids = random_ids(2, 8)
    outputs = {}
    for name, model in (("eager", eager), (experts_implementation, other)):
        out = model(ids, labels=ids)
        out.loss.backward()
        outputs[name] = (out.logits, {n: p.grad for n, p in model.named_parameters()})
    (eager_logits, eager_grads), (other_logits, other_grads) = outputs.values()
    torch.testing.assert_close(other_logits, eager_logits, rtol=1e-4, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(other_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ----- saving and loading -----


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_built_under_a_half_precision_default_dtype_trains(tiny_config, dtype):
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = ClusterMoEForCausalLM(tiny_config())
        ids = random_ids(2, 6)
        out = model(ids, labels=ids)
        out.loss.backward()
    finally:
        torch.set_default_dtype(default)
    assert model.lm_head.weight.dtype == dtype and torch.isfinite(out.loss) and out.aux_loss.dtype == torch.float32


def test_save_and_load_round_trip(tiny_model, tmp_path):
    model = tiny_model().train()
    model(random_ids(2, 6))  # fills the utilisation counts, which are saved with the weights
    model.eval()
    model.save_pretrained(tmp_path)

    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "config.json", "configuration_clustermoe.py", "modeling_clustermoe.py"} <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {  # every Auto class, whichever model class saved the checkpoint
        "AutoConfig": "configuration_clustermoe.ClusterMoEConfig",
        "AutoModel": "modeling_clustermoe.ClusterMoEModel",
        "AutoModelForCausalLM": "modeling_clustermoe.ClusterMoEForCausalLM",
        "AutoModelForSequenceClassification": "modeling_clustermoe.ClusterMoEForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_clustermoe.ClusterMoEForTokenClassification",
        "AutoModelForQuestionAnswering": "modeling_clustermoe.ClusterMoEForQuestionAnswering",
    }

    ids = random_ids(2, 6)
    with torch.no_grad():
        expected = model(ids).logits
    for loader in (ClusterMoEForCausalLM, AutoModelForCausalLM):
        reloaded = loader.from_pretrained(tmp_path)
        assert type(reloaded) is ClusterMoEForCausalLM
        with torch.no_grad():
            torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)
        assert torch.equal(expert_counts(reloaded), expert_counts(model))
        assert expert_counts(reloaded).sum() > 0


@pytest.mark.slow
def test_trust_remote_code_load_without_the_package(tiny_model, tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "checkpoint")
    ids = random_ids(2, 6)
    torch.save(ids, tmp_path / "ids.pt")

    script = textwrap.dedent(
        """
        import sys

        sys.modules["clustermoe_hf"] = None  # blocks the installed (editable or not) package
        try:
            import clustermoe_hf
        except ImportError:
            pass
        else:
            raise SystemExit("clustermoe_hf is still importable")

        import torch
        from transformers import (
            AutoModel,
            AutoModelForCausalLM,
            AutoModelForQuestionAnswering,
            AutoModelForSequenceClassification,
            AutoModelForTokenClassification,
        )

        ids = torch.load("ids.pt")
        model = AutoModelForCausalLM.from_pretrained("checkpoint", trust_remote_code=True)
        # A class not loaded through an Auto class (here before AutoModel loads it) saves the code too.
        model.model.save_pretrained("base_model")
        base_model = AutoModel.from_pretrained("base_model", trust_remote_code=True)
        base = AutoModel.from_pretrained("checkpoint", trust_remote_code=True)
        classifier = AutoModelForSequenceClassification.from_pretrained(
            "checkpoint", trust_remote_code=True, num_labels=3
        )
        tagger = AutoModelForTokenClassification.from_pretrained("checkpoint", trust_remote_code=True, num_labels=4)
        reader = AutoModelForQuestionAnswering.from_pretrained("checkpoint", trust_remote_code=True)
        for loaded in (model, base, classifier, tagger, reader):
            assert type(loaded).__module__.startswith("transformers_modules."), type(loaded).__module__
        with torch.no_grad():
            torch.save(model(ids).logits, "logits.pt")
            torch.save(base(ids).last_hidden_state, "hidden.pt")
            assert classifier(ids).logits.shape == (2, 3)
            assert tagger(ids).logits.shape == (2, 6, 4)
            assert reader(ids).end_logits.shape == (2, 6)
            torch.testing.assert_close(base_model(ids).last_hidden_state, base(ids).last_hidden_state)
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]

    with torch.no_grad():
        expected = model(ids, output_hidden_states=True)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.load(tmp_path / "hidden.pt"), expected.hidden_states[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("first, second", [("50GB", "20KB"), ("20KB", "50GB")])  # shard sizes: one file / several
def test_a_save_over_a_checkpoint_sharded_otherwise_loads_the_new_weights(tiny_model, tmp_path, first, second):
    """transformers removes earlier shards but not an earlier single weights file, which `from_pretrained` would
    prefer to the new shards."""
    tiny_model().save_pretrained(tmp_path, max_shard_size=first)
    torch.manual_seed(1)
    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_size=second)
    sharded = second == "20KB"
    assert (tmp_path / "model.safetensors").exists() != sharded
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    ids = random_ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(ClusterMoEForCausalLM.from_pretrained(tmp_path)(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "failure",
    ["generation_config", "generation token id", "config", "size changed after building", "argument", "disk full"],
)
def test_a_save_that_fails_leaves_the_checkpoint_in_the_folder_as_it_was(tiny_model, tmp_path, monkeypatch, failure):
    """transformers writes the code, the config, the generation config and the weights in turn, into the folder: a
    save that failed halfway would leave a new config over old weights. Every file is written elsewhere first."""
    checkpoint = tmp_path / "checkpoint"
    tiny_model().save_pretrained(checkpoint)
    with open(checkpoint / "modeling_clustermoe.py", "a") as code:
        code.write("# the code of the checkpoint already here\n")
    before = {path.name: path.read_bytes() for path in checkpoint.iterdir()}

    model, options = tiny_model(experts_per_cluster=2), {}
    if failure == "generation_config":
        model.generation_config.temperature = 0.7  # a sampling setting without do_sample=True
    elif failure == "generation token id":
        model.generation_config.pad_token_id = VOCAB_SIZE  # generate would pad finished sequences with it
    elif failure == "config":
        model.config.top_k_experts = 3  # more than experts_per_cluster
    elif failure == "size changed after building":
        model.config.num_clusters = 4  # the weights are of 2 clusters: the checkpoint would not load
    elif failure == "argument":
        options["max_shard_size"] = "10XB"  # read by transformers after it wrote the config
    else:

        def full_disk(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(modeling_utils, "safe_save_file", full_disk)  # the weights, written last
    with pytest.raises((ValueError, OSError), match="num_clusters=4" if "size" in failure else None):
        model.save_pretrained(checkpoint, **options)
    assert {path.name: path.read_bytes() for path in checkpoint.iterdir()} == before  # and no staging folder left
    assert ClusterMoEForCausalLM.from_pretrained(checkpoint).config.experts_per_cluster == 4


@pytest.mark.parametrize(
    "failure",
    [
        "earlier weights held open",
        "Ctrl-C at the new config",
        "Ctrl-C right after a move",
        "a file that cannot move back",
        "Ctrl-C twice",
    ],
)
def test_a_save_interrupted_while_its_files_move_into_place_leaves_the_checkpoint_as_it_was(
    tiny_model, tmp_path, monkeypatch, failure
):
    """A sharded save over a single weights file: the earlier file cannot be moved while another program holds it
    (Windows, a model memory-mapping it), or Ctrl-C arrives as the files move, also between a move and the next
    statement. Removing the earlier file last, after the new config, had left it next to the new files, and
    `from_pretrained` loaded it under the new config. Where the earlier files cannot all move back (one is held, or
    Ctrl-C comes again), those left are kept aside, in a folder that the error names if it can."""
    checkpoint = tmp_path / "checkpoint"
    tiny_model().save_pretrained(checkpoint)
    before = {path.name: path.read_bytes() for path in checkpoint.iterdir()}
    replace, moves = os.replace, []

    def failing_replace(source, destination):
        moves.append(source)
        staged, moving_back = ".clustermoe-saving-" in str(source), ".clustermoe-earlier-" in str(source)
        if failure == "earlier weights held open" and Path(source) == checkpoint / "model.safetensors":
            raise PermissionError(13, "The process cannot access the file because it is being used", source)
        if failure == "Ctrl-C at the new config" and staged and Path(destination) == checkpoint / "config.json":
            raise KeyboardInterrupt
        if moving_back and failure == "a file that cannot move back" and Path(destination).name == "config.json":
            raise PermissionError(13, "The process cannot access the file because it is being used", source)
        if moving_back and failure == "Ctrl-C twice":
            raise KeyboardInterrupt
        replace(source, destination)
        if failure == "Ctrl-C right after a move" and len(moves) == 2:
            raise KeyboardInterrupt
        if failure in ("a file that cannot move back", "Ctrl-C twice") and len(moves) == 7:  # the 2nd new file in
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(PermissionError if failure == "earlier weights held open" else KeyboardInterrupt) as raised:
        tiny_model(top_k_experts=1).save_pretrained(checkpoint, max_shard_size="20KB")
    monkeypatch.undo()
    if failure in ("a file that cannot move back", "Ctrl-C twice"):
        (earlier,) = checkpoint.glob(".clustermoe-earlier-*")
        assert f"before this save are in {earlier}." in raised.value.__notes__[0]  # the second Ctrl-C's too
        if failure == "a file that cannot move back":
            assert [path.name for path in earlier.iterdir()] == ["config.json"]
        for path in earlier.iterdir():
            path.rename(checkpoint / path.name)
        earlier.rmdir()
    assert {path.name: path.read_bytes() for path in checkpoint.iterdir()} == before  # and no other folder left
    assert ClusterMoEForCausalLM.from_pretrained(checkpoint).config.top_k_experts == 2


def test_a_save_whose_earlier_files_another_save_moves_meanwhile_completes(tiny_model, tmp_path, monkeypatch):
    """Two saves into one folder at once (`save_on_each_node` on a shared file system): the earlier files one of them
    moves aside are gone for the other, which still moves its own files in. The last save's files stay."""
    checkpoint = tmp_path / "checkpoint"
    tiny_model().save_pretrained(checkpoint)
    replace = os.replace

    def replace_after_another_save(source, destination):
        if Path(source).parent == checkpoint:  # an earlier file: the other save took it first
            Path(source).unlink(missing_ok=True)
        replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_after_another_save)
    tiny_model(top_k_experts=1).save_pretrained(checkpoint)
    monkeypatch.undo()
    assert not list(checkpoint.glob(".clustermoe-*"))
    assert ClusterMoEForCausalLM.from_pretrained(checkpoint).config.top_k_experts == 1


@pytest.mark.parametrize(
    "folder, save_options",
    [
        ("generation_config.json", {}),  # a file this save writes
        ("model.safetensors", {"max_shard_size": "20KB"}),  # earlier weights that a sharded save removes
        ("model-00001-of-00002.safetensors", {}),  # an earlier shard that a single-file save removes
    ],
)
def test_a_save_into_a_folder_holding_a_folder_named_as_a_checkpoint_file_changes_nothing(
    tiny_model, tmp_path, folder, save_options
):
    """Moving the new files into place, or removing the earlier weights, would fail at that folder, after the files
    moved before it."""
    checkpoint = tmp_path / "checkpoint"
    tiny_model().save_pretrained(checkpoint)
    (checkpoint / folder).unlink(missing_ok=True)
    (checkpoint / folder).mkdir()
    before = {path.name: path.is_dir() or path.read_bytes() for path in checkpoint.iterdir()}
    with pytest.raises(IsADirectoryError, match=rf"folders named as files of the checkpoint \({re.escape(folder)}\)"):
        tiny_model(experts_per_cluster=2).save_pretrained(checkpoint, **save_options)
    assert {path.name: path.is_dir() or path.read_bytes() for path in checkpoint.iterdir()} == before


def test_a_save_replaces_a_link_to_a_folder_named_as_a_checkpoint_file(tiny_model, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "generation_config.json").symlink_to(elsewhere, target_is_directory=True)
    tiny_model().save_pretrained(checkpoint)
    assert (checkpoint / "generation_config.json").is_file() and elsewhere.is_dir()


@pytest.mark.parametrize(
    "name, value, allowed",
    [
        ("pad_token_id", VOCAB_SIZE, rf"in \[0, vocab_size={VOCAB_SIZE}\)"),
        ("bos_token_id", 1.0, rf"in \[0, vocab_size={VOCAB_SIZE}\)"),
        ("eos_token_id", [2, VOCAB_SIZE], rf"in \[0, vocab_size={VOCAB_SIZE}\), a non-empty list of such ids, or -1"),
        ("eos_token_id", [], rf"in \[0, vocab_size={VOCAB_SIZE}\), a non-empty list of such ids"),
        # without a pad id, generate pads finished sequences with the first EOS id
        ("eos_token_id", [-1, 59], rf"in \[0, vocab_size={VOCAB_SIZE}\), a non-empty list of such ids, or -1"),
        ("eos_token_id", -1.0, rf"in \[0, vocab_size={VOCAB_SIZE}\), a non-empty list of such ids, or -1"),
    ],
)
def test_a_generation_config_with_token_ids_outside_the_vocabulary_is_not_saved(
    tiny_model, tmp_path, name, value, allowed
):
    """Generating with such a checkpoint failed in the forward with "input_ids must be in [0, vocab_size)", although
    the caller's ids were: `generate` had padded a finished sequence with the generation config's pad id."""
    model = tiny_model()
    setattr(model.generation_config, name, value)
    match = rf"generation_config.{name} \({re.escape(str(value))}\) must be None or {allowed}.*: nothing was saved"
    with pytest.raises(ValueError, match=match):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("eos_token_id", [-1, (2, 5)])
def test_eos_ids_that_transformers_takes_are_saved(tiny_model, tmp_path, eos_token_id):
    """-1 alone is no EOS: transformers' continuous batching writes it into a generation config without one, the
    model's own included. generate takes a tuple of ids too."""
    model = tiny_model().eval()
    model.generation_config.eos_token_id = eos_token_id
    assert model.generate(random_ids(1, 4), max_new_tokens=3, do_sample=False).shape[0] == 1
    model.save_pretrained(tmp_path)


class _ClassifierSubclass(ClusterMoEForSequenceClassification):
    """A user's subclass, in a module of its own."""


def test_a_subclass_checkpoint_maps_only_its_own_class(tiny_config, tmp_path):
    """Its module, which the checkpoint holds, does not define the ClusterMoE classes under their names."""
    _ClassifierSubclass(tiny_config(num_labels=2)).save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_clustermoe.ClusterMoEConfig",
        "AutoModelForSequenceClassification": "test_modeling._ClassifierSubclass",
    }


def test_a_save_stages_its_files_on_the_file_system_of_its_folder(tiny_model, tmp_path):
    """Into a folder on another file system (a mount, or a link to one): files are moved into place by renaming, which
    works only within one file system. Another save's staging folder there is left alone: it may still be running."""
    other = tempfile.mkdtemp(dir="/dev/shm") if os.path.isdir("/dev/shm") else None
    if other is None or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        shutil.rmtree(other, ignore_errors=True)
        pytest.skip("needs a second file system (/dev/shm)")
    try:
        (tmp_path / "checkpoint").symlink_to(other)
        os.makedirs(os.path.join(other, ".clustermoe-saving-c3d4"))
        model = tiny_model()
        model.save_pretrained(tmp_path / "checkpoint")
        assert sorted(os.listdir(other)) == sorted(
            [".clustermoe-saving-c3d4", "config.json", "configuration_clustermoe.py", "generation_config.json",
             "model.safetensors", "modeling_clustermoe.py"]
        )  # fmt: skip
        ids = random_ids(1, 6)
        with torch.no_grad():
            torch.testing.assert_close(
                ClusterMoEForCausalLM.from_pretrained(tmp_path / "checkpoint")(ids).logits, model(ids).logits
            )
    finally:
        shutil.rmtree(other)


@pytest.mark.parametrize(
    "size, value",
    [("num_hidden_layers", 1), ("first_k_dense_layers", 1), ("num_attention_heads", 2), ("num_key_value_heads", 1),
     ("head_dim", 4), ("intermediate_size", 8), ("vocab_size", 50)],
)  # fmt: skip
def test_a_config_whose_sizes_changed_after_building_is_not_saved(tiny_model, tmp_path, size, value):
    """The checkpoint's weights would not match its config.json: it would not load, or load other layers."""
    model = tiny_model()
    setattr(model.config, size, value)
    with pytest.raises(ValueError, match=f"{size}={value}"):
        model.save_pretrained(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_classifier_whose_label_count_changed_is_not_saved(tiny_config, tmp_path):
    model = ClusterMoEForSequenceClassification(tiny_config(num_labels=3))
    model.config.num_labels = 5  # the score head still has 3 rows
    with pytest.raises(ValueError, match="num_labels=5"):
        model.save_pretrained(tmp_path)
    assert list(tmp_path.iterdir()) == []


# ----- gradient checkpointing -----


def test_gradient_checkpointing_same_gradients_and_counts(tiny_model):
    model = tiny_model(top_k_clusters=2, attention_dropout=0.0, router_jitter_noise=0.0).train()
    checkpointed = clone_model(model)
    checkpointed.activation_checkpointing_enable()
    assert checkpointed.model.layers[0].gradient_checkpointing

    ids = random_ids(2, 8)
    results = []
    for candidate in (model, checkpointed):
        out = candidate(ids, labels=ids)
        out.loss.backward()
        grads = {name: param.grad for name, param in candidate.named_parameters()}
        results.append((out.loss, grads, expert_counts(candidate)))
    (loss, grads, counts), (ckpt_loss, ckpt_grads, ckpt_counts) = results

    torch.testing.assert_close(ckpt_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, msg=name)
    # one count per (token, chosen expert): the recomputation in the backward pass is not counted again
    assert torch.equal(counts.sum(-1), torch.full((2,), ids.numel() * model.config.num_experts_per_tok))
    assert torch.equal(ckpt_counts, counts)


@pytest.mark.parametrize("checkpointing_kwargs", [{"use_reentrant": True}, {}], ids=["reentrant", "torch default"])
def test_reentrant_gradient_checkpointing_is_refused_while_router_losses_count(tiny_model, checkpointing_kwargs):
    """Reentrant checkpointing runs the layers without gradients, so the router losses recorded inside them would
    train nothing. A training forward says so; inference and a model without router losses are not affected."""
    ids = random_ids(2, 6)
    model = tiny_model().train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing_kwargs)
    with pytest.raises(ValueError, match="use_reentrant=True would train the routers without their balancing"):
        model(ids, labels=ids)
    with torch.no_grad():
        model(ids, labels=ids)

    without_losses = tiny_model(router_aux_loss_coef=0.0, router_cluster_aux_loss_coef=0.0, router_z_loss_coef=0.0)
    without_losses.train().activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing_kwargs)
    without_losses(ids, labels=ids).loss.backward()


@pytest.mark.parametrize("randomness", [{"router_jitter_noise": 0.1}, {"attention_dropout": 0.1}])
@pytest.mark.parametrize("preserve_rng_state", [False, 0, None])  # torch's checkpoint reads a truth value
def test_checkpointing_without_preserving_the_rng_state_is_refused_where_the_forward_draws_random_numbers(
    tiny_model, randomness, preserve_rng_state
):
    """The recomputation would route with other jitter, or drop other attention weights, than the forward: the
    gradients would silently belong to neither."""
    ids, kwargs = random_ids(2, 6), {"use_reentrant": False, "preserve_rng_state": preserve_rng_state}
    model = tiny_model(**randomness).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    name, value = next(iter(randomness.items()))
    refusal = rf"preserve_rng_state={preserve_rng_state} would recompute .*\({name}={value}\)"
    with pytest.raises(ValueError, match=refusal):
        model(ids, labels=ids)

    deterministic = tiny_model(router_jitter_noise=0.0, attention_dropout=0.0).train()
    deterministic.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    deterministic(ids, labels=ids).loss.backward()
    # Without MoE layers, no router draws jitter.
    dense = tiny_model(router_jitter_noise=0.1, first_k_dense_layers=2).train()
    dense.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    dense(ids, labels=ids).loss.backward()


def test_reentrant_checkpointing_judges_expert_health_as_without_checkpointing(tiny_model):
    """Its first pass runs without gradients: it must still be a training forward, which judges each expert against
    its cluster (here an outsized one), or the reported loss and the recomputed gradients would differ."""
    ids = random_ids(4, 16)
    losses, reliabilities = [], []
    for checkpointing_kwargs in (None, {"use_reentrant": True}):
        torch.manual_seed(0)
        model = tiny_model(num_hidden_layers=1, router_aux_loss_coef=0.0, router_z_loss_coef=0.0).train()
        block = model.model.layers[0].mlp
        with torch.no_grad():
            block.experts.gate_up_proj[1].mul_(1000.0)
        if checkpointing_kwargs is not None:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing_kwargs)
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.optim.SGD(model.parameters(), lr=0.0).step()
        losses.append(loss.detach())
        reliabilities.append(block.router.expert_reliability.clone())
    assert reliabilities[0][1] < 1  # the outsized expert was caught
    torch.testing.assert_close(losses[1], losses[0])
    assert torch.equal(reliabilities[1], reliabilities[0])


def test_gradient_checkpointing_recomputes_the_routing_of_the_forward(tiny_model):
    """The training forward adds its token counts to the routing state before the backward re-runs the layers. With
    uneven reliabilities, counts weighting the cluster reliability at once would flip the cluster choice in the
    recomputation: selection weighs them as of the last optimizer step instead."""
    model = tiny_model(num_hidden_layers=1, use_adaptive_routing=True, attention_dropout=0.0).train()
    router = model.model.layers[0].mlp.router
    with torch.no_grad():
        router.cluster_weight.zero_()  # tied cluster scores: the selection terms decide
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 5.0, 0.0, 0.0, 0.0, 0.0]))  # traffic to experts 2, 3
        router.expert_reliability.copy_(torch.tensor([1.0, 1.0, 0.6, 0.6, 0.998, 0.998, 0.998, 0.998]))
        router.selection_token_counts.copy_(torch.tensor([1000, 1000, 0, 0, 0, 0, 0, 0]))
    checkpointed = clone_model(model)
    checkpointed.activation_checkpointing_enable()

    ids = random_ids(4, 16)
    grads, clusters = [], []
    for candidate in (model, checkpointed):
        chosen = []
        candidate.model.layers[0].mlp.router.register_forward_hook(lambda m, a, out: chosen.append(out.cluster_index))
        candidate(ids, labels=ids).loss.backward()
        grads.append({name: param.grad for name, param in candidate.named_parameters()})
        clusters.append(chosen)
    assert len(clusters[1]) == 2  # the forward and its recomputation
    assert all(torch.equal(index, clusters[0][0]) for index in clusters[1])
    assert torch.all(clusters[0][0] == 0)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


@pytest.mark.parametrize("compiled", [False, True])
def test_a_copied_model_updates_its_own_routing_state(tiny_model, compiled):
    """`copy.deepcopy` (EMA or teacher models) does not run `__init__`, which registers a model with the
    optimizer-step hook; copying registers it, also for a copy that then trains through `torch.compile`."""
    model = tiny_model(use_adaptive_routing=True, num_hidden_layers=1).train()
    copied = copy.deepcopy(model)
    optimizer = torch.optim.SGD(copied.parameters(), lr=1e-3)
    forward = torch.compile(copied, backend="eager", fullgraph=True) if compiled else copied
    for _ in range(2):
        ids = random_ids(2, 8)
        forward(ids, labels=ids).loss.backward()
        optimizer.step()
    assert int(copied.model.routing_state.training_step) == 2
    assert copied.model.layers[0].mlp.router.expert_bias.abs().sum() > 0
    assert int(model.model.routing_state.training_step) == 0  # the original is left alone


def test_one_optimizer_updates_its_models_in_the_order_it_lists_their_parameters(tiny_model, monkeypatch):
    """Each model's update all-reduces its statistics under torch.distributed: every process must update the models
    of one optimizer in the same order, which the order of the optimizer's parameters gives (not object ids)."""
    first, second = tiny_model().train(), tiny_model().train()
    updated = []
    original = ClusterMoEModel.apply_pending_routing_updates
    monkeypatch.setattr(
        ClusterMoEModel, "apply_pending_routing_updates", lambda base: updated.append(base) or original(base)
    )
    for models in ((second, first), (first, second)):
        optimizer = torch.optim.SGD([p for model in models for p in model.parameters()], lr=0.0)
        for model in models:
            ids = random_ids(2, 8)
            model(ids, labels=ids).loss.backward()
        updated.clear()
        optimizer.step()
        assert updated == [model.model for model in models]


def test_a_trained_model_pickles_whole(tiny_model, tmp_path):
    """`torch.save(model)` (pickle): the layers carry no output-recording hooks (closures, which pickle refuses)
    unless an output was recorded, as transformers' models. The loaded copy computes and trains as the original."""
    model = tiny_model(use_adaptive_routing=True).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    ids = random_ids(2, 8)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert all(torch.equal(tensor, model.state_dict()[name]) for name, tensor in loaded.state_dict().items())
    torch.testing.assert_close(loaded.eval()(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)
    loaded.train()(ids, labels=ids).loss.backward()
    torch.optim.SGD(loaded.parameters(), lr=1e-3).step()
    assert (int(loaded.model.routing_state.training_step), int(model.model.routing_state.training_step)) == (2, 1)


def test_per_layer_statistics_are_combined_on_one_device():
    """Under a device map the MoE layers' losses live on different devices; they are gathered on the first's."""
    from clustermoe_hf.modeling_clustermoe import combine_router_losses

    names = ("cluster_balance_loss", "expert_balance_loss", "router_z_loss")
    on_meta, on_cpu = dict.fromkeys(names, torch.ones((), device="meta")), dict.fromkeys(names, torch.ones(()))
    assert all(loss.device.type == "meta" for loss in combine_router_losses([on_meta, on_cpu]))


def test_the_aux_loss_share_is_on_the_loss_device():
    """Under a device map the labels and the Trainer's token count sit on the first device, the loss on the last."""
    from clustermoe_hf.modeling_clustermoe import _aux_loss_share

    labels, num_items, loss = torch.randint(0, 10, (2, 8)), torch.tensor(16), torch.ones((), device="meta")
    assert _aux_loss_share(labels, num_items, loss).device.type == "meta"  # "meta" stands in for the last GPU


# ----- expert utilisation -----


@pytest.mark.parametrize("output_router_logits", [False, True])  # True: no-gradient forwards return routing stats
def test_utilization_counts_training_forwards_only(tiny_model, output_router_logits):
    model = tiny_model(output_router_logits=output_router_logits)
    ids = random_ids(2, 6)
    per_forward = ids.numel() * model.config.num_experts_per_tok

    model.train()
    model(ids)
    counts = expert_counts(model).clone()
    assert torch.equal(counts.sum(-1), torch.full((2,), per_forward))

    with torch.no_grad():
        model(ids)  # inference in train mode
        model(ids, labels=ids)  # an evaluation loss in train mode
    model.generate(ids, max_new_tokens=3, do_sample=False)  # generate in train mode
    model.eval()
    model(ids)
    model.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(expert_counts(model), counts)

    model.train()
    model(ids)
    assert torch.equal(expert_counts(model), 2 * counts)


@pytest.mark.parametrize(
    "call_options",
    [{"return_dict": False}, {"return_dict": False, "output_hidden_states": True, "use_cache": False}],
)
def test_base_model_counts_training_forwards_in_every_output_format(tiny_model, call_options):
    model = tiny_model().train()
    ids = random_ids(2, 6)
    model.model(ids, **call_options)
    assert torch.equal(expert_counts(model).sum(-1), torch.full((2,), ids.numel() * model.config.num_experts_per_tok))
    model.model(ids, output_routing_stats=False, **call_options)  # no statistics asked for: nothing to count
    assert expert_counts(model).sum() == 2 * ids.numel() * model.config.num_experts_per_tok


def test_get_expert_utilization_and_reset(tiny_model):
    model = tiny_model(num_hidden_layers=3, first_k_dense_layers=1, num_clusters=3, experts_per_cluster=2).train()
    model(random_ids(2, 6))

    utilization = model.get_expert_utilization()
    expected_keys = {
        f"layer_{layer}_cluster_{c}_expert_{e}" for layer in (1, 2) for c in range(3) for e in range(2)
    }
    assert set(utilization) == expected_keys
    for layer in (1, 2):
        counts = model.model.layers[layer].mlp.router.expert_token_counts
        fractions = torch.tensor([utilization[f"layer_{layer}_cluster_{i // 2}_expert_{i % 2}"] for i in range(6)])
        assert fractions.sum().item() == pytest.approx(1.0)
        torch.testing.assert_close(fractions, counts.double().div(counts.sum()).float())

    model.reset_expert_utilization()
    assert expert_counts(model).sum() == 0
    assert set(model.get_expert_utilization().values()) == {0.0}


def test_reset_expert_utilization_leaves_routing_alone(tiny_model):
    """Resetting the statistics must not change which experts tokens go to: selection weighs a cluster's reliability by
    `selection_token_counts`, which the reset leaves to keep accumulating. Here those counts make cluster 0's
    reliability mostly that of its degraded expert 0, so zeroing them would raise cluster 0's selection term."""
    model = tiny_model()  # reliability routing on
    router = model.model.layers[0].mlp.router
    with torch.no_grad():
        router.expert_reliability.copy_(torch.tensor([0.3] + [1.0] * 7))
        router.selection_token_counts.copy_(torch.tensor([100] + [0] * 7))
        router.expert_token_counts.copy_(torch.arange(1, 9))
    bias = [term.clone() for term in router.selection_bias()]
    selection_counts = router.selection_token_counts.clone()

    model.reset_expert_utilization()
    assert expert_counts(model).sum() == 0
    assert torch.equal(router.selection_token_counts, selection_counts)
    for after in (router.selection_bias(), router._compute_selection_bias()):  # cached, and rebuilt from the buffers
        assert all(torch.equal(term, before) for term, before in zip(after, bias, strict=True))


def test_padding_tokens_are_not_counted(tiny_model):
    model = tiny_model().train()
    full, short = random_ids(1, 8), random_ids(1, 5)
    batch = torch.cat([full, F.pad(short, (0, 3), value=PAD)])  # right padding leaves the real tokens unchanged
    model(batch, attention_mask=(batch != PAD).long())
    padded_counts = expert_counts(model).clone()
    assert torch.equal(padded_counts.sum(-1), torch.full((2,), 13 * model.config.num_experts_per_tok))

    model.reset_expert_utilization()
    model(full)
    model(short)
    assert torch.equal(expert_counts(model), padded_counts)


def test_a_batch_without_padding_skips_the_padding_bookkeeping(tiny_model):
    """On CPU an all-ones attention mask is read on the host (no device sync there) and the MoE blocks get no token
    mask, as without an attention mask: the per-pair padding masks cost ~6% of a decoding step's MoE block."""
    model = tiny_model()
    received = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda module, args: received.append(args[1]))
    ids = random_ids(2, 6)
    attention_mask = torch.ones_like(ids)
    expected = model(ids).logits
    torch.testing.assert_close(model(ids, attention_mask=attention_mask).logits, expected, rtol=0, atol=0)
    attention_mask[0, 0] = 0
    model(ids, attention_mask=attention_mask)
    assert received[0] is None and received[1] is None and received[2].tolist() == [False] + [True] * 11


def test_the_summary_counts_the_experts_of_every_moe_layer(tiny_model):
    summary = tiny_model(num_hidden_layers=3, first_k_dense_layers=1).get_model_summary()
    assert (summary["num_moe_layers"], summary["num_experts"], summary["total_experts"]) == (2, 8, 16)


def test_a_save_that_fails_while_moving_files_into_a_new_folder_leaves_no_config(tiny_model, tmp_path, monkeypatch):
    """config.json is moved into place last: a folder with a config.json holds a complete checkpoint."""
    model, real_replace = tiny_model(), os.replace

    def replace(source, destination, *args, **kwargs):
        if os.path.basename(destination) == "model.safetensors":
            raise OSError(28, "No space left on device")
        return real_replace(source, destination, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new" / "config.json").exists()


def test_a_shared_expert_size_changed_after_building_is_not_saved(tiny_model, tmp_path):
    model = tiny_model(shared_expert_intermediate_size=8)
    model.config.shared_expert_intermediate_size = 16
    with pytest.raises(ValueError, match="shared_expert_intermediate_size=16"):
        model.save_pretrained(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_classifier_pools_each_left_padded_rows_last_token_also_after_a_cache(tiny_config):
    """The 2-D mask covers cached + new tokens; the new tokens are its last columns."""
    model = ClusterMoEForSequenceClassification(tiny_config(num_labels=3)).eval()
    ids = random_ids(2, 6)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 left-padded by 3
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, 3:]).logits[0]
        first = model(ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        cached = model(ids[:, 4:], attention_mask=mask, cache=first.cache).logits
    torch.testing.assert_close(full[1], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
