"""Sharded models: FSDP2 per decoder block, parameters gathered once for generation, full state dicts for export.

A stage module applies :func:`shard_model` to its models in ``configure_model`` when Lightning's
``ModelParallelStrategy`` (or :class:`lit_rlhf.strategies.FSDP2Strategy`) gives it a device mesh. Everything here is
a no-op for unsharded models (one process, DDP), so the stages call these helpers unconditionally. DeepSpeed ZeRO-3
partitions parameters itself (through Lightning's ``DeepSpeedStrategy``); :func:`is_sharded` and
:func:`gathered_for_generation` recognise its parameters too.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import nn

try:  # FSDP2 (torch >= 2.6 exports it here)
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover - older torch
    from torch.distributed._composable.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard  # type: ignore
from torch.distributed.tensor import DTensor


def block_classes(model: nn.Module) -> set[str]:
    """Class names of the transformer blocks of ``model``: the ``_no_split_modules`` transformers declares on every
    pretrained model inside it (a causal LM, a :class:`~lit_rlhf.models.scalar.ScalarModel`, a peft model)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def shard_model(model: nn.Module, mesh: Any, mp_policy: Optional[MixedPrecisionPolicy] = None) -> nn.Module:
    """Apply FSDP2's ``fully_shard`` to every transformer block of ``model``, then to ``model`` itself.

    Each block is one communication unit (all-gathered before its forward, resharded after, gradients
    reduce-scattered after its backward); the root unit holds the rest (embeddings, final norm, heads). Frozen
    models shard the same way and never reduce a gradient. A peft (LoRA) model's root unit is the transformers model
    inside it, which its forward and ``generate`` both call.

    Args:
        model: a transformers model (or a wrapper around one).
        mesh: the data-parallel ``DeviceMesh`` (Lightning's ``device_mesh["data_parallel"]``).
        mp_policy: FSDP2 mixed precision (``None``: parameters and reductions in their own dtype).

    Returns:
        ``model``, sharded in place.

    Raises:
        ValueError: when ``model`` declares no transformer block (``_no_split_modules``) or none is found.
    """
    # a peft model's own forward and generate() both enter the transformers model inside it: that is the root unit
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(root, FSDPModule):
        return model
    names = block_classes(model)
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(f"cannot shard {type(model).__name__}: no transformer block found (its _no_split_modules: {sorted(names)})")
    kwargs = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(root, **kwargs)
    return model


def is_sharded(model: Any) -> bool:
    """Whether ``model``'s parameters are partitioned across processes (FSDP2 ``DTensor`` or DeepSpeed ZeRO-3)."""
    if not isinstance(model, nn.Module):
        return False
    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a ``DTensor``; any other tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@contextlib.contextmanager
def gathered_for_generation(model: nn.Module) -> Iterator[None]:
    """Hold ``model``'s full parameters for the duration of a ``generate()`` call, so that sampling T tokens costs
    one all-gather per block instead of T.

    FSDP2: every FSDP unit is unsharded once and kept unsharded after each forward, then resharded on exit.
    DeepSpeed ZeRO-3: the parameters are gathered with ``deepspeed.zero.GatheredParameters`` (the fix TRL applied
    to the same problem). Unsharded models: nothing.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    if units:
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(True, recurse=False)
        return
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield
        return
    yield


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded state dict of ``model`` on the CPU.

    Collective for a sharded model (every process must call it): process 0 receives the full tensors, the others an
    empty dict. An unsharded model returns its own ``state_dict()``. A tied parameter (an LM head sharing the input
    embedding) appears once, under its first name, as ``save_pretrained`` writes it.
    """
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            state.pop(name, None)
    return state


@torch.no_grad()
def copy_weights(target: nn.Module, source: nn.Module) -> None:
    """Copy ``source``'s parameters and buffers into ``target`` (same architecture), sharded or not on either side.

    Raises:
        ValueError: when the two models' state dicts hold different keys.
    """
    target_state, source_state = target.state_dict(), source.state_dict()
    if target_state.keys() != source_state.keys():
        raise ValueError(f"cannot copy {type(source).__name__} into {type(target).__name__}: different parameters")
    for key, value in target_state.items():
        incoming = source_state[key]
        if isinstance(value, DTensor) and isinstance(incoming, DTensor) and value.placements == incoming.placements:
            value.to_local().copy_(incoming.to_local())
            continue
        full = incoming.full_tensor() if isinstance(incoming, DTensor) else incoming
        if isinstance(value, DTensor):
            value.to_local().copy_(torch.distributed.tensor.distribute_tensor(full, value.device_mesh, value.placements).to_local())
        else:
            value.copy_(full)
