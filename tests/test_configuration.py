import copy
import json
import math
import subprocess
import sys

import pytest
import torch

from transformers import AutoModelForCausalLM

from clustermoe_hf import (
    ClusterMoEConfig,
    ClusterMoEForCausalLM,
    ClusterMoEForSequenceClassification,
    ClusterMoEForTokenClassification,
)


ALIASES = {
    "d_model": "hidden_size",
    "d_ff": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "load_balancing_weight": "router_aux_loss_coef",
    "router_z_loss_weight": "router_z_loss_coef",
    "dropout": "attention_dropout",
}


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"top_k_clusters": 3}, "top_k_clusters"),
        ({"top_k_experts": 5}, "top_k_experts"),
        ({"vocab_size": 0, "pad_token_id": None}, "vocab_size"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"intermediate_size": -1}, "intermediate_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"num_clusters": 0, "top_k_clusters": 0}, "num_clusters"),
        ({"experts_per_cluster": 0}, "experts_per_cluster"),
        ({"top_k_experts": 0}, "top_k_experts"),
        ({"hidden_size": 32.0}, "hidden_size"),
        ({"hidden_size": 30}, r"hidden_size \(30\) must be divisible by num_attention_heads"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"router_implementation": "dense"}, "router_implementation"),
        ({"router_aux_loss_coef": -0.1}, "router_aux_loss_coef"),
        ({"router_cluster_aux_loss_coef": -0.1}, "router_cluster_aux_loss_coef"),
        ({"router_z_loss_coef": -1e-3}, "router_z_loss_coef"),
        ({"load_balancing_weight": -0.1}, "router_aux_loss_coef"),
        ({"expert_capacity_factor": 0.0}, "expert_capacity_factor"),
        ({"expert_capacity_factor": -1.0}, "expert_capacity_factor"),
        ({"reliability_decay": 0.0}, r"reliability_decay must be a finite number in \(0, 1\), got 0.0"),
        ({"reliability_decay": 1.0}, r"reliability_decay must be a finite number in \(0, 1\), got 1.0"),
        ({"reliability_decay": 1.5}, r"reliability_decay must be a finite number in \(0, 1\), got 1.5"),
        # at 1 every expert below full health would be excluded: no healthy-enough expert could exist after a fault
        ({"reliability_threshold": 1.0}, r"reliability_threshold must be a finite number in \[0, 1\), got 1.0"),
        ({"reliability_threshold": -0.1}, r"reliability_threshold must be a finite number in \[0, 1\), got -0.1"),
        # at most 1, every expert would be outsized next to its peers
        ({"reliability_max_norm_ratio": 1.0}, r"reliability_max_norm_ratio must be a finite number > 1, got 1.0"),
        # wrong types and non-finite numbers, e.g. from a hand-edited config.json or a command-line override
        ({"routing_temperature": "1.0"}, "routing_temperature"),
        ({"router_jitter_noise": None}, "router_jitter_noise"),
        ({"adaptive_routing_rate": float("inf")}, "adaptive_routing_rate"),
        ({"reliability_threshold": float("nan")}, "reliability_threshold"),
        ({"expert_capacity_factor": "1.25"}, "expert_capacity_factor"),
        ({"use_adaptive_routing": "False"}, "use_adaptive_routing"),
        ({"norm_topk_prob": 1}, "norm_topk_prob"),
        ({"hidden_act": "swish_typo"}, "hidden_act"),
        ({"eos_token_id": 64}, "eos_token_id"),
        ({"eos_token_id": [2, -1]}, "eos_token_id"),
        ({"eos_token_id": []}, "eos_token_id"),  # generate would fail on it with an IndexError
        # a wrong type in a field that other defaults are computed from is named, not a TypeError of the computation
        ({"num_attention_heads": "4"}, "num_attention_heads"),
        ({"hidden_size": None}, "hidden_size"),
        ({"top_k_experts": None}, "top_k_experts"),
        ({"head_dim": 7}, r"head_dim must be even for rotary embeddings, got 7"),
        ({"first_k_dense_layers": 3}, "first_k_dense_layers"),
        ({"shared_expert_intermediate_size": -1}, "shared_expert_intermediate_size"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, r"rope_parameters .*'factor'"),
        ({"rope_parameters": {"rope_type": "bogus", "rope_theta": 1e4}}, r"rope_parameters\['rope_type'\]"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, r"rope_parameters\['rope_theta'\]"),
        # transformers only warns about these scaling parameters; the model then computed NaN or failed while built
        (
            {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 0.0}},
            r"rope_parameters .* give RoPE inverse frequencies that are not 4 finite positive numbers",
        ),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 0.0}},
            r"rope_parameters .* give RoPE inverse frequencies that are not 4 finite positive numbers",
        ),
        (  # the attention logits would be scaled by it
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "attention_factor": math.inf}},
            r"rope_parameters .* give a non-finite attention scaling \(inf\)",
        ),
        (
            {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 10**400}},
            r"rope_parameters .* give no RoPE frequencies \(OverflowError",
        ),
        # "dynamic" scales only past max_position_embeddings: factor -1 gave NaN logits from twice the context on
        *(
            (
                {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": factor}},
                r"rope_parameters .* give no finite RoPE frequencies past max_position_embeddings: dynamic scaling "
                rf"needs a finite factor >= 0, got {factor}",
            )
            for factor in (-1.0, -1e-3)
        ),
        (  # a ZeroDivisionError in transformers' own check of the parameters
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0,
                                 "original_max_position_embeddings": 0}},
            r"rope_parameters .*'original_max_position_embeddings': 0",
        ),
        (
            {
                "rope_parameters": {
                    "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 3, "long_factor": [1.0] * 4,
                    "original_max_position_embeddings": 16,
                }
            },  # fmt: skip
            r"rope_parameters .* need short_factor to be a list of head_dim // 2 = 4 numbers, got \[1.0, 1.0, 1.0\]",
        ),
        # the attention rotates the whole head_dim: a partial factor was ignored ("default") or broke the forward
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}},
            r"rope_parameters\['partial_rotary_factor'\] must be 1",
        ),
        (
            {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2, "partial_rotary_factor": 0.5}},
            r"rope_parameters\['partial_rotary_factor'\] must be 1",
        ),
        ({"partial_rotary_factor": 0.5}, r"rope_parameters\['partial_rotary_factor'\]"),  # moved there by transformers
        # transformers' per-layer-type form: RoPE read the top-level defaults it adds, theta 10000 instead of 500
        (
            {"layer_types": ["full_attention"] * 2, "rope_parameters": {"full_attention": {"rope_theta": 500.0}}},
            r"rope_parameters must be one flat dict .* per layer type \['full_attention'\]",
        ),
        # 0 would leave the experts and routers all-zero (transformers falls back to 0.02 only for its own layers)
        ({"initializer_range": 0.0}, r"initializer_range must be a finite number > 0"),
        # a negative size is reported as such, not as a divisibility error of the head_dim derived from it
        ({"hidden_size": -6}, r"hidden_size must be a positive integer, got -6"),
        ({"dense_intermediate_size": 0}, "dense_intermediate_size"),
        # a non-dict failed with an AttributeError inside transformers' RoPE standardisation
        ({"rope_parameters": "yarn"}, r"rope_parameters must be a dict or None, got 'yarn'"),
        ({"rope_parameters": [10000.0]}, r"rope_parameters must be a dict or None"),
        ({"rope_scaling": "linear"}, r"rope_scaling must be a dict or None"),
        # derived, read-only: Qwen3-MoE/OLMoE's field names failed with "property has no setter"
        ({"num_experts": 16}, r"num_experts is derived, num_experts = num_clusters \* experts_per_cluster"),
        ({"num_experts_per_tok": 2}, r"num_experts_per_tok = top_k_clusters \* top_k_experts"),
        ({"cluster_aux_loss_coef": 0.1}, r"cluster_aux_loss_coef is derived, .* = router_cluster_aux_loss_coef"),
        # transformers' own config checks (`@strict` class validators), which overriding `validate` skipped
        ({"output_attentions": True, "attn_implementation": "sdpa"}, "`output_attentions` attribute is not supported"),
        ({"layer_types": ["bogus", "bogus"]}, r"`layer_types` entries must be in"),
        ({"layer_types": ["full_attention"]}, r"must be equal to the number of `layer_types`"),
        # transformers' caches honoured these on their own: cached decoding kept a window the attention did not use
        ({"sliding_window": 4}, r"sliding_window=4: ClusterMoE has full causal attention in every layer"),
        ({"attention_chunk_size": 4}, r"attention_chunk_size=4: ClusterMoE has full causal attention"),
        ({"layer_types": ["sliding_attention", "full_attention"]}, r"layer_types=\['sliding_attention'"),
        # logits / temperature overflowed float32 and the routing became NaN
        ({"routing_temperature": 1e-40}, r"routing_temperature must be a finite number >= 0.0001"),
        # transformers' own fields, which failed with an AttributeError or TypeError naming none, or later
        ({"dtype": "bogus"}, r"dtype must be a torch dtype or its name, e.g. 'bfloat16', got 'bogus'"),
        ({"torch_dtype": "torch.float32"}, r"dtype must be a torch dtype or its name"),
        ({"dtype": 5}, r"dtype must be a torch dtype or its name"),
        ({"dtype": "int64"}, r"dtype must be a floating-point dtype"),
        ({"num_labels": -1}, r"num_labels must be a positive integer, got -1"),  # was silently 0 labels
        ({"num_labels": "3"}, r"num_labels must be a positive integer, got '3'"),
        ({"id2label": ["negative", "positive"]}, r"id2label must map class ids to names \(a dict\)"),
        ({"id2label": {}}, r"num_labels must be a positive integer \(id2label must name at least one class\)"),
        ({"hidden_act": ["silu"]}, r"hidden_act must be the name of one of transformers' activations"),
        # was refused only in the forward
        ({"problem_type": "multi_label"}, r"problem_type must be None or one of \['regression'"),
    ],
)
def test_invalid_values_are_rejected_naming_the_field(tiny_config, overrides, field):
    with pytest.raises(ValueError, match=field) as error:
        tiny_config(**overrides)
    assert str(error.value).startswith("Invalid ClusterMoEConfig: ")


def test_tiny_config_is_valid(tiny_config):
    """Guards the rejection tests above: they must fail because of their override, not the base config."""
    config = tiny_config()
    assert config.num_experts == 8
    assert config.num_experts_per_tok == 2
    assert config.head_dim == 8


def test_aliases_map_to_hf_fields():
    config = ClusterMoEConfig(
        d_model=48,
        d_ff=24,
        num_layers=3,
        load_balancing_weight=0.05,
        router_z_loss_weight=0.002,
        dropout=0.1,
        num_attention_heads=4,
        vocab_size=64,
    )
    assert config.hidden_size == 48
    assert config.intermediate_size == 24
    assert config.num_hidden_layers == 3
    assert config.router_aux_loss_coef == 0.05
    assert config.cluster_aux_loss_coef == 0.05  # follows the expert-level weight
    assert config.router_z_loss_coef == 0.002
    assert config.attention_dropout == 0.1
    assert config.head_dim == 12  # derived from the aliased hidden size
    for alias, name in ALIASES.items():
        assert getattr(config, alias) == getattr(config, name)

    config.d_model = 64
    assert config.hidden_size == 64


def test_the_cluster_balancing_weight_follows_the_expert_level_one_unless_given(tmp_path, tiny_config):
    ClusterMoEForCausalLM(tiny_config()).save_pretrained(tmp_path)
    # The original package's single balancing weight, turned off on a saved checkpoint, turns off both levels.
    model = ClusterMoEForCausalLM.from_pretrained(tmp_path, load_balancing_weight=0.0, router_z_loss_coef=0.0)
    assert model.config.cluster_aux_loss_coef == 0.0
    ids = torch.randint(3, 64, (2, 6))
    assert model(ids, labels=ids).aux_loss == 0.0
    given = tiny_config(router_cluster_aux_loss_coef=0.3, router_aux_loss_coef=0.2)
    assert (given.cluster_aux_loss_coef, given.router_aux_loss_coef) == (0.3, 0.2)


def test_an_alias_and_its_field_with_different_values_are_rejected():
    with pytest.raises(ValueError, match=r"d_model=64 is an alias of hidden_size, which is given as 128"):
        ClusterMoEConfig(d_model=64, hidden_size=128, num_attention_heads=4)
    assert ClusterMoEConfig(d_model=64, hidden_size=64, num_attention_heads=4).hidden_size == 64


def test_original_options_without_counterpart_are_dropped_with_a_warning(tmp_path, caplog):
    config = ClusterMoEConfig(max_tree_depth=3, enable_expert_pruning=True)
    assert "ignores the original package's `max_tree_depth`" in caplog.text
    assert "`enable_expert_pruning`: pruning is an explicit call" in caplog.text
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not {"max_tree_depth", "enable_expert_pruning"} & set(saved)


def test_aliases_survive_save_and_load_with_only_hf_names(tmp_path):
    config = ClusterMoEConfig(
        d_model=48, d_ff=24, num_layers=3, load_balancing_weight=0.05, router_z_loss_weight=0.002, dropout=0.1,
        num_attention_heads=4, vocab_size=64,
    )  # fmt: skip
    assert not set(ALIASES) & set(config.to_dict())

    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not set(ALIASES) & set(saved)
    assert saved["model_type"] == "clustermoe"
    assert saved["hidden_size"] == 48 and saved["router_aux_loss_coef"] == 0.05

    reloaded = ClusterMoEConfig.from_pretrained(tmp_path)
    for alias, name in ALIASES.items():
        assert getattr(reloaded, name) == getattr(config, name)
        assert getattr(reloaded, alias) == getattr(config, name)
    assert reloaded.to_dict() == config.to_dict()


def test_values_set_after_construction_are_checked_when_a_model_is_built_or_saved(tmp_path, tiny_config):
    ClusterMoEForCausalLM(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"top_k_experts \(9\) must be <= experts_per_cluster"):
        AutoModelForCausalLM.from_pretrained(tmp_path, top_k_experts=9)  # set on the loaded config
    assert AutoModelForCausalLM.from_pretrained(tmp_path, reliability_threshold=0.3).config.reliability_threshold == 0.3

    config = tiny_config()
    config.reliability_decay = 1.5
    with pytest.raises(ValueError, match="reliability_decay"):
        config.save_pretrained(tmp_path / "edited")
    assert not (tmp_path / "edited" / "config.json").exists()

    config = tiny_config()
    config.dtype = "int64"
    with pytest.raises(ValueError, match=r"dtype must be a floating-point dtype"):
        ClusterMoEForCausalLM(config)

    # transformers' `num_labels` setter turns a negative count into an empty label map: a head without classes
    config = tiny_config()
    config.num_labels = -1
    with pytest.raises(ValueError, match=r"num_labels must be a positive integer \(id2label must name at least one"):
        ClusterMoEForSequenceClassification(config)


@pytest.mark.parametrize(
    "name, value, error",
    [
        ("routing_temperature", 0, "routing_temperature must be a finite number >= 0.0001"),  # NaN outputs unchecked
        ("top_k_experts", 5, r"top_k_experts \(5\) must be <= experts_per_cluster \(4\)"),  # a raw top-k error
        ("reliability_threshold", 1.5, r"reliability_threshold must be a finite number in \[0, 1\)"),
        ("num_clusters", 8, "The config no longer describes this model: it says num_clusters=8"),
        ("d_model", 64, "it says hidden_size=64"),
        # settings the modules copied when built: the model would ignore them and save them for the one reloaded
        ("rms_norm_eps", 0.5, r"it says rms_norm_eps=0.5, the model was built with rms_norm_eps=1e-06\."),
        ("hidden_act", "gelu", "it says hidden_act='gelu', the model was built with hidden_act='silu'"),
        ("dropout", 0.1, "it says attention_dropout=0.1"),
        ("rope_parameters", {"rope_type": "default", "rope_theta": 10.0}, "it says rope_parameters="),
        # the saved checkpoint would reload with attention biases the model never trained
        ("attention_bias", True, "it says attention_bias=True, the model was built with attention_bias=False"),
    ],
)
def test_a_setting_changed_on_a_live_model_is_checked_before_its_next_forward(tiny_config, name, value, error):
    model = ClusterMoEForCausalLM(tiny_config(num_clusters=2, experts_per_cluster=4))
    ids = torch.randint(0, 64, (1, 6))
    built = getattr(model.config, name)
    setattr(model.config, name, value)
    with pytest.raises(ValueError, match=error):
        model(ids)
    with pytest.raises(ValueError, match=error):
        model.generate(ids, max_new_tokens=2)
    setattr(model.config, name, built)
    model(ids)


def test_a_config_file_is_written_only_for_valid_settings(tiny_config, tmp_path):
    """`to_json_file` checks as `save_pretrained` does; an earlier file stays as it was."""
    config = tiny_config()
    path = tmp_path / "config.json"
    config.to_json_file(path)
    saved = path.read_text()
    config.num_clusters = 0
    with pytest.raises(ValueError, match="num_clusters must be a positive integer, got 0"):
        config.to_json_file(path)
    assert path.read_text() == saved


def test_untying_the_embeddings_of_a_tied_model_is_refused_before_a_save_loses_the_head(tiny_config, tmp_path):
    """A tied LM head is saved as the embeddings: with the config untied, the reloaded model's head would be random.
    Also where the two are separate Parameters over one storage, as loading with `assign=True` leaves them."""
    model = ClusterMoEForCausalLM(tiny_config(tie_word_embeddings=True))
    model.config.tie_word_embeddings = False
    with pytest.raises(ValueError, match="The config says tie_word_embeddings=False, but the LM head shares"):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())
    with torch.device("meta"):
        assigned = ClusterMoEForCausalLM(tiny_config(tie_word_embeddings=True))
    assigned.load_state_dict(ClusterMoEForCausalLM(tiny_config(tie_word_embeddings=True)).state_dict(), assign=True)
    assert assigned.lm_head.weight is not assigned.model.embed_tokens.weight
    assigned.save_pretrained(tmp_path / "tied")  # the config says tied: saved
    assigned.config.tie_word_embeddings = False
    with pytest.raises(ValueError, match="The config says tie_word_embeddings=False, but the LM head shares"):
        assigned.save_pretrained(tmp_path / "untied")


def test_a_tied_config_over_separate_weights_saves_both(tiny_config, tmp_path):
    """As `from_pretrained(untied_checkpoint, tie_word_embeddings=True)` leaves a model (transformers does not tie
    different weights): both are saved, and the reloaded model is the same."""
    model = ClusterMoEForCausalLM(tiny_config(tie_word_embeddings=False)).eval()
    model.config.tie_word_embeddings = True
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(ClusterMoEForCausalLM.from_pretrained(tmp_path)(ids).logits, model(ids).logits)


def test_classifier_dropout_is_a_checked_setting_of_the_token_classifier(tiny_config):
    """transformers' heads take `classifier_dropout` (None: 0.1) as a dropout probability: a bool (True is p = 1,
    which zeroes the head's inputs), NaN or a value outside [0, 1) is refused by name, also on a live model."""
    for value in (True, 1.0, -0.1, math.nan, "0.2"):
        with pytest.raises(ValueError, match=r"classifier_dropout must be a finite number in \[0, 1\), or None"):
            tiny_config(classifier_dropout=value)
    assert ClusterMoEForTokenClassification(tiny_config(classifier_dropout=None)).dropout.p == 0.1
    model = ClusterMoEForTokenClassification(tiny_config(classifier_dropout=0.2))
    model.config.classifier_dropout = 0.5
    with pytest.raises(ValueError, match="it says classifier_dropout=0.5, the model was built with classifier_dropout"):
        model(torch.randint(0, 64, (1, 6)))
    model.config.classifier_dropout = 0.2
    model(torch.randint(0, 64, (1, 6)))


@pytest.mark.parametrize("num_hidden_layers", [1, 0, -1])
def test_a_setting_changed_while_fewer_layers_run_is_checked_too(tiny_model, num_hidden_layers):
    """As early-exit drafting does, `num_hidden_layers` may be lowered to run the first layers: the other settings
    are then checked as the whole model's (it would refuse a depth below `first_k_dense_layers`), and a depth that
    runs no layer is refused."""
    model = tiny_model(num_hidden_layers=3, first_k_dense_layers=2)
    ids = torch.randint(0, 64, (1, 6))
    model.config.num_hidden_layers = num_hidden_layers
    model.config.routing_temperature = 0
    error = "routing_temperature must be" if num_hidden_layers > 0 else "num_hidden_layers must be a positive integer"
    with pytest.raises(ValueError, match=error):
        model(ids)
    model.config.routing_temperature = 1.0
    if num_hidden_layers > 0:
        model(ids)  # the first layer alone, with valid settings


def test_the_router_implementation_can_change_on_a_live_model(tiny_model):
    """Flat and hierarchical routers score the same experts with the same weights: switching is a choice of kernels,
    which the next forward follows, and the routing it computes stays the same."""
    model = tiny_model(router_implementation="flat").eval()
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        flat = model(ids).logits
        model.config.router_implementation = "hierarchical"
        hierarchical = model(ids).logits
    assert all(block.router.hierarchical for _, block in model._moe_layers())
    torch.testing.assert_close(hierarchical, flat)


@pytest.mark.parametrize("num_hidden_layers", [0, -1, 1.5, None, 4])
def test_a_depth_the_model_cannot_run_is_refused_after_a_forward(tiny_model, num_hidden_layers):
    """Early-exit drafting lowers `num_hidden_layers` without a check of the other settings; a depth that is not
    one of the model's (none, a fraction, more layers than built) is still refused before the next forward."""
    model = tiny_model(num_hidden_layers=3)
    ids = torch.randint(0, 64, (1, 6))
    model(ids)  # clears the mark of a changed setting
    model.config.num_hidden_layers = num_hidden_layers
    with pytest.raises(ValueError, match="num_hidden_layers"):
        model(ids, labels=ids)
    model.config.num_hidden_layers = 3
    model(ids)


def test_a_live_config_is_checked_once_per_change_and_the_mark_is_not_saved(tiny_model, tmp_path, monkeypatch):
    model = tiny_model()
    ids = torch.randint(0, 64, (1, 6))
    checks = []
    validate = ClusterMoEConfig.validate
    monkeypatch.setattr(ClusterMoEConfig, "validate", lambda config: checks.append(1) or validate(config))
    model(ids)
    checks.clear()
    model(ids)
    assert checks == []  # nothing changed
    model.config.top_k_experts = 1
    model(ids)
    model(ids)
    assert checks == [1]
    # Early-exit drafting runs the first layers by lowering num_hidden_layers for each draft: no check.
    model.config.num_hidden_layers = 1
    model(ids)
    assert checks == [1]
    model.config.num_hidden_layers = 2

    model.config.top_k_experts = 2
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not any(key.startswith("_changed") for key in saved)
    assert ClusterMoEConfig.from_pretrained(tmp_path).to_dict() == model.config.to_dict()


def test_the_routing_settings_follow_every_change_and_are_not_part_of_the_config(tiny_model, tmp_path):
    """The MoE blocks read their settings in one read per forward (`routing_settings`), kept between forwards: a
    change through any path (setting, `update`, deleting) reaches the next forward, and the kept copy is neither saved
    nor compared."""
    model = tiny_model().eval()
    config = model.config
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        before = model(ids).logits
        settings = config.routing_settings
        assert config.routing_settings is settings  # kept
        assert settings == tuple(getattr(config, name) for name in type(settings)._fields)
        config.update({"routing_temperature": 0.5})
        assert config.routing_settings.routing_temperature == 0.5
        hotter = model(ids).logits
        config.routing_temperature = 1.0
        restored = model(ids).logits
        config.routing_temperature = 0.5
        torch.testing.assert_close(model(ids).logits, hotter, rtol=0, atol=0)
        del config.routing_temperature  # back to the default, 1.0
        deleted = model(ids).logits
    assert not torch.allclose(hotter, before)
    torch.testing.assert_close(restored, before, rtol=0, atol=0)
    torch.testing.assert_close(deleted, before, rtol=0, atol=0)

    twin = copy.deepcopy(config)
    twin.top_k_experts = config.top_k_experts  # the same value: the twin is marked as changed, its settings not kept
    assert twin == config
    model.save_pretrained(tmp_path)
    assert not any(key.startswith("_routing") for key in json.loads((tmp_path / "config.json").read_text()))


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 16},
    ],
)  # fmt: skip
def test_a_scaled_rope_checkpoint_reloads(tiny_config, tmp_path, rope_parameters):
    """Its RoPE frequencies are checked when the config is built, also inside `from_pretrained`, which builds the
    model on the meta device (the check computed them there and refused every scaled RoPE)."""
    model = ClusterMoEForCausalLM(tiny_config(rope_parameters={**rope_parameters, "rope_theta": 1e4})).eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_loading_a_config_still_validates(tmp_path, tiny_config):
    tiny_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    saved["top_k_experts"] = 9
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="top_k_experts"):
        ClusterMoEConfig.from_pretrained(tmp_path)


def test_a_negative_size_given_by_its_alias_is_reported_as_such():
    with pytest.raises(ValueError, match=r"^Invalid ClusterMoEConfig: hidden_size must be a positive integer, got -4"):
        ClusterMoEConfig(d_model=-4)  # not "must be divisible by num_attention_heads (8)"


def test_valid_rope_and_layer_options_are_still_accepted(tiny_config):
    rope = {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0, "partial_rotary_factor": 1.0}
    assert tiny_config(rope_parameters=rope).rope_parameters["partial_rotary_factor"] == 1.0
    assert tiny_config(layer_types=["full_attention"] * 2).layer_types == ["full_attention"] * 2
    assert tiny_config(initializer_range=1e-3).initializer_range == 1e-3


@pytest.mark.parametrize("factor", [0.0, 0.5, 2.0])
def test_dynamic_rope_with_a_factor_of_at_least_0_stays_finite_past_the_context(tiny_config, factor):
    config = tiny_config(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": factor})
    model = ClusterMoEForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 4 * config.max_position_embeddings))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_derived_sizes_cannot_be_set_through_any_path(tmp_path, tiny_config):
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"^Invalid ClusterMoEConfig: num_experts is derived"):
        ClusterMoEConfig.from_pretrained(tmp_path, num_experts=8)
    config = tiny_config()
    with pytest.raises(ValueError, match=r"^Invalid ClusterMoEConfig: num_experts_per_tok is derived"):
        config.update({"num_experts_per_tok": 4})
    with pytest.raises(ValueError, match=r"^Invalid ClusterMoEConfig: num_experts is derived"):
        config.update_from_string("num_experts=4")
    assert (config.num_experts, config.num_experts_per_tok) == (8, 2)


def test_output_attentions_from_the_config_selects_the_eager_attention(tmp_path, tiny_config):
    """As transformers' `output_attentions` setter does; otherwise the model would pick sdpa, which the checks it runs
    when built (transformers' own `validate_output_attentions`) reject."""
    model = ClusterMoEForCausalLM(tiny_config(output_attentions=True)).eval()
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        assert len(model(torch.randint(3, 64, (1, 5))).attentions) == 2
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"^Invalid ClusterMoEConfig: The `output_attentions` attribute"):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")


def test_values_set_after_construction_are_checked_by_transformers_validators_too(tiny_config):
    config = tiny_config()
    config.layer_types = ["bogus", "bogus"]
    with pytest.raises(ValueError, match=r"^Invalid ClusterMoEConfig: The `layer_types` entries"):
        ClusterMoEForCausalLM(config)


def test_the_dense_width_defaults_to_the_active_expert_width_and_is_then_kept(tiny_config):
    """Filled in at construction, like `head_dim`: a saved model's dense layers keep their width when the top-k
    values change later (pruning lowers them; `from_pretrained(path, top_k_experts=...)`)."""
    config = tiny_config(first_k_dense_layers=1)
    assert config.dense_intermediate_size == 16 * 2  # intermediate_size * top_k_clusters * top_k_experts
    assert tiny_config(first_k_dense_layers=1, top_k_clusters=2).dense_intermediate_size == 16 * 2 * 2
    dense_layer = ClusterMoEForCausalLM(tiny_config(first_k_dense_layers=1, dense_intermediate_size=24)).model.layers[0]
    assert (dense_layer.mlp.gate_proj.out_features, dense_layer.mlp.down_proj.in_features) == (24, 24)
    config.top_k_experts = 1
    assert config.dense_intermediate_size == 32
    assert tiny_config(first_k_dense_layers=1, dense_intermediate_size=24).dense_intermediate_size == 24


def test_config_overrides_can_set_fields_whose_value_is_none(tiny_config):
    """transformers' run_clm applies `--config_overrides` with `update_from_string`, which in transformers parses by
    the current value's type and so cannot set a None-valued field (e.g. `expert_capacity_factor`, None by default)."""
    config = tiny_config(pad_token_id=None)
    config.update_from_string(
        "dense_intermediate_size=24,expert_capacity_factor=1.25,router_cluster_aux_loss_coef=0,pad_token_id=0,"
        "top_k_experts=1,d_model=64"
    )
    assert config.dense_intermediate_size == 24
    assert (config.expert_capacity_factor, config.router_cluster_aux_loss_coef, config.pad_token_id) == (1.25, 0, 0)
    assert (config.top_k_experts, config.hidden_size) == (1, 64)
    config.update_from_string("expert_capacity_factor=None")
    assert config.expert_capacity_factor is None
    with pytest.raises(ValueError, match=r"^Invalid ClusterMoEConfig: pad_token_id .* cannot be set from '1.5'"):
        tiny_config(pad_token_id=None).update_from_string("pad_token_id=1.5")


def test_config_overrides_set_a_float_where_the_saved_value_is_an_int(tiny_config, tmp_path):
    """transformers parsed "0.5" as an int for a float field holding 0 (as config.json keeps it) and failed."""
    saved = {"router_z_loss_coef": 0, "routing_temperature": 2, "expert_capacity_factor": 2,
             "reliability_threshold": 0, "adaptive_routing_rate": 0, "router_aux_loss_coef": 0,
             "attention_dropout": 0}  # fmt: skip
    tiny_config(**saved).save_pretrained(tmp_path)
    config = ClusterMoEConfig.from_pretrained(tmp_path)
    assert all(type(getattr(config, name)) is int for name in saved)
    updates = {"router_z_loss_coef": 1e-3, "routing_temperature": 0.5, "expert_capacity_factor": 1.25,
               "reliability_threshold": 0.5, "adaptive_routing_rate": 1e-3}  # fmt: skip
    config.update_from_string(",".join(f"{name}={value}" for name, value in updates.items()))
    assert {name: getattr(config, name) for name in updates} == updates
    for text in ("None", "true", ""):  # named, not Python's bare "could not convert string to float"
        with pytest.raises(ValueError, match=f"routing_temperature .* cannot be set from '{text}'"):
            config.update_from_string(f"routing_temperature={text}")
    # The original package's names (aliases) parse as their fields do, and spaces around an item do not matter.
    saved = ClusterMoEConfig.from_pretrained(tmp_path)
    saved.update_from_string(
        "load_balancing_weight=0.5, dropout = 0.1,router_z_loss_weight=0.25, num_clusters= 2, use_adaptive_routing=true"
    )
    assert (saved.router_aux_loss_coef, saved.attention_dropout, saved.router_z_loss_coef) == (0.5, 0.1, 0.25)
    assert saved.num_clusters == 2 and saved.use_adaptive_routing is True
    # All or nothing: a bad item leaves the items before it unset too.
    before = saved.to_dict()
    with pytest.raises(ValueError, match="no_such_setting"):
        saved.update_from_string("hidden_size=128,no_such_setting=1")
    with pytest.raises(ValueError, match="routing_temperature"):
        saved.update_from_string("hidden_size=128,routing_temperature=warm")
    assert saved.to_dict() == before


def test_settings_named_by_hand_are_built_over_defaults_and_checked(tiny_config):
    """`from_settings` (create_coe_model, run_clm's --config_overrides): aliases replace their field's default, also
    one saved under its alias; transformers' legacy names win over a saved config's; a name the config would only
    store, or a generation setting it would drop, is refused."""
    saved = tiny_config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, dtype="float32").to_dict()
    config = ClusterMoEConfig.from_settings(
        {"d_model": 64, "rope_theta": 5e5, "torch_dtype": "bfloat16"}, "overrides", defaults=saved
    )
    assert (config.hidden_size, config.rope_parameters["rope_theta"], config.dtype) == (64, 5e5, torch.bfloat16)
    saved_under_alias = {**saved, "d_model": saved.pop("hidden_size")}
    config = ClusterMoEConfig.from_settings({"hidden_size": 64}, "overrides", defaults=saved_under_alias)
    assert config.hidden_size == 64
    with pytest.raises(ValueError, match="overrides: ClusterMoEConfig has no setting num_cluster \\(did you mean"):
        ClusterMoEConfig.from_settings({"num_cluster": 3}, "overrides", defaults=saved)
    with pytest.raises(ValueError, match="overrides: temperature, top_k: generation settings"):
        ClusterMoEConfig.from_settings({"top_k": 1, "temperature": 0.5}, "overrides", defaults=saved)
    # rope_theta goes into the RoPE dict that wins: a given rope_scaling, or a legacy config's.
    scaling = {"rope_type": "linear", "factor": 2.0}
    config = ClusterMoEConfig.from_settings({"rope_theta": 5e5, "rope_scaling": scaling}, "x")
    assert config.rope_parameters == {**scaling, "rope_theta": 5e5}
    legacy = {**saved, "rope_parameters": None, "rope_theta": 1e6, "rope_scaling": scaling}
    config = ClusterMoEConfig.from_settings({"rope_theta": 5e5}, "overrides", defaults=legacy)
    assert config.rope_parameters == {**scaling, "rope_theta": 5e5}
    config = ClusterMoEConfig.from_settings({"rope_parameters": None, "rope_theta": 5e5}, "overrides", defaults=saved)
    assert config.rope_parameters["rope_theta"] == 5e5
    # The caller's dicts stay as they were (transformers fills rope_theta into the RoPE dict it is given).
    given, saved_rope = {"rope_type": "default"}, {"rope_type": "linear", "factor": 2.0}
    ClusterMoEConfig.from_settings({"rope_parameters": given}, "x")
    ClusterMoEConfig.from_settings({"hidden_size": 64}, "x", defaults={"rope_parameters": saved_rope})
    assert (given, saved_rope) == ({"rope_type": "default"}, {"rope_type": "linear", "factor": 2.0})
    # use_cache is a generation setting too, but also a config field: kept, not refused.
    assert ClusterMoEConfig.from_settings({"use_cache": False}, "x").use_cache is False
    # A RoPE dict given replaces a legacy config's rope_scaling, which transformers would let win over it.
    given = {"rope_type": "default", "rope_theta": 5e5}
    config = ClusterMoEConfig.from_settings({"rope_parameters": given}, "overrides", defaults=legacy)
    assert config.rope_parameters == given
    config = ClusterMoEConfig.from_settings(
        {"rope_theta": 5e5, "rope_parameters": {"rope_type": "default"}}, "overrides", defaults=legacy
    )
    assert config.rope_parameters == given
    # A RoPE setting given without a rope_theta keeps the saved one (in the saved dict, or a legacy config's); None
    # drops the scaling.
    for defaults in (tiny_config(rope_parameters={"rope_type": "default", "rope_theta": 5e4}).to_dict(), legacy):
        theta = defaults.get("rope_theta", 5e4)
        for key in ("rope_parameters", "rope_scaling"):
            config = ClusterMoEConfig.from_settings({key: dict(scaling)}, "overrides", defaults=defaults)
            assert config.rope_parameters == {**scaling, "rope_theta": theta}
            config = ClusterMoEConfig.from_settings({key: None}, "overrides", defaults=defaults)
            assert config.rope_parameters == {"rope_type": "default", "rope_theta": theta}
        both = {"rope_scaling": None, "rope_parameters": dict(scaling)}  # the dict sets RoPE, None adds nothing
        config = ClusterMoEConfig.from_settings(both, "overrides", defaults=defaults)
        assert config.rope_parameters == {**scaling, "rope_theta": theta}
    with pytest.raises(ValueError, match="rope_theta is given twice, as 500000.0 and in rope_parameters as 1000000.0"):
        ClusterMoEConfig.from_settings({"rope_theta": 5e5, "rope_parameters": {"rope_type": "default",
                                                                                "rope_theta": 1e6}}, "x")  # fmt: skip


@pytest.mark.parametrize("version, refused", [("5.23.0", True), ("4.57.1", True), ("5.24.0.dev0", False)])
def test_an_older_transformers_is_named_on_import(version, refused):
    """Releases before 5.24 lack the `cache` argument the model passes: importing says so, before anything fails. The
    version is that of the transformers imported (here: reported as `version`)."""
    script = f"import transformers; transformers.__version__ = {version!r}; import clustermoe_hf"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    if refused:
        assert result.returncode != 0
        assert f"ImportError: ClusterMoE needs transformers >= 5.24, found {version}" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
