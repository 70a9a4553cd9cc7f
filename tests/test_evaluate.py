"""``lit-rlhf eval`` on tiny models and the real TL;DR validation prompts: items, win rates, head to head, outputs."""

from __future__ import annotations

import json

import pytest
from conftest import SFT_DATA

from lit_rlhf.cli import main
from lit_rlhf.data.examples import Lengths, prompt_example
from lit_rlhf.data.formats import to_record
from lit_rlhf.data.templates import Renderer
from lit_rlhf.evaluation.evaluate import evaluate, reward_verdicts
from lit_rlhf.evaluation.stats import mean_with_interval


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model_dir, tiny_reward_dir):
    out = tmp_path_factory.mktemp("eval")
    results = evaluate(
        policies=[str(tiny_model_dir), str(tiny_model_dir)], names=["first", "second"], reward_model=str(tiny_reward_dir),
        ref_policy=str(tiny_model_dir), head_to_head=True, data=str(SFT_DATA), samples=6, query_length=128,
        batch_size=4, temperature=1.0, length_edges=[10, 30], output_dir=str(out), accelerator="cpu",
    )
    return results, out


def read_items(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_items_hold_prompt_responses_scores_and_verdicts(evaluated):
    results, out = evaluated
    items = read_items(out / "items-first.jsonl")
    assert len(items) == 6 == results["samples"]
    for item in items:
        assert item["prompt"].startswith("SUBREDDIT: r/") and "\nPOST: " in item["prompt"] and not item["prompt"].endswith("TL;DR:")
        assert item["reference"] and isinstance(item["response"], str)
        assert 0 <= item["response_tokens"] <= 53
        assert item["kl"] == pytest.approx(0.0, abs=1e-4)  # the policy is its own reference
        verdict = item["judges"]["rm"]
        expected = 1.0 if item["score"] > item["reference_score"] else 0.0 if item["score"] < item["reference_score"] else 0.5
        assert verdict["outcome"] == expected and verdict["order"] == "ab"
    # the win rate is the mean of those outcomes, with the bootstrap interval of stats.mean_with_interval
    rm = results["policies"]["first"]["judges"]["rm"]
    assert rm["win_rate"] == mean_with_interval([item["judges"]["rm"]["outcome"] for item in items])
    assert sum(row["n"] for row in rm["by_length"]) == 6
    assert results["policies"]["first"]["mean_length"] == pytest.approx(sum(i["response_tokens"] for i in items) / 6)


def test_the_same_policy_twice_samples_the_same_responses_and_ties_head_to_head(evaluated):
    results, out = evaluated
    first, second = read_items(out / "items-first.jsonl"), read_items(out / "items-second.jsonl")
    assert [i["response"] for i in first] == [i["response"] for i in second]
    assert results["head_to_head"]["first vs second"]["rm"]["win_rate"]["mean"] == 0.5
    # the reference answers are scored once (with the first policy) and shared
    assert [i["reference_score"] for i in first] == [i["reference_score"] for i in second]


def test_outputs_markdown_results_and_tensorboard(evaluated):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results, out = evaluated
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    table = (out / "summary.md").read_text()
    assert "| first | rm |" in table and "| first vs second | rm | 0.500 |" in table
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    assert {"eval/first/rm/win_rate", "eval/first/rm/win_rate_low", "eval/first/mean_kl"} <= set(tags)
    second = results["policies"]["second"]["judges"]["rm"]["win_rate"]["mean"]
    assert events.Scalars("eval/second/rm/win_rate")[0].value == pytest.approx(second)


def test_reward_verdicts_and_the_post_a_judge_reads(tokenizer):
    verdicts = reward_verdicts([1.0, 0.0, 2.0], [0.5, 0.0, 3.0])
    assert [v.outcome for v in verdicts] == [1.0, 0.5, 0.0]
    # a TL;DR prompt row's prompt_text is the query without its "TL;DR:" (the post the judge prompt shows)
    row = {"subreddit": "x", "title": "t", "post": "p", "summary": "s"}
    example, _ = prompt_example(to_record(row, "tldr"), Renderer(tokenizer), Lengths(64, 16, 80), "tldr")
    assert example["prompt_text"] == "SUBREDDIT: r/x\n\nTITLE: t\n\nPOST: p"


def test_eval_errors(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="needs a judge"):
        evaluate(policies=[str(tiny_model_dir)], output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="at least one policy"):
        evaluate(policies=[], reward_model=str(tiny_model_dir), output_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="/nowhere/rm does not exist"):
        evaluate(policies=[str(tiny_model_dir)], reward_model="/nowhere/rm", output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unique"):
        evaluate(policies=[str(tiny_model_dir)] * 2, names=["a", "a"], reward_model=str(tiny_model_dir), output_dir=str(tmp_path))


def test_eval_cli_prints_its_typed_config(capsys, tiny_model_dir):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--policies+", str(tiny_model_dir), "--local_judge.model", "smollm2-135m", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "policies:" in printed and "class_path: lit_rlhf.evaluation.judges.LogprobJudge" in printed and "temperature: 0.01" in printed


@pytest.mark.slow
def test_periodic_exports_give_an_overoptimisation_curve(tiny_model_dir, tiny_reward_dir, tmp_path):
    import yaml
    from stage_helpers import stage_config

    model = {"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir), "lr": 1e-2, "non_eos_penalty": False}
    config = stage_config("ppo", tmp_path, model=model)  # 2 updates of 2 episodes
    settings = yaml.safe_load(config.read_text())
    export = next(cb for cb in settings["trainer"]["callbacks"] if cb["class_path"].endswith("HFExport"))
    export["init_args"] = {"every_n_updates": 1}
    config.write_text(yaml.safe_dump(settings))
    main(["ppo", "fit", "--config", str(config)])
    updates = tmp_path / "ppo" / "updates"
    assert sorted(p.name for p in updates.iterdir()) == ["update-00001", "update-00002"]

    out = tmp_path / "eval"
    results = evaluate(
        policies=[str(tiny_model_dir)], names=["sft"], exports=str(updates / "*"),
        reward_model=str(tiny_reward_dir), ref_policy=str(tiny_model_dir), data=str(SFT_DATA), samples=4, query_length=128,
        batch_size=4, temperature=1.0, output_dir=str(out), accelerator="cpu",
    )
    kl = {name: policy["mean_kl"] for name, policy in results["policies"].items()}
    assert kl["sft"] == pytest.approx(0.0, abs=1e-4) and abs(kl["update-00002"]) > 1e-3, kl
    assert (out / "overoptimisation.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileNotFoundError, match="matches no exported model"):
        evaluate(exports=str(tmp_path / "nothing" / "*"), reward_model=str(tiny_reward_dir), output_dir=str(out))
