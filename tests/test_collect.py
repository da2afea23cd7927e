"""actcache collect on a tiny random model: stored activations against transformers' hidden_states."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from actcache import CollectConfig, collect
from actcache.data import Documents
from actcache.packing import pack
from sae_core import UserError
from sae_core.store import ActivationStore, verify_store
from tests.conftest import TINY_TEXT, byte_tokenizer

CTX = 32


def run(tmp_path, model_dir, data_dir, name="s.zarr", **kw):
    cfg = CollectConfig(
        out=tmp_path / name, model=str(model_dir), dataset=str(data_dir), ctx_len=CTX, batch_size=2,
        seqs_per_shard=4, device="cpu", progress=False, **kw,
    )
    collect(cfg)
    return ActivationStore(cfg.out)


def hidden_states(model_dir, ids: torch.Tensor, batch_size: int = 2):
    # Frozen as `load_model` leaves it: transformers' Mamba (5.24) takes another, 1-ulp-different path
    # when its weights require grad.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    outs = []
    with torch.no_grad():
        for b in range(0, len(ids), batch_size):
            outs.append(model(ids[b : b + batch_size], output_hidden_states=True).hidden_states)
    return [torch.cat([o[i] for o in outs]) for i in range(len(outs[0]))]


def test_fp32_equals_hidden_states(tmp_path, tiny_model_dir, tiny_text_dir):
    store = run(tmp_path, tiny_model_dir, tiny_text_dir, layers="0,2,3", dtype="float32")
    assert store.layers == ["layer_0", "layer_2", "layer_3"] and store.complete
    n = store.layout.num_tokens
    ids = store.tokens(0, n).reshape(-1, CTX)
    hs = hidden_states(tiny_model_dir, ids)
    for layer in (0, 2, 3):
        got = store.read(layer, 0, n)
        assert got.dtype == torch.float32
        assert torch.equal(got, hs[layer].reshape(n, -1)), layer
    assert verify_store(store.path) == []


def test_layers_equal_hidden_states_where_they_list_block_outputs(tmp_path, tiny_model_dir, tiny_text_dir):
    """Mamba's hidden_states[L] is block L's output (no embeddings entry): layer L is still hidden_states[L]."""
    from transformers import MambaConfig, MambaForCausalLM

    from sae_core.store import LAYER_CONVENTION, LAYER_CONVENTION_OUTPUTS

    torch.manual_seed(0)
    MambaForCausalLM(MambaConfig(hidden_size=16, num_hidden_layers=3, vocab_size=257, state_size=4)).save_pretrained(
        tmp_path / "mamba")
    byte_tokenizer().save_pretrained(tmp_path / "mamba")
    store = run(tmp_path, tmp_path / "mamba", tiny_text_dir, layers="all", dtype="float32")
    n = store.layout.num_tokens
    hs = hidden_states(tmp_path / "mamba", store.tokens(0, n).reshape(-1, CTX))
    for layer in (0, 1, 2):
        assert torch.equal(store.read(layer, 0, n), hs[layer].reshape(n, -1)), layer
    assert store.meta["layer_convention"] == LAYER_CONVENTION_OUTPUTS
    assert run(tmp_path, tiny_model_dir, tiny_text_dir, name="llama.zarr", layers="0").meta["layer_convention"] == (
        LAYER_CONVENTION)


def test_bf16_equals_hidden_states_rounded(tmp_path, tiny_model_dir, tiny_text_dir):
    store = run(tmp_path, tiny_model_dir, tiny_text_dir, layers="1,3")
    n = store.layout.num_tokens
    hs = hidden_states(tiny_model_dir, store.tokens(0, n).reshape(-1, CTX))
    for layer in (1, 3):
        got = store.read(layer, 0, n)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, hs[layer].reshape(n, -1).to(torch.bfloat16))
    # The raw zarr array is uint16 bits, readable by any zarr v3 reader.
    import zarr

    raw = zarr.open_array(str(store.path / "layers" / "layer_1"), mode="r")
    assert raw.dtype == np.uint16 and raw.shape == (n, 16)
    assert torch.equal(torch.from_numpy(raw[:5].astype(np.int32)).to(torch.int16).view(torch.bfloat16), store.read(1, 0, 5))


def test_hookpoints_equal_module_outputs(tmp_path, tiny_model_dir, tiny_text_dir):
    store = run(tmp_path, tiny_model_dir, tiny_text_dir, hookpoints=["model.layers.*.mlp", "model.norm"], dtype="float32")
    assert store.layers == [f"model.layers.{i}.mlp" for i in range(4)] + ["model.norm"]
    assert store.meta["layer_convention"].startswith("hookpoints: each array is the output of the module")
    assert_module_outputs(store, tiny_model_dir)


def test_hookpoints_of_flattened_token_rows(tmp_path, tiny_text_dir):
    """OPT's blocks run their MLP on the batch flattened to (batch * seq, d): one row per token still."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=257,
                    word_embed_proj_dim=16, max_position_embeddings=512)
    OPTForCausalLM(cfg).save_pretrained(tmp_path / "opt")
    byte_tokenizer().save_pretrained(tmp_path / "opt")
    store = run(tmp_path, tmp_path / "opt", tiny_text_dir, hookpoints=["*.layers.*.fc1", "*.layers.1.self_attn", "*.layers.1"],
                dtype="float32")
    # In module order (a block before its submodules), not in the order the hooks fire.
    assert store.layers == ["model.decoder.layers.0.fc1", "model.decoder.layers.1", "model.decoder.layers.1.self_attn",
                            "model.decoder.layers.1.fc1"]
    assert store.read("model.decoder.layers.0.fc1", 0, 4).shape == (4, 32)
    assert_module_outputs(store, tmp_path / "opt")


def assert_module_outputs(store, model_dir):
    """Every hookpoint of the store holds what a forward hook on the module sees, row for row."""
    n = store.layout.num_tokens
    ids = store.tokens(0, n).reshape(-1, CTX)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seen: dict[str, list] = {name: [] for name in store.layers}
    mods = dict(model.named_modules())
    for name in store.layers:
        mods[name].register_forward_hook(
            lambda m, a, o, name=name: seen[name].append((o[0] if isinstance(o, tuple) else o).detach()))
    with torch.no_grad():
        for b in range(0, len(ids), 2):
            model(ids[b : b + 2])
    for name in store.layers:
        assert torch.equal(store.read(name, 0, n), torch.cat(seen[name]).reshape(n, -1)), name


def test_tokens_are_the_packed_documents_in_seeded_order(tmp_path, tiny_model_dir, tiny_text_dir):
    tok = byte_tokenizer()
    expected = pack(Documents.of_texts("x", TINY_TEXT), tok, CTX)
    # Documents are joined by EOS, never split by line.
    flat = [i for t in TINY_TEXT for i in tok(t)["input_ids"] + [tok.eos_token_id]]
    assert np.array_equal(expected.reshape(-1), np.array(flat[: expected.size]))

    plain = run(tmp_path, tiny_model_dir, tiny_text_dir, name="plain.zarr", layers="0", seed=None)
    assert torch.equal(plain.tokens().reshape(-1, CTX), torch.from_numpy(expected).long())
    negative = run(tmp_path, tiny_model_dir, tiny_text_dir, name="neg.zarr", layers="0", seed=-1)  # as --seed -1
    assert negative.meta["data"]["seed"] is None and torch.equal(negative.tokens(), plain.tokens())
    shuffled = run(tmp_path, tiny_model_dir, tiny_text_dir, name="shuf.zarr", layers="0", seed=3)
    # The documented order, built independently: documents in the seed's order, packed, then the
    # sequences of each block (here all of them: one block) in an order of their own.
    docs = np.random.default_rng([3, 0]).permutation(len(TINY_TEXT))
    flat = [i for d in docs for i in tok(TINY_TEXT[d])["input_ids"] + [tok.eos_token_id]]
    n = len(flat) // CTX
    seqs = np.array(flat[: n * CTX]).reshape(n, CTX)[np.random.default_rng([3, 1, 0]).permutation(n)]
    assert torch.equal(shuffled.tokens().reshape(-1, CTX), torch.from_numpy(seqs).long())
    assert shuffled.meta["data"]["fingerprint"] != plain.meta["data"]["fingerprint"]


def test_windows_pack_only_the_documents_they_need(tmp_path, monkeypatch):
    """A window of the order tokenizes documents up to the end of its last block, and the cache
    continues packing where the last window stopped."""
    from actcache import packing

    monkeypatch.setenv("SAE_CORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(packing, "BLOCK_TOKENS", 4 * CTX)  # blocks of 4 sequences
    monkeypatch.setattr(packing, "TOKENIZE_BATCH", 2)
    tok = byte_tokenizer()
    texts = [f"Document {i}. " + "word " * (7 * i % 23 + 3) for i in range(60)]
    fetched = []

    def docs(key="k"):
        d = Documents.of_texts("many", texts, content_key=key)
        fetch = d.fetch
        d.fetch = lambda idx: fetched.extend(idx) or fetch(idx)
        return d

    full, total = packing.window(docs(None), tok, CTX, 5, 0, None)  # no content key: no cache
    assert total == len(full) and len(set(fetched)) == 60
    # Independent of the window: consecutive slices of one order.
    fetched.clear()
    a, _ = packing.window(docs(), tok, CTX, 5, 0, 3)
    first_docs = len(fetched)
    assert np.array_equal(a, full[:3]) and first_docs < 30
    # A crash between appending sequences and saving the state that counts them: the extra bytes are dropped.
    (folder,) = (tmp_path / "cache" / "packed").iterdir()
    with open(folder / "sequences.i32", "ab") as f:
        f.write(b"junk" * CTX * 3)
    b, _ = packing.window(docs(), tok, CTX, 5, 5, 6)
    assert np.array_equal(b, full[5:11])
    assert len(fetched) == len(set(fetched)) < 60  # each document tokenized once, only as far as needed
    c, total_c = packing.window(docs(), tok, CTX, 5, len(full) - 2, 10)
    assert np.array_equal(c, full[-2:]) and total_c == len(full)
    empty, _ = packing.window(docs(), tok, CTX, 5, len(full), 10)
    assert len(empty) == 0 and sorted(fetched) == list(range(60))
    assert packing.window(docs(None), tok, CTX, 5, 0, 0)[0].shape == (0, CTX)
    assert (folder / "sequences.i32").stat().st_size == len(full) * CTX * 4
    # A new entry deletes those unused for CACHE_MAX_AGE_DAYS (using one counts: the folder's mtime).
    stale = folder.with_name("stale")
    stale.mkdir()
    (stale / "sequences.i32").write_bytes(b"x")
    old = time.time() - 40 * 86400
    os.utime(stale, (old, old))
    os.utime(folder, (old, old))
    packing.window(docs(), tok, CTX, 5, 0, 3)  # uses `folder`
    packing.window(docs("other"), tok, CTX, 5, 0, 3)  # a new entry
    assert not stale.exists() and folder.exists() and len(list(folder.parent.iterdir())) == 2


def test_large_text_files_are_cut_into_documents_at_blank_lines(tmp_path, monkeypatch):
    """A text file over TEXT_SPLIT_BYTES is several documents that tile it, cut after blank lines
    where there are some, else after a line break, else between UTF-8 characters."""
    import gzip

    from actcache import data

    monkeypatch.setattr(data, "TEXT_SPLIT_BYTES", 1000)
    monkeypatch.setattr(data, "TEXT_PIECE_BYTES", 256)  # paragraphs < 128 bytes: cuts at blank lines
    paragraphs = "".join(f"Paragraph {i}: {'ünï ' * (i % 7 + 2)}\nsecond line.\n\n" for i in range(40))
    one_line = "ab€d" * 400  # no line break at all: cuts between characters, never inside one
    lines = "".join(f"line {i} of a file without blank lines\r\n" for i in range(30))
    small = "A small file stays whole.\n\nEven with blank lines."
    folder = tmp_path / "texts"
    folder.mkdir()
    for name, text in [("a.txt", paragraphs), ("b.txt", one_line), ("c.md", lines), ("d.txt", small)]:
        (folder / name).write_text(text, encoding="utf-8")
    with gzip.open(folder / "e.txt.gz", "wt") as f:
        f.write(paragraphs)  # compressed: read whole
    docs = data.load_documents(str(folder))
    texts = docs.fetch(range(docs.num_docs))
    sizes = {name: len(text.encode()) for name, text in [("a", paragraphs), ("b", one_line), ("c", lines)]}
    counts = [n // 256 for n in sizes.values()]  # the last piece takes the remainder
    assert min(counts) >= 4 and docs.num_docs == sum(counts) + 2 and all(texts)
    a, b, c = (texts[sum(counts[:i]) : sum(counts[: i + 1])] for i in range(3))
    # Newlines read as read_text reads a whole file: \r\n and \r become \n.
    assert "".join(a) == paragraphs and "".join(b) == one_line and "".join(c) == lines.replace("\r\n", "\n")
    assert all(t.endswith("\n\n") for t in a[:-1]) and all(t.endswith("\n") for t in c[:-1])
    assert "\ufffd" not in "".join(b) and texts[-2:] == [small, paragraphs]
    assert docs.fetch([3]) == [a[3]]  # a piece reads alone
    # The store says so: a store of the same files from before they were cut resumes with "another data order".
    from actcache.collection import prepare

    cfg = CollectConfig(out=tmp_path / "x.zarr", ctx_len=CTX)
    assert prepare(cfg, docs, byte_tokenizer())[1]["packing"].startswith(
        "documents (text files over 1000 bytes cut at blank lines into documents of ~256 bytes) in seeded order, ")
    small = data.load_documents(str(folder / "d.txt"))
    assert small.cut is None and prepare(cfg, small, byte_tokenizer())[1]["packing"].startswith("documents in seeded")
    ids = Documents("ids", 3, lambda idx: [[5] * 40 for _ in idx], tokenized=True)
    assert prepare(CollectConfig(out=cfg.out, ctx_len=CTX, seed=-1), ids, byte_tokenizer())[1]["packing"] == (
        "rows of token ids in dataset order, concatenated as they are (no EOS added; rows of ctx_len kept whole), "
        "cut into ctx_len sequences (remainder dropped)")


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
def test_large_compressed_text_is_decompressed_once_then_cut(tmp_path, monkeypatch, capsys, suffix):
    """A compressed text file over TEXT_SPLIT_BYTES is decompressed into the cache once and cut into
    the same documents as its uncompressed copy; a damaged one is a one-line error."""
    import importlib
    import random

    from actcache import data

    monkeypatch.setenv("SAE_CORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "TEXT_SPLIT_BYTES", 1000)
    monkeypatch.setattr(data, "TEXT_PIECE_BYTES", 256)
    rng = random.Random(0)  # random words: compressed, still over 1000 bytes
    text = "".join(" ".join(f"w{rng.randrange(10**6)}" for _ in range(8)) + ".\n\n" for _ in range(60))
    plain, packed = tmp_path / "plain" / "a.txt", tmp_path / "packed" / f"a.txt{suffix}"
    for f in (plain, packed):
        f.parent.mkdir()
    plain.write_text(text)
    writer = importlib.import_module(data.COMPRESSIONS[suffix])
    with writer.open(packed, "wb") as f:
        f.write(text.encode())
    assert packed.stat().st_size > 1000
    expected = data.load_documents(str(plain))
    docs = data.load_documents(str(packed))
    assert docs.num_docs == expected.num_docs > 1 and docs.cut == expected.cut
    assert docs.fetch(range(docs.num_docs)) == expected.fetch(range(expected.num_docs))
    assert "note: decompressing" in capsys.readouterr().err
    copies = list((tmp_path / "cache" / "text").glob("*.txt"))
    assert len(copies) == 1 and copies[0].read_text() == text
    data.load_documents(str(packed))  # the copy is reused
    assert capsys.readouterr().err == ""
    # Truncated: nothing is left behind in the cache, and the error is one line.
    damaged = tmp_path / "damaged" / f"b.txt{suffix}"
    damaged.parent.mkdir()
    damaged.write_bytes(packed.read_bytes()[: packed.stat().st_size * 2 // 3])
    with pytest.raises(UserError, match=rf"^cannot decompress {damaged} \(.+\); check the file or decompress it yourself$"):
        data.load_documents(str(damaged))
    assert sorted(p.name for p in (tmp_path / "cache" / "text").iterdir() if p.suffix != ".lock") == [copies[0].name]
    monkeypatch.setattr(data, "TEXT_SPLIT_BYTES", 1 << 20)  # read whole: the same error
    with pytest.raises(UserError, match=rf"^cannot decompress {damaged} "):
        data.load_documents(str(damaged)).fetch([0])
    frames = tmp_path / "damaged" / f"c.txt{suffix}"  # concatenated streams (pzstd, pigz -i): all of them
    frames.write_bytes(packed.read_bytes() * 2)
    assert data.load_documents(str(frames)).fetch([0]) == [text * 2]


def test_max_tokens_and_metadata(tmp_path, tiny_model_dir, tiny_text_dir):
    store = run(tmp_path, tiny_model_dir, tiny_text_dir, layers="all", max_tokens=100)
    assert store.layout.num_tokens == 128  # rounded up to whole sequences
    m = store.meta
    assert m["layers"] == [0, 1, 2, 3] and m["d_model"] == 16 and m["ctx_len"] == CTX
    assert m["dtype"] == "bfloat16" and m["storage_dtype"] == "uint16"
    assert m["model"]["id"] == str(tiny_model_dir) and "hidden_states[L]" in m["layer_convention"]
    assert len(m["data"]["fingerprint"]) == 64 and m["tool"]["name"] == "actcache"
    s = store.stats(2)
    x = store.read(2, 0, 128).double().numpy()
    np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(s.var, x.var(0, ddof=1), rtol=1e-9, atol=1e-9)
    q = s.norm_quantiles()
    assert abs(q["p50"] - np.median(np.linalg.norm(x, axis=1))) / q["p50"] < 0.05
    assert json.loads((store.path / "zarr.json").read_text())["attributes"]["actcache"]["format"] == "actcache-store"


def test_folder_datasets_and_their_splits(tmp_path):
    """A folder is split by the split names of its files (train.txt, data/test/...), or is all "train"
    when none has one; a mix is refused, not guessed at. Hidden files, dataset metadata and a README
    or LICENSE beside the data are not data."""
    from actcache import data
    from sae_core import UserError

    def folder(name, files):
        for f, text in files.items():
            (tmp_path / name / f).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / f).write_text(text)
        return tmp_path / name

    def texts(path, **kw):
        docs = data.load_documents(str(path), **kw)
        return sorted(docs.fetch(range(docs.num_docs)))

    chapters = folder("chapters", {"one.md": "1", "two.md": "2", "notes.txt": "n", "README.md": "r"})
    assert texts(chapters) == ["1", "2", "n"]
    with pytest.raises(UserError, match=rf"^folder {chapters} has no splits \(no file is named train, validation or "
                                        r"test\): drop --split$"):
        data.load_documents(str(chapters), split="test")
    assert texts(folder("only_readme", {"README.md": "r"})) == ["r"]

    split = folder("split", {"train.txt": "t", "validation.txt": "v", "README.md": "r", "LICENSE.txt": "l",
                             ".git/x.txt": "g"})
    assert texts(split) == ["t"] and texts(split, split="validation") == ["v"]
    mixed = folder("mixed", {"training.md": "t", "layers.md": "l", "store-format.md": "s", "a.md": "a", "b.md": "b"})
    with pytest.raises(UserError, match=rf"^folder {mixed} mixes files named by a split \(training.md\) with files "
                                        r"named by none \(a.md, b.md, layers.md and 1 more\); name each file or folder "
                                        r"by its split \(train, validation, test\), or move the others out$"):
        data.load_documents(str(mixed))

    hub_copy = tmp_path / "hub_copy"
    for name, text in [("train.jsonl", "train row"), ("data/test/part-0.jsonl", "test row"), ("README.md", "card"),
                       ("dataset_infos.json", None), (".cache/huggingface/x.jsonl", "cache")]:
        (hub_copy / name).parent.mkdir(parents=True, exist_ok=True)
        (hub_copy / name).write_text(json.dumps({"text": text, "default": {}}) + "\n" if text else "{}")
    for name in ("train", "test"):
        assert texts(hub_copy, split=name) == [f"{name} row"]


def test_info_reports_what_the_store_holds(tmp_path, tiny_model_dir, tiny_text_dir, capsys):
    """`actcache info` (text and --json) against the store's own arrays and files."""
    from actcache.cli import main

    N = 6 * CTX  # two shards of 4 and 2 sequences
    store = run(tmp_path, tiny_model_dir, tiny_text_dir, layers="1,3", max_tokens=N)
    capsys.readouterr()
    for argv in (["info", str(store.path), "--json"], ["info", str(store.path)]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code in (0, None)
        out = capsys.readouterr().out
        if "--json" in argv:
            info = json.loads(out)
        else:
            text = out.splitlines()
    assert info["arrays"] == {"layer_1": 16, "layer_3": 16} and info["layers"] == [1, 3]
    assert info["tokens_committed"] == info["tokens_planned"] == N and info["complete"]
    assert info["dataset"] == str(tiny_text_dir.resolve()) and info["split"] == "train" and info["dataset_config"] is None
    files = [f for f in store.path.rglob("*") if f.is_file()]
    assert info["bytes_on_disk"] == sum(f.stat().st_size for f in files)
    shard_files = [f for f in files if "/c/" in f.as_posix()]
    assert info["bytes_committed_data"] == sum(f.stat().st_size for f in shard_files)
    raw = N * (2 * 16 * 2 + 4)  # two bf16 layers of width 16 and int32 token ids per token
    assert info["compression_ratio"] == round(raw / info["bytes_committed_data"], 4)
    x = store.read(3, 0, N).double().norm(dim=1).numpy()
    stats = info["stats"]["layer_3"]
    assert stats["count"] == N and stats["nonfinite_tokens"] == 0
    assert stats["norm_quantiles"]["max"] == pytest.approx(x.max(), rel=1e-6)
    assert text[0] == f"store       {store.path}" and text[1] == f"model       {tiny_model_dir}"
    assert text[2] == f"dataset     {tiny_text_dir.resolve()}  split train"
    assert text[3] == "layers      layer_1, layer_3" and text[4] == f"tokens      {N:,} committed of {N:,}"
    assert text[5] == "dtype       bfloat16  ctx_len 32  codec zstd" and text[-1].split()[0] == "layer_3"


def test_skip_tokens_collects_a_window_of_the_order(tmp_path, tiny_model_dir, tiny_text_dir):
    """Windows (--skip-tokens + --max-tokens) are consecutive slices of one run's order, activations included."""
    import pytest

    from actcache import DataExhausted
    from sae_core import UserError

    kw = dict(layers="0,3", dtype="float32", seed=3)
    full = run(tmp_path, tiny_model_dir, tiny_text_dir, name="full.zarr", **kw)
    first = run(tmp_path, tiny_model_dir, tiny_text_dir, name="w0.zarr", max_tokens=10 * CTX, **kw)
    second = run(tmp_path, tiny_model_dir, tiny_text_dir, name="w1.zarr", max_tokens=10 * CTX, skip_tokens=9 * CTX + 1, **kw)
    assert second.meta["data"]["skip_tokens"] == 9 * CTX + 1 and second.meta["data"]["first_sequence"] == 10
    for i, window in enumerate((first, second)):
        span = slice(i * 10 * CTX, (i + 1) * 10 * CTX)
        assert torch.equal(window.tokens(), full.tokens()[span])
        assert torch.equal(window.read(3, 0, 10 * CTX), full.read(3, span.start, span.stop))
    assert second.meta["data"]["fingerprint"] != first.meta["data"]["fingerprint"]
    with pytest.raises(DataExhausted, match=r"--skip-tokens 100,000 skips all \d[\d,]* tokens of dataset .*; lower it"):
        run(tmp_path, tiny_model_dir, tiny_text_dir, name="w9.zarr", skip_tokens=100_000, **kw)
    with pytest.raises(UserError, match="--skip-tokens must be >= 0, got -1"):
        run(tmp_path, tiny_model_dir, tiny_text_dir, name="wn.zarr", skip_tokens=-1, **kw)


@pytest.mark.parametrize("fmt", ["numpy", "torch"])
def test_pretokenized_dataset_saved_in_a_format(tmp_path, monkeypatch, fmt):
    """Rows of token ids that a saved dataset returns as arrays or tensors pack (and cache) as lists do."""
    import datasets

    from actcache import data, packing

    monkeypatch.setenv("SAE_CORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(packing, "CACHE_MIN_BYTES", 0)
    rows = [[(7 * i + j) % 250 for j in range(CTX + i % 5)] for i in range(12)]  # leave tokens pending
    datasets.Dataset.from_dict({"input_ids": rows}).save_to_disk(tmp_path / "plain")
    datasets.Dataset.from_dict({"input_ids": rows}).with_format(fmt).save_to_disk(tmp_path / fmt)
    tok = byte_tokenizer()
    want, _ = packing.window(data.load_documents(str(tmp_path / "plain")), tok, CTX, 1, 0, None)
    got, _ = packing.window(data.load_documents(str(tmp_path / fmt)), tok, CTX, 1, 0, None)
    assert np.array_equal(got, want) and len(want) == sum(map(len, rows)) // CTX


def test_packed_sequences_are_cached(tmp_path, tiny_model_dir, tiny_text_dir, monkeypatch):
    """A second collection of the same data reads the packed sequences back; changed data is packed afresh."""
    import shutil

    from actcache import packing

    monkeypatch.setenv("SAE_CORE_CACHE", str(tmp_path / "cache"))
    texts = tmp_path / "texts"
    shutil.copytree(tiny_text_dir, texts)
    run(tmp_path, tiny_model_dir, texts, name="small.zarr", layers="0", seed=3)
    assert not (tmp_path / "cache" / "packed").exists()  # a few KB of text packs afresh each time
    monkeypatch.setattr(packing, "CACHE_MIN_BYTES", 0)
    first = run(tmp_path, tiny_model_dir, texts, name="a.zarr", layers="0", seed=3)
    assert len(list((tmp_path / "cache" / "packed").iterdir())) == 1
    packs = []
    real_pack = packing._pack_more
    monkeypatch.setattr(packing, "_pack_more", lambda *a, **kw: packs.append(1) or real_pack(*a, **kw))
    again = run(tmp_path, tiny_model_dir, texts, name="b.zarr", layers="0", seed=3, skip_tokens=CTX, max_tokens=2 * CTX)
    assert packs == [] and torch.equal(again.tokens(), first.tokens()[CTX : 3 * CTX])
    (texts / "doc1.txt").write_text("Something else entirely, and longer than before.\n" * 20)
    changed = run(tmp_path, tiny_model_dir, texts, name="c.zarr", layers="0", seed=3)
    assert packs == [1] and changed.meta["data"]["fingerprint"] != first.meta["data"]["fingerprint"]
    assert len(list((tmp_path / "cache" / "packed").iterdir())) == 2


def test_early_exit_skips_later_blocks(tmp_path, tiny_model_dir, tiny_text_dir, monkeypatch):
    from transformers.models.llama import modeling_llama

    calls = []
    orig = modeling_llama.LlamaDecoderLayer.forward

    def counting(self, *a, **k):
        calls.append((self.self_attn.layer_idx, (a[0] if a else k["hidden_states"]).shape[1]))
        return orig(self, *a, **k)

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", counting)
    run(tmp_path, tiny_model_dir, tiny_text_dir, layers="0,1")
    assert {i for i, n in calls if n == CTX} == {0}, "layer 1 is the input of block 1: blocks 1-3 must not run"
    # Besides: one 4-token pass through every block tells which layer convention the model's hidden_states follow.
    assert sorted(i for i, n in calls if n != CTX) == [0, 1, 2, 3]


def test_store_api_refuses_what_it_cannot_mean(tmp_path, tiny_model_dir, tiny_text_dir):
    store = run(tmp_path, tiny_model_dir, tiny_text_dir, layers="0,1", max_tokens=384)  # 3 shards
    n = store.layout.num_chunks
    assert torch.equal(store.read_chunk(1, n - 1), store.read(1, store.layout.chunk_tokens_range(n - 1).start))
    with pytest.raises(UserError, match=rf"^chunk {n} is out of range: store .* has chunks 0-{n - 1}$"):
        store.read_chunk(1, n)
    with pytest.raises(UserError, match=r"^chunk -1 is out of range"):
        store.read_chunk(1, -1)
    with pytest.raises(UserError, match=r"^layer True is not a layer; pass a number \(3\) or an array name \('layer_0'\)"):
        store.read(True, 0, 4)  # True == 1 to Python: it read layer 1
    assert torch.equal(store.read(torch.tensor(1), np.int64(2), torch.tensor(6)), store.read(1, 2, 6))
    for call, what in ((lambda: store.read(1, 0.0, 4), "start"), (lambda: store.tokens(0, 3.5), "stop"),
                       (lambda: store.read_chunk(1, 1.0), "chunk"), (lambda: store.read(1, "0"), "start")):
        with pytest.raises(UserError, match=rf"^{what} must be an integer, got "):
            call()
    # stop=None reads to the end of the committed run start is in (shards 0 and 2 of 0-2 committed here)
    st = store.layout.shard_tokens
    del store.manifest.shards[1]
    assert store.read(1).shape[0] == st and store.tokens(2 * st).shape[0] == store.layout.num_tokens - 2 * st
    assert store.read(1, st + 1).shape == (0, 16)  # start's shard is not committed: nothing (as before any commit)
    from sae_core import Sae, SaeConfig

    for name in ("layer_0", "layer_1"):
        Sae(16, SaeConfig(num_latents=32, k=4)).save_to_disk(tmp_path / "saes" / name)
    assert list(Sae.load_many(tmp_path / "saes", local=True, layers="layer_1")) == ["layer_1"]  # not "l", "a", ...
    assert list(Sae.load_many(tmp_path / "saes", local=True, layers=0)) == ["layer_0"]
    with pytest.raises(UserError, match=r"layer_0 is one SAE folder, not a folder of them: use Sae.load_from_disk\("):
        Sae.load_many(tmp_path / "saes" / "layer_0", local=True)


def test_a_reader_notices_the_store_was_collected_again(tmp_path, tiny_model_dir, tiny_text_dir):
    """`collect --overwrite` under an open reader: reads refuse until refresh(), which re-reads the metadata."""
    store = run(tmp_path, tiny_model_dir, tiny_text_dir, layers="1", max_tokens=256)
    before = store.read(1)
    new = run(tmp_path, tiny_model_dir, tiny_text_dir, layers="1", max_tokens=128, seed=3, overwrite=True)
    with pytest.raises(UserError, match=r"was collected again \(or deleted\) since it was opened; call refresh\(\)"):
        store.read(1)
    store.refresh()
    assert store.meta == new.meta and store.layout == new.layout and store.num_tokens == new.num_tokens == 128
    assert torch.equal(store.read(1), new.read(1)) and not torch.equal(store.read(1)[:64], before[:64])


def test_a_hookpoint_the_forward_pass_never_runs_is_named(tiny_model):
    from actcache.hooks import Capture

    tiny_model.model.vision_head = torch.nn.Linear(16, 16)  # a module text input never runs, as a vision tower
    capture = Capture(tiny_model, hookpoints=["model.vision_head"])
    with pytest.raises(UserError, match=r"^the forward pass never reached model.vision_head: they do not run on text"):
        capture(torch.zeros(1, 8, dtype=torch.long))


def test_an_unmatched_hookpoint_is_shown_a_path_of_the_language_model():
    """On a multimodal model the hint shows a path in the language model's blocks, not the vision tower's."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    from actcache.hooks import match_hookpoints

    text = Gemma3TextConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                                image_size=28, patch_size=14)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))
    with pytest.raises(UserError) as e:
        match_hookpoints(model, ["model.layers.*.mlp"])
    assert str(e.value) == ("hookpoint pattern 'model.layers.*.mlp' matches no module of the model; module paths look "
                            "like 'model.language_model.layers.1.self_attn'")


def test_float16_overflow_is_stored_and_warned_about(tmp_path, tiny_model_dir, tiny_text_dir, capsys):
    """Activations beyond float16's range are stored as inf (the store is sound), and the run says so."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e7)
    model.save_pretrained(tmp_path / "loud")
    byte_tokenizer().save_pretrained(tmp_path / "loud")
    capsys.readouterr()
    store = run(tmp_path, tmp_path / "loud", tiny_text_dir, layers="0,1", dtype="float16")
    n = store.num_tokens
    assert store.stats(0).nonfinite == n and (~torch.isfinite(store.read(0, 0, n))).any(dim=1).all()
    assert (f"warning: layer_0 has {n:,}, layer_1 has {n:,} token(s) with NaN or inf activations; store in bfloat16 "
            "(float16 overflows above 65504) or exclude them when training") in capsys.readouterr().err


def test_a_corrupt_chunk_in_a_long_read_leaves_no_pending_reads(tmp_path, tiny_model_dir, tiny_text_dir):
    """The error is the only output: no zarr tasks left pending for the other chunks, reported at exit."""
    import subprocess
    import sys

    store = run(tmp_path, tiny_model_dir, tiny_text_dir, layers="1", chunk_tokens=32)
    shard = next(p for p in sorted((store.path / "layers" / "layer_1" / "c").rglob("*")) if p.is_file())
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    code = ("import sys; from sae_core.store import ActivationStore, StoreCorruptError\n"
            "s = ActivationStore(sys.argv[1])\n"
            "try:\n    s.read(1, 0, s.num_tokens)\nexcept StoreCorruptError:\n    print('refused')")
    out = subprocess.run([sys.executable, "-c", code, str(store.path)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert (out.returncode, out.stdout, out.stderr) == (0, "refused\n", "")
