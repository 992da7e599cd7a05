"""Specialisation statistics: utilisation entropy and label/cluster mutual information."""

import math

import pytest
import torch

from clustermoe_hf import ClusterMoEForSequenceClassification, ClusterMoEForTokenClassification, ClusterMoEModel
from clustermoe_hf.analysis import (
    entropy,
    mutual_information,
    perplexity,
    specialization_statistics,
    utilization_entropy,
)


def test_entropy():
    assert entropy(torch.tensor([5, 5, 5, 5])) == pytest.approx(math.log(4))
    assert entropy(torch.tensor([0, 7, 0])) == 0.0
    assert entropy(torch.zeros(3)) == 0.0
    assert entropy(torch.tensor([1.0, 3.0])) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_entropy_refuses_negative_counts():
    with pytest.raises(ValueError, match="counts must be non-negative; got a count of -1"):
        entropy(torch.tensor([-1.0, 2.0, 3.0]))


def test_entropy_refuses_counts_that_are_not_a_tensor():
    with pytest.raises(TypeError, match="counts must be a tensor of counts; got a list"):
        entropy([1, 2])


@pytest.mark.parametrize("count", [math.nan, math.inf, -math.inf])
def test_entropy_refuses_counts_that_are_not_finite(count):
    """NaN passes a check for negative counts: the entropy would be NaN."""
    with pytest.raises(ValueError, match="counts must be finite; got"):
        entropy(torch.tensor([1.0, count]))


def test_mutual_information():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert mutual_information(labels, torch.tensor([1, 1, 0, 0, 2, 2])) == pytest.approx(math.log(3))
    assert mutual_information(labels, torch.tensor([0, 1, 0, 1, 0, 1])) == pytest.approx(0.0, abs=1e-12)
    # cluster 0 for label 0; clusters 0 and 1 for label 1: I = H(cluster) - H(cluster | label) = H(3/4, 1/4) - log(2)/2
    assert mutual_information(torch.tensor([0, 1]), torch.tensor([0, 0, 0, 1]).view(2, 2)) == pytest.approx(
        entropy(torch.tensor([3.0, 1.0])) - math.log(2) / 2
    )
    # Choosing every cluster says nothing about the label.
    assert mutual_information(labels, torch.tensor([[0, 1]] * 6)) == pytest.approx(0.0, abs=1e-12)
    assert mutual_information(torch.zeros(0, dtype=torch.long), torch.zeros(0, 2, dtype=torch.long)) == 0.0


def test_mutual_information_of_sparse_ids_is_that_of_dense_ones():
    """Ids only name groups (e.g. document ids): a huge id must not size a histogram."""
    dense_labels, dense_clusters = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([[0, 1], [0, 1], [1, 2], [1, 1], [0, 0]])
    sparse_labels = torch.tensor([0, 0, 10**12, 10**12, 7])
    sparse_clusters = torch.tensor([[5, 10**15], [5, 10**15], [10**15, 9], [10**15, 10**15], [5, 5]])
    assert mutual_information(sparse_labels, sparse_clusters) == pytest.approx(
        mutual_information(dense_labels, dense_clusters)
    )


@pytest.mark.parametrize(
    "labels, clusters, message",
    [
        (torch.tensor([[0, 1], [1, 0]]), torch.tensor([0, 1]), "labels must be 1-D"),
        (torch.tensor([0, 1]), torch.tensor([0, 1, 1, 0]), r"clusters must be \(n,\) or \(n, k\).*got shape \(4,\)"),
        (torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1]), r"n = 4 labels; got shape \(2,\)"),
        (torch.tensor([0, 1]), torch.tensor([[0, 1], [1, 0], [0, 0]]), r"n = 2 labels; got shape \(3, 2\)"),
        (torch.tensor([-1, 0]), torch.tensor([0, 1]), "labels must be non-negative ids; got -1"),
        (torch.tensor([0, 1]), torch.tensor([0, -2]), "clusters must be non-negative ids; got -2"),
        (torch.tensor([0.5, 1.7]), torch.tensor([0, 1]), "labels must be integer ids; got dtype torch.float32"),
        (torch.tensor([True, False]), torch.tensor([0, 1]), "labels must be integer ids; got dtype torch.bool"),
        (torch.tensor([0, 1]), torch.zeros(2, 0, dtype=torch.long), r"one choice per sample; got shape \(2, 0\)"),
    ],
)
def test_mutual_information_refuses_samples_that_are_not_paired_integer_ids(labels, clusters, message):
    with pytest.raises(ValueError, match=message):
        mutual_information(labels, clusters)


def test_mutual_information_refuses_samples_that_are_not_tensors():
    with pytest.raises(TypeError, match="labels must be a tensor of integer ids; got list"):
        mutual_information([0, 1], torch.tensor([0, 1]))


def test_statistics_over_no_tokens_are_refused(tiny_model):
    """Nothing measured is not a perfect perplexity of 1 or a specialisation of 0."""
    model = tiny_model()
    padding_only = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.zeros(1, 2)}
    for batches in ([], [torch.tensor([[5]])], [padding_only]):  # nothing, one-token sequences, only padding
        with pytest.raises(ValueError, match="No token to score"):
            perplexity(model, batches)
    all_padding = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.zeros(1, 2), "label": [0]}
    for batches, label_key in (([all_padding], "label"), ([all_padding], None), ([], None)):  # also the entropies
        with pytest.raises(ValueError, match="no \\(non-padding\\) tokens"):
            specialization_statistics(model, batches, label_key=label_key)


def test_utilization_entropy_of_the_training_counts(tiny_model):
    model = tiny_model()
    model.model.layers[0].mlp.router.expert_token_counts.copy_(torch.tensor([4, 4, 4, 4, 0, 0, 0, 0]))
    model.model.layers[1].mlp.router.expert_token_counts.fill_(3)
    stats = utilization_entropy(model)
    assert stats["layer_0_expert_entropy"] == pytest.approx(math.log(4))
    assert stats["layer_0_expert_entropy_normalized"] == pytest.approx(2 / 3)
    assert stats["layer_0_cluster_entropy"] == 0.0
    assert stats["layer_1_expert_entropy_normalized"] == pytest.approx(1.0)
    assert stats["layer_1_cluster_entropy_normalized"] == pytest.approx(1.0)

    untrained = utilization_entropy(tiny_model())  # nothing counted: not a collapsed router (0)
    assert math.isnan(untrained["layer_0_expert_entropy_normalized"])
    assert math.isnan(untrained["layer_1_cluster_entropy_normalized"])


DOMAIN_A, DOMAIN_B = range(3, 33), range(33, 64)


def domain_routed_model(tiny_model):
    """One MoE layer whose cluster router sends domain-A tokens to cluster 0 and domain-B tokens to cluster 1."""
    model = tiny_model(num_hidden_layers=1)
    direction = torch.nn.functional.normalize(torch.randn(32), dim=0)
    with torch.no_grad():
        embeddings = model.model.embed_tokens.weight
        embeddings[list(DOMAIN_A)] += direction
        embeddings[list(DOMAIN_B)] -= direction
        router = model.model.layers[0].mlp.router
        router.cluster_weight.copy_(torch.stack([direction, -direction]) * 10)
    return model


def domain_batches(generator, label_of, num_batches=4):
    batches = []
    for _ in range(num_batches):
        domains = torch.randint(0, 2, (4,), generator=generator)
        low = torch.where(domains == 0, DOMAIN_A.start, DOMAIN_B.start)
        input_ids = low[:, None] + torch.randint(0, 30, (4, 10), generator=generator)
        batches.append({"input_ids": input_ids, "label": [label_of(int(domain)) for domain in domains]})
    return batches


def test_specialisation_is_high_when_clusters_follow_the_label_and_zero_when_they_ignore_it(tiny_model):
    model = domain_routed_model(tiny_model).train()
    generator = torch.Generator().manual_seed(0)

    stats = specialization_statistics(model, domain_batches(generator, lambda domain: ["law", "code"][domain]))
    assert stats["layer_0_specialization"] == pytest.approx(1.0)
    assert stats["layer_0_mutual_information"] == pytest.approx(stats["label_entropy"])
    assert stats["specialization"] == stats["layer_0_specialization"]

    # A label drawn independently of the text: the clusters carry no information about it.
    coin = torch.Generator().manual_seed(1)
    noise = domain_batches(generator, lambda domain: int(torch.randint(0, 2, (), generator=coin)), num_batches=40)
    assert specialization_statistics(model, noise)["layer_0_specialization"] < 0.02

    # Evaluation only: the training state and mode are left as they were.
    assert model.training and model.model.layers[0].mlp.router.expert_token_counts.sum() == 0


def test_per_token_labels_padding_and_entropies_on_the_data(tiny_model):
    model = domain_routed_model(tiny_model)
    input_ids = torch.tensor([list(DOMAIN_A[:6]) + list(DOMAIN_B[:6])] * 2)
    labels = torch.tensor([[0] * 6 + [1] * 6] * 2)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :6] = 0  # padding, with label 0: must not count
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "domain": labels}
    stats = specialization_statistics(model, [batch], label_key="domain")

    # 18 real tokens: 6 of label 0 (cluster 0), 12 of label 1 (cluster 1).
    assert stats["label_entropy"] == pytest.approx(entropy(torch.tensor([6.0, 12.0])))
    assert stats["layer_0_specialization"] == pytest.approx(1.0)
    assert stats["layer_0_cluster_entropy"] == pytest.approx(stats["label_entropy"])
    assert stats["layer_0_expert_entropy"] <= math.log(8)

    only_entropies = specialization_statistics(model, [batch], label_key=None)
    assert set(only_entropies) == {
        "layer_0_expert_entropy", "layer_0_expert_entropy_normalized",
        "layer_0_cluster_entropy", "layer_0_cluster_entropy_normalized",
    }  # fmt: skip
    assert only_entropies["layer_0_cluster_entropy"] == stats["layer_0_cluster_entropy"]


def test_padding_tokens_may_carry_ignored_labels_and_real_ones_may_not(tiny_model):
    model = domain_routed_model(tiny_model)
    input_ids = torch.tensor([list(DOMAIN_A[:6]) + list(DOMAIN_B[:6])] * 2)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :6] = 0
    labels = torch.tensor([[0] * 6 + [1] * 6] * 2)
    expected = specialization_statistics(model, [{"input_ids": input_ids, "attention_mask": attention_mask,
                                                  "domain": labels}], label_key="domain")  # fmt: skip
    ignored = labels.masked_fill(attention_mask == 0, -100)  # as a data collator pads labels
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "domain": ignored}
    assert specialization_statistics(model, [batch], label_key="domain") == expected
    batch["domain"] = ignored.masked_fill((attention_mask == 1) & (labels == 1), -100)
    with pytest.raises(ValueError, match="padding tokens may have any\\); got -100 at a non-padding token"):
        specialization_statistics(model, [batch], label_key="domain")


def test_labels_must_match_the_batch(tiny_model):
    model = tiny_model()
    batch = {"input_ids": torch.randint(3, 64, (2, 5)), "label": torch.tensor([0, 1, 1])}
    with pytest.raises(ValueError, match="Labels"):
        specialization_statistics(model, [batch])


@pytest.mark.parametrize(
    "labels, error, message",
    [
        ("wiki", TypeError, "Labels are one per sequence .* got a str"),  # not the labels "w", "i", "k", "i"
        ({0: "law", 1: "code"}, TypeError, "Labels are one per sequence .* got a dict"),
        (torch.tensor([0.5, 1.7]), ValueError, "Labels must be integers; got a tensor of dtype torch.float32"),
    ],
)
def test_labels_are_a_sequence_or_tensor_of_integer_ids(tiny_model, labels, error, message):
    batch = {"input_ids": torch.randint(3, 64, (2, 5)), "label": labels}
    with pytest.raises(error, match=message):
        specialization_statistics(tiny_model(), [batch])


def test_per_sequence_labels_as_one_element_tensors_are_read_by_value(tiny_model):
    """`list(labels)` or a collate that keeps each example's `torch.tensor(label)`: equal labels are one label, not
    one per tensor object (tensors hash by identity)."""
    model = tiny_model()
    input_ids = torch.randint(3, 64, (4, 6))
    labels = torch.tensor([0, 0, 1, 1])
    expected = specialization_statistics(model, [{"input_ids": input_ids, "label": labels}])
    assert specialization_statistics(model, [{"input_ids": input_ids, "label": list(labels)}]) == expected
    one_element = [label.reshape(1) for label in labels]  # e.g. `torch.tensor([label])` per example
    assert specialization_statistics(model, [{"input_ids": input_ids, "label": one_element}]) == expected
    assert expected["label_entropy"] == pytest.approx(math.log(2))
    with pytest.raises(TypeError, match="A per-sequence label must be one value; got a Tensor of 2 values"):
        specialization_statistics(model, [{"input_ids": input_ids, "label": [torch.tensor([0, 1])] * 4}])



def test_a_label_is_one_label_whether_a_batch_gives_it_as_a_list_or_as_a_tensor(tiny_model):
    """Lists are numbered in order of first appearance (here 1 first): a tensor's 1 in the next batch is that label,
    not the id the list's 0 got."""
    model = tiny_model()
    input_ids = torch.randint(3, 64, (2, 2, 6), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": input_ids[0], "label": [1, 0]}, {"input_ids": input_ids[1], "label": [1, 0]}]
    expected = specialization_statistics(model, batches)
    mixed = [batches[0], {"input_ids": input_ids[1], "label": torch.tensor([1, 0])}]
    assert specialization_statistics(model, mixed) == pytest.approx(expected)
    per_token = [batches[0], {"input_ids": input_ids[1], "label": torch.tensor([[1] * 6, [0] * 6])}]
    assert specialization_statistics(model, per_token) == pytest.approx(expected)


def test_per_token_labels_as_nested_lists_are_refused_by_name(tiny_model):
    batch = {"input_ids": torch.randint(3, 64, (2, 3)), "label": [[0, 1, 1], [1, 0, 0]]}
    with pytest.raises(TypeError, match="must be hashable .* got a list. Per-token labels are one .* tensor"):
        specialization_statistics(tiny_model(), [batch])


def test_sparse_label_ids_specialise_as_dense_ones(tiny_model):
    """Per-sequence document ids are names, not histogram sizes."""
    model = tiny_model()
    input_ids = torch.randint(3, 64, (3, 6))
    dense = specialization_statistics(model, [{"input_ids": input_ids, "label": torch.tensor([0, 1, 1])}])
    sparse = specialization_statistics(model, [{"input_ids": input_ids, "label": torch.tensor([0, 10**12, 10**12])}])
    assert sparse == pytest.approx(dense)


def test_statistics_take_one_batch_as_a_list_of_one(tiny_model):
    """As `prune_experts(calibration_data=...)`: a tokenizer's output or an input_ids tensor is one batch."""
    from transformers import BatchEncoding

    model = tiny_model()
    input_ids = torch.randint(3, 64, (4, 6))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    encoding = BatchEncoding({"input_ids": input_ids, "attention_mask": attention_mask})
    assert perplexity(model, encoding) == pytest.approx(perplexity(model, [encoding]))
    assert perplexity(model, input_ids) == pytest.approx(perplexity(model, [input_ids]))
    assert specialization_statistics(model, input_ids, label_key=None) == pytest.approx(
        specialization_statistics(model, [input_ids], label_key=None)
    )
    labelled = {"input_ids": input_ids, "attention_mask": attention_mask, "label": ["law", "law", "code", "code"]}
    assert specialization_statistics(model, labelled) == pytest.approx(specialization_statistics(model, [labelled]))


def test_statistics_of_input_ids_without_labels_need_label_key_none(tiny_model):
    with pytest.raises(ValueError, match="A batch has no 'label' labels; pass label_key=None"):
        specialization_statistics(tiny_model(), torch.randint(3, 64, (2, 5)))


def entropies_only(model, batches):
    return specialization_statistics(model, batches, label_key=None)


@pytest.mark.parametrize("statistic", [perplexity, entropies_only])
@pytest.mark.parametrize(
    "batches, error, message",
    [
        ([torch.arange(3, 9)], ValueError, r"input_ids must be \(batch, seq\); got shape \(6,\)"),
        (torch.arange(3, 9), ValueError, r"input_ids must be \(batch, seq\); got shape \(6,\)"),
        ([[[3, 4, 5]]], TypeError, "batches must be an iterable of input_ids tensors .* got a batch of list"),
        (5, TypeError, r"batches must be an iterable of batches, or one batch .*; got a int"),
        ([{"ids": torch.ones(2, 3, dtype=torch.long)}], TypeError, r"got a batch of dict with keys \['ids'\]"),
        (
            [{"input_ids": torch.ones(4, 6, dtype=torch.long), "attention_mask": torch.ones(4, 3)}],
            ValueError,
            r"attention_mask must have the shape of input_ids \(4, 6\); got \(4, 3\)",
        ),
        (
            [{"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": [[1, 1, 1]] * 2}],
            TypeError,
            "attention_mask must be a tensor; got list",
        ),
    ],
)
def test_statistics_refuse_batches_that_are_not_2d_input_ids_with_a_matching_mask(
    tiny_model, statistic, batches, error, message
):
    with pytest.raises(error, match=message):
        statistic(tiny_model(), batches)


def test_specialisation_statistics_of_a_model_wrapped_by_peft(tiny_model):
    from peft import get_peft_model

    from clustermoe_hf.training import lora_config

    model = tiny_model()
    batches = [{"input_ids": torch.randint(3, 64, (2, 8)), "label": torch.tensor([0, 1])}]
    expected = specialization_statistics(model, batches, label_key="label")
    wrapped = get_peft_model(model, lora_config(rank=2))  # adapters start as a no-op
    assert specialization_statistics(wrapped, batches, label_key="label") == pytest.approx(expected)



def test_statistics_and_calibrated_pruning_of_a_model_whose_config_asks_for_tuples(tiny_model):
    """`return_dict=False` in the config makes outputs tuples; the statistics read the model's outputs by name."""
    model = tiny_model()
    batches = [{"input_ids": torch.randint(3, 64, (2, 8)), "label": torch.tensor([0, 1])}]
    expected = specialization_statistics(model, batches, label_key="label")
    expected_perplexity = perplexity(model, batches)
    model.config.return_dict = False
    assert specialization_statistics(model, batches, label_key="label") == pytest.approx(expected)
    assert perplexity(model, batches) == pytest.approx(expected_perplexity)
    assert len(model.prune_experts(experts_per_cluster_keep=2, calibration_data=[batches[0]["input_ids"]])[0]) == 4


def test_a_single_cluster_counts_as_evenly_used(tiny_model):
    """The normalised entropy of one cluster is 1 (even use), not 0, which would read as a collapsed router."""
    model = tiny_model(num_clusters=1, experts_per_cluster=4)
    for _, block in model._moe_layers():
        block.router.expert_token_counts.copy_(torch.tensor([1, 2, 3, 4]))
    stats = utilization_entropy(model)
    assert stats["layer_0_cluster_entropy"] == 0.0 and stats["layer_0_cluster_entropy_normalized"] == 1.0


def test_specialization_is_the_mean_over_the_moe_layers(tiny_model):
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 64, (4, 8), generator=generator), "label": torch.tensor([0, 1, 0, 1])}]
    stats = specialization_statistics(tiny_model(), batches)
    layers = [stats["layer_0_specialization"], stats["layer_1_specialization"]]
    assert layers[0] != pytest.approx(layers[1])  # else a mean could not be told from one layer's score
    assert stats["specialization"] == pytest.approx(sum(layers) / 2)


def test_statistics_leave_the_model_as_they_found_it(tiny_model):
    """An eval model stays in eval mode, a training one keeps each module's mode, and the routers keep only their own
    hooks."""
    model = tiny_model()  # eval mode
    routers = [block.router for _, block in model._moe_layers()]
    hooks = [len(router._forward_hooks) for router in routers]
    batch = {"input_ids": torch.randint(3, 64, (2, 6)), "label": [0, 1]}
    specialization_statistics(model, [batch])
    perplexity(model, [batch["input_ids"]])
    assert not any(module.training for module in model.modules())
    assert [len(router._forward_hooks) for router in routers] == hooks

    # A training model with a part the caller keeps in eval mode (e.g. frozen): every module keeps its own mode.
    model.train()
    model.model.layers[0].eval()
    modes = {name: module.training for name, module in model.named_modules()}
    specialization_statistics(model, [batch])
    perplexity(model, [batch["input_ids"]])
    model.prune_experts(experts_per_cluster_keep=3, calibration_data=[batch["input_ids"]], rank_by="utilization")
    assert {name: module.training for name, module in model.named_modules()} == modes


def test_statistics_run_in_eval_mode_whatever_the_models_mode(tiny_model):
    """With router jitter, a training-mode forward routes with noise: the statistics, perplexity and pruning's
    calibration must give the same results from a model in training mode as in eval mode."""
    model = tiny_model(router_jitter_noise=0.5)
    ids = torch.randint(3, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "label": [0, 1, 0, 1]}
    results = []
    for training in (False, True):
        model.train(training)
        torch.manual_seed(0)
        counts = model._calibration_counts([batch["input_ids"]])
        results.append((specialization_statistics(model, [batch]), perplexity(model, [batch["input_ids"]]), counts))
    (stats, ppl, counts), (train_stats, train_ppl, train_counts) = results
    assert train_stats == stats and train_ppl == ppl
    assert all(torch.equal(a, b) for a, b in zip(train_counts, counts))


def test_perplexity_over_several_batches_is_per_token_over_all_of_them(tiny_model):
    model = tiny_model()
    first, second = torch.randint(3, 64, (2, 8)), torch.randint(3, 64, (3, 8))
    assert perplexity(model, [first, second]) == pytest.approx(perplexity(model, torch.cat([first, second])), rel=1e-5)


def test_perplexity_of_a_diverged_model_is_infinite(tiny_model):
    """Not an OverflowError from exp, as the Trainer's perplexity metric."""
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(1e6)  # cross-entropy far above log(float max) = 709.8
    assert perplexity(model, torch.randint(3, 64, (2, 8))) == math.inf


@pytest.mark.parametrize(
    "model_class", [ClusterMoEModel, ClusterMoEForSequenceClassification, ClusterMoEForTokenClassification]
)
def test_perplexity_needs_a_causal_lm(tiny_config, model_class):
    """The base model has no logits, a sequence classifier's are per sequence, a token classifier's per token but of
    labels (here as many as tokens, so that they have the causal LM's shape): none predicts the next token."""
    model = model_class(tiny_config(num_labels=64)).eval()
    with pytest.raises(ValueError, match=f"perplexity needs a causal LM .* {model_class.__name__} gives"):
        perplexity(model, torch.randint(3, 64, (2, 8)))


def test_statistics_of_a_model_without_moe_layers_are_refused(tiny_model):
    """Not a specialisation of 0, which would read as clusters that ignore the label."""
    model = tiny_model(first_k_dense_layers=2)
    batch = {"input_ids": torch.randint(3, 64, (2, 5)), "label": [0, 1]}
    with pytest.raises(ValueError, match="The model has no MoE layers"):
        specialization_statistics(model, [batch])
