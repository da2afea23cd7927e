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


def byte_tokenizer():
    """A byte-level tokenizer (257 ids: 256 bytes + EOS) for tiny test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


TINY_TEXT = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 3,
    "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 4,
    "All the world's a stage,\nAnd all the men and women merely players;\n" * 5,
    "O Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name;\n" * 2,
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved 4-layer random Llama (d=16) with a byte tokenizer."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama(num_layers=4, hidden=16, vocab=257).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory):
    """A folder of .txt documents (about 1k tokens)."""
    path = tmp_path_factory.mktemp("text")
    for i, t in enumerate(TINY_TEXT):
        (path / f"doc{i}.txt").write_text(t)
    return path


@pytest.fixture
def base(tiny_model_dir, tiny_text_dir, tmp_path):
    """`actcache collect` arguments for the tiny model and text into tmp_path/s.zarr (actcache's CLI tests)."""
    return [
        "collect", "--model", tiny_model_dir, "--dataset", tiny_text_dir, "--ctx-len", 32, "--batch-size", 2,
        "--seqs-per-shard", 4, "--device", "cpu", "--no-progress", "--out", tmp_path / "s.zarr",
    ]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, tiny_model_dir):
    """A float32 store of layers 0-3 of the tiny model (chunks of 32 tokens), one per test module (saetrain's tests)."""
    data = tmp_path_factory.mktemp("fitdata")
    for i in range(6):
        (data / f"d{i}.txt").write_text("".join(TINY_TEXT[(i + j) % 4] for j in range(4)))
    from actcache import CollectConfig, collect

    out = tmp_path_factory.mktemp("fitstore") / "s.zarr"
    collect(CollectConfig(out=out, model=str(tiny_model_dir), dataset=str(data), ctx_len=32, batch_size=4,
                          seqs_per_shard=4, chunk_tokens=32, dtype="float32", device="cpu", progress=False))
    return out
