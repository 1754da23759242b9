"""The pieces of `python -m kpo_kernels` that ship in kpo_kernels.bench: the authors' baseline as
docs/math.md (section 6) describes it, and the PNG (two panels, NaN drawn, no point hidden)."""

import importlib.util
import math

import pytest
import torch

import kpo_kernels
from kpo_kernels.bench import baselines
from kpo_kernels.bench.data import rl_batch

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


# ----------------------------------------------------------------------------- vectorized-cumsum


def test_authors_gains_follow_the_recursion_where_float32_allows():
    """Position t holds K_{t+1}; float32 arccosh costs them about 1e-3 relative at q = 1e-4."""
    want = torch.from_numpy(baselines.float64_gains(2000, 1e-4).copy())
    got = baselines.sinh_gains(2000, 1e-4)
    assert got.dtype == torch.float32
    assert float(((got.double() - want) / want).abs().max()) < 2e-3


def test_authors_gains_clamp_and_failures():
    # q < 1e-12: U = k + 1, K_1 = q / (1 + q) = 1e-13, clamped up to 1e-6
    assert torch.equal(baselines.sinh_gains(5, 1e-13), torch.full((5,), 1e-6, dtype=torch.float32))
    # K close to 1 is clamped to 1 - 1e-6 (in float32)
    assert float(baselines.sinh_gains(3, 1e6)[1]) == float(torch.tensor(1 - 1e-6, dtype=torch.float32))
    # 1 + q/2 rounds to 1 in float32: U = 0 and every gain 0/0
    assert bool(torch.isnan(baselines.sinh_gains(64, 1e-8)).all())
    # sinh((k + 1) eta) overflows once (k + 1) eta > 89, eta ~ sqrt(q): NaN from position ~ 89 / sqrt(q)
    for q, onset in ((1e-2, 871), (1e-6, 84464)):
        gains = baselines.sinh_gains(onset + 100, q)
        assert bool(torch.isfinite(gains[:onset]).all()) and bool(torch.isnan(gains[onset:]).all())


def test_authors_filter_masked_tokens_are_zero_observations():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 200, generator=gen) * 0.05
    mask = torch.rand(3, 200, generator=gen) > 0.3
    got = baselines.vectorized_cumsum_filter(z, mask, 1e-3)
    ones = torch.ones_like(mask)
    assert torch.equal(got, baselines.vectorized_cumsum_filter(z * mask, ones, 1e-3) * mask)
    # the same as the recursion in position mode to float32 accuracy of its gains
    want = baselines.float64_filter(z, mask, 1e-3, mask_mode="position")
    assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-3
    assert float((got.double() - baselines.float64_filter(z, mask, 1e-3)).abs().max() / want.abs().max()) > 1e-2


def test_authors_filter_running_product_floor():
    """The impulse response decays as prod(1 - K) until the running product reaches 1e-30, then
    stays at 1e-30 K_1 / (1 - K_1) (the floor on logA; exp's clip at 80 never binds above it)."""
    z = torch.zeros(1, 860)
    z[0, 0] = 1.0
    x = baselines.vectorized_cumsum_filter(z, torch.ones_like(z, dtype=torch.bool), 1e-2)[0]
    assert bool(torch.isfinite(x).all())
    log_a = torch.cumsum(torch.log(1 - baselines.sinh_gains(860, 1e-2).double()), 0)
    floor = int((log_a < math.log(1e-30)).nonzero()[0])
    assert 600 < floor < 800
    k1 = float(baselines.sinh_gains(1, 1e-2)[0])
    assert x[floor:].unique().numel() == 1 and float(x[-1]) == pytest.approx(1e-30 * k1 / (1 - k1), rel=1e-5)
    assert float(x[floor - 50]) > 10 * float(x[-1])  # it was still decaying (by about 0.9 a token) before


def test_authors_loss_agrees_with_position_mode_where_accurate():
    """Spec section 6: where their filter is accurate (short rows), the loss and gradient of a
    correct implementation in position mode agree with theirs to 1e-5."""
    for q, length in ((1e-6, 256), (1e-4, 256), (1e-3, 512)):
        batch = rl_batch(8, length, seed=2)
        mine = batch["log_prob"].clone().requires_grad_()
        loss, _ = kpo_kernels.kpo_loss(mine, batch["old_log_prob"], batch["advantages"], batch["mask"], q=q,
                                       mask_mode="position", backend="torch")
        loss.backward()
        theirs = batch["log_prob"].clone().requires_grad_()
        their_loss, metrics = baselines.vectorized_cumsum({**batch, "log_prob": theirs}, q=q)
        their_loss.backward()
        assert abs(float(loss.detach()) - float(their_loss.detach())) < 1e-5
        assert float((mine.grad - theirs.grad).abs().max()) < 1e-5 * float(mine.grad.abs().max())
        assert set(metrics) == {"pg_clipfrac", "pg_clipfrac_lower", "sequence_ratio_mean"}
        assert all(isinstance(v, float) for v in metrics.values())  # read to the host, as theirs
        assert metrics["pg_clipfrac_lower"] == 0.0


def test_authors_sequence_ratio_mean_counts_padding():
    batch = rl_batch(8, 256, seed=4)
    _, metrics = baselines.vectorized_cumsum(batch, q=1e-3)
    mask = batch["mask"]
    x = baselines.vectorized_cumsum_filter(batch["log_prob"] - batch["old_log_prob"], mask, 1e-3)
    ratio = torch.exp(x)  # 1 at padding (x = 0 there)
    assert not bool(mask.all())
    assert metrics["sequence_ratio_mean"] == pytest.approx(float(ratio.mean()), rel=1e-6)
    assert metrics["sequence_ratio_mean"] != pytest.approx(float(ratio[mask].mean()), rel=1e-6)


def test_authors_loss_has_no_dual_clip():
    """A < 0 and a large filtered ratio: verl's dual clip (c = 3) would cap the token loss at
    -3 A = 3; theirs is -A r. One token, q = 1e6: K_1 clamped to 1 - 1e-6, x = K_1 z."""
    batch = {
        "log_prob": torch.tensor([[5.0]]), "old_log_prob": torch.tensor([[0.0]]),
        "advantages": torch.tensor([-1.0]), "mask": torch.tensor([[True]]),
    }
    loss, _ = baselines.vectorized_cumsum(batch, q=1e6, agg="token-mean")
    assert float(loss) == pytest.approx(math.exp(5.0 * (1 - 1e-6)), rel=1e-6)
    dual, _ = baselines.ppo_clip_loss(torch.tensor([[math.exp(5.0)]]), torch.tensor([[5.0]]), batch["advantages"],
                                      batch["mask"], "token-mean", 3e-4, 4e-4)
    assert float(dual) == pytest.approx(3.0)  # grpo-eager's (verl vanilla) surrogate, for contrast


# ----------------------------------------------------------------------------- the PNG


def _accuracy_row(impl, length, err_filter, err_grad):
    return dict(kind="accuracy", impl=impl, length=length, rows=4, dtype="fp32", q=1e-6, status="ok",
                err_filter=err_filter, err_grad=err_grad, tokens=4 * length)


def _timing_row(impl, rows, length, ms, backend=None):
    return dict(kind="timing", impl=impl, rows=rows, length=length, tokens=rows * length, dtype="fp32", status="ok",
                median_ms=ms, p20_ms=ms * 0.9, p80_ms=ms * 1.1, regime="long rows" if length > 16384 else "short rows",
                backend=backend, device="cpu", device_name="test CPU")


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (the `bench` extra)")
def test_figure_two_panels_nan_drawn_no_point_hidden():
    from kpo_kernels.bench import figure

    rows = [
        _accuracy_row("kpo", 256, 3e-8, 0.0), _accuracy_row("kpo", 131072, 5e-8, 1e-7),
        _accuracy_row("vectorized-cumsum", 256, 4e-4, 2e-7), _accuracy_row("vectorized-cumsum", 131072, math.nan, 1.0),
        # 64 x 4096 and 2 x 131072 have the same B x T; kpo and kpo-torch (the same backend) the same time
        _timing_row("kpo", 64, 4096, 10.0, "torch"), _timing_row("kpo", 2, 131072, 10.0, "torch"),
        _timing_row("kpo-torch", 64, 4096, 10.0), _timing_row("vectorized-cumsum", 64, 4096, 10.0),
        _timing_row("vectorized-cumsum", 2, 131072, 10.0),
    ]
    fig = figure.figure(rows)
    accuracy, timing = fig.axes
    labels = [t.get_text() for t in accuracy.get_yticklabels()]
    nan_y = accuracy.get_yticks()[labels.index("NaN")]
    zero_y = accuracy.get_yticks()[labels.index("0")]
    points = [tuple(p) for line in accuracy.get_lines() if line.get_marker() not in ("None", "") for p in line.get_xydata()]
    nan_points = [p for p in points if p[1] == nan_y]
    assert len(nan_points) == 1 and nan_points[0][0] == pytest.approx(131072, rel=0.2)
    assert any(p[1] == zero_y and p[0] == pytest.approx(256, rel=0.2) for p in points)  # an error of 0, in its own band
    assert len(set(points)) == len(points) == 8  # 2 implementations x 2 lengths x (filter, gradient), none on another
    assert accuracy.get_ylim()[0] < zero_y < 1e-8 < 1.0 < nan_y < accuracy.get_ylim()[1]

    timed = [tuple(p) for line in timing.get_lines() for p in line.get_xydata() if line.get_marker() in ("o", "^")]
    assert len(timed) == 4  # kpo-torch is kpo's own backend here: not drawn over it
    assert len(set(timed)) == 4  # equal tokens and equal times, yet four distinct positions
    assert all(p[0] == pytest.approx(262144, rel=0.15) for p in timed)
    import matplotlib.pyplot as plt

    plt.close(fig)


# ----------------------------------------------------------------------------- benchmarks.device_time


def test_device_time_cases_and_summary():
    """The GPU-only kernel breakdown: its case syntax, its text, and a clear refusal on a CPU."""
    from benchmarks import device_time

    cases = device_time.parse_cases("512x8192:bf16, 2x131072")
    assert [(c.rows, c.length, c.dtype) for c in cases] == [(512, 8192, torch.bfloat16), (2, 131072, torch.float32)]
    row = {"case": "512x8192 bf16", "bytes": 29_360_128, "kpo_us": 40.0, "copy_us": 20.0, "kpo_graph_us": 44.0,
           "kpo_kernels_us": {"fused_forward": 25.0, "fused_backward": 15.0},
           "vectorized-cumsum_us": 400.0, "grpo-eager_us": 120.0, "kpo_basic_us": 25.0, "fit_error": "RuntimeError: x"}
    text = device_time.summary(row)
    assert "metrics=basic 25.0 us" in text and "per-step fit: RuntimeError: x" in text
    assert "kpo kernels     40.0 us (734 GB/s, 50% of copy's 20.0 us)" in text
    assert "graph replay 44.0 us" in text and "vectorized-cumsum 400.0 us = 10.0x" in text
    assert text.splitlines()[1].split() == ["25.00", "us", "fused_forward"]
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            device_time.main(["--cases", "4x64"])
