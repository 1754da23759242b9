"""Bad input: a clear ValueError/TypeError naming the argument, before any kernel runs."""

import math

import pytest
import torch

import kpo_kernels
from kpo_kernels.backends import triton_backend as triton_module


class SpyBackend(kpo_kernels.TorchBackend):
    """A backend that fails the test if it is ever asked to compute."""

    name = "spy"

    def filter(self, *args, **kwargs):
        raise AssertionError("a kernel ran before the arguments were checked")

    loss_forward = filter


def good_inputs(batch=3, length=8):
    return {
        "log_prob": torch.zeros(batch, length),
        "old_log_prob": torch.zeros(batch, length),
        "advantages": torch.ones(batch),
        "mask": torch.ones(batch, length, dtype=torch.bool),
    }


LOSS_CASES = [
    # (override, argument named in the message, exception type)
    ({"old_log_prob": torch.zeros(3, 7)}, "old_log_prob", ValueError),
    ({"mask": torch.ones(3, 9, dtype=torch.bool)}, "mask", ValueError),
    ({"advantages": torch.ones(4)}, "advantages", ValueError),
    ({"advantages": torch.ones(3, 8, 1)}, "advantages", ValueError),
    ({"is_weights": torch.ones(3, 7)}, "is_weights", ValueError),
    ({"log_prob": torch.zeros(3, 8, dtype=torch.int64)}, "log_prob", TypeError),
    ({"old_log_prob": torch.zeros(3, 8, dtype=torch.int32)}, "old_log_prob", TypeError),
    ({"advantages": torch.ones(3, dtype=torch.int64)}, "advantages", TypeError),
    ({"is_weights": torch.ones(3, 8, dtype=torch.int64)}, "is_weights", TypeError),
    ({"log_prob": [[0.0] * 8] * 3}, "log_prob", TypeError),
    ({"mask": [[1] * 8] * 3}, "mask", TypeError),
    ({"mask": torch.ones(3, 8, dtype=torch.complex64)}, "mask", TypeError),
    ({"log_prob": torch.zeros(8)}, "log_prob", ValueError),
    ({"log_prob": torch.zeros(3, 8, 1)}, "log_prob", ValueError),
    ({"old_log_prob": torch.zeros(3, 8, device="meta")}, "old_log_prob", ValueError),
    ({"advantages": torch.ones(3, device="meta")}, "advantages", ValueError),
    ({"mask": torch.ones(3, 8, dtype=torch.bool, device="meta")}, "mask", ValueError),
    ({"q": -1e-6}, "q", ValueError),
    ({"q": math.nan}, "q", ValueError),
    ({"q": math.inf}, "q", ValueError),
    ({"q": "1e-6"}, "q", TypeError),
    ({"r": 0.0}, "r", ValueError),
    ({"r": -1.0}, "r", ValueError),
    ({"p0": -0.5}, "p0", ValueError),
    ({"x0": math.nan}, "x0", ValueError),
    ({"clip_low": -0.1}, "clip_low", ValueError),
    ({"clip_high": -0.1}, "clip_high", ValueError),
    ({"clip": 1}, "clip", TypeError),
    ({"dual_clip": 1.0}, "dual_clip", ValueError),
    ({"dual_clip": 0.5}, "dual_clip", ValueError),
    ({"log_ratio_cap": math.nan}, "log_ratio_cap", ValueError),
    ({"agg": "token_mean"}, "agg", ValueError),
    ({"mask_mode": "ignore"}, "mask_mode", ValueError),
    ({"backend": "cuda"}, "backend", ValueError),
    ({"backend": None}, "backend", ValueError),
    ({"dp_size": 0}, "dp_size", ValueError),
    ({"dp_size": 2.0}, "dp_size", TypeError),
    ({"dp_size": 2, "agg": "token-mean"}, "batch_num_tokens", ValueError),
    ({"dp_size": 2, "agg": "seq-mean-token-mean"}, "global_batch_size", ValueError),
    ({"batch_num_tokens": -1}, "batch_num_tokens", ValueError),
    ({"global_batch_size": -3}, "global_batch_size", ValueError),
    ({"loss_scale_factor": 0.0}, "loss_scale_factor", ValueError),
    ({"batch_num_tokens": torch.ones(2)}, "batch_num_tokens", TypeError),
]


@pytest.mark.parametrize("override, name, exc", LOSS_CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(LOSS_CASES)])
def test_kpo_loss_rejects(override, name, exc):
    args = {**good_inputs(), "backend": SpyBackend(), **override}
    with pytest.raises(exc) as info:
        kpo_kernels.kpo_loss(**args)
    assert name in str(info.value)


def test_good_inputs_pass_the_checks():
    kpo_kernels.kpo_loss(**good_inputs(), backend="torch")
    kpo_kernels.kpo_loss(**good_inputs(), backend="torch", batch_num_tokens=torch.tensor(24), dp_size=2, agg="token-mean")


FILTER_CASES = [
    ({"log_ratio": torch.zeros(8)}, "log_ratio", ValueError),
    ({"log_ratio": torch.zeros(3, 8, dtype=torch.int64)}, "log_ratio", TypeError),
    ({"mask": torch.ones(3, 7)}, "mask", ValueError),
    ({"q": -1.0}, "q", ValueError),
    ({"r": 0}, "r", ValueError),
    ({"p0": -1}, "p0", ValueError),
    ({"mask_mode": "absolute"}, "mask_mode", ValueError),
    ({"backend": "cpu"}, "backend", ValueError),
]


@pytest.mark.parametrize("override, name, exc", FILTER_CASES)
def test_kalman_filter_rejects(override, name, exc):
    args = {"log_ratio": torch.zeros(3, 8), "mask": None, "backend": SpyBackend(), **override}
    with pytest.raises(exc) as info:
        kpo_kernels.kalman_filter(**args)
    assert name in str(info.value)


def test_triton_backend_without_triton(monkeypatch):
    monkeypatch.setattr(triton_module, "_IMPORT_ERROR", ImportError("No module named 'triton'"))
    monkeypatch.setattr(triton_module, "kernels", None)
    with pytest.raises(ValueError, match="triton"):
        kpo_kernels.kpo_loss(**good_inputs(), backend="triton")
    # auto falls back to the torch backend
    loss, _ = kpo_kernels.kpo_loss(**good_inputs(), backend="auto")
    assert torch.isfinite(loss)


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(triton_module, "INTERPRETED", False)
    if triton_module.kernels is None:
        pytest.skip("Triton is not importable")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        kpo_kernels.kpo_loss(**good_inputs(), backend="triton")


def test_module_rejects_bad_configuration_at_construction():
    with pytest.raises(ValueError, match="q"):
        kpo_kernels.KPOLoss(q=-1.0)
    with pytest.raises(TypeError, match="unexpected"):
        kpo_kernels.KPOLoss(kalman_q=1.0)
    with pytest.raises(ValueError, match="backend"):
        kpo_kernels.KPOLoss(backend="gpu")


def test_triton_backend_block_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="block_size"):
        kpo_kernels.TritonBackend(block_size=24)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_prepare_refuses_a_device_this_torch_cannot_use(device):
    with pytest.raises(ValueError, match="device"):
        kpo_kernels.prepare(16, q=1e-4, device=device)
    with pytest.raises(ValueError, match="device"):
        kpo_kernels.prepare(16, q=1e-4)  # the default, device="cuda"


@pytest.mark.parametrize("device", ["gpu", "cuda:x", 3.5])
def test_prepare_refuses_what_is_not_a_device(device):
    with pytest.raises(ValueError, match="device"):
        kpo_kernels.prepare(16, device=device, backend="torch")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use CUDA")
def test_the_device_check_names_the_argument():
    """Tensors on CUDA cannot exist here; the helper every entry point calls on the
    log-probs' device is tested directly."""
    from kpo_kernels.validation import check_device

    assert check_device("log_prob", torch.device("cpu")) == torch.device("cpu")
    for device in ("cuda", torch.device("cuda", 1), "meta"):
        with pytest.raises(ValueError, match="log_prob"):
            check_device("log_prob", device)


def test_meta_log_probs_are_refused_before_any_kernel():
    args = {key: value.to("meta") for key, value in good_inputs().items()}
    with pytest.raises(ValueError, match="log_prob"):
        kpo_kernels.kpo_loss(**args, backend=SpyBackend())


@pytest.mark.parametrize("old_dtype", [torch.float64])
def test_float64_old_log_prob_with_lower_precision_log_prob_is_refused(old_dtype):
    """The loss computes in log_prob's precision: a float64 old_log_prob would be rounded to
    float32 silently. Lower-precision old_log_prob (bf16 / fp16 with fp32) loses nothing."""
    inputs = good_inputs()
    inputs["old_log_prob"] = inputs["old_log_prob"].to(old_dtype)
    with pytest.raises(TypeError) as info:
        kpo_kernels.kpo_loss(**inputs, backend=SpyBackend())
    assert "old_log_prob" in str(info.value) and "log_prob" in str(info.value).replace("old_log_prob", "")
    inputs["old_log_prob"] = inputs["old_log_prob"].to(torch.bfloat16)
    kpo_kernels.kpo_loss(**inputs, backend="torch")
    inputs["log_prob"] = inputs["log_prob"].double()
    inputs["old_log_prob"] = inputs["old_log_prob"].double()
    kpo_kernels.kpo_loss(**inputs, backend="torch")


def test_a_tensors_device_is_checked_without_cuda_queries(monkeypatch):
    """Under torch.compile Dynamo cannot trace torch.cuda.device_count (the first H200 run of the
    compiled CUDA step failed on it): a tensor's device is checked without any CUDA query."""
    from kpo_kernels.validation import check_tensor_device

    def no_query(*args, **kwargs):
        raise AssertionError("a CUDA runtime query")

    monkeypatch.setattr(torch.cuda, "device_count", no_query)
    monkeypatch.setattr(torch.cuda, "is_available", no_query)
    assert check_tensor_device("log_prob", torch.device("cuda", 3)) == torch.device("cuda", 3)
    with pytest.raises(ValueError, match="log_prob is on the meta device"):
        check_tensor_device("log_prob", torch.device("meta"))


def test_config_names_rename_the_option_an_error_is_about():
    """A trainer config's key goes in front of an error about its kpo_loss keyword, and only
    when the keyword is the message's subject: not "clip" in "clip_low ...", nor "q" in "q / r"."""
    from kpo_kernels.validation import config_names

    names = {"q": "kalman_q", "clip": "is_clip"}
    cases = [
        ("q (process noise variance) must be >= 0, got -1.0", "kalman_q: q (process noise"),
        ("clip must be a bool, got str 'yes'", "is_clip: clip must be a bool"),
        ("q / r must be finite, got q=1.0, r=1e-320", "q / r must be finite"),
        ("clip_low must be >= 0, got -0.1", "clip_low must be >= 0"),
    ]
    for message, starts in cases:
        with pytest.raises(ValueError) as raised:
            with config_names(names):
                raise ValueError(message)
        assert str(raised.value).startswith(starts)
