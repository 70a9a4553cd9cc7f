"""Examples for the stages from :class:`~lit_rlhf.data.formats.Record` s: the third step of the one data path.

Each builder renders a record with a :class:`~lit_rlhf.data.templates.Renderer` and pads it to fixed shapes (recipe
D4, D7): queries left-padded to ``query_length``, sequences right-padded to ``max_length``, responses right-padded to
``response_length``. The stages never see which format a row came from. A row that cannot fit raises :class:`Dropped`
(the DataModule drops and counts it); one that was cut to fit says so in ``notes``.

Columns (``*_ids`` are token-id lists, padding is the pad id and nothing else):

* SFT: ``query_ids``, ``input_ids``, ``loss_mask`` (1 where the loss applies: the whole sequence for TL;DR rows, recipe
  §1 SFT, and plain text; the completion for prompt-completion rows; every assistant turn of a conversation),
  ``reference`` (text), ``source``.
* prompts: ``query_ids``, ``reference`` (text, ``""`` without one), ``reference_ids`` (the reference rendered as a
  response, for the reward model's win rate against it), ``prompt_text`` (what a judge reads), ``source``.
* preference: ``query_ids``, ``chosen_ids``/``rejected_ids`` (query + response), ``chosen_response_ids``/
  ``rejected_response_ids``, ``batch`` (group name), ``confidence`` (-1 when absent), ``source``, ``prompt_text``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from lit_rlhf.data.formats import Record, TLDRPost, response_text
from lit_rlhf.data.formatting import pad
from lit_rlhf.data.templates import Renderer

SFT_COLUMNS = ("query_ids", "input_ids", "loss_mask", "reference", "source")
PROMPT_COLUMNS = ("query_ids", "reference", "reference_ids", "prompt_text", "source")
PREFERENCE_COLUMNS = (
    "query_ids", "chosen_ids", "rejected_ids", "chosen_response_ids", "rejected_response_ids", "batch", "confidence", "source",
    "prompt_text",
)
#: ``long_responses`` values: drop a row whose response exceeds its budget (N+'s filter), cut the response's end
#: (TRL's ``keep_start``), or cut its beginning so that its end and end-of-turn token stay (TRL's ``keep_end``; RLHFlow's
#: reward model cuts long conversations from the left, recipe W1)
LONG_RESPONSES = ("drop", "truncate", "keep_end")


class Dropped(ValueError):
    """The row cannot make an example within the configured lengths; ``reason`` words the drop count."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Lengths:
    """Token budgets (recipe D3, D7).

    Attributes:
        query_length: prompt budget and fixed query width (TL;DR: 512).
        response_length: response budget, its end-of-turn / EOS token included (TL;DR SFT: 53, RM: 169).
        max_length: fixed width of query + response (TL;DR SFT: 562, RM: 638).
        long_responses: ``"drop"`` a row whose response exceeds ``response_length`` (or whose query + response
            exceeds ``max_length``), as N+ does, ``"truncate"`` the response to fit (it then has no end token), or
            ``"keep_end"``: keep its last tokens, the end token among them (a language-modelling conversation is cut
            at its end by both).
        cnndm_query_length / cnndm_max_length: the budgets of CNN/DM articles (D3: 1,919 and that + response_length).
        reference_length: the budget of a prompt row's reference answer (``None``: ``response_length``).
    """

    query_length: int
    response_length: int
    max_length: int
    long_responses: str = "drop"
    cnndm_query_length: int = 1919
    cnndm_max_length: Optional[int] = None
    reference_length: Optional[int] = None

    def __post_init__(self) -> None:
        if self.long_responses not in LONG_RESPONSES:
            raise ValueError(f"long_responses must be one of {LONG_RESPONSES}, got '{self.long_responses}'")
        if self.cnndm_max_length is None:
            self.cnndm_max_length = self.cnndm_query_length + self.response_length

    def for_record(self, record: Record) -> tuple[int, int]:
        """``(query_length, max_length)`` of the record (CNN/DM articles have their own, recipe D3)."""
        return (self.cnndm_query_length, self.cnndm_max_length) if record.cnndm else (self.query_length, self.max_length)


def _fit(response: list[int], budget: int, lengths: Lengths, notes: list[str]) -> list[int]:
    """``response`` within ``budget`` tokens: dropped or cut per ``lengths.long_responses``."""
    if len(response) <= budget:
        return response
    if lengths.long_responses == "drop" or budget <= 0:
        raise Dropped("whose response exceeds the fixed length")
    if lengths.long_responses == "keep_end":
        notes.append("whose response lost its beginning")
        return response[-budget:]
    notes.append("whose response was truncated")
    return response[:budget]


def _cut_note(turns_cut: int, notes: list[str]) -> None:
    if turns_cut:
        notes.append("whose prompt was cut to its last turns")


def sft_example(record: Record, renderer: Renderer, lengths: Lengths, source: str) -> tuple[dict[str, Any], list[str]]:
    """One SFT example (columns :data:`SFT_COLUMNS`, fixed shapes) and its notes.

    Raises:
        ValueError: for a record without a completion or conversation (a prompt-only or preference row).
        Dropped: when it does not fit.
    """
    notes: list[str] = []
    pad_id = renderer.tokenizer.pad_token_id
    query_length, max_length = lengths.for_record(record)
    if record.conversation is not None:  # language modelling: the conversation (or text) whole
        ids, mask = renderer.conversation(record.conversation)
        if len(ids) > max_length:
            if lengths.long_responses == "drop":
                raise Dropped("whose conversation exceeds the fixed length")
            notes.append("whose conversation was truncated")
            ids, mask = ids[:max_length], mask[:max_length]
        query = renderer.prompt(record.prompt, query_length).ids if record.prompt else []
    elif record.completion is not None:
        rendered = renderer.prompt(record.prompt, query_length)
        _cut_note(rendered.turns_cut, notes)
        query = rendered.ids
        budget = min(lengths.response_length, max_length - len(query))
        response = _fit(renderer.response(rendered, record.completion), budget, lengths, notes)
        ids = query + response
        # recipe §1 SFT: N+ trains on the whole TL;DR sequence; TRL's prompt-completion default trains on the completion
        mask = [1] * len(ids) if isinstance(record.prompt, TLDRPost) else [0] * len(query) + [1] * len(response)
    else:
        raise ValueError("an SFT row needs a completion or a conversation (a prompt-only or preference row has neither)")
    reference = record.reference_text if record.reference_text is not None else response_text(record.completion)
    return {
        "query_ids": pad(query, query_length, pad_id, "left"),
        "input_ids": pad(ids, max_length, pad_id, "right"),
        "loss_mask": pad(mask, max_length, 0, "right"),
        "reference": reference,
        "source": source,
    }, notes


def prompt_example(record: Record, renderer: Renderer, lengths: Lengths, source: str) -> tuple[dict[str, Any], list[str]]:
    """One prompt example for rollouts and evaluation (columns :data:`PROMPT_COLUMNS`) and its notes.

    The reference answer (a completion, a conversation's last assistant turn, a preference row's chosen response) is
    rendered as a response after the prompt, within ``reference_length`` (and ``max_length`` with the query).

    Raises:
        Dropped: when the prompt or the reference does not fit (``long_responses="drop"``).
    """
    notes: list[str] = []
    pad_id = renderer.tokenizer.pad_token_id
    query_length, max_length = lengths.for_record(record)
    rendered = renderer.prompt(record.prompt, query_length)
    _cut_note(rendered.turns_cut, notes)
    budget = lengths.reference_length or lengths.response_length
    reference_ids: list[int] = []
    if record.reference is not None:
        limit = budget if lengths.reference_length else min(budget, max_length - len(rendered.ids))
        reference_ids = _fit(renderer.response(rendered, record.reference), limit, lengths, notes)
    reference = record.reference_text if record.reference_text is not None else response_text(record.reference)
    return {
        "query_ids": pad(rendered.ids, query_length, pad_id, "left"),
        "reference": reference.strip() if not isinstance(record.prompt, TLDRPost) else reference,
        "reference_ids": pad(reference_ids, budget, pad_id, "right"),
        "prompt_text": renderer.prompt_text(rendered),
        "source": source,
    }, notes


def preference_example(record: Record, renderer: Renderer, lengths: Lengths, source: str) -> tuple[dict[str, Any], list[str]]:
    """One comparison as chosen/rejected sequences (columns :data:`PREFERENCE_COLUMNS`, recipe D7) and its notes.

    Both responses follow the same rendered prompt tokens. CNN/DM articles use their own budgets and are reported as
    the source ``{source}/cnndm`` (recipe R6).

    Raises:
        ValueError: for a record without chosen/rejected responses.
        Dropped: when a response does not fit, or the two responses are the same tokens.
    """
    if record.chosen is None or record.rejected is None:
        raise ValueError("a preference row needs chosen and rejected responses")
    notes: list[str] = []
    pad_id = renderer.tokenizer.pad_token_id
    query_length, max_length = lengths.for_record(record)
    rendered = renderer.prompt(record.prompt, query_length)
    _cut_note(rendered.turns_cut, notes)
    query = rendered.ids
    budget = min(lengths.response_length, max_length - len(query))
    chosen, rejected = (_fit(renderer.response(rendered, side), budget, lengths, notes) for side in (record.chosen, record.rejected))
    if chosen == rejected:
        raise Dropped("whose chosen and rejected responses are identical")
    return {
        "query_ids": pad(query, query_length, pad_id, "left"),
        "chosen_ids": pad(query + chosen, max_length, pad_id, "right"),
        "rejected_ids": pad(query + rejected, max_length, pad_id, "right"),
        "chosen_response_ids": pad(chosen, lengths.response_length, pad_id, "right"),
        "rejected_response_ids": pad(rejected, lengths.response_length, pad_id, "right"),
        "batch": record.batch or source,
        "confidence": record.confidence,
        "source": f"{source}/cnndm" if record.cnndm else source,
        "prompt_text": renderer.prompt_text(rendered),
    }, sorted(set(notes))
