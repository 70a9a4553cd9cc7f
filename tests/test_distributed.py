"""PPO under DDP with two CPU processes (gloo), launched through the ``lit-rlhf`` command line.

Lightning's DDP launcher re-runs the command line for rank 1, so the run goes through a subprocess.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from stage_helpers import assert_finite, last_checkpoint, load_checkpoint, results, run_processes, stage_config
from transformers import AutoModelForCausalLM

from lit_rlhf.models.scalar import ScalarModel

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD_SIZE = 2
BATCH_SIZE = 2
TOTAL_EPISODES = 8
PPO_EPOCHS = 2


def run_ddp(stage: str, config: Path) -> None:
    """``lit-rlhf {stage} fit`` with two CPU processes under DDP."""
    run_processes(stage, config, "ddp", devices=WORLD_SIZE)


@pytest.mark.timeout(600)
def test_ppo_ddp_two_cpu_processes(tiny_model_dir, tiny_reward_dir, tmp_path):
    config = stage_config(
        "ppo", tmp_path,
        model={"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir), "num_ppo_epochs": PPO_EPOCHS, "lr": 1e-3},
        data={"batch_size": BATCH_SIZE, "total_episodes": TOTAL_EPISODES, "train_samples": 8, "val_samples": 4},
    )
    run_ddp("ppo", config)
    run = tmp_path / "ppo"
    export = run / "model"
    assert AutoModelForCausalLM.from_pretrained(export).get_input_embeddings().num_embeddings == 49152
    assert ScalarModel.load(str(export / "value")).config.hidden_size == 32

    records = results(run)
    fits = [record for record in records if record["fn"] == "fit"]
    assert len(fits) == 1, "ValidationResults writes on rank 0 only"
    # the episode stream is sharded: each rank runs TOTAL_EPISODES / (WORLD_SIZE * BATCH_SIZE) updates
    updates_per_rank = TOTAL_EPISODES // (WORLD_SIZE * BATCH_SIZE)
    assert fits[0]["global_step"] == updates_per_rank * PPO_EPOCHS
    metrics = fits[0]["metrics"]
    assert_finite(metrics, "loss/policy", "loss/value", "objective/kl", "objective/scores", "eval/scores", "eval/kl")
    assert 1.0 <= metrics["objective/response_length"] <= 8.0
    state = load_checkpoint(last_checkpoint(tmp_path, "ppo"))
    assert state["global_step"] == updates_per_rank * PPO_EPOCHS
    assert not [key for key in state["state_dict"] if key.startswith(("ref_policy.", "reward_model."))]


@pytest.mark.timeout(600)
def test_ppo_max_ddp_two_cpu_processes(tiny_model_dir, tiny_reward_dir, tmp_path):
    """PPO-ptx, critic pre-training and running score statistics under DDP (one gradient reduction per backward)."""
    model = {"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir), "num_ppo_epochs": PPO_EPOCHS, "lr": 1e-3,
             "trainable_layers": None, "critic_warmup_updates": 1}
    data = {"batch_size": BATCH_SIZE, "total_episodes": TOTAL_EPISODES, "train_samples": 8, "val_samples": 4,
            "ptx_batch_size": 2, "ptx_samples": 8}
    run_ddp("ppo", stage_config("ppo_max", tmp_path, model=model, data=data))
    state = load_checkpoint(last_checkpoint(tmp_path, "ppo_max"))
    assert state["global_step"] == TOTAL_EPISODES // (WORLD_SIZE * BATCH_SIZE) * PPO_EPOCHS
    # each update merges the scores of both ranks: the running count covers every episode
    assert state["state_dict"]["score_moments._extra_state"]["count"] == TOTAL_EPISODES
    assert_finite(results(tmp_path / "ppo_max")[-1]["metrics"], "loss/ptx", "loss/value", "eval/scores")


@pytest.mark.timeout(600)
def test_online_dpo_ddp_two_cpu_processes(tiny_model_dir, tiny_reward_dir, tmp_path):
    """Ranks form different numbers of pairs; they still take the same number of optimiser steps."""
    model = {"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir), "lr": 1e-3, "non_eos_penalty": False}
    data = {"batch_size": 2, "total_episodes": 4}  # 2 prompts per rank and iteration
    run_ddp("online-dpo", stage_config("online_dpo", tmp_path, model=model, data=data))
    metrics = results(tmp_path / "online_dpo")[-1]["metrics"]
    assert_finite(metrics, "iteration/scores", "iteration/kl", "train/loss", "eval/scores")
    assert (tmp_path / "online_dpo" / "epochs" / "epoch-1" / "model.safetensors").is_file()
