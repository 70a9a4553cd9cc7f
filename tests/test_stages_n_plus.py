"""N+ fidelity inside the stages (tiny random-init models): SFT loss weighting, PPO micro-batch losses, validation
temperature, the adaptive KL controller and the flags' validation."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import SFT_DATA
from stage_helpers import QUERY_LENGTH, SFT_MAX_LENGTH, SFT_RESPONSE_LENGTH, last_checkpoint, last_record, load_checkpoint, stage_config
from torch.optim.optimizer import register_optimizer_step_pre_hook

import lit_rlhf.sampling as sampling
import lit_rlhf.stages.ppo as ppo_stage
from lit_rlhf.algorithms import KLController, adaptive_kl_coef
from lit_rlhf.cli import main
from lit_rlhf.data.datamodules import PromptDataModule, SFTDataModule
from lit_rlhf.stages.ppo import PPOModule
from lit_rlhf.stages.sft import SFTModule


# ------------------------------------------------------------------------------------------------ SFT weighting
def sft_batch(tiny_model_dir, rows: int = 4) -> dict:
    data = SFTDataModule(
        path=str(SFT_DATA), tokenizer=str(tiny_model_dir), query_length=QUERY_LENGTH, response_length=SFT_RESPONSE_LENGTH,
        max_length=SFT_MAX_LENGTH, eval_batch_size=rows, val_samples=rows,
    )
    data.setup("validate")
    return next(iter(data.val_dataloader()))


@pytest.mark.parametrize("response_only_loss", [False, True])
def test_sft_sequence_loss_is_the_mean_of_one_row_micro_batches(tiny_model_dir, response_only_loss):
    """N+ trains micro-batches of one row with accumulation: the "sequence" loss of a batch is the mean of the rows'
    own losses; the "token" loss weighs rows by their token counts."""
    batch = sft_batch(tiny_model_dir)
    lengths = (batch["input_ids"] != 49152).sum(1)
    assert len(set(lengths.tolist())) > 1, "the rows must differ in length"
    modules = {norm: SFTModule(model=str(tiny_model_dir), loss_normalization=norm, response_only_loss=response_only_loss)
               for norm in ("sequence", "token")}
    for module in modules.values():
        module.configure_model()
        module.policy.load_state_dict(modules["sequence"].policy.state_dict())
    with torch.no_grad():
        per_row = torch.stack([
            modules["token"].loss({key: value[row : row + 1] for key, value in batch.items() if key.endswith("_ids")})
            for row in range(len(lengths))
        ])
        sequence, token = modules["sequence"].loss(batch), modules["token"].loss(batch)
    torch.testing.assert_close(sequence, per_row.mean(), rtol=1e-5, atol=1e-6)
    assert abs(sequence.item() - token.item()) > 1e-4  # the weightings differ on rows of different lengths


def test_sft_rejects_an_unknown_loss_normalization(tiny_model_dir):
    with pytest.raises(ValueError, match="loss_normalization"):
        SFTModule(model=str(tiny_model_dir), loss_normalization="batch")


# ------------------------------------------------------------------------------------------- PPO: flags, losses
@pytest.mark.parametrize("flag", ["score_position", "whitening_scope"])
def test_ppo_rejects_unknown_flag_values(tiny_model_dir, tiny_reward_dir, flag):
    with pytest.raises(ValueError, match=flag):
        PPOModule(policy=str(tiny_model_dir), reward_model=str(tiny_reward_dir), **{flag: "bogus"})


def test_ppo_defaults_are_n_plus(tiny_model_dir, tiny_reward_dir):
    hp = PPOModule(policy=str(tiny_model_dir), reward_model=str(tiny_reward_dir)).hparams
    assert (hp.score_position, hp.whitening_scope, hp.weight_decay, hp.eval_temperature, hp.kl_target) == (
        "after_eos", "rank", 0.01, 0.01, None)


@pytest.fixture
def rollout(tiny_model_dir, tiny_reward_dir):
    module = PPOModule(policy=str(tiny_model_dir), reward_model=str(tiny_reward_dir), response_length=10)
    module.configure_model()
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    data = PromptDataModule(path=str(SFT_DATA), tokenizer=str(tiny_model_dir), query_length=QUERY_LENGTH,
                            response_length=SFT_RESPONSE_LENGTH, max_length=SFT_MAX_LENGTH, eval_batch_size=4, val_samples=4)
    data.setup("validate")
    queries = next(iter(data.val_dataloader()))["query_ids"]
    torch.manual_seed(0)
    rollout = module.rollout(queries)
    # give the rows different lengths (EOS positions), then recompute nothing: the loss only reads the masks
    lengths = torch.tensor([2, 9, 5, 10])
    positions = torch.arange(10)
    rollout["padding_mask"] = positions.unsqueeze(0) >= lengths.unsqueeze(1)
    rollout["value_padding_mask"] = positions.unsqueeze(0) >= (lengths + 1).clamp(max=10).unsqueeze(1)
    return module, rollout, queries.size(1)


def test_ppo_micro_batch_losses_are_their_own_masked_means(rollout):
    """P8: gradient accumulation averages each micro-batch's masked mean, so the loss depends on micro_batch_size."""
    module, data, context = rollout
    rows = torch.arange(4)
    with torch.no_grad():
        whole, _ = module.ppo_loss(data, rows, context)
        singles = torch.stack([module.ppo_loss(data, rows[i : i + 1], context)[0] for i in range(4)])
        pairs = torch.stack([module.ppo_loss(data, rows[i : i + 2], context)[0] for i in (0, 2)])
    # what training_step backpropagates for micro_batch_size 1, 2 and 4: the mean of the micro-batch losses
    accumulated = {1: singles.mean(), 2: pairs.mean(), 4: whole}
    assert len({round(value.item(), 6) for value in accumulated.values()}) == 3, accumulated


def test_ppo_training_step_accumulates_the_gradient_of_the_mean_micro_batch_loss(tiny_model_dir, tiny_reward_dir, tmp_path, monkeypatch):
    """P8 through the real ``training_step``: 6 episodes in micro-batches of 2 accumulate, before the optimiser step,
    the gradient of the mean of the 3 micro-batch losses. Every row here has all its tokens (no EOS), so that is the
    gradient of the loss of the 6 rows at once; a divisor other than the number of micro-batches scales it."""
    captured = {}
    real_rollout = PPOModule.rollout

    def rollout(self, queries, rows=None):
        captured["module"], captured["data"] = self, real_rollout(self, queries, rows)
        return captured["data"]

    def before_step(optimizer, args, kwargs):
        if "accumulated" in captured:
            return
        module, data = captured["module"], captured["data"]
        params = [param for group in optimizer.param_groups for param in group["params"] if param.grad is not None]
        captured["accumulated"] = [param.grad.clone() for param in params]
        for param in params:
            param.grad = None
        with torch.enable_grad():
            loss, _ = module.ppo_loss(data, torch.arange(6), data["query_responses"].size(1) - data["responses"].size(1))
            loss.backward()
        captured["full_batch"] = [param.grad.clone() for param in params]
        for param, grad in zip(params, captured["accumulated"]):
            param.grad = grad

    monkeypatch.setattr(PPOModule, "rollout", rollout)
    model = {"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir), "micro_batch_size": 2, "num_ppo_epochs": 1}
    config = stage_config("ppo", tmp_path, model=model, data={"batch_size": 6, "total_episodes": 6}, trainer={"limit_val_batches": 0})
    handle = register_optimizer_step_pre_hook(before_step)
    try:
        main(["ppo", "fit", "--config", str(config)])
    finally:
        handle.remove()
    data = captured["data"]
    assert data["responses"].size(0) == 6 and not data["padding_mask"].any() and not data["value_padding_mask"].any()
    accumulated, full_batch = captured["accumulated"], captured["full_batch"]
    assert len(accumulated) > 10 and any(grad.abs().max() > 1e-4 for grad in full_batch)
    for got, expected in zip(accumulated, full_batch):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-8)


def test_ppo_validation_samples_at_eval_temperature(tiny_model_dir, tiny_reward_dir, tmp_path, monkeypatch):
    temperatures = []
    real_generate = sampling.generate

    def record(model, queries, pad, eos, length, temperature):
        temperatures.append(temperature)
        return real_generate(model, queries, pad, eos, length, temperature)

    monkeypatch.setattr(sampling, "generate", record)
    config = stage_config("ppo", tmp_path, model={"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir),
                                                  "eval_temperature": 0.3})
    main(["ppo", "validate", "--config", str(config)])
    assert temperatures and set(temperatures) == {0.3}  # not the rollout's 0.7
    assert last_record(tmp_path / "ppo", "validate")["metrics"]["eval/temperature"] == pytest.approx(0.3)


def test_adaptive_kl_controller_in_a_ppo_run(tiny_model_dir, tiny_reward_dir, tmp_path, monkeypatch):
    """Each update's rewards use the controller's coefficient; after the update it adapts to the batch's mean KL
    (Ziegler et al. 2019); the adapted value is logged and checkpointed."""
    coefs, measured = [], []
    real_rewards, real_update = ppo_stage.kl_penalty_rewards, KLController.update

    def rewards(logprobs, ref_logprobs, scores, score_index, kl_coef):
        coefs.append(kl_coef)
        return real_rewards(logprobs, ref_logprobs, scores, score_index, kl_coef)

    def update(self, kl, n_steps):
        measured.append((kl, n_steps))
        return real_update(self, kl, n_steps)

    monkeypatch.setattr(ppo_stage, "kl_penalty_rewards", rewards)
    monkeypatch.setattr(KLController, "update", update)
    model = {"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir), "lr": 1e-2, "kl_target": 0.5, "kl_horizon": 100}
    main(["ppo", "fit", "--config", str(stage_config("ppo", tmp_path, model=model))])
    # 2 updates of 2 episodes; the first rollout's policy is the reference: KL exactly 0 -> error -0.2
    assert [n for _, n in measured] == [2, 2] and measured[0][0] == pytest.approx(0.0, abs=1e-6)
    expected = [0.05]
    for kl, n_steps in measured:
        expected.append(adaptive_kl_coef(expected[-1], kl, 0.5, 100, n_steps))
    assert expected[1] == pytest.approx(0.05 * (1 - 0.2 * 2 / 100))
    assert coefs == pytest.approx(expected[:2])  # update t's rewards use the coefficient adapted after update t - 1
    assert last_record(tmp_path / "ppo", "fit")["metrics"]["objective/kl_coef"] == pytest.approx(expected[1])
    state = load_checkpoint(last_checkpoint(tmp_path, "ppo"))["state_dict"]
    assert state["kl_controller._extra_state"]["value"] == pytest.approx(expected[2])
