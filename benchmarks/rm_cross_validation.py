"""k-fold cross-validation of reward-model settings on the comparisons' *training* file (issue 11).

    python benchmarks/rm_cross_validation.py --model runs/quickstart/sft/model --folds 4 \\
        --lr 3e-5 1e-4 --epochs 1 2 --trainable_layers 2 4 [--output runs/rm_cv.json]

The training comparisons are split into ``--folds`` folds by post (every comparison of a post falls in one fold, as
the held-out comparisons of the issue were kept apart by post), and each setting of the grid (every combination of
``--lr``, ``--epochs``, ``--trainable_layers`` and ``--trunk_cache``) trains a reward model from ``--model`` on all
folds but one and scores the comparisons of that one, once per fold. The validation file is never read: choose the
setting here, then report its validation accuracy once (``make quickstart``).

Printed per setting: the accuracy over all held-out comparisons with its bootstrap 95% interval, each fold's
accuracy, and the wall time of training (the frozen-trunk cache is shared by every run of a process whose trunk is
the same, so the first run of each ``--trainable_layers`` pays for the trunk pass; ``--trunk_cache true false`` on
one fold measures the speed-up side by side). The "longer summary wins" baseline on the same folds comes first.
Nothing here is a test.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
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

from lit_rlhf.data.datamodules import PreferenceDataModule  # noqa: E402
from lit_rlhf.host_memory import reuse_freed_memory  # noqa: E402
from lit_rlhf.metrics import mean_with_interval  # noqa: E402
from lit_rlhf.stages.reward import RewardModule  # noqa: E402


def post_folds(data: Any, pad_token_id: int, num_folds: int, seed: int) -> list[list[int]]:
    """Row indices of each fold; rows with the same query (post) share a fold. Posts are shuffled with ``seed``
    and dealt to the folds in turn, largest groups first, so that fold sizes stay close."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, query in enumerate(data["query_ids"]):
        groups.setdefault(tuple(token for token in query if token != pad_token_id), []).append(index)
    posts = list(groups.values())
    random.Random(seed).shuffle(posts)
    posts.sort(key=len, reverse=True)
    folds: list[list[int]] = [[] for _ in range(num_folds)]
    for rows in posts:
        min(folds, key=len).extend(rows)
    return [sorted(fold) for fold in folds]


def length_baseline(data: Any, pad_token_id: int) -> list[float]:
    """Per comparison: 1 when the chosen summary has more tokens than the rejected one, 0.5 on a tie, else 0."""
    outcomes = []
    for chosen, rejected in zip(data["chosen_response_ids"], data["rejected_response_ids"]):
        a, b = (sum(token != pad_token_id for token in ids) for ids in (chosen, rejected))
        outcomes.append(1.0 if a > b else 0.5 if a == b else 0.0)
    return outcomes


def fit_and_score(args: argparse.Namespace, setting: dict[str, Any], train: Any, held_out: Any) -> tuple[list[float], float]:
    """Train a reward model with ``setting`` on ``train``; return the held-out outcomes (1 = chosen scored higher)
    and the training wall time (s)."""
    datamodule = PreferenceDataModule(
        args.data, tokenizer=args.model, query_length=args.query_length, response_length=args.response_length,
        max_length=args.max_length, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, sft_path=None,
        seed=args.seed,
    )
    datamodule.splits = {"train": train, "validation": held_out}
    L.seed_everything(args.seed, verbose=False)
    module = RewardModule(
        model=args.model, lr=setting["lr"], trainable_layers=setting["trainable_layers"], normalize=False,
        trunk_cache=setting["trunk_cache"],
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=args.precision, max_epochs=setting["epochs"], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    module.eval()
    outcomes: list[float] = []
    with torch.no_grad(), trainer.precision_plugin.forward_context():
        for batch in datamodule.val_dataloader():
            chosen, rejected = module.pair_scores(batch)
            outcomes += (chosen > rejected).float().tolist()
    return outcomes, seconds


def interval(outcomes: list[float]) -> str:
    stats = mean_with_interval(outcomes)
    return f"{stats['mean']:.3f} ({stats['low']:.3f}-{stats['high']:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/quickstart/sft/model", help="the SFT checkpoint the RM starts from")
    parser.add_argument("--data", default="../shared/data/tldr/comparisons", help="directory with train.jsonl")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--only_folds", type=int, nargs="*", help="run these folds only (0-based; default all)")
    parser.add_argument("--lr", type=float, nargs="+", default=[3e-5])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1])
    parser.add_argument("--trainable_layers", type=int, nargs="+", default=[8])
    parser.add_argument("--trunk_cache", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="+", default=[True])
    parser.add_argument("--train_samples", type=int, help="use the first N training comparisons only")
    parser.add_argument("--query_length", type=int, default=192)
    parser.add_argument("--response_length", type=int, default=169)
    parser.add_argument("--max_length", type=int, default=361)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--eval_batch_size", type=int, default=16)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    reuse_freed_memory()  # as the lit-rlhf entry point does

    datamodule = PreferenceDataModule(args.data, tokenizer=args.model, query_length=args.query_length,
                                      response_length=args.response_length, max_length=args.max_length, sft_path=None)
    data = datamodule.build("train", args.train_samples)
    pad = datamodule._tokenizer().pad_token_id
    folds = post_folds(data, pad, args.folds, args.seed)
    chosen_folds = range(args.folds) if args.only_folds is None else args.only_folds
    print(f"{len(data)} training comparisons, {args.folds} folds by post: {[len(fold) for fold in folds]} comparisons")

    baseline = length_baseline(data, pad)
    results: list[dict[str, Any]] = []
    held = [[baseline[i] for i in folds[k]] for k in chosen_folds]
    pooled = [x for fold in held for x in fold]
    print("| setting | held-out accuracy (95% interval) | per fold | training time (s) |\n|---|---|---|---|")
    print(f"| longer summary wins | {interval(pooled)} | {' / '.join(f'{sum(f) / len(f):.3f}' for f in held)} | |", flush=True)
    grid = itertools.product(args.trainable_layers, args.lr, args.epochs, args.trunk_cache)  # trunk depth outermost
    for layers, lr, epochs, cache in grid:
        setting = {"trainable_layers": layers, "lr": lr, "epochs": epochs, "trunk_cache": cache}
        outcomes, accuracies, seconds = [], [], []
        for k in chosen_folds:
            train = data.select([i for j, fold in enumerate(folds) if j != k for i in fold])
            fold_outcomes, fold_seconds = fit_and_score(args, setting, train, data.select(folds[k]))
            outcomes += fold_outcomes
            accuracies.append(sum(fold_outcomes) / len(fold_outcomes))
            seconds.append(fold_seconds)
        name = f"top {layers} blocks, lr {lr:g}, {epochs} epoch{'s' if epochs > 1 else ''}" + ("" if cache else ", no trunk cache")
        per_fold, times = " / ".join(f"{a:.3f}" for a in accuracies), " / ".join(f"{s:.0f}" for s in seconds)
        print(f"| {name} | {interval(outcomes)} | {per_fold} | {times} |", flush=True)
        results.append({**setting, "accuracy": mean_with_interval(outcomes), "fold_accuracy": accuracies, "seconds": seconds})
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        summary = {"folds": [len(f) for f in folds], "length_baseline": mean_with_interval(pooled), "settings": results}
        args.output.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
