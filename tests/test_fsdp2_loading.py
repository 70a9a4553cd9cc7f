"""FSDP2 set-up on two CPU processes (gloo): the PPO models are built on the meta device, sharded, and each process reads
only its own shards from the checkpoints; a trained model's root FSDP unit keeps its parameters from forward to
backward, a frozen model's reshards after its forward.

One spawned pair of processes runs ``PPOModule.configure_model`` under a 2-rank data-parallel mesh, as
:class:`lit_rlhf.strategies.FSDP2Strategy` makes Lightning call it, and checks what each rank holds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from stage_helpers import free_port

pytestmark = [pytest.mark.distributed]


def _setup_worker(rank: int, port: int, policy: str, reward: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    import lit_rlhf.stages.common as common
    from lit_rlhf.models.loading import load_causal_lm
    from lit_rlhf.models.parallel import AllGathers, full_state_dict, gathered_for_generation
    from lit_rlhf.models.scalar import ScalarModel
    from lit_rlhf.stages.ppo import PPOModule

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
        materialised_before_sharding: dict[str, int] = {}
        shard_model = common.shard_model

        def recording_shard_model(model, *args, **kwargs):
            materialised_before_sharding[type(model).__name__ + str(len(materialised_before_sharding))] = sum(
                p.numel() * p.element_size() for p in model.parameters() if not p.is_meta
            )
            return shard_model(model, *args, **kwargs)

        common.shard_model = recording_shard_model
        module = PPOModule(policy=policy, reward_model=reward)
        module._device_mesh = mesh
        module.configure_model()
        common.shard_model = shard_model

        # no parameter of the four models had memory before sharding
        assert len(materialised_before_sharding) == 4 and not any(materialised_before_sharding.values()), materialised_before_sharding
        models = {"policy": module.policy, "ref_policy": module.ref_policy, "value_model": module.value_model,
                  "reward_model": module.reward_model}
        for name, model in models.items():
            assert not any(p.is_meta for p in model.parameters()), name
            assert all(isinstance(p, DTensor) for p in model.parameters()), name
            full = sum(p.numel() for p in model.parameters())
            local = sum(p.to_local().numel() for p in model.parameters())
            assert local <= full // 2 + 64, (name, local, full)  # this rank's half (chunks of odd rows: a row more)

        # the sharded weights are the checkpoint's; buffers (rotary frequencies) and config as from_pretrained gives them
        eager = {"policy": load_causal_lm(policy), "reward_model": ScalarModel.load(reward)}
        for name, model in models.items():
            state = full_state_dict(model)
            reference = eager["policy" if name.endswith("policy") else "reward_model"]
            for (buffer_name, buffer), (_, expected) in zip(model.named_buffers(), reference.named_buffers()):
                assert torch.equal(buffer, expected), (name, buffer_name)
            assert model.config.to_dict() == reference.config.to_dict(), name
            assert not model.training
            if rank == 0:
                checkpoint = load_file(Path(policy if name.endswith("policy") else reward) / "model.safetensors")
                assert state.keys() == checkpoint.keys(), name
                for key, value in checkpoint.items():
                    assert torch.equal(state[key], value.to(state[key].dtype)), (name, key)
        assert module.policy.generation_config.to_dict() == eager["policy"].generation_config.to_dict()

        # the root unit stays unsharded from forward to backward, also after a generation: one all-gather per block
        # in the forward and again in the backward, one for the root
        with gathered_for_generation(module.policy):
            pass
        ids = torch.tensor([[5, 6, 7, 8]])
        with AllGathers() as gathers:
            module.policy(input_ids=ids).logits.sum().backward()
        blocks = module.policy.config.num_hidden_layers
        assert gathers.count == 2 * blocks + 1, gathers.count
        # a frozen model has no backward: its root reshards after each forward, also after a generation
        for frozen in (module.ref_policy, module.reward_model):
            with gathered_for_generation(frozen):
                pass
            with torch.no_grad():
                frozen(input_ids=ids)
            assert all(isinstance(p, DTensor) for p in frozen.parameters()), type(frozen).__name__
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_fsdp2_ppo_models_load_on_meta_and_each_rank_reads_its_shards(tiny_model_dir, tiny_reward_dir):
    """Every rank builds policy, reference, value and reward model without parameter memory, reads only its half of each
    weight, and ends with the checkpoints' weights; a forward and backward after a generation all-gather each
    block twice and the root once."""
    # a failing rank raises here with its traceback
    mp.spawn(_setup_worker, args=(free_port(), str(tiny_model_dir), str(tiny_reward_dir)), nprocs=2)


# no process group here (under FSDP2 there is one): torch's checkpoint reader says it loads in a single process
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled, unavailable or uninitialized:UserWarning")
def test_an_unsharded_model_built_on_meta_loads_the_checkpoint_with_its_ties(tiny_model_dir, tiny_reward_dir):
    """A model left unsharded (FSDP2 with ``shard_frozen=False``) is materialised whole: the checkpoint's weights, the
    LM head still the input embedding (``to_empty`` unties them), the buffers ``from_pretrained`` computes."""
    from lit_rlhf.models.loading import load_causal_lm, weights_on_meta
    from lit_rlhf.models.parallel import materialize
    from lit_rlhf.models.scalar import ScalarModel

    for load, path in ((load_causal_lm, str(tiny_model_dir)), (ScalarModel.load, str(tiny_reward_dir))):
        with weights_on_meta():
            model = load(path)
        assert all(p.is_meta for p in model.parameters())
        materialize(model, "cpu")
        expected = load(path)
        state = model.state_dict()
        assert state.keys() == expected.state_dict().keys()
        for key, value in expected.state_dict().items():
            assert torch.equal(state[key], value), key
        for (name, buffer), (_, value) in zip(model.named_buffers(), expected.named_buffers()):
            assert torch.equal(buffer, value), name
        if load is load_causal_lm:  # the tiny model ties its LM head to the input embedding
            assert model.lm_head.weight is model.get_input_embeddings().weight
