"""torchmetrics metrics used by the stages."""

from __future__ import annotations

import torch
from torchmetrics import Metric

from lit_rlhf.evaluation.stats import mean_with_interval


class GroupedAccuracy(Metric):
    """Accuracy overall and per integer group (e.g. comparison ``batch`` or labeller confidence, recipe R6).

    States are concatenated across ranks by torchmetrics, so every rank computes the global figures.

    ``update(correct, groups)``: ``correct`` ``(B,)`` bool, ``groups`` ``(B,)`` long.
    ``compute()``: ``{"all": accuracy, "all_low": ..., "all_high": ... (bootstrap 95% interval of the overall
    accuracy, :func:`~lit_rlhf.evaluation.stats.mean_with_interval`), group_id: accuracy, ...}`` as 0-d tensors.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
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
            result[group] = correct[groups == group].mean()
        return result


def preference_accuracy(by_batch: GroupedAccuracy, by_confidence: GroupedAccuracy, batch_names: list[str], prefix: str = "val/") -> dict:
    """Accuracy overall / per comparison ``batch`` / per labeller confidence as flat metric names (recipe R6).

    Used by the reward model (explicit reward) and DPO (implicit reward) alike. Resets both metrics.

    Returns:
        ``{prefix}accuracy`` with its bootstrap 95% interval ``{prefix}accuracy_low`` / ``_high``,
        ``{prefix}accuracy_batch/{name}`` and ``{prefix}accuracy_confidence/{value}`` (0-d tensors).
    """
    per_batch, per_confidence = by_batch.compute(), by_confidence.compute()
    metrics = {f"{prefix}accuracy": per_batch.pop("all")}
    metrics.update({f"{prefix}accuracy_{end}": per_batch.pop(f"all_{end}") for end in ("low", "high")})
    for key in ("all", "all_low", "all_high"):
        per_confidence.pop(key)
    for group, value in per_batch.items():
        metrics[f"{prefix}accuracy_batch/{batch_names[group] if group < len(batch_names) else group}"] = value
    metrics.update({f"{prefix}accuracy_confidence/{group}": value for group, value in per_confidence.items()})
    by_batch.reset()
    by_confidence.reset()
    return metrics
