"""The diagnostic metrics of kpo_loss (docs/math.md section 5b) against the sequential float64 definition in
reference/diagnostics.py: every layout, both backends, the multi-tile Triton path, packed
streams, and the edge cases of the definitions (diffuse prior, K = 1, empty rows, signs of 0)."""

import math

import pytest
import torch

import kpo_kernels
import reference
from conftest import DEVICE, triton_backend
from helpers import BRANCH_COUNTS, LAYOUTS, assert_close, grid, make_batch, near_branch_boundary, near_zero_filtered

DIAGNOSTICS = (
    "nis_mean",
    "log_likelihood",
    "sign_flip_raw",
    "sign_flip_filtered",
    "clipfrac_high",
    "clipfrac_low",
    "capfrac",
    "innovation_tokens",
    "sign_flip_pairs",
)
OPTIONS = {
    "default": {},
    "position": {"q": 1e-3, "mask_mode": "position"},
    "diffuse": {"q": 1e-2, "p0": math.inf},
    "prior": {"q": 1e-4, "p0": 0.5, "x0": 0.01, "r": 2.0},
    "small_cap": {"q": 1.0, "log_ratio_cap": 0.02, "clip_low": 0.01, "clip_high": 0.01},
    "no_filter": {"q": 1e8, "clip_low": 0.2, "clip_high": 0.28},
    "unclipped": {"clip": False, "q": 1e-2, "log_ratio_cap": None},
}


def implementations():
    return {
        "torch": kpo_kernels.TorchBackend(),
        "triton": triton_backend(block_size=16),
        "triton-tiled": triton_backend(block_size=16, tile_size=32),
    }


def check(metrics, batch, rtol=2e-6, **options):
    want = reference.diagnostics(batch["log_prob"], batch["old_log_prob"], batch["advantages"], batch["mask"], **options)
    tokens = max(1, int(batch["mask"].sum()) if batch["mask"] is not None else batch["log_prob"].numel())
    near = int(near_branch_boundary(batch, **options).sum())
    pairs = max(1, int(want["sign_flip_pairs"]))
    near_zero = int(near_zero_filtered(batch, **options).sum())
    for name in DIAGNOSTICS:
        tol = rtol
        if name in BRANCH_COUNTS:
            tol = near / tokens + 1e-7
        elif name == "sign_flip_filtered":
            tol = 2 * near_zero / pairs + 1e-7
        assert_close(name, metrics[name], want[name], rtol=rtol, atol=tol * (1 + abs(float(want[name]))))
    return want


@pytest.mark.parametrize("impl, options, layout", grid(["torch", "triton", "triton-tiled"], list(OPTIONS), LAYOUTS))
def test_padded_layouts(impl, options, layout):
    """Right/left padding, holes, empty rows, NaN/inf garbage under the mask; 77 tokens a row
    (several blocks of 16 and, tiled, three tiles of 32)."""
    batch = make_batch(5, 77, layout=layout, seed=len(options) + len(layout), device=DEVICE, adv_per_token=layout == "holes")
    _, metrics = kpo_kernels.kpo_loss(**batch, backend=implementations()[impl], **OPTIONS[options])
    check({k: v.cpu() for k, v in metrics.items()}, {k: (v.cpu() if v is not None else None) for k, v in batch.items()}, **OPTIONS[options])


def packed_case(seed):
    """(packed inputs with cu_seqlens, the equivalent right-padded batch): ragged sequences with
    holes, an empty one, garbage under the mask."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [37, 0, 1, 80, 16, 33]
    padded = make_batch(len(lengths), max(lengths), layout="none", seed=seed, garbage=False)
    mask = torch.rand(len(lengths), max(lengths), generator=gen) > 0.25
    mask &= torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    padded["mask"] = mask
    packed = {
        "log_prob": torch.cat([torch.where(mask[i, :n], padded["log_prob"][i, :n], math.nan) for i, n in enumerate(lengths)]),
        "old_log_prob": torch.cat([torch.where(mask[i, :n], padded["old_log_prob"][i, :n], math.inf) for i, n in enumerate(lengths)]),
        "advantages": padded["advantages"][:, None],  # one per sequence
        "mask": torch.cat([mask[i, :n] for i, n in enumerate(lengths)]),
        "cu_seqlens": torch.tensor([0] + lengths).cumsum(0).to(torch.int32),
    }
    return packed, padded


@pytest.mark.parametrize("impl", ["torch", "triton", "triton-tiled"])
@pytest.mark.parametrize("options", ["default", "position", "diffuse", "prior"])
def test_packed_streams(impl, options):
    packed, padded = packed_case(5)
    device_batch = {k: v.to(DEVICE) for k, v in packed.items()}
    _, metrics = kpo_kernels.kpo_loss(**device_batch, backend=implementations()[impl], **OPTIONS[options])
    check({k: v.cpu() for k, v in metrics.items()}, padded, **OPTIONS[options])


def test_float64_torch_backend_is_exact():
    batch = make_batch(6, 50, layout="holes", seed=4, dtype=torch.float64)
    for options in OPTIONS.values():
        _, metrics = kpo_kernels.kpo_loss(**batch, backend="torch", **options)
        check(metrics, batch, rtol=1e-12, **options)


def test_flips_see_the_previous_valid_token_across_blocks_and_tiles():
    """One row whose valid tokens are 3, 40, 41, 100 and 101 (blocks of 16, tiles of 32): every
    pair straddles a block, and two pairs a tile. Raw signs +, -, -, +, 0: raw flips 2 of 4."""
    z = torch.zeros(1, 110)
    z[0, [3, 40, 41, 100, 101]] = torch.tensor([0.5, -0.25, -0.5, 1.0, 0.0])
    mask = z != 0
    mask[0, 101] = True
    for impl in implementations().values():
        _, metrics = kpo_kernels.kpo_loss(z.to(DEVICE), torch.zeros_like(z).to(DEVICE), torch.ones(1, device=DEVICE), mask.to(DEVICE), q=1.0, backend=impl)
        assert float(metrics["sign_flip_pairs"]) == 4
        assert float(metrics["sign_flip_raw"]) == 0.5
        # Filtered with q = 1 (K_1 = 0.5, K_2 = 0.6, ...): 0.25, then -0.05 (flip), -0.32, 0.49 (flip), 0.19.
        assert float(metrics["sign_flip_filtered"]) == 0.5
        batch = {"log_prob": z, "old_log_prob": torch.zeros_like(z), "advantages": torch.ones(1), "mask": mask}
        check({k: v.cpu() for k, v in metrics.items()}, batch, q=1.0)


def test_diffuse_prior_leaves_out_each_first_observation():
    """p0 = inf: S = inf at each sequence's first observation; nis and the log-likelihood are
    means over the other valid tokens, and a one-token sequence contributes nothing."""
    batch = make_batch(4, 20, layout="right", seed=6)
    batch["mask"][2, 1:] = False  # a one-token row
    batch["mask"][3] = False  # an empty row
    for impl in implementations().values():
        _, metrics = kpo_kernels.kpo_loss(**{k: v.to(DEVICE) for k, v in batch.items()}, p0=math.inf, q=1e-2, backend=impl)
        tokens, sequences = int(batch["mask"].sum()), int(batch["mask"].any(1).sum())
        assert float(metrics["innovation_tokens"]) == tokens - sequences
        assert math.isfinite(float(metrics["log_likelihood"]))
        check({k: v.cpu() for k, v in metrics.items()}, batch, p0=math.inf, q=1e-2)


def test_no_valid_token_gives_zeros():
    batch = make_batch(3, 40, layout="right", seed=2)
    batch["mask"][:] = False
    for impl in implementations().values():
        _, metrics = kpo_kernels.kpo_loss(**{k: v.to(DEVICE) for k, v in batch.items()}, backend=impl)
        assert all(float(metrics[name]) == 0.0 for name in DIAGNOSTICS), metrics


def test_clip_fractions_add_up_and_nis_scales_with_r():
    """clipfrac_high + clipfrac_low = clipfrac; nis_mean is inversely proportional to R at a
    fixed Q/R (the innovations do not depend on R), and the sign flips not at all."""
    batch = make_batch(6, 64, layout="holes", seed=8, dtype=torch.float64)
    _, a = kpo_kernels.kpo_loss(**batch, q=1e-3, r=1.0, backend="torch")
    _, b = kpo_kernels.kpo_loss(**batch, q=4e-3, r=4.0, backend="torch")
    assert float(a["clipfrac_high"] + a["clipfrac_low"]) == pytest.approx(float(a["clipfrac"]), rel=1e-12)
    assert float(a["clipfrac_high"]) > 0 and float(a["clipfrac_low"]) > 0
    assert float(b["nis_mean"]) == pytest.approx(float(a["nis_mean"]) / 4, rel=1e-12)
    assert float(b["sign_flip_filtered"]) == float(a["sign_flip_filtered"])
    assert float(a["sign_flip_raw"]) > 0.3 > float(a["sign_flip_filtered"])  # what the paper reports


@pytest.mark.slow  # the multi-tile path runs in every tier in test_padded_layouts' triton-tiled cases
def test_long_rows_many_tiles():
    """Two 3000-token rows with holes, 24 tiles of 128 (blocks of 32), against the reference."""
    batch = make_batch(2, 3000, layout="holes", seed=9, spikes=True)
    impl = triton_backend(block_size=32, tile_size=128)
    for options in ({"q": 1e-4}, {"q": 1e-3, "mask_mode": "position"}):
        _, metrics = kpo_kernels.kpo_loss(**{k: v.to(DEVICE) for k, v in batch.items()}, backend=impl, **options)
        check({k: v.cpu() for k, v in metrics.items()}, batch, rtol=2e-5, **options)
