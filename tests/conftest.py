import os
import socket
import time

import pytest
import torch

import clustermoe_hf  # noqa: F401  (registers model_type "clustermoe" with the Auto classes)
from clustermoe_hf import ClusterMoEConfig, ClusterMoEForCausalLM


# The test models are tiny: intra-op threads only add synchronisation, which costs far more than the work whenever
# the cores are shared (e.g. ~0.25 s per grouped matmul with 2 threads on a busy 2-core machine vs ~30 us with 1).
torch.set_num_threads(1)

# Small enough for CPU tests, big enough to exercise grouped-query attention and two-level routing.
TINY_CONFIG = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "num_clusters": 2,
    "experts_per_cluster": 4,
    "top_k_clusters": 1,
    "top_k_experts": 2,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~10 s on CPU (deselect with -m 'not slow')")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _package_sorted_mm(monkeypatch):
    """Loading a checkpoint with `trust_remote_code` runs its copy of the modeling code, which registers that copy's
    `sorted_mm` in transformers' global experts interface. Same code, other module: tests that patch this package's
    module must see its own function dispatched, whichever test loaded a checkpoint before."""
    from transformers.integrations.moe import ExpertsInterface

    from clustermoe_hf import modeling_clustermoe

    monkeypatch.setitem(ExpertsInterface._global_mapping, "sorted_mm", modeling_clustermoe.sorted_mm_experts_forward)


def _distributed_entry(rank: int, world_size: int, port: int, worker, args):
    # The environment torchrun gives each process: transformers shards a model (tp_plan, DistributedConfig) from it.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        worker(rank, *args)
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture
def run_two_processes():
    """`run_two_processes(worker, *args)` runs `worker(rank, *args)` in two forked CPU processes (gloo), as torchrun
    would start them; a worker's exception fails the test, and so do workers still running after five minutes (a
    process waiting for its peer would otherwise stall the suite)."""
    import torch.multiprocessing as mp

    def run(worker, *args):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        context = mp.start_processes(
            _distributed_entry, args=(2, port, worker, args), nprocs=2, start_method="fork", join=False
        )
        deadline = time.monotonic() + 300
        while not context.join(timeout=max(deadline - time.monotonic(), 0)):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    process.kill()
                    process.join()
                pytest.fail(f"{worker.__name__}: the two processes did not finish within five minutes")

    return run


@pytest.fixture
def tiny_config():
    """Factory: `tiny_config(**overrides)` -> a small ClusterMoEConfig."""

    def make(**overrides) -> ClusterMoEConfig:
        return ClusterMoEConfig(**{**TINY_CONFIG, **overrides})

    return make


@pytest.fixture
def tiny_model(tiny_config):
    """Factory: `tiny_model(**config_overrides)` -> a randomly initialised ClusterMoEForCausalLM in eval mode."""

    def make(**overrides) -> ClusterMoEForCausalLM:
        return ClusterMoEForCausalLM(tiny_config(**overrides)).eval()

    return make
