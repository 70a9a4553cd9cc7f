"""The critic-free policy gradients (``rloo``, ``grpo``, ``dr-grpo``, ``reinforce-pp``; recipe C1-C4) through the
``lit-rlhf`` command line on a tiny random-init Llama and the shared TL;DR sample: no value model anywhere, the
advantages of a real rollout equal the pure functions on its scores, reward functions by import path (summed with
the reward model's score; a failing one named with its row), and the presets' defaults."""

from __future__ import annotations

import sys
import types

import lightning as L
import pytest
import torch
from stage_helpers import assert_finite, last_checkpoint, last_record, load_checkpoint, stage_config, validation_queries

from lit_rlhf.algorithms import group_normalized_advantages, rloo_advantages
from lit_rlhf.cli import main
from lit_rlhf.rewards import RewardFunctionError, import_reward_function, summary_length
from lit_rlhf.stages.ppo import PPOModule

K = 2  # samples per prompt in the CLI runs: 2 updates of 2 prompts x 2 samples


def critic_free_config(root, tiny_model_dir, tiny_reward_dir, **model):
    base = {"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir), "lr": 1e-3, "samples_per_prompt": K}
    return stage_config("ppo", root, model={**base, **model})


@pytest.mark.parametrize("stage", ["rloo", "grpo", "dr-grpo", "reinforce-pp"])
def test_critic_free_stage_trains_without_a_value_model(stage, tiny_model_dir, tiny_reward_dir, tmp_path):
    main([stage, "fit", "--config", str(critic_free_config(tmp_path, tiny_model_dir, tiny_reward_dir))])
    record = last_record(tmp_path / "ppo", "fit")
    assert record["global_step"] == 2 * 2  # 2 updates (4 prompts, batch 2) x 2 PPO epochs
    metrics = record["metrics"]
    assert_finite(metrics, "loss/policy", "objective/kl", "objective/scores", "policy/approxkl", "eval/scores", "eval/kl")
    assert "loss/value" not in metrics and "val/clipfrac" not in metrics
    if stage in ("grpo", "dr-grpo"):  # the preset's KL term in the loss (k3, beta 0.04)
        assert_finite(metrics, "loss/kl")
    state = load_checkpoint(last_checkpoint(tmp_path, "ppo"))
    assert any(key.startswith("policy.") for key in state["state_dict"])
    assert not [key for key in state["state_dict"] if key.startswith(("value_model.", "ref_policy.", "reward_model."))]
    assert state["hyper_parameters"]["advantage_estimator"] == stage.replace("-", "_")
    assert (tmp_path / "ppo" / "model" / "config.json").is_file() and not (tmp_path / "ppo" / "model" / "value").exists()


def test_no_value_model_parameters_and_rollout_advantages_equal_the_pure_functions(tiny_model_dir, tiny_reward_dir):
    queries = validation_queries(tiny_model_dir, 2).repeat_interleave(3, dim=0)  # 2 prompts x k = 3
    for estimator in ("rloo", "grpo"):
        module = PPOModule(
            policy=str(tiny_model_dir), reward_model=str(tiny_reward_dir), response_length=6, advantage_estimator=estimator,
            samples_per_prompt=3, kl_penalty="sequence", kl_coef=0.1,
        )
        module.configure_model()
        module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
        assert module.value_model is None and not [name for name, _ in module.named_parameters() if "value" in name]
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        assert trainable == sum(p.numel() for p in module.policy.parameters() if p.requires_grad)
        torch.manual_seed(0)
        data = module.rollout(queries)
        assert "values" not in data and "returns" not in data
        mask = ~data["padding_mask"]
        sequence_rewards = data["scores"] + data["non_score_reward"].sum(1)
        expected = rloo_advantages(sequence_rewards, 3) if estimator == "rloo" else group_normalized_advantages(sequence_rewards, 3)
        assert torch.allclose(data["advantages"], expected.unsqueeze(1) * mask)
        assert not data["advantages"][~mask].any()


def test_value_model_only_for_gae_and_k_checked(tiny_model_dir, tiny_reward_dir):
    args = {"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir)}
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 2"):
        PPOModule(**args, advantage_estimator="rloo")
    with pytest.raises(ValueError, match="critic_warmup_updates needs a value model"):
        PPOModule(**args, advantage_estimator="grpo", samples_per_prompt=2, critic_warmup_updates=1)
    with pytest.raises(ValueError, match="kl_penalty must be 'token'"):
        PPOModule(**args, kl_penalty="sequence")
    with pytest.raises(ValueError, match="advantage_estimator must be one of"):
        PPOModule(**args, advantage_estimator="a2c")
    with pytest.raises(ValueError, match="reward_weights has 1 values for 2 reward sources"):
        PPOModule(**args, reward_funcs=["lit_rlhf.rewards:summary_length"], reward_weights=[1.0])
    with pytest.raises(ValueError, match="'gae' needs reward_model"):
        PPOModule(policy=str(tiny_model_dir), reward_model=None, reward_funcs=["lit_rlhf.rewards:summary_length"])
    with pytest.raises(ValueError, match="no reward"):
        PPOModule(policy=str(tiny_model_dir), reward_model=None, advantage_estimator="reinforce_pp")


# ------------------------------------------------------------------------------------------- reward functions
def test_summary_length_and_import_paths():
    assert summary_length(["p"] * 3, ["one two", "", " ".join(["w"] * 26)], target_words=2) == [0.0, -1.0, -12.0]
    assert summary_length(["p"], [" ".join(["w"] * 26)]) == [0.0]
    assert import_reward_function("lit_rlhf.rewards:summary_length") is summary_length
    assert import_reward_function("lit_rlhf.rewards.summary_length") is summary_length
    for path, message in [("nowhere_module_xyz:f", "cannot import module 'nowhere_module_xyz'"),
                          ("lit_rlhf.rewards:absent", "has no attribute 'absent'"), ("summary_length", "expected 'module:function'")]:
        with pytest.raises(ValueError, match=message):
            import_reward_function(path)


@pytest.fixture
def reward_module(monkeypatch):
    """A module ``user_rewards`` with a reward reading the row fields, one that raises and one returning NaN on row 1."""
    module = types.ModuleType("user_rewards")
    module.calls = []

    def mentions_reference(prompts, completions, reference, source, **kwargs):
        module.calls.append({"prompts": prompts, "completions": completions, "reference": reference, "source": source})
        return [float(len(text)) for text in completions]

    def broken(prompts, completions, **kwargs):
        raise KeyError("no such field")

    def nan_on_row_one(prompts, completions, **kwargs):
        return [float("nan") if index == 1 else 0.0 for index in range(len(completions))]

    module.mentions_reference, module.broken, module.nan_on_row_one = mentions_reference, broken, nan_on_row_one
    monkeypatch.setitem(sys.modules, "user_rewards", module)
    return module


def test_reward_function_by_import_path_on_a_real_run(reward_module, tiny_model_dir, tiny_reward_dir, tmp_path):
    """RLOO on the RM score + 0.5 x a user function: the function sees each prompt k times with its reference and
    source; the logged sources and the validation reward are finite."""
    config = critic_free_config(
        tmp_path, tiny_model_dir, tiny_reward_dir, advantage_estimator="rloo",
        reward_funcs=["user_rewards:mentions_reference", "lit_rlhf.rewards:summary_length"], reward_weights=[1.0, 0.5, 2.0],
    )
    main(["ppo", "fit", "--config", str(config)])
    training = reward_module.calls[:2]  # the 2 updates' rollouts come first, then validation
    for call in training:
        assert len(call["completions"]) == 2 * K and call["prompts"][0] == call["prompts"][1] != call["prompts"][2]
        assert call["reference"][0] == call["reference"][1] and call["reference"][0].strip()
        assert call["source"][0] and "POST:" in call["prompts"][0]
    metrics = last_record(tmp_path / "ppo", "fit")["metrics"]
    assert_finite(metrics, "objective/reward/reward_model", "objective/reward/user_rewards:mentions_reference",
                  "objective/reward/lit_rlhf.rewards:summary_length", "eval/reward", "eval/scores")
    parts = [metrics["objective/reward/reward_model"], metrics["objective/reward/user_rewards:mentions_reference"],
             metrics["objective/reward/lit_rlhf.rewards:summary_length"]]
    if metrics["val/num_eos_tokens"] == 2 * K:  # every response ended: no EOS penalty, the score is the weighted sum
        assert metrics["objective/scores"] == pytest.approx(parts[0] + 0.5 * parts[1] + 2.0 * parts[2], rel=1e-5)


def test_reward_function_only_without_a_reward_model(reward_module, tiny_model_dir, tmp_path):
    config = stage_config("ppo", tmp_path, model={
        "policy": str(tiny_model_dir), "reward_model": None, "advantage_estimator": "grpo", "samples_per_prompt": K,
        "reward_funcs": ["lit_rlhf.rewards:summary_length"], "non_eos_penalty": False,
    })
    main(["ppo", "fit", "--config", str(config)])
    metrics = last_record(tmp_path / "ppo", "fit")["metrics"]
    assert -1.0 <= metrics["objective/scores"] <= 0.0 and metrics["eval/scores"] == metrics["eval/reward"]
    assert "eval/win_rate" not in metrics  # no reward model to compare with the references


@pytest.mark.parametrize("function, message", [
    ("broken", r"reward function 'user_rewards:broken' raised KeyError"),
    ("nan_on_row_one", r"reward function 'user_rewards:nan_on_row_one' returned nan \(not a finite number\) for row 1 \(prompt"),
])
def test_failing_reward_function_stops_before_any_update(reward_module, function, message, tiny_model_dir, tiny_reward_dir, tmp_path):
    config = critic_free_config(tmp_path, tiny_model_dir, tiny_reward_dir, advantage_estimator="rloo",
                                reward_funcs=[f"user_rewards:{function}"])
    with pytest.raises(RewardFunctionError, match=message):
        main(["ppo", "fit", "--config", str(config)])
    assert not (tmp_path / "ppo" / "checkpoints").exists() and not (tmp_path / "ppo" / "model").exists()


def test_presets_are_defaults_that_a_config_overrides(tiny_model_dir, tiny_reward_dir, tmp_path, capsys):
    config = critic_free_config(tmp_path, tiny_model_dir, tiny_reward_dir)
    with pytest.raises(SystemExit):
        main(["grpo", "fit", "--config", str(config), "--model.kl_loss_coef", "0.01", "--print_config"])
    printed = capsys.readouterr().out
    assert "advantage_estimator: grpo" in printed and "loss_agg_mode: seq_mean_token_mean" in printed
    assert "kl_loss_coef: 0.01" in printed and "samples_per_prompt: 2" in printed  # flag and config win


def test_rloo_with_a_lora_policy(tiny_model_dir, tiny_reward_dir, tmp_path):
    """LoRA on the policy, the reference its adapters disabled, no value model: the merged export is a plain model."""
    config = critic_free_config(tmp_path, tiny_model_dir, tiny_reward_dir, advantage_estimator="rloo", lora={"r": 4}, lr=1e-2)
    main(["ppo", "fit", "--config", str(config)])
    assert_finite(last_record(tmp_path / "ppo", "fit")["metrics"], "loss/policy", "objective/kl", "eval/scores")
    state = load_checkpoint(last_checkpoint(tmp_path, "ppo"))
    assert state["state_dict"] and all("lora_" in key for key in state["state_dict"] if key.startswith("policy."))
    assert (tmp_path / "ppo" / "model" / "config.json").is_file() and not (tmp_path / "ppo" / "model" / "value").exists()
