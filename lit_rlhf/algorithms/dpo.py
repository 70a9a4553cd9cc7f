"""DPO losses and the pair selection of online iterative DPO, as pure tensor functions.

Sources: Rafailov et al. 2023 (DPO), Mitchell 2023 (label smoothing, "conservative DPO"), Azar et al. 2023 (IPO),
Dong et al. 2024 (online iterative DPO, recipe §3), and the N+ DPO baseline (recipe §1, beta 0.05).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo")
PAIR_STRATEGIES = ("best_vs_worst", "best_vs_random")


def dpo_loss(
    policy_chosen_logprobs: torch.Tensor,
    policy_rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor,
    ref_rejected_logprobs: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss on sequence logprobs, and the implicit rewards of chosen and rejected responses.

    With ``h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)`` (nats):

    - ``"sigmoid"`` (DPO): ``-(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)``, where ``eps`` is
      ``label_smoothing``, the assumed probability that a label is flipped (conservative DPO); ``eps = 0`` is DPO.
    - ``"ipo"`` (IPO, Azar et al. eq. 17): ``(h - 1 / (2 * beta))**2``, with ``beta`` as IPO's ``tau`` and the
      summed sequence logprobs given here; ``label_smoothing`` must be 0.

    Implicit reward (recipe §1 DPO baseline): ``beta * (policy - ref)`` for each response.

    Args:
        policy_chosen_logprobs: ``(B,)`` summed response logprobs of the chosen responses under the policy.
        policy_rejected_logprobs: ``(B,)`` the same for the rejected responses.
        ref_chosen_logprobs: ``(B,)`` chosen responses under the reference policy (no gradient needed).
        ref_rejected_logprobs: ``(B,)`` rejected responses under the reference policy.
        beta: KL-regularisation strength (N+ baseline 0.05, online iterative DPO 0.1).
        label_smoothing: ``eps`` in ``[0, 0.5)``.
        loss_type: ``"sigmoid"`` or ``"ipo"``.

    Returns:
        ``(loss, chosen_rewards, rejected_rewards)``: the mean loss (scalar) and two ``(B,)`` detached rewards.

    Raises:
        ValueError: for an unknown ``loss_type``, a non-positive ``beta``, ``label_smoothing`` outside
            ``[0, 0.5)``, or label smoothing with IPO.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type '{loss_type}' ({', '.join(DPO_LOSS_TYPES)})")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to the sigmoid loss only, not to IPO")
    chosen_logratios = policy_chosen_logprobs.float() - ref_chosen_logprobs.float()  # (B,)
    rejected_logratios = policy_rejected_logprobs.float() - ref_rejected_logprobs.float()
    margin = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    else:
        losses = (margin - 1 / (2 * beta)) ** 2
    return losses.mean(), beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def chosen_nll(chosen_logprob_sums: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """The NLL term some iterative DPO variants add to the DPO loss (Pang et al. 2024, "Iterative Reasoning Preference
    Optimization"; an option of RLHFlow's scripts, recipe W6): the chosen responses' negative log-likelihood per token,
    averaged over the pairs.

    Args:
        chosen_logprob_sums: ``(B,)`` summed logprobs of the chosen responses under the policy (nats).
        chosen_lengths: ``(B,)`` their token counts (> 0).

    Returns:
        scalar, nats per token.
    """
    return (-chosen_logprob_sums.float() / chosen_lengths.clamp(min=1).float()).mean()


def select_pairs(
    scores: torch.Tensor,
    strategy: str = "best_vs_worst",
    lengths: Optional[torch.Tensor] = None,
    length_penalty: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick one chosen/rejected pair among K scored responses per prompt (online iterative DPO, recipe §3 step 3).

    Responses are ranked by ``scores - length_penalty * lengths`` (RLHFlow's length-penalised ranking, their Eq. 9 with
    lengths in characters, recipe W5; the concise model uses 0.001). ``"best_vs_worst"`` ("max-min", the paper's best)
    pairs the top response with the bottom one; ``"best_vs_random"`` pairs it with a uniformly drawn other response. A
    pair whose two ranking values are equal is a tie and is dropped (e.g. all K responses without EOS share the penalty
    score). Ties for the best place go to the lowest index.

    Args:
        scores: ``(P, K)`` reward-model scores of K responses for each of P prompts, K >= 2.
        strategy: ``"best_vs_worst"`` or ``"best_vs_random"``.
        lengths: ``(P, K)`` response lengths (characters in recipe W5); needed when ``length_penalty`` is non-zero.
        length_penalty: reward units subtracted per unit of length.
        generator: random source for ``"best_vs_random"``.

    Returns:
        ``(chosen, rejected, keep)``: ``(P,)`` indices into K of the chosen and rejected responses, and a ``(P,)``
        bool mask of the pairs that are not ties.

    Raises:
        ValueError: for an unknown strategy, K < 2, or a length penalty without lengths.
    """
    if strategy not in PAIR_STRATEGIES:
        raise ValueError(f"unknown pair strategy '{strategy}' ({', '.join(PAIR_STRATEGIES)})")
    if scores.dim() != 2 or scores.size(1) < 2:
        raise ValueError(f"scores must be (prompts, K >= 2), got shape {tuple(scores.shape)}")
    ranking = scores.float()
    if length_penalty:
        if lengths is None:
            raise ValueError("length_penalty needs the response lengths")
        ranking = ranking - length_penalty * lengths.float()
    chosen = ranking.argmax(dim=1)  # (P,)
    if strategy == "best_vs_worst":
        rejected = ranking.argmin(dim=1)
    else:
        num_prompts, k = ranking.shape
        offsets = torch.randint(1, k, (num_prompts,), generator=generator, device=torch.device("cpu"))
        rejected = (chosen + offsets.to(chosen.device)) % k  # uniform over the K - 1 others
    rows = torch.arange(ranking.size(0), device=ranking.device)
    keep = ranking[rows, chosen] != ranking[rows, rejected]
    return chosen, rejected, keep


def preference_pairs(
    scores: torch.Tensor,
    responses: torch.Tensor,
    strategy: str = "best_vs_worst",
    lengths: Optional[torch.Tensor] = None,
    length_penalty: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pairs of one online-DPO iteration (recipe W5): :func:`select_pairs` per prompt, then the prompts whose pair is
    a tie or whose two responses are the same tokens dropped.

    Args:
        scores: ``(P, K)`` reward-model scores of the K responses of each of P prompts.
        responses: ``(P*K, T)`` the responses' token ids, prompt-major (row ``p*K + k``), padded alike.
        strategy, lengths, length_penalty, generator: as :func:`select_pairs` (``lengths`` ``(P, K)``).

    Returns:
        ``(chosen_rows, rejected_rows, ties, identical)``: ``(N,)`` rows of ``responses`` of the N kept pairs, and two
        ``(P,)`` bool masks of the dropped prompts (a tie; identical responses that are not a tie).
    """
    num_prompts, k = scores.shape
    chosen, rejected, not_tie = select_pairs(scores, strategy, lengths, length_penalty, generator)
    prompts = torch.arange(num_prompts, device=scores.device)
    identical = (responses[prompts * k + chosen] == responses[prompts * k + rejected]).all(dim=1)  # (P,)
    keep = not_tie & ~identical
    return prompts[keep] * k + chosen[keep], prompts[keep] * k + rejected[keep], ~not_tie, not_tie & identical
