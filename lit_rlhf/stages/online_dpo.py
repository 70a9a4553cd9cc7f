"""Online iterative DPO (Dong et al. 2024, "RLHF Workflow", recipe §3) with manual optimisation.

Why this shape: an iteration generates its own training data, then trains on it for several passes, so it
cannot be a stream of Lightning batches. Each Lightning *epoch* is one iteration and its single batch is the
iteration's prompts; ``training_step`` runs the iteration's loop top to bottom (sample K responses, score,
pair, DPO epochs). Lightning then checkpoints at every epoch end and resumes at the next epoch, so a run can be
continued from any iteration's checkpoint; sampling is seeded per iteration, so a resumed run matches an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from lit_rlhf.algorithms import PAIR_STRATEGIES, chosen_nll, dpo_loss, is_stop, preference_pairs, truncate_after_eos
from lit_rlhf.arguments import check_arguments
from lit_rlhf.models.forward import response_logprob_sums, response_logprobs
from lit_rlhf.models.loading import load_causal_lm, load_tokenizer, stop_token_ids
from lit_rlhf.models.lora import LoRA
from lit_rlhf.models.parallel import accumulation_boundary, copy_weights
from lit_rlhf.models.scalar import ScalarModel
from lit_rlhf.models.trunk import FrozenTrunk
from lit_rlhf.sampling import RANK_SEED_STRIDE, decode_query, decode_responses, sample_and_score
from lit_rlhf.stages.common import (
    SCHEDULES,
    StageModule,
    frozen,
    load_policy_and_reference,
    lora_hparam,
    lora_settings,
    lr_factor,
)
from lit_rlhf.stages.policy_eval import PolicyValidation

log = logging.getLogger(__name__)

REFERENCES = ("sft", "previous")

class OnlineDPOModule(PolicyValidation, StageModule):
    """Online iterative DPO against a trained reward model (Dong et al. 2024, "RLHF Workflow", recipe W3-W7).

    Iteration ``t`` (= training epoch ``t``), on the epoch's batch of P prompts (a new, disjoint block of the shuffled
    prompts each iteration, W3):

    1. sample ``samples_per_prompt`` (K) responses per prompt from the current policy, split evenly over
       ``temperatures`` (Algorithm 2: half at 1.0, half at 0.7), up to ``response_length`` tokens, each cut after its
       first stop token (EOS or the chat template's end of turn, W4; P3);
    2. score them with the reward model, a response without a stop token getting ``penalty_reward_value`` (P3);
       the iteration's generations and scores go to ``{default_root_dir}/iterations/iteration-{t}.jsonl`` (one file per
       rank), which a resumed run reads back instead of sampling again;
    3. build one pair per prompt (:func:`~lit_rlhf.algorithms.preference_pairs`: best vs worst, ranked by the score minus
       ``length_penalty`` per character, W5); ties and pairs of identical responses are dropped and counted;
    4. run ``dpo_epochs`` passes of DPO over the pairs in minibatches of ``dpo_batch_size`` (reference logprobs
       computed once per iteration without gradient and reused by every pass), the learning rate following
       ``lr_schedule`` over the iteration's steps (W6);
    5. the updated policy samples the next iteration (W7). The reference is the SFT policy (``reference="sft"``, the
       paper) or the policy as it was at the start of the iteration (``"previous"``, their current code).

    Logged per iteration: ``iteration/scores`` (mean RM score of all samples), ``iteration/best_of_k``,
    ``iteration/pair_margin`` (RM score of chosen minus rejected), ``iteration/pairs``, ``iteration/ties``,
    ``iteration/identical``, ``iteration/kl`` (to the SFT policy, sum over tokens, logprobs scaled by each sample's
    temperature as P4), ``iteration/response_length`` (tokens), ``iteration/response_chars``,
    ``iteration/eos_fraction``, the DPO loss, the NLL term and implicit-reward accuracy, and a sample table
    (``iteration_samples``). Validation is that of PPO (:class:`~lit_rlhf.stages.policy_eval.PolicyValidation`).

    Args:
        policy: SFT checkpoint; initialises the policy (and the reference / SFT policy for KL).
        reward_model: trained reward model directory (frozen).
        samples_per_prompt: K (paper 8, their script 4).
        response_length: most tokens sampled per response (paper 2,048; the TL;DR quickstart 53).
        temperature: sampling temperature when ``temperatures`` is unset (paper 1.0).
        temperatures: the K samples split evenly over these temperatures (Algorithm 2: ``[1.0, 0.7]``); K must be a
            multiple of their number. ``None``: all at ``temperature``.
        eval_temperature: sampling temperature of validation (0.01, near-greedy, as N+'s PPO validation; the
            quickstart uses 0.7 for every policy, see ``configs/quickstart/ppo.yaml``).
        truncate_after_eos, non_eos_penalty, penalty_reward_value: EOS handling as PPO (P3).
        missing_eos_penalty: subtracted from the score of a response without a stop token instead of N+'s replacement
            (TRL's; a chat RM's scores are not centred on 0, so a fixed -1 can beat the finished responses).
        pair_strategy: ``"best_vs_worst"`` (paper, "max-min") or ``"best_vs_random"``.
        length_penalty: reward units per response character subtracted before ranking (W5, Eq. 9; their concise
            model 0.001; 0 = off).
        beta, label_smoothing, loss_type: DPO loss (paper: beta 0.1, sigmoid; label smoothing 0.1 in a script).
        nll_coef: weight of the chosen responses' NLL per token added to the DPO loss (0 = off, the paper).
        reference: ``"sft"`` (fixed, the paper) or ``"previous"`` (the previous iteration's policy, their code).
        dpo_epochs: passes over each iteration's pairs (paper 2).
        dpo_batch_size: pairs per optimiser step (paper: global batch 128).
        lr: AdamW learning rate (paper 5e-7).
        lr_schedule: ``"constant"``, ``"cosine"`` or ``"linear"`` to 0 over each iteration's steps, after a linear warm-up
            of ``warmup_ratio`` of them (:func:`~lit_rlhf.stages.common.lr_factor`; paper: cosine, warm-up 0.03; each
            iteration is a new training run there).
        warmup_ratio: the warm-up fraction.
        eps, weight_decay: AdamW settings.
        seed: base seed; iteration ``t`` on rank ``r`` samples with ``seed + t + r * 100003``.
        rollout_batch_size: sequences per generation / scoring call (``None`` = all P*K at once).
        num_samples: rows kept for the sample tables.
        save_generations: write (and on resume read back) each iteration's generations as JSONL.
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
        temperatures: Optional[list[float]] = None,
        eval_temperature: float = 0.01,
        truncate_after_eos: bool = True,
        non_eos_penalty: bool = True,
        penalty_reward_value: float = -1.0,
        missing_eos_penalty: Optional[float] = None,
        pair_strategy: str = "best_vs_worst",
        length_penalty: float = 0.0,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        loss_type: str = "sigmoid",
        nll_coef: float = 0.0,
        reference: str = "sft",
        dpo_epochs: int = 2,
        dpo_batch_size: int = 8,
        lr: float = 5e-7,
        lr_schedule: str = "constant",
        warmup_ratio: float = 0.0,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        seed: int = 1,
        rollout_batch_size: Optional[int] = None,
        num_samples: int = 8,
        save_generations: bool = True,
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
            non_negative=("weight_decay", "length_penalty", "num_samples", "trainable_layers", "nll_coef"),
            fraction=("label_smoothing", "warmup_ratio"),
        )
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got '{reference}'")
        if pair_strategy not in PAIR_STRATEGIES:
            raise ValueError(f"pair_strategy must be one of {PAIR_STRATEGIES}, got '{pair_strategy}'")
        if lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, got '{lr_schedule}'")
        if samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be at least 2 to form pairs, got {samples_per_prompt}")
        if temperatures is not None:
            if not temperatures or any(t <= 0 for t in temperatures) or samples_per_prompt % len(temperatures):
                raise ValueError(
                    f"temperatures {temperatures} must be positive and divide samples_per_prompt={samples_per_prompt} evenly"
                )
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
    def sample_temperatures(self) -> list[float]:
        """The temperature of each of the K samples of a prompt (``temperatures`` split evenly, W4)."""
        hp = self.hparams
        temperatures = list(hp.temperatures or [hp.temperature])
        return [t for t in temperatures for _ in range(hp.samples_per_prompt // len(temperatures))]

    @torch.no_grad()
    def sample(self, queries: torch.Tensor) -> dict[str, torch.Tensor]:
        """Steps 1-2: K scored responses per prompt, rows ``p * K + k``; each value ``(P*K, ...)`` as in
        :func:`~lit_rlhf.sampling.sample_and_score`, plus ``temperature`` ``(P*K,)``. Each temperature's rows
        are sampled together, in chunks of ``rollout_batch_size``."""
        hp = self.hparams
        temperatures = torch.tensor(self.sample_temperatures(), device=queries.device).repeat(queries.size(0))  # (P*K,)
        expanded = queries.repeat_interleave(hp.samples_per_prompt, dim=0)  # (P*K, Q)
        rows, parts = [], []
        for temperature in dict.fromkeys(temperatures.tolist()):
            group = (temperatures == temperature).nonzero().squeeze(1)
            for part in self.row_chunks(group.numel()):
                rows.append(group[part])
                parts.append(sample_and_score(
                    self.policy, self.reward_model, expanded[group[part]], self.tokenizer, hp.response_length, temperature,
                    hp.truncate_after_eos, hp.non_eos_penalty, hp.penalty_reward_value, None, hp.missing_eos_penalty,
                ))
        order = torch.cat(rows).argsort()  # back to rows p * K + k
        data = {key: torch.cat([part[key] for part in parts])[order] for key in parts[0]}  # every part (b, T) wide
        data["temperature"] = temperatures
        return data

    @torch.no_grad()
    def kl_to_sft(self, query_responses: torch.Tensor, context_length: int, temperatures: torch.Tensor) -> torch.Tensor:
        """``(B,)`` sum over response tokens of ``logp_policy - logp_sft``, logits scaled by each row's sampling
        temperature (``temperatures`` ``(B,)``, P4)."""
        pad = self.tokenizer.pad_token_id
        kl = torch.zeros(query_responses.size(0), device=query_responses.device)
        for temperature in dict.fromkeys(temperatures.tolist()):
            group = (temperatures == temperature).nonzero().squeeze(1)
            for part in self.row_chunks(group.numel()):
                rows = group[part]
                qr = query_responses[rows]
                hidden = self.policy_trunk(qr, pad)
                policy, sft = (
                    response_logprobs(self.policy_trunk.top(m), qr, context_length, pad, temperature, hidden=hidden)
                    for m in (self.policy, self.sft())
                )
                kl[rows] = ((policy - sft) * (qr[:, context_length:] != pad)).sum(1)
        return kl

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        iteration, queries = self.current_epoch, batch["query_ids"]  # (P, Q)
        num_prompts, k, context_length = queries.size(0), hp.samples_per_prompt, queries.size(1)
        if hp.reference == "previous":  # 5. the reference is the policy as the previous iteration left it
            copy_weights(self.ref_policy, self.policy)
        # 1-2. sample K responses per prompt and score them (EOS handling as PPO), or read them back on resume
        data = self.load_generations(iteration, queries)
        if data is None:
            torch.manual_seed(hp.seed + iteration + self.global_rank * RANK_SEED_STRIDE)
            data = self.sample(queries)
        self.check_finite("reward-model score", data["scores"])
        data["kl"] = self.kl_to_sft(data["query_responses"], context_length, data["temperature"])  # (P*K,) of the sampler
        texts = decode_responses(self.tokenizer, data["responses"])
        data["chars"] = torch.tensor([len(text) for text in texts], device=queries.device)  # (P*K,)
        scores = data["scores"].view(num_prompts, k)  # (P, K)
        # 3. one pair per prompt (max-min on the length-penalised score), ties and identical responses dropped
        chosen_rows, rejected_rows, ties, identical = preference_pairs(
            scores, data["postprocessed"], hp.pair_strategy, data["chars"].view(num_prompts, k), hp.length_penalty
        )
        self.save_generations(iteration, batch, data, texts, chosen_rows, rejected_rows)
        # 4. DPO: reference logprobs (and the shared trunk) once, then epochs over minibatches of pairs
        torch.manual_seed(hp.seed + iteration + self.global_rank * RANK_SEED_STRIDE + 1)  # the same after a reload
        stats = self.dpo_updates(data["query_responses"], chosen_rows, rejected_rows, context_length)
        counts = {"iteration/ties": ties.sum(), "iteration/identical": identical.sum()}
        self.log_iteration(batch, data, scores, chosen_rows, rejected_rows, stats, texts, counts)

    # --------------------------------------------------------------- generations on disk
    def generations_path(self, iteration: int) -> Optional[Path]:
        """``{default_root_dir}/iterations/iteration-{t}.jsonl`` (``-rank{r}`` under several processes), or ``None``
        when ``save_generations`` is off or there is no trainer."""
        if not self.hparams.save_generations or self._trainer is None:
            return None
        suffix = f"-rank{self.global_rank}" if self.trainer.world_size > 1 else ""
        return Path(self.trainer.default_root_dir) / "iterations" / f"iteration-{iteration}{suffix}.jsonl"

    def save_generations(
        self, iteration: int, batch: dict[str, Any], data: dict[str, torch.Tensor], texts: list[str],
        chosen_rows: torch.Tensor, rejected_rows: torch.Tensor,
    ) -> None:
        """Write the iteration's prompts, responses (text and token ids), temperatures, scores and pairs as JSONL, one
        line per response, atomically (a complete file or none)."""
        path = self.generations_path(iteration)
        if path is None:
            return
        k, pad = self.hparams.samples_per_prompt, self.tokenizer.pad_token_id
        chosen, rejected = set(chosen_rows.tolist()), set(rejected_rows.tolist())
        queries = batch["query_ids"]
        lines = []
        # the shortest decimal that reads back as the same float32 (0.7, not 0.699999988)
        temperatures = [float(str(t)) for t in data["temperature"].cpu().numpy()]
        for row, text in enumerate(texts):
            prompt = row // k
            lines.append(json.dumps({
                "iteration": iteration, "prompt": prompt,
                "prompt_text": batch["prompt_text"][prompt] if "prompt_text" in batch else None,
                "query_ids": [t for t in queries[prompt].tolist() if t != pad] if row % k == 0 else None,
                "sample": row % k, "temperature": temperatures[row], "response": text,
                "response_ids": data["responses"][row].tolist(), "score": float(data["scores"][row]),
                "kl": float(data["kl"][row]), "chars": int(data["chars"][row]),
                "chosen": row in chosen, "rejected": row in rejected,
            }) + "\n")
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(lines), encoding="utf-8")
        os.replace(partial, path)

    def load_generations(self, iteration: int, queries: torch.Tensor) -> Optional[dict[str, torch.Tensor]]:
        """The iteration's samples as :meth:`sample` returns them, read back from its JSONL when a previous run of the same
        iteration wrote it for the same prompts; ``None`` otherwise (sample afresh)."""
        path = self.generations_path(iteration)
        if path is None or not path.is_file():
            return None
        hp, pad = self.hparams, self.tokenizer.pad_token_id
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        prompts = [[t for t in query.tolist() if t != pad] for query in queries]
        if len(rows) != queries.size(0) * hp.samples_per_prompt or [r["query_ids"] for r in rows[:: hp.samples_per_prompt]] != prompts:
            log.warning("%s does not hold this iteration's prompts: sampling again", path)
            return None
        device, stops = queries.device, stop_token_ids(self.tokenizer)
        responses = torch.tensor([r["response_ids"] for r in rows], device=device)  # (P*K, T)
        postprocessed = truncate_after_eos(responses, stops, pad) if hp.truncate_after_eos else responses
        log.info("iteration %d: %d generations read back from %s", iteration, len(rows), path)
        return {
            "responses": responses, "postprocessed": postprocessed,
            "query_responses": torch.cat([queries.repeat_interleave(hp.samples_per_prompt, dim=0), postprocessed], dim=1),
            "scores": torch.tensor([r["score"] for r in rows], device=device),
            "contains_eos": is_stop(postprocessed, stops).any(dim=1), "lengths": (postprocessed != pad).sum(1),
            "temperature": torch.tensor([r["temperature"] for r in rows], device=device),
        }

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
        chosen_lengths = (pairs[:num_pairs, context_length:] != pad).sum(1)  # (N,) for the NLL term
        with torch.no_grad():
            hidden = self.policy_trunk(pairs, pad)  # (2N, Q+T, H) or None
            ref = response_logprob_sums(self.policy_trunk.top(self.ref_policy), pairs, context_length, pad, hidden)  # (2N,)
        total_steps = hp.dpo_epochs * steps
        for epoch in range(hp.dpo_epochs):
            minibatches = torch.randperm(num_pairs, device=pairs.device).split(hp.dpo_batch_size)
            for step in range(steps):
                for group in optimizer.param_groups:  # W6: cosine with warm-up over this iteration's steps
                    group["lr"] = hp.lr * lr_factor(epoch * steps + step, total_steps, hp.lr_schedule, hp.warmup_ratio)
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
                nll = chosen_nll(policy[:size], chosen_lengths[rows])
                if hp.nll_coef:
                    loss = loss + hp.nll_coef * nll
                step_weight = weight if step < len(minibatches) else 0.0
                self.manual_backward(step_weight * loss)
                optimizer.step()
                optimizer.zero_grad()
                self.check_parameters()
                if step_weight:
                    stats.setdefault("train/loss", []).append(loss.detach())
                    stats.setdefault("train/chosen_nll", []).append(nll.detach())
                    stats.setdefault("train/reward_accuracy", []).append((chosen_reward > rejected_reward).float().mean())
                    stats.setdefault("train/reward_margin", []).append((chosen_reward - rejected_reward).mean())
        return stats

    def log_iteration(
        self, batch: dict[str, Any], data: dict[str, torch.Tensor], scores: torch.Tensor, chosen_rows: torch.Tensor,
        rejected_rows: torch.Tensor, stats: dict[str, list[torch.Tensor]], texts: list[str], counts: dict[str, torch.Tensor],
    ) -> None:
        """The per-iteration metrics (of the responses sampled at the iteration's start) and ``iteration_samples``;
        ``counts`` are the prompts whose pair was dropped (``iteration/ties``, ``iteration/identical``)."""
        flat = data["scores"]
        metrics = {
            **{key: value.float() for key, value in counts.items()},
            "iteration/response_chars": data["chars"].float().mean(),
            "iteration/scores": flat.mean(),
            "iteration/best_of_k": scores.max(dim=1).values.mean(),
            "iteration/pairs": torch.tensor(float(chosen_rows.numel()), device=flat.device),
            "iteration/pair_margin": (flat[chosen_rows] - flat[rejected_rows]).mean() if chosen_rows.numel() else flat.new_zeros(()),
            "iteration/kl": data["kl"].mean(),
            "iteration/response_length": data["lengths"].float().mean(),
            "iteration/eos_fraction": data["contains_eos"].float().mean(),
            **{key: torch.stack(values).mean() for key, values in stats.items()},
        }
        self.log_metrics(metrics, sync_dist=True, batch_size=batch["query_ids"].size(0), on_step=True, on_epoch=False, prog_bar=False)
        self.log("objective/scores_mean", metrics["iteration/scores"], prog_bar=True, sync_dist=True, on_step=True)
        tok, k = self.tokenizer, self.hparams.samples_per_prompt
        self.iteration_samples = [
            {"query": decode_query(tok, batch["query_ids"][row // k]), "response": texts[row], "score": float(flat[row]),
             "chosen": row in chosen_rows.tolist(), "rejected": row in rejected_rows.tolist()}
            for row in range(min(len(texts), self.hparams.num_samples))
        ]  # written to TensorBoard by lit_rlhf.callbacks.SampleTable

    def exported_model(self) -> torch.nn.Module:
        return self.policy
