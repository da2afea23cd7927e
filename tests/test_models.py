import time

import pytest
import torch

from sae_core import UserError, d_model, decoder_blocks, load_model, num_layers
from sae_core.models import convert_gguf, default_gguf_path
from tests.conftest import tiny_llama


@pytest.fixture
def tiny_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    vocab = {f"w{i}": i for i in range(64)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(tmp_path / "m")
    return tmp_path / "m", model


def test_load_local_folder(tiny_folder):
    folder, ref = tiny_folder
    model, tok = load_model(folder)  # a Path, as from_pretrained takes one
    assert num_layers(model) == 3 and d_model(model) == 16
    assert load_model(str(folder), dtype="float64").model.dtype == torch.float64
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    ids = torch.tensor([tok("w1 w2 w3 w4").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)


def test_layer_l_is_input_of_block_l(tiny_model):
    """The layer convention: hidden_states[L] is what enters block L (layer 0 = embeddings)."""
    seen = {}
    blocks = decoder_blocks(tiny_model)
    handles = [
        b.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: seen.__setitem__(i, (args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True,
        )
        for i, b in enumerate(blocks)
    ]
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        out = tiny_model(ids, output_hidden_states=True)
    for h in handles:
        h.remove()
    assert len(out.hidden_states) == num_layers(tiny_model) + 1
    for layer in range(num_layers(tiny_model)):
        assert torch.equal(seen[layer], out.hidden_states[layer])
    assert torch.equal(out.hidden_states[0], tiny_model.get_input_embeddings()(ids))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name_or_path": "/no/such/model"}, r"model path /no/such/model does not exist"),
        ({"name_or_path": "./nope.gguf"}, r"GGUF file nope.gguf does not exist"),
        ({"name_or_path": "/tmp", "gguf_file": "x.gguf"}, r"GGUF file /tmp/x.gguf does not exist"),
        ({"name_or_path": None, "load_in_8bit": True}, r"--load-in-8bit needs a CUDA GPU"),
        ({"name_or_path": None, "device": "cuda"}, r"CUDA is not available"),
        ({"name_or_path": None, "dtype": "int8"}, r"unknown dtype 'int8'"),
        ({"name_or_path": None, "device": "mps"}, r"^device 'mps' is not supported \(only CPUs and CUDA GPUs are\); use cpu, "),
        ({"name_or_path": None, "device": "meta"}, r"^device 'meta' is not supported"),
        ({"name_or_path": __file__}, rf"^model path {__file__} is a file, not a model folder; pass the folder that holds it "),
    ],
)
def test_bad_model_args(kwargs, match):
    if "cuda" in str(kwargs.get("device")) and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(UserError, match=match):
        load_model(**kwargs)


def test_folder_without_tokenizer_or_not_a_causal_lm(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "notok")
    with pytest.raises(UserError, match=r"cannot load the tokenizer of .*notok.*needs its tokenizer files"):
        load_model(str(tmp_path / "notok"))
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=257)).save_pretrained(
        tmp_path / "t5")
    from tests.conftest import byte_tokenizer

    byte_tokenizer().save_pretrained(tmp_path / "t5")
    with pytest.raises(UserError, match=r"cannot load .*t5' as a causal language model \(ValueError: Unrecognized configuration"):
        load_model(str(tmp_path / "t5"))


def test_folder_without_config(tmp_path):
    with pytest.raises(UserError, match=r"has no config.json"):
        load_model(str(tmp_path))


def test_unknown_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"cannot load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")


@pytest.mark.slow
def test_smollm2_default_loads_and_predicts_english(smollm2):
    model, tok = smollm2
    assert num_layers(model) == 30 and d_model(model) == 576
    text = (
        "The cat sat on the mat. It was a sunny day, and the children were playing in the park "
        "while their parents talked about the weather and the price of bread."
    )
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
        shuffled = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]
        loss_shuffled = model(shuffled, labels=shuffled).loss.item()
    # A 135M instruct model on plain English: perplexity in the tens; shuffled words: far worse.
    assert 1.0 < loss < 4.5, loss
    assert loss_shuffled > loss + 2.0, (loss, loss_shuffled)


@pytest.mark.slow
def test_smollm2_cached_conversion_is_fast_and_reused(smollm2):
    gguf = default_gguf_path()
    folder = convert_gguf(gguf)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(folder.name + ".")], "temp folders left"
    assert convert_gguf(gguf) == folder
    written = (folder / "model.safetensors").stat().st_mtime_ns
    t = time.perf_counter()
    model, _ = load_model(gguf)  # a .gguf path goes through the same cache
    # Reused, not converted again (a conversion takes ~30 s; a cached load well under a second
    # on a quiet machine, so the bound only catches a reconversion, not a busy CI runner).
    assert (folder / "model.safetensors").stat().st_mtime_ns == written
    assert time.perf_counter() - t < 10
    ref = smollm2.model
    assert torch.equal(model.model.layers[3].mlp.up_proj.weight, ref.model.layers[3].mlp.up_proj.weight)
