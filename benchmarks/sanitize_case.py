"""Small fused forward + backward cases for compute-sanitizer (benchmarks/gpu_check.sh).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 -m benchmarks.sanitize_case

Every Triton kernel of the package (filter, fused loss forward, finalize, backward) runs on small
batches whose lengths are not multiples of the block, with right padding, interior holes, no
mask, an empty row, packed sequences (`cu_seqlens`, one empty), rows split into tiles, per-row
and per-token advantages, rollout weights, dual clip, position mode, float32 and bfloat16, and
block sizes 16, 32, 64 and the default. Each result is compared with
the torch backend (float64 arithmetic, on the CPU); the exit status is 1 if any differs. With the caching
allocator off, every tensor is its own allocation, so memcheck sees an access one element past
any of them. Without CUDA it runs the same cases under TRITON_INTERPRET=1 (a dry run).
"""

import argparse
import sys

import torch

import kpo_kernels


def _mask(kind, rows, length, gen):
    if kind == "none":
        return None
    lengths = torch.randint(1, length + 1, (rows,), generator=gen)
    lengths[0] = length
    mask = torch.arange(length)[None, :] < lengths[:, None]
    if kind == "holes":
        mask[:, length // 3 : length // 3 + 17] = False
        mask[-1] = False  # an empty row
    return mask


def cases():
    yield dict(mask="right", dtype=torch.float32, block=16)
    yield dict(mask="holes", dtype=torch.float32, block=64, adv_per_token=True, is_weights=True)
    yield dict(mask="none", dtype=torch.float32, block=None, dual_clip=3.0)
    yield dict(mask="right", dtype=torch.bfloat16, block=None, agg="token-mean")
    yield dict(mask="holes", dtype=torch.bfloat16, block=16, mask_mode="position", agg="seq-mean-token-sum-norm")
    yield dict(mask="right", dtype=torch.float32, block=None, rows=2, length=5000)  # few long rows
    yield dict(mask="holes", dtype=torch.float32, block=32, tile=96, rows=3, length=1000)  # rows split in tiles
    yield dict(mask="packed", dtype=torch.float32, block=64, tile=128, adv_per_token=True)  # cu_seqlens
    yield dict(mask="packed", dtype=torch.bfloat16, block=None)


def _packed(gen, sequences=6, longest=700):
    lengths = torch.randint(0, longest + 1, (sequences,), generator=gen)
    lengths[1] = 0  # an empty sequence
    cu_seqlens = torch.zeros(sequences + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)
    return cu_seqlens


def run_case(spec, device, gen):
    dtype = spec["dtype"]
    cu_seqlens = _packed(gen) if spec["mask"] == "packed" else None
    if cu_seqlens is None:
        rows, length = spec.get("rows", 5), spec.get("length", 301)
        shape, sequences = (rows, length), rows
        mask = _mask(spec["mask"], rows, length, gen)
    else:
        shape, sequences = (int(cu_seqlens[-1]),), cu_seqlens.numel() - 1
        mask = torch.rand(shape, generator=gen) > 0.1  # holes inside packed sequences
    old = -torch.rand(shape, generator=gen) * 3
    new = old + torch.randn(shape, generator=gen) * 0.05
    adv = torch.randn(shape, generator=gen) if spec.get("adv_per_token") else torch.randn(sequences, 1, generator=gen)
    weights = torch.rand(shape, generator=gen) if spec.get("is_weights") else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    new, old, adv, mask, weights = to(new.to(dtype)), to(old.to(dtype)), to(adv.to(dtype)), to(mask), to(weights)
    cu_seqlens = to(cu_seqlens)
    kwargs = dict(
        q=1e-3, dual_clip=spec.get("dual_clip"), agg=spec.get("agg", "seq-mean-token-mean"),
        mask_mode=spec.get("mask_mode", "skip"), is_weights=weights, clip_low=0.2, clip_high=0.28,
        cu_seqlens=cu_seqlens,
    )
    results = {}
    triton = kpo_kernels.TritonBackend(block_size=spec["block"], tile_size=spec.get("tile"))
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731 - the torch backend runs on the CPU:
    # under compute-sanitizer only the Triton kernels are on the GPU
    for name, backend, move in (("triton", triton, lambda t: t), ("torch", "torch", cpu)):
        args = {k: move(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        log_prob = move(new).detach().clone().requires_grad_()
        loss, metrics = kpo_kernels.kpo_loss(log_prob, move(old), move(adv), move(mask), backend=backend, **args)
        loss.backward()
        x = kpo_kernels.kalman_filter((move(new) - move(old)).float(), move(mask), q=1e-3,
                                      mask_mode=kwargs["mask_mode"], cu_seqlens=args["cu_seqlens"], backend=backend)
        results[name] = (loss.detach(), torch.stack(list(metrics.values())), log_prob.grad, x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps  # both round to bf16: 2 units
    errors = []
    for got, want in zip(results["triton"], results["torch"]):
        got, want = got.double().cpu(), want.double().cpu()
        scale = max(float(want.abs().max()), 1e-30)
        errors.append(float((got - want).abs().max()) / scale if got.numel() else 0.0)
    ok = all(e <= tol for e in errors)  # NaN fails
    label = ", ".join(f"{k}={v if not isinstance(v, torch.dtype) else str(v).split('.')[-1]}" for k, v in spec.items())
    print(f"{'ok  ' if ok else 'FAIL'} {label}: loss {errors[0]:.1e} metrics {errors[1]:.1e} "
          f"grad {errors[2]:.1e} filter {errors[3]:.1e}", flush=True)
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sanitize_case", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gen = torch.Generator().manual_seed(0)
    ok = all([run_case(spec, device, gen) for spec in cases()])
    print("all cases agree with the torch backend" if ok else "MISMATCH", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
