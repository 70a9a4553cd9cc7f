"""``lit-rlhf eval-rm``: a reward model on human comparisons, as N+ reports it (recipe R6, R8).

Accuracy (the chosen response scores higher) overall, per comparison ``batch`` (OpenAI's batches, or a row's own
``source`` column), per labeller confidence and per source (each set of a mixture; TL;DR / CNN/DM), each with a bootstrap
95% interval and beside it the "longer answer wins" baseline; calibration: the Bradley-Terry
probability ``sigmoid(r_chosen - r_rejected)`` binned against the labellers' choices, its expected calibration error
and a reliability diagram; optionally an LLM (or local LM) judge's verdicts on the same pairs, and how often the
reward model and the labellers agree with the judge.

Outputs under ``output_dir``: ``pairs.jsonl`` (scores, groups, judge answers), ``results.json``, ``summary.md``,
``calibration.png`` and TensorBoard scalars plus the diagram (``output_dir/tensorboard``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import lightning as L
import torch

from lit_rlhf.data.datamodules import PreferenceDataModule, Source
from lit_rlhf.evaluation.judges import ChatJudge, LogprobJudge
from lit_rlhf.evaluation.stats import preference_calibration
from lit_rlhf.metrics import mean_with_interval
from lit_rlhf.models.forward import sequence_scores
from lit_rlhf.models.loading import load_tokenizer
from lit_rlhf.models.scalar import ScalarModel
from lit_rlhf.sampling import decode_responses


class PairScorer(L.LightningModule):
    """Scores the chosen and rejected sequences of each comparison with a saved reward model.

    Args:
        reward_model: a saved :class:`~lit_rlhf.models.scalar.ScalarModel` directory.
        batch_names: the DataModule's ``batch_names`` (index -> comparison batch name).
        tokenizer: the tokenizer's directory (``None``: the reward model's).
    """

    def __init__(
        self, reward_model: str, batch_names: list[str], tokenizer: Optional[str] = None, source_names: Sequence[str] = ()
    ) -> None:
        super().__init__()
        self.tokenizer = load_tokenizer(tokenizer or reward_model)
        self.reward_model = ScalarModel.load(reward_model).eval()
        self.batch_names, self.source_names = batch_names, list(source_names)

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        tok = self.tokenizer
        pad = tok.pad_token_id
        chosen = sequence_scores(self.reward_model, batch["chosen_ids"], pad).float().tolist()
        rejected = sequence_scores(self.reward_model, batch["rejected_ids"], pad).float().tolist()
        chosen_texts, rejected_texts = (decode_responses(tok, batch[key]) for key in ("chosen_response_ids", "rejected_response_ids"))
        lengths = [(batch[key] != tok.pad_token_id).sum(1).tolist() for key in ("chosen_response_ids", "rejected_response_ids")]
        return [
            {
                "prompt": batch["prompt_text"][row], "chosen": chosen_texts[row], "rejected": rejected_texts[row],
                "chosen_score": chosen[row], "rejected_score": rejected[row],
                "chosen_tokens": lengths[0][row], "rejected_tokens": lengths[1][row],
                "batch": self.batch_names[int(batch["batch"][row])], "confidence": int(batch["confidence"][row]),
                "source": self.source_names[int(batch["source"][row])],
            }
            for row in range(len(chosen))
        ]


def grouped_mean(pairs: list[dict[str, Any]], key: str, value: str) -> dict[str, dict[str, float]]:
    """The mean of ``pairs[i][value]`` with its interval per value of ``pairs[i][key]`` (sorted by that value)."""
    groups: dict[Any, list[float]] = {}
    for pair in pairs:
        groups.setdefault(pair[key], []).append(float(pair[value]))
    return {str(group): mean_with_interval(values) for group, values in sorted(groups.items())}


def grouped_accuracy(pairs: list[dict[str, Any]], key: str) -> dict[str, dict[str, float]]:
    """Accuracy with its interval per value of ``pairs[i][key]`` (sorted by value)."""
    return grouped_mean([{**pair, "correct": pair["chosen_score"] > pair["rejected_score"]} for pair in pairs], key, "correct")


def reliability_diagram(bins: list[dict[str, float]], ece: float, path: Path, title: str = "Reward model calibration"):
    """Save the reliability diagram (empirical frequency against predicted probability per bin, bar width the bin,
    the diagonal for perfect calibration, the item count per bin) as a PNG; returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
    axis.bar([b["low"] for b in bins], [b["accuracy"] for b in bins], width=[b["high"] - b["low"] for b in bins], align="edge",
             edgecolor="black", alpha=0.6, label="labellers' preference")
    axis.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", color="C1", linewidth=1)
    for b in bins:
        axis.annotate(str(b["n"]), (b["low"] + (b["high"] - b["low"]) / 2, b["accuracy"]), ha="center", va="bottom", fontsize=7)
    axis.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="predicted P(preferred) = sigmoid(r_a - r_b)", ylabel="empirical frequency",
             title=f"{title} (ECE {ece:.3f})")
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return figure


def evaluate_reward_model(
    reward_model: Optional[str] = None,
    tokenizer: Optional[str] = None,
    data: Optional[str] = "../shared/data/tldr/comparisons",
    sources: Optional[list[Source]] = None,
    format: str = "auto",
    system_prompt: Optional[str] = None,
    samples: Optional[int] = None,
    query_length: int = 512,
    response_length: int = 169,
    long_responses: str = "drop",
    batch_size: int = 16,
    num_bins: int = 10,
    judge: Optional[Union[ChatJudge, LogprobJudge]] = None,
    judge_samples: Optional[int] = None,
    output_dir: str = "runs/eval_rm",
    accelerator: str = "auto",
    precision: str = "32-true",
) -> dict[str, Any]:
    """Score every validation comparison of ``data`` with ``reward_model`` and report accuracy and calibration.

    Args:
        reward_model: a saved reward model directory (e.g. ``runs/quickstart/rm/model``).
        tokenizer: the tokenizer's directory (``None``: the reward model's, where the stage export saves it).
        data: directory (or hub name) of the comparisons, in any preference format; its ``validation`` split is scored.
        sources: several sets instead of ``data`` (:class:`~lit_rlhf.data.datamodules.Source`), reported per source.
        format, system_prompt, long_responses: as the :class:`~lit_rlhf.data.datamodules.PreferenceDataModule`'s.
        samples: the first N comparisons of each source (``None``: all).
        query_length, response_length: prompt and response budgets (the TL;DR quickstart uses 192 and 169).
        batch_size: comparisons per forward pass.
        num_bins: calibration bins over [0, 1].
        judge: an LLM or local-LM judge of the same pairs (``--judge.class_path ...ChatJudge --judge.init_args...``).
        judge_samples: the judge sees only the first N pairs; ``None``: all.
        output_dir: where the outputs go.
        accelerator, precision: Lightning's, for the scoring.

    Returns:
        the content of ``results.json``: ``accuracy`` (``mean``, ``low``, ``high``, ``n``), ``by_batch``,
        ``by_confidence``, ``by_source`` (each source of a mixture; CNN/DM articles as ``{source}/cnndm``),
        ``longer_wins`` and ``longer_wins_by_source`` (the "longer answer wins" baseline: 1 where the chosen response
        has more tokens, 0.5 for equal lengths), ``calibration`` (``ece``, ``bins``), and with a judge ``judge``
        (judge-labeller and RM-judge agreement, each with an interval).

    Raises:
        ValueError: without ``reward_model``.
        FileNotFoundError: when ``reward_model`` is not a saved reward model directory.
    """
    if reward_model is None:
        raise ValueError("eval-rm needs --reward_model DIR")
    if not (Path(reward_model) / "config.json").is_file():
        raise FileNotFoundError(f"eval-rm: {reward_model} is not a saved reward model (no config.json)")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    datamodule = PreferenceDataModule(
        path=None if sources else data, sources=sources, format=format, system_prompt=system_prompt,
        tokenizer=tokenizer or reward_model, query_length=query_length, response_length=response_length,
        max_length=query_length + response_length, long_responses=long_responses, eval_batch_size=batch_size,
        val_samples=samples, sft_path=None,
    )
    datamodule.setup("validate")
    scorer = PairScorer(reward_model, datamodule.batch_names, tokenizer, datamodule.source_names)
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, logger=False, enable_checkpointing=False)
    pairs = [row for batch in trainer.predict(scorer, dataloaders=datamodule.val_dataloader()) for row in batch]

    correct = [float(p["chosen_score"] > p["rejected_score"]) for p in pairs]
    calibration = preference_calibration([p["chosen_score"] for p in pairs], [p["rejected_score"] for p in pairs], num_bins)
    results: dict[str, Any] = {
        "reward_model": reward_model, "accuracy": mean_with_interval(correct),
        "by_batch": grouped_accuracy(pairs, "batch"), "by_confidence": grouped_accuracy(pairs, "confidence"),
        "by_source": grouped_accuracy(pairs, "source"), "calibration": calibration,
    }
    for pair in pairs:
        chosen_tokens, rejected_tokens = pair["chosen_tokens"], pair["rejected_tokens"]
        pair["longer_wins"] = float(chosen_tokens > rejected_tokens) + 0.5 * float(chosen_tokens == rejected_tokens)
    results["longer_wins"] = mean_with_interval([pair["longer_wins"] for pair in pairs])
    results["longer_wins_by_source"] = grouped_mean(pairs, "source", "longer_wins")
    if judge is not None:
        judged = pairs[:judge_samples]
        verdicts = judge.judge([p["prompt"] for p in judged], [p["chosen"] for p in judged], [p["rejected"] for p in judged],
                               task=datamodule.task)
        for pair, verdict in zip(judged, verdicts):
            pair["judge"] = verdict.to_dict()
        named = [(v.outcome, c) for v, c in zip(verdicts, correct) if v.answer is not None]
        results["judge"] = {
            "judge_agrees_with_labellers": mean_with_interval([outcome for outcome, _ in named]),
            "rm_agrees_with_judge": mean_with_interval([float(outcome == c) for outcome, c in named]),
            "unparsed": sum(v.answer is None for v in verdicts),
        }
    with (out / "pairs.jsonl").open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(pair) + "\n" for pair in pairs)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    (out / "summary.md").write_text(table)
    figure = reliability_diagram(calibration["bins"], calibration["ece"], out / "calibration.png")
    _log_tensorboard(results, table, figure, out / "tensorboard")
    print(table)
    return results


def _row(name: str, figures: dict[str, float]) -> str:
    return f"| {name} | {figures['mean']:.3f} | {figures['low']:.3f}-{figures['high']:.3f} | {figures['n']} |"


def markdown(results: dict[str, Any]) -> str:
    """The Markdown tables of :func:`evaluate_reward_model`'s results."""
    lines = ["Reward-model accuracy on the validation comparisons (95% bootstrap intervals)", "",
             "| group | accuracy | 95% interval | n |", "|---|---|---|---|", _row("all", results["accuracy"])]
    for title, key in (("batch", "by_batch"), ("confidence", "by_confidence"), ("source", "by_source")):
        lines += [_row(f"{title} {group}", figures) for group, figures in results[key].items()]
    lines += ["", "Baseline: the longer response wins (ties half)", "", "| group | accuracy | 95% interval | n |", "|---|---|---|---|",
              _row("all", results["longer_wins"])]
    lines += [_row(f"source {group}", figures) for group, figures in results["longer_wins_by_source"].items()]
    calibration = results["calibration"]
    lines += ["", f"Calibration (R8): ECE {calibration['ece']:.3f}", "", "| predicted P | mean predicted | empirical | n |",
              "|---|---|---|---|"]
    lines += [f"| {b['low']:.1f}-{b['high']:.1f} | {b['confidence']:.3f} | {b['accuracy']:.3f} | {b['n']} |" for b in calibration["bins"]]
    if "judge" in results:
        judge = results["judge"]
        lines += ["", f"Judge on the same pairs ({judge['unparsed']} answers named neither summary)", "",
                  "| agreement | rate | 95% interval | n |", "|---|---|---|---|",
                  _row("judge with the labellers", judge["judge_agrees_with_labellers"]),
                  _row("RM with the judge", judge["rm_agrees_with_judge"])]
    return "\n".join(lines) + "\n"


def _log_tensorboard(results: dict[str, Any], table: str, figure: Any, directory: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(save_dir=str(directory), name="", version="")
    metrics = {"rm_eval/accuracy": results["accuracy"]["mean"], "rm_eval/accuracy_low": results["accuracy"]["low"],
               "rm_eval/accuracy_high": results["accuracy"]["high"], "rm_eval/ece": results["calibration"]["ece"]}
    metrics["rm_eval/longer_wins"] = results["longer_wins"]["mean"]
    for key in ("by_batch", "by_confidence", "by_source", "longer_wins_by_source"):
        name = "longer_wins_source" if key == "longer_wins_by_source" else f"accuracy_{key[3:]}"
        metrics.update({f"rm_eval/{name}/{group}": figures["mean"] for group, figures in results[key].items()})
    logger.log_metrics(metrics, step=0)
    logger.experiment.add_text("rm_eval/summary", table, 0)
    logger.experiment.add_figure("rm_eval/calibration", figure, 0)
    logger.finalize("success")
