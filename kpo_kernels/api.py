"""Public entry points: `kalman_filter`, `kpo_loss`, `KPOLoss`. Checks, dispatch, autograd."""

import inspect

import torch

from .backends import LossForward, check_backend_argument, resolve_backend
from .options import METRIC_NAMES
from .validation import (
    check_count_devices,
    check_cu_seqlens,
    check_filter_params,
    check_loss_options,
    check_mask,
    check_token_batch,
    check_tokens,
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
    cu_seqlens = check_cu_seqlens(cu_seqlens, log_ratio.shape[0], log_ratio.device)
    mask = check_mask(mask, log_ratio.shape, log_ratio.device)
    impl = resolve_backend(backend, log_ratio.device, log_ratio.dtype)
    with torch.no_grad():
        return impl.filter(log_ratio.detach(), mask, options, cu_seqlens)


class _KPOLossFunction(torch.autograd.Function):
    """Forward runs the backend once (loss, metrics and the per-token derivative); backward
    only scales that derivative by grad_output and the row weights."""

    @staticmethod
    def forward(ctx, log_prob, batch, options, impl):
        result = impl.loss_forward(batch, options, need_grad=ctx.needs_input_grad[0])
        ctx.impl, ctx.dtype, ctx.layout = impl, log_prob.dtype, result.layout
        if result.grad is not None:
            ctx.save_for_backward(result.grad, result.row_scale)
        ctx.mark_non_differentiable(result.metrics)
        return result.loss, result.metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_metrics):
        grad, row_scale = ctx.saved_tensors
        saved = LossForward(None, None, grad, row_scale, ctx.layout)
        return ctx.impl.loss_backward(saved, grad_loss, ctx.dtype), None, None, None


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
    loss, metric_vector = _KPOLossFunction.apply(log_prob, batch, options, impl)
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
        check_loss_options(**{k: v for k, v in self.config.items() if k not in _TENSOR_OR_BACKEND})
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
