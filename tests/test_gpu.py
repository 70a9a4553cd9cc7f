"""Every stage under Lightning's DeepSpeed strategies and FSDP2 on CUDA (``make gpu-check``); skipped without a GPU.

Each stage runs on the tiny model once on the plain strategy (one GPU: no process group; several: DDP) and once
under the strategy tested, with the same seed and data: the exported weights and the logged losses must agree within
the precision's tolerance (:data:`TOLERANCES`). Every test runs in float32 (cuBLAS may reorder reductions between the
runs, nothing more) and in each precision the paper configs train in (``configs/tldr/*/*.yaml``: ``bf16-mixed``, where
DeepSpeed keeps bf16 weights and the plain strategy autocasts float32 ones). PPO under DeepSpeed ZeRO-2 also resumes
from a mid-run checkpoint (a DeepSpeed checkpoint directory) to the uninterrupted run's weights.

Lightning's ``DeepSpeedStrategy`` refuses a CPU accelerator, so these are the only tests of lit_rlhf under it; the
DeepSpeed helpers themselves are checked on CPU in ``tests/test_deepspeed.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest
import torch
import yaml
from conftest import ROOT
from safetensors.torch import load_file
from stage_helpers import results, run_processes, stage_config
from test_fsdp2 import exported_weights, losses, max_difference, stage_settings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

#: the precisions of the paper configs (what a GPU run of the recipe trains in)
PAPER_CONFIGS = sorted((ROOT / "configs" / "tldr").glob("*/*.yaml"))
PAPER_PRECISIONS = sorted({yaml.safe_load(path.read_text())["trainer"]["precision"] for path in PAPER_CONFIGS})
#: float32 (exact agreement up to reduction order) and the paper configs' precisions
PRECISIONS = ["32-true", *(precision for precision in PAPER_PRECISIONS if precision != "32-true")]
#: per precision, the largest weight difference and the (absolute, relative) loss difference allowed between the plain
#: and the sharded run. bf16 (8-bit mantissa): weights of order 1 round by up to 2**-8, and an Adam step of lr 1e-3 on
#: a gradient whose sign differs between the runs moves a weight up to 2e-3 the other way; not yet measured on a GPU.
TOLERANCES = {precision: {"32-true": (1e-4, (1e-4, 0.0)), "bf16-mixed": (2e-2, (2e-2, 2e-2))}[precision] for precision in PRECISIONS}
STRATEGIES = ["deepspeed_stage_2", "deepspeed_stage_3", "fsdp2"]


def assert_agree(plain: dict[str, float], sharded: dict[str, float], precision: str) -> None:
    """The logged losses of the plain and the sharded run agree within ``precision``'s tolerance."""
    absolute, relative = TOLERANCES[precision][1]
    assert plain and plain.keys() == sharded.keys()
    for key, value in plain.items():
        assert sharded[key] == pytest.approx(value, abs=absolute, rel=relative), key


def devices() -> int:
    return min(2, torch.cuda.device_count())


def run_gpu(
    stage: str, strategy: str, tmp_path: Path, model: dict, data: dict, *args: str, name: str = "", checkpoint: Optional[dict] = None,
    precision: str = "32-true",
) -> Path:
    """``lit-rlhf {stage} fit`` on the GPUs under ``strategy`` in ``precision``; ``checkpoint`` replaces StageCheckpoint's
    arguments."""
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    config = stage_config(stage, tmp_path / (name or strategy), model=model, data=data)
    if checkpoint is not None:
        settings = yaml.safe_load(config.read_text())
        settings["trainer"]["callbacks"][0]["init_args"] = checkpoint
        config.write_text(yaml.safe_dump(settings))
    run_processes(stage.replace("_", "-"), config, strategy, *args, "--trainer.precision", precision, devices=devices(), accelerator="gpu")
    return tmp_path / (name or strategy) / stage


def plain_strategy() -> str:
    return "auto" if devices() == 1 else "ddp"


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("strategy", STRATEGIES + ["deepspeed_stage_2_offload_frozen"])
@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo", "online_dpo"])
def test_stage_trains_the_same_model_as_the_plain_strategy(stage, strategy, precision, tiny_model_dir, tiny_reward_dir, tmp_path):
    if strategy == "deepspeed_stage_2_offload_frozen" and stage in ("sft", "rm"):
        pytest.skip("no frozen model to offload")
    model, data = stage_settings(stage, tiny_model_dir, tiny_reward_dir)
    plain = run_gpu(stage, plain_strategy(), tmp_path, model, data, name="plain", precision=precision)
    sharded = run_gpu(stage, strategy, tmp_path, model, data, precision=precision)
    plain_weights, sharded_weights = exported_weights(plain), exported_weights(sharded)
    assert max_difference(plain_weights, sharded_weights) <= TOLERANCES[precision][0]
    if stage != "rm":
        initial = {f".:{key}": value for key, value in load_file(tiny_model_dir / "model.safetensors").items()}
        assert max((plain_weights[key].float() - initial[key]).abs().max().item() for key in initial) > 1e-4, "training moved nothing"
    assert_agree(losses(plain), losses(sharded), precision)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_deepspeed_ppo_resumes_from_a_mid_run_checkpoint(precision, tiny_model_dir, tiny_reward_dir, tmp_path):
    model, data = stage_settings("ppo", tiny_model_dir, tiny_reward_dir)
    every_update = {"every_n_updates": 1, "save_top_k": -1}
    full = run_gpu("ppo", "deepspeed_stage_2", tmp_path, model, data, name="full", checkpoint=every_update, precision=precision)
    mid_run = full / "checkpoints" / "epoch=0-step=2.ckpt"
    assert mid_run.is_dir(), sorted(p.name for p in (full / "checkpoints").iterdir())
    assert not list((full / "checkpoints").glob("*.partial"))
    resumed = run_gpu("ppo", "deepspeed_stage_2", tmp_path, model, data, "--ckpt_path", str(mid_run), name="resumed", precision=precision)
    assert max_difference(exported_weights(resumed), exported_weights(full)) <= TOLERANCES[precision][0]
    steps = [[r["global_step"] for r in results(run) if r["fn"] == "fit"][-1] for run in (full, resumed)]
    assert steps[0] == steps[1]


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_grpo_trains_the_same_model_as_the_plain_strategy(strategy, precision, tiny_model_dir, tiny_reward_dir, tmp_path):
    """A critic-free estimator (no value model: the optimiser holds the policy alone) under DeepSpeed and FSDP2."""
    model, data = stage_settings("ppo", tiny_model_dir, tiny_reward_dir)
    model = {**model, "advantage_estimator": "grpo", "samples_per_prompt": 2, "kl_coef": 0.0, "kl_loss_coef": 0.04,
             "loss_agg_mode": "seq_mean_token_mean"}
    plain = run_gpu("ppo", plain_strategy(), tmp_path, model, data, name="plain", precision=precision)
    sharded = run_gpu("ppo", strategy, tmp_path, model, data, precision=precision)
    assert not (plain / "model" / "value").exists() and not (sharded / "model" / "value").exists()
    assert max_difference(exported_weights(plain), exported_weights(sharded)) <= TOLERANCES[precision][0]
    assert_agree(losses(plain), losses(sharded), precision)
