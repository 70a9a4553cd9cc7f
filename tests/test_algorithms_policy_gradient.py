"""Critic-free advantage estimators, the k3 KL estimator and loss aggregation (recipe C1-C4): hand-computed values on
small reward tables (groups of 3 and 4, ties, a group of equal rewards), and the same tensors through transcriptions of
TRL's and OpenRLHF's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from lit_rlhf.algorithms import (
    aggregate_loss,
    group_normalized_advantages,
    k3_kl,
    masked_mean,
    ppo_policy_loss,
    reinforce_pp_advantages,
    returns_to_go,
    rloo_advantages,
    sequence_to_tokens,
)

# two prompts of k = 3: distinct rewards, then all equal (GRPO's std 0 case)
REWARDS_K3 = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])
# two prompts of k = 4: ties inside the group, then distinct
REWARDS_K4 = torch.tensor([0.0, 0.0, 1.0, 1.0, -1.0, 3.0, 0.0, 2.0])


def test_rloo_hand_computed():
    # [1, 2, 6]: the others' means are 4, 3.5, 1.5; the equal group gets 0
    assert torch.allclose(rloo_advantages(REWARDS_K3, 3), torch.tensor([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0]))
    # [0, 0, 1, 1]: others' means 2/3, 2/3, 1/3, 1/3; [-1, 3, 0, 2]: 5/3, 1/3, 4/3, 2/3
    expected = torch.tensor([-2 / 3, -2 / 3, 2 / 3, 2 / 3, -8 / 3, 8 / 3, -4 / 3, 4 / 3])
    assert torch.allclose(rloo_advantages(REWARDS_K4, 4), expected)


def test_grpo_and_dr_grpo_hand_computed():
    # [1, 2, 6]: mean 3, unbiased std sqrt((4 + 1 + 9) / 2) = sqrt(7)
    std = math.sqrt(7.0)
    expected = torch.tensor([-2 / (std + 1e-4), -1 / (std + 1e-4), 3 / (std + 1e-4), 0.0, 0.0, 0.0])
    grpo = group_normalized_advantages(REWARDS_K3, 3)
    assert torch.allclose(grpo, expected)
    assert torch.equal(grpo[3:], torch.zeros(3))  # std 0: exactly 0, not NaN
    assert torch.allclose(group_normalized_advantages(REWARDS_K3, 3, scale=False), torch.tensor([-2.0, -1.0, 3.0, 0, 0, 0]))
    # [0, 0, 1, 1]: mean 0.5, unbiased std sqrt(1 / 3)
    tie_std = math.sqrt(1 / 3)
    assert torch.allclose(group_normalized_advantages(REWARDS_K4, 4)[:4], torch.tensor([-0.5, -0.5, 0.5, 0.5]) / (tie_std + 1e-4))


@pytest.mark.parametrize("function", [rloo_advantages, group_normalized_advantages])
def test_group_estimators_refuse_bad_groups(function):
    with pytest.raises(ValueError, match="k >= 2"):
        function(REWARDS_K3, 1)
    with pytest.raises(ValueError, match="groups of k=4"):
        function(REWARDS_K3, 4)


# ------------------------------------------------------------------ transcriptions of the libraries' formulas
def trl_rloo(scores: torch.Tensor, non_score_reward: torch.Tensor, k: int) -> torch.Tensor:
    """TRL's RLOOTrainer (v0.11-v0.13, ``token_level_kl=False``): the batch is k blocks of the prompts
    (``queries.repeat(k, 1)``), so a prompt's samples are strided, not consecutive."""
    rlhf_reward = scores + non_score_reward.sum(1)
    rlhf_reward = rlhf_reward.reshape(k, -1)
    baseline = (rlhf_reward.sum(0) - rlhf_reward) / (k - 1)
    return (rlhf_reward - baseline).flatten()


def trl_grpo(rewards: torch.Tensor, num_generations: int, scale_rewards: bool = True) -> torch.Tensor:
    """TRL's GRPOTrainer ``_generate_and_score_completions``."""
    mean_grouped = rewards.view(-1, num_generations).mean(dim=1).repeat_interleave(num_generations, dim=0)
    std_grouped = rewards.view(-1, num_generations).std(dim=1).repeat_interleave(num_generations, dim=0)
    advantages = rewards - mean_grouped
    return advantages / (std_grouped + 1e-4) if scale_rewards else advantages


def openrlhf_group_rewards(rewards: torch.Tensor, n_samples: int, estimator: str) -> torch.Tensor:
    """OpenRLHF's ``experience_maker`` reward shaping per estimator (consecutive samples per prompt)."""
    rewards = rewards.reshape(-1, n_samples)
    if estimator == "rloo":
        baseline = (rewards.sum(-1, keepdim=True) - rewards) / (n_samples - 1)
        rewards = rewards - baseline
    elif estimator == "group_norm":
        rewards = (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-9)
    elif estimator == "dr_grpo":
        rewards = rewards - rewards.mean(-1, keepdim=True)
    return rewards.flatten()


def openrlhf_reinforce_pp(r: torch.Tensor, kl: torch.Tensor, action_mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """OpenRLHF's ``compute_reward`` + ``get_cumulative_returns`` (gamma 1) + the global advantage normalisation."""
    kl_reward = -kl_coef * kl
    eos_indices = action_mask.size(1) - 1 - action_mask.long().fliplr().argmax(dim=1, keepdim=True)
    last_reward = torch.zeros_like(kl).scatter_(dim=1, index=eos_indices, src=r.unsqueeze(1).to(kl.dtype))
    rewards = (last_reward + kl_reward) * action_mask
    returns = torch.zeros_like(rewards)
    cumulative = torch.zeros(rewards.size(0))
    for t in reversed(range(rewards.size(1))):
        cumulative = rewards[:, t] + cumulative
        returns[:, t] = cumulative
    num_actions = action_mask.sum()
    mean = (returns * action_mask).sum() / num_actions
    var = ((returns - mean).pow(2) * action_mask).sum() / num_actions
    return (returns - mean) * var.clamp(min=1e-8).rsqrt() * action_mask


def test_rloo_matches_trl_with_the_kl_folded_into_the_sequence_reward():
    torch.manual_seed(0)
    k, prompts = 4, 3
    scores, non_score = torch.randn(k * prompts), 0.05 * torch.randn(k * prompts, 5)
    # TRL's layout (sample j of prompt p at row j * prompts + p) -> ours (row p * k + j)
    ours_order = torch.arange(k * prompts).view(k, prompts).t().reshape(-1)
    trl = trl_rloo(scores, non_score, k)[ours_order]
    ours = rloo_advantages(scores[ours_order] + non_score[ours_order].sum(1), k)
    assert torch.allclose(ours, trl, atol=1e-6)


@pytest.mark.parametrize("rewards, k", [(REWARDS_K3, 3), (REWARDS_K4, 4)])
def test_group_estimators_match_trl_and_openrlhf(rewards, k):
    assert torch.allclose(rloo_advantages(rewards, k), openrlhf_group_rewards(rewards, k, "rloo"), atol=1e-6)
    assert torch.allclose(group_normalized_advantages(rewards, k), trl_grpo(rewards, k), atol=1e-6)
    assert torch.allclose(group_normalized_advantages(rewards, k, scale=False), trl_grpo(rewards, k, scale_rewards=False))
    assert torch.allclose(group_normalized_advantages(rewards, k, scale=False), openrlhf_group_rewards(rewards, k, "dr_grpo"))
    # OpenRLHF's group_norm adds 1e-9 where TRL adds 1e-4: equal up to that, and both 0 on a group of equal rewards
    assert torch.allclose(group_normalized_advantages(rewards, k, eps=1e-9), openrlhf_group_rewards(rewards, k, "group_norm"), atol=1e-5)


def test_reinforce_pp_hand_computed_and_matches_openrlhf():
    mask = torch.tensor([[True, True, True], [True, False, False]])
    kl = torch.tensor([[0.2, -0.1, 0.4], [1.0, 0.0, 0.0]])
    scores, kl_coef = torch.tensor([1.0, -1.0]), 0.5
    token_rewards = -kl_coef * kl * mask
    token_rewards[0, 2] += scores[0]  # the score on the last real token
    token_rewards[1, 0] += scores[1]
    returns = returns_to_go(token_rewards, mask)
    # row 0: rewards [-0.1, 0.05, 0.8] -> returns [0.75, 0.85, 0.8]; row 1: [-1.5]
    assert torch.allclose(returns, torch.tensor([[0.75, 0.85, 0.8], [-1.5, 0.0, 0.0]]))
    values = torch.tensor([0.75, 0.85, 0.8, -1.5])
    mean, std = values.mean(), values.std(unbiased=False)
    expected = torch.zeros(2, 3)
    expected[mask] = (values - mean) / torch.sqrt(std**2 + 1e-8)
    advantages = reinforce_pp_advantages(token_rewards, mask)
    assert torch.allclose(advantages, expected, atol=1e-6)
    assert torch.allclose(advantages, openrlhf_reinforce_pp(scores, kl, mask, kl_coef), atol=1e-5)


def test_k3_kl_hand_computed():
    logprobs, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, -1.0, -0.5]])
    # log(ref/pi) = -0.5, 1, 0 -> e^-0.5 + 0.5 - 1, e - 2, 0
    expected = torch.tensor([[math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]])
    assert torch.allclose(k3_kl(logprobs, ref), expected)
    assert (k3_kl(torch.randn(4, 7), torch.randn(4, 7)) >= 0).all()


def test_loss_aggregation_modes_hand_computed():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert aggregate_loss(losses, mask, "token_mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(losses, mask, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_loss(losses, mask, "seq_mean_token_sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate_loss(losses, mask, "seq_mean_token_sum_norm").item() == pytest.approx(10 / (2 * 3))
    assert aggregate_loss(losses, mask, "seq_mean_token_sum_norm", constant=5).item() == pytest.approx(10 / (2 * 5))
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate_loss(losses, mask, "sum")


def test_policy_loss_default_aggregation_is_the_n_plus_token_mean():
    torch.manual_seed(1)
    new, old, advantages = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.rand(3, 5) > 0.3
    mask[:, 0] = True
    loss, _ = ppo_policy_loss(new, old, advantages, mask)
    ratio = torch.exp(new - old)
    token_losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2))
    assert torch.equal(loss, masked_mean(token_losses, mask))
    per_sequence, _ = ppo_policy_loss(new, old, advantages, mask, loss_agg_mode="seq_mean_token_mean")
    assert per_sequence.item() == pytest.approx(((token_losses * mask).sum(1) / mask.sum(1)).mean().item(), rel=1e-6)


def test_sequence_advantages_sit_on_every_real_token():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert torch.equal(sequence_to_tokens(torch.tensor([2.0, -1.0]), mask), torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))
