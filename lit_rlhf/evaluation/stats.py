"""Statistics of evaluations: win rates and accuracies with bootstrap intervals, length buckets, calibration (R8).

Outcomes are per item: ``1.0`` a win (or a correct preference), ``0.0`` a loss, ``0.5`` a tie (N+ counts ties as
half a win). Intervals are percentile bootstraps over items (``torchmetrics.wrappers.BootStrapper``, multinomial
resampling), seeded so that a re-run prints the same interval.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchmetrics.classification import BinaryCalibrationError

from lit_rlhf.metrics import mean_with_interval

#: response-length bucket edges in tokens for the length-controlled win rate (N+ reports win rate against length)
LENGTH_EDGES = (20, 30, 40, 50)


def by_length(
    outcomes: Sequence[float] | torch.Tensor, lengths: Sequence[int] | torch.Tensor, edges: Sequence[int] = LENGTH_EDGES, **kwargs
) -> list[dict[str, float]]:
    """Win rate per response-length bucket (the length-controlled view of a win rate).

    Args:
        outcomes: ``(N,)`` per-item outcomes.
        lengths: ``(N,)`` response lengths in tokens.
        edges: increasing bucket edges: buckets ``[0, e0)``, ``[e0, e1)``, ..., ``[e_last, inf)``.
        kwargs: passed to :func:`~lit_rlhf.metrics.mean_with_interval`.

    Returns:
        one ``{"bucket": "lo-hi", "low_tokens", "high_tokens", "mean", "low", "high", "n"}`` per non-empty bucket.

    Raises:
        ValueError: if ``outcomes`` and ``lengths`` differ in size or ``edges`` is not increasing.
    """
    outcomes, lengths = torch.as_tensor(outcomes, dtype=torch.float64), torch.as_tensor(lengths)
    if outcomes.shape != lengths.shape:
        raise ValueError(f"outcomes {tuple(outcomes.shape)} and lengths {tuple(lengths.shape)} differ in shape")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"edges must increase, got {list(edges)}")
    bounds = [0, *edges, None]
    rows = []
    for low, high in zip(bounds, bounds[1:]):
        mask = (lengths >= low) & (lengths < high) if high is not None else lengths >= low
        if mask.any():
            name = f"{low}-{high - 1}" if high is not None else f"{low}+"
            rows.append({"bucket": name, "low_tokens": low, "high_tokens": high, **mean_with_interval(outcomes[mask], **kwargs)})
    return rows


def calibration(
    probabilities: Sequence[float] | torch.Tensor, outcomes: Sequence[int] | torch.Tensor, num_bins: int = 10
) -> dict[str, object]:
    """Reliability of predicted probabilities: binned against how often the predicted event happened.

    Args:
        probabilities: ``(N,)`` predicted probabilities of the event, in [0, 1].
        outcomes: ``(N,)`` 1 where the event happened, 0 where not.
        num_bins: equal-width bins over [0, 1].

    Returns:
        ``{"ece": expected calibration error (torchmetrics ``BinaryCalibrationError``, L1: the bins' |confidence -
        accuracy| weighted by their share of the items), "bins": [...]}`` with one ``{"low", "high", "confidence"
        (mean predicted probability), "accuracy" (empirical frequency), "n"}`` per non-empty bin.

    Raises:
        ValueError: on a size mismatch or a probability outside [0, 1].
    """
    probabilities = torch.as_tensor(probabilities, dtype=torch.float32).flatten()
    outcomes = torch.as_tensor(outcomes).flatten().long()
    if probabilities.shape != outcomes.shape:
        raise ValueError(f"probabilities {tuple(probabilities.shape)} and outcomes {tuple(outcomes.shape)} differ in shape")
    if probabilities.numel() == 0:
        return {"ece": float("nan"), "bins": []}
    if probabilities.min() < 0 or probabilities.max() > 1:
        raise ValueError("probabilities must lie in [0, 1]")
    ece = BinaryCalibrationError(n_bins=num_bins, norm="l1")(probabilities, outcomes).item()
    index = torch.clamp((probabilities * num_bins).long(), max=num_bins - 1)
    bins = []
    for b in range(num_bins):
        mask = index == b
        if mask.any():
            bins.append({
                "low": b / num_bins, "high": (b + 1) / num_bins, "confidence": probabilities[mask].mean().item(),
                "accuracy": outcomes[mask].float().mean().item(), "n": int(mask.sum()),
            })
    return {"ece": ece, "bins": bins}


def preference_calibration(
    chosen_rewards: Sequence[float] | torch.Tensor, rejected_rewards: Sequence[float] | torch.Tensor, num_bins: int = 10
) -> dict[str, object]:
    """Reward-model calibration (recipe R8): the Bradley-Terry probability ``sigmoid(r_a - r_b)`` that response a is
    preferred, against the labellers' choice, with every pair in both orders (a = chosen: outcome 1; a = rejected:
    probability ``1 - p``, outcome 0), so the diagram covers [0, 1] and is symmetric about 0.5.

    Args:
        chosen_rewards, rejected_rewards: ``(N,)`` reward-model scores (logits) of each pair's responses.
        num_bins: as :func:`calibration`.

    Returns:
        :func:`calibration` of the ``2N`` (probability, outcome) pairs.
    """
    chosen, rejected = torch.as_tensor(chosen_rewards).float().flatten(), torch.as_tensor(rejected_rewards).float().flatten()
    p = torch.sigmoid(chosen - rejected)
    return calibration(torch.cat([p, 1 - p]), torch.cat([torch.ones_like(p), torch.zeros_like(p)]).long(), num_bins)


def length_controlled_win_rate(
    outcomes: Sequence[float] | torch.Tensor,
    length_differences: Sequence[float] | torch.Tensor,
    confidence: float = 0.95,
    num_resamples: int = 1000,
    seed: int = 0,
    ridge: float = 1e-2,
) -> dict[str, float]:
    """The length-controlled win rate of AlpacaEval 2 (Dubois et al. 2024, "Length-Controlled AlpacaEval"), for one
    pair of systems: a logistic model of the judge's preference with a length term,

        ``logit P(a wins) = theta + phi * tanh(d / std(d))``, ``d`` = length of a's response minus b's,

    fitted by maximum likelihood on the per-item outcomes (a tie counts as half a win and half a loss), and read at
    zero length difference: ``sigmoid(theta)``, the win rate had both responses been of the same length. (AlpacaEval
    fits the same length term beside per-instruction difficulty terms shared by every model of its leaderboard; with
    two systems those reduce to ``theta``.) A weak ridge penalty keeps the fit finite when one system wins every item.
    The interval is a percentile bootstrap over items, the model refitted on each resample.

    Args:
        outcomes: ``(N,)`` 1 a win of a, 0 a loss, 0.5 a tie.
        length_differences: ``(N,)`` length of a's response minus b's (AlpacaEval: characters).
        confidence, num_resamples, seed: as :func:`~lit_rlhf.metrics.mean_with_interval`.
        ridge: the L2 penalty on ``theta`` and ``phi`` (in units of the log-likelihood's sum).

    Returns:
        ``{"mean", "low", "high", "n", "length_coefficient"}``: the length-controlled win rate, its interval, the number
        of items and ``phi`` (positive when the judge favours the longer response); NaN figures without items.

    Raises:
        ValueError: on a size mismatch.
    """
    y = torch.as_tensor(outcomes, dtype=torch.float64).flatten()
    d = torch.as_tensor(length_differences, dtype=torch.float64).flatten()
    if y.shape != d.shape:
        raise ValueError(f"outcomes {tuple(y.shape)} and length differences {tuple(d.shape)} differ in shape")
    n = y.numel()
    if n == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0, "length_coefficient": float("nan")}
    scale = d.std() if n > 1 and d.std() > 0 else torch.tensor(1.0, dtype=torch.float64)
    x = torch.stack([torch.ones_like(d), torch.tanh(d / scale)], dim=1)  # (N, 2)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.cat([torch.arange(n)[None], torch.randint(n, (num_resamples, n), generator=generator)])  # (1 + R, N)
    weights = _fit_logistic(x[rows], y[rows], ridge)  # (1 + R, 2)
    rates = torch.sigmoid(weights[:, 0])
    tail = (1.0 - confidence) / 2
    low, high = torch.quantile(rates[1:], torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return {"mean": rates[0].item(), "low": low, "high": high, "n": n, "length_coefficient": weights[0, 1].item()}


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, ridge: float, iterations: int = 50) -> torch.Tensor:
    """Ridge logistic regressions with soft targets, one per leading index, by Newton's method: ``x`` ``(R, N, P)``,
    ``y`` ``(R, N)`` in [0, 1] -> weights ``(R, P)``."""
    weights = x.new_zeros(x.size(0), x.size(2))
    eye = torch.eye(x.size(2), dtype=x.dtype)
    for _ in range(iterations):
        p = torch.sigmoid(torch.einsum("rnp,rp->rn", x, weights))
        gradient = torch.einsum("rnp,rn->rp", x, p - y) + ridge * weights
        hessian = torch.einsum("rnp,rn,rnq->rpq", x, p * (1 - p), x) + ridge * eye
        step = torch.linalg.solve(hessian, gradient.unsqueeze(-1)).squeeze(-1)
        weights = weights - step
        if step.abs().max() < 1e-10:
            break
    return weights
