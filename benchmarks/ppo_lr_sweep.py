"""Choose the quickstart's PPO learning rate on held-out *training* prompts (issue 11), never on the validation file.

    python benchmarks/ppo_lr_sweep.py --run_dir runs/quickstart --lr 3e-5 1e-4 [--num_ppo_epochs 2] [--output runs/ppo_lr_sweep.json]

Reads ``configs/quickstart/ppo.yaml`` and the SFT / RM exports of a finished quickstart under ``--run_dir``. The
SFT data's training prompts are split in two: the last ``--held_out`` rows are scored, the rest feed the rollouts
(``total_episodes`` of them, as in the quickstart). The SFT policy is scored once on the held-out prompts, then
every ``--lr`` trains PPO from it with the quickstart's other settings and is scored on the same prompts with the
same sampling seeds. Printed per row: the mean RM score of sampled responses, its gain over SFT with a paired
bootstrap 95% interval (same prompts), the KL to the SFT policy, the response length, the EOS fraction and the
training time. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from lit_rlhf.data.datamodules import PromptDataModule  # noqa: E402
from lit_rlhf.host_memory import reuse_freed_memory  # noqa: E402
from lit_rlhf.metrics import mean_with_interval  # noqa: E402
from lit_rlhf.stages.ppo import PPOModule  # noqa: E402


class PerPromptScores(Callback):
    """Keeps the per-prompt RM scores of each validation run (the module's metrics keep only their means)."""

    def __init__(self) -> None:
        self.scores: list[float] = []

    def on_validation_epoch_start(self, trainer: L.Trainer, module: Any) -> None:
        self.scores = []
        update = module.val_scores.update

        def record_and_update(values: torch.Tensor) -> None:
            self.scores.extend(values.float().tolist())
            update(values)

        module.val_scores.update = record_and_update


def prompt_data(config: dict[str, Any], tokenizer: str) -> PromptDataModule:
    """The quickstart's prompt data (its ``val_samples`` left out: the scored prompts come from the training file)."""
    return PromptDataModule(tokenizer=tokenizer, **{key: value for key, value in config["data"].items() if key != "val_samples"})


def run(config: dict[str, Any], args: argparse.Namespace, lr: float | None, splits: dict[str, Any]) -> dict[str, Any]:
    """Fit PPO with ``lr`` (or, with ``lr=None``, only validate the SFT policy) and score the held-out prompts."""
    model_args = {**config["model"], "policy": str(args.run_dir / "sft" / "model"), "reward_model": str(args.run_dir / "rm" / "model")}
    if lr is not None:
        model_args["lr"] = lr
    if args.num_ppo_epochs is not None:
        model_args["num_ppo_epochs"] = args.num_ppo_epochs
    datamodule = prompt_data(config, model_args["policy"])
    datamodule.splits = dict(splits)
    L.seed_everything(config.get("seed_everything", 1), verbose=False)
    module = PPOModule(**model_args)
    scores = PerPromptScores()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=args.precision, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[scores],
    )
    start = time.perf_counter()
    if lr is None:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    else:
        trainer.fit(module, datamodule=datamodule)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("eval/")}
    return {"lr": lr, "seconds": time.perf_counter() - start, "per_prompt": scores.scores, **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", type=Path, default=Path("runs/quickstart"), help="a finished quickstart (sft/model, rm/model)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs/quickstart/ppo.yaml")
    parser.add_argument("--lr", type=float, nargs="+", default=[3e-5, 1e-4])
    parser.add_argument("--num_ppo_epochs", type=int, help="PPO epochs per update (default: the config's)")
    parser.add_argument("--held_out", type=int, default=128, help="last N training prompts scored, never rolled out")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    reuse_freed_memory()  # as the lit-rlhf entry point does

    config = yaml.safe_load(args.config.read_text())
    train = prompt_data(config, str(args.run_dir / "sft" / "model")).build("train", None)
    cut = len(train) - args.held_out
    splits = {"train": train.select(range(cut)), "validation": train.select(range(cut, len(train)))}
    print(f"{len(train)} training prompts: {cut} for rollouts, the last {args.held_out} scored", flush=True)

    baseline = run(config, args, None, splits)
    sft = torch.tensor(baseline["per_prompt"])
    results = [baseline]
    print("| policy | mean RM score | gain over SFT (95% interval) | KL | length | EOS | time (s) |\n|---|---|---|---|---|---|---|")

    def row(name: str, result: dict[str, Any]) -> None:
        gain = mean_with_interval(torch.tensor(result["per_prompt"]) - sft)
        print(
            f"| {name} | {result['eval/scores']:.3f} | {gain['mean']:+.3f} ({gain['low']:+.3f} to {gain['high']:+.3f}) | "
            f"{result['eval/kl']:.2f} | {result['eval/response_length']:.1f} | {result['eval/eos_fraction']:.2f} | "
            f"{result['seconds']:.0f} |", flush=True,
        )

    row("SFT", baseline)
    for lr in args.lr:
        results.append(run(config, args, lr, splits))
        epochs = args.num_ppo_epochs or config["model"].get("num_ppo_epochs", 4)
        row(f"PPO lr {lr:g}, {epochs} epochs", results[-1])
    if args.output:
        args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
