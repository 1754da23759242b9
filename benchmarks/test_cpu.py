"""CPU benchmarks of one training step (loss + metrics + backward): `pytest benchmarks/`.

Not collected by the default test run (testpaths = tests). The cases, batches, implementations
and checks are those of `python -m kpo_kernels` (kpo_kernels/bench/): each benchmark first
measures its implementation's errors against the float64 yardstick (this package must pass),
then pytest-benchmark times it. Compare within a group; the summary prints the ratios.
Issue 18's target on 2 CPU cores: kpo-torch at most 1.0x grpo-eager and faster than
vectorized-cumsum at 64x4096 (docs/benchmarks.md).
"""

import pytest
import torch

from kpo_kernels.bench.cases import default_cases
from kpo_kernels.bench.correctness import failures, measure_errors, yardstick
from kpo_kernels.bench.data import rl_batch
from kpo_kernels.bench.implementations import IMPLEMENTATIONS, forward_backward
from kpo_kernels.bench.run import RunOptions, skip_reason

CPU = torch.device("cpu")
CASES = default_cases(CPU)
NAMES = ("kpo", "grpo-eager", "vectorized-cumsum", "sequential-reference")
OPTIONS = RunOptions(reference_max_length=1024)


@pytest.fixture(scope="module", params=CASES, ids=lambda case: case.label.replace(" ", "-"))
def prepared(request):
    case = request.param
    batch = rl_batch(case.rows, case.length, dtype=case.dtype)
    return case, batch, yardstick(batch)


@pytest.mark.parametrize("name", NAMES)
def test_step(benchmark, prepared, name):
    case, batch, yard = prepared
    reason = skip_reason(name, case, CPU, OPTIONS)
    if reason is not None:
        pytest.skip(reason)
    errors = measure_errors(name, batch, yard)
    if IMPLEMENTATIONS[name].kpo:
        wrong = failures({"impl": name, "status": "ok", "dtype": case.dtype_name, **errors})
        assert not wrong, f"{name} on {case.label} disagrees with float64: {wrong}"
    benchmark.group = f"fwd+bwd {case.label}"
    benchmark.extra_info.update({k: v for k, v in errors.items() if v is not None})
    benchmark.extra_info["threads"] = torch.get_num_threads()
    slow = name == "sequential-reference"
    benchmark.pedantic(
        forward_backward, args=(name, batch), rounds=3 if slow else 20, warmup_rounds=1 if slow else 2
    )
