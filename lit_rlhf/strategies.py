"""Sharded strategies for the stage modules: FSDP2 (Lightning's ``ModelParallelStrategy`` with data parallelism
only) and Lightning's ``DeepSpeedStrategy`` with the frozen models under their own ZeRO-3 CPU-offload engines.

``--trainer.strategy lit_rlhf.strategies.FSDP2Strategy`` (or ``configs/strategies/fsdp2.yaml``) shards any stage:
the stage module's ``configure_model`` applies ``fully_shard`` per decoder block to each of its models
(:func:`lit_rlhf.models.parallel.shard_model`). What this subclass adds to Lightning's strategy:

* ``shard_frozen``: the frozen models (reference policy, reward model) are sharded like the trained ones (default),
  or replicated on every process (no all-gather in their forwards, full memory).
* Checkpoints are distributed checkpoints (a directory per checkpoint, one shard file per process) that leave out
  the frozen models and LoRA base weights, as every stage's checkpoints do (they are on disk already); loading reads
  the rest.

Tensor parallelism is not offered: the models here are small enough for FSDP alone, and the stages' generation
and logprob code assumes replicated activations.

:class:`DeepSpeedFrozenOffload` (``--trainer.strategy deepspeed_stage_2_offload_frozen``) is ``DeepSpeedStrategy``
(ZeRO-2 for the trained models) that hands the frozen reference policy / reward model to inference-only ZeRO-3 engines
with their parameters in CPU memory, fetched block by block for each forward (N+'s Pythia-6.9B set-up). GPU only:
Lightning's ``DeepSpeedStrategy`` refuses a CPU accelerator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.fabric.strategies.model_parallel import _METADATA_FILENAME, _is_sharded_checkpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 data parallelism over all processes (``ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)``).

    Args:
        shard_frozen: shard the frozen reference policy / reward model too (``False``: replicate them).
        save_distributed_checkpoint: one shard per process (default) or a single full checkpoint file.
        **kwargs: as ``ModelParallelStrategy``.
    """

    strategy_name = "lit_rlhf_fsdp2"

    def __init__(self, shard_frozen: bool = True, save_distributed_checkpoint: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("data_parallel_size", "auto")
        kwargs["tensor_parallel_size"] = 1
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.shard_frozen = shard_frozen

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: Union[str, Path], weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Load a distributed checkpoint written without what the stage module's ``excluded_from_checkpoints`` names
        (frozen models, LoRA base weights); a full checkpoint file goes through Lightning's loader."""
        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only=weights_only)
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        model_state = get_model_state_dict(self.model)
        excluded = getattr(self.lightning_module, "excluded_from_checkpoints", lambda keys: set())(model_state)
        model_state = {key: value for key, value in model_state.items() if key not in excluded}
        load({"state_dict": model_state}, checkpoint_id=path)
        set_model_state_dict(self.model, model_state, options=StateDictOptions(strict=False))
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            load(optimizer_state, checkpoint_id=path)
            set_optimizer_state_dict(self.model, optimizer, optimizer_state[key], options=StateDictOptions(cpu_offload=True))
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)


class DeepSpeedFrozenOffload(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` whose stage modules put their frozen models (reference policy, reward model)
    under separate inference-only ZeRO-3 engines with CPU parameter offload
    (:meth:`lit_rlhf.stages.common.StageModule.offload_frozen_models`): the trained models keep ``stage`` (2 by
    default), the frozen ones cost GPU memory only while a block runs.

    Args:
        offload_frozen: ``False`` is plain ``DeepSpeedStrategy``.
        **kwargs: as ``DeepSpeedStrategy``.

    Raises:
        ValueError: with ``stage=3`` for the trained models (their ``deepspeed.zero.Init`` would partition the frozen
            models too; use ``deepspeed_stage_3`` alone).
    """

    strategy_name = "lit_rlhf_deepspeed_offload_frozen"

    def __init__(self, offload_frozen: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("stage", 2)
        super().__init__(**kwargs)
        if offload_frozen and self.zero_stage_3:
            raise ValueError("DeepSpeedFrozenOffload: offload_frozen needs stage 2 (or 1) for the trained models, not 3")
        self.offload_frozen = offload_frozen


def register_strategies() -> None:
    """Make ``--trainer.strategy fsdp2`` (frozen models sharded), ``fsdp2_replicate_frozen`` and
    ``deepspeed_stage_2_offload_frozen`` known to Lightning."""
    from lightning.pytorch.strategies import StrategyRegistry

    if "deepspeed_stage_2_offload_frozen" not in StrategyRegistry:
        StrategyRegistry.register(
            "deepspeed_stage_2_offload_frozen", DeepSpeedFrozenOffload,
            description="DeepSpeed ZeRO-2, frozen models under ZeRO-3 with CPU parameter offload", stage=2,
        )

    for name, shard_frozen in (("fsdp2", True), ("fsdp2_replicate_frozen", False)):
        if name not in StrategyRegistry:
            StrategyRegistry.register(
                name, FSDP2Strategy, description=f"FSDP2 over all processes, frozen models {'sharded' if shard_frozen else 'replicated'}",
                shard_frozen=shard_frozen,
            )


register_strategies()
