"""Every stage and both eval commands on the shared chat data (``../shared/data/chat``), with the tiny random-init Llama
and SmolLM2's tokenizer and chat template: SFT on conversations -> RM on a two-source mixture -> DPO, PPO and online DPO
(both reference modes) on chat prompts -> ``eval`` on MT-Bench and ``eval-rm`` on the mixture.

These are small real runs through ``lit_rlhf.cli.main``: they check that the chat rows reach every stage templated and
masked, that generation stops at the template's end-of-turn token and that the metrics come out per source; learning
itself is the chat quickstart's job (``make quickstart-chat``).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import CHAT_DATA
from stage_helpers import assert_finite, last_record, stage_config

from lit_rlhf.callbacks import HFExport
from lit_rlhf.cli import main
from lit_rlhf.data.datamodules import PromptDataModule
from lit_rlhf.evaluation.evaluate import evaluate
from lit_rlhf.evaluation.reward_eval import evaluate_reward_model
from lit_rlhf.models.loading import stop_token_ids
from lit_rlhf.stages.online_dpo import OnlineDPOModule

#: chat shapes: prompts keep their last turns within 160 tokens, responses up to 96 (longer ones are truncated)
CHAT_SHAPES = {"query_length": 160, "response_length": 96, "max_length": 256}
MIXTURE = [
    {"path": str(CHAT_DATA / "hh-rlhf-harmless"), "train_samples": 6, "val_samples": 6},
    {"path": str(CHAT_DATA / "preferences"), "train_samples": 6, "val_samples": 6},
]
PREFERENCE_DATA = {
    **CHAT_SHAPES, "path": None, "sources": MIXTURE, "long_responses": "truncate", "sft_path": None, "train_samples": None,
    "val_samples": None,
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("chat")


@pytest.fixture(scope="module")
def sft_run(root, tiny_model_dir) -> Path:
    data = {**CHAT_SHAPES, "path": str(CHAT_DATA / "sft"), "long_responses": "truncate"}
    config = stage_config("sft", root, model={"model": str(tiny_model_dir), "lr": 1e-3}, data=data)
    main(["sft", "fit", "--config", str(config)])
    return root / "sft"


@pytest.fixture(scope="module")
def rm_run(root, sft_run) -> Path:
    model = {"model": str(sft_run / "model"), "lr": 1e-3, "normalize": False}
    config = stage_config("rm", root, model=model, data=PREFERENCE_DATA)
    main(["rm", "fit", "--config", str(config)])
    return root / "rm"


def prompt_data(**overrides) -> dict:
    """Chat prompts; the validation rows (MT-Bench) keep their reference answers of up to 1,024 tokens."""
    return {**CHAT_SHAPES, "path": str(CHAT_DATA / "prompts"), "reference_length": 1024, **overrides}


def test_sft_on_conversations(sft_run):
    record = last_record(sft_run, "fit")
    assert record["global_step"] == 4  # 8 conversations, batch 2
    assert_finite(record["metrics"], "train/loss", "val/loss", "val/rouge1_fmeasure")
    sample = record["samples"][0]
    # the chat template's turns (special tokens are not shown), ending with the generation prompt
    assert "\nuser\n" in sample["query"] and sample["query"].endswith("\nassistant\n")


def test_rm_on_a_mixture_reports_each_source_beside_the_length_baseline(rm_run):
    metrics = last_record(rm_run, "fit")["metrics"]
    assert_finite(metrics, "train/loss", "val/loss", "val/accuracy", "val/longer_wins")
    for source in ("hh-rlhf-harmless", "preferences"):
        assert_finite(metrics, f"val/accuracy_source/{source}", f"val/longer_wins_source/{source}")
        low, high = metrics[f"val/accuracy_source/{source}_low"], metrics[f"val/accuracy_source/{source}_high"]
        assert 0.0 <= low <= metrics[f"val/accuracy_source/{source}"] <= high <= 1.0
    # 6 pairs per source: the overall accuracy is the mean of the two sources'
    overall = (metrics["val/accuracy_source/hh-rlhf-harmless"] + metrics["val/accuracy_source/preferences"]) / 2
    assert metrics["val/accuracy"] == pytest.approx(overall)


def test_dpo_on_chat_preferences(root, sft_run):
    # one frozen block: the policy and reference share its trunk, each pair's prompt running once (as the RM)
    model = {"model": str(sft_run / "model"), "lr": 1e-3, "trainable_layers": 1}
    config = stage_config("dpo", root, model=model, data=PREFERENCE_DATA)
    main(["dpo", "fit", "--config", str(config)])
    metrics = last_record(root / "dpo", "fit")["metrics"]
    assert_finite(metrics, "train/loss", "val/loss", "val/accuracy", "val/reward_margin", "val/accuracy_source/preferences")


def test_ppo_on_chat_prompts_stops_at_the_end_of_turn(root, sft_run, rm_run, tiny_model_dir):
    model = {"policy": str(sft_run / "model"), "reward_model": str(rm_run / "model"), "lr": 1e-3, "response_length": 8}
    config = stage_config("ppo", root, model=model, data=prompt_data())
    main(["ppo", "fit", "--config", str(config)])
    record = last_record(root / "ppo", "fit")
    assert_finite(record["metrics"], "loss/policy", "objective/scores", "objective/kl", "eval/scores")
    assert record["samples"][0]["query"].endswith("\nassistant\n")


def online_dpo(root: Path, name: str, policy: Path, reward_model: Path, reference: str) -> tuple[OnlineDPOModule, Path]:
    """Two iterations of 3 prompts x 4 samples (temperatures 1.0 and 0.7) with a per-epoch export; the module back."""
    module = OnlineDPOModule(
        policy=str(policy), reward_model=str(reward_model), samples_per_prompt=4, temperatures=[1.0, 0.7],
        response_length=6, reference=reference, dpo_epochs=2, dpo_batch_size=2, lr=1e-3, non_eos_penalty=False, num_samples=2,
    )
    data = PromptDataModule(
        **prompt_data(batch_size=3, eval_batch_size=2, total_episodes=3, train_samples=8, val_samples=2)
    )
    directory = root / name
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(directory),
        callbacks=[HFExport(every_epoch=True)],
    )
    L.seed_everything(1)
    trainer.fit(module, datamodule=data)
    return module, directory


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return weights(AutoModelForCausalLM.from_pretrained(directory))


@pytest.mark.parametrize("reference", ["sft", "previous"])
def test_online_dpo_reference_modes_and_generations_per_iteration(root, sft_run, rm_run, reference):
    module, directory = online_dpo(root, f"online_dpo_{reference}", sft_run / "model", rm_run / "model", reference)
    reference_weights = weights(module.ref_policy)
    # "sft": the paper's fixed reference; "previous": the policy as the previous iteration (epoch 0) left it
    expected = load_weights(sft_run / "model") if reference == "sft" else load_weights(directory / "epochs" / "epoch-0")
    assert reference_weights.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(reference_weights[key], value, msg=f"{reference}: {key}")
    if reference == "previous":  # and it is not the SFT policy (the first iteration moved it)
        sft = load_weights(sft_run / "model")
        assert any(not torch.equal(reference_weights[key], sft[key]) for key in sft)
    # one JSONL per iteration: 3 prompts x 4 samples, half at each temperature, at most one chosen/rejected per prompt
    stops = set(stop_token_ids(module.tokenizer))
    for iteration in (0, 1):
        rows = [json.loads(line) for line in (directory / "iterations" / f"iteration-{iteration}.jsonl").open()]
        assert len(rows) == 12 and {row["iteration"] for row in rows} == {iteration}
        assert [row["temperature"] for row in rows[:4]] == [1.0, 1.0, 0.7, 0.7]
        # what a judge or an auditor reads: the user's message, no template tokens; the prompt's ids once per prompt
        assert all(row["prompt_text"] and "<|im_start|>" not in row["prompt_text"] for row in rows)
        assert [row["query_ids"] is not None for row in rows] == [True, False, False, False] * 3
        for prompt in range(3):
            group = rows[prompt * 4 : prompt * 4 + 4]
            assert sum(row["chosen"] for row in group) == sum(row["rejected"] for row in group) <= 1
            if any(row["chosen"] for row in group):  # max-min: the best and the worst score of the group
                scores = [row["score"] for row in group]
                assert next(row["score"] for row in group if row["chosen"]) == max(scores)
                assert next(row["score"] for row in group if row["rejected"]) == min(scores)
        for row in rows:  # nothing after a stop token but padding
            ids = row["response_ids"]
            first_stop = next((i for i, t in enumerate(ids) if t in stops), None)
            if first_stop is not None:
                assert all(t == module.tokenizer.pad_token_id for t in ids[first_stop + 1 :])


def test_eval_on_mt_bench_prompts_with_references(root, sft_run, rm_run):
    out = root / "eval"
    results = evaluate(
        policies=[str(sft_run / "model"), str(sft_run / "model")], names=["a", "b"], reward_model=str(rm_run / "model"),
        ref_policy=str(sft_run / "model"), head_to_head=True, data=str(CHAT_DATA / "prompts"), samples=4, query_length=160,
        response_length=8, reference_length=1024, batch_size=4, temperature=1.0, output_dir=str(out), accelerator="cpu",
    )
    policy = results["policies"]["a"]
    judged = policy["judges"]["rm"]
    assert judged["win_rate"]["n"] == 4  # every MT-Bench row has a reference answer
    for key in ("win_rate", "lc_win_rate"):
        assert 0.0 <= judged[key]["low"] <= judged[key]["mean"] <= judged[key]["high"] <= 1.0
    items = [json.loads(line) for line in (out / "items-a.jsonl").open()]
    assert len(items) == 4 and all(item["reference"] for item in items)
    assert "mean_chars" in policy


def test_eval_rm_on_the_mixture_reports_each_source(root, rm_run):
    results = evaluate_reward_model(
        reward_model=str(rm_run / "model"), sources=MIXTURE, samples=6, long_responses="truncate", batch_size=4,
        output_dir=str(root / "eval_rm"), accelerator="cpu", **{k: CHAT_SHAPES[k] for k in ("query_length", "response_length")},
    )
    for source in ("hh-rlhf-harmless", "preferences"):
        assert results["by_source"][source]["n"] == 6
        assert 0.0 <= results["longer_wins_by_source"][source]["mean"] <= 1.0


def test_reward_model_runs_each_chat_pairs_prompt_once_with_the_whole_rows_scores(tiny_model_dir, sft_run):
    """The RM's trunk cache and shared-prompt path on real chat pairs (both sources of the mixture): the scores read at
    each response's end-of-turn token equal those of the two sequences run whole."""
    from lit_rlhf.data.datamodules import PreferenceDataModule
    from lit_rlhf.models.forward import sequence_scores
    from lit_rlhf.models.trunk import clear_trunk_caches
    from lit_rlhf.stages.reward import RewardModule

    clear_trunk_caches()
    data = PreferenceDataModule(**{**PREFERENCE_DATA, "long_responses": "keep_end"}, tokenizer=str(tiny_model_dir),
                                batch_size=4, eval_batch_size=12)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    module = RewardModule(model=str(sft_run / "model"), trainable_layers=1, normalize=False)
    module.configure_model()
    module.share_frozen_trunks()  # (the Trainer does this at the start of fit)
    pad = module.tokenizer.pad_token_id
    assert set(batch["source"].tolist()) == {0, 1}
    with torch.no_grad():
        chosen, rejected = module.pair_scores(batch)
        whole = [sequence_scores(module.reward_model, batch[key], pad) for key in ("chosen_ids", "rejected_ids")]
    torch.testing.assert_close(chosen, whole[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(rejected, whole[1], rtol=0, atol=1e-5)
    assert module.trunk.cache.misses == 12  # one trunk forward per pair: its prompt once, both responses after it
    ends = [(batch[key] != pad).sum(1) - 1 for key in ("chosen_ids", "rejected_ids")]
    stops = set(stop_token_ids(module.tokenizer))
    for key, last in zip(("chosen_ids", "rejected_ids"), ends):  # "keep_end": every response still ends its turn
        assert all(int(batch[key][row, index]) in stops for row, index in enumerate(last.tolist()))
