"""Shared fixtures: tiny random transformers models for fast tests, the real SmolLM2 for slow ones."""

from __future__ import annotations

import pytest
import torch


def tiny_llama(num_layers: int = 3, hidden: int = 16, vocab: int = 64, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2():
    from sae_core import load_model

    return load_model()
