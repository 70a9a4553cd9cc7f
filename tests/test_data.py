"""TL;DR data: formatting (recipe D2-D7), the three DataModules on the shared files, and bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest
import torch
from conftest import COMPARISON_DATA, SFT_DATA

from lit_rlhf.data.datamodules import (
    EpochShuffleSampler,
    PreferenceDataModule,
    PromptDataModule,
    RepeatedShuffleSampler,
    SFTDataModule,
)
from lit_rlhf.data.examples import Dropped, Lengths, preference_example, sft_example
from lit_rlhf.data.formats import comparison_problem, to_record
from lit_rlhf.data.formatting import (
    CNNDM_QUERY_LENGTH,
    CNNDM_TEMPLATE,
    TLDR_TEMPLATE,
    completion_ids,
    format_query_ids,
    pad,
    trim_padding,
)
from lit_rlhf.data.io import HUB_NAME_EXAMPLE, load_split, validate_jsonl
from lit_rlhf.data.templates import Renderer
from lit_rlhf.models.forward import model_inputs

PAD_ID = 49152  # SmolLM2 has 49,152 tokens; [PAD] is appended after them (D6)
EOS_ID = 2  # <|im_end|>

INFO = {"id": "t3_x", "subreddit": "test", "title": "A title", "post": "First line.\nSecond line."}
QUERY_TEXT = "SUBREDDIT: r/test\n\nTITLE: A title\n\nPOST: First line.\nSecond line.\n\nTL;DR:"


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def build_sft_example(row, tokenizer, query_length, response_length, max_length):
    """A TL;DR SFT row through the one data path (formats -> templates -> examples), or None when it is dropped."""
    try:
        return sft_example(to_record(row, "tldr"), Renderer(tokenizer), Lengths(query_length, response_length, max_length), "test")[0]
    except Dropped:
        return None


def build_preference_example(row, tokenizer, query_length, response_length, max_length, cnndm_query_length=CNNDM_QUERY_LENGTH,
                             cnndm_max_length=None):
    """A TL;DR comparison through the one data path, or None when it is dropped."""
    lengths = Lengths(query_length, response_length, max_length, "drop", cnndm_query_length, cnndm_max_length)
    try:
        return preference_example(to_record(row, "tldr_comparisons"), Renderer(tokenizer), lengths, "test")[0]
    except Dropped:
        return None


def write_jsonl(path: Path, rows: list, raw_lines: list[str] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(row) for row in rows] + list(raw_lines)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def sft_row(i: int, summary="a short summary", title=None) -> dict:
    return {"id": f"s{i}", "subreddit": "test", "title": title or f"title {i}", "post": f"post {i}", "summary": summary}


def comparison_row(i: int, choice=0, **over) -> dict:
    row = {
        "info": {"id": f"c{i}", "post": f"post {i}", "title": f"title {i}", "subreddit": "test"},
        "summaries": [{"text": " first summary", "policy": "a", "note": ""}, {"text": " second summary", "policy": "b", "note": ""}],
        "choice": choice,
        "worker": "w",
        "batch": "batch9",
        "split": "train",
        "extra": {"confidence": 7},
    }
    row.update(over)
    return row


# --------------------------------------------------------------------------------------------------------
# D2 query template, D3 clever truncation
# --------------------------------------------------------------------------------------------------------


def test_query_template_exact_string(tokenizer):
    assert TLDR_TEMPLATE == "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
    ids = format_query_ids(tokenizer, INFO, 512)
    assert ids == enc(tokenizer, QUERY_TEXT)
    text = tokenizer.decode(ids)
    assert text == QUERY_TEXT
    assert text.endswith("TL;DR:") and not text.endswith(" ")  # no trailing space (D2)
    assert ids[0] != tokenizer.bos_token_id  # no special tokens added


def test_query_template_cnndm(tokenizer):
    assert CNNDM_TEMPLATE == "Article:\n{article}\n\nTL;DR:\n"
    info = {"id": "c1", "article": "Some news.\nMore news.", "site": "cnn", "title": "News"}
    ids = format_query_ids(tokenizer, info, 1919)
    assert tokenizer.decode(ids) == "Article:\nSome news.\nMore news.\n\nTL;DR:\n"
    # a merged hub row carries article=None for TL;DR posts: the TL;DR template is used
    assert tokenizer.decode(format_query_ids(tokenizer, {**INFO, "article": None}, 512)) == QUERY_TEXT


def test_query_missing_field_is_named(tokenizer):
    with pytest.raises(KeyError, match="title"):
        format_query_ids(tokenizer, {"subreddit": "s", "post": "p"}, 512)
    with pytest.raises(KeyError, match="post"):
        format_query_ids(tokenizer, {"subreddit": "s", "title": "t", "post": None}, 512)


def test_clever_truncation_cuts_at_the_last_newline(tokenizer):
    paragraphs = [f"Paragraph {i}: " + "some words here " * 8 for i in range(10)]
    post = "\n".join(paragraphs)
    full = enc(tokenizer, TLDR_TEMPLATE.format(subreddit="test", title="t", post=post))
    query_length = 120
    assert len(full) > query_length

    def query_with(k: int) -> list[int]:
        return enc(tokenizer, TLDR_TEMPLATE.format(subreddit="test", title="t", post="\n".join(paragraphs[:k])))

    ids = format_query_ids(tokenizer, {"subreddit": "test", "title": "t", "post": post}, query_length)
    assert len(ids) <= query_length
    # the result is the longest whole-paragraph prefix that fits, with the template intact
    fitting = [k for k in range(1, 11) if len(query_with(k)) <= query_length]
    k = max(fitting)
    assert 1 <= k < 10, "the test needs a budget between one paragraph and all of them"
    assert ids == query_with(k)
    text = tokenizer.decode(ids)
    assert text.endswith(paragraphs[k - 1] + "\n\nTL;DR:")
    assert paragraphs[k] not in text


def hard_cut_prefix(tokenizer, post: str, query_length: int) -> str:
    """The post prefix that format_query_ids kept, checked to be N+'s: the longest character prefix that fits
    (N+ drops one character at a time from the end and stops at the first fit)."""
    ids = format_query_ids(tokenizer, {"subreddit": "test", "title": "t", "post": post}, query_length)
    text = tokenizer.decode(ids)
    head, tail = "SUBREDDIT: r/test\n\nTITLE: t\n\nPOST: ", "\n\nTL;DR:"
    assert text.startswith(head) and text.endswith(tail) and len(ids) <= query_length
    kept = text[len(head) : -len(tail)]
    assert post.startswith(kept) and len(kept) < len(post)  # a character prefix of the post
    fits = lambda k: len(enc(tokenizer, TLDR_TEMPLATE.format(subreddit="test", title="t", post=post[:k]))) <= query_length  # noqa: E731
    assert not any(fits(k) for k in range(len(kept) + 1, len(post)))  # every longer prefix is too long
    return kept


def test_clever_truncation_hard_cut_without_newlines(tokenizer):
    kept = hard_cut_prefix(tokenizer, "word " * 300, 100)
    assert kept.startswith("word word") and len(kept) > 300  # cut to fit, not emptied


def test_clever_truncation_hard_cut_never_splits_a_character(tokenizer):
    # CJK and emoji are several bytes and often several byte-level tokens each: a token cut (the old behaviour)
    # could end inside a character and decode to U+FFFD; N+'s character cut cannot
    post = "我们今天去公园散步，天气很好。🙂🎉 " * 40
    for budget in (41, 43, 46, 48, 97):  # budgets at which a token cut of this post leaves U+FFFD
        ids = format_query_ids(tokenizer, {"subreddit": "test", "title": "t", "post": post}, budget)
        assert "\ufffd" not in tokenizer.decode(ids), budget
        assert len(hard_cut_prefix(tokenizer, post, budget)) > 5, budget


def test_clever_truncation_fits_exactly_at_the_budget(tokenizer):
    ids = format_query_ids(tokenizer, INFO, 512)
    assert format_query_ids(tokenizer, INFO, len(ids)) == ids  # fits exactly: untouched
    shorter = format_query_ids(tokenizer, INFO, len(ids) - 1)  # one token short: cut at the newline
    assert tokenizer.decode(shorter) == "SUBREDDIT: r/test\n\nTITLE: A title\n\nPOST: First line.\n\nTL;DR:"


def test_clever_truncation_fails_when_even_an_empty_post_does_not_fit(tokenizer):
    empty = len(enc(tokenizer, TLDR_TEMPLATE.format(subreddit="test", title="t", post="")))
    info = {"subreddit": "test", "title": "t", "post": "a\nb c d"}
    assert len(format_query_ids(tokenizer, info, empty)) <= empty  # an empty post still fits exactly
    with pytest.raises(ValueError, match="does not fit"):
        format_query_ids(tokenizer, info, empty - 1)


# --------------------------------------------------------------------------------------------------------
# D4 padding, D5 completion, D6 pad token
# --------------------------------------------------------------------------------------------------------


def test_pad_left_right_exact_length():
    assert pad([1, 2, 3], 6, 0, "left") == [0, 0, 0, 1, 2, 3]
    assert pad([1, 2, 3], 6, 0, "right") == [1, 2, 3, 0, 0, 0]
    assert pad([1, 2, 3], 3, 0, "left") == [1, 2, 3]
    with pytest.raises(ValueError, match="exceeds the fixed length 2"):
        pad([1, 2, 3], 2, 0, "left")


def test_completion_leading_space_as_n_plus(tokenizer):
    expected = enc(tokenizer, " my summary") + [EOS_ID]
    # SFT reference summaries: N+ always prepends the space (D5), even to one that has it already
    assert completion_ids(tokenizer, "my summary", leading_space=True) == expected
    assert completion_ids(tokenizer, " my summary", leading_space=True) == enc(tokenizer, "  my summary") + [EOS_ID]
    assert enc(tokenizer, "  my summary") != enc(tokenizer, " my summary")  # (the doubled space shows)
    # comparison summaries are used as they are: never given a space
    assert completion_ids(tokenizer, " my summary", leading_space=False) == expected
    assert completion_ids(tokenizer, "my summary", leading_space=False) == enc(tokenizer, "my summary") + [EOS_ID]
    assert tokenizer.decode(expected) == " my summary<|im_end|>"


def test_pad_token_is_distinct_from_eos(tokenizer):
    assert tokenizer.pad_token == "[PAD]"
    assert tokenizer.pad_token_id == PAD_ID
    assert tokenizer.eos_token_id == EOS_ID != tokenizer.pad_token_id
    assert len(tokenizer) == 49153  # one more than the model's 49,152 embeddings: not resized


@torch.no_grad()
def test_pad_id_outside_the_vocabulary_is_safe_through_model_inputs(tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert model.get_input_embeddings().num_embeddings == 49152 <= tokenizer.pad_token_id
    ids = torch.tensor([[PAD_ID, PAD_ID, 5, 6, 7]])
    with pytest.raises(IndexError):
        model(input_ids=ids)  # the raw [PAD] id would index past the embedding matrix
    logits = model(**model_inputs(ids, PAD_ID)).logits
    assert logits.shape == (1, 5, 49152) and torch.isfinite(logits[:, 2:]).all()


# --------------------------------------------------------------------------------------------------------
# D7 fixed shapes: build_sft_example, build_preference_example
# --------------------------------------------------------------------------------------------------------


def test_build_sft_example_shapes(tokenizer):
    row = {**INFO, "summary": "short summary"}
    example = build_sft_example(row, tokenizer, 512, 53, 562)
    query = enc(tokenizer, QUERY_TEXT)
    completion = enc(tokenizer, " short summary") + [EOS_ID]
    assert len(example["query_ids"]) == 512 and len(example["input_ids"]) == 562
    assert example["query_ids"] == [PAD_ID] * (512 - len(query)) + query  # left-padded (D4)
    assert example["input_ids"] == query + completion + [PAD_ID] * (562 - len(query) - len(completion))
    assert example["reference"] == "short summary"


def test_build_sft_example_drops_long_references(tokenizer):
    row = {**INFO, "summary": "word " * 60}  # > 53 tokens with EOS
    assert build_sft_example(row, tokenizer, 512, 53, 562) is None
    # exactly at the limit is kept: " word" * 52 + EOS = 53 tokens
    at_limit = {**INFO, "summary": ("word " * 52).strip()}
    assert len(completion_ids(tokenizer, at_limit["summary"], leading_space=True)) == 53
    assert build_sft_example(at_limit, tokenizer, 512, 53, 562) is not None
    assert build_sft_example(at_limit, tokenizer, 512, 52, 562) is None
    # or when query + response exceed max_length
    query_len = len(enc(tokenizer, QUERY_TEXT))
    assert build_sft_example({**INFO, "summary": "short summary"}, tokenizer, 512, 53, query_len + 2) is None


def test_build_sft_example_missing_summary(tokenizer):
    with pytest.raises(KeyError, match="summary"):
        build_sft_example(dict(INFO), tokenizer, 512, 53, 562)
    with pytest.raises(KeyError, match="summary"):
        build_sft_example({**INFO, "summary": None}, tokenizer, 512, 53, 562)


@pytest.mark.parametrize("choice", [0, 1])
def test_build_preference_example_follows_choice(tokenizer, choice):
    row = comparison_row(0, choice=choice, info=dict(INFO))
    example = build_preference_example(row, tokenizer, 512, 169, 638)
    query = enc(tokenizer, QUERY_TEXT)
    first = enc(tokenizer, " first summary") + [EOS_ID]  # already starts with a space: EOS only (D5)
    second = enc(tokenizer, " second summary") + [EOS_ID]
    chosen, rejected = (first, second) if choice == 0 else (second, first)
    assert example["chosen_ids"] == query + chosen + [PAD_ID] * (638 - len(query) - len(chosen))
    assert example["rejected_ids"] == query + rejected + [PAD_ID] * (638 - len(query) - len(rejected))
    assert example["query_ids"] == [PAD_ID] * (512 - len(query)) + query
    assert example["chosen_response_ids"] == chosen + [PAD_ID] * (169 - len(chosen))
    assert example["rejected_response_ids"] == rejected + [PAD_ID] * (169 - len(rejected))
    assert example["batch"] == "batch9"
    assert example["confidence"] == 7


def test_build_preference_example_optional_fields_and_long_summary(tokenizer):
    row = comparison_row(0, info=dict(INFO))
    del row["extra"], row["batch"]
    example = build_preference_example(row, tokenizer, 512, 169, 638)
    assert example["confidence"] == -1 and example["batch"] == "unknown"
    row = comparison_row(0, info=dict(INFO), extra={"confidence": None})
    assert build_preference_example(row, tokenizer, 512, 169, 638)["confidence"] == -1
    long = comparison_row(0, info=dict(INFO))
    long["summaries"][1]["text"] = " word" * 200  # rejected too long: the whole pair is dropped
    assert build_preference_example(long, tokenizer, 512, 169, 638) is None


def test_build_preference_example_cnndm_info(tokenizer):
    row = comparison_row(0, info={"id": "c", "article": "Some news.", "site": "cnn", "title": "x"})
    example = build_preference_example(row, tokenizer, 512, 169, 638)  # the TL;DR budgets do not apply to it
    query = enc(tokenizer, "Article:\nSome news.\n\nTL;DR:\n")
    assert example["chosen_ids"][: len(query)] == query
    assert CNNDM_QUERY_LENGTH == 1919  # recipe D3
    assert len(example["query_ids"]) == 1919 and len(example["chosen_ids"]) == 1919 + 169


def test_build_preference_example_cnndm_query_budget(tokenizer):
    # an article of ~2,600 tokens in paragraphs: cut at its last newline until the query fits 1,919 tokens
    paragraphs = [f"Paragraph {i} of the story. " + "The officials said the plan would go ahead next week. " * 12 for i in range(20)]
    row = comparison_row(0, info={"id": "c", "article": "\n".join(paragraphs), "site": "cnn", "title": "x"})
    assert len(enc(tokenizer, CNNDM_TEMPLATE.format(article=row["info"]["article"]))) > 2400
    example = build_preference_example(row, tokenizer, 512, 169, 638)
    query = [t for t in example["query_ids"] if t != PAD_ID]
    assert len(example["query_ids"]) == 1919 and 1919 - 140 < len(query) <= 1919  # a paragraph is ~135 tokens
    kept = max(k for k in range(21) if len(enc(tokenizer, CNNDM_TEMPLATE.format(article="\n".join(paragraphs[:k])))) <= 1919)
    assert query == enc(tokenizer, CNNDM_TEMPLATE.format(article="\n".join(paragraphs[:kept])))
    # custom budgets
    small = build_preference_example(row, tokenizer, 512, 169, 638, cnndm_query_length=600, cnndm_max_length=700)
    assert len(small["query_ids"]) == 600 and len(small["chosen_ids"]) == 700
    assert len([t for t in small["query_ids"] if t != PAD_ID]) <= 600


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"choice": None}, ValueError, "'choice' must be 0 or 1, got None"),
        ({"info": None}, KeyError, "info"),
        ({"summaries": None}, ValueError, "exactly 2 summaries, got a NoneType"),
        ({"choice": 2}, ValueError, "'choice' must be 0 or 1, got 2"),
        ({"summaries": [{"text": " only one"}]}, ValueError, "exactly 2 summaries, got 1 entries"),
        ({"summaries": [{"text": " a"}, {"policy": "b"}]}, KeyError, r"summaries\[\]\.text"),
    ],
)
def test_build_preference_example_bad_rows(tokenizer, change, error, match):
    row = comparison_row(0, info=dict(INFO))
    row.update(change)
    with pytest.raises(error, match=match):
        build_preference_example(row, tokenizer, 512, 169, 638)
    if change == {"choice": None}:
        del row["choice"]
        with pytest.raises(KeyError, match="choice"):
            build_preference_example(row, tokenizer, 512, 169, 638)


def test_build_preference_example_missing_info_field(tokenizer):
    row = comparison_row(0, info={"id": "x", "subreddit": "s", "post": "p"})
    with pytest.raises(KeyError, match="title"):
        build_preference_example(row, tokenizer, 512, 169, 638)


# --------------------------------------------------------------------------------------------------------
# trim_padding
# --------------------------------------------------------------------------------------------------------


def test_trim_padding_only_removes_all_pad_columns():
    p = 9
    ids = torch.tensor([[p, p, 1, 2, p], [p, 3, 4, p, p]])
    # left: only column 0 is all-pad at the left; the all-pad last column is not touched
    assert trim_padding(ids, p, "left").tolist() == [[p, 1, 2, p], [3, 4, p, p]]
    # right: only the last column goes
    assert trim_padding(ids, p, "right").tolist() == [[p, p, 1, 2], [p, 3, 4, p]]
    full = torch.tensor([[1, 2], [3, 4]])
    assert torch.equal(trim_padding(full, p, "left"), full)
    assert torch.equal(trim_padding(full, p, "right"), full)
    all_pad = torch.full((2, 3), p)
    assert torch.equal(trim_padding(all_pad, p, "right"), all_pad)
    inner = torch.tensor([[1, p, 2], [3, p, 4]])  # an all-pad inner column is kept
    assert torch.equal(trim_padding(inner, p, "right"), inner)


# --------------------------------------------------------------------------------------------------------
# RepeatedShuffleSampler (P9)
# --------------------------------------------------------------------------------------------------------


def test_repeated_shuffle_sampler():
    sampler = RepeatedShuffleSampler(num_rows=20, num_samples=50, seed=3)
    order = list(sampler)
    assert len(order) == len(sampler) == 50
    blocks = [order[0:20], order[20:40]]
    for block in blocks:
        assert sorted(block) == list(range(20))  # each full block is a permutation of every row
    assert blocks[0] != blocks[1]  # reshuffled, not repeated
    assert blocks[0] != list(range(20))  # shuffled at all
    tail = order[40:]
    assert len(tail) == 10 and len(set(tail)) == 10 and set(tail) <= set(range(20))
    assert list(RepeatedShuffleSampler(20, 50, seed=3)) == order  # same seed, same order (P11)
    assert list(RepeatedShuffleSampler(20, 50, seed=4)) != order
    assert list(RepeatedShuffleSampler(20, 7, seed=3)) == order[:7]


def test_epoch_shuffle_sampler_replays_dataloader_shuffle():
    """Each epoch's order is the one DataLoader(shuffle=True, seeded generator) gives in that epoch."""
    loader = torch.utils.data.DataLoader(range(10), batch_size=1, shuffle=True, generator=torch.Generator().manual_seed(7))
    sampler = EpochShuffleSampler(10, seed=7)
    for epoch in range(3):
        expected = [int(batch) for batch in loader]
        sampler.set_epoch(epoch)
        assert list(sampler) == expected
    assert len(sampler) == 10


def test_epoch_shuffle_sampler_reads_the_epoch_at_the_first_draw():
    """Lightning creates the loader's iterator before it calls set_epoch: the order must follow the later epoch."""
    sampler = EpochShuffleSampler(10, seed=7)
    iterator = iter(sampler)
    sampler.set_epoch(1)
    drawn = list(iterator)
    epoch_1 = EpochShuffleSampler(10, seed=7)
    epoch_1.set_epoch(1)
    assert drawn == list(epoch_1) != list(EpochShuffleSampler(10, seed=7))  # epoch 1's order, not epoch 0's


# --------------------------------------------------------------------------------------------------------
# DataModules on the shared TL;DR sample
# --------------------------------------------------------------------------------------------------------


def _rows(path: Path, n: int) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(next(handle)) for _ in range(n)]


def _check_trimmed(trimmed: torch.Tensor, full: torch.Tensor, side: str) -> None:
    """``trimmed`` is ``full`` minus columns that are padding in every row, on ``side`` only."""
    assert trimmed.dtype == torch.long and trimmed.size(0) == full.size(0)
    width = trimmed.size(1)
    if side == "right":
        assert torch.equal(trimmed, full[:, :width])
        assert (full[:, width:] == PAD_ID).all()
        assert (trimmed[:, -1] != PAD_ID).any()
    else:
        assert torch.equal(trimmed, full[:, full.size(1) - width :])
        assert (full[:, : full.size(1) - width] == PAD_ID).all()
        assert (trimmed[:, 0] != PAD_ID).any()


def test_sft_datamodule_on_real_data(tokenizer, default_model_dir):
    dm = SFTDataModule(
        path=str(SFT_DATA), tokenizer=str(default_model_dir), batch_size=4, eval_batch_size=4, train_samples=16, val_samples=6
    )
    dm.tokenizer = tokenizer
    dm.setup("fit")
    train, val = dm.splits["train"], dm.splits["validation"]
    # rows whose " summary" + EOS exceeds 53 tokens are dropped (D7)
    raw = _rows(SFT_DATA / "train.jsonl", 16)
    kept = [r for r in raw if len(completion_ids(tokenizer, r["summary"], leading_space=True)) <= 53]
    assert len(train) == len(kept) >= 12
    assert train["reference"] == [r["summary"] for r in kept]
    assert {len(ids) for ids in train["input_ids"]} == {562} and {len(ids) for ids in train["query_ids"]} == {512}
    assert len(val) <= 6

    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"query_ids", "input_ids", "loss_mask", "reference", "source"}
    assert batch["input_ids"].shape[0] == batch["query_ids"].shape[0] == len(batch["reference"]) == 4
    # N+ trains on the whole TL;DR sequence (recipe §1 SFT): the loss mask is every real token
    assert torch.equal(batch["loss_mask"], batch["input_ids"] != PAD_ID) and dm.source_names == ["sft"]
    assert batch["source"].tolist() == [0] * 4
    assert batch["input_ids"].shape[1] <= 562 and batch["query_ids"].shape[1] <= 512
    _check_trimmed(batch["input_ids"], torch.tensor(val[:4]["input_ids"]), "right")
    _check_trimmed(batch["query_ids"], torch.tensor(val[:4]["query_ids"]), "left")
    for row in batch["input_ids"]:  # right-padded: real tokens first, the last real one is EOS
        mask = row != PAD_ID
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        assert row[n - 1].item() == EOS_ID
    for row in batch["query_ids"]:  # left-padded: the query ends with "TL;DR:", no EOS
        assert tokenizer.decode(row[row != PAD_ID]).endswith("\n\nTL;DR:")
        assert (row == PAD_ID).sum() == 0 or row[0].item() == PAD_ID

    train_batches = list(dm.train_dataloader())
    assert sum(len(b["reference"]) for b in train_batches) == len(train)
    assert sorted(r for b in train_batches for r in b["reference"]) == sorted(train["reference"])


def test_prompt_datamodule_repeats_and_reshuffles(tokenizer, default_model_dir):
    dm = PromptDataModule(
        path=str(SFT_DATA), tokenizer=str(default_model_dir), batch_size=2, eval_batch_size=3, total_episodes=10,
        train_samples=4, val_samples=3, seed=5,
    )
    dm.tokenizer = tokenizer
    dm.setup("fit")
    train = dm.splits["train"]
    assert train.column_names == ["query_ids", "reference", "reference_ids", "prompt_text", "source"]
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 and all(set(b) == {"query_ids", "reference", "reference_ids", "prompt_text", "source"} for b in batches)
    seen = [r for b in batches for r in b["reference"]]
    expected = [train[i]["reference"] for i in RepeatedShuffleSampler(len(train), 10, seed=5)]
    assert seen == expected  # exactly total_episodes prompts in the sampler's order
    assert sorted(seen[: len(train)]) == sorted(train["reference"])  # the first block covers every row
    for b in batches:
        assert b["query_ids"].shape[0] == 2 and b["query_ids"].shape[1] <= 512
        assert (b["query_ids"][:, -1] != PAD_ID).all()  # left padding: every query ends in the last column
    val = next(iter(dm.val_dataloader()))
    assert val["query_ids"].shape[0] == 3


def test_preference_datamodule_on_real_data(tokenizer, default_model_dir):
    dm = PreferenceDataModule(
        path=str(COMPARISON_DATA), tokenizer=str(default_model_dir), batch_size=4, eval_batch_size=4,
        train_samples=12, val_samples=8, sft_path=str(SFT_DATA), normalization_samples=6,
    )
    dm.tokenizer = tokenizer
    dm.setup("fit")
    raw_val = _rows(COMPARISON_DATA / "validation.jsonl", 8)
    raw_train = _rows(COMPARISON_DATA / "train.jsonl", 12)
    assert dm.batch_names == sorted({r["batch"] for r in raw_val + raw_train})
    val = dm.splits["validation"]
    assert len(val) == 8  # every sampled comparison fits 169 / 638

    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {
        "query_ids", "chosen_ids", "rejected_ids", "chosen_response_ids", "rejected_response_ids", "batch", "confidence", "source",
        "prompt_text",
    }
    assert batch["batch"].dtype == torch.long and batch["confidence"].dtype == torch.long
    assert [dm.batch_names[i] for i in batch["batch"].tolist()] == [r["batch"] for r in raw_val[:4]]
    assert batch["confidence"].tolist() == [r["extra"]["confidence"] for r in raw_val[:4]]
    for key in ("chosen_ids", "rejected_ids", "chosen_response_ids", "rejected_response_ids"):
        assert batch[key].shape[0] == 4 and batch[key].shape[1] <= 638
        _check_trimmed(batch[key], torch.tensor(val[:4][key]), "right")
    for side in ("chosen", "rejected"):  # query (unpadded) + response == the full sequence
        for i in range(4):
            query = batch["query_ids"][i][batch["query_ids"][i] != PAD_ID]
            response = batch[f"{side}_response_ids"][i][batch[f"{side}_response_ids"][i] != PAD_ID]
            full = batch[f"{side}_ids"][i][batch[f"{side}_ids"][i] != PAD_ID]
            assert torch.equal(torch.cat([query, response]), full)
    _check_trimmed(batch["query_ids"], torch.tensor(val[:4]["query_ids"]), "left")
    for i, raw in enumerate(raw_val[:4]):  # chosen/rejected follow `choice`, with the summaries' own space
        chosen = batch["chosen_ids"][i]
        rejected = batch["rejected_ids"][i]
        chosen_text = tokenizer.decode(chosen[chosen != PAD_ID])
        rejected_text = tokenizer.decode(rejected[rejected != PAD_ID])
        assert chosen_text.endswith("TL;DR:" + raw["summaries"][raw["choice"]]["text"] + "<|im_end|>")
        assert rejected_text.endswith("TL;DR:" + raw["summaries"][1 - raw["choice"]]["text"] + "<|im_end|>")
        assert chosen_text.startswith(f"SUBREDDIT: r/{raw['info']['subreddit']}\n\nTITLE: {raw['info']['title']}")

    norm = list(dm.normalization_dataloader())
    rows = [r for b in norm for r in b["input_ids"]]
    assert len(rows) <= 6 and len(rows) >= 4
    for b in norm:
        assert b["input_ids"].shape[1] <= 562
    for row in rows:  # query + " reference" + EOS, right-padded
        n = int((row != PAD_ID).sum())
        assert row[n - 1].item() == EOS_ID and (row[n:] == PAD_ID).all()


def test_preference_datamodule_batch_names_and_confidence(tmp_path, tokenizer, default_model_dir):
    # batch names from both splits, sorted; each row's `batch` becomes its index into batch_names
    train = [comparison_row(0, batch="zeta"), comparison_row(1, batch="alpha", extra={"confidence": 2}), comparison_row(2, extra={})]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "validation.jsonl", [comparison_row(3, batch="mid", choice=1)])
    dm = PreferenceDataModule(path=str(tmp_path), tokenizer=str(default_model_dir), batch_size=3, sft_path=None)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    assert dm.batch_names == ["alpha", "batch9", "mid", "zeta"]
    batch = dm.collate([dm.splits["train"][i] for i in range(3)])  # unshuffled order
    assert batch["batch"].tolist() == [3, 0, 1]
    assert batch["confidence"].tolist() == [7, 2, -1]
    val = next(iter(dm.val_dataloader()))
    assert val["batch"].tolist() == [2] and val["confidence"].tolist() == [7]
    # choice 1: the chosen sequence ends with the second summary
    chosen = val["chosen_ids"][0]
    assert tokenizer.decode(chosen[chosen != PAD_ID]).endswith("TL;DR: second summary<|im_end|>")


def test_preference_datamodule_mixes_tldr_and_cnndm_rows(tmp_path, tokenizer, default_model_dir):
    article = "\n".join(["A paragraph of news. " * 30] * 3)
    cnndm = comparison_row(1, info={"id": "c1", "article": article, "site": "cnn", "title": "x"}, batch="cnndm0")
    write_jsonl(tmp_path / "train.jsonl", [comparison_row(0), cnndm])
    write_jsonl(tmp_path / "validation.jsonl", [comparison_row(2)])
    dm = PreferenceDataModule(path=str(tmp_path), tokenizer=str(default_model_dir), batch_size=2, query_length=64,
                              max_length=100, response_length=20, cnndm_query_length=300, sft_path=None)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    train = dm.splits["train"]
    assert [len(ids) for ids in train["query_ids"]] == [64, 300]  # each row its own fixed shape (D3, D7)
    assert [len(ids) for ids in train["chosen_ids"]] == [100, 320]
    batch = dm.collate([train[0], train[1]])  # padded to the widest row, then trimmed
    cnndm_query = [t for t in train[1]["query_ids"] if t != PAD_ID]
    assert batch["query_ids"].shape == (2, len(cnndm_query)) and batch["query_ids"][1].tolist() == cnndm_query
    tldr_query = [t for t in train[0]["query_ids"] if t != PAD_ID]
    assert batch["query_ids"][0, -len(tldr_query):].tolist() == tldr_query  # still left-padded
    assert (batch["query_ids"][0, : -len(tldr_query)] == PAD_ID).all()
    assert tokenizer.decode(batch["chosen_ids"][1][batch["chosen_ids"][1] != PAD_ID]).startswith("Article:\nA paragraph")


def test_preference_normalization_needs_sft_path():
    dm = PreferenceDataModule(path=str(COMPARISON_DATA), sft_path=None)
    with pytest.raises(ValueError, match="sft_path"):
        dm.normalization_dataloader()


def test_datamodule_rejects_nonpositive_batch_sizes():
    with pytest.raises(ValueError, match="SFTDataModule: batch_size=0 is invalid: it must be > 0"):
        SFTDataModule(path=str(SFT_DATA), batch_size=0)
    with pytest.raises(ValueError, match="eval_batch_size=-1"):
        PreferenceDataModule(path=str(SFT_DATA), eval_batch_size=-1)


# --------------------------------------------------------------------------------------------------------
# Bad input: io and builders reached through the DataModules
# --------------------------------------------------------------------------------------------------------


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [sft_row(0), sft_row(1)], ['{"id": "s2", "summary": '])
    with pytest.raises(ValueError) as info:
        validate_jsonl(path, ["summary"])
    assert f"{path}:3" in str(info.value) and "malformed JSON" in str(info.value)
    with pytest.raises(ValueError, match=r"train\.jsonl:3"):
        load_split(str(tmp_path), "train", ["summary"])


def test_non_object_line_is_rejected(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [sft_row(0), [1, 2]])
    with pytest.raises(ValueError, match=r"train\.jsonl:2: expected a JSON object"):
        validate_jsonl(path, [])


def test_missing_field_names_field_file_and_line(tmp_path):
    bad = sft_row(1)
    del bad["summary"]
    path = write_jsonl(tmp_path / "train.jsonl", [sft_row(0), bad])
    with pytest.raises(ValueError) as info:
        validate_jsonl(path, ["subreddit", "summary"])
    assert f"{path}:2" in str(info.value) and "missing field 'summary'" in str(info.value)


def test_missing_nested_field(tmp_path):
    row = comparison_row(0)
    del row["info"]["title"]
    path = write_jsonl(tmp_path / "train.jsonl", [comparison_row(1), row])
    assert validate_jsonl(path, ["info", "choice"]) == 2
    with pytest.raises(ValueError, match=r":2: missing field 'info\.title'"):
        validate_jsonl(path, ["info.title"])


def test_blank_lines_are_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [sft_row(0)], ["", "   ", json.dumps(sft_row(1))])
    assert validate_jsonl(path, ["summary"]) == 2
    # a malformed line after blank lines still gets its own line number (4: row, blank, blank, bad)
    bad = write_jsonl(tmp_path / "bad.jsonl", [sft_row(0)], ["", "", "{oops"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:4"):
        validate_jsonl(bad, [])


def test_empty_file_names_the_path(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        validate_jsonl(path, ["summary"])
    assert str(path) in str(info.value) and "empty" in str(info.value)
    path.write_text("\n\n  \n", encoding="utf-8")  # only blank lines: empty too
    with pytest.raises(ValueError, match="empty"):
        load_split(str(tmp_path), "train", ["summary"])


def test_missing_directory_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        load_split(str(missing), "train", ["summary"])
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SFTDataModule(path=str(missing), train_samples=2, val_samples=2).setup("fit")


def test_missing_split_file_names_the_path(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [sft_row(0)])
    with pytest.raises(FileNotFoundError) as info:
        load_split(str(tmp_path), "validation", ["summary"])
    assert str(tmp_path / "validation.jsonl") in str(info.value)
    with pytest.raises(FileNotFoundError, match="validation.jsonl"):
        validate_jsonl(tmp_path / "validation.jsonl", [])


def test_load_split_reads_a_local_directory(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [sft_row(0), sft_row(1), sft_row(2)])
    data = load_split(str(tmp_path), "train", ["id", "summary"])
    assert len(data) == 3 and data["id"] == ["s0", "s1", "s2"]


def test_sft_datamodule_row_lacking_summary_value(tmp_path, tokenizer, default_model_dir):
    # the field is present but null: the line check names the file, the line and the field
    write_jsonl(tmp_path / "train.jsonl", [sft_row(0), sft_row(1, summary=None)])
    write_jsonl(tmp_path / "validation.jsonl", [sft_row(2)])
    dm = SFTDataModule(path=str(tmp_path), tokenizer=str(default_model_dir))
    dm.tokenizer = tokenizer
    with pytest.raises(ValueError) as info:
        dm.setup("fit")
    assert str(info.value) == f"{tmp_path / 'train.jsonl'}:2: missing field 'summary'"


def test_sft_datamodule_missing_summary_field(tmp_path, tokenizer, default_model_dir):
    bad = sft_row(1)
    del bad["summary"]
    write_jsonl(tmp_path / "train.jsonl", [sft_row(0), bad])
    write_jsonl(tmp_path / "validation.jsonl", [sft_row(2)])
    dm = SFTDataModule(path=str(tmp_path), tokenizer=str(default_model_dir))
    dm.tokenizer = tokenizer
    with pytest.raises(ValueError, match=r"train\.jsonl:2: missing field 'summary'"):
        dm.setup("fit")


def test_preference_datamodule_row_lacking_choice(tmp_path, tokenizer, default_model_dir):
    bad = comparison_row(1)
    del bad["choice"]
    write_jsonl(tmp_path / "train.jsonl", [comparison_row(0), bad])
    write_jsonl(tmp_path / "validation.jsonl", [comparison_row(2)])
    dm = PreferenceDataModule(path=str(tmp_path), tokenizer=str(default_model_dir), sft_path=None)
    dm.tokenizer = tokenizer
    with pytest.raises(ValueError, match=r"train\.jsonl:2: missing field 'choice'"):
        dm.setup("fit")


def test_preference_datamodule_null_choice_names_file_and_line(tmp_path, tokenizer, default_model_dir):
    write_jsonl(tmp_path / "train.jsonl", [comparison_row(0), comparison_row(1, choice=None)])
    write_jsonl(tmp_path / "validation.jsonl", [comparison_row(2)])
    dm = PreferenceDataModule(path=str(tmp_path), tokenizer=str(default_model_dir), sft_path=None)
    dm.tokenizer = tokenizer
    with pytest.raises(ValueError, match=r"train\.jsonl:2: field 'choice' must be 0 or 1, got None"):
        dm.setup("fit")


def test_datamodule_fails_when_no_row_fits(tmp_path, tokenizer, default_model_dir):
    write_jsonl(tmp_path / "train.jsonl", [sft_row(0, summary="word " * 80)])
    write_jsonl(tmp_path / "validation.jsonl", [sft_row(1)])
    dm = SFTDataModule(path=str(tmp_path), tokenizer=str(default_model_dir))
    dm.tokenizer = tokenizer
    with pytest.raises(ValueError, match=f"no {tmp_path.name}/train row fits the configured lengths"):
        dm.setup("fit")


# --------------------------------------------------------------------------------------------------------
# Bad input (issue 8): each names the file and line, or the field
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 3])
def test_comparison_with_other_than_two_summaries_names_file_line_and_count(tmp_path, count):
    bad = comparison_row(1)
    bad["summaries"] = [{"text": f" summary {i}"} for i in range(count)]
    write_jsonl(tmp_path / "train.jsonl", [comparison_row(0), bad])
    with pytest.raises(ValueError, match=rf"train\.jsonl:2: field 'summaries' must hold exactly 2 summaries, got {count} entries"):
        load_split(str(tmp_path), "train", ["info", "summaries", "choice"], check=comparison_problem)


def test_comparison_summaries_not_a_list(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [comparison_row(0, summaries="two")])
    with pytest.raises(ValueError, match=r"train\.jsonl:1: field 'summaries' must hold exactly 2 summaries, got a str"):
        validate_jsonl(tmp_path / "train.jsonl", ["summaries"], comparison_problem)


def test_jsonl_file_as_data_path_says_to_pass_its_directory(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [sft_row(0)])
    with pytest.raises(FileNotFoundError) as info:
        load_split(str(path), "train", ["summary"])
    message = str(info.value)
    assert f"data path {path} is a file" in message and f"({tmp_path})" in message


def test_missing_relative_path_is_reported_before_any_hub_lookup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: pytest.fail("the hub was consulted"))
    for source in ("data/tldr/sft", "./sft", "../sft", "sft/train.jsonl"):
        with pytest.raises(FileNotFoundError) as info:
            load_split(source, "train", ["summary"])
        message = str(info.value)
        assert f"data directory {source} does not exist" in message, message
        assert str(tmp_path) in message and f"a hub dataset name looks like '{HUB_NAME_EXAMPLE}'" in message


def test_hub_like_name_neither_local_nor_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        load_split("nobody/no-such-dataset", "train", ["summary"])  # offline in the tests: the lookup fails
    message = str(info.value)
    assert "no such local directory" in message and str(tmp_path) in message and "hub dataset" in message


def test_non_utf8_byte_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [sft_row(0)])
    with path.open("ab") as handle:
        handle.write(b'{"id": "s1", "summary": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"train\.jsonl:2: not UTF-8 text \(byte 0xe9 at byte 29 of the line\)"):
        validate_jsonl(path, ["summary"])


def test_post_whose_title_alone_does_not_fit_is_dropped_and_counted(tmp_path, tokenizer, default_model_dir, caplog):
    long_title = sft_row(1, title="a very long title " * 30)
    write_jsonl(tmp_path / "train.jsonl", [sft_row(0), long_title, sft_row(2), sft_row(3, summary="word " * 80)])
    write_jsonl(tmp_path / "validation.jsonl", [sft_row(4)])
    dm = SFTDataModule(path=str(tmp_path), tokenizer=str(default_model_dir), query_length=128, response_length=53, max_length=181)
    dm.tokenizer = tokenizer
    with caplog.at_level(logging.WARNING, logger="lit_rlhf.data.datamodules"):
        dm.setup("fit")
    assert dm.splits["train"]["reference"] == [sft_row(0)["summary"], sft_row(2)["summary"]]
    assert (
        f"{tmp_path.name}/train: dropped 2 of 4 rows: 1 whose prompt does not fit its budget even when cut, "
        "1 whose response exceeds the fixed length"
    ) in caplog.text


def test_large_split_formatted_by_several_processes_same_rows_and_errors(tmp_path, tokenizer, default_model_dir, monkeypatch):
    from lit_rlhf.data import datamodules

    rows = [{**sft_row(i), "post": f"post number {i} " * (i % 7 + 1)} for i in range(2 * datamodules.MIN_ROWS_PER_PROCESS)]
    for directory in ("a", "b"):  # two sources, so that the second build does not find the first one's cache
        (tmp_path / directory).mkdir()
        write_jsonl(tmp_path / directory / "train.jsonl", rows)
    monkeypatch.setattr(datamodules.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)

    def built(path: Path, min_rows: int) -> datasets.Dataset:
        monkeypatch.setattr(datamodules, "MIN_ROWS_PER_PROCESS", min_rows)
        dm = SFTDataModule(path=str(path), tokenizer=str(default_model_dir))
        dm.tokenizer = tokenizer
        return dm.build("train", None)

    several, one = built(tmp_path / "a", 256), built(tmp_path / "b", 10**6)  # 2 processes; 1 process
    same = lambda data: data.remove_columns("source")[:]  # noqa: E731 - the source is each directory's name
    assert len(several.cache_files) == 2 and len(one.cache_files) == 1 and same(several) == same(one)
    bad = tmp_path / "bad"
    bad.mkdir()
    write_jsonl(bad / "train.jsonl", [*rows[:400], sft_row(400, summary=None), *rows[401:]])
    with pytest.raises(ValueError, match=r"train\.jsonl:401: missing field 'summary'"):
        built(bad, 256)
