"""The PPO-max options (Zheng et al. 2023, recipe §2) as pure tensor functions and one running-statistics module.

Each is off by default in :class:`~lit_rlhf.stages.ppo.PPOModule`, so the N+ behaviour is unchanged.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from lit_rlhf.algorithms.core import masked_whiten

AllReduce = Optional[Callable[[torch.Tensor], torch.Tensor]]


def merge_moments(
    mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor, batch_mean: torch.Tensor, batch_var: torch.Tensor, batch_count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, population variance and count of the union of two samples (Chan et al.'s parallel update).

    Args:
        mean, var, count: scalar statistics of everything seen so far (``var`` divides by ``count``).
        batch_mean, batch_var, batch_count: the same for the new batch.

    Returns:
        ``(mean, var, count)`` of the union, scalars.
    """
    total = count + batch_count
    delta = batch_mean - mean
    new_mean = mean + delta * batch_count / total
    new_var = (var * count + batch_var * batch_count + delta**2 * count * batch_count / total) / total
    return new_mean, new_var, total


class RunningMoments(nn.Module):
    """Running mean and standard deviation of every reward-model score seen so far (PPO-max score normalisation).

    The statistics are float64 Python numbers kept as the module's *extra state*, so they are in its
    ``state_dict`` (Lightning checkpoints, resumed runs) and no precision cast (``bf16-true``) can round them.
    :meth:`update` merges a batch, whose statistics cover the global batch when an ``all_reduce`` (cross-rank
    sum) is given.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mean, self.var, self.count = 0.0, 0.0, 0

    @property
    def std(self) -> float:
        """Unbiased standard deviation over everything seen (``count - 1`` in the denominator)."""
        return (self.var * self.count / max(self.count - 1, 1)) ** 0.5

    def get_extra_state(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def set_extra_state(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])

    @torch.no_grad()
    def update(self, values: torch.Tensor, all_reduce: AllReduce = None) -> tuple[float, float]:
        """Merge ``values`` (any shape, every element one sample) into the running statistics.

        Returns:
            the batch's mean and unbiased std, for logging.
        """
        values = values.detach().double().flatten()
        sums = torch.stack([values.new_tensor(values.numel()), values.sum()])
        if all_reduce is not None:
            sums = all_reduce(sums)
        batch_count, batch_mean = sums[0], sums[1] / sums[0]
        squares = ((values - batch_mean) ** 2).sum()
        if all_reduce is not None:
            squares = all_reduce(squares)
        batch_var = squares / batch_count
        as_tensor = lambda value: torch.tensor(value, dtype=torch.float64)  # noqa: E731
        mean, var, count = merge_moments(
            as_tensor(self.mean), as_tensor(self.var), as_tensor(float(self.count)),
            batch_mean.cpu(), batch_var.cpu(), batch_count.cpu(),
        )
        self.mean, self.var, self.count = mean.item(), var.item(), int(round(count.item()))
        return batch_mean.item(), (squares / (batch_count - 1).clamp(min=1)).sqrt().item()


def normalize_scores(
    scores: torch.Tensor, mean: float, std: float, shift_mean: bool = True, clip: Optional[float] = None
) -> torch.Tensor:
    """PPO-max score reparameterisation: ``(scores - mean) / std`` (normalisation) or ``scores / std``
    (scaling only, ``shift_mean=False``), then optionally clipped to ``[-clip, clip]``.

    Args:
        scores: ``(B,)`` reward-model scores.
        mean, std: running statistics (:class:`RunningMoments`), scalars.
        clip: clip value (the paper studies 0.8 and 0.3); ``None`` = no clipping.

    Returns:
        ``(B,)`` tensor in ``scores``' dtype.
    """
    shifted = scores - float(mean) if shift_mean else scores
    out = shifted / (float(std) + 1e-8)
    return out.clamp(-clip, clip) if clip is not None else out


def minibatch_advantages(
    advantages: torch.Tensor, mask: torch.Tensor, normalize: bool, clip: Optional[float] = None, all_reduce: AllReduce = None
) -> torch.Tensor:
    """PPO-max advantage normalisation over one minibatch (masked whitening), then optional clipping.

    Args:
        advantages: ``(b, T)`` advantages of the minibatch rows.
        mask: ``(b, T)`` bool, true on real response tokens.
        normalize: whiten over the minibatch's real tokens (all ranks with ``all_reduce``).
        clip: clamp to ``[-clip, clip]`` afterwards; ``None`` = no clipping.

    Returns:
        ``(b, T)`` tensor, 0 at padded positions.
    """
    if normalize:
        advantages = masked_whiten(advantages, mask, all_reduce=all_reduce)
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    return advantages.masked_fill(~mask, 0.0)
