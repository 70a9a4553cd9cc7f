"""Chat throughput on the shared chat data (issue 25): reward-model training tokens/s and generation responses/s.

    python benchmarks/chat_throughput.py --model smollm2-135m --pairs 64 --prompts 32

Prints one row per measurement, in the precision the pipeline would pick on this processor (bf16-mixed where it has
native bf16, else 32-true; ``--precision`` overrides):

- ``rm fit, epoch 1`` / ``epoch 2``: :class:`~lit_rlhf.stages.reward.RewardModule` training on the first ``--pairs``
  pairs of each of ``hh-rlhf-harmless/`` and ``preferences/`` (the chat quickstart's mixture and shapes: longer
  answers keep their last 384 tokens), top ``--trainable_layers`` blocks trained; epoch 1 runs the frozen trunk (each
  pair's shared prompt once) and fills its cache, epoch 2 reads it back. Tokens are the real (non-pad) tokens of chosen + rejected.
- ``generate, batch N``: :func:`~lit_rlhf.models.forward.generate` on ``--prompts`` chat prompts of ``prompts/train``,
  up to ``--response_length`` new tokens at temperature 0.7, stopping at the template's end-of-turn token; responses/s
  and generated (real) tokens/s.

Nothing here is a test; the figures go in ``docs/chat.md`` with the command that produced them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lit_rlhf.algorithms import truncate_after_eos  # noqa: E402
from lit_rlhf.data.datamodules import PreferenceDataModule, PromptDataModule  # noqa: E402
from lit_rlhf.host_memory import reuse_freed_memory  # noqa: E402
from lit_rlhf.models.forward import generate  # noqa: E402
from lit_rlhf.models.loading import load_causal_lm, load_tokenizer, resolve_model_path, stop_token_ids  # noqa: E402
from lit_rlhf.pipeline import cpu_precision  # noqa: E402
from lit_rlhf.stages.reward import RewardModule  # noqa: E402

CHAT = ROOT.parent / "shared" / "data" / "chat"


class EpochTimer(L.Callback):
    """Wall time and real tokens of each training epoch."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id, self.epochs = pad_id, []

    def on_train_epoch_start(self, trainer, module) -> None:
        self.start, self.tokens = time.perf_counter(), 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.tokens += sum(int((batch[key] != self.pad_id).sum()) for key in ("chosen_ids", "rejected_ids"))

    def on_train_epoch_end(self, trainer, module) -> None:
        self.epochs.append((time.perf_counter() - self.start, self.tokens))


def reward_model_rows(args: argparse.Namespace, precision: str) -> list[str]:
    sources = [{"path": str(CHAT / name), "train_samples": args.pairs, "val_samples": 1} for name in ("hh-rlhf-harmless", "preferences")]
    datamodule = PreferenceDataModule(
        path=None, sources=sources, tokenizer=args.model, query_length=256, response_length=384, max_length=640,
        long_responses="keep_end", batch_size=8, sft_path=None,
    )
    module = RewardModule(model=args.model, lr=3e-4, trainable_layers=args.trainable_layers, normalize=False)
    timer = EpochTimer(load_tokenizer(args.model).pad_token_id)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=precision, max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )
    trainer.fit(module, datamodule=datamodule)
    pairs = len(datamodule.splits["train"])
    return [
        f"| rm fit, epoch {epoch} | {pairs} pairs, {tokens:,} tokens | {seconds:.1f} s | {tokens / seconds:,.0f} tokens/s |"
        for epoch, (seconds, tokens) in enumerate(timer.epochs, start=1)
    ]


def generation_rows(args: argparse.Namespace, precision: str) -> list[str]:
    tokenizer = load_tokenizer(args.model)
    datamodule = PromptDataModule(
        path=str(CHAT / "prompts"), tokenizer=args.model, query_length=256, reference_length=1024, batch_size=args.prompts,
        train_samples=args.prompts, val_samples=1,
    )
    datamodule.setup("fit")
    queries = next(iter(datamodule.train_dataloader()))["query_ids"]
    policy = load_causal_lm(args.model).eval()
    stops, pad = stop_token_ids(tokenizer), tokenizer.pad_token_id
    rows = []
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    for batch_size in args.batch_sizes:
        torch.manual_seed(0)
        start, responses = time.perf_counter(), []
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype == torch.bfloat16):
            for chunk in queries.split(batch_size):
                responses.append(truncate_after_eos(generate(policy, chunk, pad, stops, args.response_length, 0.7), stops, pad))
        seconds = time.perf_counter() - start
        tokens = sum(int((r != pad).sum()) for r in responses)
        rows.append(
            f"| generate, batch {batch_size} | {queries.size(0)} responses, {tokens:,} tokens | {seconds:.1f} s | "
            f"{queries.size(0) / seconds:.2f} responses/s, {tokens / seconds:,.0f} tokens/s |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pairs", type=int, default=64, help="training pairs per source")
    parser.add_argument("--trainable_layers", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--response_length", type=int, default=192)
    parser.add_argument("--precision", default=None)
    parser.add_argument("--only", choices=["rm", "generate"], default=None)
    args = parser.parse_args()
    reuse_freed_memory()
    args.model = resolve_model_path(args.model)
    precision = args.precision or cpu_precision()
    rows = []
    if args.only != "generate":
        rows += reward_model_rows(args, precision)
    if args.only != "rm":
        rows += generation_rows(args, precision)
    print(f"\n{args.model}, {precision}, {torch.get_num_threads()} threads\n")
    print("| measurement | work | wall time | throughput |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
