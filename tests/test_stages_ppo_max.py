"""The PPO-max options inside the PPO stage on a tiny random-init model: the preset runs, each option acts."""

from __future__ import annotations

import pytest
import torch
from stage_helpers import assert_finite, last_checkpoint, last_record, load_checkpoint, stage_config
from transformers import AutoModelForCausalLM

from lit_rlhf.cli import main
from lit_rlhf.models.scalar import ScalarModel
from lit_rlhf.stages.ppo import PPOModule


def ppo_max_config(root, tiny_model_dir, tiny_reward_dir, **model):
    settings = {"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir), "lr": 1e-3, "trainable_layers": None, **model}
    data = {"ptx_batch_size": 2, "ptx_samples": 8}  # 4 ptx batches for 2 prompt batches: the prompts set the length
    return stage_config("ppo_max", root, model=settings, data=data)


def test_ppo_max_preset_runs_with_running_stats_and_ptx(tiny_model_dir, tiny_reward_dir, tmp_path):
    config = ppo_max_config(tmp_path, tiny_model_dir, tiny_reward_dir)
    main(["ppo", "fit", "--config", str(config)])
    metrics = last_record(tmp_path / "ppo_max", "fit")["metrics"]
    assert_finite(metrics, "loss/ptx", "objective/perplexity", "objective/scores_running_mean", "objective/scores_running_std",
                  "eval/scores", "eval/kl")
    assert metrics["objective/perplexity"] > 1
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


def test_gradient_clipping_runs_before_every_optimiser_step(tiny_model_dir, tiny_reward_dir, tmp_path, monkeypatch):
    calls = []
    original = PPOModule.clip_gradients

    def record(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        calls.append((gradient_clip_val, gradient_clip_algorithm))
        return original(self, optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    monkeypatch.setattr(PPOModule, "clip_gradients", record)
    config = ppo_max_config(tmp_path, tiny_model_dir, tiny_reward_dir, max_grad_norm=0.5)
    main(["ppo", "fit", "--config", str(config)])
    assert calls == [(0.5, "norm")] * 4  # 2 updates x 2 PPO epochs x 1 minibatch


@pytest.mark.parametrize("option", [{"entropy_coef": 0.01}, {"reward_scaling": True, "reward_norm": False}])
def test_ppo_options_run(tiny_model_dir, tiny_reward_dir, tmp_path, option):
    config = ppo_max_config(tmp_path, tiny_model_dir, tiny_reward_dir, **option)
    main(["ppo", "fit", "--config", str(config)])
    assert_finite(last_record(tmp_path / "ppo_max", "fit")["metrics"], "loss/policy", "loss/value")


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
