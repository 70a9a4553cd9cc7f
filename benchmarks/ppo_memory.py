"""PPO peak memory and throughput on the quickstart's SmolLM2 models, per way of fitting them in memory.

    python benchmarks/ppo_memory.py [--sft runs/quickstart/sft/model] [--rm runs/quickstart/rm/model] [--episodes 32]

Runs ``lit-rlhf ppo fit`` on the quickstart PPO config (real SFT and reward-model exports, real TL;DR prompts) for
``--episodes`` episodes in each variant, one after the other, and prints per process the peak resident memory and
the training throughput (episodes per second over the PPO updates; checkpoint writes and validation left out), as
:class:`lit_rlhf.callbacks.ResourceUsage` records them:

* ``full``: every weight of policy and value model trained (four full models in memory);
* ``trainable_layers=8``: the quickstart's setting, top 8 of 30 blocks trained, frozen trunk shared;
* ``lora``: LoRA r=16 on policy and value model (``configs/quickstart/ppo_lora.yaml``): two models in memory;
* ``fsdp2 x2``: the quickstart setting sharded with FSDP2 over 2 processes (1 thread each), figures per rank.

Nothing here is a test: the figures depend on the machine (the CPU's bf16 support decides the precision).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_rlhf.pipeline import cpu_precision  # noqa: E402

VARIANTS = {
    "full": ("ppo.yaml", ["--model.trainable_layers", "null"], 1),
    "trainable_layers=8": ("ppo.yaml", [], 1),
    "lora": ("ppo_lora.yaml", [], 1),
    "fsdp2 x2": ("ppo.yaml", ["--trainer.devices", "2", "--trainer.strategy", "fsdp2"], 2),
}


def fit_and_measure(name: str, config: Path, extra: list[str], processes: Optional[int], root: Path, episodes: int, precision: str,
                    threads: int) -> list[dict]:
    """``lit-rlhf ppo fit --config config *extra`` for ``episodes`` episodes in ``root`` (emptied first), without
    validation, logger or the checkpoints it wrote; returns :class:`lit_rlhf.callbacks.ResourceUsage`'s record of
    each process, with ``variant``, ``processes`` (``None``: the world size) and ``wall_seconds``
    added. Exits with the run's stderr if it fails."""
    shutil.rmtree(root, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(threads)}
    command = [
        sys.executable, "-m", "lit_rlhf.cli", "ppo", "fit", "--config", str(config), "--data.total_episodes", str(episodes),
        "--trainer.precision", precision, "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
        "--trainer.callbacks+=lit_rlhf.callbacks.ResourceUsage", *extra,
    ]
    start = time.time()
    process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if process.returncode != 0:
        raise SystemExit(f"{name} failed:\n{process.stderr[-4000:]}")
    records = [json.loads(path.read_text()) for path in sorted(root.glob("resources-rank*.json"))]
    for record in records:
        record.update(variant=name, processes=processes or record["world_size"], wall_seconds=time.time() - start)
    shutil.rmtree(root / "checkpoints", ignore_errors=True)  # ~1.5 GB per update at 135M
    return records


def report(records: list[dict], out: Path, gpu: bool) -> None:
    """Print one markdown row per process (peak GPU memory too when ``gpu``) and write ``out/results.json``."""
    gpu_header, gpu_rule = ("peak GPU (MiB) | ", "---|") if gpu else ("", "")
    print(f"| variant | processes | rank | {gpu_header}peak RSS (MiB) | episodes/s | s per update | wall s |")
    print(f"|---|---|---|{gpu_rule}---|---|---|---|")
    for r in records:
        per_update = r["train_seconds"] / max(r["batches"], 1)
        gpu_cell = f"{r['peak_gpu_mb']:.0f} | " if gpu else ""
        print(f"| {r['variant']} | {r['processes']} | {r['rank']} | {gpu_cell}{r['peak_rss_mb']:.0f} | {r['rows_per_second']:.3f} | "
              f"{per_update:.1f} | {r['wall_seconds']:.0f} |")
    (out / "results.json").write_text(json.dumps(records, indent=1) + "\n")


def run(name: str, args: argparse.Namespace, out: Path) -> list[dict]:
    config, extra, processes = VARIANTS[name]
    models = ["--model.policy", str(args.sft), "--model.reward_model", str(args.rm)]
    return fit_and_measure(
        name, ROOT / "configs" / "quickstart" / config, models + extra, processes, out / name.replace(" ", "_").replace("=", ""),
        args.episodes, args.precision, max(1, (os.cpu_count() or 2) // processes),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", type=Path, default=ROOT / "runs" / "quickstart" / "sft" / "model")
    parser.add_argument("--rm", type=Path, default=ROOT / "runs" / "quickstart" / "rm" / "model")
    parser.add_argument("--episodes", type=int, default=32, help="episodes per variant (16 per update)")
    parser.add_argument("--precision", default=cpu_precision())
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_ppo_memory")
    args = parser.parse_args()
    for path in (args.sft, args.rm):
        if not (path / "config.json").is_file():
            raise SystemExit(f"{path} is not a finished export: run `make quickstart` first (or pass --sft/--rm)")
    records = [record for name in args.variants for record in run(name, args, args.out)]
    print(f"\nPPO on SmolLM2-135M (quickstart SFT + RM), {args.episodes} episodes, {args.precision}, {os.cpu_count()} cores\n")
    report(records, args.out, gpu=False)

if __name__ == "__main__":
    main()
