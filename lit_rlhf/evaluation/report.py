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


#: the quickstart's policy-gradient step: run directory -> name in the summary (the first present is read)
POLICY_GRADIENT_RUNS = {"reinforce_pp": "REINFORCE++", "ppo": "PPO", "rloo": "RLOO", "grpo": "GRPO", "dr_grpo": "Dr. GRPO"}


def policy_gradient_run(run_dir: Path, directory: Optional[str] = None) -> tuple[str, list[dict[str, Any]]]:
    """The name and records of the quickstart's policy-gradient stage: ``directory`` (e.g. ``"ppo"``), or the first of
    :data:`POLICY_GRADIENT_RUNS` with results (``PPO`` and none when none has run)."""
    for directory, name in POLICY_GRADIENT_RUNS.items() if directory is None else [(directory, POLICY_GRADIENT_RUNS[directory])]:
        records = read_results(Path(run_dir) / directory)
        if records:
            return name, records
    return "PPO", []


def quarter_means(values: list[float]) -> tuple[float, float]:
    """The means of the first and the last quarter of ``values`` (at least one value each): a training curve's start
    and end."""
    quarter = max(1, len(values) // 4)
    return sum(values[:quarter]) / quarter, sum(values[-quarter:]) / quarter


def learning_lines(name: str, sft: Optional[dict[str, Any]], policy: Optional[dict[str, Any]]) -> list[str]:
    """Did the run learn? The paired RM-score gain of ``policy`` over ``sft`` on the same validation prompts (per-prompt
    ``validation_scores``, same sampling seeds) with its bootstrap 95% interval, and the training reward's
    last-quarter minus first-quarter mean (``training_rewards``); nothing without both records."""
    from lit_rlhf.metrics import mean_with_interval

    before, after = (record.get("validation_scores") if record else None for record in (sft, policy))
    if not before or not after or len(before) != len(after):
        return []
    gain = mean_with_interval([b - a for a, b in zip(before, after)])
    verdict = "above 0: the policy learnt" if gain["low"] > 0 else "below 0: worse than SFT" if gain["high"] < 0 else \
        "includes 0: no measurable change"
    lines = ["", f"{name} vs SFT on the same {len(before)} validation prompts: paired RM-score gain "
             f"{gain['mean']:+.3f} (95% CI {gain['low']:+.3f} to {gain['high']:+.3f}), {verdict}"]
    curve = policy.get("training_rewards") or []
    if curve:
        first, last = quarter_means(curve)
        lines.append(f"  training reward (mean over each update's rollouts) over {len(curve)} updates: first quarter {first:.3f}, "
                     f"last quarter {last:.3f}, difference {last - first:+.3f}")
    return lines


def summary(run_dir: Path, num_samples: int = 3, policy_gradient: Optional[str] = None) -> str:
    """Build the summary text of a quickstart run directory (``{sft,rm,reinforce_pp}/results.jsonl``, ``timings.json``;
    with ``make quickstart-dpo`` also ``dpo``, ``dpo_eval`` and ``online_dpo``). ``policy_gradient`` names the
    policy-gradient run's directory (default: the first of :data:`POLICY_GRADIENT_RUNS` present)."""
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

    pg_name, pg_records = policy_gradient_run(run_dir, policy_gradient)
    sft_policy, pg_policy = _first(pg_records, "validate"), _last(pg_records, "fit")
    policies = [("SFT", sft_policy), (pg_name, pg_policy)]
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
    lines += learning_lines(pg_name, sft_policy, pg_policy)

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
        lines += _timings(meta)
    lines.append("\nTensorBoard: tensorboard --logdir " + str(run_dir / "tensorboard"))
    return "\n".join(lines)


def _rate(figures: Optional[dict[str, float]], invert: bool = False) -> str:
    """``mean (low-high)`` of a win rate with its interval; ``invert``: the other side's (1 - rate)."""
    if not figures or figures.get("n", 0) == 0:
        return "n/a"
    mean, low, high = figures["mean"], figures["low"], figures["high"]
    if invert:
        mean, low, high = 1 - mean, 1 - high, 1 - low
    return f"{mean:.3f} ({low:.3f}-{high:.3f})"


def _timings(meta: dict[str, Any]) -> list[str]:
    lines = ["\nWall time per step (s)"]
    stages = meta.get("stages", {})
    width = max([16, *(len(name) + 2 for name in stages)])
    for name, seconds in stages.items():
        lines.append(f"  {name:<{width}}{seconds:8.1f}")
    return lines + [f"  {'total':<{width}}{sum(stages.values()):8.1f}"]


def _paired_gain(eval_dir: Path, base: str, name: str) -> str:
    """``+mean (low to high)``: the mean per-prompt RM score difference of policy ``name`` over ``base`` on the same
    prompts (``eval``'s ``items-*.jsonl``), with its bootstrap 95% interval; ``n/a`` without both files."""
    from lit_rlhf.metrics import mean_with_interval

    paths = [eval_dir / f"items-{policy}.jsonl" for policy in (base, name)]
    if not all(path.is_file() for path in paths):
        return "n/a"
    base_items, items = ([json.loads(line) for line in path.read_text().splitlines() if line.strip()] for path in paths)
    gain = mean_with_interval([b["score"] - a["score"] for a, b in zip(base_items, items)])
    return f"{gain['mean']:+.3f} ({gain['low']:+.3f} to {gain['high']:+.3f})"


def chat_summary(run_dir: Path) -> str:
    """The chat quickstart's summary (``make quickstart-chat``): the reward model's accuracy per source with its interval
    beside the "longer answer wins" baseline, the online-DPO iterations on their training prompts
    (``online_dpo/iterations/*.jsonl``), and every policy on the evaluation prompts (``eval/results.json``): mean RM
    score, KL to SFT, mean length, and the RM judge's win rate against the reference answers (plain and
    length-controlled) and against the SFT policy, with 95% intervals."""
    run_dir = Path(run_dir)
    lines = ["", "=" * 100, "lit_rlhf chat quickstart summary".center(100), "=" * 100]
    meta_path = run_dir / "timings.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("precision"):
        lines.append(f"precision: {meta['precision']}")
    sft = _last(read_results(run_dir / "sft"), "fit")
    if sft:
        lines.append(f"\nSFT: validation loss {_fmt(_metric(sft, 'val/loss'))} (assistant tokens only), "
                     f"ROUGE-1 {_fmt(_metric(sft, 'val/rouge1_fmeasure'))}")

    rm = _last(read_results(run_dir / "rm"), "fit")
    lines.append("\nReward model: validation accuracy per source (95% CI), beside the longer-answer-wins baseline")
    lines.append(f"  {'source':<24}{'accuracy':>32}{'longer wins':>16}")
    lines.append(f"  {'all':<24}{_fmt(_metric(rm, 'val/accuracy')) + _interval(rm, 'val/accuracy'):>32}"
                 f"{_fmt(_metric(rm, 'val/longer_wins')):>16}")
    if rm:
        sources = sorted({key.split("/", 2)[2] for key in rm["metrics"] if key.startswith("val/accuracy_source/")
                          and not key.endswith(("_low", "_high"))})
        for source in sources:
            key = f"val/accuracy_source/{source}"
            lines.append(f"  {source:<24}{_fmt(_metric(rm, key)) + _interval(rm, key):>32}"
                         f"{_fmt(_metric(rm, f'val/longer_wins_source/{source}')):>16}")

    iterations = sorted((run_dir / "online_dpo" / "iterations").glob("iteration-*.jsonl"), key=lambda p: int(p.stem.split("-")[1]))
    if iterations:
        lines.append("\nOnline iterative DPO: each iteration's samples on its training prompts (before its update)")
        lines.append(f"  {'iteration':<12}{'mean RM score':>15}{'KL to SFT':>12}{'chars':>8}{'pairs':>8}")
        for path in iterations:
            samples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            mean = lambda key: sum(s[key] for s in samples) / len(samples)  # noqa: E731
            pairs = sum(s["chosen"] for s in samples)
            lines.append(f"  {path.stem.split('-')[1]:<12}{mean('score'):>15.3f}{mean('kl'):>12.2f}{mean('chars'):>8.0f}{pairs:>8}")

    results_path = run_dir / "eval" / "results.json"
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        policies = results["policies"]
        base = next(iter(policies))
        lines.append(f"\nPolicies on the {results['samples']} evaluation prompts (temperature {results['temperature']}; RM judge; "
                     "95% CI; LC: length-controlled, AlpacaEval 2)")
        lines.append(f"  {'policy':<10}{'RM score':>10}{'gain over ' + base + ' (paired)':>34}{'KL':>7}{'chars':>7}   "
                     f"{'win rate vs reference':<24}{'LC win rate vs reference':<26}{'win rate vs ' + base:<24}")
        for name, policy in policies.items():
            rm_judge = policy["judges"].get("rm", {})
            pair = results.get("head_to_head", {}).get(f"{base} vs {name}", {}).get("rm")
            versus = "-" if name == base else _rate(pair["win_rate"], invert=True) if pair else "n/a"
            gain = "-" if name == base else _paired_gain(run_dir / "eval", base, name)
            lines.append(f"  {name:<10}{_fmt(policy.get('mean_score')):>10}{gain:>34}{_fmt(policy.get('mean_kl'), 2):>7}"
                         f"{policy.get('mean_chars', 0):>7.0f}   {_rate(rm_judge.get('win_rate')):<24}"
                         f"{_rate(rm_judge.get('lc_win_rate')):<26}{versus:<24}")
    if meta.get("stages"):
        lines += _timings(meta)
    lines.append("\nTensorBoard: tensorboard --logdir " + str(run_dir / "tensorboard"))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m lit_rlhf.evaluation.report [RUN_DIR]`` (``make report``): print the summary of a pipeline's run
    directory (default ``runs/quickstart``): the TL;DR summary, or the chat one when the run has an ``eval`` result."""
    argv = sys.argv[1:] if argv is None else argv
    run_dir = Path(argv[0] if argv else "runs/quickstart")
    chat = (run_dir / "eval" / "results.json").is_file() and not any((run_dir / name).is_dir() for name in POLICY_GRADIENT_RUNS)
    print(chat_summary(run_dir) if chat else summary(run_dir))


if __name__ == "__main__":
    main()
