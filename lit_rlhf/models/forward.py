"""Forward passes shared by every stage: pad handling (recipe D6), response logprobs (P4), scores (R3)."""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn
from transformers import GenerationConfig

from lit_rlhf.algorithms import INVALID_LOGPROB, is_stop, last_token_index, logprobs_from_logits
from lit_rlhf.algorithms.core import StopIds
from lit_rlhf.models.parallel import gathered_for_generation, is_sharded


def model_inputs(ids: torch.Tensor, pad_token_id: int, hidden: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Model keyword arguments for a padded batch (recipe D6).

    Pad ids are replaced by 0 (the ``[PAD]`` id may lie outside the embedding matrix, which is never
    resized), masked out by the attention mask, and positions count real tokens only, so left, right and
    inner padding all give the same outputs at real positions.

    Args:
        ids: ``(B, L)`` token ids with ``pad_token_id`` at padded positions.
        hidden: ``(B, L, H)`` hidden states from a :class:`~lit_rlhf.models.trunk.FrozenTrunk`; when given they
            are passed as ``inputs_embeds`` instead of ``input_ids`` (to the trunk's top view of a model).

    Returns:
        ``input_ids`` (or ``inputs_embeds``), ``attention_mask`` and ``position_ids``, each ``(B, L)``.
    """
    mask = ids != pad_token_id
    position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
    inputs = {"input_ids": ids.masked_fill(~mask, 0)} if hidden is None else {"inputs_embeds": hidden}
    return {**inputs, "attention_mask": mask.long(), "position_ids": position_ids}


def with_cast_linears(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A frozen copy of ``module`` whose ``nn.Linear`` weights and biases are stored in ``dtype``; every other
    parameter is shared with ``module``, not copied.

    Autocast casts a frozen weight to its dtype anew at every call (its cast cache keeps only weights that require
    grad, and only until the autocast region ends); the copy's matrix products get the very same ``dtype`` values, so
    its outputs are bit-identical to ``module``'s under the same autocast. Used for frozen trunks
    (:class:`~lit_rlhf.models.trunk.FrozenTrunk`) and for sampling (:func:`generate`), where each of the T forwards
    would otherwise re-cast the frozen weights.
    """
    memo: dict[int, Any] = {
        id(parameter): parameter for submodule in module.modules() for parameter in submodule.parameters(recurse=False)
    }
    copied = copy.deepcopy(module, memo)  # every parameter shared, every module new
    for submodule in copied.modules():
        if isinstance(submodule, nn.Linear):
            # a weight tied to a non-linear module (an LM head tied to the input embeddings) is cast for the linear
            # layer alone: the embedding lookup keeps its own dtype
            for name, parameter in list(submodule.named_parameters(recurse=False)):
                if parameter.is_floating_point():
                    setattr(submodule, name, nn.Parameter(parameter.detach().to(dtype), requires_grad=False))
    return copied


def response_logprobs(
    model: nn.Module,
    query_responses: torch.Tensor,
    context_length: int,
    pad_token_id: int,
    temperature: float,
    return_entropy: bool = False,
    hidden: Optional[torch.Tensor] = None,
) -> Any:
    """Logprobs of the response tokens under ``model`` with temperature-scaled logits (recipe P4).

    Only the logits that predict response tokens are computed (``logits_to_keep``). Padded response positions
    get :data:`~lit_rlhf.algorithms.INVALID_LOGPROB`.

    Args:
        model: a causal LM.
        query_responses: ``(B, Q + T)``: left-padded queries followed by responses.
        context_length: ``Q``.
        temperature: the sampling temperature.
        return_entropy: also return the ``(B, T)`` entropy of the scaled distribution.
        hidden: trunk hidden states ``(B, Q + T, H)`` when ``model`` is a trunk's top view (see :func:`model_inputs`).

    Returns:
        ``(B, T)`` float32 logprobs, or ``(logprobs, entropy)``.
    """
    responses = query_responses[:, context_length:]
    length = responses.size(1)
    logits = model(**model_inputs(query_responses, pad_token_id, hidden), logits_to_keep=length + 1).logits[:, :-1]  # (B, T, V)
    padded = responses == pad_token_id
    # the [PAD] id may lie outside the vocabulary (recipe D6): gather a real id there, then overwrite
    out = logprobs_from_logits(logits, responses.masked_fill(padded, 0), temperature, return_entropy=return_entropy)
    logprobs, entropy = out if return_entropy else (out, None)
    logprobs = logprobs.masked_fill(padded, INVALID_LOGPROB)
    return (logprobs, entropy) if return_entropy else logprobs


def response_logprob_sums(
    model: nn.Module, query_responses: torch.Tensor, context_length: int, pad_token_id: int, hidden: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Summed logprobs (temperature 1, nats) of each right-padded response after its left-padded query (DPO).

    Args:
        model: a causal LM (or a trunk's top view, with ``hidden``).
        query_responses: ``(B, Q + T)``: queries left-padded to ``Q = context_length``, then responses.
        hidden: trunk hidden states ``(B, Q + T, H)``, see :func:`model_inputs`.

    Returns:
        ``(B,)`` float32: the sum over real (non-pad) response tokens.
    """
    logprobs = response_logprobs(model, query_responses, context_length, pad_token_id, 1.0, hidden=hidden)  # (B, T)
    return logprobs.masked_fill(query_responses[:, context_length:] == pad_token_id, 0.0).sum(1)


def sequence_scores(
    scalar_model: nn.Module, ids: torch.Tensor, pad_token_id: int, hidden: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Score of each sequence at its last non-pad token (recipe R3), after the model's bias (R5).

    Args:
        scalar_model: a :class:`~lit_rlhf.models.scalar.ScalarModel`.
        ids: ``(B, L)`` padded sequences (any padding side).
        hidden: trunk hidden states ``(B, L, H)`` when ``scalar_model`` is a trunk's top view.

    Returns:
        ``(B,)`` float32 scores.
    """
    inputs = model_inputs(ids, pad_token_id, hidden)
    values = scalar_model(**inputs).float()  # (B, L)
    rows = torch.arange(ids.size(0), device=ids.device)
    return values[rows, last_token_index(inputs["attention_mask"])]


def shared_prefix_scores(
    scalar_model: nn.Module,
    ids: torch.Tensor,
    prefix_lengths: torch.Tensor,
    pad_token_id: int,
    hidden: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Scores (recipe R3, after the R5 bias) of sequences in groups that share a prefix, each prefix run once.

    A reward model's chosen and rejected sequences share their query (on the TL;DR comparisons 157 of their ~192
    tokens on average): the query runs through ``scalar_model`` once, left-padded, and each continuation runs on its
    key/value cache, so a batch costs ``B * P + G * B * T`` token positions instead of ``G * B * L``. Gradients flow
    through both parts; the scores equal :func:`sequence_scores` of the same rows (up to rounding), with the same
    positions (real tokens counted from 0). Not for sharded models (FSDP2, ZeRO-3): it calls the backbone directly,
    bypassing the gathering of the parameters the model's own forward does.

    Args:
        scalar_model: a :class:`~lit_rlhf.models.scalar.ScalarModel`, or a trunk's top view of one (with ``hidden``).
        ids: ``(G * B, L)`` right-padded rows ``[prefix | continuation | pad]``; rows ``i, B + i, ..., (G-1) * B + i``
            share their first ``prefix_lengths[i]`` tokens (for a reward model: ``cat([chosen, rejected])``, G = 2).
        prefix_lengths: ``(B,)`` real prefix tokens of each group.
        hidden: trunk hidden states ``(G * B, L, H)`` when ``scalar_model`` is a trunk's top view.

    Returns:
        ``(G * B,)`` float32 scores, in the order of ``ids``.

    Raises:
        ValueError: when ``ids`` has not a multiple of ``B`` rows, or a row has no token after its prefix.
    """
    rows, length = ids.shape
    num_prefixes = prefix_lengths.numel()
    if num_prefixes == 0 or rows % num_prefixes:
        raise ValueError(f"{rows} rows cannot share {num_prefixes} prefixes group-wise")
    groups, device = rows // num_prefixes, ids.device
    prefix = prefix_lengths.to(device).repeat(groups)  # (GB,)
    rest = (ids != pad_token_id).sum(1) - prefix  # (GB,) continuation tokens
    if bool((rest < 1).any()):
        raise ValueError("shared_prefix_scores needs at least one token after each row's prefix")
    # interleave the groups (row i's continuations next to each other), the order a repeated cache has
    order = torch.arange(rows, device=device).view(groups, num_prefixes).t().reshape(-1)  # (GB,)
    prefix_width, rest_width = int(prefix_lengths.max()), int(rest.max())
    # prefixes left-padded to P: column j of group i reads token j - (P - p_i); continuations right-padded to T
    prefix_index = torch.arange(prefix_width, device=device) - (prefix_width - prefix[:num_prefixes, None])  # (B, P)
    prefix_mask = prefix_index >= 0
    prefix_index = prefix_index.clamp(min=0)
    rest_index = prefix[order, None] + torch.arange(rest_width, device=device)  # (GB, T), also the positions
    rest_mask = rest_index < (prefix + rest)[order, None]
    rest_index = rest_index.clamp(max=length - 1)

    def inputs(source_rows: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        if hidden is None:
            return {"input_ids": ids[source_rows].gather(1, index).masked_fill(~mask, 0)}
        gathered = hidden[source_rows].gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))
        return {"inputs_embeds": gathered}

    backbone = getattr(scalar_model, scalar_model.base_model_prefix)
    first = backbone(
        **inputs(torch.arange(num_prefixes, device=device), prefix_index, prefix_mask),
        attention_mask=prefix_mask.long(), position_ids=prefix_index, use_cache=True,
    )
    cache = first.cache
    cache.batch_repeat_interleave(groups)
    if cache.get_seq_length() == 0:
        # a trunk's top view: its blocks keep their layer indices, so cache layer 0, which transformers sizes the
        # attention mask from, is empty (no block of the view uses it); make it the view's first filled layer
        cache.layers[0] = next(layer for layer in cache.layers if layer.get_seq_length() > 0)
    attention = torch.cat([prefix_mask.repeat_interleave(groups, dim=0), rest_mask], dim=1).long()  # (GB, P + T)
    last = backbone(
        **inputs(order, rest_index, rest_mask), attention_mask=attention, position_ids=rest_index, cache=cache, use_cache=True,
    ).last_hidden_state  # (GB, T, H)
    picked = last[torch.arange(rows, device=device), rest[order] - 1]  # (GB, H) at each row's last real token
    scores = scalar_model.head(picked).float()
    return torch.empty_like(scores).index_copy_(0, order, scores)


@torch.no_grad()
def generate(
    model: Any, queries: torch.Tensor, pad_token_id: int, eos_token_id: StopIds, max_new_tokens: int, temperature: float
) -> torch.Tensor:
    """Sample up to ``max_new_tokens`` tokens after each left-padded query, ``(B, T)`` with ``T = max_new_tokens``
    (recipe P2, W4).

    EOS (any of several stop ids: EOS and a chat template's end-of-turn token,
    :func:`~lit_rlhf.models.loading.stop_token_ids`) may be sampled at any step and is never suppressed; a row that
    sampled one gets filler tokens after it, which :func:`~lit_rlhf.algorithms.truncate_after_eos` replaces by PAD (P3).
    When every row has sampled a stop id before ``T`` tokens, generation stops; the rows are then right-padded with
    ``pad_token_id`` to ``T`` (the same after P3). The pad id is never sampled (suppressed where it lies inside the LM
    head, see :func:`~lit_rlhf.models.loading.load_tokenizer`), so padding stays where ``ids == pad_token_id``.

    Under FSDP2 or ZeRO-3 the parameters are gathered once for the whole call
    (:func:`~lit_rlhf.models.parallel.gathered_for_generation`). An unsharded model on the CPU under autocast samples
    from a copy with its linear weights already in the autocast dtype (:func:`with_cast_linears`: the same tokens,
    without re-casting the weights at each of the T steps; measured side by side 12.6 -> 10.5 s for 16 x 53 tokens after
    192-token queries, SmolLM2-135M in bf16 on 2 CPU cores). Only there: on a GPU the copy would be a second model in
    memory at every rollout, for a gain never measured there.

    Raises:
        RuntimeError: if fewer than ``T`` tokens come back while some row has no EOS.

    Args:
        model: a causal LM with ``generate`` (sharded or not).
        queries: ``(B, Q)`` left-padded query ids.

    Returns:
        ``(B, T)`` response ids, ``T = max_new_tokens``.
    """
    inputs = model_inputs(queries, pad_token_id)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature + 1e-7,
        top_k=0,
        top_p=1.0,
        eos_token_id=[int(token) for token in torch.as_tensor(eos_token_id).flatten()],
        pad_token_id=0,
        suppress_tokens=[pad_token_id],  # a no-op for an id outside the LM head (the usual [PAD], recipe D6)
    )
    # position_ids are rebuilt from the attention mask inside generate; pass ids with pads replaced. A sharded model
    # (FSDP2, ZeRO-3) is gathered once for all T steps, and every process runs T steps (synced_gpus) so that none
    # waits on a collective another one skipped by stopping early.
    sharded = is_sharded(model)
    synced = sharded and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    sampler = model
    if isinstance(model, nn.Module) and not sharded:
        device = next(model.parameters()).device.type
        if device == "cpu" and torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != torch.float32:
            sampler = with_cast_linears(model, torch.get_autocast_dtype(device))
    with gathered_for_generation(model):
        output = sampler.generate(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], generation_config=config,
            **({"synced_gpus": True} if synced else {}),
        )
    responses = output[:, queries.size(1) :]
    if responses.size(1) < max_new_tokens:
        # transformers stops once every row has sampled a stop id; what would follow it is replaced by PAD anyway
        # (P3): pad to T
        if not is_stop(responses, eos_token_id).any(dim=1).all():
            raise RuntimeError(f"generate returned {responses.size(1)} tokens instead of {max_new_tokens} with a row lacking EOS")
        responses = torch.nn.functional.pad(responses, (0, max_new_tokens - responses.size(1)), value=pad_token_id)
    return responses
