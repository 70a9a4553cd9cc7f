"""FrozenTrunk: shared frozen lower blocks give exactly the full models' outputs, and only when truly shared."""

from __future__ import annotations

import pytest
import torch

from lit_rlhf.models.forward import model_inputs, response_logprobs, sequence_scores, shared_prefix_scores
from lit_rlhf.models.loading import load_causal_lm
from lit_rlhf.models.scalar import ScalarModel
from lit_rlhf.models.trunk import FrozenTrunk, clear_trunk_caches
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



def test_cached_trunk_gives_the_batched_values_and_runs_each_sequence_once(tiny_model_dir, query_responses):
    clear_trunk_caches()  # earlier tests of this process may have filled the cache of the same tiny trunk
    reward_model = freeze_bottom_layers(ScalarModel.from_backbone(str(tiny_model_dir)), trainable_layers=1)
    batched = FrozenTrunk.shared_by(reward_model)
    cached = FrozenTrunk.shared_by(reward_model, cache=True)
    assert batched.cache is None and len(cached.cache) == 0
    mask = query_responses != PAD
    first = cached(query_responses, PAD)
    torch.testing.assert_close(first[mask], batched(query_responses, PAD)[mask], rtol=0, atol=1e-5)
    assert (first[~mask] == 0).all()  # pads get zeros: masked out anyway
    assert (cached.cache.misses, cached.cache.hits, len(cached.cache)) == (3, 0, 3)
    torch.testing.assert_close(
        sequence_scores(cached.top(reward_model), query_responses, PAD, first), sequence_scores(reward_model, query_responses, PAD),
        rtol=0, atol=1e-5,
    )
    # the same sequences padded on the other side, in another order and batch: found, not recomputed
    row = query_responses[0][mask[0]]
    other = torch.full((2, 12), PAD)
    other[0, 12 - row.numel():] = row
    other[1, :5] = query_responses[2, :5]  # a new sequence (a prefix of row 2)
    again = cached(other, PAD)
    assert (cached.cache.misses, cached.cache.hits, len(cached.cache)) == (4, 1, 4)
    torch.testing.assert_close(again[0, 12 - row.numel():], first[0][mask[0]], rtol=0, atol=0)
    # another model with the same trunk finds the same process-wide cache; a changed trunk gets another one
    assert FrozenTrunk.shared_by(freeze_bottom_layers(ScalarModel.from_backbone(str(tiny_model_dir)), 1), cache=True).cache is cached.cache
    with torch.no_grad():
        reward_model.backbone.layers[0].mlp.up_proj.weight.add_(0.1)
    assert FrozenTrunk.shared_by(reward_model, cache=True).cache is not cached.cache


def test_cached_trunk_runs_a_pair_as_one_group_with_the_full_row_values(tiny_model_dir):
    clear_trunk_caches()
    reward_model = freeze_bottom_layers(ScalarModel.from_backbone(str(tiny_model_dir)), trainable_layers=1)
    trunk = FrozenTrunk.shared_by(reward_model, cache=True)
    assert trunk.block_masks  # Llama's attention follows a 4-D block-causal mask
    torch.manual_seed(1)
    query, chosen, rejected = torch.randint(3, 1000, (6,)), torch.randint(3, 1000, (3,)), torch.randint(3, 1000, (2,))
    ids = torch.full((2, 9), PAD)  # a pair: query + chosen, query + rejected, right-padded
    ids[0] = torch.cat([query, chosen])
    ids[1, :8] = torch.cat([query, rejected])
    calls = []
    handle = trunk.bottom.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs), with_kwargs=True)
    shared = trunk(ids, PAD, prefix_lengths=torch.tensor([6]))
    handle.remove()
    # one forward of query + chosen + rejected (11 tokens); the rejected tokens sit at positions 6, 7 and see the query
    assert len(calls) == 1 and calls[0]["input_ids"].shape == (1, 11)
    assert calls[0]["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 8, 6, 7]]
    allowed = calls[0]["attention_mask"][0, 0]
    assert allowed[9].tolist() == [True] * 6 + [False] * 3 + [True, False]  # query, not chosen, itself
    assert allowed[8].tolist() == [True] * 9 + [False] * 2  # chosen: causal, never the rejected tokens
    mask = ids != PAD
    whole = [trunk.group_hidden(ids[i][mask[i]]) for i in range(2)]  # each row in its own forward
    torch.testing.assert_close(shared[0], whole[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(shared[1, :8], whole[1], rtol=0, atol=1e-5)
    assert (shared[1, 8] == 0).all()
    # the same rows without the split are two other entries; with it, a hit
    trunk(ids, PAD)
    trunk(ids, PAD, prefix_lengths=torch.tensor([6]))
    assert (trunk.cache.misses, trunk.cache.hits, len(trunk.cache)) == (3, 1, 3)
    with pytest.raises(ValueError, match="cannot share"):
        trunk(ids, PAD, prefix_lengths=torch.tensor([6, 6, 6]))
    with pytest.raises(ValueError, match="do not share"):
        trunk(torch.stack([ids[0], ids[0].roll(1)]), PAD, prefix_lengths=torch.tensor([6]))


def test_cached_trunk_without_block_masks_runs_each_continuation_after_the_prefix(tiny_model_dir):
    clear_trunk_caches()
    reward_model = freeze_bottom_layers(ScalarModel.from_backbone(str(tiny_model_dir)), trainable_layers=1)
    trunk = FrozenTrunk.shared_by(reward_model, cache=True)
    prefix, first, second = torch.arange(3, 9), torch.arange(20, 23), torch.arange(30, 32)
    grouped = trunk.group_hidden(prefix, [first, second])
    trunk.block_masks = False  # what an architecture that ignores 4-D masks gets
    calls = []
    handle = trunk.bottom.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    fallback = trunk.group_hidden(prefix, [first, second])
    handle.remove()
    assert calls == [(1, 9), (1, 8)]
    torch.testing.assert_close(fallback, grouped, rtol=0, atol=1e-5)
    assert fallback.shape == (11, 32)


def test_row_cache_budget_and_keys():
    from lit_rlhf.models.trunk import RowCache, row_keys

    ids = torch.tensor([[PAD, 5, 6, 7], [5, 6, 7, PAD], [5, 6, PAD, 7]])
    keys = row_keys(ids, PAD)
    assert keys[0] == keys[1] == keys[2]  # same real tokens, any padding
    split = row_keys(ids, PAD, split=2)
    assert split[0] != split[1] and split[1] == split[2]  # query [5] | response [6, 7] vs [5, 6] | [7]
    cache = RowCache(max_bytes=2 * 4)  # room for two float32 scalars
    values = cache.get([b"a", b"b", b"c", b"a"], lambda i: torch.tensor(float(i)))
    assert [v.item() for v in values] == [0.0, 1.0, 2.0, 0.0]
    assert len(cache) == 2 and cache.bytes == 8 and (cache.hits, cache.misses) == (1, 3)  # "c" computed, not kept


def test_under_autocast_the_trunk_runs_on_pre_cast_linear_weights_with_bit_identical_outputs(tiny_model_dir, query_responses):
    clear_trunk_caches()
    reward_model = freeze_bottom_layers(ScalarModel.from_backbone(str(tiny_model_dir)), trainable_layers=1)
    batched, cached = FrozenTrunk.shared_by(reward_model), FrozenTrunk.shared_by(reward_model, cache=True)
    mask = query_responses != PAD
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        # what autocast computes from the fp32 weights, casting them at every call
        want_batched = batched.bottom(**model_inputs(query_responses, PAD), use_cache=False).last_hidden_state
        want_rows = [batched.bottom(input_ids=ids[m].unsqueeze(0), use_cache=False).last_hidden_state[0]
                     for ids, m in zip(query_responses, mask)]
        got_batched, got_cached = batched(query_responses, PAD), cached(query_responses, PAD)
    assert torch.equal(got_batched, want_batched)
    assert torch.equal(got_cached[mask], torch.cat(want_rows))
    running = cached._cast_bottoms[torch.bfloat16]
    projection = running.layers[0].mlp.up_proj.weight
    assert projection.dtype == torch.bfloat16 and not projection.requires_grad
    assert reward_model.backbone.layers[0].mlp.up_proj.weight.dtype == torch.float32  # the model itself is untouched
    assert running.embed_tokens.weight is reward_model.backbone.embed_tokens.weight  # shared, not copied
    assert running.layers[0].input_layernorm.weight is reward_model.backbone.layers[0].input_layernorm.weight
    assert cached._running_bottom() is cached.bottom  # outside autocast: the model's own blocks


@pytest.mark.parametrize("trunk_blocks", [0, 1])
def test_shared_prefix_scores_equal_whole_rows_with_their_gradients(tiny_model_dir, trunk_blocks):
    torch.manual_seed(2)
    reward_model = ScalarModel.from_backbone(str(tiny_model_dir))
    if trunk_blocks:
        freeze_bottom_layers(reward_model, trainable_layers=1)
    with torch.no_grad():
        reward_model.scalar_head.bias.fill_(0.3)
    reward_model.config.bias = 0.1
    # 3 pairs, queries of 5 / 2 / 4 tokens; continuations of 3, 1, 2 (chosen) and 2, 4, 1 (rejected), right-padded
    queries, chosen, rejected = [5, 2, 4], [3, 1, 2], [2, 4, 1]
    ids = torch.full((6, 8), PAD)
    for i, (q, c, r) in enumerate(zip(queries, chosen, rejected)):
        query = torch.randint(3, 1000, (q,))
        ids[i, : q + c] = torch.cat([query, torch.randint(3, 1000, (c,))])
        ids[3 + i, : q + r] = torch.cat([query, torch.randint(3, 1000, (r,))])
    trunk = FrozenTrunk.shared_by(reward_model, cache=True)
    assert bool(trunk) == bool(trunk_blocks)
    hidden = trunk(ids, PAD, prefix_lengths=torch.tensor(queries))
    top = trunk.top(reward_model)
    whole = sequence_scores(reward_model, ids, PAD)  # (6,) each row in full
    shared = shared_prefix_scores(top, ids, torch.tensor(queries), PAD, hidden)
    torch.testing.assert_close(shared, whole, rtol=0, atol=1e-5)
    trained = [p for p in reward_model.parameters() if p.requires_grad]
    grads_whole = torch.autograd.grad((whole * torch.arange(1.0, 7.0)).sum(), trained)
    grads_shared = torch.autograd.grad((shared * torch.arange(1.0, 7.0)).sum(), trained)
    for a, b in zip(grads_shared, grads_whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="token after"):
        shared_prefix_scores(top, ids, torch.tensor([5, 2, 6]), PAD, hidden)
    with pytest.raises(ValueError, match="cannot share"):
        shared_prefix_scores(top, ids, torch.tensor([5, 2, 4, 1]), PAD, hidden)
