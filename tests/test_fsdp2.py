"""FSDP2 (``--trainer.strategy fsdp2``, Lightning's ``ModelParallelStrategy``) with two CPU processes, every stage.

Each stage runs twice on the tiny model with the same seed and data, once under DDP and once under FSDP2; the two
must train the same model: the exported weights and the logged losses agree within ``ATOL`` (measured: identical
in float32). The PPO run also resumes from a mid-run distributed checkpoint to the uninterrupted run's weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import yaml
from safetensors.torch import load_file
from stage_helpers import results, run_processes, stage_config
from torch.distributed.checkpoint import FileSystemReader

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
    stage: str, strategy: str, tmp_path: Path, model: dict, data: dict, *args: str, callback: Optional[dict] = None
) -> tuple[Path, str]:
    cli_stage = stage.replace("_", "-")
    config = stage_config(stage, tmp_path / strategy, model=model, data=data)
    if callback is not None:
        settings = yaml.safe_load(config.read_text())
        settings["trainer"]["callbacks"][0]["init_args"] = callback
        config.write_text(yaml.safe_dump(settings))
    output = run_processes(cli_stage, config, strategy, *args)
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


@pytest.mark.timeout(900)
def test_fsdp2_ppo_matches_ddp_and_resumes_from_a_mid_run_checkpoint(tiny_model_dir, tiny_reward_dir, tmp_path):
    model, data = stage_settings("ppo", tiny_model_dir, tiny_reward_dir)
    keep_all = {"every_n_updates": 1, "save_top_k": -1}  # a distributed checkpoint after each of the 2 updates
    ddp, _ = run_stage("ppo", "ddp", tmp_path, model, data)
    fsdp2, output = run_stage("ppo", "fsdp2", tmp_path, model, data, callback=keep_all)
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
