"""saetrain on a tiny store: the loader's order, training, evaluation and bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from actcache import CollectConfig, collect
from sae_core import Sae, UserError
from sae_core.store import ActivationStore
from saetrain import TrainConfig, fit
from saetrain.cli import main
from saetrain.loader import StoreLoader


def cfg(store, out, **kw):
    base = dict(store=store, out=out, layers="1,2", k=4, expansion_factor=4, batch_size=64, lr_warmup_steps=5,
                device="cpu", progress=False, save_every=0, shuffle_window=4)
    return TrainConfig(**{**base, **kw})


def test_every_kept_token_once_per_epoch(store_path):
    store = ActivationStore(store_path)
    chunks = store.committed_chunks()[3:]
    loader = StoreLoader(store, ["layer_1"], chunks, seed=5, window=3, exclude_first_tokens=2, exclude_token_ids=[256])
    tokens = store.tokens().numpy()
    expected = [t for c in chunks for t in store.layout.chunk_tokens_range(c)
                if t % 32 >= 2 and tokens[t] != 256]
    orders = []
    for epoch in range(2):
        seen = torch.cat([b.token_index for b in loader.batches(epoch, 50)]).tolist()
        assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen))
        orders.append(seen)
    assert orders[0] != orders[1]
    assert any(abs(a - b) > 32 * 8 for a, b in zip(orders[0], orders[0][1:], strict=False))  # mixed across chunks


def test_loader_batches_hold_the_stored_rows_and_resume_exactly(store_path):
    store = ActivationStore(store_path)
    loader = StoreLoader(store, ["layer_1", "layer_2"], store.committed_chunks(), seed=1, window=4)
    full = list(loader.batches(0, 48))
    for b in full[:3]:
        for name in ("layer_1", "layer_2"):
            rows = torch.stack([store.read(name, int(i), int(i) + 1)[0] for i in b.token_index])
            assert torch.equal(b.acts[name], rows)
    # Resuming at a token offset continues with exactly the same batches.
    resumed = list(loader.batches(0, 48, start=48 * 5))
    assert len(resumed) == len(full) - 5
    for a, b in zip(full[5:], resumed, strict=True):
        assert torch.equal(a.token_index, b.token_index) and torch.equal(a.acts["layer_2"], b.acts["layer_2"])


def test_training_lowers_fvu_and_saved_saes_reproduce_it(store_path, tmp_path):
    res = fit(cfg(store_path, tmp_path / "run", epochs=3, holdout=0.1))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {ln["layer"] for ln in lines} == {"layer_1", "layer_2"}
    for layer in ("layer_1", "layer_2"):
        fvus = [ln["fvu"] for ln in lines if ln["layer"] == layer]
        # A random 4x SAE with k=4 of 64 latents explains little; training must bring FVU well down.
        assert np.mean(fvus[-5:]) < 0.5 * np.mean(fvus[:3]), (layer, fvus[:3], fvus[-5:])
        assert res.heldout_fvu[layer] < 0.5
    saes = Sae.load_many(tmp_path / "run", local=True)
    assert list(saes) == ["layer_1", "layer_2"]
    assert saes["layer_1"].cfg.k == 4 and saes["layer_1"].num_latents == 64
    from saetrain.evaluate import heldout_fvu

    config = json.loads((tmp_path / "run" / "config.json").read_text())
    again = heldout_fvu(saes, ActivationStore(store_path), config["holdout_chunks"])
    for layer, v in res.heldout_fvu.items():
        assert again[layer] == pytest.approx(v, rel=1e-6)
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["heldout_fvu"] == res.heldout_fvu
    assert config["holdout_chunks"] and config["lr_per_layer"]["layer_1"] == pytest.approx(2e-4 / (64 / 2**14) ** 0.5)


def test_auxk_is_active_only_with_dead_latents(store_path, tmp_path):
    # A small threshold makes latents count as dead quickly; AuxK then contributes to the loss.
    # (That AuxK keeps the dead fraction low is checked on real SmolLM2 activations in test_fit_smollm2.)
    dead = {}
    for alpha in (0.0, 1 / 32):
        out = tmp_path / f"a{alpha}"
        fit(cfg(store_path, out, layers="2", epochs=3, dead_feature_threshold=256, expansion_factor=8, auxk_alpha=alpha))
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert any(ln["auxk_loss"] > 0 for ln in lines) == (alpha > 0)
        dead[alpha] = [ln["dead_fraction"] for ln in lines]
        assert dead[alpha][0] == 0.0 and 0 < max(dead[alpha]) <= 1
    fit(cfg(store_path, tmp_path / "none", layers="2", epochs=1))  # default threshold: 10M tokens
    lines = [json.loads(x) for x in (tmp_path / "none" / "metrics.jsonl").read_text().splitlines()]
    assert all(ln["dead_fraction"] == 0 and ln["auxk_loss"] == 0 for ln in lines)


def test_nan_activations_are_refused(tmp_path, tiny_model_dir, tiny_text_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nanmodel")
    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path / "nanmodel")
    shutil.copy(tiny_model_dir / "tokenizer_config.json", tmp_path / "nanmodel")
    out = tmp_path / "nan.zarr"
    collect(CollectConfig(out=out, model=str(tmp_path / "nanmodel"), dataset=str(tiny_text_dir), ctx_len=32,
                          layers="1,2", dtype="float32", device="cpu", progress=False))
    with pytest.raises(UserError) as e:  # located, to choose what to exclude
        fit(cfg(out, tmp_path / "r"))
    m = re.search(r"layer_2 has NaN or inf activations \(\d+ tokens in this window, first at token (\d+): sequence "
                  r"(\d+), position (\d+), token id (\d+)\); exclude them", str(e.value))
    assert m, str(e.value)
    store = ActivationStore(out)
    token, seq, pos, token_id = map(int, m.groups())
    assert (seq, pos, token_id) == (token // 32, token % 32, int(store.tokens(token, token + 1)[0]))
    fit(cfg(out, tmp_path / "r1", layers="1"))  # layer 1 is clean
    with pytest.raises(UserError, match=r"layer_2 has NaN or inf activations .* first at token \d+: sequence \d+"):
        next(StoreLoader(store, ["layer_2"], store.committed_chunks(), seed=0).batches(0, 16))


def err(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(["fit", *map(str, argv), "--device", "cpu", "--no-progress"])
    text = capsys.readouterr().err.strip()
    assert e.value.code == 2 and text.startswith("error: ") and len(text.splitlines()) == 1, text
    return text


def test_repeated_exclude_token_ids_add_up(store_path, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["fit", "--store", str(store_path), "--out", str(out), "--layers", "1", "--max-tokens", "64", "--device",
              "cpu", "--no-progress", "--exclude-token-ids", "5", "9", "--exclude-token-ids", "7,5"])
    assert e.value.code == 0
    assert json.loads((out / "config.json").read_text())["exclude_token_ids"] == [5, 7, 9]
    with pytest.raises(SystemExit) as e:  # the same set in another order is the same setting
        main(["fit", "--store", str(store_path), "--out", str(out), "--layers", "1", "--max-tokens", "128", "--device",
              "cpu", "--no-progress", "--exclude-token-ids", "9,7,5", "--resume"])
    assert e.value.code == 0


def test_bad_inputs(capsys, store_path, tmp_path):
    out = tmp_path / "run"
    assert "does not exist" in err(capsys, "--store", tmp_path / "none.zarr", "--out", out)
    assert "has no layer 7; it has layers [0, 1, 2, 3]" in err(capsys, "--store", store_path, "--out", out, "--layers", "7")
    assert "--k 300 is larger than the number of latents of layer_0 (64)" in err(
        capsys, "--store", store_path, "--out", out, "--k", 300, "--expansion-factor", 4)
    assert "--batch-size must be at least 1, got 0" in err(capsys, "--store", store_path, "--out", out, "--batch-size", 0)
    assert "--exclude-token-ids must be comma-separated integers" in err(
        capsys, "--store", store_path, "--out", out, "--exclude-token-ids", "a,b")
    # A store with nothing committed.
    empty = tmp_path / "empty.zarr"
    shutil.copytree(store_path, empty)
    (empty / "manifest.json").write_text('{"shards": {}}')
    assert "has no committed tokens" in err(capsys, "--store", empty, "--out", out)
    # An existing run needs --resume or --overwrite; a folder that is no run is refused outright.
    out.mkdir()
    (out / "x").write_text("x")
    assert f"--out {out} is not a saetrain run (it holds x)" in err(capsys, "--store", store_path, "--out", out)
    (out / "config.json").write_text(json.dumps({k: [] for k in ("store_fingerprint", "layers", "num_latents_per_layer",
                                                                 "holdout_chunks")}))
    assert f"{out} already exists; pass --resume" in err(capsys, "--store", store_path, "--out", out)


def test_data_parallel_with_fewer_chunks_than_ranks_is_refused(store_path, tmp_path, monkeypatch):
    """A rank without a chunk would make every rank train 0 tokens (the epoch is the ranks' minimum):
    refused on every rank alike, before anything is written."""
    import saetrain.trainer as trainer

    chunks = len(ActivationStore(store_path).committed_chunks())
    monkeypatch.setattr(trainer, "init_distributed", lambda: (0, chunks + 1))
    monkeypatch.setattr(trainer, "rank_device", lambda device, rank, world: torch.device("cpu"))
    out = tmp_path / "run"
    with pytest.raises(UserError, match=rf"has {chunks} training chunk\(s\) for {chunks + 1} data-parallel ranks, "
                                        r"and each rank needs one; use --distribute-layers or fewer processes"):
        fit(cfg(store_path, out, batch_size=chunks + 1))
    assert not out.exists()


def _metrics(run, layer="layer_1"):
    return [ln for ln in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if ln["layer"] == layer]


def test_grad_acc_steps_make_whole_optimizer_steps(store_path, tmp_path):
    """--max-tokens rounds up to whole steps of --batch-size tokens, accumulated or not (a step of 2 x 32
    closed after its first 32 tokens once they reached --max-tokens)."""
    for acc in (1, 2, 4):
        res = fit(cfg(store_path, tmp_path / f"acc{acc}", layers="1", max_tokens=80, grad_acc_steps=acc))
        assert (res.steps, res.tokens) == (2, 128), acc
        assert [ln["tokens"] for ln in _metrics(res.out)] == [64, 128]


def test_init_from_continues_a_run_on_the_next_store(store_path, tmp_path):
    """--init-from: weights, Adam state, dead counters, step and token count carry over; no second warmup."""
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    fit(cfg(store_path, a, epochs=2, holdout=0.1))
    first = fit(cfg(store_path, b, init_from=a, max_tokens=3 * 64, holdout=0.1))
    la, lb = _metrics(a), _metrics(b)
    assert [ln["step"] for ln in lb] == [la[-1]["step"] + i for i in (1, 2, 3)]
    assert [ln["tokens"] for ln in lb] == [la[-1]["tokens"] + 64 * i for i in (1, 2, 3)]
    lr = json.loads((a / "config.json").read_text())["lr_per_layer"]["layer_1"]
    assert all(ln["lr"] == pytest.approx(lr) for ln in lb)  # past warmup: the full rate at once
    assert lb[0]["fvu"] < 0.6 * la[0]["fvu"]  # starts where the first run ended, not from scratch
    opt = load_file(str(b / "checkpoints" / f"step_{lb[-1]['step']}" / "layer_1" / "optimizer.safetensors"))
    assert int(opt["encoder.weight.step"]) == la[-1]["step"] + 3
    assert json.loads((b / "config.json").read_text())["init_from"] == {
        "run": str(a), "step": la[-1]["step"], "tokens": la[-1]["tokens"]}
    # Resuming the continued run needs only its own checkpoint: the first run may be gone.
    shutil.rmtree(a)
    res = fit(cfg(store_path, b, init_from=a, max_tokens=5 * 64, holdout=0.1, resume=True))
    assert res.steps == first.steps + 2 and [ln["step"] for ln in _metrics(b)][-1] == la[-1]["step"] + 5


def test_init_from_refuses_a_run_that_does_not_fit(store_path, tmp_path):
    a = tmp_path / "a"
    fit(cfg(store_path, a, layers="1", max_tokens=64))
    for kw, message in [
        (dict(init_from=tmp_path / "none"), r"--init-from .*none: not a saetrain run with a checkpoint"),
        (dict(init_from=a, layers="1,2"), r"--init-from .*a has no SAE for layer_2 \(it trained layer_1\); pass --layers"),
        (dict(init_from=a, layers="1", expansion_factor=8),
         r"layer_1 has num_latents_per_layer 64 there and 128 here; use the same --num-latents"),
        (dict(init_from=a, layers="1", out=a, resume=True), r"--init-from .*a is the run folder itself; pass --resume"),
    ]:
        with pytest.raises(UserError, match=message):
            fit(cfg(store_path, kw.pop("out", tmp_path / "b"), **kw))


def test_micro_batches_and_accumulated_batches_add_up_to_the_step(store_path, tmp_path):
    """--micro-acc-steps and --grad-acc-steps only save memory: the same step (its losses over the
    variance of all its tokens), down to one-token micro-batches and one-token accumulated batches.
    (The runs start from one run's SAE, since a fresh one takes b_dec from its first batch.)"""
    first = tmp_path / "first"
    fit(cfg(store_path, first, layers="1", max_tokens=64, auxk_alpha=0.0))
    runs = {}
    for micro, acc in ((1, 1), (4, 1), (64, 1), (1, 4), (2, 8), (1, 64)):
        out = tmp_path / f"m{micro}a{acc}"
        fit(cfg(store_path, out, layers="1", max_tokens=3 * 64, micro_acc_steps=micro, grad_acc_steps=acc,
                auxk_alpha=0.0, init_from=first))
        runs[micro, acc] = (Sae.load_from_disk(out / "layer_1"), [ln["fvu"] for ln in _metrics(out)])
    ref, ref_fvu = runs.pop((1, 1))
    for sae, fvu in runs.values():
        assert fvu == pytest.approx(ref_fvu, rel=1e-5)
        for (name, p), q in zip(ref.named_parameters(), sae.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)


def test_a_short_tail_joins_the_step_before_it(store_path):
    store = ActivationStore(store_path)
    loader = StoreLoader(store, ["layer_1"], store.committed_chunks(), seed=0, window=4)
    total = loader.epoch_tokens(0)
    for size in (total - 1, total // 3, 100, 2 * (total // 5) + 1):
        sizes = [len(b.token_index) for b in loader.batches(0, size)]
        tail = total % size
        merged = tail < size // 2  # the loader's rule: a tail under half a batch joins the last batch
        expected = [size] * (total // size - 1) + [size + tail] if merged else [size] * (total // size) + [tail]
        assert sizes == [s for s in expected if s], (size, sizes)
        assert sum(sizes) == total and min(sizes) >= size // 2
    # With gradient accumulation the rule is the optimizer step's: a tail under half a step joins
    # the step before it, spread over its batches (a 64-token last step of 1024 was possible).
    for size, group in ((100, 3), (37, 4), (total // 7, 2), (total // 9, 4)):
        sizes = [len(b.token_index) for b in loader.batches(0, size, group=group)]
        steps = [sum(sizes[i : i + group]) for i in range(0, len(sizes), group)]
        step, tail = size * group, total % (size * group)
        assert total // step >= 1
        expected = [step] * (total // step - 1) + ([step + tail] if tail < step // 2 else [step, tail])
        assert steps == [s for s in expected if s], (size, group, steps)
        assert sizes[: -group] == [size] * (len(sizes) - group)
        assert max(sizes[-group:]) - min(sizes[-group:]) <= 1  # the last step's batches share its tokens


def test_a_stopped_consumer_leaves_no_reader_running(store_path):
    """Stopping early (--max-tokens) joins the read-ahead threads: one still inside zarr or numpy at
    exit aborted the interpreter after a finished run (exit 134, 'terminate called ...')."""
    import threading

    store = ActivationStore(store_path)
    loader = StoreLoader(store, ["layer_1", "layer_2"], store.committed_chunks(), seed=0, window=1, prefetch=1)
    batches = loader.batches(0, 16)
    next(batches)
    batches.close()
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("saetrain-loader", "saetrain-read"))]


@pytest.mark.parametrize(
    "change, key",
    [(dict(expansion_factor=8), "num_latents_per_layer"), (dict(num_latents=48), "num_latents_per_layer"),
     (dict(grad_clip=0.01), "grad_clip"), (dict(lr=1e-3), "lr")],
)
def test_resume_refuses_settings_that_change_the_trajectory(store_path, tmp_path, change, key):
    out = tmp_path / "run"
    fit(cfg(store_path, out, layers="1", max_tokens=3 * 64, save_every=2))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=rf"^cannot resume {re.escape(str(out))}: {key} differs \(run: "):
        fit(cfg(store_path, out, layers="1", max_tokens=6 * 64, save_every=2, resume=True, **change))
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # Splitting the batch differently does not change a step: accepted.
    fit(cfg(store_path, out, layers="1", max_tokens=6 * 64, save_every=2, resume=True, micro_acc_steps=4))


def test_exclusions_that_remove_every_bad_token_are_accepted(tmp_path, tiny_model_dir, tiny_text_dir):
    """An inf embedding row makes that token's layer-0 rows inf: refused, unless the token is excluded."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import byte_tokenizer

    bad_id = byte_tokenizer().convert_tokens_to_ids("e")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight[bad_id] = float("inf")
    model.save_pretrained(tmp_path / "infmodel")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / f, tmp_path / "infmodel")
    store = tmp_path / "inf.zarr"
    collect(CollectConfig(out=store, model=str(tmp_path / "infmodel"), dataset=str(tiny_text_dir), ctx_len=32,
                          layers="0", dtype="float32", device="cpu", progress=False, chunk_tokens=32))
    with pytest.raises(UserError, match=rf"layer_0 has NaN or inf activations .* position \d+, token id {bad_id}\)"):
        fit(cfg(store, tmp_path / "r0", layers="0"))
    with pytest.raises(UserError, match=r"layer_0 has NaN or inf activations .* first at token \d+"):
        fit(cfg(store, tmp_path / "r1", layers="0", exclude_token_ids=[bad_id + 1]))
    assert not (tmp_path / "r1").exists()  # refused before anything was written
    res = fit(cfg(store, tmp_path / "r2", layers="0", exclude_token_ids=[bad_id], holdout=0.1))
    assert np.isfinite(res.heldout_fvu["layer_0"])


def test_more_bad_inputs(capsys, store_path, tmp_path):
    out = tmp_path / "run"
    base = ["--store", store_path, "--out", out]
    for args, message in [
        (["--lr", -1], "--lr must be positive, got -1.0"),
        (["--read-threads", 0], "--read-threads must be at least 1, got 0"),
        (["--exclude-first-tokens", -3], "--exclude-first-tokens must be >= 0, got -3"),
        (["--auxk-alpha", -1], "--auxk-alpha must be >= 0, got -1.0"),
        (["--expansion-factor", 0], "--expansion-factor must be at least 1, got 0"),
        (["--exclude-token-ids", "5,-1"], "--exclude-token-ids takes token ids (0 to 2**31 - 1), got -1"),
        (["--exclude-first-tokens", 32], "--exclude-first-tokens 32 drops every token: the store's sequences have 32"),
        (["--layers", "layer_*9"], "--layers 'layer_*9' matches none of the layers of"),
        *([(["--wandb", "proj"], "--wandb needs the wandb package: pip install wandb")]
          if importlib.util.find_spec("wandb") is None else []),
    ]:
        assert message in err(capsys, *base, *args)
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    assert "is a file; pass a folder for the run" in err(capsys, "--store", store_path, "--out", tmp_path / "file")


def test_layers_by_name_and_pattern(store_path, tmp_path):
    store = ActivationStore(store_path)
    from saetrain.settings import select_layers

    assert select_layers(store, "layer_2,1") == ["layer_1", "layer_2"]
    assert select_layers(store, "layer_[02]") == ["layer_0", "layer_2"]
    assert select_layers(store, "0-3:2") == ["layer_0", "layer_2"]
    assert select_layers(store, "1 2") == ["layer_1", "layer_2"]  # never layer 12
    with pytest.raises(UserError, match=r"^--layers 'layer_9': .* has no such array; it has layer_0, layer_1"):
        select_layers(store, "layer_9")
    assert select_layers(store, "all") == store.layers
    assert select_layers(store, "all:2,3") == ["layer_0", "layer_2", "layer_3"]  # items combine, "all" ones too
    assert select_layers(store, "1,all") == select_layers(store, "*") == store.layers
    with pytest.raises(UserError, match=r"the step after 'all:' must be a whole number >= 1"):
        select_layers(store, "all:0,1")


def test_evaluate_cli(capsys, store_path, tmp_path, tiny_model_dir, tiny_text_dir, monkeypatch):
    out = tmp_path / "run"
    res = fit(cfg(store_path, out, layers="1,2", max_tokens=3 * 64, holdout=0.1))
    monkeypatch.chdir(tmp_path)  # the run records its store's absolute path
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(out), "--json"])
    assert e.value.code == 0 and json.loads(capsys.readouterr().out) == pytest.approx(res.heldout_fvu)
    with pytest.raises(SystemExit) as e:  # one layer, on the device asked for
        main(["evaluate", str(out), "--json", "--layers", "2", "--device", "cpu"])
    assert e.value.code == 0 and json.loads(capsys.readouterr().out) == pytest.approx({"layer_2": res.heldout_fvu["layer_2"]})
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(out), "--layers", "3"])
    assert capsys.readouterr().err.strip() == (
        f"error: {out} has no SAE for layer_3; it has layer_1, layer_2: pick --layers among them")
    other = tmp_path / "other.zarr"  # the same model and text, another order: its chunk numbers mean other tokens
    collect(CollectConfig(out=other, model=str(tiny_model_dir), dataset=str(tiny_text_dir), ctx_len=32, seed=7,
                          layers="1", dtype="float32", device="cpu", progress=False))
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(out), "--store", str(other)])
    text = capsys.readouterr().err.strip()
    assert e.value.code == 2 and f"error: {other} is not the store {out} was trained on" in text
    run_cfg = json.loads((out / "config.json").read_text())  # the store moved since: say --store, not collect
    (out / "config.json").write_text(json.dumps({**run_cfg, "store": str(tmp_path / "gone.zarr")}))
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(out)])
    assert e.value.code == 2 and capsys.readouterr().err.strip() == (
        f"error: the store {out} was trained on, {tmp_path / 'gone.zarr'}, does not exist (moved?); pass its new "
        "path or a copy of it with --store PATH")
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(out), "--json", "--store", str(store_path)])
    assert e.value.code == 0 and json.loads(capsys.readouterr().out) == pytest.approx(res.heldout_fvu)


def _tree(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_overwrite_replaces_only_a_saetrain_run(capsys, store_path, tmp_path, monkeypatch):
    """--overwrite deletes nothing that `saetrain fit` did not write, and never the store."""
    base = ["--layers", "1", "--max-tokens", 64]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("x")
    for flags in ([], ["--overwrite"]):  # no advice to pass --overwrite, which would be refused too
        assert err(capsys, "--store", store_path, "--out", precious, *flags, *base) == (
            f"error: --out {precious} is not a saetrain run (it holds thesis.txt); choose another --out")
    assert (precious / "thesis.txt").read_text() == "x"
    for i in range(4):
        (precious / f"f{i}").write_text("x")
    assert f"--out {precious} is not a saetrain run (it holds f0, f1, f2, ... (5 entries)); choose another --out" in err(
        capsys, "--store", store_path, "--out", precious, "--resume", *base)  # nor written into with --resume
    assert sorted(p.name for p in precious.iterdir()) == ["f0", "f1", "f2", "f3", "thesis.txt"]

    # The store itself, a folder holding it, a folder inside it: refused even without --overwrite.
    store_copy = tmp_path / "data" / "s.zarr"
    shutil.copytree(store_path, store_copy)
    before = _tree(tmp_path / "data")
    for out, how in [(store_copy, "is"), (tmp_path / "data", "contains"), (store_copy / "runs", "is inside")]:
        for extra in ([], ["--overwrite"]):
            assert err(capsys, "--store", store_copy, "--out", out, *extra, *base) == (
                f"error: --out {out} {how} the store {store_copy}; choose an --out outside the store (e.g. runs/NAME)")
    monkeypatch.chdir(tmp_path / "data")  # relative paths and "." alike
    assert "error: --out . contains the store s.zarr" in err(capsys, "--store", "s.zarr", "--out", ".", "--overwrite", *base)
    assert _tree(tmp_path / "data") == before

    # A run is replaced; so is an empty folder.
    run = tmp_path / "run"
    fit(cfg(store_path, run, layers="1", max_tokens=64))
    (run / "notes.txt").write_text("a run's folder is the run's")
    fit(cfg(store_path, run, layers="2", max_tokens=64, overwrite=True))
    assert not (run / "notes.txt").exists() and json.loads((run / "config.json").read_text())["layers"] == ["layer_2"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # the old run is gone
    (tmp_path / "empty").mkdir()
    fit(cfg(store_path, tmp_path / "empty", layers="1", max_tokens=64, overwrite=True))
    # A run refused on its settings is left as it was.
    before = _tree(run)
    capsys.readouterr()
    assert "--lr must be a finite number, got inf" in err(capsys, "--store", store_path, "--out", run, "--overwrite",
                                                          "--lr", "inf", *base)
    assert _tree(run) == before
    # One stopped by its data before its first checkpoint (a chunk whose bytes changed, its size kept) is put back.
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(store_path, damaged)
    shard = next(p for p in sorted((damaged / "layers" / "layer_2" / "c").rglob("*")) if p.is_file())
    shard.write_bytes(np.random.default_rng(0).bytes(shard.stat().st_size))
    assert "a chunk is corrupt or missing" in err(capsys, "--store", damaged, "--out", run, "--overwrite",
                                                  "--layers", "2")
    assert _tree(run) == before and not (tmp_path / ".run.replaced").exists()
    # An --overwrite killed before its first checkpoint left the run aside and its own beginning in place
    # (as `_prepare_out` leaves them): the next --overwrite keeps the run aside, not that beginning.
    os.replace(run, tmp_path / ".run.replaced")
    run.mkdir()
    shutil.copy(tmp_path / ".run.replaced" / "config.json", run / "config.json")
    with pytest.raises(SystemExit):
        main(["fit", "--store", str(damaged), "--out", str(run), "--overwrite", "--layers", "2", "--no-progress"])
    note, error = capsys.readouterr().err.strip().splitlines()
    assert note == (f"note: {tmp_path / '.run.replaced'} holds the run an earlier --overwrite was replacing; it is "
                    "kept until this run's first checkpoint") and "a chunk is corrupt or missing" in error
    assert _tree(run) == before and not (tmp_path / ".run.replaced").exists()
    fit(cfg(store_path, run, layers="1", max_tokens=64, overwrite=True))  # a checkpoint: the old run is gone
    assert not (tmp_path / ".run.replaced").exists() and _tree(run) != before
    monkeypatch.chdir(run)
    assert err(capsys, "--store", store_path, "--out", ".", "--overwrite", *base) == (
        "error: --out . holds the current folder, which --overwrite would replace under this process; run from "
        "outside it")


def test_an_empty_layer_selection_is_refused(capsys, store_path, tmp_path):
    out = tmp_path / "run"
    assert err(capsys, "--store", store_path, "--out", out, "--layers", "") == (
        "error: --layers is empty; pass a value, or leave the option out")
    for spec in (",", " , "):
        assert err(capsys, "--store", store_path, "--out", out, "--layers", spec) == (
            f"error: --layers: malformed layer spec {spec!r} (it names no layer); use e.g. '0-31', '0,4,8', "
            "'0-29:2', 'all' or names of the store's arrays (layer_0, layer_1, layer_2, layer_3)")
    assert not out.exists()


def test_holdout_of_every_chunk_names_fixes_that_work(capsys, tmp_path, tiny_model_dir, tiny_text_dir):
    one = tmp_path / "t1.zarr"
    collect(CollectConfig(out=one, model=str(tiny_model_dir), dataset=str(tiny_text_dir), ctx_len=32, layers="1",
                          max_tokens=64, seqs_per_shard=2, chunk_tokens=64, dtype="float32", device="cpu",
                          progress=False))
    assert len(ActivationStore(one).committed_chunks()) == 1
    out = tmp_path / "r"
    assert err(capsys, "--store", one, "--out", out, "--holdout", 0.0001) == (
        f"error: store {one} has 1 committed chunk and --holdout 0.0001 holds it out (any fraction above 0 holds out "
        "at least one whole chunk), leaving none to train on; pass --holdout 0 (no held-out evaluation), or collect "
        "more tokens or smaller chunks (actcache collect --max-tokens / --chunk-tokens)")
    assert not out.exists()
    fit(cfg(one, out, layers="1", holdout=0.0, batch_size=16, max_tokens=16))  # the fix it names works

    two = tmp_path / "t2.zarr"
    collect(CollectConfig(out=two, model=str(tiny_model_dir), dataset=str(tiny_text_dir), ctx_len=32, layers="1",
                          max_tokens=128, seqs_per_shard=2, chunk_tokens=64, dtype="float32", device="cpu",
                          progress=False))
    assert len(ActivationStore(two).committed_chunks()) == 2
    assert err(capsys, "--store", two, "--out", tmp_path / "r1", "--holdout", 0.8) == (
        f"error: store {two} has 2 committed chunks and --holdout 0.8 holds out all of them (it rounds to whole "
        "chunks), leaving none to train on; pass a --holdout below 0.75, --holdout 0 (no held-out evaluation), or "
        "collect more tokens or smaller chunks (actcache collect --max-tokens / --chunk-tokens)")
    fit(cfg(two, tmp_path / "r2", layers="1", holdout=0.7499, batch_size=16, max_tokens=16))


def test_non_finite_settings_and_sub_token_micro_batches_are_refused(capsys, store_path, tmp_path):
    out = tmp_path / "run"
    base = ["--store", store_path, "--out", out]
    for name in ("--lr", "--auxk-alpha", "--grad-clip", "--holdout"):
        for value in ("inf", "nan", "-inf"):
            assert err(capsys, *base, name, value) == f"error: {name} must be a finite number, got {float(value)}"
    assert err(capsys, *base, "--micro-acc-steps", 1000, "--batch-size", 256) == (
        "error: --micro-acc-steps 1000 splits batches of 256 token(s) (--batch-size 256 / (--grad-acc-steps 1 x "
        "data-parallel ranks 1)) into micro-batches of less than 1 token; use at most 256 or raise --batch-size")
    assert "--micro-acc-steps 33 splits batches of 32 token(s) (--batch-size 64 / (--grad-acc-steps 2 x" in err(
        capsys, *base, "--micro-acc-steps", 33, "--batch-size", 64, "--grad-acc-steps", 2)
    assert not out.exists()


def test_sub_token_micro_batches_are_refused_per_data_parallel_rank(store_path, tmp_path, monkeypatch):
    import saetrain.trainer as trainer

    monkeypatch.setattr(trainer, "init_distributed", lambda: (0, 4))
    monkeypatch.setattr(trainer, "rank_device", lambda device, rank, world: torch.device("cpu"))
    with pytest.raises(UserError, match=r"^--micro-acc-steps 17 splits batches of 16 token\(s\) \(--batch-size 64 / "
                                        r"\(--grad-acc-steps 1 x data-parallel ranks 4\)\)"):
        fit(cfg(store_path, tmp_path / "run", micro_acc_steps=17))
    assert not (tmp_path / "run").exists()


def test_nothing_is_written_when_the_device_cannot_hold_the_saes(store_path, tmp_path, monkeypatch):
    """Every check, down to making the SAEs and optimizers on the device, comes before the run folder."""
    import saetrain.trainer as trainer

    def broken(*a, **k):
        raise UserError("device cpu cannot hold the SAEs")

    monkeypatch.setattr(trainer.torch.optim, "Adam", broken)
    with pytest.raises(UserError, match="cannot hold the SAEs"):
        fit(cfg(store_path, tmp_path / "new", layers="1", max_tokens=64))
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    run = tmp_path / "run"
    fit(cfg(store_path, run, layers="1", max_tokens=64))
    before = _tree(run)
    monkeypatch.setattr(trainer.torch.optim, "Adam", broken)
    with pytest.raises(UserError, match="cannot hold the SAEs"):
        fit(cfg(store_path, run, layers="1", max_tokens=64, overwrite=True))
    assert _tree(run) == before


def test_ctrl_c_names_the_last_checkpoint(store_path, tmp_path, monkeypatch, capsys):
    """An interrupt after a checkpoint: the error names its step and the way on (--resume), and
    --resume then finishes the run."""
    from saetrain import checkpoint as ckpt

    real_publish, published = ckpt.publish, []

    def publish_then_interrupt(root, step):
        real_publish(root, step)
        published.append(step)
        if len(published) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "publish", publish_then_interrupt)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        fit(cfg(store_path, out, layers="1", max_tokens=64 * 6, save_every=2))
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted: the last checkpoint is step 4 in {out}; run the same `saetrain fit` command with --resume "
        "to continue from it")
    monkeypatch.setattr(ckpt, "publish", real_publish)
    assert fit(cfg(store_path, out, layers="1", max_tokens=64 * 6, save_every=2, resume=True)).steps == 6


def test_a_holdout_rounded_up_to_a_whole_chunk_is_noted(store_path, tmp_path, capsys):
    chunks = len(ActivationStore(store_path).committed_chunks())
    fit(cfg(store_path, tmp_path / "run", layers="1", max_tokens=64, holdout=0.001))
    assert (f"note: --holdout 0.001 holds out 1 of {chunks} chunks (whole chunks, at least one): {1 / chunks:.0%} of "
            "the tokens") in capsys.readouterr().err
