"""DDP and FSDP2 (``--trainer.strategy fsdp2``, Lightning's ``ModelParallelStrategy``) with two CPU processes, every stage.

Each stage runs twice on the tiny model with the same seed and data, once under DDP and once under FSDP2; the two
must train the same model: the exported weights and the logged losses agree within ``ATOL`` (measured: identical
in float32). The PPO run also resumes from a mid-run distributed checkpoint to the uninterrupted run's weights.
The DDP runs double as the DDP tests of PPO and online DPO (what each rank runs, what rank 0 writes).

Runs start their two ranks with ``torchrun``; the PPO DDP run and ``tests/test_distributed.py`` go through
Lightning's own launcher (``--trainer.devices 2``), the two-node test through ``torchrun --nnodes 2``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import yaml
from safetensors.torch import load_file
from stage_helpers import assert_finite, free_port, last_checkpoint, load_checkpoint, results, run_processes, stage_config
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoModelForCausalLM

from lit_rlhf.models.scalar import ScalarModel

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

#: largest weight / loss difference allowed between the DDP and the FSDP2 run (float32; different reduction order)
ATOL = 1e-5


def stage_settings(stage: str, tiny_model_dir: Path, tiny_reward_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and data sections: a learning rate that moves the weights, and the stage's own knobs."""
    if stage in ("sft", "rm", "dpo"):
        return {"model": str(tiny_model_dir), "lr": 1e-3}, {}
    model = {"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir), "lr": 1e-3, "non_eos_penalty": False}
    if stage == "ppo":
        # one trainable block: under DDP the frozen block is shared by policy/reference (FrozenTrunk), under FSDP2 not
        return {**model, "trainable_layers": 1}, {"total_episodes": 8}
    return model, {"batch_size": 2, "total_episodes": 4}


def exported_weights(run: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for path in sorted(run.glob("model/**/model.safetensors")):
        prefix = str(path.parent.relative_to(run / "model"))
        weights.update({f"{prefix}:{key}": value for key, value in load_file(path).items()})
    assert weights, f"no export under {run / 'model'}"
    return weights


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[key].float() - b[key].float()).abs().max().item() for key in a)


def losses(run: Path) -> dict[str, float]:
    metrics = [record for record in results(run) if record["fn"] == "fit"][-1]["metrics"]
    return {key: value for key, value in metrics.items() if key.startswith(("train/", "loss/", "iteration/", "val/loss"))}


def run_stage(
    stage: str, strategy: str, tmp_path: Path, model: dict, data: dict, *args: str, callback: Optional[dict] = None,
    launcher: str = "torchrun",
) -> tuple[Path, str]:
    cli_stage = stage.replace("_", "-")
    config = stage_config(stage, tmp_path / strategy, model=model, data=data)
    if callback is not None:
        settings = yaml.safe_load(config.read_text())
        settings["trainer"]["callbacks"][0]["init_args"] = callback
        config.write_text(yaml.safe_dump(settings))
    output = run_processes(cli_stage, config, strategy, *args, launcher=launcher)
    return tmp_path / strategy / stage, output


@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "online_dpo"])
def test_fsdp2_trains_the_same_model_as_ddp(stage, tiny_model_dir, tiny_reward_dir, tmp_path):
    model, data = stage_settings(stage, tiny_model_dir, tiny_reward_dir)
    ddp, _ = run_stage(stage, "ddp", tmp_path, model, data)
    fsdp2, _ = run_stage(stage, "fsdp2", tmp_path, model, data)
    initial = {f".:{key}": value for key, value in load_file(tiny_model_dir / "model.safetensors").items()}
    ddp_weights, fsdp2_weights = exported_weights(ddp), exported_weights(fsdp2)
    assert max_difference(ddp_weights, fsdp2_weights) <= ATOL
    if stage != "rm":  # the reward model's export is a scalar model, not the causal LM
        assert max((ddp_weights[key] - initial[key]).abs().max().item() for key in initial) > 1e-4, "training moved nothing"
    ddp_losses, fsdp2_losses = losses(ddp), losses(fsdp2)
    assert ddp_losses and ddp_losses.keys() == fsdp2_losses.keys()
    for key, value in ddp_losses.items():
        assert fsdp2_losses[key] == pytest.approx(value, abs=ATOL), key
    checkpoint = fsdp2 / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir() and sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    if stage == "online_dpo":
        assert (fsdp2 / "epochs" / "epoch-0" / "model.safetensors").is_file()
        # DDP: the ranks form different numbers of pairs (2 prompts each per iteration) yet take the same number of
        # optimiser steps (a rank that stepped alone would hang the other in its gradient reduction)
        assert_finite(results(ddp)[-1]["metrics"], "iteration/scores", "iteration/kl", "train/loss", "eval/scores")
        assert (ddp / "epochs" / "epoch-1" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def ppo_runs(tmp_path_factory, tiny_model_dir, tiny_reward_dir) -> tuple[Path, Path, str, dict, dict]:
    """PPO (2 updates per rank) under DDP (Lightning's launcher) and under FSDP2 keeping a distributed checkpoint after
    each update."""
    tmp_path = tmp_path_factory.mktemp("ppo_fsdp2")
    model, data = stage_settings("ppo", tiny_model_dir, tiny_reward_dir)
    ddp, _ = run_stage("ppo", "ddp", tmp_path, model, data, launcher="lightning")
    fsdp2, output = run_stage("ppo", "fsdp2", tmp_path, model, data, callback={"every_n_updates": 1, "save_top_k": -1})
    return ddp, fsdp2, output, model, data


@pytest.mark.timeout(900)
def test_ppo_ddp_two_cpu_processes(ppo_runs):
    ddp, *_ = ppo_runs
    assert AutoModelForCausalLM.from_pretrained(ddp / "model").get_input_embeddings().num_embeddings == 49152
    assert ScalarModel.load(str(ddp / "model" / "value")).config.hidden_size == 32
    fits = [record for record in results(ddp) if record["fn"] == "fit"]
    assert len(fits) == 1, "ValidationResults writes on rank 0 only"
    # the episode stream is sharded: 8 episodes in batches of 2 per rank = 2 updates per rank, of 2 PPO epochs each
    assert fits[0]["global_step"] == 2 * 2
    assert_finite(fits[0]["metrics"], "loss/policy", "loss/value", "objective/kl", "objective/scores", "eval/scores", "eval/kl")
    assert 1.0 <= fits[0]["metrics"]["objective/response_length"] <= 8.0
    state = load_checkpoint(last_checkpoint(ddp.parent, "ppo"))
    assert state["global_step"] == 2 * 2
    assert not [key for key in state["state_dict"] if key.startswith(("ref_policy.", "reward_model."))]


@pytest.mark.timeout(900)
def test_fsdp2_ppo_matches_ddp_and_resumes_from_a_mid_run_checkpoint(ppo_runs, tmp_path):
    ddp, fsdp2, output, model, data = ppo_runs
    assert "frozen-trunk sharing is off for sharded models" in output
    reference = exported_weights(fsdp2)
    assert max_difference(exported_weights(ddp), reference) <= ATOL
    for key, value in losses(ddp).items():
        assert losses(fsdp2)[key] == pytest.approx(value, abs=ATOL), key

    # the checkpoint leaves out the frozen reference policy and reward model (both sharded in the run)
    mid_run = fsdp2 / "checkpoints" / "epoch=0-step=2.ckpt"
    keys = FileSystemReader(str(mid_run)).read_metadata().state_dict_metadata.keys()
    assert any(key.startswith("state_dict.policy.") for key in keys)
    assert not any(key.startswith(("state_dict.ref_policy.", "state_dict.reward_model.")) for key in keys)

    # resumed from the checkpoint after update 1 of 2: the uninterrupted run's weights, bit for bit
    config = stage_config("ppo", tmp_path / "resumed", model=model, data=data)
    run_processes("ppo", config, "fsdp2", "--ckpt_path", str(mid_run))
    assert max_difference(exported_weights(tmp_path / "resumed" / "ppo"), reference) == 0.0

    # frozen models replicated instead of sharded: the same training
    replicated = stage_config("ppo", tmp_path / "replicated", model=model, data=data)
    run_processes("ppo", replicated, "fsdp2_replicate_frozen")
    assert max_difference(exported_weights(tmp_path / "replicated" / "ppo"), reference) <= ATOL


@pytest.mark.timeout(900)
def test_two_nodes_launched_by_torchrun_train_the_same_ppo_policy(ppo_runs, tmp_path):
    """``torchrun`` on "2 nodes x 1 process" (both here, rendezvous on 127.0.0.1); Lightning takes the ranks from the
    torchrun environment and launches nothing itself.

    Each node runs in a directory of its own with a relative ``default_root_dir``: the same checkpoint path on two
    filesystems, as with node-local disks. Each node's checkpoint shards are committed there (the old commit renamed on
    global rank 0 only and left node 1's ``last.ckpt.partial``)."""
    _, fsdp2, _, model, data = ppo_runs
    config = stage_config("ppo", tmp_path, model=model, data=data)
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["default_root_dir"] = "ppo"
    config.write_text(yaml.safe_dump(settings))
    homes = [tmp_path / f"node-{rank}" for rank in (0, 1)]
    for home in homes:
        home.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    port = free_port()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
             "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "lit_rlhf.cli", "ppo", "fit", "--config", str(config),
             "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.accelerator", "cpu", "--trainer.strategy", "fsdp2"],
            cwd=homes[rank], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank}:\n{output[-5000:]}"
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in output
    assert "Starting with 2 processes" in outputs[0]
    assert max_difference(exported_weights(homes[0] / "ppo"), exported_weights(fsdp2)) == 0.0
    assert [record for record in results(homes[0] / "ppo") if record["fn"] == "fit"][-1]["global_step"] == 4
    for rank, home in enumerate(homes):
        checkpoints = home / "ppo" / "checkpoints"
        assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"], sorted(checkpoints.iterdir())
        assert (checkpoints / "last.ckpt" / f"__{rank}_0.distcp").is_file()


@pytest.mark.timeout(900)
def test_fsdp2_lora_ppo_matches_ddp(tiny_model_dir, tiny_reward_dir, tmp_path):
    """LoRA policy and value model sharded: the reference and reward model are their adapters-disabled bases."""
    model = {"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir), "lr": 1e-3, "non_eos_penalty": False,
             "lora": {"r": 4}, "value_lora": {"r": 4}}
    ddp, _ = run_stage("ppo", "ddp", tmp_path, model, {})
    fsdp2, _ = run_stage("ppo", "fsdp2", tmp_path, model, {})
    weights = exported_weights(fsdp2)
    assert max_difference(exported_weights(ddp), weights) <= ATOL
    initial = {f".:{key}": value for key, value in load_file(tiny_model_dir / "model.safetensors").items()}
    assert max((weights[key] - initial[key]).abs().max().item() for key in initial) > 1e-5, "the merged adapters changed nothing"
