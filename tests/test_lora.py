"""LoRA (peft) on the tiny model: the adapters-disabled reference and reward model, merged and adapter-only exports,
bad settings, and a PPO run with LoRA policy and value model through the command line."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from stage_helpers import assert_finite, last_record, stage_config, validation_queries
from transformers import AutoModelForCausalLM

from lit_rlhf.cli import main
from lit_rlhf.models.forward import response_logprobs, sequence_scores
from lit_rlhf.models.loading import load_causal_lm, load_tokenizer
from lit_rlhf.models.lora import AdaptersDisabled, LoRA, add_lora, merged_model, save_lora_model
from lit_rlhf.models.scalar import ScalarModel
from lit_rlhf.stages.online_dpo import OnlineDPOModule
from lit_rlhf.stages.ppo import PPOModule
from lit_rlhf.stages.sft import SFTModule

RESPONSE_LENGTH = 6


@pytest.fixture(scope="module")
def queries(tiny_model_dir) -> torch.Tensor:
    return validation_queries(tiny_model_dir, 3)


def perturb_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every trainable (adapter / head) weight a small random change, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.02 * torch.randn(param.shape, generator=generator))


def test_lora_wraps_the_model_and_disabling_the_adapters_gives_the_base_model(tiny_model_dir, queries):
    pad = load_tokenizer(str(tiny_model_dir)).pad_token_id
    base_logprobs = response_logprobs(load_causal_lm(str(tiny_model_dir)), queries, 100, pad, 0.7)
    policy = add_lora(load_causal_lm(str(tiny_model_dir)), LoRA(r=4))
    trainable = [name for name, param in policy.named_parameters() if param.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    perturb_adapters(policy)
    reference = AdaptersDisabled(policy)
    assert not isinstance(reference, torch.nn.Module)  # no second copy, nothing checkpointed or sharded twice
    assert torch.equal(response_logprobs(reference, queries, 100, pad, 0.7), base_logprobs)
    assert not torch.allclose(response_logprobs(policy, queries, 100, pad, 0.7), base_logprobs)


def test_merged_export_is_a_plain_checkpoint_with_the_training_logits(tiny_model_dir, queries, tmp_path):
    policy = add_lora(load_causal_lm(str(tiny_model_dir)), LoRA(r=4))
    perturb_adapters(policy)
    with torch.no_grad():
        expected = policy(input_ids=queries.clamp(max=49151)).logits
    save_lora_model(policy, tmp_path / "merged", policy.state_dict())
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(plain).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=queries.clamp(max=49151)).logits, expected, atol=1e-5)
    # the training model is untouched by the export: still a peft model with live adapters
    assert any("lora_A" in name for name, _ in policy.named_parameters())

    # adapters only: small, and load_causal_lm merges them onto the base it names
    policy.merge_on_export = False
    save_lora_model(policy, tmp_path / "adapters", policy.state_dict())
    assert (tmp_path / "adapters" / "adapter_config.json").is_file()
    with torch.no_grad():
        assert torch.allclose(load_causal_lm(str(tmp_path / "adapters"))(input_ids=queries.clamp(max=49151)).logits, expected, atol=1e-5)


def test_value_lora_on_the_reward_model_keeps_the_reward_model_under_disabled_adapters(tiny_model_dir, tiny_reward_dir, queries):
    pad = load_tokenizer(str(tiny_model_dir)).pad_token_id
    reward_scores = sequence_scores(ScalarModel.load(str(tiny_reward_dir)), queries, pad)
    value_model = add_lora(ScalarModel.load(str(tiny_reward_dir)), LoRA(r=4), head="scalar_head")
    trainable = {name for name, param in value_model.named_parameters() if param.requires_grad}
    assert any("scalar_head" in name for name in trainable) and any("lora_A" in name for name in trainable)
    perturb_adapters(value_model)
    with torch.no_grad():
        assert torch.equal(sequence_scores(AdaptersDisabled(value_model), queries, pad), reward_scores)
        values = sequence_scores(value_model, queries, pad)
        assert not torch.allclose(values, reward_scores)
        merged = merged_model(value_model, value_model.state_dict())
        assert isinstance(merged, ScalarModel)
        assert torch.allclose(sequence_scores(merged, queries, pad), values, atol=1e-5)


@pytest.mark.parametrize("settings", [{"r": 0}, {"alpha": 0.0}, {"dropout": 1.0}])
def test_bad_lora_settings_name_them(settings):
    with pytest.raises(ValueError, match="LoRA needs"):
        LoRA(**settings)


def test_lora_is_exclusive_with_trainable_layers_and_previous_reference():
    with pytest.raises(ValueError, match="lora and trainable_layers are exclusive"):
        SFTModule(lora=LoRA(), trainable_layers=2)
    with pytest.raises(ValueError, match="reference='previous'"):
        OnlineDPOModule(lora={"r": 4}, reference="previous")


@pytest.mark.slow
def test_ppo_with_lora_policy_and_value_model(tiny_model_dir, tiny_reward_dir, queries, tmp_path):
    """Reference logprobs are the base model's, the reward model is the RM, one copy of each set of weights; the
    merged export loads as a plain causal LM with the in-training logits."""
    model = {"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir), "lr": 1e-2, "non_eos_penalty": False,
             "lora": {"r": 4}, "value_lora": {"r": 4}}
    config = stage_config("ppo", tmp_path, model=model, data={"total_episodes": 4})
    main(["ppo", "fit", "--config", str(config)])
    metrics = last_record(tmp_path / "ppo", "fit")["metrics"]
    assert_finite(metrics, "loss/policy", "loss/value", "objective/kl", "eval/scores")
    export = tmp_path / "ppo" / "model"
    plain = AutoModelForCausalLM.from_pretrained(export)
    assert ScalarModel.load(str(export / "value")).config.hidden_size == 32

    module = PPOModule(**{**model, "response_length": RESPONSE_LENGTH})
    module.configure_model()
    checkpoint = torch.load(tmp_path / "ppo" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert not module.load_state_dict(checkpoint["state_dict"], strict=False).unexpected_keys
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    # two models hold weights: the LoRA policy and the LoRA value model (each base once)
    base_count = sum(p.numel() for p in load_causal_lm(str(tiny_model_dir)).parameters())
    value_count = sum(p.numel() for p in ScalarModel.load(str(tiny_reward_dir)).parameters())
    assert sum(p.numel() for p in module.parameters()) < 1.1 * (base_count + value_count)
    assert isinstance(module.ref_policy, AdaptersDisabled) and isinstance(module.reward_model, AdaptersDisabled)

    torch.manual_seed(0)
    data = module.rollout(queries)
    pad, context = module.tokenizer.pad_token_id, queries.size(1)
    base_logprobs = response_logprobs(load_causal_lm(str(tiny_model_dir)), data["query_responses"], context, pad, 0.7)
    mask = ~data["padding_mask"]
    assert torch.equal(data["ref_logprobs"][mask], base_logprobs[mask])
    assert data["kl"].abs().sum() > 0, "the LoRA policy moved away from the reference"
    reward_scores = sequence_scores(ScalarModel.load(str(tiny_reward_dir)), data["query_responses"], pad)
    assert torch.equal(data["scores"], reward_scores)
    ids = data["query_responses"].masked_fill(data["query_responses"] == pad, 0)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, module.policy(input_ids=ids).logits, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "online_dpo"])
def test_every_policy_and_reward_stage_trains_lora_and_exports_a_plain_model(stage, tiny_model_dir, tiny_reward_dir, tmp_path):
    if stage == "online_dpo":
        model = {"policy": str(tiny_model_dir), "reward_model": str(tiny_reward_dir), "non_eos_penalty": False}
    else:
        model = {"model": str(tiny_model_dir)}
    config = stage_config(stage, tmp_path, model={**model, "lr": 1e-2, "lora": {"r": 4}})
    main([stage.replace("_", "-"), "fit", "--config", str(config)])
    export = tmp_path / stage / "model"
    assert not (export / "adapter_config.json").exists()
    if stage == "rm":
        trained, initial = ScalarModel.load(str(export)), ScalarModel.from_backbone(str(tiny_model_dir))
        assert trained.config.bias != 0.0  # the R5 normalisation reached the merged export
    else:
        trained, initial = AutoModelForCausalLM.from_pretrained(export), load_causal_lm(str(tiny_model_dir))
    initial_state = initial.state_dict()
    moved = max((value - initial_state[key]).abs().max().item() for key, value in trained.state_dict().items() if "head" not in key)
    assert moved > 1e-6, "the merged adapters left the weights unchanged"
    checkpoint = torch.load(tmp_path / stage / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["lora"]["r"] == 4  # a plain dict: the checkpoint loads with weights_only
