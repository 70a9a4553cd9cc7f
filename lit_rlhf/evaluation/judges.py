"""Pairwise judges of two responses to the same prompt: an LLM over an OpenAI-compatible endpoint, or a local causal LM.

Both show the two responses in a random order per item (recorded, so position bias cancels out over the items) and
answer with a :class:`Verdict` from the point of view of the *first* response passed in (``a``: the policy's). The
reward-model judge works on token ids inside the sampling loop instead (:mod:`lit_rlhf.evaluation.evaluate`).

Two judge prompts, chosen by the data's task (:attr:`~lit_rlhf.data.datamodules.PromptDataModule.task`):

* ``"summarization"``: the TL;DR prompt of Rafailov et al. 2023 (DPO, appendix C.2), which Huang et al. 2024 (N+)
  use with GPT-3.5 for their win rates against the reference summaries;
* ``"chat"``: a pairwise comparison of two assistants' answers to a user's conversation in the style of MT-Bench's
  pairwise judge (Zheng et al. 2023, "Judging LLM-as-a-judge") and AlpacaEval: helpfulness, accuracy and detail, an
  instruction not to let order or length decide, a short explanation, then a verdict ``[[A]]``, ``[[B]]`` or
  ``[[C]]`` (a tie, which counts half).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import urlparse

log = logging.getLogger(__name__)

#: Rafailov et al. 2023 (DPO), appendix C.2: the GPT-4 prompt for TL;DR summarisation win rates
JUDGE_PROMPT = """Which of the following summaries does a better job of summarizing the most important points in the \
given forum post, without including unimportant or irrelevant details? A good summary is both precise and concise.

Post:
{post}

Summary A:
{summary_a}

Summary B:
{summary_b}

FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why. SECOND, on a new \
line, state only "A" or "B" to indicate your choice. Your response should use the format:
Comparison: <one-sentence comparison and explanation>
Preferred: <"A" or "B">"""

#: pairwise chat judging, in the style of MT-Bench's pairwise judge and AlpacaEval (our wording): what to judge ...
_CHAT_CRITERIA = """You are an impartial judge. Two AI assistants answered the same conversation with a user. Decide \
which assistant gave the better final answer: the one that follows the user's instructions and is more helpful, \
relevant, accurate and appropriately detailed. The order in which the answers are shown must not affect your decision, \
and neither must their length: a longer answer is not better for being longer."""
#: ... what the judge reads ...
_CHAT_ITEM = """[Conversation]
{post}

[Assistant A's answer]
{summary_a}
[End of assistant A's answer]

[Assistant B's answer]
{summary_b}
[End of assistant B's answer]"""
#: ... and how it answers: a verdict line, "[[C]]" a tie
CHAT_JUDGE_PROMPT = (
    _CHAT_CRITERIA + ' Explain your comparison in a few sentences, then give your verdict on its own line as "[[A]]" if '
    'assistant A is better, "[[B]]" if assistant B is better, or "[[C]]" for a tie.\n\n' + _CHAT_ITEM
)

#: the judge prompt of each task (:attr:`~lit_rlhf.data.datamodules.PromptDataModule.task`)
JUDGE_PROMPTS = {"summarization": JUDGE_PROMPT, "chat": CHAT_JUDGE_PROMPT}

#: the same questions for a judge read through its next-token probabilities: the answer is one letter
LETTER_PROMPTS = {
    "summarization": JUDGE_PROMPT[: JUDGE_PROMPT.index("FIRST provide")] + 'Answer with only "A" or "B".',
    "chat": _CHAT_CRITERIA + "\n\n" + _CHAT_ITEM + '\n\nAnswer with only "A" or "B".',
}

_PREFERRED = re.compile(r"Preferred\s*:\s*[\"'*]*\s*([AB])\b", re.IGNORECASE)
_BRACKETED = re.compile(r"\[\[([ABC])\]\]")
_LONE_LETTER = re.compile(r"(?:^|[\s\"'*(])([AB])(?:$|[\s\"'*).:,])")


@dataclass
class Verdict:
    """One judged item.

    Attributes:
        outcome: 1.0 when summary ``a`` is preferred, 0.0 when ``b`` is, 0.5 when the answer named neither.
        order: ``"ab"`` when ``a`` was shown as "Summary A", ``"ba"`` when it was shown as "Summary B".
        answer: the letter the judge chose for the shown order (``"A"``/``"B"``), or ``None`` if unparsable.
        raw: the judge's raw answer (text, or the two letters' probabilities).
        cached: the answer came from the cache, not a new request.
    """

    outcome: float
    order: str
    answer: Optional[str]
    raw: str
    cached: bool = False

    def to_dict(self) -> dict:
        """The verdict as a JSON-ready dict (its fields by name)."""
        return asdict(self)


def parse_choice(text: str) -> Optional[str]:
    """The letter of a judge's answer: the last ``[[A]]``/``[[B]]``/``[[C]]`` (chat verdict, C a tie), else the
    ``Preferred: X`` line, else the last lone ``A``/``B``; ``None`` if none."""
    verdicts = _BRACKETED.findall(text)
    if verdicts:
        return verdicts[-1]
    match = _PREFERRED.search(text)
    if match:
        return match.group(1).upper()
    letters = _LONE_LETTER.findall(text)
    return letters[-1].upper() if letters else None


def _outcome(answer: Optional[str], order: str) -> float:
    if answer is None or answer == "C":  # unparsed, or a tie
        return 0.5
    a_shown_as = "A" if order == "ab" else "B"
    return 1.0 if answer == a_shown_as else 0.0


def _orders(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["ab" if rng.random() < 0.5 else "ba" for _ in range(count)]


def _prompt(template: str, post: str, a: str, b: str, order: str) -> str:
    first, second = (a, b) if order == "ab" else (b, a)
    return template.format(post=post.strip(), summary_a=first.strip(), summary_b=second.strip())


class ChatJudge:
    """An LLM judge over an OpenAI-compatible ``/v1/chat/completions`` endpoint (OpenAI, vLLM, ``transformers serve``),
    through the ``openai`` client (its retries with exponential back-off and its timeouts).

    Args:
        base_url: the endpoint's base, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model: the model name the endpoint serves.
        api_key_env: the environment variable holding the key; a server on localhost needs none.
        cache_path: a JSONL file of answers keyed by (model, prompt), appended after every answer, so that a re-run
            (or a run resumed after a crash) asks nothing twice; ``None``: no cache.
        seed: seeds the per-item order of the two summaries (the same seed gives the same prompts, hence cache hits).
        max_retries: retries per request (the client backs off exponentially between them).
        timeout: seconds per request.
        max_tokens, temperature: of the judge's answer (N+: greedy).

    Raises:
        ValueError: without a key for a non-local endpoint (naming ``api_key_env``).
        ImportError: without the ``openai`` package (``pip install lit_rlhf[judge]``).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        cache_path: Optional[str] = None,
        seed: int = 0,
        max_retries: int = 5,
        timeout: float = 120.0,
        max_tokens: int = 128,
        temperature: float = 0.0,
    ) -> None:
        try:
            import openai
        except ImportError as error:
            raise ImportError("the LLM judge needs the openai package: pip install 'lit_rlhf[judge]'") from error
        key = os.environ.get(api_key_env)
        if not key:
            if urlparse(base_url).hostname not in ("127.0.0.1", "localhost", "::1"):
                raise ValueError(f"no API key for {base_url}: set the environment variable {api_key_env}")
            key = "unused"
        self.base_url, self.model, self.seed = base_url, model, seed
        self.max_tokens, self.temperature = max_tokens, temperature
        self._openai = openai
        self.client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=max_retries, timeout=timeout)
        self.cache_path = Path(cache_path) if cache_path else None
        self.cache = self._read_cache()

    def _key(self, prompt: str) -> str:
        return hashlib.sha256(json.dumps([self.model, self.max_tokens, self.temperature, prompt]).encode()).hexdigest()

    def _read_cache(self) -> dict[str, str]:
        if self.cache_path is None or not self.cache_path.is_file():
            return {}
        cache = {}
        for number, line in enumerate(self.cache_path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                cache[record["key"]] = record["answer"]
            except (json.JSONDecodeError, KeyError) as error:  # a line cut by a crash: ask that item again
                log.warning("%s:%d: unreadable judge cache line skipped (%s)", self.cache_path, number, error)
        return cache

    def ask(self, prompt: str) -> tuple[str, bool]:
        """The judge's answer to ``prompt`` and whether it came from the cache.

        Raises:
            RuntimeError: when the endpoint cannot be reached or answers with an error after the retries.
        """
        key = self._key(prompt)
        if key in self.cache:
            return self.cache[key], True
        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}],
                max_tokens=self.max_tokens, temperature=self.temperature,
            )
        except self._openai.APIError as error:
            raise RuntimeError(f"judge endpoint {self.base_url} (model {self.model}) failed: {error}") from error
        answer = response.choices[0].message.content or ""
        self.cache[key] = answer
        if self.cache_path is not None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with self.cache_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"key": key, "model": self.model, "prompt": prompt, "answer": answer}) + "\n")
        return answer, False

    def judge(
        self, posts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str], progress: bool = True,
        task: str = "summarization",
    ) -> list[Verdict]:
        """One :class:`Verdict` per item, from ``a``'s side; the order per item comes from ``seed`` and the item index.

        Args:
            posts: what the judge reads as the prompt (a post, or a conversation; a batch's ``prompt_text``).
            task: ``"summarization"`` or ``"chat"`` (:data:`JUDGE_PROMPTS`).

        Raises:
            ValueError: if the three sequences differ in length, or for an unknown task.
            RuntimeError: as :meth:`ask` (the answers so far are in the cache).
        """
        _check_lengths(posts, responses_a, responses_b)
        template = _template(JUDGE_PROMPTS, task)
        verdicts = []
        for post, a, b, order in _progress(list(zip(posts, responses_a, responses_b, _orders(len(posts), self.seed))), progress):
            answer, cached = self.ask(_prompt(template, post, a, b, order))
            choice = parse_choice(answer)
            verdicts.append(Verdict(_outcome(choice, order), order, choice, answer, cached))
        return verdicts


class LogprobJudge:
    """A local Hugging Face causal LM as judge: the letter prompt (:data:`LETTER_PROMPTS`, in the model's chat template
    when it has one) and the next-token probabilities of ``A`` and ``B``; the likelier letter is the answer.

    Args:
        model: a Hugging Face directory or hub name (``"smollm2-135m"``: the packaged SmolLM2-135M-Instruct).
        seed: seeds the per-item order of the two summaries.
        batch_size: prompts per forward pass.
        device: where the model runs.
    """

    def __init__(self, model: str = "smollm2-135m", seed: int = 0, batch_size: int = 8, device: str = "cpu") -> None:
        import torch

        from lit_rlhf.models.loading import load_causal_lm, load_tokenizer

        self.tokenizer = load_tokenizer(model)
        self.model = load_causal_lm(model, dtype=torch.float32).to(device).eval()
        self.seed, self.batch_size, self.device = seed, batch_size, device
        self.letter_ids = [self._letter_id(letter) for letter in ("A", "B")]

    def _letter_id(self, letter: str) -> int:
        ids = self.tokenizer.encode(letter, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the judge's tokenizer splits {letter!r} into {len(ids)} tokens")
        return ids[0]

    def encode(self, prompt: str) -> list[int]:
        """The token ids of ``prompt`` as the judge reads it: in the model's chat template when it has one (the user
        turn, then the assistant's generation prompt), else followed by an ``Answer:`` line. Text inside the prompt (a post,
        a response) is encoded as text: a ``[PAD]`` or ``<|im_end|>`` written in it never becomes that token."""
        if getattr(self.tokenizer, "chat_template", None):
            return list(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True, return_dict=False,
                sanitize_control_tokens=True,
            ))
        return self.tokenizer(prompt + "\nAnswer:", add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def letter_probabilities(self, prompts: Sequence[str]):
        """``(N, 2)`` probabilities of ``A`` and ``B`` as the next token after each prompt (renormalised over the two)."""
        import torch

        from lit_rlhf.models.forward import model_inputs

        rows, pad = [], self.tokenizer.pad_token_id
        for start in range(0, len(prompts), self.batch_size):
            rows_ids = [self.encode(p) for p in prompts[start : start + self.batch_size]]
            ids = self.tokenizer.pad({"input_ids": rows_ids}, padding=True, return_tensors="pt")["input_ids"]  # left-padded
            with torch.no_grad():
                logits = self.model(**model_inputs(ids.to(self.device), pad)).logits[:, -1, self.letter_ids].float()
            rows.append(torch.softmax(logits, dim=-1).cpu())
        return torch.cat(rows) if rows else torch.zeros(0, 2)

    def judge(
        self, posts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str], progress: bool = True,
        task: str = "summarization",
    ) -> list[Verdict]:
        """As :meth:`ChatJudge.judge` (with :data:`LETTER_PROMPTS`); ``raw`` holds the two letters' probabilities."""
        _check_lengths(posts, responses_a, responses_b)
        orders = _orders(len(posts), self.seed)
        template = _template(LETTER_PROMPTS, task)
        prompts = [_prompt(template, *item, order) for item, order in zip(zip(posts, responses_a, responses_b), orders)]
        probabilities = self.letter_probabilities(prompts)
        verdicts = []
        for (p_a, p_b), order in zip(probabilities.tolist(), orders):
            answer = "A" if p_a > p_b else "B" if p_b > p_a else None
            verdicts.append(Verdict(_outcome(answer, order), order, answer, json.dumps({"A": p_a, "B": p_b})))
        return verdicts


def _template(templates: dict[str, str], task: str) -> str:
    if task not in templates:
        raise ValueError(f"unknown judge task '{task}' ({', '.join(templates)})")
    return templates[task]


def _check_lengths(*sequences: Sequence) -> None:
    if len({len(s) for s in sequences}) > 1:
        raise ValueError(f"posts and the two response lists differ in length: {[len(s) for s in sequences]}")


def _progress(items: list, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="judging", unit="pair")
