"""Checks that need a GPU: run by benchmarks/gpu_check.sh on a lent H100/H200, skipped elsewhere."""

import pytest
import torch

import kpo_kernels
from helpers import assert_close, make_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("q", [1e-9, 1e-6, 1e-2])
def test_one_sequence_of_2_to_the_20_tokens_on_the_chunk_parallel_path(q):
    """Exact and finite for one 2^20-token sequence (the few-long-rows path, chosen by default)."""
    n = 1 << 20
    gen = torch.Generator().manual_seed(1)
    z = (torch.randn(n, generator=gen, dtype=torch.float64) * 0.1 + 0.01).cuda()
    mask = (torch.rand(n, generator=gen) > 0.05).cuda()
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    want = kpo_kernels.kalman_filter(z, mask, q=q, cu_seqlens=cu, backend="torch")  # float64, exact
    for layout in ("packed", "padded"):
        if layout == "packed":
            got = kpo_kernels.kalman_filter(z.float(), mask, q=q, cu_seqlens=cu, backend="triton")
        else:
            got = kpo_kernels.kalman_filter(z.float()[None], mask[None], q=q, backend="triton")[0]
        assert torch.isfinite(got).all()
        assert_close(f"{layout} filter", got, want, rtol=1e-5)


def test_no_host_synchronisation():
    """kpo_loss forward and backward on CUDA never wait for the device (padded and packed)."""
    batch = make_batch(8, 3000, layout="holes", seed=2, device="cuda", garbage=False)
    log_prob = batch.pop("log_prob").requires_grad_()
    flat = {k: v.reshape(-1) if v is not None and v.dim() == 2 else v for k, v in batch.items()}
    flat["advantages"] = batch["advantages"]
    cu = torch.arange(0, 8 * 3000 + 1, 3000, dtype=torch.int32, device="cuda")
    kpo_kernels.kpo_loss(log_prob, **batch)  # warm up: compile kernels, build gain tables
    kpo_kernels.kpo_loss(log_prob.reshape(-1), **flat, cu_seqlens=cu, backend=kpo_kernels.TritonBackend())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, metrics = kpo_kernels.kpo_loss(log_prob, **batch, dual_clip=3.0)
        loss.backward()
        loss, metrics = kpo_kernels.kpo_loss(log_prob.reshape(-1), **flat, cu_seqlens=cu)
        loss.backward()
        # Global counts that stay on the device (e.g. an all-reduced token count).
        count = batch["mask"].sum() * 2
        loss, metrics = kpo_kernels.kpo_loss(log_prob, **batch, agg="token-mean", dp_size=2, batch_num_tokens=count)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


def test_default_tiling_matches_whole_rows():
    """The automatic few-long-rows tiling gives the same loss and gradient as whole rows."""
    batch = make_batch(2, 40000, layout="holes", seed=3, device="cuda")
    results = []
    for impl in (kpo_kernels.TritonBackend(), kpo_kernels.TritonBackend(tile_size=1 << 20)):
        log_prob = batch["log_prob"].clone().requires_grad_()
        rest = {k: v for k, v in batch.items() if k != "log_prob"}
        loss, _ = kpo_kernels.kpo_loss(log_prob, **rest, q=1e-4, backend=impl)
        loss.backward()
        results.append((loss.detach(), log_prob.grad))
    assert_close("loss", results[0][0], results[1][0], rtol=1e-5)
    assert_close("grad", results[0][1], results[1][1], rtol=1e-5)
