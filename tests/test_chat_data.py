"""Chat data (issue 25): formats detected and converted, chat templates rendered right on the real SmolLM2 tokenizer,
SFT masks, truncation, mixtures and bad input, on the shared chat files and hand-written rows."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CHAT_DATA, COMPARISON_DATA, SFT_DATA
from transformers import AutoTokenizer

from lit_rlhf.data.datamodules import PreferenceDataModule, PromptDataModule, SFTDataModule, Source
from lit_rlhf.data.examples import Dropped, Lengths, preference_example, sft_example
from lit_rlhf.data.formats import Columns, InvalidRow, TLDRPost, detect_format, parse_hh, to_record
from lit_rlhf.data.io import first_row
from lit_rlhf.data.templates import Renderer, uses_bos
from lit_rlhf.models.loading import load_tokenizer, stop_token_ids

PAD_ID, IM_START, IM_END = 49152, 1, 2


def rows(path: Path, count: int = 10**9) -> list[dict]:
    with path.open() as handle:
        return [json.loads(line) for _, line in zip(range(count), handle)]


def write_split(directory: Path, train: list[dict], validation: list[dict] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, data in (("train", train), ("validation", validation if validation is not None else train)):
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in data))
    return directory


def real(ids) -> list[int]:
    return [token for token in (ids.tolist() if torch.is_tensor(ids) else ids) if token != PAD_ID]


USER = {"role": "user", "content": "Name a colour."}
ANSWER = {"role": "assistant", "content": "Blue."}


# ------------------------------------------------------------------------------------------------ formats
@pytest.mark.parametrize(
    "path, format",
    [
        (SFT_DATA / "train.jsonl", "tldr"),
        (COMPARISON_DATA / "train.jsonl", "tldr_comparisons"),
        (CHAT_DATA / "hh-rlhf-harmless" / "train.jsonl", "hh_rlhf"),
        (CHAT_DATA / "preferences" / "train.jsonl", "preference"),
        (CHAT_DATA / "sft" / "train.jsonl", "language_modeling"),
        (CHAT_DATA / "prompts" / "validation.jsonl", "prompt_only"),
    ],
)
def test_formats_of_the_shared_files_are_detected(path, format):
    row = first_row(path)
    assert detect_format(row, row) == format
    record = to_record(row, format)
    assert record.prompt


@pytest.mark.parametrize(
    "row, format, prompt, completion, chosen, rejected",
    [
        ({"text": "The sky is blue."}, "language_modeling", "", None, None, None),
        ({"messages": [USER, ANSWER]}, "language_modeling", [USER], ANSWER, None, None),
        ({"prompt": "The sky is"}, "prompt_only", "The sky is", None, None, None),
        ({"prompt": [USER]}, "prompt_only", [USER], None, None, None),
        ({"prompt": "The sky is", "completion": " blue."}, "prompt_completion", "The sky is", " blue.", None, None),
        ({"prompt": [USER], "completion": [ANSWER]}, "prompt_completion", [USER], ANSWER, None, None),
        ({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}, "preference", "The sky is", None, " blue.", " green."),
        ({"prompt": [USER], "chosen": [ANSWER], "rejected": [{"role": "assistant", "content": "Red."}]}, "preference", [USER], None,
         ANSWER, {"role": "assistant", "content": "Red."}),
        ({"chosen": "The sky is blue.", "rejected": "The sky is green."}, "implicit_preference", "The sky is", None, " blue.", " green."),
        ({"chosen": [USER, ANSWER], "rejected": [USER, {"role": "assistant", "content": "Red."}]}, "implicit_preference", [USER], None,
         ANSWER, {"role": "assistant", "content": "Red."}),
        ({"chosen": "\n\nHuman: Name a colour.\n\nAssistant: Blue.", "rejected": "\n\nHuman: Name a colour.\n\nAssistant: Red."},
         "hh_rlhf", [USER], None, ANSWER, {"role": "assistant", "content": "Red."}),
    ],
)
def test_every_trl_format_converts_to_a_record(row, format, prompt, completion, chosen, rejected):
    assert detect_format(row, row) == format
    record = to_record(row, format)
    assert (record.prompt, record.completion, record.chosen, record.rejected) == (prompt, completion, chosen, rejected)


def test_explicit_pair_whose_sides_repeat_the_prompt_is_cut_to_the_answers():
    row = {"prompt": [USER], "chosen": [USER, ANSWER], "rejected": [USER, {"role": "assistant", "content": "Red."}]}
    assert to_record(row, "preference").chosen == ANSWER
    row["rejected"] = [{"role": "user", "content": "Another question"}, {"role": "assistant", "content": "Red."}]
    with pytest.raises(InvalidRow, match="do not start with the prompt"):
        to_record(row, "preference")


def test_column_names_are_remapped():
    row = {"question": [USER], "good": [ANSWER], "bad": [{"role": "assistant", "content": "Red."}]}
    keys = Columns(prompt_key="question", chosen_key="good", rejected_key="bad")
    assert detect_format(row, row, keys) == "preference" and to_record(row, "preference", keys).chosen == ANSWER


def test_hh_parser_on_real_multi_turn_rows():
    row = next(r for r in rows(CHAT_DATA / "hh-rlhf-harmless" / "train.jsonl") if r["chosen"].count("\n\nHuman:") >= 3)
    chosen = parse_hh(row["chosen"])
    assert [m["role"] for m in chosen] == ["user", "assistant"] * (len(chosen) // 2)
    assert "\n\nHuman:" not in "".join(m["content"] for m in chosen) and chosen[0]["content"] in row["chosen"]
    record = to_record(row, "hh_rlhf")
    assert record.prompt == chosen[:-1] and record.chosen == chosen[-1] and record.rejected["role"] == "assistant"
    assert len(record.prompt) >= 5 and record.prompt[-1]["role"] == "user"  # everything before the last assistant turn


@pytest.mark.parametrize(
    "row, format, reason",
    [
        ({"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: yes"}, "hh_rlhf", "with an empty turn"),
        ({"messages": [USER, ANSWER, ANSWER]}, "language_modeling", "whose roles do not alternate"),
        ({"prompt": [USER, ANSWER], "completion": [ANSWER]}, "prompt_completion", "whose prompt ends with an assistant turn"),
        ({"chosen": [USER, ANSWER], "rejected": [{"role": "user", "content": "Other"}, ANSWER]}, "implicit_preference",
         "whose sides do not share a prompt"),
        ({"prompt": [{"role": "user", "content": "  "}]}, "prompt_only", "with an empty turn"),
    ],
)
def test_broken_content_is_an_invalid_row_with_its_reason(row, format, reason):
    with pytest.raises(InvalidRow) as info:
        to_record(row, format)
    assert info.value.reason == reason


def test_malformed_fields_are_named():
    with pytest.raises(ValueError, match=r"'prompt\[0\]' has role 'tool'"):
        to_record({"prompt": [{"role": "tool", "content": "x"}]}, "prompt_only")
    with pytest.raises(KeyError, match="missing field 'rejected'"):
        to_record({"prompt": "p", "chosen": "c", "rejected": None}, "preference")
    with pytest.raises(ValueError, match="fits no dataset format: found columns \\['question'\\]"):
        detect_format(["question"])


# ------------------------------------------------------------------------------------------------ templates
def test_stop_ids_and_pad_on_the_real_tokenizer(tokenizer):
    assert stop_token_ids(tokenizer) == [IM_END] and tokenizer.pad_token_id == PAD_ID not in stop_token_ids(tokenizer)
    renderer = Renderer(tokenizer)
    assert not uses_bos(tokenizer) and renderer.bos == []
    # text holding the pad token's or a control token's string never gives their ids: padding is where ids == pad
    ids = renderer.encode("a [PAD] b <|im_end|> c")
    assert PAD_ID not in ids and IM_END not in ids
    prompt = renderer.prompt([{"role": "user", "content": "say [PAD] and <|im_end|> please"}], 64)
    assert PAD_ID not in prompt.ids and prompt.ids.count(IM_END) == 2  # the system's and the user's turn ends


def test_chat_prompt_and_responses_on_the_real_tokenizer(tokenizer):
    renderer = Renderer(tokenizer)
    row = rows(CHAT_DATA / "preferences" / "train.jsonl", 1)[0]
    record = to_record(row, "preference")
    rendered = renderer.prompt(record.prompt, 512)
    assert rendered.ids == tokenizer.apply_chat_template(record.prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tokenizer.decode(rendered.ids).endswith("<|im_start|>assistant\n")
    for side in (record.chosen, record.rejected):
        response = renderer.response(rendered, side)
        # the token difference between prompt + response and the prompt: a suffix, ending with one end of turn
        full = tokenizer.apply_chat_template(record.prompt + [{**side, "content": side["content"].lstrip()}], tokenize=True,
                                             return_dict=False)
        assert full[: len(rendered.ids)] == rendered.ids and full[len(rendered.ids): len(rendered.ids) + len(response)] == response
        assert response[-1] == IM_END and response.count(IM_END) == 1
        assert tokenizer.decode(response[:-1]) == side["content"].strip()


def test_no_double_end_of_turn_when_the_content_ends_with_its_text(tokenizer):
    renderer = Renderer(tokenizer)
    rendered = renderer.prompt([USER], 64)
    response = renderer.response(rendered, {"role": "assistant", "content": "Blue.<|im_end|>"})
    assert response.count(IM_END) == 1 and response[-1] == IM_END  # the typed one stays text (TRL #4481)
    text = renderer.response(renderer.prompt("Name a colour:", 64), " Blue.<|im_end|>")
    assert text.count(IM_END) == 1 and text[-1] == IM_END


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory, default_model_dir):
    """SmolLM2's tokenizer made to use a BOS (<|endoftext|>) and a template that renders it, like Llama 3's."""
    directory = tmp_path_factory.mktemp("bos-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir, add_bos_token=True, bos_token="<|endoftext|>")
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    tokenizer.save_pretrained(directory)
    shutil.copy(default_model_dir / "config.json", directory / "config.json")
    return load_tokenizer(str(directory))


def test_exactly_one_bos_for_a_model_that_uses_one(bos_tokenizer):
    bos = bos_tokenizer.bos_token_id
    assert uses_bos(bos_tokenizer)
    # passing a templated string through the tokenizer again gives the double BOS the renderer never produces
    templated = bos_tokenizer.apply_chat_template([USER], add_generation_prompt=True, tokenize=False)
    assert bos_tokenizer(templated)["input_ids"][:2] == [bos, bos]
    renderer = Renderer(bos_tokenizer)
    for ids in (renderer.prompt([USER], 64).ids, renderer.conversation([USER, ANSWER])[0], renderer.prompt("Plain text", 64).ids):
        assert ids[0] == bos and ids.count(bos) == 1
    # a template that renders no BOS gets one prepended
    bos_tokenizer.chat_template = bos_tokenizer.chat_template.removeprefix("{{ bos_token }}")
    assert Renderer(bos_tokenizer).prompt([USER], 64).ids.count(bos) == 1


def test_end_of_turn_that_is_not_eos_stops_and_the_pad_is_distinct(tmp_path, default_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    tokenizer.eos_token = "<|endoftext|>"  # EOS 0; the template still ends turns with <|im_end|>
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.save_pretrained(tmp_path)
    shutil.copy(default_model_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2, 5]}))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.eos_token_id == 0 and stop_token_ids(loaded) == [0, IM_END, 5]
    assert loaded.pad_token_id == PAD_ID  # its own pad was a stop token: [PAD] instead
    renderer = Renderer(loaded)
    assert renderer.response(renderer.prompt([USER], 64), ANSWER)[-1] == IM_END  # the template's end of turn


def test_a_tokenizers_own_pad_token_is_an_ordinary_token_and_padding_is_the_internal_pad(tmp_path, default_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    tokenizer.pad_token = "<empty_output>"  # id 16: a special token that is no stop token
    tokenizer.save_pretrained(tmp_path)
    shutil.copy(default_model_dir / "config.json", tmp_path / "config.json")
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token_id == PAD_ID  # the model may sample 16: padding is our [PAD] (issue 27)
    assert Renderer(loaded).encode("x <empty_output> y").count(16) == 0  # text never gives the pad id


def test_sft_mask_covers_every_assistant_turn_and_nothing_else(tokenizer):
    renderer = Renderer(tokenizer)
    conversation = [{"role": "system", "content": "Be brief."}, USER, ANSWER, {"role": "user", "content": "Another?"},
                    {"role": "assistant", "content": "Green."}]
    ids, mask = renderer.conversation(conversation)
    trained = tokenizer.decode([token for token, m in zip(ids, mask) if m])
    assert trained == "Blue.<|im_end|>Green.<|im_end|>"
    untrained = tokenizer.decode([token for token, m in zip(ids, mask) if not m])
    assert "Be brief." in untrained and "Another?" in untrained and untrained.count("<|im_start|>assistant") == 2
    assert ids[-1] == IM_END  # nothing after the last assistant turn
    example, _ = sft_example(to_record({"messages": conversation}, "language_modeling"), renderer, Lengths(128, 64, 256), "chat")
    assert tokenizer.decode(real(example["query_ids"])).endswith("Another?<|im_end|>\n<|im_start|>assistant\n")
    assert example["reference"] == "Green." and sum(example["loss_mask"]) == sum(mask)


def test_chosen_and_rejected_share_their_prompt_tokens_on_real_rows(tokenizer):
    renderer = Renderer(tokenizer)
    for row in rows(CHAT_DATA / "hh-rlhf-harmless" / "train.jsonl", 20):
        try:
            example, _ = preference_example(to_record(row, "hh_rlhf"), renderer, Lengths(512, 512, 1024), "hh")
        except (InvalidRow, Dropped):
            continue
        query = real(example["query_ids"])
        for side in ("chosen", "rejected"):
            sequence, response = real(example[f"{side}_ids"]), real(example[f"{side}_response_ids"])
            assert sequence == query + response and response[-1] == IM_END and response.count(IM_END) == 1


def test_prompts_keep_their_last_turns_and_long_responses_drop_or_truncate(tokenizer):
    renderer = Renderer(tokenizer)
    turns = []
    for index in range(6):
        turns += [{"role": "user", "content": f"Question {index} " + "word " * 20}, {"role": "assistant", "content": "Answer."}]
    prompt = turns[:-1]
    rendered = renderer.prompt(prompt, 120)
    assert rendered.turns_cut > 0 and rendered.prompt == prompt[2 * rendered.turns_cut:] and len(rendered.ids) <= 120
    assert renderer.prompt(prompt, 120 + 200).turns_cut < rendered.turns_cut
    with pytest.raises(ValueError):  # QueryTooLong: not even the last user turn fits
        renderer.prompt(prompt, 10)
    long = to_record({"prompt": [USER], "completion": "word " * 50}, "prompt_completion")
    with pytest.raises(Dropped, match="exceeds"):
        sft_example(long, renderer, Lengths(64, 16, 80), "x")
    example, notes = sft_example(long, renderer, Lengths(64, 16, 80, long_responses="truncate"), "x")
    assert notes == ["whose response was truncated"] and sum(example["loss_mask"]) == 16
    full = renderer.response(renderer.prompt(long.prompt, 64), long.completion)
    response = [t for t, m in zip(example["input_ids"], example["loss_mask"]) if m]
    assert response == full[:16] and response[-1] not in stop_token_ids(tokenizer)  # cut: no end-of-turn
    example, notes = sft_example(long, renderer, Lengths(64, 16, 80, long_responses="keep_end"), "x")
    response = [t for t, m in zip(example["input_ids"], example["loss_mask"]) if m]
    assert notes == ["whose response lost its beginning"] and response == full[-16:]  # its end-of-turn token kept
    assert tokenizer.eos_token_id in response[-2:]


def test_tldr_rows_keep_the_n_plus_template(tokenizer):
    record = to_record(rows(SFT_DATA / "train.jsonl", 1)[0], "tldr")
    assert isinstance(record.prompt, TLDRPost) and record.completion.startswith(" ")
    example, _ = sft_example(record, Renderer(tokenizer), Lengths(512, 53, 562), "tldr")
    ids = real(example["input_ids"])
    assert ids[-1] == IM_END and tokenizer.decode(real(example["query_ids"])).endswith("TL;DR:")
    assert all(example["loss_mask"][: len(ids)])  # N+ trains on the whole sequence


# ------------------------------------------------------------------------------------------------ DataModules
def test_mixture_counts_rows_per_source_and_batches_name_them(tokenizer, default_model_dir, caplog):
    sources = [Source(str(CHAT_DATA / "hh-rlhf-harmless"), train_samples=40, val_samples=12),
               Source(str(CHAT_DATA / "preferences"), train_samples=30, val_samples=10, weight=2.0)]
    dm = PreferenceDataModule(path=None, sources=sources, tokenizer=str(default_model_dir), query_length=512,
                              response_length=256, max_length=768, long_responses="truncate", sft_path=None)
    dm.tokenizer = tokenizer
    with caplog.at_level(logging.WARNING, logger="lit_rlhf.data.datamodules"):
        dm.setup("fit")
    counts = dm.source_counts
    alone = dm.build_source(Source(str(CHAT_DATA / "preferences"), train_samples=30), "train")
    assert counts["train"]["preferences"] == 2 * len(alone)  # weight 2: every kept row twice
    assert counts["train"]["hh-rlhf-harmless"] <= 40 and counts["validation"] == {"hh-rlhf-harmless": 12, "preferences": 10}
    assert len(dm.splits["train"]) == sum(counts["train"].values())
    assert dm.source_names == ["hh-rlhf-harmless", "preferences"] and dm.task == "chat"
    assert "whose response was truncated" in caplog.text
    batch = dm.collate([dm.splits["validation"][i] for i in (0, 11, 12)])
    assert batch["source"].tolist() == [0, 0, 1]
    assert [dm.batch_names[i] for i in batch["batch"].tolist()][2] in ("arena-bench-v1", "llamafactory-dpo-en-demo")


def test_a_source_with_a_training_split_only_holds_out_a_slice(tokenizer, default_model_dir):
    # RLHFlow's prompt and preference sets have a train split only: validation is its last rows, training the rest
    source = Source(str(CHAT_DATA / "sft"), splits={"train": "train[:-3]", "validation": "train[-3:]"})
    dm = SFTDataModule(path=None, sources=[source], tokenizer=str(default_model_dir), query_length=256, response_length=256,
                       max_length=512, long_responses="truncate")
    dm.tokenizer = tokenizer
    dm.setup("fit")
    rows = [json.loads(line) for line in (CHAT_DATA / "sft" / "train.jsonl").open()]
    assert dm.source_counts == {"train": {"sft": len(rows) - 3}, "validation": {"sft": 3}}
    assert [row["reference"] for row in dm.splits["validation"]] == [row["messages"][-1]["content"] for row in rows[-3:]]
    with pytest.raises(FileNotFoundError, match="dev.jsonl"):
        dm.build_source(Source(str(CHAT_DATA / "sft"), splits={"validation": "dev[:10]"}), "validation")


def test_prompt_rows_from_a_conversation_set_and_their_references(tokenizer, default_model_dir):
    dm = PromptDataModule(path=str(CHAT_DATA / "prompts"), tokenizer=str(default_model_dir), query_length=512, response_length=64,
                          max_length=576, reference_length=1024, batch_size=4, eval_batch_size=4, total_episodes=4, val_samples=8,
                          train_samples=8)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["query_ids"].shape[0] == 4 and (batch["reference_ids"] != PAD_ID).any(dim=1).all()
    reference = real(batch["reference_ids"][0])
    assert reference[-1] == IM_END and tokenizer.decode(reference[:-1]).strip() == batch["reference"][0]
    assert batch["prompt_text"][0] == rows(CHAT_DATA / "prompts" / "validation.jsonl", 1)[0]["prompt"][0]["content"].strip()
    train = next(iter(dm.train_dataloader()))
    assert not (train["reference_ids"] != PAD_ID).any()  # the training prompts have no reference


def test_sft_datamodule_on_chat_rows_masks_the_prompt(tokenizer, default_model_dir):
    dm = SFTDataModule(path=str(CHAT_DATA / "sft"), tokenizer=str(default_model_dir), query_length=256, response_length=256,
                       max_length=512, train_samples=8, val_samples=4)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    for ids, mask, query in zip(batch["input_ids"], batch["loss_mask"], batch["query_ids"]):
        prompt = real(query)
        assert real(ids)[: len(prompt)] == prompt and not mask[: len(prompt)].any() and mask[len(prompt):].sum() > 0
        assert ids[mask][-1].item() == IM_END


def test_bad_sources_are_named(tmp_path, tokenizer, default_model_dir):
    unknown = write_split(tmp_path / "odd", [{"question": "q", "answer": "a"}])
    dm = SFTDataModule(path=str(unknown), tokenizer=str(default_model_dir))
    dm.tokenizer = tokenizer
    with pytest.raises(ValueError, match=r"odd/train\.jsonl: the first row fits no dataset format: found columns \['answer', 'question'\]"):
        dm.setup("fit")
    pairs = write_split(tmp_path / "pairs", [{"prompt": [USER], "chosen": [ANSWER], "rejected": [ANSWER]}])
    with pytest.raises(ValueError, match="preference rows cannot feed SFTDataModule"):
        SFTDataModule(path=str(pairs), tokenizer=str(default_model_dir)).setup("fit")
    pair = {"prompt": [USER], "chosen": [ANSWER], "rejected": [ANSWER]}
    missing = write_split(tmp_path / "missing", [pair, {"prompt": [USER], "chosen": [ANSWER]}])
    dm = PreferenceDataModule(path=str(missing), tokenizer=str(default_model_dir), sft_path=None)
    with pytest.raises(ValueError, match=r"missing/train\.jsonl:2: missing field 'rejected'"):
        dm.setup("fit")


def test_invalid_rows_are_counted_or_stop_the_run(tmp_path, tokenizer, default_model_dir, caplog):
    good = {"messages": [USER, ANSWER]}
    empty = {"messages": [USER, {"role": "assistant", "content": ""}]}
    data = write_split(tmp_path / "chat", [good, {"messages": [USER, ANSWER, ANSWER]}, good, empty])
    dm = SFTDataModule(path=str(data), tokenizer=str(default_model_dir), query_length=64, max_length=128)
    dm.tokenizer = tokenizer
    with caplog.at_level(logging.WARNING, logger="lit_rlhf.data.datamodules"):
        dm.setup("fit")
    assert len(dm.splits["train"]) == 2
    assert "chat/train: dropped 2 of 4 rows: 1 whose roles do not alternate (first: row 2" in caplog.text
    assert "1 with an empty turn (first: row 4" in caplog.text
    strict = SFTDataModule(path=str(data), tokenizer=str(default_model_dir), query_length=64, max_length=128, invalid_rows="error")
    with pytest.raises(ValueError, match=r"chat/train\.jsonl:2: 'messages\[2\]' is an assistant turn where a user turn was expected"):
        strict.setup("fit")
