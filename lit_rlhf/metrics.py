"""Metrics the stages and the evaluation share: per-item outcomes of pairwise comparisons, their mean with a
bootstrap interval, and the torchmetrics metrics of the preference stages (reward model, DPO).

Outcomes are per item: ``1.0`` a win (or a correct preference), ``0.0`` a loss, ``0.5`` a tie (N+ counts ties as
half a win). Intervals are percentile bootstraps over items (``torchmetrics.wrappers.BootStrapper``, multinomial
resampling), seeded so that a re-run prints the same interval.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torchmetrics import MeanMetric, Metric
from torchmetrics.wrappers import BootStrapper

from lit_rlhf.sampling import seeded


def pairwise_outcomes(scores: torch.Tensor, other_scores: torch.Tensor) -> torch.Tensor:
    """Per-item outcome of ``scores`` against ``other_scores`` (both ``(N,)``): 1.0 higher, 0.0 lower, 0.5 equal, NaN
    where either is NaN (an item without a reference answer)."""
    outcomes = (scores > other_scores).float() + 0.5 * (scores == other_scores).float()
    return outcomes.masked_fill(scores.isnan() | other_scores.isnan(), float("nan"))

def mean_with_interval(
    values: Sequence[float] | torch.Tensor, confidence: float = 0.95, num_resamples: int = 1000, seed: int = 0
) -> dict[str, float]:
    """Mean of per-item ``values`` with a percentile bootstrap interval.

    Args:
        values: ``(N,)`` per-item outcomes (win 1, tie 0.5, loss 0; or correct 1 / wrong 0).
        confidence: the interval's coverage (0.95: the 2.5 and 97.5 percentiles of the resampled means).
        num_resamples: bootstrap resamples of the N items.
        seed: the resampling seed (the global RNG is left as it was).

    Returns:
        ``{"mean", "low", "high", "n"}``; with no items the three figures are NaN and ``n`` is 0.

    Raises:
        ValueError: if ``confidence`` is not in (0, 1).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if values.numel() == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    tail = (1.0 - confidence) / 2
    with seeded(seed):
        bootstrap = BootStrapper(
            MeanMetric(), num_bootstraps=num_resamples, quantile=torch.tensor([tail, 1.0 - tail]),
            sampling_strategy="multinomial",
        )
        bootstrap.update(values.float())
        low, high = bootstrap.compute()["quantile"].tolist()
    return {"mean": values.mean().item(), "low": low, "high": high, "n": values.numel()}



class GroupedAccuracy(Metric):
    """Accuracy overall and per integer group (e.g. comparison ``batch`` or labeller confidence, recipe R6).

    States are concatenated across ranks by torchmetrics, so every rank computes the global figures.

    ``update(correct, groups)``: ``correct`` ``(B,)`` bool (or floats: 0.5 for a tie), ``groups`` ``(B,)`` long.
    ``compute()``: ``{"all": accuracy, "all_low": ..., "all_high": ... (bootstrap 95% interval of the overall
    accuracy, :func:`mean_with_interval`), group_id: accuracy, ...}`` as 0-d tensors; with
    ``group_intervals`` also ``(group_id, "low")`` and ``(group_id, "high")``.
    """

    full_state_update = False

    def __init__(self, group_intervals: bool = False) -> None:
        super().__init__()
        self.group_intervals = group_intervals
        self.add_state("correct", default=[], dist_reduce_fx="cat")
        self.add_state("groups", default=[], dist_reduce_fx="cat")

    def update(self, correct: torch.Tensor, groups: torch.Tensor) -> None:
        self.correct.append(correct.detach().float().flatten())
        self.groups.append(groups.detach().long().flatten())

    def compute(self) -> dict:
        correct = torch.cat(self.correct) if isinstance(self.correct, list) else self.correct
        groups = torch.cat(self.groups) if isinstance(self.groups, list) else self.groups
        interval = mean_with_interval(correct.cpu())
        result = {"all": correct.mean(), "all_low": torch.tensor(interval["low"]), "all_high": torch.tensor(interval["high"])}
        for group in torch.unique(groups).tolist():
            values = correct[groups == group]
            result[group] = values.mean()
            if self.group_intervals:
                interval = mean_with_interval(values.cpu())
                result[(group, "low")], result[(group, "high")] = torch.tensor(interval["low"]), torch.tensor(interval["high"])
        return result


def preference_accuracy(
    by_batch: GroupedAccuracy, by_confidence: GroupedAccuracy, batch_names: list[str], prefix: str = "val/",
    by_source: Optional[GroupedAccuracy] = None, longer_by_source: Optional[GroupedAccuracy] = None, source_names: Sequence[str] = (),
) -> dict:
    """Accuracy overall / per comparison ``batch`` / per labeller confidence as flat metric names (recipe R6), and
    per source of a mixture with the "longer answer wins" baseline beside it.

    Used by the reward model (explicit reward) and DPO (implicit reward) alike. Resets the metrics it reads.

    Args:
        by_source: accuracy per source index (into ``source_names``; built with ``group_intervals``), or ``None``.
        longer_by_source: per source, whether the chosen response is the longer one (1, equal lengths 0.5), or ``None``.

    Returns:
        ``{prefix}accuracy`` with its bootstrap 95% interval ``{prefix}accuracy_low`` / ``_high``,
        ``{prefix}accuracy_batch/{name}`` and ``{prefix}accuracy_confidence/{value}``; with ``by_source``
        ``{prefix}accuracy_source/{name}`` (and ``_low`` / ``_high``); with ``longer_by_source``
        ``{prefix}longer_wins`` (overall, with ``_low`` / ``_high``) and ``{prefix}longer_wins_source/{name}`` (0-d
        tensors).
    """
    metrics = {}
    name = lambda group: source_names[group] if group < len(source_names) else str(group)  # noqa: E731
    for metric, key in ((by_source, "accuracy_source"), (longer_by_source, "longer_wins")):
        if metric is None or not metric.update_count:
            continue
        figures = metric.compute()
        if key == "longer_wins":
            metrics.update({f"{prefix}longer_wins{end}": figures[f"all{end}"] for end in ("", "_low", "_high")})
            key = "longer_wins_source"
        for group, value in figures.items():
            if isinstance(group, int):
                metrics[f"{prefix}{key}/{name(group)}"] = value
            elif isinstance(group, tuple):  # (group, "low" / "high")
                metrics[f"{prefix}{key}/{name(group[0])}_{group[1]}"] = value
        metric.reset()
    per_batch, per_confidence = by_batch.compute(), by_confidence.compute()
    metrics[f"{prefix}accuracy"] = per_batch.pop("all")
    metrics.update({f"{prefix}accuracy_{end}": per_batch.pop(f"all_{end}") for end in ("low", "high")})
    for key in ("all", "all_low", "all_high"):
        per_confidence.pop(key)
    for group, value in per_batch.items():
        metrics[f"{prefix}accuracy_batch/{batch_names[group] if group < len(batch_names) else group}"] = value
    metrics.update({f"{prefix}accuracy_confidence/{group}": value for group, value in per_confidence.items()})
    by_batch.reset()
    by_confidence.reset()
    return metrics
