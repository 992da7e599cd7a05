#!/usr/bin/env python
# Copyright 2026 The ClusterMoE authors. Licensed under the Apache License, Version 2.0.
"""Generate text with a ClusterMoE model, streaming it to the terminal.

    python examples/generate.py --model_name_or_path clustermoe-shakespeare --prompt $'**ROMEO**\\n' $'**JULIET**\\n'

The model is a folder written by run_clm.py or a Hub id. Sampling settings default to the model's
generation_config.json; every option given here overrides it. See `--help` for all options.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    HfArgumentParser,
    TextStreamer,
    set_seed,
)
from transformers.utils import GENERATION_CONFIG_NAME

try:
    import clustermoe_hf  # noqa: F401  (registers "clustermoe" with the Auto classes when the package is installed)
except ImportError:  # then the model's own code is used, with --trust_remote_code
    pass


# New tokens per prompt where neither --max_new_tokens nor the model's generation_config sets them.
DEFAULT_MAX_NEW_TOKENS = 100


@dataclass
class GenerationArguments:
    model_name_or_path: str = field(metadata={"help": "A model folder written by run_clm.py, or a Hub id."})
    prompt: list[str] = field(
        metadata={
            "help": "One or more prompts, each continued separately (--prompt may also be repeated). In bash, $'...' "
            "quotes turn \\n into newlines.",
            "action": "extend",
        },
    )
    max_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": f"Tokens to generate per prompt. Default: the model's (run_clm.py saves 100, or half the context "
            f"if that is shorter), else {DEFAULT_MAX_NEW_TOKENS}."
        },
    )
    do_sample: bool | None = field(
        default=None, metadata={"help": "Sample (true) or decode greedily (false). Default: the model's setting."}
    )
    temperature: float | None = field(
        default=None, metadata={"help": "Sampling temperature; lower is more conservative. Default: the model's."}
    )
    top_k: int | None = field(
        default=None, metadata={"help": "Sample only among the k most likely tokens. Default: the model's."}
    )
    top_p: float | None = field(
        default=None,
        metadata={
            "help": "Sample only among the most likely tokens whose probabilities sum to p. Default: the model's."
        },
    )
    repetition_penalty: float | None = field(
        default=None,
        metadata={
            "help": "Penalty for repeating tokens already in the text: > 1 discourages, < 1 encourages, 1 is none. "
            "Default: the model's."
        },
    )
    num_return_sequences: int = field(
        default=1, metadata={"help": "Continuations per prompt; more than one is printed at the end, not streamed."}
    )
    seed: int = field(default=42, metadata={"help": "Random seed, for reproducible samples (0 to 2**32 - 1)."})
    device: str | None = field(
        default=None, metadata={"help": "Device to run on (cpu, cuda, cuda:1, mps, ...). Default: cuda if available."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Allow running the modeling code stored with the model; needed when clustermoe_hf is not "
            "installed. When it is installed, its classes are used and the stored code is not run."
        },
    )

    def __post_init__(self):
        def finite_and_positive(value: float) -> bool:
            return math.isfinite(value) and value > 0

        # Out-of-range values would otherwise be ignored or fail deep inside `generate` (e.g. 0 sequences gives one).
        ranges = {
            "max_new_tokens": (lambda value: value >= 1, "at least 1"),
            "num_return_sequences": (lambda value: value >= 1, "at least 1"),
            # inf would sample uniformly from the vocabulary, without a word
            "temperature": (finite_and_positive, "finite and > 0 (use --do_sample false for greedy decoding)"),
            "top_k": (lambda value: value >= 0, ">= 0 (0 disables it)"),
            "top_p": (lambda value: 0 < value <= 1, "in (0, 1]"),
            "repetition_penalty": (finite_and_positive, "finite and > 0 (1 is no penalty)"),
            "seed": (lambda value: 0 <= value < 2**32, "in [0, 2**32)"),
        }
        for name, (valid, expected) in ranges.items():
            value = getattr(self, name)
            if value is not None and not valid(value):
                raise ValueError(f"--{name} must be {expected}, got {value}.")
        if self.device is not None:  # checked before the model is loaded, which would take the time first
            try:
                device = torch.device(self.device)
            except RuntimeError:
                raise ValueError(
                    f"--device {self.device!r} is no device torch knows (cpu, cuda, cuda:1, mps, ...)."
                ) from None
            backend = getattr(torch, device.type, None)
            if device.type != "cpu" and not (backend is not None and backend.is_available()):
                raise ValueError(f"--device {self.device}: this torch build has no {device.type} device available.")
        empty = [index for index, prompt in enumerate(self.prompt) if not prompt]
        if empty:  # the model needs at least one token to continue
            raise ValueError(f"--prompt: prompt {empty[0] + 1} is empty; give each prompt some text to continue.")
        # A mistyped folder would otherwise fail as a malformed Hub id ('Repo id must be in the form ...').
        name = self.model_name_or_path
        folder = Path(name)
        if folder.is_file():
            raise FileNotFoundError(f"--model_name_or_path {name} is a file; pass the model's folder.")
        if folder.is_dir() and not (folder / "config.json").is_file():
            adapters = (folder / "adapter_config.json").is_file()
            raise FileNotFoundError(
                f"--model_name_or_path {name} holds no model (config.json)"
                + (": it holds LoRA adapters (e.g. a training checkpoint). Generate with a model that has them merged: "
                   "run_clm.py saves one in its output folder, and peft's merge_and_unload() makes one."
                   if adapters else ".")
            )
        if not folder.exists():
            try:
                validate_repo_id(name)
            except HFValidationError:
                raise FileNotFoundError(f"--model_name_or_path {name}: no such folder (and not a Hub id).") from None


def main(args: list[str] | None = None) -> list[str]:
    """Print and return the generated texts (prompt included), in prompt order."""
    (generation_args,) = HfArgumentParser(GenerationArguments).parse_args_into_dataclasses(args=args)
    device = generation_args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # The config first: a folder that holds no ClusterMoE model is reported as such, not as a tokenizer problem.
    config = AutoConfig.from_pretrained(
        generation_args.model_name_or_path, trust_remote_code=generation_args.trust_remote_code
    )
    if config.model_type != "clustermoe":
        raise ValueError(
            f"--model_name_or_path {generation_args.model_name_or_path} holds a {config.model_type!r} model, "
            "not a ClusterMoE model."
        )
    folder = Path(generation_args.model_name_or_path)
    if folder.is_dir() and not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(
            f"--model_name_or_path {folder} holds a model but no tokenizer (tokenizer.json): run_clm.py saves it "
            "with the model; copy it there from the run that trained the model."
        )
    try:  # (this script runs without clustermoe_hf too: not its `load_saved_tokenizer`)
        tokenizer = AutoTokenizer.from_pretrained(
            generation_args.model_name_or_path, trust_remote_code=generation_args.trust_remote_code
        )
    except (OSError, ValueError) as error:  # a missing tokenizer.json, a truncated file (a JSONDecodeError)
        raise ValueError(
            f"--model_name_or_path {folder}: its tokenizer cannot be loaded ({type(error).__name__}: {error}). "
            "run_clm.py saves it as tokenizer.json and tokenizer_config.json next to the model: check those files, "
            "or copy them from the run that trained the model."
        ) from error
    # A generation config that cannot be read would be skipped with a log line, and the model would decode with
    # transformers' defaults instead of its own settings.
    if (folder / GENERATION_CONFIG_NAME).is_file():
        try:
            GenerationConfig.from_pretrained(folder)
        except (OSError, ValueError) as error:  # a JSONDecodeError is a ValueError
            raise ValueError(
                f"--model_name_or_path {folder}: its {GENERATION_CONFIG_NAME} cannot be read ({error}); fix or delete "
                "it (without it the model decodes with transformers' defaults)."
            ) from error
    # safetensors' own error for a damaged weights file ("Error while deserializing header") names no file.
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else ():
        try:
            with safe_open(path, framework="pt"):
                pass
        except Exception as error:  # noqa: BLE001 - safetensors raises several types for unreadable files
            raise ValueError(
                f"--model_name_or_path {folder}: {path.name} is not a readable safetensors file (truncated or "
                f"corrupted?): {error}"
            ) from error
    model = AutoModelForCausalLM.from_pretrained(
        generation_args.model_name_or_path, config=config, trust_remote_code=generation_args.trust_remote_code
    ).to(device)
    model.eval()
    overrides = {
        name: getattr(generation_args, name)
        for name in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
        if getattr(generation_args, name) is not None
    }
    # Beam search (the model's generation_config) returns at most num_beams continuations, greedy decoding one: say
    # so before generating anything.
    sampling = overrides.get("do_sample", model.generation_config.do_sample)
    beams = model.generation_config.num_beams or 1
    wanted = generation_args.num_return_sequences
    if beams > 1 and wanted > beams:
        raise ValueError(f"--num_return_sequences {wanted}: the model's beam search returns at most {beams}.")
    if beams == 1 and not sampling and wanted > 1:
        raise ValueError(
            f"--num_return_sequences {wanted}: greedy decoding (--do_sample false, or the model's generation_config) "
            "gives one continuation per prompt; pass --do_sample true."
        )
    # Positions past the model's context were never trained (run_clm.py refuses a longer --block_size): refused before
    # anything is generated.
    wanted_tokens = next(
        count
        for count in (generation_args.max_new_tokens, model.generation_config.max_new_tokens, DEFAULT_MAX_NEW_TOKENS)
        if count is not None
    )
    context = config.max_position_embeddings
    # Prompts are encoded as the training text was (TokenBlocks): special tokens written out in them (`<s>`, `</s>`)
    # are text, not the document separator or tokens the model never trained. The tokenizer still adds its own (BOS).
    for index, prompt in enumerate(generation_args.prompt):
        length = len(tokenizer(prompt, split_special_tokens=True)["input_ids"])
        if length + wanted_tokens > context:
            remedy = f"pass --max_new_tokens {context - length} or less" if length < context else "shorten it"
            raise ValueError(
                f"--prompt: prompt {index + 1} has {length} tokens, and {wanted_tokens} new ones would exceed the "
                f"model's context of {context} tokens (max_position_embeddings): {remedy}."
            )
    stream = wanted == 1 and beams == 1  # TextStreamer follows one sequence, and not beam search
    set_seed(generation_args.seed)
    texts = []
    for index, prompt in enumerate(generation_args.prompt):
        print(f"\n===== prompt {index + 1} =====")
        inputs = tokenizer(prompt, return_tensors="pt", split_special_tokens=True).to(device)
        output = model.generate(
            **inputs,
            max_new_tokens=wanted_tokens,
            num_return_sequences=generation_args.num_return_sequences,
            streamer=TextStreamer(tokenizer, skip_special_tokens=True) if stream else None,
            **overrides,
        )
        prompt_texts = tokenizer.batch_decode(output, skip_special_tokens=True)
        if not stream:
            for number, text in enumerate(prompt_texts, start=1):
                print(f"--- sequence {number} ---\n{text}")
        texts.extend(prompt_texts)
    return texts


if __name__ == "__main__":
    main()
