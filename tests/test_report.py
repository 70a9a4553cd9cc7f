"""The quickstart summary's "did it learn" lines (paired gain over SFT, training-reward curve) and the pipeline's
policy-gradient step."""

from __future__ import annotations

import json

from lit_rlhf.evaluation.report import learning_lines, policy_gradient_run, summary
from lit_rlhf.pipeline import main_steps


def record(fn: str, scores: list[float], rewards: list[float] | None = None) -> dict:
    result = {"fn": fn, "global_step": 0, "metrics": {"eval/scores": sum(scores) / len(scores)}, "samples": [],
              "validation_scores": scores}
    if rewards is not None:
        result["training_rewards"] = rewards
    return result


def test_learning_lines_paired_gain_and_quarters():
    sft = record("validate", [0.0, 1.0, -1.0, 0.5] * 10)
    better = record("fit", [0.5, 1.5, -0.5, 1.0] * 10, rewards=[-1.0, -0.8, -0.6, -0.4, -0.2, 0.0, 0.2, 0.4])
    lines = learning_lines("RLOO", sft, better)
    # every prompt gains exactly 0.5: the interval is the point
    assert "paired RM-score gain +0.500 (95% CI +0.500 to +0.500), above 0: the policy learnt" in lines[1]
    # 8 updates: quarters of 2, (-1 - 0.8) / 2 = -0.9 and (0.2 + 0.4) / 2 = 0.3
    assert "over 8 updates: first quarter -0.900, last quarter 0.300, difference +1.200" in lines[2]
    noisy = record("fit", [1.0, 0.0, -0.5, 0.0] * 10)  # gains +1, -1, +0.5, -0.5
    line = learning_lines("PPO", sft, noisy)[1]
    assert "gain +0.000" in line and "includes 0: no measurable change" in line
    worse = record("fit", [0.5, 0.5, -1.5, 0.0] * 10)  # gains +0.5, -0.5, -0.5, -0.5
    line = learning_lines("PPO", sft, worse)[1]
    assert "gain -0.250" in line and "below 0: worse than SFT" in line
    assert learning_lines("PPO", sft, record("fit", [0.0])) == []  # not the same prompts: no paired gain


def test_summary_reads_the_policy_gradient_run_present(tmp_path):
    for directory, records in (("rloo", [record("validate", [0.0] * 8), record("fit", [1.0] * 8, [0.0, 1.0])]),):
        (tmp_path / directory).mkdir()
        (tmp_path / directory / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert policy_gradient_run(tmp_path)[0] == "RLOO"
    text = summary(tmp_path)
    assert "RLOO vs SFT on the same 8 validation prompts: paired RM-score gain +1.000" in text
    assert [name for name, *_ in main_steps("ppo")][-2:] == ["ppo validate", "ppo fit"]
    assert main_steps("reinforce_pp")[-1] == ("reinforce-pp fit", "reinforce-pp", "fit", "reinforce_pp")
