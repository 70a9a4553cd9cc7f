"""The scalar reward / value model: a transformer backbone plus ``Linear(hidden, 1)`` (recipe R1-R3, R5).

Saved and loaded in Hugging Face format (``save_pretrained`` / ``ScalarModel.from_pretrained``): the
config stores the backbone's config and the reward normalisation ``bias`` of recipe R5, which every
forward subtracts.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from lit_rlhf.models.loading import (
    built_on_meta,
    checkpoint_names,
    defer_to_checkpoint,
    disable_dropout,
    loads_on_meta,
    resolve_model_path,
    safetensors_directory,
)


class ScalarModelConfig(PretrainedConfig):
    """Config of :class:`ScalarModel`.

    Args:
        base_config: the backbone's config as a dict (``model_type`` included).
        hidden_size: width of the backbone's last hidden state.
        bias: reward normalisation subtracted from every output (recipe R5), in reward units.
    """

    model_type = "lit_rlhf_scalar"

    def __init__(self, base_config: Optional[dict] = None, hidden_size: int = 0, bias: float = 0.0, **kwargs: Any) -> None:
        self.base_config = base_config or {}
        self.hidden_size = hidden_size
        self.bias = bias
        super().__init__(**kwargs)


class ScalarModel(PreTrainedModel):
    """Backbone + scalar head; ``forward`` returns one score per position (recipe R1).

    The head is initialised ``N(0, 1/sqrt(hidden + 1))`` with bias 0 (recipe R2). Read a sequence's reward at
    its last non-pad token (recipe R3, :func:`lit_rlhf.models.forward.sequence_scores`); a value model uses
    every position.
    """

    config_class = ScalarModelConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True

    def __init__(self, config: ScalarModelConfig, backbone: Optional[nn.Module] = None) -> None:
        super().__init__(config)
        if backbone is None:
            backbone_config = AutoConfig.for_model(**config.base_config)
            backbone = AutoModel.from_config(backbone_config)
        self.backbone = backbone
        self.scalar_head = nn.Linear(config.hidden_size, 1)
        self._no_split_modules = getattr(backbone, "_no_split_modules", None)
        self.post_init()
        init_scalar_head(self.scalar_head)

    def _init_weights(self, module: nn.Module) -> None:
        # Backbone weights come from a pretrained model or a checkpoint; the head is set by init_scalar_head.
        pass

    @classmethod
    def from_backbone(cls, name_or_path: str, dtype: torch.dtype = torch.float32) -> "ScalarModel":
        """A new scalar model on the transformer of a causal LM (e.g. the SFT checkpoint), head per R2.

        Dropout is disabled (recipe D8). Under :func:`~lit_rlhf.models.loading.weights_on_meta` the backbone's
        parameters stay on the ``meta`` device (the head is drawn as always) for
        :func:`lit_rlhf.models.parallel.materialize`.
        """
        path = resolve_model_path(name_or_path)
        directory = safetensors_directory(path) if loads_on_meta() else None
        if directory is not None:
            backbone = built_on_meta(lambda: AutoModel.from_config(AutoConfig.from_pretrained(path), dtype=dtype)).eval()
        else:
            backbone = AutoModel.from_pretrained(path, dtype=dtype)
        base = backbone.config
        config = ScalarModelConfig(base_config=base.to_dict(), hidden_size=base.hidden_size)
        model = cls(config, backbone=backbone)
        if directory is not None:
            names = checkpoint_names(backbone, directory)  # the backbone's keys in the causal LM checkpoint
            if names is None:  # weights transformers converts: the backbone loads whole
                model.backbone = AutoModel.from_pretrained(path, dtype=dtype)
            else:
                defer_to_checkpoint(model, directory, {f"backbone.{key}": name for key, name in names.items()})
        return disable_dropout(model)

    @classmethod
    def load(cls, name_or_path: str, dtype: Optional[torch.dtype] = None) -> "ScalarModel":
        """Load a saved scalar model (reward or value model) with dropout disabled (recipe D8).

        ``dtype``: the parameters' dtype (``None``: torch's default dtype, the training dtype inside Lightning's
        ``configure_model`` under a ``*-true`` precision). Under :func:`~lit_rlhf.models.loading.weights_on_meta` the
        parameters stay on the ``meta`` device for :func:`lit_rlhf.models.parallel.materialize`.

        Raises:
            FileNotFoundError: naming a missing directory.
            ValueError: when the directory holds another kind of model.
        """
        path = resolve_model_path(name_or_path)
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "model_type", None) != ScalarModelConfig.model_type:
            raise ValueError(f"{path} holds a '{config.model_type}' model, not a lit_rlhf reward/value model")
        dtype = dtype or torch.get_default_dtype()
        directory = safetensors_directory(path) if loads_on_meta() else None
        model = None
        if directory is not None:
            model = built_on_meta(lambda: cls._from_config(config, dtype=dtype))
            model = defer_to_checkpoint(model, directory, checkpoint_names(model, directory))
        if model is None:
            return disable_dropout(cls.from_pretrained(path, dtype=dtype))
        return disable_dropout(model.eval())

    def forward(
        self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any
    ) -> torch.Tensor:
        """Scores ``(B, L)``: ``head(last hidden state) - bias`` at every position."""
        return self.head(self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores ``(...)`` of the backbone's last hidden states ``(..., H)``: the scalar head minus the R5 bias."""
        return self.scalar_head(hidden).squeeze(-1) - self.config.bias


def init_scalar_head(head: nn.Linear) -> None:
    """Recipe R2: weight ``~ N(0, std=1/sqrt(hidden + 1))``, bias 0."""
    with torch.no_grad():  # tensor methods: transformers may patch torch.nn.init during model construction
        head.weight.normal_(0.0, 1.0 / math.sqrt(head.in_features + 1))
        head.bias.zero_()


AutoConfig.register(ScalarModelConfig.model_type, ScalarModelConfig)
AutoModel.register(ScalarModelConfig, ScalarModel)
