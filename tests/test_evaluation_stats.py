"""Win rates, bootstrap intervals, length buckets and calibration (lit_rlhf.evaluation.stats), hand-computed."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from lit_rlhf.evaluation.stats import (
    by_length,
    calibration,
    length_controlled_win_rate,
    preference_calibration,
)
from lit_rlhf.metrics import mean_with_interval, pairwise_outcomes
from lit_rlhf.sampling import seeded


def test_ties_count_half_and_a_constant_outcome_has_a_point_interval():
    assert mean_with_interval([1.0, 0.5, 0.0, 0.5])["mean"] == 0.5
    assert mean_with_interval([1.0] * 7) == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 7}


def test_two_items_bootstrap_to_the_extremes():
    # resampled means of [0, 1]: 0, 0.5, 1 with probability 1/4, 1/2, 1/4 -> 2.5% quantile 0, 97.5% quantile 1
    result = mean_with_interval([0.0, 1.0])
    assert (result["low"], result["high"]) == (0.0, 1.0)


def test_interval_matches_the_normal_approximation_and_is_reproducible():
    values = torch.tensor([1.0] * 240 + [0.0] * 160)  # p = 0.6, n = 400: 0.6 +- 1.96 * sqrt(0.24 / 400) = +- 0.048
    result = mean_with_interval(values, num_resamples=2000)
    assert result["mean"] == pytest.approx(0.6)
    assert result["low"] == pytest.approx(0.552, abs=0.01) and result["high"] == pytest.approx(0.648, abs=0.01)
    state = torch.random.get_rng_state()
    assert mean_with_interval(values, num_resamples=2000) == result
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG moved"
    narrow = mean_with_interval(values, confidence=0.5, num_resamples=2000)
    assert result["low"] < narrow["low"] < narrow["high"] < result["high"]


def test_empty_and_bad_confidence():
    assert math.isnan(mean_with_interval([])["mean"]) and mean_with_interval([])["n"] == 0
    with pytest.raises(ValueError, match="confidence"):
        mean_with_interval([1.0], confidence=1.0)


def test_length_buckets_split_by_token_count():
    outcomes = [1, 0, 1, 1, 0.5, 0]
    lengths = [5, 19, 20, 35, 45, 80]
    rows = by_length(outcomes, lengths, edges=(20, 40))
    assert [(r["bucket"], r["n"], r["mean"]) for r in rows] == [("0-19", 2, 0.5), ("20-39", 2, 1.0), ("40+", 2, 0.25)]
    with pytest.raises(ValueError, match="shape"):
        by_length([1, 0], [3])
    with pytest.raises(ValueError, match="increase"):
        by_length([1], [3], edges=(30, 20))


def test_calibration_error_by_hand():
    # one bin at 0.25 where 1 of 4 happened: calibrated; one bin at 0.9 where all happened: off by 0.1
    perfect = calibration([0.25] * 4, [1, 0, 0, 0])
    assert perfect["ece"] == pytest.approx(0.0, abs=1e-6)
    assert perfect["bins"] == [{"low": 0.2, "high": 0.3, "confidence": 0.25, "accuracy": 0.25, "n": 4}]
    over = calibration([0.9] * 10 + [0.25] * 10, [1] * 10 + [1, 0, 0, 0] * 2 + [0, 0])
    # bin 0.9: |0.9 - 1.0| = 0.1, weight 1/2; bin 0.2: |0.25 - 0.2| = 0.05, weight 1/2 -> 0.075
    assert over["ece"] == pytest.approx(0.075, abs=1e-6)
    assert [b["n"] for b in over["bins"]] == [10, 10]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration([1.5], [1])


def test_preference_calibration_uses_both_orders():
    # equal rewards: p = 0.5 both ways, half of the 2N items happened -> one bin, calibrated
    equal = preference_calibration([0.3, -1.0], [0.3, -1.0])
    assert equal["ece"] == pytest.approx(0.0, abs=1e-6)
    assert equal["bins"] == [{"low": 0.5, "high": 0.6, "confidence": 0.5, "accuracy": 0.5, "n": 4}]
    # a margin of log(3): p = 0.75 for the chosen (happened), 0.25 for the rejected (did not): off by 0.25 each
    confident = preference_calibration([math.log(3)], [0.0])
    assert [(b["confidence"], b["accuracy"]) for b in confident["bins"]] == [(pytest.approx(0.25), 0.0), (pytest.approx(0.75), 1.0)]
    assert confident["ece"] == pytest.approx(0.25, abs=1e-6)


def test_grouped_accuracy_with_the_overall_interval():
    from lit_rlhf.metrics import GroupedAccuracy, preference_accuracy

    by_batch, by_confidence = GroupedAccuracy(), GroupedAccuracy()
    correct = torch.tensor([True, False, True, True])
    by_batch.update(correct, torch.tensor([0, 0, 1, 1]))
    by_confidence.update(correct, torch.tensor([3, 9, 9, 9]))
    metrics = {key: float(value) for key, value in preference_accuracy(by_batch, by_confidence, ["batch13", "batch18"]).items()}
    interval = mean_with_interval([1.0, 0.0, 1.0, 1.0])
    assert metrics == {
        "val/accuracy": 0.75, "val/accuracy_low": pytest.approx(interval["low"]), "val/accuracy_high": pytest.approx(interval["high"]),
        "val/accuracy_batch/batch13": 0.5, "val/accuracy_batch/batch18": 1.0,
        "val/accuracy_confidence/3": 1.0, "val/accuracy_confidence/9": pytest.approx(2 / 3),
    }
    assert interval["low"] < 0.75 < interval["high"] == 1.0


def test_pairwise_outcomes_are_nan_without_a_reference():
    outcomes = pairwise_outcomes(torch.tensor([1.0, 0.0, 2.0, 1.0]), torch.tensor([0.0, 1.0, 2.0, float("nan")]))
    assert outcomes[:3].tolist() == [1.0, 0.0, 0.5] and math.isnan(outcomes[3])


def test_length_controlled_win_rate_without_length_differences_is_the_ridge_logistic_mean():
    # d = 0 everywhere: the length term is tanh(0) = 0, and the fit's stationarity condition is by hand
    # n * (sigmoid(theta) - mean(y)) + ridge * theta = 0, which gives theta just inside logit(0.75)
    outcomes, ridge = [1.0, 1.0, 0.5, 1.0, 0.0, 1.0, 1.0, 0.5], 1e-2  # mean 0.75 (a tie is half a win)
    result = length_controlled_win_rate(outcomes, [0.0] * 8, ridge=ridge, num_resamples=50)
    theta = math.log(result["mean"] / (1 - result["mean"]))
    assert 8 * (result["mean"] - 0.75) + ridge * theta == pytest.approx(0.0, abs=1e-9)
    assert 0.745 < result["mean"] < 0.75 and result["length_coefficient"] == pytest.approx(0.0, abs=1e-9)
    assert result["n"] == 8 and result["low"] <= result["mean"] <= result["high"]


def test_length_controlled_win_rate_removes_a_judges_length_preference():
    # a judge who only looks at length (P(a wins) = sigmoid(2 tanh(d / std d))), a system that is longer on 80% of items:
    # a raw win rate far above 0.5, a length-controlled one at 0.5 (both equally good at equal length)
    generator = torch.Generator().manual_seed(0)
    d = torch.where(torch.rand(4000, generator=generator) < 0.8, 1.0, -1.0) * torch.rand(4000, generator=generator) * 400
    outcomes = torch.bernoulli(torch.sigmoid(2 * torch.tanh(d / d.std())), generator=generator)
    result = length_controlled_win_rate(outcomes, d, num_resamples=200)
    assert outcomes.mean() > 0.65
    assert result["low"] < 0.5 < result["high"] and abs(result["mean"] - 0.5) < 0.04
    assert result["length_coefficient"] == pytest.approx(2.0, abs=0.3)
    # a judge that ignores length: the length-controlled rate is the raw one
    fair = torch.bernoulli(torch.full((4000,), 0.3), generator=generator)
    assert length_controlled_win_rate(fair, d, num_resamples=50)["mean"] == pytest.approx(fair.mean().item(), abs=0.03)


def test_length_controlled_win_rate_edge_cases():
    empty = length_controlled_win_rate([], [])
    assert empty["n"] == 0 and math.isnan(empty["mean"])
    sweep = length_controlled_win_rate([1.0] * 5, [10.0, -3.0, 0.0, 4.0, 8.0], num_resamples=20)
    assert 0.5 < sweep["mean"] < 1.0 and math.isfinite(sweep["low"])  # every item won: finite through the ridge
    with pytest.raises(ValueError, match="differ in shape"):
        length_controlled_win_rate([1.0, 0.0], [1.0])


def test_seeded_draws_the_same_numbers_and_leaves_the_cpu_stream_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    with seeded(7):
        first = torch.rand(3)
    assert torch.equal(torch.random.get_rng_state(), before)  # the training stream continues where it was
    with seeded(7):
        assert torch.equal(torch.rand(3), first)


def test_seeded_forks_and_seeds_the_cuda_device_in_use_only(monkeypatch):
    """On a GPU the validation seed must not leak into the training rollouts' CUDA stream (issue 27): the device in use is
    forked (saved and restored) and seeded; no other device is touched. Checked with a fake CUDA device list."""
    forked, seeds = [], {}

    @contextlib.contextmanager
    def fork_rng(devices=None, **kwargs):
        forked.append(list(devices))
        yield

    class FakeGenerator:
        def __init__(self, index):
            self.index = index

        def manual_seed(self, seed):
            seeds[self.index] = seed

    monkeypatch.setattr(torch.random, "fork_rng", fork_rng)
    monkeypatch.setattr(torch.cuda, "default_generators", tuple(FakeGenerator(i) for i in range(4)))
    with seeded(11, torch.device("cuda", 2)):
        pass
    assert forked == [[2]] and seeds == {2: 11}
    with seeded(11, torch.device("cpu")):
        pass
    assert forked[-1] == [] and seeds == {2: 11}
