"""The float32 tables of a new Q / R built by one Triton launch on a GPU
(kpo_kernels/backends/triton_tables.py; interpreted on the CPU): the torch operations' closed
form, entry for entry, for every kind and branch; settings it declines fall back; the cache
launches it once per table."""

import math

import pytest
import torch

import kpo_kernels
from kpo_kernels import tables
from kpo_kernels.backends import triton_backend as launcher
from conftest import DEVICE
from helpers import assert_close, make_batch

pytestmark = pytest.mark.skipif(launcher.kernels is None, reason="Triton is not importable")

if launcher.kernels is not None:
    import triton
    import triton.language as tl

    from kpo_kernels.backends.triton_fit_search import _expm1

    @triton.jit
    def expm1_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        tl.store(out_ptr + offsets, _expm1(tl.load(x_ptr + offsets, mask=inside)), mask=inside)

KINDS = (tables.GAINS, tables.VARIANCE_RATIOS, tables.LOG_VARIANCE_RATIOS)  # the kernel's outputs, in order


def torch_table(monkeypatch, kind, length, q, r, p0):
    """The same table from the torch operations (the kernel switched off)."""
    with monkeypatch.context() as patch:
        patch.setattr(tables, "KERNEL_DEVICES", ())
        return tables._build(kind, length, q, r, p0, torch.device(DEVICE), torch.float32)


def ulps(a, b):
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


FAST_SETTINGS = {(q, p0) for q in (0.0, 3e-7, 10.0) for p0 in (0.0, 3.0, math.inf)}  # every branch; the rest is slow
SETTINGS = [
    pytest.param(q, p0, marks=() if (q, p0) in FAST_SETTINGS else pytest.mark.slow)
    for q in (0.0, 1e-20, 1e-12, 3e-7, 1e-3, 0.5, 10.0, 1e8, 3e30) for p0 in (0.0, 1e-3, 0.5, 1.0, 3.0, 1e6, math.inf)
]


@pytest.mark.parametrize("q_ratio, p0_ratio", SETTINGS)
def test_the_kernel_is_the_closed_form(monkeypatch, q_ratio, p0_ratio):
    """Every entry of the three tables as the torch operations give it (the float64 closed form
    rounded once), at most one float32 ulp apart (Kahan's expm1 against torch's; none seen),
    non-finite entries (the diffuse prior's log w_1 = -inf) identical; nothing written past a
    table (NaN sentinels). q = 10 reaches exp of -740 (subnormal) at n ~ 150, where an earlier
    expm1 erred by 1e-3."""
    from kpo_kernels.backends import triton_tables

    r = 0.026
    for length in (1, 2, 127, 128, 129, 300):
        buffers = [torch.full((length + 7,), math.nan, device=DEVICE) for _ in KINDS]
        assert triton_tables.build_tables(length, q_ratio * r, r, p0_ratio * r, *(b[:length] for b in buffers))
        for kind, buffer in zip(KINDS, buffers):
            want, got = torch_table(monkeypatch, kind, length, q_ratio * r, r, p0_ratio * r), buffer[:length]
            finite = torch.isfinite(want)
            assert torch.equal(finite, torch.isfinite(got)), (kind, length, want, got)
            assert torch.equal(want[~finite], got[~finite])
            assert not finite.any() or int(ulps(want[finite], got[finite]).max()) <= 1, (kind, length, want, got)
            assert torch.isnan(buffer[length:]).all()


def test_settings_beyond_the_float32_parts_take_the_torch_operations(monkeypatch):
    """q / r of 1e-35 cannot travel as three float32 parts: nothing is launched, and the cache
    builds the table with torch operations, as before."""
    from kpo_kernels.backends import triton_tables

    assert triton_tables.table_launch(1e-35, 1.0, 0.0) is None
    outputs = [torch.full((64,), math.nan, device=DEVICE) for _ in KINDS]
    assert not triton_tables.build_tables(64, 1e-35, 1.0, 0.0, *outputs) and all(torch.isnan(o).all() for o in outputs)
    monkeypatch.setattr(tables, "KERNEL_DEVICES", (torch.device(DEVICE).type,))
    built = tables._build_set(tables.GAINS, 64, 1e-35, 1.0, 0.0, torch.device(DEVICE), torch.float32)
    assert list(built) == [tables.GAINS]
    assert torch.equal(built[tables.GAINS], torch_table(monkeypatch, tables.GAINS, 64, 1e-35, 1.0, 0.0))


@pytest.mark.parametrize("metrics", ["full", "basic"])
def test_a_new_q_costs_one_launch(monkeypatch, metrics):
    """A Triton loss at a Q / R new to the cache builds its float32 tables in one launch (66
    torch operations before with every metric, 19 with the basic ones); the companions are
    cached with the table asked for; the loss and its metrics are what they were."""
    from kpo_kernels.backends import triton_tables

    batch = make_batch(3, 300, seed=4, dtype=torch.float32, layout="holes", device=DEVICE)
    monkeypatch.setattr(tables, "cache", tables.TableCache())

    def run():
        tables.cache.clear()
        loss, metrics_out = kpo_kernels.kpo_loss(batch["log_prob"], batch["old_log_prob"], batch["advantages"],
                                                 batch["mask"], q=2.5e-5, r=0.03, backend="triton", metrics=metrics)
        return loss, metrics_out

    monkeypatch.setattr(tables, "KERNEL_DEVICES", ())
    want = run()
    launches = []
    build = triton_tables.build_tables
    monkeypatch.setattr(triton_tables, "build_tables", lambda *args: launches.append(args[0]) or build(*args))
    monkeypatch.setattr(tables, "KERNEL_DEVICES", (torch.device(DEVICE).type,))
    builds = tables.cache.builds
    got = run()
    assert len(launches) == 1 and tables.cache.entries() == 3 and tables.cache.builds == builds + 3
    # tables within an ulp (equal on the CPU; a GPU's FMAs may move an ulp): the loss to float32 rounding
    assert_close("loss", got[0].cpu(), want[0].cpu(), rtol=1e-6, atol=1e-7)
    for name in want[1]:
        assert_close(name, got[1][name].cpu(), want[1][name].cpu(), rtol=1e-6, atol=1e-7)


def test_expm1_helper_is_accurate_everywhere():
    """triton_fit_search._expm1 (the tables' and the fit's log-determinants'): within 4 float64
    ulps of math.expm1 from tiny to large arguments, through exp's subnormal range near -740
    (where log e is not x: the Kahan form erred by 1e-3 there before) and its underflow to -1."""
    points = [0.0, 1e-300, -1e-300, 1e-17, -1e-17, 1e-9, -1e-9, 0.3, -0.3, 0.999, -0.999, 1.0, -1.0, 1.001, -1.001,
              5.0, -5.0, 700.0, -700.0, -708.5, -720.0, -738.4, -743.4, -745.0, -746.0, -800.0]
    x = torch.tensor(points + torch.linspace(-760.0, 20.0, 4001, dtype=torch.float64).tolist(), dtype=torch.float64, device=DEVICE)
    out = torch.full_like(x, math.nan)
    expm1_kernel[(-(-x.numel() // 1024),)](x, out, x.numel(), BLOCK=1024)
    want = torch.tensor([math.expm1(v) for v in x.tolist()], dtype=torch.float64)
    got = out.cpu()
    gap = (got - want).abs() / want.abs().clamp(min=torch.finfo(torch.float64).tiny)
    assert float(gap.max()) <= 4 * torch.finfo(torch.float64).eps, x.cpu()[int(gap.argmax())]
