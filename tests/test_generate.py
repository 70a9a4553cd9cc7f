"""generate(): exactly T response tokens even when transformers stops early at EOS (recipe P2, P3)."""

from __future__ import annotations

import pytest
import torch

PAD = 49152


class _EarlyStop:
    """A stand-in model whose ``generate`` stops after 3 new tokens, as transformers does once every row sampled EOS."""

    def __init__(self, new_tokens: torch.Tensor) -> None:
        self.new_tokens = new_tokens

    def generate(self, input_ids, attention_mask, generation_config):  # noqa: ANN001
        return torch.cat([input_ids, self.new_tokens], dim=1)


def test_generate_pads_when_every_row_stopped_at_eos():
    from lit_rlhf.models.forward import generate

    queries = torch.full((2, 4), 7)
    responses = generate(_EarlyStop(torch.tensor([[5, 2, 0], [2, 0, 0]])), queries, PAD, eos_token_id=2, max_new_tokens=6, temperature=0.7)
    assert responses.tolist() == [[5, 2, 0, PAD, PAD, PAD], [2, 0, 0, PAD, PAD, PAD]]
    with pytest.raises(RuntimeError, match="lacking EOS"):
        generate(_EarlyStop(torch.tensor([[5, 2, 0], [4, 4, 4]])), queries, PAD, eos_token_id=2, max_new_tokens=6, temperature=0.7)


def test_sampling_under_autocast_uses_cast_weights_and_gives_the_same_tokens(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from lit_rlhf.models import forward

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # LM head tied to the input embeddings
    model.model.layers[0].requires_grad_(False)  # a frozen block and a trainable one, as with trainable_layers
    copy = forward.with_cast_linears(model, torch.bfloat16)
    assert copy.lm_head.weight.dtype == copy.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
    assert copy.model.embed_tokens.weight is model.model.embed_tokens.weight  # shared, still float32
    assert copy.model.norm.weight is model.model.norm.weight
    assert model.lm_head.weight.dtype == torch.float32 and model.lm_head.weight is model.model.embed_tokens.weight

    queries = torch.tensor([[PAD, PAD, 11, 12, 13], [21, 22, 23, 24, 25]])

    def sample() -> torch.Tensor:
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward.generate(model, queries, PAD, eos_token_id=2, max_new_tokens=8, temperature=0.7)

    calls = []
    original = forward.with_cast_linears
    monkeypatch.setattr(forward, "with_cast_linears", lambda module, dtype: calls.append(dtype) or original(module, dtype))
    cast = sample()
    assert calls == [torch.bfloat16]
    monkeypatch.setattr(forward, "with_cast_linears", lambda module, dtype: module)  # autocast casts at every step
    assert torch.equal(cast, sample())


def test_the_cast_copy_is_made_on_the_cpu_only(monkeypatch):
    """On a GPU the cast copy would be a second model in memory at every rollout: it is made where it was measured."""
    from torch import nn

    from lit_rlhf.models import forward

    class Sampler(_EarlyStop, nn.Module):
        def __init__(self, device: str) -> None:
            nn.Module.__init__(self)
            _EarlyStop.__init__(self, torch.tensor([[2], [2]]))
            self.proj = nn.Linear(2, 2, device=device)

    calls = []
    monkeypatch.setattr(forward, "with_cast_linears", lambda module, dtype: calls.append(dtype) or module)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device=None: True)  # as under autocast on any device
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device: torch.bfloat16)
    queries = torch.full((2, 4), 7)
    forward.generate(Sampler("meta"), queries, PAD, eos_token_id=2, max_new_tokens=3, temperature=1.0)  # not a CPU
    assert calls == []
    forward.generate(Sampler("cpu"), queries, PAD, eos_token_id=2, max_new_tokens=3, temperature=1.0)
    assert calls == [torch.bfloat16]
