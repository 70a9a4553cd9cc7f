"""``lit-rlhf STAGE {fit,validate,test} --config FILE``: one LightningCLI per stage; ``rloo``, ``grpo``, ``dr-grpo`` and
``reinforce-pp`` are the ``ppo`` stage with the critic-free estimator's presets as defaults
(:data:`lit_rlhf.stages.ppo.PRESETS`); ``lit-rlhf eval``: win rates;
``lit-rlhf eval-rm``: reward-model accuracy and calibration.

Every knob is a typed ``__init__`` argument of the stage's LightningModule or DataModule, so
``lit-rlhf sft fit --print_config`` documents them all. The data's tokenizer is linked to the stage's model.

``--ckpt_path last`` resumes from the newest checkpoint (``*.ckpt``) under the stage's ``trainer.default_root_dir``
and its checkpoint callbacks' directories, whichever run wrote it; with none there it stops with an error saying
where it looked. A run stopped by a preemption signal (:class:`~lit_rlhf.callbacks.StageCheckpoint`) exits with
``128 + signal`` (143 for SIGTERM) after writing ``last.ckpt``.

Every stage prints a progress line every 30 s where its output is not a terminal
(:class:`~lit_rlhf.callbacks.ProgressLines`; a config listing one sets its interval).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Optional

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_rlhf.callbacks import ProgressLines, StageCheckpoint
from lit_rlhf.data.datamodules import PreferenceDataModule, PromptDataModule, SFTDataModule
from lit_rlhf.stages.dpo import DPOModule
from lit_rlhf.stages.online_dpo import OnlineDPOModule
from lit_rlhf.stages.ppo import PRESETS, PPOModule
from lit_rlhf.stages.reward import RewardModule
from lit_rlhf.stages.sft import SFTModule
from lit_rlhf.strategies import register_strategies

register_strategies()

#: stage name -> (LightningModule, LightningDataModule, the module argument that names the tokenizer's model)
STAGES = {
    "sft": (SFTModule, SFTDataModule, "model.model"),
    "rm": (RewardModule, PreferenceDataModule, "model.model"),
    "ppo": (PPOModule, PromptDataModule, "model.policy"),
    **{name.replace("_", "-"): (PPOModule, PromptDataModule, "model.policy") for name in PRESETS},
    "dpo": (DPOModule, PreferenceDataModule, "model.model"),
    "online-dpo": (OnlineDPOModule, PromptDataModule, "model.policy"),
}


def last_checkpoint(directories: list[Path]) -> Path:
    """The newest ``*.ckpt`` (by modification time) under ``directories``, searched recursively.

    Raises:
        FileNotFoundError: naming the directories, when none holds a checkpoint.
    """
    candidates = [path for directory in directories if directory.is_dir() for path in directory.rglob("*.ckpt")]
    if not candidates:
        where = ", ".join(str(directory) for directory in dict.fromkeys(directories))
        raise FileNotFoundError(f"--ckpt_path last: no checkpoint (*.ckpt) under {where}; run without --ckpt_path to start afresh")
    return max(candidates, key=lambda path: path.stat().st_mtime)


def _stage_cli(tokenizer_source: str, defaults: Optional[dict] = None) -> type[LightningCLI]:
    class StageCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001
            parser.link_arguments(tokenizer_source, "data.tokenizer")
            if defaults:  # a preset subcommand (rloo, grpo, ...): its defaults, under any config or flag
                parser.set_defaults({f"model.{key}": value for key, value in defaults.items()})

        def instantiate_trainer(self, **kwargs):  # noqa: ANN003, ANN202
            """The trainer, with a :class:`~lit_rlhf.callbacks.ProgressLines` (progress lines where the output is not a
            terminal) unless the config lists one."""
            trainer = super().instantiate_trainer(**kwargs)
            if not any(isinstance(callback, ProgressLines) for callback in trainer.callbacks):
                trainer.callbacks.insert(0, ProgressLines())
            return trainer

        def before_fit(self) -> None:
            self.model.check_datamodule(self.datamodule)  # before any model or data is loaded
            self._resolve_last_checkpoint()

        def _resolve_last_checkpoint(self) -> None:
            config = self.config_init[self.subcommand]
            if config.get("ckpt_path") != "last":
                return
            directories = [Path(self.trainer.default_root_dir)]
            directories += [Path(cb.dirpath) for cb in self.trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
            config["ckpt_path"] = str(last_checkpoint(directories))
            print(f"--ckpt_path last: resuming from {config['ckpt_path']}", file=sys.stderr)

        before_validate = before_test = _resolve_last_checkpoint

    return StageCLI


def eval_main(command: str, args: list[str]) -> None:
    """``lit-rlhf eval`` (:func:`lit_rlhf.evaluation.evaluate.evaluate`) and ``lit-rlhf eval-rm``
    (:func:`lit_rlhf.evaluation.reward_eval.evaluate_reward_model`), their arguments typed by jsonargparse
    (``--config``, ``--print_config``; judges as ``--llm_judge.base_url ...`` / ``--local_judge.model ...``)."""
    from jsonargparse import CLI

    if command == "eval":
        from lit_rlhf.evaluation.evaluate import evaluate as function
    else:
        from lit_rlhf.evaluation.reward_eval import evaluate_reward_model as function
    CLI(function, args=args, prog=f"lit-rlhf {command}")


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the ``lit-rlhf`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("eval", "eval-rm"):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        eval_main(argv[0], argv[1:])
        return
    if not argv or argv[0] not in STAGES:
        names = "|".join(STAGES)
        usage = f"usage: lit-rlhf {{{names}}} {{fit,validate,test}} --config FILE [options]\n       lit-rlhf {{eval,eval-rm}} --help"
        print(usage, file=sys.stderr)
        raise SystemExit(2)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    module, datamodule, tokenizer_source = STAGES[argv[0]]
    # sys.argv stays whole: Lightning's DDP launcher re-runs `sys.argv` for the other ranks, stage included.
    # The arguments go in explicitly, so LightningCLI's warning about args *and* sys.argv does not apply.
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            _stage_cli(tokenizer_source, PRESETS.get(argv[0].replace("-", "_")))(
                module,
                datamodule,
                args=argv[1:],
                parser_kwargs={"prog": f"lit-rlhf {argv[0]}"},
                save_config_kwargs={"overwrite": True},
                auto_configure_optimizers=False,
            )
    except SIGTERMException:  # a preemption signal stopped the run at a safe point, after writing last.ckpt
        signum = StageCheckpoint.received_signal or 15
        print(f"lit-rlhf {argv[0]}: stopped by signal {signum}; resume with --ckpt_path last", file=sys.stderr)
        raise SystemExit(128 + signum) from None


if __name__ == "__main__":
    main()
