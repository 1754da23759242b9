"""The custom ops `torch.ops.kpo_kernels.*`: what torch.compile and CUDA graphs see.

Each op is opaque to the compiler (one node, never traced into), has a fake implementation that
only allocates outputs of the right shape and dtype, and takes plain values: tensors, numbers,
bools, strings (the backend as its `dispatch.backend_key`). Everything that looks at the data
runs inside the ops: the checks of cu_seqlens and mask values, the backends' fast paths, the
gain tables. The wrappers in `api` check only shapes, dtypes, devices and Python options.

Numbers are `Scalar` arguments (`Number`), not `float`: Dynamo passes a symbolic float through
a Scalar argument, where a float argument would specialise the graph to each value. While
Dynamo traces, the wrappers check only the numbers' types and set `check_numbers`: the op then
checks the values (`validation.check_loss_options` / `check_filter_params`, the same code as
eager calls). Numbers given as tensors (a count on the data's device; q, a count, ... as a CPU
tensor under compile) travel in `number_tensors`, named by `number_tensor_names`.

- `kalman_filter(log_ratio, mask, cu_seqlens, q, r, p0, x0, skip, number_tensors, ...) -> filtered`
- `kpo_loss(...) -> (loss, metrics, grad, row_scale, plan)`: one fused forward (`diagnostics`:
  False for metrics="basic", whose diagnostic entries are then 0); `grad` is the
  per-token derivative without the aggregation weights (empty when not needed), `row_scale`
  the weight of each row or packed sequence, `plan` what backward reuses of the forward's
  planning (int32, `Backend.backward_plan_shape`: the Triton backend's packed tile table, else
  empty).
- `kpo_loss_backward(grad, row_scale, grad_output, cu_seqlens, plan, dtype, backend) -> d log_prob`
- `kalman_chunk_maps(log_prob, old_log_prob, mask, cu_seqlens, count, ...) -> ChunkMaps fields`

The filter and the loss take an optional entering state (`state.FilterState`, docs/math.md
section 7) as three optional tensors.

Autograd sits on top, in `api` (an autograd.Function, which torch.func transforms also accept).
"""

from typing import Optional

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor
from torch.types import Number

from .dispatch import lookup
from .options import METRIC_NAMES, FilterOptions, LossOptions, TokenBatch
from .state import FilterState, check_count_values, check_state_values
from .validation import (
    check_count_devices,
    check_cu_seqlens_values,
    check_filter_params,
    check_loss_options,
    check_mask_values,
    compiling,
)

FORWARD_MODE_MESSAGE = (
    "kpo_kernels does not support forward mode AD (torch.func.jvp, jacfwd, torch.func.hessian, "
    "forward_ad.make_dual): use reverse mode (backward, torch.func.grad, jacrev); the loss's Hessian "
    "in log_prob is diagonal, d g / d log_prob = g (docs/api.md, Autograd)"
)
VMAP_MESSAGE = (
    "kpo_kernels does not support torch.func.vmap: its inputs are already batches of independent "
    "sequences; stack them into one (B, T) batch (or pack them with cu_seqlens)"
)


try:  # torch.func's transform stack (private: without it, a jvp ends in PyTorch's own error)
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters as _functorch_levels

    _JVP = TransformType.Jvp
except ImportError:  # pragma: no cover
    _JVP = None

    def _functorch_levels():
        return ()


def refuse_forward_mode(log_prob):
    """Forward mode AD reaches the loss as a dual tensor (forward_ad.make_dual) or under a jvp
    transform (torch.func.jvp, jacfwd, torch.func.hessian): refused, saying what to use instead.
    (A `jvp` method on the autograd.Function would say it too, but Dynamo refuses to trace a
    Function that has one.)"""
    if torch.compiler.is_compiling():
        return
    under_jvp = any(level.key() == _JVP for level in _functorch_levels())
    if under_jvp or forward_ad.unpack_dual(log_prob).tangent is not None:
        raise NotImplementedError(FORWARD_MODE_MESSAGE)


def needs_autograd(log_prob):
    """Whether the loss must go through autograd: log_prob requires grad, or it is wrapped by a
    torch.func transform (grad, jacrev: served by the autograd.Function; a forward-mode tangent
    was refused before, by refuse_forward_mode); the bare op would give a silent zero derivative."""
    if torch.is_grad_enabled() and log_prob.requires_grad:
        return True
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.is_functorch_wrapped_tensor(log_prob)


def _filter_options(q, r, p0, x0, skip):
    return FilterOptions(q=q, r=r, p0=p0, x0=x0, mask_mode="skip" if skip else "position")


def _split_numbers(named):
    """(plain numbers, tensors, their names): a number given as a tensor leaves 0.0 in its
    Scalar slot and travels as a tensor."""
    plain, tensors, names = [], [], []
    for name, value in named:
        if isinstance(value, torch.Tensor):
            plain.append(0.0)
            tensors.append(value)
            names.append(name)
        else:
            plain.append(value)
    return plain, tensors, ",".join(names)


def _given_numbers(named, number_tensors, number_tensor_names):
    """The numbers as the caller gave them: the Scalar slots, with the tensors put back."""
    given = dict(named)
    if number_tensor_names:
        given.update(zip(number_tensor_names.split(","), number_tensors))
    return given


# ----------------------------------------------------------------------------- the filter


_FILTER_NUMBERS = ("q", "r", "p0", "x0")


def filter_arguments(log_ratio, mask, cu_seqlens, state, options, backend):
    """The positional arguments of `kalman_filter` for checked (or, compiled, traced) options."""
    plain, tensors, names = _split_numbers((name, getattr(options, name)) for name in _FILTER_NUMBERS)
    return (log_ratio, mask, cu_seqlens, *_state_tensors(state), *plain, options.skip, tensors, names, compiling(), backend)


def _state_tensors(state):
    """A FilterState as three optional tensor arguments."""
    return (None, None, None) if state is None else (state.x, state.count, state.last_sign)


def _given_state(state):
    """The `state` keyword for a backend call, only when there is one: a backend written before
    states existed keeps working for calls without one."""
    return {} if state is None else {"state": state}


def _state(x, count, last_sign):
    """The FilterState of three optional tensor arguments, its values checked."""
    if x is None:
        return None
    state = FilterState(x, count, last_sign)
    check_state_values(state)
    return state


@torch.library.custom_op("kpo_kernels::kalman_filter", mutates_args=())
def kalman_filter(
    log_ratio: Tensor,
    mask: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    state_x: Optional[Tensor],
    state_count: Optional[Tensor],
    state_sign: Optional[Tensor],
    q: Number,
    r: Number,
    p0: Number,
    x0: Number,
    skip: bool,
    number_tensors: list[Tensor],
    number_tensor_names: str,
    check_numbers: bool,
    backend: str,
) -> Tensor:
    check_cu_seqlens_values(cu_seqlens, log_ratio.shape[0])
    check_mask_values(mask)
    state = _state(state_x, state_count, state_sign)
    impl = lookup(backend)
    if check_numbers:
        given = _given_numbers(zip(_FILTER_NUMBERS, (q, r, p0, x0)), number_tensors, number_tensor_names)
        options = check_filter_params(**given, mask_mode="skip" if skip else "position")
        impl.check_options(options)
    else:
        options = _filter_options(q, r, p0, x0, skip)
    return impl.filter(log_ratio, mask, options, cu_seqlens, **_given_state(state)).contiguous()


@kalman_filter.register_fake
def _(log_ratio, mask, cu_seqlens, *args):
    backend = args[-1]
    return log_ratio.new_empty(log_ratio.shape, dtype=lookup(backend).output_dtypes(log_ratio.dtype)["filter"])


# ----------------------------------------------------------------------------- the loss


_LOSS_NUMBERS = ("q", "r", "p0", "x0", "clip_low", "clip_high", "dual_clip", "log_ratio_cap", "loss_scale_factor")


def loss_arguments(batch, state, options, backend, need_grad):
    """The positional arguments of `kpo_loss` for a checked TokenBatch and LossOptions (or,
    while Dynamo traces, options whose numbers the op checks: `check_numbers`)."""
    filt = options.filter

    def count(value):  # (tensor, Python value): one of them is None
        return (value, None) if isinstance(value, torch.Tensor) else (None, value)

    def constant(tensor):  # only log_prob is differentiated (docs/math.md section 3)
        return None if tensor is None else tensor.detach()

    tokens_tensor, tokens_value = count(options.batch_num_tokens)
    sequences_tensor, sequences_value = count(options.global_batch_size)
    numbers = {**{name: getattr(filt, name) for name in _FILTER_NUMBERS}, **{name: getattr(options, name) for name in _LOSS_NUMBERS[4:]}}
    plain, tensors, names = _split_numbers((name, numbers[name]) for name in _LOSS_NUMBERS)
    q, r, p0, x0, clip_low, clip_high, dual_clip, log_ratio_cap, loss_scale_factor = plain
    return (
        batch.log_prob,
        constant(batch.old_log_prob),
        constant(batch.advantages),
        batch.mask,
        constant(batch.is_weights),
        batch.cu_seqlens,
        tokens_tensor,
        sequences_tensor,
        *_state_tensors(state),
        batch.advantages_per_token,
        q,
        r,
        p0,
        x0,
        filt.skip,
        options.clip,
        clip_low,
        clip_high,
        dual_clip,
        log_ratio_cap,
        options.agg,
        options.dp_size,
        tokens_value,
        sequences_value,
        loss_scale_factor,
        options.diagnostics,
        tensors,
        names,
        compiling(),
        backend,
        need_grad,
    )


@torch.library.custom_op("kpo_kernels::kpo_loss", mutates_args=())
def kpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor],
    is_weights: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    batch_num_tokens: Optional[Tensor],
    global_batch_size: Optional[Tensor],
    state_x: Optional[Tensor],
    state_count: Optional[Tensor],
    state_sign: Optional[Tensor],
    advantages_per_token: bool,
    q: Number,
    r: Number,
    p0: Number,
    x0: Number,
    skip: bool,
    clip: bool,
    clip_low: Number,
    clip_high: Number,
    dual_clip: Optional[Number],
    log_ratio_cap: Optional[Number],
    agg: str,
    dp_size: int,
    batch_num_tokens_value: Optional[Number],
    global_batch_size_value: Optional[Number],
    loss_scale_factor: Optional[Number],
    diagnostics: bool,
    number_tensors: list[Tensor],
    number_tensor_names: str,
    check_numbers: bool,
    backend: str,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = lookup(backend)
    if not impl.checks_cu_seqlens_values(cu_seqlens):
        check_cu_seqlens_values(cu_seqlens, log_prob.shape[0])
    if not impl.checks_mask_values(mask):
        check_mask_values(mask)
    state = _state(state_x, state_count, state_sign)
    batch = TokenBatch(log_prob, old_log_prob, advantages, mask, is_weights, cu_seqlens, advantages_per_token)
    numbers = zip(_LOSS_NUMBERS, (q, r, p0, x0, clip_low, clip_high, dual_clip, log_ratio_cap, loss_scale_factor))
    given = {
        **_given_numbers(numbers, number_tensors, number_tensor_names),
        "clip": clip,
        "agg": agg,
        "dp_size": dp_size,
        "batch_num_tokens": batch_num_tokens if batch_num_tokens is not None else batch_num_tokens_value,
        "global_batch_size": global_batch_size if global_batch_size is not None else global_batch_size_value,
    }
    if check_numbers:  # traced by Dynamo: the values are checked here, on this call's numbers
        options = check_loss_options(**given, mask_mode="skip" if skip else "position", metrics="full" if diagnostics else "basic")
        check_count_devices(options, log_prob.device)
        impl.check_options(options.filter)
    else:
        filter_options = _filter_options(*(given.pop(name) for name in _FILTER_NUMBERS), skip)
        options = LossOptions(filter=filter_options, **given, diagnostics=diagnostics)
    result = impl.loss_forward(batch, options, need_grad=need_grad, **_given_state(state))
    grad = result.grad.contiguous() if result.grad is not None else log_prob.new_empty(0, dtype=impl.output_dtypes(log_prob.dtype)["grad"])
    plan = result.plan
    if plan is None:  # the shape the fake implementation promises, whatever the backend kept
        plan = log_prob.new_zeros(impl.backward_plan_shape(cu_seqlens, need_grad), dtype=torch.int32)
    # Outputs must be fresh tensors: a backend may return loss and metrics as views of one
    # buffer (copied here); the built-in backends do not, and pay no copy.
    return _fresh(result.loss), _fresh(result.metrics), grad, result.row_scale.contiguous(), _fresh(plan)


def _fresh(tensor):
    """The tensor, or a copy of it if it is a view (of a shared buffer, or of an input)."""
    return tensor.clone() if tensor._base is not None else tensor


@kpo_loss.register_fake
def _(log_prob, old_log_prob, advantages, mask, is_weights, cu_seqlens, *args):
    backend, need_grad = args[-2], args[-1]
    dtypes = lookup(backend).output_dtypes(log_prob.dtype)
    sequences = log_prob.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    loss = log_prob.new_empty((), dtype=dtypes["loss"])
    metrics = log_prob.new_empty((len(METRIC_NAMES),), dtype=dtypes["loss"])
    grad = log_prob.new_empty(log_prob.shape if need_grad else (0,), dtype=dtypes["grad"])
    row_scale = log_prob.new_empty((sequences,), dtype=dtypes["row_scale"])
    plan = log_prob.new_empty(lookup(backend).backward_plan_shape(cu_seqlens, need_grad), dtype=torch.int32)
    return loss, metrics, grad, row_scale, plan


@torch.library.custom_op("kpo_kernels::kpo_loss_backward", mutates_args=())
def kpo_loss_backward(
    grad: Tensor, row_scale: Tensor, grad_output: Tensor, cu_seqlens: Optional[Tensor], plan: Tensor, dtype: torch.dtype,
    backend: str,
) -> Tensor:
    return lookup(backend).loss_backward(grad, row_scale, grad_output, cu_seqlens, dtype, plan).contiguous()


@kpo_loss_backward.register_fake
def _(grad, row_scale, grad_output, cu_seqlens, plan, dtype, backend):
    return grad.new_empty(grad.shape, dtype=dtype)


# ----------------------------------------------------------------------------- chunk maps


@torch.library.custom_op("kpo_kernels::kalman_chunk_maps", mutates_args=())
def kalman_chunk_maps(
    log_prob: Tensor,
    old_log_prob: Optional[Tensor],
    mask: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    count: Tensor,
    q: float,
    r: float,
    p0: float,
    skip: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The ChunkMaps fields of each sequence (docs/math.md section 7); options checked by the caller."""
    check_cu_seqlens_values(cu_seqlens, log_prob.shape[0])
    check_mask_values(mask)
    check_count_values(count)
    options = _filter_options(q, r, p0, 0.0, skip)
    maps = lookup(backend).chunk_maps(log_prob, old_log_prob, mask, options, cu_seqlens, count)
    # Copies of S numbers each: a backend may return rows of one buffer, which outputs must not share.
    return tuple(t.clone(memory_format=torch.contiguous_format) for t in maps)


@kalman_chunk_maps.register_fake
def _(log_prob, old_log_prob, mask, cu_seqlens, count, q, r, p0, skip, backend):
    dtype = lookup(backend).output_dtypes(log_prob.dtype)["maps"]
    maps = tuple(count.new_empty(count.shape, dtype=dtype) for _ in range(4))
    return (*maps, count.new_empty(count.shape, dtype=torch.int8), count.new_empty(count.shape, dtype=torch.int64))


# ----------------------------------------------------------------------------- vmap


def _refuse_vmap(info, in_dims, *args):
    raise NotImplementedError(VMAP_MESSAGE)


for _op in ("kpo_kernels::kalman_filter", "kpo_kernels::kpo_loss", "kpo_kernels::kpo_loss_backward", "kpo_kernels::kalman_chunk_maps"):
    torch.library.register_vmap(_op, _refuse_vmap)
