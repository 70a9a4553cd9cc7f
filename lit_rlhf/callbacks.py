"""Lightning callbacks: resumable checkpoints with preemption handling, Hugging Face export, sample tables in
TensorBoard, validation results on disk, resource usage (peak memory, throughput)."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

#: signals that stop a run at the next safe point (SIGUSR1: SLURM's usual requeue signal, ``--signal=B:USR1@90``)
PREEMPTION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


def replace_path(new: Path, target: Path) -> None:
    """Move ``new`` (a file or directory) to ``target`` so that ``target`` is at every moment absent, the old
    version or the complete new one: renames within one directory, the old version removed last."""
    new, target = Path(new), Path(target)
    old = None
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def commit_on_every_node(trainer: L.Trainer, partial: Path, target: Path) -> None:
    """Rename a written ``partial`` checkpoint (file or directory of shards) to ``target`` on every filesystem that holds
    one, once every rank has written its part (``Trainer.save_checkpoint`` ends with a barrier).

    One node after the other, the node's local rank 0 renames ``partial`` if it is there: on a filesystem shared by
    all nodes the first node renames it and the others find nothing left; with node-local checkpoint directories each
    node renames its own shards (those of a DeepSpeed or distributed FSDP2 checkpoint); any mix works the same way.
    No two processes ever rename at once; one barrier per node.
    """
    for node in range(trainer.num_nodes):
        if node == trainer.node_rank and trainer.local_rank == 0 and os.path.lexists(partial):
            replace_path(partial, target)
        trainer.strategy.barrier("stage_checkpoint_commit")


def remove_leftovers(directory: Path, patterns: tuple[str, ...], what: str) -> list[Path]:
    """Delete what a killed run left half-written in ``directory`` (glob ``patterns``) and warn about it."""
    found = sorted(path for pattern in patterns for path in Path(directory).glob(pattern)) if Path(directory).is_dir() else []
    for path in found:  # another node sharing the filesystem may be removing the same ones
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if found:
        rank_zero_warn(f"removed {len(found)} half-written {what} left by an interrupted run: {', '.join(map(str, found))}")
    return found


class StageCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` made for runs that get killed (resumable with ``--ckpt_path last``).

    * **One place per stage.** ``dirpath`` defaults to ``{trainer.default_root_dir}/checkpoints``, whatever the
      logger's version folder, so a new run finds the last one's ``last.ckpt``; ``last.ckpt`` is overwritten, not
      versioned.
    * **The stage's own unit.** ``every_n_updates`` counts PPO updates (training batches; a stage with
      ``optimizer_steps_per_update`` has that many optimiser steps per update), ``every_n_train_steps`` optimiser
      steps (SFT, RM, DPO), ``every_n_epochs`` epochs (online DPO: iterations).
    * **Never half-written.** A checkpoint is written to ``{name}.partial`` and renamed into place, on every node
      (:func:`commit_on_every_node`: shared or node-local checkpoint directories); ``*.partial`` files a killed run
      left are removed (with a warning) when the next run starts, on every node.
    * **Preemption.** During ``fit``, SIGTERM, SIGINT and SIGUSR1 (SLURM's requeue signal) stop the run at the next
      safe point (the end of the current training batch, i.e. PPO update or optimiser step), where ``last.ckpt`` is
      written; the run then exits with code ``128 + signal`` (``lit_rlhf.cli``). A second SIGINT stops at once.
      Lightning's own SIGTERM handling raises at that point; SIGINT and SIGUSR1 are routed to it.

    Args:
        every_n_updates: checkpoint every N training batches of a stage with ``optimizer_steps_per_update``
            (PPO: N updates). Exclusive with ``every_n_train_steps``.
        handle_signals: catch the preemption signals as above.
        **kwargs: as ``ModelCheckpoint``; ``save_last`` defaults to ``True`` and ``save_top_k`` to 0.
    """

    #: the signal that stopped the last run in this process (``None`` when none did), read by the CLI
    received_signal: Optional[int] = None

    def __init__(
        self,
        dirpath: Optional[str] = None,
        filename: Optional[str] = None,
        every_n_updates: Optional[int] = None,
        every_n_train_steps: Optional[int] = None,
        every_n_epochs: Optional[int] = None,
        save_last: bool = True,
        save_top_k: int = 0,
        save_on_train_epoch_end: Optional[bool] = None,
        handle_signals: bool = True,
        **kwargs: Any,
    ) -> None:
        if every_n_updates is not None and (every_n_updates < 1 or every_n_train_steps):
            raise ValueError(f"every_n_updates must be >= 1 and exclusive with every_n_train_steps, got {every_n_updates}")
        super().__init__(
            dirpath=dirpath, filename=filename, save_last=save_last, save_top_k=save_top_k,
            every_n_train_steps=every_n_train_steps, every_n_epochs=every_n_epochs,
            save_on_train_epoch_end=save_on_train_epoch_end, enable_version_counter=False, **kwargs,
        )
        self.every_n_updates, self.handle_signals = every_n_updates, handle_signals
        self._previous_handlers: dict[int, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)
        if self.every_n_updates is not None:
            self._every_n_train_steps = self.every_n_updates * getattr(pl_module, "optimizer_steps_per_update", 1)
        if trainer.local_rank == 0:  # every node: node-local checkpoint directories have their own leftovers
            remove_leftovers(Path(self.dirpath), ("*.partial",), "checkpoints")
        if stage == "fit" and self.handle_signals:
            StageCheckpoint.received_signal = None
            for signum in PREEMPTION_SIGNALS:
                self._previous_handlers[signum] = signal.signal(signum, self._make_handler(trainer))

    def _make_handler(self, trainer: L.Trainer) -> Any:
        def handler(signum: int, frame: Any) -> None:
            if signum == signal.SIGINT and StageCheckpoint.received_signal is not None:
                raise KeyboardInterrupt  # a second Ctrl+C: stop now
            StageCheckpoint.received_signal = signum
            trainer._signal_connector.received_sigterm = True  # Lightning stops at the end of the batch
            launcher = trainer.strategy.launcher
            if signum != signal.SIGTERM and launcher is not None and trainer.is_global_zero:
                launcher.kill(signum)  # the other local ranks (Lightning forwards SIGTERM itself)

        return handler

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, previous in self._previous_handlers.items():
            signal.signal(signum, previous)
        self._previous_handlers = {}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """On a preemption stop (never on an error): write ``last.ckpt`` at the safe point the run stopped at."""
        if isinstance(exception, SIGTERMException) and self.save_last and trainer.state.fn == "fit":
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            rank_zero_warn(f"preempted: wrote {self.last_model_path}; resume with --ckpt_path last")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            # manual optimisation (PPO, online DPO): the state after the update is the one to resume from, as wanted
            warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
            super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """``last.ckpt`` is the end state of a completed fit, whatever the cadence (``ModelCheckpoint`` keeps the last
        periodic one, which may be mid-epoch or older)."""
        if self.save_last and trainer.state.fn == "fit" and not trainer.fast_dev_run and not trainer.sanity_checking:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        partial = f"{filepath}.partial"
        super()._save_checkpoint(trainer, partial)
        commit_on_every_node(trainer, Path(partial), Path(filepath))
        self._last_checkpoint_saved = filepath


class HFExport(L.Callback):
    """Save the stage's model in Hugging Face format at the end of ``fit`` (the next stage's input).

    The stage module provides ``save_hf(directory)``. The export is written to a temporary sibling directory
    and renamed into place, so ``dirpath`` is either absent, the previous export, or a complete new one; the
    temporary directories a killed run left are removed (with a warning) when the next run starts. The exported
    weights are checked first: an export never contains a NaN or an infinity.

    With ``every_epoch`` it also exports after each training epoch to ``{dirpath}/../epochs/epoch-{N}``, the
    per-iteration checkpoints of online iterative DPO (one epoch per iteration); with ``every_n_updates`` after every
    N-th training batch (PPO: update) to ``{dirpath}/../updates/update-{N:05d}`` (N: batches so far in the run), the
    policies of an over-optimisation curve (``lit-rlhf eval --exports 'runs/.../updates/*'``).

    Args:
        dirpath: output directory; ``None`` means ``{trainer.default_root_dir}/model``.
        every_epoch: also export at every training epoch's end.
        every_n_updates: also export after every N-th training batch (``None``: never).

    Raises:
        ValueError: if ``every_n_updates`` is smaller than 1.
    """

    def __init__(self, dirpath: Optional[str] = None, every_epoch: bool = False, every_n_updates: Optional[int] = None) -> None:
        if every_n_updates is not None and every_n_updates < 1:
            raise ValueError(f"HFExport: every_n_updates must be >= 1, got {every_n_updates}")
        self.dirpath = Path(dirpath) if dirpath else None
        self.every_epoch, self.every_n_updates = every_epoch, every_n_updates

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "model"
        if trainer.is_global_zero:
            name = self.dirpath.name
            remove_leftovers(self.dirpath.parent, (f".{name}.tmp-*", f".{name}.old-*"), "exports")
            remove_leftovers(self.dirpath.parent / "epochs", (".epoch-*.tmp-*", ".epoch-*.old-*"), "exports")
            remove_leftovers(self.dirpath.parent / "updates", (".update-*.tmp-*", ".update-*.old-*"), "exports")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        done = trainer.fit_loop.epoch_loop.total_batch_idx + 1  # batches of the whole run, resumed runs included
        if self.every_n_updates and done % self.every_n_updates == 0:
            self.export(pl_module, self.dirpath.parent / "updates" / f"update-{done:05d}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_epoch:
            self.export(pl_module, self.dirpath.parent / "epochs" / f"epoch-{trainer.current_epoch}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.export(pl_module)

    def export(self, pl_module: Any, dirpath: Optional[Path] = None) -> Path:
        """Write ``pl_module.save_hf`` output atomically to ``dirpath`` (default :attr:`dirpath`).

        Called on every process (a sharded model is gathered to process 0, which alone writes).

        Raises:
            FloatingPointError: naming the tensor, if the exported model holds a NaN or infinity (nothing is written).
        """
        dirpath = Path(dirpath or self.dirpath)
        trainer = pl_module._trainer
        writer = trainer is None or trainer.is_global_zero
        tmp = None
        if writer:
            dirpath.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dirpath.name}.tmp-", dir=dirpath.parent))
        try:
            pl_module.save_hf(tmp)
            if tmp is not None:
                replace_path(tmp, dirpath)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        if trainer is not None:
            trainer.strategy.barrier("hf_export")
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
    """Append each validation/test result (metrics and samples) as one JSON line to ``dirpath/results.jsonl``, with the
    policy stages' per-prompt validation scores (``validation_scores``, for paired gains) and PPO's mean training reward
    per update so far (``training_rewards``).

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
        for key in ("validation_scores", "training_rewards"):  # per-prompt scores; the policy-gradient reward curve
            if getattr(pl_module, key, None):
                record[key] = list(getattr(pl_module, key))
        directory = self.dirpath or Path(trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / "results.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module)


class ResourceUsage(L.Callback):
    """Peak memory and training throughput of each process, written at the end of ``fit`` to
    ``{dirpath}/resources-rank{R}.json`` (``dirpath=None``: ``trainer.default_root_dir``) and logged once.

    Recorded: ``peak_rss_mb`` (the process's peak resident memory, MiB, from ``getrusage``), ``peak_gpu_mb``
    (``torch.cuda.max_memory_allocated``, MiB, on GPU), ``train_seconds`` (the sum of the training batches' wall
    time; checkpoint writes, which Lightning runs after this callback's ``on_train_batch_end``, and validation are
    left out), ``batches``, ``rows`` (training rows on all processes: PPO episodes) and ``rows_per_second``.
    """

    def __init__(self, dirpath: Optional[str] = None) -> None:
        self.dirpath = Path(dirpath) if dirpath else None
        self.train_seconds, self.batches, self.rows, self._start = 0.0, 0, 0, None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._start is None:
            return
        self.train_seconds += time.perf_counter() - self._start
        self.batches += 1
        rows = batch.get("prompts", batch) if isinstance(batch, dict) else batch
        first = next((value for value in rows.values() if torch.is_tensor(value)), None) if isinstance(rows, dict) else None
        self.rows += (first.size(0) if first is not None else 0) * trainer.world_size
        self._start = None

    def usage(self) -> dict[str, float]:
        """The figures so far (this process)."""
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
        return {
            "peak_rss_mb": peak_rss_mb, "peak_gpu_mb": peak_gpu_mb, "train_seconds": self.train_seconds,
            "batches": self.batches, "rows": self.rows, "rows_per_second": self.rows / max(self.train_seconds, 1e-9),
        }

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        usage = {"rank": trainer.global_rank, "world_size": trainer.world_size, **self.usage()}
        directory = self.dirpath or Path(trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"resources-rank{trainer.global_rank}.json").write_text(json.dumps(usage, indent=1) + "\n")


def _duration(seconds: float) -> str:
    """``H:MM:SS`` (or ``M:SS`` under an hour) of a non-negative number of seconds."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(what: str, unit: str, done: int, total: Optional[int], elapsed: float, counted: Optional[int] = None) -> str:
    """One progress line, e.g. ``[rm fit] step 120/308 (39%) | 5.3 s/step | elapsed 10:36 | left ~16:36``.

    Args:
        what: the run, e.g. ``"rm fit"``.
        unit: what is counted (``"step"``, ``"update"``, ``"validation batch"``).
        done: units done in the run, those of a resumed run's earlier processes included.
        total: units of the whole run, or ``None`` when unknown (then no percentage and no time left).
        elapsed: seconds since this process started counting.
        counted: units done in those ``elapsed`` seconds (default ``done``): the rate is ``counted / elapsed`` and the
            time left ``(total - done)`` units at that rate.
    """
    counted = done if counted is None else counted
    head = f"[{what}] {unit} {done}/{total} ({100 * done / total:.0f}%)" if total else f"[{what}] {unit} {done}"
    if counted <= 0 or elapsed <= 0:
        rate, left = "-", None
    else:
        per_second = counted / elapsed
        rate = f"{per_second:.2f} {unit}/s" if per_second >= 1 else f"{elapsed / counted:.1f} s/{unit}"
        left = max(total - done, 0) / per_second if total else None
    parts = [head, rate, f"elapsed {_duration(elapsed)}"] + ([f"left ~{_duration(left)}"] if left is not None else [])
    return " | ".join(parts)


class ProgressLines(L.Callback):
    """Progress as plain lines, every ``interval`` seconds, where standard output is not a terminal (a pipeline's
    log, ``make quickstart > log``, a batch job): Lightning's progress bar redraws one line in place, which a log
    file or pipe does not show until the step ends. On a terminal it prints nothing and the bar is left as it is.

    A line (printed by rank 0, at the end of the first training or validation batch ``interval`` seconds after the
    previous line) gives the stage and command, the training steps (optimiser steps; PPO and the critic-free
    methods: updates, one rollout batch each) or validation batches done of the run's total, the rate, the time
    since this process began training and the time left at that rate (:func:`progress_line`)::

        [rm fit] step 120/308 (39%) | 5.3 s/step | elapsed 10:36 | left ~16:36

    The ``lit-rlhf`` stages add one with the default interval unless the config lists one (``trainer.callbacks``:
    ``- class_path: lit_rlhf.callbacks.ProgressLines`` with ``init_args: {interval: 60}``).

    Args:
        interval: seconds between lines (``0``: after every batch).
    """

    def __init__(self, interval: float = 30.0) -> None:
        if interval < 0:
            raise ValueError(f"ProgressLines: interval must be >= 0 seconds, got {interval}")
        self.interval = interval
        self._last = self._start = self._validation_start = 0.0
        self._first_done = self._validation_done = 0

    def _emit(self, trainer: L.Trainer, pl_module: L.LightningModule, unit: str, done: int, total: Optional[int],
              since: float, counted: int) -> None:
        """Print a line (rank 0, not on a terminal, ``interval`` seconds after the last): ``counted`` of the ``done``
        units were done since ``since`` (``time.monotonic``)."""
        now = time.monotonic()
        if not trainer.is_global_zero or now - self._last < self.interval or sys.stdout.isatty():
            return
        self._last = now
        what = f"{getattr(pl_module, 'stage_name', type(pl_module).__name__)} {trainer.state.fn.value if trainer.state.fn else ''}".strip()
        print(progress_line(what, unit, done, total, now - since, counted), flush=True)

    @staticmethod
    def training_total(trainer: L.Trainer, pl_module: L.LightningModule) -> Optional[int]:
        """Training batches of the run (``max_epochs`` epochs, or fewer where ``max_steps`` optimiser steps end it
        first; a stage with ``optimizer_steps_per_update`` takes that many steps per batch), ``None`` when neither
        bounds it (an iterable dataset without ``max_steps``)."""
        limits = []
        per_epoch = trainer.num_training_batches
        if math.isfinite(per_epoch) and trainer.max_epochs is not None and trainer.max_epochs >= 0:
            limits.append(int(per_epoch) * trainer.max_epochs)
        if trainer.max_steps is not None and trainer.max_steps >= 0:
            steps_per_batch = getattr(pl_module, "optimizer_steps_per_update", None) or (
                1 / trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1)
            limits.append(math.ceil(trainer.max_steps / steps_per_batch))
        return min(limits) if limits else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last = time.monotonic()
        self._first_done = trainer.fit_loop.epoch_loop.total_batch_idx + 1  # batches of a resumed run's earlier processes

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        unit = "update" if hasattr(pl_module, "optimizer_steps_per_update") else "step"
        done = trainer.fit_loop.epoch_loop.total_batch_idx + 1
        self._emit(trainer, pl_module, unit, done, self.training_total(trainer, pl_module), self._start, done - self._first_done)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validation_start, self._validation_done = time.monotonic(), 0
        if trainer.state.fn != "fit":  # ``validate``, ``test``: the first line ``interval`` seconds from here
            self._last = self._validation_start

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.sanity_checking:
            return
        self._validation_done += 1
        total = sum(trainer.num_val_batches) if all(math.isfinite(n) for n in trainer.num_val_batches) else None
        self._emit(trainer, pl_module, "validation batch", self._validation_done, int(total) if total else None,
                   self._validation_start, self._validation_done)
