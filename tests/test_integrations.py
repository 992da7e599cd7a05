"""What users try with any transformers model: loading options, big-model placement, sharding, embeddings resizing
and tying, gradient checkpointing, extra outputs, pipelines, PEFT, sequence classification, parallelism plans."""

import copy
import json
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import infer_auto_device_map
from accelerate.utils import compute_module_sizes
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedTokenizerFast,
    pipeline,
)
from transformers.distributed.fsdp import ALL_FSDP_STYLES
from transformers.distributed.parallel_utils import _get_parameter_plan
from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES

from clustermoe_hf import (
    ClusterMoEForCausalLM,
    ClusterMoEForQuestionAnswering,
    ClusterMoEForSequenceClassification,
    ClusterMoEForTokenClassification,
)
from clustermoe_hf.modeling_clustermoe import ClusterMoEDecoderLayer, _is_expert_parallel


VOCAB_SIZE = 64  # tests/conftest.py TINY_CONFIG
PAD = 0
ROUTING_STATE = ("cluster_bias", "expert_bias", "expert_reliability")
PENDING_STATISTICS = ("pending_counts", "pending_observed", "pending_healthy")


def random_ids(batch_size, length, vocab_size=VOCAB_SIZE):
    return torch.randint(3, vocab_size, (batch_size, length))


def greedy(model, input_ids, max_new_tokens=5, **kwargs):
    return model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)


# ----- loading options -----


def assert_routing_state_in_float32(model):
    # bf16 would round away the small steps this state accumulates (bias updates of 1e-3, reliability EMAs); counts
    # must stay exact integers
    for _, block in model._moe_layers():
        assert all(getattr(block.router, name).dtype == torch.float32 for name in ROUTING_STATE)
        assert block.router.expert_token_counts.dtype == block.router.selection_token_counts.dtype == torch.long
        assert block.masked_faulty_expert.dtype == torch.bool
    assert all(buffer.dtype == torch.long for buffer in model.model.routing_state.buffers())


def test_bfloat16_keeps_routing_state_in_float32(tiny_model, tiny_config, tmp_path):
    model = tiny_model(use_adaptive_routing=True)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert {param.dtype for param in loaded.parameters()} == {torch.bfloat16}
    assert_routing_state_in_float32(loaded)
    assert_routing_state_in_float32(AutoModelForCausalLM.from_config(tiny_config(), dtype=torch.bfloat16))

    ids = random_ids(2, 6)
    with torch.no_grad():
        expected = model(ids).logits
        logits = loaded(ids).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), expected, rtol=0.05, atol=0.05)
    assert greedy(loaded, ids).shape == (2, 11)

    # a bf16 training step folds its statistics into the float32 state
    loaded.train()
    optimizer = torch.optim.SGD(loaded.parameters(), lr=0.1)
    loaded(ids, labels=ids).loss.backward()
    optimizer.step()
    assert loaded.model.routing_state.training_step == 1
    assert any(block.router.expert_bias.abs().sum() > 0 for _, block in loaded._moe_layers())
    assert_routing_state_in_float32(loaded)


def test_casting_the_model_keeps_routing_state_in_float32(tiny_model):
    model = tiny_model(use_adaptive_routing=True, adaptive_routing_rate=1e-3)
    router = model.model.layers[0].mlp.router
    router.expert_bias.fill_(0.5)  # 16-bit floats step 0.5 by 2**-8 (bf16) at best: 0.5 + 1e-3 would round to 0.5
    router.expert_reliability[0] = 0.9123
    casts = [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("cpu", torch.bfloat16)]
    casts.append(lambda m: m.type(torch.bfloat16))  # casts integer buffers too, unlike `to`
    for cast in casts:
        model = cast(model)
        assert_routing_state_in_float32(model)
        assert router.expert_reliability[0] == torch.tensor(0.9123)  # not rounded through a 16-bit copy
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16

    model.train()
    ids = random_ids(2, 6)
    model(ids, labels=ids).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    assert router.expert_bias.dtype == torch.float32
    assert (router.expert_bias - 0.5).abs().max() == pytest.approx(1e-3, rel=1e-4)
    counts = model.model.layers[0].mlp.router.selection_token_counts
    assert counts.sum() == ids.numel() * model.config.num_experts_per_tok


def test_routing_state_loaded_in_another_dtype_gets_its_own_back_at_the_next_cast(tiny_model):
    """`load_state_dict(assign=True)` (how meta-initialised models load) takes the tensors as they are, here a whole
    state cast to bf16, counts included: the next cast or move restores float32 and integer routing state."""
    for cast in (lambda m: m.float(), lambda m: m.to("cpu"), lambda m: m.half()):
        model = tiny_model()
        router = model.model.layers[0].mlp.router
        router.expert_token_counts.fill_(100_000)  # past float16: restored from the bf16 state, not through fp16
        state = {name: tensor.to(torch.bfloat16) for name, tensor in model.state_dict().items()}
        model.load_state_dict(state, assign=True)
        assert router.expert_token_counts.dtype == torch.bfloat16
        model = cast(model)
        assert_routing_state_in_float32(model)
        assert (router.expert_token_counts == 99_840).all()  # 100,000 in bf16


def test_device_map_auto_loads_the_same_model(tiny_model, tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto")
    ids = random_ids(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)


def test_no_split_modules_keep_decoder_layers_whole(tiny_model):
    model = tiny_model(num_hidden_layers=4)
    assert set(model._no_split_modules) == {"ClusterMoEDecoderLayer"}
    layer_size = compute_module_sizes(model)["model.layers.0"]
    # Three devices that each hold about 1.5 layers: the layers must be spread, never cut.
    device_map = infer_auto_device_map(
        model,
        max_memory={0: int(1.5 * layer_size), 1: int(1.5 * layer_size), "cpu": 10**9},
        no_split_module_classes=model._no_split_modules,
    )
    assert len(set(device_map.values())) > 1
    layer_names = {name for name, module in model.named_modules() if isinstance(module, ClusterMoEDecoderLayer)}
    for name in device_map:
        assert not any(name.startswith(layer + ".") for layer in layer_names), f"{name} splits a decoder layer"


def test_device_map_auto_with_disk_offload(tiny_model, tmp_path):
    model = tiny_model(num_hidden_layers=4)
    model.save_pretrained(tmp_path)
    cpu_budget = int(0.6 * compute_module_sizes(model)[""])
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, device_map="auto", max_memory={"cpu": cpu_budget}, offload_folder=tmp_path / "offload"
    )
    assert "disk" in offloaded.hf_device_map.values()
    ids = random_ids(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, model(ids).logits, rtol=1e-6, atol=1e-6)



@pytest.mark.parametrize("change", ["prune_experts", "reinitialize_expert"])
def test_changing_the_experts_of_an_offloaded_model_is_refused(tiny_model, tmp_path, change):
    """Its expert weights wait on the meta device between forwards: new ones written there would be replaced by the
    offloaded old ones at the next forward, and pruned ones would no longer fit them."""
    model = tiny_model(num_hidden_layers=4)
    model.save_pretrained(tmp_path)
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, device_map={"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                              "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu",
                              "model.routing_state": "cpu", "lm_head": "cpu"},
        offload_folder=tmp_path / "offload",
    )  # fmt: skip
    ids = random_ids(2, 6)
    with torch.no_grad():
        before = offloaded(ids).logits
    with pytest.raises(ValueError, match=rf"{change} needs the expert weights .* on the meta device here: offloaded"):
        if change == "prune_experts":
            offloaded.prune_experts(experts_per_cluster_keep=2, rank_by="reliability")
        else:
            offloaded.reinitialize_expert(3, 0, 0)
    assert offloaded.config.experts_per_cluster == model.config.experts_per_cluster
    with torch.no_grad():
        torch.testing.assert_close(offloaded(ids).logits, before)


def test_sharded_save_and_load(tiny_model, tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / shard).exists() for shard in shards)
    assert not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(model.state_dict())

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_a_checkpoint_loads_into_fewer_layers_with_fresh_capacity_counters(tiny_model, tmp_path):
    """`from_pretrained(path, num_hidden_layers=k)` keeps the first k layers (e.g. for a draft model). The capacity
    counters are one per MoE layer in the model-level routing state, so their size no longer matches: transformers
    refuses that by name, and `ignore_mismatched_sizes=True` starts them from zero; the layers load as saved."""
    model = tiny_model(num_hidden_layers=2)
    model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(tmp_path, num_hidden_layers=1)

    first = AutoModelForCausalLM.from_pretrained(tmp_path, num_hidden_layers=1, ignore_mismatched_sizes=True)
    assert len(first.model.layers) == 1
    saved = model.state_dict()
    for name, tensor in first.state_dict().items():
        if "pair_counts" not in name:
            assert torch.equal(tensor, saved[name]), name
    assert first.get_capacity_stats() == {"layer_0_rerouted_pairs": 0, "layer_0_dropped_pairs": 0,
                                          "rerouted_pairs": 0, "dropped_pairs": 0}  # fmt: skip


# ----- embeddings -----


@pytest.mark.parametrize("tie_word_embeddings", [False, True])
def test_resize_token_embeddings(tiny_model, tie_word_embeddings):
    model = tiny_model(tie_word_embeddings=tie_word_embeddings)
    old_embeddings = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(VOCAB_SIZE + 10)

    assert model.config.vocab_size == VOCAB_SIZE + 10
    assert model.get_input_embeddings().weight.shape == (VOCAB_SIZE + 10, 32)
    assert model.get_output_embeddings().weight.shape == (VOCAB_SIZE + 10, 32)
    assert torch.equal(model.get_input_embeddings().weight[:VOCAB_SIZE], old_embeddings)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == tie_word_embeddings

    ids = random_ids(2, 6, vocab_size=VOCAB_SIZE + 10)
    ids[:, -1] = VOCAB_SIZE + 5  # a new token
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 6, VOCAB_SIZE + 10) and torch.isfinite(out.loss)


def test_tied_embeddings_survive_save_and_load(tiny_model, tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["tie_word_embeddings"] is True
    with safe_open(tmp_path / "model.safetensors", "pt") as checkpoint:
        saved_names = set(checkpoint.keys())
    assert "model.embed_tokens.weight" in saved_names and "lm_head.weight" not in saved_names

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)

    # one parameter, trained through both uses
    out = loaded.train()(random_ids(2, 6), labels=random_ids(2, 6))
    out.loss.backward()
    assert loaded.model.embed_tokens.weight.grad is not None


def test_untied_embeddings_stay_independent(tiny_model, tmp_path):
    model = tiny_model(tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_num_parameters(tiny_model):
    untied = tiny_model(tie_word_embeddings=False)
    tied = tiny_model(tie_word_embeddings=True)
    embedding_size = VOCAB_SIZE * 32
    assert untied.num_parameters() == sum(param.numel() for param in untied.parameters())
    assert untied.num_parameters() - tied.num_parameters() == embedding_size  # the tied head is counted once
    assert untied.num_parameters(exclude_embeddings=True) == untied.num_parameters() - embedding_size

    for param in untied.model.parameters():
        param.requires_grad_(False)
    assert untied.num_parameters(only_trainable=True) == embedding_size  # only the lm_head is left


# ----- training helpers and extra outputs -----


def test_gradient_checkpointing_with_peft_lora(tiny_model):
    """The PEFT + Trainer setup: frozen base, LoRA adapters, checkpointed layers, inputs made to require grad."""
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ids = random_ids(2, 7)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        lora = get_peft_model(tiny_model(), config).train()
        if checkpointing:
            lora.activation_checkpointing_enable()
            assert lora.base_model.model.model.layers[0].gradient_checkpointing
        lora(input_ids=ids, labels=ids).loss.backward()
        grads.append({name: param.grad for name, param in lora.named_parameters() if param.requires_grad})
    assert grads[1].keys() == grads[0].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_output_hidden_states(tiny_model):
    model = tiny_model(num_hidden_layers=3, first_k_dense_layers=1)
    ids = random_ids(2, 6)
    with torch.no_grad():
        out = model.model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 4  # embeddings + one per layer
    assert all(states.shape == (2, 6, 32) for states in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[0], model.model.embed_tokens(ids))
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)


def test_output_attentions_with_eager_attention(tiny_model):
    model = tiny_model(attn_implementation="eager")
    ids = random_ids(2, 6)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :2] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=attention_mask, output_attentions=True)
    assert len(out.attentions) == 2
    for weights in out.attentions:
        assert weights.shape == (2, 4, 6, 6)  # (batch, heads, queries, keys)
        real_queries = [weights[0], weights[1, :, 2:]]  # the queries at padding positions are meaningless
        for rows in real_queries:
            torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:-1]))
        assert torch.all(weights[0].triu(diagonal=1) == 0)  # causal
        assert torch.all(weights[1, :, 2:, 2:].triu(diagonal=1) == 0)
        assert torch.all(weights[1, :, 2:, :2] == 0)  # padding is not attended


# ----- pipelines, PEFT, sequence classification -----


def build_tokenizer():
    """A word-level tokenizer built locally (no download)."""
    words = "the cat sat on a mat dog ran far away and then came back home to eat some food".split()
    vocab = {token: idx for idx, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_text_generation_pipeline(tiny_model):
    tokenizer = build_tokenizer()
    model = tiny_model(vocab_size=len(tokenizer), initializer_range=0.2)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)

    prompts = ["the cat sat", "a dog ran far away"]
    expected = [greedy(model, tokenizer(prompt, return_tensors="pt").input_ids)[0] for prompt in prompts]
    text = generator(prompts[0], max_new_tokens=5, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert text == tokenizer.decode(expected[0][3:], skip_special_tokens=True)

    # batched: the pipeline left-pads the shorter prompt
    batched = generator(prompts, max_new_tokens=5, do_sample=False, return_tensors=True, batch_size=2)
    for result, alone in zip(batched, expected):
        token_ids = torch.tensor(result[0]["generated_token_ids"])
        assert torch.equal(token_ids[token_ids != tokenizer.pad_token_id], alone)


def test_peft_lora_on_attention_projections(tiny_model):
    model = tiny_model()
    ids = random_ids(2, 6)
    with torch.no_grad():
        base_logits = model(ids).logits
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    trainable = {name for name, param in lora.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name and ("q_proj" in name or "v_proj" in name) for name in trainable)

    lora.train()
    lora(input_ids=ids, labels=ids).loss.backward()
    assert all(
        param.grad is not None and param.grad.abs().sum() > 0 for param in lora.parameters() if param.requires_grad
    )
    assert all(param.grad is None for param in lora.parameters() if not param.requires_grad)

    lora.eval()
    with torch.no_grad():
        lora_logits = lora(input_ids=ids).logits
        assert not torch.allclose(lora_logits, base_logits)
        merged = lora.merge_and_unload()
        assert type(merged) is ClusterMoEForCausalLM
        assert not any("lora_" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(ids).logits, lora_logits, rtol=1e-5, atol=1e-5)


def test_peft_lora_on_the_fused_experts_serves_padded_batches(tiny_model):
    """The per-pair path, which padding takes, reads the experts implementation from the config, not from the
    experts module, which peft wraps. Padded generation matches the adapter-free model (LoRA starts at zero)."""
    model = tiny_model()
    ids = random_ids(2, 6)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :2] = 0
    expected = model.generate(ids, attention_mask=attention_mask, max_new_tokens=3, do_sample=False)
    lora = get_peft_model(model, LoraConfig(r=4, target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    generated = lora.generate(input_ids=ids, attention_mask=attention_mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, expected)
    lora.train()
    loss = lora(input_ids=ids, attention_mask=attention_mask, labels=ids.masked_fill(attention_mask == 0, -100)).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_expert_parallelism_is_seen_through_expert_adapters(tiny_model):
    """Expert parallelism marks the experts module, which peft then wraps: padding pairs must still get real expert
    ids, as its dispatch takes no sentinel."""
    model = tiny_model()
    get_peft_model(model, LoraConfig(r=4, target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    experts = model.model.layers[1].mlp.experts
    assert not _is_expert_parallel(experts)
    experts.get_base_layer()._is_expert_parallel = True  # what transformers' expert parallelism sets
    assert _is_expert_parallel(experts)


@pytest.mark.parametrize(
    "lora",
    [
        LoraConfig(r=4, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
        LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]),
    ],
    ids=["experts", "embeddings"],
)
def test_a_model_with_adapters_in_place_still_saves(tiny_model, tmp_path, lora):
    """`get_peft_model` wraps the model's own modules: `save_pretrained`'s checks must read through the wrappers."""
    model = tiny_model()
    get_peft_model(model, lora)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("head", ["causal LM", "sequence classification", "token classification", "question answering"])
def test_trainer_predictions_are_the_logits_alone(tiny_model, tiny_config, tmp_path, head):
    """As for any transformers model, `compute_metrics` gets the logits array (question answering: the start and end
    logits): the router losses and statistics the outputs also carry are left out (`keys_to_ignore_at_inference`)."""
    from transformers import Trainer, TrainingArguments

    ids = random_ids(4, 6)
    if head == "causal LM":
        model, labels, expected_shapes = tiny_model(), {"labels": ids}, [(4, 6, VOCAB_SIZE)]
    elif head == "sequence classification":
        model = ClusterMoEForSequenceClassification(tiny_config(num_labels=3))
        labels, expected_shapes = {"labels": torch.ones(4, dtype=torch.long)}, [(4, 3)]
    elif head == "token classification":
        model = ClusterMoEForTokenClassification(tiny_config(num_labels=3))
        labels, expected_shapes = {"labels": torch.ones_like(ids)}, [(4, 6, 3)]
    else:
        model = ClusterMoEForQuestionAnswering(tiny_config())
        labels, expected_shapes = {"start_positions": ids[:, 0] % 6, "end_positions": ids[:, 1] % 6}, [(4, 6), (4, 6)]
    data = [{"input_ids": ids[row]} | {name: value[row] for name, value in labels.items()} for row in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[], use_cpu=True)
    predictions = Trainer(model=model, args=args).predict(data).predictions
    predictions = list(predictions) if isinstance(predictions, tuple) else [predictions]
    assert [prediction.shape for prediction in predictions] == expected_shapes


def test_distributed_data_parallel_leaves_the_per_process_statistics_alone(tiny_model):
    """DDP broadcasts rank 0's buffers before forwards; the statistics each process gathers until the optimizer step
    are not broadcast. torch's API for adding more names to ignore keeps working."""
    from torch.nn.parallel import DistributedDataParallel

    model = tiny_model()
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    assert {"model.routing_state.pending_counts", "model.layers.1.mlp.router.expert_token_counts"} <= ignored
    assert "model.layers.1.mlp.router.expert_bias" not in ignored  # the same on every process: broadcast
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["lm_head.weight"])
    assert set(model._ddp_params_and_buffers_to_ignore) == ignored | {"lm_head.weight"}


def test_distributed_data_parallel_around_a_peft_model_leaves_the_per_process_statistics_alone(tiny_model):
    """DDP wrapping a peft model (the Trainer with LoRA) reads the ignore list through it, and names the buffers from
    the peft model down: the per-process statistics are found under those names too."""
    from peft import get_peft_model

    from clustermoe_hf.training import lora_config

    model = tiny_model()
    wrapped = get_peft_model(model, lora_config(rank=2))
    per_process = {name for name, _ in wrapped.named_buffers() if name.endswith(("_counts", "_observed", "_healthy"))}
    per_process -= {name for name in per_process if name.endswith("selection_token_counts")}  # the same everywhere
    assert "base_model.model.model.routing_state.pending_counts" in per_process
    assert per_process - {"base_model.model.model.routing_state.pending_counts"}  # the experts' counts too
    assert per_process <= set(wrapped._ddp_params_and_buffers_to_ignore)


def test_a_model_with_partitioned_parameters_saves_a_gathered_state_dict(tiny_model, tmp_path):
    """DeepSpeed ZeRO-3 leaves empty local parameters and the Trainer passes the gathered weights as `state_dict`."""
    model = tiny_model()
    state_dict = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    embeddings = state_dict["model.embed_tokens.weight"]
    for parameter in model.parameters():
        parameter.data = torch.empty(0, dtype=parameter.dtype)
    model.save_pretrained(tmp_path, state_dict=state_dict)
    assert torch.equal(ClusterMoEForCausalLM.from_pretrained(tmp_path).model.embed_tokens.weight, embeddings)


def test_sequence_classification_pools_the_last_real_token(tiny_config):
    model = AutoModelForSequenceClassification.from_config(tiny_config(num_labels=3)).eval()
    assert type(model) is ClusterMoEForSequenceClassification
    lengths = [6, 4]
    ids = random_ids(2, 6)
    ids[1, 4:] = PAD  # right padding
    attention_mask = (ids != PAD).long()
    with torch.no_grad():
        logits = model(ids, attention_mask=attention_mask).logits
        alone = [model(ids[row : row + 1, :length]).logits[0] for row, length in enumerate(lengths)]
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, torch.stack(alone), rtol=1e-5, atol=1e-5)

    labels = torch.tensor([0, 2])
    with torch.no_grad():
        assert model(ids, attention_mask=attention_mask).aux_loss is None  # pure inference skips the router losses
        out = model(ids, attention_mask=attention_mask, labels=labels)
    # The router losses are part of the training loss, as in the causal LM, so that fine-tuning keeps them balanced.
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, labels) + out.aux_loss)
    # Class ids out of range are named (on a GPU they would end in a device-side assertion); -100 is ignored.
    with pytest.raises(ValueError, match=r"labels must be in \[0, num_labels=3\) or be the ignore index -100"):
        model(ids, attention_mask=attention_mask, labels=torch.tensor([0, 3]))
    model(ids, attention_mask=attention_mask, labels=torch.tensor([0, -100]))


def test_sequence_classification_of_embeddings_pools_by_the_attention_mask(tiny_config, caplog):
    """With inputs_embeds there are no ids to find the padding in: the 2-D attention mask tells it. Without a mask
    the last position is pooled, with a warning, as transformers' heads do (prompt tuning calls it so); ids without a
    pad token or a mask are refused in a batch of several."""
    model = ClusterMoEForSequenceClassification(tiny_config(num_labels=3)).eval()
    ids = random_ids(2, 6)
    ids[1, 4:] = PAD
    attention_mask = (ids != PAD).long()
    embeddings = model.get_input_embeddings()(ids)
    with torch.no_grad():
        from_ids = model(ids, attention_mask=attention_mask).logits
        from_embeddings = model(inputs_embeds=embeddings, attention_mask=attention_mask).logits
        without_pad_token = ClusterMoEForSequenceClassification(tiny_config(num_labels=3, pad_token_id=None)).eval()
        without_pad_token.load_state_dict(model.state_dict())
        by_mask = without_pad_token(ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(from_embeddings, from_ids)
    torch.testing.assert_close(by_mask, from_ids)  # no pad token: the mask tells the padding too
    with torch.no_grad(), caplog.at_level("WARNING"):  # an unpadded batch (4 tokens) of embeddings, without a mask
        unpadded = model(inputs_embeds=embeddings[:, :4], attention_mask=attention_mask[:, :4]).logits
        torch.testing.assert_close(model(inputs_embeds=embeddings[:, :4]).logits, unpadded)
    assert "pools the last position of each sequence, padding or not" in caplog.text
    with pytest.raises(ValueError, match="Cannot tell the last real token .* pass a 2-D attention_mask"):
        without_pad_token(ids)


def test_sequence_classification_trusts_the_attention_mask_over_pad_ids(tiny_config):
    """A pad id that is also a real token (e.g. EOS appended by the tokenizer) only the mask can tell; after a cache,
    the mask covers the cached tokens too."""
    model = ClusterMoEForSequenceClassification(tiny_config(num_labels=3, pad_token_id=2)).eval()
    ids = random_ids(2, 6)
    ids[:, -1] = 2  # EOS, a real token here
    with torch.no_grad():
        scores = model.score(model.model(ids).last_hidden_state)[:, -1]
        torch.testing.assert_close(model(ids, attention_mask=torch.ones_like(ids)).logits, scores)
        first = model(ids[:, :4], attention_mask=torch.ones(2, 4, dtype=torch.long), use_cache=True)
        cached = model(ids[:, 4:], attention_mask=torch.ones_like(ids), cache=first.cache).logits
    torch.testing.assert_close(cached, scores, rtol=1e-5, atol=1e-5)


def test_token_classification_labels_every_token_and_adds_the_router_losses(tiny_config):
    """As transformers' MoE models (Qwen3-MoE, Mixtral), ClusterMoE has a token classification head behind
    `AutoModelForTokenClassification`; its loss carries the router losses, as the other heads' do."""
    model = AutoModelForTokenClassification.from_config(tiny_config(num_labels=5)).eval()
    assert type(model) is ClusterMoEForTokenClassification
    ids = random_ids(2, 6)
    labels = torch.randint(0, 5, (2, 6))
    labels[1, 4:] = -100  # padding, or sub-word pieces after the first: ignored
    with torch.no_grad():
        logits = model(ids).logits
        assert model(ids).aux_loss is None  # pure inference skips the router losses
        out = model(ids, labels=labels)
    assert logits.shape == (2, 6, 5)
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss, F.cross_entropy(logits.flatten(0, 1), labels.flatten()) + out.aux_loss)
    with pytest.raises(ValueError, match=r"labels must be in \[0, num_labels=5\) or be the ignore index -100"):
        model(ids, labels=labels.masked_fill(labels == 0, 5))
    with pytest.raises(ValueError, match=r"labels must be int64 class ids of the inputs' shape \(batch_size=2, "):
        model(ids, labels=labels[:, :5])
    # The dropout before the score head is transformers' default, or the config's classifier_dropout.
    assert model.dropout.p == 0.1
    assert ClusterMoEForTokenClassification(tiny_config(num_labels=5, classifier_dropout=0.3)).dropout.p == 0.3


def test_question_answering_scores_answer_spans_and_adds_the_router_losses(tiny_config):
    """An extractive question answering head behind `AutoModelForQuestionAnswering`, as in transformers' MoE models:
    start and end logits per token, whose loss (positions past the sequence, cut off by truncation, left out) carries
    the router losses."""
    model = AutoModelForQuestionAnswering.from_config(tiny_config()).eval()
    assert type(model) is ClusterMoEForQuestionAnswering
    ids = random_ids(3, 6)
    with torch.no_grad():
        plain = model(ids)
        out = model(ids, start_positions=torch.tensor([1, 2, 6]), end_positions=torch.tensor([[3], [2], [9]]))
    assert plain.start_logits.shape == plain.end_logits.shape == (3, 6) and plain.aux_loss is None
    answered = slice(0, 2)  # the third answer lies past the 6 tokens: ignored
    start_loss = F.cross_entropy(plain.start_logits[answered], torch.tensor([1, 2]))
    end_loss = F.cross_entropy(plain.end_logits[answered], torch.tensor([3, 2]))
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss, (start_loss + end_loss) / 2 + out.aux_loss)
    with pytest.raises(ValueError, match="start_positions must be >= 0"):
        model(ids, start_positions=torch.tensor([1, -1, 0]), end_positions=torch.tensor([1, 2, 3]))
    refusal = r"end_positions must be int64 token positions, one per sequence: .*\(3,\)"
    for positions in (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([1, 2])):
        with pytest.raises(ValueError, match=refusal):
            model(ids, start_positions=torch.tensor([1, 1, 0]), end_positions=positions)
    with pytest.raises(ValueError, match="Pass both start_positions and end_positions"):
        model(ids, start_positions=torch.tensor([1, 1, 0]))


@pytest.mark.parametrize("has_async_assert", [True, False], ids=["CUDA-like", "MPS-like"])
def test_negative_answer_positions_are_refused_on_accelerators(tiny_config, monkeypatch, has_async_assert):
    """As token ids: where a host read would wait for the device, an asynchronous device assertion (on CPU it fails at
    once); devices without one read the positions on the host. transformers' loss would clamp them to position 0."""
    from clustermoe_hf import modeling_clustermoe

    monkeypatch.setattr(modeling_clustermoe, "_host_reads_are_free", lambda tensor: False)
    if not has_async_assert:
        monkeypatch.setattr(modeling_clustermoe, "_DEVICES_WITH_ASYNC_ASSERT", frozenset())
    model, ids = ClusterMoEForQuestionAnswering(tiny_config()), random_ids(2, 6)
    with pytest.raises(RuntimeError if has_async_assert else ValueError, match="start_positions must be >= 0"):
        model(ids, start_positions=torch.tensor([-1, 2]), end_positions=torch.tensor([3, 4]))
    model(ids, start_positions=torch.tensor([0, 2]), end_positions=torch.tensor([3, 9]))


@pytest.mark.parametrize(
    "head, bad_targets",
    [
        (ClusterMoEForCausalLM, {"labels": torch.ones(2, 5, dtype=torch.long)}),
        (ClusterMoEForSequenceClassification, {"labels": torch.tensor([0, 3])}),
        (ClusterMoEForTokenClassification, {"labels": torch.ones(2, 6)}),
        (ClusterMoEForQuestionAnswering, {"start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([3])}),
    ],
    ids=["causal LM", "sequence classification", "token classification", "question answering"],
)
def test_a_call_refused_for_its_targets_counts_no_routing_statistics(tiny_config, head, bad_targets):
    """Labels and answer positions are checked before the forward: a training forward counts its tokens for the
    utilisation and the next optimizer step's routing update."""
    model = head(tiny_config(num_labels=3)).train()
    with pytest.raises(ValueError):
        model(random_ids(2, 6), **bad_targets)
    assert not model.model.routing_state.pending_counts.any()
    assert sum(model.get_expert_utilization().values()) == 0


@pytest.mark.parametrize(
    "head",
    [
        ClusterMoEForCausalLM,
        ClusterMoEForSequenceClassification,
        ClusterMoEForTokenClassification,
        ClusterMoEForQuestionAnswering,
    ],
)
def test_heads_return_router_logits_and_tuples_as_asked(tiny_config, head):
    """The classification head dropped the router logits; `return_dict=False` in the config broke both heads, whose
    base-model call returned a tuple too."""
    model = head(tiny_config(num_labels=3)).eval()
    ids = random_ids(1, 6)
    with torch.no_grad():
        outputs = model(ids, output_router_logits=True)
        assert len(outputs.router_logits) == model.config.num_hidden_layers - model.config.first_k_dense_layers
        assert outputs.aux_loss is not None  # as the causal LM: asked-for router logits come with the router losses
        model.config.return_dict = False
        as_tuple = model(ids)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], outputs[0])  # the logits (the start logits of question answering)


# ----- parallelism plans -----


def test_parallel_plans_name_real_modules(tiny_model):
    """Every TP/EP/FSDP rule must match a module or parameter (a typo would silently leave it unsharded), with a
    style transformers knows; the model has a dense layer and a shared expert so that every rule can match."""
    model = tiny_model(num_hidden_layers=2, first_k_dense_layers=1, shared_expert_intermediate_size=8)
    names = {name for name, _ in model.named_modules()} | {name for name, _ in model.named_parameters()}
    plans = {"tp": (model.tp_plan, ALL_PARALLEL_STYLES), "ep": (model.ep_plan, ALL_PARALLEL_STYLES)}
    plans["fsdp"] = (model.fsdp_plan, ALL_FSDP_STYLES)
    for kind, (plan, styles) in plans.items():
        assert plan, f"no {kind} plan"
        for pattern, style in plan.items():
            assert style in styles, f"{kind} rule {pattern}: unknown style {style}"
            assert any(_get_parameter_plan(name, {pattern: style}) for name in names), f"{kind} rule {pattern}"
    # the fused experts are what expert parallelism shards
    assert model.ep_plan["model.layers.*.mlp.experts"] == "ep_dispatch_experts"
    assert {"lm_head", "model.layers.*.mlp.experts"} <= model.tp_plan.keys()


def test_pipeline_parallelism_is_refused_by_name(tiny_model, tmp_path):
    """transformers' pipeline parallelism replaces the layers of other stages with placeholders; the routing state
    spans every layer, so a forward or a save names the problem instead of failing inside on a missing attribute."""
    from transformers.distributed.pipeline_parallel import PipelineIdentityLayer

    model = tiny_model()
    assert not model.pp_plan  # no claim of support
    model.model.layers[1] = PipelineIdentityLayer()
    message = r"does not support pipeline parallelism \(decoder layer 1 is a PipelineIdentityLayer\)"
    with pytest.raises(NotImplementedError, match=message):
        model(random_ids(1, 4))
    with pytest.raises(NotImplementedError, match=message):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())
    # A stage may delete the other stages' layers instead: its statistics would land in other layers' rows.
    del model.model.layers[1]
    message = r"The model has 1 decoder layers \(1 MoE\), its config num_hidden_layers=2 and its routing state 2"
    with pytest.raises(ValueError, match=message):
        model(random_ids(1, 4))
    # Nor can one be added: the forward would skip it, and the routing state has no row for it.
    model.model.layers.extend([copy.deepcopy(model.model.layers[0]) for _ in range(2)])
    with pytest.raises(ValueError, match=r"The model has 3 decoder layers \(3 MoE\), .* routing state 2 MoE"):
        model(random_ids(1, 4))
    # from_pretrained(..., distributed_config=DistributedConfig(pp_size=2)): refused on every process before loading
    config = model.config
    config.distributed_config = SimpleNamespace(pp_size=2)
    with pytest.raises(NotImplementedError, match=r"does not support pipeline parallelism \(pp_size=2\)"):
        ClusterMoEForCausalLM(config)


@pytest.mark.parametrize(
    "settings",
    [{}, {"num_hidden_layers": 3, "first_k_dense_layers": 2}, {"layer_types": ["full_attention"] * 2}],
    ids=["moe layers", "dense layers past the exit", "layer types"],
)
def test_early_exit_assisted_generation_matches_greedy_decoding(tiny_model, settings):
    """transformers' self-speculative decoding drafts with the first layers, lowering `num_hidden_layers` meanwhile;
    the full model verifies, so the result is greedy decoding's. The config checks, which a draft's depth would fail,
    wait for a forward through every layer, also on a new model's first call."""
    model, reference = tiny_model(**settings), tiny_model(**settings)
    reference.load_state_dict(model.state_dict())
    ids = random_ids(1, 5)
    expected = reference.generate(ids, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(model.generate(ids, max_new_tokens=4, do_sample=False, assistant_early_exit=1), expected)
    assert model.config.num_hidden_layers == len(model.model.layers)
    model.config.use_cache = True  # a change, checked at the verifying forward
    torch.testing.assert_close(model.generate(ids, max_new_tokens=4, do_sample=False, assistant_early_exit=1), expected)


@pytest.mark.parametrize("depth", [0, 3, 1.5, np.int64(2)])
def test_an_early_exit_past_the_layers_is_refused_before_the_config_is_lowered(tiny_model, depth):
    """transformers sets `num_hidden_layers` to the drafting depth and does not restore it when the draft fails: a
    depth the model cannot draft with is refused before, and the model generates as before. Every depth from 1 to
    the number of layers drafts."""
    model = tiny_model()
    ids = random_ids(1, 5)
    expected = model.generate(ids, max_new_tokens=3, do_sample=False)
    message = re.escape(f"assistant_early_exit={depth!r}: ") + r".* n an int from 1 to the model's 2\."
    with pytest.raises(ValueError, match=message):
        model.generate(ids, max_new_tokens=3, do_sample=False, assistant_early_exit=depth)
    assert model.config.num_hidden_layers == 2
    torch.testing.assert_close(model.generate(ids, max_new_tokens=3, do_sample=False), expected)
    torch.testing.assert_close(model.generate(ids, max_new_tokens=3, do_sample=False, assistant_early_exit=2), expected)


def test_decoder_layers_wrapped_for_activation_checkpointing_train_and_save(tiny_model, tmp_path):
    """What accelerate's FSDP activation checkpointing does to each decoder layer: not a pipeline placeholder."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    model, reference = tiny_model().train(), tiny_model().train()
    reference.load_state_dict(model.state_dict())
    apply_activation_checkpointing(model, checkpoint_wrapper, check_fn=lambda m: isinstance(m, ClusterMoEDecoderLayer))
    assert type(model.model.layers[0]).__name__ == "CheckpointWrapper"
    ids = random_ids(2, 8)
    loss = model(ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, reference(ids, labels=ids).loss)
    assert model.get_expert_utilization() == reference.get_expert_utilization()
    model.save_pretrained(tmp_path)
    assert ClusterMoEForCausalLM.from_pretrained(tmp_path).state_dict().keys() == reference.state_dict().keys()


def test_a_decoder_layer_compiled_in_place_saves_and_a_wrapped_one_is_refused(tiny_model, tmp_path):
    """`torch.compile(layer)` wraps the layer: its weights would save as `..._orig_mod...` and reload as new weights."""
    model = tiny_model()
    model.model.layers[1] = torch.compile(model.model.layers[1])
    with pytest.raises(ValueError, match=r"model.layers.1 is a torch.compile wrapper .* Compile it in place"):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())
    model.model.layers[1] = model.model.layers[1]._orig_mod
    model.model.layers[1].compile()  # in place: the names stay
    model.save_pretrained(tmp_path)
    reloaded = ClusterMoEForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(value, reloaded.state_dict()[name]) for name, value in model.state_dict().items())


def _fsdp_save_worker(rank, checkpoint, output_dir):
    from transformers.distributed import DistributedConfig

    model = ClusterMoEForCausalLM.from_pretrained(checkpoint, distributed_config=DistributedConfig(fsdp_size=2))
    assert type(model).__name__ == "FSDPClusterMoEForCausalLM"  # FSDP2 swaps in a subclass defined in torch
    if rank == 0:  # a slow file system: the files reach the folder well after transformers' barrier
        move = os.replace
        os.replace = lambda *args: (time.sleep(0.1), move(*args))
    model.save_pretrained(output_dir)
    assert type(model).__name__ == "FSDPClusterMoEForCausalLM"
    # Every process returns once the checkpoint is complete, e.g. to load it right away.
    assert (Path(output_dir) / "config.json").is_file() and (Path(output_dir) / "model.safetensors").is_file()


def test_a_model_sharded_with_fsdp2_saves_its_own_code(tiny_model, tmp_path, run_two_processes):
    """The checkpoint held torch's FSDP module files as the model's code, and its auto_map named their class."""
    source = tiny_model()
    source.save_pretrained(tmp_path / "source")
    run_two_processes(_fsdp_save_worker, str(tmp_path / "source"), str(tmp_path / "saved"))
    saved = tmp_path / "saved"
    assert sorted(path.name for path in saved.glob("*.py")) == ["configuration_clustermoe.py", "modeling_clustermoe.py"]
    auto_map = json.loads((saved / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_clustermoe.ClusterMoEForCausalLM"
    reloaded = ClusterMoEForCausalLM.from_pretrained(saved)
    assert all(torch.equal(value, reloaded.state_dict()[name]) for name, value in source.state_dict().items())


def _expert_parallel_worker(rank, checkpoint, input_ids, attention_mask, output_dir):
    from transformers.distributed import DistributedConfig

    parallel = DistributedConfig(tp_size=2, ep_size=2, enable_expert_parallel=True)
    model = ClusterMoEForCausalLM.from_pretrained(checkpoint, distributed_config=parallel).train()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    loss = model(input_ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    counts = model.model.layers[1].mlp.router.selection_token_counts
    torch.save((loss.detach(), counts), f"{output_dir}/rank{rank}.pt")


def test_expert_parallel_training_on_padded_batches(tiny_model, tmp_path, run_two_processes):
    """Padding pairs went to the sentinel expert id, which expert parallelism's dispatch indexed out of bounds. Both
    processes train on the same batch: the routing counts summed over them count it once."""
    model = tiny_model(num_attention_heads=2, num_key_value_heads=2).train()
    model.save_pretrained(tmp_path / "model")
    input_ids = random_ids(2, 7)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    run_two_processes(_expert_parallel_worker, str(tmp_path / "model"), input_ids, attention_mask, str(tmp_path))
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    expected = model(input_ids, attention_mask=attention_mask, labels=labels).loss.detach()
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    for rank in range(2):
        loss, counts = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(loss, expected)
        assert torch.equal(counts, model.model.layers[1].mlp.router.selection_token_counts)


def _unsharded_worker(rank, checkpoint, batches, output_dir):
    from transformers.distributed import DistributedConfig

    # A script's DistributedConfig(tp_size=args.tp) with tp 1 shards nothing: each process trains on its own batch.
    model = ClusterMoEForCausalLM.from_pretrained(checkpoint, distributed_config=DistributedConfig(tp_size=1)).train()
    model(batches[rank], labels=batches[rank]).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    torch.save(model.model.layers[1].mlp.router.selection_token_counts, f"{output_dir}/rank{rank}.pt")


def test_routing_statistics_count_every_process_batch_when_nothing_is_sharded(tiny_model, tmp_path, run_two_processes):
    model = tiny_model().train()
    model.save_pretrained(tmp_path / "model")
    batches = random_ids(2, 8).chunk(2)
    run_two_processes(_unsharded_worker, str(tmp_path / "model"), batches, str(tmp_path))
    ids = torch.cat(batches)
    model(ids, labels=ids).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    expected = model.model.layers[1].mlp.router.selection_token_counts
    assert all(torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), expected) for rank in range(2))


def _fsdp1_worker(rank, config, use_orig_params):
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    model = ClusterMoEForCausalLM(config).train()
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={ClusterMoEDecoderLayer})
    wrapped = FullyShardedDataParallel(
        model, auto_wrap_policy=policy, use_orig_params=use_orig_params, device_id=torch.device("cpu")
    )
    ids = random_ids(2, 8)
    with pytest.raises(NotImplementedError, match=r"not parameters of their own .* under FSDP1 .* Train with FSDP2"):
        wrapped(ids, labels=ids)


@pytest.mark.parametrize("use_orig_params", [True, False])
def test_fsdp1_is_refused_by_name(tiny_config, run_two_processes, use_orig_params):
    """With use_orig_params it failed inside, registering a gradient hook on the expert weights' views; without, it
    trained with the guard against a faulty expert's non-finite gradients off (the weights were flattened away)."""
    run_two_processes(_fsdp1_worker, tiny_config(), use_orig_params)
