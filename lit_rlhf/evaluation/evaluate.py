"""``lit-rlhf eval``: sample each policy on the validation prompts and judge its summaries against the reference
summaries (and, with ``head_to_head``, against each other), as N+ reports its results.

For each policy a Lightning ``predict`` run (devices, precision and the progress bar are Lightning's) samples one
response per prompt with the seeds :class:`~lit_rlhf.stages.policy_eval.PolicyValidation` uses (so every policy
sees the same random numbers, and ``eval`` at the validation temperature reproduces ``ppo validate``'s figures),
and records per item the response, its length in tokens, the KL to ``ref_policy`` (sum over response tokens of the
temperature-scaled logprob difference, recipe P4) and the reward-model scores of response and reference (P3 EOS
rules). Judges:

* ``reward_model``: the response wins when it scores higher than the reference summary (a tie counts half);
* ``llm_judge``: :class:`~lit_rlhf.evaluation.judges.ChatJudge`, an LLM over an OpenAI-compatible endpoint;
* ``local_judge``: :class:`~lit_rlhf.evaluation.judges.LogprobJudge`, a local causal LM's A/B probabilities.

Outputs under ``output_dir``: ``items-{policy}.jsonl`` (prompt, responses, every judge's raw answer and order),
``results.json``, ``summary.md`` (win rates with bootstrap 95% intervals, by response length too) and TensorBoard
scalars (``output_dir/tensorboard``).
"""

from __future__ import annotations

import glob
import itertools
import json
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from lit_rlhf.data.datamodules import PromptDataModule, Source
from lit_rlhf.evaluation.judges import ChatJudge, LogprobJudge, Verdict
from lit_rlhf.evaluation.stats import LENGTH_EDGES, by_length, length_controlled_win_rate
from lit_rlhf.metrics import mean_with_interval, pairwise_outcomes
from lit_rlhf.models.loading import load_causal_lm, load_tokenizer
from lit_rlhf.models.scalar import ScalarModel
from lit_rlhf.sampling import RANK_SEED_STRIDE, decode_responses, sample_and_score, sample_kl, seeded


class PolicySampler(L.LightningModule):
    """Samples one response per prompt from ``policy`` and records what the judges and the report need.

    Args:
        policy: Hugging Face directory (or hub name) of the policy.
        tokenizer: the tokenizer's model (the DataModule's).
        reward_model: a saved :class:`~lit_rlhf.models.scalar.ScalarModel`, or ``None`` (no scores).
        ref_policy: the policy the KL is measured against (the SFT policy), or ``None`` (no KL).
        response_length, temperature, seed: sampling (temperature 0.01 is N+'s evaluation setting).
        truncate_after_eos, non_eos_penalty, penalty_reward_value, missing_eos_penalty: recipe P3 or TRL's
            subtracted penalty, as in validation.
        score_references: also score the batch's reference answers (``reference_score``). The responses are then scored
            in the same forward as the references (:func:`~lit_rlhf.sampling.shared_query_scores`), which
            rounds differently from scoring them alone: :func:`evaluate` asks it of every policy, so that two policies'
            identical responses get identical scores (a tie head to head).
    """

    def __init__(
        self,
        policy: str,
        tokenizer: str,
        reward_model: Optional[str] = None,
        ref_policy: Optional[str] = None,
        response_length: int = 53,
        temperature: float = 0.01,
        seed: int = 1,
        truncate_after_eos: bool = True,
        non_eos_penalty: bool = True,
        penalty_reward_value: float = -1.0,
        missing_eos_penalty: Optional[float] = None,
        score_references: bool = True,
    ) -> None:
        super().__init__()
        self.tokenizer = load_tokenizer(tokenizer)
        self.policy = load_causal_lm(policy).eval()
        self.reward_model = ScalarModel.load(reward_model).eval() if reward_model else None
        self.ref_policy = load_causal_lm(ref_policy).eval() if ref_policy else None
        self.response_length, self.temperature, self.seed = response_length, temperature, seed
        self.truncate, self.non_eos_penalty, self.penalty = truncate_after_eos, non_eos_penalty, penalty_reward_value
        self.missing_eos_penalty, self.score_references = missing_eos_penalty, score_references

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        tok, queries = self.tokenizer, batch["query_ids"]
        pad_id = tok.pad_token_id
        with seeded(self.seed + batch_idx + self.global_rank * RANK_SEED_STRIDE, queries.device):
            sample = sample_and_score(
                self.policy, self.reward_model, queries, tok, self.response_length, self.temperature,
                self.truncate, self.non_eos_penalty, self.penalty,
                batch["reference_ids"] if self.reward_model is not None and self.score_references else None, self.missing_eos_penalty,
            )
        items = {
            "response": decode_responses(tok, sample["responses"]),
            "response_tokens": sample["lengths"].tolist(),
            "contains_eos": sample["contains_eos"].tolist(),
        }
        if self.reward_model is not None:
            items["score"] = sample["scores"].float().tolist()
            if "reference_scores" in sample:  # NaN for a prompt without a reference answer
                items["reference_score"] = sample["reference_scores"].tolist()
        if self.ref_policy is not None:
            kl = sample_kl(self.policy, self.ref_policy, sample, queries.size(1), pad_id, self.temperature)
            items["kl"] = kl.float().tolist()
        prompts = batch["prompt_text"]
        return [
            {"prompt": prompt, "reference": reference, **{key: values[row] for key, values in items.items()}}
            for row, (prompt, reference) in enumerate(zip(prompts, batch["reference"]))
        ]


def default_name(path: str) -> str:
    """A policy's name in the tables: the run directory for a stage export (``ppo`` for ``runs/quickstart/ppo/model``),
    else the directory's own name (``update-00004``)."""
    return Path(path).parent.name if Path(path).name == "model" else Path(path).name


def reward_verdicts(scores: list[float], other_scores: list[float]) -> list[Verdict]:
    """The reward model as judge: ``a`` (``scores``) wins where it scores higher than ``b``; equal scores tie."""
    outcomes = pairwise_outcomes(torch.tensor(scores, dtype=torch.float64), torch.tensor(other_scores, dtype=torch.float64))
    answers = {1.0: "A", 0.0: "B", 0.5: None}
    return [Verdict(o, "ab", answers[o], json.dumps({"a": a, "b": b})) for o, a, b in zip(outcomes.tolist(), scores, other_scores)]


def judged(verdicts: list[Verdict], lengths: list[int], edges: tuple[int, ...], length_differences: list[float]) -> dict[str, Any]:
    """Win rate with its interval, the length-controlled win rate (AlpacaEval 2's, from the difference in characters
    between the two responses of each item, :func:`~lit_rlhf.evaluation.stats.length_controlled_win_rate`), the rate
    by response length, and how many answers named neither response."""
    outcomes = [v.outcome for v in verdicts]
    return {
        "win_rate": mean_with_interval(outcomes),
        "lc_win_rate": length_controlled_win_rate(outcomes, length_differences[: len(outcomes)]),
        "by_length": by_length(outcomes, lengths[: len(outcomes)], edges), "unparsed": sum(v.answer is None for v in verdicts),
    }


def _char_differences(rows: list[dict[str, Any]], other: list[str]) -> list[float]:
    return [float(len(row["response"]) - len(text)) for row, text in zip(rows, other)]


def evaluate(
    policies: Optional[list[str]] = None,
    exports: Optional[str] = None,
    names: Optional[list[str]] = None,
    reward_model: Optional[str] = None,
    ref_policy: Optional[str] = None,
    llm_judge: Optional[ChatJudge] = None,
    local_judge: Optional[LogprobJudge] = None,
    judge_samples: Optional[int] = None,
    head_to_head: bool = False,
    data: Optional[str] = "../shared/data/tldr/sft",
    sources: Optional[list[Source]] = None,
    format: str = "auto",
    system_prompt: Optional[str] = None,
    task: str = "auto",
    samples: int = 256,
    query_length: int = 512,
    response_length: int = 53,
    reference_length: Optional[int] = None,
    batch_size: int = 32,
    temperature: float = 0.01,
    seed: int = 1,
    non_eos_penalty: bool = True,
    penalty_reward_value: float = -1.0,
    missing_eos_penalty: Optional[float] = None,
    length_edges: list[int] = list(LENGTH_EDGES),
    output_dir: str = "runs/eval",
    accelerator: str = "auto",
    precision: str = "32-true",
) -> dict[str, Any]:
    """Sample every policy on the first ``samples`` validation prompts of ``data`` and judge the responses against the
    reference answers (where the prompts have them) and, with ``head_to_head``, against each other.

    Args:
        policies: Hugging Face directories of the policies (they share the first one's tokenizer).
        exports: a glob of more policy directories, appended in sorted order: the periodic exports of a run
            (``'runs/quickstart/ppo/updates/*'``, ``HFExport(every_n_updates=N)``; online DPO's ``epochs/*``). With
            ``ref_policy`` and two or more policies, ``overoptimisation.png`` plots each one's RM score and win rates
            against its KL to ``ref_policy``.
        names: a name per policy of ``policies`` for the tables (default: :func:`default_name`); the exports are
            named after their directories.
        reward_model: the reward model judge (and the scores); ``None``: no RM judge.
        ref_policy: the policy each one's KL is measured against (the SFT policy); ``None``: no KL.
        llm_judge: an LLM judge over an OpenAI-compatible endpoint (``--llm_judge.base_url ... --llm_judge.model ...``).
        local_judge: a local causal LM judge (``--local_judge.model smollm2-135m``).
        judge_samples: the text judges see only the first N items (they are slow); ``None``: all.
        head_to_head: also judge every pair of policies against each other.
        data: directory (or hub name) whose ``validation`` split holds the prompts and reference answers, in any format
            (TL;DR posts and summaries; TRL's prompt-only rows with a ``reference``, MT-Bench in the chat share; a
            conversation or preference set's prompts with their last or chosen answer).
        sources: several prompt sets instead of ``data`` (:class:`~lit_rlhf.data.datamodules.Source`).
        format, system_prompt: as the :class:`~lit_rlhf.data.datamodules.PromptDataModule`'s.
        task: the text judges' prompt: ``"summarization"`` (the TL;DR one), ``"chat"`` (a pairwise chat judge), or
            ``"auto"`` (summarization for TL;DR data, else chat).
        samples: prompts (the first N validation rows of each source whose reference fits its budget).
        query_length, response_length: prompt budget and most tokens sampled (the TL;DR quickstart uses 192 and 53).
        reference_length: the reference answers' budget (``None``: ``response_length``; chat references are longer).
        batch_size: prompts per sampling batch (the per-batch seeds depend on it, as in validation).
        temperature: sampling temperature (N+: 0.01).
        seed: the sampling seed (per batch: ``seed + batch index``) and the judges' order seed.
        non_eos_penalty: a response without EOS scores ``penalty_reward_value`` with the reward model (recipe P3: -1,
            as in validation).
        missing_eos_penalty: instead subtract this from such a response's RM score (TRL's; for a chat RM).
        length_edges: response-length bucket edges in tokens.
        output_dir: where the outputs go.
        accelerator, precision: Lightning's, for the sampling (on one device, so that the items stay whole and in order).

    Returns:
        the content of ``results.json``: per policy its mean length (tokens and characters) / score / KL and per judge
        ``win_rate`` and ``lc_win_rate`` (``mean``, ``low``, ``high``, ``n``), ``by_length`` and ``unparsed``;
        ``head_to_head`` per pair.

    Raises:
        ValueError: without a policy or a judge, or with ``names`` of the wrong length.
        FileNotFoundError: for a policy, reward-model or data path that does not exist.
    """
    policies = list(policies or [])
    names = list(names) if names else [default_name(p) for p in policies]
    if len(names) != len(policies):
        raise ValueError(f"names {names} must be one per policy ({len(policies)}); the exports are named after their directories")
    if exports:
        found = sorted(path for path in glob.glob(exports) if (Path(path) / "config.json").is_file())
        if not found:
            raise FileNotFoundError(f"eval: --exports {exports} matches no exported model directory")
        policies += found
        names += [default_name(p) for p in found]
    if not policies:
        raise ValueError("eval needs at least one policy: --policies DIR [--policies+ DIR ...] or --exports GLOB")
    if reward_model is None and llm_judge is None and local_judge is None:
        raise ValueError("eval needs a judge: reward_model, llm_judge or local_judge")
    if len(set(names)) != len(names):
        raise ValueError(f"names {names} must be unique")
    for path in [*policies, reward_model, ref_policy]:
        if path is not None and path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"eval: {path} does not exist")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    datamodule = PromptDataModule(
        path=None if sources else data, sources=sources, format=format, system_prompt=system_prompt, tokenizer=policies[0],
        query_length=query_length, response_length=response_length, max_length=query_length + response_length,
        reference_length=reference_length, batch_size=batch_size, eval_batch_size=batch_size, total_episodes=batch_size,
        val_samples=samples, seed=seed,
    )
    datamodule.setup("validate")
    task = datamodule.task if task == "auto" else task
    edges = tuple(length_edges)
    text_judges = {name: judge for name, judge in (("llm", llm_judge), ("local", local_judge)) if judge is not None}

    items: dict[str, list[dict[str, Any]]] = {}
    results: dict[str, Any] = {"samples": len(datamodule.splits["validation"]), "temperature": temperature, "policies": {}}
    for name, policy in zip(names, policies):
        sampler = PolicySampler(
            policy, policies[0], reward_model, ref_policy, response_length, temperature, seed, non_eos_penalty=non_eos_penalty,
            penalty_reward_value=penalty_reward_value, missing_eos_penalty=missing_eos_penalty, score_references=True,
        )  # every policy's responses scored alike; the references' scores are then taken from the first one
        trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, logger=False, enable_checkpointing=False)
        rows = [row for batch in trainer.predict(sampler, dataloaders=datamodule.val_dataloader()) for row in batch]
        if name != names[0] and "reference_score" in items[names[0]][0]:  # the same prompts and RM: the first's scores
            for row, first in zip(rows, items[names[0]]):
                row["reference_score"] = first["reference_score"]
        items[name] = rows
        lengths = [row["response_tokens"] for row in rows]
        summary: dict[str, Any] = {
            "mean_length": sum(lengths) / len(lengths), "mean_chars": sum(len(row["response"]) for row in rows) / len(rows),
            "judges": {},
        }
        for key in ("score", "kl"):
            if key in rows[0]:
                summary[f"mean_{key}"] = sum(row[key] for row in rows) / len(rows)
        verdicts: dict[str, list[Verdict]] = {}
        referenced = [row for row in rows if row["reference"]]  # the prompts with a reference answer
        if reward_model is not None and referenced:
            verdicts["rm"] = reward_verdicts([r["score"] for r in referenced], [r["reference_score"] for r in referenced])
        judged_rows = referenced[:judge_samples]
        for judge_name, judge in text_judges.items():
            verdicts[judge_name] = judge.judge(
                [r["prompt"] for r in judged_rows], [r["response"] for r in judged_rows], [r["reference"] for r in judged_rows],
                task=task,
            )
        for judge_name, judge_verdicts in verdicts.items():
            summary["judges"][judge_name] = judged(
                judge_verdicts, [r["response_tokens"] for r in referenced], edges,
                _char_differences(referenced, [r["reference"] for r in referenced]),
            )
            for row, verdict in zip(referenced, judge_verdicts):
                row.setdefault("judges", {})[judge_name] = verdict.to_dict()
        results["policies"][name] = summary
        with (out / f"items-{name}.jsonl").open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)

    if head_to_head:
        results["head_to_head"] = {}
        for a, b in itertools.combinations(names, 2):
            pair: dict[str, Any] = {}
            differences = _char_differences(items[a], [r["response"] for r in items[b]])
            if reward_model is not None:
                pair["rm"] = judged(reward_verdicts([r["score"] for r in items[a]], [r["score"] for r in items[b]]),
                                    [r["response_tokens"] for r in items[a]], edges, differences)
            for judge_name, judge in text_judges.items():
                rows_a, rows_b = items[a][:judge_samples], items[b][:judge_samples]
                pair[judge_name] = judged(
                    judge.judge([r["prompt"] for r in rows_a], [r["response"] for r in rows_a], [r["response"] for r in rows_b],
                                task=task),
                    [r["response_tokens"] for r in rows_a], edges, differences,
                )
            results["head_to_head"][f"{a} vs {b}"] = pair

    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    (out / "summary.md").write_text(table)
    figure = overoptimisation_plot(results, out / "overoptimisation.png") if ref_policy and len(names) > 1 else None
    log_tensorboard(results, table, out / "tensorboard", figure)
    print(table)
    return results


def overoptimisation_plot(results: dict[str, Any], path: Path):
    """Mean RM score (left axis) and each judge's win rate with its interval (right axis) of every policy against its
    KL to the reference policy (the over-optimisation curve of N+ and Gao et al. 2023), saved as a PNG; returns the
    figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = results["policies"]
    names = sorted(policies, key=lambda name: policies[name].get("mean_kl", 0.0))
    kl = [policies[name].get("mean_kl", 0.0) for name in names]
    figure, score_axis = plt.subplots(figsize=(6, 4), dpi=120)
    if all("mean_score" in policies[name] for name in names):
        score_axis.plot(kl, [policies[name]["mean_score"] for name in names], marker="o", color="C0", label="mean RM score")
        for x, name in zip(kl, names):
            score_axis.annotate(name, (x, policies[name]["mean_score"]), fontsize=6, xytext=(2, 2), textcoords="offset points")
    score_axis.set(xlabel="KL to the reference policy (nats, sum over response tokens)", ylabel="mean RM score")
    rate_axis = score_axis.twinx()
    judges = sorted({judge for name in names for judge in policies[name]["judges"]})
    for index, judge in enumerate(judges):
        points = [(x, policies[name]["judges"][judge]["win_rate"]) for x, name in zip(kl, names) if judge in policies[name]["judges"]]
        rate_axis.errorbar([x for x, _ in points], [r["mean"] for _, r in points],
                           yerr=[[r["mean"] - r["low"] for _, r in points], [r["high"] - r["mean"] for _, r in points]],
                           marker="s", linestyle="--", capsize=3, color=f"C{index + 1}", label=f"win rate ({judge} judge)")
    rate_axis.set(ylabel="win rate against the reference summaries", ylim=(0, 1))
    handles = [h for axis in (score_axis, rate_axis) for h in axis.get_legend_handles_labels()[0]]
    score_axis.legend(handles, [h.get_label() for h in handles], loc="lower left", fontsize=7)
    score_axis.set_title("Over-optimisation: reward and win rate against KL")
    figure.tight_layout()
    figure.savefig(path)
    return figure


def _interval(result: dict[str, float]) -> str:
    return f"{result['mean']:.3f} | {result['low']:.3f}-{result['high']:.3f} | {result['n']}"


def markdown(results: dict[str, Any]) -> str:
    """The Markdown tables of :func:`evaluate`'s results: win rates against the reference answers (with the
    length-controlled win rate, the mean length, RM score and KL), by response length, and head to head."""
    lines = [
        f"Win rate against the reference answers ({results['samples']} prompts, temperature {results['temperature']}; "
        "ties count half; 95% bootstrap intervals; LC: length-controlled, AlpacaEval 2)", "",
        "| policy | judge | win rate | 95% interval | n | LC win rate | LC 95% interval | mean length (tokens) | mean RM score | KL |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda value: "n/a" if value is None else f"{value:.3f}"  # noqa: E731
    for name, policy in results["policies"].items():
        for judge, figures in policy["judges"].items():
            lc = figures["lc_win_rate"]
            lines.append(f"| {name} | {judge} | {_interval(figures['win_rate'])} | {lc['mean']:.3f} | {lc['low']:.3f}-{lc['high']:.3f} | "
                         f"{policy['mean_length']:.1f} | {fmt(policy.get('mean_score'))} | {fmt(policy.get('mean_kl'))} |")
    lines += ["", "By response length", "", "| policy | judge | tokens | win rate | 95% interval | n |", "|---|---|---|---|---|---|"]
    for name, policy in results["policies"].items():
        for judge, figures in policy["judges"].items():
            lines += [f"| {name} | {judge} | {row['bucket']} | {_interval(row)} |" for row in figures["by_length"]]
    if results.get("head_to_head"):
        lines += ["", "Head to head (win rate of the first policy)", ""]
        lines += ["| pair | judge | win rate | 95% interval | n | LC win rate | LC 95% interval |", "|---|---|---|---|---|---|---|"]
        for pair, judges in results["head_to_head"].items():
            lines += [f"| {pair} | {judge} | {_interval(figures['win_rate'])} | {figures['lc_win_rate']['mean']:.3f} | "
                      f"{figures['lc_win_rate']['low']:.3f}-{figures['lc_win_rate']['high']:.3f} |" for judge, figures in judges.items()]
    return "\n".join(lines) + "\n"


def log_tensorboard(results: dict[str, Any], table: str, directory: Path, figure: Any = None) -> None:
    """``eval/{policy}/{judge}/win_rate`` and ``lc_win_rate`` (and ``_low``/``_high``), mean length / score / KL, the table as text and
    the over-optimisation ``figure`` when given."""
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(save_dir=str(directory), name="", version="")
    metrics = {}
    for name, policy in results["policies"].items():
        for key in ("mean_length", "mean_score", "mean_kl"):
            if key in policy:
                metrics[f"eval/{name}/{key}"] = policy[key]
        for judge, figures in policy["judges"].items():
            for key in ("win_rate", "lc_win_rate"):
                rate = figures[key]
                metrics.update({f"eval/{name}/{judge}/{key}": rate["mean"], f"eval/{name}/{judge}/{key}_low": rate["low"],
                                f"eval/{name}/{judge}/{key}_high": rate["high"]})
    logger.log_metrics(metrics, step=0)
    logger.experiment.add_text("eval/summary", table, 0)
    if figure is not None:
        logger.experiment.add_figure("eval/overoptimisation", figure, 0)
    logger.finalize("success")
