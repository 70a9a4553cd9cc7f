"""Run by ``torchrun`` from ``tests/test_deepspeed.py``: lit_rlhf's DeepSpeed helpers on a raw ZeRO-2/3 engine (CPU,
gloo), checked against the same tiny model trained by plain PyTorch in every process.

Usage: ``python -m torch.distributed.run --nproc_per_node 2 tests/deepspeed_worker.py MODEL_DIR STAGE``.
Stage 2 also checks a frozen model under its own ZeRO-3 CPU-offload engine (``offload_to_cpu_engine``).
Prints ``DEEPSPEED-CHECKS-PASSED stage=S`` at the end; any mismatch raises.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch
from torch import nn


class Root(nn.Module):
    """What Lightning hands ``deepspeed.initialize``: one module holding the trained model."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1].float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


def check_frozen_offload(model_dir, offload_to_cpu_engine, is_sharded, full_state_dict, rank) -> None:
    """A frozen model under its own ZeRO-3 CPU-offload engine (next to a ZeRO-2 training engine, as
    ``deepspeed_stage_2_offload_frozen`` builds it): partitioned, called as before, the same logits."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    frozen = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).requires_grad_(False)
    engine = offload_to_cpu_engine(frozen, bf16=False)
    assert is_sharded(frozen) and not frozen.training
    ids = torch.randint(3, 1000, (2, 7))
    torch.distributed.broadcast(ids, 0)
    with torch.no_grad():
        got, want = frozen(input_ids=ids).logits, plain(input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-5, (got - want).abs().max()
    full = full_state_dict(frozen)
    if rank == 0:
        assert torch.equal(full["model.embed_tokens.weight"], plain.state_dict()["model.embed_tokens.weight"])
    trainable = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    try:
        offload_to_cpu_engine(trainable, bf16=False)
    except ValueError as error:
        assert "trainable parameters" in str(error)
    else:
        raise AssertionError("offload_to_cpu_engine accepted a model with trainable parameters")
    del engine


def main(model_dir: str, stage: int) -> None:
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from lit_rlhf.models.forward import generate
    from lit_rlhf.models.parallel import (
        accumulation_boundary,
        engine_gradient_norm,
        full_state_dict,
        gathered_for_generation,
        is_sharded,
        offload_to_cpu_engine,
        register_zero3_engine,
    )

    # DeepSpeed's shared-memory allreduce is a CPU-only op compiled on first use (~30 s on 2 cores, every CI run);
    # gloo's allreduce does the same job here, and none of the checks below is about it
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    config = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
        "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
    }
    hf_config = HfDeepSpeedConfig(config)  # noqa: F841 - from_pretrained partitions while loading under ZeRO-3
    sharded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    del hf_config
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert is_sharded(sharded) == (stage == 3)

    engine, *_ = deepspeed.initialize(
        model=Root(sharded), optimizer=torch.optim.SGD(sharded.parameters(), lr=1.0), config=config,
    )
    if stage == 3:
        register_zero3_engine(engine)
        offload = engine.optimizer.parameter_offload
        hooks = len(offload.forward_hooks)
        assert hooks > 0
        full = full_state_dict(sharded)
        expected = plain.state_dict()
        if rank == 0:
            assert set(full) <= set(expected) and "model.embed_tokens.weight" in full, sorted(set(full) ^ set(expected))
            assert max((full[k] - expected[k]).abs().max().item() for k in full) == 0.0
        else:
            assert full == {}

    # generation: the same samples as the unsharded model, the hooks back afterwards
    queries = torch.randint(3, 1000, (2, 6))
    torch.distributed.broadcast(queries, 0)
    torch.manual_seed(1)
    got = generate(sharded, queries, pad_token_id=0, eos_token_id=2, max_new_tokens=5, temperature=1.0)
    torch.manual_seed(1)
    want = generate(plain, queries, pad_token_id=0, eos_token_id=2, max_new_tokens=5, temperature=1.0)
    assert torch.equal(got, want), (got, want)
    if stage == 3:
        assert len(offload.forward_hooks) == hooks, "ZeRO-3 hooks not restored after generation"
        with gathered_for_generation(sharded):
            assert len(offload.forward_hooks) == 0

    # two micro-batches accumulated then one step == one step on the mean loss of all processes' rows; the engine's own
    # forward is never called, as in a Lightning training_step after its first forward
    torch.manual_seed(2)
    ids = torch.randint(3, 1000, (world, 4, 8))  # every process draws all rows; rank r trains on ids[r]
    micro = ids[rank].split(2)
    strategy = SimpleNamespace(model=engine)
    for index, rows in enumerate(micro):
        accumulation_boundary(strategy, index == len(micro) - 1)
        engine.backward(loss_of(sharded, rows) / len(micro))
    engine.step()
    reference_optimizer = torch.optim.SGD(plain.parameters(), lr=1.0)  # linear in the gradient
    torch.stack([loss_of(plain, ids[r]) for r in range(world)]).mean().backward()
    # the non-finite guard's view of the gradient, p.grad being freed: the engine's global norm of the step
    want_norm = torch.nn.utils.get_total_norm([p.grad for p in plain.parameters()])
    got_norm = engine_gradient_norm(engine)
    assert got_norm is not None and abs(got_norm - want_norm) <= 1e-4 * want_norm, (got_norm, want_norm)
    reference_optimizer.step()
    trained = full_state_dict(sharded) if stage == 3 else sharded.state_dict()
    if rank == 0:
        expected = plain.state_dict()
        difference = max((trained[k] - expected[k]).abs().max().item() for k in trained)
        assert difference < 1e-5, f"ZeRO-{stage} accumulated step differs from the plain step by {difference}"
    # a NaN loss: (fp32) DeepSpeed skips the step as an overflow, and the norm says so
    accumulation_boundary(strategy, True)
    engine.backward(loss_of(sharded, micro[0]) * float("nan"))
    engine.step()
    assert not torch.isfinite(engine_gradient_norm(engine)), engine_gradient_norm(engine)
    if stage == 2:
        check_frozen_offload(model_dir, offload_to_cpu_engine, is_sharded, full_state_dict, rank)
    torch.distributed.barrier()
    print(f"DEEPSPEED-CHECKS-PASSED stage={stage} rank={rank}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
