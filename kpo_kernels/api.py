"""Public entry points: `kalman_filter`, `kalman_gains`, `kpo_loss`, `KPOLoss`. Checks, dispatch, autograd."""

import inspect

import torch

from .backends import LossForward, check_backend_argument, expand_rows, resolve_backend
from .gains import gain_schedule
from .options import METRIC_NAMES, TokenBatch
from .validation import (
    check_count,
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
    _refuse_vmap("log_ratio", log_ratio)
    check_tokens("log_ratio", log_ratio, cu_seqlens)
    cu_seqlens = check_cu_seqlens(cu_seqlens, log_ratio.shape[0], log_ratio.device)
    mask = check_mask(mask, log_ratio.shape, log_ratio.device)
    impl = resolve_backend(backend, log_ratio.device, log_ratio.dtype)
    impl.check_options(options)
    with torch.no_grad():
        return impl.filter(log_ratio.detach(), mask, options, cu_seqlens)


def kalman_gains(n, *, q=1e-6, r=1.0, p0=0.0):
    """K_1..K_n as a float64 CPU tensor (the gain used at the n-th observation of a sequence).

    Accurate to a few float64 ulps over every (q, r, p0) that is accepted (README, "Ranges");
    never NaN.
    """
    n = check_count("n", n)
    check_filter_params(q=q, r=r, p0=p0, x0=0.0)
    return gain_schedule(n, q, r, p0)


class _KPOLossFunction(torch.autograd.Function):
    """Forward runs the backend once (loss, metrics and the per-token derivative D); backward
    only scales D by grad_output and the row weights.

    Tensors are direct arguments (not fields of a TokenBatch) so that torch.func.grad sees and
    unwraps them. Double backward is exact: by the stop-gradient trick d rt / d log_prob = rt,
    so the gradient g = w_row * D * exp(log_prob - sg(log_prob)) has the derivative g itself
    (the Hessian of the surrogate is diagonal); with create_graph=True backward computes g in
    that differentiable form instead of in the backend's kernel.
    """

    @staticmethod
    def forward(log_prob, old_log_prob, advantages, mask, is_weights, cu_seqlens, per_token, options, impl, need_grad):
        batch = TokenBatch(log_prob, old_log_prob, advantages, mask, is_weights, cu_seqlens, per_token)
        result = impl.loss_forward(batch, options, need_grad=need_grad)
        # Fresh outputs (a backend may return loss and metrics as views of one buffer), so that
        # callers may update the loss in place (verl's ppo_loss does `policy_loss -= ...`).
        return result.loss.clone(), result.metrics.clone(), result.grad, result.row_scale, _Layout(result.layout)

    @staticmethod
    def setup_context(ctx, inputs, output):
        log_prob, cu_seqlens, impl = inputs[0], inputs[5], inputs[8]
        _, metrics, grad, row_scale, layout = output
        ctx.impl, ctx.layout, ctx.dtype = impl, layout.value, log_prob.dtype
        ctx.save_for_backward(log_prob, grad, row_scale, cu_seqlens)
        ctx.mark_non_differentiable(metrics, row_scale)
        if grad is not None:
            ctx.mark_non_differentiable(grad)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        log_prob, grad, row_scale, cu_seqlens = ctx.saved_tensors
        if grad is None:
            raise RuntimeError("kpo_loss: backward of a forward that stored no gradient")
        if not torch.is_grad_enabled() and not _functorch_wrapped(grad_loss):
            saved = LossForward(None, None, grad, row_scale, ctx.layout)
            return (ctx.impl.loss_backward(saved, grad_loss, ctx.dtype),) + (None,) * 9
        scale = expand_rows(row_scale.to(grad_loss.dtype) * grad_loss, log_prob.shape, cu_seqlens)
        # exp(log_prob - sg(log_prob)): 1, with derivative 1. Only where the gradient is not 0:
        # elsewhere log_prob may be garbage (NaN under the mask), which must not leak.
        delta = torch.where(grad != 0, log_prob - log_prob.detach(), 0.0)
        ratio = torch.exp(delta).to(scale.dtype)
        return ((grad.to(scale.dtype) * scale * ratio).to(ctx.dtype),) + (None,) * 9

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(
            "kpo_loss supports reverse-mode autograd (backward, double backward, torch.func.grad, "
            "jacrev) but not forward-mode AD (torch.func.jvp, jacfwd, torch.func.hessian); for a "
            "Hessian use torch.func.jacrev(torch.func.jacrev(f)) or torch.autograd.functional.hessian"
        )

    @staticmethod
    def vmap(info, in_dims, *args):
        raise NotImplementedError(
            "kpo_loss does not support torch.func.vmap: its inputs are already batches of "
            "independent sequences; stack them into one (B, T) batch (or pack them with cu_seqlens)"
        )


class _Layout:
    """Wraps a backend's launch layout so that autograd treats it as an opaque Python object."""

    def __init__(self, value):
        self.value = value


def _functorch_wrapped(tensor):
    return torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def _refuse_vmap(name, tensor):
    if isinstance(tensor, torch.Tensor) and torch._C._functorch.is_batchedtensor(tensor):
        raise NotImplementedError(
            f"{name} is a torch.func.vmap batch: kpo_kernels does not support vmap; its inputs are "
            "already batches of independent sequences (stack them into one (B, T) batch)"
        )


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
    for name, value in (("log_prob", log_prob), ("old_log_prob", old_log_prob), ("advantages", advantages)):
        _refuse_vmap(name, value)
    batch = check_token_batch(log_prob, old_log_prob, advantages, mask, is_weights, cu_seqlens)
    check_count_devices(options, batch.device)
    impl = resolve_backend(backend, batch.device, log_prob.dtype)
    impl.check_options(options.filter)
    # Only log_prob gets a gradient: the others are constants of the loss (spec section 3).
    constant = lambda t: None if t is None else t.detach()  # noqa: E731
    loss, metric_vector, *_ = _KPOLossFunction.apply(
        log_prob,
        constant(batch.old_log_prob),
        constant(batch.advantages),
        batch.mask,
        constant(batch.is_weights),
        batch.cu_seqlens,
        batch.advantages_per_token,
        options,
        impl,
        torch.is_grad_enabled() and log_prob.requires_grad,
    )
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
