"""PPO against the critic-free policy gradients on the TL;DR quickstart (issue 26), at an equal number of sampled responses.

    python benchmarks/policy_gradient_compare.py --run_dir runs/quickstart \
        --variants ppo rloo grpo reinforce_pp [--set rloo:lr=3e-5] [--scored held_out|validation] [--output FILE]

Reads ``configs/quickstart/ppo.yaml`` and the SFT / RM exports of a finished quickstart under ``--run_dir``. Every
variant samples the config's ``total_episodes`` responses in updates of ``batch_size`` episodes: with ``k`` samples per
prompt it draws ``total_episodes / k`` prompts, ``batch_size / k`` per update. ``--scored held_out`` (the default, the
protocol of ``benchmarks/ppo_lr_sweep.py``) scores the last ``--held_out`` *training* prompts, which no rollout sees;
``--scored validation`` the quickstart's 128 validation prompts. The SFT policy is scored once on the same prompts with
the same sampling seeds. Each variant trains in its own process (its peak RSS is its own).

Printed per variant: mean RM score, the paired gain over SFT with its bootstrap 95% interval, the RM-judge win rate
against the reference summaries, the KL to SFT, the response length, the training reward's last-quarter minus
first-quarter mean, wall time and peak RSS. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from ppo_lr_sweep import PerPromptScores, prompt_data  # noqa: E402  (sets the offline environment before lit_rlhf loads)

from lit_rlhf.evaluation.report import quarter_means  # noqa: E402
from lit_rlhf.host_memory import reuse_freed_memory  # noqa: E402
from lit_rlhf.metrics import mean_with_interval  # noqa: E402
from lit_rlhf.stages.ppo import PRESETS, PPOModule  # noqa: E402


def variant_settings(name: str, overrides: list[str]) -> dict[str, Any]:
    """The arguments of a variant (``NAME`` or ``NAME@TAG``): its preset (none for ``ppo``) and its ``--set
    name:key=value`` overrides."""
    settings = dict(PRESETS.get(name.split("@")[0], {}))
    for item in overrides:
        target, _, assignment = item.partition(":")
        if target == name:
            key, _, value = assignment.partition("=")
            settings[key] = yaml.safe_load(value)
    return settings


def run(config: dict[str, Any], args: argparse.Namespace, settings: dict[str, Any] | None, splits: dict[str, Any] | None) -> dict[str, Any]:
    """Fit one variant (or, with ``settings=None``, only validate the SFT policy) and score the chosen prompts."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model_args = {**config["model"], "policy": str(args.run_dir / "sft" / "model"), "reward_model": str(args.run_dir / "rm" / "model")}
    data_settings = {key[5:]: value for key, value in (settings or {}).items() if key.startswith("data.")}
    model_args.update({key: value for key, value in (settings or {}).items() if not key.startswith("data.")})
    k = model_args.get("samples_per_prompt", 1)
    data = prompt_data(config, model_args["policy"]) if splits else quickstart_data(config, model_args["policy"])
    data.batch_size //= k
    data.total_episodes //= k
    for key, value in data_settings.items():  # e.g. --set rloo:data.total_episodes=128 (prompts)
        setattr(data, key, value)
    if splits:
        data.splits = dict(splits)
    L.seed_everything(config.get("seed_everything", 1), verbose=False)
    module = PPOModule(**model_args)
    scores = PerPromptScores()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=args.precision, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[scores],
    )
    start = time.perf_counter()
    if settings is None:
        trainer.validate(module, datamodule=data, verbose=False)
    else:
        trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("eval/")}
    return {
        "settings": settings, "seconds": seconds, "per_prompt": scores.scores, "training_rewards": list(module.training_rewards),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, **metrics,
    }


def quickstart_data(config: dict[str, Any], tokenizer: str) -> Any:
    """The quickstart's own data module: its training prompts and its ``val_samples`` validation prompts."""
    from lit_rlhf.data.datamodules import PromptDataModule

    return PromptDataModule(tokenizer=tokenizer, **config["data"])


def _child(queue: Any, *arguments: Any) -> None:
    reuse_freed_memory()
    queue.put(run(*arguments))


def run_in_process(*arguments: Any) -> dict[str, Any]:
    """:func:`run` in a fresh process, so that its peak RSS is its own."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, *arguments))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--config", type=Path, default=ROOT / "configs/quickstart/ppo.yaml")
    parser.add_argument("--variants", nargs="+", default=["ppo", "rloo", "grpo", "reinforce_pp"],
                        help=f"ppo or a preset: {', '.join(PRESETS)}; NAME@TAG runs NAME again under another label")
    parser.add_argument("--set", action="append", default=[], metavar="NAME:KEY=VALUE",
                        help="a module argument of one variant, or data.KEY a data-module attribute (after the division by k)")
    parser.add_argument("--scored", choices=["held_out", "validation"], default="held_out")
    parser.add_argument("--held_out", type=int, default=128)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    config = yaml.safe_load(args.config.read_text())
    splits = None
    if args.scored == "held_out":
        train = prompt_data(config, str(args.run_dir / "sft" / "model")).build("train", None)
        cut = len(train) - args.held_out
        splits = {"train": train.select(range(cut)), "validation": train.select(range(cut, len(train)))}
        print(f"{len(train)} training prompts: {cut} for rollouts, the last {args.held_out} scored", flush=True)
    baseline = run_in_process(config, args, None, splits)
    sft = torch.tensor(baseline["per_prompt"])
    results = {"sft": baseline}
    print(f"scored on: {args.scored} ({sft.numel()} prompts); responses per run: {config['data']['total_episodes']}")
    print("| variant | mean RM score | gain over SFT (95% interval) | win rate vs reference | KL | length | "
          "training reward last - first quarter | time (s) | peak RSS (GB) |\n|---|---|---|---|---|---|---|---|---|")

    def row(name: str, result: dict[str, Any]) -> None:
        gain = mean_with_interval(torch.tensor(result["per_prompt"]) - sft)
        first, last = quarter_means(result["training_rewards"]) if result["training_rewards"] else (0.0, 0.0)
        curve = f"{last - first:+.3f}" if result["training_rewards"] else "-"
        print(
            f"| {name} | {result['eval/scores']:.3f} | {gain['mean']:+.3f} ({gain['low']:+.3f} to {gain['high']:+.3f}) | "
            f"{result.get('eval/win_rate', float('nan')):.3f} | {result['eval/kl']:.2f} | {result['eval/response_length']:.1f} | "
            f"{curve} | {result['seconds']:.0f} | {result['peak_rss_gb']:.2f} |", flush=True,
        )

    row("SFT", baseline)
    for variant in args.variants:
        name = variant.split("@")[0]
        settings = {**variant_settings(name, []), **variant_settings(variant, args.set)}
        results[variant] = run_in_process(config, args, settings, splits)
        row(f"{variant} {settings}", results[variant])
        if args.output:
            args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
