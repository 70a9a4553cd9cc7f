"""Offline DPO on the human comparisons (recipe §1 "DPO baseline"; Rafailov et al. 2023)."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from lit_rlhf.algorithms import dpo_loss
from lit_rlhf.arguments import check_arguments
from lit_rlhf.metrics import GroupedAccuracy, preference_accuracy
from lit_rlhf.models.forward import response_logprob_sums
from lit_rlhf.models.loading import load_tokenizer
from lit_rlhf.models.lora import LoRA
from lit_rlhf.models.parallel import is_sharded
from lit_rlhf.models.trunk import FrozenTrunk, RowCache, row_keys
from lit_rlhf.stages.common import (
    StageModule,
    group_names,
    load_policy_and_reference,
    lora_hparam,
    lora_settings,
    update_source_accuracy,
)


def stack_pair(query_ids: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """``(2B, Q + T)`` sequences: each left-padded query followed by its chosen, then by its rejected response.

    Args:
        query_ids: ``(B, Q)`` left-padded queries.
        chosen, rejected: ``(B, T1)`` / ``(B, T2)`` right-padded responses; both are padded to ``T = max(T1, T2)``.
    """
    width = max(chosen.size(1), rejected.size(1))
    responses = torch.cat([F.pad(chosen, (0, width - chosen.size(1)), value=pad_token_id),
                           F.pad(rejected, (0, width - rejected.size(1)), value=pad_token_id)])
    return torch.cat([query_ids.repeat(2, 1), responses], dim=1)


class DPOModule(StageModule):
    """Direct preference optimisation of the SFT policy against a frozen copy of it (recipe §1 DPO baseline).

    Each step computes the summed response logprobs of chosen and rejected summaries under the policy (with
    gradient) and under the reference policy (no gradient), then the loss of :func:`~lit_rlhf.algorithms.dpo_loss`.
    The reference logprob of a sequence is computed once (the batch's sequences not cached yet in one forward; keyed
    with the other sequence of its comparison, whose trunk pass it shares), and kept for later epochs and validations
    (``reference_cache``, a :class:`~lit_rlhf.models.trunk.RowCache`). With ``trainable_layers`` the
    frozen lower blocks the two models share run once per comparison and are kept too (``trunk_cache``; see
    :class:`~lit_rlhf.models.trunk.FrozenTrunk`), so a later epoch runs the policy's top blocks only.

    Validation reports the implicit reward ``beta * (logp_policy - logp_ref)`` accuracy overall / per comparison
    ``batch`` / per labeller confidence, exactly as the reward model is evaluated (recipe R6), the mean chosen
    and rejected implicit rewards and their margin.

    Args:
        model: the SFT checkpoint; initialises the policy and the frozen reference policy.
        beta: DPO beta (N+ baseline 0.05).
        label_smoothing: conservative-DPO label noise ``eps`` (0 = DPO).
        loss_type: ``"sigmoid"`` (DPO) or ``"ipo"``.
        lr: AdamW learning rate (N+ baseline 3e-6), cosine to 0.
        eps: AdamW epsilon (1e-5).
        weight_decay: AdamW weight decay (0.01, PyTorch's default, as in every N+ stage).
        warmup_ratio: fraction of the optimiser steps that warm the learning rate up linearly before its cosine decay
            (N+: 0; RLHFlow's reward model and DPO: 0.03, recipe W1, W6).
        trainable_layers: train only the top N blocks of the policy (``None`` = all).
        lora: train LoRA adapters (peft) on the frozen SFT model instead of all weights (``None`` = off); exclusive
            with ``trainable_layers``. The export merges them (``lora.merge_on_export``).
            The reference policy is then the policy with its adapters disabled (no second copy).
        trunk_cache: keep the shared frozen blocks' output per comparison (with ``trainable_layers``).
        reference_cache: keep the reference logprob per sequence (off for sharded models: FSDP2, ZeRO-3).
    """

    stage_name = "dpo"

    frozen_submodules = ("ref_policy",)

    def __init__(
        self,
        model: str = "runs/sft/model",
        beta: float = 0.05,
        label_smoothing: float = 0.0,
        loss_type: str = "sigmoid",
        lr: float = 3e-6,
        eps: float = 1e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.0,
        trainable_layers: Optional[int] = None,
        lora: Optional[LoRA] = None,
        trunk_cache: bool = True,
        reference_cache: bool = True,
    ) -> None:
        super().__init__()
        check_arguments(
            type(self).__name__, locals(),
            positive=("lr", "eps", "beta"),
            non_negative=("weight_decay", "trainable_layers"),
            fraction=("label_smoothing", "warmup_ratio"),
        )
        self.lora = lora_settings(type(self).__name__, lora, trainable_layers)
        self.save_hyperparameters()
        self.hparams.lora = lora_hparam(self.lora)
        dpo_loss(*torch.zeros(4, 1), beta=beta, label_smoothing=label_smoothing, loss_type=loss_type)  # validate early
        self.strict_loading = False  # checkpoints leave out the reference policy
        self.by_batch, self.by_confidence = GroupedAccuracy(), GroupedAccuracy()
        self.by_source, self.longer_by_source = GroupedAccuracy(group_intervals=True), GroupedAccuracy()
        self.chosen_reward, self.rejected_reward, self.val_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.policy: Any = None
        self.tokenizer: Any = None
        self.trunk = FrozenTrunk()
        self.reference_logprobs = RowCache() if reference_cache else None

    def load_models(self) -> None:
        self.tokenizer = load_tokenizer(self.hparams.model)
        self.policy, self.ref_policy = load_policy_and_reference(self.hparams.model, self.hparams.trainable_layers, lora=self.lora)

    def share_frozen_trunks(self) -> None:
        self.trunk = FrozenTrunk.shared_by(self.policy, self.ref_policy, cache=self.hparams.trunk_cache)
        if any(is_sharded(model) for model in (self.policy, self.ref_policy)):
            # a sharded forward is a collective: every rank must run the same ones, not its own cache misses
            self.reference_logprobs = None

    def pair_logprobs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Summed response logprobs ``(B,)``: ``policy_chosen``, ``policy_rejected``, ``ref_chosen``, ``ref_rejected``."""
        pad, query_ids = self.tokenizer.pad_token_id, batch["query_ids"]
        ids = stack_pair(query_ids, batch["chosen_response_ids"], batch["rejected_response_ids"], pad)  # (2B, Q+T)
        queries = (query_ids != pad).sum(1)  # (B,) each pair's query tokens, shared by rows i and B + i
        hidden = self.trunk(ids, pad, prefix_lengths=queries)  # (2B, Q+T, H), or None
        policy = response_logprob_sums(self.trunk.top(self.policy), ids, query_ids.size(1), pad, hidden)  # (2B,)
        with torch.no_grad():
            ref = self.ref_logprob_sums(ids, query_ids.size(1), hidden)
        size = query_ids.size(0)
        return {"policy_chosen": policy[:size], "policy_rejected": policy[size:], "ref_chosen": ref[:size], "ref_rejected": ref[size:]}

    @torch.no_grad()
    def ref_logprob_sums(self, ids: torch.Tensor, context_length: int, hidden: Optional[torch.Tensor]) -> torch.Tensor:
        """Summed reference logprobs ``(2B,)`` of the responses in ``ids`` ``(2B, Q + T)``, ``cat([chosen, rejected])``
        (``hidden``: trunk output, run pair by pair).

        With the reference cache the rows not cached yet run in one forward (the batch's rows, as they are padded): on a
        single epoch (the paper configs) no row is ever cached, and the cache costs nothing over the uncached forward.
        """
        pad, ref_policy = self.tokenizer.pad_token_id, self.trunk.top(self.ref_policy)
        if self.reference_logprobs is None:
            return response_logprob_sums(ref_policy, ids, context_length, pad, hidden)

        def missed(rows: list[int]) -> torch.Tensor:
            index = torch.tensor(rows, device=ids.device)
            sub_hidden = None if hidden is None else hidden[index]
            return response_logprob_sums(ref_policy, ids[index], context_length, pad, sub_hidden)  # (len(rows),)

        # a row's trunk output depends on its pair (they run as one group): the key holds both, the row's first
        keys = row_keys(ids, pad, split=context_length)
        keys = [key + b"#" + keys[(i + len(keys) // 2) % len(keys)] for i, key in enumerate(keys)]
        return torch.stack(self.reference_logprobs.get_batched(keys, lambda rows: list(missed(rows))))

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, chosen_rewards, rejected_rewards)`` of :func:`~lit_rlhf.algorithms.dpo_loss` on a batch."""
        hp, lp = self.hparams, self.pair_logprobs(batch)
        return dpo_loss(
            lp["policy_chosen"], lp["policy_rejected"], lp["ref_chosen"], lp["ref_rejected"], hp.beta, hp.label_smoothing, hp.loss_type
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, chosen, rejected = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/reward_accuracy", (chosen > rejected).float().mean(), prog_bar=True)
        self.log("train/reward_margin", (chosen - rejected).mean())
        return loss

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, chosen, rejected = self.loss(batch)
        self.val_loss.update(loss, weight=chosen.numel())
        self.by_batch.update(chosen > rejected, batch["batch"])
        self.by_confidence.update(chosen > rejected, batch["confidence"])
        update_source_accuracy(self, batch, chosen > rejected)
        self.chosen_reward.update(chosen)
        self.rejected_reward.update(rejected)

    def on_validation_epoch_end(self) -> None:
        metrics = preference_accuracy(self.by_batch, self.by_confidence, **group_names(self), by_source=self.by_source,
                                      longer_by_source=self.longer_by_source)
        chosen, rejected = self.chosen_reward.compute(), self.rejected_reward.compute()
        metrics.update({"val/loss": self.val_loss.compute(), "val/chosen_reward": chosen, "val/rejected_reward": rejected,
                        "val/reward_margin": chosen - rejected})
        self.log_dict(metrics)
        for metric in (self.chosen_reward, self.rejected_reward, self.val_loss):
            metric.reset()

    def exported_model(self) -> torch.nn.Module:
        return self.policy
