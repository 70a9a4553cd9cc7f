"""Exports that plain transformers can batch-generate from, a pad id no real token equals, every stop id ending a
response, the batched DPO reference cache and generate's cast copy (issue 27, "Exports and tokenizers that work
everywhere")."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from stage_helpers import stage_config
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from lit_rlhf.cli import main
from lit_rlhf.models.loading import PAD_TOKEN, load_tokenizer, stop_token_ids

VOCAB = 49152  # the tiny model's embedding rows (SmolLM2's vocabulary)
PROMPTS = ["TL;DR:", "The cat sat on the mat and then", "SUBREDDIT: r/tifu\n\nTITLE: I locked myself out of my flat\n\nPOST:"]


# ------------------------------------------------------------------------------------------------------- exports
@pytest.fixture(scope="module")
def sft_export(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("export")
    main(["sft", "fit", "--config", str(stage_config("sft", root, model={"model": str(tiny_model_dir), "lr": 1e-3}))])
    return root / "sft" / "model"


def test_sft_export_batch_generates_with_a_plain_pipeline(sft_export):
    tokenizer = AutoTokenizer.from_pretrained(sft_export)
    model = AutoModelForCausalLM.from_pretrained(sft_export)
    # the model's own pad token (SmolLM2's <|im_end|>, its EOS), not the internal [PAD] outside the embeddings
    assert PAD_TOKEN not in tokenizer.get_vocab() and tokenizer.pad_token_id < model.get_input_embeddings().num_embeddings
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.padding_side == "left"
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    lengths = [len(tokenizer(prompt)["input_ids"]) for prompt in PROMPTS]
    assert len(set(lengths)) == len(PROMPTS)  # one batch of three different lengths: padding is needed
    batched = generator(PROMPTS, batch_size=len(PROMPTS), max_new_tokens=6, do_sample=False, return_full_text=False)
    alone = [generator(prompt, max_new_tokens=6, do_sample=False, return_full_text=False) for prompt in PROMPTS]
    assert [out[0]["generated_text"] for out in batched] == [out[0]["generated_text"] for out in alone]  # left padding


def test_the_next_stage_loads_the_export_with_a_distinct_internal_pad(sft_export, tiny_model_dir):
    tokenizer = load_tokenizer(str(sft_export))
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id not in stop_token_ids(tokenizer)
    assert tokenizer.pad_token_id == load_tokenizer(str(tiny_model_dir)).pad_token_id == VOCAB  # the same id every stage
    assert tokenizer.padding_side == "left"


def test_reward_model_export_scores_right_padded_batches(tiny_model_dir, tmp_path):
    from lit_rlhf.models.forward import sequence_scores
    from lit_rlhf.models.scalar import ScalarModel
    from lit_rlhf.stages.reward import RewardModule

    module = RewardModule(model=str(tiny_model_dir))
    module.configure_model()
    module.save_hf(tmp_path)
    tokenizer, model = AutoTokenizer.from_pretrained(tmp_path), ScalarModel.load(str(tmp_path))
    assert PAD_TOKEN not in tokenizer.get_vocab() and tokenizer.padding_side == "right"  # positions count from column 0
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        values = model(**batch)  # (B, L)
        scores = values[torch.arange(len(PROMPTS)), batch["attention_mask"].sum(1) - 1]
        alone = [model(**tokenizer(prompt, return_tensors="pt"))[0, -1] for prompt in PROMPTS]
        ours = load_tokenizer(str(tmp_path))  # the next stage (PPO) reads the export with its internal pad
        ids = ours(PROMPTS, padding=True, return_tensors="pt")["input_ids"]  # left-padded with [PAD]
        internal = sequence_scores(model, ids, ours.pad_token_id)
    torch.testing.assert_close(scores, torch.stack(alone), rtol=0, atol=1e-5)
    torch.testing.assert_close(internal, scores, rtol=0, atol=1e-5)
    assert ours.pad_token == PAD_TOKEN and ours.padding_side == "left"


# ------------------------------------------------------------------------------------------- padding vs real text
OWN_PAD = 0  # SmolLM2's <|endoftext|>: made the tokenizer's own pad token below, distinct from EOS (<|im_end|>, 2)


@pytest.fixture(scope="module")
def own_pad_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model with a tokenizer whose own pad token is distinct from every stop id (as Qwen's, Llama 3's)."""
    directory = tmp_path_factory.mktemp("own-pad")
    for path in tiny_model_dir.iterdir():
        shutil.copy(path, directory / path.name)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(OWN_PAD)
    tokenizer.save_pretrained(directory)
    return directory


def comparison_batch(pad: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Two comparisons whose real text holds ``OWN_PAD`` in queries and responses: the batch (queries left-padded,
    responses right-padded with ``pad``), its ``(4, Q + T)`` rows ``cat([chosen, rejected])`` and their real-token mask."""
    queries = [[5, OWN_PAD, 7], [OWN_PAD, 11, 12, 13, 14]]
    chosen, rejected = [[OWN_PAD, 8, 2], [15, OWN_PAD, OWN_PAD, 2]], [[9, 2], [OWN_PAD, 2]]
    q, t = max(map(len, queries)), max(map(len, chosen + rejected))

    def padded(rows: list[list[int]], width: int, fill: int, side: str) -> torch.Tensor:
        return torch.tensor([[fill] * (width - len(row)) + row if side == "left" else row + [fill] * (width - len(row)) for row in rows])

    def real(rows: list[list[int]], width: int, side: str) -> torch.Tensor:
        return padded([[1] * len(row) for row in rows], width, 0, side).bool()

    batch = {"query_ids": padded(queries, q, pad, "left"), "chosen_response_ids": padded(chosen, t, pad, "right"),
             "rejected_response_ids": padded(rejected, t, pad, "right")}
    responses = torch.cat([batch["chosen_response_ids"], batch["rejected_response_ids"]])
    ids = torch.cat([batch["query_ids"].repeat(2, 1), responses], 1)
    mask = torch.cat([real(queries, q, "left").repeat(2, 1), real(chosen + rejected, t, "right")], 1)
    return batch, ids, mask


def plain_inputs(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """A plain forward's inputs: the real-token mask as attention mask, positions counting real tokens."""
    return {"input_ids": ids.masked_fill(~mask, 3), "attention_mask": mask.long(), "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}


def test_a_tokenizers_own_pad_token_in_real_text_is_not_padding(own_pad_dir, tiny_model_dir):
    from lit_rlhf.models.forward import model_inputs, response_logprob_sums, sequence_scores
    from lit_rlhf.models.scalar import ScalarModel
    from lit_rlhf.stages.dpo import DPOModule
    from lit_rlhf.stages.reward import RewardModule

    tokenizer = load_tokenizer(str(own_pad_dir))
    pad = tokenizer.pad_token_id
    assert AutoTokenizer.from_pretrained(own_pad_dir).pad_token_id == OWN_PAD and pad != OWN_PAD
    batch, ids, mask = comparison_batch(pad)
    assert (ids == OWN_PAD).sum() == 8 and torch.equal(model_inputs(ids, pad)["attention_mask"].bool(), mask)
    context, rows = batch["query_ids"].size(1), torch.arange(ids.size(0))
    responses = ids[:, context:]
    # DPO: summed response logprobs, policy (no cache) and reference (through the reference cache)
    dpo = DPOModule(model=str(own_pad_dir))
    dpo.configure_model()
    with torch.no_grad():
        logits = dpo.policy(**plain_inputs(ids, mask)).logits[:, context - 1 : -1].float()
        logprobs = torch.log_softmax(logits, -1).gather(-1, responses.masked_fill(~mask[:, context:], 0).unsqueeze(-1))[..., 0]
        want = logprobs.masked_fill(~mask[:, context:], 0).sum(1)
        torch.testing.assert_close(response_logprob_sums(dpo.policy, ids, context, pad), want, rtol=0, atol=1e-5)
        got = dpo.pair_logprobs(batch)
    torch.testing.assert_close(torch.cat([got["ref_chosen"], got["ref_rejected"]]), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([got["policy_chosen"], got["policy_rejected"]]), want, rtol=0, atol=1e-5)
    # reward model scores, whole rows and through the cached frozen trunk (trainable_layers=1)
    reward_model = ScalarModel.from_backbone(str(own_pad_dir))
    with torch.no_grad():
        values = reward_model(**plain_inputs(ids, mask))
        want_scores = values[rows, mask.long().cumsum(1).argmax(1)]  # the last real token
        torch.testing.assert_close(sequence_scores(reward_model, ids, pad), want_scores, rtol=0, atol=1e-5)
        rm = RewardModule(model=str(own_pad_dir), trainable_layers=1)
        rm.configure_model()
        rm.share_frozen_trunks()
        assert rm.trunk.cache is not None
        torch.testing.assert_close(rm.scores(ids), rm.reward_model(**plain_inputs(ids, mask))[rows, mask.long().cumsum(1).argmax(1)],
                                   rtol=0, atol=1e-5)


# -------------------------------------------------------------------------------------------- DPO reference cache
def test_dpo_reference_cache_runs_the_missed_rows_in_one_forward(tiny_model_dir):
    from lit_rlhf.stages.dpo import DPOModule

    module = DPOModule(model=str(tiny_model_dir))
    module.configure_model()
    batch, ids, _ = comparison_batch(module.tokenizer.pad_token_id)
    calls = []
    module.ref_policy.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    with torch.no_grad():
        cached = module.pair_logprobs(batch)  # every row a miss
        assert calls == [ids.shape] and module.reference_logprobs.misses == 4  # one forward for the four rows
        again = module.pair_logprobs(batch)  # every row a hit
        assert len(calls) == 1 and module.reference_logprobs.hits == 4
        module.reference_logprobs = None
        uncached = module.pair_logprobs(batch)
    for key in ("ref_chosen", "ref_rejected"):
        torch.testing.assert_close(cached[key], uncached[key], rtol=0, atol=1e-6)
        assert torch.equal(again[key], cached[key])


# ----------------------------------------------------------------------------------------------- several EOS ids
SECOND_EOS = 5  # a second EOS id in the model's generation config, after the tokenizer's EOS (2)


def test_a_response_ending_on_the_second_eos_id_is_truncated_scored_there_and_not_penalised(tiny_model_dir, tiny_reward_dir, tmp_path,
                                                                                           monkeypatch):
    """Through PPO's rollout with the real ``generate``: rows stop on EOS ids 5 (second), 2 (first), none, 5 at the last step.
    transformers fills a row that stopped with token 0; every stop id ends the response the same way (P3)."""
    import json

    import lightning as L

    import lit_rlhf.stages.ppo as ppo_stage
    from lit_rlhf.models.forward import sequence_scores
    from lit_rlhf.sampling import decode_responses
    from lit_rlhf.stages.ppo import PPOModule

    for path in tiny_model_dir.iterdir():
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, SECOND_EOS]}))
    length = 8
    module = PPOModule(policy=str(tmp_path), reward_model=str(tiny_reward_dir), response_length=length, kl_coef=0.05)
    module.configure_model()
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    pad = module.tokenizer.pad_token_id
    assert stop_token_ids(module.tokenizer) == [2, SECOND_EOS]
    stops = {0: (2, SECOND_EOS), 1: (4, 2), 3: (length - 1, SECOND_EOS)}  # row: (step, stop id); row 2 never stops
    real_generate = ppo_stage.generate

    def generate_with_stops(model, *args):  # noqa: ANN001, ANN002
        step = []

        def force(_, __, logits):  # (B, 1, V) at each step: no stop id but the planned ones
            logits = logits.clone()
            logits[:, -1, [2, SECOND_EOS]] = float("-inf")
            for row, (at, token) in stops.items():
                if len(step) == at:
                    logits[row, -1, token] = 1e4
            step.append(1)
            return logits

        handle = model.lm_head.register_forward_hook(force)
        try:
            return real_generate(model, *args)
        finally:
            handle.remove()

    monkeypatch.setattr(ppo_stage, "generate", generate_with_stops)
    queries = torch.tensor([[pad, 11, 12, 13], [21, 22, 23, 24], [pad, pad, 31, 32], [pad, 41, 42, 43]])
    torch.manual_seed(0)
    data = module.rollout(queries)
    raw, processed = data["responses"], data["query_responses"][:, queries.size(1):]
    assert raw[0, 2] == SECOND_EOS and (raw[0, 3:] == 0).all()  # transformers' filler after the second EOS id
    positions = torch.arange(length)
    last = torch.tensor([2, 4, length - 1, length - 1])  # the stop token, or the last token without one
    for row in range(4):
        assert torch.equal(processed[row, : last[row] + 1], raw[row, : last[row] + 1]), row
        assert (processed[row, last[row] + 1 :] == pad).all() and torch.equal(data["padding_mask"][row], positions > last[row]), row
    rm_scores = sequence_scores(module.reward_model, data["query_responses"], pad)  # read at each row's last real token
    for row in (0, 1, 3):
        assert data["scores"][row].item() == pytest.approx(rm_scores[row].item(), abs=1e-5) and data["scores"][row] != -1.0
    assert data["scores"][2].item() == -1.0  # no stop id: the P3 penalty
    texts = decode_responses(module.tokenizer, raw)
    assert texts[0] == module.tokenizer.decode(raw[0, :2], skip_special_tokens=True).strip()  # cut at the second EOS id
