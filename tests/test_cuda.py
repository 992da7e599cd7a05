"""On a GPU: the paths the CPU tests cannot reach there (CUDA kernels, asynchronous checks, no host reads).

The CUDA cases are skipped without a CUDA device; on a GPU machine: `python -m pytest -q tests/test_cuda.py`. The same
checks also run on the CPU, so that they keep working where no GPU is.
"""

import warnings

import pytest
import torch

from clustermoe_hf import ClusterMoEConfig, ClusterMoEForCausalLM


NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = [pytest.param(torch.device("cuda"), marks=NO_CUDA, id="cuda"), pytest.param(torch.device("cpu"), id="cpu")]

SETUPS = {
    "flat router": {},
    "hierarchical router, padded rows": {"router_implementation": "hierarchical"},  # 4 experts per cluster
    "hierarchical router, aligned rows": {"router_implementation": "hierarchical", "num_clusters": 8,
                                          "experts_per_cluster": 8},
    "capacity limits, adaptive routing, jitter": {"expert_capacity_factor": 1.0, "use_adaptive_routing": True,
                                                  "router_jitter_noise": 0.1},
    "unaligned expert width": {"intermediate_size": 12},  # sorted_mm's per-expert loop
}  # fmt: skip


def make_config(**overrides) -> ClusterMoEConfig:
    settings = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_clusters": 4, "experts_per_cluster": 4, "pad_token_id": 0}  # fmt: skip
    return ClusterMoEConfig(**{**settings, **overrides})


def left_padded_batch():
    input_ids = torch.randint(3, 128, (3, 24))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :5] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_the_model_computes_on_the_device_what_it_computes_on_the_cpu_trains_and_generates(setup, dtype, device):
    # The reference runs the experts' eager loop on the CPU; the model its default kernels (`sorted_mm`) on the device.
    reference = ClusterMoEForCausalLM(make_config(**SETUPS[setup], experts_implementation="eager")).to(dtype).eval()
    model = ClusterMoEForCausalLM(make_config(**SETUPS[setup])).to(dtype)
    model.load_state_dict(reference.state_dict())
    model.to(device).eval()
    input_ids, attention_mask = left_padded_batch()
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=attention_mask).logits.float()
        logits = model(input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float().cpu()
    real = attention_mask.bool()
    if dtype == torch.float32:  # bf16 kernels round differently, and a near-tie in routing may then flip
        torch.testing.assert_close(logits[real], expected[real], rtol=1e-3, atol=1e-3)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        loss = model(input_ids.to(device), attention_mask=attention_mask.to(device), labels=input_ids.to(device)).loss
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad()
    assert int(model.model.routing_state.training_step) == 2
    assert int(model.model.routing_state.pending_counts.sum()) == 0  # folded in at the optimizer step

    model.eval()
    generated = model.generate(
        input_ids.to(device), attention_mask=attention_mask.to(device), max_new_tokens=6, min_new_tokens=6,
        do_sample=False,
    )  # fmt: skip
    assert generated.shape == (3, 30)


@NO_CUDA
@pytest.mark.parametrize("setup", ["flat router", "hierarchical router, aligned rows"])
def test_a_bf16_training_step_does_not_wait_for_the_device(setup):
    """Routing, the balancing losses, the health checks and the statistics stay on the device: no host reads in the
    forward and backward. (bf16: torch's grouped GEMM reads its group offsets on the host for float32.)"""
    device = torch.device("cuda")
    if torch.cuda.get_device_capability(device) < (9, 0):
        pytest.skip("torch's bf16 grouped GEMM reads the group offsets on the host before Hopper")
    model = ClusterMoEForCausalLM(make_config(**SETUPS[setup])).to(device, torch.bfloat16).train()
    input_ids = torch.randint(3, 128, (3, 24), device=device)
    model(input_ids, labels=input_ids).loss.backward()  # warm-up: one-off setup may synchronise
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model(input_ids, labels=input_ids).loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    synchronisations = [str(warning.message) for warning in caught if "synchroniz" in str(warning.message).lower()]
    assert not synchronisations, synchronisations[:3]


@NO_CUDA
def test_a_static_cache_decoding_step_does_not_wait_for_the_device():
    """A static cache counts its tokens on the device; the input checks leave that count there (the CPU stand-in is
    `test_static_cache_decoding_reads_no_token_count_off_cpu`). No attention mask: transformers' mask construction
    reads a padding mask on the host to decide whether SDPA may skip it, as for its own models."""
    from transformers import StaticCache

    device = torch.device("cuda")
    if torch.cuda.get_device_capability(device) < (9, 0):
        pytest.skip("torch's bf16 grouped GEMM reads the group offsets on the host before Hopper")
    model = ClusterMoEForCausalLM(make_config()).to(device, torch.bfloat16).eval()
    cache = StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        model(torch.randint(3, 128, (2, 8), device=device), cache=cache)
        next_tokens = torch.randint(3, 128, (2, 1), device=device)
        model(next_tokens, cache=cache)  # warm-up: one-off setup may synchronise
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model(next_tokens, cache=cache)
            finally:
                torch.cuda.set_sync_debug_mode(0)
    synchronisations = [str(warning.message) for warning in caught if "synchroniz" in str(warning.message).lower()]
    assert not synchronisations, synchronisations[:3]
