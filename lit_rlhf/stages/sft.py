"""Supervised fine-tuning on query + reference summary (recipe §1 SFT)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torchmetrics.text.rouge import ROUGEScore

from lit_rlhf.algorithms import LOSS_NORMALIZATIONS, sequence_cross_entropy
from lit_rlhf.arguments import check_arguments
from lit_rlhf.models.forward import generate, model_inputs
from lit_rlhf.models.loading import load_causal_lm, load_tokenizer, stop_token_ids
from lit_rlhf.models.lora import LoRA, add_lora
from lit_rlhf.sampling import decode_query, decode_responses
from lit_rlhf.stages.common import StageModule, freeze_bottom_layers, lora_hparam, lora_settings


class SFTModule(StageModule):
    """Next-token cross-entropy over query + reference (pads masked); validation loss, ROUGE and samples.

    Args:
        model: base causal LM: hub name, local Hugging Face directory or ``smollm2-135m`` (packaged default).
        lr: AdamW learning rate (recipe: 3e-6), cosine to 0 (after ``warmup_ratio``).
        eps: AdamW epsilon (recipe: 1e-5).
        weight_decay: AdamW weight decay (0.01, PyTorch's default, as N+).
        warmup_ratio: fraction of the optimiser steps that warm the learning rate up linearly before its cosine decay
            (N+: 0; RLHFlow's reward model and DPO: 0.03, recipe W1, W6).
        response_length: new tokens sampled for ROUGE (recipe: 53).
        temperature: sampling temperature for ROUGE samples (recipe: 0.01, near-greedy).
        rouge_batches: validation batches that also sample for ROUGE (``None`` = all, 0 = none).
        num_samples: rows kept for the sample table.
        trainable_layers: train only the top N transformer blocks (``None`` = all; a CPU speed knob).
        lora: train LoRA adapters (peft) on the frozen model instead of all weights (``None`` = off); exclusive
            with ``trainable_layers``. The export merges them (``lora.merge_on_export``).
        response_only_loss: average the loss over reference-summary tokens (EOS included) only. Off by default:
            the recipe trains on the whole sequence. Small runs learn the "summary + EOS" format much faster
            with it, since the query is ~85% of the tokens.
        loss_normalization: ``"sequence"`` (N+): the mean over each row's tokens, then over rows, so long and short
            rows weigh the same (N+ trains micro-batches of one row with 16 accumulation steps); ``"token"``: the
            mean over every token of the batch, so long rows weigh more
            (:func:`~lit_rlhf.algorithms.sequence_cross_entropy`).
    """

    stage_name = "sft"

    def __init__(
        self,
        model: str = "smollm2-135m",
        lr: float = 3e-6,
        eps: float = 1e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.0,
        response_length: int = 53,
        temperature: float = 0.01,
        rouge_batches: Optional[int] = None,
        num_samples: int = 8,
        trainable_layers: Optional[int] = None,
        response_only_loss: bool = False,
        loss_normalization: str = "sequence",
        lora: Optional[LoRA] = None,
    ) -> None:
        super().__init__()
        check_arguments(
            type(self).__name__, locals(),
            positive=("lr", "eps", "response_length", "temperature"),
            non_negative=("weight_decay", "rouge_batches", "num_samples", "trainable_layers"),
            fraction=("warmup_ratio",),
        )
        if loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(f"loss_normalization must be one of {LOSS_NORMALIZATIONS}, got '{loss_normalization}'")
        self.lora = lora_settings(type(self).__name__, lora, trainable_layers)
        self.save_hyperparameters()
        self.hparams.lora = lora_hparam(self.lora)
        self.strict_loading = self.lora is None  # LoRA checkpoints leave out the frozen base weights
        self.rouge = ROUGEScore(rouge_keys=("rouge1", "rouge2", "rougeL"))
        self.validation_samples: list[dict[str, Any]] = []
        self.policy: Any = None
        self.tokenizer: Any = None

    def load_models(self) -> None:
        self.tokenizer = load_tokenizer(self.hparams.model)
        model = load_causal_lm(self.hparams.model)
        self.policy = add_lora(model, self.lora) if self.lora else freeze_bottom_layers(model, self.hparams.trainable_layers)

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Next-token cross-entropy over the batch's ``loss_mask`` (the whole TL;DR sequence, a completion, every
        assistant turn of a conversation; without one, every real token), and with ``response_only_loss`` over the
        tokens after the query only, weighted per ``loss_normalization``."""
        pad = self.tokenizer.pad_token_id
        inputs = model_inputs(batch["input_ids"], pad)
        logits = self.policy(**inputs).logits  # (B, L, V)
        target_mask = inputs["attention_mask"].bool()  # (B, L)
        if "loss_mask" in batch:
            target_mask = target_mask & batch["loss_mask"].bool()
        if self.hparams.response_only_loss:
            query_lengths = (batch["query_ids"] != pad).sum(1, keepdim=True)  # (B, 1)
            positions = torch.arange(target_mask.size(1), device=target_mask.device).unsqueeze(0)
            target_mask = target_mask & (positions >= query_lengths)
        return sequence_cross_entropy(logits, inputs["input_ids"], target_mask, self.hparams.loss_normalization)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.validation_samples = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("val/loss", self.loss(batch), prog_bar=True, sync_dist=True, batch_size=len(batch["reference"]))
        if self.hparams.rouge_batches is not None and batch_idx >= self.hparams.rouge_batches:
            return
        rows = [row for row, reference in enumerate(batch["reference"]) if reference]  # plain-text rows have none
        if not rows:
            return
        queries = batch["query_ids"][rows]  # (b, Q)
        responses = generate(
            self.policy, queries, self.tokenizer.pad_token_id, stop_token_ids(self.tokenizer),
            self.hparams.response_length, self.hparams.temperature,
        )  # (b, T)
        texts = decode_responses(self.tokenizer, responses)
        references = [batch["reference"][row] for row in rows]
        self.rouge.update(texts, references)
        for query, text, reference in zip(queries, texts, references):
            if len(self.validation_samples) < self.hparams.num_samples:
                self.validation_samples.append(
                    {"query": decode_query(self.tokenizer, query), "response": text, "reference": reference}
                )

    def on_validation_epoch_end(self) -> None:
        if self.rouge.update_count:
            self.log_dict({f"val/{key}": value for key, value in self.rouge.compute().items() if key.endswith("fmeasure")})
            self.rouge.reset()

    def exported_model(self) -> torch.nn.Module:
        return self.policy
