"""torchmetrics metrics used by the stages."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class GroupedAccuracy(Metric):
    """Accuracy overall and per integer group (e.g. comparison ``batch`` or labeller confidence, recipe R6).

    States are concatenated across ranks by torchmetrics, so every rank computes the global figures.

    ``update(correct, groups)``: ``correct`` ``(B,)`` bool, ``groups`` ``(B,)`` long.
    ``compute()``: ``{"all": accuracy, group_id: accuracy, ...}`` as 0-d tensors.
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
        result = {"all": correct.mean()}
        for group in torch.unique(groups).tolist():
            result[group] = correct[groups == group].mean()
        return result
