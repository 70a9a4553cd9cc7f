"""FrozenTrunk: shared frozen lower blocks give exactly the full models' outputs, and only when truly shared."""

from __future__ import annotations

import pytest
import torch

from lit_rlhf.models.forward import response_logprobs, sequence_scores
from lit_rlhf.models.loading import load_causal_lm
from lit_rlhf.models.scalar import ScalarModel
from lit_rlhf.models.trunk import FrozenTrunk
from lit_rlhf.stages.common import freeze_bottom_layers

PAD = 49152  # [PAD], outside the embedding matrix (recipe D6)


@pytest.fixture()
def query_responses() -> torch.Tensor:
    """(3, 10): queries of 6 tokens left-padded, responses of 4 tokens right-padded after EOS-truncation."""
    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (3, 10))
    ids[0, :2] = PAD
    ids[1, :4] = PAD
    ids[1, 8:] = PAD
    ids[2, 7:] = PAD
    return ids


def test_policy_and_reference_share_trunk_exactly(tiny_model_dir, query_responses):
    policy = freeze_bottom_layers(load_causal_lm(str(tiny_model_dir)), trainable_layers=1)
    reference = load_causal_lm(str(tiny_model_dir)).requires_grad_(False)
    trunk = FrozenTrunk.shared_by(policy, reference)
    assert trunk and trunk.num_blocks == 1  # 2 blocks, the top one trainable
    hidden = trunk(query_responses, PAD)
    assert hidden.shape == (3, 10, 32)
    for model in (policy, reference):
        full = response_logprobs(model, query_responses, 6, PAD, 0.7)
        split = response_logprobs(trunk.top(model), query_responses, 6, PAD, 0.7, hidden=hidden)
        torch.testing.assert_close(split, full, rtol=0, atol=1e-6)
    # the top view trains the policy's top block only, through the same parameters
    response_logprobs(trunk.top(policy), query_responses, 6, PAD, 0.7, hidden=hidden).sum().backward()
    assert policy.model.layers[1].mlp.up_proj.weight.grad is not None
    assert policy.model.layers[0].mlp.up_proj.weight.grad is None
    assert trunk.top(policy) is trunk.top(policy)  # views are cached


def test_value_and_reward_model_share_trunk_exactly(tiny_model_dir, query_responses):
    reward_model = ScalarModel.from_backbone(str(tiny_model_dir)).requires_grad_(False)
    value_model = freeze_bottom_layers(ScalarModel.from_backbone(str(tiny_model_dir)), trainable_layers=1)
    value_model.scalar_head.load_state_dict(reward_model.scalar_head.state_dict())
    with torch.no_grad():
        value_model.backbone.layers[1].mlp.up_proj.weight.add_(0.1)  # top block differs: trunk is still shared
    trunk = FrozenTrunk.shared_by(value_model, reward_model)
    assert trunk.num_blocks == 1
    hidden = trunk(query_responses, PAD)
    for model in (value_model, reward_model):
        torch.testing.assert_close(
            sequence_scores(trunk.top(model), query_responses, PAD, hidden=hidden),
            sequence_scores(model, query_responses, PAD), rtol=0, atol=1e-6,
        )


def test_trunk_disabled_unless_frozen_and_identical(tiny_model_dir, query_responses):
    reference = load_causal_lm(str(tiny_model_dir)).requires_grad_(False)
    whole = load_causal_lm(str(tiny_model_dir))  # every block trainable
    disabled = FrozenTrunk.shared_by(whole, reference)
    assert not disabled and disabled(query_responses, PAD) is None and disabled.top(whole) is whole

    policy = freeze_bottom_layers(load_causal_lm(str(tiny_model_dir)), trainable_layers=1)
    with torch.no_grad():
        policy.model.layers[0].self_attn.q_proj.weight[0, 0] += 1e-3  # frozen block no longer the reference's
    assert not FrozenTrunk.shared_by(policy, reference)
    # all blocks frozen in every model: nothing left above the trunk to split off
    assert not FrozenTrunk.shared_by(reference, load_causal_lm(str(tiny_model_dir)).requires_grad_(False))

