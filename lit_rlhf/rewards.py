"""Reward sources beside the reward model: Python functions named by import path, summed with weights.

A reward function is ``function(prompts, completions, **row_fields) -> list[float]`` (TRL's ``reward_funcs``
convention): ``prompts`` and ``completions`` are lists of B strings (the prompt as a judge reads it, the sampled
response up to its stop token), ``row_fields`` the batch's other per-row fields as lists of B values (``reference``:
the reference answer, ``""`` without one; ``source``: the name of the row's source). A function should accept
``**kwargs`` so that new fields do not break it. The policy-gradient stages (``ppo``, ``rloo``, ``grpo``, ...) take them as
``reward_funcs: ["module:function", ...]`` with ``reward_weights`` (one per reward model and function).

:func:`summary_length` is the shipped example (``configs/quickstart/rloo_length.yaml``).
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable, Sequence

RewardFunction = Callable[..., Sequence[float]]


class RewardFunctionError(RuntimeError):
    """A reward function raised, returned the wrong number of values or a non-finite value: the run stops before any
    update, naming the function and the row."""


def import_reward_function(path: str) -> RewardFunction:
    """The callable named ``"package.module:function"`` (``"package.module.function"`` also accepted).

    Raises:
        ValueError: naming ``path`` when it has no module part, the module cannot be imported, it has no such
            attribute, or the attribute is not callable.
    """
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"reward function '{path}': expected 'module:function', e.g. 'lit_rlhf.rewards:summary_length'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward function '{path}': cannot import module '{module_name}' ({error})") from error
    function = getattr(module, attribute, None)
    if function is None:
        raise ValueError(f"reward function '{path}': module '{module_name}' has no attribute '{attribute}'")
    if not callable(function):
        raise ValueError(f"reward function '{path}': '{attribute}' is not callable")
    return function


def call_reward_function(
    name: str, function: RewardFunction, prompts: list[str], completions: list[str], row_fields: dict[str, list[Any]]
) -> list[float]:
    """``function(prompts, completions, **row_fields)`` checked: B finite floats.

    Raises:
        RewardFunctionError: naming ``name`` and, where one is to blame, the row (its index, prompt tail and completion
            head), when the function raises, returns another number of values than ``len(completions)``, or a value
            that is not a finite number.
    """

    def row(index: int) -> str:
        prompt, completion = prompts[index], completions[index]
        return f"row {index} (prompt '…{prompt[-80:]}', completion '{completion[:80]}')"

    try:
        values = function(prompts, completions, **row_fields)
    except Exception as error:  # any failure of user code stops the run with its name
        raise RewardFunctionError(f"reward function '{name}' raised {type(error).__name__}: {error}") from error
    values = list(values)
    if len(values) != len(completions):
        raise RewardFunctionError(f"reward function '{name}' returned {len(values)} values for {len(completions)} completions")
    checked = []
    for index, value in enumerate(values):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not math.isfinite(number):
            raise RewardFunctionError(f"reward function '{name}' returned {value!r} (not a finite number) for {row(index)}")
        checked.append(number)
    return checked


def summary_length(prompts: list[str], completions: list[str], target_words: int = 26, **row_fields: Any) -> list[float]:
    """A rule-based reward for TL;DR summaries: ``-|words - target_words| / target_words``, 0 at the target length and
    -1 for an empty summary or one twice too long. The default target, 26 words, is the median length of the human-written
    TL;DRs of the shared sample's 1,416 training rows.

    Args:
        completions: B summaries.
        target_words: the length that scores 0.

    Returns:
        B rewards in ``(-inf, 0]``.
    """
    return [-abs(len(text.split()) - target_words) / target_words for text in completions]
