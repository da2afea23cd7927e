"""saetrain refusing what it cannot use (a damaged run, a damaged store, a bad environment), with every
file as it was."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from actcache import CollectConfig, collect
from sae_core import Sae, UserError
from sae_core.store import ActivationStore
from saetrain import fit
from saetrain.cli import main
from tests.test_fit import _tree, cfg, err


def test_a_damaged_run_is_a_one_line_error_and_stays_as_it_was(capsys, store_path, tmp_path):
    """A run folder damaged after the fact (a torn copy, a bad disk, a hand edit) is named, file by file,
    by --resume, --init-from and evaluate, and nothing in it is changed by the refusal."""
    good = tmp_path / "good"
    fit(cfg(store_path, good, layers="1", max_tokens=2 * 64, holdout=0.1))
    step = (good / "checkpoints" / "LATEST").read_text().strip()
    ckpt = f"checkpoints/{step}"

    def truncate(path):
        path.write_bytes(path.read_bytes()[:100])

    damages = {
        "checkpoints/LATEST": (lambda p: p.write_text("../..\n"), "it names '../..', not a step_N folder"),
        f"{ckpt}/state.json": (lambda p: p.unlink(), "No such file or directory"),
        f"{ckpt}/state.json ": (lambda p: p.write_text('{"step": 2}'), "it lacks one of step, epoch, epoch_tokens"),
        f"{ckpt}/layer_1/optimizer.safetensors": (truncate, "cannot be read ("),
        f"{ckpt}/layer_1/sae.safetensors": (truncate, "cannot be read ("),
        "config.json": (lambda p: p.write_text("{oops"), "cannot be read ("),
        "config.json ": (lambda p: p.write_text("[1, 2]"), "cannot be read (not a JSON object)"),
    }
    for name, (damage, why) in damages.items():
        run = tmp_path / "run"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(good, run)
        damage(run / name.strip())
        before = _tree(run)
        common = ["--store", store_path, "--layers", "1", "--max-tokens", 3 * 64, "--holdout", "0.1", "--k", 4,
                  "--expansion-factor", 4, "--batch-size", 64, "--lr-warmup-steps", 5, "--shuffle-window", 4]
        resume = err(capsys, *common, "--out", run, "--resume")
        init = err(capsys, *common, "--out", tmp_path / "next", "--init-from", run)
        assert why in resume and why in init, (name, resume, init)
        fix = "restore it from a copy, or train that run again (--overwrite)"
        assert resume.endswith(fix) and init.endswith(fix), (name, resume, init)
        assert _tree(run) == before and not (tmp_path / "next").exists()
        if name.startswith("config.json"):
            with pytest.raises(SystemExit):
                main(["evaluate", str(run)])
            text = capsys.readouterr().err.strip()
            assert text.startswith(f"error: {run / 'config.json'} cannot be read (") and len(text.splitlines()) == 1
    # No checkpoint published (a crash before the first, or LATEST deleted): --resume starts over, and says so.
    shutil.rmtree(run)
    shutil.copytree(good, run)
    (run / "checkpoints" / "LATEST").unlink()
    res = fit(cfg(store_path, run, layers="1", max_tokens=2 * 64, holdout=0.1, resume=True))
    assert res.steps == 2 and "has no checkpoint (LATEST names none): --resume trains it from the beginning" in (
        capsys.readouterr().err)
    fit(cfg(store_path, tmp_path / "fresh", layers="1", max_tokens=64, holdout=0.1, resume=True))
    assert f"note: {tmp_path / 'fresh'} does not exist yet: --resume trains it from the beginning" in (
        capsys.readouterr().err)
    truncate(good / "layer_1" / "sae.safetensors")  # the published SAE
    with pytest.raises(SystemExit):
        main(["evaluate", str(good)])
    assert capsys.readouterr().err.strip().startswith(f"error: {good / 'layer_1' / 'sae.safetensors'} cannot be read (")
    (tmp_path / "file").write_text("x")
    assert f"--out {tmp_path / 'file' / 'run'} is under {tmp_path / 'file'}, a file" in err(
        capsys, "--store", store_path, "--out", tmp_path / "file" / "run")


def test_bad_environment_and_seed_are_refused_before_anything_is_written(capsys, store_path, tmp_path, monkeypatch):
    out = tmp_path / "run"
    base = ["--store", store_path, "--out", out, "--layers", "1"]
    assert "--seed must be between -2**31 and 2**31 - 1, got 99999999999999999999" in err(
        capsys, *base, "--seed", "99999999999999999999")
    for value, message in [
        ("bogus", "SAE_CORE_KERNELS='bogus' is not a backend; set it to torch or triton, or unset it"),
        ("triton", "SAE_CORE_KERNELS=triton needs a CUDA device (this is cpu;"),
    ]:
        monkeypatch.setenv("SAE_CORE_KERNELS", value)
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert message in err(capsys, *base)
    monkeypatch.delenv("SAE_CORE_KERNELS")
    monkeypatch.setenv("WORLD_SIZE", "abc")
    assert "WORLD_SIZE='abc' is not a number; launch with torchrun" in err(capsys, *base)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert "WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT unset: launch with torchrun" in err(capsys, *base)
    assert not out.exists()


def test_a_damaged_store_is_refused_before_overwrite_deletes_the_run(capsys, store_path, tmp_path):
    run = tmp_path / "run"
    fit(cfg(store_path, run, layers="1", max_tokens=64))
    before = _tree(run)
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(store_path, damaged)
    manifest = json.loads((damaged / "manifest.json").read_text())
    rel = next(r for r in manifest["shards"]["3"]["files"] if "layer_1" in r)
    (damaged / rel).write_bytes((damaged / rel).read_bytes()[:-10])
    text = err(capsys, "--store", damaged, "--out", run, "--layers", "1", "--overwrite")
    assert text.startswith(f"error: store {damaged}: shard 3 is damaged ({rel} has ") and "actcache verify --repair" in text
    assert _tree(run) == before
    (damaged / "manifest.json").unlink()
    text = err(capsys, "--store", damaged, "--out", run, "--layers", "1", "--overwrite")
    assert text.startswith(f"error: store {damaged}: manifest.json is missing, so none of its ")
    assert _tree(run) == before



def test_out_of_memory_is_one_line_with_the_fix(capsys, store_path, tmp_path, monkeypatch):
    import saetrain.trainer as trainer

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB\nmore details")

    monkeypatch.setattr(trainer, "Sae", oom)
    assert err(capsys, "--store", store_path, "--out", tmp_path / "run") == (
        "error: out of memory (OutOfMemoryError: CUDA out of memory. Tried to allocate 64.00 GiB); raise "
        "--micro-acc-steps (it splits each batch; --resume continues a run with it), or start again with a smaller "
        "--batch-size or fewer or smaller SAEs per process (--layers, --expansion-factor, --distribute-layers)")
    assert not (tmp_path / "run").exists()


def test_a_run_with_a_damaged_config_can_be_overwritten(capsys, store_path, tmp_path):
    run = tmp_path / "run"
    fit(cfg(store_path, run, layers="1", max_tokens=64))
    (run / "config.json").write_text("{")
    assert "config.json cannot be read (JSONDecodeError" in err(capsys, "--store", store_path, "--out", run, "--resume")
    assert fit(cfg(store_path, run, layers="1", max_tokens=64, overwrite=True)).steps == 1
    (run / "config.json").write_text("{")
    (run / "notes.txt").write_text("mine")  # not only what a run holds: not taken for one
    assert f"--out {run} is not a saetrain run" in err(capsys, "--store", store_path, "--out", run, "--overwrite")


def test_a_diverging_run_stops_before_saving_it(store_path, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"^layer_1 diverged at step \d+ \(fvu (nan|inf)"):
        fit(cfg(store_path, run, layers="1", lr=1e30, grad_clip=0.0, lr_warmup_steps=1, save_every=1))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(np.isfinite(json.loads(ln)["fvu"]) for ln in lines)  # valid JSON, finite, up to the step before
    assert all(torch.isfinite(p).all() for p in Sae.load_from_disk(run / "layer_1").parameters()) if lines else True


def test_publishing_an_sae_swaps_the_folder_whole(tmp_path, monkeypatch):
    from sae_core import SaeConfig
    from saetrain import checkpoint as ckpt

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    assert ckpt.exchange(tmp_path / "a", tmp_path / "b")  # this file system swaps folders in one step
    assert (tmp_path / "b" / "x").read_text() == "a" and not any((tmp_path / "a").iterdir())
    for exchange in (ckpt.exchange, lambda a, b: False):  # and where it cannot: two renames
        monkeypatch.setattr(ckpt, "exchange", exchange)
        folder = tmp_path / exchange.__name__
        folder.mkdir()
        for sae in [Sae(8, SaeConfig(expansion_factor=2, k=2)) for _ in range(2)]:
            ckpt.publish_sae(folder / "layer_0", sae)
            assert torch.equal(Sae.load_from_disk(folder / "layer_0").W_dec, sae.W_dec)
            assert [p.name for p in folder.iterdir()] == ["layer_0"]  # no temporaries left


def test_resume_refuses_a_store_that_grew(store_path, tmp_path):
    partial = tmp_path / "partial.zarr"
    shutil.copytree(store_path, partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    full_text = (partial / "manifest.json").read_text()
    manifest["shards"].pop(max(manifest["shards"], key=int))
    (partial / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "run"
    fit(cfg(partial, out, max_tokens=64, holdout=0.2))
    (partial / "manifest.json").write_text(full_text)
    with pytest.raises(UserError, match=r"cannot resume .*: the store had [\d,]+ committed tokens when the run "
                                        r"started and has [\d,]+ now, which changes the data order"):
        fit(cfg(partial, out, resume=True, holdout=0.2))


def test_resume_refuses_the_same_data_chunked_otherwise(store_path, tmp_path, tiny_model_dir):
    """Same tokens, same order, other chunks: the chunk numbers held out would be other tokens."""
    store = ActivationStore(store_path)
    rechunked = tmp_path / "rechunked.zarr"
    collect(CollectConfig(out=rechunked, model=str(tiny_model_dir), dataset=store.meta["data"]["dataset"], ctx_len=32,
                          batch_size=4, seqs_per_shard=4, chunk_tokens=64, dtype="float32", device="cpu", progress=False))
    assert ActivationStore(rechunked).meta["data"]["fingerprint"] == store.meta["data"]["fingerprint"]
    out = tmp_path / "run"
    fit(cfg(store_path, out, layers="1", max_tokens=64, holdout=0.1))
    with pytest.raises(UserError, match=r"cannot resume .*: its store had chunks of 32 tokens and this one has 64"):
        fit(cfg(rechunked, out, layers="1", resume=True, holdout=0.1))
