"""The reward model's score at every response token (the N+ analysis of reward logits at non-EOS positions).

A scalar reward model outputs a score at every position (recipe R1); only the one at the last token (EOS, R3) is
the reward. The scores at the earlier positions show what the model "would say" were the summary to end there,
which is how N+ shows that a reward model trained on EOS-ending summaries gives low scores to truncated ones (the
motivation of the non-EOS penalty, P3).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import torch

from lit_rlhf.models.forward import model_inputs


@torch.no_grad()
def token_rewards(reward_model: Any, tokenizer: Any, query_ids: list[int], response_ids: list[int]) -> list[tuple[str, float]]:
    """The reward model's score after each token of a response.

    Args:
        reward_model: a :class:`~lit_rlhf.models.scalar.ScalarModel` (its R5 bias applied, as in every score).
        tokenizer: its tokenizer (with the ``[PAD]`` of recipe D6).
        query_ids: the unpadded query token ids (a batch's ``query_ids`` without the padding).
        response_ids: the unpadded response token ids, ending with EOS / end of turn (a batch's ``chosen_response_ids``,
            or :meth:`~lit_rlhf.data.templates.Renderer.response`).

    Returns:
        one ``(token text, score)`` per response token, EOS last; the last score is the sequence's reward.
    """
    response_ids = list(response_ids)
    ids = torch.tensor([list(query_ids) + response_ids], device=next(reward_model.parameters()).device)
    scores = reward_model(**model_inputs(ids, tokenizer.pad_token_id)).float()[0, len(query_ids) :]
    return [(tokenizer.decode([token]), float(score)) for token, score in zip(response_ids, scores)]


def _colour(score: float, scale: float) -> str:
    """Red (negative) - white - green (positive), saturating at ``|score| = scale``."""
    t = max(-1.0, min(1.0, score / scale)) if scale > 0 else 0.0
    red, green = (255, int(255 * (1 + t))) if t < 0 else (int(255 * (1 - t)), 255)
    blue = int(255 * (1 - abs(t)))
    return f"rgb({red},{green},{blue})"


def token_rewards_html(rows: list[list[tuple[str, float]]], titles: list[str] | None = None) -> str:
    """HTML of token-reward rows: each token on a background from red (low) to green (high), its score on hover;
    one colour scale (the largest absolute score) for all rows, so they compare."""
    scale = max((abs(score) for row in rows for _, score in row), default=1.0)
    parts = ['<div style="font-family: monospace; line-height: 1.9">']
    for index, row in enumerate(rows):
        title = titles[index] if titles and index < len(titles) else f"response {index}"
        reward = row[-1][1] if row else float("nan")
        parts.append(f"<p><b>{html.escape(title)}</b> (reward {reward:.3f})<br>")
        for token, score in row:
            text = html.escape(token).replace(" ", "&nbsp;") or "&#8203;"
            parts.append(f'<span title="{score:.3f}" style="background:{_colour(score, scale)}; padding:1px">{text}</span>')
        parts.append("</p>")
    parts.append("</div>")
    return "".join(parts)


def token_rewards_plot(rows: list[list[tuple[str, float]]], path: Path | None = None, titles: list[str] | None = None):
    """One line per row: the score after each response token (x: token index, labelled with the tokens of the
    first row), the last point of each line its reward; saved as a PNG when ``path`` is given. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 3.2), dpi=120)
    for index, row in enumerate(rows):
        label = titles[index] if titles and index < len(titles) else f"response {index}"
        axis.plot(range(len(row)), [score for _, score in row], marker=".", label=label)
        if row:
            axis.scatter([len(row) - 1], [row[-1][1]], marker="*", s=80, zorder=3)
    if rows and rows[0]:
        axis.set_xticks(range(len(rows[0])), [token.strip() or "␣" for token, _ in rows[0]], rotation=90, fontsize=6)
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.set(ylabel="RM score at the token", title="Reward at every response token (* = the reward, at EOS)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path)
    return figure
