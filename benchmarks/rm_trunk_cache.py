"""Wall time of the reward model's frozen trunk on real comparisons, with and without the trunk cache (issue 11).

    python benchmarks/rm_trunk_cache.py --model runs/quickstart/sft/model --pairs 96 --trainable_layers 2

Runs the frozen lower blocks (all but the top ``--trainable_layers``) over the first ``--pairs`` training
comparisons, in batches of ``--batch_size`` pairs (chosen and rejected together, as ``RewardModule.pair_scores``
does), under bf16 autocast, and prints one row per way of doing it:

- ``batched, no cache``: the padded batch in one forward — what every epoch and every validation costs without the
  cache;
- ``cache, rows alone``: each sequence alone and unpadded, kept (the first epoch with ``prefix_lengths`` unset);
- ``cache, query shared``: each pair as one sequence, its query once and then both summaries side by side under a
  block-causal mask (``FrozenTrunk.group_hidden``);
- ``cache, hits``: the same batches again (every later epoch).

The cache rows check their values against the batched forward (largest difference over real tokens, relative to the
largest hidden value; bf16). Nothing here is a test.
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

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lit_rlhf.data.datamodules import PreferenceDataModule  # noqa: E402
from lit_rlhf.host_memory import reuse_freed_memory  # noqa: E402
from lit_rlhf.models.scalar import ScalarModel  # noqa: E402
from lit_rlhf.models.trunk import FrozenTrunk, clear_trunk_caches  # noqa: E402
from lit_rlhf.stages.common import freeze_bottom_layers  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/quickstart/sft/model")
    parser.add_argument("--data", default="../shared/data/tldr/comparisons")
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--trainable_layers", type=int, default=2)
    args = parser.parse_args()
    reuse_freed_memory()  # as the lit-rlhf entry point does

    datamodule = PreferenceDataModule(args.data, tokenizer=args.model, query_length=192, response_length=169, max_length=361,
                                      batch_size=args.batch_size, train_samples=args.pairs, sft_path=None)
    datamodule.setup("fit")
    pad = datamodule._tokenizer().pad_token_id
    batches = []
    for batch in datamodule._loader(datamodule.splits["train"], args.batch_size):
        chosen, rejected = batch["chosen_ids"], batch["rejected_ids"]
        width = max(chosen.size(1), rejected.size(1))
        ids = torch.cat([F.pad(chosen, (0, width - chosen.size(1)), value=pad), F.pad(rejected, (0, width - rejected.size(1)), value=pad)])
        batches.append((ids, (batch["query_ids"] != pad).sum(1).repeat(2)))
    tokens = sum(int((ids != pad).sum()) for ids, _ in batches)
    model = freeze_bottom_layers(ScalarModel.from_backbone(args.model), args.trainable_layers).eval()
    print(f"{args.pairs} comparisons, {tokens} real tokens, trunk of {FrozenTrunk.shared_by(model).num_blocks} "
          f"blocks, {torch.get_num_threads()} threads, bf16 autocast\n")
    print("| trunk pass | wall time (s) | tokens/s | vs batched |\n|---|---|---|---|")

    def timed(trunk: FrozenTrunk, shared: bool) -> tuple[float, list[torch.Tensor]]:
        start, outputs = time.perf_counter(), []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for ids, queries in batches:
                outputs.append(trunk(ids, pad, prefix_lengths=queries if shared else None))
        return time.perf_counter() - start, outputs

    batched_seconds, reference = timed(FrozenTrunk.shared_by(model), False)
    rows = [("batched, no cache", batched_seconds, None)]
    for name, shared in (("cache, rows alone", False), ("cache, query shared", True)):
        clear_trunk_caches()
        trunk = FrozenTrunk.shared_by(model, cache=True)
        seconds, outputs = timed(trunk, shared)
        rows.append((name, seconds, outputs))
    rows.append(("cache, hits", timed(trunk, True)[0], None))
    for name, seconds, outputs in rows:
        gap = ""
        if outputs is not None:
            diff = max(float((out - ref)[ids != pad].abs().max() / ref[ids != pad].abs().max())
                       for out, ref, (ids, _) in zip(outputs, reference, batches))
            gap = f" (max diff to batched {diff:.1e} of max |h|)"
        print(f"| {name}{gap} | {seconds:.1f} | {tokens / seconds:.0f} | {batched_seconds / seconds:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
