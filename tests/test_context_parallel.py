"""Context parallelism (kpo_kernels.context_parallel): the loss of sequences split across ranks,
run in real gloo processes on the CPU, against the unsharded loss in one process (docs/math.md
section 7, docs/context-parallel.md)."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

import kpo_kernels
from kpo_kernels.context_parallel import Pieces, context_parallel_kpo_loss, layout_pieces
from kpo_kernels.state import FilterState, advance, compose

from helpers import make_batch

TOKENWISE = ("log_prob", "old_log_prob", "mask", "is_weights")
OPTIONS = {"q": 1e-2, "r": 1e-2, "clip_low": 0.02, "clip_high": 0.03, "dual_clip": 3.0}


def _cases(world):
    """(name, batch builder arguments, loss options) of the sharded calls checked at `world` ranks."""
    cases = []
    for layout in ("zigzag", "contiguous"):
        for mask_mode, p0, agg, holes in (
            ("skip", 0.0, "seq-mean-token-mean", "holes"),
            ("position", math.inf, "token-mean", "right"),
            ("skip", math.inf, "seq-mean-token-sum-norm", "empty_rows"),
            ("position", 0.0, "seq-mean-token-sum", "holes"),
        ):
            options = {**OPTIONS, "mask_mode": mask_mode, "p0": p0, "agg": agg, "backend": "torch"}
            cases.append((f"padded-{layout}-{mask_mode}-{agg}", {"packed": False, "layout": layout, "mask": holes}, options))
            cases.append((f"packed-{layout}-{mask_mode}-{agg}", {"packed": True, "layout": layout, "mask": holes}, options))
        weighted = {"mask": "holes", "per_token": True, "layout": layout}
        options = {**OPTIONS, "agg": "token-mean", "backend": "torch"}
        cases.append((f"padded-{layout}-per-token", {**weighted, "packed": False}, options))
        cases.append((f"packed-{layout}-per-token", {**weighted, "packed": True}, options))
    # metrics="basic": the diagnostics stay out of the combined metrics too.
    basic = {**OPTIONS, "backend": "torch", "metrics": "basic"}
    cases.append(("packed-zigzag-basic", {"packed": True, "layout": "zigzag", "mask": "holes"}, basic))
    # The Triton kernels (under the interpreter on the CPU) in float32, against their own unsharded call.
    triton = {**OPTIONS, "backend": "triton"}
    cases.append(("triton-padded-zigzag", {"packed": False, "layout": "zigzag", "mask": "holes", "dtype": torch.float32}, triton))
    cases.append((
        "triton-packed-contiguous-position", {"packed": True, "layout": "contiguous", "mask": "right", "dtype": torch.float32},
        {**triton, "mask_mode": "position", "p0": math.inf, "agg": "token-mean"},
    ))
    return cases


def _lengths(world, seed):
    """Packed sequence lengths with empty chunks, one-token chunks and a sequence of 0 tokens."""
    chunks = 2 * world
    return [1, chunks + 1, 3 * chunks - 1, 5, 0, 2 * chunks + 3][: 4 + seed % 3] + [17]


def _full(world, spec, seed=3):
    """The unsharded batch: padded (B, T) with T a multiple of 2 world, or packed with cu_seqlens."""
    per_token = spec.get("per_token", False)
    kinds = {"adv_per_token": per_token, "is_weights": per_token, "dtype": spec.get("dtype", torch.float64)}
    if not spec["packed"]:
        batch = make_batch(5, 6 * world, layout=spec["mask"], seed=seed, **kinds)
        return {**batch, "cu_seqlens": None}
    lengths = _lengths(world, seed)
    width = max(lengths)
    batch = make_batch(len(lengths), width, layout=spec["mask"], seed=seed, **kinds)
    keep = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    packed = {name: batch[name][keep] if batch.get(name) is not None else None for name in TOKENWISE}
    packed["advantages"] = batch["advantages"][keep] if per_token else batch["advantages"][:, None]
    packed["cu_seqlens"] = torch.tensor([0] + lengths).cumsum(0)
    return packed


def _chunk_slices(length, layout, rank, world):
    """The token ranges of one sequence that `rank` holds (written out here, independently of
    layout_pieces)."""
    chunks = 2 * world if layout == "zigzag" else world
    size = -(-length // chunks)
    mine = (rank, chunks - 1 - rank) if layout == "zigzag" else (rank,)
    return [slice(min(c * size, length), min((c + 1) * size, length)) for c in mine]


def _shard(full, spec, rank, world):
    """This rank's tensors of the unsharded batch, and the index of each of its tokens in it."""
    if full["cu_seqlens"] is None:
        rows, width = full["log_prob"].shape
        columns = torch.cat([torch.arange(width)[s] for s in _chunk_slices(width, spec["layout"], rank, world)])
        index = (torch.arange(rows)[:, None] * width + columns).reshape(-1)
        local = {name: full[name][:, columns] if full.get(name) is not None else None for name in TOKENWISE}
        per_token = full["advantages"].shape == full["log_prob"].shape
        return {**local, "advantages": full["advantages"][:, columns] if per_token else full["advantages"]}, index
    offsets = full["cu_seqlens"].tolist()
    index = torch.cat([
        torch.arange(start, end)[s]
        for start, end in zip(offsets[:-1], offsets[1:])
        for s in _chunk_slices(end - start, spec["layout"], rank, world)
    ])
    local = {name: full[name][index] if full.get(name) is not None else None for name in TOKENWISE}
    per_token = full["advantages"].shape == full["log_prob"].shape
    advantages = full["advantages"][index] if per_token else full["advantages"]
    return {**local, "advantages": advantages, "cu_seqlens": full["cu_seqlens"]}, index


def _worker(rank, world, path, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        results = {}
        for name, spec, options in _cases(world):
            local, _ = _shard(_full(world, spec), spec, rank, world)
            log_prob = local.pop("log_prob").clone().requires_grad_()
            loss, metrics = context_parallel_kpo_loss(
                log_prob, local.pop("old_log_prob"), local.pop("advantages"), local.pop("mask"), layout=spec["layout"],
                **local, **options,
            )
            loss.backward()
            results[name] = {"loss": loss.detach(), "metrics": metrics, "grad": log_prob.grad}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_sharded_loss_gradient_and_metrics_equal_the_unsharded_call(tmp_path, world):
    mp.spawn(_worker, args=(world, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
    for name, spec, options in _cases(world):
        full = _full(world, spec)
        log_prob = full["log_prob"].clone().requires_grad_()
        loss, metrics = kpo_kernels.kpo_loss(
            log_prob, full["old_log_prob"], full["advantages"], full["mask"], cu_seqlens=full["cu_seqlens"],
            is_weights=full.get("is_weights"), **options
        )
        loss.backward()
        loss = loss.detach()
        expected_grad = log_prob.grad.reshape(-1)
        rtol, atol = (1e-12, 1e-14) if options["backend"] == "torch" else (2e-5, 1e-7)  # float64 / float32 rounding
        total = sum(r[name]["loss"].double() for r in ranks)
        assert float(total) == pytest.approx(float(loss), rel=rtol, abs=atol), name
        grad = torch.full_like(expected_grad, math.nan)
        for rank, result in enumerate(ranks):
            grad[_shard(full, spec, rank, world)[1]] = result[name]["grad"].reshape(-1)
        torch.testing.assert_close(grad, expected_grad, rtol=rtol, atol=atol, msg=name)
        for result in ranks:
            assert set(result[name]["metrics"]) == set(metrics), name
            for metric, value in metrics.items():
                assert float(result[name]["metrics"][metric]) == pytest.approx(float(value), rel=rtol, abs=atol), (name, metric)


def test_layout_pieces_tile_every_sequence_once():
    lengths = torch.tensor([0, 1, 2, 7, 8, 9, 31])
    for layout, world in (("zigzag", 1), ("zigzag", 3), ("contiguous", 4)):
        pieces = [layout_pieces(layout, lengths, rank, world) for rank in range(world)]
        for s, length in enumerate(lengths.tolist()):
            found = sorted(
                (int(p.order[i]), int(p.lengths[i])) for p in pieces for i in range(p.lengths.numel()) if int(p.sequence[i]) == s
            )
            assert sum(size for _, size in found) == length
            expected = [s_.stop - s_.start for rank in range(world) for s_ in _chunk_slices(length, layout, rank, world)]
            assert sorted(size for _, size in found) == sorted(expected)


def test_chunks_in_turns_equal_the_whole_sequence():
    """One process, two 2^17-token responses filtered (and their loss computed) in 7 uneven
    chunks with the carried state."""
    gen = torch.Generator().manual_seed(0)
    length = 2**17
    z = (torch.randn(2, length, generator=gen, dtype=torch.float64) * 0.05).cumsum(-1) * 0.01
    z = z + torch.randn(2, length, generator=gen, dtype=torch.float64) * 0.1
    mask = torch.rand(2, length, generator=gen) > 0.1
    for mask_mode in ("skip", "position"):
        kwargs = {"q": 1e-5, "r": 1e-2, "mask_mode": mask_mode, "backend": "torch"}
        whole = kpo_kernels.kalman_filter(z, mask, **kwargs)
        cuts = [0, 1, 1000, 1001, 65535, 65536 + 17, 100000, length]
        state, pieces = None, []
        for start, end in zip(cuts[:-1], cuts[1:]):
            part, state = kpo_kernels.kalman_filter(z[:, start:end], mask[:, start:end], initial_state=state, return_state=True, **kwargs)
            pieces.append(part)
        torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=0, atol=1e-13)
        _, final = kpo_kernels.kalman_filter(z, mask, return_state=True, **kwargs)
        torch.testing.assert_close(state.x, final.x, rtol=0, atol=1e-13)
        assert torch.equal(state.count, final.count) and torch.equal(state.last_sign, final.last_sign)

        # The loss in the same chunks: token sums add up, every metric's numerator too.
        old = -torch.rand(2, length, generator=gen, dtype=torch.float64)
        advantages = torch.tensor([1.0, -0.5], dtype=torch.float64)
        loss_kwargs = {**kwargs, "agg": "token-sum", "clip_low": 0.01, "clip_high": 0.01}
        whole_loss, whole_metrics = kpo_kernels.kpo_loss(old + z, old, advantages, mask, **loss_kwargs)
        state, total, sums = None, 0.0, {}
        for start, end in zip(cuts[:-1], cuts[1:]):
            part = slice(start, end)
            loss, metrics, state = kpo_kernels.kpo_loss(
                (old + z)[:, part], old[:, part], advantages, mask[:, part], initial_state=state, return_state=True, **loss_kwargs
            )
            total += float(loss)
            for name, denominator in (("clipfrac", "num_tokens"), ("log_likelihood", "innovation_tokens"),
                                      ("sign_flip_filtered", "sign_flip_pairs")):
                sums[name] = sums.get(name, 0.0) + float(metrics[name] * metrics[denominator])
                sums[denominator] = sums.get(denominator, 0.0) + float(metrics[denominator])
        assert total == pytest.approx(float(whole_loss), rel=1e-11)
        for name, denominator in (("clipfrac", "num_tokens"), ("log_likelihood", "innovation_tokens"),
                                  ("sign_flip_filtered", "sign_flip_pairs")):
            assert sums[denominator] == float(whole_metrics[denominator])
            assert sums[name] / sums[denominator] == pytest.approx(float(whole_metrics[name]), rel=1e-11, abs=1e-14)


def test_composed_maps_equal_the_maps_of_the_whole():
    batch = make_batch(4, 40, layout="holes", seed=1, dtype=torch.float64)
    backend = kpo_kernels.TorchBackend()
    for mask_mode in ("skip", "position"):
        options = kpo_kernels.validation.check_filter_params(q=1e-3, r=1.0, p0=math.inf, x0=0.1, mask_mode=mask_mode)
        z = batch["log_prob"] - batch["old_log_prob"]
        count = torch.zeros(4, dtype=torch.int64)
        whole = backend.chunk_maps(z, None, batch["mask"], options, None, count)
        first = backend.chunk_maps(z[:, :13], None, batch["mask"][:, :13], options, None, count)
        second = backend.chunk_maps(z[:, 13:], None, batch["mask"][:, 13:], options, None, first.count)
        for got, expected in zip(compose(first, second), whole):
            torch.testing.assert_close(got.to(expected.dtype), expected, rtol=0, atol=1e-15)
        start = FilterState.start(4, 0.1)
        assert torch.equal(advance(advance(start, first), second).last_sign, advance(start, whole).last_sign)


def test_bad_arguments_are_refused_by_name():
    z = torch.zeros(2, 6)
    with pytest.raises(TypeError, match="initial_state"):
        context_parallel_kpo_loss(z, z, torch.zeros(2), initial_state=None)
    with pytest.raises(TypeError, match="initial_state must be a kpo_kernels.FilterState"):
        kpo_kernels.kalman_filter(z, initial_state=(0, 0, 0))
    state = FilterState.start(2)
    with pytest.raises(ValueError, match=r"initial_state.x has shape \(3,\), expected \(2,\)"):
        kpo_kernels.kalman_filter(z, initial_state=FilterState.start(3))
    with pytest.raises(ValueError, match="initial_state.count must be >= 0"):
        kpo_kernels.kalman_filter(z, initial_state=state._replace(count=torch.tensor([0, -1])))
    with pytest.raises(ValueError, match="last_sign must be a sign code"):
        kpo_kernels.kalman_filter(z, initial_state=state._replace(last_sign=torch.tensor([0, 10], dtype=torch.int8)))
    with pytest.raises(TypeError, match="initial_state.count must be an integer tensor"):
        kpo_kernels.kalman_filter(z, initial_state=state._replace(count=torch.zeros(2)))
    with pytest.raises(TypeError, match="return_state"):
        kpo_kernels.kalman_filter(z, return_state="yes")
    assert isinstance(Pieces(torch.zeros(1), torch.zeros(1), torch.zeros(1), 1), tuple)


def test_bad_pieces_are_refused_by_name(tmp_path):
    """A one-process gloo group in this process: the checks of a Pieces layout's values."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        z = torch.zeros(5)
        good = Pieces(torch.tensor([2, 3]), torch.tensor([0, 1]), torch.tensor([0, 0]), 2)
        loss, _ = context_parallel_kpo_loss(z, z, torch.ones(2, 1), layout=good)
        assert float(loss) == -1.0  # ratio 1, advantage 1, the mean over sequences
        cases = [
            (good._replace(lengths=torch.tensor([6, -1])), ValueError, "Pieces.lengths must be >= 0"),
            (good._replace(sequence=torch.tensor([0, 2])), ValueError, r"Pieces.sequence must be in 0..1"),
            (good._replace(order=torch.tensor([0, -3])), ValueError, "Pieces.order must be >= 0"),
            (good._replace(sequence=torch.tensor([1, 1])), ValueError, "the same \\(sequence, order\\)"),
            (good._replace(lengths=torch.tensor([2.0, 3.0])), TypeError, "Pieces.lengths must be a 1-D integer tensor"),
            (good._replace(order=torch.tensor([0])), ValueError, "Pieces.order has 1 entries"),
            (good._replace(num_sequences=-1), ValueError, "Pieces.num_sequences must be an int >= 0"),
            (good._replace(lengths=torch.tensor([2, 2])), ValueError, "the pieces hold 4 tokens, log_prob 5"),
        ]
        for pieces, error, words in cases:
            with pytest.raises(error, match=words):
                context_parallel_kpo_loss(z, z, torch.ones(2, 1), layout=pieces)
    finally:
        dist.destroy_process_group()
