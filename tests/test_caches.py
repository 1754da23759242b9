"""The table cache (kpo_kernels.tables) under a training process (issue 19, items 1, 2, 6, 10, 11):
threads, long histories of distinct noise settings, byte bounds, pins for CUDA graphs, and
`prepare` for every layout."""

import gc
import math
import random
import sys
import threading
import weakref

import pytest
import torch

import kpo_kernels
from kpo_kernels import gains as gains_module, tables
from kpo_kernels.innovation import variance_ratio_schedule
from kpo_kernels.tables import GAINS, PinnedTables, TableCache
from conftest import DEVICE

KIB = 1 << 10


@pytest.fixture
def small_cache(monkeypatch):
    """A fresh cache in place of the process-wide one, with a budget that calls exceed quickly."""

    def install(max_bytes=64 * KIB, max_entries=1024):
        fresh = TableCache(max_bytes=max_bytes, max_entries=max_entries)
        monkeypatch.setattr(tables, "cache", fresh)
        return fresh

    return install


def _random_q(rng):
    return 10 ** rng.uniform(-8, 0)


def _assert_within_bounds(cache, device="cpu"):
    for held in cache._devices.values():  # the running byte counts match the entries held
        assert held.lru_bytes == sum(entry.nbytes for entry in held.lru.values())
        assert held.pinned_bytes == sum(entry.nbytes for entry in held.pinned.values())
    pinned = cache.nbytes(device, pinned=True)
    assert cache.nbytes(device) <= max(cache.max_bytes, pinned)
    assert cache.entries(device) <= cache.max_entries


# ----------------------------------------------------------------------------- threads


@pytest.mark.parametrize("seed", [0, 1])
def test_concurrent_calls_with_distinct_q_from_threads(small_cache, seed):
    """Finding 1: four threads calling kalman_filter with random q raised `OrderedDict mutated
    during iteration` (or KeyError) within seconds; a fit_noise thread beside kpo_loss ones too.
    The budget holds 8 tables, so every call also evicts."""
    cache = small_cache(max_bytes=8 * 64, max_entries=8)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    errors = []

    def filter_calls(thread):
        rng = random.Random(seed * 100 + thread)
        for _ in range(120):
            out = kpo_kernels.kalman_filter(torch.zeros(1, 8), q=_random_q(rng), backend="torch")
            assert torch.equal(out, torch.zeros(1, 8))

    def loss_calls(thread):
        rng = random.Random(seed * 100 + thread)
        x = torch.randn(2, 8, generator=torch.Generator().manual_seed(thread))
        for _ in range(40):
            with kpo_kernels.prepare(8, q=_random_q(rng), device="cpu", backend="torch"):
                kpo_kernels.kpo_loss(x, x - 0.01, torch.ones(2), q=_random_q(rng), backend="torch")

    def fit_calls(thread):
        kpo_kernels.fit_noise(0.05 * torch.randn(2, 64, generator=torch.Generator().manual_seed(thread)))

    def run(work, thread):
        try:
            work(thread)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    jobs = [filter_calls] * 4 + [loss_calls] * 2 + [fit_calls]
    _run_threads([threading.Thread(target=run, args=(work, i)) for i, work in enumerate(jobs)], switch)
    assert not errors, errors[:3]
    _assert_within_bounds(cache)
    assert cache.nbytes("cpu", pinned=True) == 0  # every prepare was released


def _run_threads(threads, switch_interval):
    """Start and join `threads`, then restore the interpreter's switch interval."""
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switch_interval)


def test_cache_bookkeeping_survives_threads_that_pin_and_evict():
    """The cache alone, hammered: hits, misses, evictions (5 entries for 8 q) and pins released
    from six threads; its byte counts must still match what it holds."""
    cache = TableCache(max_bytes=6 * 64, max_entries=5)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    errors = []

    def work(thread):
        rng = random.Random(thread)
        try:
            for step in range(1000):
                q = rng.choice([1e-3, 2e-3, 3e-3, 4e-3, 5e-3, 6e-3, 7e-3, 8e-3])
                if thread % 2 and step % 10 == 0:
                    with PinnedTables(cache) as owner, cache.pinning(owner):
                        cache.get(GAINS, 8, q, 1.0, 0.0, "cpu", torch.float64)
                else:
                    cache.get(GAINS, rng.choice([4, 8]), q, 1.0, 0.0, "cpu", torch.float64)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    _run_threads([threading.Thread(target=work, args=(i,)) for i in range(6)], switch)
    assert not errors, errors[:3]
    _assert_within_bounds(cache)
    assert cache.nbytes("cpu", pinned=True) == 0


# ----------------------------------------------------------------------------- O(1) per call


def _lines_run(call):
    """Python lines executed inside kpo_kernels during `call()`: the host work, independent of
    timing."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if "kpo_kernels" not in frame.f_code.co_filename:
            return None
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        call()
    finally:
        sys.settrace(None)
    return count


def test_host_work_per_call_does_not_grow_with_history(small_cache):
    """Finding 2: each lookup walked every entry (after 10,000 distinct q a (4, 256) kpo_loss went
    from 5 to 43 ms). The lines run by a call that finds its table, and by one that builds a
    new one, are the same after 20 distinct q and after 3,000 (the entry bound then evicts)."""
    cache = small_cache(max_bytes=64 << 20, max_entries=1024)
    z = torch.zeros(1, 8)
    rng = random.Random(0)

    def measure():
        kpo_kernels.kalman_filter(z, q=1e-3, backend="torch")
        hit = _lines_run(lambda: kpo_kernels.kalman_filter(z, q=1e-3, backend="torch"))
        miss = _lines_run(lambda: kpo_kernels.kalman_filter(z, q=_random_q(rng), backend="torch"))
        return hit, miss

    for _ in range(20):
        tables.gain_table(8, _random_q(rng), 1.0, 0.0, "cpu", torch.float64)
    hit_short, miss_short = measure()
    for _ in range(3000):
        tables.gain_table(8, _random_q(rng), 1.0, 0.0, "cpu", torch.float64)
    assert cache.entries("cpu") == cache.max_entries
    hit_long, miss_long = measure()
    assert hit_long == hit_short
    assert miss_long <= miss_short + 5  # an eviction step or two more, whatever the history


# ----------------------------------------------------------------------------- byte bounds


def test_bytes_and_entries_stay_bounded_over_many_distinct_q(small_cache):
    """Every kind of table counts toward one budget per device (the variance-ratio tables had no
    byte bound); both bounds hold after every call."""
    cache = small_cache(max_bytes=64 * KIB, max_entries=24)
    rng = random.Random(1)
    x = torch.randn(2, 500)
    for i in range(60):
        kpo_kernels.kpo_loss(x, x - 0.01, torch.ones(2), q=_random_q(rng), backend="torch")
        _assert_within_bounds(cache)
    assert cache.nbytes("cpu") > 32 * KIB  # the budget is used, not left empty


def test_fit_noise_leaves_tables_within_the_budget(small_cache):
    """Finding 6: one fit_noise(0.05 * randn(1, 2**20)) left 64 MiB of gain tables plus 128 MiB
    of variance-ratio tables, where the README promises 64 MiB per device. Scaled down: 2**14
    tokens (128 KiB a float64 table) under a 256 KiB budget."""
    cache = small_cache(max_bytes=256 * KIB)
    kpo_kernels.fit_noise(0.05 * torch.randn(1, 2**14, generator=torch.Generator().manual_seed(0)))
    assert 0 < cache.nbytes("cpu") <= 256 * KIB
    assert TableCache().max_bytes == 64 << 20  # the documented default


def test_a_table_larger_than_the_budget_is_served_but_not_kept(small_cache):
    cache = small_cache(max_bytes=4 * KIB)
    out = kpo_kernels.kalman_filter(torch.ones(1, 2000), q=0.0, p0=float("inf"), backend="torch")  # a running mean
    assert torch.allclose(out, torch.ones(1, 2000, dtype=torch.float32))
    assert cache.nbytes("cpu") <= 4 * KIB  # its 2048 float64 gains were not kept


# ----------------------------------------------------------------------------- pins


def test_prepared_tables_survive_eviction_pressure_and_longer_calls(small_cache):
    """Finding 10: a CUDA graph keeps raw pointers, but tables were replaced when they grew and
    evicted by later q. Tables `prepare` pins are neither, until released."""
    cache = small_cache(max_bytes=32 * KIB, max_entries=16)
    q = 3e-4
    pinned = kpo_kernels.prepare(300, q=q, device="cpu", backend="torch")
    held = [weakref.ref(entry.table) for t in cache._devices.values() for entry in t.pinned.values()]
    assert held and pinned.nbytes == cache.nbytes("cpu", pinned=True) > 0
    x = torch.randn(2, 300, dtype=torch.float64)
    kpo_kernels.kalman_filter(torch.randn(1, 3000), q=q, backend="torch")  # a longer table, same q
    rng = random.Random(2)
    for _ in range(200):
        kpo_kernels.kpo_loss(x, x - 0.01, torch.ones(2, dtype=torch.float64), q=_random_q(rng), backend="torch")
        _assert_within_bounds(cache)
    gc.collect()
    assert all(ref() is not None for ref in held)
    builds = cache.builds
    kpo_kernels.kpo_loss(x, x - 0.01, torch.ones(2, dtype=torch.float64), q=q, backend="torch")
    kpo_kernels.kalman_filter(x[:, :100], q=q, backend="torch")  # a shorter batch reads them too
    assert cache.builds == builds
    pinned.release()
    assert cache.nbytes("cpu", pinned=True) == 0 and pinned.nbytes == 0
    pinned.release()  # twice is harmless


def test_tables_read_during_capture_are_pinned_and_missing_ones_not_cached(small_cache, monkeypatch):
    """Calls during CUDA-graph capture pin what they read; a table missing then is built
    (recorded into the graph) without entering the cache, whose memory eager calls would read
    before any replay wrote it."""
    cache = small_cache(max_bytes=16 * KIB, max_entries=8)
    z = torch.randn(1, 64)
    kpo_kernels.kalman_filter(z, q=1e-3, backend="torch")
    monkeypatch.setattr(tables, "capturing", lambda device: True)
    kpo_kernels.kalman_filter(z, q=1e-3, backend="torch")
    captured = cache.nbytes("cpu", pinned=True)
    assert captured > 0
    entries = cache.entries("cpu")
    with pytest.warns(UserWarning, match="prepare"):
        kpo_kernels.kalman_filter(z, q=2e-3, backend="torch")
    assert cache.entries("cpu") == entries
    monkeypatch.setattr(tables, "capturing", lambda device: False)
    rng = random.Random(3)
    for _ in range(50):
        kpo_kernels.kalman_filter(z, q=_random_q(rng), backend="torch")
    builds = cache.builds
    kpo_kernels.kalman_filter(z, q=1e-3, backend="torch")
    assert cache.builds == builds and cache.nbytes("cpu", pinned=True) == captured
    kpo_kernels.release_tables()
    assert cache.nbytes("cpu", pinned=True) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_table_missing_during_capture_is_built_from_scratch(small_cache, monkeypatch, dtype):
    """During capture a missing table is the torch operations alone, recorded into the graph:
    not derived from a cached gains table that nothing pins (its memory could be reused before a
    replay), and not the GPU's table kernel (a kernel cannot be loaded while a stream captures)."""
    from kpo_kernels.backends import triton_tables

    cache = small_cache(max_bytes=1 << 20)
    monkeypatch.setattr(tables, "KERNEL_DEVICES", ("cpu",))
    monkeypatch.setattr(triton_tables, "build_tables", lambda *args: pytest.fail("the table kernel ran during capture"))
    cache.get(GAINS, 300, 1e-3, 1.0, 0.0, "cpu", torch.float64)  # cached eagerly: what a derived table would read
    given = []
    build = tables._build
    monkeypatch.setattr(tables, "_build", lambda *args, **kw: given.append(args[7:] + tuple(kw.values())) or build(*args, **kw))
    monkeypatch.setattr(tables, "capturing", lambda device: True)
    with pytest.warns(UserWarning, match="prepare"):
        ratios = cache.get(tables.VARIANCE_RATIOS, 300, 1e-3, 1.0, 0.0, "cpu", dtype)
    assert given == [()] and cache.entries("cpu") == 1  # no gains passed in; nothing new cached
    assert torch.equal(ratios, variance_ratio_schedule(gains_module.gain_schedule(512, 1e-3, 1.0, 0.0), 1e-3, 0.0).to(dtype))


# ----------------------------------------------------------------------------- prepare


def test_prepare_covers_packed_batches_whose_offsets_are_on_the_device(small_cache, monkeypatch, backend):
    """Finding 11: a packed batch with offsets on the GPU sizes its tables by the token count N,
    not the longest sequence, so prepare(longest) did not cover it. Simulated on the CPU by
    making the offsets count as device-resident (on a GPU they are); prepare's tokens= covers it."""
    cache = small_cache(max_bytes=1 << 20)
    lengths = [50, 64, 30, 60]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(DEVICE)
    tokens = int(cu[-1])
    known_on_host = tables.packed_longest
    monkeypatch.setattr(tables, "packed_longest", lambda cu_seqlens, n: n)
    x = torch.randn(tokens, device=DEVICE)

    def packed_calls():
        kpo_kernels.kalman_filter(x, cu_seqlens=cu, q=0.0, backend=backend)
        kpo_kernels.kpo_loss(x, x - 0.01, torch.ones(len(lengths), 1, device=DEVICE), cu_seqlens=cu, q=0.0, backend=backend)

    with kpo_kernels.prepare(max(lengths), q=0.0, device=DEVICE, backend=backend):
        builds = cache.builds
        packed_calls()
        assert cache.builds > builds  # q = 0 never saturates: the N-token tables were missing
    cache.clear()
    with kpo_kernels.prepare(max(lengths), tokens=tokens, q=0.0, device=DEVICE, backend=backend):
        builds = cache.builds
        packed_calls()
        monkeypatch.setattr(tables, "packed_longest", known_on_host)
        packed_calls()  # offsets on the host: the longest sequence's tables
        kpo_kernels.kalman_filter(x[:192].reshape(3, 64), q=0.0, backend=backend)  # padded
        assert cache.builds == builds


def test_prepare_and_cache_refuse_bad_arguments():
    with pytest.raises(ValueError, match="tokens"):
        kpo_kernels.prepare(8, tokens=0, device="cpu")
    with pytest.raises(TypeError, match="tokens"):
        kpo_kernels.prepare(8, tokens=8.5, device="cpu")
    with pytest.raises(ValueError, match="length"):
        kpo_kernels.prepare(0, device="cpu")
    with pytest.raises(ValueError, match="max_bytes"):
        TableCache(max_bytes=-1)
    with pytest.raises(ValueError, match="max_entries"):
        TableCache(max_entries=2.5)


def test_tables_of_every_kind_share_one_budget(small_cache):
    cache = small_cache(max_bytes=8 * KIB)
    for kind in (GAINS, tables.VARIANCE_RATIOS, tables.LOG_VARIANCE_RATIOS):
        cache.get(kind, 1000, 1e-9, 1.0, 0.0, "cpu", torch.float64)  # 1024 entries, 8 KiB each
    assert cache.entries("cpu") == 1 and cache.nbytes("cpu") == 8 * KIB


@pytest.mark.parametrize("p0", [0.0, 0.5, math.inf])
@pytest.mark.parametrize("cached_longest", [None, 300, 5000])
def test_derived_tables_are_the_same_whether_the_gains_were_cached(small_cache, monkeypatch, p0, cached_longest):
    """Variance ratios (and their logs) come from the float64 gains table when one is cached (of
    the same length or longer): bitwise what a fresh build gives, and the gains stay untouched."""
    cache = small_cache(max_bytes=1 << 20)
    q, r = 3e-7, 0.026
    schedules = []
    monkeypatch.setattr(tables, "gain_schedule", lambda *args, **kw: schedules.append(args) or gains_module.gain_schedule(*args, **kw))
    fresh = gains_module.gain_schedule(512, q, r, p0)
    expected = variance_ratio_schedule(fresh, q / r, p0 / r)
    if cached_longest is not None:
        gains = cache.get(GAINS, cached_longest, q, r, p0, "cpu", torch.float64)
        before = gains.clone()
    ratios = cache.get(tables.VARIANCE_RATIOS, 300, q, r, p0, "cpu", torch.float64)
    logs = cache.get(tables.LOG_VARIANCE_RATIOS, 300, q, r, p0, "cpu", torch.float32)
    assert torch.equal(ratios, expected) and torch.equal(logs, expected.log().float())
    assert cache.builds == (3 if cached_longest is not None else 2)
    assert len(schedules) == (1 if cached_longest is not None else 2)  # derived from the cached gains
    if cached_longest is not None:
        assert torch.equal(gains, before)


@pytest.mark.parametrize("p0", [0.0, 0.5, math.inf])
def test_log_variance_ratios_are_the_float64_log_of_the_ratios(p0):
    """The fused forward's log-likelihood reads log w from a table: the float64 log of the
    variance ratios rounded once (-inf where w = 0: a diffuse prior's first observation)."""
    ratios = tables.variance_ratio_table(300, 1e-3, 0.5, p0, "cpu", torch.float64)
    logs = tables.log_variance_ratio_table(300, 1e-3, 0.5, p0, "cpu", torch.float32)
    assert logs.shape == ratios.shape and logs.dtype == torch.float32
    assert torch.equal(logs, ratios.log().float())
    assert (float(logs[0]) == -math.inf) == (p0 == math.inf) and torch.isfinite(logs[1:]).all()


def test_release_tables_names_a_bad_device():
    with pytest.raises(TypeError, match="release_tables: device"):
        kpo_kernels.release_tables(device=3.5)
    kpo_kernels.release_tables(device="cpu")
    kpo_kernels.release_tables()


# ----------------------------------------------------------------------------- the CPU scan cache


def test_cpu_scan_cache_is_bounded_by_bytes(monkeypatch):
    """The CPU's cache of settings-only (T,) work (torch_scan.cached_on_cpu) keeps within its byte
    budget however many settings pass, and does not keep an entry above a quarter of it."""
    from collections import OrderedDict

    from kpo_kernels.backends import torch_scan

    monkeypatch.setattr(torch_scan, "_CPU_CACHE", OrderedDict())
    monkeypatch.setattr(torch_scan, "_cpu_cache_bytes", 0)
    monkeypatch.setattr(torch_scan, "_CPU_CACHE_BYTES", 1 << 20)
    z = torch.randn(1, 4096, generator=torch.Generator().manual_seed(0)) * 0.05
    for i in range(40):  # about 66 KiB an entry: 2.5 times the budget in all
        kpo_kernels.kalman_filter(z, q=1e-3 * (1 + i), backend="torch")
    sizes = [size for _, size in torch_scan._CPU_CACHE.values()]
    assert sum(sizes) == torch_scan._cpu_cache_bytes <= 1 << 20
    assert 4 <= len(sizes) < 40
    long = torch.randn(1, 32768, generator=torch.Generator().manual_seed(1)) * 0.05  # about 0.5 MiB
    kpo_kernels.kalman_filter(long, q=7e-3, backend="torch")
    assert not any(key[1] == 32768 for key in torch_scan._CPU_CACHE)
