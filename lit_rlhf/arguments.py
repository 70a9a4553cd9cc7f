"""Checks of constructor arguments: an invalid hyperparameter fails when its module is built, by name.

Stage modules and DataModules call :func:`check_arguments` first thing in ``__init__``, so ``lit-rlhf ppo fit
--model.response_length 0`` stops before any model or data is loaded, with the argument's name, its value and what
it must be.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

#: rule name -> (test, what a valid value is)
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "positive": (lambda value: value > 0, "> 0"),
    "non_negative": (lambda value: value >= 0, ">= 0"),
    "fraction": (lambda value: 0 <= value <= 1, "in [0, 1]"),
}


def check_arguments(owner: str, values: Mapping[str, Any], **rules: Iterable[str]) -> None:
    """Check ``values[name]`` against each rule of :data:`RULES` it is listed under; ``None`` (unset) always passes.

    Args:
        owner: the class the arguments belong to, for the message (e.g. ``"PPOModule"``).
        values: argument name -> value (e.g. the ``__init__`` locals).
        rules: rule name -> the names of the arguments it applies to, e.g. ``positive=("lr", "response_length")``.

    Raises:
        ValueError: ``"{owner}: {name}={value!r} is invalid: it must be {rule}"`` for the first argument that fails.
        KeyError: for an unknown rule name (a programming error).
    """
    for rule, names in rules.items():
        test, valid = RULES[rule]
        for name in names:
            value = values[name]
            if value is not None and not test(value):
                raise ValueError(f"{owner}: {name}={value!r} is invalid: it must be {valid}")


def require(owner: str, condition: bool, message: str) -> None:
    """Raise ``ValueError(f"{owner}: {message}")`` unless ``condition``: for checks across arguments."""
    if not condition:
        raise ValueError(f"{owner}: {message}")
