"""Fault injection (issue 8): runs killed, signalled or fed a non-finite value, through the real command line.

Runs go through the ``lit-rlhf`` command line with tiny models. Those that are killed, signalled or fail are
``python -m lit_rlhf.cli`` subprocesses, so SIGKILL is a real kill; the uninterrupted twins and the resumed runs call
the same entry point in this process (same torch thread count). The callbacks of
``tests/fault_injection.py`` pick the moment (right after a checkpoint), record which batches were trained on, and
snapshot the files on disk. A resumed run must end bit-identical (weights, optimiser, scheduler, random states) to
its uninterrupted twin and have trained on the same batches in the same order.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pytest
import torch
import yaml
from conftest import ROOT
from fault_injection import file_hashes
from safetensors.torch import load_file
from stage_helpers import load_checkpoint, stage_config

from lit_rlhf.cli import main
from lit_rlhf.models.trunk import clear_trunk_caches

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
CLI = {"sft": "sft", "rm": "rm", "dpo": "dpo", "ppo": "ppo", "ppo_max": "ppo", "online_dpo": "online-dpo"}


def run_cli(stage: str, config: Path, *args: str, returncode: int = 0, fresh_process: bool = False) -> Any:
    """``lit-rlhf {stage} fit --config config *args``; returns something with ``.stderr``.

    In a subprocess when ``fresh_process`` or a non-zero exit is expected (a kill, a signal, an error), asserting
    the exit code; in this process otherwise (saves ~8 s of imports per run). Both use this process's torch thread
    count, so that a run split across the two computes exactly what one run would.
    """
    argv = [CLI[stage], "fit", "--config", str(config), *args]
    if not fresh_process and returncode == 0:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            main(argv)
        return SimpleNamespace(stderr=stderr.getvalue())
    env = {
        **os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    process = subprocess.run([sys.executable, "-m", "lit_rlhf.cli", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == returncode, f"exit {process.returncode}\n{process.stdout[-2000:]}\n{process.stderr[-4000:]}"
    return process


def configure(base: Path, name: str, checkpoint: dict[str, Any], callbacks: list[tuple[str, dict[str, Any]]]) -> Path:
    """``base`` with the ``StageCheckpoint`` arguments replaced by ``checkpoint`` and ``fault_injection`` callbacks
    added, written next to it as ``{name}.yaml``."""
    config = yaml.safe_load(base.read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"] == "lit_rlhf.callbacks.StageCheckpoint":
            callback["init_args"] = checkpoint
    config["trainer"]["callbacks"] += [{"class_path": f"fault_injection.{cls}", "init_args": args} for cls, args in callbacks]
    path = base.with_name(f"{name}.yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def max_difference(a: Any, b: Any, where: str = "") -> float:
    """Largest absolute difference between two nested structures of tensors (structure and non-tensors must match)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype, where
        if a.is_floating_point():
            return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        return 0.0 if torch.equal(a, b) else float("inf")
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        return max((max_difference(a[key], b[key], f"{where}.{key}") for key in a), default=0.0)
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        return max((max_difference(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b))), default=0.0)
    assert a == b, f"{where}: {a!r} != {b!r}"
    return 0.0


#: what must match between a resumed run's final checkpoint and its uninterrupted twin's
COMPARED = ("state_dict", "optimizer_states", "lr_schedulers", "global_step", "epoch", "lit_rlhf_rng_states")


def compare_runs(resumed: Path, uninterrupted: Path) -> dict[str, float]:
    """Max weight difference of the exports and of the final checkpoints' compared parts (all expected 0)."""
    exports = sorted((uninterrupted / "model").rglob("*.safetensors"))
    assert exports
    differences = {}
    for path in exports:
        twin = resumed / "model" / path.relative_to(uninterrupted / "model")
        differences[f"export {path.relative_to(uninterrupted)}"] = max_difference(load_file(path), load_file(twin))
    a, b = (load_checkpoint(run / "checkpoints" / "last.ckpt") for run in (resumed, uninterrupted))
    for key in COMPARED:
        differences[f"checkpoint {key}"] = max_difference(a[key], b[key], key)
    print(f"{resumed.parent.name} vs {uninterrupted.parent.name} ({resumed.name}): {differences}")
    return differences


class Stage:
    """One stage's tiny configuration: ``run(name, checkpoint, *callbacks)`` runs it under ``root/name``."""

    def __init__(self, stage: str, root: Path, model: dict[str, Any], data: Optional[dict[str, Any]] = None,
                 trainer: Optional[dict[str, Any]] = None) -> None:
        self.stage, self.root, self.model, self.data, self.trainer = stage, root, model, data or {}, trainer or {}

    def directory(self, name: str) -> Path:
        return self.root / name / self.stage

    def config(self, name: str, checkpoint: dict[str, Any], *callbacks: tuple[str, dict[str, Any]]) -> Path:
        base = stage_config(self.stage, self.root / name, model=self.model, data=self.data, trainer=self.trainer)
        log = ("RecordBatches", {"path": str(self.root / name / "batches.jsonl")})
        return configure(base, f"{self.stage}-faults", checkpoint, [log, *callbacks])

    def run(self, name: str, checkpoint: dict[str, Any], *callbacks: tuple[str, dict[str, Any]], args: tuple[str, ...] = (),
            returncode: int = 0, fresh_process: bool = False) -> Any:
        config = self.config(name, checkpoint, *callbacks)
        return run_cli(self.stage, config, *args, returncode=returncode, fresh_process=fresh_process)

    def batches(self, name: str) -> list[dict[str, Any]]:
        return records(self.root / name / "batches.jsonl")


def kill_and_resume(stage: Stage, checkpoint: dict[str, Any], kill: dict[str, Any], name: str) -> tuple[list, list]:
    """Run ``name`` until SIGKILL at ``kill`` (see ``KillAt``), then resume it with ``--ckpt_path last``; return the
    batches trained before the kill (up to the checkpoint) and after the resume."""
    process = stage.run(name, checkpoint, ("KillAt", kill), returncode=-signal.SIGKILL)
    assert "Traceback" not in process.stderr
    saved = load_checkpoint(stage.directory(name) / "checkpoints" / "last.ckpt")["global_step"]
    before = [record for record in stage.batches(name) if record["step"] <= saved]
    (stage.root / name / "batches.jsonl").unlink()
    process = stage.run(name, checkpoint, args=("--ckpt_path", "last"))
    assert f"--ckpt_path last: resuming from {stage.directory(name) / 'checkpoints' / 'last.ckpt'}" in process.stderr
    return before, stage.batches(name)


def assert_exact_resume(stage: Stage, name: str, twin: str, before: list, after: list) -> None:
    assert before and after, "the kill must fall inside the run"
    assert [r["batch"] for r in before + after] == [r["batch"] for r in stage.batches(twin)], "not the same data order"
    assert [r["step"] for r in before + after] == [r["step"] for r in stage.batches(twin)]
    differences = compare_runs(stage.directory(name), stage.directory(twin))
    assert max(differences.values()) == 0.0, differences


# ------------------------------------------------------------------------------------------------ SFT, RM, DPO
@pytest.mark.timeout(600)
def test_sft_killed_mid_epoch_resumes_bit_identically(tiny_model_dir, tmp_path):
    """8 rows, batch 2, two epochs (8 steps); checkpoints every 3 steps; killed after step 3, the resume crosses the
    epoch boundary (the second epoch's order is drawn afresh)."""
    stage = Stage("sft", tmp_path, {"model": str(tiny_model_dir), "lr": 1e-3}, trainer={"max_epochs": 2})
    checkpoint = {"every_n_train_steps": 3}
    stage.run("uninterrupted", checkpoint)
    before, after = kill_and_resume(stage, checkpoint, {"step": 3}, "resumed")
    assert [r["step"] for r in before] == [1, 2, 3] and after[0]["epoch"] == 0 and after[-1]["epoch"] == 1
    assert_exact_resume(stage, "resumed", "uninterrupted", before, after)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage_name", ["rm", "dpo"])
def test_rm_and_dpo_killed_mid_epoch_resume_bit_identically(stage_name, tiny_model_dir, tmp_path):
    stage = Stage(stage_name, tmp_path, {"model": str(tiny_model_dir), "lr": 1e-3})
    checkpoint = {"every_n_train_steps": 2}
    stage.run("uninterrupted", checkpoint)
    before, after = kill_and_resume(stage, checkpoint, {"step": 2}, "resumed")
    assert [r["step"] for r in before] == [1, 2] and [r["step"] for r in after] == [3, 4]
    assert_exact_resume(stage, "resumed", "uninterrupted", before, after)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage_name", ["rm", "dpo"])
def test_rm_and_dpo_with_trunk_cache_resume_bit_identically_in_a_later_epoch(stage_name, tiny_model_dir, tmp_path):
    """Top block trained on cached trunk outputs (and DPO's cached reference logprobs), two epochs of 4 steps; killed
    in the second epoch, the resumed run starts with empty caches and must still compute exactly the same."""
    clear_trunk_caches()  # the resume runs in this process
    stage = Stage(stage_name, tmp_path, {"model": str(tiny_model_dir), "lr": 1e-3, "trainable_layers": 1}, trainer={"max_epochs": 2})
    checkpoint = {"every_n_train_steps": 2}
    stage.run("uninterrupted", checkpoint, fresh_process=True)
    before, after = kill_and_resume(stage, checkpoint, {"step": 7}, "resumed")
    assert [r["step"] for r in before] == list(range(1, 7)) and [r["step"] for r in after] == [7, 8]
    assert_exact_resume(stage, "resumed", "uninterrupted", before, after)


# ------------------------------------------------------------------------------------------------ PPO
@pytest.fixture(scope="module")
def ppo(tmp_path_factory, tiny_model_dir, tiny_reward_dir) -> Stage:
    """3 updates of 2 episodes, 2 PPO epochs each (6 optimiser steps); checkpoint every update."""
    stage = Stage(
        "ppo", tmp_path_factory.mktemp("ppo-faults"),
        {"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir), "lr": 1e-3, "num_ppo_epochs": 2},
        data={"total_episodes": 6},
    )
    stage.run("uninterrupted", {"every_n_updates": 1})
    return stage


@pytest.mark.timeout(600)
@pytest.mark.parametrize("updates", [1, 2])
def test_ppo_killed_after_an_update_resumes_bit_identically(ppo, updates):
    name = f"killed-after-update-{updates}"
    before, after = kill_and_resume(ppo, {"every_n_updates": 1}, {"step": 2 * updates}, name)
    assert len(before) == updates and len(after) == 3 - updates
    assert_exact_resume(ppo, name, "uninterrupted", before, after)


def killed_after_the_first_of_three_updates(stage: Stage) -> dict[str, Any]:
    """Run ``stage`` (3 updates of 2 optimiser steps, a checkpoint per update) uninterrupted, then killed after its first
    update and resumed; assert the two runs are the same; return the resumed run's last checkpoint."""
    checkpoint = {"every_n_updates": 1}
    stage.run("uninterrupted", checkpoint)
    before, after = kill_and_resume(stage, checkpoint, {"step": 2}, "resumed")
    assert len(before) == 1 and len(after) == 2
    assert_exact_resume(stage, "resumed", "uninterrupted", before, after)
    return load_checkpoint(stage.directory("resumed") / "checkpoints" / "last.ckpt")


@pytest.mark.timeout(600)
def test_rloo_killed_after_an_update_resumes_bit_identically(tiny_model_dir, tiny_reward_dir, tmp_path):
    """RLOO, k = 2 (no value model): 3 updates of 2 prompts x 2 samples, killed after the first."""
    model = {"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir), "lr": 1e-3, "num_ppo_epochs": 2,
             "advantage_estimator": "rloo", "samples_per_prompt": 2, "kl_penalty": "sequence"}
    state = killed_after_the_first_of_three_updates(Stage("ppo", tmp_path, model, data={"total_episodes": 6}))
    assert not [key for key in state["state_dict"] if key.startswith("value_model.")]


@pytest.mark.timeout(600)
def test_ppo_max_killed_after_critic_warmup_resumes_bit_identically(tiny_model_dir, tiny_reward_dir, tmp_path):
    """PPO-max: running score statistics, critic pre-training and the PPO-ptx loader (two resumable loaders)."""
    model = {"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir), "lr": 1e-3, "num_ppo_epochs": 2,
             "trainable_layers": None, "critic_warmup_updates": 1}
    state = killed_after_the_first_of_three_updates(
        Stage("ppo_max", tmp_path, model, data={"total_episodes": 6, "ptx_batch_size": 2, "ptx_samples": 8})
    )
    assert state["state_dict"]["score_moments._extra_state"]["count"] == 6  # every episode, across the kill


# ------------------------------------------------------------------------------------------------ online DPO
@pytest.mark.timeout(600)
def test_lora_ppo_killed_after_an_update_resumes_bit_identically(tiny_model_dir, tiny_reward_dir, tmp_path):
    """LoRA policy and value model: the checkpoints hold the adapters and heads only (the frozen bases are reloaded
    from disk), and the resumed run still ends bit-identical."""
    model = {"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir), "lr": 1e-3, "num_ppo_epochs": 2,
             "lora": {"r": 4}, "value_lora": {"r": 4}}
    stage = Stage("ppo", tmp_path, model, data={"total_episodes": 6})
    checkpoint = {"every_n_updates": 1}
    stage.run("uninterrupted", checkpoint)
    before, after = kill_and_resume(stage, checkpoint, {"step": 2}, "resumed")
    assert_exact_resume(stage, "resumed", "uninterrupted", before, after)
    keys = [key for key in load_checkpoint(stage.directory("resumed") / "checkpoints" / "last.ckpt")["state_dict"]
            if key.startswith(("policy.", "value_model."))]
    assert keys and all("lora_" in key or "modules_to_save" in key for key in keys), keys[:5]


@pytest.mark.timeout(600)
def test_online_dpo_killed_after_an_iteration_resumes_bit_identically(tiny_model_dir, tiny_reward_dir, tmp_path):
    model = {"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir), "lr": 1e-3, "trainable_layers": 1,
             "non_eos_penalty": False}
    stage = Stage("online_dpo", tmp_path, model)  # 2 iterations (stage_config)
    checkpoint = {"save_top_k": -1, "every_n_epochs": 1, "save_on_train_epoch_end": True, "filename": "iteration-{epoch}"}
    stage.run("uninterrupted", checkpoint)
    before, after = kill_and_resume(stage, checkpoint, {"epoch": 1}, "resumed")
    assert {r["epoch"] for r in before} == {0} and {r["epoch"] for r in after} == {1}
    assert_exact_resume(stage, "resumed", "uninterrupted", before, after)


# ------------------------------------------------------------------------------------------------ preemption
@pytest.mark.timeout(600)
def test_sigterm_checkpoints_exits_143_and_the_resubmitted_job_matches(ppo):
    """No periodic checkpoint at all: SIGTERM during update 2 lets it finish, writes last.ckpt, exits 128 + 15."""
    checkpoint = {"every_n_updates": 100}
    process = ppo.run("sigterm", checkpoint, ("KillAt", {"step": 2, "signal_name": "SIGTERM"}), returncode=128 + signal.SIGTERM)
    assert "stopped by signal 15; resume with --ckpt_path last" in process.stderr
    state = load_checkpoint(ppo.directory("sigterm") / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 4  # update 2 finished: the next safe point
    assert not (ppo.directory("sigterm") / "model").exists()  # a preempted run exports nothing
    before = ppo.batches("sigterm")
    (ppo.root / "sigterm" / "batches.jsonl").unlink()
    ppo.run("sigterm", checkpoint, args=("--ckpt_path", "last"))
    assert_exact_resume(ppo, "sigterm", "uninterrupted", before, ppo.batches("sigterm"))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGUSR1"])
def test_sigint_and_slurm_requeue_signal_checkpoint_and_exit_non_zero(signal_name, tiny_model_dir, tmp_path):
    stage = Stage("sft", tmp_path, {"model": str(tiny_model_dir), "lr": 1e-3})
    signum = getattr(signal, signal_name)
    process = stage.run("signalled", {"every_n_train_steps": 100}, ("KillAt", {"step": 1, "signal_name": signal_name}),
                        returncode=128 + signum)
    assert f"stopped by signal {signum}" in process.stderr
    assert load_checkpoint(stage.directory("signalled") / "checkpoints" / "last.ckpt")["global_step"] == 2


# ------------------------------------------------------------------------------------------------ --ckpt_path last
@pytest.mark.timeout(600)
def test_ckpt_path_last_across_runs_and_with_none_present(tiny_model_dir, tmp_path):
    stage = Stage("sft", tmp_path, {"model": str(tiny_model_dir), "lr": 1e-3})
    # none present: an error saying where it looked, nothing trained
    process = stage.run("run", {"every_n_train_steps": 2}, args=("--ckpt_path", "last"), returncode=1)
    assert f"--ckpt_path last: no checkpoint (*.ckpt) under {stage.directory('run')}" in process.stderr
    assert not stage.batches("run")
    # a first run, then leftovers of a killed one, then a second run (new logger version) continuing the first
    stage.run("run", {"every_n_train_steps": 2})
    leftovers = [stage.directory("run") / "checkpoints" / "step=3.ckpt.partial", stage.directory("run") / ".model.tmp-x1"]
    leftovers[0].write_bytes(b"half")
    leftovers[1].mkdir()
    process = stage.run("run", {"every_n_train_steps": 2}, args=("--ckpt_path", "last", "--trainer.max_epochs", "2"), fresh_process=True)
    assert "removed 1 half-written checkpoints" in process.stderr and "removed 1 half-written exports" in process.stderr
    assert not any(path.exists() for path in leftovers)
    steps = [record["step"] for record in stage.batches("run")]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # the second run went on from step 4, not from 0
    assert load_checkpoint(stage.directory("run") / "checkpoints" / "last.ckpt")["global_step"] == 8
    versions = sorted(path.name for path in (tmp_path / "run" / "tensorboard" / "sft").iterdir())
    assert versions == ["version_0", "version_1"]  # whatever the logger's version folder


# ------------------------------------------------------------------------------------------------ NaN / inf guard
def assert_untouched(stage: Stage, name: str) -> None:
    """The files on disk are those of the snapshot taken before the failing step, and hold no non-finite value."""
    snapshot = json.loads((stage.root / name / "snapshot.json").read_text())
    directory = stage.directory(name)
    assert file_hashes(directory / "checkpoints", directory / "model") == snapshot["files"]
    assert not list(directory.rglob("*.partial")) and not list(directory.glob(".model.*"))
    state = load_checkpoint(directory / "checkpoints" / "last.ckpt")
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values() if torch.is_tensor(t) and t.is_floating_point())


@pytest.mark.timeout(600)
def test_infinite_reward_stops_ppo_before_any_write(ppo):
    """A finished 1-update run leaves an export; a 3-update run in the same place, with the reward model scoring +inf
    from update 3, stops there naming the quantity, stage and step: update 2's checkpoint and the export stay."""
    ppo.run("inf-reward", {"every_n_updates": 1}, args=("--data.total_episodes", "2"))
    snapshot = ("SnapshotFiles", {"path": str(ppo.root / "inf-reward" / "snapshot.json")})
    process = ppo.run("inf-reward", {"every_n_updates": 1}, ("InfiniteReward", {"step": 4}), snapshot, returncode=1)
    assert "NonFiniteError: ppo: non-finite reward-model score at step 4" in process.stderr
    assert json.loads((ppo.root / "inf-reward" / "snapshot.json").read_text())["global_step"] == 4
    assert load_checkpoint(ppo.directory("inf-reward") / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert_untouched(ppo, "inf-reward")


@pytest.mark.timeout(600)
def test_huge_learning_rate_stops_sft_before_any_write(tiny_model_dir, tmp_path):
    """A good run exports and checkpoints; a new run in the same place with lr 1e30 diverges and must stop at the
    first non-finite value, before that step's checkpoint (one every step) or an export is written."""
    stage = Stage("sft", tmp_path, {"model": str(tiny_model_dir), "lr": 1e-3})
    stage.run("diverging", {"every_n_train_steps": 1})
    good_export = file_hashes(stage.directory("diverging") / "model")
    snapshot = ("SnapshotFiles", {"path": str(tmp_path / "diverging" / "snapshot.json")})
    process = stage.run("diverging", {"every_n_train_steps": 1}, snapshot, args=("--model.lr", "1e30"), returncode=1)
    message = process.stderr.strip().splitlines()[-1]
    assert message.startswith("lit_rlhf.stages.common.NonFiniteError: sft: non-finite ") and " at step " in message, message
    assert_untouched(stage, "diverging")
    assert file_hashes(stage.directory("diverging") / "model") == good_export
