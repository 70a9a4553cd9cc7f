"""The quickstart summary: reads each stage's ``results.jsonl`` (written by ``ValidationResults``) and timings.

``python -m lit_rlhf.evaluation.report runs/quickstart`` prints it again for a finished run.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional


def read_results(stage_dir: Path) -> list[dict[str, Any]]:
    """All records of ``stage_dir/results.jsonl`` in order (empty list when absent)."""
    path = stage_dir / "results.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _first(records: list[dict[str, Any]], fn: str) -> Optional[dict[str, Any]]:
    return next((record for record in records if record["fn"] == fn), None)


def _last(records: list[dict[str, Any]], fn: str) -> Optional[dict[str, Any]]:
    return next((record for record in reversed(records) if record["fn"] == fn), None)


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _metric(record: Optional[dict[str, Any]], key: str) -> Optional[float]:
    return None if record is None else record["metrics"].get(key)


def _interval(record: Optional[dict[str, Any]], key: str) -> str:
    """`` (95% CI low-high)`` of a metric logged with ``_low`` / ``_high`` companions, or ``""``."""
    low, high = _metric(record, f"{key}_low"), _metric(record, f"{key}_high")
    return "" if low is None or high is None else f" (95% CI {low:.3f}-{high:.3f})"


def summary(run_dir: Path, num_samples: int = 3) -> str:
    """Build the summary text of a quickstart run directory (``{sft,rm,ppo}/results.jsonl``, ``timings.json``; with
    ``make quickstart-dpo`` also ``dpo``, ``dpo_eval`` and ``online_dpo``)."""
    run_dir = Path(run_dir)
    lines = ["", "=" * 100, "lit_rlhf quickstart summary".center(100), "=" * 100]
    meta_path = run_dir / "timings.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("precision"):
        lines.append(f"precision: {meta['precision']}")

    sft = read_results(run_dir / "sft")
    before, after = _first(sft, "validate"), _last(sft, "fit")
    lines.append("\nSFT (validation)")
    lines.append(f"  loss       before {_fmt(_metric(before, 'val/loss'))}   after {_fmt(_metric(after, 'val/loss'))}")
    for key in ("rouge1", "rouge2", "rougeL"):
        metric = f"val/{key}_fmeasure"
        lines.append(f"  {key:<10} before {_fmt(_metric(before, metric))}   after {_fmt(_metric(after, metric))}")

    rm = _last(read_results(run_dir / "rm"), "fit")
    lines.append("\nReward model (validation comparisons)")
    lines.append(f"  accuracy   {_fmt(_metric(rm, 'val/accuracy'))}{_interval(rm, 'val/accuracy')}")
    if rm:
        per_batch = {k.split("/")[-1]: v for k, v in rm["metrics"].items() if k.startswith("val/accuracy_batch/")}
        lines.append("  per batch  " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(per_batch.items())))
        lines.append(f"  padding check (R7) max relative difference {_fmt(_metric(rm, 'val/padding_rel_diff'), 2)}")

    dpo = _last(read_results(run_dir / "dpo"), "fit")
    if dpo:
        lines.append("\nOffline DPO (validation comparisons, implicit reward beta * (logp_policy - logp_ref))")
        lines.append(f"  accuracy   {_fmt(_metric(dpo, 'val/accuracy'))}{_interval(dpo, 'val/accuracy')}"
                     f"   margin {_fmt(_metric(dpo, 'val/reward_margin'))}"
                     f"   (chosen {_fmt(_metric(dpo, 'val/chosen_reward'))}, rejected {_fmt(_metric(dpo, 'val/rejected_reward'))})")
        per_batch = {k.split("/")[-1]: v for k, v in dpo["metrics"].items() if k.startswith("val/accuracy_batch/")}
        lines.append("  per batch  " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(per_batch.items())))

    ppo = read_results(run_dir / "ppo")
    sft_policy, ppo_policy = _first(ppo, "validate"), _last(ppo, "fit")
    policies = [("SFT", sft_policy), ("PPO", ppo_policy)]
    dpo_policy, online_policy = _last(read_results(run_dir / "dpo_eval"), "validate"), _last(read_results(run_dir / "online_dpo"), "fit")
    policies += [(name, record) for name, record in (("DPO", dpo_policy), ("online DPO", online_policy)) if record]
    temperatures = {_metric(record, "eval/temperature") for _, record in policies} - {None}
    sampled_at = "/".join(f"{t:g}" for t in sorted(temperatures)) or "n/a"
    lines.append(f"\nPolicies on the validation prompts (responses sampled at temperature {sampled_at}, same seeds)")
    header = f"  {'policy':<12}{'mean RM score':>15}{'KL to SFT':>12}{'length':>10}{'EOS frac':>10}"
    lines.append(header + "   win rate vs reference (RM judge, 95% CI)")
    for name, record in policies:
        win_rate = _metric(record, "eval/win_rate")
        interval = f"{_fmt(win_rate)}{_interval(record, 'eval/win_rate')}" if win_rate is not None else "n/a"
        lines.append(
            f"  {name:<12}{_fmt(_metric(record, 'eval/scores')):>15}{_fmt(_metric(record, 'eval/kl')):>12}"
            f"{_fmt(_metric(record, 'eval/response_length'), 1):>10}{_fmt(_metric(record, 'eval/eos_fraction'), 2):>10}   {interval}"
        )

    sampled = [(name, record) for name, record in policies if record and record.get("samples")]
    if sampled:
        lines.append(f"\nSamples (first {num_samples} validation prompts)")
        wrap = lambda text: textwrap.fill(text, 96, initial_indent="    ", subsequent_indent="    ")  # noqa: E731
        for index, first in enumerate(sampled[0][1]["samples"][:num_samples]):
            lines.append("  - query:     " + first["query"][-160:].replace("\n", " "))
            lines.append("    reference:\n" + wrap(first["reference"]))
            for name, record in sampled:
                if index < len(record["samples"]):
                    row = record["samples"][index]
                    lines.append(f"    {name} policy (score {row['score']:.2f}):\n" + wrap(row["response"]))

    if meta.get("stages"):
        lines.append("\nWall time per step (s)")
        total = 0.0
        for name, seconds in meta["stages"].items():
            lines.append(f"  {name:<16}{seconds:8.1f}")
            total += seconds
        lines.append(f"  {'total':<16}{total:8.1f}")
    lines.append("\nTensorBoard: tensorboard --logdir " + str(run_dir / "tensorboard"))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    print(summary(Path(argv[0] if argv else "runs/quickstart")))


if __name__ == "__main__":
    main()
