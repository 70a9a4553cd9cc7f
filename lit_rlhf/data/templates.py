"""Token ids of prompts and responses: the N+ TL;DR template, plain text, or the model's chat template.

A :class:`Renderer` is the second step of the one data path (:mod:`lit_rlhf.data.formats` gives the
:class:`~lit_rlhf.data.formats.Record`, the renderer its token ids, :mod:`lit_rlhf.data.examples` the examples). The
kind of the record's prompt decides the template:

* :class:`~lit_rlhf.data.formats.TLDRPost`: the N+ query template with clever truncation (recipe D2, D3), a response
  is ``text + EOS`` (D5); token ids exactly as N+ builds them.
* a string (TRL's standard formats): the text; a response is ``text + EOS``.
* messages: ``tokenizer.apply_chat_template``. The prompt is rendered with ``add_generation_prompt=True``; a response is
  the token difference between the rendered prompt + response and the rendered prompt, which must start with the
  rendered prompt (as TRL and OpenRLHF compute it), cut after the template's end-of-turn token, so that it ends with
  exactly one end-of-turn token, the one generation stops at and the reward model scores (recipe W1); its leading
  whitespace is dropped (it would merge with the generation prompt's last token into tokens the model never samples
  there). Control tokens
  inside message content are encoded as text (``sanitize_control_tokens``): a user cannot end a turn, or write the
  pad id, by typing ``<|im_end|>`` or ``[PAD]``.

Plain text is encoded without special tokens, special-token strings as text (``split_special_tokens``), so no text a
row holds can produce the pad id: padding is where ``ids == pad_token_id``, and nowhere else. A model that uses a BOS
(its tokenizer adds one to plain text) gets exactly one at the start of every prompt and conversation, never two (the
double-BOS of a templated string passed through a tokenizer that adds one, recipe §3 pitfalls).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from lit_rlhf.data import formatting
from lit_rlhf.data.formats import Message, Prompt, Response, TLDRPost
from lit_rlhf.models.loading import stop_token_ids


class TemplateError(ValueError):
    """The chat template does not render prompts and responses consistently (a rendered prompt that is not a prefix
    of the rendered prompt + response, or an assistant turn without an end-of-turn token)."""


def uses_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS before plain text (Llama, Gemma: yes; GPT-NeoX, SmolLM2: no)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


@dataclass
class RenderedPrompt:
    """A prompt's token ids and the prompt they render (after any left truncation).

    Attributes:
        ids: the token ids (BOS first where the model uses one).
        prompt: the prompt as rendered: for messages, the turns kept.
        turns_cut: user/assistant exchanges cut from the left to fit the budget.
    """

    ids: list[int]
    prompt: Prompt
    turns_cut: int = 0


class Renderer:
    """Renders :class:`~lit_rlhf.data.formats.Record` prompts and responses to token ids (see the module docstring).

    Args:
        tokenizer: a Hugging Face tokenizer from :func:`~lit_rlhf.models.loading.load_tokenizer` (a pad id distinct
            from every stop id, recipe D6).
        system_prompt: a system message put first in every conversation that has none (``None``: the template's own
            default; the SmolLM2 template adds "You are a helpful AI assistant named SmolLM, ...").

    Raises:
        ValueError: for conversational rows when the tokenizer has no chat template (raised at the first such row).
    """

    def __init__(self, tokenizer: Any, system_prompt: Optional[str] = None) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.eos_id = tokenizer.eos_token_id
        self.stop_ids = stop_token_ids(tokenizer)
        self.bos = [tokenizer.bos_token_id] if uses_bos(tokenizer) else []

    # ------------------------------------------------------------------ plain text
    def encode(self, text: str) -> list[int]:
        """Token ids of plain text: no special token added, special-token strings encoded as text."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    # ------------------------------------------------------------------ chat
    def render(self, messages: list[Message], generation_prompt: bool) -> list[int]:
        """Token ids of ``messages`` through the chat template (with :attr:`system_prompt`), exactly one BOS where
        the model uses one.

        Raises:
            ValueError: when the tokenizer has no chat template.
            TemplateError: when the template renders two BOS tokens.
        """
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"conversational rows need a chat template, and the tokenizer {self.tokenizer.name_or_path} has none: use a "
                "chat model's tokenizer (or set tokenizer.chat_template and save it), or a plain-text format"
            )
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        ids = list(self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False, sanitize_control_tokens=True,
        ))
        if self.bos:
            if ids[:2] == self.bos * 2:
                raise TemplateError("the chat template renders two BOS tokens")
            if ids[:1] != self.bos:
                ids = self.bos + ids
        return ids

    def _turn(self, before: list[Message], before_ids: list[int], message: Message) -> list[int]:
        """The tokens of assistant ``message`` after the rendered generation prompt ``before_ids`` of ``before``: the
        token difference, cut after the template's end-of-turn token.

        Raises:
            TemplateError: when ``before_ids`` is not a prefix of the rendering of ``before + [message]``, or the turn
                has no end-of-turn token.
        """
        # leading whitespace would merge with the generation prompt's last token ("\n" + "  Sure" -> "\n ", " Sure"),
        # which the model never samples after the generation prompt: an answer starts at its first visible character
        message = {**message, "content": message["content"].lstrip()}
        full = self.render([*before, message], generation_prompt=False)
        if full[: len(before_ids)] != before_ids:
            raise TemplateError(
                "the rendered prompt (add_generation_prompt=True) is not a prefix of the rendered prompt + response: "
                "this chat template changes earlier turns when a turn is added"
            )
        tail = full[len(before_ids):]
        ends = [index for index, token in enumerate(tail) if token in self.stop_ids]
        if not ends:
            raise TemplateError(
                f"the chat template ends an assistant turn with none of the stop tokens "
                f"{self.tokenizer.convert_ids_to_tokens(self.stop_ids)}"
            )
        return tail[: ends[0] + 1]  # content is sanitized: the first stop token is the template's end of turn

    # ------------------------------------------------------------------ prompts and responses
    def prompt(self, prompt: Prompt, budget: int) -> RenderedPrompt:
        """The token ids of ``prompt`` within ``budget`` tokens.

        TL;DR posts are cleverly truncated (recipe D3); conversations keep their last turns, cut at exchange
        boundaries from the left (a first system message is kept); plain text is never cut.

        Raises:
            QueryTooLong: when the prompt does not fit even so (the row is dropped and counted).
        """
        if isinstance(prompt, TLDRPost):
            return RenderedPrompt(self.bos + formatting.format_query_ids(self.tokenizer, prompt.info, budget - len(self.bos)), prompt)
        if isinstance(prompt, str):
            ids = self.bos + self.encode(prompt)
            if len(ids) > budget:
                raise formatting.QueryTooLong(f"the prompt takes {len(ids)} tokens, more than the budget of {budget}")
            return RenderedPrompt(ids, prompt)
        system = prompt[:1] if prompt[0]["role"] == "system" else []
        turns = prompt[len(system):]
        cut = 0
        while True:
            kept = [*system, *turns[cut:]]
            ids = self.render(kept, generation_prompt=True)
            if len(ids) <= budget:
                return RenderedPrompt(ids, kept, cut // 2)
            cut += 2  # one user/assistant exchange
            if cut >= len(turns):
                raise formatting.QueryTooLong(f"the last user turn alone takes {len(ids)} tokens, more than the budget of {budget}")

    def response(self, rendered: RenderedPrompt, response: Response) -> list[int]:
        """The token ids of ``response`` after ``rendered``: ``text + EOS`` for text prompts (recipe D5), the chat
        template's assistant turn ending with exactly one end-of-turn token for messages."""
        if isinstance(rendered.prompt, list):
            message = response if isinstance(response, dict) else {"role": "assistant", "content": response}
            return self._turn(rendered.prompt, rendered.ids, message)
        if isinstance(response, dict):
            raise ValueError("a message response needs a conversational prompt")
        return formatting.completion_ids(self.tokenizer, response, leading_space=False)

    def conversation(self, conversation: Union[list[Message], str]) -> tuple[list[int], list[int]]:
        """Token ids of a whole conversation (or text) to train on, and its loss mask: 1 on the tokens of every assistant
        turn (its end-of-turn token included), 0 on system/user turns and the template's role headers; all 1 for text
        (``text + EOS``). Template tokens after the last assistant turn are left out.

        Raises:
            TemplateError: see :meth:`_turn`.
        """
        if isinstance(conversation, str):
            ids = self.bos + self.encode(conversation) + [self.eos_id]
            return ids, [1] * len(ids)
        ids = self.render(conversation, generation_prompt=False)
        mask = [0] * len(ids)
        end = 0
        for index, message in enumerate(conversation):
            if message["role"] != "assistant":
                continue
            before = self.render(conversation[:index], generation_prompt=True)
            turn = self._turn(conversation[:index], before, message)
            start, end = len(before), len(before) + len(turn)
            if ids[:end] != before + turn:
                raise TemplateError("the chat template renders a conversation differently from its turns one by one")
            mask[start:end] = [1] * len(turn)
        return ids[:end], mask[:end]

    def prompt_text(self, rendered: RenderedPrompt) -> str:
        """What a judge reads as the prompt: the TL;DR query without its ``TL;DR:`` ending (the post as truncated),
        the text, or the conversation (the user message alone for a single-turn one)."""
        prompt = rendered.prompt
        if isinstance(prompt, TLDRPost):
            text = self.tokenizer.decode(rendered.ids, skip_special_tokens=True).rstrip()
            return text[: -len("TL;DR:")].rstrip() if text.endswith("TL;DR:") else text
        if isinstance(prompt, str):
            return prompt
        turns = [message for message in prompt if message["role"] != "system"]
        if len(turns) == 1:
            return turns[0]["content"].strip()
        return "\n\n".join(f"{message['role'].capitalize()}: {message['content'].strip()}" for message in turns)

