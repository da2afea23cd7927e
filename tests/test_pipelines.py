"""pipelines.run: recipes from a file; a recipe in rounds collects one window of the data at a time and
trains on from the last round, in one process and under torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines import run
from sae_core.store import ActivationStore
from saetrain.schedule import lr_factor
from tests.fit_fixtures import Job, torchrun

# A recipe file as a user writes one: 4 rounds of 12-sequence windows over ~33 sequences.
RECIPE = """
import dataclasses
from pathlib import Path

from actcache import CollectConfig
from pipelines.presets import Recipe
from saetrain import TrainConfig


def tiny(root=Path({root!r}), rounds=4, layers="1,2"):
    store = root / "acts.zarr"
    return Recipe(
        "tiny-rounds", "tiny model, windows of 12 sequences",
        CollectConfig(out=store, model={model!r}, dataset={data!r}, layers=layers, ctx_len=32, max_tokens=12 * 32,
                      seqs_per_shard=4, chunk_tokens=32, dtype="float32", device="cpu", progress=False),
        TrainConfig(store=store, out=root / "saes", k=4, expansion_factor=4, batch_size=64, lr_warmup_steps=2,
                    lr_schedule="linear", save_every=0, shuffle_window=4, device="cpu", progress=False,
                    distribute_layers=True),
        rounds=rounds,
    )


def once(root=Path({root!r})):
    return tiny(root, rounds=1)


def once_other_layers(root=Path({root!r})):
    return tiny(root, rounds=1, layers="0,1")


def ragged(root=Path({root!r})):  # windows of 12.5 sequences
    r = tiny(root)
    return dataclasses.replace(r, collect=dataclasses.replace(r.collect, max_tokens=12 * 32 + 16))


def twice(root=Path({root!r})):
    return tiny(root, rounds=2)


def wider(root=Path({root!r})):  # another window after some rounds
    r = tiny(root, rounds=5)
    return dataclasses.replace(r, collect=dataclasses.replace(r.collect, max_tokens=8 * 32))
"""


def recipe_file(root: Path, model: Path, data: Path) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipes.py").write_text(RECIPE.format(root=str(root), model=str(model), data=str(data)))
    return f"{root / 'recipes.py'}:tiny"


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir, tiny_text_dir) -> tuple[Path, str]:
    """The rounds recipe run in this process: its root and what it printed."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("rounds_single")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert run.main([recipe_file(root, tiny_model_dir, tiny_text_dir)]) == 0
    return root, printed.getvalue()


def test_rounds_train_on_consecutive_windows(single, tiny_model_dir, tiny_text_dir, capsys):
    root, text = single
    runs = root / "saes"
    # The data (33 sequences) holds three windows: the fourth round finds it exhausted.
    assert "round 3/4: tokens 768 to 1,152" in text and "the data ends before token 1,152: stopping after 3 round(s)" in text
    assert json.loads((runs / "rounds.json").read_text()) == {"done": 2, "latest": str(runs / "round_0002"),
                                                              "window": 12 * 32}
    assert sorted(p.name for p in runs.glob("round_*")) == ["round_0002"]  # earlier rounds are folded in
    assert ActivationStore(root / "acts.zarr").meta["data"]["skip_tokens"] == 768
    config = json.loads((runs / "round_0002" / "config.json").read_text())
    steps = [json.loads(ln)["step"] for ln in (runs / "round_0002" / "metrics.jsonl").read_text().splitlines()]
    # Round 2 starts after the 12 + 12 sequences (6 + 6 steps of 64 tokens) of rounds 0 and 1.
    assert config["init_from"] == {"run": str(runs / "round_0001"), "step": 12, "tokens": 768}
    assert steps[0] == 13 and steps[-1] == 13 + 4  # the last window holds 9 sequences: 4 full steps + 1 partial
    # Every round's metrics outlive its folder: one learning curve, steps 1..17 once each.
    kept = sorted(p.name for p in (runs / "metrics").iterdir())
    assert kept == [f"round_000{r}.jsonl" for r in range(3)]  # (and .eval.json where a round holds out chunks)
    curve = [json.loads(ln) for r in range(3) for ln in (runs / "metrics" / f"round_000{r}.jsonl").read_text().splitlines()]
    assert sorted({m["step"] for m in curve}) == list(range(1, 18))
    # One linear decay over the 4 rounds of 6 steps (the recipe's lr_schedule_steps is 0), not one per round.
    assert config["lr_schedule_steps"] == 24
    lr = config["lr_per_layer"]["layer_1"]
    assert [m["lr"] for m in curve] == pytest.approx([lr * lr_factor(m["step"] - 1, 2, "linear", 24) for m in curve])
    assert run.main([recipe_file(root, tiny_model_dir, tiny_text_dir)]) == 0  # a rerun: nothing left to do
    assert "stopping after 3 round(s)" in capsys.readouterr().out


@pytest.mark.slow
def test_rounds_under_torchrun_equal_one_process(single, tmp_path, tiny_model_dir, tiny_text_dir):
    """2 ranks: each window collected data-parallel into one store, its layers trained one per rank."""
    root = tmp_path / "dist"
    job = Job(torchrun(2, "pipelines.run", [recipe_file(root, tiny_model_dir, tiny_text_dir)]), tmp_path / "log").ok()
    assert job.stdout.count("stopping after 3 round(s)") == 1 and job.stdout.count("== tiny-rounds") == 1  # rank 0 alone
    assert json.loads((root / "saes" / "rounds.json").read_text())["done"] == 2
    ref, got = ActivationStore(single[0] / "acts.zarr"), ActivationStore(root / "acts.zarr")
    assert got.meta["data"]["fingerprint"] == ref.meta["data"]["fingerprint"]
    assert torch.equal(got.read("layer_2", 0, got.num_tokens), ref.read("layer_2", 0, ref.num_tokens))
    for layer in ("layer_1", "layer_2"):
        a = load_file(single[0] / "saes" / "round_0002" / layer / "sae.safetensors")
        b = load_file(root / "saes" / "round_0002" / layer / "sae.safetensors")
        for name in a:
            torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0, msg=f"{layer}/{name}")


def test_a_rerun_checks_the_store_against_the_recipe(tmp_path, tiny_model_dir, tiny_text_dir, capsys):
    recipes = recipe_file(tmp_path, tiny_model_dir, tiny_text_dir).rpartition(":")[0]
    assert run.main([f"{recipes}:once"]) == 0
    capsys.readouterr()
    assert run.main([f"{recipes}:once"]) == 0  # the same recipe again: the store is complete
    out = capsys.readouterr().out
    assert f"checking activations in {tmp_path / 'acts.zarr'}" in out and "384 tokens in the store" in out
    before = (tmp_path / "acts.zarr" / "manifest.json").read_bytes()
    assert run.main([f"{recipes}:once_other_layers"]) == 2  # not trained on a store of other layers
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume") and "arrays.layer_0 differs" in err, err
    assert err.rstrip().endswith(f"(for this recipe: delete {tmp_path / 'acts.zarr'} to collect it afresh)")
    assert (tmp_path / "acts.zarr" / "manifest.json").read_bytes() == before


def test_rounds_refuse_windows_that_would_overlap_or_change(tmp_path, tiny_model_dir, tiny_text_dir, capsys):
    recipes = recipe_file(tmp_path, tiny_model_dir, tiny_text_dir).rpartition(":")[0]
    assert run.main([f"{recipes}:ragged"]) == 2
    assert capsys.readouterr().err == (
        "error: recipe tiny-rounds: its window of 400 tokens per round is not a whole number of 32-token sequences, "
        "so rounds would overlap; make collect.max_tokens a multiple of collect.ctx_len\n")
    assert not (tmp_path / "acts.zarr").exists()
    assert run.main([f"{recipes}:twice"]) == 0
    capsys.readouterr()
    assert run.main([f"{recipes}:wider"]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'saes' / 'rounds.json'}: its 2 finished round(s) trained on windows of 384 tokens, and "
        "recipe tiny-rounds has windows of 256, which would train some tokens again or skip some; keep the window, "
        "or start afresh in another train.out\n")


def test_a_recipe_file_like_presets(tmp_path):
    """presets.py is the template a user copies: its dataclasses (under postponed annotations) load."""
    import shutil

    shutil.copy(Path(run.__file__).with_name("presets.py"), tmp_path / "mine.py")
    recipe = run.load_recipe(f"{tmp_path / 'mine.py'}:tiny_debug")
    assert recipe.name == "tiny-debug" and recipe.collect.layers == "0,1"


@pytest.mark.parametrize(
    "arg, message",
    [
        ("nope", "unknown recipe 'nope'; pass one of llama3-8b-32x, smollm2-demo, tiny-debug, or FILE.py:FUNCTION"),
        ("missing.py:f", "recipe file missing.py does not exist"),
        ("{file}:other", "has no function 'other'; name a function that returns a Recipe"),
        ("{file}:number", ":number returned int, not a pipelines.presets.Recipe"),
    ],
)
def test_bad_recipe(tmp_path, capsys, arg, message):
    file = tmp_path / "r.py"
    file.write_text("def number():\n    return 3\n")
    assert run.main([arg.format(file=file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
