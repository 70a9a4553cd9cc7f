"""TL;DR formatting: query template, clever truncation, padding, completions (recipe D2-D7).

All functions take a Hugging Face tokenizer and plain Python rows; nothing here touches Lightning.
Token ids are built without special tokens (no BOS), as the N+ code does with Pythia.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

#: Recipe D2: no trailing space after ``TL;DR:``.
TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
#: Recipe D2, CNN/DM articles (out-of-distribution evaluation).
CNNDM_TEMPLATE = "Article:\n{article}\n\nTL;DR:\n"


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def format_query_ids(tokenizer: Any, info: Mapping[str, Any], query_length: int) -> list[int]:
    """Token ids of the formatted query, cleverly truncated to at most ``query_length`` (recipe D2, D3).

    TL;DR rows (``subreddit``, ``title``, ``post``) use the TL;DR template; rows with an ``article`` use the
    CNN/DM template. While the query is too long, the body (``post`` or ``article``) is cut at its last
    newline; when no newline is left, the body's tokens are cut from the end until the query fits.

    Args:
        tokenizer: a Hugging Face tokenizer.
        info: the row (or a comparison's ``info``).
        query_length: token budget (512 for TL;DR, 1,919 for CNN/DM in N+).

    Returns:
        the (unpadded) query token ids.

    Raises:
        KeyError: naming a missing field.
        ValueError: when even an empty body does not fit.
    """
    if "article" in info and info["article"] is not None:
        template, body_key, keys = CNNDM_TEMPLATE, "article", ("article",)
    else:
        template, body_key, keys = TLDR_TEMPLATE, "post", ("subreddit", "title", "post")
    fields = {}
    for key in keys:
        if info.get(key) is None:
            raise KeyError(f"missing field '{key}'")
        fields[key] = str(info[key])
    while True:
        ids = _encode(tokenizer, template.format(**fields))
        overflow = len(ids) - query_length
        if overflow <= 0:
            return ids
        body = fields[body_key]
        if not body:
            raise ValueError(f"query does not fit {query_length} tokens even with an empty '{body_key}'")
        newline = body.rfind("\n")
        if newline >= 0:
            fields[body_key] = body[:newline]
        else:  # hard cut: drop as many body tokens as the query overflows by
            body_ids = _encode(tokenizer, body)
            fields[body_key] = tokenizer.decode(body_ids[: max(0, len(body_ids) - overflow)])


def completion_ids(tokenizer: Any, text: str) -> list[int]:
    """Completion token ids: a leading space (added if absent), the text, then EOS (recipe D5).

    SFT reference summaries have no leading space and get one; comparison summaries already start with a
    space and only get the EOS.
    """
    if not text.startswith(" "):
        text = " " + text
    return _encode(tokenizer, text) + [tokenizer.eos_token_id]


def pad(ids: list[int], length: int, pad_id: int, side: str) -> list[int]:
    """Pad ``ids`` to exactly ``length`` on ``side`` ("left" or "right") (recipe D4, D7).

    Raises:
        ValueError: if ``ids`` is longer than ``length``.
    """
    if len(ids) > length:
        raise ValueError(f"sequence of {len(ids)} tokens exceeds the fixed length {length}")
    padding = [pad_id] * (length - len(ids))
    return padding + ids if side == "left" else ids + padding


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
    response = completion_ids(tokenizer, row["summary"])
    if len(response) > response_length or len(query) + len(response) > max_length:
        return None
    pad_id = tokenizer.pad_token_id
    return {
        "query_ids": pad(query, query_length, pad_id, "left"),
        "input_ids": pad(query + response, max_length, pad_id, "right"),
        "reference": row["summary"],
    }


def build_preference_example(
    row: Mapping[str, Any], tokenizer: Any, query_length: int, response_length: int, max_length: int
) -> Optional[dict[str, Any]]:
    """One comparison as chosen/rejected sequences with the fixed shapes of recipe D7.

    ``choice`` picks the chosen summary; the CNN/DM template is used when ``info`` has ``article``.

    Returns:
        ``chosen_ids``/``rejected_ids`` (``max_length`` each: unpadded query + completion, right-padded),
        ``query_ids`` (``query_length``, left-padded), ``chosen_response_ids``/``rejected_response_ids``
        (``response_length`` each: the completion alone, right-padded; DPO appends them to ``query_ids``),
        ``batch`` (str) and ``confidence`` (int, -1 when absent); ``None`` when a summary exceeds
        ``response_length`` tokens.

    Raises:
        KeyError: naming a missing field. ValueError: for a ``choice`` that is not 0 or 1.
    """
    for key in ("info", "summaries", "choice"):
        if row.get(key) is None:
            raise KeyError(f"missing field '{key}'")
    choice = row["choice"]
    if choice not in (0, 1) or len(row["summaries"]) != 2:
        raise ValueError(f"comparison needs two summaries and choice 0 or 1, got choice={choice!r}")
    texts = []
    for summary in row["summaries"]:
        if summary.get("text") is None:
            raise KeyError("missing field 'summaries[].text'")
        texts.append(summary["text"])
    query = format_query_ids(tokenizer, row["info"], query_length)
    chosen, rejected = completion_ids(tokenizer, texts[choice]), completion_ids(tokenizer, texts[1 - choice])
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
