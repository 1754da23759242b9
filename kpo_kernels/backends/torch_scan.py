"""The torch backend's filter: the scan x_t = a_t x_{t-1} + b_t along the tokens, in float64.

a_t = 1 - c_t, with c_t the gain at a valid token and 0 elsewhere (docs/math.md section 2). Two
algorithms, both exact to float64 rounding of the recursion (no floor, exact resets):

- `shared_scan`, when every row has the same coefficients (position mode, right padding, and
  holes in skip mode once the valid tokens are moved to the front: `Compaction`). The tokens are
  cut into chunks; within a chunk x_i = Q_i (a_s x_{s-1} + sum_{j<=i} c_j z_j / Q_j) with
  Q_i = a_{s+1} ... a_i (s the chunk's first token), a cumulative sum. The chunk is chosen so
  that every Q_i stays above 2^-600: the division cannot overflow nor lose digits, and nothing
  that the recursion would underflow is kept (a product below 2^-600 spans two chunks, and the
  state crossing a chunk boundary is multiplied by the products, as in the recursion). The
  chunk ends are the same scan one level up. A chunk start with a = 0 (a diffuse prior's
  first gain) multiplies only the carried state: an exact reset. Four passes over the batch.
- `affine_scan`, for coefficients that differ per row or contain a reset mid-chunk (packed
  streams): the recursion itself, blocked for vectorization.
"""

import math
import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F

from .. import tables

COMPUTE = torch.float64
CHUNK = 16  # affine_scan's block
SHARED_CHUNKS = (64, 32, 16, 8)  # shared_scan's chunk lengths, tried longest first
SMALLEST_PRODUCT = 2.0**-600  # Q_i within a chunk stays above this
LARGEST_VALUE = 2.0**300  # |z| and |x0| up to this: z / Q_i (< 2^900) cannot overflow


def affine_scan(a, b, need_a=True):
    """(A, B) with x_t = A_t x_0 + B_t for x_t = a_t x_{t-1} + b_t along dim -1.

    a and b are float64 temporaries (both are overwritten). a may be one (T,) sequence shared by
    every row of b: the work on a is then done once. A is None unless need_a, and has a's shape.
    """
    length = b.shape[-1]
    chunks = -(-length // CHUNK)
    pad = chunks * CHUNK - length  # (1, 0) is the identity map
    if pad:
        a, b = F.pad(a, (0, pad), value=1.0), F.pad(b, (0, pad))
    a, b = a.unflatten(-1, (chunks, CHUNK)), b.unflatten(-1, (chunks, CHUNK))
    for t in range(1, CHUNK):  # within each chunk: B_t = a_t B_{t-1} + b_t, A_t = a_t A_{t-1}
        b[..., t].addcmul_(b[..., t - 1], a[..., t])
        if need_a or chunks > 1:
            a[..., t].mul_(a[..., t - 1])

    if chunks > 1:
        # State entering chunk k: the scan of the chunk totals, shifted by one chunk.
        a_through, b_through = affine_scan(a[..., -1].clone(), b[..., -1].clone(), need_a)
        b.addcmul_(F.pad(b_through[..., :-1], (1, 0))[..., None], a)
        if need_a:
            a.mul_(F.pad(a_through[..., :-1], (1, 0), value=1.0)[..., None])
    b = b.flatten(-2)[..., :length]
    return (a.flatten(-2)[..., :length] if need_a else None), b


def _chunk_products(a):
    """(chunk length C, Q (K, C), first a of each chunk (K,)) for a shared (T,) a, or None when
    no chunk length keeps every Q_i >= SMALLEST_PRODUCT."""
    length = a.numel()
    for size in SHARED_CHUNKS:
        size = min(size, length)
        chunks = -(-length // size)
        a2 = F.pad(a, (0, chunks * size - length), value=1.0).view(chunks, size).clone()
        first = a2[:, 0].clone()
        a2[:, 0] = 1.0
        products = a2.cumprod_(1)
        if float(products.min()) >= SMALLEST_PRODUCT:
            return size, products, first
    return None


class _ScanPlan:
    """What `shared_scan` needs of its coefficients alone (no data): chunk length, the products
    Q (K, C), each chunk's first a, the weights c / Q, and the plan of the chunk ends' scan one
    level up (None: that scan runs as `affine_scan` on `ends_a`)."""

    __slots__ = ("size", "products", "first", "weights", "ends", "ends_a", "ends_plan")

    @classmethod
    def build(cls, c, a):
        length = a.numel()
        found = _chunk_products(a) if length else None
        if found is None:
            return None
        plan = cls()
        plan.size, plan.products, plan.first = found
        chunks = plan.products.shape[0]
        if c is None:
            plan.weights = plan.products.reciprocal()
        else:
            plan.weights = F.pad(c, (0, chunks * plan.size - length)).view(chunks, plan.size) / plan.products
        plan.weights = plan.weights.view(-1)[:length]
        plan.ends = plan.ends_a = plan.ends_plan = None
        if chunks > 1:
            plan.ends = plan.products[:, -1]
            plan.ends_a = plan.ends * plan.first
            plan.ends_plan = cls.build(None, plan.ends_a)
        return plan


_CPU_CACHE = OrderedDict()  # (what, T, q / r, p0 / r) -> (what `build` returned, its bytes), CPU tensors only
_CPU_CACHE_BYTES = 16 << 20  # in all; an entry above a quarter of it is not kept (T beyond ~100k)
_CPU_CACHE_MOST = 128  # entries: two a ratio (a fitted one each step meets some 30 ratios again)
_CPU_CACHE_LOCK = threading.Lock()
_cpu_cache_bytes = 0


def _nbytes(value):
    """Bytes of the tensors in a tensor, a tuple of them or a `_ScanPlan` (with its own plans)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, _ScanPlan):
        value = [getattr(value, name) for name in _ScanPlan.__slots__]
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(item) for item in value)
    return 0


def cached_on_cpu(what, length, options, device, build):
    """build(), cached per (what, T, q / r, p0 / r) when `device` is the CPU: the (T,) work that
    depends on the ratios of the filter's settings alone, as the gain tables do (a few operations
    and host reads saved per call; a fitted Q and R meet their ratio again: tracker.round_fitted).
    Bounded by bytes and entries, least recently used first out; what the gain tables' cache
    must see (a CUDA-graph capture: accelerators, or a test standing in for one) is built each
    time from the tables. Entries are shared: callers must not write to them."""
    global _cpu_cache_bytes
    device = torch.device(device)
    if device.type != "cpu" or tables.capturing(device):
        return build()
    r = float(options.r)
    key = (what, length, float(options.q) / r, float(options.p0) / r)
    with _CPU_CACHE_LOCK:
        if key in _CPU_CACHE:
            _CPU_CACHE.move_to_end(key)
            return _CPU_CACHE[key][0]
    built = build()
    size = _nbytes(built)
    if size > _CPU_CACHE_BYTES // 4:
        return built
    with _CPU_CACHE_LOCK:
        if key not in _CPU_CACHE:
            _CPU_CACHE[key] = (built, size)
            _cpu_cache_bytes += size
        while len(_CPU_CACHE) > _CPU_CACHE_MOST or _cpu_cache_bytes > _CPU_CACHE_BYTES:
            _cpu_cache_bytes -= _CPU_CACHE.popitem(last=False)[1][1]
    return built


def _position_plan(length, options, device):
    """The `_ScanPlan` of the shared gains K_1..K_T (position_gains), or None (`affine_scan`)."""
    def build():
        c = position_gains(length, options, device)
        return _ScanPlan.build(c, 1.0 - c)

    return cached_on_cpu("scan plan", length, options, device, build)


def shared_scan(z, c, a, x0, out=None, plan=None):
    """x (B, T) float64 with x_t = a_t x_{t-1} + c_t z_t, x_{-1} = x0, for a (B, T) float64 z
    and (T,) coefficients a, c (None: 1) shared by the rows (module docstring). The caller
    guarantees |z|, |x0| <= LARGEST_VALUE. Returns None when the products leave float64's range
    within a chunk (large q); the caller then runs `affine_scan`. x may be a strided view. out:
    a contiguous (B, T) float64 tensor other than z that x is written to when T is a multiple of
    the chunk length (fresh (B, T) buffers cost more than a pass on CPUs), or None. plan: the
    `_ScanPlan` of (c, a), which are then not read."""
    if plan is None:
        plan = _ScanPlan.build(c, a)
    return None if plan is None else _apply(z, plan, x0, out)


def _apply(z, plan, x0, out):
    rows, length = z.shape
    size, products, first = plan.size, plan.products, plan.first
    chunks = products.shape[0]
    if out is None or out.shape != (rows, chunks * size) or not out.is_contiguous():
        out = torch.empty(rows, chunks * size, dtype=COMPUTE, device=z.device)
    torch.mul(z, plan.weights, out=out[:, :length])
    out[:, length:].zero_()
    sums = out.view(rows, chunks, size).cumsum_(-1)
    if chunks > 1:
        ends_b = sums[:, :, -1] * plan.ends
        if plan.ends_plan is not None:
            states = _apply(ends_b, plan.ends_plan, x0, None)  # x at each chunk's end
        else:
            need_a = x0 != 0
            a_total, states = affine_scan(plan.ends_a.clone(), ends_b, need_a)
            if need_a:
                states = states.add_(a_total * x0)
        carried = F.pad(states[:, :-1], (1, 0), value=x0).mul_(first)
        sums.add_(carried[:, :, None])
    elif x0 != 0:
        sums.add_(first * x0)
    sums.mul_(products)
    return out[:, :length]


def gain_lookup(gains, index):
    """Gains at 0-based gain indices (clamped: beyond the table every gain is saturated)."""
    return torch.take(gains, index.clamp(0, gains.numel() - 1))


def position_gains(length, options, device):
    """(T,) gains of a shared coefficient sequence: the token at position t uses K_{t+1}."""
    gains = tables.gain_table(length, options.q, options.r, options.p0, device, COMPUTE)
    return gain_lookup(gains, torch.arange(length, device=device))


def scannable(z, x0):
    """Whether `shared_scan`'s bound on the values holds (always for float32 inputs' z)."""
    if z.numel() == 0 or abs(x0) > LARGEST_VALUE:
        return z.numel() == 0 and abs(x0) <= LARGEST_VALUE
    low, high = torch.aminmax(z)
    return max(-float(low), float(high)) <= LARGEST_VALUE


def prefix_filter(z, options, checked=False, out=None):
    """Filtered log-ratio (float64) of a (B, T) float64 z (0 at invalid tokens, finite) whose
    rows all use K_{t+1} at position t (position mode, or skip mode with the valid tokens first).
    checked: z is known to be within LARGEST_VALUE (float32 inputs). out: as in `shared_scan`."""
    length = z.shape[-1]
    x = None
    if checked or scannable(z, options.x0):
        plan = _position_plan(length, options, z.device)
        x = None if plan is None else _apply(z, plan, options.x0, out)
    if x is None:
        c = position_gains(length, options, z.device)
        a_total, x = affine_scan(1.0 - c, z * c, need_a=options.x0 != 0)
        if options.x0 != 0:
            x = x.add_(a_total * options.x0)
    return x


class Compaction:
    """Moves each row's valid tokens to the front of a (B, T) row, in order (skip mode with holes:
    the filter of a row is that of its valid tokens alone), and back."""

    def __init__(self, valid, valid_f=None):
        # Observations up to each token, n(t): a float cumulative sum (exact below 2^24 tokens a
        # row in float32) is several times faster on CPUs than one of the bool mask.
        dtype = torch.float32 if valid.shape[-1] < 2**24 else torch.float64
        flags = valid_f if valid_f is not None and valid_f.dtype == dtype else valid.to(dtype)
        self.count = torch.cumsum(flags, dim=-1).long()
        self.tokens = self.count[:, -1] if valid.shape[-1] else self.count.new_zeros(valid.shape[0])
        self.index = (self.count - 1).clamp_(min=0)  # where token t goes (if valid)
        self.valid = valid

    def compact(self, values):
        """(B, T) values, 0 at invalid tokens -> (B, T) with the valid tokens first, 0 after."""
        return torch.zeros_like(values).scatter_add_(1, self.index, values)

    def expand(self, compacted):
        """Compacted values -> each token's value at its own place, for valid tokens; at an
        invalid token, the value of the row's previous valid token (of the first one if none)."""
        return torch.gather(compacted, 1, self.index)

    def carried(self, states, x0):
        """Compacted filter states -> the state after each token (x0 before the first valid one)."""
        before = F.pad(states, (1, 0), value=x0)
        return torch.gather(before, 1, self.count)


def nonfinite(z):
    """Where z (0 at invalid tokens) is inf or NaN, or None when nowhere (known without a host
    sync only for CPU tensors; on an accelerator the mask is always built)."""
    if z.device.type == "cpu" and math.isfinite(float(z.sum())):
        return None
    bad = ~torch.isfinite(z)
    if z.device.type == "cpu" and not bool(bad.any()):
        return None
    return bad


def ieee_nonfinite(x, z, c, bad, running_count):
    """What the recursion x + K (z - x) gives once an observation is inf or NaN: K z (inf, or NaN)
    at that token and NaN (inf - inf) at every later one of its sequence. The scan itself ran on
    finite values: its closed form would carry an inf along where the recursion has NaN, and in
    a packed stream could carry it into the next sequence."""
    earlier = running_count(bad) > bad
    return torch.where(earlier, math.nan, torch.where(bad, c * z, x))
