"""Checks that need a GPU: run by benchmarks/gpu_check.sh on a lent H100/H200, skipped elsewhere."""

import pytest
import torch

import kpo_kernels
from kpo_kernels import tables
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
    flat["advantages"] = batch["advantages"][:, None]  # packed: (S, 1) per sequence
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
        basic, _ = kpo_kernels.kpo_loss(log_prob, **batch, metrics="basic")
        basic.backward()
        # An int64 mask (verl's): its values checked by the forward, asserted asynchronously.
        loss, metrics = kpo_kernels.kpo_loss(log_prob, **{**batch, "mask": batch["mask"].long()})
        loss.backward()
        # The per-step noise fit of a padded batch (estimate_noise reads nothing back off the CPU).
        fit = kpo_kernels.estimate_noise((log_prob - batch["old_log_prob"]).detach(), batch["mask"], max_tokens=6000)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss) and torch.isfinite(basic) and int(fit.status) in (0, 1, 2, 3)


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


def _step(log_prob, old_log_prob, advantages, mask, cu_seqlens=None):
    loss, metrics = kpo_kernels.kpo_loss(log_prob, old_log_prob, advantages, mask, cu_seqlens=cu_seqlens, dual_clip=3.0)
    return loss, torch.stack([metrics[name] for name in kpo_kernels.METRIC_NAMES])


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_compiled_step_on_cuda_matches_eager(packed):
    torch._dynamo.reset()
    batch = make_batch(16, 700, layout="holes", seed=4, device="cuda")
    cu = None
    if packed:
        batch = {k: v.reshape(-1) if v is not None and v.dim() == 2 else v for k, v in batch.items()}
        batch["advantages"] = batch["advantages"][:, None]
        cu = torch.arange(0, 16 * 700 + 1, 700, dtype=torch.int32, device="cuda")
    compiled = torch.compile(_step, fullgraph=True)
    results = []
    for step in (_step, compiled):
        log_prob = batch["log_prob"].clone().requires_grad_()
        loss, metrics = step(log_prob, batch["old_log_prob"], batch["advantages"], batch["mask"], cu)
        loss.backward()
        results.append((loss.detach(), metrics, log_prob.grad))
    for name, a, b in zip(("loss", "metrics", "grad"), results[1], results[0]):
        assert_close(name, a, b, rtol=1e-6)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_cuda_graph_replay_matches_eager(packed):
    """Forward + backward captured once (after `prepare`, which builds and pins the tables, and a
    warm-up call that compiles the kernels), replayed on new values copied into the captured
    inputs after other noise settings and a longer batch have pushed the cache past its budget."""
    rows, length = 8, 1000
    cu = torch.arange(0, rows * length + 1, length, dtype=torch.int32, device="cuda") if packed else None

    def fresh(seed):
        batch = make_batch(rows, length, layout="holes", seed=seed, device="cuda", garbage=False)
        if packed:
            batch = {k: v.reshape(-1) if v is not None and v.dim() == 2 else v for k, v in batch.items()}
            batch["advantages"] = batch["advantages"][:, None]
        return batch

    static = {k: v.clone() for k, v in fresh(0).items()}
    log_prob = static["log_prob"].requires_grad_()

    def step():
        log_prob.grad = None
        loss, metrics = _step(log_prob, static["old_log_prob"], static["advantages"], static["mask"], cu)
        loss.backward()
        return loss, metrics

    pinned = kpo_kernels.prepare(length, tokens=rows * length if packed else None, q=1e-6, device="cuda")
    builds = tables.cache.builds
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, metrics = step()
    grad = log_prob.grad
    assert tables.cache.builds == builds  # prepare covered the warm-up and the capture
    kpo_kernels.kalman_filter(torch.zeros(1, 4 * rows * length, device="cuda"), q=1e-6)  # longer tables
    for i in range(200):  # 512 KiB of float32 gains each: over the 64 MiB budget
        kpo_kernels.kalman_filter(torch.zeros(1, 1 << 17, device="cuda"), q=1e-10 * (1 + i / 100))
    assert tables.cache.nbytes(torch.device("cuda")) <= max(64 << 20, tables.cache.nbytes(torch.device("cuda"), pinned=True))
    for seed in (1, 2):
        new = fresh(seed)
        with torch.no_grad():
            for k in static:
                static[k].copy_(new[k])
        graph.replay()
        eager_lp = new["log_prob"].clone().requires_grad_()
        want_loss, want_metrics = _step(eager_lp, new["old_log_prob"], new["advantages"], new["mask"], cu)
        want_loss.backward()
        assert_close("loss", loss, want_loss, rtol=1e-6)
        assert_close("metrics", metrics, want_metrics, rtol=1e-6)
        assert_close("grad", grad, eager_lp.grad, rtol=1e-6)
    del graph
    pinned.release()
    kpo_kernels.release_tables()


def test_losses_on_two_streams_at_once_match_each_alone():
    """The fused forward's last program finalizes once a count of finished programs says so, a
    count per stream (triton_launch.FinishCounters): losses of many tiles launched on two streams
    at once give, bit for bit, what each gives alone, and every count is back at 0."""
    from kpo_kernels.backends.triton_launch import FINISH_COUNTERS

    backend = kpo_kernels.TritonBackend(tile_size=256)
    batches = [make_batch(16, 4096, layout="holes", seed=seed, device="cuda", garbage=False) for seed in (3, 4)]

    def run(batch):
        log_prob = batch["log_prob"].clone().requires_grad_()
        loss, metrics = kpo_kernels.kpo_loss(log_prob, batch["old_log_prob"], batch["advantages"], batch["mask"],
                                             backend=backend)
        loss.backward()
        return loss.detach(), torch.stack([metrics[k] for k in sorted(metrics)]), log_prob.grad

    want = [run(batch) for batch in batches]
    streams = [torch.cuda.Stream() for _ in batches]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    results = []
    for _ in range(20):
        for stream, batch in zip(streams, batches):
            with torch.cuda.stream(stream):
                results.append(run(batch))
    for stream in streams:
        torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for i, got in enumerate(results):
        for name, value, expected in zip(("loss", "metrics", "grad"), got, want[i % 2]):
            assert torch.equal(value.nan_to_num(), expected.nan_to_num()), (i, name)
    assert all(count.tolist() == [0, 0] for count in FINISH_COUNTERS._counts.values())


@pytest.mark.parametrize("case", ["mask", "offsets"])
def test_values_checked_by_the_kernels_fail_the_next_synchronisation(case):
    """On CUDA the forward checks an int64 mask as it reads it, the tile-offsets kernel packed
    offsets, each asserted asynchronously (TritonBackend.checks_mask_values,
    checks_cu_seqlens_values): a mask value of 2, offsets ending past the tokens, fail the next
    synchronising call with a device-side assertion. In a child process: a device-side assertion
    leaves the CUDA context unusable."""
    import subprocess
    import sys

    call = {
        "mask": "mask = torch.ones(4, 300, dtype=torch.int64, device='cuda'); mask[2, 77] = 2\n"
                "x = torch.zeros(4, 300, device='cuda')\n"
                "loss, _ = kpo_kernels.kpo_loss(x, x, torch.ones(4, device='cuda'), mask, backend='triton')\n",
        "offsets": "x = torch.zeros(1200, device='cuda')\n"
                   "cu = torch.tensor([0, 300, 900, 1201], dtype=torch.int32, device='cuda')\n"
                   "loss, _ = kpo_kernels.kpo_loss(x, x, torch.ones(3, 1, device='cuda'), cu_seqlens=cu, backend='triton')\n",
    }[case]
    script = "import torch, kpo_kernels\n" + call + "print('launched', flush=True)\ntorch.cuda.synchronize()\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "launched" in proc.stdout and proc.returncode != 0, (proc.stdout, proc.stderr[-2000:])
    assert "device-side assert" in proc.stderr or "must" in proc.stderr, proc.stderr[-2000:]


def test_opcheck_on_cuda():
    from kpo_kernels import dispatch, ops, validation

    batch = make_batch(3, 50, layout="holes", seed=5, device="cuda")
    key = dispatch.backend_key(dispatch.resolve_backend("triton", torch.device("cuda"), torch.float32))
    checked = validation.check_token_batch(batch["log_prob"], batch["old_log_prob"], batch["advantages"], batch["mask"], None)
    options = validation.check_loss_options(
        q=1e-6, r=1.0, p0=0.0, x0=0.0, mask_mode="skip", clip=True, clip_low=3e-4, clip_high=4e-4, dual_clip=None,
        log_ratio_cap=10.0, agg="seq-mean-token-mean", dp_size=1, batch_num_tokens=None, global_batch_size=None,
        loss_scale_factor=None,
    )
    args = ops.loss_arguments(checked, None, options, key, True)
    torch.library.opcheck(torch.ops.kpo_kernels.kpo_loss.default, args)
    z = batch["log_prob"] - batch["old_log_prob"]
    filter_options = validation.check_filter_params(q=1e-2, r=1.0, p0=0.0, x0=0.0)
    filter_args = ops.filter_arguments(z, batch["mask"], None, None, filter_options, key)
    torch.library.opcheck(torch.ops.kpo_kernels.kalman_filter.default, filter_args)
