#!/usr/bin/env bash
# The one script to run when a GPU is lent:   bash benchmarks/gpu_check.sh
#
# From the repository root, with the image's python3 (torch, triton, pytest, pytest-benchmark,
# matplotlib; nothing is installed or downloaded). At most about 9.5 minutes (GPU_CHECK_BUDGET,
# 540 s, plus the summary; give the device command a 600 s limit): every stage runs under
# `timeout`, the script goes on past failures and prints a summary last. Run it as
#   KPO_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh
# (the device's copy of the checkout may have no .git). Writes these 8
# files directly under $OUT (a new /tmp/gpu_check.* folder when OUT is unset), nothing else there:
#
#   run.log             environment (nvidia-smi, versions), each stage's progress and output
#                       (the host overhead per call of benchmarks/overhead.py and kpo's kernels
#                       one by one from benchmarks/device_time.py among them)
#   tests.log           python3 -m pytest -v on CUDA, Triton compiled natively (no interpreter)
#   results.json        the full sweep (python -m kpo_kernels --full): rows, each with `impl`
#   results.md          the same as a markdown table, with issue 4's GPU goals as measured
#   accuracy_and_time.png  error against float64 vs T (kpo, vectorized-cumsum), time vs tokens
#   accuracy.md         python -m benchmarks.accuracy on CUDA (the Triton filter, q x T)
#   sanitizer.log       compute-sanitizer memcheck of the fused forward+backward, small cases
#   tune.json           block_size x num_warps (and tile_size) sweep of TritonBackend (benchmarks/tune.py)
#
# `bash benchmarks/gpu_check.sh --dry-run` runs every Python part on the CPU with tiny shapes
# (Triton interpreted where it must run) to check the plumbing; its numbers mean nothing.
# Environment: PYTHON (default python3), OUT, GPU_CHECK_BUDGET (seconds, default 540),
# KPO_COMMIT (the commit to record when the copy of the checkout has no .git).

set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT"
TMP=$(mktemp -d)
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 MPLBACKEND=Agg MPLCONFIGDIR=$TMP/mpl
unset TRITON_INTERPRET
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET:-540}))
LOG=$OUT/run.log
: >"$LOG"
SUMMARY=()

log() { echo "$*" | tee -a "$LOG"; }

# stage NAME SECONDS CMD...: run CMD under timeout (capped by the deadline), output to run.log.
stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    ((limit > left)) && limit=$left
    if ((limit < 15)); then
        SUMMARY+=("$(printf '%-12s skipped: out of time' "$name")")
        log "=== $name: skipped, out of time"
        return 0
    fi
    log "=== $name (limit ${limit}s): $*"
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    local note=""
    ((rc == 124 || rc == 137)) && note=" TIMED OUT"
    SUMMARY+=("$(printf '%-12s rc=%-3s %4ss%s' "$name" "$rc" "$(($(date +%s) - t0))" "$note")")
    log "=== $name: rc=$rc after $(($(date +%s) - t0))s$note"
    return 0
}

# ---------------------------------------------------------------- environment
log "gpu_check.sh  $(date -u +%Y-%m-%dT%H:%M:%SZ)  dry_run=$DRY  commit=${KPO_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}  OUT=$OUT"
{
    nvidia-smi 2>&1 | head -20 || true
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>&1 || true
    $PY - <<'EOF'
import os, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton import failed:", e)
print("cuda available:", torch.cuda.is_available(), "| cpus:", os.cpu_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, "| SMs", p.multi_processor_count, "| memory GiB", round(p.total_memory / 2**30, 1))
for name in ("matplotlib", "pytest", "pytest_benchmark", "numpy"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:
        print(name, "missing:", e)
EOF
} 2>&1 | tee -a "$LOG"

if ((DRY)); then
    DEVICE=cpu
    SWEEP=(--device cpu --rows 8 --length 300 --dtype fp32,bf16 --reference-max-length 512 --budget 0.05 --accuracy-max-length 1024)
    ACCURACY=(--device cpu --max-length 2048 --q 1e-8,1e-6,1e-2)
    TUNE=(--device cpu --shapes 4x200 --blocks 16,64 --warps 1,2 --tiles 64)
    TESTS=(tests/test_main.py)
else
    if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        log "no CUDA device: nothing to check here (use --dry-run for the CPU plumbing check)"
        exit 1
    fi
    DEVICE=cuda
    SWEEP=(--device cuda --full --reference-max-length 1024)
    ACCURACY=(--device cuda)
    TUNE=(--device cuda --tiles 4096,16384,65536)
    TESTS=()
fi

# ---------------------------------------------------------------- 1. tests (native Triton on CUDA)
# Compiling every kernel specialisation the tests use dominates: spread it over the CPU cores
# with pytest-xdist when the image has it (the first H200 run: more than 200 s with 8 workers on
# 16 cores; the third: 97 s with 14 workers, so the stage now has 160 s and the sweep, which
# its old 180 s cut 3 cases short of the end, 220 s). -v names each test as it ends, so a failure is named even if the stage times out.
# The default (fast) tier: every kernel variant compiles and runs at least once; the long sweeps
# of --tier slow add shapes and options, not variants (docs/testing.md).
# Without pytest-xdist, pytest.ini's -n auto is overridden (it would be a usage error). The
# long-row float32 precision tests (slow tier) are added by name: only a GPU runs them natively.
XDIST="-o addopts=-ra --strict-markers"
((DRY)) || { $PY -c "import xdist" 2>/dev/null && XDIST="-n $(($(nproc) > 2 ? $(nproc) - 2 : 1))"; }
((DRY)) || TESTS=(tests tests/test_filter.py::test_float32_precision_on_long_rows_triton)
stage tests 160 bash -c "$PY -m pytest -v -p no:cacheprovider '$XDIST' --durations=15 ${TESTS[*]:-} >'$OUT/tests.log' 2>&1; rc=\$?; grep -E '(FAILED|ERROR) ' '$OUT/tests.log' | head -n 20; tail -n 3 '$OUT/tests.log'; exit \$rc"

# ---------------------------------------------------------------- 2. the full sweep (before the sanitizer: the goals matter most)
stage sweep 220 $PY -m kpo_kernels "${SWEEP[@]}" --json "$OUT/results.json" --markdown "$OUT/results.md" --plot "$OUT/accuracy_and_time.png"
if [ -s "$OUT/results.json" ] && [ ! -s "$OUT/accuracy_and_time.png" ]; then  # stopped part-way: render what was measured
    stage report 30 $PY -m kpo_kernels.bench.report "$OUT/results.json" --markdown "$OUT/results.md" --plot "$OUT/accuracy_and_time.png" --goals
fi

# ---------------------------------------------------------------- 2a. kpo's kernels one by one and a graph replay, into run.log
((DRY)) || stage kernels 45 $PY -m benchmarks.device_time --budget 30

# ---------------------------------------------------------------- 2b. host overhead per call (eager, compiled, CUDA graph), into run.log
# (--dry-run: 90 s, for torch.compile's first CPU build on a busy 2-core machine, which took
# more than 40 s there; on the GPU machines the stage has fit in 40 s)
stage overhead $((DRY ? 90 : 40)) $PY -m benchmarks.overhead --repeats 50

# ---------------------------------------------------------------- 3. compute-sanitizer memcheck
find_sanitizer() {
    command -v compute-sanitizer 2>/dev/null && return
    local c
    for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
        /usr/local/cuda/compute-sanitizer/compute-sanitizer /opt/nvidia/*/compute-sanitizer/compute-sanitizer \
        /opt/nvidia/compute-sanitizer/compute-sanitizer; do
        [ -x "$c" ] && echo "$c" && return
    done
    timeout 20 find / -xdev -name compute-sanitizer -type f -perm -u+x 2>/dev/null | head -n 1
}
if ((DRY)); then
    stage sanitizer 120 bash -c "TRITON_INTERPRET=1 $PY -m benchmarks.sanitize_case --device cpu >'$OUT/sanitizer.log' 2>&1; rc=\$?; tail -n 2 '$OUT/sanitizer.log'; exit \$rc"
else
    SAN=$(find_sanitizer)
    if [ -z "$SAN" ]; then
        log "compute-sanitizer not found: running the cases without it"
        stage sanitizer 60 bash -c "$PY -m benchmarks.sanitize_case >'$OUT/sanitizer.log' 2>&1; rc=\$?; echo 'compute-sanitizer not found on this image' >>'$OUT/sanitizer.log'; tail -n 3 '$OUT/sanitizer.log'; exit \$rc"
    else
        log "compute-sanitizer: $SAN"
        # First without the sanitizer: compiles the kernels into Triton's cache and checks the values.
        stage sanitize-warm 45 $PY -m benchmarks.sanitize_case
        stage sanitizer 75 bash -c "PYTORCH_NO_CUDA_MEMORY_CACHING=1 '$SAN' --tool memcheck --leak-check no --error-exitcode 3 --print-limit 30 $PY -m benchmarks.sanitize_case >'$OUT/sanitizer.log' 2>&1; rc=\$?; tail -n 4 '$OUT/sanitizer.log'; exit \$rc"
    fi
fi

# ---------------------------------------------------------------- 4. accuracy sweep of the Triton filter
stage accuracy 35 $PY -m benchmarks.accuracy "${ACCURACY[@]}" --quiet --markdown "$OUT/accuracy.md"

# ---------------------------------------------------------------- 5. block size / warps sweep
if ((DRY)); then
    stage tune 120 env TRITON_INTERPRET=1 $PY -m benchmarks.tune "${TUNE[@]}" --json "$OUT/tune.json"
else
    stage tune 70 $PY -m benchmarks.tune "${TUNE[@]}" --json "$OUT/tune.json"
fi

# ---------------------------------------------------------------- summary (printed last)
rm -rf "$TMP"
{
    echo
    echo "================ gpu_check summary ($(($(date +%s) - START)) s, device $DEVICE)"
    printf '%s\n' "${SUMMARY[@]}"
    echo "--- tests:"
    grep -E '(FAILED|ERROR) ' "$OUT/tests.log" 2>/dev/null | head -n 20
    tail -n 3 "$OUT/tests.log" 2>/dev/null
    echo "--- sanitizer:"
    grep -E "ERROR SUMMARY|agree|MISMATCH|not found" "$OUT/sanitizer.log" 2>/dev/null | tail -n 3
    if [ -s "$OUT/results.json" ]; then
        echo "--- sweep: kpo per case (x: the baseline's time over kpo's; err: filter/grad) and the goals:"
        $PY -m kpo_kernels.bench.report "$OUT/results.json" --brief --goals 2>&1 | head -n 90
    fi
    if grep -q "^=== kernels:" "$LOG"; then
        echo "--- kpo's kernels (device time per step) and graph replay:"
        sed -n '/^=== kernels (/,/^=== kernels:/p' "$LOG" | sed '1d;$d' | head -n 60
    fi
    if [ -s "$OUT/accuracy.md" ]; then
        echo "--- accuracy findings:"
        sed -n '/^## Findings/,$p' "$OUT/accuracy.md" | grep -vE '^(## Findings|```|)$' | head -n 40
    fi
    if [ -s "$OUT/tune.json" ]; then
        echo "--- tune (fastest first):"
        $PY - "$OUT/tune.json" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
for shape in dict.fromkeys(r["shape"] for r in rows):
    ok = sorted((r for r in rows if r["shape"] == shape and r["status"] == "ok"), key=lambda r: r["cost_ms"])
    default = [r for r in ok if r["block_size"] is None and r["num_warps"] is None and r.get("tile_size") is None]
    for r in ok[:4] + [r for r in default if r not in ok[:4]]:
        print(f"{shape:>10} block={r['block_size']} warps={r['num_warps']} tile={r.get('tile_size')}: "
              f"{r['cost_ms'] * 1e3:.1f} us (eager {r['median_ms']:.3f} ms) {r['gbps']:.0f} GB/s {r['check']}")
    bad = [r for r in rows if r["shape"] == shape and r["status"] != "ok"]
    if bad:
        print(f"{shape:>10} {len(bad)} configurations failed, e.g. {bad[0]['status'][:100]}")
EOF
    fi
    echo "--- files in $OUT:"
    ls -l "$OUT" | tail -n +2
    count=$(find "$OUT" -mindepth 1 | wc -l)
    ((count > 8)) && echo "WARNING: $count entries under OUT (at most 8 come back)"
} 2>&1 | tee -a "$LOG"
exit 0
