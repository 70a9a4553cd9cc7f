"""DPO / IPO losses, implicit rewards and online-DPO pair selection on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from lit_rlhf.algorithms import dpo_loss, select_pairs

# policy/ref summed logprobs of one pair: chosen log-ratio +1, rejected log-ratio -1, so h = 2 nats
PAIR = (torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]))


def test_dpo_sigmoid_loss_and_implicit_rewards():
    loss, chosen, rejected = dpo_loss(*PAIR, beta=0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.2)))  # -log sigmoid(0.1 * 2)
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.1)  # beta * (policy - ref)


def test_dpo_label_smoothing_mixes_the_flipped_label():
    loss, _, _ = dpo_loss(*PAIR, beta=0.1, label_smoothing=0.1)
    expected = 0.9 * math.log1p(math.exp(-0.2)) + 0.1 * math.log1p(math.exp(0.2))
    assert loss.item() == pytest.approx(expected)


def test_ipo_loss_is_squared_distance_to_half_inverse_beta():
    loss, _, _ = dpo_loss(*PAIR, beta=0.1, loss_type="ipo")
    assert loss.item() == pytest.approx((2 - 1 / 0.2) ** 2)  # (h - 1/(2 beta))^2 = 9


def test_dpo_loss_averages_over_pairs_and_gradient_favours_chosen():
    policy_chosen = torch.tensor([-10.0, -5.0], requires_grad=True)
    policy_rejected = torch.tensor([-12.0, -5.0], requires_grad=True)
    loss, _, _ = dpo_loss(policy_chosen, policy_rejected, torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0]), beta=0.1)
    assert loss.item() == pytest.approx((math.log1p(math.exp(-0.2)) + math.log(2)) / 2)
    loss.backward()
    assert (policy_chosen.grad < 0).all() and (policy_rejected.grad > 0).all()  # descent raises chosen, lowers rejected


BAD_SETTINGS = [{"loss_type": "hinge"}, {"beta": 0.0}, {"label_smoothing": 0.5}, {"loss_type": "ipo", "label_smoothing": 0.1}]


@pytest.mark.parametrize("kwargs", BAD_SETTINGS)
def test_dpo_loss_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        dpo_loss(*PAIR, **{"beta": 0.1, **kwargs})


SCORES = torch.tensor([[1.0, 3.0, 2.0, 0.0], [-1.0, -1.0, -1.0, -1.0], [0.5, 0.2, 0.9, 0.1]])


def test_best_vs_worst_pairs_and_ties_dropped():
    chosen, rejected, keep = select_pairs(SCORES)
    assert chosen.tolist() == [1, 0, 2] and rejected.tolist() == [3, 0, 3]
    assert keep.tolist() == [True, False, True]  # all four responses without EOS (-1 each): a tie


def test_length_penalty_changes_the_ranking():
    lengths = torch.tensor([[10, 40, 10, 10], [5, 5, 5, 5], [10, 10, 10, 10]])
    chosen, rejected, keep = select_pairs(SCORES, lengths=lengths, length_penalty=0.1)
    # row 0 ranks by [0, -1, 1, -1]: the long best-scored response becomes the worst
    assert chosen.tolist() == [2, 0, 2] and rejected.tolist() == [1, 0, 3] and keep.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="lengths"):
        select_pairs(SCORES, length_penalty=0.1)


def test_best_vs_random_draws_uniformly_among_the_others():
    scores = torch.tensor([[0.0, 5.0, 1.0, 2.0]]).repeat(3000, 1)
    chosen, rejected, keep = select_pairs(scores, "best_vs_random", generator=torch.Generator().manual_seed(0))
    assert (chosen == 1).all() and (rejected != 1).all() and keep.all()
    counts = torch.bincount(rejected, minlength=4).tolist()
    assert counts[1] == 0 and all(900 < count < 1100 for i, count in enumerate(counts) if i != 1)


@pytest.mark.parametrize("scores, strategy", [(SCORES, "random"), (SCORES[:, :1], "best_vs_worst"), (SCORES[0], "best_vs_worst")])
def test_select_pairs_rejects_bad_input(scores, strategy):
    with pytest.raises(ValueError):
        select_pairs(scores, strategy)
