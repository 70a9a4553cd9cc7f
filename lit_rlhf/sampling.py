"""Sampling policy responses, scoring them and decoding them to text: what training (PPO, online DPO, the
validation of the RL stages, SFT sample tables) and evaluation (``lit-rlhf eval``, ``eval-rm``) share.

Sampling is seeded per validation batch and rank (:data:`RANK_SEED_STRIDE`, :func:`seeded`), so two policies (or one
evaluated twice, in training or in ``lit-rlhf eval``) see the same random numbers.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lit_rlhf.algorithms import eos_penalized, is_stop, truncate_after_eos
from lit_rlhf.models.forward import generate, response_logprobs, sequence_scores, shared_prefix_scores
from lit_rlhf.models.loading import stop_token_ids
from lit_rlhf.models.parallel import is_sharded
from lit_rlhf.models.scalar import ScalarModel
from lit_rlhf.models.trunk import FrozenTrunk

#: Recipe P11: per-rank seed offset.
RANK_SEED_STRIDE = 100003


@contextlib.contextmanager
def seeded(seed: int, device: Optional[torch.device] = None) -> Iterator[None]:
    """Draw from the CPU generator (and, for a CUDA ``device``, that device's generator) seeded with ``seed``, then put
    both back as they were: a validation batch samples the same way in every run, and the training rollouts after it
    continue their own streams.

    ``torch.manual_seed`` inside ``torch.random.fork_rng(devices=[])`` would reseed every CUDA generator while saving
    none of them, so every rollout after a validation on a GPU would restart from the same CUDA state (issue 27); here
    the one device in use is forked and seeded, and no other device gets a CUDA context.
    """
    cuda = device is not None and torch.device(device).type == "cuda"
    index = (torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


@torch.no_grad()
def sample_and_score(
    policy: nn.Module,
    reward_model: Optional[nn.Module],
    queries: torch.Tensor,
    tokenizer: Any,
    response_length: int,
    temperature: float,
    truncate: bool = True,
    non_eos_penalty: bool = True,
    penalty_reward_value: float = -1.0,
    reference_ids: Optional[torch.Tensor] = None,
    missing_eos_penalty: Optional[float] = None,
) -> dict[str, torch.Tensor]:
    """Sample one response per query and score it with the reward model (recipe P2, P3, R3).

    Args:
        reward_model: a scalar model, or ``None`` to sample only (no ``scores`` in the result).
        queries: ``(B, Q)`` left-padded query ids.
        truncate: replace tokens after the first stop token (EOS, end of turn) by PAD before scoring (P3).
        non_eos_penalty: a response without a stop token scores ``penalty_reward_value`` (P3).
        missing_eos_penalty: instead, subtract this from such a response's score (TRL's; for chat reward models whose
            scores are not centred on 0, :func:`~lit_rlhf.algorithms.penalize_missing_eos`).
        reference_ids: ``(B, R)`` the reference answers rendered as responses (right-padded, the batch's
            ``reference_ids``; a row of pads has no reference), scored after the same queries (``reference_scores``);
            each query then runs once for both (:func:`shared_query_scores`).

    Returns:
        ``responses`` ``(B, T)`` (raw samples), ``postprocessed`` ``(B, T)``, ``query_responses`` ``(B, Q+T)``,
        ``scores`` ``(B,)``, ``raw_scores`` ``(B,)`` (before the EOS rule), ``contains_eos`` ``(B,)`` bool and ``lengths``
        ``(B,)`` (real response tokens); with
        ``reference_ids`` also ``reference_scores`` ``(B,)`` (float32, no EOS penalty; NaN where a row has no reference).
    """
    pad, stops = tokenizer.pad_token_id, stop_token_ids(tokenizer)
    responses = generate(policy, queries, pad, stops, response_length, temperature)
    postprocessed = truncate_after_eos(responses, stops, pad) if truncate else responses
    query_responses = torch.cat([queries, postprocessed], dim=1)
    sample = {
        "responses": responses, "postprocessed": postprocessed, "query_responses": query_responses,
        "contains_eos": is_stop(postprocessed, stops).any(dim=1), "lengths": (postprocessed != pad).sum(1),
    }
    if reward_model is None:
        return sample
    has_reference = (reference_ids != pad).any(dim=1) if reference_ids is not None else None
    if has_reference is None or not bool(has_reference.any()):
        scores = sequence_scores(reward_model, query_responses, pad)
    else:
        rows = has_reference.nonzero().squeeze(1)
        scores, reference_scores = shared_query_scores(reward_model, queries[rows], [postprocessed[rows], reference_ids[rows]], pad)
        if rows.numel() < queries.size(0):  # the rows without a reference: their responses alone
            others = (~has_reference).nonzero().squeeze(1)
            scores = torch.empty(queries.size(0), device=queries.device).index_copy_(0, rows, scores).index_copy_(
                0, others, sequence_scores(reward_model, query_responses[others], pad))
            reference_scores = torch.full_like(scores, float("nan")).index_copy_(0, rows, reference_scores)
        sample["reference_scores"] = reference_scores
    sample["raw_scores"] = scores
    sample["scores"] = eos_penalized(scores, postprocessed, stops, non_eos_penalty, penalty_reward_value, missing_eos_penalty)
    return sample


@torch.no_grad()
def shared_query_scores(
    reward_model: Any, queries: torch.Tensor, responses: list[torch.Tensor], pad_token_id: int
) -> list[torch.Tensor]:
    """Reward-model scores (recipe R3) of several responses to the same queries, each query run once.

    The rows ``[query | response]`` of all groups go through
    :func:`~lit_rlhf.models.forward.shared_prefix_scores`: the query (on the TL;DR validation prompts ~190 of
    ~225 tokens) once, each response on its key/value cache. The scores equal :func:`sequence_scores` of
    ``cat([queries, response])`` up to rounding. A sharded reward model (FSDP2, ZeRO-3), one that is not a
    :class:`~lit_rlhf.models.scalar.ScalarModel` (a LoRA reward model with its adapters disabled) or a response with
    no token runs every sequence whole instead.

    Args:
        queries: ``(B, Q)`` left-padded query ids.
        responses: G tensors ``(B, T_g)`` of right-padded response ids.

    Returns:
        G tensors ``(B,)``, float32, in the order of ``responses``.
    """
    lengths = [(ids != pad_token_id).sum(1) for ids in responses]
    if not isinstance(reward_model, ScalarModel) or is_sharded(reward_model) or any(bool((n < 1).any()) for n in lengths):
        return [sequence_scores(reward_model, torch.cat([queries, ids], dim=1), pad_token_id).float() for ids in responses]
    query_lengths = (queries != pad_token_id).sum(1)  # (B,)
    rows = [
        torch.cat([queries[row, queries.size(1) - int(query_lengths[row]) :], ids[row, : int(n[row])]])
        for ids, n in zip(responses, lengths) for row in range(queries.size(0))
    ]
    width = max(row.numel() for row in rows)
    ids = torch.stack([F.pad(row, (0, width - row.numel()), value=pad_token_id) for row in rows])  # (G * B, L)
    return list(shared_prefix_scores(reward_model, ids, query_lengths, pad_token_id).chunk(len(responses)))


@torch.no_grad()
def sample_kl(
    policy: nn.Module, reference: nn.Module, sample: dict[str, torch.Tensor], context_length: int, pad_token_id: int,
    temperature: float, trunk: FrozenTrunk = FrozenTrunk(),
) -> torch.Tensor:
    """KL ``(B,)`` of each sampled response to ``reference``: the sum over its tokens of the temperature-scaled logprob
    difference (recipe P4), pad positions after EOS excluded.

    Args:
        sample: :func:`sample_and_score`'s result (``query_responses``, ``postprocessed``).
        context_length: the query width ``Q``.
        trunk: frozen blocks shared by policy and reference (run once), or a disabled trunk.
    """
    query_responses = sample["query_responses"]
    hidden = trunk(query_responses, pad_token_id)  # None when the trunk is disabled
    logprobs, ref_logprobs = (
        response_logprobs(trunk.top(model), query_responses, context_length, pad_token_id, temperature, hidden=hidden)
        for model in (policy, reference)
    )
    return ((logprobs - ref_logprobs) * (sample["postprocessed"] != pad_token_id)).sum(1)


def decode_responses(tokenizer: Any, responses: torch.Tensor) -> list[str]:
    """Text of each response up to and excluding its first stop token (EOS, end of turn) (``(B, T)`` ids -> B strings)."""
    truncated = truncate_after_eos(responses, stop_token_ids(tokenizer), tokenizer.pad_token_id)
    return [text.strip() for text in tokenizer.batch_decode(truncated, skip_special_tokens=True)]


def decode_query(tokenizer: Any, query_ids: torch.Tensor, max_chars: int = 300) -> str:
    """Readable tail of a left-padded query for sample tables (the post's end and ``TL;DR:``)."""
    text = tokenizer.decode(query_ids, skip_special_tokens=True)
    return text if len(text) <= max_chars else "…" + text[-max_chars:]
