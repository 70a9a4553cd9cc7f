"""DPO and online iterative DPO smoke tests on a tiny random-init Llama (its own "SFT" policy) and reward model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SFT_DATA
from stage_helpers import QUERY_LENGTH, SFT_MAX_LENGTH, SFT_RESPONSE_LENGTH, assert_finite, last_record, load_checkpoint, stage_config
from transformers import AutoModelForCausalLM

from lit_rlhf.cli import main
from lit_rlhf.stages.online_dpo import OnlineDPOModule


# ---------------------------------------------------------------------------------------------------- offline DPO
def test_dpo_validate_at_start_has_zero_implicit_rewards(tiny_model_dir, tmp_path):
    """Policy == reference: every implicit reward is exactly 0, so no pair is ranked correctly yet."""
    config = stage_config("dpo", tmp_path, model={"model": str(tiny_model_dir)})
    main(["dpo", "validate", "--config", str(config)])
    metrics = last_record(tmp_path / "dpo", "validate")["metrics"]
    assert metrics["val/chosen_reward"] == 0 and metrics["val/rejected_reward"] == 0 and metrics["val/reward_margin"] == 0
    assert metrics["val/accuracy"] == 0
    assert metrics["val/loss"] == pytest.approx(0.6931, abs=1e-4)  # -log sigmoid(0)


def test_dpo_fit_moves_implicit_rewards_and_exports(tiny_model_dir, tmp_path):
    model = {"model": str(tiny_model_dir), "lr": 1e-3, "beta": 0.5, "trainable_layers": 1}
    config = stage_config("dpo", tmp_path, model=model)
    main(["dpo", "fit", "--config", str(config)])
    record = last_record(tmp_path / "dpo", "fit")
    metrics = record["metrics"]
    assert_finite(metrics, "train/loss", "val/loss", "val/accuracy", "val/reward_margin", "val/chosen_reward")
    assert metrics["val/chosen_reward"] != 0  # the policy moved away from the reference
    assert any(key.startswith("val/accuracy_batch/") for key in metrics)
    assert any(key.startswith("val/accuracy_confidence/") for key in metrics)
    export = tmp_path / "dpo" / "model"
    policy = AutoModelForCausalLM.from_pretrained(export)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert torch.equal(policy.model.layers[0].mlp.up_proj.weight, initial.model.layers[0].mlp.up_proj.weight)  # frozen
    assert not torch.equal(policy.model.layers[1].mlp.up_proj.weight, initial.model.layers[1].mlp.up_proj.weight)
    checkpoint = tmp_path / "dpo" / "checkpoints" / "last.ckpt"
    keys = load_checkpoint(checkpoint)["state_dict"]
    assert any(key.startswith("policy.") for key in keys) and not any(key.startswith("ref_policy.") for key in keys)


# ------------------------------------------------------------------------------------------- online iterative DPO
def online_config(root: Path, tiny_model_dir: Path, reward_dir: Path, **model) -> Path:
    # the tiny model rarely samples EOS: without the P3 penalty, scores differ and pairs form
    settings = {"policy": str(tiny_model_dir), "reward_model": str(reward_dir), "lr": 1e-3, "trainable_layers": 1,
                "non_eos_penalty": False, **model}
    return stage_config("online_dpo", root, model=settings)


@pytest.fixture(scope="module")
def online_run(tmp_path_factory, tiny_model_dir, tiny_reward_dir) -> Path:
    root = tmp_path_factory.mktemp("online")
    main(["online-dpo", "fit", "--config", str(online_config(root, tiny_model_dir, tiny_reward_dir))])
    return root


def iteration_checkpoints(root: Path) -> list[Path]:
    return sorted((root / "online_dpo" / "checkpoints").glob("iteration-epoch=*.ckpt"))


def test_online_dpo_logs_iterations_and_saves_each(online_run, tiny_model_dir):
    metrics = last_record(online_run / "online_dpo", "fit")["metrics"]
    assert_finite(metrics, "iteration/scores", "iteration/best_of_k", "iteration/pair_margin", "iteration/kl",
                  "iteration/response_length", "train/loss", "eval/scores", "eval/kl")
    assert metrics["iteration/best_of_k"] >= metrics["iteration/scores"]
    assert metrics["iteration/pair_margin"] > 0 and 0 < metrics["iteration/pairs"] <= 3
    assert metrics["iteration/kl"] != 0  # the second iteration samples from an updated policy
    assert [p.name for p in iteration_checkpoints(online_run)] == ["iteration-epoch=0.ckpt", "iteration-epoch=1.ckpt"]
    for epoch in (0, 1):
        assert (online_run / "online_dpo" / "epochs" / f"epoch-{epoch}" / "model.safetensors").is_file()
    first = AutoModelForCausalLM.from_pretrained(online_run / "online_dpo" / "epochs" / "epoch-0")
    final = AutoModelForCausalLM.from_pretrained(online_run / "online_dpo" / "model")
    assert not torch.equal(first.model.layers[1].mlp.up_proj.weight, final.model.layers[1].mlp.up_proj.weight)


def test_online_dpo_resumes_from_a_mid_run_checkpoint(online_run, tiny_model_dir, tiny_reward_dir, tmp_path):
    """Resuming after iteration 0 reproduces the uninterrupted run's final policy exactly."""
    checkpoint = iteration_checkpoints(online_run)[0]
    config = online_config(tmp_path, tiny_model_dir, tiny_reward_dir)
    main(["online-dpo", "fit", "--config", str(config), "--ckpt_path", str(checkpoint)])
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "online_dpo" / "model").state_dict()
    uninterrupted = AutoModelForCausalLM.from_pretrained(online_run / "online_dpo" / "model").state_dict()
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=key)
    assert not (tmp_path / "online_dpo" / "epochs" / "epoch-0").exists()  # iteration 0 was not re-run


@pytest.mark.parametrize("kwargs, match", [({"reference": "parent"}, "reference"), ({"pair_strategy": "all"}, "pair_strategy"),
                                           ({"samples_per_prompt": 1}, "samples_per_prompt"), ({"beta": -1.0}, "beta")])
def test_online_dpo_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OnlineDPOModule(**kwargs)


def test_online_dpo_previous_reference_follows_the_policy(tiny_model_dir, tiny_reward_dir, tmp_path):
    """``reference="previous"``: each iteration's reference is the policy the previous iteration left; KL stays to SFT."""
    import lightning as L

    from lit_rlhf.data.datamodules import PromptDataModule

    module = OnlineDPOModule(
        policy=str(tiny_model_dir), reward_model=str(tiny_reward_dir), reference="previous", samples_per_prompt=3,
        response_length=6, dpo_batch_size=2, lr=1e-3, trainable_layers=1, non_eos_penalty=False,
    )
    data = PromptDataModule(path=str(SFT_DATA), tokenizer=str(tiny_model_dir), query_length=QUERY_LENGTH,
                            response_length=SFT_RESPONSE_LENGTH, max_length=SFT_MAX_LENGTH, batch_size=3, total_episodes=3,
                            train_samples=8, val_samples=2, eval_batch_size=2)
    seen = []

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append({"policy": {k: v.clone() for k, v in pl_module.policy.state_dict().items()}})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[-1]["ref"] = {k: v.clone() for k, v in pl_module.ref_policy.state_dict().items()}

    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, callbacks=[Snapshot()], default_root_dir=str(tmp_path))  # the iterations' JSONL
    trainer.fit(module, datamodule=data)
    key = "model.layers.1.mlp.up_proj.weight"
    assert module.sft_policy is not None and module.sft_policy is not module.ref_policy
    for iteration in seen:  # the reference used in an iteration is the policy at the iteration's start
        assert torch.equal(iteration["ref"][key], iteration["policy"][key])
    assert not torch.equal(seen[1]["ref"][key], seen[0]["ref"][key])  # and it moved between iterations
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()[key]
    assert torch.equal(module.sft_policy.state_dict()[key], initial)
