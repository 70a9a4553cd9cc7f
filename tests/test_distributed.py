"""PPO-max and the critic-free estimators' group statistics under DDP (and FSDP2) with two CPU processes (gloo),
launched through the ``lit-rlhf`` command line.

Lightning's DDP launcher re-runs the command line for rank 1, so the run goes through a subprocess. PPO and online
DPO under DDP are checked on the DDP runs of ``tests/test_fsdp2.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT
from safetensors.torch import load_file
from stage_helpers import assert_finite, last_checkpoint, load_checkpoint, results, run_processes, stage_config

from lit_rlhf.algorithms import group_normalized_advantages, reinforce_pp_advantages

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD_SIZE = 2
BATCH_SIZE = 2
TOTAL_EPISODES = 8
PPO_EPOCHS = 2
TESTS = ROOT / "tests"


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


# ------------------------------------------------------------------------------ critic-free group statistics
def rollout_records(prefix: Path) -> list[list[dict]]:
    """Per update, the two ranks' rollout records (``fault_injection.RecordRollouts``)."""
    ranks = [[json.loads(line) for line in Path(f"{prefix}.rank{rank}.jsonl").read_text().splitlines()] for rank in range(WORLD_SIZE)]
    assert len(ranks[0]) == len(ranks[1]) == TOTAL_EPISODES // (WORLD_SIZE * BATCH_SIZE)
    return list(zip(*ranks))


def recorded_run(stage: str, strategy: str, root: Path, model: dict, monkeypatch) -> list[list[dict]]:
    """``lit-rlhf {stage} fit`` on two CPU processes with every rollout recorded."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    data = {"batch_size": BATCH_SIZE, "total_episodes": TOTAL_EPISODES, "train_samples": 8, "val_samples": 4}
    config = stage_config("ppo", root / strategy, model=model, data=data)
    settings = yaml.safe_load(config.read_text())
    prefix = root / strategy / "rollouts"
    settings["trainer"]["callbacks"].append({"class_path": "fault_injection.RecordRollouts", "init_args": {"path": str(prefix)}})
    config.write_text(yaml.safe_dump(settings))
    run_processes(stage, config, strategy)
    return rollout_records(prefix)


@pytest.mark.timeout(900)
def test_grpo_groups_stay_on_one_rank_and_their_statistics_are_exact_under_ddp_and_fsdp2(
    tiny_model_dir, tiny_reward_dir, tmp_path, monkeypatch
):
    """k = 3 samples of each prompt on one rank: the advantages each rank computed equal GRPO's formula on the scores
    of the whole two-rank batch (what one process computes from the same samples), and FSDP2 trains what DDP trains."""
    k = 3
    model = {"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir), "lr": 1e-3, "samples_per_prompt": k,
             "non_eos_penalty": False, "kl_coef": 0.0, "num_ppo_epochs": PPO_EPOCHS}
    weights = {}
    for strategy in ("ddp", "fsdp2"):
        for ranks in recorded_run("grpo", strategy, tmp_path, model, monkeypatch):
            for record in ranks:  # each rank holds whole groups: k consecutive copies of one prompt
                groups = [record["queries"][i : i + k] for i in range(0, len(record["queries"]), k)]
                assert len(groups) == BATCH_SIZE and all(len(set(group)) == 1 for group in groups)
            scores = torch.tensor([score for record in ranks for score in record["scores"]])
            mask = torch.tensor([row for record in ranks for row in record["mask"]])
            advantages = torch.tensor([row for record in ranks for row in record["advantages"]])
            assert scores.unique().numel() > 1, "the check needs different rewards"
            expected = group_normalized_advantages(scores, k).unsqueeze(1) * mask
            assert torch.allclose(advantages, expected, atol=1e-5)
        weights[strategy] = load_file(tmp_path / strategy / "ppo" / "model" / "model.safetensors")
    assert max((weights["ddp"][key] - weights["fsdp2"][key]).abs().max().item() for key in weights["ddp"]) <= 1e-5


@pytest.mark.timeout(900)
def test_reinforce_pp_whitens_over_the_global_batch_under_ddp(tiny_model_dir, tiny_reward_dir, tmp_path, monkeypatch):
    """REINFORCE++'s advantage normalisation (the preset's ``whitening_scope: global``) equals the whitening of the two
    ranks' returns together."""
    model = {"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir), "lr": 1e-3, "non_eos_penalty": False,
             "num_ppo_epochs": PPO_EPOCHS}
    for ranks in recorded_run("reinforce-pp", "ddp", tmp_path, model, monkeypatch):
        rewards, mask, advantages = (
            torch.tensor([row for record in ranks for row in record[key]]) for key in ("rewards", "mask", "advantages")
        )
        assert torch.allclose(advantages, reinforce_pp_advantages(rewards, mask), atol=1e-5)
        per_rank = reinforce_pp_advantages(torch.tensor(ranks[0]["rewards"]), torch.tensor(ranks[0]["mask"]))
        assert not torch.allclose(torch.tensor(ranks[0]["advantages"]), per_rank, atol=1e-3)  # not the rank's own whitening
