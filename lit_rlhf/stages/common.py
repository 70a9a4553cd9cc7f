"""What the stage modules share: optimiser and schedule, sample decoding, freezing."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Optional

import lightning as L
import torch
from torch import nn

from lit_rlhf.algorithms import truncate_after_eos
from lit_rlhf.models.loading import load_causal_lm


def adamw_with_schedule(
    parameters: Iterable[nn.Parameter], lr: float, eps: float, weight_decay: float, total_steps: int, schedule: str
) -> dict[str, Any]:
    """AdamW and a per-step schedule without warm-up, as Lightning's ``configure_optimizers`` returns them.

    Args:
        schedule: ``"cosine"`` (SFT, RM, DPO: cosine to 0), ``"linear"`` (PPO, recipe P8: linear to 0) or
            ``"constant"``.
        total_steps: optimiser steps over the run.

    Raises:
        ValueError: for an unknown schedule.
    """
    params = [p for p in parameters if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=weight_decay)
    total = max(1, int(total_steps))
    if schedule == "cosine":
        factor = lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
    elif schedule == "linear":
        factor = lambda step: max(0.0, 1.0 - step / total)  # noqa: E731
    elif schedule == "constant":
        factor = lambda step: 1.0  # noqa: E731
    else:
        raise ValueError(f"unknown schedule '{schedule}' (cosine, linear, constant)")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def decode_responses(tokenizer: Any, responses: torch.Tensor) -> list[str]:
    """Text of each response up to and excluding its first EOS (``(B, T)`` ids -> B strings)."""
    truncated = truncate_after_eos(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return [text.strip() for text in tokenizer.batch_decode(truncated, skip_special_tokens=True)]


def decode_query(tokenizer: Any, query_ids: torch.Tensor, max_chars: int = 300) -> str:
    """Readable tail of a left-padded query for sample tables (the post's end and ``TL;DR:``)."""
    text = tokenizer.decode(query_ids, skip_special_tokens=True)
    return text if len(text) <= max_chars else "…" + text[-max_chars:]


def freeze_bottom_layers(model: nn.Module, trainable_layers: Optional[int]) -> nn.Module:
    """Train only the top ``trainable_layers`` transformer blocks (plus final norm and any head).

    Embeddings (and a tied LM head) and the lower blocks get ``requires_grad=False``; the backward pass then
    stops at the lowest trainable block, which is what makes CPU runs affordable. ``None`` trains everything.

    A model with at most ``trainable_layers`` blocks is trained whole.

    Raises:
        ValueError: if the model's blocks cannot be found or ``trainable_layers`` is negative.
    """
    if trainable_layers is None:
        return model
    base = getattr(model, "backbone", None) or model.get_decoder()  # ScalarModel or a causal LM
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    if layers is None:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__} to freeze")
    if trainable_layers < 0:
        raise ValueError(f"trainable_layers must be >= 0, got {trainable_layers}")
    if trainable_layers >= len(layers):  # the model is no deeper than asked: train all of it
        return model
    embeddings = model.get_input_embeddings()
    for module in [embeddings, *layers[: len(layers) - trainable_layers]]:
        for param in module.parameters():
            param.requires_grad_(False)
    return model


def frozen(model: nn.Module) -> nn.Module:
    """``model`` with no trainable parameter, in eval mode (reference policies, reward models)."""
    return model.requires_grad_(False).eval()


def load_policy_and_reference(
    policy: str, trainable_layers: Optional[int], reference: Optional[str] = None
) -> tuple[nn.Module, nn.Module]:
    """The policy (top ``trainable_layers`` blocks trainable) and the frozen reference policy, both loaded from
    ``policy`` unless ``reference`` names another checkpoint (recipe P1; DPO)."""
    return freeze_bottom_layers(load_causal_lm(policy), trainable_layers), frozen(load_causal_lm(reference or policy))


class StageModule(L.LightningModule):
    """Base of the stage modules.

    Subclasses set ``self.tokenizer`` and the model that :meth:`exported_model` returns, and have hyperparameters
    ``lr``, ``eps`` and ``weight_decay``. ``test`` runs the validation logic on the datamodule's test split.
    """

    #: learning-rate schedule over the run (see :func:`adamw_with_schedule`)
    schedule = "cosine"
    #: frozen submodules loaded from disk by ``configure_model`` and left out of Lightning checkpoints
    frozen_submodules: tuple[str, ...] = ()

    def share_frozen_trunks(self) -> None:
        """Set up :class:`~lit_rlhf.models.trunk.FrozenTrunk` sharing between this stage's models (none here).

        Called at the start of fit, validation and test, after any checkpoint has been loaded.
        """

    def on_fit_start(self) -> None:
        self.share_frozen_trunks()

    def on_validation_start(self) -> None:
        self.share_frozen_trunks()

    def on_test_start(self) -> None:
        self.share_frozen_trunks()

    def row_chunks(self, size: int) -> list[slice]:
        """Slices of ``size`` rows in chunks of ``hparams.rollout_batch_size`` (``None`` = one chunk)."""
        step = self.hparams.get("rollout_batch_size") or size
        return [slice(i, i + step) for i in range(0, size, step)]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop :attr:`frozen_submodules` from the checkpoint's state dict (they are on disk already)."""
        prefixes = tuple(f"{name}." for name in self.frozen_submodules)
        if prefixes:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(prefixes)}

    def exported_model(self) -> nn.Module:
        """The model :meth:`save_hf` writes."""
        raise NotImplementedError

    def save_hf(self, directory: Path) -> None:
        """Write :meth:`exported_model` and the tokenizer in Hugging Face format to ``directory``."""
        self.exported_model().save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over every trainable parameter (frozen models and blocks are left out), schedule per step."""
        hp = self.hparams
        total_steps = self.trainer.estimated_stepping_batches
        return adamw_with_schedule(self.parameters(), hp.lr, hp.eps, hp.weight_decay, total_steps, self.schedule)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()
