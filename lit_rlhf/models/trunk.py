"""Run frozen lower transformer blocks once and share their output between models and PPO epochs.

With ``trainable_layers`` set, PPO's policy keeps the embeddings and lower blocks of the SFT model frozen, so
they are the reference policy's too; likewise the value model and the reward model it is initialised from.
For a batch of sequences those blocks give the same hidden states in every forward of an update: the
rollout's four models and each of the ``num_ppo_epochs`` passes. :class:`FrozenTrunk` computes them once and
feeds them to *top views* of each model (the same parameters, blocks from the first trainable one up), which
is exact, not an approximation: a built-in check compares a split forward with a full one.

When the same sequences come back (the reward model's and DPO's epochs over a fixed set of comparisons), a
:class:`RowCache` keeps each sequence's trunk output from its first forward: ``FrozenTrunk.shared_by(...,
cache=True)`` computes every row alone, without padding, and reuses it for as long as the trunk's parameters
are the same (the cache is keyed by a fingerprint of them and by the row's tokens). DPO keeps its reference
logprobs in a :class:`RowCache` too.

This is a speed-up for partially frozen training only (the CPU quickstart); with every block trainable it
stays disabled and models run whole.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from lit_rlhf.models.forward import model_inputs, with_cast_linears
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

#: default memory budget of one :class:`RowCache` (bytes of stored tensors)
CACHE_BYTES = 4 * 2**30


def row_keys(ids: torch.Tensor, pad_token_id: int, split: Optional[int] = None) -> list[bytes]:
    """One key per row of padded ``ids`` ``(B, L)``: the bytes of its real (non-pad) tokens.

    The key does not depend on the padding side or width, so the same sequence in another batch finds the same
    entry. With ``split``, the real tokens before and after column ``split`` are kept apart (a left-padded query
    and its right-padded response: the same tokens split elsewhere are another row). Values computed under
    autocast differ from full-precision ones, so the autocast dtype on ``ids``' device (or none) begins every key.
    """
    device = ids.device.type
    context = str(torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None).encode() + b"|"

    def real(tokens: torch.Tensor) -> bytes:
        return tokens[tokens != pad_token_id].numpy().tobytes()

    rows = ids.cpu()
    if split is None:
        return [context + real(row) for row in rows]
    return [context + real(row[:split]) + b"|" + real(row[split:]) for row in rows]


class RowCache:
    """Tensors computed once per sequence and looked up by :func:`row_keys`, within a memory budget.

    Values are whatever the caller computes for one row (the trunk's hidden states ``(n, H)``, a reference
    logprob ``()``); they stay on the device they were computed on. Once ``max_bytes`` are stored, further rows
    are still computed but no longer kept (no eviction: with a shuffled epoch every row is as likely to come back).
    ``hits`` and ``misses`` count lookups.
    """

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.values: dict[bytes, torch.Tensor] = {}
        self.bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.values)

    def get(self, keys: Sequence[bytes], compute: Callable[[int], torch.Tensor]) -> list[torch.Tensor]:
        """The value of each key; ``compute(i)`` gives row ``i``'s value when its key is not stored yet."""
        out = []
        for index, key in enumerate(keys):
            value = self.values.get(key)
            if value is None:
                self.misses += 1
                value = compute(index)
                size = value.numel() * value.element_size()
                if self.bytes + size <= self.max_bytes:
                    self.values[key] = value
                    self.bytes += size
            else:
                self.hits += 1
            out.append(value)
        return out


#: trunk caches of this process by trunk fingerprint, most recent last (a few, so a sweep over folds and
#: settings reuses them while memory stays bounded)
_TRUNK_CACHES: "OrderedDict[str, RowCache]" = OrderedDict()
_MAX_TRUNK_CACHES = 2


def clear_trunk_caches() -> None:
    """Forget every trunk cache of this process (frees their memory)."""
    _TRUNK_CACHES.clear()


def _fingerprint(parameters: list[torch.Tensor]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for tensor in parameters:
        digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def trunk_cache(parameters: list[torch.Tensor], max_bytes: int = CACHE_BYTES) -> RowCache:
    """The process-wide :class:`RowCache` of the trunk with these exact parameter values (a new one if none)."""
    key = _fingerprint(parameters)
    cache = _TRUNK_CACHES.pop(key, None) or RowCache(max_bytes)
    _TRUNK_CACHES[key] = cache
    while len(_TRUNK_CACHES) > _MAX_TRUNK_CACHES:
        _TRUNK_CACHES.popitem(last=False)
    return cache


class FrozenTrunk:
    """The embeddings and lowest frozen blocks that several models hold identically, run once per batch.

    Build it with :meth:`shared_by`; it is *disabled* (``bool(trunk)`` is false) when the models share no
    frozen block, their architecture cannot be split, or a split forward does not match a full one. A disabled
    trunk returns ``None`` hidden states and :meth:`top` returns models unchanged, so callers need no branch.
    """

    def __init__(self, bottom: Optional[nn.Module] = None, num_blocks: int = 0, cache: Optional[RowCache] = None) -> None:
        self.bottom = bottom
        self.num_blocks = num_blocks
        self.cache = cache
        self._tops: dict[int, nn.Module] = {}
        self._cast_bottoms: dict[torch.dtype, nn.Module] = {}

    def __bool__(self) -> bool:
        return self.bottom is not None

    @classmethod
    def shared_by(cls, *models: nn.Module, cache: bool = False, cache_bytes: int = CACHE_BYTES) -> "FrozenTrunk":
        """The largest frozen trunk all ``models`` share (identical parameter values), or a disabled one.

        With ``cache``, hidden states are computed row by row and kept in the process's :class:`RowCache` for
        this trunk (see :meth:`__call__`), at most ``cache_bytes`` of them.

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
        trunk = cls(bottom, num_blocks, trunk_cache(first, cache_bytes) if cache else None)
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
    def __call__(
        self, ids: torch.Tensor, pad_token_id: int, prefix_lengths: Optional[torch.Tensor] = None
    ) -> Optional[torch.Tensor]:
        """Hidden states ``(B, L, H)`` after the shared blocks for padded ``ids`` ``(B, L)``; ``None`` if disabled.

        Without a cache the batch runs as it is. With one, each row runs alone on its real tokens (positions
        0..n-1, as :func:`~lit_rlhf.models.forward.model_inputs` numbers them), so its hidden states do not depend
        on the batch it came in or on the padding, and a resumed run gets the very values of an uninterrupted
        one; pad positions get zeros (the attention mask hides them).

        ``prefix_lengths`` ``(B,)`` (cached path only) says how many of each row's first real tokens are a prefix
        that other rows of the batch may share: a comparison's query, common to its chosen and rejected sequences.
        Each distinct prefix then runs once, and each row's remaining tokens run on its key/value cache
        (:meth:`row_hidden`), which for a TL;DR pair (a ~157-token query, two ~35-token summaries) is about 1.7x
        fewer tokens through the trunk.
        """
        if not self:
            return None
        if self.cache is None:
            return self._batched(ids, pad_token_id)
        mask = ids != pad_token_id
        splits = [0] * ids.size(0) if prefix_lengths is None else [int(n) for n in prefix_lengths]
        keys = [key + b"|%d" % split for key, split in zip(row_keys(ids, pad_token_id), splits)]
        prefixes: dict[bytes, tuple[torch.Tensor, Any]] = {}  # this batch's prefixes: hidden states, key/value cache
        rows = self.cache.get(keys, lambda i: self.row_hidden(ids[i][mask[i]], splits[i], prefixes))
        hidden = rows[0].new_zeros(*ids.shape, rows[0].size(-1))
        hidden[mask] = torch.cat(rows).to(hidden.dtype)
        return hidden

    def _batched(self, ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
        return self._running_bottom()(**model_inputs(ids, pad_token_id), use_cache=False).last_hidden_state

    def _running_bottom(self) -> nn.Module:
        """:attr:`bottom`, or under autocast a copy of it with its linear layers' parameters already in the autocast
        dtype (made once per dtype, ~2 bytes per trunk parameter).

        Autocast casts a weight to bf16 at every call unless the weight requires grad (its cast cache keeps no other),
        so the frozen trunk's weights were cast anew for every row of the cached pass. The copy's matrix products get
        the very same bf16 values, so its outputs are bit-identical; measured on SmolLM2-135M's 28 lower blocks, one
        row at a time (2 cores, AMX): 3.9 -> 3.0 s for 30 rows.
        """
        device = self.bottom.get_input_embeddings().weight.device.type
        if not torch.is_autocast_enabled(device):
            return self.bottom
        dtype = torch.get_autocast_dtype(device)
        if dtype not in self._cast_bottoms:
            self._cast_bottoms[dtype] = with_cast_linears(self.bottom, dtype)
        return self._cast_bottoms[dtype]

    @torch.no_grad()
    def row_hidden(
        self, tokens: torch.Tensor, prefix_length: int = 0, prefixes: Optional[dict[bytes, tuple[torch.Tensor, Any]]] = None
    ) -> torch.Tensor:
        """Hidden states ``(n, H)`` after the shared blocks for one unpadded sequence ``(n,)``.

        With ``0 < prefix_length < n``, the first ``prefix_length`` tokens run first (their hidden states and
        key/value cache are kept in ``prefixes`` under their bytes, for the next row with the same prefix) and the
        rest runs on that cache. The result depends on ``tokens`` and ``prefix_length`` only, not on ``prefixes``.
        """
        if tokens.numel() == 0:
            return self.bottom.get_input_embeddings().weight.new_zeros(0, self.bottom.config.hidden_size)
        bottom = self._running_bottom()
        if not 0 < prefix_length < tokens.numel():
            return bottom(input_ids=tokens.unsqueeze(0), use_cache=False).last_hidden_state[0]
        prefixes = {} if prefixes is None else prefixes
        key = tokens[:prefix_length].cpu().numpy().tobytes()
        if key not in prefixes:
            out = bottom(input_ids=tokens[:prefix_length].unsqueeze(0), use_cache=True)
            prefixes[key] = (out.last_hidden_state[0], out.cache)
        prefix_hidden, past = prefixes[key]
        rest = tokens[prefix_length:]
        out = bottom(input_ids=rest.unsqueeze(0), cache=past, use_cache=True)
        past.crop(-rest.numel())  # back to the prefix alone for the next row
        return torch.cat([prefix_hidden, out.last_hidden_state[0]])

    @torch.no_grad()
    def _matches_full_forward(self, model: nn.Module) -> bool:
        ids = torch.arange(1, 9, device=model.device).unsqueeze(0)  # (1, 8), no padding
        full = _output(model(**model_inputs(ids, pad_token_id=-1), use_cache=False))
        hidden = self._batched(ids, pad_token_id=-1)
        split = _output(self.top(model)(**model_inputs(ids, -1, hidden), use_cache=False))
        return full.shape == split.shape and torch.allclose(full, split, rtol=1e-4, atol=1e-4)
