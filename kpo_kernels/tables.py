"""The per-device cache of the tables the kernels read: gains and variance ratios.

One design for every table. An entry is keyed by (kind, q / r, p0 / r, dtype, length) on its
device, kind "gains" (K_1.., `gains.gain_schedule`) or "variance_ratios" (w_1..,
`innovation.variance_ratio_schedule`), length a power of two (`table_length`). A table serves
every sequence up to its length, and longer ones once it reaches the saturation index.

- Thread-safe: one lock guards every map; tables are built outside it (two threads may build the
  same table at once: the first one stored is kept and returned to both).
- O(1) host work per call, whatever the history: a lookup is a few dict probes (the wanted
  length, then the longer powers of two that also serve it: at most ~32), the byte counts are
  kept as entries come and go, and eviction pops the least recently used entry.
- Bounded per device: at most `max_bytes` (64 MiB) and `max_entries` (1024) for all kinds
  together. A table that cannot fit is returned without being kept (the next call builds it
  again).
- Never freed or replaced while a CUDA graph or `prepare` may read it. Entries are never
  replaced (a longer table is a new entry), and an entry is *pinned* when `kpo_kernels.prepare`
  builds or finds it (until the returned `PinnedTables` is released) or when a call reads it
  during CUDA-graph capture (until `release_tables()`). Pinned entries are never evicted; they
  count toward the budget and the unpinned ones make room for them. Pins alone may exceed the
  budget (they are what the caller asked to keep): `nbytes(device, pinned=True)` reports them.
  A table missing during capture is not cached: the kernels that build it are recorded into the
  graph (recomputed at each replay: correct, slower), with a warning that names `prepare`.
"""

import contextlib
import threading
import warnings
from collections import OrderedDict

import torch

from .gains import gain_schedule, saturation_index
from .innovation import variance_ratio_schedule

GAINS = "gains"
VARIANCE_RATIOS = "variance_ratios"
LOG_VARIANCE_RATIOS = "log_variance_ratios"  # log w, computed in float64 (the fused forward's log-likelihood)
MAX_BYTES = 64 << 20  # per device, every kind together (README)
MAX_ENTRIES = 1024  # per device: bounds the host memory of many small tables
# The longest table built (2 GiB of float64 gains): past it an entering state's count (or a
# sequence) is refused with a ValueError rather than left to the allocator. Only q = 0 or a q
# whose gains saturate this late (q below about 1e-14) needs a table this long, and then only
# for a count or a length of hundreds of millions of observations.
MAX_TABLE_ENTRIES = 1 << 28


def table_length(longest, q, r, p0):
    """Entries a table needs to serve sequences of up to `longest` tokens: the power of two at
    least `longest`, or past the saturation index if that is shorter."""
    size = 1 << max(0, int(longest) - 1).bit_length()
    saturation = saturation_index(q, r, p0)
    if saturation is not None:
        size = min(size, 1 << saturation.bit_length())  # > saturation: K_{size} is saturated
    return max(1, size)


def packed_longest(cu_seqlens, num_tokens):
    """The sequence-length bound a packed batch's tables are sized by: its longest sequence when
    the offsets are on the CPU (known without a host sync), else every token, N."""
    if cu_seqlens.device.type == "cpu" and cu_seqlens.numel() > 1:
        return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return num_tokens


KERNEL_DEVICES = ("cuda",)  # where float32 tables come from one Triton launch (backends/triton_tables.py)


def _build_set(kind, length, q, r, p0, device, dtype, gains=None):
    """{kind: table}: the `kind` table, and on a GPU (float32) its two companions, all three
    built by one Triton launch (some twenty torch launches each otherwise). The companions are
    cached too: a loss with every metric reads all three; gains-only callers (the filter,
    metrics="basic") fill the cache three times as fast, which bounds it all the same."""
    if dtype == torch.float32 and device.type in KERNEL_DEVICES:
        built = _launched(length, q, r, p0, device)
        if built is not None:
            return built
    return {kind: _build(kind, length, q, r, p0, device, dtype, gains)}


def _build(kind, length, q, r, p0, device, dtype, gains=None):
    """The `kind` table of `length` entries in torch operations; `gains`: K_1..K_length in
    float64 when at hand."""
    if gains is None:
        gains = gain_schedule(length, q, r, p0, device=device)
    if kind in (VARIANCE_RATIOS, LOG_VARIANCE_RATIOS):
        gains = variance_ratio_schedule(gains, float(q) / float(r), float(p0) / float(r))
    if kind == LOG_VARIANCE_RATIOS:
        gains = gains.log()  # -inf where w = 0 (a diffuse prior's first observation: never scored)
    return gains.to(dtype)


def _launched(length, q, r, p0, device):
    try:
        from .backends import triton_tables
    except ImportError:  # a Triton that cannot load: the torch operations serve
        return None
    built = {kind: torch.empty(length, dtype=torch.float32, device=device) for kind in (GAINS, VARIANCE_RATIOS, LOG_VARIANCE_RATIOS)}
    # Triton launches on the current device: make it the tables'
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return built if triton_tables.build_tables(length, q, r, p0, *built.values()) else None


def capturing(device):
    """Whether work on `device` is being captured into a CUDA graph now."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def canonical_device(device):
    """torch.device("cuda") and the tensors' cuda:<current> name the same cache."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class _Entry:
    __slots__ = ("table", "nbytes", "owners")

    def __init__(self, table):
        self.table = table
        self.nbytes = table.numel() * table.element_size()
        self.owners = set()  # the PinnedTables that pin it


class _DeviceTables:
    """One device's entries: unpinned ones in least-recently-used order, pinned ones apart (so
    that eviction never walks past them)."""

    def __init__(self):
        self.lru = OrderedDict()
        self.pinned = {}
        self.lru_bytes = 0
        self.pinned_bytes = 0
        self.longest = 0  # the longest table ever stored: bounds the probes for longer tables

    def find(self, base, length):
        while length <= self.longest:
            key = base + (length,)
            entry = self.pinned.get(key)
            if entry is not None:
                return key, entry
            entry = self.lru.get(key)
            if entry is not None:
                self.lru.move_to_end(key)
                return key, entry
            length *= 2
        return None, None

    def pin(self, key, entry, owner):
        if not entry.owners:
            del self.lru[key]
            self.lru_bytes -= entry.nbytes
            self.pinned[key] = entry
            self.pinned_bytes += entry.nbytes
        entry.owners.add(owner)

    def unpin(self, key, owner):
        entry = self.pinned[key]
        entry.owners.discard(owner)
        if not entry.owners:
            del self.pinned[key]
            self.pinned_bytes -= entry.nbytes
            self.lru[key] = entry
            self.lru_bytes += entry.nbytes


class PinnedTables:
    """Tables kept for a caller (`kpo_kernels.prepare`, or CUDA-graph captures): never evicted
    or replaced until `release()`. Also a context manager that releases on exit.

        with kpo_kernels.prepare(4096, q=fit.q, r=fit.r) as pinned:
            ...  # capture and replay CUDA graphs that read these tables

    `nbytes` is what it holds. docs/compiled-steps.md explains when to release.
    """

    def __init__(self, cache):
        self._cache = cache
        self._keys = set()  # (device, key) of each pinned entry

    @property
    def nbytes(self):
        """Bytes of the tables this holds (shared tables count in full for each holder)."""
        return self._cache._pinned_nbytes(self)

    def release(self):
        """Let the cache evict these tables again (once no CUDA graph that read them remains)."""
        self._cache.release(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __repr__(self):
        return f"PinnedTables({len(self._keys)} tables, {self.nbytes} bytes)"


class TableCache:
    """Gain and variance-ratio tables on each device: see the module docstring."""

    def __init__(self, max_bytes=MAX_BYTES, max_entries=MAX_ENTRIES):
        for name, value in (("max_bytes", max_bytes), ("max_entries", max_entries)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self.builds = 0  # tables built so far (cached or not)
        self.captured = PinnedTables(self)  # the pins of tables read during CUDA-graph capture
        self._devices = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # .owner: the PinnedTables that `pinning` fills

    def get(self, kind, longest, q, r, p0, device, dtype):
        """The `kind` table (float `dtype`, on `device`) for sequences of up to `longest` tokens."""
        device = canonical_device(device)
        length = table_length(longest, q, r, p0)
        if length > MAX_TABLE_ENTRIES:
            raise ValueError(
                f"initial_state.count (or the sequence length): the gains at q / r = {float(q) / float(r):g} do "
                f"not saturate within {MAX_TABLE_ENTRIES} observations, and these sequences reach observation "
                f"{longest} (their length plus the count they enter with): a table that long is refused"
            )
        base = (kind, float(q) / float(r), float(p0) / float(r), dtype)
        owner = getattr(self._local, "owner", None)
        captured = capturing(device)
        if captured and owner is None:
            owner = self.captured
        with self._lock:
            tables = self._devices.setdefault(device, _DeviceTables())
            key, entry = tables.find(base, length)
            if entry is not None:
                self._pin(tables, device, key, entry, owner)
                return entry.table
            # the other kinds derive from the float64 gains: reuse them when cached (a fit per step
            # asks for new tables at each step; the torch backend reads the gains first)
            _, gains = tables.find((GAINS,) + base[1:3] + (torch.float64,), length) if kind != GAINS else (None, None)
            gains = None if gains is None else gains.table[:length]
        if captured:
            warnings.warn(
                f"kpo_kernels: a {kind} table (q={q}, r={r}, p0={p0}, {length} entries) was built during "
                "CUDA-graph capture and is recomputed at each replay; call kpo_kernels.prepare(...) with "
                "the batch's length (and tokens= for packed batches) before capturing",
                stacklevel=2,
            )
            with self._lock:
                self.builds += 1
            # torch operations from scratch, recorded into the graph: no cached table that nothing
            # pins (the gains), and no Triton kernel to load while the stream captures
            return _build(kind, length, q, r, p0, device, dtype)
        built = _build_set(kind, length, q, r, p0, device, dtype, gains)
        with self._lock:
            self.builds += len(built)
            for companion, table in built.items():  # kept as any table is, never pinned: not asked for
                if companion != kind:
                    self._store(tables, device, (companion,) + base[1:], length, table, None)
            return self._store(tables, device, base, length, built[kind], owner)

    def _store(self, tables, device, base, length, table, owner):
        """Keep a built table (under the lock) and return what the caller reads: the entry another
        thread stored meanwhile, if any; else `table`, kept if it fits or an owner pins it."""
        key, entry = tables.find(base, length)
        if entry is None:
            entry = _Entry(table)
            if owner is None and not self._fits(tables, entry.nbytes):
                return table
            key = base + (length,)
            self._evict(tables, entry.nbytes)
            tables.lru[key] = entry
            tables.lru_bytes += entry.nbytes
            tables.longest = max(tables.longest, length)
        self._pin(tables, device, key, entry, owner)
        return entry.table

    @contextlib.contextmanager
    def pinning(self, owner):
        """Within this block (in this thread), every table looked up is pinned for `owner`."""
        previous = getattr(self._local, "owner", None)
        self._local.owner = owner
        try:
            yield owner
        finally:
            self._local.owner = previous

    def release(self, owner=None, device=None):
        """Unpin the tables of `owner` (None: of every owner), on `device` (None: every device)."""
        device = None if device is None else canonical_device(device)
        with self._lock:
            for where, tables in self._devices.items():
                if device is not None and where != device:
                    continue
                for key, entry in list(tables.pinned.items()):
                    for holder in [owner] if owner is not None else list(entry.owners):
                        if holder in entry.owners:
                            holder._keys.discard((where, key))
                            tables.unpin(key, holder)
                self._evict(tables, 0)

    def nbytes(self, device=None, *, pinned=None):
        """Bytes held on `device` (None: every device); pinned=True/False: only pinned/unpinned."""
        device = None if device is None else canonical_device(device)
        with self._lock:
            return sum(
                (t.pinned_bytes if pinned is not False else 0) + (t.lru_bytes if pinned is not True else 0)
                for where, t in self._devices.items()
                if device is None or where == device
            )

    def entries(self, device=None):
        """Number of tables held on `device` (None: every device)."""
        device = None if device is None else canonical_device(device)
        with self._lock:
            return sum(len(t.lru) + len(t.pinned) for w, t in self._devices.items() if device is None or w == device)

    def clear(self):
        """Drop every unpinned table (pinned ones may still be read: see `release`)."""
        with self._lock:
            for tables in self._devices.values():
                tables.lru.clear()
                tables.lru_bytes = 0

    def _fits(self, tables, nbytes):
        return tables.pinned_bytes + nbytes <= self.max_bytes and len(tables.pinned) < self.max_entries

    def _evict(self, tables, incoming):
        """Drop least recently used unpinned tables until `incoming` more bytes (and one more
        entry, if any) fit."""
        extra = 1 if incoming else 0
        while tables.lru and (
            tables.lru_bytes + tables.pinned_bytes + incoming > self.max_bytes
            or len(tables.lru) + len(tables.pinned) + extra > self.max_entries
        ):
            _, entry = tables.lru.popitem(last=False)
            tables.lru_bytes -= entry.nbytes

    def _pin(self, tables, device, key, entry, owner):
        if owner is not None and (device, key) not in owner._keys:
            owner._keys.add((device, key))
            tables.pin(key, entry, owner)

    def _pinned_nbytes(self, owner):
        with self._lock:
            return sum(self._devices[device].pinned[key].nbytes for device, key in owner._keys)


cache = TableCache()


def gain_table(longest, q, r, p0, device, dtype):
    """Gains K_1.. for sequences of up to `longest` tokens (read with a clamped index)."""
    return cache.get(GAINS, longest, q, r, p0, device, dtype)


def variance_ratio_table(longest, q, r, p0, device, dtype):
    """Variance ratios w_1.. = R / S_n, indexed like the gains."""
    return cache.get(VARIANCE_RATIOS, longest, q, r, p0, device, dtype)


def log_variance_ratio_table(longest, q, r, p0, device, dtype):
    """log w_1.., indexed like the gains (the log taken in float64, then rounded once)."""
    return cache.get(LOG_VARIANCE_RATIOS, longest, q, r, p0, device, dtype)


def release_tables(device=None):
    """Unpin every table pinned by `prepare` or read during a CUDA-graph capture.

    Call it once no CUDA graph that read them will be replayed (docs/compiled-steps.md).

    Args:
        device: a device (or its name) to release the tables of; None (default): every device.

    Returns:
        None.

    Raises:
        TypeError: `device` is not a device or a device name.
    """
    if device is not None:
        try:
            device = torch.device(device)
        except (TypeError, RuntimeError):
            raise TypeError(f"release_tables: device must be a torch.device or a device name, got {device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            return  # nothing can be pinned on a device this torch cannot use
    cache.release(device=device)
