"""Public entry points: `kalman_filter`, `kalman_gains`, `kpo_loss`, `KPOLoss`, `prepare`.

They check shapes, dtypes, devices and Python options, choose the backend and call the custom ops
of `ops` (which check values and run the backends): nothing here looks at the data, so a compiled
step traces them without graph breaks.
"""

import inspect

import torch

from . import ops, tables
from .backends import expand_rows
from .dispatch import backend_key, check_backend_argument, resolve_backend
from .gains import gain_schedule
from .options import DIAGNOSTIC_METRICS, METRIC_NAMES
from .state import ChunkMaps, FilterState, advance, check_state
from .validation import (
    check_bool,
    check_count,
    check_count_devices,
    check_device,
    check_tensor_device,
    check_cu_seqlens,
    check_filter_params,
    check_loss_options,
    check_mask,
    check_token_batch,
    check_tokens,
    compiling,
)


def kalman_filter(
    log_ratio,
    mask=None,
    *,
    q=1e-6,
    r=1.0,
    p0=0.0,
    x0=0.0,
    mask_mode="skip",
    cu_seqlens=None,
    initial_state=None,
    return_state=False,
    backend="auto",
):
    """Causal Kalman-filtered log-ratio of every token (docs/math.md section 2).

    Args:
        log_ratio: (B, T) per-token log pi/pi_old of B responses, or (N,) packed sequences with
            `cu_seqlens`; float16, bfloat16, float32 or float64, any strides. Values under the
            mask are never read (NaN there is fine); NaN or inf at a valid token propagates.
        mask: None (every token valid) or the shape of `log_ratio`; bool, or numbers that are all
            0 or 1.
        q, r: process noise Q >= 0 and observation noise R > 0 (only Q / R matters for the
            filtered value). Default 1e-6, 1.0.
        p0: prior variance P0 >= 0 (inf: diffuse prior). Default 0.0.
        x0: prior log-ratio, finite. Default 0.0.
        mask_mode: "skip" (masked tokens are invisible to the filter, default) or "position"
            (they are observations 0 at their position).
        cu_seqlens: int32 or int64 (S + 1,) offsets of packed sequences (flash-attention varlen), with a
            1-D `log_ratio`.
        initial_state: None (each sequence starts from x0), or a `FilterState` of (B,) / (S,)
            tensors: the state each sequence enters this call with, when its earlier tokens
            were filtered before (docs/math.md section 7; x0 is then not used).
        return_state: also return the `FilterState` after each sequence's last token, to pass
            as `initial_state` of the call with the sequences' next tokens.
        backend: "auto" (Triton for CUDA tensors up to float32, torch otherwise), "torch", "triton" or a
            `Backend` instance.

    Returns:
        A tensor of `log_ratio`'s shape on its device: float32 (float64 for float64 input on the
        torch backend), 0 at masked tokens. Not differentiable. With `return_state`, the pair
        (filtered, final FilterState).

    Raises:
        TypeError, ValueError: a bad shape, dtype, device or option, naming the argument, before
            any kernel runs (docs/api.md "Ranges" gives every accepted range). On CUDA, mask or
            cu_seqlens values that are wrong are caught on the device without a sync: a
            RuntimeError at the next synchronisation.
    """
    options = check_filter_params(q=q, r=r, p0=p0, x0=x0, mask_mode=mask_mode)
    check_tokens("log_ratio", log_ratio, cu_seqlens)
    check_tensor_device("log_ratio", log_ratio.device)
    cu_seqlens = check_cu_seqlens(cu_seqlens, log_ratio.shape[0], log_ratio.device)
    mask = check_mask(mask, log_ratio.shape, log_ratio.device)
    num_sequences = log_ratio.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    state = check_state(initial_state, num_sequences, log_ratio.device)
    return_state = check_bool("return_state", return_state)
    impl = resolve_backend(backend, log_ratio.device, log_ratio.dtype)
    if not compiling():  # compiled: the op checks (see ops.filter_arguments)
        impl.check_options(options)
    arguments = ops.filter_arguments(log_ratio.detach(), mask, cu_seqlens, state, options, backend_key(impl))
    filtered = torch.ops.kpo_kernels.kalman_filter(*arguments)
    if not return_state:
        return filtered
    return filtered, _final_state(log_ratio.detach(), None, mask, cu_seqlens, state, options, impl, num_sequences)


def _final_state(log_prob, old_log_prob, mask, cu_seqlens, state, options, impl, num_sequences):
    """The FilterState after the call's tokens: the entering one (or the start) advanced by the
    chunk maps of the call's tokens (docs/math.md section 7)."""
    if state is None:
        state = FilterState.start(num_sequences, options.x0, device=log_prob.device)
    maps = torch.ops.kpo_kernels.kalman_chunk_maps(
        log_prob, old_log_prob, mask, cu_seqlens, state.count, float(options.q), float(options.r), float(options.p0),
        options.skip, backend_key(impl),
    )
    return advance(state, ChunkMaps(*maps))


def kalman_gains(n, *, q=1e-6, r=1.0, p0=0.0):
    """The Kalman gains K_1..K_n: K_n is the gain at a sequence's n-th valid token.

    The gains depend only on the observation count, never on the data (docs/math.md section 2).

    Args:
        n: number of gains, an int >= 0.
        q, r, p0: process noise, observation noise and prior variance, as in `kalman_filter`.

    Returns:
        A float64 CPU tensor of shape (n,), accurate to a few float64 ulps of the recursion over
        every accepted (q, r, p0); never NaN.

    Raises:
        TypeError, ValueError: `n`, `q`, `r` or `p0` of the wrong kind or out of range
            (docs/api.md "Ranges").
    """
    n = check_count("n", n)
    check_filter_params(q=q, r=r, p0=p0, x0=0.0)
    return gain_schedule(n, q, r, p0)


class _KPOLossFunction(torch.autograd.Function):
    """Autograd of the fused loss: forward is the `kpo_loss` op (loss, metrics and the stored
    per-token derivative D); backward scales D by grad_output and the row weights
    (`kpo_loss_backward` op).

    Double backward is exact: by the stop-gradient trick d rt / d log_prob = rt, so the gradient
    g = w_row * D * exp(log_prob - sg(log_prob)) has the derivative g itself (the surrogate's
    Hessian is diagonal); with create_graph=True (or under torch.func) backward forms g from
    differentiable torch ops instead of the backward op.
    """

    @staticmethod
    def forward(*arguments):
        return torch.ops.kpo_kernels.kpo_loss(*arguments)

    @staticmethod
    def setup_context(ctx, inputs, output):
        log_prob, cu_seqlens, backend, need_grad = inputs[0], inputs[5], inputs[-2], inputs[-1]
        _, metrics, grad, row_scale, plan = output
        ctx.backend, ctx.need_grad, ctx.dtype = backend, need_grad, log_prob.dtype
        ctx.save_for_backward(log_prob, grad, row_scale, cu_seqlens, plan)
        ctx.mark_non_differentiable(metrics, grad, row_scale, plan)
        # The non-differentiable outputs get no zero-filled gradients (on a GPU a full-size fill
        # of the stored derivative's shape cost 7 us of a 108 us step at 512 x 8192).
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if grad_loss is None:  # nothing flows back through the loss
            return (None,) * len(ctx.needs_input_grad)
        log_prob, grad, row_scale, cu_seqlens, plan = ctx.saved_tensors
        if not ctx.need_grad:
            raise RuntimeError("kpo_loss: backward through a forward that ran without a gradient")
        wrapped = not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(grad_loss)
        if not torch.is_grad_enabled() and not wrapped:
            d_log_prob = torch.ops.kpo_kernels.kpo_loss_backward(grad, row_scale, grad_loss, cu_seqlens, plan, ctx.dtype,
                                                                 ctx.backend)
        else:
            scale = expand_rows(row_scale.to(grad_loss.dtype) * grad_loss, log_prob.shape, cu_seqlens)
            # Only where the gradient is not 0: elsewhere log_prob may be garbage (NaN under
            # the mask), which must not leak into the second derivative.
            delta = torch.where(grad != 0, log_prob - log_prob.detach(), 0.0)
            d_log_prob = (grad.to(scale.dtype) * scale * torch.exp(delta).to(scale.dtype)).to(ctx.dtype)
        return (d_log_prob,) + (None,) * (len(ctx.needs_input_grad) - 1)

    @staticmethod
    def vmap(info, in_dims, *arguments):
        raise NotImplementedError(ops.VMAP_MESSAGE)


def prepare(length, *, tokens=None, q=1e-6, r=1.0, p0=0.0, device="cuda", backend="auto"):
    """Build and pin, ahead of time, the tables that later calls will read (docs/compiled-steps.md).

    A call's first use of a (q, r, p0) otherwise builds its tables then. Call this before
    capturing a CUDA graph, so that nothing is built during capture and nothing a graph reads is
    freed: the tables stay pinned (never evicted or replaced) until the handle is released.

    Args:
        length: the longest sequence: T of a padded (B, T) batch, or the longest sequence of a
            packed batch whose cu_seqlens are on the CPU (an int >= 1).
        tokens: the largest token count N of a packed batch whose cu_seqlens are on `device`
            (its tables are sized by N, known without a host sync; a table that reaches the
            saturation index serves any N); None if there are none.
        q, r, p0: the noise settings the calls will use, as in `kalman_filter`.
        device: where the calls run. Default "cuda".
        backend: the `backend` argument the calls will pass; tables are built for the backend it
            picks on `device`, for float32 and float64 inputs.

    Returns:
        A `kpo_kernels.tables.PinnedTables` handle (also a context manager): its tables count
        toward the cache's 64 MiB per device (and may exceed it alone) until its `release()` or
        `kpo_kernels.release_tables()`; release once no graph that read them is replayed. Calls
        during a capture also pin what they read (see `kpo_kernels.tables`).

    Raises:
        TypeError, ValueError: a bad `length`, `tokens`, noise setting, device or backend.
    """
    length = check_count("length", length, minimum=1)
    tokens = None if tokens is None else check_count("tokens", tokens, minimum=1)
    options = check_filter_params(q=q, r=r, p0=p0, x0=0.0)
    device = check_device("device", device)
    pinned = tables.PinnedTables(tables.cache)
    with tables.cache.pinning(pinned):
        for dtype in (torch.float32, torch.float64):
            impl = resolve_backend(backend, device, dtype)
            for longest in (length,) if tokens is None else (length, tokens):
                impl.prepare(longest, options.q, options.r, options.p0, device)
    return pinned


def kpo_loss(
    log_prob,
    old_log_prob,
    advantages,
    mask=None,
    *,
    q=1e-6,
    r=1.0,
    p0=0.0,
    x0=0.0,
    clip=True,
    clip_low=3e-4,
    clip_high=4e-4,
    dual_clip=None,
    log_ratio_cap=10.0,
    agg="seq-mean-token-mean",
    mask_mode="skip",
    is_weights=None,
    dp_size=1,
    batch_num_tokens=None,
    global_batch_size=None,
    loss_scale_factor=None,
    cu_seqlens=None,
    initial_state=None,
    return_state=False,
    metrics="full",
    backend="auto",
):
    """The KPO policy loss: the clipped surrogate of the Kalman-filtered token ratio.

    The filter runs over each response's log-ratios `log_prob - old_log_prob` (docs/math.md
    section 2); its ratio enters the surrogate with a stop-gradient (section 3); the per-token
    losses are aggregated as verl's `agg_loss` does (section 4). Every argument, with examples:
    docs/api.md.

    Args:
        log_prob: (B, T) current-policy log-probabilities, or (N,) packed with `cu_seqlens`;
            float16, bfloat16, float32 or float64. The only input that gets a gradient.
        old_log_prob: behaviour-policy log-probabilities, the shape of `log_prob`.
        advantages: (B,) or (B, 1) per response, or (B, T) per token; packed: (N,) per token or
            (S, 1) per sequence.
        mask: None or the shape of `log_prob`: bool, or numbers that are all 0 or 1. Values of
            every token input under the mask are never read.
        q, r, p0, x0, mask_mode: the filter, as in `kalman_filter`. Defaults: the paper's
            q=1e-6, r=1.0; p0=0.0, x0=0.0, "skip".
        clip: True (default) for the clipped surrogate, False for the plain ratio surrogate.
        clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high]. Defaults
            3e-4, 4e-4 (the paper's).
        dual_clip: None, or c > 1: for negative advantages the token loss is at most -c A.
        log_ratio_cap: the filtered log-ratio is clamped above at this before exp (None: no cap).
            Default 10.0.
        agg: one of `AGG_MODES`; default "seq-mean-token-mean".
        is_weights: None or per-token rollout importance weights, the shape of `log_prob`.
        dp_size, batch_num_tokens, global_batch_size, loss_scale_factor: verl's global-batch
            normalisation (counts may be one-element tensors on the data's device).
        cu_seqlens: int32 or int64 (S + 1,) offsets of packed sequences.
        initial_state, return_state: the filter's state entering each sequence, and whether to
            return the state after it, as in `kalman_filter` (docs/math.md section 7). The
            aggregation sees this call's tokens only: for a sequence cut into chunks, pass the
            totals (`agg="token-sum"` with weights, or `kpo_kernels.context_parallel`).
        metrics: "full" (default): every metric of `METRIC_NAMES`; "basic": all but the
            innovation and sign-flip diagnostics (`DIAGNOSTIC_METRICS`, docs/math.md section
            5b), which are then neither computed nor returned: about a third fewer of the fused
            forward's instructions on a GPU in the static model (benchmarks/RESULTS.md). The
            loss and gradient are the same.
        backend: "auto", "torch", "triton" or a `Backend` instance.

    Returns:
        (loss, metrics): loss a 0-dim tensor (float32; float64 for float64 inputs on the torch
        backend), differentiable with respect to `log_prob`; metrics a dict from each name of
        `METRIC_NAMES` (less `DIAGNOSTIC_METRICS` under metrics="basic") to a 0-dim tensor
        (docs/math.md sections 5 and 5b). No host
        synchronisation (but for an `initial_state` on the torch backend, or at q = 0, whose
        largest count sizes the gain tables: one host read). With `return_state`, (loss,
        metrics, final FilterState).

    Raises:
        TypeError, ValueError: a bad shape, dtype, device or option, naming the argument, before
            any kernel runs (ranges: docs/api.md "Ranges"). On CUDA, mask or cu_seqlens values
            that are wrong are caught on the device without a sync: a RuntimeError at the next
            synchronisation.
        NotImplementedError: under forward-mode AD or torch.func.vmap (docs/api.md "Autograd").
    """
    options = check_loss_options(
        q=q,
        r=r,
        p0=p0,
        x0=x0,
        mask_mode=mask_mode,
        clip=clip,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        log_ratio_cap=log_ratio_cap,
        agg=agg,
        dp_size=dp_size,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
        loss_scale_factor=loss_scale_factor,
        metrics=metrics,
    )
    batch = check_token_batch(log_prob, old_log_prob, advantages, mask, is_weights, cu_seqlens)
    check_count_devices(options, batch.device)
    state = check_state(initial_state, batch.num_sequences, batch.device)
    return_state = check_bool("return_state", return_state)
    impl = resolve_backend(backend, batch.device, log_prob.dtype)
    if not compiling():  # compiled: the op checks the numbers (see ops.loss_arguments)
        impl.check_options(options.filter)
    ops.refuse_forward_mode(log_prob)
    need_grad = ops.needs_autograd(log_prob)
    arguments = ops.loss_arguments(batch, state, options, backend_key(impl), need_grad)
    run = _KPOLossFunction.apply if need_grad else torch.ops.kpo_kernels.kpo_loss
    loss, metric_vector, *_ = run(*arguments)
    metrics = {name: value for name, value in zip(METRIC_NAMES, metric_vector.unbind())
               if options.diagnostics or name not in DIAGNOSTIC_METRICS}
    if not return_state:
        return loss, metrics
    final = _final_state(batch.log_prob.detach(), batch.old_log_prob.detach(), batch.mask, batch.cu_seqlens, state,
                         options.filter, impl, batch.num_sequences)
    return loss, metrics, final


class KPOLoss(torch.nn.Module):
    """`kpo_loss` as a module: keyword arguments fixed at construction, overridable per call.

        loss_fn = KPOLoss(q=1e-6, agg="token-mean")
        loss, metrics = loss_fn(log_prob, old_log_prob, advantages, mask)
        loss, metrics = loss_fn(log_prob, old_log_prob, advantages, mask, q=fit.q, r=fit.r)

    Args:
        **kwargs: any keyword argument of `kpo_loss` (q, r, clip_low, agg, backend, ...);
            the rest keep `kpo_loss`'s defaults.

    Raises:
        TypeError: an unknown keyword argument.
        ValueError: an option out of range, at construction rather than at the first step.

    forward(log_prob, old_log_prob, advantages, mask=None, **overrides) returns what
    `kpo_loss` returns. See docs/api.md.
    """

    def __init__(self, **kwargs):
        super().__init__()
        unknown = set(kwargs) - set(_LOSS_DEFAULTS)
        if unknown:
            raise TypeError(f"KPOLoss got unexpected keyword arguments {sorted(unknown)}")
        self.config = {**_LOSS_DEFAULTS, **kwargs}
        # Fail at construction, not at the first training step.
        check_loss_options(**{k: v for k, v in self.config.items() if k not in _TENSOR_OR_BACKEND}, per_call=False)
        check_backend_argument(self.config["backend"])

    def forward(self, log_prob, old_log_prob, advantages, mask=None, **overrides):
        return kpo_loss(log_prob, old_log_prob, advantages, mask, **{**self.config, **overrides})

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items() if v is not _LOSS_DEFAULTS[k])


_LOSS_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(kpo_loss).parameters.items()
    if parameter.kind is parameter.KEYWORD_ONLY
}
_TENSOR_OR_BACKEND = ("is_weights", "cu_seqlens", "initial_state", "return_state", "backend")
