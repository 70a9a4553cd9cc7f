"""Critic-free advantage estimators, the k3 KL estimator and loss aggregation (recipe C1-C4).

A rollout samples ``k`` responses per prompt; the rows of one prompt are consecutive (``queries.repeat_interleave(k)``),
so a ``(B,)`` tensor of sequence rewards views as ``(B / k, k)`` groups. Each estimator returns ``(B, T)`` token
advantages for the clipped surrogate of :func:`~lit_rlhf.algorithms.core.ppo_policy_loss`; GAE (N+ PPO, recipe P7) stays
in :mod:`lit_rlhf.algorithms.core`.

Shape letters: ``B`` episodes (``B / k`` prompts), ``T`` response tokens.
"""

from __future__ import annotations

import torch

from lit_rlhf.algorithms.core import AllReduce, masked_whiten

#: ``advantage_estimator`` values: ``"gae"`` (PPO with a value model, N+) and the critic-free ones (recipe C1-C4).
ADVANTAGE_ESTIMATORS = ("gae", "rloo", "grpo", "dr_grpo", "reinforce_pp")

def grouped(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """``(B,)`` rewards as ``(B / k, k)`` groups of the ``k`` consecutive responses to one prompt.

    Raises:
        ValueError: if ``B`` is not a multiple of ``k``.
    """
    if rewards.dim() != 1 or rewards.numel() % k:
        raise ValueError(f"{tuple(rewards.shape)} rewards do not split into groups of k={k} responses per prompt")
    return rewards.view(-1, k)


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out (recipe C1; Ahmadian et al. 2024, arXiv 2402.14740): ``A_i = r_i - mean_{j != i} r_j``.

    Args:
        rewards: ``(B,)`` sequence rewards, ``k`` consecutive rows per prompt.
        k: responses per prompt, at least 2.

    Returns:
        ``(B,)`` advantages; a group of equal rewards gets 0.

    Raises:
        ValueError: for ``k < 2`` or ``B`` not a multiple of ``k``.
    """
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 responses per prompt (the baseline is the other responses' mean), got k={k}")
    groups = grouped(rewards, k)
    baseline = (groups.sum(1, keepdim=True) - groups) / (k - 1)
    return (groups - baseline).view(-1)


def group_normalized_advantages(rewards: torch.Tensor, k: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-relative advantages (recipe C2; Shao et al. 2024, arXiv 2402.03300):
    ``(r_i - mean(r)) / (std(r) + eps)`` over the prompt's group, ``std`` with Bessel's correction as in TRL's
    ``GRPOTrainer`` and OpenRLHF's ``group_norm``; with ``scale=False`` ``r_i - mean(r)`` (Dr. GRPO, C3; Liu et al. 2025,
    arXiv 2503.20783).

    Args:
        rewards: ``(B,)`` sequence rewards, ``k`` consecutive rows per prompt.
        k: responses per prompt, at least 2.
        scale: divide by the group's standard deviation (GRPO) or not (Dr. GRPO).
        eps: added to the standard deviation (TRL: 1e-4); a group of equal rewards (std 0) gets advantages 0.

    Returns:
        ``(B,)`` advantages.

    Raises:
        ValueError: for ``k < 2`` or ``B`` not a multiple of ``k``.
    """
    if k < 2:
        raise ValueError(f"group-relative advantages need k >= 2 responses per prompt, got k={k}")
    groups = grouped(rewards, k)
    centred = groups - groups.mean(1, keepdim=True)
    if scale:
        centred = centred / (groups.std(1, keepdim=True) + eps)
    return centred.view(-1)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Undiscounted returns ``G_t = sum_{s >= t} r_s`` over the real tokens of each response (recipe C4, gamma = 1).

    Args:
        rewards: ``(B, T)`` token rewards.
        mask: ``(B, T)`` bool, true on real response tokens; masked positions contribute nothing and get 0.

    Returns:
        ``(B, T)``.
    """
    masked = rewards * mask
    return (masked.flip(1).cumsum(1).flip(1)) * mask


def reinforce_pp_advantages(
    token_rewards: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduce = None
) -> torch.Tensor:
    """REINFORCE++ (recipe C4; Hu 2025, arXiv 2501.03262): returns to go of the token rewards (``-beta * KL_t``, the
    score on the last token), whitened over every real token of the global batch (biased variance, ``+1e-8``, as
    OpenRLHF), no critic.

    Args:
        token_rewards: ``(B, T)`` from :func:`~lit_rlhf.algorithms.core.kl_penalty_rewards`.
        mask: ``(B, T)`` bool, true on real response tokens.
        all_reduce: cross-rank sum; with it the statistics are the global batch's (REINFORCE++), without it this
            process's.

    Returns:
        ``(B, T)`` advantages, 0 at masked positions.
    """
    returns = returns_to_go(token_rewards, mask)
    return masked_whiten(returns, mask, all_reduce=all_reduce).masked_fill(~mask, 0.0)


def sequence_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A sequence-level ``(B,)`` advantage on every real token of its response: ``(B, T)``, 0 at masked positions."""
    return advantages.unsqueeze(1).to(torch.float32) * mask


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's "k3" estimator of ``KL(pi || pi_ref)`` per token (recipe C2, GRPO's KL term):
    ``exp(ref - logp) - (ref - logp) - 1``, non-negative and unbiased for samples from ``pi``.

    Args:
        logprobs: ``(B, T)`` policy logprobs of the sampled tokens (with grad in the loss).
        ref_logprobs: ``(B, T)`` reference-policy logprobs of the same tokens.

    Returns:
        ``(B, T)`` nats per token.
    """
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1.0
