"""Online iterative DPO (Dong et al. 2024, "RLHF Workflow", recipe §3) with manual optimisation.

Why this shape: an iteration generates its own training data, then trains on it for several passes, so it
cannot be a stream of Lightning batches. Each Lightning *epoch* is one iteration and its single batch is the
iteration's prompts; ``training_step`` runs the iteration's loop top to bottom (sample K responses, score,
pair, DPO epochs). Lightning then checkpoints at every epoch end and resumes at the next epoch, so a run can be
continued from any iteration's checkpoint; sampling is seeded per iteration, so a resumed run matches an
uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from lit_rlhf.algorithms import PAIR_STRATEGIES, dpo_loss, select_pairs
from lit_rlhf.arguments import check_arguments
from lit_rlhf.models.forward import response_logprob_sums, response_logprobs
from lit_rlhf.models.loading import load_causal_lm, load_tokenizer
from lit_rlhf.models.lora import LoRA
from lit_rlhf.models.parallel import accumulation_boundary, copy_weights
from lit_rlhf.models.scalar import ScalarModel
from lit_rlhf.models.trunk import FrozenTrunk
from lit_rlhf.stages.common import (
    StageModule,
    decode_query,
    decode_responses,
    frozen,
    load_policy_and_reference,
    lora_hparam,
    lora_settings,
)
from lit_rlhf.stages.policy_eval import RANK_SEED_STRIDE, PolicyValidation, sample_and_score

REFERENCES = ("sft", "previous")


class OnlineDPOModule(PolicyValidation, StageModule):
    """Online iterative DPO against a trained reward model (recipe §3).

    Iteration ``t`` (= training epoch ``t``), on the epoch's batch of P prompts:

    1. sample ``samples_per_prompt`` (K) responses per prompt from the current policy (temperature
       ``temperature``, exactly ``response_length`` tokens, truncated after the first EOS as in PPO, P2/P3);
    2. score them with the reward model, a response without EOS getting ``penalty_reward_value`` (P3);
    3. build one pair per prompt (:func:`~lit_rlhf.algorithms.select_pairs`; ties dropped);
    4. run ``dpo_epochs`` passes of DPO over the pairs in minibatches of ``dpo_batch_size`` (reference logprobs
       computed once per iteration without gradient and reused by every pass);
    5. the updated policy samples the next iteration. The reference is the SFT policy (``reference="sft"``) or
       the policy as it was at the start of the iteration (``"previous"``).

    Logged per iteration: ``iteration/scores`` (mean RM score of all samples), ``iteration/best_of_k``,
    ``iteration/pair_margin`` (RM score of chosen minus rejected), ``iteration/pairs``, ``iteration/kl`` (to the
    SFT policy, sum over tokens, temperature-scaled logprobs as P4), ``iteration/response_length``,
    ``iteration/eos_fraction``, the DPO loss and implicit-reward accuracy, and a sample table
    (``iteration_samples``). Validation is that of PPO (:class:`~lit_rlhf.stages.policy_eval.PolicyValidation`).

    Args:
        policy: SFT checkpoint; initialises the policy (and the reference / SFT policy for KL).
        reward_model: trained reward model directory (frozen).
        samples_per_prompt: K (paper 8, their script 4).
        response_length: tokens sampled per response (53 as in PPO).
        temperature: sampling temperature of the iterations (paper 1.0); also scales the KL logprobs.
        eval_temperature: sampling temperature of validation (0.01, near-greedy, as N+'s PPO validation; the
            quickstart uses 0.7 for every policy, see ``configs/quickstart/ppo.yaml``).
        truncate_after_eos, non_eos_penalty, penalty_reward_value: EOS handling as PPO (P3).
        pair_strategy: ``"best_vs_worst"`` (paper) or ``"best_vs_random"``.
        length_penalty: reward units per response token subtracted before ranking (0 = off).
        beta, label_smoothing, loss_type: DPO loss (paper: beta 0.1, sigmoid).
        reference: ``"sft"`` (fixed) or ``"previous"`` (the previous iteration's policy).
        dpo_epochs: passes over each iteration's pairs (paper 2).
        dpo_batch_size: pairs per optimiser step.
        lr: AdamW learning rate (paper 5e-7), constant.
        eps, weight_decay: AdamW settings.
        seed: base seed; iteration ``t`` on rank ``r`` samples with ``seed + t + r * 100003``.
        rollout_batch_size: sequences per generation / scoring call (``None`` = all P*K at once).
        num_samples: rows kept for the sample tables.
        trainable_layers: train only the top N blocks (``None`` = all); the frozen lower blocks the policy shares
            with the reference run once per batch (:class:`~lit_rlhf.models.trunk.FrozenTrunk`).
        lora: train LoRA adapters (peft) on the frozen SFT model instead of all weights (``None`` = off); exclusive
            with ``trainable_layers``. The export merges them (``lora.merge_on_export``).
            The SFT reference is then the policy with its adapters disabled; ``reference="previous"`` is not offered.
    """

    stage_name = "online-dpo"

    schedule = "constant"
    frozen_submodules = ("ref_policy", "sft_policy", "reward_model")

    def __init__(
        self,
        policy: str = "runs/sft/model",
        reward_model: str = "runs/rm/model",
        samples_per_prompt: int = 4,
        response_length: int = 53,
        temperature: float = 1.0,
        eval_temperature: float = 0.01,
        truncate_after_eos: bool = True,
        non_eos_penalty: bool = True,
        penalty_reward_value: float = -1.0,
        pair_strategy: str = "best_vs_worst",
        length_penalty: float = 0.0,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        loss_type: str = "sigmoid",
        reference: str = "sft",
        dpo_epochs: int = 2,
        dpo_batch_size: int = 8,
        lr: float = 5e-7,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        seed: int = 1,
        rollout_batch_size: Optional[int] = None,
        num_samples: int = 8,
        trainable_layers: Optional[int] = None,
        lora: Optional[LoRA] = None,
    ) -> None:
        super().__init__()
        check_arguments(
            type(self).__name__, locals(),
            positive=(
                "lr", "eps", "beta", "response_length", "temperature", "eval_temperature", "dpo_epochs",
                "dpo_batch_size", "rollout_batch_size",
            ),
            non_negative=("weight_decay", "length_penalty", "num_samples", "trainable_layers"),
            fraction=("label_smoothing",),
        )
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got '{reference}'")
        if pair_strategy not in PAIR_STRATEGIES:
            raise ValueError(f"pair_strategy must be one of {PAIR_STRATEGIES}, got '{pair_strategy}'")
        if samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be at least 2 to form pairs, got {samples_per_prompt}")
        dpo_loss(*torch.zeros(4, 1), beta=beta, label_smoothing=label_smoothing, loss_type=loss_type)  # validate early
        self.lora = lora_settings(type(self).__name__, lora, trainable_layers)
        if self.lora is not None and reference == "previous":
            raise ValueError("OnlineDPOModule: reference='previous' needs a second full copy; with lora use reference='sft'")
        self.save_hyperparameters()
        self.hparams.lora = lora_hparam(self.lora)
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints leave out the frozen models
        self.init_policy_validation()
        self.iteration_samples: list[dict[str, Any]] = []
        self.policy: Any = None
        self.tokenizer: Any = None
        self.policy_trunk = FrozenTrunk()

    # ------------------------------------------------------------------ models
    def offload_frozen_models(self) -> None:
        """As :meth:`StageModule.offload_frozen_models`; the moving ``reference="previous"`` is refused there.

        Raises:
            ValueError: with ``reference="previous"`` (its weights are rewritten every iteration)."""
        if self.hparams.reference == "previous":
            raise ValueError(
                'online-dpo: reference="previous" is rewritten every iteration and cannot be offloaded; '
                'use reference="sft" or another strategy'
            )
        super().offload_frozen_models()

    def load_models(self) -> None:
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.policy)
        self.policy, self.ref_policy = load_policy_and_reference(hp.policy, hp.trainable_layers, lora=self.lora)
        # KL is always measured to SFT: a second frozen copy only when the reference moves
        self.sft_policy = frozen(load_causal_lm(hp.policy)) if hp.reference == "previous" else None
        self.reward_model = frozen(ScalarModel.load(hp.reward_model))

    def sft(self) -> nn.Module:
        """The SFT policy (the fixed reference, or its own frozen copy when the reference moves)."""
        return self.sft_policy if self.sft_policy is not None else self.ref_policy

    def eval_reference(self) -> nn.Module:
        return self.sft()

    def share_frozen_trunks(self) -> None:
        self.policy_trunk = FrozenTrunk.shared_by(self.policy, *(m for m in (self.ref_policy, self.sft_policy) if m is not None))

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.trainer.num_training_batches != 1:
            raise ValueError(
                f"online DPO runs one iteration per epoch, on one batch of prompts, but an epoch has "
                f"{self.trainer.num_training_batches} batches: set data.batch_size to data.total_episodes / devices"
            )

    # --------------------------------------------------------------- iteration
    @torch.no_grad()
    def sample(self, queries: torch.Tensor) -> dict[str, torch.Tensor]:
        """Steps 1-2: K scored responses per prompt, rows ``p * K + k``; each value ``(P*K, ...)`` as in
        :func:`~lit_rlhf.stages.policy_eval.sample_and_score`."""
        hp = self.hparams
        expanded = queries.repeat_interleave(hp.samples_per_prompt, dim=0)  # (P*K, Q)
        parts = [
            sample_and_score(self.policy, self.reward_model, expanded[part], self.tokenizer, hp.response_length, hp.temperature,
                             hp.truncate_after_eos, hp.non_eos_penalty, hp.penalty_reward_value)
            for part in self.row_chunks(expanded.size(0))
        ]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    @torch.no_grad()
    def kl_to_sft(self, query_responses: torch.Tensor, context_length: int) -> torch.Tensor:
        """``(B,)`` sum over response tokens of ``logp_policy - logp_sft`` (temperature-scaled, P4)."""
        pad, temperature = self.tokenizer.pad_token_id, self.hparams.temperature
        kl = []
        for part in self.row_chunks(query_responses.size(0)):
            qr = query_responses[part]
            hidden = self.policy_trunk(qr, pad)
            policy, sft = (
                response_logprobs(self.policy_trunk.top(m), qr, context_length, pad, temperature, hidden=hidden)
                for m in (self.policy, self.sft())
            )
            kl.append(((policy - sft) * (qr[:, context_length:] != pad)).sum(1))
        return torch.cat(kl)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        iteration, queries = self.current_epoch, batch["query_ids"]  # (P, Q)
        num_prompts, k, context_length = queries.size(0), hp.samples_per_prompt, queries.size(1)
        if hp.reference == "previous":  # 5. the reference is the policy as the previous iteration left it
            copy_weights(self.ref_policy, self.policy)
        torch.manual_seed(hp.seed + iteration + self.global_rank * RANK_SEED_STRIDE)
        # 1-2. sample K responses per prompt and score them (EOS handling as PPO)
        data = self.sample(queries)
        self.check_finite("reward-model score", data["scores"])
        data["kl"] = self.kl_to_sft(data["query_responses"], context_length)  # (P*K,) of the sampling policy
        scores = data["scores"].view(num_prompts, k)  # (P, K)
        # 3. one pair per prompt, ties dropped
        chosen, rejected, keep = select_pairs(scores, hp.pair_strategy, data["lengths"].view(num_prompts, k), hp.length_penalty)
        prompts = torch.arange(num_prompts, device=queries.device)[keep]  # (N,)
        chosen_rows, rejected_rows = prompts * k + chosen[keep], prompts * k + rejected[keep]
        # 4. DPO: reference logprobs (and the shared trunk) once, then epochs over minibatches of pairs
        stats = self.dpo_updates(data["query_responses"], chosen_rows, rejected_rows, context_length)
        self.log_iteration(batch, data, scores, chosen_rows, rejected_rows, stats)

    def dpo_updates(
        self, query_responses: torch.Tensor, chosen_rows: torch.Tensor, rejected_rows: torch.Tensor, context_length: int
    ) -> dict[str, list[torch.Tensor]]:
        """Step 4: ``dpo_epochs`` passes of DPO over the pairs ``(chosen_rows[i], rejected_rows[i])`` of
        ``query_responses`` ``(P*K, Q+T)``, one optimiser step per minibatch of ``dpo_batch_size`` pairs.

        Every rank takes as many steps as the rank with the most pairs (DDP reduces gradients at each step): a rank
        with fewer pairs repeats its own with weight 0, one with none uses a placeholder pair with weight 0.
        """
        hp, pad, optimizer = self.hparams, self.tokenizer.pad_token_id, self.optimizers()
        num_pairs = chosen_rows.numel()
        steps = math.ceil(num_pairs / hp.dpo_batch_size)
        if self.trainer.world_size > 1:
            steps = int(self.all_gather(torch.tensor(steps, device=self.device)).max())
        stats: dict[str, list[torch.Tensor]] = {}
        if steps == 0:
            return stats
        weight = 1.0
        if num_pairs == 0:
            chosen_rows, rejected_rows, weight, num_pairs = chosen_rows.new_tensor([0]), chosen_rows.new_tensor([1]), 0.0, 1
        pairs = torch.cat([query_responses[chosen_rows], query_responses[rejected_rows]])  # (2N, Q+T)
        with torch.no_grad():
            hidden = self.policy_trunk(pairs, pad)  # (2N, Q+T, H) or None
            ref = response_logprob_sums(self.policy_trunk.top(self.ref_policy), pairs, context_length, pad, hidden)  # (2N,)
        for _ in range(hp.dpo_epochs):
            minibatches = torch.randperm(num_pairs, device=pairs.device).split(hp.dpo_batch_size)
            for step in range(steps):
                rows = minibatches[step % len(minibatches)]
                accumulation_boundary(self.trainer.strategy, True)  # DeepSpeed: one forward/backward per step
                both = torch.cat([rows, rows + num_pairs])  # chosen rows then their rejected rows
                policy = response_logprob_sums(
                    self.policy_trunk.top(self.policy), pairs[both], context_length, pad, None if hidden is None else hidden[both]
                )
                size = rows.numel()
                loss, chosen_reward, rejected_reward = dpo_loss(
                    policy[:size], policy[size:], ref[rows], ref[rows + num_pairs], hp.beta, hp.label_smoothing, hp.loss_type
                )
                step_weight = weight if step < len(minibatches) else 0.0
                self.manual_backward(step_weight * loss)
                optimizer.step()
                optimizer.zero_grad()
                self.check_parameters()
                if step_weight:
                    stats.setdefault("train/loss", []).append(loss.detach())
                    stats.setdefault("train/reward_accuracy", []).append((chosen_reward > rejected_reward).float().mean())
                    stats.setdefault("train/reward_margin", []).append((chosen_reward - rejected_reward).mean())
        return stats

    def log_iteration(
        self, batch: dict[str, Any], data: dict[str, torch.Tensor], scores: torch.Tensor, chosen_rows: torch.Tensor,
        rejected_rows: torch.Tensor, stats: dict[str, list[torch.Tensor]],
    ) -> None:
        """The per-iteration metrics (of the responses sampled at the iteration's start) and ``iteration_samples``."""
        flat = data["scores"]
        metrics = {
            "iteration/scores": flat.mean(),
            "iteration/best_of_k": scores.max(dim=1).values.mean(),
            "iteration/pairs": torch.tensor(float(chosen_rows.numel()), device=flat.device),
            "iteration/pair_margin": (flat[chosen_rows] - flat[rejected_rows]).mean() if chosen_rows.numel() else flat.new_zeros(()),
            "iteration/kl": data["kl"].mean(),
            "iteration/response_length": data["lengths"].float().mean(),
            "iteration/eos_fraction": data["contains_eos"].float().mean(),
            **{key: torch.stack(values).mean() for key, values in stats.items()},
        }
        self.log_dict(metrics, sync_dist=True, batch_size=batch["query_ids"].size(0), on_step=True, on_epoch=False, prog_bar=False)
        self.log("objective/scores_mean", metrics["iteration/scores"], prog_bar=True, sync_dist=True, on_step=True)
        tok, k = self.tokenizer, self.hparams.samples_per_prompt
        texts = decode_responses(tok, data["responses"])
        self.iteration_samples = [
            {"query": decode_query(tok, batch["query_ids"][row // k]), "response": texts[row], "score": float(flat[row]),
             "chosen": row in chosen_rows.tolist(), "rejected": row in rejected_rows.tolist()}
            for row in range(min(len(texts), self.hparams.num_samples))
        ]  # written to TensorBoard by lit_rlhf.callbacks.SampleTable

    def exported_model(self) -> torch.nn.Module:
        return self.policy
