"""The RL math of lit_rlhf as small pure tensor functions (no Lightning, no models)."""

from lit_rlhf.algorithms.core import (
    INVALID_LOGPROB,
    entropy_from_logits,
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
    ppo_policy_loss,
    ppo_value_loss,
    sequence_cross_entropy,
    truncate_after_eos,
)

__all__ = [
    "INVALID_LOGPROB",
    "entropy_from_logits",
    "first_true_indices",
    "gae_advantages",
    "kl_penalty_rewards",
    "last_token_index",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pairwise_reward_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "sequence_cross_entropy",
    "truncate_after_eos",
]
