"""PPO with manual optimisation and its own rollout loop (recipe P1-P11).

One ``training_step`` is one PPO update and reads in the order of the N+ code: rollout, response
processing, rewards, advantages, then the epoch / minibatch loop. The math lives in
:mod:`lit_rlhf.algorithms`; this module only wires models and data to it.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch

from lit_rlhf.algorithms import (
    INVALID_LOGPROB,
    SCORE_POSITIONS,
    KLController,
    RunningMoments,
    eos_penalized,
    first_true_indices,
    gae_advantages,
    is_stop,
    kl_penalty_rewards,
    masked_mean,
    masked_whiten,
    minibatch_advantages,
    normalize_scores,
    ppo_policy_loss,
    ppo_value_loss,
    response_padding_masks,
    score_indices,
    sequence_cross_entropy,
    truncate_after_eos,
)
from lit_rlhf.arguments import check_arguments, require
from lit_rlhf.models.forward import generate, model_inputs, response_logprobs, sequence_scores
from lit_rlhf.models.loading import load_tokenizer, stop_token_ids
from lit_rlhf.models.lora import AdaptersDisabled, LoRA, add_lora
from lit_rlhf.models.parallel import accumulation_boundary, deepspeed_engine
from lit_rlhf.models.scalar import ScalarModel
from lit_rlhf.models.trunk import FrozenTrunk
from lit_rlhf.stages.common import (
    StageModule,
    freeze_bottom_layers,
    frozen,
    load_policy_and_reference,
    lora_hparam,
    lora_settings,
)
from lit_rlhf.stages.policy_eval import RANK_SEED_STRIDE, PolicyValidation

#: ``whitening_scope`` values: each process's own batch (N+) or the global batch.
WHITENING_SCOPES = ("rank", "global")


class PPOModule(PolicyValidation, StageModule):
    """PPO on a reward model with a per-token KL penalty (recipe P1-P11, N+ defaults).

    The defaults are the N+ code (``summarize_from_feedback_details/ppo.py``); where an argument offers another
    behaviour, its entry says which value is N+'s.

    Args:
        policy: SFT checkpoint; initialises the policy and the frozen reference policy (P1).
        ref_policy: a different reference policy checkpoint (``None`` = ``policy``); e.g. to validate a DPO policy
            against the SFT one.
        reward_model: trained reward model directory (frozen).
        value_model: initialises the value model, a separate network (P1); ``None`` = ``reward_model``.
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
    """

    stage_name = "ppo"

    #: recipe P8: linear annealing to 0, stepped once per update
    schedule = "linear"
    frozen_submodules = ("ref_policy", "reward_model")

    def __init__(
        self,
        policy: str = "smollm2-135m",
        reward_model: str = "runs/rm/model",
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
    ) -> None:
        super().__init__()
        check_arguments(
            type(self).__name__, locals(),
            positive=(
                "lr", "eps", "response_length", "temperature", "eval_temperature", "num_ppo_epochs", "num_mini_batches",
                "micro_batch_size", "cliprange", "cliprange_value", "kl_horizon", "kl_target", "rollout_batch_size",
                "reward_clip", "advantage_clip", "max_grad_norm",
            ),
            non_negative=(
                "weight_decay", "kl_coef", "vf_coef", "critic_warmup_updates", "ptx_coef", "entropy_coef",
                "num_samples", "trainable_layers",
            ),
            fraction=("gamma", "lam"),
        )
        if score_position not in SCORE_POSITIONS:
            raise ValueError(f"score_position must be one of {SCORE_POSITIONS}, got '{score_position}'")
        if whitening_scope not in WHITENING_SCOPES:
            raise ValueError(f"whitening_scope must be one of {WHITENING_SCOPES}, got '{whitening_scope}'")
        self.lora = lora_settings(type(self).__name__, lora, trainable_layers)
        self.value_lora = lora_settings(type(self).__name__, value_lora, trainable_layers)
        self.save_hyperparameters()
        self.hparams.lora, self.hparams.value_lora = lora_hparam(self.lora), lora_hparam(self.value_lora)
        self.automatic_optimization = False
        self.kl_controller = KLController(kl_coef, kl_target, kl_horizon)  # fixed unless kl_target; checkpointed
        self.score_moments = RunningMoments()  # PPO-max running score statistics, checkpointed
        self.strict_loading = False  # checkpoints leave out the frozen reference policy and reward model
        self.init_policy_validation()
        self.policy: Any = None
        self.tokenizer: Any = None
        self.policy_trunk = self.value_trunk = FrozenTrunk()

    # ------------------------------------------------------------------ models
    def load_models(self) -> None:
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.policy)
        self.policy, self.ref_policy = load_policy_and_reference(hp.policy, hp.trainable_layers, hp.ref_policy, self.lora)
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
            require(
                type(self).__name__, batch_size % num_mini_batches == 0,
                f"data.batch_size={batch_size} must be a multiple of model.num_mini_batches={num_mini_batches} "
                "(each PPO epoch splits the update's batch into that many equal mini-batches, recipe P8)",
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

    @torch.no_grad()
    def rollout(self, queries: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sample responses and score them: everything PPO needs from the old policy (recipe P2-P7).

        Args:
            queries: ``(B, Q)`` left-padded query ids.

        Returns:
            dict of ``query_responses`` ``(B, Q+T)`` (post-processed), ``responses`` ``(B, T)`` (raw samples),
            ``padding_mask`` (policy), ``value_padding_mask`` (values, P5), ``logprobs``, ``ref_logprobs``, ``values``, ``rewards``, ``kl``,
            ``non_score_reward``, ``advantages``, ``returns`` (each ``(B, T)``) and ``scores`` ``(B,)``; with
            frozen trunks also ``policy_hidden`` / ``value_hidden`` ``(B, Q+T, H)``, reused by every PPO epoch.
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
        reward_model = self.value_trunk.top(self.reward_model)
        for part in self.row_chunks(queries.size(0)):
            qr = query_responses[part]
            policy_hidden.append(self.policy_trunk(qr, pad))  # (b, Q+T, H) or None
            value_hidden.append(policy_hidden[-1] if self.value_trunk is self.policy_trunk else self.value_trunk(qr, pad))
            logprobs.append(response_logprobs(policy, qr, context_length, pad, hp.temperature, hidden=policy_hidden[-1]))
            ref_logprobs.append(response_logprobs(ref_policy, qr, context_length, pad, hp.temperature, hidden=policy_hidden[-1]))
            values.append(self.values(qr, context_length, hidden=value_hidden[-1]))
            scores.append(sequence_scores(reward_model, qr, pad, hidden=value_hidden[-1]))
        logprobs, ref_logprobs = torch.cat(logprobs), torch.cat(ref_logprobs)  # (B, T)
        values, scores = torch.cat(values), torch.cat(scores)  # (B, T), (B,)
        self.check_finite("reward-model score", scores)
        trunks = {}
        if policy_hidden[0] is not None:
            trunks["policy_hidden"] = torch.cat(policy_hidden)
        if value_hidden[0] is not None:  # one trunk for all four models: the same tensor, not a copy
            trunks["value_hidden"] = trunks["policy_hidden"] if self.value_trunk is self.policy_trunk else torch.cat(value_hidden)
        # 4. no EOS -> penalty score (P3); policy positions after the last real token L are masked (P4), values
        #    after L + 1 with the N+ score position (padding_mask_p1, P5)
        last_index = first_true_indices(postprocessed == pad) - 1  # (B,) index L of EOS / last token
        scores = eos_penalized(scores, postprocessed, eos, hp.non_eos_penalty, hp.penalty_reward_value, hp.missing_eos_penalty)
        response_length = postprocessed.size(1)
        padding_mask, value_padding_mask = response_padding_masks(last_index, response_length, hp.score_position)  # (B, T)
        logprobs = logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
        ref_logprobs = ref_logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
        values = values.masked_fill(value_padding_mask, 0.0)
        # PPO-max (off by default): running score normalisation / scaling, clipping
        shaped_scores = self.shape_scores(scores)
        # 5. rewards: per-token KL penalty, RM score at L + 1 (N+) or L (P5)
        score_index = score_indices(last_index, response_length, hp.score_position)  # (B,)
        rewards, kl, non_score_reward = kl_penalty_rewards(logprobs, ref_logprobs, shaped_scores, score_index, self.kl_controller.value)
        if hp.whiten_rewards:  # P6 (off by default), over the value mask
            rewards = masked_whiten(rewards, ~value_padding_mask, shift_mean=False, all_reduce=self._whitening_all_reduce)
            rewards = rewards.masked_fill(value_padding_mask, 0.0)
        # 6. advantages and returns: GAE (P7); advantages whitened over the policy mask with the biased variance,
        #    per process (N+) or over the global batch (P6)
        advantages, returns = gae_advantages(rewards, values, hp.gamma, hp.lam)
        advantages = masked_whiten(advantages, ~padding_mask, all_reduce=self._whitening_all_reduce).masked_fill(padding_mask, 0.0)
        return {
            "query_responses": query_responses, "responses": responses, "padding_mask": padding_mask,
            "value_padding_mask": value_padding_mask, "logprobs": logprobs, "ref_logprobs": ref_logprobs, "values": values,
            "scores": scores, "rewards": rewards, "kl": kl, "non_score_reward": non_score_reward,
            "advantages": advantages, "returns": returns, **trunks,
        }

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
        queries = batch["query_ids"]  # (B, Q)
        context_length, batch_size = queries.size(1), queries.size(0)
        update = self.global_step // self.optimizer_steps_per_update  # updates done before this one
        value_only = update < hp.critic_warmup_updates  # PPO-max critic pre-training
        data = self.rollout(queries)

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
        """``policy loss + vf_coef * value loss - entropy_coef * entropy`` on the rollout rows ``rows`` (recipe P8),
        and detached stats; ``value_only`` (critic pre-training) keeps the value term alone.

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
        new_values = self.values(query_responses, context_length, hidden=value_hidden).masked_fill(value_padding_mask, 0.0)
        pg_loss, pg_stats = ppo_policy_loss(new_logprobs, data["logprobs"][rows], data["advantages"][rows], mask, hp.cliprange)
        vf_loss, vf_stats = ppo_value_loss(
            new_values, data["values"][rows], data["returns"][rows], ~value_padding_mask, hp.cliprange_value
        )
        entropy = entropy if hp.entropy_coef else entropy.detach()  # no backward through it unless it is used
        mean_entropy = masked_mean(entropy, mask)
        stats = {"loss/policy": pg_loss.detach(), "loss/value": vf_loss.detach(), "policy/entropy": mean_entropy.detach()}
        # critic pre-training: the policy term weighs 0 (every parameter still gets a gradient, as DDP expects)
        loss = (0.0 if value_only else 1.0) * pg_loss + hp.vf_coef * vf_loss
        if hp.entropy_coef and not value_only:
            loss = loss - hp.entropy_coef * mean_entropy
        return loss, {**stats, **pg_stats, **vf_stats}

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
            "loss/value": mean("loss/value"),
            "val/clipfrac": mean("vf_clipfrac"),
            "val/ratio": mean("ratio"),
            "val/ratio_var": mean("ratio_var"),
            "val/num_eos_tokens": is_stop(data["responses"], stop_token_ids(self.tokenizer)).sum().float(),
            "objective/response_length": mask.sum(1).float().mean(),
            # PPO-max monitoring: perplexity of the responses under the sampling distribution (temperature-scaled, P4)
            "objective/perplexity": torch.exp(masked_mean(-data["logprobs"], mask)),
            "lr": torch.tensor(self.optimizers().param_groups[0]["lr"]),
            "objective/kl_coef": torch.tensor(self.kl_controller.value),  # the coefficient of this update's rewards
        }
        if "loss/ptx" in stats:
            metrics["loss/ptx"] = mean("loss/ptx")
        if self.hparams.reward_norm or self.hparams.reward_scaling:
            metrics["objective/scores_running_mean"] = torch.tensor(self.score_moments.mean)
            metrics["objective/scores_running_std"] = torch.tensor(self.score_moments.std)
        self.log_dict(metrics, sync_dist=True, batch_size=batch_size)
        episodes = (batch_idx + 1) * batch_size * self.trainer.world_size
        self.log("eps", episodes / max(1e-6, time.time() - self._start_time), prog_bar=True, rank_zero_only=True)
        self.log("objective/scores_mean", metrics["objective/scores"], prog_bar=True, sync_dist=True, batch_size=batch_size)

    # -------------------------------------------------------------- validation (PolicyValidation)
    def eval_reference(self) -> torch.nn.Module:
        return self.ref_policy

    def exported_model(self) -> torch.nn.Module:
        return self.policy

    def exported_models(self) -> dict[str, torch.nn.Module]:
        """The policy, and the value model in ``value/``."""
        return {"": self.policy, "value": self.value_model}
