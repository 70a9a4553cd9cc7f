"""PPO-max transformations on small tensors: running score statistics, normalisation, minibatch advantages."""

from __future__ import annotations

import math

import pytest
import torch

from lit_rlhf.algorithms import RunningMoments, merge_moments, minibatch_advantages, normalize_scores


def test_running_moments_over_several_updates_equal_the_whole_sample():
    running = RunningMoments()
    batch_mean, batch_std = running.update(torch.tensor([1.0, 2.0, 3.0]))
    assert batch_mean == pytest.approx(2.0) and batch_std == pytest.approx(1.0)
    running.update(torch.tensor([4.0, 5.0]))
    running.update(torch.tensor([[6.0]]))
    assert running.count == 6 and running.mean == pytest.approx(3.5)
    assert running.std == pytest.approx(math.sqrt(3.5))  # unbiased std of 1..6
    # checkpointed with the module, and immune to dtype casts
    restored = RunningMoments().to(torch.bfloat16)
    restored.load_state_dict(running.to(torch.bfloat16).state_dict())
    assert (restored.count, restored.mean, restored.var) == (running.count, running.mean, running.var)


def test_running_moments_reduce_across_ranks():
    running = RunningMoments()
    # two ranks holding the same batch: a cross-rank sum doubles every sum, the statistics stay those of 1..3
    running.update(torch.tensor([1.0, 2.0, 3.0]), all_reduce=lambda tensor: tensor * 2)
    assert running.count == 6 and running.mean == pytest.approx(2.0)
    assert running.std == pytest.approx(math.sqrt(4 / 5))  # unbiased std of [1, 1, 2, 2, 3, 3]


def test_merge_moments_from_empty_is_the_batch():
    zero = torch.tensor(0.0)
    mean, var, count = merge_moments(zero, zero, zero, torch.tensor(2.0), torch.tensor(0.5), torch.tensor(4.0))
    assert (mean.item(), var.item(), count.item()) == (2.0, 0.5, 4.0)


def test_normalize_and_scale_scores_with_clipping():
    scores, mean, std = torch.tensor([1.0, 3.0]), 2.0, 0.5
    torch.testing.assert_close(normalize_scores(scores, mean, std), torch.tensor([-2.0, 2.0]))
    torch.testing.assert_close(normalize_scores(scores, mean, std, clip=0.8), torch.tensor([-0.8, 0.8]))
    torch.testing.assert_close(normalize_scores(scores, mean, std, shift_mean=False), torch.tensor([2.0, 6.0]))
    assert normalize_scores(scores, mean, std).dtype == torch.float32


def test_minibatch_advantage_normalisation_and_clipping():
    advantages = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[True, True, True, False]])
    # real tokens 1, 2, 3: mean 2, biased variance 2/3 (as masked_whiten, N+), std 0.816497: (1 - 2) / 0.816497 = -1.224745;
    # the padded 99 is ignored and zeroed
    whitened = minibatch_advantages(advantages, mask, normalize=True)
    torch.testing.assert_close(whitened, torch.tensor([[-1.224745, 0.0, 1.224745, 0.0]]), atol=1e-6, rtol=0)
    clipped = minibatch_advantages(advantages, mask, normalize=True, clip=0.5)
    torch.testing.assert_close(clipped, torch.tensor([[-0.5, 0.0, 0.5, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(minibatch_advantages(advantages, mask, normalize=False, clip=2.5), torch.tensor([[1.0, 2.0, 2.5, 0.0]]))
