#!/usr/bin/env python
# Copyright 2026 The ClusterMoE authors. Licensed under the Apache License, Version 2.0.
"""Upload a model folder written by run_clm.py to the Hugging Face Hub, in one commit.

    python examples/push_to_hub.py --folder clustermoe-shakespeare --repo-id your-name/clustermoe-shakespeare --dry-run
    python examples/push_to_hub.py --folder clustermoe-shakespeare --repo-id your-name/clustermoe-shakespeare

The folder is checked first (config with auto_map and its modeling code, a config that the installed clustermoe_hf
accepts, safetensors weights, tokenizer, generation config, model card with YAML metadata); nothing is uploaded if a
check fails. `--dry-run` stops after the checks and lists exactly the files that would be uploaded. Training
checkpoints (checkpoint-*/), the Trainer's pickled arguments (training_args.bin, which can hold a Hub token), hidden
files and links to files outside the folder stay local; a Trainer checkpoint folder itself (with its optimizer,
scheduler or RNG states) is refused.
The model card names the model as run_clm.py saw it (the folder's name, unless --hub_model_id was given); the uploaded
copy names it --repo-id instead (usage snippet, heading, model-index), while the local README.md stays as it is.
The token comes from the HF_TOKEN environment variable or from `hf auth login`.
"""

import fnmatch
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

# Files and folders (matched against every path component) that stay local. `training_args.bin` is the Trainer's
# pickle of its arguments, which can hold a Hub token (`--hub_token`).
IGNORED_PATTERNS = ("checkpoint-*", ".*", "__pycache__", "*.pyc", "training_args.bin")
# The states the Trainer saves in a checkpoint to resume from (optimizer.bin, rng_state_<rank>.pth with several
# processes); its trainer_state.json is in a run's folder too.
TRAINER_STATE_FILES = ("optimizer.*", "scheduler.pt", "scaler.pt", "rng_state*.pth")
REQUIRED_AUTO_CLASSES = ("AutoConfig", "AutoModelForCausalLM")
CARD_METADATA_KEYS = ("library_name", "pipeline_tag", "tags")
# The model id in the usage snippet of a card rendered from model_card.md: `AutoTokenizer.from_pretrained("<id>")`.
CARD_MODEL_ID = re.compile(r"""\.from_pretrained\(["']([^"']+)["']""")


@dataclass
class PushArguments:
    folder: str = field(metadata={"help": "The model folder to upload (the --output_dir of run_clm.py)."})
    repo_id: str = field(
        metadata={"help": "The Hub repository, e.g. your-name/clustermoe-shakespeare; created if needed."}
    )
    private: bool = field(default=False, metadata={"help": "Create the repository as private (if it does not exist)."})
    revision: str | None = field(
        default=None, metadata={"help": "Branch to commit to (created if needed). Default: main."}
    )
    commit_message: str = field(default="Upload ClusterMoE model", metadata={"help": "Message of the upload commit."})
    dry_run: bool = field(
        default=False, metadata={"help": "Only check the folder and list the files that would be uploaded."}
    )

    def __post_init__(self):
        # Checked first, so that a dry run also catches an id that the upload would be refused (and that would be
        # written into the uploaded card).
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(self.repo_id)
        except HFValidationError as error:
            raise ValueError(
                f"--repo-id {self.repo_id!r} is not a valid Hub repository id (expected your-name/model-name): {error}"
            ) from None
        if "/" not in self.repo_id:  # the Hub would put it under the account; the card's snippet would name neither
            raise ValueError(f"--repo-id {self.repo_id!r} names no account or organisation: pass your-name/model-name.")


def files_to_upload(folder: Path) -> list[Path]:
    """Every file under `folder`, relative to it and sorted, except the `IGNORED_PATTERNS` and links to files outside
    the folder (whose contents would be uploaded)."""
    files, inside = [], folder.resolve()
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        ignored = any(fnmatch.fnmatch(part, pattern) for part in relative.parts for pattern in IGNORED_PATTERNS)
        if path.is_file() and not ignored and path.resolve().is_relative_to(inside):
            files.append(relative)
    return files


def _read_json(path: Path, problems: list[str], expected: str) -> dict | None:
    """The JSON object in `path`, or None with the reason added to `problems`."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        problems.append(f"{path.name} is not valid JSON: {error}")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path.name} holds a {type(value).__name__}, expected {expected}.")
        return None
    return value


def _check_safetensors(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as weights:
            if not list(weights.keys()):
                return f"{path.name} holds no tensors."
    except Exception as error:  # safetensors raises several error types for unreadable files
        return f"{path.name} is not a readable safetensors file: {error}"
    return None


def _tensor_shapes(paths: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the headers of readable safetensors files."""
    from safetensors import safe_open

    shapes = {}
    for path in paths:
        with safe_open(path, framework="pt") as weights:
            shapes.update({name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()})
    return shapes


def _check_weights_match_config(config: dict, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Whether the weights are those of the model `config` describes (built on the meta device, from the installed
    package): missing tensors would be newly initialised on the Hub, and other shapes fail to load. Left out without
    clustermoe_hf installed, as `_check_config`."""
    try:
        import torch

        from clustermoe_hf import ClusterMoEConfig, ClusterMoEForCausalLM
    except ImportError:
        return []
    try:
        config = ClusterMoEConfig.from_dict(config)
    except Exception:  # noqa: BLE001 - reported by `_check_config`
        return []
    with torch.device("meta"):
        model = ClusterMoEForCausalLM(config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    tied = set(model._tied_weights_keys or {}) if model.config.tie_word_embeddings else set()  # saved once
    problems = []
    missing = sorted(expected.keys() - shapes.keys() - tied)
    if missing:
        problems.append(f"the weights lack {len(missing)} tensors of the model config.json describes: {missing[:3]}")
    unexpected = sorted(shapes.keys() - expected.keys())
    if unexpected:
        problems.append(f"the weights hold {len(unexpected)} tensors the model has no place for: {unexpected[:3]}")
    mismatched = [
        f"{name} {shapes[name]} (config.json: {expected[name]})"
        for name in sorted(shapes.keys() & expected.keys())
        if shapes[name] != expected[name]
    ]
    if mismatched:
        problems.append(f"{len(mismatched)} weights do not have the shapes of config.json: {mismatched[:3]}")
    return problems


def _check_config(config: dict) -> str | None:
    """Why ClusterMoEConfig refuses `config` (a config.json's contents), or None: its own validation (sizes, routing,
    top-k within the experts), run from the installed package, never from the folder's code. Without clustermoe_hf
    installed (the script needs only transformers and huggingface_hub) the check is left out."""
    try:
        from clustermoe_hf import ClusterMoEConfig
    except ImportError:
        return None
    try:
        ClusterMoEConfig.from_dict(config)
    except Exception as error:  # the config's checks raise ValueError; transformers' own may raise others
        return f"config.json is no valid ClusterMoE config: {error}"
    return None


def folder_problems(folder: Path) -> list[str]:
    """What keeps `folder` from being a complete Hub model repository; empty when it is one."""
    if not folder.is_dir():
        return [f"{folder} is not a folder."]
    # A Trainer checkpoint (checkpoint-<step>/) holds, besides a model, the states it resumes from: pickles that stay
    # local, as in a run folder (IGNORED_PATTERNS), and no card.
    trainer_files = sorted(path.name for pattern in TRAINER_STATE_FILES for path in folder.glob(pattern))
    if trainer_files:
        return [
            f"{folder} is a Trainer checkpoint ({', '.join(trainer_files)}): its optimizer, scheduler and RNG states "
            "are for resuming the run, not for the Hub. Upload the run's folder (run_clm.py's --output_dir), which "
            "holds the final model and its card."
        ]
    problems = []
    present = {path.as_posix() for path in files_to_upload(folder)}

    def require(name: str) -> bool:
        if name not in present:
            outside = (folder / name).is_file()  # a link to a file outside the folder, which is not uploaded
            problems.append(f"{name} links outside the folder; copy it in." if outside else f"{name} is missing.")
            return False
        return True

    config = _read_json(folder / "config.json", problems, "a model config") if require("config.json") else None
    if config is not None:
        if config.get("model_type") != "clustermoe":
            problems.append(f"config.json has model_type {config.get('model_type')!r}, expected 'clustermoe'.")
        else:  # e.g. top_k_experts above experts_per_cluster: loading the model would fail on the Hub
            problems.extend(filter(None, [_check_config(config)]))
        auto_map = config.get("auto_map") or {}
        if not isinstance(auto_map, dict) or not all(isinstance(value, str) for value in auto_map.values()):
            problems.append(f"config.json's auto_map is not a mapping of class names to modules: {auto_map!r}.")
            auto_map = {}
        for auto_class in REQUIRED_AUTO_CLASSES:
            if auto_class not in auto_map:
                problems.append(f"config.json's auto_map has no {auto_class} (needed for trust_remote_code loading).")
        # "modeling_clustermoe.ClusterMoEForCausalLM", or after a Hub round trip "user/repo--modeling_clustermoe.X"
        pending = {reference.split("--")[-1].split(".")[0] for reference in auto_map.values()}
        checked = set()
        while pending:  # the auto_map modules and the modules they import relatively
            module = pending.pop()
            checked.add(module)
            if require(f"{module}.py"):
                code = (folder / f"{module}.py").read_text(encoding="utf-8")
                pending |= set(re.findall(r"^from \.(\w+) import", code, flags=re.MULTILINE)) - checked
    readable = []  # weights files
    if "model.safetensors.index.json" in present:
        index = _read_json(folder / "model.safetensors.index.json", problems, "a shard index") or {}
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            problems.append("model.safetensors.index.json has no weight_map of tensor names to shard files.")
            weight_map = {}
        weight_files = sorted(set(map(str, weight_map.values())))
    else:
        weight_files = ["model.safetensors"]
    for name in weight_files:
        if require(name):
            problem = _check_safetensors(folder / name)
            if problem is None:
                readable.append(folder / name)
            else:
                problems.append(problem)
    weights_complete = bool(weight_files) and len(readable) == len(weight_files)
    if weights_complete and config is not None and config.get("model_type") == "clustermoe":
        problems.extend(_check_weights_match_config(config, _tensor_shapes(readable)))
    for name in ("generation_config.json", "tokenizer_config.json"):
        if require(name):
            _read_json(folder / name, problems, "a JSON object")
    if require("tokenizer.json"):
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as error:  # tokenizers raises its own exception types for unreadable files
            problems.append(f"tokenizer.json cannot be loaded: {error}")
    if require("README.md"):
        from huggingface_hub import ModelCard

        try:  # the YAML metadata, and the model-index the Hub builds the card's results from
            metadata = ModelCard(Path(folder / "README.md").read_text(encoding="utf-8")).data.to_dict()
        except Exception as error:  # YAML, encoding and model-index errors of several types
            problems.append(f"README.md's YAML metadata cannot be read: {type(error).__name__}: {error}")
        else:
            for key in CARD_METADATA_KEYS:
                if key not in metadata:
                    problems.append(f"README.md has no {key!r} in its YAML metadata.")
    return problems


def card_model_id(card: str) -> str | None:
    """The model id that the card's usage snippet loads, or None if it has no `from_pretrained("...")` call."""
    match = CARD_MODEL_ID.search(card)
    return match.group(1) if match else None


def card_for_repo(card: str, repo_id: str) -> str:
    """`card` (a README.md rendered by run_clm.py) with its model id replaced by `repo_id`: in the usage snippet's
    `from_pretrained` calls, and its name (the part after the namespace) in the H1 heading and the model-index."""
    from huggingface_hub import ModelCard

    old_id = card_model_id(card)
    if old_id is None or old_id == repo_id:
        return card
    old_name, new_name = old_id.split("/")[-1], repo_id.split("/")[-1]
    model_card = ModelCard(card)
    if model_card.data.model_name == old_name:
        model_card.data.model_name = new_name
    usage = re.compile(rf"""(\.from_pretrained\(["']){re.escape(old_id)}(["'])""")
    text = usage.sub(lambda match: f"{match[1]}{repo_id}{match[2]}", model_card.text)
    heading = re.compile(rf"^# {re.escape(old_name)}$", flags=re.MULTILINE)
    model_card.text = heading.sub(lambda match: f"# {new_name}", text, count=1)
    return str(model_card)


def _size(num_bytes: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000


def main(args: list[str] | None = None) -> list[str]:
    """Check, then upload (or with --dry-run only list) the folder; return the repository paths of its files."""
    (push_args,) = HfArgumentParser(PushArguments).parse_args_into_dataclasses(args=args)
    folder = Path(push_args.folder)
    problems = folder_problems(folder)
    if problems:
        print(f"{folder} is not ready for the Hub:", *(f"  - {problem}" for problem in problems), sep="\n")
        sys.exit(1)
    files = files_to_upload(folder)
    # Files uploaded with other contents than the local ones: the card, with the model id of the repository.
    contents = {}
    card = (folder / "README.md").read_text(encoding="utf-8")
    local_id = card_model_id(card)
    if local_id is None:
        print(f"Note: README.md has no from_pretrained(...) call to name {push_args.repo_id}; it is uploaded as it is.")
    elif local_id != push_args.repo_id:
        contents[Path("README.md")] = card_for_repo(card, push_args.repo_id).encode("utf-8")
        print(
            f"README.md names the model {local_id!r}: the uploaded copy names it {push_args.repo_id!r} "
            "(the local file is unchanged)."
        )

    def size(path: Path) -> int:
        return len(contents[path]) if path in contents else (folder / path).stat().st_size

    total = sum(size(path) for path in files)
    action = "Would upload" if push_args.dry_run else "Uploading"
    visibility = "private" if push_args.private else "public"
    print(f"{action} {len(files)} files ({_size(total)}) from {folder} to {push_args.repo_id} ({visibility}):")
    for path in files:
        print(f"  {path.as_posix():<40} {_size(size(path)):>10}")
    if push_args.dry_run:
        return [path.as_posix() for path in files]

    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if get_token() is None:
        sys.exit("No Hugging Face token: set HF_TOKEN or run `hf auth login`.")
    api = HfApi()
    # The Hub's refusals (HfHubHTTPError) and the network's failures (no connection, timeouts) share the base class of
    # huggingface_hub's HTTP library.
    upload_errors = HfHubHTTPError.__bases__
    try:
        api.create_repo(push_args.repo_id, private=push_args.private, exist_ok=True)
        if push_args.revision is not None:
            api.create_branch(push_args.repo_id, branch=push_args.revision, exist_ok=True)
        commit = api.create_commit(
            push_args.repo_id,
            operations=[CommitOperationAdd(path.as_posix(), contents.get(path, str(folder / path))) for path in files],
            commit_message=push_args.commit_message,
            revision=push_args.revision,
        )
    except upload_errors as error:
        sys.exit(
            f"Uploading to {push_args.repo_id} on {api.endpoint} failed, nothing was committed: "
            f"{type(error).__name__}: {error}"
        )
    print(f"Uploaded: {commit.commit_url}")
    return [path.as_posix() for path in files]


if __name__ == "__main__":
    main()
