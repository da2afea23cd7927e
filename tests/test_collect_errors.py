"""Bad input to `actcache`: a one-line error, exit code 2, and nothing already written is lost."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from actcache.cli import main
from sae_core.store import ActivationStore, StoreCorruptError, verify_store


def cli(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(map(str, argv)))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.fixture
def base(tiny_model_dir, tiny_text_dir, tmp_path):
    return [
        "collect", "--model", tiny_model_dir, "--dataset", tiny_text_dir, "--ctx-len", 32, "--batch-size", 2,
        "--seqs-per-shard", 4, "--device", "cpu", "--no-progress", "--out", tmp_path / "s.zarr",
    ]


@pytest.fixture
def store(base, tmp_path):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in base + ["--layers", "0,2"]])
    assert e.value.code in (0, None)
    return tmp_path / "s.zarr"


def test_unknown_model_path(capsys, base):
    assert "model path /no/such/model does not exist" in cli(capsys, *base, "--model", "/no/such/model")


def test_unknown_hub_model(capsys, base, monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert "cannot load model 'nobody/nothing'" in cli(capsys, *base, "--model", "nobody/nothing")


@pytest.mark.parametrize(
    "layers, msg",
    [("0-9", "layer 4 is out of range: the model has layers 0-3"), ("1-x", "malformed layer spec '1-x'")],
)
def test_bad_layers(capsys, base, layers, msg):
    assert msg in cli(capsys, *base, "--layers", layers)


def test_unknown_hookpoint(capsys, base):
    assert "hookpoint pattern 'model.nothing.*' matches no module" in cli(capsys, *base, "--hookpoints", "model.nothing.*")


def test_dataset_without_text_column(capsys, base, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"content": f"hello {i}"}) for i in range(5)))
    err = cli(capsys, *base, "--dataset", f)
    assert "has no column 'text'; its columns are content: pass --text-column NAME" in err


def test_text_column_option(base, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"content": "hello there, " * 20}) for i in range(5)))
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in base + ["--dataset", f, "--text-column", "content", "--layers", "1"]])
    assert e.value.code in (0, None)
    assert ActivationStore(tmp_path / "s.zarr").complete


@pytest.mark.parametrize("content", ["", "ab"])
def test_empty_or_too_short_dataset(capsys, base, tmp_path, content):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text(content)
    err = cli(capsys, *base, "--dataset", tmp_path / "data")
    assert ("is empty" in err) if not content else ("fewer than --ctx-len 32" in err)


def test_missing_dataset_path(capsys, base):
    assert "dataset path ./no/such.jsonl does not exist" in cli(capsys, *base, "--dataset", "./no/such.jsonl")


def test_existing_store_needs_resume_or_overwrite(capsys, base, store):
    before = verify_store(store), ActivationStore(store).num_tokens
    err = cli(capsys, *base, "--layers", "0,2")
    assert "already exists; pass --resume to continue it or --overwrite to replace it" in err
    # A bad --overwrite run fails before anything is deleted.
    assert "out of range" in cli(capsys, *base, "--layers", "7", "--overwrite")
    assert (verify_store(store), ActivationStore(store).num_tokens) == before


@pytest.mark.parametrize(
    "change, what",
    [(["--layers", "0,3"], "arrays.layer_2 differs (store: {'d': 16, 'layer': 2}, now: None)"), (["--layers", "0,2", "--dtype", "float32"], "dtype differs"),
     (["--layers", "0,2", "--ctx-len", "16"], "ctx_len differs"), (["--layers", "0,2", "--seed", "5"], "data.seed differs (store: 0, now: 5)")],
)
def test_resume_with_other_settings(capsys, base, store, change, what):
    err = cli(capsys, *base, *change, "--resume")
    assert f"cannot resume {store}: {what}" in err and "or --overwrite" in err


def test_resume_a_store_of_an_older_data_order(capsys, base, store):
    attrs = json.loads((store / "zarr.json").read_text())
    attrs["attributes"]["actcache"]["data"]["packing"] = "documents joined by EOS, cut into ctx_len sequences"
    (store / "zarr.json").write_text(json.dumps(attrs))
    err = cli(capsys, *base, "--layers", "0,2", "--resume")
    assert err == (f"error: cannot resume {store}: an older actcache wrote it with another data order "
                   "('documents joined by EOS, cut into ctx_len sequences'); collect it afresh with --overwrite")


def test_resume_a_store_from_before_a_setting_was_added(capsys, base, store):
    """A store written before `data.dataset_config` existed resumes: the missing entry equals None."""
    attrs = json.loads((store / "zarr.json").read_text())
    del attrs["attributes"]["actcache"]["data"]["dataset_config"]
    (store / "zarr.json").write_text(json.dumps(attrs))
    before = verify_store(store), ActivationStore(store).num_tokens
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in base + ["--layers", "0,2", "--resume"]])
    assert e.value.code in (0, None) and (verify_store(store), ActivationStore(store).num_tokens) == before


def test_dataset_config_of_a_local_dataset(capsys, base, tiny_text_dir):
    assert cli(capsys, *base, "--dataset-config", "wikitext-2") == (
        f"error: --dataset-config applies to Hub datasets, and {tiny_text_dir} is a local path: drop it"
    )


def test_not_enough_disk(capsys, base, monkeypatch):
    import shutil

    import sae_core.store.writer as w

    monkeypatch.setattr(w.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    err = cli(capsys, *base, "--layers", "0")
    assert "not enough disk" in err and "GB are free" in err


def test_8bit_without_cuda(capsys, base):
    assert "--load-in-8bit needs a CUDA GPU" in cli(capsys, *base, "--load-in-8bit")


@pytest.mark.parametrize("argv, msg", [(["--dtype", "int4"], "unknown storage dtype 'int4'"),
                                       (["--codec", "lzma"], "unknown codec 'lzma'"),
                                       (["--batch-size", "0"], "--batch-size must be at least 1"),
                                       (["--layers", "1", "--hookpoints", "model.norm"], "either --layers or --hookpoints")])
def test_bad_options(capsys, base, argv, msg):
    assert msg in cli(capsys, *base, *argv)


def test_verify_reports_what_is_committed(capsys, store):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["verify", str(store)])
    assert e.value.code in (0, None)
    assert capsys.readouterr().out.strip() == f"{store}: OK (9 of 9 shards committed, 1,056 of 1,056 tokens)"
    (store / "manifest.json").write_text("{not json")
    assert "manifest.json is corrupt (JSONDecodeError" in cli(capsys, "verify", store)
    assert "the record of committed shards is lost; restore it from a copy or collect again with --overwrite" in \
        cli(capsys, "info", store)


def test_corrupted_chunk(capsys, store):
    shard = store / "layers" / "layer_2" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match=r"reading layer_2 tokens \[0, 32\) failed.*actcache verify"):
        ActivationStore(store).read(2, 0, 32)
    assert ActivationStore(store).read(0, 0, 32).shape == (32, 16)
    assert verify_store(store) == ["shard 0: layers/layer_2/c/0/0 fails its checksum"]
    with pytest.raises(SystemExit) as e:
        main(["verify", str(store)])
    assert e.value.code == 1
    assert "fails its checksum" in capsys.readouterr().err


def test_not_a_store(capsys, tmp_path):
    assert "does not exist" in cli(capsys, "info", tmp_path / "nope.zarr")
    (tmp_path / "empty").mkdir()
    assert "is not an actcache store" in cli(capsys, "verify", tmp_path / "empty")


def test_console_script_error_is_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "actcache", "collect", "--model", "/no/such", "--out", str(tmp_path / "x.zarr")],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == "error: model path /no/such does not exist; check the path or pass a Hub id like org/name"
    assert not (tmp_path / "x.zarr").exists()


def test_one_writer_at_a_time(capsys, base, store):
    from sae_core.store.writer import lock_store

    held = lock_store(store)
    try:
        assert "another `actcache collect` is writing" in cli(capsys, *base, "--layers", "0,2", "--resume")
    finally:
        held.close()


def test_overwrite_replaces_only_stores(capsys, base, tmp_path):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.txt").write_text("years of work")
    assert f"{precious} is not an actcache store, and --overwrite replaces only stores" in cli(
        capsys, *base, "--out", precious, "--overwrite")
    assert (precious / "chapter1.txt").read_text() == "years of work"
    (tmp_path / "afile").write_text("x")
    assert "afile is a file; choose another --out" in cli(capsys, *base, "--out", tmp_path / "afile" / "s.zarr")


def test_model_limits_are_checked_before_the_store_is_touched(capsys, base, store, tmp_path):
    before = verify_store(store), ActivationStore(store).num_tokens
    # The tiny Llama has 512 positions; a failing run with --overwrite must leave the old store.
    assert "--ctx-len 1024 is longer than the model's context (512 positions)" in cli(
        capsys, *base, "--layers", "0,2", "--ctx-len", 1024, "--overwrite")
    assert (verify_store(store), ActivationStore(store).num_tokens) == before
    # A hookpoint without one row per token (rotary embeddings broadcast over the batch).
    assert "model.rotary_emb outputs shape (1, 32, 8) for a batch of 2 x 32 tokens, not (batch, seq, d)" in cli(
        capsys, *base, "--hookpoints", "model.rotary_emb", "--out", tmp_path / "rot.zarr")
    # Pre-tokenized ids the model has no embedding for.
    from datasets import Dataset

    Dataset.from_dict({"input_ids": [[5, 300, 7] * 20]}).save_to_disk(tmp_path / "oov")
    assert "token id 300 in the data is outside the model's vocabulary (257 embeddings)" in cli(
        capsys, *base, "--dataset", tmp_path / "oov", "--out", tmp_path / "oov.zarr")


def test_dataset_files_by_format_and_split(capsys, base, tmp_path, monkeypatch):
    import gzip

    from tests.conftest import byte_tokenizer

    rows = [json.dumps({"text": f"row {i} of the training text, long enough to fill a sequence or two."}) for i in range(40)]
    data = tmp_path / "data"
    data.mkdir()
    with gzip.open(data / "train.JSONL.gz", "wt") as f:
        f.write("\n".join(rows))
    (data / "validation.jsonl").write_text("\n".join(r.replace("training", "VALIDATION") for r in rows))
    for split, word in (("train", "training"), ("validation", "VALIDATION")):
        out = tmp_path / f"{split}.zarr"
        main_ok(*base, "--dataset", data, "--split", split, "--layers", "0", "--out", out)
        text = byte_tokenizer().decode(ActivationStore(out).tokens().tolist())
        assert word in text and ({"training", "VALIDATION"} - {word}).pop() not in text
    assert "has no files of split 'test'; it has train, validation" in cli(capsys, *base, "--dataset", data, "--split", "test")
    assert "is a single split (no 'validation'): drop --split" in cli(
        capsys, *base, "--dataset", data / "validation.jsonl", "--split", "validation")
    (tmp_path / "notes.rtf").write_text("{\\rtf1 hello}")
    assert "notes.rtf is not .txt, .md, .jsonl, .json, .parquet or .csv" in cli(capsys, *base, "--dataset", tmp_path / "notes.rtf")
    (tmp_path / "chat.jsonl").write_text(json.dumps({"text": ["hello", "world"]}) + "\n")
    assert "column 'text' of dataset" in cli(capsys, *base, "--dataset", tmp_path / "chat.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9 au lait"}\n')
    assert "holds text that is not UTF-8" in cli(capsys, *base, "--dataset", tmp_path / "latin1.jsonl")
    monkeypatch.chdir(tmp_path)  # data/ exists here: data/nope is a mistyped path, not a Hub user's dataset
    assert "dataset path data/nope does not exist; check the path" in cli(capsys, *base, "--dataset", "data/nope")


def main_ok(*argv) -> None:
    with pytest.raises(SystemExit) as e:
        main(list(map(str, argv)))
    assert e.value.code in (0, None)


def test_a_missing_shard_file_is_an_error_not_zeros(store):
    import numpy as np

    s = ActivationStore(store)
    assert torch_equal(s.read(np.int64(2)), s.read("2")) and len(s.tokens()) == s.num_tokens
    shard_file = sorted(p for p in (store / "layers" / "layer_2" / "c").rglob("*") if p.is_file())[1]
    shard_file.unlink()
    with pytest.raises(StoreCorruptError, match=r"layers/layer_2/c/1/0 \(shard 1 of layer_2\) is missing"):
        s.read(2, 0, s.num_tokens)
    s.read(0, 0, s.num_tokens)  # the other layer is whole
    sorted(p for p in (store / "tokens" / "c").rglob("*") if p.is_file())[0].unlink()
    with pytest.raises(StoreCorruptError, match=r"tokens/c/0 \(shard 0 of tokens\) is missing"):
        s.tokens(0, 32)


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)
