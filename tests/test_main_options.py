"""`python -m kpo_kernels` checks every option before any work (issue 19): a bad one is an argparse
error (exit status 2) naming it, not a traceback or a run that ends with a misleading verdict.
Called in-process: parse_args and main, with the run itself replaced."""

import os
from types import SimpleNamespace

import pytest
import torch

from kpo_kernels import __main__ as command_line

GOOD = ["--device", "cpu", "--rows", "4", "--length", "64"]


@pytest.fixture
def no_run(monkeypatch):
    """main() with the run replaced: the test fails if the run starts."""
    from kpo_kernels.bench import command

    started = []
    monkeypatch.setattr(command, "run_command", lambda args: started.append(args) or 0)
    return started


def _bad(capsys, argv, option):
    with pytest.raises(SystemExit) as exit_info:
        command_line.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert option in err, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--dtype", "fp64"], "--dtype"),
        (["--dtype", "fp32,"], "--dtype"),
        (["--dtype", "float32"], "--dtype"),
        (["--q", "-1"], "--q"),
        (["--q", "nan"], "--q"),
        (["--q", "inf"], "--q"),
        (["--q", "1e-320"], "--q"),  # subnormal: refused by the package's own check of q / r
        (["--q", "tiny"], "--q"),
        (["--rows", "0"], "--rows"),
        (["--length", "-3"], "--length"),
        (["--budget", "0"], "--budget"),
        (["--budget", "nan"], "--budget"),
        (["--threads", "0"], "--threads"),
        (["--seed", "-1"], "--seed"),
        (["--accuracy-max-length", "-1"], "--accuracy-max-length"),
        (["--reference-max-length", "x"], "--reference-max-length"),
        (["--impl", "kpo,nonesuch"], "--impl"),
        (["--impl", ","], "--impl"),
        (["--device", "tpu"], "--device"),
        (["--json", "/nonexistent/rows.json"], "--json"),
        (["--markdown", "/nonexistent/table.md"], "--markdown"),
        (["--plot", "/nonexistent/x.png"], "--plot"),
    ],
)
def test_a_bad_option_is_an_argparse_error_before_any_work(capsys, no_run, extra, option):
    _bad(capsys, GOOD + extra, option)
    assert not no_run


def test_rows_and_length_go_together(capsys, no_run):
    _bad(capsys, ["--device", "cpu", "--rows", "4"], "--rows and --length")
    _bad(capsys, ["--device", "cpu", "--length", "64"], "--rows and --length")
    assert not no_run


def test_a_dtype_that_leaves_no_case_is_refused(capsys, no_run):
    _bad(capsys, ["--device", "cpu", "--dtype", "fp16"], "--dtype fp16")  # the CPU's default cases are fp32
    assert not no_run


def test_an_output_that_is_a_folder_or_read_only_is_refused(capsys, no_run, tmp_path):
    _bad(capsys, GOOD + ["--json", str(tmp_path)], "--json")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root may write anyway
            _bad(capsys, GOOD + ["--markdown", str(locked / "table.md")], "--markdown")
    finally:
        locked.chmod(0o700)
    assert not no_run


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_where_there_is_none_is_refused(capsys, no_run):
    _bad(capsys, ["--device", "cuda"], "--device cuda")


def test_good_options_reach_the_run_checked(no_run, tmp_path):
    argv = GOOD + ["--dtype", "fp32,bf16", "--q", "0", "--budget", "0.05", "--seed", "7", "--threads", "1",
                   "--impl", "kpo, grpo-eager", "--json", str(tmp_path / "rows.json"), "--markdown", "table.md"]
    assert command_line.main(argv) == 0
    (args,) = no_run
    assert (args.rows, args.length, args.dtype, args.q, args.seed) == (4, 64, "fp32,bf16", 0.0, 7)
    assert str(args.json).endswith("rows.json")


def test_dtype_names_are_the_cases():
    from kpo_kernels.bench.cases import DTYPES

    assert command_line.DTYPE_NAMES == tuple(DTYPES)


@pytest.mark.parametrize("rows, length", [(3, 40), (2, 1)])
def test_the_noise_section_follows_the_shape_asked_for(monkeypatch, capsys, rows, length):
    """It always fitted 64 x 4096 (8 s); with --rows/--length it fits that shape. T = 1 leaves no
    token to the diffuse prior's likelihood: a line says so, the run goes on."""
    from kpo_kernels.bench import command

    seen = []
    real = command.noise_section
    monkeypatch.setattr(command, "noise_section", lambda batch, generator: seen.append(batch["mask"].shape) or real(batch, generator))
    command._noise(SimpleNamespace(rows=rows, length=length, seed=0), torch.device("cpu"))
    assert seen == [(rows, length)]
    out = capsys.readouterr().out
    assert (f"not fitted on {rows} x {length}" in out) == (length == 1), out
    defaults = SimpleNamespace(rows=None, length=None, seed=0)
    monkeypatch.setattr(command, "noise_section", lambda batch, generator: seen.append(batch["mask"].shape))
    command._noise(defaults, torch.device("cpu"))
    assert seen[-1] == command.NOISE_SHAPE
