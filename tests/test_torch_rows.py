"""The torch backend's fast paths against its general ones: the padded-batch loss (torch_rows)
against the general loss path, and the chunked scan of shared gains against the recursion."""

import math

import numpy as np
import pytest
import torch

from helpers import grid
from kpo_kernels.backends import torch_backend, torch_rows, torch_scan
from kpo_kernels.bench.baselines import float64_recursion
from kpo_kernels.options import METRIC_NAMES, FilterOptions, TokenBatch
from kpo_kernels.validation import check_loss_options


def _batch(dtype, layout, per_token, weights, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows, length = 6, 37
    old = -torch.rand(rows, length, generator=gen)
    new = old + 0.3 * torch.randn(rows, length, generator=gen)
    mask = torch.arange(length) < torch.randint(1, length + 1, (rows,), generator=gen)[:, None]
    mask[0] = True
    if layout == "holes":
        mask &= torch.rand(rows, length, generator=gen) > 0.3
    advantages = torch.randn(rows, generator=gen)
    if per_token:
        advantages = advantages[:, None].expand(rows, length).contiguous()
    is_weights = torch.rand(rows, length, generator=gen).to(dtype) if weights else None
    return TokenBatch(new.to(dtype), old.to(dtype), advantages.to(dtype), None if layout == "none" else mask,
                      is_weights, None, per_token)


def _options(clip, dual_clip, cap, p0, x0, agg="seq-mean-token-mean"):
    return check_loss_options(q=1e-2, r=0.5, p0=p0, x0=x0, mask_mode="skip", clip=clip, clip_low=0.2, clip_high=0.3,
                              dual_clip=dual_clip, log_ratio_cap=cap, agg=agg, dp_size=1, batch_num_tokens=None,
                              global_batch_size=None, loss_scale_factor=None)


def _general(batch, options, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(torch_backend, "rows_loss", lambda *args: None)
        return torch_backend.TorchBackend().loss_forward(batch, options, need_grad=True)


@pytest.mark.parametrize(
    "dtype, layout, per_token, weights, clip, dual_clip, cap, prior",
    grid([torch.float32, torch.float64, torch.bfloat16], ["right", "holes", "none"], [False, True], [False, True],
         [True, False], [None, 3.0], [10.0, 0.05, None], [(0.0, 0.0), (math.inf, 0.3), (1.0, -0.1)]),
)
def test_fast_path_equals_the_general_path(dtype, layout, per_token, weights, clip, dual_clip, cap, prior, monkeypatch):
    batch = _batch(dtype, layout, per_token, weights)
    options = _options(clip, dual_clip, cap, *prior)
    fast = torch_rows.rows_loss(batch, options, need_grad=True)
    assert fast is not None
    want = _general(batch, options, monkeypatch)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    # Counts and maxima are the same numbers; sums differ by rounding of the result dtype.
    torch.testing.assert_close(fast.metrics, want.metrics, rtol=rtol, atol=rtol, msg=lambda m: f"{m} {METRIC_NAMES}")
    torch.testing.assert_close(fast.loss, want.loss, rtol=rtol, atol=rtol)
    torch.testing.assert_close(fast.row_scale, want.row_scale)
    assert torch.equal(fast.grad == 0, want.grad == 0)  # the same frozen and masked tokens
    torch.testing.assert_close(fast.grad, want.grad, rtol=rtol, atol=0)


def test_fast_path_declines_what_it_does_not_compute():
    options = _options(True, None, 10.0, 0.0, 0.0)
    batch = _batch(torch.float32, "holes", False, False)
    garbage = batch.log_prob.masked_fill(~batch.mask, math.nan)  # NaN under the mask
    assert torch_rows.rows_loss(TokenBatch(garbage, *list(vars(batch).values())[1:]), options, True) is None
    varying = _batch(torch.float32, "right", True, False)
    varying.advantages[0, 0] += 1.0  # per-token advantages that vary within a sequence
    assert torch_rows.rows_loss(varying, options, True) is None
    position = check_loss_options(**{**_option_kwargs(), "mask_mode": "position"})
    assert torch_rows.rows_loss(batch, position, True) is None  # holes in position mode


def _option_kwargs():
    return dict(q=1e-2, r=0.5, p0=0.0, x0=0.0, mask_mode="skip", clip=True, clip_low=0.2, clip_high=0.3,
                dual_clip=None, log_ratio_cap=10.0, agg="token-mean", dp_size=1, batch_num_tokens=None,
                global_batch_size=None, loss_scale_factor=None)


@pytest.mark.parametrize("q", [0.0, 1e-9, 1e-6, 1e-2, 30.0, 1e3, 1e8])
@pytest.mark.parametrize("p0, x0", [(0.0, 0.0), (math.inf, -0.1), (1.0, 0.2)])
@pytest.mark.parametrize("length", [1, 7, 64, 100, 5000])
def test_shared_scan_is_the_recursion(q, p0, x0, length):
    z = torch.randn(3, length, dtype=torch.float64, generator=torch.Generator().manual_seed(length)) * 0.05
    options = FilterOptions(q=q, r=1.0, p0=p0, x0=x0, mask_mode="position")
    gains = torch_scan.position_gains(length, options, "cpu")
    got = torch_scan.prefix_filter(z, options)
    want = float64_recursion(z.numpy(), np.ascontiguousarray(np.broadcast_to(gains.numpy(), z.shape)), x0)
    assert np.abs(got.numpy() - want).max() <= 1e-13 * max(np.abs(want).max(), 1e-300)
    if p0 == math.inf:  # K_1 = 1: the first state is z_0 exactly, whatever x0
        assert torch.equal(got[:, 0], z[:, 0])


def test_shared_scan_declines_products_below_its_bound():
    a = torch.full((64,), 1e-30, dtype=torch.float64)  # 64 such factors leave float64's range
    assert torch_scan.shared_scan(torch.ones(2, 64, dtype=torch.float64), None, a, 0.0) is None


def test_clip_bounds_and_signs_at_their_edges(monkeypatch):
    """A token exactly at its row's clip bound is not frozen, one ulp beyond it is (the fast
    path's single comparison per row against the general path's two); sign flips of subnormal
    log-ratios count. p0 = inf: the first state is z_0 exactly."""
    options = _options(True, None, None, math.inf, 0.0)
    high, low = math.log1p(0.3), math.log1p(-0.2)
    first = [high, math.nextafter(high, math.inf), low, math.nextafter(low, -math.inf), 5.0]
    log_prob = torch.zeros(5, 6, dtype=torch.float64)
    log_prob[:, 0] = torch.tensor(first, dtype=torch.float64)
    log_prob[:, 2:] = torch.tensor([5e-324, -5e-324, 0.0, 1e-310], dtype=torch.float64)
    advantages = torch.tensor([1.0, 2.0, -1.0, -2.0, 0.0], dtype=torch.float64)
    batch = TokenBatch(log_prob, torch.zeros_like(log_prob), advantages, torch.ones(5, 6, dtype=torch.bool), None,
                       None, False)
    fast = torch_rows.rows_loss(batch, options, need_grad=True)
    want = _general(batch, options, monkeypatch)
    assert torch.equal(fast.grad == 0, want.grad == 0)
    assert (fast.grad[:, 0] == 0).tolist() == [False, True, False, True, True]  # A = 0: no gradient at all
    for name in ("clipfrac_high", "clipfrac_low", "sign_flip_raw", "sign_flip_filtered"):
        index = METRIC_NAMES.index(name)
        assert fast.metrics[index] == want.metrics[index], name
        assert name == "sign_flip_filtered" or fast.metrics[index] > 0, name
