"""Peak host memory per rank of the FSDP2 PPO set-up (load and shard the four models), and FSDP2 all-gathers per PPO
update. Not a test: it prints figures.

    python benchmarks/fsdp2_loading_memory.py [--layers 16] [--dtype float32] [--workdir DIR]
    python benchmarks/fsdp2_loading_memory.py --all-gathers

**Memory.** Writes a random-init model of EleutherAI/pythia-1b's shape (GPTNeoX: hidden 2048, 16 layers, 8 heads,
vocabulary 50304, intermediate 8192; ``--layers`` fewer to fit a small machine) with ``save_pretrained`` as the
policy, and a scalar model on the same backbone as the reward model, then starts 2 CPU processes (``torchrun``, gloo)
that each run ``PPOModule.configure_model`` under a 2-rank data-parallel device mesh, as
:class:`lit_rlhf.strategies.FSDP2Strategy` does: policy, reference policy, value model and reward model loaded and
sharded. Each rank prints its resident memory after the imports, its peak (``ru_maxrss``) after the set-up, the bytes
of its parameter shards, and the target: its share of the four models' weights plus their largest tensor.

**All-gathers.** ``--all-gathers`` runs one PPO update of the tests' tiny model (``lit-rlhf ppo fit`` under
``--trainer.strategy fsdp2``, 2 processes) and counts the all-gather collectives each rank dispatches in it
(:class:`lit_rlhf.models.parallel.AllGathers`).

Run it on the code to measure: the figures depend on the machine only through the allocator.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_rlhf.models.parallel import AllGathers  # noqa: E402

#: EleutherAI/pythia-1b's config.json (the architecture fields)
PYTHIA_1B = dict(
    hidden_size=2048, num_hidden_layers=16, num_attention_heads=8, vocab_size=50304, intermediate_size=8192,
    max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True,
    tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, layer_norm_eps=1e-5,
)


def rss_mib() -> float:
    """Current resident memory of this process in MiB (``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_models(directory: Path, layers: int, dtype: str) -> tuple[Path, Path]:
    """A random-init Pythia-1B-shaped causal LM (SmolLM2's tokenizer, whose ids fit its vocabulary) and a scalar model
    on the same backbone, saved in ``dtype``; returns their directories (reused when present)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXConfig

    from lit_rlhf.models.loading import convert_default_model
    from lit_rlhf.models.scalar import ScalarModel, ScalarModelConfig

    policy, reward = directory / f"pythia-1b-shape-{layers}l-{dtype}", directory / f"pythia-1b-shape-{layers}l-{dtype}-rm"
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    if not (policy / "config.json").is_file():
        config = GPTNeoXConfig(**{**PYTHIA_1B, "num_hidden_layers": layers})
        AutoModelForCausalLM.from_config(config, dtype=torch_dtype).save_pretrained(policy)
        AutoTokenizer.from_pretrained(convert_default_model()).save_pretrained(policy)
    if not (reward / "config.json").is_file():
        base = GPTNeoXConfig(**{**PYTHIA_1B, "num_hidden_layers": layers})
        ScalarModel(ScalarModelConfig(base_config=base.to_dict(), hidden_size=base.hidden_size)).to(torch_dtype).save_pretrained(reward)
    return policy, reward


def worker(policy: str, reward: str) -> None:
    """One rank: ``PPOModule.configure_model`` under a data-parallel mesh over all ranks; prints this rank's figures."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lit_rlhf.models.parallel import local_tensor
    from lit_rlhf.stages.ppo import PPOModule

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
    module = PPOModule(policy=policy, reward_model=reward)
    module._device_mesh = mesh
    before = rss_mib()
    module.configure_model()
    peak, now = peak_rss_mib(), rss_mib()
    models = [module.policy, module.ref_policy, module.value_model, module.reward_model]
    local = sum(local_tensor(p).numel() * local_tensor(p).element_size() for m in models for p in m.parameters())
    full = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    largest = max(p.numel() * p.element_size() for m in models for p in m.parameters())
    dist.barrier()
    print(
        f"rank {rank}: RSS after imports {before:.0f} MiB, peak RSS after the set-up {peak:.0f} MiB (load: +{peak - before:.0f} MiB), "
        f"RSS now {now:.0f} MiB; parameter shards {local / 2**20:.0f} MiB of {full / 2**20:.0f} MiB in all; "
        f"target: imports + share {full / world / 2**20:.0f} MiB + largest tensor {largest / 2**20:.0f} MiB "
        f"= {before + (full / world + largest) / 2**20:.0f} MiB",
        flush=True,
    )
    dist.destroy_process_group()


def count_all_gathers(workdir: Path) -> None:
    """One PPO update (4 episodes per rank) of a tiny model under FSDP2 on 2 processes; each rank prints its FSDP2
    all-gathers during the update (``on_train_batch_start`` to ``on_train_batch_end``)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from stage_helpers import run_processes, stage_config
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from lit_rlhf.models.loading import convert_default_model
    from lit_rlhf.models.scalar import ScalarModel

    tiny, rm = workdir / "tiny-llama", workdir / "tiny-rm"
    torch.manual_seed(0)
    if not (tiny / "config.json").is_file():
        config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
        AutoModelForCausalLM.from_config(config).save_pretrained(tiny)
        AutoTokenizer.from_pretrained(convert_default_model()).save_pretrained(tiny)
    if not (rm / "config.json").is_file():
        ScalarModel.from_backbone(str(tiny)).save_pretrained(rm)
    model = {"policy": str(tiny), "reward_model": str(rm), "lr": 1e-3, "non_eos_penalty": False}
    config = stage_config("ppo", workdir / "run", model=model, data={"total_episodes": 8, "batch_size": 4})
    output = run_processes("ppo", config, "fsdp2", "--trainer.callbacks+=benchmarks.fsdp2_loading_memory.AllGatherCounter",
                           "--trainer.max_steps", "1")
    print("\n".join(line for line in output.splitlines() if "all-gathers" in line))


class AllGatherCounter(L.Callback):
    """Counts this rank's all-gather collectives during each training batch (one PPO update) and prints them."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._mode = AllGathers()
        self._mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._mode.__exit__(None, None, None)
        print(f"rank {trainer.global_rank} update {batch_idx}: {self._mode.count} all-gathers", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=PYTHIA_1B["num_hidden_layers"], help="decoder blocks (Pythia-1B: 16)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the saved weights")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the models (default: a temporary directory)")
    parser.add_argument("--all-gathers", action="store_true", help="count FSDP2 all-gathers in one PPO update instead")
    parser.add_argument("--worker", nargs=2, metavar=("POLICY", "REWARD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    with tempfile.TemporaryDirectory(prefix="fsdp2-loading-") as tmp:
        workdir = args.workdir or Path(tmp)
        if args.all_gathers:
            return count_all_gathers(workdir)
        policy, reward = write_models(workdir, args.layers, args.dtype)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(Path(__file__).resolve()), "--worker", str(policy), str(reward)]
        print(f"{args.layers}-layer Pythia-1B shape, {args.dtype} checkpoint; code under {ROOT}", flush=True)
        subprocess.run(command, cwd=ROOT, env=env, check=True)


if __name__ == "__main__":
    main()
