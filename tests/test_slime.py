"""KPO as slime's custom loss under context parallelism (kpo_kernels.integrations.slime).

slime is not installable from a package registry, so nothing here imports it. What is tested:
the rank layout (`slime_pieces`) against the chunking rule as read in slime 0.3.1's
`cp_utils.get_logits_and_tokens_offset_with_cp` / `slice_log_prob_with_cp`, written below per
token (not per interval, as the adapter does); the options read from slime's `args`; and the
rank losses of real gloo process groups against the unsharded `kpo_loss` with slime's reduction.
"""

import random
from types import SimpleNamespace

import pytest
import torch

from kpo_kernels.integrations import slime as kpo_slime


def slime_rank_tokens(total, response, cp_rank, cp_size):
    """The response tokens rank `cp_rank` holds, in its local order, per slime's rule (read in
    `get_logits_and_tokens_offset_with_cp`): the whole sequence's positions are cut into 2 cp
    chunks of ceil(total / (2 cp)); the rank holds chunks cp_rank and 2 cp - 1 - cp_rank, in that
    order; response token j is predicted at position (total - response) - 1 + j."""
    width = -(-total // (2 * cp_size))
    chunk_of = [(total - response - 1 + j) // width for j in range(response)]
    return [j for chunk in (cp_rank, 2 * cp_size - 1 - cp_rank) for j in range(response) if chunk_of[j] == chunk]


def random_lengths(rng, count):
    response = [rng.choice([0, 1, 2, 3, rng.randint(1, 40)]) for _ in range(count)]
    return [r + rng.choice([1, 2, rng.randint(1, 50)]) for r in response], response


@pytest.mark.parametrize("cp_size", [1, 2, 3, 4])
def test_pieces_are_slimes_layout_and_tile_each_response_once(cp_size):
    rng = random.Random(cp_size)
    for _ in range(200):
        total, response = random_lengths(rng, rng.randint(1, 5))
        every = []
        for rank in range(cp_size):
            pieces = kpo_slime.slime_pieces(total, response, rank, cp_size)
            assert len(pieces) == 2 * len(total)  # every rank: the same piece count
            for s in range(len(total)):
                mine = [j for p in pieces[2 * s:2 * s + 2] for j in range(p.start, p.stop)]
                assert mine == slime_rank_tokens(total[s], response[s], rank, cp_size)
            every += pieces
        for s in range(len(total)):
            ordered = sorted((p for p in every if p.sequence == s), key=lambda p: p.order)
            assert [p.order for p in ordered] == list(range(2 * cp_size))
            tokens = [j for p in ordered for j in range(p.start, p.stop)]
            assert tokens == list(range(response[s]))  # consecutive when sorted by order, each once


def test_pieces_refuse_inconsistent_lengths():
    with pytest.raises(ValueError, match="response_length=5"):
        kpo_slime.slime_pieces([5], [5], 0, 2)
    with pytest.raises(ValueError, match="samples"):
        kpo_slime.slime_pieces([5, 6], [2], 0, 2)
    with pytest.raises(ValueError, match="cp_rank=2"):
        kpo_slime.slime_pieces([5], [2], 2, 2)


def slime_args(**overrides):
    args = dict(eps_clip=3e-4, eps_clip_high=4e-4, eps_clip_c=None, advantage_estimator="grpo", use_opsm=False,
                use_tis=False, get_mismatch_metrics=False, custom_pg_loss_reducer_function_path=None)
    return SimpleNamespace(**{**args, **overrides})


def test_options_from_args():
    options = kpo_slime.kpo_options(slime_args(kpo_q=1e-4, kpo_r=0.5, eps_clip_high=None, eps_clip_c=3.0))
    assert options == {"q": 1e-4, "r": 0.5, "p0": 0.0, "x0": 0.0, "mask_mode": "skip", "log_ratio_cap": 10.0,
                       "backend": "auto", "clip_low": 3e-4, "clip_high": 3e-4, "dual_clip": 3.0}


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"kpo_qq": 1.0}, TypeError, "kpo_qq"),
        ({"kpo_r": 0.0}, ValueError, "r"),
        ({"advantage_estimator": "gspo"}, ValueError, "gspo"),
        ({"advantage_estimator": "cispo"}, ValueError, "cispo"),
        ({"use_opsm": True}, ValueError, "--use-opsm"),
        ({"use_tis": True}, ValueError, "--use-tis"),
        ({"custom_pg_loss_reducer_function_path": "m.f"}, ValueError, "reducer"),
    ],
)
def test_options_refused_by_name(overrides, error, match):
    with pytest.raises(error, match=match):
        kpo_slime.kpo_options(slime_args(**overrides))
