"""DPO / IPO losses, implicit rewards and online-DPO pair selection on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from lit_rlhf.algorithms import chosen_nll, dpo_loss, preference_pairs, select_pairs
from lit_rlhf.stages.common import lr_factor

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


def test_online_pairs_drop_ties_and_identical_responses_with_the_character_penalty():
    # 3 prompts x K = 3; RLHFlow's concise setting: 0.001 reward per character (their Eq. 9, recipe W5)
    scores = torch.tensor([[0.50, 0.90, 0.20], [0.30, 0.30, 0.30], [1.00, 0.40, 0.70]])
    chars = torch.tensor([[100, 600, 100], [50, 80, 20], [400, 100, 100]])
    # ranking = score - 0.001 * chars: [0.40, 0.30, 0.10], [0.25, 0.22, 0.28], [0.60, 0.30, 0.60]
    responses = torch.tensor([[5, 6, 2], [7, 2, 0], [8, 8, 2], [9, 2, 0], [4, 2, 0], [3, 3, 2], [1, 2, 0], [5, 2, 0], [1, 2, 0]])
    chosen, rejected, ties, identical = preference_pairs(scores, responses, lengths=chars, length_penalty=0.001)
    # prompt 0: best 0 (0.40, not the top score 0.90 of 600 characters), worst 2; prompt 1: best 2, worst 1;
    # prompt 2: best 0 and 2 tie at 0.60 -> argmax takes 0, worst 1 (0.30): a real pair, but rows 6 and 7 differ
    assert chosen.tolist() == [0, 5, 6] and rejected.tolist() == [2, 4, 7]
    assert ties.tolist() == [False, False, False] and identical.tolist() == [False, False, False]
    # without the penalty prompt 1 is a tie (all 0.30) and prompt 2 pairs rows 6 and 7
    chosen, rejected, ties, identical = preference_pairs(scores, responses)
    assert ties.tolist() == [False, True, False] and chosen.tolist() == [1, 6] and rejected.tolist() == [2, 7]
    # the same tokens under different scores (identical responses, e.g. from two temperatures) are dropped
    same = responses.clone()
    same[7] = same[6]
    chosen, rejected, ties, identical = preference_pairs(scores, same)
    assert identical.tolist() == [False, False, True] and chosen.tolist() == [1] and rejected.tolist() == [2]


def test_chosen_nll_is_the_mean_per_token_negative_logprob():
    assert chosen_nll(torch.tensor([-6.0, -2.0]), torch.tensor([3, 4])).item() == pytest.approx((2.0 + 0.5) / 2)


def test_learning_rate_warms_up_then_follows_a_cosine():
    # recipe W6: cosine, warm-up 0.03; 100 steps -> 3 warm-up steps at 1/4, 2/4, 3/4, then a cosine from 1 to 0
    factors = [lr_factor(step, 100, "cosine", 0.03) for step in range(100)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[3 + 97 // 2] == pytest.approx(0.5 * (1 + math.cos(math.pi * (97 // 2) / 97)))
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 96 / 97))) and factors[-1] < 1e-3
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert lr_factor(7, 10, "constant", 0.5) == 1.0
    # without warm-up: cosine and linear to 0 over the run (SFT, RM, DPO; PPO's P8), held at 0 past the end
    assert [lr_factor(step, 4, "cosine") for step in (0, 2, 4, 9)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert [lr_factor(step, 4, "linear") for step in (0, 1, 4, 9)] == pytest.approx([1.0, 0.75, 0.0, 0.0])
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        lr_factor(0, 4, "step")
