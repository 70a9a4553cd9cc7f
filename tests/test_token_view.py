"""The reward model's score at every response token: the last one is the sequence's reward (R3); HTML and PNG views."""

from __future__ import annotations

import torch

from lit_rlhf.data.formatting import format_query_ids
from lit_rlhf.evaluation.token_view import _colour, token_rewards, token_rewards_html, token_rewards_plot
from lit_rlhf.models.forward import sequence_scores
from lit_rlhf.models.loading import load_tokenizer
from lit_rlhf.models.scalar import ScalarModel

ROW = {"subreddit": "cats", "title": "My cat hides", "post": "She hides under the bed all day and eats at night."}


def test_last_token_score_is_the_reward_and_views_render(tiny_reward_dir, tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = ScalarModel.load(str(tiny_reward_dir)).eval()
    query = format_query_ids(tokenizer, ROW, 128)
    ids = tokenizer.encode(" cat hides all day", add_special_tokens=False) + [tokenizer.eos_token_id]
    short = tokenizer.encode(" cat", add_special_tokens=False) + [tokenizer.eos_token_id]
    rows = [token_rewards(model, tokenizer, query, ids), token_rewards(model, tokenizer, query, short)]
    assert len(rows[0]) == len(ids) and rows[0][-1][0] == tokenizer.eos_token
    with torch.no_grad():
        reward = sequence_scores(model, torch.tensor([query + ids]), tokenizer.pad_token_id).item()
    assert abs(rows[0][-1][1] - reward) < 1e-5
    page = token_rewards_html(rows, titles=["long", "short"])
    assert page.count("<span") == len(rows[0]) + len(rows[1]) and "<b>long</b>" in page and f"(reward {reward:.3f})" in page
    token_rewards_plot(rows, tmp_path / "tokens.png", titles=["long", "short"])
    assert (tmp_path / "tokens.png").read_bytes()[:4] == b"\x89PNG"


def test_colour_scale():
    assert _colour(2.0, 2.0) == "rgb(0,255,0)" and _colour(-5.0, 2.0) == "rgb(255,0,0)" and _colour(0.0, 2.0) == "rgb(255,255,255)"
