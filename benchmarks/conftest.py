"""pytest-benchmark setup: after the run, print each group's medians as ratios."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` and this checkout's `kpo_kernels`


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        if bench.stats is None or bench.has_error:
            continue
        groups.setdefault(bench.group, {})[bench.params.get("name") if bench.params else bench.name] = bench.stats.median
    terminalreporter.section("median time relative to grpo-eager and kpo")
    for group, medians in groups.items():
        terminalreporter.write_line(f"{group}:")
        for name, median in sorted(medians.items(), key=lambda item: item[1]):
            vs = [f"{median / medians[base]:.2f}x {base}" for base in ("grpo-eager", "kpo-torch", "kpo") if base in medians and base != name]
            terminalreporter.write_line(f"  {name:22s} {median * 1e3:9.3f} ms   " + ", ".join(vs))
