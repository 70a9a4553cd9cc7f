"""Lightning callbacks: Hugging Face export, sample tables in TensorBoard, validation results on disk."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class HFExport(L.Callback):
    """Save the stage's model in Hugging Face format at the end of ``fit`` (the next stage's input).

    The stage module provides ``save_hf(directory)``. The export is written to a temporary sibling directory
    and renamed into place, so ``dirpath`` is either absent, the previous export, or a complete new one.

    With ``every_epoch`` it also exports after each training epoch to ``{dirpath}/../epochs/epoch-{N}``, the
    per-iteration checkpoints of online iterative DPO (one epoch per iteration).

    Args:
        dirpath: output directory; ``None`` means ``{trainer.default_root_dir}/model``.
        every_epoch: also export at every training epoch's end.
    """

    def __init__(self, dirpath: Optional[str] = None, every_epoch: bool = False) -> None:
        self.dirpath = Path(dirpath) if dirpath else None
        self.every_epoch = every_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every_epoch:
            return
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "model"
        if trainer.global_rank == 0:
            self.export(pl_module, self.dirpath.parent / "epochs" / f"epoch-{trainer.current_epoch}")
        trainer.strategy.barrier("hf_export_epoch")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "model"
        if trainer.global_rank == 0:
            self.export(pl_module)
        trainer.strategy.barrier("hf_export")

    def export(self, pl_module: Any, dirpath: Optional[Path] = None) -> Path:
        """Write ``pl_module.save_hf`` output atomically to ``dirpath`` (default :attr:`dirpath`)."""
        dirpath = Path(dirpath or self.dirpath)
        dirpath.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dirpath.name}.tmp-", dir=dirpath.parent))
        try:
            pl_module.save_hf(tmp)
            old = None
            if dirpath.exists():
                old = dirpath.with_name(f".{dirpath.name}.old-{os.getpid()}")
                os.replace(dirpath, old)
            os.replace(tmp, dirpath)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dirpath


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Render rows of equal keys as a Markdown table (TensorBoard's text plugin shows it as a table)."""
    if not rows:
        return ""
    keys = list(rows[0])

    def cell(value: Any) -> str:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row[key]) for key in keys) + " |" for row in rows]
    return "\n".join(lines)


class SampleTable(L.Callback):
    """Write the module's ``validation_samples`` (list of dicts) as a table to TensorBoard after validation,
    and its ``iteration_samples`` (online DPO: the responses sampled for training) after each training epoch."""

    @staticmethod
    def _write(trainer: L.Trainer, tag: str, samples: Optional[list[dict[str, Any]]], step: int) -> None:
        if trainer.sanity_checking or not samples or trainer.global_rank != 0:
            return
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_text"):
            experiment.add_text(tag, markdown_table(samples), global_step=step)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, "samples", getattr(pl_module, "validation_samples", None), trainer.global_step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, "iteration_samples", getattr(pl_module, "iteration_samples", None), trainer.current_epoch)


class ValidationResults(L.Callback):
    """Append each validation/test result (metrics and samples) as one JSON line to ``dirpath/results.jsonl``.

    ``dirpath=None`` means ``trainer.default_root_dir``. The quickstart summary reads these lines
    (:mod:`lit_rlhf.evaluation.report`).
    """

    def __init__(self, dirpath: Optional[str] = None) -> None:
        self.dirpath = Path(dirpath) if dirpath else None

    @rank_zero_only
    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if value.numel() == 1}
        record = {
            "fn": str(trainer.state.fn.value if trainer.state.fn else ""),
            "global_step": trainer.global_step,
            "metrics": metrics,
            "samples": getattr(pl_module, "validation_samples", []),
        }
        directory = self.dirpath or Path(trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / "results.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module)
