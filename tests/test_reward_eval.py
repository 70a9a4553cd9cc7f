"""``lit-rlhf eval-rm`` on a tiny reward model and the real validation comparisons: accuracy by group with intervals,
calibration (R8) with its diagram, a judge's agreement, and the outputs."""

from __future__ import annotations

import json

import pytest
from conftest import COMPARISON_DATA

from lit_rlhf.evaluation.reward_eval import evaluate_reward_model
from lit_rlhf.evaluation.stats import preference_calibration
from lit_rlhf.metrics import mean_with_interval


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_reward_dir, tiny_model_dir):
    out = tmp_path_factory.mktemp("eval_rm")
    results = evaluate_reward_model(
        reward_model=str(tiny_reward_dir), tokenizer=str(tiny_model_dir), data=str(COMPARISON_DATA), samples=12,
        query_length=128, batch_size=4, output_dir=str(out), accelerator="cpu",
    )
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    return results, pairs, out


def test_accuracy_by_group_from_the_pair_scores(evaluated):
    results, pairs, _ = evaluated
    assert len(pairs) == 12 == results["accuracy"]["n"]
    correct = [float(p["chosen_score"] > p["rejected_score"]) for p in pairs]
    assert results["accuracy"] == mean_with_interval(correct)
    assert sum(group["n"] for group in results["by_batch"].values()) == 12
    assert set(results["by_batch"]) == {p["batch"] for p in pairs} and all(b.startswith("batch") for b in results["by_batch"])
    assert set(results["by_confidence"]) == {str(p["confidence"]) for p in pairs}
    assert results["by_source"].keys() == {"comparisons"}
    # the "longer answer wins" baseline beside the accuracy: 1 where the chosen summary has more tokens, ties half
    longer = [float(p["chosen_tokens"] > p["rejected_tokens"]) + 0.5 * float(p["chosen_tokens"] == p["rejected_tokens"]) for p in pairs]
    assert results["longer_wins"] == mean_with_interval(longer) and results["longer_wins_by_source"]["comparisons"]["n"] == 12
    for pair in pairs:
        assert pair["prompt"].startswith("SUBREDDIT:") and pair["chosen"] and pair["rejected"] and pair["chosen"] != pair["rejected"]


def test_calibration_and_outputs(evaluated):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results, pairs, out = evaluated
    expected = preference_calibration([p["chosen_score"] for p in pairs], [p["rejected_score"] for p in pairs])
    assert results["calibration"]["ece"] == pytest.approx(expected["ece"])
    assert [b["n"] for b in results["calibration"]["bins"]] == [b["n"] for b in expected["bins"]]
    for got, want in zip(results["calibration"]["bins"], expected["bins"]):
        assert got == pytest.approx(want)
    assert sum(b["n"] for b in results["calibration"]["bins"]) == 24  # both orders of every pair
    assert (out / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| all |" in (out / "summary.md").read_text()
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert {"rm_eval/accuracy", "rm_eval/ece"} <= set(events.Tags()["scalars"])
    assert "rm_eval/calibration" in events.Tags()["images"]


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="--reward_model"):
        evaluate_reward_model(output_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="/nowhere is not a saved reward model"):
        evaluate_reward_model("/nowhere", output_dir=str(tmp_path))


@pytest.mark.slow
def test_a_judge_on_the_same_pairs(tiny_reward_dir, tiny_model_dir, default_model_dir, tmp_path):
    from lit_rlhf.evaluation.judges import LogprobJudge

    results = evaluate_reward_model(
        reward_model=str(tiny_reward_dir), tokenizer=str(tiny_model_dir), data=str(COMPARISON_DATA), samples=6,
        query_length=128, judge=LogprobJudge(str(default_model_dir)), judge_samples=4, output_dir=str(tmp_path), accelerator="cpu",
    )
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    judged = [p for p in pairs if "judge" in p]
    assert len(judged) == 4
    agree = [float(p["judge"]["outcome"] == float(p["chosen_score"] > p["rejected_score"])) for p in judged]
    assert results["judge"]["rm_agrees_with_judge"] == mean_with_interval(agree)
    assert results["judge"]["judge_agrees_with_labellers"] == mean_with_interval([p["judge"]["outcome"] for p in judged])


def test_cnndm_rows_get_their_own_accuracy(tiny_reward_dir, tiny_model_dir, tmp_path):
    """Comparisons on CNN/DM articles (``info.article``, recipe D2/D3) are scored and reported as their own source."""
    data = tmp_path / "comparisons"
    data.mkdir()
    rows = [json.loads(line) for line in (COMPARISON_DATA / "validation.jsonl").read_text().splitlines()[:4]]
    for index, row in enumerate(rows[:2]):
        row["info"] = {"id": f"cnn{index}", "article": "The council voted on the new bridge.\nWork starts in May.", "site": "cnn",
                       "title": "Bridge"}
    (data / "validation.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    results = evaluate_reward_model(
        reward_model=str(tiny_reward_dir), tokenizer=str(tiny_model_dir), data=str(data), query_length=128,
        output_dir=str(tmp_path / "out"), accelerator="cpu",
    )
    assert {source: figures["n"] for source, figures in results["by_source"].items()} == {"comparisons/cnndm": 2, "comparisons": 2}
    pairs = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    assert [p["source"] for p in pairs] == ["comparisons/cnndm"] * 2 + ["comparisons"] * 2
    assert pairs[0]["prompt"].startswith("Article:") and pairs[2]["prompt"].startswith("SUBREDDIT:")
