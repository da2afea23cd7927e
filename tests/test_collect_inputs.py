"""What `actcache collect` reads: models and datasets of every kind, and a one-line refusal (exit code 2)
for one it cannot use, before any store is touched."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from actcache.cli import main
from sae_core.store import ActivationStore
from tests.conftest import byte_tokenizer
from tests.test_collect import run
from tests.test_collect_errors import cli, main_ok


def test_unknown_model_path(capsys, base):
    assert "model path /no/such/model does not exist" in cli(capsys, *base, "--model", "/no/such/model")


def test_unknown_hub_model(capsys, base, monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert "cannot load model 'nobody/nothing'" in cli(capsys, *base, "--model", "nobody/nothing")


def test_dataset_without_text_column(capsys, base, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"content": f"hello {i}"}) for i in range(5)))
    err = cli(capsys, *base, "--dataset", f)
    assert "has no column 'text'; its columns are content: pass --text-column NAME" in err


def test_malformed_data_file_is_named_with_the_parser_error(capsys, base, tmp_path):
    """The file and the parser's own words, on the one error line (datasets logs them before a generic error)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "fine"}\n')
    (tmp_path / "data" / "b.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    assert cli(capsys, *base, "--dataset", tmp_path / "data") == (
        f"error: cannot read {tmp_path / 'data' / 'b.jsonl'} as json (ArrowInvalid: JSON parse error: Invalid value. "
        "in row 1); check the data (empty? not UTF-8?)")


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


def test_empty_saved_dataset(capsys, base, tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"text": []}).save_to_disk(tmp_path / "empty")  # datasets cannot load it back
    capsys.readouterr()
    assert cli(capsys, *base, "--dataset", tmp_path / "empty") == (
        f"error: dataset {tmp_path / 'empty'} is empty; point --dataset at data with at least one document")


def test_damaged_model_files(capsys, base, tmp_path, tiny_model_dir):
    (tmp_path / "junk.gguf").write_text("garbage")
    assert cli(capsys, *base, "--model", tmp_path / "junk.gguf").startswith(
        f"error: cannot read GGUF file {tmp_path / 'junk.gguf'} (ValueError: ")
    shutil.copytree(tiny_model_dir, tmp_path / "cut")
    with open(tmp_path / "cut" / "model.safetensors", "r+b") as f:
        f.truncate(2000)
    assert cli(capsys, *base, "--model", tmp_path / "cut").startswith(
        f"error: cannot load model '{tmp_path / 'cut'}': a weights file is damaged (SafetensorError: ")


def test_missing_dataset_path(capsys, base):
    assert "dataset path ./no/such.jsonl does not exist" in cli(capsys, *base, "--dataset", "./no/such.jsonl")


def test_dataset_config_of_a_local_dataset(capsys, base, tiny_text_dir):
    assert cli(capsys, *base, "--dataset-config", "wikitext-2") == (
        f"error: --dataset-config applies to Hub datasets, and {tiny_text_dir} is a local path: drop it"
    )


def test_dataset_files_by_format_and_split(capsys, base, tmp_path, monkeypatch):
    import gzip

    import zstandard

    from tests.conftest import byte_tokenizer

    rows = [json.dumps({"text": f"row {i} of the training text, long enough to fill a sequence or two."}) for i in range(40)]
    data = tmp_path / "data"
    data.mkdir()
    with gzip.open(data / "train.JSONL.gz", "wt") as f:
        f.write("\n".join(rows))
    with zstandard.open(data / "validation.jsonl.zst", "wt") as f:
        f.write("\n".join(r.replace("training", "VALIDATION") for r in rows))
    for split, word in (("train", "training"), ("validation", "VALIDATION")):
        out = tmp_path / f"{split}.zarr"
        main_ok(*base, "--dataset", data, "--split", split, "--layers", "0", "--out", out)
        text = byte_tokenizer().decode(ActivationStore(out).tokens().tolist())
        assert word in text and ({"training", "VALIDATION"} - {word}).pop() not in text
    assert "has no files of split 'test'; it has train, validation" in cli(capsys, *base, "--dataset", data, "--split", "test")
    assert "is a single split (no 'validation'): drop --split" in cli(
        capsys, *base, "--dataset", data / "validation.jsonl.zst", "--split", "validation")
    (tmp_path / "notes.rtf").write_text("{\\rtf1 hello}")
    assert "--hookpoints names no module" in cli(capsys, *base, "--hookpoints", ",")
    assert "--revision applies to Hub models, and " in cli(capsys, *base, "--revision", "v2")
    main_ok(*base, "--layers", "0", "--max-tokens", 64, "--resume", "--out", tmp_path / "fresh.zarr")
    assert f"note: {tmp_path / 'fresh.zarr'} does not exist yet: --resume collects it from the start" in (
        capsys.readouterr().err)
    assert f"--out {data / 'acts.zarr'} is inside the dataset folder {data}, where the store would become data" in cli(
        capsys, *base, "--dataset", data, "--out", data / "acts.zarr")
    assert "notes.rtf is not .txt, .md, .jsonl, .json, .parquet or .csv" in cli(capsys, *base, "--dataset", tmp_path / "notes.rtf")
    (tmp_path / "chat.jsonl").write_text(json.dumps({"text": ["hello", "world"]}) + "\n")
    assert "column 'text' of dataset" in cli(capsys, *base, "--dataset", tmp_path / "chat.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9 au lait"}\n')
    assert "holds text that is not UTF-8" in cli(capsys, *base, "--dataset", tmp_path / "latin1.jsonl")
    monkeypatch.chdir(tmp_path)  # data/ exists here: data/nope is a mistyped path, not a Hub user's dataset
    assert "dataset path data/nope does not exist; check the path" in cli(capsys, *base, "--dataset", "data/nope")


def test_a_tokenizer_without_eos_joins_documents_with_nothing_and_says_so(tmp_path, tiny_model_dir, tiny_text_dir,
                                                                           capsys):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "noeos")
    tok = byte_tokenizer()
    tok.eos_token = None
    tok.save_pretrained(tmp_path / "noeos")
    capsys.readouterr()
    store = run(tmp_path, tmp_path / "noeos", tiny_text_dir, layers="0", seed=None)
    assert "joined with nothing between them (the tokenizer has no EOS token)" in store.meta["data"]["packing"]
    assert "note: the tokenizer has no EOS token" in capsys.readouterr().err
    eos = byte_tokenizer().eos_token_id
    assert eos not in store.tokens(0, store.num_tokens).tolist()


def test_text_files_are_utf8_whatever_the_locale(tmp_path):
    """A small text file is read as UTF-8 (invalid bytes replaced), as the pieces of a large one, not in
    the locale's encoding."""
    import subprocess
    import sys

    (tmp_path / "a.txt").write_bytes("Café, naïve — ok\r\n".encode() + b"caf\xe9\n")
    code = ("import sys; from pathlib import Path; from actcache.data import _read_text; "
            "sys.stdout.buffer.write(_read_text(Path(sys.argv[1])).encode())")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.txt")], env=env, capture_output=True, check=True)
    assert out.stdout.decode() == "Café, naïve — ok\ncaf\ufffd\n"
