"""LoRA adapters through ``peft`` (Hu et al. 2021): settings, wrapping, the adapters-disabled base, exports.

In a LoRA run the frozen base weights are the starting checkpoint's, so the base model *is* the reference: PPO's
reference policy is the policy with its adapters disabled, and when the value model is a LoRA on the reward model,
the reward model is the value model with its adapters disabled (the scalar head is trained as a full copy beside
the original one, which the disabled view uses). Two full model copies disappear from memory.

Exports merge the adapters into a plain checkpoint (``AutoModelForCausalLM`` / :class:`ScalarModel` loads it, the
next stage needs nothing else) or save the adapters alone (``merge_on_export=False``), which
:func:`~lit_rlhf.models.loading.load_causal_lm` and :meth:`ScalarModel.load` also read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

#: where peft writes an adapter's settings
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoRA:
    """LoRA settings of one model (a stage's ``lora`` / ``value_lora`` argument).

    Args:
        r: adapter rank.
        alpha: scaling numerator (the update is ``alpha / r * B @ A``).
        dropout: dropout on the adapter input.
        target_modules: layer names to adapt, or ``"all-linear"`` (every linear layer but the output head).
        merge_on_export: the Hugging Face export merges the adapters into the weights (a plain checkpoint); ``False``
            saves a causal LM's adapters only (``adapter_config.json`` + ``adapter_model.safetensors``; scalar models
            are always merged).
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: Union[str, list[str]] = "all-linear"
    merge_on_export: bool = True

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA needs r >= 1, alpha > 0 and 0 <= dropout < 1, got {self}")


def add_lora(model: nn.Module, settings: LoRA, head: Optional[str] = None) -> nn.Module:
    """Wrap ``model`` in a peft model with trainable LoRA adapters; every base weight is frozen.

    Args:
        model: a causal LM (gets a ``PeftModelForCausalLM``) or a :class:`~lit_rlhf.models.scalar.ScalarModel`.
        head: a module trained whole next to the adapters (the scalar model's ``"scalar_head"``); peft keeps the
            original beside it, used when the adapters are disabled.
    """
    from peft import LoraConfig, get_peft_model

    kwargs: dict[str, Any] = {"modules_to_save": [head], "exclude_modules": [head]} if head else {"task_type": "CAUSAL_LM"}
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_modules, **kwargs)
    peft_model = get_peft_model(model, config)
    peft_model.merge_on_export = settings.merge_on_export
    return peft_model


def is_peft(model: Any) -> bool:
    """Whether ``model`` is a peft model (has adapters)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


class AdaptersDisabled:
    """A peft model's base model, called with the adapters disabled: the reference policy or reward model of a LoRA
    run without a second copy of the weights.

    It is not an ``nn.Module`` (the weights belong to the peft model), so it is neither trained, checkpointed nor
    sharded twice. Calls are forwarded under ``peft_model.disable_adapter()``.
    """

    def __init__(self, peft_model: nn.Module) -> None:
        self.peft_model = peft_model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        """The peft model's device."""
        return self.peft_model.device

    @property
    def config(self) -> Any:
        """The peft model's (base model's) config."""
        return self.peft_model.config

    def eval(self) -> "AdaptersDisabled":
        """A no-op: the view has no mode of its own (the peft model's is the policy's)."""
        return self

    def requires_grad_(self, requires_grad: bool = True) -> "AdaptersDisabled":
        """A no-op: freezing the reference view must not freeze the policy it shares its weights with."""
        return self


def merged_model(peft_model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A plain model (no peft wrapper) whose weights are ``state_dict``'s with the adapters merged in.

    The training model is left untouched: a new model of the same class is built without memory (meta device), takes
    the tensors of ``state_dict`` (the peft model's own, or its full state dict gathered from FSDP2 shards), and peft
    merges it.

    Raises:
        KeyError: naming the parameters ``state_dict`` lacks.
    """
    from peft import get_peft_model

    base = peft_model.get_base_model()
    with torch.device("meta"):
        fresh = type(base)(copy.deepcopy(base.config))
    fresh = get_peft_model(fresh, copy.deepcopy(peft_model.peft_config[peft_model.active_adapter]))
    result = fresh.load_state_dict(state_dict, strict=False, assign=True)
    if getattr(fresh.config, "tie_word_embeddings", False) and hasattr(fresh.get_base_model(), "tie_weights"):
        fresh.get_base_model().tie_weights()
    source_buffers = dict(peft_model.named_buffers())
    for name, buffer in list(fresh.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers (rotary frequencies) are not in a state dict: the model's own
            owner, _, leaf = name.rpartition(".")
            fresh.get_submodule(owner)._buffers[leaf] = source_buffers[name].detach().to("cpu", copy=True)
    missing = [name for name, param in fresh.named_parameters() if param.is_meta]
    if missing:
        raise KeyError(f"the state dict lacks {missing[:5]}{' ...' if len(missing) > 5 else ''} (keys missing: {result.missing_keys[:5]})")
    return fresh.merge_and_unload()


def save_lora_model(peft_model: nn.Module, directory: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """Export a peft model: merged into a plain checkpoint, or its adapters only (``merge_on_export``).

    Scalar models (reward / value models) are always merged: their reward normalisation (recipe R5) lives in the
    model's config, which an adapters-only export would not carry.
    """
    causal_lm = str(peft_model.peft_config[peft_model.active_adapter].task_type) in ("CAUSAL_LM", "TaskType.CAUSAL_LM")
    if getattr(peft_model, "merge_on_export", True) or not causal_lm:
        merged_model(peft_model, state_dict).save_pretrained(directory)
    else:
        peft_model.save_pretrained(directory, state_dict=state_dict)


def adapter_base(directory: Path) -> Optional[str]:
    """The base model an adapters-only export was trained on, or ``None`` when ``directory`` is not one."""
    config = Path(directory) / ADAPTER_CONFIG
    if not config.is_file():
        return None
    import json

    return json.loads(config.read_text(encoding="utf-8"))["base_model_name_or_path"]


def load_merged_adapters(base: nn.Module, directory: Path) -> nn.Module:
    """``base`` with the adapters saved in ``directory`` loaded and merged (a plain model)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(directory)).merge_and_unload()
