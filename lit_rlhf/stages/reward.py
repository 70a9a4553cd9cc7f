"""Reward-model training on human comparisons (recipe R1-R7)."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from lit_rlhf.algorithms import pairwise_reward_loss
from lit_rlhf.arguments import check_arguments
from lit_rlhf.metrics import GroupedAccuracy, preference_accuracy
from lit_rlhf.models.forward import sequence_scores, shared_prefix_scores
from lit_rlhf.models.loading import load_tokenizer
from lit_rlhf.models.lora import LoRA, add_lora
from lit_rlhf.models.parallel import is_sharded
from lit_rlhf.models.scalar import ScalarModel
from lit_rlhf.models.trunk import FrozenTrunk
from lit_rlhf.stages.common import (
    StageModule,
    freeze_bottom_layers,
    group_names,
    lora_hparam,
    lora_settings,
    update_source_accuracy,
)

log = logging.getLogger(__name__)


def right_to_left_padding(ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Move each row's right padding to the left: ``(B, L) -> (B, L)`` (for the padding check, recipe R7)."""
    lengths = (ids != pad_token_id).sum(1)
    shifted = torch.full_like(ids, pad_token_id)
    for row, length in enumerate(lengths.tolist()):
        shifted[row, ids.size(1) - length :] = ids[row, :length]
    return shifted


class RewardModule(StageModule):
    """Scalar reward model trained with ``-logsigmoid(r_chosen - r_rejected)`` (recipe R4).

    Validation logs the loss, accuracy overall / per comparison ``batch`` / per labeller confidence (R6),
    the mean chosen and rejected scores, and the left/right padding check (R7). After training the mean
    score of (query, reference summary) on SFT training rows becomes the model's bias (R5).

    Args:
        model: the SFT checkpoint whose transformer becomes the backbone (recipe R1).
        lr: AdamW learning rate (recipe R4: 3e-6), cosine to 0.
        eps: AdamW epsilon (1e-5).
        weight_decay: AdamW weight decay (0.01, PyTorch's default, as in every N+ stage).
        warmup_ratio: fraction of the optimiser steps that warm the learning rate up linearly before its cosine decay
            (N+: 0; RLHFlow's reward model and DPO: 0.03, recipe W1, W6).
        normalize: compute the R5 bias after training.
        padding_rtol: tolerance of the R7 padding check (1e-2); a larger difference is logged as a warning.
        trainable_layers: train only the top N blocks plus the head (``None`` = all).
        lora: train LoRA adapters (peft) on the frozen backbone instead of all weights, the scalar head whole
            (``None`` = off); exclusive with ``trainable_layers``. The export is always merged (the R5 bias lives in the
            model's config).
        trunk_cache: with ``trainable_layers``, run the frozen lower blocks once per comparison and keep their output
            (:class:`~lit_rlhf.models.trunk.FrozenTrunk` with a :class:`~lit_rlhf.models.trunk.RowCache`), so that every
            epoch after the first, and every validation after the first, runs the top blocks only.
    """

    stage_name = "rm"

    def __init__(
        self,
        model: str = "smollm2-135m",
        lr: float = 3e-6,
        eps: float = 1e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.0,
        normalize: bool = True,
        padding_rtol: float = 1e-2,
        trainable_layers: Optional[int] = None,
        lora: Optional[LoRA] = None,
        trunk_cache: bool = True,
    ) -> None:
        super().__init__()
        check_arguments(
            type(self).__name__, locals(),
            positive=("lr", "eps", "padding_rtol"),
            non_negative=("weight_decay", "trainable_layers"),
            fraction=("warmup_ratio",),
        )
        self.lora = lora_settings(type(self).__name__, lora, trainable_layers)
        self.save_hyperparameters()
        self.hparams.lora = lora_hparam(self.lora)
        self.strict_loading = self.lora is None  # LoRA checkpoints leave out the frozen base weights
        self.by_batch = GroupedAccuracy()
        self.by_confidence = GroupedAccuracy()
        self.by_source, self.longer_by_source = GroupedAccuracy(group_intervals=True), GroupedAccuracy()
        self.chosen_mean, self.rejected_mean = MeanMetric(), MeanMetric()
        self.reward_model: Any = None
        self.tokenizer: Any = None
        self.trunk = FrozenTrunk()

    def load_models(self) -> None:
        self.tokenizer = load_tokenizer(self.hparams.model)
        model = ScalarModel.from_backbone(self.hparams.model)
        if self.lora:
            self.reward_model = add_lora(model, self.lora, head="scalar_head")
        else:
            self.reward_model = freeze_bottom_layers(model, self.hparams.trainable_layers)

    def share_frozen_trunks(self) -> None:
        self.trunk = FrozenTrunk.shared_by(self.reward_model, cache=self.hparams.trunk_cache)

    def scores(self, ids: torch.Tensor, cached: bool = True) -> torch.Tensor:
        """Scores ``(B,)`` of padded sequences ``(B, L)``, the frozen lower blocks through :attr:`trunk` (``cached=False``:
        the padded batch in one forward, kept nowhere, for sequences seen once)."""
        pad = self.tokenizer.pad_token_id
        return sequence_scores(self.trunk.top(self.reward_model), ids, pad, self.trunk(ids, pad, cached=cached))

    def pair_scores(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``(B,)`` of the chosen and rejected sequences.

        With the batch's ``query_ids`` each pair's query runs once, through the trunk and through the trained blocks
        (:func:`~lit_rlhf.models.forward.shared_prefix_scores`); without them, or for a sharded model (FSDP2, ZeRO-3:
        its parameters are gathered by its own forward, which that function bypasses), both sequences run whole.
        """
        chosen, rejected, pad = batch["chosen_ids"], batch["rejected_ids"], self.tokenizer.pad_token_id
        width = max(chosen.size(1), rejected.size(1))
        ids = torch.cat([F.pad(chosen, (0, width - chosen.size(1)), value=pad), F.pad(rejected, (0, width - rejected.size(1)), value=pad)])
        if "query_ids" in batch and not is_sharded(self.reward_model):
            queries = (batch["query_ids"] != pad).sum(1)  # (B,)
            hidden = self.trunk(ids, pad, prefix_lengths=queries)  # (2B, L, H) or None: each pair runs as one group
            scores = shared_prefix_scores(self.trunk.top(self.reward_model), ids, queries, pad, hidden)  # (2B,)
        else:
            scores = self.scores(ids)
        return scores[: chosen.size(0)], scores[chosen.size(0) :]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        chosen, rejected = self.pair_scores(batch)
        loss = pairwise_reward_loss(chosen, rejected)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/accuracy", (chosen > rejected).float().mean(), prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        chosen, rejected = self.pair_scores(batch)
        correct = chosen > rejected
        self.log("val/loss", pairwise_reward_loss(chosen, rejected), sync_dist=True, batch_size=chosen.size(0))
        self.by_batch.update(correct, batch["batch"])
        self.by_confidence.update(correct, batch["confidence"])
        update_source_accuracy(self, batch, correct)
        self.chosen_mean.update(chosen)
        self.rejected_mean.update(rejected)
        if batch_idx == 0:
            self.padding_check(batch["chosen_ids"])

    def padding_check(self, right_padded: torch.Tensor, rows: int = 4) -> float:
        """Recipe R7: scores of the same sequences right- vs left-padded; logs and returns the max relative gap.

        Checks the first ``rows`` sequences of ``right_padded`` ``(B, L)`` with autocast off, in the weights' own
        precision: under bf16 autocast the two paddings round differently (measured on the quickstart RM: up to 0.05
        apart for scores of spread 0.5, a relative gap of 0.4 on a score near 0, against exactly 0 in float32), which
        would hide what the check is for, a mask or position error.
        """
        pad = self.tokenizer.pad_token_id
        ids = right_padded[:rows]
        with torch.autocast(self.device.type, enabled=False):
            right = sequence_scores(self.reward_model, ids, pad)
            left = sequence_scores(self.reward_model, right_to_left_padding(ids, pad), pad)
        gap = ((right - left).abs() / right.abs().clamp(min=1e-6)).max()
        self.log("val/padding_rel_diff", gap, sync_dist=True, reduce_fx="max")
        if not torch.allclose(right, left, rtol=self.hparams.padding_rtol, atol=1e-3):
            log.warning("reward differs between left and right padding by up to %.3g (rtol %.0e)", gap.item(), self.hparams.padding_rtol)
        return gap.item()

    def on_validation_epoch_end(self) -> None:
        metrics = preference_accuracy(self.by_batch, self.by_confidence, **group_names(self), by_source=self.by_source,
                                      longer_by_source=self.longer_by_source)
        metrics["val/chosen_score"] = self.chosen_mean.compute()
        metrics["val/rejected_score"] = self.rejected_mean.compute()
        self.log_dict(metrics)
        self.chosen_mean.reset()
        self.rejected_mean.reset()

    def on_train_end(self) -> None:
        if self.hparams.normalize:
            self.normalize()

    @torch.no_grad()
    def normalize(self) -> float:
        """Recipe R5: set the bias so (query, reference summary) pairs score 0 on average.

        Uses the datamodule's ``normalization_dataloader()``; sums are reduced across ranks.

        Returns:
            the new bias (reward units).
        """
        self.reward_model.eval()
        total = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        for batch in self.trainer.datamodule.normalization_dataloader():
            scores = self.scores(batch["input_ids"].to(self.device), cached=False)  # each reference summary once
            total += scores.sum()
            count += scores.numel()
        total = self.trainer.strategy.reduce(total, reduce_op="sum")
        count = self.trainer.strategy.reduce(count, reduce_op="sum")
        self.reward_model.config.bias = float(self.reward_model.config.bias + total / count)
        log.info("reward normalisation (R5): bias %.4f over %d reference summaries", self.reward_model.config.bias, int(count))
        return self.reward_model.config.bias

    def exported_model(self) -> torch.nn.Module:
        """The reward model, its R5 bias in the config."""
        return self.reward_model
