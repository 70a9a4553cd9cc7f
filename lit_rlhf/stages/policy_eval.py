"""Sampling + scoring of policy responses, and the validation every RL stage shares (PPO, online DPO).

Validation reports, on the validation prompts: the mean reward-model score of sampled responses (EOS handling
of recipe P3), the KL to the reference / SFT policy (sum over response tokens of the temperature-scaled logprob
difference, P4), the mean response length and the fraction of responses with an EOS; the reward model's win rate
of the responses against the reference summaries (ties half) with a bootstrap 95% interval (``eval/win_rate``,
``_low``, ``_high``); plus a sample table.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torchmetrics import CatMetric, MeanMetric

from lit_rlhf.metrics import mean_with_interval, pairwise_outcomes
from lit_rlhf.models.parallel import is_sharded
from lit_rlhf.models.trunk import FrozenTrunk
from lit_rlhf.sampling import RANK_SEED_STRIDE, decode_query, decode_responses, sample_and_score, sample_kl, seeded


def identical_models(first: nn.Module, second: nn.Module) -> bool:
    """Whether two unsharded models of the same class hold equal parameters (same names, shapes and values), so that
    their outputs are equal: a policy validated against itself (``ppo validate`` of the SFT policy) has a KL of
    exactly 0, with no forward to run. Sharded models (FSDP2, ZeRO-3) and wrappers of another class (a LoRA
    reference with its adapters disabled) are never called identical."""
    if first is second:
        return True
    if type(first) is not type(second) or is_sharded(first) or is_sharded(second):
        return False
    params, others = dict(first.named_parameters()), dict(second.named_parameters())
    return params.keys() == others.keys() and all(
        params[name] is others[name] or (params[name].shape == others[name].shape and torch.equal(params[name], others[name]))
        for name in params
    )


class PolicyValidation:
    """Mixin for a LightningModule with ``policy``, ``reward_model``, ``tokenizer`` and :meth:`eval_reference`.

    Hyperparameters read: ``response_length``, ``seed``, ``num_samples``, ``truncate_after_eos``,
    ``non_eos_penalty``, ``penalty_reward_value``, ``missing_eos_penalty`` and ``eval_temperature`` (the sampling temperature: N+ samples
    validation responses at 0.01; the KL uses logprobs scaled by the same temperature, P4).
    Sampling uses a fixed seed per validation batch and rank, so two policies (or one evaluated twice) see the
    same random numbers. ``policy_trunk`` (a :class:`~lit_rlhf.models.trunk.FrozenTrunk` over policy and
    reference) is used when set.
    """

    policy_trunk: FrozenTrunk = FrozenTrunk()

    def init_policy_validation(self) -> None:
        """Create the validation metrics and sample lists (call it in the stage's ``__init__``)."""
        self.val_scores, self.val_kl, self.val_length, self.val_eos = MeanMetric(), MeanMetric(), MeanMetric(), MeanMetric()
        self.val_reward = MeanMetric()  # the training reward when reward functions take part (validation_rewards)
        # per prompt with a reference: 1 the response beats the reference, 0.5 tie, 0 loss (NaN rows: no reference)
        self.val_outcomes = CatMetric(nan_strategy="ignore")
        self.val_groups = CatMetric()  # per prompt: its source index and its score, for the per-source means
        self.validation_samples: list[dict[str, Any]] = []
        self.validation_scores: list[float] = []  # per prompt, in the loader's order (every rank's), for paired gains
        self.reference_is_policy = False  # set per validation run (identical_models)

    def eval_reference(self) -> nn.Module:
        """The policy KL is measured against (the SFT / reference policy)."""
        raise NotImplementedError

    def validation_rewards(self, sample: dict[str, torch.Tensor], batch: dict[str, Any]) -> Optional[torch.Tensor]:
        """The ``(B,)`` reward training optimises, where it is more than the reward model's score (reward functions),
        logged as ``eval/reward``; ``None`` (the default) when it is the score."""
        return None

    def on_validation_epoch_start(self) -> None:
        """Start a validation run: no samples yet, and whether the policy is its reference (then KL 0 unmeasured)."""
        self.validation_samples = []
        self.reference_is_policy = identical_models(self.policy, self.eval_reference())

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Mean RM score, KL to :meth:`eval_reference` (sum over tokens), length and EOS rate of sampled responses."""
        hp, tok = self.hparams, self.tokenizer
        temperature, queries = hp.eval_temperature, batch["query_ids"]
        with seeded(hp.seed + batch_idx + self.global_rank * RANK_SEED_STRIDE, queries.device):
            sample = sample_and_score(
                self.policy, self.reward_model, queries, tok, hp.response_length, temperature,
                hp.truncate_after_eos, hp.non_eos_penalty, hp.penalty_reward_value, batch.get("reference_ids"),
                hp.get("missing_eos_penalty"),
            )
        rewards = self.validation_rewards(sample, batch)
        if rewards is not None:
            self.val_reward.update(rewards)
            sample.setdefault("scores", rewards)  # no reward model: the reward functions' sum is the score
        self.val_scores.update(sample["scores"])
        if self.reference_is_policy:  # the SFT policy against itself: KL 0 without running both models
            self.val_kl.update(torch.zeros(queries.size(0), device=queries.device))
        else:
            self.val_kl.update(sample_kl(self.policy, self.eval_reference(), sample, queries.size(1), tok.pad_token_id,
                                         temperature, self.policy_trunk))
        self.val_length.update(sample["lengths"].float())
        self.val_eos.update(sample["contains_eos"].float())
        if "reference_scores" in sample:
            self.val_outcomes.update(pairwise_outcomes(sample["scores"].float(), sample["reference_scores"]))
        source = batch["source"].float() if "source" in batch else torch.zeros_like(sample["scores"].float())
        self.val_groups.update(torch.stack([source, sample["scores"].float()], dim=1))  # per prompt, in order
        texts = decode_responses(tok, sample["responses"])
        for row in range(len(texts)):
            if len(self.validation_samples) < hp.num_samples:
                self.validation_samples.append({
                    "query": decode_query(tok, queries[row]), "response": texts[row],
                    "reference": batch["reference"][row], "score": float(sample["scores"][row]),
                })

    def on_validation_epoch_end(self) -> None:
        """Log ``eval/scores``, ``eval/kl``, ``eval/response_length``, ``eval/eos_fraction``, ``eval/temperature``,
        ``eval/reward`` (reward functions), the win rate against the references with its 95% interval and the
        per-source scores, gathered over every rank."""
        metrics = {
            "eval/scores": self.val_scores, "eval/kl": self.val_kl,
            "eval/response_length": self.val_length, "eval/eos_fraction": self.val_eos,
        }
        self.log_dict({key: metric.compute() for key, metric in metrics.items()})
        self.log("eval/temperature", float(self.hparams.eval_temperature))  # read by the quickstart summary
        if self.val_reward.update_count:
            self.log("eval/reward", self.val_reward.compute())
        if self.val_outcomes.update_count:  # every rank: the gathered outcomes (none without reference answers)
            outcomes = self.val_outcomes.compute().cpu()
            if outcomes.numel():
                win_rate = mean_with_interval(outcomes)
                self.log_dict({"eval/win_rate": win_rate["mean"], "eval/win_rate_low": win_rate["low"],
                               "eval/win_rate_high": win_rate["high"]})
        names = getattr(getattr(self.trainer, "datamodule", None), "source_names", [])
        groups = self.val_groups.compute().view(-1, 2) if self.val_groups.update_count else torch.zeros(0, 2)
        self.validation_scores = groups[:, 1].tolist()
        if len(names) > 1:  # a mixture of prompt sets: the mean score per source
            for index, name in enumerate(names):
                chosen = groups[:, 0] == index
                if chosen.any():
                    self.log(f"eval/scores_source/{name}", groups[chosen, 1].mean())
        for metric in (*metrics.values(), self.val_outcomes, self.val_groups, self.val_reward):
            metric.reset()
