"""Pure tensor functions for RLHF: no Lightning, no models, no I/O.

Every function here is small, documented with shapes and its source (the recipe detail ids refer to
``shared/docs/rlhf-recipe.md``), and tested against hand-computed values in ``tests/test_algorithms.py``.

Shape letters: ``B`` batch, ``T`` response length (tokens), ``L`` full sequence length, ``V`` vocab.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

#: Logprob written at padded response positions (recipe P4). Any value works because the positions are
#: masked everywhere; 1.0 is impossible for a real logprob, so a leak is easy to spot.
INVALID_LOGPROB = 1.0

#: ``all_reduce(tensor) -> tensor`` summing over data-parallel ranks; ``None`` means a single process.
AllReduce = Optional[Callable[[torch.Tensor], torch.Tensor]]


def first_true_indices(bools: torch.Tensor, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Index of the first ``True`` in each row, or the row length when there is none.

    Args:
        bools: ``(B, T)`` boolean tensor.

    Returns:
        ``(B,)`` integer tensor with values in ``[0, T]``.
    """
    row_len = bools.size(-1)
    zero_or_index = row_len * (~bools).to(dtype) + torch.arange(row_len, dtype=dtype, device=bools.device)
    return zero_or_index.min(dim=-1).values


StopIds = Union[int, Sequence[int], torch.Tensor]


def is_stop(responses: torch.Tensor, stop_ids: StopIds) -> torch.Tensor:
    """``(B, T)`` bool: where ``responses`` holds any of ``stop_ids`` (EOS, a chat template's end-of-turn token, ...)."""
    return torch.isin(responses, torch.as_tensor(stop_ids, dtype=responses.dtype, device=responses.device))


def truncate_after_eos(responses: torch.Tensor, eos_token_id: StopIds, pad_token_id: int) -> torch.Tensor:
    """Replace every token after the first EOS of each response by PAD (recipe P3, "EOS trick").

    The EOS itself is kept so that the reward model reads its score there (recipe R3). With several stop ids (EOS and
    a chat template's end-of-turn token, recipe W4) the first of any of them ends the response.

    Args:
        responses: ``(B, T)`` sampled response token ids.
        eos_token_id: the id of the EOS token, or several stop ids.
        pad_token_id: id written after the first EOS.

    Returns:
        ``(B, T)`` new tensor; rows without an EOS are unchanged.
    """
    eos_index = first_true_indices(is_stop(responses, eos_token_id))  # (B,) T when absent
    positions = torch.arange(responses.size(1), device=responses.device).unsqueeze(0)  # (1, T)
    return responses.masked_fill(positions > eos_index.unsqueeze(1), pad_token_id)


def penalize_missing_eos(
    scores: torch.Tensor, responses: torch.Tensor, eos_token_id: StopIds, penalty: float, subtract: bool = False
) -> torch.Tensor:
    """The scores with every response without an EOS (without any of several stop ids) penalised: its score replaced by
    ``penalty`` (recipe P3, N+: -1, which suits a reward model whose scores centre on 0, R5), or with ``subtract``
    lowered by ``penalty`` (TRL's ``missing_eos_penalty``: for a reward model of any offset and scale, e.g. a chat RM
    whose scores sit well below -1, where a fixed -1 would reward the unfinished responses).

    Args:
        scores: ``(B,)`` reward-model scores.
        responses: ``(B, T)`` response ids (truncated after EOS or not).

    Returns:
        ``(B,)`` new tensor.
    """
    contains_eos = is_stop(responses, eos_token_id).any(dim=1)
    return torch.where(contains_eos, scores, scores - penalty if subtract else torch.full_like(scores, penalty))


def eos_penalized(
    scores: torch.Tensor, responses: torch.Tensor, eos_token_id: StopIds, non_eos_penalty: bool, penalty_reward_value: float,
    missing_eos_penalty: Optional[float] = None,
) -> torch.Tensor:
    """The stages' rule for responses without a stop token: ``missing_eos_penalty`` subtracted when set (TRL), else
    the score replaced by ``penalty_reward_value`` when ``non_eos_penalty`` (N+, P3), else the score as it is."""
    if missing_eos_penalty is not None:
        return penalize_missing_eos(scores, responses, eos_token_id, missing_eos_penalty, subtract=True)
    return penalize_missing_eos(scores, responses, eos_token_id, penalty_reward_value) if non_eos_penalty else scores


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad position of each row (recipe R3), valid for left, right or no padding.

    Args:
        attention_mask: ``(B, L)`` with 1/True on real tokens. A row must contain at least one real token.

    Returns:
        ``(B,)`` long tensor.

    Raises:
        ValueError: if a row has no real token.
    """
    mask = attention_mask.bool()
    if not mask.any(dim=1).all():
        raise ValueError("last_token_index: a row of attention_mask has no real token")
    length = mask.size(1)
    flipped_first = first_true_indices(mask.flip(1))  # distance of the last real token from the end
    return length - 1 - flipped_first


def logprobs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False
) -> Any:
    """Log-probability of each label token under temperature-scaled logits (recipe P4).

    ``logits / (temperature + 1e-7)`` then ``log_softmax``, so that ratios and KL are measured in the
    distribution the responses were sampled from. Computed in float32 whatever the input dtype. With
    ``return_entropy``, also the entropy of that distribution, from the same ``log_softmax``: over a ``(16, 54, 49152)``
    batch each extra pass over the vocabulary costs about as much as the gather itself.

    Args:
        logits: ``(B, T, V)`` logits that predict ``labels`` (already shifted by one position).
        labels: ``(B, T)`` token ids.
        temperature: sampling temperature; ``1.0`` means no scaling beyond the ``1e-7``.
        return_entropy: also return the ``(B, T)`` entropy (nats), differentiable.

    Returns:
        ``(B, T)`` float32 logprobs (nats), or ``(logprobs, entropy)``.
    """
    # a float32 copy (even of float32 logits: the caller's tensor is left alone), scaled in place: autograd needs
    # neither it nor the unscaled values, so one (B, T, V) tensor fewer than `logits.float() / t`
    logp = F.log_softmax(logits.to(torch.float32, copy=True).div_(temperature + 1e-7), dim=-1)
    logprobs = torch.gather(logp, 2, labels.unsqueeze(-1)).squeeze(-1)
    return (logprobs, entropy_from_logprobs(logp)) if return_entropy else logprobs


def entropy_from_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of categorical distributions given as normalised logprobs: ``(B, T, V) -> (B, T)``."""
    return -(logp.exp() * logp).sum(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the categorical distribution given by ``logits``: ``(B, T, V) -> (B, T)``."""
    return entropy_from_logprobs(F.log_softmax(logits.float(), dim=-1))


def masked_sum(values: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduce = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is true, over every rank when ``all_reduce`` is given."""
    total = (values * mask).sum()
    return all_reduce(total) if all_reduce is not None else total


def masked_mean(values: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduce = None) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is true (scalar).

    Args:
        values: any shape.
        mask: same shape, bool or 0/1.
        all_reduce: optional cross-rank sum; when given the mean is over the positions of every rank.

    Raises:
        ValueError: if the mask selects nothing.
    """
    mask = mask.to(values.dtype)
    count = masked_sum(torch.ones_like(values), mask, all_reduce)
    if count.item() == 0:
        raise ValueError("masked_mean: the mask selects no position")
    return masked_sum(values, mask, all_reduce) / count


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, all_reduce: AllReduce = None) -> torch.Tensor:
    """Variance over masked positions: biased (divides by the count) or, with ``unbiased``, with Bessel's
    correction (``count / (count - 1)``).

    ``unbiased=True`` is the default of N+'s ``masked_var``; N+'s whitening calls it with ``unbiased=False``
    (recipe P6), as :func:`masked_whiten` does by default.

    Args:
        values: any shape.
        mask: same shape, bool or 0/1.
        unbiased: apply Bessel's correction.
        all_reduce: optional cross-rank sum; when given the statistics cover the positions of every rank.

    Returns:
        scalar variance (units of ``values`` squared).

    Raises:
        ValueError: if the mask selects nothing, or fewer than two positions when ``unbiased``.
    """
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask, all_reduce)
    variance = masked_mean((values - mean) ** 2, mask, all_reduce)
    if unbiased:
        count = masked_sum(torch.ones_like(values), mask, all_reduce)
        if count.item() < 2:
            raise ValueError("masked_var: an unbiased variance needs at least two positions")
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, all_reduce: AllReduce = None, unbiased: bool = False
) -> torch.Tensor:
    """Whiten ``values`` with the mean and variance of the masked positions (recipe P6).

    ``(x - mean) / sqrt(var + 1e-8)``; with ``shift_mean=False`` the mean is added back, so only the scale
    changes (N+ uses this for rewards). Positions outside the mask are transformed too: callers zero them.

    As N+'s ``masked_whiten``: the variance is biased (``unbiased=False``, its ``masked_var(values, mask, False)``)
    and the statistics are those of the tensor given, i.e. of one process's batch; pass ``all_reduce`` to whiten
    over the global batch instead (the same under one process).

    Args:
        values: ``(B, T)``.
        mask: ``(B, T)`` bool, true on the positions whose statistics are used.
        shift_mean: subtract the mean (advantages) or keep it (rewards).
        all_reduce: optional cross-rank sum so that the statistics cover the global batch.
        unbiased: use Bessel's correction in the variance (not N+).

    Returns:
        ``(B, T)`` tensor.

    Raises:
        ValueError: as :func:`masked_var`.
    """
    mean = masked_mean(values, mask, all_reduce)
    var = masked_var(values, mask, unbiased=unbiased, all_reduce=all_reduce)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


#: Where the reward-model score lands and which values train (recipe P5): ``"after_eos"`` is the N+ code
#: (score at ``L + 1``, the first PAD after the EOS at ``L``, when ``L + 1 < T``; values kept up to ``L + 1``),
#: ``"eos"`` puts the score on the EOS itself and masks values after it.
SCORE_POSITIONS = ("after_eos", "eos")


def response_padding_masks(
    last_index: torch.Tensor, length: int, score_position: str = "after_eos"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy and value padding masks of a batch of responses (recipe P4, P5).

    With ``L`` the index of the last real response token (the EOS when there is one), the policy mask is
    ``t > L``; the value mask is ``t > L + 1`` (N+'s ``padding_mask_p1``: the value at ``L + 1``, where the score
    lands, is kept in GAE and the value loss) with ``"after_eos"``, and ``t > L`` with ``"eos"``.

    Args:
        last_index: ``(B,)`` long, ``L`` of each row, in ``[0, T)``.
        length: ``T``, the response length.
        score_position: one of :data:`SCORE_POSITIONS`.

    Returns:
        ``(padding_mask, value_padding_mask)``, each ``(B, T)`` bool, true on masked (padded) positions.

    Raises:
        ValueError: for an unknown ``score_position``.
    """
    if score_position not in SCORE_POSITIONS:
        raise ValueError(f"score_position must be one of {SCORE_POSITIONS}, got '{score_position}'")
    positions = torch.arange(length, device=last_index.device).unsqueeze(0)  # (1, T)
    padding_mask = positions > last_index.unsqueeze(1)
    value_last = last_index + 1 if score_position == "after_eos" else last_index
    return padding_mask, positions > value_last.unsqueeze(1)


def score_indices(last_index: torch.Tensor, length: int, score_position: str = "after_eos") -> torch.Tensor:
    """Response position that receives the reward-model score (recipe P5).

    ``"after_eos"`` (N+): ``L + 1`` when ``L + 1 < T``, else ``L``; ``"eos"``: ``L``.

    Args:
        last_index: ``(B,)`` long, index ``L`` of the last real response token.
        length: ``T``.
        score_position: one of :data:`SCORE_POSITIONS`.

    Returns:
        ``(B,)`` long tensor in ``[0, T)``.

    Raises:
        ValueError: for an unknown ``score_position``.
    """
    if score_position not in SCORE_POSITIONS:
        raise ValueError(f"score_position must be one of {SCORE_POSITIONS}, got '{score_position}'")
    if score_position == "eos":
        return last_index
    return torch.where(last_index + 1 < length, last_index + 1, last_index)


def kl_penalty_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    score_index: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards: KL penalty on every token plus the RM score at ``score_index`` (recipe P5).

    ``kl_t = logp_t - logp_ref_t``, ``r_t = -kl_coef * kl_t``, and ``r_{score_index} += score``. Padded positions
    carry the sentinel logprob in both inputs (recipe P4), so their KL and penalty are exactly 0; N+ adds the
    score on the first of them (see :func:`score_indices`).

    Args:
        logprobs: ``(B, T)`` policy logprobs of the response tokens at sampling time.
        ref_logprobs: ``(B, T)`` reference-policy logprobs of the same tokens.
        scores: ``(B,)`` reward-model scores (after the EOS penalty).
        score_index: ``(B,)`` position that receives the score (:func:`score_indices`).
        kl_coef: the KL coefficient (0.05 fixed in N+; see :func:`adaptive_kl_coef`).

    Returns:
        ``(rewards, kl, non_score_reward)``, each ``(B, T)``.
    """
    kl = logprobs - ref_logprobs
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, score_index] += scores.to(rewards.dtype)
    return rewards, kl, non_score_reward


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (recipe P7; Schulman et al. 2016).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` (``V_T = 0``), ``A_t = delta_t + gamma * lam * A_{t+1}``,
    ``returns = A + V``. Padded positions must hold zero reward and zero value so nothing flows back
    from them.

    Args:
        rewards: ``(B, T)`` per-token rewards.
        values: ``(B, T)`` value-model estimates at sampling time.
        gamma: discount (1.0 in N+).
        lam: GAE lambda (0.95 in N+).

    Returns:
        ``(advantages, returns)``, each ``(B, T)``, not whitened.
    """
    length = rewards.size(1)
    advantages_reversed = []
    lastgaelam = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t < length - 1 else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


#: how per-token losses become one number (verl's ``loss_agg_mode`` names), see :func:`aggregate_loss`.
LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


def aggregate_loss(losses: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean", constant: int | None = None) -> torch.Tensor:
    """Per-token losses ``(B, T)`` as one scalar (verl's ``loss_agg_mode``):

    * ``"token_mean"``: the mean over every real token of the batch (N+ PPO; long responses weigh more);
    * ``"seq_mean_token_mean"``: each response's token mean, then the mean over responses (GRPO, recipe C2);
    * ``"seq_mean_token_sum"``: each response's token sum, then the mean over responses;
    * ``"seq_mean_token_sum_norm"``: the sum over every real token divided by ``B * constant`` (Dr. GRPO's constant
      normaliser, recipe C3; ``constant`` defaults to ``T``, the generation budget).

    Raises:
        ValueError: for an unknown mode, or a mask that selects nothing (``token_mean``) or a response without a real
            token (``seq_mean_token_mean``).
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got '{mode}'")
    if mode == "token_mean":
        return masked_mean(losses, mask)
    sums = (losses * mask).sum(1)  # (B,)
    if mode == "seq_mean_token_sum":
        return sums.mean()
    if mode == "seq_mean_token_sum_norm":
        return sums.sum() / (losses.size(0) * (constant or losses.size(1)))
    counts = mask.sum(1)
    if not bool(counts.all()):
        raise ValueError("aggregate_loss: a response has no real token under seq_mean_token_mean")
    return (sums / counts).mean()


def ppo_policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
    loss_agg_mode: str = "token_mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate policy loss (recipe P8; Schulman et al. 2017; GRPO's per-token form, recipe C2).

    ``loss = mean_mask(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))`` with ``ratio = exp(new - old)``, the
    mean taken as ``loss_agg_mode`` says (:func:`aggregate_loss`; ``"token_mean"`` is N+'s).

    Args:
        new_logprobs: ``(B, T)`` logprobs under the policy being optimised (with grad).
        old_logprobs: ``(B, T)`` logprobs at sampling time.
        advantages: ``(B, T)`` (whitened) advantages.
        mask: ``(B, T)`` bool, true on real response tokens.
        cliprange: epsilon (0.2).
        loss_agg_mode: one of :data:`LOSS_AGG_MODES`.

    Returns:
        ``(loss, stats)`` where stats holds detached ``approxkl`` (``0.5 * mean(diff^2)``), ``clipfrac``,
        ``ratio`` (mean) and ``ratio_var``.
    """
    logprobs_diff = new_logprobs - old_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = aggregate_loss(torch.max(pg_losses, pg_losses_clipped), mask, loss_agg_mode)
    with torch.no_grad():
        stats = {
            "approxkl": 0.5 * masked_mean(logprobs_diff**2, mask),
            "clipfrac": masked_mean((pg_losses_clipped > pg_losses).float(), mask),
            "ratio": masked_mean(ratio, mask),
            "ratio_var": masked_var(ratio, mask, unbiased=False),
        }
    return loss, stats


def ppo_value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ``0.5 * mean_mask(max((v - R)^2, (v_clip - R)^2))`` (recipe P8).

    ``v_clip = v_old + clip(v - v_old, -eps_v, eps_v)``.

    Args:
        new_values: ``(B, T)`` value predictions (with grad).
        old_values: ``(B, T)`` values at sampling time.
        returns: ``(B, T)`` GAE returns.
        mask: ``(B, T)`` bool, true where the value is trained.
        cliprange_value: eps_v (0.2).

    Returns:
        ``(loss, stats)`` with detached ``vf_clipfrac``.
    """
    clipped = old_values + torch.clamp(new_values - old_values, -cliprange_value, cliprange_value)
    losses = (new_values - returns) ** 2
    losses_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(losses, losses_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((losses_clipped > losses).float(), mask)}
    return loss, stats


def pairwise_reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry reward-model loss ``mean(-logsigmoid(r_chosen - r_rejected))`` (recipe R4).

    Args:
        chosen_rewards: ``(B,)`` scores of the preferred responses.
        rejected_rewards: ``(B,)`` scores of the other responses.

    Returns:
        scalar loss (nats).
    """
    return -F.logsigmoid(chosen_rewards.float() - rejected_rewards.float()).mean()


#: SFT loss weightings (:func:`sequence_cross_entropy`).
LOSS_NORMALIZATIONS = ("sequence", "token")


def sequence_cross_entropy(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, normalization: str = "token"
) -> torch.Tensor:
    """Next-token cross-entropy over the real tokens of each sequence (SFT loss, recipe §1 SFT).

    Position ``t`` predicts token ``t + 1``; targets at padded positions are ignored.

    * ``"token"``: the mean over every real target token of the batch (Hugging Face's ``labels`` with ``-100``),
      so long rows weigh more.
    * ``"sequence"``: the mean over each row's real target tokens, then the mean over rows: N+'s loss, which takes
      the Hugging Face loss of a micro-batch of one row and accumulates 16 of them, so long and short rows weigh
      the same.

    Args:
        logits: ``(B, L, V)``.
        input_ids: ``(B, L)`` token ids (pads may hold any id).
        mask: ``(B, L)`` bool, true on real tokens (targets at ``mask[:, 1:]``).
        normalization: one of :data:`LOSS_NORMALIZATIONS`.

    Returns:
        scalar loss (nats per token).

    Raises:
        ValueError: for an unknown ``normalization``, or a row with no target token under ``"sequence"``.
    """
    if normalization not in LOSS_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {LOSS_NORMALIZATIONS}, got '{normalization}'")
    target_mask = mask[:, 1:].bool()  # (B, L-1)
    targets = input_ids[:, 1:].masked_fill(~target_mask, -100)
    losses = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="none"
    ).view_as(targets)  # (B, L-1), 0 at ignored targets
    if normalization == "token":
        return losses.sum() / target_mask.sum()
    counts = target_mask.sum(1)  # (B,)
    if not counts.all():
        raise ValueError("sequence_cross_entropy: a row has no target token")
    return (losses.sum(1) / counts).mean()
