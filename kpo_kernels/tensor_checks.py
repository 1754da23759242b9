"""Checks of the tensors a call is given (shapes, dtypes, devices; mask and cu_seqlens values
inside the ops), run before any kernel. Every error names the offending argument. The checks of
numbers and options: `validation`."""

import torch

from .options import TokenBatch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor_device(name, device):
    """The device of a tensor the caller holds: it exists, so only what no kernel can compute on
    (meta tensors, which hold no values) is refused. No CUDA runtime query: under torch.compile,
    Dynamo cannot trace one (torch.cuda.device_count returns a non-tensor)."""
    if device.type == "meta":
        raise ValueError(f"{name} is on the meta device: kpo_kernels computes values and needs tensors that hold them")
    return device


def check_device(name, device):
    """A `torch.device` that this torch can compute on; ValueError naming the argument
    otherwise (torch itself fails later, inside a kernel launch or an allocation, with an
    AssertionError that names nothing). For a device given as an argument (`prepare`); a
    tensor's device: `check_tensor_device`."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{name} must be a device such as 'cuda', 'cuda:1' or 'cpu', got {device!r}") from None
    if device.type == "meta":
        raise ValueError(f"{name} is the meta device: kpo_kernels computes values and needs tensors that hold them")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} is {device}, but this torch cannot use CUDA (torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{name} is {device}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _tensor(name, value, *, floating=True):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    return value


def _same_place(name, value, shape, device):
    if value.shape != shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device}, expected {device} (the device of the log-probs)")


def check_mask(mask, shape, device, name="mask"):
    """bool, or real numbers that are all 0 or 1 (values: `check_mask_values`, inside the ops)."""
    if mask is None:
        return None
    _tensor(name, mask, floating=False)
    if mask.is_complex():
        raise TypeError(f"{name} must be bool or 0/1 real numbers, got {mask.dtype}")
    _same_place(name, mask, shape, device)
    return mask


def check_mask_values(mask, name="mask"):
    """Every value 0 or 1 (a weight belongs in is_weights, and NaN must never count silently).
    Checked on the host for CPU tensors and asynchronously on an accelerator
    (torch._assert_async: no host synchronisation; a violation fails the next synchronising
    call). A bool mask needs no check at all."""
    if mask is None or mask.dtype == torch.bool or not mask.numel():
        return
    assert_mask_values(((mask == 0) | (mask == 1)).all(), name)


def assert_mask_values(binary, name="mask"):
    """Raise (CPU) or assert asynchronously (an accelerator) that `binary`, a one-element tensor,
    is true: the mask's values were all 0 or 1 (check_mask_values; the Triton loss's forward
    checks them itself)."""
    _refuse_unless(binary, f"{name} must hold only 0 and 1 (got other values, or NaN); pass weights as is_weights")


def _refuse_unless(flag, message):
    """ValueError(message) unless the one-element tensor `flag` is true: read on the host for a
    CPU tensor, else torch._assert_async (no host synchronisation; a false flag fails the next
    synchronising call)."""
    if flag.device.type == "cpu":
        if not bool(flag):
            raise ValueError(message)
    else:
        torch._assert_async(flag, message)


def check_tokens(name, value, cu_seqlens=None):
    """A (B, T) tensor, or a packed (N,) one when cu_seqlens is given."""
    _tensor(name, value)
    if cu_seqlens is None and value.dim() != 2:
        hint = " (a packed batch needs cu_seqlens)" if value.dim() == 1 else ""
        raise ValueError(f"{name} must be 2-D (batch, tokens), got shape {tuple(value.shape)}{hint}")
    if cu_seqlens is not None and value.dim() != 1:
        raise ValueError(f"{name} must be 1-D (tokens,) when cu_seqlens is given, got shape {tuple(value.shape)}")
    return value


def check_cu_seqlens(cu_seqlens, num_tokens, device):
    """Sequence offsets of a packed batch: integer (S + 1,) on the batch's device (values:
    `check_cu_seqlens_values`, inside the ops). Returned contiguous."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D with S + 1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, expected {device} (the device of the log-probs)")
    if cu_seqlens.dtype == torch.int32 and num_tokens >= 2**31:
        raise ValueError("cu_seqlens must be int64 for 2^31 tokens or more")
    return cu_seqlens.contiguous()  # kernels read it as a plain array; S + 1 entries are cheap to copy


def check_cu_seqlens_values(cu_seqlens, num_tokens):
    """0 first, non-decreasing, N last. Checked on the host when the offsets are on the CPU; on
    an accelerator asynchronously (torch._assert_async: no host synchronisation; a violation
    fails the next synchronising call with a device-side assertion)."""
    if cu_seqlens is None:
        return
    device = cu_seqlens.device
    first, last = cu_seqlens[0], cu_seqlens[-1]
    steps = cu_seqlens[1:] - cu_seqlens[:-1]
    if device.type == "cpu":
        if int(first) != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {int(first)}")
        if bool((steps < 0).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
        if int(last) != num_tokens:
            raise ValueError(f"cu_seqlens must end at the number of tokens {num_tokens}, got {int(last)}")
    else:
        torch._assert_async(first == 0, "cu_seqlens must start at 0")
        torch._assert_async((steps >= 0).all(), "cu_seqlens must be non-decreasing")
        torch._assert_async(last == num_tokens, "cu_seqlens must end at the number of tokens")


def assert_cu_seqlens_values(valid, num_tokens):
    """Raise (CPU) or assert asynchronously (an accelerator) that `valid`, a one-element tensor,
    is true: offsets starting at 0, never decreasing and ending at num_tokens (the Triton loss's
    tile-offsets kernel reads them on the way, where check_cu_seqlens_values launches eight
    kernels on a GPU)."""
    _refuse_unless(valid, f"cu_seqlens must start at 0, never decrease and end at the number of tokens ({num_tokens})")


def _advantages(value, shape, cu_seqlens, device):
    """(advantages, per_token). The shape alone decides, never the data:

    - the shape of the log-probs, (B, T) or packed (N,): one advantage per token;
    - padded (B,) or (B, 1), packed (S, 1): one per sequence.

    A packed (S,) tensor is refused: it would read differently in the batch where S == N.
    """
    _tensor("advantages", value)
    if value.device != device:
        raise ValueError(f"advantages is on {value.device}, expected {device}")
    if value.shape == shape:
        return value, True
    if cu_seqlens is None:
        sequences = shape[0]
        if value.shape in ((sequences,), (sequences, 1)):
            return value.reshape(sequences), False
        raise ValueError(
            f"advantages has shape {tuple(value.shape)}; expected {tuple(shape)} (one per token), "
            f"or ({sequences},) or ({sequences}, 1) (one per sequence)"
        )
    sequences = cu_seqlens.numel() - 1
    if value.shape == (sequences, 1):
        return value[:, 0], False
    hint = ""
    if value.shape == (sequences,):
        hint = f"; for one advantage per sequence pass advantages[:, None], of shape ({sequences}, 1)"
    raise ValueError(
        f"advantages has shape {tuple(value.shape)}; a packed batch takes ({shape[0]},) (one per token, "
        f"like log_prob) or ({sequences}, 1) (one per sequence){hint}"
    )


def check_log_prob_dtypes(log_prob, old_log_prob):
    """The loss computes in log_prob's precision (float64 only for float64 log_prob): a float64
    old_log_prob beside a lower-precision log_prob would be rounded silently, so it is refused.
    A lower-precision old_log_prob (bf16 beside fp32) loses nothing and is accepted."""
    if old_log_prob.dtype == torch.float64 and log_prob.dtype != torch.float64:
        raise TypeError(
            f"old_log_prob is float64 but log_prob is {log_prob.dtype}: the loss computes in log_prob's "
            f"precision and would round old_log_prob silently; cast old_log_prob to {log_prob.dtype}, or "
            "log_prob to float64 (backend='torch' then computes in float64)"
        )


def check_token_batch(log_prob, old_log_prob, advantages, mask, is_weights, cu_seqlens=None):
    check_tokens("log_prob", log_prob, cu_seqlens)
    shape, device = log_prob.shape, log_prob.device
    check_tensor_device("log_prob", device)
    cu_seqlens = check_cu_seqlens(cu_seqlens, shape[0], device)
    _same_place("old_log_prob", _tensor("old_log_prob", old_log_prob), shape, device)
    check_log_prob_dtypes(log_prob, old_log_prob)
    advantages, per_token = _advantages(advantages, shape, cu_seqlens, device)
    mask = check_mask(mask, shape, device)
    if is_weights is not None:
        _same_place("is_weights", _tensor("is_weights", is_weights), shape, device)
    return TokenBatch(log_prob, old_log_prob, advantages, mask, is_weights, cu_seqlens, per_token)
