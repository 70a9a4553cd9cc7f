"""TL;DR formatting: query template, clever truncation, padding, completions (recipe D2-D7).

All functions take a Hugging Face tokenizer and plain Python rows; nothing here touches Lightning.
Token ids are built without special tokens (no BOS), as the N+ code does with Pythia.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

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
    return tokenizer.encode(text, add_special_tokens=False)


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
    """Completion token ids: the text, then EOS, with a space prepended when ``leading_space`` (recipe D5).

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


#: the columns of :func:`build_sft_example`'s and :func:`build_preference_example`'s examples
SFT_COLUMNS = ("query_ids", "input_ids", "reference")
PREFERENCE_COLUMNS = ("query_ids", "chosen_ids", "rejected_ids", "chosen_response_ids", "rejected_response_ids", "batch", "confidence")


def build_sft_example(
    row: Mapping[str, Any], tokenizer: Any, query_length: int, response_length: int, max_length: int
) -> Optional[dict[str, Any]]:
    """One SFT example with the fixed shapes of recipe D7, or ``None`` when the reference is too long.

    Returns:
        ``query_ids`` (``query_length``, left-padded: the prompt for sampling), ``input_ids``
        (``max_length``: unpadded query + reference completion, right-padded) and ``reference`` (text).
    """
    query = format_query_ids(tokenizer, row, query_length)
    if row.get("summary") is None:
        raise KeyError("missing field 'summary'")
    response = completion_ids(tokenizer, row["summary"], leading_space=True)
    if len(response) > response_length or len(query) + len(response) > max_length:
        return None
    pad_id = tokenizer.pad_token_id
    return {
        "query_ids": pad(query, query_length, pad_id, "left"),
        "input_ids": pad(query + response, max_length, pad_id, "right"),
        "reference": row["summary"],
    }


def comparison_problem(row: Mapping[str, Any]) -> Optional[str]:
    """What is wrong with a comparison row's ``summaries`` (other than 2 entries, saying how many) or ``choice``
    (not 0 or 1), or ``None``. Used on every line of a local file (file and line in the error) and in
    :func:`build_preference_example`."""
    summaries, choice = row.get("summaries"), row.get("choice")
    if not isinstance(summaries, list) or len(summaries) != 2:
        count = f"{len(summaries)} entries" if isinstance(summaries, list) else f"a {type(summaries).__name__}"
        return f"field 'summaries' must hold exactly 2 summaries, got {count}"
    if choice not in (0, 1) or isinstance(choice, bool):
        return f"field 'choice' must be 0 or 1, got {choice!r}"
    return None


def build_preference_example(
    row: Mapping[str, Any],
    tokenizer: Any,
    query_length: int,
    response_length: int,
    max_length: int,
    cnndm_query_length: int = CNNDM_QUERY_LENGTH,
    cnndm_max_length: Optional[int] = None,
) -> Optional[dict[str, Any]]:
    """One comparison as chosen/rejected sequences with the fixed shapes of recipe D7.

    ``choice`` picks the chosen summary. When ``info`` has an ``article`` (CNN/DM), the CNN/DM template and the
    budgets ``cnndm_query_length`` (D3: 1,919) and ``cnndm_max_length`` (``None`` = ``cnndm_query_length +
    response_length``) replace ``query_length`` and ``max_length``.

    Returns:
        ``chosen_ids``/``rejected_ids`` (``max_length`` each: unpadded query + completion, right-padded),
        ``query_ids`` (``query_length``, left-padded), ``chosen_response_ids``/``rejected_response_ids``
        (``response_length`` each: the completion alone, right-padded; DPO appends them to ``query_ids``),
        ``batch`` (str) and ``confidence`` (int, -1 when absent); ``None`` when a summary exceeds
        ``response_length`` tokens.

    Raises:
        KeyError: naming a missing field. ValueError: for ``summaries`` with other than 2 entries (saying how many)
        or a ``choice`` that is not 0 or 1. QueryTooLong: see :func:`format_query_ids`.
    """
    for key in ("info", "summaries", "choice"):
        if row.get(key) is None:
            raise KeyError(f"missing field '{key}'")
    problem = comparison_problem(row)
    if problem:
        raise ValueError(problem)
    choice = row["choice"]
    texts = []
    for summary in row["summaries"]:
        if summary.get("text") is None:
            raise KeyError("missing field 'summaries[].text'")
        texts.append(summary["text"])
    if is_cnndm(row["info"]):
        query_length = cnndm_query_length
        max_length = cnndm_max_length if cnndm_max_length is not None else cnndm_query_length + response_length
    query = format_query_ids(tokenizer, row["info"], query_length)
    chosen, rejected = (completion_ids(tokenizer, texts[index], leading_space=False) for index in (choice, 1 - choice))
    if max(len(chosen), len(rejected)) > response_length or len(query) + max(len(chosen), len(rejected)) > max_length:
        return None
    pad_id = tokenizer.pad_token_id
    confidence = (row.get("extra") or {}).get("confidence")
    return {
        "query_ids": pad(query, query_length, pad_id, "left"),
        "chosen_ids": pad(query + chosen, max_length, pad_id, "right"),
        "rejected_ids": pad(query + rejected, max_length, pad_id, "right"),
        "chosen_response_ids": pad(chosen, response_length, pad_id, "right"),
        "rejected_response_ids": pad(rejected, response_length, pad_id, "right"),
        "batch": str(row.get("batch") or "unknown"),
        "confidence": int(confidence) if confidence is not None else -1,
    }


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
