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
