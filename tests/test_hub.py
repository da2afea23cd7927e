"""`sae_core.hub` against a fake Hub served over HTTP, through the real `huggingface_hub` client.

Nothing of ours is mocked: `tests/hub_server.py` serves repos laid out like EleutherAI's
published ones, and the tests assert both what was loaded and which files went over the wire.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from sae_core import Sae, SaeConfig, UserError

try:
    from tests.hub_server import FakeHub, serve_hub, set_offline
except ImportError:  # tests/ on sys.path as a plain folder (no __init__.py)
    from hub_server import FakeHub, serve_hub, set_offline

D_IN = 16
NUM_LATENTS = 2 * D_IN
K = 4
WEIGHT_NAMES = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")

OLD_REPO = "EleutherAI/sae-llama-3-8b-32x"  # folders layer_0, layer_2, layer_10
NEW_REPO = "EleutherAI/sae-smollm2-new-layout"  # folders layers.3, layers.5
ROOT_REPO = "someone/single-sae"  # cfg.json + sae.safetensors at the top level

# A cfg.json as EleutherAI publishes it (hand-written, not produced by our save code).
PUBLISHED_CFG = {
    "expansion_factor": 2,
    "normalize_decoder": True,
    "num_latents": 0,
    "k": K,
    "signed": False,
    "d_in": D_IN,
}


# ------------------------------------------------------------------------------------ helpers
def random_weights(seed: int, d_in: int = D_IN, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    num_latents = 2 * d_in
    w = {
        "encoder.weight": torch.randn(num_latents, d_in, generator=g),
        "encoder.bias": torch.randn(num_latents, generator=g) * 0.1,
        "W_dec": torch.randn(num_latents, d_in, generator=g),
        "b_dec": torch.randn(d_in, generator=g) * 0.1,
    }
    return {k: v.to(dtype).contiguous() for k, v in w.items()}


def write_published(folder: Path, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """An SAE folder as EleutherAI publishes it: hand-written cfg.json, safetensors of the 4 tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(PUBLISHED_CFG))
    save_file(weights, str(folder / "sae.safetensors"))
    return load_file(str(folder / "sae.safetensors"))


def write_ours(folder: Path, seed: int, d_in: int = D_IN) -> dict[str, Tensor]:
    """An SAE folder written by `Sae.save_to_disk`, with random (non-initial) weights."""
    sae = Sae(d_in, SaeConfig(expansion_factor=2, k=K))
    sae.load_state_dict(random_weights(seed, d_in))
    sae.save_to_disk(folder)
    return load_file(str(folder / "sae.safetensors"))


def build_old_repo(root: Path, seed: int = 0) -> dict[str, dict[str, Tensor]]:
    """`layer_0`, `layer_2` (fp32) and `layer_10` (bf16), plus a README, like the Llama 3 8B repo."""
    saved = {
        "layer_0": write_published(root / "layer_0", random_weights(seed + 0)),
        "layer_2": write_published(root / "layer_2", random_weights(seed + 2)),
        "layer_10": write_published(root / "layer_10", random_weights(seed + 10, dtype=torch.bfloat16)),
    }
    (root / "README.md").write_text("---\nlicense: mit\n---\n# SAEs for Llama 3 8B\n")
    (root / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    return saved


def build_new_repo(root: Path) -> dict[str, dict[str, Tensor]]:
    saved = {name: write_ours(root / name, seed) for name, seed in (("layers.3", 3), ("layers.5", 5))}
    (root / "README.md").write_text("# newer layout\n")
    return saved


def folder_files(*names: str) -> list[str]:
    return sorted(f"{n}/{f}" for n in names for f in ("cfg.json", "sae.safetensors"))


def assert_weights(sae: Sae, expected: dict[str, Tensor]) -> None:
    state = sae.state_dict()
    assert set(state) == set(WEIGHT_NAMES)
    for name in WEIGHT_NAMES:
        assert state[name].dtype == expected[name].dtype, name
        assert torch.equal(state[name], expected[name]), name


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    with serve_hub(monkeypatch, tmp_path / "hf_home") as fake:
        yield fake


@pytest.fixture
def old_repo(hub: FakeHub, tmp_path: Path) -> dict[str, dict[str, Tensor]]:
    saved = build_old_repo(tmp_path / "repos" / "old")
    hub.add_repo(OLD_REPO, tmp_path / "repos" / "old")
    return saved


@pytest.fixture
def new_repo(hub: FakeHub, tmp_path: Path) -> dict[str, dict[str, Tensor]]:
    saved = build_new_repo(tmp_path / "repos" / "new")
    hub.add_repo(NEW_REPO, tmp_path / "repos" / "new")
    return saved


# ----------------------------------------------------------------------------- load_from_hub
def test_load_layer_downloads_only_that_folder(hub: FakeHub, old_repo, tmp_path: Path):
    sae = Sae.load_from_hub(OLD_REPO, layer=10)

    assert hub.downloaded(OLD_REPO) == folder_files("layer_10")
    # Not even a metadata request for another folder's files or the README.
    assert hub.fetched(OLD_REPO) == folder_files("layer_10")
    snapshot = next((tmp_path / "hf_home" / "hub").glob("models--EleutherAI--sae-llama-3-8b-32x/snapshots/*"))
    assert sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()) == folder_files(
        "layer_10"
    )

    assert (sae.d_in, sae.num_latents, sae.cfg.k) == (D_IN, NUM_LATENTS, K)
    assert sae.dtype == torch.bfloat16  # stored dtype kept
    assert_weights(sae, old_repo["layer_10"])


def test_load_layer_fp32_and_dtype_override(hub: FakeHub, old_repo):
    sae = Sae.load_from_hub(OLD_REPO, layer=2)
    assert sae.dtype == torch.float32
    assert_weights(sae, old_repo["layer_2"])

    as_fp32 = Sae.load_from_hub(OLD_REPO, layer=10, dtype=torch.float32, decoder=False)
    assert as_fp32.dtype == torch.float32 and as_fp32.W_dec is None
    assert torch.equal(as_fp32.encoder.weight, old_repo["layer_10"]["encoder.weight"].float())


def test_new_layout_by_layer_and_hookpoint(hub: FakeHub, new_repo):
    # Module-path names: `layers.5` is block 5's output, hidden_states[6]; layer 5 is `layers.4`'s.
    warned = re.escape("'layers.5', which in a repo named by module path holds the output of block 5, "
                       "hidden_states[6]; for hidden_states[5] (layer 5 here) name the folder instead: 'layers.4'")
    with pytest.warns(UserWarning, match=warned):
        sae5 = Sae.load_from_hub(NEW_REPO, layer=5)
    assert_weights(sae5, new_repo["layers.5"])
    assert hub.downloaded(NEW_REPO) == folder_files("layers.5")

    hub.clear_log()
    sae3 = Sae.load_from_hub(NEW_REPO, hookpoint="layers.3")
    assert_weights(sae3, new_repo["layers.3"])
    # Its cfg.json is byte-identical to layers.5's, so the client takes it from its blob cache.
    assert hub.fetched(NEW_REPO) == folder_files("layers.3")
    assert "layers.3/sae.safetensors" in hub.downloaded(NEW_REPO)


def test_hookpoint_folder_beside_layer_folder(hub: FakeHub, tmp_path: Path):
    """`hookpoint="layers.3.mlp"` picks that folder by name; `layer=3` the residual one."""
    root = tmp_path / "repos" / "mixed"
    saved = {name: write_ours(root / name, seed) for name, seed in (("layers.3", 3), ("layers.3.mlp", 30))}
    hub.add_repo(NEW_REPO, root)

    assert_weights(Sae.load_from_hub(NEW_REPO, hookpoint="layers.3.mlp"), saved["layers.3.mlp"])
    assert hub.fetched(NEW_REPO) == folder_files("layers.3.mlp")
    with pytest.warns(UserWarning, match="hidden_states\\[4\\]"):
        assert_weights(Sae.load_from_hub(NEW_REPO, layer=3), saved["layers.3"])
    # A name in place of the layer is a folder (sparsify's load_from_hub(repo, "layers.3.mlp")); digits a layer.
    assert_weights(Sae.load_from_hub(NEW_REPO, "layers.3.mlp"), saved["layers.3.mlp"])
    with pytest.warns(UserWarning, match="hidden_states\\[4\\]"):
        assert_weights(Sae.load_from_hub(NEW_REPO, "3"), saved["layers.3"])
    assert_weights(Sae.load_from_hub(NEW_REPO, "layers.3", "cpu"), saved["layers.3"])  # sparsify's positional device
    with pytest.warns(UserWarning, match="hidden_states\\[4\\]"):
        assert list(Sae.load_many_from_hub(NEW_REPO, layers=["3"])) == ["layers.3"]
    with pytest.warns(UserWarning, match="hidden_states\\[4\\]"):
        assert list(Sae.load_many_from_hub(NEW_REPO, layers=[3])) == ["layers.3"]
    assert list(Sae.load_many_from_hub(NEW_REPO)) == ["layers.3", "layers.3.mlp"]


def test_layer_and_hookpoint_together_is_refused(hub: FakeHub, new_repo):
    with pytest.raises(UserError, match="either layer= or hookpoint="):
        Sae.load_from_hub(NEW_REPO, layer=3, hookpoint="layers.3")
    assert hub.requests == []


def test_missing_layer_lists_the_repo_layers(hub: FakeHub, old_repo):
    with pytest.raises(UserError) as info:
        Sae.load_from_hub(OLD_REPO, layer=7)
    msg = str(info.value)
    assert OLD_REPO in msg and "layer 7" in msg
    assert msg.endswith("it has: layer_0, layer_2, layer_10")  # every SAE folder, as load_many_from_hub says
    assert hub.downloaded() == []


def test_missing_hookpoint_lists_the_folders(hub: FakeHub, new_repo):
    with pytest.raises(UserError, match=r"hookpoint 'layers\.4'.*layers\.3, layers\.5"):
        Sae.load_from_hub(NEW_REPO, hookpoint="layers.4")
    assert hub.downloaded() == []


@pytest.mark.parametrize(
    "call",
    [
        lambda repo: Sae.load_from_hub(repo, layer=0),
        lambda repo: Sae.load_from_hub(repo),
        lambda repo: Sae.load_many_from_hub(repo),
        lambda repo: Sae.load_many(repo, layers=[0]),
    ],
    ids=["load_from_hub-layer", "load_from_hub-root", "load_many_from_hub", "load_many"],
)
def test_missing_repo_is_a_user_error(hub: FakeHub, old_repo, call):
    with pytest.raises(UserError, match="EleutherAI/no-such-repo"):
        call("EleutherAI/no-such-repo")
    assert hub.downloaded() == []


def test_root_level_sae(hub: FakeHub, tmp_path: Path):
    root = tmp_path / "repos" / "root"
    saved = write_ours(root, seed=42)
    (root / "README.md").write_text("# one SAE\n")
    hub.add_repo(ROOT_REPO, root)

    sae = Sae.load_from_hub(ROOT_REPO)
    assert_weights(sae, saved)
    assert hub.downloaded(ROOT_REPO) == ["cfg.json", "sae.safetensors"]


def test_multi_layer_repo_without_layer_names_the_folders(hub: FakeHub, old_repo):
    with pytest.raises(UserError) as info:
        Sae.load_from_hub(OLD_REPO)
    msg = str(info.value)
    assert "layer=N" in msg
    assert "layer_0, layer_2, layer_10" in msg  # naturally sorted
    assert hub.downloaded() == []


# ------------------------------------------------------------------------ load_many_from_hub
@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, ["layer_0", "layer_2", "layer_10"]),
        ({"layers": [2, 10]}, ["layer_2", "layer_10"]),
        ({"layers": [10, 0]}, ["layer_0", "layer_10"]),
        ({"layers": ["layer_2"]}, ["layer_2"]),
        ({"pattern": "layer_1*"}, ["layer_10"]),
        ({"layers": [0, 10], "pattern": "*_1*"}, ["layer_10"]),
    ],
)
def test_load_many_from_hub(hub: FakeHub, old_repo, kwargs, expected):
    saes = Sae.load_many_from_hub(OLD_REPO, **kwargs)
    assert list(saes) == expected
    for name, sae in saes.items():
        assert_weights(sae, old_repo[name])
    # Only the chosen folders were asked for (never the README). With both layers= and
    # pattern=, the layers are fetched and the pattern filters them afterwards.
    fetched = hub.fetched(OLD_REPO)
    assert set(hub.downloaded(OLD_REPO)) <= set(fetched)
    if "pattern" in kwargs and "layers" in kwargs:
        assert fetched == folder_files(*(f"layer_{n}" for n in kwargs["layers"]))
    else:
        assert fetched == folder_files(*expected)
    # Weights differ between folders, so each one fetched was downloaded.
    assert [f for f in fetched if f.endswith(".safetensors")] == [
        f for f in hub.downloaded(OLD_REPO) if f.endswith(".safetensors")
    ]


def test_load_many_from_hub_new_layout_by_layer_number(hub: FakeHub, new_repo):
    with pytest.warns(UserWarning) as warned:
        saes = Sae.load_many_from_hub(NEW_REPO, layers=[5, 3])
    assert sorted(str(w.message).split(",")[0] for w in warned) == [
        "layer=3 loads folder 'layers.3'", "layer=5 loads folder 'layers.5'"]
    assert list(saes) == ["layers.3", "layers.5"]
    assert hub.fetched(NEW_REPO) == folder_files("layers.3", "layers.5")


def test_load_many_from_hub_missing_layer(hub: FakeHub, old_repo):
    with pytest.raises(UserError, match=r"has no SAE for layer 7; it has: layer_0, layer_2, layer_10"):
        Sae.load_many_from_hub(OLD_REPO, layers=[2, 7])


def test_load_many_from_hub_pattern_matching_nothing(hub: FakeHub, old_repo):
    with pytest.raises(UserError, match=r"layers\.\*.*layer_0, layer_2, layer_10"):
        Sae.load_many_from_hub(OLD_REPO, pattern="layers.*")
    assert hub.downloaded() == []


def test_load_many_hub_and_local(hub: FakeHub, old_repo, tmp_path: Path):
    from_hub = Sae.load_many(OLD_REPO)
    assert list(from_hub) == ["layer_0", "layer_2", "layer_10"]
    many = Sae.load_many_from_hub(OLD_REPO)
    for name in many:
        assert_weights(from_hub[name], many[name].state_dict())

    local = Sae.load_many(tmp_path / "repos" / "old", local=True)
    assert list(local) == ["layer_0", "layer_2", "layer_10"]
    for name, sae in local.items():
        assert_weights(sae, old_repo[name])
    assert list(Sae.load_many(tmp_path / "repos" / "old", local=True, layers=[10])) == ["layer_10"]
    assert list(Sae.load_many(tmp_path / "repos" / "old", True, [10], "cpu")) == ["layer_10"]  # as sparsify's


def test_a_local_folder_of_the_owners_name_does_not_hide_the_hub(hub: FakeHub, old_repo, tmp_path, monkeypatch):
    """`./EleutherAI/` (say from `hf download --local-dir`) holding other things: `EleutherAI/<repo>` is still
    the Hub repo; a name that is neither says so in one line."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "EleutherAI" / "other-model").mkdir(parents=True)
    (tmp_path / "runs" / "k32").mkdir(parents=True)
    assert_weights(Sae.load_from_hub(OLD_REPO, layer=10), old_repo["layer_10"])
    assert list(Sae.load_many(OLD_REPO, layers=[0])) == ["layer_0"]
    for call in (lambda: Sae.load_from_hub("runs/k23", layer=0), lambda: Sae.load_many("runs/k23")):
        with pytest.raises(UserError) as e:
            call()
        assert str(e.value) == ("Hub repo 'runs/k23' not found (or private: log in with `hf auth login` or set "
                                "HF_TOKEN), nor is runs/k23 a local folder")


def test_folder_names_are_taken_literally_and_only_top_level_folders_are_fetched(hub: FakeHub, tmp_path: Path):
    """huggingface_hub matches allow_patterns with fnmatch: `blocks[3]` must not fetch `blocks3`, and
    `*/cfg.json` would also fetch SAEs nested deeper, which load_many_from_hub does not load."""
    root = tmp_path / "repos" / "odd"
    saved = {name: write_ours(root / name, seed) for name, seed in (("blocks[3]", 3), ("blocks3", 4), ("layers.2", 2))}
    write_ours(root / "extra" / "layers.3", 5)
    hub.add_repo(NEW_REPO, root)
    assert_weights(Sae.load_from_hub(NEW_REPO, hookpoint="blocks[3]"), saved["blocks[3]"])
    assert hub.fetched(NEW_REPO) == folder_files("blocks[3]")
    hub.clear_log()  # (what is cached at this commit is not asked for again)
    assert list(Sae.load_many_from_hub(NEW_REPO, pattern="blocks*")) == ["blocks3", "blocks[3]"]
    assert hub.fetched(NEW_REPO) == folder_files("blocks3")
    hub.clear_log()
    assert list(Sae.load_many_from_hub(NEW_REPO)) == ["blocks3", "blocks[3]", "layers.2"]
    assert hub.fetched(NEW_REPO) == folder_files("layers.2")
    # A nested folder loads when named, as sparsify's load_many takes it (and load_from_hub's hookpoint=).
    assert list(Sae.load_many_from_hub(NEW_REPO, layers="extra/layers.3")) == ["extra/layers.3"]
    both = Sae.load_many(root, local=True, layers=["extra/layers.3", "layers.2"])
    assert list(both) == ["extra/layers.3", "layers.2"]


# ---------------------------------------------------------------------------------- revision
def test_revision_pass_through(hub: FakeHub, tmp_path: Path):
    main = build_old_repo(tmp_path / "repos" / "main", seed=0)
    v1_root = tmp_path / "repos" / "v1"
    v1 = {
        "layer_0": write_published(v1_root / "layer_0", random_weights(100)),
        "layer_10": write_published(v1_root / "layer_10", random_weights(110, dtype=torch.bfloat16)),
    }
    hub.add_repo(OLD_REPO, tmp_path / "repos" / "main")
    v1_sha = hub.add_repo(OLD_REPO, v1_root, revision="v1")

    assert_weights(Sae.load_from_hub(OLD_REPO, layer=10, revision="v1"), v1["layer_10"])
    assert any(r.path == f"/api/models/{OLD_REPO}/revision/v1" for r in hub.requests)
    assert_weights(Sae.load_from_hub(OLD_REPO, layer=10), main["layer_10"])
    assert_weights(Sae.load_from_hub(OLD_REPO, layer=10, revision=v1_sha), v1["layer_10"])

    saes = Sae.load_many_from_hub(OLD_REPO, revision="v1")
    assert list(saes) == ["layer_0", "layer_10"]
    assert_weights(saes["layer_0"], v1["layer_0"])
    assert list(Sae.load_many(OLD_REPO, revision="v1", layers=[0])) == ["layer_0"]

    # What a revision lacks is reported from that revision's listing.
    with pytest.raises(UserError, match=r"it has: layer_0, layer_10$"):
        Sae.load_from_hub(OLD_REPO, layer=2, revision="v1")
    with pytest.raises(UserError, match="v9"):
        Sae.load_from_hub(OLD_REPO, layer=10, revision="v9")


# ----------------------------------------------------------------------------------- offline
def test_offline_loads_from_cache(hub: FakeHub, old_repo, monkeypatch: pytest.MonkeyPatch):
    Sae.load_from_hub(OLD_REPO, layer=10)
    hub.stop()
    set_offline(monkeypatch)

    assert_weights(Sae.load_from_hub(OLD_REPO, layer=10), old_repo["layer_10"])
    saes = Sae.load_many_from_hub(OLD_REPO, layers=[10])
    assert list(saes) == ["layer_10"]

    # Cached repo, uncached layer: a one-line error that names the cause, not a deep traceback.
    with pytest.raises(UserError, match=r"^layer_2 or layers.2 of 'EleutherAI/.*' is not in the local Hub cache"):
        Sae.load_from_hub(OLD_REPO, layer=2)
    with pytest.raises(UserError, match="is not in the local Hub cache"):
        Sae.load_many_from_hub(OLD_REPO)
    # A layer the repo does not have at all: the listing cached by the first download names
    # every layer of the repo, not only the cached one.
    with pytest.raises(UserError, match=r"layer 7; it has: layer_0, layer_2, layer_10$"):
        Sae.load_from_hub(OLD_REPO, layer=7)
    with pytest.raises(UserError, match="layer_0, layer_2, layer_10"):
        Sae.load_from_hub(OLD_REPO)
    # A repo never downloaded.
    with pytest.raises(UserError, match="EleutherAI/never-downloaded.*cache"):
        Sae.load_from_hub("EleutherAI/never-downloaded", layer=0)


def test_unreachable_hub_falls_back_on_cache(hub: FakeHub, old_repo):
    """Not offline mode, but the Hub cannot be reached (connection refused)."""
    Sae.load_from_hub(OLD_REPO, layer=10)
    hub.stop()
    assert_weights(Sae.load_from_hub(OLD_REPO, layer=10), old_repo["layer_10"])
    with pytest.raises(UserError, match="cache"):
        Sae.load_from_hub(OLD_REPO, layer=0)
    # A layer the repo lacks: named from the cached listing, with no connection error escaping
    # and no retrying with back-off against the dead endpoint (that takes ~20 s).
    start = time.monotonic()
    with pytest.raises(UserError, match=r"layer 7; it has: layer_0, layer_2, layer_10$"):
        Sae.load_from_hub(OLD_REPO, layer=7)
    with pytest.raises(UserError, match=r"7.*layer_0, layer_2, layer_10"):
        Sae.load_many_from_hub(OLD_REPO, layers=[10, 7])
    assert time.monotonic() - start < 5


# ------------------------------------------------------ language models and datasets by Hub id
def test_model_by_hub_id_comes_from_the_cache_when_the_hub_is_gone(hub: FakeHub, tiny_model_dir, capfd):
    """Downloaded once; with the Hub unreachable it loads from the cache at once, and an id the cache
    lacks is one error, not a minute of logged retries with back-off."""
    from huggingface_hub import constants

    from sae_core import load_model

    hub.add_repo("org/tiny", tiny_model_dir)
    first, _ = load_model("org/tiny")
    url = hub.url
    hub.stop()
    start = time.monotonic()
    again, tokenizer = load_model("org/tiny")
    with pytest.raises(UserError, match=(
        rf"^cannot load model 'org/other': it is not in the local Hub cache and the Hub \({re.escape(url)}\) "
        r"cannot be reached; download it once"
    )):
        load_model("org/other")
    assert time.monotonic() - start < 15
    assert "Retrying" not in capfd.readouterr().err
    assert tokenizer("To be").input_ids and all(
        torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True)
    )
    assert constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ  # offline only while loading


def test_dataset_by_hub_id_with_the_hub_gone(hub: FakeHub, capfd):
    import datasets.config

    from actcache.data import load_documents

    hub.stop()
    with pytest.raises(UserError, match=r"^cannot load dataset 'org/data': it is not in the local Hub cache and the Hub"):
        load_documents("org/data")
    assert "Retrying" not in capfd.readouterr().err
    assert datasets.config.HF_HUB_OFFLINE is False


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_not_cached_names_the_variable_that_is_set(monkeypatch, var):
    from sae_core.online import not_cached

    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, "1")
    assert not_cached("it") == f"it is not in the local Hub cache and {var} is set; unset it to download"


# ----------------------------------------------------------------- the README inference example
def test_readme_example_on_a_tiny_llama(hub: FakeHub, tmp_path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
    )
    model = LlamaForCausalLM(config).eval()
    REPO = "EleutherAI/sae-tiny-llama"
    root = tmp_path / "repos" / "tiny"
    # Named by module path, as sae-llama-3-8b-32x is today: the output of each module.
    names = ["embed_tokens", "layers.0", "layers.1"]
    saved = {name: write_published(root / name, random_weights(i)) for i, name in enumerate(names)}
    hub.add_repo(REPO, root)
    batch, seq = 2, 5
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))

    # --- as in the README
    from sae_core import Sae

    sae = Sae.load_from_hub(REPO, hookpoint="layers.0")
    saes = Sae.load_many_from_hub(REPO)
    with torch.no_grad():
        outputs = model(input_ids, output_hidden_states=True)
        latents = sae.encode(outputs.hidden_states[1])
        every = [s.encode(h) for s, h in zip(saes.values(), outputs.hidden_states, strict=False)]  # the last is normed
    # ---

    assert list(saes) == names and [e.top_indices.shape for e in every] == [(batch, seq, K)] * 3
    assert torch.equal(every[1].top_indices, latents.top_indices)
    seen = {}  # What the README says of the names: module `layers.0` outputs hidden_states[1], `embed_tokens` [0].
    for name in names[:2]:
        model.model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, o))
    with torch.no_grad():
        model(input_ids)
    for i, name in enumerate(names[:2]):
        torch.testing.assert_close(seen[name][0] if isinstance(seen[name], tuple) else seen[name], outputs.hidden_states[i])
    assert latents.top_acts.shape == latents.top_indices.shape == (batch, seq, K)
    assert latents.top_indices.dtype == torch.long
    assert int(latents.top_indices.min()) >= 0 and int(latents.top_indices.max()) < NUM_LATENTS

    # Independent dense computation from the saved tensors.
    w, h = saved["layers.0"], outputs.hidden_states[1]
    dense = torch.relu((h - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    expected = dense.topk(K, dim=-1).values
    torch.testing.assert_close(latents.top_acts.sort(dim=-1, descending=True).values, expected)
    # The indices point at the latents whose activations were returned, each once.
    torch.testing.assert_close(dense.gather(-1, latents.top_indices), latents.top_acts)
    assert (latents.top_indices.sort(dim=-1).values.diff(dim=-1) > 0).all()

    # And back, as the README goes on: the reconstruction from the decoder rows of those latents.
    reconstruction = sae.decode(*latents)
    assert reconstruction.shape == (batch, seq, D_IN)
    dense_decode = (latents.top_acts[..., None] * w["W_dec"][latents.top_indices]).sum(-2) + w["b_dec"]
    torch.testing.assert_close(reconstruction, dense_decode)


def _dataset_repo(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_dataset_by_hub_id(hub: FakeHub, tmp_path: Path):
    from actcache.data import load_documents

    texts = [f"document {i}" for i in range(5)]
    hub.add_repo("org/data", _dataset_repo(tmp_path / "repo", {"train.jsonl": _jsonl([{"text": t} for t in texts])}),
                 repo_type="dataset")
    docs = load_documents("org/data")
    assert docs.id == "org/data" and docs.fetch(range(docs.num_docs)) == texts


def test_dataset_with_a_loading_script_is_read_from_its_data_files(hub: FakeHub, tmp_path: Path):
    """As togethercomputer/RedPajama-Data-1T-Sample: a script (which datasets >= 4 refuses) beside JSON
    lines files whose other columns differ from file to file; only the text column is kept."""
    from actcache.data import load_documents

    arxiv = [{"text": f"paper {i}", "meta": {"arxiv_id": str(i), "yymm": "2301"}} for i in range(3)]
    c4 = [{"text": f"page {i}", "meta": {"url": f"http://x/{i}"}, "source": "c4"} for i in range(2)]
    book = [{"text": "a book", "meta": "{\"title\": \"A\"}"}]
    repo = _dataset_repo(tmp_path / "repo", {
        "data.py": "raise SystemExit('a loading script is never run')\n", "README.md": "# data\n",
        "arxiv_sample.jsonl": _jsonl(arxiv), "c4_sample.jsonl": _jsonl(c4), "book_sample.jsonl": _jsonl(book),
        "dataset_infos.json": json.dumps({"default": {"features": {}}}),
    })
    hub.add_repo("org/data", repo, repo_type="dataset")
    docs = load_documents("org/data")
    assert sorted(docs.fetch(range(docs.num_docs))) == sorted(r["text"] for r in arxiv + c4 + book)
    with pytest.raises(UserError, match=r"^dataset 'org/data' has no splits \(no file is named train, validation or test\): drop --split$"):
        load_documents("org/data", split="test")
    with pytest.raises(UserError, match=r"^file arxiv_sample.jsonl of dataset 'org/data' has no column 'body'; its "
                                        r"columns are text, meta: pass --text-column NAME$"):
        load_documents("org/data", text_column="body")
    with pytest.raises(UserError, match=r"^dataset 'org/data' has a loading script, .* configuration 'arxiv'; download"):
        load_documents("org/data", config="arxiv")
    hub.stop()  # offline, the files downloaded above are read from the Hub cache
    again = load_documents("org/data")
    assert sorted(again.fetch(range(again.num_docs))) == sorted(docs.fetch(range(docs.num_docs)))


def test_dataset_configurations(hub: FakeHub, tmp_path: Path):
    """A dataset with several configurations needs --dataset-config; a wrong one lists them."""
    from actcache.data import load_documents

    card = ("---\nconfigs:\n- config_name: small\n  data_files: small.jsonl\n"
            "- config_name: large\n  data_files: large.jsonl\n---\n# data\n")
    repo = _dataset_repo(tmp_path / "repo", {
        "README.md": card, "small.jsonl": _jsonl([{"text": "s"}]), "large.jsonl": _jsonl([{"text": "l"}, {"text": "L"}]),
    })
    hub.add_repo("org/data", repo, repo_type="dataset")
    docs = load_documents("org/data", config="large")
    assert docs.fetch(range(docs.num_docs)) == ["l", "L"]
    with pytest.raises(UserError, match=r"^dataset 'org/data' has several configurations; pass --dataset-config NAME "
                                        r"\(one of 'small', 'large'\)$"):
        load_documents("org/data")
    with pytest.raises(UserError, match=r"^dataset 'org/data' has no configuration 'medium'; pass --dataset-config "
                                        r"NAME \(one of 'small', 'large'\)$"):
        load_documents("org/data", config="medium")
