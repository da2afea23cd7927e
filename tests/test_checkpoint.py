"""EleutherAI's checkpoint layout: a folder with `cfg.json` and `sae.safetensors`."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sae_core import Sae, SaeConfig, UserError

PUBLISHED_CFG = {
    "expansion_factor": 32,
    "normalize_decoder": True,
    "k": 192,
    "signed": False,
    "d_in": 8,
}
D_IN = 8
NUM_LATENTS = 256  # 8 * 32
EXPECTED_SHAPES = {
    "encoder.weight": (NUM_LATENTS, D_IN),
    "encoder.bias": (NUM_LATENTS,),
    "W_dec": (NUM_LATENTS, D_IN),
    "b_dec": (D_IN,),
}


def published_tensors(dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(*shape, generator=g).to(dtype) for name, shape in EXPECTED_SHAPES.items()
    }


def write_folder(path: Path, cfg: dict | str | None = None, tensors: dict | None = None) -> Path:
    """A folder written by hand, the way a Hub download looks."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = PUBLISHED_CFG if cfg is None else cfg
    (path / "cfg.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    save_file(published_tensors() if tensors is None else tensors, str(path / "sae.safetensors"))
    return path


def trained_like(sae: Sae, seed=0) -> Sae:
    """Give every parameter a distinct random value, so a round trip cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(p.dtype))
    return sae


# -------------------------------------------------------------------------------------- save
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_layout_and_round_trip(tmp_path, dtype):
    sae = trained_like(Sae(D_IN, SaeConfig(expansion_factor=4, k=5, multi_topk=True), dtype=dtype))
    sae.save_to_disk(tmp_path / "layer_3")
    folder = tmp_path / "layer_3"
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae.safetensors"]

    with safe_open(str(folder / "sae.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
        stored = {name: f.get_tensor(name) for name in f.keys()}
    assert stored["encoder.weight"].shape == (32, D_IN)
    assert stored["encoder.bias"].shape == (32,)
    assert stored["W_dec"].shape == (32, D_IN)
    assert stored["b_dec"].shape == (D_IN,)
    assert all(t.dtype == dtype for t in stored.values())
    assert torch.equal(stored["W_dec"], sae.W_dec.detach())
    assert torch.equal(stored["encoder.weight"], sae.encoder.weight.detach())

    cfg = json.loads((folder / "cfg.json").read_text())
    fields = {f.name for f in dataclasses.fields(SaeConfig)} - {"extra"}
    assert set(cfg) == fields | {"d_in"}
    assert cfg == {
        "expansion_factor": 4,
        "normalize_decoder": True,
        "num_latents": 0,
        "k": 5,
        "multi_topk": True,
        "d_in": D_IN,
    }

    loaded = Sae.load_from_disk(folder)
    assert loaded.d_in == D_IN and loaded.num_latents == 32 and loaded.dtype == dtype
    assert loaded.cfg == sae.cfg
    for (name, a), (name_b, b) in zip(
        sae.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert name == name_b
        assert a.dtype == b.dtype and torch.equal(a, b), name
    x = torch.randn(3, D_IN)
    assert torch.equal(sae(x).sae_out, loaded(x).sae_out)


# ------------------------------------------------------------------------ published layout
def test_published_bf16_keeps_dtype(tmp_path):
    tensors = published_tensors()
    folder = write_folder(tmp_path / "layer_3", tensors=tensors)
    sae = Sae.load_from_disk(folder)
    assert sae.d_in == D_IN and sae.num_latents == NUM_LATENTS and sae.cfg.k == 192
    assert sae.dtype == torch.bfloat16
    assert sae.cfg.extra == {"signed": False}
    for name, t in sae.state_dict().items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, tensors[name]), name
    out = sae(torch.randn(2, 3, D_IN))
    assert out.latent_indices.shape == (2, 3, 192)


def test_published_bf16_to_float32(tmp_path):
    tensors = published_tensors()
    folder = write_folder(tmp_path / "layer_3", tensors=tensors)
    sae = Sae.load_from_disk(folder, dtype=torch.float32)
    assert sae.dtype == torch.float32
    for name, t in sae.state_dict().items():
        assert t.dtype == torch.float32 and torch.equal(t, tensors[name].float()), name


def test_load_without_decoder(tmp_path):
    folder = write_folder(tmp_path / "layer_3")
    full = Sae.load_from_disk(folder)
    enc_only = Sae.load_from_disk(folder, decoder=False)
    assert enc_only.W_dec is None
    assert set(enc_only.state_dict()) == {"encoder.weight", "encoder.bias", "b_dec"}
    x = torch.randn(5, D_IN)
    acts, idx = enc_only.encode(x)
    ref_acts, ref_idx = full.encode(x)
    assert acts.shape == (5, 192)
    assert torch.equal(acts.sort(-1).values, ref_acts.sort(-1).values)
    with pytest.raises(RuntimeError, match="decoder=False"):
        enc_only.decode(acts, idx)
    with pytest.raises(UserError, match="loaded with decoder=False, so its checkpoint would lack W_dec"):
        enc_only.save_to_disk(tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_load_without_decoder_when_file_has_none(tmp_path):
    tensors = published_tensors()
    del tensors["W_dec"]
    folder = write_folder(tmp_path / "layer_3", tensors=tensors)
    assert Sae.load_from_disk(folder, decoder=False).W_dec is None
    with pytest.raises(UserError, match=re.escape("lacks tensors ['W_dec']")):
        Sae.load_from_disk(folder)


def test_load_many_natural_order(tmp_path):
    for name in ["layers.11", "layer_10", "layer_2", "layer_0"]:
        write_folder(tmp_path / name)
    (tmp_path / "not_an_sae").mkdir()
    saes = Sae.load_many(tmp_path, local=True)
    assert list(saes) == ["layer_0", "layer_2", "layer_10", "layers.11"]
    assert all(isinstance(s, Sae) and s.num_latents == NUM_LATENTS for s in saes.values())
    with pytest.warns(UserWarning, match="'layers.11', .* hidden_states\\[12\\]; .* instead: 'layers.10'"):
        assert list(Sae.load_many(tmp_path, local=True, layers=[11, 2])) == ["layer_2", "layers.11"]
    assert list(Sae.load_many(tmp_path, local=True, pattern="layer_1*")) == ["layer_10"]


def test_layer_prefers_the_hidden_states_folder(tmp_path):
    """`layer=N` means hidden_states[N]: `layer_N` before a module-path `layers.N`, with no warning;
    `layers.0` alone points at `embed_tokens` for hidden_states[0]."""
    for name in ["layer_3", "layers.3", "layers.0", "embed_tokens"]:
        write_folder(tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(Sae.load_many(tmp_path, local=True, layers=[3])) == ["layer_3"]
    with pytest.warns(UserWarning, match="hidden_states\\[1\\]; for hidden_states\\[0\\] .* 'embed_tokens'"):
        Sae.load_from_hub(str(tmp_path), layer=0)


def test_unknown_cfg_keys_survive(tmp_path):
    cfg = {**PUBLISHED_CFG, "multi_topk": False, "some_future_key": 1}
    folder = write_folder(tmp_path / "in", cfg=cfg)
    sae = Sae.load_from_disk(folder)
    assert sae.cfg.multi_topk is False
    assert sae.cfg.extra == {"signed": False, "some_future_key": 1}
    sae.save_to_disk(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert written["some_future_key"] == 1 and written["signed"] is False
    assert written["k"] == 192 and written["d_in"] == D_IN
    again = Sae.load_from_disk(tmp_path / "out")
    assert again.cfg.extra == sae.cfg.extra and again.num_latents == NUM_LATENTS


# ----------------------------------------------------------------------------------- refused
def test_refuses_missing_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Sae.load_from_disk(tmp_path / "nope")
    with pytest.raises(UserError, match="does not exist"):
        Sae.load_many(tmp_path / "nope", local=True)


def test_refuses_folder_without_cfg(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no cfg.json"):
        Sae.load_from_disk(tmp_path / "empty")


def test_refuses_folder_of_saes(tmp_path):
    write_folder(tmp_path / "layer_10")
    write_folder(tmp_path / "layer_2")
    with pytest.raises(UserError, match=r"is a folder of SAE folders.*layer_2, layer_10.*load_many"):
        Sae.load_from_disk(tmp_path)


def test_home_paths_and_named_dtypes(tmp_path, monkeypatch):
    """`~` means the home folder when saving and loading (not a folder named `~`); a dtype may be named."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sae = Sae(D_IN, SaeConfig(expansion_factor=2, k=3))
    sae.save_to_disk("~/saes/layer_3")
    assert (tmp_path / "saes" / "layer_3" / "sae.safetensors").is_file() and not (tmp_path / "~").exists()
    loaded = Sae.load_from_disk("~/saes/layer_3", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded.W_dec, sae.W_dec.bfloat16())
    assert list(Sae.load_many("~/saes", local=True)) == ["layer_3"]
    assert Sae.load_from_disk("~/saes/layer_3", dtype="bf16").dtype == torch.bfloat16  # as load_model's names
    assert Sae.load_from_disk("~/saes/layer_3", dtype="torch.float64").dtype == torch.float64
    for bad in ("float8", "int32", torch.int32):
        with pytest.raises(UserError, match=rf"^unknown dtype {bad!r}; use bfloat16, float16 or float32"):
            Sae.load_from_disk("~/saes/layer_3", dtype=bad)


@pytest.mark.parametrize("key, value, expected", [("k", "8", "SaeConfig.k must be a whole number, got '8'"),
                                                  ("normalize_decoder", "yes", "SaeConfig.normalize_decoder must be True or False, got 'yes'"),
                                                  ("multi_topk", 2, "SaeConfig.multi_topk must be True or False, got 2")])
def test_refuses_cfg_values_of_the_wrong_type(tmp_path, key, value, expected):
    folder = write_folder(tmp_path / "l", cfg={**PUBLISHED_CFG, key: value})
    with pytest.raises(UserError, match=re.escape(f"{folder / 'cfg.json'}: {expected}")):
        Sae.load_from_disk(folder)
    assert Sae.load_from_disk(write_folder(tmp_path / "m", cfg={**PUBLISHED_CFG, "k": 192.0})).cfg.k == 192


def test_refuses_cfg_without_d_in(tmp_path):
    cfg = {k: v for k, v in PUBLISHED_CFG.items() if k != "d_in"}
    with pytest.raises(UserError, match="has no 'd_in'"):
        Sae.load_from_disk(write_folder(tmp_path / "l", cfg=cfg))


def test_refuses_k_above_the_latents_naming_the_file(tmp_path):
    folder = write_folder(tmp_path / "l", cfg={**PUBLISHED_CFG, "k": 300})  # 256 latents
    with pytest.raises(UserError) as e:
        Sae.load_from_disk(folder)
    assert str(e.value) == (f"{folder / 'cfg.json'}: k=300 is larger than the number of latents (256); lower k or "
                            "raise expansion_factor/num_latents")


def test_refuses_invalid_json(tmp_path):
    with pytest.raises(UserError, match="is not valid JSON"):
        Sae.load_from_disk(write_folder(tmp_path / "l", cfg='{"k": 192,'))


def test_refuses_shape_mismatch(tmp_path):
    cfg = {**PUBLISHED_CFG, "expansion_factor": 16}  # 128 latents, tensors hold 256
    with pytest.raises(
        UserError, match=re.escape("encoder.weight has shape (256, 8)") + r".*\(128, 8\)"
    ):
        Sae.load_from_disk(write_folder(tmp_path / "l", cfg=cfg))


def test_refuses_missing_tensor(tmp_path):
    tensors = published_tensors()
    del tensors["b_dec"]
    with pytest.raises(UserError, match=re.escape("lacks tensors ['b_dec']")):
        Sae.load_from_disk(write_folder(tmp_path / "l", tensors=tensors))


def test_refuses_skip_connection_tensor(tmp_path):
    tensors = {**published_tensors(), "W_skip": torch.zeros(D_IN, D_IN, dtype=torch.bfloat16)}
    with pytest.raises(UserError, match=r"\['W_skip'\].*skip connection"):
        Sae.load_from_disk(write_folder(tmp_path / "l", tensors=tensors))


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("transcode", True, "transcode=True"),
        ("signed", True, "signed=True"),
        ("activation", "groupmax", "activation='groupmax'"),
        ("skip_connection", True, "skip_connection=True"),
    ],
)
def test_refuses_other_architectures(tmp_path, key, value, shown):
    cfg = {**PUBLISHED_CFG, key: value}
    with pytest.raises(UserError, match=re.escape(shown) + ".*cannot run"):
        Sae.load_from_disk(write_folder(tmp_path / "l", cfg=cfg))


def test_refuses_missing_weights(tmp_path):
    folder = write_folder(tmp_path / "l")
    (folder / "sae.safetensors").unlink()
    with pytest.raises(UserError, match="has cfg.json but no sae.safetensors"):
        Sae.load_from_disk(folder)


# ------------------------------------------------------------------------------------ safety
def test_loading_never_unpickles(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loading must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    write_folder(tmp_path / "layer_0")
    Sae(D_IN, SaeConfig(expansion_factor=2, k=3)).save_to_disk(tmp_path / "layer_1")
    assert Sae.load_from_disk(tmp_path / "layer_0").num_latents == NUM_LATENTS
    assert list(Sae.load_many(tmp_path, local=True)) == ["layer_0", "layer_1"]


# ---------------------------------------------------------------------------------- training
@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_loaded_sae_trains(tmp_path, dtype):
    sae = Sae.load_from_disk(write_folder(tmp_path / "layer_3"), dtype=dtype)
    params = dict(sae.named_parameters())
    assert set(params) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    assert all(p.requires_grad and p.is_leaf for p in params.values())
    before = {n: p.detach().clone() for n, p in params.items()}

    opt = torch.optim.SGD(sae.parameters(), lr=1e-2)
    dead = torch.zeros(NUM_LATENTS, dtype=torch.bool)
    dead[:10] = True
    out = sae(torch.randn(16, D_IN), dead_mask=dead)
    (out.fvu + out.auxk_loss).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    opt.step()
    assert all(not torch.equal(before[n], p.detach()) for n, p in params.items())


# ------------------------------------------------------------------ local folders by name
def _run_folder(root: Path) -> Path:
    for layer in (0, 2, 10):
        write_folder(root / f"layer_{layer}", tensors=published_tensors(seed=layer))
    return root


def test_hidden_folders_are_not_saes(tmp_path):
    """A writer's temporaries (saetrain publishes layer_L through .layer_L.tmp) are never loaded."""
    run = _run_folder(tmp_path / "run")
    (run / ".layer_2.tmp").mkdir()
    (run / ".layer_2.tmp" / "cfg.json").write_text("{")  # torn by a crash
    shutil.copytree(run / "layer_0", run / ".layer_0.old")
    assert list(Sae.load_many(run, local=True)) == ["layer_0", "layer_2", "layer_10"]


def test_an_existing_folder_loads_locally_without_local_true(tmp_path, monkeypatch):
    """As transformers' from_pretrained: a name that is an existing folder is read in place, never sent to the Hub."""
    import sae_core.hub as hub

    def no_hub(*a, **k):
        raise AssertionError("asked the Hub for a local folder")

    monkeypatch.setattr(hub, "snapshot_download", no_hub)
    monkeypatch.setattr(hub, "HfApi", no_hub)
    run = _run_folder(tmp_path / "runs" / "a")
    expected = Sae.load_many(run, local=True)
    monkeypatch.chdir(tmp_path)
    for name in (str(run), "runs/a", "./runs/a", run):
        saes = Sae.load_many(name)
        assert list(saes) == ["layer_0", "layer_2", "layer_10"]
        assert torch.equal(saes["layer_10"].W_dec, expected["layer_10"].W_dec)
        assert list(Sae.load_many(name, False, [10])) == ["layer_10"]
        assert list(Sae.load_many_from_hub(str(name), layers=["2"])) == ["layer_2"]
        assert torch.equal(Sae.load_from_hub(str(name), layer=2).W_dec, expected["layer_2"].W_dec)
        assert torch.equal(Sae.load_from_hub(str(name), hookpoint="layer_0").W_dec, expected["layer_0"].W_dec)
    assert torch.equal(Sae.load_from_hub("runs/a/layer_10").W_dec, expected["layer_10"].W_dec)  # one SAE's folder
    for call, message in [
        (lambda: Sae.load_from_hub("runs/a", layer=5), "folder runs/a has no SAE for layer 5; it has: layer_0, layer_2, layer_10"),
        (lambda: Sae.load_from_hub("runs/a"), "folder runs/a holds one SAE per layer; pass layer=N or hookpoint=NAME "
                                             "(it has: layer_0, layer_2, layer_10)"),
        (lambda: Sae.load_many("runs/a", layers=[5]), "runs/a has no SAE for layer 5; it has: layer_0, layer_2, layer_10"),
    ]:
        with pytest.raises(UserError) as e:
            call()
        assert str(e.value) == message


@pytest.mark.parametrize(
    "name", ["/no/such/run", "./runs/missing", "../missing", "~/no-such-sae-run-here", "runs/a/b"]
)
def test_a_path_that_does_not_exist_is_refused_without_asking_the_hub(tmp_path, monkeypatch, name):
    import sae_core.hub as hub

    def no_hub(*a, **k):
        raise AssertionError("asked the Hub for a path")

    monkeypatch.setattr(hub, "snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    message = (f"folder {name} does not exist; pass an existing folder of SAE folders (e.g. runs/NAME) "
               "or a Hub repo id (owner/name)")
    for call in (lambda: Sae.load_many(name), lambda: Sae.load_many_from_hub(name),
                 lambda: Sae.load_from_hub(name), lambda: Sae.load_from_hub(name, layer=3)):
        with pytest.raises(UserError) as e:
            call()
        assert str(e.value) == message


def test_a_name_that_is_no_repo_id_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError) as e:
        Sae.load_many("file.txt")
    assert str(e.value) == "file.txt is a file, not a folder; pass a folder of SAE folders or a Hub repo id (owner/name)"
    with pytest.raises(UserError, match=r"^'bad name!' is neither a local folder nor a Hub repo id \(HFValidationError: "):
        Sae.load_many("bad name!")


def test_saved_files_get_the_usual_file_mode(tmp_path):
    """safetensors alone writes 0600; SAEs on a shared machine are readable as other new files are."""
    import os
    import stat

    from sae_core import Sae, SaeConfig

    Sae(8, SaeConfig(num_latents=16, k=2)).save_to_disk(tmp_path / "sae")
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("sae.safetensors", "cfg.json"):
        assert stat.S_IMODE((tmp_path / "sae" / name).stat().st_mode) == 0o666 & ~mask, name
