"""What transformers' common model tests (ModelTesterMixin, GenerationTesterMixin, CausalLMModelTester) require of a
model, checked on ClusterMoE with tiny configs. Written from the behaviour those tests check, not copied from them."""

import copy
import os
import subprocess
import sys
import textwrap
from unittest.mock import Mock, patch

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, CompileConfig, GenerationMixin
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.initialization import no_init_weights
from transformers.integrations.moe import batched_mm_experts_forward, grouped_mm_experts_forward

from clustermoe_hf import (
    ClusterMoEForCausalLM,
    ClusterMoEForQuestionAnswering,
    ClusterMoEForSequenceClassification,
    ClusterMoEForTokenClassification,
    ClusterMoEModel,
)
from clustermoe_hf.modeling_clustermoe import ClusterMoEPreTrainedModel, ClusterMoERouter


VOCAB_SIZE = 64  # tests/conftest.py TINY_CONFIG
PAD = 0
MODEL_CLASSES = (
    ClusterMoEModel,
    ClusterMoEForCausalLM,
    ClusterMoEForSequenceClassification,
    ClusterMoEForTokenClassification,
    ClusterMoEForQuestionAnswering,
)


def random_ids(batch_size, length):
    return torch.randint(3, VOCAB_SIZE, (batch_size, length))


def greedy(model, input_ids, max_new_tokens=6, **kwargs):
    return model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)


# ----- fused experts -----


def test_experts_dispatch_through_the_experts_interface(tiny_model):
    """`set_experts_implementation` must reach the experts (found through `@use_experts_implementation`), and
    eager, batched_mm and grouped_mm must agree."""
    model = tiny_model(top_k_clusters=2, initializer_range=0.1)
    assert ClusterMoEForCausalLM._can_set_experts_implementation()
    ids = random_ids(3, 7)
    batched = Mock(wraps=batched_mm_experts_forward)
    grouped = Mock(wraps=grouped_mm_experts_forward)
    logits = {}
    mapping = "transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS._global_mapping"
    with patch.dict(mapping, {"batched_mm": batched, "grouped_mm": grouped}), torch.no_grad():
        for implementation, expected_calls in (("eager", (0, 0)), ("batched_mm", (1, 0)), ("grouped_mm", (0, 1))):
            batched.reset_mock()
            grouped.reset_mock()
            model.set_experts_implementation(implementation)
            assert model.config._experts_implementation == implementation
            logits[implementation] = model(ids).logits
            # one call per MoE layer, or none
            num_layers = model.config.num_hidden_layers
            assert (batched.call_count, grouped.call_count) == tuple(n * num_layers for n in expected_calls)
    torch.testing.assert_close(logits["batched_mm"], logits["eager"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits["grouped_mm"], logits["eager"], rtol=1e-4, atol=1e-5)


# ----- router logits -----


def test_router_logits_are_recorded_and_returned(tiny_model):
    assert "router_logits" in ClusterMoEPreTrainedModel._can_record_outputs
    model = tiny_model(num_hidden_layers=3, first_k_dense_layers=1)
    captured = []
    for _, block in model._moe_layers():
        block.router.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    ids = random_ids(2, 5)
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    # one (tokens, num_clusters) tensor per MoE layer, equal to what each router computed
    assert len(out.router_logits) == 2
    for recorded, expected in zip(out.router_logits, captured):
        assert recorded.shape == (ids.numel(), model.config.num_clusters)
        torch.testing.assert_close(recorded, expected, rtol=0, atol=0)

    with torch.no_grad():
        assert model(ids).router_logits is None
        model.config.output_router_logits = True
        from_config = model(ids).router_logits
        base = model.model(ids).router_logits
    torch.testing.assert_close(from_config, out.router_logits)
    torch.testing.assert_close(base, out.router_logits)


def test_router_output_recorder_points_at_the_router():
    recorder = ClusterMoEPreTrainedModel._can_record_outputs["router_logits"]
    assert recorder.target_class is ClusterMoERouter and recorder.index == 0


# ----- generation -----


def test_generation_mixin_is_a_direct_base():
    assert GenerationMixin in ClusterMoEForCausalLM.__bases__
    assert ClusterMoEForCausalLM.can_generate()
    assert not ClusterMoEModel.can_generate()


def test_static_cache_generation_matches_dynamic(tiny_model):
    model = tiny_model(initializer_range=0.2)
    ids = random_ids(2, 5)
    dynamic = greedy(model, ids, return_dict_in_generate=True, output_logits=True)
    static = greedy(model, ids, cache_implementation="static", return_dict_in_generate=True, output_logits=True)
    assert isinstance(dynamic.cache, DynamicCache) and isinstance(static.cache, StaticCache)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), rtol=1e-4, atol=1e-5)


def test_a_static_cache_too_short_for_the_tokens_is_named(tiny_model):
    model = tiny_model()
    cache = StaticCache(config=model.config, max_cache_len=6)
    with torch.no_grad():
        model(random_ids(1, 4), cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="static cache holds 6 positions; 4 cached and 3 new tokens do not fit"):
            model(random_ids(1, 3), cache=cache, use_cache=True)


@pytest.mark.parametrize(
    "cache_model, batch_size, problem",
    [
        ({"num_hidden_layers": 1}, 1, r"The cache has 1 layers and this model 2"),  # was an IndexError
        ({"num_hidden_layers": 3}, 1, r"The cache has 3 layers and this model 2"),  # was silently accepted
        ({}, 2, r"keys of shape \(batch 1, key/value heads 2, head_dim 8\); these inputs have a batch of 2"),
        ({"num_key_value_heads": 4}, 1, r"key/value heads 4, .* this model has 2 key/value heads"),
        ({"head_dim": 16}, 1, r"head_dim 16\); .* key/value heads of head_dim 8"),
    ],
    ids=["fewer layers", "more layers", "another batch", "other heads", "other head size"],
)
def test_a_cache_from_another_model_or_batch_is_named(tiny_model, cache_model, batch_size, problem):
    """These failed deep in the attention with "Sizes of tensors must match" or an IndexError."""
    model, prompt = tiny_model(), random_ids(1, 4)
    with torch.no_grad():
        cache = tiny_model(**cache_model)(prompt, use_cache=True).cache
        with pytest.raises(ValueError, match=problem):
            model(random_ids(batch_size, 1), cache=cache, use_cache=True)
        model(prompt, cache=DynamicCache(), use_cache=True)  # a bare cache adds its layers as they come


def test_static_cache_decoding_reads_no_token_count_off_cpu(tiny_model, monkeypatch):
    """Off CPU a static cache counts its tokens in a tensor on the device: the input checks must not read it on the
    host, which would make every decoding step wait for the device."""
    from clustermoe_hf import modeling_clustermoe

    monkeypatch.setattr(modeling_clustermoe, "_host_reads_are_free", lambda tensor: False)
    reads = []
    for name in ("__bool__", "__format__", "__int__", "__index__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def read(self, *args, _name=name, _original=original, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename == modeling_clustermoe.__file__:
                reads.append(f"{_name} in {caller.co_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    model = tiny_model()
    model.set_experts_implementation("grouped_mm")  # sorted_mm's own CPU paths read group sizes on the host
    cache = StaticCache(config=model.config, max_cache_len=8)
    with torch.no_grad():
        model(random_ids(1, 5), cache=cache, attention_mask=torch.ones(1, 5, dtype=torch.long))
        reads.clear()  # the prefill's (e.g. the mask's padding check) are not the question
        model(random_ids(1, 1), cache=cache, attention_mask=torch.ones(1, 6, dtype=torch.long))
    assert reads == []


def _decode_with_a_mask_as_wide_as_the_static_cache(model, prompt, token, where):
    """Prefill `prompt` (row 1 left-padded by one) into a static cache of 12 positions (a dynamic one where `where`
    says so), then run `token` with a 2-D mask of 12 columns: the cached and new tokens' entries, then the future
    positions' zeros."""
    mask = torch.zeros(2, 12, dtype=torch.long)
    mask[:, : prompt.shape[1] + token.shape[1]] = 1
    mask[1, 0] = 0
    if where.endswith("dynamic cache"):
        cache = DynamicCache(config=model.config)
    else:
        cache = StaticCache(config=model.config, max_cache_len=12)
    forward = model
    if where.startswith("compiled"):
        forward = torch.compile(model.forward, fullgraph=True, backend="eager", dynamic=False)
    with torch.no_grad():
        model(prompt, attention_mask=mask[:, : prompt.shape[1]], cache=cache, use_cache=True)
        return forward(input_ids=token, attention_mask=mask, cache=cache, use_cache=True).logits


@pytest.mark.parametrize("where", ["off CPU", "compiled", "compiled, dynamic cache"])
def test_a_mask_as_wide_as_the_static_cache_masks_by_position(tiny_model, tiny_config, monkeypatch, where):
    """As in transformers' masks, a 2-D mask's column j is position j: one as wide as a static cache (one shape for
    every compiled step) has the future positions' zeros after the new tokens. Where the cached length is not read
    on the host, those last columns were taken for the new tokens': their expert outputs were dropped as padding's,
    and the classifier pooled a padding position. (On CPU the cached length is read, and the mask must end there.)
    Compiled, a dynamic cache's length is not read either: its integer offset picks the new tokens' columns."""
    from clustermoe_hf import modeling_clustermoe

    torch._dynamo.reset()
    causal_lm = tiny_model(num_hidden_layers=1, initializer_range=0.2)
    classifier = ClusterMoEForSequenceClassification(tiny_config(num_hidden_layers=1, num_labels=3)).eval()
    prompt, token = random_ids(2, 5), random_ids(2, 2)
    with torch.no_grad():  # reference: the whole sequence at once, the padding position masked
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, 0] = 0
        ids = torch.cat([prompt, token], dim=1)
        expected_logits = causal_lm(ids, attention_mask=mask).logits[:, 5:]
        expected_classes = classifier(ids, attention_mask=mask).logits
    if where == "off CPU":
        monkeypatch.setattr(modeling_clustermoe, "_host_reads_are_free", lambda tensor: False)
    logits = _decode_with_a_mask_as_wide_as_the_static_cache(causal_lm, prompt, token, where)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5)
    if where == "off CPU":
        classes = _decode_with_a_mask_as_wide_as_the_static_cache(classifier, prompt, token, where)
        torch.testing.assert_close(classes, expected_classes, rtol=1e-4, atol=1e-5)


def test_the_classifier_names_a_mask_without_columns_also_off_cpu(tiny_config, monkeypatch):
    """The classifier reads the new tokens' mask columns before the model's input checks: an empty mask, with a
    static cache off CPU, failed there with an IndexError."""
    from clustermoe_hf import modeling_clustermoe

    monkeypatch.setattr(modeling_clustermoe, "_host_reads_are_free", lambda tensor: False)
    classifier = ClusterMoEForSequenceClassification(tiny_config(num_labels=3)).eval()
    cache = StaticCache(config=classifier.config, max_cache_len=12)
    with torch.no_grad():
        classifier(random_ids(2, 5), cache=cache, use_cache=True)
        with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 0\); expected \(batch_size=2, all"):
            classifier(random_ids(2, 2), attention_mask=torch.ones(2, 0, dtype=torch.long), cache=cache)


def _compile_config(backend):
    config = CompileConfig(fullgraph=True, dynamic=False, backend=backend)
    config._compile_all_devices = True  # generate only auto-compiles on accelerators otherwise
    return config


@pytest.mark.parametrize(
    "backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)]
)  # "eager": dynamo capture only (fullgraph, so any graph break fails), "inductor": real compiled kernels
def test_compiled_generation_matches_eager(tiny_model, backend):
    assert ClusterMoEForCausalLM._can_compile_fullgraph
    torch._dynamo.reset()
    model = tiny_model(num_hidden_layers=1, initializer_range=0.2)  # capture time grows with depth
    compile_config = _compile_config(backend)
    captured_graphs = []
    for prompt in (random_ids(2, 5), random_ids(2, 5)):
        expected = greedy(model, prompt, max_new_tokens=4, cache_implementation="static")
        compiled = greedy(
            model, prompt, max_new_tokens=4, cache_implementation="static", compile_config=compile_config
        )
        assert torch.equal(compiled, expected)
        captured_graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    # the decoding steps ran through a captured graph, which the second prompt reused (static shapes, no recompile)
    assert captured_graphs[0] > 0 and captured_graphs[1] == captured_graphs[0]


def test_compiled_training_step_matches_eager(tiny_config):
    """A fullgraph-compiled training forward from the first call: routing statistics are returned by the layers, not
    recorded by hooks that the first forward would install (installing them takes a lock, which dynamo cannot trace),
    and a config that records outputs gets its hooks at construction.
    The compiled call leaves no state behind (eager forwards after it record their statistics too), and a broken
    expert's non-finite gradients stay out of the hidden states there as in eager. In a fresh process, so that no
    earlier test has installed hooks or compiled anything."""
    script = textwrap.dedent(
        f"""
        import copy
        import torch
        from clustermoe_hf import ClusterMoEConfig, ClusterMoEForCausalLM

        torch.manual_seed(0)
        model = ClusterMoEForCausalLM(ClusterMoEConfig(**{tiny_config(num_hidden_layers=1).to_diff_dict()!r})).train()
        twin = copy.deepcopy(model)
        ids = torch.randint(3, 64, (2, 6))
        expected = twin(ids, labels=ids, use_cache=False)
        expected.loss.backward()
        compiled = torch.compile(model, fullgraph=True, backend="eager")(ids, labels=ids, use_cache=False)
        compiled.loss.backward()
        torch.testing.assert_close(compiled.loss, expected.loss)
        torch.testing.assert_close(compiled.aux_loss, expected.aux_loss)
        router, twin_router = model.model.layers[0].mlp.router, twin.model.layers[0].mlp.router
        assert torch.equal(router.expert_token_counts, twin_router.expert_token_counts)
        assert router.expert_token_counts.sum() == ids.numel() * model.config.num_experts_per_tok
        torch.testing.assert_close(router.cluster_weight.grad, twin_router.cluster_weight.grad)

        after = twin(ids, labels=ids, use_cache=False)  # eager, after the compiled call
        assert after.aux_loss is not None
        assert twin_router.expert_token_counts.sum() == 2 * ids.numel() * model.config.num_experts_per_tok

        model.zero_grad()
        with torch.no_grad():
            model.model.layers[0].mlp.experts.down_proj.fill_(float("nan"))  # every expert broken
        broken = torch.compile(model, fullgraph=True, backend="eager")(ids, labels=ids, use_cache=False)
        broken.loss.backward()
        assert torch.isfinite(broken.loss) and torch.isfinite(model.model.embed_tokens.weight.grad).all()

        # A config that records an output in every forward gets its recording hooks at construction.
        config = ClusterMoEConfig(**{tiny_config(num_hidden_layers=1, output_router_logits=True).to_diff_dict()!r})
        recording = ClusterMoEForCausalLM(config).train()
        output = torch.compile(recording, fullgraph=True, backend="eager")(ids, labels=ids, use_cache=False)
        assert len(output.router_logits) == 1 and output.router_logits[0].shape == (ids.numel(), 2)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def test_assisted_and_prompt_lookup_decoding_match_greedy(tiny_model):
    model = tiny_model(initializer_range=0.2)
    draft = tiny_model(num_hidden_layers=1, initializer_range=0.2)  # different weights: many rejected tokens
    prompt = torch.cat([random_ids(1, 4)] * 3, dim=1)  # repeated n-grams give prompt lookup candidates
    expected = greedy(model, prompt, max_new_tokens=8)
    assert torch.equal(greedy(model, prompt, max_new_tokens=8, assistant_model=draft), expected)
    assert torch.equal(greedy(model, prompt, max_new_tokens=8, assistant_model=model), expected)
    assert torch.equal(greedy(model, prompt, max_new_tokens=8, prompt_lookup_num_tokens=3), expected)


def test_continuous_batching_generates_what_generate_does(tiny_model):
    """`generate_batch` runs the model on a paged cache, which is not a transformers `Cache`. (Sized for these
    prompts: by default the paged cache takes most of the machine's memory, ~1 min to set up here.)"""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model = tiny_model(initializer_range=0.2)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    config = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    paged = ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=64)
    outputs = model.generate_batch(prompts, generation_config=config, continuous_batching_config=paged, warmup=False)
    for request, prompt in zip(sorted(outputs), prompts):
        expected = model.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt) :]
        assert outputs[request].generated_tokens == expected.tolist()


@pytest.mark.slow
def test_flex_attention_generation_with_a_static_cache_runs(tiny_model):
    """It passes the model a `BlockMask`, not a tensor. (Flex attention's CPU results are checked upstream.)"""
    model = tiny_model()
    model.set_attn_implementation("flex_attention")
    ids = torch.randint(3, 64, (2, 6))
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :2] = 0
    generated = model.generate(ids, attention_mask=attention_mask, max_new_tokens=3, cache_implementation="static")
    assert generated.shape == (2, 9)


def test_generation_from_inputs_embeds_matches_input_ids(tiny_model):
    model = tiny_model(initializer_range=0.2)
    ids = random_ids(2, 5)
    embeds = model.get_input_embeddings()(ids)
    expected_new_tokens = greedy(model, ids)[:, ids.shape[1] :]
    for cache_implementation in (None, "static"):
        from_embeds = greedy(model, None, inputs_embeds=embeds, cache_implementation=cache_implementation)
        assert torch.equal(from_embeds, expected_new_tokens)  # only the new tokens come back


def test_generation_continues_from_returned_cache(tiny_model):
    model = tiny_model(initializer_range=0.2)
    ids = random_ids(2, 5)
    full = greedy(model, ids, max_new_tokens=6)
    first = greedy(model, ids, max_new_tokens=3, return_dict_in_generate=True)
    assert first.cache.get_seq_length() == ids.shape[1] + 2  # the last generated token is not in the cache yet
    continued = greedy(model, first.sequences, max_new_tokens=3, cache=first.cache)
    assert torch.equal(continued, full)


def test_generation_continues_from_inputs_embeds_and_cache(tiny_model):
    model = tiny_model(initializer_range=0.2)
    ids = random_ids(2, 5)
    embed = model.get_input_embeddings()
    full = greedy(model, ids, max_new_tokens=6)
    first = greedy(model, None, inputs_embeds=embed(ids), max_new_tokens=3, return_dict_in_generate=True)
    sequences = torch.cat([ids, first.sequences], dim=1)
    continued = greedy(model, None, inputs_embeds=embed(sequences), max_new_tokens=3, cache=first.cache)
    assert torch.equal(continued, full[:, sequences.shape[1] :])


def test_logits_to_keep(tiny_model):
    model = tiny_model()
    assert model._supports_logits_to_keep()
    ids = random_ids(2, 6)
    with torch.no_grad():
        all_logits = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
        picked = model(ids, logits_to_keep=torch.tensor([1, 4])).logits
    assert all_logits.shape == (2, 6, VOCAB_SIZE) and last.shape == (2, 1, VOCAB_SIZE)
    torch.testing.assert_close(last, all_logits[:, -1:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(picked, all_logits[:, [1, 4]], rtol=1e-5, atol=1e-6)


# ----- attention masks and packing -----


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_custom_4d_attention_mask_packs_shared_prefix(tiny_model, attn_implementation):
    """Three sequences sharing a 3-token prefix, packed into one row with a 4D mask in which the last three tokens
    only see the prefix and themselves, give the same last-token logits as the three sequences batched."""
    model = tiny_model(attn_implementation=attn_implementation)
    prefix = random_ids(1, 3)
    endings = random_ids(3, 1)
    batched_ids = torch.cat([prefix.expand(3, -1), endings], dim=1)  # (3, 4)
    packed_ids = torch.cat([prefix, endings.T], dim=1)  # (1, 6)
    allowed = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 0, 1, 0],
            [1, 1, 1, 0, 0, 1],
        ]
    )
    additive_mask = (allowed == 0).float()[None, None] * torch.finfo(torch.float32).min
    with torch.no_grad():
        batched = model(batched_ids, position_ids=torch.arange(4).expand(3, -1)).logits[:, -1]
        packed = model(packed_ids, attention_mask=additive_mask, position_ids=torch.tensor([[0, 1, 2, 3, 3, 3]]))
    torch.testing.assert_close(packed.logits[0, -3:], batched, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_padding_free_position_ids_match_padded_batch(tiny_model, attn_implementation):
    model = tiny_model(attn_implementation=attn_implementation)
    lengths = [8, 5, 3]
    ids = random_ids(3, 8)
    attention_mask = (torch.arange(8) < torch.tensor(lengths)[:, None]).long()  # right padding
    ids = ids.masked_fill(attention_mask == 0, PAD)
    packed_ids = ids[attention_mask.bool()][None]
    position_ids = torch.cat([torch.arange(length) for length in lengths])[None]
    with torch.no_grad():
        padded = model(ids, attention_mask=attention_mask, use_cache=False).logits[attention_mask.bool()]
        packed = model(packed_ids, position_ids=position_ids, use_cache=False).logits[0]
    torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training forward"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_left_padding_does_not_change_logits(tiny_model, attn_implementation, training):
    """Many pad tokens (zero embeddings, hence all-zero expert outputs) must not change the real tokens' outputs:
    padding is excluded from the expert health check of training forwards, which compares experts within a cluster
    (next to all-zero padding outputs, healthy experts would look outsized)."""
    model = tiny_model(attn_implementation=attn_implementation).train(training)
    ids = random_ids(2, 6)
    padded_ids = F.pad(ids, (32, 0), value=PAD)
    attention_mask = (padded_ids != PAD).long()
    with torch.set_grad_enabled(training):
        expected = model(ids).logits
        padded = model.model(padded_ids, attention_mask=attention_mask)
        padded_logits = model.lm_head(padded.last_hidden_state)[:, 32:]
    torch.testing.assert_close(padded_logits, expected, rtol=1e-4, atol=1e-5)
    assert not any(layer["expert_faulty"].any() for layer in padded.routing_stats)


def test_batched_rows_match_single_rows(tiny_model):
    model = tiny_model()
    ids = random_ids(4, 7)
    with torch.no_grad():
        batched = model(ids, output_hidden_states=True, output_router_logits=True)
        single = model(ids[:1], output_hidden_states=True, output_router_logits=True)
    torch.testing.assert_close(batched.logits[:1], single.logits, rtol=1e-5, atol=1e-5)
    for batched_states, single_states in zip(batched.hidden_states, single.hidden_states):
        torch.testing.assert_close(batched_states[:1], single_states, rtol=1e-5, atol=1e-5)
    for batched_logits, single_logits in zip(batched.router_logits, single.router_logits):
        torch.testing.assert_close(batched_logits[:7], single_logits, rtol=1e-5, atol=1e-5)


# ----- loading and initialisation -----


def test_loading_with_mismatched_shapes(tiny_model, tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)

    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(tmp_path, vocab_size=VOCAB_SIZE + 8)
    resized = AutoModelForCausalLM.from_pretrained(tmp_path, vocab_size=VOCAB_SIZE + 8, ignore_mismatched_sizes=True)
    assert resized.lm_head.weight.shape == resized.model.embed_tokens.weight.shape == (VOCAB_SIZE + 8, 32)
    expected_experts = model.model.layers[0].mlp.experts.gate_up_proj
    assert torch.equal(resized.model.layers[0].mlp.experts.gate_up_proj, expected_experts)

    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=42)
    assert classifier.score.weight.shape == (42, 32)
    assert torch.equal(classifier.model.embed_tokens.weight, model.model.embed_tokens.weight)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_init_weights_restores_buffers_after_meta_init(tiny_config, model_class):
    """A model built on the meta device and materialised with `init_weights()` must get the same buffers as one built
    normally (routing state, counters, rotary frequencies)."""
    config = tiny_config()
    with no_init_weights():
        reference = model_class(copy.deepcopy(config))
    with torch.device("meta"):
        model = model_class(copy.deepcopy(config))
    model.to_empty(device="cpu")
    for buffer in model.buffers():
        buffer.fill_(7)  # whatever `to_empty` left there must be overwritten
    model.init_weights()
    buffers = dict(model.named_buffers())
    assert buffers.keys() == dict(reference.named_buffers()).keys()
    for name, expected in reference.named_buffers():
        assert torch.equal(buffers[name], expected), name


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_missing_weights_and_buffers_are_initialised_on_load(tiny_config, model_class):
    config = tiny_config()
    reference = model_class(copy.deepcopy(config))
    loaded = model_class.from_pretrained(None, config=copy.deepcopy(config), state_dict={})
    tensors = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    assert not [name for name, tensor in tensors.items() if tensor.device.type == "meta"]
    assert tensors.keys() == (dict(reference.named_parameters()) | dict(reference.named_buffers())).keys()
    for name, expected in reference.named_buffers():
        assert torch.equal(tensors[name], expected), name
    for name, param in loaded.named_parameters():
        assert torch.isfinite(param).all(), name
