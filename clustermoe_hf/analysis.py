"""Specialisation statistics for ClusterMoE models.

How evenly a model uses its experts and clusters (utilisation entropy), and how much its cluster choices tell about
a label the user supplies per sequence or per token, e.g. the source document or domain (mutual information). The
helpers work on any ClusterMoE model, including one loaded with `trust_remote_code=True`.
"""

import math
import sys
from collections.abc import Hashable, Iterable, Mapping, Sequence

import torch

from .modeling_clustermoe import _batches, _in_eval_mode


def _check_counts(name: str, counts: torch.Tensor) -> None:
    """Raise unless all `counts` are finite and non-negative: NaN passes a `< 0` test and would spread into the
    result."""
    if not isinstance(counts, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of counts; got a {type(counts).__name__}.")
    values = counts.double()
    if not torch.isfinite(values).all():
        raise ValueError(f"{name} must be finite; got {values[~torch.isfinite(values)].flatten()[0].item()}.")
    if (values < 0).any():
        raise ValueError(f"{name} must be non-negative; got a count of {values.min().item()}.")


def entropy(counts: torch.Tensor) -> float:
    """Shannon entropy (nats) of the distribution proportional to the non-negative, finite `counts`; 0 for all
    zeros."""
    _check_counts("counts", counts)
    probs = counts.double().flatten()
    total = probs.sum()
    if total <= 0:
        return 0.0
    probs = probs[probs > 0] / total
    return float(-(probs * probs.log()).sum())


def _check_ids(name: str, ids) -> None:
    """Raise unless `ids` is a tensor of non-negative integers: floats would be truncated, bools are not ids."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of integer ids; got {type(ids).__name__}.")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be integer ids; got dtype {ids.dtype}.")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"{name} must be non-negative ids; got {int(ids.min())}.")


def mutual_information(labels: torch.Tensor, clusters: torch.Tensor) -> float:
    """Mutual information I(label; cluster) in nats between paired integer samples.

    labels: (n,). clusters: (n,), or (n, k) when each sample chose k clusters; each choice then counts 1/k, so every
    sample weighs the same. Only which samples share an id matters, so ids may be sparse (e.g. document ids): they
    are renumbered densely, and the memory used grows with n, not with the largest id.
    """
    _check_ids("labels", labels)
    _check_ids("clusters", clusters)
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D, one per sample; got shape {tuple(labels.shape)}.")
    if clusters.dim() not in (1, 2) or clusters.shape[0] != labels.shape[0]:
        raise ValueError(
            f"clusters must be (n,) or (n, k) for the n = {labels.shape[0]} labels; got shape {tuple(clusters.shape)}."
        )
    if labels.numel() == 0:
        return 0.0
    if clusters.dim() == 2 and clusters.shape[1] == 0:
        raise ValueError(f"clusters must hold at least one choice per sample; got shape {tuple(clusters.shape)}.")
    label_ids = torch.unique(labels, return_inverse=True)[1]
    cluster_ids = torch.unique(clusters.reshape(labels.shape[0], -1), return_inverse=True)[1]
    num_clusters = int(cluster_ids.max()) + 1
    joint_ids = (label_ids[:, None] * num_clusters + cluster_ids).flatten()
    # Every sample contributes k choices: the 1/k weight scales all three histograms alike, so entropy ignores it.
    joint = torch.unique(joint_ids, return_counts=True)[1]
    return entropy(torch.bincount(label_ids)) + entropy(torch.bincount(cluster_ids.flatten())) - entropy(joint)


def _utilization_entropies(prefix: str, expert_counts: torch.Tensor, num_clusters: int) -> dict[str, float]:
    """Entropy (nats) of the expert and of the cluster utilisation, and each divided by its maximum (1 = even); the
    latter NaN while nothing was counted (0 would read as a collapsed router)."""
    cluster_counts = expert_counts.view(num_clusters, -1).sum(-1)
    stats = {}
    for level, counts in (("expert", expert_counts), ("cluster", cluster_counts)):
        value = entropy(counts)
        stats[f"{prefix}_{level}_entropy"] = value
        normalized = value / math.log(counts.numel()) if counts.numel() > 1 else 1.0
        stats[f"{prefix}_{level}_entropy_normalized"] = normalized if counts.sum() > 0 else math.nan
    return stats


def utilization_entropy(model) -> dict[str, float]:
    """Per MoE layer, `layer_{l}_{expert,cluster}_entropy[_normalized]` of the utilisation accumulated in training."""
    stats = {}
    for layer_idx, block in model._moe_layers():
        counts = block.router.expert_token_counts
        stats.update(_utilization_entropies(f"layer_{layer_idx}", counts, block.num_clusters))
    return stats


def _hashable_label(label) -> Hashable:
    """A per-sequence label as a dictionary key: tensors and NumPy arrays of one value (0-d or not) by that value
    (tensors hash by identity, so equal labels would count as different ones)."""
    if hasattr(label, "item") and getattr(label, "size", None) is not None:
        size = label.numel() if isinstance(label, torch.Tensor) else label.size
        if size != 1:
            raise TypeError(f"A per-sequence label must be one value; got a {type(label).__name__} of {size} values.")
        return label.item()
    if not isinstance(label, Hashable):
        raise TypeError(
            f"A per-sequence label must be hashable (a name or a number); got a {type(label).__name__}. Per-token "
            "labels are one (batch, sequence_length) tensor."
        )
    return label


def _label_ids(labels, shape: torch.Size, vocabulary: dict[Hashable, int], token_mask) -> torch.Tensor:
    """Integer label per token, (batch, seq): from a per-token tensor, a per-sequence tensor, or a per-sequence list
    of hashable labels (e.g. domain names). Every label is numbered through `vocabulary`, in order of first
    appearance, so that a label given as a list in one batch and as a tensor in another gets one id. Padding tokens
    (False in `token_mask`, (batch * seq,) or None) may carry any label, e.g. -100: they are not counted."""
    if isinstance(labels, (str, bytes, Mapping)):  # would be read as one label per character / key
        raise TypeError(
            f"Labels are one per sequence (a list/tuple or tensor) or per token (a tensor); got a "
            f"{type(labels).__name__}. For one label for the whole batch, repeat it: [label] * batch_size."
        )
    if isinstance(labels, torch.Tensor) and (labels.dtype.is_floating_point or labels.dtype.is_complex):
        raise ValueError(f"Labels must be integers; got a tensor of dtype {labels.dtype}.")
    numbered = not isinstance(labels, torch.Tensor)
    if numbered:
        labels = torch.tensor([vocabulary.setdefault(_hashable_label(label), len(vocabulary)) for label in labels])
    labels = labels.long()
    if labels.shape not in (shape, shape[:1]):
        raise ValueError(
            f"Labels are one per sequence or per token of the {tuple(shape)} batch; got shape {tuple(labels.shape)}."
        )
    labels = labels[:, None].expand(shape) if labels.dim() == 1 else labels
    counted = labels.reshape(-1) if token_mask is None else labels.reshape(-1)[token_mask.to(labels.device)]
    if (counted < 0).any():
        raise ValueError(
            f"Labels must be non-negative integers (padding tokens may have any); got {int(counted.min())} at a "
            "non-padding token."
        )
    if numbered:
        return labels
    values, value_index = torch.unique(labels, return_inverse=True)
    ids = torch.tensor([vocabulary.setdefault(value, len(vocabulary)) for value in values.tolist()])
    return ids.to(labels.device)[value_index]


@torch.no_grad()
def specialization_statistics(
    model,
    batches: Iterable[dict[str, torch.Tensor | Sequence[Hashable]]] | dict[str, torch.Tensor | Sequence[Hashable]],
    label_key: str | None = "label",
) -> dict[str, float]:
    """Routing statistics of `model` (in eval mode, without touching its training state) over `batches` (or one batch).

    Each batch is a dict with `input_ids` (batch, seq), optionally `attention_mask` (padding is ignored) and, under
    `label_key`, a label per sequence (tensor or list of hashables) or per token (tensor); without `label_key`, a
    batch may also be an `input_ids` tensor. Returns, per MoE layer `l`:

    - `layer_{l}_{expert,cluster}_entropy` and `..._entropy_normalized`: utilisation entropy on this data;
    - `layer_{l}_mutual_information`: I(label; chosen cluster) in nats;
    - `layer_{l}_specialization`: that mutual information divided by H(label), in [0, 1]: the share of the label's
      uncertainty that the layer's cluster choice removes (0: clusters ignore the label, 1: they determine it);

    plus `label_entropy` and `specialization`, the mean over MoE layers. Without `label_key`, only the entropies.
    """
    layers = model._moe_layers()
    if not layers:
        raise ValueError("The model has no MoE layers: no routing to measure.")
    # The base model, whose outputs carry the routing statistics, also inside a wrapper (peft's PeftModel forwards
    # `model.model` to the causal LM). Found by what it has: a model loaded from a checkpoint's code has other classes.
    base = next(module for module in model.modules() if hasattr(module, "routing_state") and hasattr(module, "layers"))
    expert_counts = [torch.zeros_like(block.router.expert_token_counts) for _, block in layers]
    cluster_choices = [[] for _ in layers]  # per layer, (valid tokens, top_k_clusters) chunks
    labels, vocabulary, token_mask = [], {}, None

    def record_choices(row):
        def hook(module, args, output):
            cluster_index = output.cluster_index  # (tokens, top_k_clusters)
            selected = cluster_index if token_mask is None else cluster_index[token_mask.to(cluster_index.device)]
            cluster_choices[row].append(selected.to(model.device))  # layers may sit on other devices

        return hook

    handles = [block.router.register_forward_hook(record_choices(row)) for row, (_, block) in enumerate(layers)]
    with _in_eval_mode(model):
        try:
            for batch in _batches(batches, "batches"):
                if label_key is not None and label_key not in batch:
                    raise ValueError(
                        f"A batch has no {label_key!r} labels; pass label_key=None for the entropies only."
                    )
                input_ids = batch["input_ids"].to(model.device)
                attention_mask = batch.get("attention_mask")
                if attention_mask is not None:
                    attention_mask = attention_mask.to(model.device)
                token_mask = None if attention_mask is None else attention_mask.bool().reshape(-1)
                outputs = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True)
                for counts, layer_stats in zip(expert_counts, outputs.routing_stats):
                    counts += layer_stats["expert_counts"]
                if label_key is not None:
                    token_labels = _label_ids(batch[label_key], input_ids.shape, vocabulary, token_mask)
                    token_labels = token_labels.to(model.device).reshape(-1)
                    labels.append(token_labels if token_mask is None else token_labels[token_mask])
        finally:
            for handle in handles:
                handle.remove()

    if not sum(counts.sum() for counts in expert_counts):
        raise ValueError("`batches` has no (non-padding) tokens: there is nothing to measure the specialisation on.")
    stats = {}
    for (layer_idx, block), counts in zip(layers, expert_counts):
        stats.update(_utilization_entropies(f"layer_{layer_idx}", counts, block.num_clusters))
    if label_key is None:
        return stats
    labels = torch.cat(labels)
    label_entropy = entropy(torch.unique(labels, return_counts=True)[1])  # not bincount: ids may be sparse
    stats["label_entropy"] = label_entropy
    scores = []
    for (layer_idx, _), choices in zip(layers, cluster_choices):
        information = mutual_information(labels, torch.cat(choices))
        stats[f"layer_{layer_idx}_mutual_information"] = information
        scores.append(information / label_entropy if label_entropy > 0 else 0.0)
        stats[f"layer_{layer_idx}_specialization"] = scores[-1]
    stats["specialization"] = sum(scores) / len(scores)
    return stats


@torch.no_grad()
def perplexity(
    model, batches: Iterable[torch.Tensor | dict[str, torch.Tensor]] | torch.Tensor | dict[str, torch.Tensor]
) -> float:
    """Token-level perplexity of a causal LM over `batches` (`input_ids` tensors, or dicts with `input_ids` and
    optionally `attention_mask`; padding is not scored) or over one such batch, in eval mode. Raises if no token was
    scored."""
    # A token classifier's logits have the causal LM's shape (with as many labels as tokens, even its size).
    output_embeddings = getattr(model, "get_output_embeddings", None)
    if output_embeddings is None or output_embeddings() is None:
        raise ValueError(
            f"perplexity needs a causal LM (e.g. ClusterMoEForCausalLM), whose outputs are next-token logits per "
            f"position; {type(model).__name__} gives none (it has no language-model head)."
        )
    total_loss, total_tokens = 0.0, 0
    with _in_eval_mode(model):
        for batch in _batches(batches, "batches"):
            input_ids = batch["input_ids"].to(model.device)
            attention_mask = batch.get("attention_mask")
            shift_labels = input_ids[:, 1:].clone()  # the token each position predicts
            if attention_mask is not None:
                attention_mask = attention_mask.to(model.device)
                # Padding is neither predicted nor predicts (the first real token of a left-padded row would be)
                shift_labels[(attention_mask[:, 1:] == 0) | (attention_mask[:, :-1] == 0)] = -100
            # Scored here rather than with `labels=`: the model's loss also includes the router losses.
            output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True)
            logits = getattr(output, "logits", None)
            if logits is None or logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
                raise ValueError(
                    f"perplexity needs a causal LM (e.g. ClusterMoEForCausalLM), whose outputs are next-token logits "
                    f"per position; {type(model).__name__} gives "
                    f"{'none' if logits is None else f'logits of shape {tuple(logits.shape)}'}."
                )
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), shift_labels.flatten().to(logits.device), ignore_index=-100,
                reduction="sum",
            )  # fmt: skip
            total_loss += float(nll)
            total_tokens += int((shift_labels != -100).sum())
    if total_tokens == 0:
        raise ValueError("No token to score: `batches` is empty, all padding, or of sequences of one token.")
    cross_entropy = total_loss / total_tokens
    return math.inf if cross_entropy > math.log(sys.float_info.max) else math.exp(cross_entropy)  # a diverged model


__all__ = ["entropy", "mutual_information", "perplexity", "specialization_statistics", "utilization_entropy"]
