"""Shared fixtures: offline hub settings, paths to the shared TL;DR sample, a tiny random-init model."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the stages' CPU fits would otherwise retune this process's malloc for the rest of the session
# (lit_rlhf.host_memory; tests/test_host_memory.py checks it in processes of its own)
os.environ["LIT_RLHF_REUSE_FREED_MEMORY"] = "0"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tldr"
SFT_DATA = DATA / "sft"
COMPARISON_DATA = DATA / "comparisons"
CHAT_DATA = ROOT.parent / "shared" / "data" / "chat"


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The packaged SmolLM2-135M converted to safetensors (once per cache; ~1 min the first time)."""
    from lit_rlhf.models.loading import convert_default_model

    return convert_default_model()


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    """SmolLM2's tokenizer with the ``[PAD]`` token of recipe D6."""
    from lit_rlhf.models.loading import load_tokenizer

    return load_tokenizer(str(default_model_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> Path:
    """A random-init Llama with SmolLM2's tokenizer and vocabulary (2 layers, width 32): for fast tests only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    directory = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, max_position_embeddings=1024,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(default_model_dir).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A scalar model on the tiny backbone, saved as a reward model (random head, recipe R2)."""
    from lit_rlhf.models.scalar import ScalarModel

    directory = tmp_path_factory.mktemp("tiny-rm")
    torch.manual_seed(0)
    ScalarModel.from_backbone(str(tiny_model_dir)).save_pretrained(directory)
    return directory
