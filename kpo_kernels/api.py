"""Public entry points: `kalman_filter`, `kalman_gains`, `kpo_loss`, `KPOLoss`, `prepare`.

They check shapes, dtypes, devices and Python options, choose the backend and call the custom ops
of `ops` (which check values and run the backends): nothing here looks at the data, so a compiled
step traces them without graph breaks.
"""

import inspect

import torch
import torch.autograd.forward_ad as forward_ad

from . import ops
from .backends import expand_rows
from .dispatch import backend_key, check_backend_argument, resolve_backend
from .gains import gain_schedule
from .options import METRIC_NAMES
from .validation import (
    check_count,
    check_count_devices,
    check_device,
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
    backend="auto",
):
    """Causal Kalman-filtered log-ratio of every token (spec section 2).

    log_ratio is (B, T), or (N,) packed sequences with `cu_seqlens` (S + 1,) offsets. Returns a
    float32 tensor of the same shape (float64 for float64 input on the torch backend), 0 where
    `mask` is 0. No autograd. Values of `log_ratio` under the mask are never read.
    """
    options = check_filter_params(q=q, r=r, p0=p0, x0=x0, mask_mode=mask_mode)
    check_tokens("log_ratio", log_ratio, cu_seqlens)
    if log_ratio.device.type != "cpu":
        check_device("log_ratio", log_ratio.device)
    cu_seqlens = check_cu_seqlens(cu_seqlens, log_ratio.shape[0], log_ratio.device)
    mask = check_mask(mask, log_ratio.shape, log_ratio.device)
    impl = resolve_backend(backend, log_ratio.device, log_ratio.dtype)
    if not compiling():  # compiled: the op checks (see ops.filter_arguments)
        impl.check_options(options)
    return torch.ops.kpo_kernels.kalman_filter(*ops.filter_arguments(log_ratio.detach(), mask, cu_seqlens, options, backend_key(impl)))


def kalman_gains(n, *, q=1e-6, r=1.0, p0=0.0):
    """K_1..K_n as a float64 CPU tensor (the gain used at the n-th observation of a sequence).

    Accurate to a few float64 ulps over every (q, r, p0) that is accepted (README, "Ranges");
    never NaN.
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
        _, metrics, grad, row_scale = output
        ctx.backend, ctx.need_grad, ctx.dtype = backend, need_grad, log_prob.dtype
        ctx.save_for_backward(log_prob, grad, row_scale, cu_seqlens)
        ctx.mark_non_differentiable(metrics, grad, row_scale)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        log_prob, grad, row_scale, cu_seqlens = ctx.saved_tensors
        if not ctx.need_grad:
            raise RuntimeError("kpo_loss: backward through a forward that ran without a gradient")
        wrapped = not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(grad_loss)
        if not torch.is_grad_enabled() and not wrapped:
            d_log_prob = torch.ops.kpo_kernels.kpo_loss_backward(grad, row_scale, grad_loss, cu_seqlens, ctx.dtype, ctx.backend)
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


def _needs_autograd(log_prob):
    """Whether the loss must go through autograd: log_prob requires grad, or it carries a
    forward-mode tangent or a torch.func transform (which the autograd.Function refuses or
    serves; the bare op would give a silent zero derivative)."""
    if torch.is_grad_enabled() and log_prob.requires_grad:
        return True
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.is_functorch_wrapped_tensor(log_prob) or forward_ad.unpack_dual(log_prob).tangent is not None


def prepare(length, *, q=1e-6, r=1.0, p0=0.0, device="cuda", backend="auto"):
    """Build the gain tables that calls with sequences of up to `length` tokens and these
    (q, r, p0) will read, on `device`, for the backend that `backend` picks there (float32 and
    float64 inputs). A call's first use of a (q, r, p0) otherwise builds them then: do this (or
    one eager call) before capturing a CUDA graph, so that nothing is allocated during capture.
    """
    length = check_count("length", length, minimum=1)
    check_filter_params(q=q, r=r, p0=p0, x0=0.0)
    device = check_device("device", device)
    for dtype in (torch.float32, torch.float64):
        resolve_backend(backend, device, dtype).prepare(length, q, r, p0, device)


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
    backend="auto",
):
    """KPO policy loss of a padded (B, T) batch, or of packed (N,) sequences with `cu_seqlens`:
    returns (loss, metrics).

    loss is a 0-dim tensor (float32; float64 for float64 inputs on the torch backend),
    differentiable with respect to `log_prob` only. metrics maps `options.METRIC_NAMES` to
    0-dim tensors. No host synchronisation. See README.md for every argument.
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
    )
    batch = check_token_batch(log_prob, old_log_prob, advantages, mask, is_weights, cu_seqlens)
    check_count_devices(options, batch.device)
    impl = resolve_backend(backend, batch.device, log_prob.dtype)
    if not compiling():  # compiled: the op checks the numbers (see ops.loss_arguments)
        impl.check_options(options.filter)
    need_grad = _needs_autograd(log_prob)
    arguments = ops.loss_arguments(batch, options, backend_key(impl), need_grad)
    run = _KPOLossFunction.apply if need_grad else torch.ops.kpo_kernels.kpo_loss
    loss, metric_vector, _, _ = run(*arguments)
    return loss, dict(zip(METRIC_NAMES, metric_vector.unbind()))


class KPOLoss(torch.nn.Module):
    """`kpo_loss` as a module: keyword arguments fixed at construction, overridable per call.

    loss, metrics = KPOLoss(q=1e-6, agg="token-mean")(log_prob, old_log_prob, advantages, mask)
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
_TENSOR_OR_BACKEND = ("is_weights", "cu_seqlens", "backend")
