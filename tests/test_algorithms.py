"""Hand-computed checks of the pure RL math in ``lit_rlhf.algorithms.core`` (recipe P3-P8, R2-R4, R7, D6).

Every expected number below is worked out by hand in the comments (or follows from a closed form such as
``ln 2``), never by calling the function under test a second time.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from lit_rlhf.algorithms import (
    INVALID_LOGPROB,
    KLController,
    adaptive_kl_coef,
    entropy_from_logits,
    eos_penalized,
    first_true_indices,
    gae_advantages,
    kl_penalty_rewards,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    pairwise_reward_loss,
    penalize_missing_eos,
    ppo_policy_loss,
    ppo_value_loss,
    response_padding_masks,
    score_indices,
    sequence_cross_entropy,
    truncate_after_eos,
)
from lit_rlhf.models.forward import model_inputs, sequence_scores
from lit_rlhf.models.scalar import ScalarModel, init_scalar_head

T = torch.tensor


def close(actual: torch.Tensor, expected, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual.float(), torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------
# first_true_indices / truncate_after_eos (P3) / last_token_index (R3)
# --------------------------------------------------------------------------------------------------------


def test_first_true_indices_returns_row_length_when_absent():
    bools = T([[False, True, False, True], [False, False, False, False], [True, False, False, False]])
    # row 0: first True at 1; row 1: none -> row length 4; row 2: first True at 0
    out = first_true_indices(bools)
    assert out.tolist() == [1, 4, 0]
    assert out.dtype == torch.long


def test_truncate_after_eos_pads_after_first_eos_and_keeps_it():
    eos, pad = 2, 9
    responses = T([
        [5, 2, 7, 8],  # EOS at 1 -> keep [5, 2], pad the rest
        [5, 6, 7, 8],  # no EOS -> unchanged
        [2, 2, 3, 4],  # EOS at 0 -> only the first EOS kept; the second EOS is after it, so PAD
        [5, 6, 7, 2],  # EOS on the last token -> unchanged
    ])
    original = responses.clone()
    out = truncate_after_eos(responses, eos, pad)
    assert out.tolist() == [[5, 2, 9, 9], [5, 6, 7, 8], [2, 9, 9, 9], [5, 6, 7, 2]]
    assert torch.equal(responses, original), "the input must not be modified in place"


def test_missing_eos_is_replaced_n_plus_style_or_subtracted_trl_style():
    responses = T([[5, 2, 9], [5, 6, 7], [4, 7, 3]])  # EOS 2 in row 0; stop ids [2, 3]: row 2 ends its turn with 3
    scores = T([-2.5, -2.0, -3.0])  # a chat RM: every score below N+'s -1
    assert penalize_missing_eos(scores, responses, 2, -1.0).tolist() == [-2.5, -1.0, -1.0]  # P3: rows 1, 2 rewarded!
    assert penalize_missing_eos(scores, responses, [2, 3], -1.0).tolist() == [-2.5, -1.0, -3.0]
    assert penalize_missing_eos(scores, responses, [2, 3], 1.5, subtract=True).tolist() == [-2.5, -3.5, -3.0]
    # the stages' rule: TRL's subtraction when set, else N+'s replacement when on, else nothing
    assert eos_penalized(scores, responses, [2, 3], True, -1.0, missing_eos_penalty=1.5).tolist() == [-2.5, -3.5, -3.0]
    assert eos_penalized(scores, responses, [2, 3], True, -1.0).tolist() == [-2.5, -1.0, -3.0]
    assert eos_penalized(scores, responses, [2, 3], False, -1.0).tolist() == [-2.5, -2.0, -3.0]


@pytest.mark.parametrize(
    "mask, expected",
    [
        ([[0, 0, 1, 1]], [3]),  # left padding: last real token is the last column
        ([[1, 1, 0, 0]], [1]),  # right padding
        ([[1, 1, 1, 1]], [3]),  # no padding
        ([[1, 0, 1, 0]], [2]),  # inner padding: the last real token, not the end of the first run
        ([[0, 1, 1, 0], [1, 0, 0, 0]], [2, 0]),  # a batch of mixed rows
    ],
)
def test_last_token_index(mask, expected):
    assert last_token_index(T(mask)).tolist() == expected
    assert last_token_index(T(mask).bool()).tolist() == expected


def test_last_token_index_rejects_an_all_pad_row():
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(T([[1, 1, 0], [0, 0, 0]]))


# --------------------------------------------------------------------------------------------------------
# logprobs_from_logits (P4) / entropy_from_logits
# --------------------------------------------------------------------------------------------------------


def test_logprobs_temperature_one():
    # logits [0, ln 3] -> softmax [1/4, 3/4]
    logits = T([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    out = logprobs_from_logits(logits, T([[1, 0]]), temperature=1.0)
    close(out, [[math.log(0.75), math.log(0.25)]])  # [-0.287682, -1.386294]


def test_logprobs_are_temperature_scaled():
    # T = 0.5: logits [0, ln 3] / 0.5 = [0, ln 9] -> softmax [1/10, 9/10]
    logits = T([[[0.0, math.log(3.0)]]])
    close(logprobs_from_logits(logits, T([[0]]), temperature=0.5), [[math.log(0.1)]])  # -2.302585
    close(logprobs_from_logits(logits, T([[1]]), temperature=0.5), [[math.log(0.9)]])  # -0.105361
    # V = 3, T = 2: logits [1, 2, 3] / 2 = [0.5, 1, 1.5];
    # logsumexp = ln(e^0.5 + e^1 + e^1.5) = ln(1.648721 + 2.718282 + 4.481689) = ln(8.848692) = 2.180274
    # logp(2) = 1.5 - 2.180274 = -0.680274
    close(logprobs_from_logits(T([[[1.0, 2.0, 3.0]]]), T([[2]]), temperature=2.0), [[-0.680274]])


def test_logprobs_temperature_zero_uses_the_epsilon():
    # T = 0 divides by 1e-7 (not by zero): logits [0, ln 3] -> [0, 1.0986123e7]
    # logp(1) = 0 (the argmax takes all the mass); logp(0) = -ln(3) / 1e-7 = -10986122.89
    logits = T([[[0.0, math.log(3.0)]]])
    top = logprobs_from_logits(logits, T([[1]]), temperature=0.0)
    other = logprobs_from_logits(logits, T([[0]]), temperature=0.0)
    assert torch.isfinite(top).all() and torch.isfinite(other).all()
    close(top, [[0.0]])
    torch.testing.assert_close(other, T([[-10986122.89]]), rtol=1e-5, atol=0.0)


def test_logprobs_are_float32_for_half_precision_logits():
    logits = T([[[0.0, math.log(3.0)]]], dtype=torch.bfloat16)
    out = logprobs_from_logits(logits, T([[1]]))
    assert out.dtype == torch.float32 and out.shape == (1, 1)
    close(out, [[math.log(0.75)]], atol=1e-2)  # bf16 ln 3 is 1.0986 +- 4e-3


def test_entropy_from_logits():
    # uniform over 4 -> ln 4 = 1.386294; [0, ln 3] -> p = [1/4, 3/4],
    # H = 0.25 ln 4 + 0.75 ln(4/3) = 0.346574 + 0.215762 = 0.562335; a near-one-hot row -> 0
    logits = T([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e4, -1e4], [100.0, 0.0, 0.0, 0.0]]])
    close(entropy_from_logits(logits), [[1.386294, 0.562335, 0.0]])


def test_logprobs_with_entropy_of_the_scaled_distribution():
    # T = 0.5: [0, ln 3] -> softmax [0.1, 0.9]; H = -(0.1 ln 0.1 + 0.9 ln 0.9) = 0.230259 + 0.094824 = 0.325083
    logits = T([[[0.0, math.log(3.0)], [0.0, 0.0]]], requires_grad=True)
    before = logits.detach().clone()
    logprobs, entropy = logprobs_from_logits(logits, T([[1, 0]]), temperature=0.5, return_entropy=True)
    close(logprobs, [[math.log(0.9), math.log(0.5)]])
    close(entropy, [[0.325083, math.log(2.0)]])
    assert torch.equal(logits.detach(), before)  # float32 logits are not scaled in place
    # d logp(1) / d logits = (onehot(1) - p) / T = ([0, 1] - [0.1, 0.9]) / 0.5 = [-0.2, 0.2] (row 2: no gradient)
    logprobs[0, 0].backward()
    close(logits.grad, [[[-0.2, 0.2], [0.0, 0.0]]])


# --------------------------------------------------------------------------------------------------------
# masked_sum / masked_mean / masked_var / masked_whiten (P6), all_reduce hook
# --------------------------------------------------------------------------------------------------------

VALUES = T([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
MASK = T([[True, True, False], [True, True, False]])


def test_masked_sum_and_mean_ignore_padded_positions():
    # real values 1, 2, 3, 4: sum 10, mean 2.5 (100 and -50 are padding)
    close(masked_sum(VALUES, MASK), 10.0)
    close(masked_mean(VALUES, MASK), 2.5)
    close(masked_mean(VALUES, MASK.long()), 2.5)  # 0/1 masks work too


def test_masked_mean_rejects_an_empty_mask():
    with pytest.raises(ValueError, match="no position"):
        masked_mean(VALUES, torch.zeros_like(MASK))


def test_masked_var_unbiased_and_biased():
    # deviations from 2.5: -1.5, -0.5, 0.5, 1.5 -> squares 2.25 + 0.25 + 0.25 + 2.25 = 5
    # biased 5 / 4 = 1.25; unbiased (Bessel) 5 / 3 = 1.666667
    close(masked_var(VALUES, MASK), 5.0 / 3.0)
    close(masked_var(VALUES, MASK, unbiased=False), 1.25)


def test_masked_var_needs_two_positions_when_unbiased():
    one = T([[True, False, False], [False, False, False]])
    with pytest.raises(ValueError, match="at least two"):
        masked_var(VALUES, one)
    close(masked_var(VALUES, one, unbiased=False), 0.0)


# 1, 2, 3, 4: mean 2.5, squared deviations sum to 5.
# N+ (biased) variance 5 / 4 = 1.25, std 1.118034: (x - 2.5) / 1.118034 -> -1.341641, -0.447214, ...
WHITE = [-1.341641, -0.447214, 0.447214, 1.341641]
# unbiased variance 5 / 3, std sqrt(5/3) = 1.290994: -1.5 -> -1.161895, -0.5 -> -0.387298
WHITE_UNBIASED = [-1.161895, -0.387298, 0.387298, 1.161895]
FOUR = T([[1.0, 2.0, 3.0, 4.0, 999.0]])
FOUR_MASK = T([[True, True, True, True, False]])


def test_masked_whiten_is_biased_by_default_as_n_plus():
    close(masked_whiten(FOUR, FOUR_MASK)[:, :4], [WHITE])  # 999 at the padded position is not part of the statistics
    close(masked_whiten(FOUR, FOUR_MASK, unbiased=False)[:, :4], [WHITE])


def test_masked_whiten_unbiased_variant():
    close(masked_whiten(FOUR, FOUR_MASK, unbiased=True)[:, :4], [WHITE_UNBIASED])


def test_masked_whiten_keeps_the_mean_when_not_shifting():
    out = masked_whiten(FOUR, FOUR_MASK, shift_mean=False)
    # WHITE + 2.5: only the scale changes
    close(out[:, :4], [[1.158359, 2.052786, 2.947214, 3.841641]])


def test_masked_whiten_with_a_doubling_all_reduce_is_two_identical_ranks():
    # Two ranks holding 1, 2, 3, 4 each: mean 2.5; squares sum to 10 over 8 positions.
    # biased var = 10 / 8 = 1.25 (as one rank: WHITE); unbiased var = 10 / 7 = 1.428571, std 1.195229,
    # (1 - 2.5) / 1.195229 = -1.254990
    values = T([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones_like(values, dtype=torch.bool)
    double = lambda t: t * 2  # noqa: E731 - sum over two identical ranks
    close(masked_mean(values, mask, all_reduce=double), 2.5)
    close(masked_var(values, mask, all_reduce=double), 10.0 / 7.0)
    close(masked_whiten(values, mask, all_reduce=double), [WHITE])
    close(masked_whiten(values, mask, all_reduce=double, unbiased=True), [[-1.254990, -0.418330, 0.418330, 1.254990]])


class FakeProcessGroup:
    """Two threads standing for two ranks: ``all_reduce`` sums the tensors both ranks pass, in lock step."""

    def __init__(self, world_size: int) -> None:
        self.barrier = threading.Barrier(world_size, timeout=10)
        self.slots: list = [None] * world_size
        self.calls = [0] * world_size

    def all_reduce(self, rank: int):
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = tensor.detach().clone()
            self.barrier.wait()
            total = sum(self.slots)
            self.barrier.wait()  # nobody overwrites a slot before both have read it
            return total

        return reduce


def test_masked_whiten_over_two_ranks_equals_whitening_the_concatenation():
    # rank 0 holds 1, 2 (and a padded 999); rank 1 holds 3, 4 (and a padded -999): the global batch is
    # 1, 2, 3, 4, so each rank must get its half of WHITE.
    shards = [
        (T([[1.0, 2.0, 999.0]]), T([[True, True, False]])),
        (T([[3.0, 4.0, -999.0]]), T([[True, True, False]])),
    ]
    group = FakeProcessGroup(2)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(masked_whiten, v, m, True, group.all_reduce(rank)) for rank, (v, m) in enumerate(shards)]
        out = [f.result(timeout=30) for f in futures]
    close(out[0][:, :2], [WHITE[:2]])
    close(out[1][:, :2], [WHITE[2:]])
    assert group.calls[0] == group.calls[1] > 0
    # without the hook (N+: each process's own batch) rank 0 whitens its own pair: mean 1.5, biased var 0.25,
    # (1 - 1.5) / 0.5 = -1
    close(masked_whiten(*shards[0])[:, :2], [[-1.0, 1.0]])


# --------------------------------------------------------------------------------------------------------
# kl_penalty_rewards (P5)
# --------------------------------------------------------------------------------------------------------


def test_kl_penalty_rewards():
    s = INVALID_LOGPROB  # padded positions hold the sentinel in both inputs (P4)
    logprobs = T([[-1.0, -2.0, s], [-0.5, -0.5, -0.5]])
    ref_logprobs = T([[-1.5, -1.0, s], [-0.5, -1.5, -1.0]])
    scores = T([2.0, -1.0])
    last_index = T([1, 2])
    rewards, kl, non_score = kl_penalty_rewards(logprobs, ref_logprobs, scores, last_index, kl_coef=0.1)
    # kl = logp - ref = [[0.5, -1.0, 0], [0, 1.0, 0.5]]
    close(kl, [[0.5, -1.0, 0.0], [0.0, 1.0, 0.5]])
    # non-score reward = -0.1 * kl = [[-0.05, 0.1, 0], [0, -0.1, -0.05]]
    close(non_score, [[-0.05, 0.1, 0.0], [0.0, -0.1, -0.05]])
    # score added at last_index: row 0 col 1: 0.1 + 2 = 2.1; row 1 col 2: -0.05 - 1 = -1.05
    close(rewards, [[-0.05, 2.1, 0.0], [0.0, -0.1, -1.05]])
    assert rewards[0, 2].item() == 0.0  # sentinel position: exactly zero


def test_kl_penalty_rewards_default_coef():
    # N+ kl_coef 0.05: kl = [0.2, -0.4] -> [-0.01, 0.02], score 0.5 at index 0 -> [0.49, 0.02]
    rewards, _, _ = kl_penalty_rewards(T([[-1.0, -1.0]]), T([[-1.2, -0.6]]), T([0.5]), T([0]), kl_coef=0.05)
    close(rewards, [[0.49, 0.02]])


# --------------------------------------------------------------------------------------------------------
# response_padding_masks / score_indices (P5): where the score lands, which values train
# --------------------------------------------------------------------------------------------------------

# T = 4; rows: EOS at 0, EOS in the middle (1), EOS at T - 1, no EOS. L = first PAD index - 1 (the EOS, or T - 1).
LAST = T([0, 1, 3, 3])
F_, T_ = False, True


def test_response_padding_masks_n_plus():
    padding, value_padding = response_padding_masks(LAST, 4)
    # policy: t > L
    assert padding.tolist() == [[F_, T_, T_, T_], [F_, F_, T_, T_], [F_, F_, F_, F_], [F_, F_, F_, F_]]
    # values: t > L + 1 (N+ padding_mask_p1): the value at L + 1 trains; nothing to add when L = T - 1
    assert value_padding.tolist() == [[F_, F_, T_, T_], [F_, F_, F_, T_], [F_, F_, F_, F_], [F_, F_, F_, F_]]


def test_response_padding_masks_eos_variant():
    padding, value_padding = response_padding_masks(LAST, 4, "eos")
    assert torch.equal(padding, value_padding)
    assert padding.tolist() == [[F_, T_, T_, T_], [F_, F_, T_, T_], [F_, F_, F_, F_], [F_, F_, F_, F_]]


def test_score_indices_n_plus_and_eos():
    # N+: L + 1 when L + 1 < T, else L
    assert score_indices(LAST, 4).tolist() == [1, 2, 3, 3]
    assert score_indices(LAST, 4, "eos").tolist() == [0, 1, 3, 3]
    # one row, EOS in the middle of T = 5
    assert score_indices(T([2]), 5).tolist() == [3]


def test_score_position_is_validated():
    with pytest.raises(ValueError, match="score_position"):
        score_indices(LAST, 4, "last")
    with pytest.raises(ValueError, match="score_position"):
        response_padding_masks(LAST, 4, "last")


def n_plus_layout(logprobs, ref_logprobs, values, scores, last_index, score_position):
    """The rollout's steps 4-6 composed from the pure functions, as PPOModule.rollout does."""
    length = logprobs.size(1)
    padding, value_padding = response_padding_masks(last_index, length, score_position)
    logprobs = logprobs.masked_fill(padding, INVALID_LOGPROB)
    ref_logprobs = ref_logprobs.masked_fill(padding, INVALID_LOGPROB)
    values = values.masked_fill(value_padding, 0.0)
    rewards, _, _ = kl_penalty_rewards(logprobs, ref_logprobs, scores, score_indices(last_index, length, score_position), 0.1)
    advantages, returns = gae_advantages(rewards, values)
    return rewards, values, advantages, returns


def test_n_plus_layout_one_row_eos_in_the_middle():
    # T = 4, EOS at 1 (L = 1); logprob/ref at padded positions are overwritten by the sentinel
    s = 0.0
    logprobs, ref = T([[-1.0, -2.0, s, s]]), T([[-1.5, -1.0, s, s]])
    values = T([[0.5, 0.4, 0.3, 9.9]])
    # kl = [0.5, -1, 0, 0]; -0.1 * kl = [-0.05, 0.1, 0, 0]
    # N+: score 2 at L + 1 = 2; values kept up to index 2 -> [0.5, 0.4, 0.3, 0]
    rewards, vals, adv, ret = n_plus_layout(logprobs, ref, values, T([2.0]), T([1]), "after_eos")
    close(rewards, [[-0.05, 0.1, 2.0, 0.0]])
    close(vals, [[0.5, 0.4, 0.3, 0.0]])
    # t=3: 0;  t=2: delta = 2 - 0.3 = 1.7, A = 1.7;  t=1: delta = 0.1 + 0.3 - 0.4 = 0, A = 0.95 * 1.7 = 1.615
    # t=0: delta = -0.05 + 0.4 - 0.5 = -0.15, A = -0.15 + 0.95 * 1.615 = 1.38425; returns = A + V
    close(adv, [[1.38425, 1.615, 1.7, 0.0]])
    close(ret, [[1.88425, 2.015, 2.0, 0.0]])
    # "eos": score on index 1 (0.1 + 2), values masked after 1 -> [0.5, 0.4, 0, 0]
    # t=1: delta = 2.1 - 0.4 = 1.7, A = 1.7; t=0: delta = -0.15, A = -0.15 + 0.95 * 1.7 = 1.465
    rewards, vals, adv, ret = n_plus_layout(logprobs, ref, values, T([2.0]), T([1]), "eos")
    close(rewards, [[-0.05, 2.1, 0.0, 0.0]])
    close(adv, [[1.465, 1.7, 0.0, 0.0]])
    close(ret, [[1.965, 2.1, 0.0, 0.0]])


def test_n_plus_layout_three_rows_eos_first_last_and_absent():
    # T = 3. Row 0: EOS at 0 (L = 0); row 1: EOS at T - 1 (L = 2); row 2: no EOS (L = 2, score -1 by P3).
    logprobs = T([[-1.0, 0.0, 0.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    ref = T([[-2.0, 0.0, 0.0], [-1.0, -2.0, -1.0], [-1.0, -1.0, -3.0]])
    values = T([[0.2, 0.1, 7.0], [0.1, 0.2, 0.3], [0.0, 0.0, 0.0]])
    rewards, vals, adv, ret = n_plus_layout(logprobs, ref, values, T([1.0, 1.0, -1.0]), T([0, 2, 2]), "after_eos")
    # row 0: kl = [1, 0, 0] -> [-0.1, 0, 0]; score at index 1; values kept at 0, 1 -> [0.2, 0.1, 0]
    #   t=1: delta = 1 - 0.1 = 0.9, A = 0.9; t=0: delta = -0.1 + 0.1 - 0.2 = -0.2, A = -0.2 + 0.855 = 0.655
    # row 1: kl = [0, 1, 0] -> [0, -0.1, 0]; L + 1 = T, so the score lands on L = 2: [0, -0.1, 1]
    #   t=2: delta = 1 - 0.3 = 0.7; t=1: delta = -0.1 + 0.3 - 0.2 = 0, A = 0.665; t=0: delta = 0.2 - 0.1 = 0.1, A = 0.73175
    # row 2: kl = [0, 0, 2] -> [0, 0, -0.2]; score -1 at L = 2: [0, 0, -1.2]; zero values
    #   A = [-1.2 * 0.9025, -1.2 * 0.95, -1.2] = [-1.083, -1.14, -1.2]
    close(rewards, [[-0.1, 1.0, 0.0], [0.0, -0.1, 1.0], [0.0, 0.0, -1.2]])
    close(vals, [[0.2, 0.1, 0.0], [0.1, 0.2, 0.3], [0.0, 0.0, 0.0]])
    close(adv, [[0.655, 0.9, 0.0], [0.73175, 0.665, 0.7], [-1.083, -1.14, -1.2]])
    close(ret, [[0.855, 1.0, 0.0], [0.83175, 0.865, 1.0], [-1.083, -1.14, -1.2]])


# --------------------------------------------------------------------------------------------------------
# adaptive KL controller (Ziegler et al. 2019)
# --------------------------------------------------------------------------------------------------------


def test_adaptive_kl_coef_hand_computed():
    # error = clip(kl / 6 - 1, -0.2, 0.2); coef * (1 + error * 512 / 10000)
    # kl 12: error 1 -> 0.2, mult 1 + 0.2 * 0.0512 = 1.01024 -> 0.050512
    assert adaptive_kl_coef(0.05, 12.0, 6.0, 10000, 512) == pytest.approx(0.050512)
    # kl 3: error -0.5 -> -0.2, mult 0.98976 -> 0.049488
    assert adaptive_kl_coef(0.05, 3.0, 6.0, 10000, 512) == pytest.approx(0.049488)
    # kl 6.6: error 0.1 (unclipped), mult 1.00512 -> 0.050256
    assert adaptive_kl_coef(0.05, 6.6, 6.0, 10000, 512) == pytest.approx(0.050256)
    assert adaptive_kl_coef(0.05, 6.0, 6.0, 10000, 512) == pytest.approx(0.05)


def test_kl_controller_fixed_adaptive_and_state():
    fixed = KLController(0.05)
    assert fixed.update(100.0, 512) == 0.05  # N+: fixed coefficient (P5)
    adaptive = KLController(0.05, target=6.0, horizon=10000)
    assert adaptive.update(12.0, 512) == pytest.approx(0.050512)
    restored = KLController(0.05, target=6.0, horizon=10000)
    restored.load_state_dict(adaptive.state_dict())  # checkpointed as extra state
    assert restored.value == pytest.approx(0.050512)
    with pytest.raises(ValueError, match="target > 0"):
        KLController(0.05, target=0.0)


# --------------------------------------------------------------------------------------------------------
# gae_advantages (P7)
# --------------------------------------------------------------------------------------------------------

REWARDS = T([[0.1, -0.2, 1.0]])
VALUES3 = T([[0.5, 0.4, 0.3]])


def test_gae_gamma_one_lambda_095():
    # t=2: delta = 1.0 + 0 - 0.3 = 0.7;               A2 = 0.7
    # t=1: delta = -0.2 + 0.3 - 0.4 = -0.3;           A1 = -0.3 + 0.95 * 0.7 = 0.365
    # t=0: delta = 0.1 + 0.4 - 0.5 = 0.0;             A0 = 0.0 + 0.95 * 0.365 = 0.34675
    # returns = A + V = [0.84675, 0.765, 1.0]
    adv, ret = gae_advantages(REWARDS, VALUES3, gamma=1.0, lam=0.95)
    close(adv, [[0.34675, 0.365, 0.7]])
    close(ret, [[0.84675, 0.765, 1.0]])


def test_gae_defaults_are_the_recipe():
    adv, _ = gae_advantages(REWARDS, VALUES3)
    close(adv, [[0.34675, 0.365, 0.7]])


def test_gae_discounted():
    # gamma 0.9, lambda 0.5 (gamma * lambda = 0.45)
    # t=2: delta = 1.0 - 0.3 = 0.7;                       A2 = 0.7
    # t=1: delta = -0.2 + 0.9 * 0.3 - 0.4 = -0.33;        A1 = -0.33 + 0.45 * 0.7 = -0.015
    # t=0: delta = 0.1 + 0.9 * 0.4 - 0.5 = -0.04;         A0 = -0.04 + 0.45 * -0.015 = -0.04675
    # returns = [0.45325, 0.385, 1.0]
    adv, ret = gae_advantages(REWARDS, VALUES3, gamma=0.9, lam=0.5)
    close(adv, [[-0.04675, -0.015, 0.7]])
    close(ret, [[0.45325, 0.385, 1.0]])


def test_gae_lambda_one_gives_monte_carlo_returns():
    # gamma = lambda = 1: returns are rewards-to-go: [0.1 - 0.2 + 1, -0.2 + 1, 1] = [0.9, 0.8, 1.0]
    adv, ret = gae_advantages(REWARDS, VALUES3, gamma=1.0, lam=1.0)
    close(ret, [[0.9, 0.8, 1.0]])
    close(adv, [[0.4, 0.4, 0.7]])


def test_gae_zero_padding_does_not_leak():
    # Row 1 is row 0 followed by a padded position (zero reward, zero value); row 0 has no padding.
    # 2-step case: t=1: delta = 1.0 - 0.3 = 0.7; t=0: delta = 0.1 + 0.3 - 0.5 = -0.1, A0 = -0.1 + 0.95 * 0.7 = 0.565
    rewards = T([[0.1, 1.0, 0.0]])
    values = T([[0.5, 0.3, 0.0]])
    adv, _ = gae_advantages(rewards, values)
    close(adv, [[0.565, 0.7, 0.0]])


# --------------------------------------------------------------------------------------------------------
# ppo_policy_loss / ppo_value_loss (P8)
# --------------------------------------------------------------------------------------------------------


def test_ppo_policy_loss_clips_both_sides():
    ln = math.log
    # ratios r = exp(new - old) and advantages A, cliprange 0.2 (clip to [0.8, 1.2]):
    #   r=1.5, A=+1: -A r = -1.5, -A clip = -1.2 -> max -1.2 (clipped)
    #   r=0.5, A=-1: -A r =  0.5, -A clip =  0.8 -> max  0.8 (clipped)
    #   r=1.1, A=+2: -2.2 both                   -> -2.2    (inside the range)
    #   r=0.5, A=+1: -0.5 vs -0.8                -> -0.5    (pessimistic: unclipped term)
    #   r=1.5, A=-1:  1.5 vs  1.2                ->  1.5    (pessimistic: unclipped term)
    #   padded position: r=e^5, A=100 (masked out)
    # loss = (-1.2 + 0.8 - 2.2 - 0.5 + 1.5) / 5 = -1.6 / 5 = -0.32; clipfrac = 2 / 5 = 0.4
    old = T([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    diff = T([[ln(1.5), ln(0.5), ln(1.1)], [ln(0.5), ln(1.5), 5.0]])
    new = (old + diff).requires_grad_(True)
    adv = T([[1.0, -1.0, 2.0], [1.0, -1.0, 100.0]])
    mask = T([[True, True, True], [True, True, False]])
    loss, stats = ppo_policy_loss(new, old, adv, mask, cliprange=0.2)
    close(loss.detach(), -0.32)
    close(stats["clipfrac"], 0.4)
    # approxkl = 0.5 * mean(d^2), d^2 = 0.164402, 0.480453, 0.009084, 0.480453, 0.164402
    # sum 1.298794, mean 0.259759, half 0.129879
    close(stats["approxkl"], 0.129879)
    # ratio mean (1.5 + 0.5 + 1.1 + 0.5 + 1.5) / 5 = 1.02; deviations .48, -.52, .08, -.52, .48,
    # squares .2304 + .2704 + .0064 + .2704 + .2304 = 1.008 -> biased variance 0.2016
    close(stats["ratio"], 1.02)
    close(stats["ratio_var"], 0.2016)
    assert all(not v.requires_grad for v in stats.values())
    loss.backward()
    # d loss / d new = -A r / 5 where unclipped, 0 where clipped or masked:
    #   [0, 0, -2 * 1.1 / 5 = -0.44], [-1 * 0.5 / 5 = -0.1, 1.5 / 5 = 0.3, 0]
    close(new.grad, [[0.0, 0.0, -0.44], [-0.1, 0.3, 0.0]])


def test_ppo_policy_loss_on_policy_is_minus_mean_advantage():
    logp = T([[-1.0, -2.0, -3.0]])
    adv = T([[1.0, -2.0, 4.0]])
    loss, stats = ppo_policy_loss(logp, logp.clone(), adv, torch.ones_like(adv, dtype=torch.bool))
    close(loss, -1.0)  # -(1 - 2 + 4) / 3
    close(stats["approxkl"], 0.0)
    close(stats["clipfrac"], 0.0)
    close(stats["ratio"], 1.0)
    close(stats["ratio_var"], 0.0)


def test_ppo_value_loss_clipped():
    # cliprange 0.2; v_clip = old + clip(new - old, -0.2, 0.2)
    #   old 1.0, new  1.5, R  2.0: v_clip 1.2; (1.5-2)^2 = 0.25, (1.2-2)^2 = 0.64  -> 0.64 (clip counted)
    #   old 1.0, new  1.5, R  1.0: v_clip 1.2; 0.25 vs 0.04                       -> 0.25
    #   old 0.0, new -0.1, R  0.5: inside;      0.36 vs 0.36                       -> 0.36 (not counted: not >)
    #   old 0.0, new -1.0, R -2.0: v_clip -0.2; 1.0 vs 3.24                        -> 3.24 (clip counted)
    #   padded: old 0, new 10, R -10 (masked out)
    # loss = 0.5 * (0.64 + 0.25 + 0.36 + 3.24) / 4 = 0.5 * 1.1225 = 0.56125; vf_clipfrac 2 / 4 = 0.5
    old = T([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    new = T([[1.5, 1.5, -0.1], [-1.0, 10.0, 0.0]]).requires_grad_(True)
    returns = T([[2.0, 1.0, 0.5], [-2.0, -10.0, 0.0]])
    mask = T([[True, True, True], [True, False, False]])
    loss, stats = ppo_value_loss(new, old, returns, mask, cliprange_value=0.2)
    close(loss.detach(), 0.56125)
    close(stats["vf_clipfrac"], 0.5)
    loss.backward()
    # d loss / d new = 0.5 * 2 (v - R) / 4 where the unclipped term wins; 0 where the clipped term wins
    # (its clamp is saturated) or the position is masked. At (0, 2) both terms are the same function of
    # v (clamp inside its range), so the total is (v - R) / 4 = (-0.1 - 0.5) / 4 = -0.15 however the tie splits.
    #   [0, (1.5 - 1) / 4 = 0.125, -0.15], [0, 0, 0]
    close(new.grad, [[0.0, 0.125, -0.15], [0.0, 0.0, 0.0]])


# --------------------------------------------------------------------------------------------------------
# pairwise_reward_loss (R4) / sequence_cross_entropy (SFT)
# --------------------------------------------------------------------------------------------------------


def test_pairwise_reward_loss_equal_scores_is_log_two():
    close(pairwise_reward_loss(T([0.3, -2.0]), T([0.3, -2.0])), math.log(2.0))  # 0.693147


def test_pairwise_reward_loss_values():
    # diff +1: -logsigmoid(1) = ln(1 + e^-1) = ln 1.367879 = 0.313262
    # diff -1: -logsigmoid(-1) = ln(1 + e) = ln 3.718282 = 1.313262; mean 0.813262
    close(pairwise_reward_loss(T([1.0, 0.0]), T([0.0, 1.0])), 0.813262)
    # stable for large gaps: diff -100 -> 100 (no inf), diff +100 -> ~0
    close(pairwise_reward_loss(T([0.0]), T([100.0])), 100.0, atol=1e-4)
    close(pairwise_reward_loss(T([100.0]), T([0.0])), 0.0)
    half = pairwise_reward_loss(T([1.0], dtype=torch.float16), T([0.0], dtype=torch.float16))
    assert half.dtype == torch.float32
    close(half, 0.313262)


def test_sequence_cross_entropy_ignores_pads():
    pad = 49152  # outside the 3-token vocabulary: pads must never be used as targets
    ln3 = math.log(3.0)
    input_ids = T([[0, 1, 2, pad], [1, 0, pad, pad]])
    mask = input_ids != pad
    logits = torch.zeros(2, 4, 3)
    # row 0: pos 0 logits [0, 0, 0] predict 1 -> -ln(1/3) = 1.098612
    #        pos 1 logits [0, ln 3, 0] predict 2 -> p = 1/5 -> ln 5 = 1.609438
    #        pos 2 predicts a pad (ignored, huge logits to make a leak visible); pos 3 predicts nothing
    logits[0, 1] = T([0.0, ln3, 0.0])
    logits[0, 2] = T([50.0, -50.0, -50.0])
    # row 1: pos 0 logits [ln 3, 0, 0] predict 0 -> p = 3/5 -> -ln 0.6 = 0.510826; pos 1+ predict pads
    logits[1, 0] = T([ln3, 0.0, 0.0])
    logits[1, 1] = T([-50.0, 50.0, -50.0])
    # token mean over the 3 real targets: (1.098612 + 1.609438 + 0.510826) / 3 = 3.218876 / 3 = 1.072959
    close(sequence_cross_entropy(logits, input_ids, mask), 1.072959)
    close(sequence_cross_entropy(logits, input_ids, mask.long(), "token"), 1.072959)
    # N+ per-sequence mean: row 0 (2 targets) (1.098612 + 1.609438) / 2 = 1.354025; row 1 (1 target) 0.510826;
    # mean of the rows (1.354025 + 0.510826) / 2 = 0.932426: the short row weighs as much as the long one
    close(sequence_cross_entropy(logits, input_ids, mask, "sequence"), 0.932426)
    with pytest.raises(ValueError, match="normalization"):
        sequence_cross_entropy(logits, input_ids, mask, "batch")


# --------------------------------------------------------------------------------------------------------
# models: init_scalar_head (R2), model_inputs (D6), sequence_scores (R3, R5, R7)
# --------------------------------------------------------------------------------------------------------


def test_init_scalar_head_std_and_zero_bias():
    torch.manual_seed(0)
    head = nn.Linear(9999, 10)  # std = 1 / sqrt(9999 + 1) = 0.01; 99,990 weights
    nn.init.constant_(head.bias, 5.0)
    init_scalar_head(head)
    assert torch.all(head.bias == 0)
    # the sample std of 99,990 normals is within ~0.3% of 0.01; default nn.Linear init would be uniform
    # with std 1 / sqrt(3 * 9999) = 0.00577
    assert abs(head.weight.std().item() - 0.01) < 0.0003
    assert abs(head.weight.mean().item()) < 2e-4


def test_init_scalar_head_uses_hidden_plus_one():
    # a narrow head shows the "+ 1": std 1 / sqrt(3 + 1) = 0.5, not 1 / sqrt(3) = 0.577350;
    # 300,000 weights estimate the std within ~0.2%
    torch.manual_seed(0)
    head = nn.Linear(3, 100_000)
    init_scalar_head(head)
    assert abs(head.weight.std().item() - 0.5) < 0.005
    assert torch.all(head.bias == 0)


def test_model_inputs_replaces_pads_and_counts_positions():
    p = 49152
    ids = T([[p, p, 5, 6], [5, 6, p, p], [5, p, 6, p], [7, 8, 9, 10]])
    out = model_inputs(ids, p)
    assert out["input_ids"].tolist() == [[0, 0, 5, 6], [5, 6, 0, 0], [5, 0, 6, 0], [7, 8, 9, 10]]
    assert out["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]]
    # positions count real tokens only: the first real token is 0 whatever the padding (pads get 0 too)
    assert out["position_ids"].tolist() == [[0, 0, 0, 1], [0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 2, 3]]
    assert torch.equal(ids[0], T([p, p, 5, 6])), "the input must not be modified in place"


@pytest.fixture(scope="module")
def scalar_model(tiny_model_dir):
    torch.manual_seed(0)
    return ScalarModel.from_backbone(str(tiny_model_dir)).eval()


def test_scalar_model_from_backbone_head(scalar_model):
    assert scalar_model.config.hidden_size == 32
    assert scalar_model.scalar_head.weight.shape == (1, 32)
    assert torch.all(scalar_model.scalar_head.bias == 0)
    assert scalar_model.config.bias == 0.0


@torch.no_grad()
def test_sequence_scores_reads_the_last_real_token_left_and_right(scalar_model):
    p = 49152  # [PAD]: outside the tiny model's 49,152-row embedding
    tokens = [5, 6, 7]
    per_position = scalar_model(input_ids=T([tokens]), attention_mask=torch.ones(1, 3, dtype=torch.long))[0]
    expected = per_position[-1].item()  # the score of the unpadded sequence at its last token (R3)
    assert len({round(v, 6) for v in per_position.tolist()}) == 3, "positions must differ for the test to bite"

    ids = T([[p, p] + tokens, tokens + [p, p], tokens + [p, p]])
    ids[2, 1] = 9  # a different middle token: a different sequence, a different score
    scores = sequence_scores(scalar_model, ids, p)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores[0], T(expected), rtol=1e-4, atol=1e-5)  # left padding
    torch.testing.assert_close(scores[1], T(expected), rtol=1e-4, atol=1e-5)  # right padding
    # R7: left and right padding agree (the recipe's tolerance is rtol 1e-2; a float32 model does far better)
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-4, atol=1e-5)
    assert abs(scores[2].item() - expected) > 1e-4

    # reading the last column of a right-padded row would be wrong: that value differs
    values = scalar_model(**model_inputs(ids, p))
    assert abs(values[1, -1].item() - expected) > 1e-4


@torch.no_grad()
def test_sequence_scores_subtracts_the_normalisation_bias(tiny_model_dir):
    model = ScalarModel.from_backbone(str(tiny_model_dir)).eval()
    ids = T([[5, 6, 7, 49152]])
    before = sequence_scores(model, ids, 49152)
    model.config.bias = 0.5  # R5: stored in the config, subtracted on every forward
    after = sequence_scores(model, ids, 49152)
    torch.testing.assert_close(after, before - 0.5)
