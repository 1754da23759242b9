"""Argument checks, run before any kernel. Every error names the offending argument."""

import contextlib
import math
import numbers
import re
import sys

import torch

from .gains import MIN_RATIO
from .options import AGG_MODES, MASK_MODES, METRIC_SETS, FilterOptions, LossOptions
from .tensor_checks import (  # noqa: F401 (the tensor checks, importable from here as before)
    check_cu_seqlens,
    check_cu_seqlens_values,
    check_device,
    check_log_prob_dtypes,
    check_mask,
    check_mask_values,
    check_token_batch,
    check_tensor_device,
    check_tokens,
)

# Counts (global tokens, sequences) and the -norm horizon: they and their inverses stay normal
# float32 numbers, so that float32 kernels and float64 code give the same weights.
COUNT_RANGE = (1e-30, 1e30)
MAX_DP_SIZE = 2**31 - 1


def _is_numpy_bool(value):
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")


def _number(name, value, *, allow_inf=False):
    """A Python float from a real number (Python, numpy, or a CPU one-element tensor);
    TypeError/ValueError naming the argument otherwise."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.device.type != "cpu":
            raise TypeError(
                f"{name} must be a Python number (a {value.device.type} tensor would force a "
                f"host synchronisation), got a tensor of shape {tuple(value.shape)} on {value.device}"
            )
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
        value = value.item()
    if isinstance(value, bool) or _is_numpy_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{name} = {value} is beyond float64's range") from None
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def compiling():
    """Whether Dynamo is tracing: a Python number may then be symbolic (dynamic=True, or the
    second value of a number), and reading it (a comparison, math.isnan, .item()) would break
    the graph or specialise it to this value."""
    return torch.compiler.is_compiling()


def _traced_number(name, value, *, count=False):
    """Under torch.compile, what can be checked without reading the value: its type, and a
    tensor's shape, dtype and device. The custom op checks the value itself (the same
    `check_loss_options` / `check_filter_params`, on the concrete numbers of each call)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a number or a one-element real tensor, got {value.dtype} {tuple(value.shape)}")
        if not count and value.device.type != "cpu":
            raise TypeError(
                f"{name} must be a Python number or a CPU tensor (a {value.device.type} tensor would force a "
                f"host synchronisation), got a tensor on {value.device}"
            )
        return value.reshape(())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return value


def check_bool(name, value):
    """A Python bool from a bool or a numpy bool; TypeError otherwise (0/1 are refused: a
    number where a flag belongs is usually a misplaced argument)."""
    if isinstance(value, bool) or _is_numpy_bool(value):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def check_count(name, value, *, minimum=0):
    """A Python int >= minimum from an int or a numpy integer; TypeError/ValueError otherwise."""
    if isinstance(value, bool) or _is_numpy_bool(value) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def _ratio_range(name, value, *, allow_inf=False):
    """q / r and p0 / r: 0 or a normal float64 (subnormal ratios would make n q subnormal)."""
    if value != 0 and value < MIN_RATIO:
        top = "inf" if allow_inf else f"{sys.float_info.max:.4g}"
        raise ValueError(f"{name} = {value:.3g} is outside the supported range: 0 or [{MIN_RATIO:.4g}, {top}]")


def check_filter_params(*, q, r, p0, x0, mask_mode="skip"):
    """Checked `FilterOptions` (Python floats). While Dynamo traces, only the types: the op
    calls this again on the numbers of each call."""
    if compiling():
        _check_mask_mode(mask_mode)
        q, r, p0, x0 = (_traced_number(name, value) for name, value in (("q", q), ("r", r), ("p0", p0), ("x0", x0)))
        return FilterOptions(q=q, r=r, p0=p0, x0=x0, mask_mode=mask_mode)
    q = _number("q", q)
    r = _number("r", r)
    p0 = _number("p0", p0, allow_inf=True)
    x0 = _number("x0", x0)
    if q < 0:
        raise ValueError(f"q (process noise variance) must be >= 0, got {q}")
    if r <= 0:
        raise ValueError(f"r (observation noise variance) must be > 0, got {r}")
    if p0 < 0:
        raise ValueError(f"p0 (prior variance) must be >= 0, got {p0}")
    if not math.isfinite(q / r):
        raise ValueError(f"q / r overflows (q={q}, r={r}); supported: q / r <= {sys.float_info.max:.4g}")
    _ratio_range("q / r", q / r)
    _ratio_range("p0 / r", p0 / r, allow_inf=True)
    _check_mask_mode(mask_mode)
    return FilterOptions(q=q, r=r, p0=p0, x0=x0, mask_mode=mask_mode)


def _check_mask_mode(mask_mode):
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")


def _optional_count(name, value):
    """None, a Python float >= 0, or a one-element tensor on an accelerator (kept on the device
    and read by the kernels: no host synchronisation, so its value is not checked). A count of 0
    (an empty global batch) gives weight 0, hence loss 0."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.device.type != "cpu":
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a number or a one-element real tensor, got {value.dtype} {tuple(value.shape)}")
        return value.reshape(())
    value = _number(name, value)
    if value != 0 and not COUNT_RANGE[0] <= value <= COUNT_RANGE[1]:
        raise ValueError(f"{name} must be 0 (an empty global batch) or in [{COUNT_RANGE[0]:g}, {COUNT_RANGE[1]:g}], got {value}")
    return value


def _positive(name, value):
    value = _number(name, value)
    if not COUNT_RANGE[0] <= value <= COUNT_RANGE[1]:
        raise ValueError(f"{name} must be in [{COUNT_RANGE[0]:g}, {COUNT_RANGE[1]:g}] when given, got {value}")
    return value


def check_count_devices(options, device):
    """Counts given as tensors must be on the batch's device (or, while Dynamo traces, on the
    CPU: the op reads those on the host)."""
    for name in ("batch_num_tokens", "global_batch_size"):
        value = getattr(options, name)
        if isinstance(value, torch.Tensor) and value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name} is on {value.device}, expected {device} (the device of the log-probs)")


def check_loss_options(
    *,
    q,
    r,
    p0,
    x0,
    mask_mode,
    clip,
    clip_low,
    clip_high,
    dual_clip,
    log_ratio_cap,
    agg,
    dp_size,
    batch_num_tokens,
    global_batch_size,
    loss_scale_factor,
    metrics="full",
    per_call=True,
):
    """Checked `LossOptions`. per_call=False checks only what is fixed at construction (a
    `KPOLoss`): the global counts that dp_size > 1 needs change every step and come per call.
    While Dynamo traces, only the types (`_traced_options`): the op checks the values."""
    diagnostics = check_metrics(metrics)
    if compiling():
        return _traced_options(q, r, p0, x0, mask_mode, clip, clip_low, clip_high, dual_clip, log_ratio_cap, agg, dp_size,
                               batch_num_tokens, global_batch_size, loss_scale_factor, diagnostics)
    filter_options = check_filter_params(q=q, r=r, p0=p0, x0=x0, mask_mode=mask_mode)
    clip = check_bool("clip", clip)
    clip_low = _number("clip_low", clip_low)
    clip_high = _number("clip_high", clip_high)
    if clip_low < 0:
        raise ValueError(f"clip_low must be >= 0, got {clip_low}")
    if clip_high < 0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if dual_clip is not None:
        dual_clip = _number("dual_clip", dual_clip)
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (it bounds the loss at -dual_clip * A), got {dual_clip}")
    if log_ratio_cap is not None:
        log_ratio_cap = _number("log_ratio_cap", log_ratio_cap)
    _check_agg(agg)
    dp_size = check_count("dp_size", dp_size, minimum=1)
    if dp_size > MAX_DP_SIZE:
        raise ValueError(f"dp_size must be <= {MAX_DP_SIZE}, got {dp_size}")
    batch_num_tokens = _optional_count("batch_num_tokens", batch_num_tokens)
    global_batch_size = _optional_count("global_batch_size", global_batch_size)
    loss_scale_factor = None if loss_scale_factor is None else _positive("loss_scale_factor", loss_scale_factor)
    if per_call and dp_size > 1 and agg == "token-mean" and batch_num_tokens is None:
        raise ValueError("batch_num_tokens (the global valid-token count) is required when dp_size > 1")
    if per_call and dp_size > 1 and agg.startswith("seq-mean") and global_batch_size is None:
        raise ValueError("global_batch_size (the global sequence count) is required when dp_size > 1")
    return LossOptions(
        filter=filter_options,
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
        diagnostics=diagnostics,
    )


def _check_agg(agg):
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


@contextlib.contextmanager
def config_names(names):
    """Trainer configs: a TypeError or ValueError raised inside whose message begins with a
    kpo_loss keyword of `names` (keyword -> the config's key for it) is raised again with the
    config key in front ("kalman_q: q (process noise variance) must be >= 0, ...")."""
    try:
        yield
    except (TypeError, ValueError) as error:
        text = str(error)
        # the keyword as the subject ("q (process noise ...) must", "clip must"), not "q / r ..."
        keyword = next((k for k in sorted(names, key=len, reverse=True)
                        if re.match(rf"{re.escape(k)}( \(| must| =|=|$)", text)), None)
        if keyword is None or names[keyword] == keyword:
            raise
        try:
            renamed = type(error)(f"{names[keyword]}: {text}")
        except Exception:  # an exception type that takes other arguments: as it was
            raise error from None
        raise renamed from error


def check_metrics(metrics, name="metrics"):
    """Whether `metrics` ("full" or "basic") asks for the diagnostics; `name`: the argument's or
    config field's name in the error."""
    if not isinstance(metrics, str):
        raise TypeError(f"{name} must be one of {METRIC_SETS}, got {type(metrics).__name__} {metrics!r}")
    if metrics not in METRIC_SETS:
        raise ValueError(f"{name} must be one of {METRIC_SETS}, got {metrics!r}")
    return metrics == "full"


def _traced_options(q, r, p0, x0, mask_mode, clip, clip_low, clip_high, dual_clip, log_ratio_cap, agg, dp_size,
                    batch_num_tokens, global_batch_size, loss_scale_factor, diagnostics):
    """`LossOptions` as given (numbers possibly symbolic, numbers given as tensors kept), their
    types checked; strings and flags fully (they are constants of the graph)."""
    _check_agg(agg)
    if isinstance(dp_size, bool) or not isinstance(dp_size, int):
        raise TypeError(f"dp_size must be an int, got {type(dp_size).__name__} {dp_size!r}")

    def optional(name, value, count=False):
        return None if value is None else _traced_number(name, value, count=count)

    return LossOptions(
        filter=check_filter_params(q=q, r=r, p0=p0, x0=x0, mask_mode=mask_mode),
        clip=check_bool("clip", clip),
        clip_low=_traced_number("clip_low", clip_low),
        clip_high=_traced_number("clip_high", clip_high),
        dual_clip=optional("dual_clip", dual_clip),
        log_ratio_cap=optional("log_ratio_cap", log_ratio_cap),
        agg=agg,
        dp_size=dp_size,
        batch_num_tokens=optional("batch_num_tokens", batch_num_tokens, count=True),
        global_batch_size=optional("global_batch_size", global_batch_size, count=True),
        loss_scale_factor=optional("loss_scale_factor", loss_scale_factor),
        diagnostics=diagnostics,
    )
