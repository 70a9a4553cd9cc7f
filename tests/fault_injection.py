"""Callbacks the fault-injection tests add to real ``lit-rlhf`` runs (importable with ``PYTHONPATH=tests``).

* :class:`KillAt`: send this process a signal (default SIGKILL) at the start of the first training batch at or after
  a given optimiser step or epoch, i.e. right after the checkpoint of the step before was written.
* :class:`RecordBatches`: append a fingerprint of every trained batch to a JSONL file (which data, in which order).
* :class:`InfiniteReward`: make the reward model score ``+inf`` from a given step on (PPO).
* :class:`RecordRollouts`: record every policy-gradient rollout per rank (scores, rewards, advantages).
* :class:`SnapshotFiles`: before every training batch, write the SHA-256 of every file under the checkpoint and
  export directories, so a test can compare what a failing step left on disk with what was there before it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch


def _due(trainer: L.Trainer, step: Optional[int], epoch: Optional[int]) -> bool:
    return (step is not None and trainer.global_step >= step) or (epoch is not None and trainer.current_epoch >= epoch)


class KillAt(L.Callback):
    def __init__(self, step: Optional[int] = None, epoch: Optional[int] = None, signal_name: str = "SIGKILL") -> None:
        self.step, self.epoch, self.signal_name, self.fired = step, epoch, signal_name, False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.fired and _due(trainer, self.step, self.epoch):
            self.fired = True
            os.kill(os.getpid(), getattr(signal, self.signal_name))


def fingerprint(batch: Any) -> str:
    """SHA-1 of a batch's tensors and strings, in key order."""
    digest = hashlib.sha1()

    def feed(value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value):
                digest.update(str(key).encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                feed(item)
        elif torch.is_tensor(value):
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        else:
            digest.update(repr(value).encode())

    feed(batch)
    return digest.hexdigest()


class RecordBatches(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        record = {"step": trainer.global_step, "epoch": trainer.current_epoch, "batch_idx": batch_idx, "batch": fingerprint(batch)}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


class InfiniteReward(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            import lit_rlhf.stages.ppo as ppo

            real = ppo.sequence_scores
            ppo.sequence_scores = lambda *args, **kwargs: torch.full_like(real(*args, **kwargs), float("inf"))


def file_hashes(*directories: Path) -> dict[str, str]:
    return {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest()
        for directory in directories if Path(directory).is_dir()
        for path in sorted(Path(directory).rglob("*")) if path.is_file()
    }


class SnapshotFiles(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        root = Path(trainer.default_root_dir)
        hashes = {"global_step": trainer.global_step, "files": file_hashes(root / "checkpoints", root / "model")}
        self.path.write_text(json.dumps(hashes), encoding="utf-8")


class RecordRollouts(L.Callback):
    """Append what each rollout of a policy-gradient run computed (per rank: query fingerprints, scores, token rewards,
    masks and advantages) to ``{path}.rank{R}.jsonl``, for the group-statistics checks under DDP/FSDP2."""

    def __init__(self, path: str) -> None:
        self.path, self.wrapped = path, False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.wrapped:
            return
        self.wrapped, rollout = True, pl_module.rollout
        path = Path(f"{self.path}.rank{trainer.global_rank}.jsonl")

        def recorded(queries: torch.Tensor, *args: Any, **kwargs: Any) -> dict[str, Any]:
            data = rollout(queries, *args, **kwargs)
            record = {
                "step": trainer.global_step, "queries": [fingerprint(row) for row in queries],
                **{key: data[key].float().tolist() for key in ("scores", "rewards", "advantages", "non_score_reward")},
                "mask": (~data["padding_mask"]).tolist(),
            }
            with path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            return data

        pl_module.rollout = recorded
