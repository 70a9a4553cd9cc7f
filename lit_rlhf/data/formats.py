"""Dataset formats: a source row becomes a :class:`Record` (a prompt and its response(s)), whatever its format.

This is the first step of the one data path every stage takes (source rows -> :class:`Record` -> token ids through a
:class:`~lit_rlhf.data.templates.Renderer` -> the examples of the DataModules). The formats, detected from the columns
(:func:`detect_format`) or named by ``data.format``:

========================  ==================================================================================
``tldr``                  N+ SFT rows ``{subreddit, title, post, summary}`` (recipe D1; the completion is
                          ``" " + summary``, D5)
``tldr_comparisons``      OpenAI comparisons ``{info, summaries, choice, batch, extra}`` (D1; summaries as they are)
``language_modeling``     TRL: ``text`` (standard) or ``messages`` (conversational)
``prompt_only``           TRL: ``prompt`` (string or messages), optionally a ``reference`` answer
``prompt_completion``     TRL: ``prompt`` and ``completion``
``preference``            TRL, explicit prompt: ``prompt``, ``chosen``, ``rejected``
``implicit_preference``   TRL, implicit prompt: ``chosen`` and ``rejected`` as whole conversations (or texts)
                          sharing their beginning
``hh_rlhf``               Anthropic HH-RLHF: ``chosen``/``rejected`` texts of ``"\\n\\nHuman: "`` /
                          ``"\\n\\nAssistant: "`` turns; the prompt is everything before the last assistant turn
========================  ==================================================================================

A prompt is one of three kinds, which decides how it is rendered: a list of ``{role, content}`` messages (the model's
chat template), a string (plain text, TRL's "standard" format) or a :class:`TLDRPost` (the N+ query template). A
response is a string or one assistant message.

Column names are remapped with :class:`Columns` (``data.prompt_key`` etc., as OpenRLHF does). Rows whose content is
broken (an empty turn, roles that do not alternate, a pair whose sides do not share a prompt, a prompt ending with an
assistant turn) raise :class:`InvalidRow`; the DataModules drop and count them, or stop, per ``data.invalid_rows``.
Rows missing a field raise ``KeyError`` naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from lit_rlhf.data.formatting import is_cnndm

#: every format name, in the order :func:`detect_format` tries them
FORMATS = (
    "tldr_comparisons", "tldr", "preference", "hh_rlhf", "implicit_preference", "prompt_completion", "language_modeling",
    "prompt_only",
)
#: the formats that give chosen/rejected pairs (reward model, DPO, ``eval-rm``)
PREFERENCE_FORMATS = ("tldr_comparisons", "preference", "implicit_preference", "hh_rlhf")
#: the formats that give an SFT target (a completion or a conversation)
SFT_FORMATS = ("tldr", "language_modeling", "prompt_completion")
#: every format can give prompts (PPO, online DPO, ``eval``): a preference row's prompt, with its chosen response as
#: the reference answer; a conversation's turns before its last assistant turn
PROMPT_FORMATS = FORMATS

ROLES = ("system", "user", "assistant")
#: the HH-RLHF turn markers (Bai et al. 2022; the hub's ``Anthropic/hh-rlhf`` text)
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")

Message = dict[str, str]


class InvalidRow(ValueError):
    """A row whose content cannot make a correct example (an empty turn, roles that do not alternate, ...).

    Attributes:
        reason: a short phrase for the drop counts (``"with an empty turn"``).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class TLDRPost:
    """A TL;DR post (or CNN/DM article) rendered by the N+ query template (recipe D2, D3): ``info`` holds
    ``subreddit``, ``title``, ``post`` or ``article``."""

    info: Mapping[str, Any]


Prompt = Union[list, str, TLDRPost]
Response = Union[str, Message]


@dataclass
class Record:
    """One source row, format-free.

    Attributes:
        prompt: messages, a string or a :class:`TLDRPost`.
        completion: the target / reference response (SFT, and the reference answer of prompt rows), or ``None``.
        chosen, rejected: the preferred and the other response of a comparison, or ``None``.
        conversation: a whole conversation to train on (``language_modeling``): messages or a string.
        batch: a group name for per-group metrics (the comparison batch of OpenAI's data, else the row's own
            ``source`` column, else ``""``).
        confidence: the labeller's confidence (1-9), -1 when absent.
        cnndm: a CNN/DM article (reported as its own source, recipe R6).
        reference_text: the reference answer as text for ROUGE and judges (``None``: the reference's text).
    """

    prompt: Prompt
    completion: Optional[Response] = None
    chosen: Optional[Response] = None
    rejected: Optional[Response] = None
    conversation: Optional[Union[list, str]] = None
    batch: str = ""
    confidence: int = -1
    cnndm: bool = False
    reference_text: Optional[str] = None

    @property
    def is_pair(self) -> bool:
        """Whether the record is a preference pair (has a chosen and a rejected response)."""
        return self.chosen is not None

    @property
    def reference(self) -> Optional[Response]:
        """The answer prompt rows are compared against: the completion, else the chosen response."""
        return self.completion if self.completion is not None else self.chosen


@dataclass
class Columns:
    """The column names a source uses (``data.prompt_key``, ...; OpenRLHF's ``--input_key`` idea)."""

    prompt_key: str = "prompt"
    completion_key: str = "completion"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    messages_key: str = "messages"
    text_key: str = "text"
    reference_key: str = "reference"


def detect_format(columns: Any, first_row: Optional[Mapping[str, Any]] = None, keys: Columns = Columns()) -> str:
    """The format of a source from its column names (and its first row, to tell HH-RLHF texts from other texts).

    Raises:
        ValueError: naming the columns found and the formats' columns, when none fits.
    """
    cols = set(columns)
    if {"info", "summaries", "choice"} <= cols:
        return "tldr_comparisons"
    if {"subreddit", "title", "post", "summary"} <= cols:
        return "tldr"
    if {keys.chosen_key, keys.rejected_key} <= cols:
        if keys.prompt_key in cols:
            return "preference"
        chosen = (first_row or {}).get(keys.chosen_key)
        return "hh_rlhf" if isinstance(chosen, str) and HH_TURN.search(chosen) else "implicit_preference"
    if {keys.prompt_key, keys.completion_key} <= cols:
        return "prompt_completion"
    if keys.messages_key in cols or keys.text_key in cols:
        return "language_modeling"
    if keys.prompt_key in cols:
        return "prompt_only"
    raise ValueError(
        f"fits no dataset format: found columns {sorted(cols)}; expected TL;DR {{subreddit, title, post, summary}} or "
        f"{{info, summaries, choice}}, or TRL's '{keys.messages_key}' / '{keys.text_key}', '{keys.prompt_key}' "
        f"(+ '{keys.completion_key}'), '{keys.chosen_key}' + '{keys.rejected_key}' (+ '{keys.prompt_key}'); "
        "other names: data.prompt_key, chosen_key, rejected_key, messages_key, completion_key, text_key"
    )


def required_columns(format: str, keys: Columns = Columns()) -> tuple[str, ...]:
    """The fields every row of ``format`` must have (dotted for nesting), for line-by-line validation."""
    return {
        "tldr": ("subreddit", "title", "post", "summary"),
        "tldr_comparisons": ("info", "summaries", "choice"),
        "language_modeling": (),  # messages or text: checked by to_record
        "prompt_only": (keys.prompt_key,),
        "prompt_completion": (keys.prompt_key, keys.completion_key),
        "preference": (keys.prompt_key, keys.chosen_key, keys.rejected_key),
        "implicit_preference": (keys.chosen_key, keys.rejected_key),
        "hh_rlhf": (keys.chosen_key, keys.rejected_key),
    }[format]


# ---------------------------------------------------------------------------------------------- messages
def _value(row: Mapping[str, Any], key: str) -> Any:
    if row.get(key) is None:
        raise KeyError(f"missing field '{key}'")
    return row[key]


def messages_of(value: Any, what: str) -> list[Message]:
    """``value`` as a list of ``{role, content}`` messages, checked.

    Raises:
        ValueError: for a value that is not a list of messages with a known role and string content.
        InvalidRow: for an empty turn.
    """
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{what}' must be a non-empty list of {{role, content}} messages, got {type(value).__name__}")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"'{what}[{index}]' must be a {{role, content}} message, got {str(message)[:80]!r}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"'{what}[{index}]' has role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"'{what}[{index}]' content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise InvalidRow("with an empty turn", f"'{what}[{index}]' ({role}) is empty")
        messages.append({"role": role, "content": content})
    return messages


def check_turns(messages: list[Message], what: str, ends_with: Optional[str] = None) -> list[Message]:
    """Check that roles alternate: an optional system message first, then user, assistant, user, ...

    Args:
        ends_with: ``"user"`` for a prompt that needs a generation prompt, ``"assistant"`` for a conversation whose
            last turn is a target, ``None`` for either.

    Raises:
        InvalidRow: naming the first turn out of order, or a wrong last turn.
    """
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            offset = len(messages) - len(turns)
            raise InvalidRow(
                "whose roles do not alternate",
                f"'{what}[{index + offset}]' is {'an' if message['role'] == 'assistant' else 'a'} {message['role']} turn where "
                f"{'an' if expected == 'assistant' else 'a'} {expected} turn was expected "
                "(roles must alternate user/assistant after an optional first system message)",
            )
    if not turns:
        raise InvalidRow("with no user turn", f"'{what}' has no user turn")
    if ends_with == "user" and turns[-1]["role"] != "user":
        raise InvalidRow(
            "whose prompt ends with an assistant turn",
            f"'{what}' ends with an assistant turn: a prompt must end with a user turn for the model to answer",
        )
    if ends_with == "assistant" and turns[-1]["role"] != "assistant":
        raise InvalidRow("with no final assistant turn", f"'{what}' ends with a user turn: there is no answer to train on")
    return messages


def parse_hh(text: str, what: str = "text") -> list[Message]:
    """An HH-RLHF dialogue (``"\\n\\nHuman: ..."`` / ``"\\n\\nAssistant: ..."`` turns) as messages.

    Raises:
        ValueError: when the text does not start with a turn marker.
        InvalidRow: for an empty turn.
    """
    if not isinstance(text, str):
        raise ValueError(f"'{what}' must be an HH-RLHF text, got {type(text).__name__}")
    parts = HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError(f"'{what}' does not start with '\\n\\nHuman: ' (HH-RLHF format): {text[:60]!r}")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        if not content.strip():
            raise InvalidRow("with an empty turn", f"'{what}' has an empty {speaker} turn")
        messages.append({"role": role, "content": content})
    return messages


# ---------------------------------------------------------------------------------------------- records
def _response(value: Any, what: str) -> Response:
    """A response: a string, or one assistant message (a one-message list, as TRL's conversational formats hold it)."""
    if isinstance(value, str):
        if not value.strip():
            raise InvalidRow("with an empty response", f"'{what}' is empty")
        return value
    messages = messages_of(value, what)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise InvalidRow(
            "whose response is not one assistant turn", f"'{what}' must be one assistant message, got roles {[m['role'] for m in messages]}"
        )
    return messages[0]


def _prompt(value: Any, what: str) -> Prompt:
    if isinstance(value, str):
        if not value.strip():
            raise InvalidRow("with an empty prompt", f"'{what}' is empty")
        return value
    return check_turns(messages_of(value, what), what, ends_with="user")


def _same_kind(prompt: Prompt, response: Response, what: str) -> Response:
    """A string response to a conversational prompt becomes an assistant message; a message to a text prompt is refused."""
    if isinstance(prompt, list) and isinstance(response, str):
        return {"role": "assistant", "content": response}
    if isinstance(prompt, str) and isinstance(response, dict):
        raise ValueError(f"'{what}' is a message but the prompt is a plain string: use one kind for both")
    return response


def _split_conversation(messages: list[Message], what: str) -> tuple[list[Message], Message]:
    """``(prompt, last assistant message)`` of a conversation that ends with an assistant turn."""
    check_turns(messages, what, ends_with="assistant")
    return messages[:-1], messages[-1]


def _common_text_prefix(chosen: str, rejected: str) -> str:
    """The prompt of an implicit-prompt pair of texts: their common beginning, ending before a space that both
    continuations start with (TRL's ``extract_prompt``)."""
    index = 0
    for index, (a, b) in enumerate(zip(chosen, rejected)):
        if a != b:
            break
    else:
        index = min(len(chosen), len(rejected))
    if index and chosen[index - 1] == " ":
        index -= 1
    return chosen[:index]


def _implicit_pair(chosen: Any, rejected: Any, what: tuple[str, str]) -> tuple[Prompt, Response, Response]:
    """Prompt and the two responses of a pair given as whole conversations (or texts) sharing their beginning.

    Raises:
        InvalidRow: when the two sides do not share everything before their last assistant turn.
    """
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt = _common_text_prefix(chosen, rejected)
        if not prompt.strip():
            raise InvalidRow("whose sides do not share a prompt", f"'{what[0]}' and '{what[1]}' share no beginning")
        return prompt, _response(chosen[len(prompt):], what[0]), _response(rejected[len(prompt):], what[1])
    chosen_prompt, chosen_answer = _split_conversation(messages_of(chosen, what[0]), what[0])
    rejected_prompt, rejected_answer = _split_conversation(messages_of(rejected, what[1]), what[1])
    if chosen_prompt != rejected_prompt:
        raise InvalidRow(
            "whose sides do not share a prompt",
            f"'{what[0]}' and '{what[1]}' differ before their last assistant turn: they do not share a prompt",
        )
    return chosen_prompt, chosen_answer, rejected_answer


def _explicit_response(prompt: Prompt, value: Any, what: str) -> Response:
    """A response of an explicit-prompt pair; a whole conversation that starts with the prompt is cut to its answer."""
    if isinstance(prompt, list) and isinstance(value, list) and len(value) > 1:
        messages = messages_of(value, what)
        if messages[: len(prompt)] != prompt:
            raise InvalidRow(
                "whose sides do not share a prompt", f"'{what}' holds several turns that do not start with the prompt"
            )
        value = messages[len(prompt):]
    return _same_kind(prompt, _response(value, what), what)


def _batch_name(row: Mapping[str, Any]) -> str:
    return str(row.get("batch") or row.get("source") or "")


def to_record(row: Mapping[str, Any], format: str, keys: Columns = Columns()) -> Record:
    """The :class:`Record` of one source row of ``format``.

    Raises:
        KeyError: naming a missing field.
        ValueError: for a field of the wrong type or shape (naming it).
        InvalidRow: for broken content (empty turn, roles out of order, sides without a shared prompt, ...).
    """
    if format == "tldr":
        for key in ("subreddit", "title", "post", "summary"):
            _value(row, key)
        # recipe D5: the completion is " " + summary, the reference text the summary itself
        return Record(TLDRPost(row), completion=" " + row["summary"], batch=_batch_name(row), reference_text=row["summary"])
    if format == "tldr_comparisons":
        return _tldr_comparison(row)
    if format == "hh_rlhf":
        chosen = parse_hh(_value(row, keys.chosen_key), keys.chosen_key)
        rejected = parse_hh(_value(row, keys.rejected_key), keys.rejected_key)
        prompt, chosen_answer, rejected_answer = _implicit_pair(chosen, rejected, (keys.chosen_key, keys.rejected_key))
        return Record(prompt, chosen=chosen_answer, rejected=rejected_answer, batch=_batch_name(row))
    if format == "implicit_preference":
        prompt, chosen, rejected = _implicit_pair(
            _value(row, keys.chosen_key), _value(row, keys.rejected_key), (keys.chosen_key, keys.rejected_key)
        )
        return Record(prompt, chosen=chosen, rejected=rejected, batch=_batch_name(row))
    if format == "preference":
        prompt = _prompt(_value(row, keys.prompt_key), keys.prompt_key)
        chosen = _explicit_response(prompt, _value(row, keys.chosen_key), keys.chosen_key)
        rejected = _explicit_response(prompt, _value(row, keys.rejected_key), keys.rejected_key)
        return Record(prompt, chosen=chosen, rejected=rejected, batch=_batch_name(row))
    if format == "prompt_completion":
        prompt = _prompt(_value(row, keys.prompt_key), keys.prompt_key)
        completion = _explicit_response(prompt, _value(row, keys.completion_key), keys.completion_key)
        return Record(prompt, completion=completion, batch=_batch_name(row))
    if format == "prompt_only":
        prompt = _prompt(_value(row, keys.prompt_key), keys.prompt_key)
        reference = row.get(keys.reference_key)
        completion = _same_kind(prompt, _response(reference, keys.reference_key), keys.reference_key) if reference else None
        return Record(prompt, completion=completion, batch=_batch_name(row))
    if format == "language_modeling":
        if row.get(keys.messages_key) is not None:
            messages = check_turns(messages_of(row[keys.messages_key], keys.messages_key), keys.messages_key)
            if not any(message["role"] == "assistant" for message in messages):
                raise InvalidRow("with no assistant turn", f"'{keys.messages_key}' has no assistant turn to train on")
            # as a prompt row: the turns before the last assistant turn, that turn the reference
            last = max(index for index, message in enumerate(messages) if message["role"] == "assistant")
            return Record(messages[:last], completion=messages[last], conversation=messages, batch=_batch_name(row))
        text = _value(row, keys.text_key)
        if not isinstance(text, str) or not text.strip():
            raise InvalidRow("with an empty text", f"'{keys.text_key}' is empty or not a string")
        return Record("", conversation=text, batch=_batch_name(row))
    raise ValueError(f"unknown data format '{format}'; formats: {', '.join(FORMATS)}")


def _tldr_comparison(row: Mapping[str, Any]) -> Record:
    """An OpenAI comparison (recipe D1): ``choice`` picks the chosen summary; summaries are used as they are (D5)."""
    _value(row, "info")
    for key in ("summaries", "choice"):
        if key not in row:
            raise KeyError(f"missing field '{key}'")
    problem = comparison_problem(row)  # a null or out-of-range choice is named as such
    if problem:
        raise ValueError(problem)
    texts = []
    for summary in row["summaries"]:
        if not isinstance(summary, Mapping) or summary.get("text") is None:
            raise KeyError("missing field 'summaries[].text'")
        texts.append(summary["text"])
    choice, info = row["choice"], row["info"]
    confidence = (row.get("extra") or {}).get("confidence")
    return Record(
        TLDRPost(info), chosen=texts[choice], rejected=texts[1 - choice], batch=str(row.get("batch") or "unknown"),
        confidence=int(confidence) if confidence is not None else -1, cnndm=is_cnndm(info),
    )


def comparison_problem(row: Mapping[str, Any]) -> Optional[str]:
    """What is wrong with a comparison row's ``summaries`` (other than 2 entries, saying how many) or ``choice``
    (not 0 or 1), or ``None``. Used on every line of a local file (file and line in the error)."""
    summaries, choice = row.get("summaries"), row.get("choice")
    if not isinstance(summaries, list) or len(summaries) != 2:
        count = f"{len(summaries)} entries" if isinstance(summaries, list) else f"a {type(summaries).__name__}"
        return f"field 'summaries' must hold exactly 2 summaries, got {count}"
    if choice not in (0, 1) or isinstance(choice, bool):
        return f"field 'choice' must be 0 or 1, got {choice!r}"
    return None


def response_text(response: Optional[Response]) -> str:
    """The text of a response (a message's content), ``""`` for none."""
    if response is None:
        return ""
    return response["content"] if isinstance(response, dict) else response
