"""The non-finite guard's verdict per optimiser step (one collective, DeepSpeed's gradient norm) and the device of
logged values, on CPU with stand-ins for the second rank, the DeepSpeed engine and the accelerator (issue 27).

The whole-run behaviour (a diverging or NaN-scored run stops before any write) is in tests/test_resume.py; the real
ZeRO-2/3 engines' gradient norm in tests/deepspeed_worker.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lit_rlhf.models.loading import load_tokenizer
from lit_rlhf.stages.common import NonFiniteError, StageModule
from lit_rlhf.stages.ppo import PPOModule


class CountingStrategy:
    """A stand-in for a 2-rank strategy: counts the collectives and adds what the other rank contributes."""

    def __init__(self, other_rank: torch.Tensor | None = None, model: object = None) -> None:
        self.calls, self.other_rank, self.model = 0, other_rank, model

    def reduce(self, value: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "sum"
        self.calls += 1
        return value + (self.other_rank if self.other_rank is not None else 0)


class Linear(StageModule):
    stage_name = "test"

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)


def attached(module: StageModule, strategy: CountingStrategy) -> StageModule:
    module._trainer = SimpleNamespace(world_size=2, strategy=strategy, global_step=7, current_epoch=0)
    return module


def accumulated_step(module: StageModule, losses_scale: list[float]) -> None:
    """One optimiser step accumulating one backward per entry of ``losses_scale`` (each loss multiplied by it)."""
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    for scale in losses_scale:
        loss = module.layer(torch.ones(2, 3)).sum() * scale
        module.on_before_backward(loss)
        loss.backward()
    module.on_before_optimizer_step(optimizer)
    optimizer.step()
    module.check_parameters()


def test_one_collective_per_optimiser_step_however_many_backwards():
    strategy = CountingStrategy()
    module = attached(Linear(), strategy)
    accumulated_step(module, [1.0, 0.5, 0.25, 1.0])
    accumulated_step(module, [1.0, 1.0])
    assert strategy.calls == 2  # the old guard: one per backward, one for the gradient, one or two for the parameters


@pytest.mark.parametrize(("scales", "other_rank", "name"), [
    ([1.0, float("nan"), 1.0], None, "loss"),  # a NaN loss at the second of three backwards
    ([1.0, 1.0], torch.tensor([0.0, 1.0, 0.0]), "gradient norm"),  # this rank is fine, the other one is not
    ([1.0, 1.0], torch.tensor([0.0, 0.0, 3.0]), "parameters"),
])
def test_the_verdict_names_the_first_bad_quantity_on_any_rank(scales, other_rank, name):
    strategy = CountingStrategy(other_rank)
    module = attached(Linear(), strategy)
    with pytest.raises(NonFiniteError, match=f"test: non-finite {name} at step 7 "):
        accumulated_step(module, scales)
    assert strategy.calls == 1
    accumulated_step(attached(Linear(), CountingStrategy()), [1.0])  # a fresh verdict after a raise


def test_a_bad_parameter_is_named():
    module = attached(Linear(), CountingStrategy())
    with torch.no_grad():
        module.layer.bias.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="non-finite parameter layer.bias at step 7"):
        module.check_parameters()


class Engine:
    """What the guard reads of a ``deepspeed.DeepSpeedEngine`` after its step (gradients freed, ``p.grad`` None)."""

    def __init__(self, norm: float | None, fp16: bool = False) -> None:
        self.norm, self.fp16 = norm, fp16

    def set_gradient_accumulation_boundary(self, is_last: bool) -> None:  # what marks a DeepSpeed engine
        pass

    def get_global_grad_norm(self) -> float | None:
        return self.norm

    def fp16_enabled(self) -> bool:
        return self.fp16

    def dynamic_loss_scale(self) -> bool:
        return self.fp16


@pytest.mark.parametrize(("engine", "stops"), [
    (Engine(float("nan")), True),  # bf16: a NaN gradient is applied, only the norm tells
    (Engine(float("inf")), True),  # fp32: DeepSpeed skipped the step as an overflow
    (Engine(0.5), False),
    (Engine(None), False),  # no norm computed: the parameters still are checked
    (Engine(float("inf"), fp16=True), False),  # fp16 dynamic loss scaling: a skipped step, the scale falls
])
def test_deepspeed_gradient_norm_reaches_the_guard_without_p_grad(engine, stops):
    """Under ZeRO ``p.grad`` is freed after the reduction: the old guard never saw a gradient there."""
    module = attached(Linear(), CountingStrategy(model=engine))
    module.on_before_optimizer_step(torch.optim.SGD(module.parameters(), lr=0.1))  # no p.grad: nothing noted
    if stops:
        with pytest.raises(NonFiniteError, match="non-finite gradient norm at step 7"):
            module.check_parameters()
    else:
        module.check_parameters()


def test_ppo_logs_every_value_on_the_module_device(tiny_model_dir, tiny_reward_dir, monkeypatch):
    """Every value PPO logs with ``sync_dist`` is a tensor on the module's device or a number (which Lightning puts
    there): NCCL reduces device tensors only. The device is ``meta`` here, standing in for a GPU; the old code built
    ``lr``, ``objective/kl_coef`` and the running score statistics as CPU tensors."""
    module = PPOModule(policy=str(tiny_model_dir), reward_model=str(tiny_reward_dir), reward_norm=True)
    module.tokenizer = load_tokenizer(str(tiny_model_dir))
    module._trainer = SimpleNamespace(world_size=1, strategy=SimpleNamespace(reduce=lambda value, reduce_op: torch.zeros(())))
    module.optimizers = lambda: SimpleNamespace(param_groups=[{"lr": 3e-6}])
    module._start_time = 0.0
    module._device = torch.device("meta")
    # masked_mean's empty-mask check reads a value, which a meta tensor has not
    monkeypatch.setattr("lit_rlhf.stages.ppo.masked_mean", lambda values, mask: (values * mask).sum() / mask.sum())
    logged: list[tuple[str, object]] = []
    module.log = lambda name, value, **kwargs: logged.append((name, value))
    module.log_dict = lambda values, **kwargs: logged.extend(values.items())
    rows, length = 2, 5
    data = {
        "padding_mask": torch.zeros(rows, length, dtype=torch.bool), "kl": torch.zeros(rows, length),
        "logprobs": torch.zeros(rows, length), "non_score_reward": torch.zeros(rows, length), "scores": torch.zeros(rows),
        "responses": torch.zeros(rows, length, dtype=torch.long),
    }
    stats = {key: [torch.zeros(())] for key in ("approxkl", "clipfrac", "policy/entropy", "loss/policy", "ratio", "ratio_var")}
    module.log_update({key: value.to("meta") for key, value in data.items()}, {k: [v.to("meta") for v in vs] for k, vs in stats.items()},
                      batch_size=rows, batch_idx=0)
    names = {name for name, _ in logged}
    assert {"lr", "objective/kl_coef", "objective/scores_running_mean", "objective/scores", "eps"} <= names
    misplaced = [name for name, value in logged if torch.is_tensor(value) and value.device.type != "meta"]
    assert not misplaced, misplaced
