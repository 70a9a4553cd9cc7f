"""Stage smoke tests on a tiny random-init Llama: SFT -> RM -> PPO through ``lit_rlhf.cli.main``.

The stages are chained as in the quickstart (the SFT export feeds the RM, the RM export feeds PPO), each with
a few steps on small subsets of the shared TL;DR sample. Also: checkpoint round trips, the PPO rollout, PPO
validation before training, and bad command lines.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import SFT_DATA
from stage_helpers import (
    QUERY_LENGTH,
    RM_MAX_LENGTH,
    RM_RESPONSE_LENGTH,
    SFT_MAX_LENGTH,
    SFT_RESPONSE_LENGTH,
    assert_finite,
    direct_kl,
    last_checkpoint,
    last_record,
    load_checkpoint,
    record_sampling,
    results,
    stage_config,
    validation_queries,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

import lit_rlhf.stages.ppo as ppo_stage
from lit_rlhf.algorithms import INVALID_LOGPROB
from lit_rlhf.cli import main
from lit_rlhf.data.datamodules import PreferenceDataModule
from lit_rlhf.metrics import mean_with_interval
from lit_rlhf.models.forward import model_inputs, sequence_scores
from lit_rlhf.models.loading import PAD_TOKEN, load_tokenizer, stop_token_ids
from lit_rlhf.models.scalar import ScalarModel
from lit_rlhf.stages.ppo import PPOModule
from lit_rlhf.stages.reward import RewardModule

VOCAB = 49152  # the tiny model's embedding rows (SmolLM2's vocabulary; [PAD] lies outside, recipe D6)


# ---------------------------------------------------------------------------------------------- the chained runs
@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stages")


@pytest.fixture(scope="module")
def sft_run(runs_root, tiny_model_dir) -> Path:
    config = stage_config("sft", runs_root, model={"model": str(tiny_model_dir), "lr": 1e-3})
    main(["sft", "fit", "--config", str(config)])
    return runs_root / "sft"


@pytest.fixture(scope="module")
def rm_run(runs_root, sft_run) -> Path:
    # 5 validation comparisons: an odd count, so that an accuracy computed with chosen and rejected swapped differs
    config = stage_config("rm", runs_root, model={"model": str(sft_run / "model"), "lr": 1e-3}, data={"val_samples": 5})
    main(["rm", "fit", "--config", str(config)])
    return runs_root / "rm"


@pytest.fixture(scope="module")
def ppo_run(runs_root, sft_run, rm_run) -> Path:
    model = {"policy": str(sft_run / "model"), "reward_model": str(rm_run / "model"), "lr": 1e-3, "trainable_layers": 1}
    config = stage_config("ppo", runs_root, model=model)
    main(["ppo", "fit", "--config", str(config)])
    return runs_root / "ppo"


# ------------------------------------------------------------------------------------------------------------ SFT
def test_sft_fit_logs_finite_losses(sft_run):
    record = last_record(sft_run, "fit")
    assert record["global_step"] == 4  # 8 rows, batch 2, one epoch
    assert_finite(record["metrics"], "train/loss", "val/loss", "val/rouge1_fmeasure", "val/rougeL_fmeasure")
    # a random-init model predicts about uniformly over the vocabulary
    assert abs(record["metrics"]["val/loss"] - math.log(VOCAB)) < 0.5
    assert 0 < len(record["samples"]) <= 2 and {"query", "response", "reference"} <= set(record["samples"][0])


def test_sft_export_loads_with_pad_token(sft_run, tiny_model_dir):
    export = sft_run / "model"
    assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert PAD_TOKEN not in tokenizer.get_vocab() and tokenizer.pad_token_id == tokenizer.eos_token_id  # the model's own pad
    assert model.get_input_embeddings().num_embeddings == VOCAB  # not resized for [PAD] (recipe D6)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trained_params, initial_params = dict(model.named_parameters()), dict(initial.named_parameters())
    assert trained_params.keys() == initial_params.keys()
    assert any(not torch.equal(trained_params[key], initial_params[key]) for key in trained_params), "training changed nothing"


def test_sft_checkpoint_round_trip(sft_run, runs_root, tiny_model_dir, tmp_path):
    checkpoint = last_checkpoint(runs_root, "sft")
    state = load_checkpoint(checkpoint)
    assert state["global_step"] == 4
    assert any(key.startswith("policy.") for key in state["state_dict"])
    config = stage_config("sft", tmp_path, model={"model": str(tiny_model_dir), "lr": 1e-3})
    # the checkpoint's weights give back the fit's final validation loss exactly
    main(["sft", "validate", "--config", str(config), "--ckpt_path", str(checkpoint)])
    validated = last_record(tmp_path / "sft", "validate")["metrics"]["val/loss"]
    assert validated == pytest.approx(last_record(sft_run, "fit")["metrics"]["val/loss"], rel=1e-5)
    # resuming fit continues from step 4 for a second epoch
    main(["sft", "fit", "--config", str(config), "--trainer.max_epochs", "2", "--ckpt_path", str(checkpoint)])
    resumed = load_checkpoint(last_checkpoint(tmp_path, "sft"))
    assert resumed["global_step"] == 8
    assert_finite(last_record(tmp_path / "sft", "fit")["metrics"], "train/loss", "val/loss")
    assert (tmp_path / "sft" / "model" / "config.json").is_file()


def test_sft_validate_without_fit(tiny_model_dir, tmp_path):
    config = stage_config("sft", tmp_path, model={"model": str(tiny_model_dir)})
    main(["sft", "validate", "--config", str(config)])
    records = results(tmp_path / "sft")
    assert [record["fn"] for record in records] == ["validate"]
    metrics = records[0]["metrics"]
    assert_finite(metrics, "val/loss", "val/rouge1_fmeasure")
    assert abs(metrics["val/loss"] - math.log(VOCAB)) < 0.5
    assert not (tmp_path / "sft" / "model").exists()  # the HF export belongs to fit only


# ------------------------------------------------------------------------------------------------------------- RM
def test_rm_fit_logs_finite_losses_and_accuracy(rm_run, sft_run):
    record = last_record(rm_run, "fit")
    assert record["global_step"] == 4
    metrics = record["metrics"]
    assert_finite(metrics, "train/loss", "val/loss", "val/accuracy", "val/chosen_score", "val/rejected_score", "val/padding_rel_diff")
    assert metrics["val/padding_rel_diff"] < 1e-2  # recipe R7: left and right padding score alike
    # the validation figures again from the export (the final weights; validation ran before the R5 bias was set),
    # each whole (query, summary) row scored on its own instead of the stage's shared-query forward
    model = ScalarModel.load(str(rm_run / "model"))
    data = PreferenceDataModule(
        path=str(SFT_DATA.parent / "comparisons"), tokenizer=str(sft_run / "model"), query_length=QUERY_LENGTH,
        response_length=RM_RESPONSE_LENGTH, max_length=RM_MAX_LENGTH, eval_batch_size=2, val_samples=5,
    )
    data.setup("validate")
    pad = load_tokenizer(str(sft_run / "model")).pad_token_id
    with torch.no_grad():
        chosen, rejected = (
            torch.cat([sequence_scores(model, batch[key], pad) for batch in data.val_dataloader()]) + model.config.bias
            for key in ("chosen_ids", "rejected_ids")
        )
    correct = (chosen > rejected).float()
    assert correct.numel() == 5
    interval = mean_with_interval(correct)
    assert [metrics[f"val/accuracy{end}"] for end in ("", "_low", "_high")] == pytest.approx(
        [interval["mean"], interval["low"], interval["high"]], abs=1e-6)
    assert metrics["val/loss"] == pytest.approx(-F.logsigmoid(chosen - rejected).mean().item(), rel=1e-4)
    assert metrics["val/chosen_score"] == pytest.approx(chosen.mean().item(), rel=1e-4, abs=1e-5)
    assert metrics["val/rejected_score"] == pytest.approx(rejected.mean().item(), rel=1e-4, abs=1e-5)
    assert any(key.startswith("val/accuracy_batch/") for key in metrics)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)` but the `self.trainer` reference is not registered:UserWarning")
def test_rm_padding_check_runs_in_full_precision_under_bf16_autocast(default_model_dir):  # the module has no trainer here
    """Recipe R7 checks masks and positions: under bf16 autocast left and right padding round differently (on
    SmolLM2-135M; the tiny random model rounds both alike), so the check runs with autocast off and finds them equal."""
    module = RewardModule(model=str(default_model_dir))
    module.load_models()
    torch.manual_seed(0)
    pad = module.tokenizer.pad_token_id
    ids = torch.full((4, 40), pad)
    for row, length in enumerate((40, 31, 17, 9)):
        ids[row, :length] = torch.randint(3, 1000, (length,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = sequence_scores(module.reward_model, ids, pad)
        gap = module.padding_check(ids)
    assert rounded.dtype == torch.float32 and not torch.equal(rounded, sequence_scores(module.reward_model, ids, pad))
    assert gap < 1e-5


def test_rm_export_has_r5_bias(rm_run, sft_run):
    export = rm_run / "model"
    model = ScalarModel.load(str(export))
    bias = model.config.bias
    assert isinstance(bias, float) and bias != 0.0 and math.isfinite(bias)
    tokenizer = load_tokenizer(str(export))
    assert tokenizer.pad_token == PAD_TOKEN
    # re-score the rows the normalisation used: they now average ~0 and their raw mean is the bias (R5)
    data = PreferenceDataModule(
        path=str(SFT_DATA.parent / "comparisons"), tokenizer=str(sft_run / "model"), query_length=QUERY_LENGTH,
        eval_batch_size=4, sft_path=str(SFT_DATA), normalization_samples=8,
        sft_response_length=SFT_RESPONSE_LENGTH, sft_max_length=SFT_MAX_LENGTH,
    )

    def score_rows() -> torch.Tensor:
        with torch.no_grad():
            batches = data.normalization_dataloader()
            return torch.cat([sequence_scores(model, rows["input_ids"], tokenizer.pad_token_id) for rows in batches])

    scores = score_rows()
    assert scores.numel() == 8
    tolerance = 1e-4 * max(1.0, abs(bias))
    assert abs(scores.mean().item()) < tolerance
    model.config.bias = 0.0
    raw = score_rows()
    assert raw.mean().item() == pytest.approx(bias, abs=tolerance)


# ------------------------------------------------------------------------------------------------------------ PPO
def test_ppo_fit_logs_finite_metrics(ppo_run):
    record = last_record(ppo_run, "fit")
    assert record["global_step"] == 2 * 2  # 2 updates (4 episodes, batch 2) x 2 PPO epochs x 1 minibatch
    metrics = record["metrics"]
    assert_finite(
        metrics, "loss/policy", "loss/value", "objective/kl", "objective/scores", "objective/rlhf_reward", "policy/approxkl",
        "objective/response_length", "eval/scores", "eval/kl", "eval/response_length", "eval/eos_fraction", "eval/win_rate",
    )
    assert 1.0 <= metrics["objective/response_length"] <= 8.0
    assert 1.0 <= metrics["eval/response_length"] <= 8.0
    # linear annealing over the 2 updates (P8): the last update ran at half the initial rate
    assert metrics["lr"] == pytest.approx(1e-3 * (1 - 1 / 2))
    # the near-uniform tiny policy ends none of its 2 x 8 sampled tokens with EOS (seeded; chance ~16 / 49152), so every
    # score is the penalty (P3)
    assert metrics["val/num_eos_tokens"] == 0
    assert metrics["objective/scores"] == pytest.approx(-1.0)


def test_ppo_export_has_policy_and_value_model(ppo_run, rm_run, sft_run):
    export = ppo_run / "model"
    policy = AutoModelForCausalLM.from_pretrained(export)
    assert policy.get_input_embeddings().num_embeddings == VOCAB
    # trainable_layers=1: embeddings and block 0 stay as the SFT export left them, block 1 was trained
    sft = dict(AutoModelForCausalLM.from_pretrained(sft_run / "model").named_parameters())
    trained = dict(policy.named_parameters())
    frozen = [key for key in trained if key.startswith(("model.embed_tokens.", "model.layers.0."))]
    assert frozen and all(torch.equal(trained[key], sft[key]) for key in frozen)
    assert any(not torch.equal(trained[key], sft[key]) for key in trained if key.startswith("model.layers.1."))
    assert AutoTokenizer.from_pretrained(export).pad_token != PAD_TOKEN  # [PAD] stays internal
    assert (export / "value" / "config.json").is_file()
    value = ScalarModel.load(str(export / "value"))
    reward = ScalarModel.load(str(rm_run / "model"))
    assert value.config.hidden_size == reward.config.hidden_size
    # the value model starts from the reward model (P1) and was trained: its head moved
    assert not torch.equal(value.scalar_head.weight, reward.scalar_head.weight)


def test_ppo_checkpoint_leaves_out_frozen_models_and_resumes(ppo_run, runs_root, sft_run, rm_run, tmp_path):
    checkpoint = last_checkpoint(runs_root, "ppo")
    state = load_checkpoint(checkpoint)
    keys = list(state["state_dict"])
    assert any(key.startswith("policy.") for key in keys) and any(key.startswith("value_model.") for key in keys)
    assert not [key for key in keys if key.startswith(("ref_policy.", "reward_model."))]
    assert state["global_step"] == 4
    model = {"policy": str(sft_run / "model"), "reward_model": str(rm_run / "model"), "lr": 1e-3, "trainable_layers": 1}
    config = stage_config("ppo", tmp_path, model=model)
    # validation from the checkpoint reproduces the fit's final evaluation (sampling is seeded per batch)
    main(["ppo", "validate", "--config", str(config), "--ckpt_path", str(checkpoint)])
    validated = last_record(tmp_path / "ppo", "validate")["metrics"]
    fitted = last_record(ppo_run, "fit")["metrics"]
    for key in ("eval/scores", "eval/kl", "eval/response_length"):
        assert validated[key] == pytest.approx(fitted[key], rel=1e-4, abs=1e-5), key
    main(["ppo", "fit", "--config", str(config), "--trainer.max_epochs", "2", "--ckpt_path", str(checkpoint)])
    resumed = load_checkpoint(last_checkpoint(tmp_path, "ppo"))
    assert resumed["global_step"] == 8
    assert not [key for key in resumed["state_dict"] if key.startswith(("ref_policy.", "reward_model."))]
    assert_finite(last_record(tmp_path / "ppo", "fit")["metrics"], "loss/policy", "loss/value")
    assert (tmp_path / "ppo" / "model" / "value" / "config.json").is_file()


def test_ppo_validate_before_training_has_zero_kl(rm_run, tiny_model_dir, tmp_path):
    config = stage_config("ppo", tmp_path, model={"policy": str(tiny_model_dir), "reward_model": str(rm_run / "model")})
    main(["ppo", "validate", "--config", str(config)])
    metrics = last_record(tmp_path / "ppo", "validate")["metrics"]
    assert_finite(metrics, "eval/scores", "eval/kl", "eval/response_length", "eval/eos_fraction")
    assert metrics["eval/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    assert 1.0 <= metrics["eval/response_length"] <= 8.0
    assert 0.0 <= metrics["eval/eos_fraction"] <= 1.0
    # the random-init policy ends none of its responses (seeded; chance ~32 / 49152): all get the penalty score (P3)
    assert metrics["eval/eos_fraction"] == 0.0
    assert metrics["eval/scores"] == pytest.approx(-1.0)
    # the RM judge's win rate against the reference summaries: 4 prompts, each 1, 0.5 or 0 -> a multiple of 1/8
    assert 0.0 <= metrics["eval/win_rate_low"] <= metrics["eval/win_rate"] <= metrics["eval/win_rate_high"] <= 1.0
    assert (metrics["eval/win_rate"] * 8) == pytest.approx(round(metrics["eval/win_rate"] * 8))


def test_ppo_validate_kl_of_a_trained_policy_is_the_sum_of_logprob_differences(
    sft_run, tiny_model_dir, tiny_reward_dir, tmp_path, monkeypatch
):
    """A policy that differs from its reference (the SFT export against the random init it was trained from) runs
    both models: ``eval/kl`` is the mean over prompts of the summed, temperature-scaled logprob differences of the
    sampled responses (P4), recomputed here by a plain forward of each model."""
    sampled = record_sampling(monkeypatch)
    model = {"policy": str(sft_run / "model"), "ref_policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir)}
    main(["ppo", "validate", "--config", str(stage_config("ppo", tmp_path, model=model))])
    metrics = last_record(tmp_path / "ppo", "validate")["metrics"]
    policy, reference = (AutoModelForCausalLM.from_pretrained(path) for path in (sft_run / "model", tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    queries, responses = (torch.cat(parts) for parts in zip(*sampled))
    assert queries.size(0) == 4  # the 4 validation prompts, each sampled once
    kl = direct_kl(policy, reference, queries, responses, stop_token_ids(tokenizer), tokenizer.pad_token_id,
                   metrics["eval/temperature"])
    assert kl.abs().mean() > 1e-2  # the trained policy is not its reference
    assert metrics["eval/kl"] == pytest.approx(kl.mean().item(), rel=1e-4, abs=1e-6)


# -------------------------------------------------------------------------------------------------- the rollout
RESPONSE_LENGTH = 12


@pytest.fixture
def ppo_module(tiny_model_dir, tiny_reward_dir) -> PPOModule:
    module = PPOModule(policy=str(tiny_model_dir), reward_model=str(tiny_reward_dir), response_length=RESPONSE_LENGTH, kl_coef=0.05)
    module.configure_model()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module.trainer = trainer  # rollout reduces its statistics through trainer.strategy
    return module


@pytest.fixture(scope="module")
def queries(tiny_model_dir) -> torch.Tensor:
    return validation_queries(tiny_model_dir, 4)


def test_rollout_shapes_and_masks(ppo_module, queries):
    torch.manual_seed(0)
    data = ppo_module.rollout(queries)
    batch, context = queries.shape
    assert data["responses"].shape == (batch, RESPONSE_LENGTH)
    assert data["query_responses"].shape == (batch, context + RESPONSE_LENGTH)
    assert torch.equal(data["query_responses"][:, :context], queries)
    for key in ("logprobs", "ref_logprobs", "values", "rewards", "kl", "advantages", "returns", "padding_mask"):
        assert data[key].shape == (batch, RESPONSE_LENGTH), key
    assert data["scores"].shape == (batch,)
    # policy == reference before training: the KL is exactly 0
    assert torch.equal(data["logprobs"], data["ref_logprobs"]) and not data["kl"].any()


def test_rollout_with_frozen_trunk_matches_full_models(tiny_model_dir, tiny_reward_dir, ppo_module, queries):
    """trainable_layers=1: the shared lower block runs once, the rollout and the PPO loss are unchanged."""
    split = PPOModule(policy=str(tiny_model_dir), reward_model=str(tiny_reward_dir), response_length=RESPONSE_LENGTH, trainable_layers=1)
    split.configure_model()
    split.trainer = ppo_module.trainer
    split.share_frozen_trunks()
    ppo_module.share_frozen_trunks()
    assert split.policy_trunk.num_blocks == 1 and split.value_trunk.num_blocks == 1 and not ppo_module.policy_trunk
    # the tiny reward model is built on the tiny policy's backbone: one trunk serves all four models
    assert split.policy_trunk is split.value_trunk
    torch.manual_seed(0)
    full_data = ppo_module.rollout(queries)
    torch.manual_seed(0)
    split_data = split.rollout(queries)
    assert split_data["policy_hidden"].shape == (*full_data["query_responses"].shape, 32) and "policy_hidden" not in full_data
    for key in ("responses", "logprobs", "ref_logprobs", "values", "scores", "advantages", "returns"):
        torch.testing.assert_close(split_data[key], full_data[key], rtol=0, atol=1e-5, msg=key)
    rows = torch.tensor([2, 0])
    full_loss, _ = ppo_module.ppo_loss(full_data, rows, queries.size(1))
    split_loss, _ = split.ppo_loss(split_data, rows, queries.size(1))
    torch.testing.assert_close(split_loss, full_loss, rtol=0, atol=1e-6)
    # a value/reward model whose lower block differs from the policy's gets its own trunk, still exact
    with torch.no_grad():
        for model in (split.value_model, split.reward_model):
            model.backbone.layers[0].mlp.up_proj.weight.add_(0.1)
    split.share_frozen_trunks()
    assert split.policy_trunk.num_blocks == split.value_trunk.num_blocks == 1 and split.policy_trunk is not split.value_trunk
    torch.manual_seed(0)
    data = split.rollout(queries)
    pad, context = split.tokenizer.pad_token_id, queries.size(1)
    values = split.value_model(**model_inputs(data["query_responses"], pad))[:, context - 1 : -1].float()
    torch.testing.assert_close(data["values"], values.masked_fill(data["value_padding_mask"], 0.0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("score_position, whitening_scope", [("after_eos", "rank"), ("eos", "global")])
def test_rollout_eos_truncation_penalty_and_whitening(ppo_module, queries, monkeypatch, score_position, whitening_scope):
    pad = ppo_module.tokenizer.pad_token_id
    monkeypatch.setitem(ppo_module.hparams, "score_position", score_position)
    monkeypatch.setitem(ppo_module.hparams, "whitening_scope", whitening_scope)
    real_generate = ppo_stage.generate
    raw = {}

    def generate_with_eos(model, query_ids, pad_token_id, stop_ids, max_new_tokens, temperature):
        assert stop_ids == [ppo_module.tokenizer.eos_token_id]  # every stop id: SmolLM2's EOS is its end of turn
        eos_token_id = stop_ids[0]
        responses = real_generate(model, query_ids, pad_token_id, stop_ids, max_new_tokens, temperature)
        assert responses.shape == (query_ids.size(0), max_new_tokens)  # exactly response_length tokens (P2)
        responses = responses.masked_fill(responses == eos_token_id, 5)  # only the EOS placed below
        responses[0, 3] = eos_token_id  # EOS in the middle
        responses[1, 0] = eos_token_id  # EOS first, and a second one later
        responses[1, 6] = eos_token_id
        responses[3, RESPONSE_LENGTH - 1] = eos_token_id  # EOS as the last token; row 2 has none
        raw["responses"] = responses.clone()
        return responses

    monkeypatch.setattr(ppo_stage, "generate", generate_with_eos)
    strategy = ppo_module.trainer.strategy
    reductions = []

    def reduce(tensor, *args, **kwargs):
        reductions.append(kwargs.get("reduce_op", args[1] if len(args) > 1 else None))
        return tensor  # one rank

    monkeypatch.setattr(strategy, "reduce", reduce)
    torch.manual_seed(0)
    data = ppo_module.rollout(queries)
    # whitening statistics: each process's own batch (N+, no reduction) or the global batch (P6)
    if whitening_scope == "rank":
        assert reductions == []
    else:
        assert reductions and all(op == "sum" for op in reductions), reductions
    context = queries.size(1)
    responses = raw["responses"]
    assert torch.equal(data["responses"], responses)  # raw samples are kept
    processed = data["query_responses"][:, context:]
    last_index = torch.tensor([3, 0, RESPONSE_LENGTH - 1, RESPONSE_LENGTH - 1])  # L: EOS, or the last token without one
    after = score_position == "after_eos"
    # N+: score at L + 1 unless L is the last position (rows 2, 3); values trained up to L + 1 (padding_mask_p1)
    score_index = torch.tensor([4, 1, RESPONSE_LENGTH - 1, RESPONSE_LENGTH - 1]) if after else last_index
    positions = torch.arange(RESPONSE_LENGTH)
    for row in range(4):
        last = int(last_index[row])
        assert torch.equal(processed[row, : last + 1], responses[row, : last + 1]), row
        assert (processed[row, last + 1 :] == pad).all(), row  # PAD after the first EOS (P3)
        assert torch.equal(data["padding_mask"][row], positions > last), row
        assert torch.equal(data["value_padding_mask"][row], positions > last + int(after)), row
    padding, value_padding = data["padding_mask"], data["value_padding_mask"]
    assert padding.any() and (~padding).any()
    # a response without EOS scores the penalty; the others keep the reward model's score (P3)
    assert data["scores"][2].item() == -1.0
    rm_scores = sequence_scores(ppo_module.reward_model, data["query_responses"], pad)
    for row in (0, 1, 3):
        assert data["scores"][row].item() == pytest.approx(rm_scores[row].item(), abs=1e-5)
        assert data["scores"][row].item() != -1.0
    # padded positions: sentinel logprobs, zero KL, zero advantage (P4, P6); values zero after the value mask only
    assert (data["logprobs"][padding] == INVALID_LOGPROB).all() and (data["ref_logprobs"][padding] == INVALID_LOGPROB).all()
    assert not data["kl"][padding].any() and not data["advantages"][padding].any()
    assert not data["values"][value_padding].any() and not data["returns"][value_padding].any()
    if after:  # N+: the value at L + 1 (the state after the EOS) is kept for rows 0 and 1
        assert (data["values"][torch.arange(2), score_index[:2]] != 0).all()
    # the score lands on score_index, plus the KL penalty there (0 at L + 1, a padded position) (P5)
    rows = torch.arange(4)
    expected = data["scores"] - 0.05 * data["kl"][rows, score_index]
    assert torch.allclose(data["rewards"][rows, score_index], expected, atol=1e-6)
    others = torch.ones_like(data["rewards"], dtype=torch.bool)
    others[rows, score_index] = False
    torch.testing.assert_close(data["rewards"][others], data["non_score_reward"][others])
    # advantages are whitened over the real tokens with the biased variance (N+ masked_whiten)
    real = data["advantages"][~padding]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert real.var(unbiased=False).item() == pytest.approx(1.0, rel=1e-4)
    assert torch.isfinite(data["returns"]).all()


# ------------------------------------------------------------------------------------------------ bad CLI input
@pytest.mark.parametrize("argv", [["bogus", "fit"], [], ["--help"]])
def test_cli_unknown_stage_prints_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: lit-rlhf {sft|rm|ppo|rloo|grpo|dr-grpo|reinforce-pp|dpo|online-dpo}" in err


def test_cli_missing_model_path_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    config = stage_config("sft", tmp_path, model={"model": str(missing)})
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        main(["sft", "validate", "--config", str(config)])


def test_identical_models_and_validation_scores_with_the_query_shared(tiny_model_dir, tiny_reward_dir, tokenizer):
    from lit_rlhf.models.forward import sequence_scores
    from lit_rlhf.models.lora import LoRA, add_lora
    from lit_rlhf.models.scalar import ScalarModel
    from lit_rlhf.sampling import sample_and_score
    from lit_rlhf.stages.policy_eval import identical_models

    policy, reference = (AutoModelForCausalLM.from_pretrained(tiny_model_dir) for _ in range(2))
    assert identical_models(policy, reference) and identical_models(policy, policy)
    with torch.no_grad():
        policy.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    assert not identical_models(policy, reference)
    assert not identical_models(add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoRA(r=2)), reference)

    reward_model = ScalarModel.load(str(tiny_reward_dir))
    pad = tokenizer.pad_token_id
    queries = torch.tensor([[pad, pad, 11, 12, 13], [21, 22, 23, 24, 25], [pad, pad, pad, pad, 31]])
    references = ["a short one", "another reference summary"]  # the third prompt has none
    reference_ids = [[*tokenizer.encode(" " + text, add_special_tokens=False), tokenizer.eos_token_id] for text in references]
    padded = torch.full((3, max(map(len, reference_ids))), pad)
    for row, ids in enumerate(reference_ids):
        padded[row, : len(ids)] = torch.tensor(ids)
    torch.manual_seed(5)
    sample = sample_and_score(reference, reward_model, queries, tokenizer, 6, 0.7, reference_ids=padded)
    torch.manual_seed(5)
    alone = sample_and_score(reference, reward_model, queries, tokenizer, 6, 0.7)
    assert torch.equal(sample["responses"], alone["responses"])
    torch.testing.assert_close(sample["scores"], alone["scores"], rtol=0, atol=1e-5)  # each query once vs whole rows
    for row, ids in enumerate(reference_ids):
        whole = sequence_scores(reward_model, torch.cat([queries[row], torch.tensor(ids)])[None], pad)
        torch.testing.assert_close(sample["reference_scores"][row : row + 1], whole, rtol=0, atol=1e-5)
    assert sample["reference_scores"][2].isnan()  # no reference: no score, and no outcome against it
