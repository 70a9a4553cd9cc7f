"""Sharded models: FSDP2 per decoder block, parameters gathered once for generation, full state dicts for export.

A stage module applies :func:`shard_model` to its models in ``configure_model`` when Lightning's
``ModelParallelStrategy`` (or :class:`lit_rlhf.strategies.FSDP2Strategy`) gives it a device mesh. Everything here is
a no-op for unsharded models (one process, DDP), so the stages call these helpers unconditionally. DeepSpeed ZeRO-3
partitions parameters itself (through Lightning's ``DeepSpeedStrategy``); :func:`is_sharded`, :func:`local_tensor`,
:func:`gathered_for_generation` and :func:`full_state_dict` recognise its parameters too, and
:func:`accumulation_boundary` tells a DeepSpeed engine where a manual gradient accumulation ends.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

try:  # FSDP2 (torch >= 2.6 exports it here)
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover - older torch
    from torch.distributed._composable.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard  # type: ignore
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode


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
    # a trained model's root stays unsharded between its forward and backward (torch's recommendation: its parameters
    # would be all-gathered again at once for the backward) and reshards after the backward; a frozen model has no
    # backward to reshard it, so its root reshards after each forward (else its embeddings and heads stay whole)
    reshard_root = not any(p.requires_grad for p in model.parameters())
    fully_shard(root, reshard_after_forward=reshard_root, **kwargs)
    setattr(root, RESHARD_AFTER_FORWARD, reshard_root)
    return model


#: attribute :func:`shard_model` gives the root FSDP unit (embeddings, final norm, heads): its ``reshard_after_forward``
#: (``False`` for a trained model, ``True`` for a frozen one), restored after a generation; blocks reshard after forward
RESHARD_AFTER_FORWARD = "lit_rlhf_reshard_after_forward"


def materialize(model: nn.Module, device: Union[str, torch.device]) -> nn.Module:
    """Give the parameters that ``model`` holds on the ``meta`` device (built under
    :func:`lit_rlhf.models.loading.weights_on_meta`, then sharded or not) memory on ``device`` and read their values
    from the checkpoint: each process reads only its own shard of each weight (torch's
    ``HuggingFaceStorageReader`` reads safetensors slices), in the parameters' dtype. Parameters and buffers that were
    not on meta (computed buffers, a freshly drawn scalar head) keep their values. A no-op for a model not built
    on meta.

    Torch's FSDP2 recipe for models too large for one process: ``fully_shard`` on meta, ``to_empty``, load the
    state dict (https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html). Collective for a sharded model.

    Returns:
        ``model``, materialised in place.
    """
    from torch.distributed.checkpoint import HuggingFaceStorageReader, load

    from lit_rlhf.models.loading import CHECKPOINT_ATTRIBUTE

    record = getattr(model, CHECKPOINT_ATTRIBUTE, None)
    if record is None:
        return model
    directory, names = record
    kept = {
        name: local_tensor(tensor).detach().clone()
        for name, tensor in [*model.named_parameters(), *model.named_buffers()] if not tensor.is_meta
    }
    tied: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(parameter), []).append(name)
    model.to_empty(device=device)
    for first, *others in tied.values():  # to_empty gives each module of an unsharded model its own copy: tie again
        for other in others:
            owner, _, attribute = other.rpartition(".")
            if model.get_parameter(other) is not model.get_parameter(first):
                setattr(model.get_submodule(owner), attribute, model.get_parameter(first))
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    with torch.no_grad():
        for name, value in kept.items():
            local_tensor(tensors[name]).copy_(value)
    state = model.state_dict()
    load({names[key]: state[key] for key in names}, storage_reader=HuggingFaceStorageReader(str(directory)))
    delattr(model, CHECKPOINT_ATTRIBUTE)
    return model


class AllGathers(TorchDispatchMode):
    """Counts the all-gather collectives dispatched while it is active (``with AllGathers() as gathers: ...``, then
    ``gathers.count``): FSDP2 all-gathers each unit's parameters with one (``c10d::_allgather_base_``). For
    measurements and tests of communication; torch's ``CommDebugMode`` does more but its module tracking fails on
    transformers models under FSDP2."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        self.count += "allgather" in func.name()
        return func(*args, **(kwargs or {}))


def is_sharded(model: Any) -> bool:
    """Whether ``model``'s parameters are partitioned across processes (FSDP2 ``DTensor`` or DeepSpeed ZeRO-3)."""
    if not isinstance(model, nn.Module):
        return False
    return any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a ``DTensor`` or of a ZeRO-3 parameter (its ``ds_tensor``); any other tensor as it is."""
    if isinstance(tensor, DTensor):
        return tensor.to_local()
    return tensor.ds_tensor if hasattr(tensor, "ds_tensor") else tensor


_zero3_engine: Optional[weakref.ReferenceType] = None


def register_zero3_engine(engine: Any) -> None:
    """Remember this process's DeepSpeed engine (ZeRO-3) so that :func:`gathered_for_generation` can lift its
    parameter-fetching hooks while the parameters are held gathered; ``None`` forgets it. Lightning builds one engine
    per process (``trainer.strategy.model``); the stages register it at the start of fit and validation."""
    global _zero3_engine
    _zero3_engine = None if engine is None else weakref.ref(engine)


def deepspeed_engine(strategy: Any) -> Any:
    """The ``deepspeed.DeepSpeedEngine`` a Lightning ``DeepSpeedStrategy`` wraps the LightningModule in, or ``None``
    (another strategy, or before ``deepspeed.initialize`` ran)."""
    engine = getattr(strategy, "model", None)
    return engine if hasattr(engine, "set_gradient_accumulation_boundary") else None


def engine_gradient_norm(engine: Any) -> Optional[torch.Tensor]:
    """``()`` float32: the global gradient norm (over every rank and partition) of the optimiser step a DeepSpeed
    engine just took (``engine.get_global_grad_norm()``), or ``None`` without an engine, before its first step, when
    it computes no norm, or under fp16 dynamic loss scaling (an overflow there is a skipped step, not an error).

    DeepSpeed frees ``p.grad`` after its gradient reduction, so this is the gradient the non-finite guard can see under
    ZeRO. A non-finite gradient shows as a NaN norm (bf16) or as the ``inf`` of a skipped overflow step (fp32, fp16).
    """
    if engine is None or (getattr(engine, "fp16_enabled", lambda: False)() and getattr(engine, "dynamic_loss_scale", lambda: False)()):
        return None
    norm = engine.get_global_grad_norm()
    return None if norm is None else torch.as_tensor(norm, dtype=torch.float32).detach().reshape(())


def accumulation_boundary(strategy: Any, is_last: bool) -> None:
    """Before each micro-batch's forward of a manual gradient accumulation (several forward/backward pairs, then one
    ``optimizer.step()``, inside one ``training_step``): prepare a DeepSpeed engine for it. A no-op for every other
    strategy.

    Two things the engine otherwise does in its own ``forward``, which Lightning calls once per ``training_step``:
    ZeRO's per-micro-batch bookkeeping (``clear_backward_seen_flag``: without it ZeRO-3 *overwrites* the gradient
    partitions at every backward instead of accumulating, and the step sees the last micro-batch alone), and the
    accumulation boundary (``set_gradient_accumulation_boundary(is_last)``: reduce and step once, at the last
    micro-batch). Lightning sets DeepSpeed's ``gradient_accumulation_steps`` to 1 under manual optimisation; the
    callers divide their loss by the number of micro-batches themselves.
    """
    engine = deepspeed_engine(strategy)
    if engine is None:
        return
    optimizer = getattr(engine, "optimizer", None)
    if hasattr(optimizer, "clear_backward_seen_flag"):
        optimizer.clear_backward_seen_flag()
    engine.set_gradient_accumulation_boundary(is_last)


def offload_to_cpu_engine(model: nn.Module, bf16: bool) -> Any:
    """Put a frozen model under an inference-only DeepSpeed ZeRO-3 engine whose parameter partitions live in CPU
    memory (pinned where CUDA is present): each forward fetches a block's parameters to the device, runs it and frees
    them, so the model costs device memory one block at a time (N+'s reference policy and reward model at 6.9B).

    The model is then called as before (``model(...)``): the engine's hooks sit on its submodules. Its parameters
    become ZeRO-3 partitions (:func:`is_sharded` is true; :func:`full_state_dict` gathers them).

    Args:
        model: a frozen ``nn.Module`` (no parameter requires grad).
        bf16: run it in bf16 (the training precision's dtype), else in the model's own dtype.

    Returns:
        the ``deepspeed.DeepSpeedEngine``, in eval mode; keep a reference for as long as the model is used.

    Raises:
        ValueError: if a parameter of ``model`` requires grad.
    """
    import deepspeed

    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("offload_to_cpu_engine: the model has trainable parameters; only frozen models are offloaded")
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": torch.cuda.is_available()}},
    }
    engine, *_ = deepspeed.initialize(model=model, config=config, dist_init_required=False)
    engine.eval()
    return engine


@contextlib.contextmanager
def _zero3_gathered(model: nn.Module) -> Iterator[None]:
    import deepspeed

    engine = _zero3_engine() if _zero3_engine is not None else None
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        if offload is None or not hasattr(offload, "forward_hooks"):
            yield
            return
        # the engine's hooks would fetch and release every module's parameters at every one of the T forwards:
        # lifted while the parameters are held (what deepspeed.runtime.zero.stage3.unwrap_model_for_generation does
        # for a whole engine; only the generating model is gathered here)
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


@contextlib.contextmanager
def gathered_for_generation(model: nn.Module) -> Iterator[None]:
    """Hold ``model``'s full parameters for the duration of a ``generate()`` call, so that sampling T tokens costs
    one all-gather per block instead of T.

    FSDP2: every FSDP unit is unsharded once and kept unsharded after each forward, then resharded on exit.
    DeepSpeed ZeRO-3: the parameters are gathered with ``deepspeed.zero.GatheredParameters`` and the engine's
    fetch/release hooks (:func:`register_zero3_engine`) lifted meanwhile (the fix TRL applied to the same problem,
    ~10x faster generation). Unsharded models: nothing.
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
                # the root unit keeps shard_model's setting, the blocks reshard after forward
                unit.set_reshard_after_forward(getattr(unit, RESHARD_AFTER_FORWARD, True), recurse=False)
        return
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        with _zero3_gathered(model):
            yield
        return
    yield


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded state dict of ``model`` on the CPU.

    Collective for a sharded model (every process must call it): process 0 receives the full tensors, the others an
    empty dict. An unsharded model returns its own ``state_dict()``. A tied parameter (an LM head sharing the input
    embedding) appears once, under its first name, as ``save_pretrained`` writes it.
    """
    if any(hasattr(p, "ds_id") for p in model.parameters()):  # ZeRO-3: gathered block by block onto process 0
        return _zero3_full_state_dict(model)
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


def _zero3_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed

    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        params = list(module.named_parameters(prefix=module_name, recurse=False))
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            for name, param in params:
                if rank0 and id(param) not in seen:
                    state[name] = param.detach().cpu().clone()
                seen.add(id(param))
        for name, buffer in module.named_buffers(prefix=module_name, recurse=False):
            if rank0 and buffer is not None and name.rpartition(".")[2] not in module._non_persistent_buffers_set:
                state[name] = buffer.detach().cpu().clone()
    return state
