"""PPO-max under DDP with two CPU processes (gloo), launched through the ``lit-rlhf`` command line.

Lightning's DDP launcher re-runs the command line for rank 1, so the run goes through a subprocess. PPO and online
DPO under DDP are checked on the DDP runs of ``tests/test_fsdp2.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from stage_helpers import assert_finite, last_checkpoint, load_checkpoint, results, run_processes, stage_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD_SIZE = 2
BATCH_SIZE = 2
TOTAL_EPISODES = 8
PPO_EPOCHS = 2


def run_ddp(stage: str, config: Path) -> None:
    """``lit-rlhf {stage} fit`` with two CPU processes under DDP."""
    run_processes(stage, config, "ddp", devices=WORLD_SIZE, launcher="lightning")


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
