"""Invalid hyperparameters fail when the module is built, naming the argument (issue 8)."""

from __future__ import annotations

import pytest
from stage_helpers import stage_config

from lit_rlhf.arguments import check_arguments
from lit_rlhf.cli import main
from lit_rlhf.data.datamodules import PreferenceDataModule, PromptDataModule, SFTDataModule
from lit_rlhf.stages.dpo import DPOModule
from lit_rlhf.stages.online_dpo import OnlineDPOModule
from lit_rlhf.stages.ppo import PPOModule
from lit_rlhf.stages.reward import RewardModule
from lit_rlhf.stages.sft import SFTModule


def test_check_arguments_rules_and_none():
    check_arguments("Owner", {"a": 1, "b": 0, "c": 0.5, "d": None}, positive=("a", "d"), non_negative=("b",), fraction=("c",))
    with pytest.raises(ValueError, match=r"^Owner: a=0 is invalid: it must be > 0$"):
        check_arguments("Owner", {"a": 0}, positive=("a",))
    with pytest.raises(ValueError, match=r"^Owner: b=-1 is invalid: it must be >= 0$"):
        check_arguments("Owner", {"b": -1}, non_negative=("b",))
    with pytest.raises(ValueError, match=r"^Owner: c=1.5 is invalid: it must be in \[0, 1\]$"):
        check_arguments("Owner", {"c": 1.5}, fraction=("c",))


@pytest.mark.parametrize(
    "cls, arguments, message",
    [
        (PPOModule, {"response_length": 0}, "PPOModule: response_length=0 is invalid: it must be > 0"),
        (PPOModule, {"response_length": -3}, "PPOModule: response_length=-3"),
        (PPOModule, {"num_mini_batches": 0}, "PPOModule: num_mini_batches=0"),
        (PPOModule, {"num_ppo_epochs": 0}, "PPOModule: num_ppo_epochs=0"),
        (PPOModule, {"lr": -1e-5}, "PPOModule: lr=-1e-05"),
        (PPOModule, {"gamma": 1.5}, r"PPOModule: gamma=1.5 is invalid: it must be in \[0, 1\]"),
        (PPOModule, {"lam": -0.1}, "PPOModule: lam=-0.1"),
        (PPOModule, {"cliprange": 0.0}, "PPOModule: cliprange=0.0"),
        (PPOModule, {"kl_coef": -0.05}, "PPOModule: kl_coef=-0.05 is invalid: it must be >= 0"),
        (PPOModule, {"temperature": 0.0}, "PPOModule: temperature=0.0"),
        (PPOModule, {"micro_batch_size": 0}, "PPOModule: micro_batch_size=0"),
        (SFTModule, {"response_length": 0}, "SFTModule: response_length=0"),
        (SFTModule, {"lr": 0.0}, "SFTModule: lr=0.0"),
        (RewardModule, {"weight_decay": -0.01}, "RewardModule: weight_decay=-0.01"),
        (DPOModule, {"beta": 0.0}, "DPOModule: beta=0.0"),
        (DPOModule, {"label_smoothing": 2.0}, "DPOModule: label_smoothing=2.0"),
        (OnlineDPOModule, {"dpo_batch_size": 0}, "OnlineDPOModule: dpo_batch_size=0"),
        (OnlineDPOModule, {"response_length": 0}, "OnlineDPOModule: response_length=0"),
        (SFTDataModule, {"query_length": 0}, "SFTDataModule: query_length=0"),
        (SFTDataModule, {"train_samples": 0}, "SFTDataModule: train_samples=0"),
        (PromptDataModule, {"total_episodes": 0}, "PromptDataModule: total_episodes=0"),
        (PromptDataModule, {"total_episodes": 4, "batch_size": 8}, "PromptDataModule: total_episodes=4 is smaller than batch_size=8"),
        (PreferenceDataModule, {"response_length": 0}, "PreferenceDataModule: response_length=0"),
    ],
)
def test_invalid_hyperparameter_fails_at_construction_with_its_name(cls, arguments, message):
    with pytest.raises(ValueError, match=message):
        cls(**arguments)  # nothing is loaded in __init__: the error comes before any model or data


@pytest.mark.parametrize("batch_size, num_mini_batches", [(6, 4), (2, 4)])
def test_ppo_batch_not_divisible_by_mini_batches(batch_size, num_mini_batches):
    module = PPOModule(num_mini_batches=num_mini_batches)
    with pytest.raises(ValueError, match=f"data.batch_size={batch_size} must be a multiple of model.num_mini_batches={num_mini_batches}"):
        module.check_datamodule(PromptDataModule(batch_size=batch_size, total_episodes=64))
    module.check_datamodule(PromptDataModule(batch_size=2 * num_mini_batches, total_episodes=64))  # fine


def test_mini_batches_split_the_episodes_of_k_samples_per_prompt():
    module = PPOModule(num_mini_batches=4, advantage_estimator="rloo", samples_per_prompt=2)
    module.check_datamodule(PromptDataModule(batch_size=2, total_episodes=64))  # 2 prompts x 2 = 4 episodes: fine
    with pytest.raises(ValueError, match=r"data.batch_size=3 x model.samples_per_prompt=2 must be a multiple of model.num_mini_batches=4"):
        module.check_datamodule(PromptDataModule(batch_size=3, total_episodes=64))


def test_cli_checks_mini_batches_before_loading_anything(tmp_path):
    missing = tmp_path / "no-such-model"
    config = stage_config("ppo", tmp_path, model={"policy": str(missing), "reward_model": str(missing), "num_mini_batches": 4})
    with pytest.raises(ValueError, match="data.batch_size=2 must be a multiple of model.num_mini_batches=4"):
        main(["ppo", "fit", "--config", str(config)])  # the policy path does not exist: nothing was loaded
    assert not (tmp_path / "ppo").exists()
