"""The KL coefficient of the per-token penalty: fixed (N+, recipe P5) or adaptive (Ziegler et al. 2019).

The adaptive controller is the proportional controller of Ziegler et al. 2019 ("Fine-Tuning Language Models
from Human Preferences", ``lm-human-preferences``' ``AdaptiveKLController``), which N+'s older PPO script
carries as an option (``use_adaptive_kl``, target 6, horizon 10,000 episodes). It is off by default.
"""

from __future__ import annotations

from typing import Optional

from torch import nn


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: float, n_steps: int) -> float:
    """One update of the adaptive KL coefficient (Ziegler et al. 2019, section 2.2).

    ``error = clip(kl / target - 1, -0.2, 0.2)`` and ``kl_coef * (1 + error * n_steps / horizon)``: the coefficient
    grows while the measured KL is above the target and shrinks while it is below, by at most 20% per
    ``horizon`` episodes.

    Args:
        kl_coef: the current coefficient (reward units per nat).
        kl: the measured KL of the last batch (nats per response, summed over tokens, mean over episodes).
        target: the target KL (nats; 6 in Ziegler et al. and N+).
        horizon: episodes over which the proportional error acts (10,000).
        n_steps: episodes in the last batch (the global batch size).

    Returns:
        the new coefficient.

    Raises:
        ValueError: for a non-positive ``target`` or ``horizon``.
    """
    if target <= 0 or horizon <= 0:
        raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got target={target}, horizon={horizon}")
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


class KLController(nn.Module):
    """The KL coefficient of a PPO run: fixed when ``target`` is ``None`` (recipe P5), else adaptive.

    The coefficient is a Python float kept as the module's *extra state*, so it is in the ``state_dict``
    (Lightning checkpoints: a resumed run continues with the adapted value) and no precision cast can round it.

    Args:
        kl_coef: the initial (or fixed) coefficient (0.05 in N+).
        target: target KL for :func:`adaptive_kl_coef`; ``None`` keeps the coefficient fixed.
        horizon: its horizon in episodes.
    """

    def __init__(self, kl_coef: float, target: Optional[float] = None, horizon: float = 10000) -> None:
        super().__init__()
        if target is not None:
            adaptive_kl_coef(kl_coef, 0.0, target, horizon, 0)  # validate early
        self.value, self.target, self.horizon = float(kl_coef), target, horizon

    def get_extra_state(self) -> dict:
        return {"value": self.value}

    def set_extra_state(self, state: dict) -> None:
        self.value = float(state["value"])

    def update(self, kl: float, n_steps: int) -> float:
        """Adapt the coefficient to the measured ``kl`` of ``n_steps`` episodes (no-op when fixed); returns it."""
        if self.target is not None:
            self.value = adaptive_kl_coef(self.value, kl, self.target, self.horizon, n_steps)
        return self.value
