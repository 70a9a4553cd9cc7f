"""PPO throughput and peak GPU memory of a Pythia-1B-shaped policy per strategy, on the GPUs of this machine.

    python benchmarks/ppo_gpu.py [--episodes 256] [--strategies deepspeed_stage_2 deepspeed_stage_3 fsdp2 ...]

Runs ``lit-rlhf ppo fit --config configs/tldr/pythia-1b/ppo.yaml`` (the N+ settings: 64 rollouts per device and
update, micro-batches of 16, 53 response tokens, bf16) on every GPU of the machine with the real TL;DR prompts, once
per strategy, and prints per process the peak GPU memory (``torch.cuda.max_memory_allocated``) and the training
throughput in episodes per second (checkpoint writes and validation left out), as
:class:`lit_rlhf.callbacks.ResourceUsage` records them.

The models are random-init with Pythia-1B's shape (GPT-NeoX, 16 blocks of width 2048) and SmolLM2's tokenizer: the
hub is out of reach there, and throughput and memory depend on the shapes, not on the weights. ``--shape tiny
--accelerator cpu --strategies auto`` checks the script itself on a CPU. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ppo_memory import fit_and_measure, report  # noqa: E402

#: GPT-NeoX shapes: Pythia-1B (https://huggingface.co/EleutherAI/pythia-1b config), and one for checking the script
SHAPES = {
    "pythia-1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 8, "intermediate_size": 8192},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128},
}
STRATEGIES = ["auto", "deepspeed_stage_2", "deepspeed_stage_3", "deepspeed_stage_2_offload_frozen", "fsdp2"]


def make_models(shape: str, out: Path) -> tuple[Path, Path]:
    """Random-init policy and reward model of ``shape`` in ``out`` (reused when present)."""
    import torch
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from lit_rlhf.models.loading import convert_default_model, load_tokenizer
    from lit_rlhf.models.scalar import ScalarModel

    policy, reward = out / f"{shape}-policy", out / f"{shape}-rm"
    if not (reward / "config.json").is_file():
        tokenizer = load_tokenizer(str(convert_default_model()))
        torch.manual_seed(0)
        config = GPTNeoXConfig(
            vocab_size=len(tokenizer), max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **SHAPES[shape],
        )
        AutoModelForCausalLM.from_config(config).save_pretrained(policy)
        tokenizer.save_pretrained(policy)
        ScalarModel.from_backbone(str(policy)).save_pretrained(reward)
        tokenizer.save_pretrained(reward)
    return policy, reward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=256, help="episodes per strategy (64 per device and update)")
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--shape", default="pythia-1b", choices=list(SHAPES))
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--devices", default="-1", help="Lightning's trainer.devices (-1: all)")
    parser.add_argument("--batch_size", type=int, default=64, help="rollouts per device and update (N+: 64)")
    parser.add_argument("--micro_batch_size", type=int, default=16, help="rows per PPO micro-batch (N+: 16)")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "tldr" / "sft")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_ppo_gpu")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"--data {args.data} is not a directory (the TL;DR SFT files)")
    policy, reward = make_models(args.shape, args.out)
    common = [
        "--model.policy", str(policy), "--model.reward_model", str(reward), "--data.path", str(args.data),
        "--data.batch_size", str(args.batch_size), "--model.micro_batch_size", str(args.micro_batch_size),
        "--trainer.accelerator", args.accelerator, "--trainer.devices", args.devices,
    ]
    records = []
    for strategy in args.strategies:
        records += fit_and_measure(
            strategy, ROOT / "configs" / "tldr" / "pythia-1b" / "ppo.yaml", [*common, "--trainer.strategy", strategy],
            None, args.out / strategy, args.episodes, args.precision, max(1, (os.cpu_count() or 2) // 8),
        )
    print(f"\nPPO, {args.shape}-shaped random-init policy/value/reference/reward, {args.episodes} episodes, {args.precision}\n")
    report(records, args.out, gpu=True)

if __name__ == "__main__":
    main()
