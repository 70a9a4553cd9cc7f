"""The paper configs (``configs/tldr/*``): they parse through the CLI and carry the N+ code's behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from lit_rlhf.cli import main

PAPER = ROOT / "configs" / "tldr"
SIZES = ("pythia-1b", "pythia-2.8b", "pythia-6.9b")
STAGES = {"sft": "sft", "rm": "rm", "ppo": "ppo", "dpo": "dpo"}
#: N+ rows per PPO micro-batch (recipe P8), with 64 rows per GPU.
MICRO_BATCH = {"pythia-1b": 16, "pythia-2.8b": 4, "pythia-6.9b": 1}


def load(size: str, stage: str) -> dict:
    return yaml.safe_load((PAPER / size / f"{stage}.yaml").read_text())


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("stage", STAGES)
def test_paper_config_parses(size, stage, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([STAGES[stage], "fit", "--config", str(PAPER / size / f"{stage}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["weight_decay"] == 0.01  # every N+ stage: PyTorch's AdamW default


@pytest.mark.parametrize("size", SIZES)
def test_paper_configs_use_the_n_plus_behaviour(size):
    sft, rm, ppo, dpo = (load(size, stage) for stage in ("sft", "rm", "ppo", "dpo"))
    assert sft["model"]["loss_normalization"] == "sequence"  # a mean per sequence
    for config in (rm, dpo):
        assert config["data"]["cnndm_query_length"] == 1919  # D3
    assert dpo["model"]["beta"] == 0.05 and dpo["data"]["sft_path"] is None
    model = ppo["model"]
    assert model["score_position"] == "after_eos" and model["whitening_scope"] == "rank"  # P5, P6
    assert model["eval_temperature"] == 0.01 and model["kl_target"] is None and model["kl_coef"] == 0.05  # P8, P5
    assert not model["whiten_rewards"]
    assert ppo["data"]["batch_size"] == 64 and model["num_mini_batches"] == 1
    assert model["micro_batch_size"] == MICRO_BATCH[size]  # P8: 64 / micro = the N+ accumulation steps


def test_every_paper_stage_has_a_config():
    assert sorted(path.name for path in Path(PAPER).iterdir()) == sorted(SIZES)
    for size in SIZES:
        extra = list(CRITIC_FREE) if size == "pythia-1b" else []
        assert sorted(p.stem for p in (PAPER / size).glob("*.yaml")) == sorted([*STAGES, *extra])


#: the critic-free configs of pythia-1b (issue 26): estimator -> samples per prompt
CRITIC_FREE = {"rloo": 4, "grpo": 4, "dr_grpo": 4, "reinforce_pp": 1}


@pytest.mark.parametrize("estimator", CRITIC_FREE)
def test_critic_free_paper_configs_sample_as_many_responses_as_ppo(estimator, capsys):
    with pytest.raises(SystemExit):
        main([estimator.replace("_", "-"), "fit", "--config", str(PAPER / "pythia-1b" / f"{estimator}.yaml"), "--print_config"])
    printed, ppo = yaml.safe_load(capsys.readouterr().out), load("pythia-1b", "ppo")
    model, data, k = printed["model"], printed["data"], CRITIC_FREE[estimator]
    assert model["advantage_estimator"] == estimator and model["samples_per_prompt"] == k
    assert data["batch_size"] * k == ppo["data"]["batch_size"] and data["total_episodes"] * k == ppo["data"]["total_episodes"]
    if estimator in ("grpo", "dr_grpo"):
        assert model["kl_coef"] == 0.0 and model["kl_loss_coef"] == 0.04  # C2: the KL in the loss
    if estimator == "reinforce_pp":
        assert model["whitening_scope"] == "global"  # C4


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("stage", STAGES)
def test_paper_config_has_an_fsdp2_variant(size, stage, capsys):
    """The paper configs with ``configs/strategies/fsdp2.yaml`` after them: FSDP2 instead of their DeepSpeed/DDP."""
    overlay = ROOT / "configs" / "strategies" / "fsdp2.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main([STAGES[stage], "fit", "--config", str(PAPER / size / f"{stage}.yaml"), "--config", str(overlay), "--print_config"])
    assert exit_info.value.code in (0, None)
    strategy = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]
    assert strategy["class_path"] == "lit_rlhf.strategies.FSDP2Strategy" and strategy["init_args"]["shard_frozen"] is True


RLHFLOW = ROOT / "configs" / "rlhflow"


@pytest.mark.parametrize("stage, command", [("rm", "rm"), ("online_dpo", "online-dpo")])
def test_rlhflow_configs_parse_and_carry_the_workflow_values(stage, command, capsys):
    """``configs/rlhflow`` (recipe §3): W1's reward model and W3-W7's online iterative DPO, as the CLI reads them."""
    with pytest.raises(SystemExit) as exit_info:
        main([command, "fit", "--config", str(RLHFLOW / f"{stage}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    model, data, trainer = config["model"], config["data"], config["trainer"]
    devices, accumulate = trainer["devices"], trainer["accumulate_grad_batches"]
    if stage == "rm":  # W1: lr 2e-6, cosine with warm-up 0.03, 1 epoch, global batch 512, long conversations cut on the left
        assert (model["lr"], model["warmup_ratio"], trainer["max_epochs"]) == (2e-6, 0.03, 1)
        assert devices * data["batch_size"] * accumulate == 512 and data["long_responses"] == "keep_end"
        assert model["normalize"] is False
    else:  # W3-W7
        assert trainer["max_epochs"] == 3 and data["total_episodes"] == 20000
        assert model["samples_per_prompt"] == 8 and model["temperatures"] == [1.0, 0.7] and model["response_length"] == 2048
        assert model["pair_strategy"] == "best_vs_worst" and model["beta"] == 0.1 and model["lr"] == 5e-7
        assert (model["lr_schedule"], model["warmup_ratio"], model["dpo_epochs"]) == ("cosine", 0.03, 2)
        assert devices * model["dpo_batch_size"] == 128 and model["reference"] == "sft"
    for source in data["sources"]:  # hub sets with a train split only: validation is a held-out slice
        assert source["splits"]["validation"].startswith("train[-")


def test_rlhflow_eval_config_parses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--config", str(RLHFLOW / "eval.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["task"] == "chat" and config["head_to_head"] and config["llm_judge"]["init_args"]["model"] == "gpt-4-turbo"


#: configs/quickstart file -> the subcommand that reads it
QUICKSTART = {
    "sft": "sft", "rm": "rm", "ppo": "ppo", "ppo_lora": "ppo", "ppo_max": "ppo", "dpo": "dpo", "online_dpo": "online-dpo",
    "rloo": "rloo", "grpo": "grpo", "dr_grpo": "dr-grpo", "reinforce_pp": "reinforce-pp", "rloo_length": "rloo",
}


def test_every_quickstart_config_parses(capsys):
    assert sorted(p.stem for p in (ROOT / "configs" / "quickstart").glob("*.yaml")) == sorted(QUICKSTART)
    for stem, stage in QUICKSTART.items():
        with pytest.raises(SystemExit) as exit_info:
            main([stage, "fit", "--config", str(ROOT / "configs" / "quickstart" / f"{stem}.yaml"), "--print_config"])
        assert exit_info.value.code in (0, None), stem
        printed = yaml.safe_load(capsys.readouterr().out)
        if stage in ("rloo", "grpo", "dr-grpo", "reinforce-pp"):  # 256 sampled responses, as the quickstart's PPO
            k = printed["model"]["samples_per_prompt"]
            assert printed["model"]["advantage_estimator"] == stage.replace("-", "_")
            assert printed["data"]["total_episodes"] * k == 256 and printed["data"]["batch_size"] * k == 16, stem
