"""``lit-rlhf eval`` on tiny models and the real TL;DR validation prompts: items, win rates, head to head, outputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SFT_DATA
from stage_helpers import direct_kl, record_sampling, until_first_stop
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_rlhf.cli import main
from lit_rlhf.data.examples import Lengths, prompt_example
from lit_rlhf.data.formats import to_record
from lit_rlhf.data.templates import Renderer
from lit_rlhf.evaluation.evaluate import evaluate, reward_verdicts
from lit_rlhf.metrics import mean_with_interval
from lit_rlhf.models.forward import sequence_scores
from lit_rlhf.models.loading import load_tokenizer, stop_token_ids
from lit_rlhf.models.scalar import ScalarModel


@pytest.fixture(scope="module")
def other_policy_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with its (tied) embeddings scaled by 30: logits 30 times larger, far from the near-uniform tiny
    model it is measured against (and, on the 6 prompts, winning 5 of 6 against ``first``: a swapped pair shows)."""
    directory = tmp_path_factory.mktemp("other-policy")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(30.0)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model_dir, tiny_reward_dir, other_policy_dir):
    """``first`` and ``second`` are the reference policy itself, ``other`` differs; the queries and raw responses of
    every sampling call are recorded (2 batches per policy, in the order of the policies). No EOS penalty: the random
    models' responses keep their own reward-model scores."""
    out = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as patch:
        sampled = record_sampling(patch)
        results = evaluate(
            policies=[str(tiny_model_dir), str(tiny_model_dir), str(other_policy_dir)], names=["first", "second", "other"],
            reward_model=str(tiny_reward_dir), ref_policy=str(tiny_model_dir), head_to_head=True, data=str(SFT_DATA),
            samples=6, query_length=128, batch_size=4, temperature=1.0, non_eos_penalty=False, length_edges=[10, 30],
            output_dir=str(out), accelerator="cpu",
        )
    return results, out, sampled


def read_items(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_items_hold_prompt_responses_scores_and_verdicts(evaluated):
    results, out, _ = evaluated
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
    results, out, _ = evaluated
    first, second = read_items(out / "items-first.jsonl"), read_items(out / "items-second.jsonl")
    assert [i["response"] for i in first] == [i["response"] for i in second]
    assert results["head_to_head"]["first vs second"]["rm"]["win_rate"]["mean"] == 0.5
    # the reference answers are scored once (with the first policy) and shared
    assert [i["reference_score"] for i in first] == [i["reference_score"] for i in second]


def test_a_different_policy_has_the_kl_scores_and_win_rates_of_a_direct_recomputation(
    evaluated, tiny_model_dir, tiny_reward_dir, other_policy_dir
):
    """``other``'s KL to the reference, its scores and its win rates against the references and head to head against
    ``first``, from its recorded samples: a plain forward of each model, every (query, response) row scored whole."""
    results, out, sampled = evaluated
    assert len(sampled) == 6  # 3 policies x 2 batches (4 + 2 prompts)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    pad, stops = tokenizer.pad_token_id, stop_token_ids(tokenizer)
    reward_model = ScalarModel.load(str(tiny_reward_dir))
    reference, other = (AutoModelForCausalLM.from_pretrained(path) for path in (tiny_model_dir, other_policy_dir))

    def scores(calls):
        queries, responses = (torch.cat(parts) for parts in zip(*calls))
        kept = responses.masked_fill(~until_first_stop(responses, stops), pad)
        with torch.no_grad():
            return queries, responses, sequence_scores(reward_model, torch.cat([queries, kept], dim=1), pad).tolist()

    queries, responses, other_scores = scores(sampled[4:])
    _, _, first_scores = scores(sampled[:2])
    items = read_items(out / "items-other.jsonl")
    kl = direct_kl(other, reference, queries, responses, stops, pad, 1.0).tolist()
    assert min(abs(value) for value in kl) > 0.1  # far from its reference, unlike first and second
    assert [item["kl"] for item in items] == pytest.approx(kl, rel=1e-4, abs=1e-4)
    assert results["policies"]["other"]["mean_kl"] == pytest.approx(sum(kl) / 6, rel=1e-4, abs=1e-4)
    assert [item["score"] for item in items] == pytest.approx(other_scores, abs=1e-4)

    def outcome(a, b):
        return 1.0 if a > b else 0.0 if a < b else 0.5

    against_references = [outcome(score, item["reference_score"]) for score, item in zip(other_scores, items)]
    assert results["policies"]["other"]["judges"]["rm"]["win_rate"]["mean"] == pytest.approx(sum(against_references) / 6)
    head_to_head = [outcome(a, b) for a, b in zip(first_scores, other_scores)]
    assert results["head_to_head"]["first vs other"]["rm"]["win_rate"]["mean"] == pytest.approx(sum(head_to_head) / 6)


def test_outputs_markdown_results_and_tensorboard(evaluated):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results, out, _ = evaluated
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
