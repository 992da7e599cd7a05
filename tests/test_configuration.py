import json

import pytest
import torch

from transformers import AutoModelForCausalLM

from clustermoe_hf import ClusterMoEConfig, ClusterMoEForCausalLM


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
        ({"reliability_decay": 0.0}, "reliability_decay"),
        ({"reliability_decay": 1.0}, "reliability_decay"),
        ({"reliability_decay": 1.5}, "reliability_decay"),
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
        # a wrong type in a field that other defaults are computed from is named, not a TypeError of the computation
        ({"num_attention_heads": "4"}, "num_attention_heads"),
        ({"hidden_size": None}, "hidden_size"),
        ({"top_k_experts": None}, "top_k_experts"),
        ({"head_dim": 7}, "head_dim"),
        ({"first_k_dense_layers": 3}, "first_k_dense_layers"),
        ({"shared_expert_intermediate_size": -1}, "shared_expert_intermediate_size"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, r"rope_parameters .*'factor'"),
        ({"rope_parameters": {"rope_type": "bogus", "rope_theta": 1e4}}, r"rope_parameters\['rope_type'\]"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, r"rope_parameters\['rope_theta'\]"),
    ],
)
def test_invalid_values_are_rejected_naming_the_field(tiny_config, overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


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


def test_loading_a_config_still_validates(tmp_path, tiny_config):
    tiny_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    saved["top_k_experts"] = 9
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="top_k_experts"):
        ClusterMoEConfig.from_pretrained(tmp_path)
