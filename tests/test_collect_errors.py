"""Bad input to `actcache`: a one-line error, exit code 2, and nothing already written is lost."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from actcache.cli import main
from sae_core import UserError
from sae_core.store import ActivationStore, StoreCorruptError, verify_store


def cli(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(map(str, argv)))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.fixture
def store(base, tmp_path):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in base + ["--layers", "0,2"]])
    assert e.value.code in (0, None)
    return tmp_path / "s.zarr"


@pytest.mark.parametrize(
    "layers, msg",
    [("0-9", "layer 4 is out of range: the model has layers 0-3"), ("1-x", "malformed layer spec '1-x'")],
)
def test_bad_layers(capsys, base, layers, msg):
    assert msg in cli(capsys, *base, "--layers", layers)


def test_a_container_of_modules_is_no_hookpoint(capsys, base):
    assert cli(capsys, *base, "--hookpoints", "model.layers") == (
        "error: hookpoint pattern 'model.layers' matches only model.layers, a ModuleList of modules, which is never "
        "called itself; name its members (e.g. 'model.layers.0')")


def test_unknown_hookpoint(capsys, base):
    assert "hookpoint pattern 'model.nothing.*' matches no module" in cli(capsys, *base, "--hookpoints", "model.nothing.*")


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
     (["--layers", "0,2", "--ctx-len", "16"], "ctx_len differs"), (["--layers", "0,2", "--seed", "5"], "data.seed differs (store: 0, now: 5)"),
     (["--layers", "0,2", "--seed", "-1"], "data.seed differs (store: 0, now: None)"),  # not "another data order"
     (["--layers", "0,2", "--codec", "gzip"], "codec differs (store: 'zstd', now: 'gzip'); use the same --codec"),
     (["--layers", "0,2", "--model-dtype", "float16"], "model.dtype differs (store: 'float32', now: 'float16'); "
                                                       "use the same --model/--revision/--gguf-file/--model-dtype")],
)
def test_resume_with_other_settings(capsys, base, store, change, what):
    err = cli(capsys, *base, *change, "--resume")
    assert f"cannot resume {store}: {what}" in err and "or --overwrite" in err


def test_resume_with_another_model_names_the_model(capsys, base, store, tmp_path):
    from tests.conftest import byte_tokenizer, tiny_llama

    tiny_llama(num_layers=4, hidden=32, vocab=257).save_pretrained(tmp_path / "wide")
    byte_tokenizer().save_pretrained(tmp_path / "wide")
    capsys.readouterr()
    assert "cannot resume" in (err := cli(capsys, *base, "--layers", "0,2", "--model", tmp_path / "wide", "--resume"))
    assert ": model.id differs (store: " in err


def test_resume_keeps_the_layout_the_store_was_made_with(base, tmp_path, monkeypatch):
    """A store made by a version whose planner chose other shard or chunk sizes for the same data resumes."""
    import actcache.collection as collection

    i = base.index("--seqs-per-shard")
    argv = [str(a) for a in base[:i] + base[i + 2 :]] + ["--layers", "0"]  # sizes left to the planner
    with pytest.raises(SystemExit) as e:
        main(argv + ["--max-tokens", "600"])
    assert e.value.code in (0, None)
    made = ActivationStore(tmp_path / "s.zarr").layout
    real = collection.plan_layout
    monkeypatch.setattr(collection, "plan_layout", lambda **kw: real(**{**kw, "chunk_mb": 0.001}))
    assert real(num_sequences=made.num_sequences, ctx_len=32, bytes_per_token=32, chunk_mb=0.001) != made
    with pytest.raises(SystemExit) as e:
        main(argv + ["--max-tokens", "600", "--resume"])
    assert e.value.code in (0, None)
    assert ActivationStore(tmp_path / "s.zarr").layout == made and verify_store(tmp_path / "s.zarr") == []


def test_resume_a_store_of_an_older_data_order(capsys, base, store):
    attrs = json.loads((store / "zarr.json").read_text())
    data = attrs["attributes"]["actcache"]["data"]
    data["packing"] = "documents joined by EOS, cut into ctx_len sequences"
    (store / "zarr.json").write_text(json.dumps(attrs))
    main_ok(*base, "--layers", "0,2", "--resume")  # the same tokens (fingerprint) described in other words: resumes
    data["fingerprint"] = "0" * 64  # another order: other tokens
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


def test_lost_manifest_is_named(capsys, store):
    """A store whose manifest.json was deleted is refused by name, not reported as sound and empty."""
    (store / "manifest.json").unlink()
    n = sum(1 for p in store.glob("**/c/**/*") if p.is_file())
    expected = (f"error: store {store}: manifest.json is missing, so none of its {n} shard file(s) counts as "
                "committed; restore it from a copy or collect again with --overwrite")
    for argv in (["verify", store], ["verify", store, "--repair"], ["info", store]):
        assert cli(capsys, *argv).strip() == expected


def test_corrupted_chunk(capsys, base, store):
    """A flipped byte fails the read; the error's advice works: verify sets the shard aside, --resume re-collects it."""
    shard = store / "layers" / "layer_2" / "c" / "0" / "0"
    good = shard.read_bytes()
    before = ActivationStore(store)
    want, stats = before.read(2), before.stats(2)
    data = bytearray(good)
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError) as e:
        ActivationStore(store).read(2, 0, 32)
    assert str(e.value).startswith(f"store {store}: reading layer_2 tokens [0, 32) failed (")
    assert str(e.value).endswith(
        "a chunk is corrupt or missing; run `actcache verify --repair` on the store (it sets damaged shards aside), then the "
        "same `actcache collect` command with --resume to re-collect them")
    assert ActivationStore(store).read(0, 0, 32).shape == (32, 16)
    assert verify_store(store) == ["shard 0: layers/layer_2/c/0/0 fails its checksum"]
    assert ActivationStore(store).committed_shards == list(range(9))  # only looked
    with pytest.raises(SystemExit) as e:
        main(["verify", str(store)])
    assert e.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "shard 0: layers/layer_2/c/0/0 fails its checksum",
        f"{store}: 1 problem(s); run `actcache verify --repair {store}` to set the damaged shards aside, then the same "
        "`actcache collect` command with --resume to re-collect them",
    ]
    assert ActivationStore(store).committed_shards == list(range(9))  # still only looked
    with pytest.raises(SystemExit) as e:
        main(["verify", "--repair", str(store)])
    assert e.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "shard 0: layers/layer_2/c/0/0 fails its checksum; shard set aside (uncommitted): run the same "
        "`actcache collect` command with --resume to re-collect it",
        f"{store}: 1 problem(s)",
    ]
    s = ActivationStore(store)
    assert s.committed_shards == list(range(1, 9)) and s.manifest.recollect == {0: "layers/layer_2/c/0/0 fails its checksum"}
    with pytest.raises(UserError, match=r"include shard 0, which is not committed \(set aside by verification: "
                                        r"layers/layer_2/c/0/0 fails its checksum\); finish the collection"):
        s.read(2, 0, 32)
    main_ok("info", store)
    assert ("set aside   shard 0: layers/layer_2/c/0/0 fails its checksum (re-collect with `actcache collect ... "
            "--resume`)") in capsys.readouterr().out.splitlines()
    main_ok("verify", store)  # the rest is sound
    main_ok(*base, "--layers", "0,2", "--resume")
    assert "wrote 128 tokens" in capsys.readouterr().out
    main_ok("verify", store)
    assert capsys.readouterr().out.strip() == f"{store}: OK (9 of 9 shards committed, 1,056 of 1,056 tokens)"
    after = ActivationStore(store)
    assert shard.read_bytes() == good and after.manifest.recollect == {}
    assert torch_equal(after.read(2), want)
    # The shard's statistics were counted once, when first committed: not again.
    assert after.stats(2).count == stats.count == 1056
    np.testing.assert_allclose(after.stats(2).mean, stats.mean)
    np.testing.assert_array_equal(after.stats(2).norm_hist, stats.norm_hist)


def test_resume_recollects_a_committed_shard_file_cut_short_or_gone(capsys, base, store):
    """--resume checks every committed file's size (a stat each) and re-collects the damaged shards."""
    want = ActivationStore(store).read(0)
    cut = store / "layers" / "layer_0" / "c" / "3" / "0"
    cut.write_bytes(cut.read_bytes()[:50])
    (store / "tokens" / "c" / "5").unlink()
    main_ok(*base, "--layers", "0,2", "--resume")
    captured = capsys.readouterr()
    assert "wrote 256 tokens" in captured.out
    assert captured.err.splitlines() == [
        f"note: shard 3 of {store} is damaged (layers/layer_0/c/3/0 has 50 bytes, manifest says "
        f"{ActivationStore(store).manifest.shards[3].files['layers/layer_0/c/3/0']['bytes']}); re-collecting it",
        f"note: shard 5 of {store} is damaged (tokens/c/5 is missing); re-collecting it",
    ]
    assert verify_store(store) == [] and torch_equal(ActivationStore(store).read(0), want)
    assert ActivationStore(store).stats(0).count == 1056


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
    for flags in ([], ["--overwrite"], ["--resume"]):  # no advice to pass a flag that would be refused too
        assert cli(capsys, *base, "--out", precious, *flags) == (
            f"error: {precious} is not an actcache store (it holds chapter1.txt); choose another --out")
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
    capsys.readouterr()  # (datasets' progress bar)
    assert "token id 300 in the data is outside the model's vocabulary (257 embeddings)" in cli(
        capsys, *base, "--dataset", tmp_path / "oov", "--out", tmp_path / "oov.zarr")
    # Ids that are no token ids at all, even with --overwrite of a good store: refused before it is touched.
    for i, row in enumerate(([1, 2, -5] * 20, [1.5, 2.0] * 30, ["a", "b"] * 30, [2**40] * 60)):
        Dataset.from_dict({"input_ids": [row]}).save_to_disk(tmp_path / f"bad{i}")
        capsys.readouterr()
        assert f"input_ids of row 0 must be a list of token ids (whole numbers from 0), got {str(row)[:20]}" in cli(
            capsys, *base, "--layers", "0,2", "--dataset", tmp_path / f"bad{i}", "--overwrite")
    assert (verify_store(store), ActivationStore(store).num_tokens) == before


def main_ok(*argv) -> None:
    with pytest.raises(SystemExit) as e:
        main(list(map(str, argv)))
    assert e.value.code in (0, None)


@pytest.mark.parametrize("damage, why", [
    (lambda m: m["layout"].update(chunk_tokens=0), "every layout size must be positive"),
    (lambda m: m.pop("layout"), "'layout' is missing or not a dict"),
    (lambda m: m.update(arrays=[]), "'arrays' is missing or not a dict"),
    (lambda m: m.pop("dtype"), "'dtype' is missing or not a str"),
])
def test_damaged_store_metadata_is_one_line(capsys, store, damage, why):
    root = json.loads((store / "zarr.json").read_text())
    damage(root["attributes"]["actcache"])
    (store / "zarr.json").write_text(json.dumps(root))
    for argv in (["info", store], ["info", store, "--json"], ["verify", store], ["verify", store, "--repair"]):
        text = cli(capsys, *argv)
        assert text.startswith(f"error: store {store}: its metadata (zarr.json) is damaged ({why}"), text
        assert text.endswith("); restore zarr.json from a copy, or collect the store again (--overwrite)"), text


def test_damaged_array_metadata_is_named_not_repaired(capsys, store):
    (store / "layers" / "layer_2" / "zarr.json").write_text("{oops")
    expected = (f"error: store {store}: the metadata of layer_2 (layers/layer_2/zarr.json) is missing or damaged")
    assert cli(capsys, "verify", store).startswith(expected)  # not "OK": no re-collection of shards can fix it
    assert cli(capsys, "verify", store, "--repair").startswith(expected)
    with pytest.raises(UserError, match="restore it from a copy, or collect the store again"):
        ActivationStore(store).read(2, 0, 4)


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


# ------------------------------------------------------------------------------------- layout options
@pytest.mark.parametrize("argv, msg", [
    (["--chunk-tokens", "0"], "--chunk-tokens must be at least 1, got 0; leave it out to size chunks from --chunk-mb"),
    (["--chunk-tokens", "-32"], "--chunk-tokens must be at least 1, got -32; leave it out to size chunks from --chunk-mb"),
    (["--seqs-per-shard", "0"], "--seqs-per-shard must be at least 1, got 0; leave it out to size shards from --shard-mb"),
    (["--seqs-per-shard", "-1"], "--seqs-per-shard must be at least 1, got -1; leave it out to size shards from --shard-mb"),
    (["--chunk-mb", "nan"], "--chunk-mb must be a positive number of MiB, got nan"),
    (["--shard-mb", "nan"], "--shard-mb must be a positive number of MiB, got nan"),
    (["--shard-mb", "inf"], "--shard-mb must be a positive number of MiB, got inf"),
    (["--chunk-mb", "0"], "--chunk-mb must be a positive number of MiB, got 0.0"),
    (["--shard-mb", "-1"], "--shard-mb must be a positive number of MiB, got -1.0"),
    (["--chunk-tokens", "1000000000"], "--chunk-tokens 1000000000 makes chunks of 30,518 MiB per layer, and a chunk "
     "is read (and a shard held in memory) whole; use at most 8,388,608 tokens (leave it out for chunks of ~2 MiB)"),
    (["--seqs-per-shard", "4", "--chunk-tokens", "96"],
     "chunk size 96 tokens does not divide the shard size 128 tokens (4 sequences of 32); pick a divisor, "
     "or --seqs-per-shard a multiple of 3"),
])
def test_bad_layout_options(capsys, base, tmp_path, argv, msg):
    # --seqs-per-shard 4 in `base` comes first: the later value wins.
    assert cli(capsys, *base, "--layers", "0", *argv) == f"error: {msg}"
    assert not (tmp_path / "s.zarr").exists()


def test_plan_layout_shards_are_whole_chunks_for_any_amount_of_data():
    from sae_core.store.layout import plan_layout

    # Data smaller than one shard: the shard is rounded up to whole chunks (80 sequences), not cut to 76.
    lay = plan_layout(num_sequences=76, ctx_len=32, bytes_per_token=32, chunk_tokens=256)
    assert (lay.seqs_per_shard, lay.num_shards, lay.num_chunks, lay.chunk_tokens_range(9)) == (80, 1, 10, range(2304, 2432))
    # The default shard size, rounded to whole chunks; and an explicit one: the last shard is partial.
    assert plan_layout(num_sequences=10**6, ctx_len=32, bytes_per_token=3200, chunk_tokens=96).seqs_per_shard == 327
    lay = plan_layout(num_sequences=76, ctx_len=32, bytes_per_token=32, seqs_per_shard=16, chunk_tokens=256)
    assert (lay.seqs_per_shard, lay.num_shards, list(lay.shard_chunks(4)), lay.shard_tokens_range(4)) == (
        16, 5, [8, 9], range(2048, 2432))
    # Without --chunk-tokens the shard is cut to the data, as before (stores made so still resume).
    assert plan_layout(num_sequences=76, ctx_len=32, bytes_per_token=32).seqs_per_shard == 76
    # Chunks near 2 MiB whatever the sequence length: the divisor of the shard nearest by ratio, not the
    # largest below (6 tokens for 2 sequences of 2049 = 3 x 683 at d=4096 in bf16).
    for ctx, chunk in ((2048, 256), (2049, 683), (2039, 2039), (4099, 4099), (1000, 250)):
        assert plan_layout(num_sequences=10**5, ctx_len=ctx, bytes_per_token=8192).chunk_tokens == chunk, ctx


@pytest.mark.parametrize("extra", [[], ["--seqs-per-shard", "16"]])
def test_chunk_tokens_that_divide_a_full_shard_work_for_a_partial_window(base, tmp_path, extra):
    """`--chunk-tokens 256` on a window smaller than a shard, or with a partial last shard: the store is
    written and read whole, and saetrain trains on it (the last chunk is partial)."""
    from saetrain import TrainConfig, fit

    out = tmp_path / "win.zarr"
    i = base.index("--seqs-per-shard")
    main_ok(*base[:i], *base[i + 2 :], "--layers", "1,2", "--max-tokens", 4096, "--skip-tokens", 512,
            "--chunk-tokens", 256, *extra, "--out", out)
    s = ActivationStore(out)
    n = s.layout.num_sequences
    assert s.complete and s.num_tokens == n * 32 and n % 8 and s.layout.chunk_tokens == 256
    assert s.layout.seqs_per_shard == (16 if extra else -(-n // 8) * 8)
    assert len(s.read(1)) == len(s.tokens()) == n * 32 and verify_store(out) == []
    assert len(s.read_chunk(2, s.layout.num_chunks - 1)) == n * 32 % 256
    fit(TrainConfig(store=out, out=tmp_path / "run", layers="1", k=4, expansion_factor=2, batch_size=64,
                    device="cpu", progress=False, save_every=0, holdout=0.3))
    assert (tmp_path / "run" / "layer_1").is_dir()


# ------------------------------------------------------------- interrupted creation, leftovers, refusals
KILL_IN_CREATE = """
import os, signal, sys
import zarr.core.group as g
g.Group.create_array = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
from actcache.cli import main
main(sys.argv[1:])
"""


def test_store_killed_right_after_its_zarr_json_appears(capsys, base, tmp_path):
    """SIGKILL between writing the group's zarr.json and its arrays: a store nothing is committed in,
    which info/verify call incomplete and --resume / --overwrite collect afresh."""
    out = tmp_path / "s.zarr"
    r = subprocess.run([sys.executable, "-c", KILL_IN_CREATE, *map(str, base), "--layers", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [".writer.lock", "zarr.json"]
    incomplete = (f"error: store {out} is incomplete: its creation was interrupted, nothing is committed; collect it "
                  "with the same `actcache collect` command and --resume (or --overwrite)")
    assert cli(capsys, "info", out) == cli(capsys, "verify", out) == incomplete
    main_ok(*base, "--layers", "0", "--resume")
    assert "wrote 1,056 tokens" in capsys.readouterr().out and verify_store(out) == []
    # The same state, as an older actcache left it (a group without attributes), is replaced by --overwrite.
    shutil.rmtree(out)
    out.mkdir()
    (out / "zarr.json").write_text('{"attributes": {}, "zarr_format": 3, "node_type": "group"}')
    assert cli(capsys, "verify", out) == incomplete
    main_ok(*base, "--layers", "0", "--overwrite")
    assert ActivationStore(out).complete


def test_zarr_groups_that_are_not_stores_are_never_replaced(capsys, base, tmp_path):
    import zarr

    out = tmp_path / "s.zarr"
    zarr.open_group(str(out), mode="w", zarr_format=3).create_array("x", shape=(4,), dtype="int32")[:] = 7
    for flag in ("--overwrite", "--resume"):
        assert cli(capsys, *base, "--layers", "0", flag) == (
            f"error: {out} is not an actcache store (it holds x, zarr.json); choose another --out")
    assert zarr.open_array(str(out / "x"), mode="r")[:].tolist() == [7] * 4
    assert not (out / ".writer.lock").exists()


def test_a_refused_resume_leaves_nothing_behind(capsys, base, tmp_path, tiny_text_dir):
    text = tmp_path / "text"
    shutil.copytree(tiny_text_dir, text)
    files = sorted(p.name for p in text.iterdir())
    assert cli(capsys, *base, "--resume", "--out", text) == (
        f"error: {text} is not an actcache store (it holds {', '.join(files[:3])}, ... ({len(files)} entries)); "
        "choose another --out")
    assert sorted(p.name for p in text.iterdir()) == files
    # An empty folder (perhaps with a lock an older actcache left) is no store yet: both flags start one.
    for flag in ("--overwrite", "--resume"):
        empty = tmp_path / f"empty{flag}"
        empty.mkdir()
        (empty / ".writer.lock").touch()
        main_ok(*base, "--layers", "0", flag, "--out", empty)
        assert ActivationStore(empty).complete


def test_a_model_with_several_residual_streams_is_refused_for_layers(capsys, base, tmp_path, tiny_model_dir):
    """Gemma3n's blocks pass its AltUp streams stacked, (streams, batch, seq, d): no layer_L to store, said so."""
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    config = Gemma3nTextConfig(
        vocab_size=257, vocab_size_per_layer_input=257, hidden_size=16, hidden_size_per_layer_input=4,
        intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        laurel_rank=2, activation_sparsity_pattern=[0.0, 0.0], layer_types=["sliding_attention", "full_attention"],
        num_kv_shared_layers=0, sliding_window=16, altup_num_inputs=2)
    model = tmp_path / "gemma3n"
    Gemma3nForCausalLM(config).save_pretrained(model)
    for f in tiny_model_dir.glob("*token*"):
        shutil.copy(f, model)
    capsys.readouterr()  # save_pretrained's progress bar
    out = tmp_path / "g.zarr"
    assert cli(capsys, *base, "--model", model, "--layers", "1", "--out", out) == (
        "error: the residual stream of this model has shape (2, 2, 32, 16) for a batch of 2 x 32 tokens, not "
        "(batch, seq, d), so it has no one layer_L per block; store modules with one row per token instead "
        "(--hookpoints, e.g. the blocks' MLPs)")
    assert not out.exists()
    main_ok(*base, "--model", model, "--hookpoints", "model.layers.*.mlp", "--out", out)
    assert ActivationStore(out).layers == ["model.layers.0.mlp", "model.layers.1.mlp"]

