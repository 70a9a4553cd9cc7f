"""The pairwise judges: answer parsing, order randomisation, and the LLM judge against a real OpenAI-compatible
server (``transformers serve`` with the packaged SmolLM2-135M-Instruct on 127.0.0.1; no mocked HTTP)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from stage_helpers import free_port

from lit_rlhf.evaluation.judges import (
    JUDGE_PROMPTS,
    LETTER_PROMPTS,
    ChatJudge,
    LogprobJudge,
    Verdict,
    _orders,
    _outcome,
    _prompt,
    _template,
    parse_choice,
)

POSTS = [
    "I (24F) adopted a cat last month. She hides under the bed all day and only eats at night. Is this normal?",
    "My landlord kept my whole deposit for 'cleaning' although I cleaned everything and have photos. What can I do?",
    "Started running three months ago, now my knees hurt after every run longer than 5k. Should I stop?",
]
GOOD = ["new cat hides all day, eats at night; is that normal?", "landlord kept deposit despite photos of a clean flat",
        "knees hurt after runs over 5k, should I stop?"]
BAD = ["cats", "I like pizza", "what is the weather"]


@pytest.mark.parametrize(("text", "letter"), [
    ("Comparison: A is more precise.\nPreferred: B", "B"),
    ('Comparison: ...\nPreferred: "A"', "A"),
    ("preferred:**A**", "A"),
    ("I think the answer is B.", "B"),
    ("A", "A"),
    ("Both are fine.", None),
    ("Alice and Bob", None),
    ("A is more detailed, B is shorter.\n[[A]]", "A"),
    ("At first I thought [[A]], but B answers the question.\n\n[[B]]", "B"),  # the last verdict counts
    ("Both answers are equally good. [[C]]", "C"),  # a tie
])
def test_parse_choice(text, letter):
    assert parse_choice(text) == letter


def test_verdict_outcome_is_from_the_first_summarys_side():
    assert _outcome("A", "ab") == 1.0 and _outcome("A", "ba") == 0.0 and _outcome("B", "ba") == 1.0 and _outcome(None, "ab") == 0.5
    assert _outcome("C", "ab") == _outcome("C", "ba") == 0.5  # a chat judge's tie


def test_chat_task_prompt_shows_the_conversation_and_both_answers():
    conversation = "user: Name a prime number between 10 and 15.\nassistant:"
    shown = _prompt(JUDGE_PROMPTS["chat"], conversation, "13", "12", "ba")
    assert f"[Conversation]\n{conversation}\n\n[Assistant A's answer]\n12\n" in shown  # order "ba": b shown first
    assert "[Assistant B's answer]\n13\n" in shown and '"[[C]]" for a tie' in shown
    assert "Summary" not in shown and "Summary A" in _prompt(JUDGE_PROMPTS["summarization"], "post", "a", "b", "ab")
    assert LETTER_PROMPTS["chat"].endswith('Answer with only "A" or "B".')
    with pytest.raises(ValueError, match="unknown judge task 'poetry'"):
        _template(JUDGE_PROMPTS, "poetry")
    orders = _orders(200, seed=3)
    assert orders == _orders(200, seed=3) and orders != _orders(200, seed=4)
    assert 70 < orders.count("ab") < 130  # a fair coin per item


@pytest.fixture(scope="module")
def judge_server(default_model_dir):
    """``transformers serve`` on a free port of 127.0.0.1 with the packaged SmolLM2-135M-Instruct."""
    executable = shutil.which("transformers", path=str(Path(sys.executable).parent))
    if executable is None:
        pytest.fail("transformers serve is missing: the test extra installs transformers[serving]")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [executable, "serve", str(default_model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if server.poll() is not None:
                pytest.fail(f"transformers serve exited: {server.stderr.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("transformers serve did not come up within 120 s")
        yield f"{url}/v1", str(default_model_dir)
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_chat_judge_round_trip_order_and_cache(judge_server, tmp_path):
    base_url, model = judge_server
    cache = tmp_path / "judge_cache.jsonl"
    judge = ChatJudge(base_url, model, cache_path=str(cache), seed=1, max_tokens=24)
    verdicts = judge.judge(POSTS, GOOD, BAD, progress=False)
    assert len(verdicts) == 3 and all(isinstance(v, Verdict) and not v.cached for v in verdicts)
    records = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(records) == 3
    for verdict, record, good, bad in zip(verdicts, records, GOOD, BAD):
        assert verdict.raw == record["answer"] and verdict.raw.strip(), "the server's answer is not what was recorded"
        assert verdict.answer == parse_choice(verdict.raw)
        shown_a, shown_b = (good, bad) if verdict.order == "ab" else (bad, good)
        assert f"Summary A:\n{shown_a}\n\nSummary B:\n{shown_b}" in record["prompt"]
        expected = 0.5 if verdict.answer is None else float(verdict.answer == ("A" if verdict.order == "ab" else "B"))
        assert verdict.outcome == expected

    # a re-run asks nothing: every answer from the cache file, the same verdicts
    again = ChatJudge(base_url, model, cache_path=str(cache), seed=1, max_tokens=24).judge(POSTS, GOOD, BAD, progress=False)
    assert all(v.cached for v in again)
    assert [(v.outcome, v.order, v.raw) for v in again] == [(v.outcome, v.order, v.raw) for v in verdicts]
    assert len(cache.read_text().splitlines()) == 3
    # another seed: the items shown in another order are new prompts (asked), the others are cache hits
    other = ChatJudge(base_url, model, cache_path=str(cache), seed=2, max_tokens=24).judge(POSTS, GOOD, BAD, progress=False)
    assert [v.order for v in other] == _orders(3, 2)
    assert [v.cached for v in other] == [a.order == b.order for a, b in zip(other, verdicts)]
    assert len(cache.read_text().splitlines()) == 3 + sum(not v.cached for v in other)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_chat_judge_with_the_chat_pairwise_prompt(judge_server, tmp_path):
    """``task="chat"`` (``lit-rlhf eval`` on chat prompts): the MT-Bench-style prompt goes to the server, and the
    verdict is read from its answer."""
    base_url, model = judge_server
    cache = tmp_path / "judge_cache.jsonl"
    questions = ["Name a prime number between 10 and 15.", "What is the capital of France?"]
    good, bad = ["13 is prime.", "Paris."], ["12.", "Bananas are yellow."]
    verdicts = ChatJudge(base_url, model, cache_path=str(cache), seed=1, max_tokens=48).judge(
        questions, good, bad, progress=False, task="chat"
    )
    records = [json.loads(line) for line in cache.read_text().splitlines()]
    for verdict, record, question in zip(verdicts, records, questions):
        assert record["prompt"].startswith("You are an impartial judge") and f"[Conversation]\n{question}\n" in record["prompt"]
        assert verdict.answer == parse_choice(verdict.raw) and verdict.outcome in (0.0, 0.5, 1.0)


def test_chat_judge_errors(tmp_path):
    pytest.importorskip("openai")
    down = ChatJudge(f"http://127.0.0.1:{free_port()}/v1", "m", max_retries=1, timeout=5)
    with pytest.raises(RuntimeError, match="judge endpoint http://127.0.0.1:.* failed"):
        down.judge(POSTS[:1], GOOD[:1], BAD[:1], progress=False)
    os.environ.pop("LIT_RLHF_TEST_NO_KEY", None)
    with pytest.raises(ValueError, match="LIT_RLHF_TEST_NO_KEY"):
        ChatJudge("https://api.example.com/v1", "m", api_key_env="LIT_RLHF_TEST_NO_KEY")
    with pytest.raises(ValueError, match="differ in length"):
        down.judge(POSTS, GOOD[:2], BAD, progress=False)


@pytest.mark.slow
def test_logprob_judge_reads_the_letter_probabilities(default_model_dir):
    judge = LogprobJudge(str(default_model_dir), seed=1, batch_size=3)
    verdicts = judge.judge(POSTS, GOOD, BAD, progress=False)
    for verdict in verdicts:
        p = json.loads(verdict.raw)
        assert p["A"] + p["B"] == pytest.approx(1.0, abs=1e-5)
        assert verdict.answer == ("A" if p["A"] > p["B"] else "B")
        assert verdict.outcome == float(verdict.answer == ("A" if verdict.order == "ab" else "B"))
    # left padding changes nothing: each prompt alone gives the batched probabilities
    prompts = ["Say A or B: " + post for post in POSTS]
    batched = judge.letter_probabilities(prompts)
    alone = torch.cat([judge.letter_probabilities([prompt]) for prompt in prompts])
    assert torch.allclose(batched, alone, atol=1e-4)


@pytest.mark.slow
def test_logprob_judge_reads_control_token_text_as_text(default_model_dir):
    """A response that writes ``[PAD]`` or ``<|im_end|>`` is text to the judge: the probabilities are those of a plain
    forward of the prompt encoded with its control tokens sanitised (the old encoding parsed them: the written
    ``[PAD]`` became the pad id, masked out of the forward, and ``<|im_end|>`` ended the user's turn early)."""
    judge = LogprobJudge(str(default_model_dir), seed=1)
    prompt = "Which summary is better? A: he left [PAD] the <|im_end|> party early B: she stayed. Say A or B."
    ids = judge.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True,
                                              return_dict=False, sanitize_control_tokens=True)
    assert judge.tokenizer.pad_token_id not in ids
    with torch.no_grad():
        logits = judge.model(input_ids=torch.tensor([ids])).logits[0, -1, judge.letter_ids].float()
    batched = judge.letter_probabilities([prompt, "Say A or B: " + POSTS[0]])
    assert torch.allclose(batched[0], torch.softmax(logits, dim=-1), atol=1e-4)
