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
    [(["--layers", "0,3"], "arrays differs"), (["--layers", "0,2", "--dtype", "float32"], "dtype differs"),
     (["--layers", "0,2", "--ctx-len", "16"], "ctx_len differs"), (["--layers", "0,2", "--seed", "5"], "data differs")],
)
def test_resume_with_other_settings(capsys, base, store, change, what):
    err = cli(capsys, *base, *change, "--resume")
    assert f"cannot resume {store}: {what}" in err and "or --overwrite" in err


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
