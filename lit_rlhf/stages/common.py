"""What the stage modules share: optimiser and schedule, sample decoding, freezing, the random state of checkpoints
and the guard against non-finite values."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Iterable, Optional

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import nn

from lit_rlhf.host_memory import reuse_freed_memory, trains_on_one_cpu
from lit_rlhf.models.loading import export_tokenizer, load_causal_lm, weights_on_meta
from lit_rlhf.models.lora import AdaptersDisabled, LoRA, add_lora, is_peft, save_lora_model
from lit_rlhf.models.parallel import (
    deepspeed_engine,
    engine_gradient_norm,
    full_state_dict,
    is_sharded,
    local_tensor,
    materialize,
    offload_to_cpu_engine,
    register_zero3_engine,
    shard_model,
)
from lit_rlhf.models.scalar import ScalarModelConfig

#: learning-rate schedules (:func:`lr_factor`)
SCHEDULES = ("cosine", "linear", "constant")
#: what the non-finite guard checks at every optimiser step (:meth:`StageModule.check_parameters`), in the order its
#: message names them
STEP_CHECKS = ("loss", "gradient norm", "parameters")


def nonfinite_count(value: torch.Tensor) -> torch.Tensor:
    """``()`` int64: the NaNs and infinities in ``value`` (this process's shard of a DTensor)."""
    return (~torch.isfinite(local_tensor(value.detach()))).sum()


def lr_factor(step: int, total_steps: int, schedule: str, warmup_ratio: float = 0.0) -> float:
    """The learning-rate multiplier at optimiser step ``step`` (0-based) of ``total_steps``.

    A linear warm-up over the first ``ceil(warmup_ratio * total_steps)`` steps (``(step + 1) / (warmup + 1)``, so that no
    step runs at 0), then ``"cosine"`` to 0 (SFT, RM, DPO; with warm-up 0.03 Hugging Face's
    ``get_cosine_schedule_with_warmup`` that RLHFlow's RM and DPO runs use, recipe W1, W6), ``"linear"`` to 0 (PPO, recipe
    P8) or ``"constant"`` (no warm-up either). Steps past ``total_steps`` keep the last value.

    Raises:
        ValueError: for an unknown schedule.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule '{schedule}' ({', '.join(SCHEDULES)})")
    if schedule == "constant":
        return 1.0
    total = max(1, int(total_steps))
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    done, span = min(step - warmup, total - warmup), max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * done / span)) if schedule == "cosine" else max(0.0, 1.0 - done / span)


def adamw_with_schedule(
    parameters: Iterable[nn.Parameter], lr: float, eps: float, weight_decay: float, total_steps: int, schedule: str,
    warmup_ratio: float = 0.0,
) -> dict[str, Any]:
    """AdamW and a per-step schedule (:func:`lr_factor`), as Lightning's ``configure_optimizers`` returns them.

    Args:
        schedule: ``"cosine"``, ``"linear"`` or ``"constant"``.
        total_steps: optimiser steps over the run.
        warmup_ratio: the fraction of them that warms up linearly.

    Raises:
        ValueError: for an unknown schedule.
    """
    params = [p for p in parameters if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=weight_decay)
    lr_factor(0, total_steps, schedule)  # validates the name
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, schedule, warmup_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def group_names(module: L.LightningModule) -> dict[str, list[str]]:
    """``batch_names`` and ``source_names`` of the module's DataModule (empty without one), for
    :func:`~lit_rlhf.metrics.preference_accuracy`."""
    datamodule = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
    return {key: getattr(datamodule, key, []) for key in ("batch_names", "source_names")}


def update_source_accuracy(module: L.LightningModule, batch: dict[str, Any], correct: torch.Tensor) -> None:
    """Per source of a preference batch: whether each pair was ranked right (``module.by_source``) and whether the
    chosen response is the longer one (``module.longer_by_source``, equal lengths 0.5: the "longer answer wins"
    baseline). Batches without ``source`` are skipped."""
    if "source" not in batch:
        return
    pad = module.tokenizer.pad_token_id
    lengths = [(batch[key] != pad).sum(1) for key in ("chosen_response_ids", "rejected_response_ids")]  # (B,) each
    longer = (lengths[0] > lengths[1]).float() + 0.5 * (lengths[0] == lengths[1]).float()
    module.by_source.update(correct, batch["source"])
    module.longer_by_source.update(longer, batch["source"])


def freeze_bottom_layers(model: nn.Module, trainable_layers: Optional[int]) -> nn.Module:
    """Train only the top ``trainable_layers`` transformer blocks (plus final norm and any head).

    Embeddings (and a tied LM head) and the lower blocks get ``requires_grad=False``; the backward pass then
    stops at the lowest trainable block, which is what makes CPU runs affordable. ``None`` trains everything.

    A model with at most ``trainable_layers`` blocks is trained whole.

    Raises:
        ValueError: if the model's blocks cannot be found or ``trainable_layers`` is negative.
    """
    if trainable_layers is None:
        return model
    base = getattr(model, "backbone", None) or model.get_decoder()  # ScalarModel or a causal LM
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    if layers is None:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__} to freeze")
    if trainable_layers < 0:
        raise ValueError(f"trainable_layers must be >= 0, got {trainable_layers}")
    if trainable_layers >= len(layers):  # the model is no deeper than asked: train all of it
        return model
    embeddings = model.get_input_embeddings()
    for module in [embeddings, *layers[: len(layers) - trainable_layers]]:
        for param in module.parameters():
            param.requires_grad_(False)
    return model


def frozen(model: nn.Module) -> nn.Module:
    """``model`` with no trainable parameter, in eval mode (reference policies, reward models)."""
    return model.requires_grad_(False).eval()


def lora_settings(owner: str, lora: Any, trainable_layers: Optional[int] = None) -> Optional[LoRA]:
    """A stage's ``lora`` argument as :class:`~lit_rlhf.models.lora.LoRA` (``None``, a ``LoRA`` or its dict, as a
    checkpoint's hyperparameters hold it).

    Raises:
        ValueError: naming ``owner`` when LoRA and ``trainable_layers`` are both set (LoRA already freezes the base).
    """
    if lora is None:
        return None
    settings = lora if isinstance(lora, LoRA) else LoRA(**dict(lora))
    if trainable_layers is not None:
        raise ValueError(f"{owner}: lora and trainable_layers are exclusive (LoRA trains adapters on a frozen base); set one")
    return settings


def lora_hparam(lora: Optional[LoRA]) -> Optional[dict[str, Any]]:
    """``lora`` as the plain dict stored in hyperparameters (checkpoints load with ``weights_only``)."""
    return None if lora is None else dict(vars(lora))


def load_policy_and_reference(
    policy: str, trainable_layers: Optional[int], reference: Optional[str] = None, lora: Optional[LoRA] = None
) -> tuple[nn.Module, Any]:
    """The policy (top ``trainable_layers`` blocks trainable) and the frozen reference policy, both loaded from
    ``policy`` unless ``reference`` names another checkpoint (recipe P1; DPO).

    With ``lora`` the policy is a LoRA on ``policy`` and the reference is the same model with its adapters disabled
    (:class:`~lit_rlhf.models.lora.AdaptersDisabled`, no second copy), unless ``reference`` names another checkpoint.
    """
    if lora is not None:
        model = add_lora(load_causal_lm(policy), lora)
        if reference is not None and reference != policy:
            return model, frozen(load_causal_lm(reference))
        return model, AdaptersDisabled(model)
    return freeze_bottom_layers(load_causal_lm(policy), trainable_layers), frozen(load_causal_lm(reference or policy))


class NonFiniteError(FloatingPointError):
    """A loss, gradient norm, reward-model score or parameter became NaN or infinite: the run stops at once."""


#: checkpoint key of the per-rank random states (:meth:`StageModule.on_save_checkpoint`)
RNG_STATES_KEY = "lit_rlhf_rng_states"


def _portable_rng_states(states: dict[str, Any]) -> dict[str, Any]:
    """Lightning's RNG states with numpy's array as a tensor, so that ``torch.load(weights_only=True)`` reads them."""
    if "numpy" in states:
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        states = {**states, "numpy": (kind, torch.from_numpy(np.asarray(keys).copy()), pos, has_gauss, gauss)}
    return states


def _native_rng_states(states: dict[str, Any]) -> dict[str, Any]:
    if "numpy" in states:
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        states = {**states, "numpy": (kind, keys.numpy() if torch.is_tensor(keys) else keys, pos, has_gauss, gauss)}
    return states


class StageModule(L.LightningModule):
    """Base of the stage modules.

    Subclasses set ``self.tokenizer`` and the model that :meth:`exported_model` returns, and have hyperparameters
    ``lr``, ``eps`` and ``weight_decay``. ``test`` runs the validation logic on the datamodule's test split.

    Runs survive here:

    * **Exact resume.** Every checkpoint holds the random states (torch, CUDA, Python, numpy) of every rank, restored
      at the start of training, so a run resumed from any checkpoint draws the same samples, permutations and
      dropout masks as the uninterrupted run. (Data order and position are the ``StatefulDataLoader``'s, optimiser,
      scheduler and counters Lightning's.)
    * **Non-finite guard.** A non-finite loss (at any backward), gradient norm (before the optimiser step; DeepSpeed's
      global norm of the step under DeepSpeed) or trainable parameter (after it) raises :class:`NonFiniteError`
      naming the quantity, the stage and the step right after that optimiser step (:meth:`check_parameters`), before
      any checkpoint or export of that step is written: one collective per optimiser step. Stages check their own
      further quantities (PPO and online DPO: the reward-model scores) with :meth:`check_finite`. Every rank takes the
      same decision.
    """

    #: the stage's name in messages (the CLI subcommand)
    stage_name = "stage"

    #: learning-rate schedule over the run (see :func:`adamw_with_schedule`)
    schedule = "cosine"
    #: frozen submodules loaded from disk by ``configure_model`` and left out of Lightning checkpoints
    frozen_submodules: tuple[str, ...] = ()

    def load_models(self) -> None:
        """Load the stage's tokenizer and models (called once, by :meth:`configure_model`)."""
        raise NotImplementedError

    def configure_model(self) -> None:
        """Load the models once (:meth:`load_models`); under FSDP2 (a device mesh from Lightning's
        ``ModelParallelStrategy`` / :class:`~lit_rlhf.strategies.FSDP2Strategy`) shard each of them per decoder block.

        The frozen models are sharded too unless the strategy says ``shard_frozen=False``.

        Under FSDP2 the models are built with their parameters on the ``meta`` device
        (:func:`~lit_rlhf.models.loading.weights_on_meta`), sharded, then each process reads its own shards from the
        checkpoints in the training dtype (:func:`~lit_rlhf.models.parallel.materialize`): no process holds a whole
        model (LoRA runs load whole).

        Under Lightning's ``DeepSpeedStrategy`` (:meth:`prepare_deepspeed`) ZeRO-3 partitions the models as they load
        (transformers' DeepSpeed integration), and ``max_grad_norm`` becomes DeepSpeed's ``gradient_clipping``.

        Raises:
            ValueError: with a tensor-parallel mesh (only data parallelism is supported).
        """
        mesh = self._device_mesh
        strategy = self._trainer.strategy if self._trainer is not None else None
        if mesh is not None and "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError(f"{self.stage_name}: tensor parallelism is not supported; use tensor_parallel_size=1 (FSDP2Strategy)")
        if not getattr(self, "_models_loaded", False):
            self.prepare_deepspeed()
            # FSDP2: parameters on meta until sharded, then each process reads its shards (LoRA models load whole: peft
            # draws the adapters' initial values on the base weights' device)
            lora = any(getattr(self, name, None) is not None for name in ("lora", "value_lora"))
            with weights_on_meta(mesh is not None and not getattr(self, "_models_sharded", False) and not lora):
                self.load_models()
            self._models_loaded = True
            if getattr(strategy, "offload_frozen", False):
                self.offload_frozen_models()
        if mesh is None or getattr(self, "_models_sharded", False):
            return
        data_parallel = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        shard_frozen = getattr(strategy, "shard_frozen", True)
        device = strategy.root_device if strategy is not None else torch.device(mesh.device_type)
        for name, child in self.named_children():
            if not hasattr(child, "config"):  # metrics, not models
                continue
            if shard_frozen or any(p.requires_grad for p in child.parameters()):
                shard_model(child, data_parallel)
            materialize(child, device)
        self._models_sharded = True

    def prepare_deepspeed(self) -> None:
        """Before :meth:`load_models` under Lightning's ``DeepSpeedStrategy``: with ZeRO-3, hold a transformers
        ``HfDeepSpeedConfig`` so that ``from_pretrained`` loads each weight straight into its partitions; with a
        ``max_grad_norm`` hyperparameter, set DeepSpeed's ``gradient_clipping`` to it (DeepSpeed clips inside
        ``engine.step()``; Lightning's ``clip_gradients`` is a no-op there and ``Trainer(gradient_clip_val=...)``
        is refused under manual optimisation). The same under its subclasses (:class:`~lit_rlhf.strategies.DeepSpeedFrozenOffload`,
        the 6.9B configs' strategy). Nothing under any other strategy."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        config = getattr(strategy, "config", None)
        if not isinstance(strategy, DeepSpeedStrategy) or not isinstance(config, dict):  # subclasses too (DeepSpeedFrozenOffload)
            return
        max_grad_norm = self.hparams.get("max_grad_norm")
        if max_grad_norm is not None:
            config["gradient_clipping"] = float(max_grad_norm)
        if (config.get("zero_optimization") or {}).get("stage") == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_deepspeed_config = HfDeepSpeedConfig(config)  # transformers keeps a weak reference: hold it

    def offload_frozen_models(self) -> None:
        """Hand each full frozen model (:attr:`frozen_submodules`; LoRA views have nothing of their own) to an
        inference-only DeepSpeed ZeRO-3 engine whose parameters live in pinned CPU memory and are fetched to the GPU
        block by block in each forward (:class:`lit_rlhf.strategies.DeepSpeedFrozenOffload`, N+'s 6.9B set-up).

        The model stays reachable under its name but leaves the module tree, so that Lightning's training engine
        neither moves it to the GPU nor wraps it again; checkpoints leave it out as they leave out every frozen model.
        """
        bf16 = "bf16" in str(self.trainer.strategy.precision_plugin.precision)
        self._frozen_engines = {}
        for name in self.frozen_submodules:
            model = self._modules.get(name)
            if model is None:
                continue
            del self._modules[name]
            engine = offload_to_cpu_engine(model, bf16)
            object.__setattr__(self, name, model)  # a plain attribute: outside the module tree
            self._frozen_engines[name] = engine

    def _register_deepspeed_engine(self) -> None:
        engine = deepspeed_engine(self._trainer.strategy) if self._trainer is not None else None
        register_zero3_engine(engine if engine is not None and engine.zero_optimization_stage() == 3 else None)

    def share_frozen_trunks(self) -> None:
        """Set up :class:`~lit_rlhf.models.trunk.FrozenTrunk` sharing between this stage's models (none here).

        Called at the start of fit, validation and test, after any checkpoint has been loaded.
        """

    def check_datamodule(self, datamodule: Any) -> None:
        """Raise ``ValueError`` naming the arguments when this module's and the DataModule's arguments do not go
        together (PPO: ``num_mini_batches`` and ``batch_size``). Called by the CLI before anything is loaded, and by
        :meth:`setup` for runs built in Python."""

    def setup(self, stage: str) -> None:
        """Check the DataModule's arguments against this module's, and, when fitting on the CPU in one process, make
        ``malloc`` keep freed memory for large blocks (:func:`~lit_rlhf.host_memory.reuse_freed_memory`)."""
        if stage == "fit" and self._trainer is not None and self.trainer.datamodule is not None:
            self.check_datamodule(self.trainer.datamodule)
        if stage == "fit" and self._trainer is not None and trains_on_one_cpu(self.trainer):
            reuse_freed_memory()

    def on_fit_start(self) -> None:
        self._register_deepspeed_engine()
        self.share_frozen_trunks()

    def on_train_start(self) -> None:
        """On resume from a checkpoint (after ``on_fit_start``): put the training loaders where they were and restore the
        random states of this rank."""
        self._restore_loader_position()
        states = getattr(self, "_rng_states_to_restore", None)
        if states:
            if len(states) != self.trainer.world_size:
                raise RuntimeError(
                    f"{self.stage_name}: the checkpoint holds random states of {len(states)} ranks, this run has "
                    f"{self.trainer.world_size}: resume with the same number of processes"
                )
            _set_rng_states(_native_rng_states(states[self.global_rank]))
            self._rng_states_to_restore = None

    def on_validation_start(self) -> None:
        self._register_deepspeed_engine()
        self.share_frozen_trunks()

    def on_test_start(self) -> None:
        self._register_deepspeed_engine()
        self.share_frozen_trunks()

    def row_chunks(self, size: int) -> list[slice]:
        """Slices of ``size`` rows in chunks of ``hparams.rollout_batch_size`` (``None`` = one chunk)."""
        step = self.hparams.get("rollout_batch_size") or size
        return [slice(i, i + step) for i in range(0, size, step)]

    def excluded_from_checkpoints(self, keys: Iterable[str]) -> set[str]:
        """The state-dict ``keys`` checkpoints leave out, because ``configure_model`` loads them from disk unchanged:
        the :attr:`frozen_submodules` and the frozen base weights of LoRA models (everything but adapters and heads)."""
        prefixes = tuple(f"{name}." for name in self.frozen_submodules)
        frozen_base = {
            f"{name}.{parameter}"
            for name, child in self.named_children() if is_peft(child)
            for parameter, value in child.named_parameters(remove_duplicate=False) if not value.requires_grad
        }
        return {key for key in keys if key.startswith(prefixes) or key in frozen_base} if prefixes or frozen_base else set()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Drop what :meth:`excluded_from_checkpoints` names from the checkpoint's state dict (it is on disk already)
        and add the random states of every rank (called on every rank; rank ``r``'s state is entry ``r``)."""
        excluded = self.excluded_from_checkpoints(checkpoint["state_dict"])
        if excluded:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in excluded}
        state = _portable_rng_states(_collect_rng_states(include_cuda=torch.cuda.is_available()))
        states = [state]
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            # gathered as bytes: all_gather_object cannot unpickle the tensors of torch's generator states
            buffer = io.BytesIO()
            torch.save(state, buffer)
            gathered = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, buffer.getvalue())
            states = [torch.load(io.BytesIO(data), weights_only=True) for data in gathered]
        checkpoint[RNG_STATES_KEY] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_states_to_restore = checkpoint.get(RNG_STATES_KEY)
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        self._loader_states_to_restore = fit_loop.get("state_dict", {}).get("combined_loader")
        self._resumed_after_last_batch = bool(fit_loop.get("epoch_loop.batch_progress", {}).get("is_last_batch"))

    def _restore_loader_position(self) -> None:
        """Load the checkpoint's ``StatefulDataLoader`` states into the training loaders and restart their iterators.

        Lightning drops these states when ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (as
        every stage's schedule does): the loaders are built before the checkpoint's loop state is restored and never
        again (Lightning issue #20550). Lightning's own path would also fast-forward a mid-epoch loader before
        ``set_epoch``. Here the samplers get the resumed epoch first, then the states, then a new iterator.

        A checkpoint written after the last batch of an epoch (``is_last_batch``) resumes into the next epoch, which
        must start from a fresh iterator: Lightning, loading the exhausted state, would train on nothing. A run resumed
        at an epoch's end (``restarted_on_epoch_end``) starts the next epoch afresh, as Lightning does.
        """
        states, self._loader_states_to_restore = getattr(self, "_loader_states_to_restore", None), None
        fit_loop = self.trainer.fit_loop
        combined = fit_loop._combined_loader
        if not states or not fit_loop.restarted_mid_epoch or combined is None or fit_loop._data_fetcher is None:
            return
        fit_loop._combined_loader_states_to_load = []
        if not self._resumed_after_last_batch:
            for loader in combined.flattened:
                _set_sampler_epoch(loader, fit_loop.epoch_progress.current.processed)
            combined._load_state_dicts(states)
        fit_loop._data_fetcher.setup(combined)
        iter(fit_loop._data_fetcher)

    def log_metrics(self, metrics: dict[str, Any], **kwargs: Any) -> None:
        """``self.log_dict(metrics, **kwargs)`` with every value (a number or a tensor anywhere) made a tensor on the
        module's device first: with ``sync_dist=True`` Lightning reduces each value across ranks, and NCCL reduces
        device tensors only (a CPU tensor, e.g. one built from the learning rate, fails or stalls there)."""
        self.log_dict({key: torch.as_tensor(value, device=self.device) for key, value in metrics.items()}, **kwargs)

    # ------------------------------------------------------------------ non-finite guard
    def _reduced_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """``counts`` summed over the ranks (one collective; none in a single process), on this process's CPU."""
        if self._trainer is not None and self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts.to(self.device), reduce_op="sum")  # NCCL reduces device tensors
        return counts.cpu()

    def _raise_nonfinite(self, name: str) -> None:
        raise NonFiniteError(
            f"{self.stage_name}: non-finite {name} at step {self.global_step} (epoch {self.current_epoch}); the run "
            "stops before this step's checkpoint or export is written, so the last ones on disk are intact"
        )

    def check_finite(self, name: str, value: torch.Tensor) -> None:
        """Raise :class:`NonFiniteError` at once if ``value`` holds a NaN or infinity on any rank (one collective).

        Args:
            name: what ``value`` is, for the message (e.g. ``"reward-model score"``).
            value: any tensor.
        """
        if self._reduced_counts(nonfinite_count(value).float().reshape(1)).item() > 0:
            self._raise_nonfinite(name)

    def note_nonfinite(self, name: str, value: torch.Tensor) -> None:
        """Count the NaNs and infinities of ``value`` (one of :data:`STEP_CHECKS`) for the verdict of the current
        optimiser step (:meth:`check_parameters`), without a synchronisation or a collective."""
        counts = getattr(self, "_step_nonfinite", None)
        if counts is None:
            counts = self._step_nonfinite = torch.zeros(len(STEP_CHECKS), device=value.device)
        counts[STEP_CHECKS.index(name)] += nonfinite_count(value).to(counts.device)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.note_nonfinite("loss", loss)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [local_tensor(p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:  # this process's shards under FSDP2 (DeepSpeed keeps no p.grad: check_parameters reads its norm)
            self.note_nonfinite("gradient norm", torch.nn.utils.get_total_norm(grads))

    def check_parameters(self) -> None:
        """After each optimiser step: the step's verdict. Raise :class:`NonFiniteError` if any rank saw a non-finite
        loss (at a backward of the step), gradient norm or trainable parameter (this process's shard under FSDP2),
        naming the first of those and, for a parameter, the first bad one on this process.

        Every rank takes the same decision with one collective per optimiser step, however many backwards the step
        accumulated. Under DeepSpeed, which frees ``p.grad`` after its reduction, the gradient norm is the engine's
        global one of the step just taken (:func:`~lit_rlhf.models.parallel.engine_gradient_norm`).
        """
        engine_norm = engine_gradient_norm(deepspeed_engine(self.trainer.strategy) if self._trainer is not None else None)
        if engine_norm is not None:
            self.note_nonfinite("gradient norm", engine_norm)
        params = [(name, local_tensor(p)) for name, p in self.named_parameters() if p.requires_grad]
        finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in params]) if params else torch.ones(1, dtype=torch.bool)
        self.note_nonfinite("parameters", torch.where(finite.all(), 0.0, float("nan")))
        counts, self._step_nonfinite = self._reduced_counts(self._step_nonfinite), None
        if counts.any():
            name = STEP_CHECKS[int(counts.nonzero()[0])]
            if name == "parameters" and not finite.all():
                name = f"parameter {params[int((~finite).nonzero()[0])][0]}"
            self._raise_nonfinite(name)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Automatic optimisation: the step, then :meth:`check_parameters` (manual stages call it themselves)."""
        super().optimizer_step(*args, **kwargs)
        self.check_parameters()

    def exported_model(self) -> nn.Module:
        """The model :meth:`save_hf` writes."""
        raise NotImplementedError

    def exported_models(self) -> dict[str, nn.Module]:
        """Sub-directory -> model that :meth:`save_hf` writes (``""``: the export directory itself)."""
        return {"": self.exported_model()}

    def save_hf(self, directory: Optional[Path]) -> None:
        """Write :meth:`exported_models` and the tokenizer in Hugging Face format to ``directory``.

        The tokenizer is :func:`~lit_rlhf.models.loading.export_tokenizer`'s: the model's own pad token (or EOS), never
        the internal ``[PAD]``, so that the export batch-generates with a plain transformers pipeline.

        Call it on every process: a sharded model is gathered to process 0, which alone writes (the others pass
        ``None`` or any path, nothing is written there). The weights are checked first, shard by shard.

        Raises:
            NonFiniteError: naming the model, on every process, if a weight holds a NaN or infinity (nothing written).
        """
        models = self.exported_models()
        for name, model in models.items():
            bad = [key for key, value in model.state_dict().items()
                   if value.is_floating_point() and not torch.isfinite(local_tensor(value)).all()]
            self.check_finite(f"weight {bad[0] if bad else ''} of the exported {name or 'model'} (nothing exported)",
                              torch.tensor(float("nan") if bad else 0.0))
        for name, model in models.items():
            state = full_state_dict(model)  # collective when sharded
            if directory is not None and (self._trainer is None or self.trainer.is_global_zero):
                target = Path(directory) / name
                if is_peft(model):
                    save_lora_model(model, target, state)
                else:
                    model.save_pretrained(target, state_dict=state if is_sharded(model) else None)
        if directory is not None and (self._trainer is None or self.trainer.is_global_zero):
            # the model's own pad token (or EOS), not the internal [PAD]; left padding for a causal LM's batched generation
            scalar = getattr(getattr(models.get(""), "config", None), "model_type", None) == ScalarModelConfig.model_type
            export_tokenizer(self.tokenizer, padding_side="right" if scalar else "left").save_pretrained(directory)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over every trainable parameter (frozen models and blocks are left out), schedule per step."""
        hp = self.hparams
        total_steps = self.trainer.estimated_stepping_batches
        return adamw_with_schedule(
            self.parameters(), hp.lr, hp.eps, hp.weight_decay, total_steps, self.schedule, hp.get("warmup_ratio", 0.0)
        )

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()
