"""Run frozen lower transformer blocks once and share their output between models and PPO epochs.

With ``trainable_layers`` set, PPO's policy keeps the embeddings and lower blocks of the SFT model frozen, so
they are the reference policy's too; likewise the value model and the reward model it is initialised from.
For a batch of sequences those blocks give the same hidden states in every forward of an update: the
rollout's four models and each of the ``num_ppo_epochs`` passes. :class:`FrozenTrunk` computes them once and
feeds them to *top views* of each model (the same parameters, blocks from the first trainable one up), which
is exact, not an approximation: a built-in check compares a split forward with a full one.

This is a speed-up for partially frozen training only (the CPU quickstart); with every block trainable it
stays disabled and models run whole.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Optional

import torch
from torch import nn

from lit_rlhf.models.forward import model_inputs
from lit_rlhf.models.parallel import is_sharded

log = logging.getLogger(__name__)

#: attribute names of the final norm in the decoders transformers ships (Llama-like, GPT-NeoX, GPT-2)
_FINAL_NORMS = ("norm", "final_layer_norm", "ln_f")


def _decoder(model: nn.Module) -> nn.Module:
    """The transformer inside a causal LM or a :class:`~lit_rlhf.models.scalar.ScalarModel`."""
    return getattr(model, model.base_model_prefix)


def _blocks(decoder: nn.Module) -> tuple[str, nn.ModuleList]:
    for name in ("layers", "h"):
        blocks = getattr(decoder, name, None)
        if isinstance(blocks, nn.ModuleList):
            return name, blocks
    raise ValueError(f"cannot find the transformer blocks of {type(decoder).__name__}")


def _view(module: nn.Module, **replacements: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` with some submodules swapped; all other parameters are shared, not copied."""
    view = copy.copy(module)
    view._modules = {**module._modules, **replacements}
    return view


def _frozen_blocks(model: nn.Module) -> int:
    """How many lowest blocks (with the input embeddings) have no trainable parameter."""
    if any(p.requires_grad for p in model.get_input_embeddings().parameters()):
        return 0
    count = 0
    for block in _blocks(_decoder(model))[1]:
        if any(p.requires_grad for p in block.parameters()):
            break
        count += 1
    return count


def _trunk_parameters(model: nn.Module, num_blocks: int) -> list[torch.Tensor]:
    blocks = _blocks(_decoder(model))[1]
    modules = [model.get_input_embeddings(), *blocks[:num_blocks]]
    return [p for module in modules for p in module.parameters()]


def _output(result: Any) -> torch.Tensor:
    return result.logits if hasattr(result, "logits") else result


class FrozenTrunk:
    """The embeddings and lowest frozen blocks that several models hold identically, run once per batch.

    Build it with :meth:`shared_by`; it is *disabled* (``bool(trunk)`` is false) when the models share no
    frozen block, their architecture cannot be split, or a split forward does not match a full one. A disabled
    trunk returns ``None`` hidden states and :meth:`top` returns models unchanged, so callers need no branch.
    """

    def __init__(self, bottom: Optional[nn.Module] = None, num_blocks: int = 0) -> None:
        self.bottom = bottom
        self.num_blocks = num_blocks
        self._tops: dict[int, nn.Module] = {}

    def __bool__(self) -> bool:
        return self.bottom is not None

    @classmethod
    def shared_by(cls, *models: nn.Module) -> "FrozenTrunk":
        """The largest frozen trunk all ``models`` share (identical parameter values), or a disabled one.

        The first model's trunk is the one that runs; the others must equal it, which holds for the PPO policy
        and its reference (both from the SFT checkpoint, lower blocks never trained) and for the value model
        and the reward model it starts from.

        Sharded models (FSDP2, ZeRO-3) get a disabled trunk, with a warning when they have frozen blocks: a block's
        parameters are gathered by its own model's forward, which a trunk's view would bypass.
        """
        try:
            num_blocks = min(_frozen_blocks(model) for model in models)
            if num_blocks and any(is_sharded(model) for model in models):
                log.warning(
                    "frozen-trunk sharing is off for sharded models (FSDP2/ZeRO-3): the %d frozen blocks run in each "
                    "model's own forward", num_blocks,
                )
                return cls()
            if num_blocks == 0 or num_blocks >= len(_blocks(_decoder(models[0]))[1]):
                return cls()
            first = _trunk_parameters(models[0], num_blocks)
            for other in models[1:]:
                params = _trunk_parameters(other, num_blocks)
                if len(params) != len(first) or not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, params)):
                    return cls()
            decoder = _decoder(models[0])
            name, blocks = _blocks(decoder)
            norm = next(n for n in _FINAL_NORMS if isinstance(getattr(decoder, n, None), nn.Module))
            bottom = _view(decoder, **{name: nn.ModuleList(blocks[:num_blocks]), norm: nn.Identity()})
        except (ValueError, StopIteration, AttributeError):
            return cls()
        trunk = cls(bottom, num_blocks)
        return trunk if all(trunk._matches_full_forward(model) for model in models) else cls()

    def top(self, model: nn.Module) -> nn.Module:
        """``model`` from its first non-shared block up, taking ``inputs_embeds=`` the trunk's output.

        Returns ``model`` itself when the trunk is disabled. Views are cached per model.
        """
        if not self:
            return model
        if id(model) not in self._tops:
            decoder = _decoder(model)
            name, blocks = _blocks(decoder)
            top_decoder = _view(decoder, **{name: nn.ModuleList(blocks[self.num_blocks :])})
            self._tops[id(model)] = _view(model, **{model.base_model_prefix: top_decoder})
        return self._tops[id(model)]

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, pad_token_id: int) -> Optional[torch.Tensor]:
        """Hidden states ``(B, L, H)`` after the shared blocks for padded ``ids`` ``(B, L)``; ``None`` if disabled."""
        if not self:
            return None
        return self.bottom(**model_inputs(ids, pad_token_id), use_cache=False).last_hidden_state

    @torch.no_grad()
    def _matches_full_forward(self, model: nn.Module) -> bool:
        ids = torch.arange(1, 9, device=model.device).unsqueeze(0)  # (1, 8), no padding
        full = _output(model(**model_inputs(ids, pad_token_id=-1), use_cache=False))
        hidden = self(ids, pad_token_id=-1)
        split = _output(self.top(model)(**model_inputs(ids, -1, hidden), use_cache=False))
        return full.shape == split.shape and torch.allclose(full, split, rtol=1e-4, atol=1e-4)
