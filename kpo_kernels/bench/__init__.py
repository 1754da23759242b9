"""The measurements behind `python -m kpo_kernels`: is the package right, and how fast is it here?

Ships with the package so that an installed copy (no source checkout) can check itself:

- `data`: synthetic off-policy GRPO micro-batches (and log-ratio streams for accuracy sweeps).
- `implementations`: every implementation compared, by its `impl` name (this package, the
  sequential reference, the baselines).
- `baselines`: today's losses (verl's `vanilla` GRPO, the authors' vectorized KPO filter) and the
  float64 sequential recursion used as the accuracy yardstick.
- `cases`: the shapes measured (default run, `--full` sweep, accuracy lengths) and byte counts.
- `correctness`: the float64 yardstick and the error columns; the pass/fail check.
- `timing`, `memory`: median times (CPU perf_counter, CUDA events) and peak memory of one step.
- `environment`: device, versions, commit and date recorded with every row.
- `run`: correctness first, then memory and time, case by case; the accuracy sweep.
- `report`: terminal and markdown tables, JSON, the two-panel PNG.
- `command`: the body of `python -m kpo_kernels`.

The sequential reference is `kpo_kernels._reference`, the repository's `reference/` directory
shipped inside the package (in the source tree `kpo_kernels/_reference` is a link to it).
Nothing here imports from a source checkout (`benchmarks/`, `tests/`, `reference/`).
"""
