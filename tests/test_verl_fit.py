"""verl `kalman_fit` (issue 17): the config keys as verl users write them (Hydra overrides through
verl's own loader), the loss at the fitted Q and R, per_generation's rollout boundaries, the
fit's metrics, and bad values refused by their config names when verl builds the config."""

import importlib.util

import pytest
import torch

if importlib.util.find_spec("verl") is None:
    pytest.skip("verl is not installed (pip install -e '.[verl]')", allow_module_level=True)

from hydra.errors import InstantiationException  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402

import kpo_kernels.integrations.verl as integration  # noqa: E402
from helpers import assert_close, make_batch, oracle  # noqa: E402
from kpo_kernels import estimate_noise  # noqa: E402
from kpo_kernels.tracker import round_fitted  # noqa: E402
from kpo_kernels.integrations.verl import FIT_METRIC_NAMES, METRICS, KPOPolicyLossConfig  # noqa: E402
from test_verl import README_OVERRIDES, actor_config, call_verl_loss, compose_ppo_config, f64  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_trackers(monkeypatch):
    """Each test starts as a fresh worker process does: no tracker yet."""
    monkeypatch.setattr(integration, "_TRACKERS", {})


def stale_batch(seed):
    return make_batch(6, 64, layout="holes", seed=seed, dtype=torch.float64, noise=0.05, spikes=False)


def on_policy(batch):
    return {**batch, "log_prob": batch["old_log_prob"].clone()}


def fitted(batch):
    """The (q, r) the tracker passes on: the fit with its ratio rounded (tracker.round_fitted)."""
    z = batch["log_prob"] - batch["old_log_prob"]
    fit = estimate_noise(z, batch["mask"], fallback=(1e-6, 1.0))
    return round_fitted(float(fit.q), float(fit.r), (1e-10, 1e2))


def test_per_step_through_verls_loader_is_the_loss_at_the_fitted_noise():
    cfg = compose_ppo_config(README_OVERRIDES + ["+actor_rollout_ref.actor.policy_loss.kalman_fit=per_step"])
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert actor.policy_loss.kalman_fit == "per_step"
    for seed in (1, 2):
        batch = stale_batch(seed)
        loss, metrics, grad = call_verl_loss("kpo", batch, actor)
        q, r = fitted(batch)
        want_loss, want_metrics, want_grad = oracle(
            batch, q=q, r=r, clip_low=3e-4, clip_high=4e-4, agg="seq-mean-token-mean"
        )
        assert_close("loss", loss, want_loss, rtol=1e-9)
        assert_close("grad", grad, want_grad, rtol=1e-9)
        assert set(metrics) == set(METRICS) | set(FIT_METRIC_NAMES)
        assert (metrics["actor/kpo_kalman_q"], metrics["actor/kpo_kalman_r"]) == (q, r)
        assert metrics["actor/kpo_refit"] == 1.0 and metrics["actor/kpo_fit_status"] == 0.0
        assert metrics["actor/kpo_at_boundary"] in (-1.0, 0.0, 1.0) and metrics["actor/kpo_drift_evidence"] >= 0
        assert_close("nis", f64(metrics["actor/kpo_nis_mean"]), want_metrics["nis_mean"], rtol=1e-9)


def test_per_generation_refits_after_each_on_policy_micro_batch():
    """verl recomputes old_log_prob with the actor, so each rollout batch starts with an on-policy
    micro-batch: the next stale micro-batch is fitted, and the values stay until the next one."""
    config = actor_config("token-mean", kalman_fit="per_generation", kalman_q=1e-6, kalman_r=1.0)
    first, second, third = stale_batch(3), stale_batch(4), stale_batch(5)
    seen = []
    for batch in (on_policy(first), first, second, on_policy(third), third):
        _, metrics, _ = call_verl_loss("kpo", batch, config)
        seen.append((metrics["actor/kpo_kalman_q"], metrics["actor/kpo_kalman_r"], metrics["actor/kpo_refit"]))
    assert seen[0] == (1e-6, 1.0, 0.0)
    assert seen[1] == (*fitted(first), 1.0)
    assert seen[2] == (*fitted(first), 0.0)  # same generation: fixed
    assert seen[3] == (*fitted(first), 0.0)  # on-policy: marks the new generation
    assert seen[4] == (*fitted(third), 1.0)


def test_per_generation_an_all_masked_micro_batch_is_no_new_generation():
    """A micro-batch whose tokens are all masked has no stale token, but is not on-policy: it must
    not mark a new rollout batch (under a process group every rank would then refit)."""
    config = actor_config("token-mean", kalman_fit="per_generation", kalman_q=1e-6, kalman_r=1.0)
    first, second = stale_batch(3), stale_batch(4)
    masked = {**second, "mask": torch.zeros_like(second["mask"])}
    refits = [call_verl_loss("kpo", batch, config)[1]["actor/kpo_refit"] for batch in (first, masked, second)]
    assert refits == [1.0, 0.0, 0.0]


def test_off_logs_what_it_logged_before():
    _, metrics, _ = call_verl_loss("kpo", stale_batch(6), actor_config(kalman_fit="off"))
    assert set(metrics) == set(METRICS)


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"kalman_fit": "always"}, "kalman_fit"),
        ({"kalman_fit": 1}, "kalman_fit"),
        ({"kalman_fit": "per_step", "kalman_p0": 0.5}, "kalman_p0"),
        ({"kalman_fit_q_min": 0.0}, "kalman_fit_q_min"),
        ({"kalman_fit_q_min": 1.0, "kalman_fit_q_max": 0.1}, "kalman_fit_q_max"),
        ({"kalman_fit_min_tokens": 1}, "kalman_fit_min_tokens"),
        ({"kalman_fit_max_tokens": 0}, "kalman_fit_max_tokens"),
        ({"kalman_fit_max_tokens": 1.5}, "kalman_fit_max_tokens"),
    ],
)
def test_bad_fit_options_fail_when_the_config_is_built(bad, words):
    with pytest.raises((TypeError, ValueError), match=words):
        KPOPolicyLossConfig(**bad)


def test_bad_fit_options_fail_in_verls_loader():
    cfg = compose_ppo_config(README_OVERRIDES + ["+actor_rollout_ref.actor.policy_loss.kalman_fit=sometimes"])
    with pytest.raises(InstantiationException, match="kalman_fit"):
        omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
