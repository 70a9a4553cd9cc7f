"""PPO with manual optimisation and its own rollout loop (recipe P1-P11), and the critic-free policy gradients that
share it (RLOO, GRPO, Dr. GRPO, REINFORCE++; recipe C1-C4).

One ``training_step`` is one update and reads in the order of the N+ code: rollout, response processing, rewards,
advantages, then the epoch / minibatch loop. ``advantage_estimator`` picks how advantages are made: ``"gae"`` (N+ PPO,
a value model) or a critic-free estimator over ``samples_per_prompt`` responses per prompt (no value model is loaded).
The math lives in :mod:`lit_rlhf.algorithms`; this module only wires models and data to it.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
from torch import nn

from lit_rlhf.algorithms import (
    ADVANTAGE_ESTIMATORS,
    INVALID_LOGPROB,
    LOSS_AGG_MODES,
    SCORE_POSITIONS,
    KLController,
    RunningMoments,
    aggregate_loss,
    eos_penalized,
    first_true_indices,
    gae_advantages,
    group_normalized_advantages,
    is_stop,
    k3_kl,
    kl_penalty_rewards,
    masked_mean,
    masked_whiten,
    minibatch_advantages,
    normalize_scores,
    ppo_policy_loss,
    ppo_value_loss,
    reinforce_pp_advantages,
    response_padding_masks,
    returns_to_go,
    rloo_advantages,
    score_indices,
    sequence_cross_entropy,
    sequence_to_tokens,
    truncate_after_eos,
)
from lit_rlhf.arguments import check_arguments, require
from lit_rlhf.models.forward import generate, model_inputs, response_logprobs, sequence_scores
from lit_rlhf.models.loading import load_tokenizer, stop_token_ids
from lit_rlhf.models.lora import AdaptersDisabled, LoRA, add_lora
from lit_rlhf.models.parallel import accumulation_boundary, deepspeed_engine
from lit_rlhf.models.scalar import ScalarModel
from lit_rlhf.models.trunk import FrozenTrunk
from lit_rlhf.rewards import call_reward_function, import_reward_function
from lit_rlhf.sampling import RANK_SEED_STRIDE, decode_responses
from lit_rlhf.stages.common import (
    StageModule,
    freeze_bottom_layers,
    frozen,
    load_policy_and_reference,
    lora_hparam,
    lora_settings,
)
from lit_rlhf.stages.policy_eval import PolicyValidation

#: ``whitening_scope`` values: each process's own batch (N+) or the global batch.
WHITENING_SCOPES = ("rank", "global")

#: ``kl_penalty`` values: the KL penalty per token in the rewards (N+, REINFORCE++) or summed into the sequence reward
#: before the baseline (TRL's RLOO default)
KL_PENALTIES = ("token", "sequence")

#: ``advantage_estimator`` -> the presets of the ``lit-rlhf`` subcommands named after it (CLI defaults; a config
#: or flag overrides each). ``samples_per_prompt`` 4 as "Back to Basics" (RLOO k = 4); GRPO's KL in the loss with
#: beta 0.04 and each response's token mean (recipe C2), Dr. GRPO's constant normaliser (C3), REINFORCE++'s global
#: whitening (C4).
PRESETS: dict[str, dict[str, Any]] = {
    "rloo": {"advantage_estimator": "rloo", "samples_per_prompt": 4, "kl_penalty": "sequence"},
    "grpo": {
        "advantage_estimator": "grpo", "samples_per_prompt": 4, "kl_coef": 0.0, "kl_loss_coef": 0.04,
        "loss_agg_mode": "seq_mean_token_mean",
    },
    "dr_grpo": {
        "advantage_estimator": "dr_grpo", "samples_per_prompt": 4, "kl_coef": 0.0, "kl_loss_coef": 0.04,
        "loss_agg_mode": "seq_mean_token_sum_norm",
    },
    "reinforce_pp": {"advantage_estimator": "reinforce_pp", "whitening_scope": "global"},
}


class RewardCurve(nn.Module):
    """The mean training reward of every update so far (global batch), kept in the ``state_dict`` as extra state so that
    a resumed run continues the curve; the quickstart summary compares its first and last quarters."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[float] = []

    def get_extra_state(self) -> dict:
        return {"values": list(self.values)}

    def set_extra_state(self, state: dict) -> None:
        self.values = [float(value) for value in state["values"]]


class PPOModule(PolicyValidation, StageModule):
    """PPO on a reward model with a per-token KL penalty (recipe P1-P11, N+ defaults), or a critic-free policy
    gradient (RLOO, GRPO, Dr. GRPO, REINFORCE++; recipe C1-C4) with the same rollout, scoring and validation.

    The defaults are the N+ code (``summarize_from_feedback_details/ppo.py``); where an argument offers another
    behaviour, its entry says which value is N+'s. The subcommands ``rloo``, ``grpo``, ``dr-grpo`` and ``reinforce-pp``
    are this module with :data:`PRESETS` as defaults.

    Args:
        policy: SFT checkpoint; initialises the policy and the frozen reference policy (P1).
        ref_policy: a different reference policy checkpoint (``None`` = ``policy``); e.g. to validate a DPO policy
            against the SFT one.
        reward_model: trained reward model directory (frozen); ``None`` when ``reward_funcs`` give the whole reward
            (then validation's ``eval/scores`` is their weighted sum and there is no win rate).
        value_model: initialises the value model, a separate network (P1); ``None`` = ``reward_model``. Only ``gae``
            has a value model.
        response_length: tokens sampled per response (P2: 53).
        temperature: sampling temperature, also used to scale logits for logprobs (P2, P4: 0.7).
        truncate_after_eos: replace tokens after the first EOS by PAD before scoring (P3).
        non_eos_penalty: responses without EOS get ``penalty_reward_value`` as score (P3).
        penalty_reward_value: that score (P3: -1).
        missing_eos_penalty: instead subtract this from the score of a response without EOS (TRL's
            ``missing_eos_penalty``; for a reward model whose scores are not centred on 0, as a chat RM's).
        kl_coef: KL coefficient of the per-token penalty (P5: 0.05, fixed); the initial value when ``kl_target`` is set.
        kl_target: adaptive KL controller (Ziegler et al. 2019; :func:`~lit_rlhf.algorithms.adaptive_kl_coef`): the
            target KL in nats per response (6 in their work). ``None`` (N+, P5) keeps ``kl_coef`` fixed. The
            coefficient in use is logged as ``objective/kl_coef`` and checkpointed.
        kl_horizon: the controller's horizon in episodes (10,000).
        score_position: where the RM score lands and which values train (P5). ``"after_eos"`` (N+): at ``L + 1``,
            the first PAD after the EOS at ``L`` (at ``L`` when ``L + 1 = T``), with values kept up to ``L + 1``
            (N+'s ``padding_mask_p1``) in GAE, the value loss and reward whitening. ``"eos"``: at ``L``, values masked
            after it (the score then sits on the state that produced the EOS).
        whiten_rewards: whiten rewards before GAE (P6: off), over the value mask, mean kept.
        whitening_scope: statistics of reward and advantage whitening (P6) and of PPO-max's minibatch
            advantage normalisation: ``"rank"`` (N+) over each process's own batch, ``"global"`` over the batch of
            every rank. The same under one process.
        gamma: GAE discount (P7: 1).
        lam: GAE lambda (P7: 0.95).
        num_ppo_epochs: passes over each rollout batch (P8: 4).
        num_mini_batches: minibatches per epoch (P8: 1).
        micro_batch_size: rows per forward/backward inside a minibatch (gradient accumulation; ``None`` = the
            whole minibatch). Each micro-batch's loss is a masked token mean over that micro-batch alone and the
            minibatch's gradient is the mean of the micro-batch gradients, as in N+ (P8), so the update depends on
            it: rows with few tokens weigh more in a small micro-batch. N+: 16 / 4 / 1 rows for 1B / 2.8B / 6.9B.
        cliprange: policy ratio clip (P8: 0.2).
        cliprange_value: value clip (P8: 0.2).
        vf_coef: value-loss weight (P8: 0.1).
        lr: AdamW learning rate (P8: 3e-6), annealed linearly to 0 over the updates.
        eps: AdamW epsilon (P8: 1e-5).
        weight_decay: AdamW weight decay (P8: 0.01, PyTorch's default, as in every N+ stage).
        anneal_lr: linear annealing on (P8) or a constant rate.
        seed: base seed; rank ``r`` samples with ``seed + r * 100003`` (P11).
        rollout_batch_size: rows per no-grad forward during the rollout (``None`` = all at once).
        num_samples: rows kept for the validation sample table.
        eval_temperature: sampling temperature of validation (N+: 0.01, near-greedy); the KL to the reference is
            measured with logprobs scaled by the same temperature (P4).
        reward_norm: PPO-max: normalise RM scores by the running mean/std of all past scores (off).
        reward_scaling: PPO-max: divide RM scores by the running std only (off; ``reward_norm`` wins).
        reward_clip: PPO-max: clip the (normalised) scores to ``[-reward_clip, reward_clip]`` (0.8 / 0.3 studied).
        advantage_norm: PPO-max: whiten advantages again over each minibatch (off).
        advantage_clip: PPO-max: clip advantages to ``[-advantage_clip, advantage_clip]`` after that.
        critic_warmup_updates: PPO-max critic pre-training: the first N updates train the value model only.
        max_grad_norm: PPO-max global gradient-norm clipping over policy + value model (paper 1.0; ``None`` = off).
        ptx_coef: PPO-ptx: weight of the SFT loss on the datamodule's ``ptx`` batch, added at every optimiser step
            (0 = off; the data comes from ``PromptDataModule(ptx_batch_size=...)``).
        entropy_coef: entropy bonus, ``- entropy_coef * mean entropy`` added to the loss (reported unstable; 0).
        trainable_layers: train only the top N blocks of policy and value model (``None`` = all). The frozen
            lower blocks then run once per rollout batch for policy + reference and once for value + reward
            model, and are not re-run in the PPO epochs (:class:`~lit_rlhf.models.trunk.FrozenTrunk`; exact).
        lora: train LoRA adapters (peft) on the frozen SFT policy (``None`` = off; exclusive with ``trainable_layers``).
            The reference policy is then the policy with its adapters disabled, unless ``ref_policy`` names another
            checkpoint: one copy of the SFT weights instead of two.
        value_lora: LoRA adapters on the value model (its scalar head trained whole). When the value model starts from
            the reward model (``value_model`` unset or equal to ``reward_model``), the reward model is the value model
            with its adapters disabled: one copy of the reward-model weights instead of two.
        advantage_estimator: one of :data:`~lit_rlhf.algorithms.ADVANTAGE_ESTIMATORS`. ``"gae"`` (N+): GAE on a value
            model. The others load no value model (nothing of it is trained or checkpointed): ``"rloo"`` the sequence
            reward minus the mean of the prompt's other responses' (C1), ``"grpo"`` the group-normalised reward (C2),
            ``"dr_grpo"`` the group-centred reward (C3), ``"reinforce_pp"`` the returns of the token rewards (C4). The
            sequence-level advantages sit on every token of their response.
        samples_per_prompt: ``k``, responses sampled per prompt: an update has ``data.batch_size * k`` episodes from
            ``data.batch_size`` prompts (``data.total_episodes`` counts prompts). A prompt's ``k`` rows stay together on
            one process, so group statistics are exact under DDP/FSDP2. ``rloo``, ``grpo`` and ``dr_grpo`` need ``k >= 2``.
        kl_penalty: where ``kl_coef``'s penalty goes: ``"token"`` (N+, REINFORCE++) ``-kl_coef * KL_t`` on each token,
            whose returns to go add to the advantages of the critic-free estimators; ``"sequence"`` summed into the
            sequence reward before the baseline (TRL's RLOO: ``r = score - kl_coef * sum_t KL_t``). ``gae`` and
            ``reinforce_pp`` take ``"token"`` only.
        kl_loss_coef: beta of the KL term in the loss instead of the reward: ``beta * k3`` per token
            (:func:`~lit_rlhf.algorithms.k3_kl`, GRPO's 0.04, C2), aggregated as the policy loss (0 = off).
        loss_agg_mode: how per-token losses become the loss (:func:`~lit_rlhf.algorithms.aggregate_loss`):
            ``"token_mean"`` (N+), ``"seq_mean_token_mean"`` (GRPO), ``"seq_mean_token_sum"``, ``"seq_mean_token_sum_norm"``
            (Dr. GRPO: a constant ``response_length`` normaliser).
        whiten_advantages: whiten the advantages over the real tokens (``whitening_scope``'s statistics); ``None`` =
            the estimator's own rule: on for ``gae`` (N+, P6) and ``reinforce_pp`` (its global normalisation, C4), off
            for ``rloo`` (TRL's ``normalize_advantage=False``), ``grpo`` and ``dr_grpo``.
        reward_funcs: reward functions by import path, ``"module:function"`` called as
            ``function(prompts, completions, **row_fields) -> list[float]`` (:mod:`lit_rlhf.rewards`), summed with the
            reward model's score. One that raises or returns a non-finite value stops the run, naming it and the row,
            before any update. The missing-EOS rule (P3) applies to the sum.
        reward_weights: one weight per reward source, the reward model first (when set) then ``reward_funcs``
            (``None`` = all 1).
    """

    stage_name = "ppo"

    #: recipe P8: linear annealing to 0, stepped once per update
    schedule = "linear"
    frozen_submodules = ("ref_policy", "reward_model")

    def __init__(
        self,
        policy: str = "smollm2-135m",
        reward_model: Optional[str] = "runs/rm/model",
        ref_policy: Optional[str] = None,
        value_model: Optional[str] = None,
        response_length: int = 53,
        temperature: float = 0.7,
        truncate_after_eos: bool = True,
        non_eos_penalty: bool = True,
        penalty_reward_value: float = -1.0,
        missing_eos_penalty: Optional[float] = None,
        kl_coef: float = 0.05,
        kl_target: Optional[float] = None,
        kl_horizon: int = 10000,
        score_position: str = "after_eos",
        whiten_rewards: bool = False,
        whitening_scope: str = "rank",
        gamma: float = 1.0,
        lam: float = 0.95,
        num_ppo_epochs: int = 4,
        num_mini_batches: int = 1,
        micro_batch_size: Optional[int] = None,
        cliprange: float = 0.2,
        cliprange_value: float = 0.2,
        vf_coef: float = 0.1,
        lr: float = 3e-6,
        eps: float = 1e-5,
        weight_decay: float = 0.01,
        anneal_lr: bool = True,
        seed: int = 1,
        rollout_batch_size: Optional[int] = None,
        num_samples: int = 8,
        eval_temperature: float = 0.01,
        reward_norm: bool = False,
        reward_scaling: bool = False,
        reward_clip: Optional[float] = None,
        advantage_norm: bool = False,
        advantage_clip: Optional[float] = None,
        critic_warmup_updates: int = 0,
        max_grad_norm: Optional[float] = None,
        ptx_coef: float = 0.0,
        entropy_coef: float = 0.0,
        trainable_layers: Optional[int] = None,
        lora: Optional[LoRA] = None,
        value_lora: Optional[LoRA] = None,
        advantage_estimator: str = "gae",
        samples_per_prompt: int = 1,
        kl_penalty: str = "token",
        kl_loss_coef: float = 0.0,
        loss_agg_mode: str = "token_mean",
        whiten_advantages: Optional[bool] = None,
        reward_funcs: Optional[list[str]] = None,
        reward_weights: Optional[list[float]] = None,
    ) -> None:
        super().__init__()
        check_arguments(
            type(self).__name__, locals(),
            positive=(
                "lr", "eps", "response_length", "temperature", "eval_temperature", "num_ppo_epochs", "num_mini_batches",
                "micro_batch_size", "cliprange", "cliprange_value", "kl_horizon", "kl_target", "rollout_batch_size",
                "reward_clip", "advantage_clip", "max_grad_norm", "samples_per_prompt",
            ),
            non_negative=(
                "weight_decay", "kl_coef", "vf_coef", "critic_warmup_updates", "ptx_coef", "entropy_coef",
                "num_samples", "trainable_layers", "kl_loss_coef",
            ),
            fraction=("gamma", "lam"),
        )
        if score_position not in SCORE_POSITIONS:
            raise ValueError(f"score_position must be one of {SCORE_POSITIONS}, got '{score_position}'")
        if whitening_scope not in WHITENING_SCOPES:
            raise ValueError(f"whitening_scope must be one of {WHITENING_SCOPES}, got '{whitening_scope}'")
        self.check_estimator_arguments(locals())
        self.reward_functions = {path: import_reward_function(path) for path in reward_funcs or []}
        self.lora = lora_settings(type(self).__name__, lora, trainable_layers)
        self.value_lora = lora_settings(type(self).__name__, value_lora, trainable_layers)
        self.save_hyperparameters()
        self.hparams.lora, self.hparams.value_lora = lora_hparam(self.lora), lora_hparam(self.value_lora)
        self.automatic_optimization = False
        self.kl_controller = KLController(kl_coef, kl_target, kl_horizon)  # fixed unless kl_target; checkpointed
        self.score_moments = RunningMoments()  # PPO-max running score statistics, checkpointed
        self.reward_curve = RewardCurve()  # objective/scores per update, checkpointed
        self.strict_loading = False  # checkpoints leave out the frozen reference policy and reward model
        self.init_policy_validation()
        self.policy: Any = None
        self.tokenizer: Any = None
        self.policy_trunk = self.value_trunk = FrozenTrunk()
        self.value_model: Any = None
        self.reward_model: Any = None

    @staticmethod
    def check_estimator_arguments(args: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the arguments when the estimator and the other arguments do not go together."""
        owner, estimator, k = "PPOModule", args["advantage_estimator"], args["samples_per_prompt"]
        require(owner, estimator in ADVANTAGE_ESTIMATORS, f"advantage_estimator must be one of {ADVANTAGE_ESTIMATORS}, got '{estimator}'")
        require(owner, args["kl_penalty"] in KL_PENALTIES, f"kl_penalty must be one of {KL_PENALTIES}, got '{args['kl_penalty']}'")
        mode = args["loss_agg_mode"]
        require(owner, mode in LOSS_AGG_MODES, f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got '{mode}'")
        require(
            owner, estimator not in ("rloo", "grpo", "dr_grpo") or k >= 2,
            f"advantage_estimator='{estimator}' compares the responses to one prompt: samples_per_prompt must be >= 2, got {k}",
        )
        require(
            owner, estimator not in ("gae", "reinforce_pp") or args["kl_penalty"] == "token",
            f"advantage_estimator='{estimator}' puts the KL penalty on each token: kl_penalty must be 'token'",
        )
        if estimator != "gae":
            for name, unused in (("value_model", None), ("value_lora", None), ("critic_warmup_updates", 0), ("whiten_rewards", False)):
                require(owner, args[name] == unused, f"{name} needs a value model (advantage_estimator='gae'); '{estimator}' has none")
        funcs, weights = args["reward_funcs"] or [], args["reward_weights"]
        sources = (args["reward_model"] is not None) + len(funcs)
        require(owner, sources > 0, "no reward: set reward_model, reward_funcs or both")
        require(owner, estimator != "gae" or args["reward_model"] is not None,
                "advantage_estimator='gae' needs reward_model (PPO scores with it and starts its value model from it); "
                "reward functions alone go with a critic-free estimator")
        require(
            owner, weights is None or len(weights) == sources,
            f"reward_weights has {len(weights or [])} values for {sources} reward sources (the reward model first, then reward_funcs)",
        )

    @property
    def whiten_advantages(self) -> bool:
        """Whether advantages are whitened: ``whiten_advantages``, or the estimator's own rule when it is ``None``."""
        hp = self.hparams
        return hp.whiten_advantages if hp.whiten_advantages is not None else hp.advantage_estimator in ("gae", "reinforce_pp")

    # ------------------------------------------------------------------ models
    def load_models(self) -> None:
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.policy)
        self.policy, self.ref_policy = load_policy_and_reference(hp.policy, hp.trainable_layers, hp.ref_policy, self.lora)
        if hp.advantage_estimator != "gae":  # critic-free: no value model at all
            self.reward_model = frozen(ScalarModel.load(hp.reward_model)) if hp.reward_model is not None else None
            return
        value_model = ScalarModel.load(hp.value_model or hp.reward_model)
        if self.value_lora is None:
            self.value_model = freeze_bottom_layers(value_model, hp.trainable_layers)
            self.reward_model = frozen(ScalarModel.load(hp.reward_model))
            return
        self.value_model = add_lora(value_model, self.value_lora, head="scalar_head")
        same_weights = hp.value_model is None or hp.value_model == hp.reward_model
        self.reward_model = AdaptersDisabled(self.value_model) if same_weights else frozen(ScalarModel.load(hp.reward_model))

    def share_frozen_trunks(self) -> None:
        """Find the frozen lower blocks policy/reference and value/reward model share (after any checkpoint load).

        Where all four models hold the same frozen blocks, as deep as each pair's trunk goes, one trunk serves them all
        and runs once per rollout instead of twice: the quickstart's reward model is trained from the SFT checkpoint with
        fewer trainable blocks than PPO's ``trainable_layers``, so its lower blocks are the SFT policy's.
        """
        self.policy_trunk = FrozenTrunk.shared_by(self.policy, self.ref_policy)
        if self.value_model is None:  # critic-free: the reward model alone, sharing the policy's trunk where it can
            common = FrozenTrunk()
            if self.reward_model is not None:
                common = FrozenTrunk.shared_by(self.policy, self.ref_policy, self.reward_model)
            same = self.policy_trunk and common.num_blocks == self.policy_trunk.num_blocks
            self.value_trunk = common if same else FrozenTrunk()
            if same:
                self.policy_trunk = common
            return
        self.value_trunk = FrozenTrunk.shared_by(self.value_model, self.reward_model)
        if self.policy_trunk and self.policy_trunk.num_blocks == self.value_trunk.num_blocks:
            common = FrozenTrunk.shared_by(self.policy, self.ref_policy, self.value_model, self.reward_model)
            if common.num_blocks == self.policy_trunk.num_blocks:
                self.policy_trunk = self.value_trunk = common

    def on_fit_start(self) -> None:
        if self.hparams.critic_warmup_updates and deepspeed_engine(self.trainer.strategy) is not None:
            raise ValueError(
                "ppo: critic_warmup_updates is not supported under DeepSpeed (its optimizer would step the policy "
                "too); use FSDP2 or DDP, or critic_warmup_updates=0"
            )
        torch.manual_seed(self.hparams.seed + self.global_rank * RANK_SEED_STRIDE)  # recipe P11
        self._start_time = time.time()
        super().on_fit_start()

    def values(self, query_responses: torch.Tensor, context_length: int, hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Value estimates ``(B, T)`` at the state before each response token (``hidden``: value-trunk output)."""
        values = self.value_trunk.top(self.value_model)(**model_inputs(query_responses, self.tokenizer.pad_token_id, hidden))
        return values[:, context_length - 1 : -1].float()

    def check_datamodule(self, datamodule: Any) -> None:
        batch_size, num_mini_batches = getattr(datamodule, "batch_size", None), self.hparams.num_mini_batches
        if batch_size is not None:
            k = self.hparams.samples_per_prompt
            episodes = f"data.batch_size={batch_size}" + (f" x model.samples_per_prompt={k}" if k > 1 else "")
            require(
                type(self).__name__, batch_size * k % num_mini_batches == 0,
                f"{episodes} must be a multiple of model.num_mini_batches={num_mini_batches} (each PPO epoch splits the "
                "update's episodes into that many equal mini-batches, recipe P8)",
            )

    @property
    def optimizer_steps_per_update(self) -> int:
        """Optimiser steps of one PPO update (``num_ppo_epochs * num_mini_batches``): ``global_step`` counts these."""
        return self.hparams.num_ppo_epochs * self.hparams.num_mini_batches

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    @property
    def _whitening_all_reduce(self) -> Any:
        """The cross-rank sum whitening statistics use: none for ``whitening_scope="rank"`` (N+, P6)."""
        return self._all_reduce if self.hparams.whitening_scope == "global" else None

    def reward_rows(self, batch: dict[str, Any], k: int = 1) -> Optional[dict[str, list[Any]]]:
        """What reward functions read of a prompt batch, each row repeated ``k`` times: ``prompts`` (the prompt text)
        and the row fields ``reference`` and ``source`` (its name); ``None`` without reward functions."""
        if not self.reward_functions:
            return None
        names = getattr(getattr(self.trainer, "datamodule", None), "source_names", []) if self._trainer is not None else []
        size = batch["query_ids"].size(0)
        sources = [names[int(i)] if int(i) < len(names) else str(int(i)) for i in batch["source"]] if "source" in batch else [""] * size
        fields = {"prompts": batch.get("prompt_text") or [""] * size, "reference": batch.get("reference") or [""] * size, "source": sources}
        return {key: [value for value in values for _ in range(k)] for key, values in fields.items()}

    def combined_rewards(
        self, scores: Optional[torch.Tensor], responses: torch.Tensor, rows: Optional[dict[str, list[Any]]]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the reward sources for ``(B, T)`` responses: the reward model's ``(B,)`` ``scores`` (or
        ``None``) and each reward function on the decoded responses and ``rows`` (:meth:`reward_rows`).

        Returns:
            ``(total, parts)``: ``(B,)`` float32, and each source's unweighted ``(B,)`` values by name.

        Raises:
            RewardFunctionError: a reward function failed (:func:`~lit_rlhf.rewards.call_reward_function`).
        """
        if not self.reward_functions:
            return scores, {}
        weights = list(self.hparams.reward_weights or [1.0] * ((scores is not None) + len(self.reward_functions)))
        parts, total = {}, torch.zeros(responses.size(0), device=responses.device)
        if scores is not None:
            parts["reward_model"] = scores.float()
            total = total + weights.pop(0) * parts["reward_model"]
        rows = dict(rows or {})
        prompts, completions = rows.pop("prompts", [""] * responses.size(0)), decode_responses(self.tokenizer, responses)
        for (name, function), weight in zip(self.reward_functions.items(), weights):
            values = call_reward_function(name, function, prompts, completions, rows)
            parts[name] = torch.tensor(values, dtype=torch.float32, device=responses.device)
            total = total + weight * parts[name]
        return total, parts

    @torch.no_grad()
    def rollout(self, queries: torch.Tensor, rows: Optional[dict[str, list[Any]]] = None) -> dict[str, torch.Tensor]:
        """Sample responses and score them: everything the update needs from the old policy (recipe P2-P7, C1-C4).

        Args:
            queries: ``(B, Q)`` left-padded query ids (a prompt's ``k`` samples on consecutive rows).
            rows: what reward functions read (:meth:`reward_rows`).

        Returns:
            dict of ``query_responses`` ``(B, Q+T)`` (post-processed), ``responses`` ``(B, T)`` (raw samples),
            ``padding_mask`` (policy), ``value_padding_mask`` (values, P5), ``logprobs``, ``ref_logprobs``, ``values``, ``rewards``, ``kl``,
            ``non_score_reward``, ``advantages``, ``returns`` (each ``(B, T)``) and ``scores`` ``(B,)``; with
            frozen trunks also ``policy_hidden`` / ``value_hidden`` ``(B, Q+T, H)``, reused by every PPO epoch. Without
            a value model (critic-free estimators) no ``values``, ``returns`` or ``value_hidden``; with reward functions
            ``reward_parts`` (each source's ``(B,)`` values).
        """
        hp, tok = self.hparams, self.tokenizer
        pad, eos, context_length = tok.pad_token_id, stop_token_ids(tok), queries.size(1)  # eos: every stop id
        # 1. rollout: exactly `response_length` tokens, EOS does not stop sampling (P2)
        responses = generate(self.policy, queries, pad, eos, hp.response_length, hp.temperature)  # (B, T)
        # 2. response processing: truncate after the first EOS (P3)
        postprocessed = truncate_after_eos(responses, eos, pad) if hp.truncate_after_eos else responses  # (B, T)
        query_responses = torch.cat([queries, postprocessed], dim=1)  # (B, Q+T)
        # 3. logprobs of policy and reference with temperature-scaled logits (P4), values and RM scores
        #    (frozen lower blocks shared by policy/reference and value/reward model run once: FrozenTrunk)
        logprobs, ref_logprobs, values, scores, policy_hidden, value_hidden = [], [], [], [], [], []
        policy, ref_policy = self.policy_trunk.top(self.policy), self.policy_trunk.top(self.ref_policy)
        reward_model = self.value_trunk.top(self.reward_model) if self.reward_model is not None else None
        critic = self.value_model is not None
        for part in self.row_chunks(queries.size(0)):
            qr = query_responses[part]
            policy_hidden.append(self.policy_trunk(qr, pad))  # (b, Q+T, H) or None
            value_hidden.append(policy_hidden[-1] if self.value_trunk is self.policy_trunk else self.value_trunk(qr, pad))
            logprobs.append(response_logprobs(policy, qr, context_length, pad, hp.temperature, hidden=policy_hidden[-1]))
            ref_logprobs.append(response_logprobs(ref_policy, qr, context_length, pad, hp.temperature, hidden=policy_hidden[-1]))
            if critic:
                values.append(self.values(qr, context_length, hidden=value_hidden[-1]))
            if reward_model is not None:
                scores.append(sequence_scores(reward_model, qr, pad, hidden=value_hidden[-1]))
        logprobs, ref_logprobs = torch.cat(logprobs), torch.cat(ref_logprobs)  # (B, T)
        values, scores = (torch.cat(values) if critic else None), (torch.cat(scores) if scores else None)  # (B, T), (B,)
        if scores is not None:
            self.check_finite("reward-model score", scores)
        scores, reward_parts = self.combined_rewards(scores, postprocessed, rows)  # + reward functions (weighted)
        trunks = {}
        if policy_hidden[0] is not None:
            trunks["policy_hidden"] = torch.cat(policy_hidden)
        if critic and value_hidden[0] is not None:  # one trunk for all four models: the same tensor, not a copy
            trunks["value_hidden"] = trunks["policy_hidden"] if self.value_trunk is self.policy_trunk else torch.cat(value_hidden)
        # 4. no EOS -> penalty score (P3); policy positions after the last real token L are masked (P4), values
        #    after L + 1 with the N+ score position (padding_mask_p1, P5)
        last_index = first_true_indices(postprocessed == pad) - 1  # (B,) index L of EOS / last token
        scores = eos_penalized(scores, postprocessed, eos, hp.non_eos_penalty, hp.penalty_reward_value, hp.missing_eos_penalty)
        response_length = postprocessed.size(1)
        padding_mask, value_padding_mask = response_padding_masks(last_index, response_length, hp.score_position)  # (B, T)
        logprobs = logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
        ref_logprobs = ref_logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
        # PPO-max (off by default): running score normalisation / scaling, clipping
        shaped_scores = self.shape_scores(scores)
        # 5. rewards: per-token KL penalty, RM score at L + 1 (N+) or L (P5; critic-free: on the last real token)
        score_index = score_indices(last_index, response_length, hp.score_position if critic else "eos")  # (B,)
        rewards, kl, non_score_reward = kl_penalty_rewards(logprobs, ref_logprobs, shaped_scores, score_index, self.kl_controller.value)
        data = {
            "query_responses": query_responses, "responses": responses, "padding_mask": padding_mask,
            "value_padding_mask": value_padding_mask, "logprobs": logprobs, "ref_logprobs": ref_logprobs,
            "scores": scores, "rewards": rewards, "kl": kl, "non_score_reward": non_score_reward, **trunks,
        }
        if reward_parts:
            data["reward_parts"] = reward_parts
        if not critic:  # 6. critic-free advantages (C1-C4)
            data["advantages"] = self.critic_free_advantages(shaped_scores, rewards, non_score_reward, ~padding_mask)
            return data
        values = values.masked_fill(value_padding_mask, 0.0)
        if hp.whiten_rewards:  # P6 (off by default), over the value mask
            rewards = masked_whiten(rewards, ~value_padding_mask, shift_mean=False, all_reduce=self._whitening_all_reduce)
            rewards = rewards.masked_fill(value_padding_mask, 0.0)
        # 6. advantages and returns: GAE (P7); advantages whitened over the policy mask with the biased variance,
        #    per process (N+) or over the global batch (P6)
        advantages, returns = gae_advantages(rewards, values, hp.gamma, hp.lam)
        if self.whiten_advantages:
            advantages = masked_whiten(advantages, ~padding_mask, all_reduce=self._whitening_all_reduce)
        advantages = advantages.masked_fill(padding_mask, 0.0)
        return {**data, "rewards": rewards, "values": values, "advantages": advantages, "returns": returns}

    def critic_free_advantages(
        self, scores: torch.Tensor, rewards: torch.Tensor, non_score_reward: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """``(B, T)`` advantages of the critic-free estimators (recipe C1-C4), 0 at masked positions.

        Args:
            scores: ``(B,)`` sequence rewards (after the EOS rule and any PPO-max shaping), ``k`` rows per prompt.
            rewards: ``(B, T)`` token rewards: ``-kl_coef * KL_t`` with the score on the last real token.
            non_score_reward: ``(B, T)`` the KL penalty alone.
            mask: ``(B, T)`` bool, true on real response tokens.
        """
        hp = self.hparams
        estimator, k, all_reduce = hp.advantage_estimator, hp.samples_per_prompt, self._whitening_all_reduce
        if estimator == "reinforce_pp":  # returns to go of the token rewards, whitened over the (global) batch
            return reinforce_pp_advantages(rewards, mask, all_reduce) if self.whiten_advantages else returns_to_go(rewards, mask)
        sequence_rewards = scores.float() + non_score_reward.sum(1) if hp.kl_penalty == "sequence" else scores.float()
        if estimator == "rloo":
            sequence_advantages = rloo_advantages(sequence_rewards, k)
        else:
            sequence_advantages = group_normalized_advantages(sequence_rewards, k, scale=estimator == "grpo")
        advantages = sequence_to_tokens(sequence_advantages, mask)
        if hp.kl_penalty == "token":  # the KL penalty still to come from each token on (0 with kl_coef 0)
            advantages = advantages + returns_to_go(non_score_reward, mask)
        if self.whiten_advantages:
            advantages = masked_whiten(advantages, mask, all_reduce=all_reduce)
        return advantages.masked_fill(~mask, 0.0)

    def shape_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """PPO-max score reparameterisation of ``(B,)`` scores (identity with the N+ defaults)."""
        hp = self.hparams
        if hp.reward_norm or hp.reward_scaling:
            self.score_moments.update(scores, all_reduce=self._all_reduce)
            mean, std = self.score_moments.mean, self.score_moments.std
            return normalize_scores(scores, mean, std, shift_mean=hp.reward_norm, clip=hp.reward_clip)
        return scores.clamp(-hp.reward_clip, hp.reward_clip) if hp.reward_clip is not None else scores

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        batch, ptx_batch = (batch["prompts"], batch["ptx"]) if "prompts" in batch else (batch, None)  # PPO-ptx data
        k = hp.samples_per_prompt  # a prompt's k samples on consecutive rows of this process (C1-C3: exact groups)
        queries = batch["query_ids"].repeat_interleave(k, dim=0) if k > 1 else batch["query_ids"]  # (B, Q), B episodes
        context_length, batch_size = queries.size(1), queries.size(0)
        update = self.global_step // self.optimizer_steps_per_update  # updates done before this one
        value_only = update < hp.critic_warmup_updates  # PPO-max critic pre-training
        data = self.rollout(queries, self.reward_rows(batch, k))

        # 7. PPO epochs over minibatches (P8), gradient accumulation over micro-batches
        mini_batch_size = batch_size // hp.num_mini_batches
        micro_batch_size = min(hp.micro_batch_size or mini_batch_size, mini_batch_size)
        stats: dict[str, list[torch.Tensor]] = {}
        for _ in range(hp.num_ppo_epochs):
            order = torch.randperm(batch_size, device=queries.device)
            for mini_start in range(0, batch_size, mini_batch_size):
                mini = order[mini_start : mini_start + mini_batch_size]
                advantages = data["advantages"].clone()  # PPO-max: re-normalised over the minibatch (off by default)
                if hp.advantage_norm or hp.advantage_clip is not None:
                    advantages[mini] = minibatch_advantages(
                        data["advantages"][mini], ~data["padding_mask"][mini], hp.advantage_norm, hp.advantage_clip,
                        self._whitening_all_reduce,
                    )
                micro_batches = mini.split(micro_batch_size)
                for index, micro in enumerate(micro_batches):
                    accumulation_boundary(self.trainer.strategy, index == len(micro_batches) - 1)  # DeepSpeed
                    loss, step_stats = self.ppo_loss({**data, "advantages": advantages}, micro, context_length, value_only)
                    loss = loss / len(micro_batches)
                    if ptx_batch is not None and hp.ptx_coef and index == len(micro_batches) - 1:
                        # PPO-ptx, in the same backward (DDP expects one gradient reduction per backward)
                        ptx_loss = self.ptx_loss(ptx_batch)
                        loss = loss + (0.0 if value_only else hp.ptx_coef) * ptx_loss
                        step_stats["loss/ptx"] = ptx_loss.detach()
                    self.manual_backward(loss)
                    for key, value in step_stats.items():
                        stats.setdefault(key, []).append(value)
                if value_only:  # AdamW skips parameters without a gradient: no weight decay on the policy either
                    for param in self.policy.parameters():
                        param.grad = None
                if hp.max_grad_norm is not None:  # DeepSpeed: its gradient_clipping (prepare_deepspeed)
                    self.clip_gradients(optimizer, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()
                optimizer.zero_grad()
                self.check_parameters()
        self.log_update(data, stats, batch_size, batch_idx)
        if hp.kl_target is not None:  # adaptive KL (Ziegler et al. 2019): the global batch's mean KL per episode
            mean_kl = self.trainer.strategy.reduce(data["kl"].sum(1).mean(), reduce_op="mean")
            self.kl_controller.update(float(mean_kl), n_steps=batch_size * self.trainer.world_size)
        if hp.anneal_lr:
            scheduler.step()

    def ptx_loss(self, ptx_batch: dict[str, Any]) -> torch.Tensor:
        """PPO-ptx: the SFT cross-entropy of the policy on (query + reference) rows ``input_ids`` ``(b, L)``."""
        ids = ptx_batch["input_ids"]
        logits = self.policy(**model_inputs(ids, self.tokenizer.pad_token_id)).logits
        return sequence_cross_entropy(logits, ids, ids != self.tokenizer.pad_token_id)

    def ppo_loss(
        self, data: dict[str, torch.Tensor], rows: torch.Tensor, context_length: int, value_only: bool = False
    ) -> tuple[torch.Tensor, dict]:
        """``policy loss + vf_coef * value loss + kl_loss_coef * k3 KL - entropy_coef * entropy`` on the rollout rows
        ``rows`` (recipe P8, C2), and detached stats; ``value_only`` (critic pre-training) keeps the value term alone;
        without a value model (critic-free) there is no value term.

        Each term is a masked mean over these rows alone: the policy loss and entropy over the policy mask, the value
        loss over the value mask (positions up to ``L + 1`` with the N+ score position, P5)."""
        hp = self.hparams
        padding_mask, value_padding_mask = data["padding_mask"][rows], data["value_padding_mask"][rows]  # (b, T)
        mask = ~padding_mask
        query_responses = data["query_responses"][rows]  # (b, Q+T)
        policy_hidden = data["policy_hidden"][rows] if "policy_hidden" in data else None  # (b, Q+T, H): frozen trunk
        value_hidden = data["value_hidden"][rows] if "value_hidden" in data else None
        policy, pad = self.policy_trunk.top(self.policy), self.tokenizer.pad_token_id
        new_logprobs, entropy = response_logprobs(
            policy, query_responses, context_length, pad, hp.temperature, return_entropy=True, hidden=policy_hidden
        )
        new_logprobs = new_logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
        pg_loss, pg_stats = ppo_policy_loss(
            new_logprobs, data["logprobs"][rows], data["advantages"][rows], mask, hp.cliprange, hp.loss_agg_mode
        )
        entropy = entropy if hp.entropy_coef else entropy.detach()  # no backward through it unless it is used
        mean_entropy = masked_mean(entropy, mask)
        stats = {"loss/policy": pg_loss.detach(), "policy/entropy": mean_entropy.detach(), **pg_stats}
        # critic pre-training: the policy term weighs 0 (every parameter still gets a gradient, as DDP expects)
        loss = (0.0 if value_only else 1.0) * pg_loss
        if self.value_model is not None:
            new_values = self.values(query_responses, context_length, hidden=value_hidden).masked_fill(value_padding_mask, 0.0)
            vf_loss, vf_stats = ppo_value_loss(
                new_values, data["values"][rows], data["returns"][rows], ~value_padding_mask, hp.cliprange_value
            )
            loss = loss + hp.vf_coef * vf_loss
            stats.update({"loss/value": vf_loss.detach(), **vf_stats})
        if hp.kl_loss_coef:  # GRPO: beta * k3 KL to the reference in the loss (C2), aggregated as the policy loss
            kl_loss = aggregate_loss(k3_kl(new_logprobs, data["ref_logprobs"][rows]), mask, hp.loss_agg_mode)
            loss = loss + hp.kl_loss_coef * kl_loss
            stats["loss/kl"] = kl_loss.detach()
        if hp.entropy_coef and not value_only:
            loss = loss - hp.entropy_coef * mean_entropy
        return loss, stats

    def log_update(self, data: dict[str, torch.Tensor], stats: dict[str, list[torch.Tensor]], batch_size: int, batch_idx: int) -> None:
        """Log the N+ metrics (recipe P10), averaged over ranks."""
        mask = ~data["padding_mask"]
        mean = lambda key: torch.stack(stats[key]).mean()  # noqa: E731
        metrics = {
            "objective/kl": data["kl"].sum(1).mean(),
            "objective/entropy": (-data["logprobs"] * mask).sum(1).mean(),
            "objective/non_score_reward": data["non_score_reward"].sum(1).mean(),
            "objective/rlhf_reward": (data["scores"] + data["non_score_reward"].sum(1)).mean(),
            "objective/scores": data["scores"].mean(),
            "policy/approxkl": mean("approxkl"),
            "policy/clipfrac": mean("clipfrac"),
            "policy/entropy": mean("policy/entropy"),
            "loss/policy": mean("loss/policy"),
            "val/ratio": mean("ratio"),
            "val/ratio_var": mean("ratio_var"),
            "val/num_eos_tokens": is_stop(data["responses"], stop_token_ids(self.tokenizer)).sum().float(),
            "objective/response_length": mask.sum(1).float().mean(),
            # PPO-max monitoring: perplexity of the responses under the sampling distribution (temperature-scaled, P4)
            "objective/perplexity": torch.exp(masked_mean(-data["logprobs"], mask)),
            "lr": self.optimizers().param_groups[0]["lr"],
            "objective/kl_coef": self.kl_controller.value,  # the coefficient of this update's rewards
        }
        for key, name in (("loss/value", "loss/value"), ("vf_clipfrac", "val/clipfrac"), ("loss/ptx", "loss/ptx"), ("loss/kl", "loss/kl")):
            if key in stats:
                metrics[name] = mean(key)
        for name, values in data.get("reward_parts", {}).items():  # each reward source's mean, unweighted
            metrics[f"objective/reward/{name}"] = values.mean()
        if self.hparams.reward_norm or self.hparams.reward_scaling:
            metrics["objective/scores_running_mean"] = self.score_moments.mean
            metrics["objective/scores_running_std"] = self.score_moments.std
        self.log_metrics(metrics, sync_dist=True, batch_size=batch_size)
        self.reward_curve.values.append(float(self.trainer.strategy.reduce(metrics["objective/scores"].detach(), reduce_op="mean")))
        episodes = (batch_idx + 1) * batch_size * self.trainer.world_size
        self.log("eps", episodes / max(1e-6, time.time() - self._start_time), prog_bar=True, rank_zero_only=True)
        self.log("objective/scores_mean", metrics["objective/scores"], prog_bar=True, sync_dist=True, batch_size=batch_size)

    @property
    def training_rewards(self) -> list[float]:
        """The mean training reward (``objective/scores``) of every update so far."""
        return self.reward_curve.values

    # -------------------------------------------------------------- validation (PolicyValidation)
    def validation_rewards(self, sample: dict[str, torch.Tensor], batch: dict[str, Any]) -> Optional[torch.Tensor]:
        """With reward functions: the training reward of the validation samples (weighted sum, EOS rule)."""
        if not self.reward_functions:
            return None
        hp = self.hparams
        total, _ = self.combined_rewards(sample.get("raw_scores"), sample["postprocessed"], self.reward_rows(batch))
        stops = stop_token_ids(self.tokenizer)
        return eos_penalized(total, sample["postprocessed"], stops, hp.non_eos_penalty, hp.penalty_reward_value, hp.missing_eos_penalty)

    def eval_reference(self) -> torch.nn.Module:
        return self.ref_policy

    def exported_model(self) -> torch.nn.Module:
        return self.policy

    def exported_models(self) -> dict[str, torch.nn.Module]:
        """The policy, and the value model in ``value/`` (none for the critic-free estimators)."""
        return {"": self.policy, "value": self.value_model} if self.value_model is not None else {"": self.policy}
