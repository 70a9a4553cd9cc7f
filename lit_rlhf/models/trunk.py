"""Run frozen lower transformer blocks once and share their output between models and PPO epochs.

With ``trainable_layers`` set, PPO's policy keeps the embeddings and lower blocks of the SFT model frozen, so
they are the reference policy's too; likewise the value model and the reward model it is initialised from.
For a batch of sequences those blocks give the same hidden states in every forward of an update: the
rollout's four models and each of the ``num_ppo_epochs`` passes. :class:`FrozenTrunk` computes them once and
feeds them to *top views* of each model (the same parameters, blocks from the first trainable one up), which
is exact, not an approximation: a built-in check compares a split forward with a full one.

When the same sequences come back (the reward model's and DPO's epochs over a fixed set of comparisons), a
:class:`RowCache` keeps each comparison's trunk output from its first forward: ``FrozenTrunk.shared_by(...,
cache=True)`` runs every comparison alone, without padding, as one sequence (its query, then its two summaries
side by side under a block-causal mask), and reuses it for as long as the trunk's parameters are the same (the
cache is keyed by a fingerprint of them and by the comparison's tokens). DPO keeps its reference logprobs in a
:class:`RowCache` too.

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


def _autocast_context(device: str) -> bytes:
    """Values computed under autocast differ from full-precision ones: the autocast dtype on ``device`` (or none)
    begins every cache key."""
    return str(torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None).encode() + b"|"


def _segments_key(segments: Sequence[torch.Tensor]) -> bytes:
    """The bytes of 1-D token tensors, each after its length (the same tokens split elsewhere give another key)."""
    return b"".join(b"%d:" % segment.numel() + segment.cpu().numpy().tobytes() for segment in segments)


def row_keys(ids: torch.Tensor, pad_token_id: int, split: Optional[int] = None) -> list[bytes]:
    """One key per row of padded ``ids`` ``(B, L)``: the bytes of its real (non-pad) tokens.

    The key does not depend on the padding side or width, so the same sequence in another batch finds the same
    entry. With ``split``, the real tokens before and after column ``split`` are kept apart (a left-padded query
    and its right-padded response: the same tokens split elsewhere are another row). The autocast dtype on
    ``ids``' device (or none) begins every key.
    """
    context = _autocast_context(ids.device.type)

    def real(tokens: torch.Tensor) -> torch.Tensor:
        return tokens[tokens != pad_token_id]

    rows = ids.cpu()
    if split is None:
        return [context + _segments_key([real(row)]) for row in rows]
    return [context + _segments_key([real(row[:split]), real(row[split:])]) for row in rows]


class RowCache:
    """Tensors computed once per key (a sequence, a comparison), within a memory budget.

    Values are whatever the caller computes for one key (the trunk's hidden states of a comparison ``(n, H)``, a
    reference logprob ``()``); they stay on the device they were computed on. Once ``max_bytes`` are stored, further rows
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
        return self.get_batched(keys, lambda rows: [compute(i) for i in rows])

    def get_batched(self, keys: Sequence[bytes], compute: Callable[[list[int]], Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """The value of each key; ``compute(rows)`` gives the values of all the rows whose keys are not stored yet, in one
        call (a key repeated within ``keys`` is computed once, for its first row); it is not called when every key is
        stored."""
        values: list[Optional[torch.Tensor]] = [self.values.get(key) for key in keys]
        missing: dict[bytes, int] = {}  # key -> its first row
        for index, (key, value) in enumerate(zip(keys, values)):
            if value is None:
                missing.setdefault(key, index)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        computed = dict(zip(missing, compute(list(missing.values())))) if missing else {}
        for key, value in computed.items():
            size = value.numel() * value.element_size()
            if self.bytes + size <= self.max_bytes:
                self.values[key] = value
                self.bytes += size
        return [computed[key] if value is None else value for key, value in zip(keys, values)]


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
        #: whether a group's continuations share one forward (block-causal mask); else each runs with the prefix
        self.block_masks = True
        self._tops: dict[int, nn.Module] = {}
        self._cast_bottoms: dict[torch.dtype, nn.Module] = {}

    def __bool__(self) -> bool:
        return self.bottom is not None

    @classmethod
    def shared_by(cls, *models: nn.Module, cache: bool = False, cache_bytes: int = CACHE_BYTES) -> "FrozenTrunk":
        """The largest frozen trunk all ``models`` share (identical parameter values), or a disabled one.

        With ``cache``, hidden states are computed group by group (a row, or a comparison's rows) and kept in the
        process's :class:`RowCache` for this trunk (see :meth:`__call__`), at most ``cache_bytes`` of them. Where the
        architecture's attention does not follow a block-causal mask (a built-in check), each continuation of a group
        runs after its own copy of the prefix instead, with a warning.

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
        if not all(trunk._matches_full_forward(model) for model in models):
            return cls()
        if cache and not trunk._follows_block_masks():
            log.warning("%s ignores block-causal attention masks: each summary of a comparison runs after its own copy of "
                        "the query through the frozen trunk", type(decoder).__name__)
            trunk.block_masks = False
        return trunk

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
        self, ids: torch.Tensor, pad_token_id: int, prefix_lengths: Optional[torch.Tensor] = None, cached: bool = True
    ) -> Optional[torch.Tensor]:
        """Hidden states ``(G * B, L, H)`` after the shared blocks for padded ``ids`` ``(G * B, L)``; ``None`` if disabled.

        Without a cache (or with ``cached=False``, for rows seen once) the batch runs as it is. With one, each *group*
        of rows runs alone on its real tokens and is kept under a key of those tokens (:meth:`group_hidden`): a row by
        itself, or with ``prefix_lengths`` ``(B,)`` the rows ``i, B + i, ..., (G - 1) * B + i``, which share their first
        ``prefix_lengths[i]`` real tokens (a comparison's query, common to its chosen and rejected sequences: ``ids``
        is ``cat([chosen, rejected])``, G = 2). A group's hidden states depend on its own tokens only, not on the batch
        it came in or on the padding, so a resumed run gets the very values of an uninterrupted one; pad positions get
        zeros (the attention mask hides them).

        Raises:
            ValueError: when ``ids`` has not a multiple of ``prefix_lengths.numel()`` rows.
        """
        if not self:
            return None
        if self.cache is None or not cached:
            return self._batched(ids, pad_token_id)
        rows, mask = ids.size(0), ids != pad_token_id
        num_groups = rows if prefix_lengths is None else prefix_lengths.numel()
        if num_groups == 0 or rows % num_groups:
            raise ValueError(f"{rows} rows cannot share {num_groups} prefixes group-wise")
        members = [list(range(i, rows, num_groups)) for i in range(num_groups)]  # rows of each group
        tokens = [row[m] for row, m in zip(ids, mask)]  # each row's real tokens
        groups = []  # (prefix, continuations) of each group
        for i, group in enumerate(members):
            split = tokens[group[0]].numel() if prefix_lengths is None else int(prefix_lengths[i])
            prefix = tokens[group[0]][:split]
            if any(not torch.equal(tokens[row][:split], prefix) or tokens[row].numel() < split for row in group):
                raise ValueError(f"rows {group} do not share their first {split} tokens")
            groups.append((prefix, [tokens[row][split:] for row in group]))
        context = _autocast_context(ids.device.type)
        keys = [context + _segments_key([prefix, *rests]) for prefix, rests in groups]
        values = self.cache.get(keys, lambda i: self.group_hidden(*groups[i]))  # (P + sum of T_g, H) each
        hidden = values[0].new_zeros(*ids.shape, values[0].size(-1))
        for (prefix, rests), group, value in zip(groups, members, values):
            offset = prefix.numel()
            for row, rest in zip(group, rests):
                hidden[row, mask[row]] = torch.cat([value[: prefix.numel()], value[offset : offset + rest.numel()]])
                offset += rest.numel()
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
    def group_hidden(self, prefix: torch.Tensor, continuations: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Hidden states ``(P + T_1 + ... + T_G, H)`` after the shared blocks for ``prefix`` ``(P,)`` followed by
        each of ``continuations`` ``(T_g,)``, in one forward.

        The continuations are laid end to end after the prefix; each attends to the prefix and to its own earlier
        tokens only (a block-causal attention mask) and is numbered from position ``P`` on, so continuation ``g``'s
        rows are the hidden states of the sequence ``prefix + continuations[g]`` (up to rounding: a matrix product's
        rounding may depend on how many rows it has). A TL;DR comparison (a ~157-token query, two ~35-token
        summaries) runs as one ~227-token sequence; measured on the quickstart RM's 28 frozen blocks over 96 real
        training comparisons (2 cores, bf16, the two ways interleaved in one process), 346 ms per comparison with the
        query run first and each summary on its key/value cache -> 257 ms (1.35x).
        """
        continuations = [rest for rest in continuations if rest.numel()]
        tokens = torch.cat([prefix, *continuations])
        if tokens.numel() == 0:
            return self.bottom.get_input_embeddings().weight.new_zeros(0, self.bottom.config.hidden_size)
        bottom, length = self._running_bottom(), prefix.numel()

        def run(ids: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
            return bottom(input_ids=ids.unsqueeze(0), use_cache=False, **kwargs).last_hidden_state[0]

        if len(continuations) <= 1:  # one causal sequence
            return run(tokens)
        if not self.block_masks:
            rows = [run(torch.cat([prefix, rest])) for rest in continuations]
            return torch.cat([rows[0][:length]] + [row[length:] for row in rows])
        spans = [torch.arange(length, length + rest.numel(), device=tokens.device) for rest in continuations]
        positions = torch.cat([torch.arange(length, device=tokens.device), *spans])
        segment = torch.cat([torch.zeros_like(positions[:length])] + [torch.full_like(span, g + 1) for g, span in enumerate(spans)])
        causal = torch.ones(tokens.numel(), tokens.numel(), dtype=torch.bool, device=tokens.device).tril()
        allowed = causal & ((segment == 0)[None, :] | (segment[None, :] == segment[:, None]))  # (L, L): query row, key column
        return run(tokens, attention_mask=allowed[None, None], position_ids=positions.unsqueeze(0))

    @torch.no_grad()
    def _follows_block_masks(self) -> bool:
        """Whether :meth:`group_hidden` of a prefix and two continuations matches each whole sequence (float32)."""
        device = self.bottom.get_input_embeddings().weight.device
        prefix, first, second = (torch.arange(a, b, device=device) for a, b in ((1, 5), (5, 8), (8, 10)))
        grouped = self.group_hidden(prefix, [first, second])
        whole = [self.group_hidden(torch.cat([prefix, rest])) for rest in (first, second)]  # one causal forward each
        want = torch.cat([whole[0], whole[1][prefix.numel() :]])
        # rounding only: relative to each position's largest value (pretrained models reach ~2e4 in some channels)
        scale = want.abs().amax(dim=-1, keepdim=True)
        return grouped.shape == want.shape and bool(((grouped - want).abs() <= 1e-5 * scale + 1e-5).all())

    @torch.no_grad()
    def _matches_full_forward(self, model: nn.Module) -> bool:
        ids = torch.arange(1, 9, device=model.device).unsqueeze(0)  # (1, 8), no padding
        full = _output(model(**model_inputs(ids, pad_token_id=-1), use_cache=False))
        hidden = self._batched(ids, pad_token_id=-1)
        split = _output(self.top(model)(**model_inputs(ids, -1, hidden), use_cache=False))
        return full.shape == split.shape and torch.allclose(full, split, rtol=1e-4, atol=1e-4)
