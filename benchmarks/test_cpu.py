"""CPU benchmarks of one training step (loss + metrics + backward): `pytest benchmarks/`.

Not part of the default test run (tests/ only). The same implementations and data as
`python -m kpo_kernels`. Compare within a group; the summary prints the ratios.
"""

import pytest
import torch

from benchmarks.data import rl_batch
from benchmarks.implementations import forward_backward


@pytest.fixture(scope="module")
def batch_64x4096():
    return rl_batch(64, 4096)


@pytest.fixture(scope="module")
def batch_8x1024():
    return rl_batch(8, 1024)


@pytest.mark.parametrize("name", ["kpo-torch", "grpo-eager", "vectorized-cumsum"])
def test_step_64x4096(benchmark, batch_64x4096, name):
    """Issue 2's target: kpo-torch forward+backward within 1.5x of grpo-eager on 2 CPU cores."""
    benchmark.group = "fwd+bwd B=64 T=4096 float32"
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.pedantic(forward_backward, args=(name, batch_64x4096), rounds=30, warmup_rounds=3)


@pytest.mark.parametrize("name", ["kpo-torch", "grpo-eager", "vectorized-cumsum", "sequential-reference"])
def test_step_8x1024(benchmark, batch_8x1024, name):
    benchmark.group = "fwd+bwd B=8 T=1024 float32"
    rounds = 3 if name == "sequential-reference" else 30
    benchmark.pedantic(forward_backward, args=(name, batch_8x1024), rounds=rounds, warmup_rounds=1)
