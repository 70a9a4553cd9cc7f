"""TL;DR formatting: query template, clever truncation, padding (recipe D2-D7).

All functions take a Hugging Face tokenizer and plain Python rows; nothing here touches Lightning. Token ids are built
without special tokens, as the N+ code does with Pythia (:class:`~lit_rlhf.data.templates.Renderer` adds a BOS for a
model that uses one).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import torch

#: Recipe D2: no trailing space after ``TL;DR:``.
TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
#: Recipe D2, CNN/DM articles (out-of-distribution evaluation).
CNNDM_TEMPLATE = "Article:\n{article}\n\nTL;DR:\n"
#: Recipe D3: N+'s query budget for CNN/DM articles (2,047 - 128 tokens).
CNNDM_QUERY_LENGTH = 1919


def is_cnndm(info: Mapping[str, Any]) -> bool:
    """Whether a row (or a comparison's ``info``) is a CNN/DM article rather than a TL;DR post."""
    return info.get("article") is not None


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of plain text: no special token added, special-token strings (``[PAD]``, ``<|im_end|>``) as text."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


class QueryTooLong(ValueError):
    """The query does not fit its token budget even with an empty body (a title alone too long): the row is
    dropped and counted, like a row whose response is too long."""


def format_query_ids(tokenizer: Any, info: Mapping[str, Any], query_length: int) -> list[int]:
    """Token ids of the formatted query, cleverly truncated to at most ``query_length`` (recipe D2, D3).

    TL;DR rows (``subreddit``, ``title``, ``post``) use the TL;DR template; rows with an ``article`` use the
    CNN/DM template. While the query is too long, the body (``post`` or ``article``) is cut at its last
    newline; when no newline is left, one character is dropped from its end at a time, as N+ does, so a cut
    never splits a multi-byte character (no U+FFFD in emoji or CJK posts).

    Args:
        tokenizer: a Hugging Face tokenizer.
        info: the row (or a comparison's ``info``).
        query_length: token budget (512 for TL;DR, 1,919 for CNN/DM in N+).

    Returns:
        the (unpadded) query token ids.

    Raises:
        KeyError: naming a missing field.
        QueryTooLong: when even an empty body does not fit (the other fields alone exceed ``query_length``).
    """
    if is_cnndm(info):
        template, body_key, keys = CNNDM_TEMPLATE, "article", ("article",)
    else:
        template, body_key, keys = TLDR_TEMPLATE, "post", ("subreddit", "title", "post")
    fields = {}
    for key in keys:
        if info.get(key) is None:
            raise KeyError(f"missing field '{key}'")
        fields[key] = str(info[key])
    return list(_fitted_query(tokenizer, template, body_key, tuple(fields.items()), query_length))


@functools.lru_cache(maxsize=4096)
def _fitted_query(tokenizer: Any, template: str, body_key: str, items: tuple[tuple[str, str], ...], query_length: int) -> tuple[int, ...]:
    """The truncation loop of :func:`format_query_ids`, memoised: a post's comparisons share its query (the 1,225
    training comparisons have 685 posts), and the loop re-tokenises the whole query once per dropped character."""
    fields = dict(items)
    while True:
        ids = _encode(tokenizer, template.format(**fields))
        if len(ids) <= query_length:
            return tuple(ids)
        body = fields[body_key]
        if not body:
            raise QueryTooLong(f"query does not fit {query_length} tokens even with an empty '{body_key}'")
        newline = body.rfind("\n")
        fields[body_key] = body[:newline] if newline >= 0 else body[:-1]  # N+: the last newline, else one character


def completion_ids(tokenizer: Any, text: str, leading_space: bool) -> list[int]:
    """Completion token ids: the text (special-token strings as text), then EOS, with a space prepended when
    ``leading_space`` (recipe D5).

    As N+: SFT reference summaries always get the space (``" " + summary``, even if one is there already);
    comparison summaries, which already begin with a space, are used as they are.
    """
    return _encode(tokenizer, (" " + text) if leading_space else text) + [tokenizer.eos_token_id]


def pad(ids: list[int], length: int, pad_id: int, side: str) -> list[int]:
    """Pad ``ids`` to exactly ``length`` on ``side`` ("left" or "right") (recipe D4, D7).

    Raises:
        ValueError: if ``ids`` is longer than ``length``.
    """
    if len(ids) > length:
        raise ValueError(f"sequence of {len(ids)} tokens exceeds the fixed length {length}")
    padding = [pad_id] * (length - len(ids))
    return padding + ids if side == "left" else ids + padding


def trim_padding(ids: torch.Tensor, pad_id: int, side: str) -> torch.Tensor:
    """Drop columns that are padding in every row, on ``side`` ("left" or "right").

    Exact for models fed through :func:`lit_rlhf.models.forward.model_inputs` (positions come from the
    attention mask), and it saves the compute of all-pad columns on CPU.
    """
    real = (ids != pad_id).any(dim=0)
    if not real.any():
        return ids
    index = torch.nonzero(real).squeeze(1)
    return ids[:, index[0] :] if side == "left" else ids[:, : index[-1] + 1]
