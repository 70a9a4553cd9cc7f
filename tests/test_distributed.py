"""PPO under DDP with two CPU processes (gloo), launched through the ``lit-rlhf`` command line.

Lightning's DDP launcher re-runs the command line for rank 1, so the run goes through a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from stage_helpers import assert_finite, last_checkpoint, load_checkpoint, results, stage_config
from transformers import AutoModelForCausalLM

from lit_rlhf.models.scalar import ScalarModel

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD_SIZE = 2
BATCH_SIZE = 2
TOTAL_EPISODES = 8
PPO_EPOCHS = 2


@pytest.fixture(scope="module")
def tiny_reward_dir(tmp_path_factory, tiny_model_dir) -> Path:
    directory = tmp_path_factory.mktemp("tiny-rm")
    torch.manual_seed(0)
    ScalarModel.from_backbone(str(tiny_model_dir)).save_pretrained(directory)
    return directory


@pytest.mark.timeout(600)
def test_ppo_ddp_two_cpu_processes(tiny_model_dir, tiny_reward_dir, tmp_path):
    config = stage_config(
        "ppo", tmp_path,
        model={"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir), "num_ppo_epochs": PPO_EPOCHS, "lr": 1e-3},
        data={"batch_size": BATCH_SIZE, "total_episodes": TOTAL_EPISODES, "train_samples": 8, "val_samples": 4},
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "lit_rlhf.cli", "ppo", "fit", "--config", str(config),
        "--trainer.devices", str(WORLD_SIZE), "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
    ]
    process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-5000:]
    assert "Starting with 2 processes" in process.stdout + process.stderr

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
