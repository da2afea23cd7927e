"""The user-facing surface, frozen: changing a CLI option or a public name must be deliberate."""

import typer

import sae_core
import sae_core.store
from actcache.cli import app as actcache_app
from saetrain.cli import app as saetrain_app


def options(app) -> dict[str, list[str]]:
    cmd = typer.main.get_command(app)
    return {name: sorted(o for p in c.params for o in p.opts if o.startswith("--")) for name, c in cmd.commands.items()}


def test_actcache_cli():
    assert options(actcache_app) == {
        "collect": ["--batch-size", "--chunk-mb", "--chunk-tokens", "--codec", "--ctx-len", "--dataset", "--dataset-config",
                    "--device",
                    "--dtype", "--gguf-file", "--hookpoints", "--layers", "--load-in-8bit", "--max-tokens", "--model",
                    "--model-dtype", "--out", "--overwrite", "--progress", "--resume", "--revision", "--seed",
                    "--seqs-per-shard", "--shard-mb", "--skip-tokens", "--split", "--text-column", "--write-threads"],
        "info": ["--json"],
        "verify": ["--repair"],
    }


def test_saetrain_cli():
    assert options(saetrain_app) == {
        "fit": ["--auxk-alpha", "--batch-size", "--dead-feature-threshold", "--device", "--distribute-layers",
                "--epochs", "--exclude-first-tokens", "--exclude-token-ids", "--expansion-factor", "--grad-acc-steps",
                "--grad-clip", "--holdout", "--init-from", "--k", "--layers", "--lr", "--lr-schedule", "--lr-schedule-steps",
                "--lr-warmup-steps", "--max-tokens",
                "--micro-acc-steps", "--multi-topk", "--num-latents", "--out", "--overwrite", "--progress",
                "--read-threads", "--resume", "--save-every", "--seed", "--shuffle-window", "--store", "--wandb"],
        "evaluate": ["--device", "--json", "--layers", "--store"],
    }


def test_public_names():
    assert sorted(sae_core.__all__) == [
        "EncoderOutput", "ForwardOutput", "LoadedModel", "Sae", "SaeConfig", "UserError", "d_model",
        "decoder_blocks", "format_layers", "load_model", "num_layers", "parse_layers",
    ]
    assert sorted(sae_core.store.__all__) == [
        "ActivationStore", "CODECS", "DEFAULT_CODEC", "LAYER_CONVENTION", "LAYER_CONVENTION_OUTPUTS", "RunningStats",
        "StoreCorruptError",
        "StoreLayout", "layer_key", "open_store", "plan_layout", "verify_store",
    ]
    for name in ("load_from_disk", "load_from_hub", "load_many_from_hub", "load_many", "save_to_disk",
                 "encode", "decode", "forward"):
        assert hasattr(sae_core.Sae, name)


def test_stages_do_not_import_each_other():
    import pathlib
    import re

    root = pathlib.Path(__file__).parent.parent
    for stage, other in (("actcache", "saetrain"), ("saetrain", "actcache")):
        for f in (root / stage).rglob("*.py"):
            assert not re.search(rf"^\s*(from|import)\s+{other}\b", f.read_text(), re.M), f
