"""The PPO-max options inside the PPO stage on a tiny random-init model: the preset runs, each option acts."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from stage_helpers import assert_finite, last_checkpoint, last_record, load_checkpoint, stage_config, validation_queries
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import AutoModelForCausalLM

from lit_rlhf.cli import main
from lit_rlhf.models.scalar import ScalarModel
from lit_rlhf.stages.ppo import PPOModule


def ppo_max_config(root, tiny_model_dir, tiny_reward_dir, **model):
    settings = {"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir), "lr": 1e-3, "trainable_layers": None, **model}
    data = {"ptx_batch_size": 2, "ptx_samples": 8}  # 4 ptx batches for 2 prompt batches: the prompts set the length
    return stage_config("ppo_max", root, model=settings, data=data)


def test_ppo_max_preset_runs_with_running_stats_and_ptx(tiny_model_dir, tiny_reward_dir, tmp_path, monkeypatch):
    """The preset's score normalisation (running statistics of every score so far, then clipping, here to 0.3) lands in each
    rollout's rewards as computed by hand; its running statistics and the perplexity are logged as computed by hand.
    No EOS penalty: the random policy's responses keep their own, different scores."""
    rollouts = []
    real_rollout = PPOModule.rollout

    def rollout(self, queries, rows=None):
        rollouts.append(real_rollout(self, queries, rows))
        return rollouts[-1]

    monkeypatch.setattr(PPOModule, "rollout", rollout)
    config = ppo_max_config(tmp_path, tiny_model_dir, tiny_reward_dir, non_eos_penalty=False, reward_clip=0.3)
    main(["ppo", "fit", "--config", str(config)])
    metrics = last_record(tmp_path / "ppo_max", "fit")["metrics"]
    assert_finite(metrics, "loss/ptx", "eval/scores", "eval/kl")
    assert len(rollouts) == 2
    for update, data in enumerate(rollouts):
        seen = torch.cat([past["scores"] for past in rollouts[: update + 1]]).double()
        expected = ((data["scores"].double() - seen.mean()) / (seen.std() + 1e-8)).clamp(-0.3, 0.3)  # reward_norm, clip 0.3
        torch.testing.assert_close((data["rewards"] - data["non_score_reward"]).sum(1).double(), expected, rtol=1e-5, atol=1e-6)
    assert metrics["objective/scores_running_mean"] == pytest.approx(seen.mean().item(), rel=1e-5)
    assert metrics["objective/scores_running_std"] == pytest.approx(seen.std().item(), rel=1e-5)
    mask = ~data["padding_mask"]
    assert metrics["objective/perplexity"] == pytest.approx(torch.exp(-data["logprobs"][mask].mean()).item(), rel=1e-5)
    checkpoint = load_checkpoint(last_checkpoint(tmp_path, "ppo_max"))
    assert checkpoint["global_step"] == 4  # 2 updates x 2 PPO epochs, however long the ptx data
    assert checkpoint["state_dict"]["score_moments._extra_state"]["count"] == 4  # 2 updates x 2 episodes


def test_critic_pretraining_leaves_the_policy_unchanged(tiny_model_dir, tiny_reward_dir, tmp_path):
    """With every update a critic pre-training update, only the value model learns."""
    config = ppo_max_config(tmp_path, tiny_model_dir, tiny_reward_dir, critic_warmup_updates=2)
    main(["ppo", "fit", "--config", str(config)])
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "ppo_max" / "model").state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert all(torch.equal(policy[key], initial[key]) for key in initial)
    value = ScalarModel.load(str(tmp_path / "ppo_max" / "model" / "value"))
    reward = ScalarModel.load(str(tiny_reward_dir))
    assert not torch.equal(value.scalar_head.weight, reward.scalar_head.weight)


def total_grad_norm(optimizer: torch.optim.Optimizer) -> float:
    """The global 2-norm of the gradients the optimiser holds."""
    grads = [param.grad for group in optimizer.param_groups for param in group["params"] if param.grad is not None]
    return torch.cat([grad.flatten().double() for grad in grads]).norm().item()


def test_gradient_clipping_bounds_the_gradient_every_optimiser_step_applies(tiny_model_dir, tiny_reward_dir, tmp_path, monkeypatch):
    """The global gradient norm each optimiser step sees is ``min(norm before clipping, max_grad_norm)``."""
    before, applied = [], []
    original = PPOModule.clip_gradients

    def record(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        before.append(total_grad_norm(optimizer))
        return original(self, optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    monkeypatch.setattr(PPOModule, "clip_gradients", record)
    config = ppo_max_config(tmp_path, tiny_model_dir, tiny_reward_dir, max_grad_norm=0.05)
    handle = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: applied.append(total_grad_norm(optimizer)))
    try:
        main(["ppo", "fit", "--config", str(config)])
    finally:
        handle.remove()
    assert len(before) == len(applied) == 4  # 2 updates x 2 PPO epochs x 1 minibatch
    assert max(before) > 0.05  # the bound acts
    assert applied == pytest.approx([min(norm, 0.05) for norm in before], rel=1e-4)


@pytest.fixture
def rollout_module(tiny_model_dir, tiny_reward_dir):
    """A PPO module on the tiny models, attached to a one-process trainer (its reductions), and a rollout of 3 prompts."""
    module = PPOModule(policy=str(tiny_model_dir), reward_model=str(tiny_reward_dir), response_length=6)
    module.configure_model()
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    torch.manual_seed(0)
    return module, module.rollout(validation_queries(tiny_model_dir, 3))


def test_entropy_bonus_subtracts_its_coefficient_times_the_mean_entropy(rollout_module, monkeypatch):
    module, data = rollout_module
    rows, context = torch.arange(3), data["query_responses"].size(1) - 6
    with torch.no_grad():
        plain, _ = module.ppo_loss(data, rows, context)
        monkeypatch.setitem(module.hparams, "entropy_coef", 0.01)
        with_bonus, _ = module.ppo_loss(data, rows, context)
        ids = data["query_responses"]
        real = ids != module.tokenizer.pad_token_id
        logits = module.policy(input_ids=ids.masked_fill(~real, 0), attention_mask=real.long(),
                               position_ids=(real.long().cumsum(1) - 1).clamp(min=0)).logits[:, context - 1 : -1]
        logprobs = torch.log_softmax(logits.double() / module.hparams.temperature, dim=-1)  # P4's scaled distribution
        entropy = -(logprobs.exp() * logprobs).sum(-1)[~data["padding_mask"]].mean()
    assert entropy > 1.0
    assert (with_bonus - plain).item() == pytest.approx(-0.01 * entropy.item(), rel=1e-4)


def test_reward_scaling_divides_by_the_running_std_of_every_score_so_far(tiny_model_dir, tiny_reward_dir):
    module = PPOModule(policy=str(tiny_model_dir), reward_model=str(tiny_reward_dir), reward_scaling=True, reward_norm=False)
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    batches = [torch.tensor([0.3, -2.0, 5.0]), torch.tensor([1.0, 4.0])]
    for count, scores in enumerate(batches, start=1):
        seen = torch.cat(batches[:count]).double()
        torch.testing.assert_close(module.shape_scores(scores).double(), scores.double() / (seen.std() + 1e-8))


def test_n_plus_defaults_leave_scores_unchanged(tiny_model_dir, tiny_reward_dir):
    module = PPOModule(policy=str(tiny_model_dir), reward_model=str(tiny_reward_dir))
    scores = torch.tensor([0.3, -2.0, 5.0])
    assert module.shape_scores(scores) is scores and module.score_moments.count == 0
    clipped = PPOModule(policy=str(tiny_model_dir), reward_model=str(tiny_reward_dir), reward_clip=1.0).shape_scores(scores)
    assert clipped.tolist() == pytest.approx([0.3, -1.0, 1.0])


@pytest.mark.parametrize("strategy_name", ["deepspeed_stage_2", "deepspeed_stage_2_offload_frozen"])
def test_max_grad_norm_reaches_deepspeed_under_every_deepspeed_strategy(strategy_name):
    """Lightning's ``clip_gradients`` is a no-op under DeepSpeed, so ``max_grad_norm`` must become the engine's
    ``gradient_clipping``: under ``DeepSpeedStrategy`` and its subclass ``DeepSpeedFrozenOffload`` (the 6.9B configs'
    strategy), which a check of the class name left without clipping (issue 27)."""
    pytest.importorskip("deepspeed")
    from types import SimpleNamespace

    from lightning.pytorch.strategies import StrategyRegistry

    from lit_rlhf.strategies import register_strategies

    register_strategies()
    strategy = StrategyRegistry.get(strategy_name)
    module = PPOModule(max_grad_norm=0.5)
    module._trainer = SimpleNamespace(strategy=strategy)  # prepare_deepspeed reads the trainer's strategy only
    module.prepare_deepspeed()
    assert strategy.config["gradient_clipping"] == 0.5
