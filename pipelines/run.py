"""Run a named recipe end to end: `python -m pipelines.run smollm2-demo`.

A recipe is a preset (`presets.PRESETS`) or your own, `python -m pipelines.run my_recipes.py:sweep`:
a function in a Python file that returns a `pipelines.presets.Recipe`.

Collection resumes an unfinished store and writes nothing into a complete one (a store collected
with other settings is refused); training starts afresh (or continues with --resume-training).
A recipe in rounds (`Recipe.rounds`) collects one
window of the data at a time into the same store and trains `saes/round_N` from `round_N-1`;
`saes/rounds.json` records the last finished round, so a rerun continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

from actcache import CollectConfig, DataExhausted, collect
from sae_core import UserError
from sae_core.config import as_path
from sae_core.distributed import barrier, init_distributed
from sae_core.store import ActivationStore
from sae_core.store.manifest import atomic_write
from saetrain import TrainConfig, fit
from saetrain.schedule import most_steps

from .presets import PRESETS, Recipe


def load_recipe(name: str) -> Recipe:
    """A preset by name, or `FILE.py:FUNCTION`: the Recipe that FUNCTION in FILE returns."""
    if name in PRESETS:
        return PRESETS[name]()
    file, sep, func = name.rpartition(":")
    if not (sep and file.endswith(".py")):
        raise UserError(
            f"unknown recipe {name!r}; pass one of {', '.join(sorted(PRESETS))}, or FILE.py:FUNCTION returning a "
            "pipelines.presets.Recipe"
        )
    path = as_path(file)
    if not path.is_file():
        raise UserError(f"recipe file {file} does not exist; check the path")
    spec = importlib.util.spec_from_file_location(f"recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: dataclasses in the file look their module up
    spec.loader.exec_module(module)  # its own errors keep their traceback: it is the user's code
    make = getattr(module, func, None)
    if not callable(make):
        raise UserError(f"recipe file {file} has no function {func!r}; name a function that returns a Recipe")
    recipe = make()
    # A Recipe, or one of a copy of presets.py: what counts is its two configs.
    if not (isinstance(getattr(recipe, "collect", None), CollectConfig)
            and isinstance(getattr(recipe, "train", None), TrainConfig)):
        raise UserError(f"{name} returned {type(recipe).__name__}, not a pipelines.presets.Recipe")
    return recipe


def run(name: str, *, resume_training: bool = False) -> int:
    recipe = load_recipe(name)
    say(f"== {recipe.name}: {recipe.description}")
    init_distributed()  # under torchrun: the ranks look at the store together (barriers below)
    if recipe.rounds > 1:
        return run_rounds(recipe)
    t0 = time.perf_counter()
    _collect(recipe.collect)
    say(f"== training SAEs into {recipe.train.out}")
    t = dataclasses.replace(recipe.train, resume=resume_training, overwrite=not resume_training)
    fit_res = fit(t)
    say(f"== done in {time.perf_counter() - t0:.0f}s: {fit_res.steps} steps, {fit_res.tokens:,} training tokens")
    _report(fit_res)
    return 0


def say(*args, **kwargs) -> None:
    """print, on rank 0 alone under torchrun."""
    if os.environ.get("RANK", "0") == "0":
        print(*args, **kwargs)


def _collect(c, *, replace: bool = False) -> None:
    """Collect `c.out`. A store already there is resumed, or found complete, if it was collected with
    the recipe's settings (refused otherwise); `replace` collects it afresh."""
    exists = Path(c.out).exists()
    barrier()  # every rank has looked before rank 0 creates or replaces the store
    say(f"== {'checking' if exists and not replace else 'collecting'} activations in {c.out}")
    try:
        res = collect(dataclasses.replace(c, resume=exists and not replace, overwrite=exists and replace))
    except UserError as e:
        if str(e).startswith("cannot resume"):  # the store was collected with other settings
            raise UserError(f"{e} (for this recipe: delete {c.out} to collect it afresh)") from None
        raise
    say(f"   {res.tokens_committed:,} tokens in the store ({res.seconds:.0f}s)")


def _report(fit_res) -> None:
    if fit_res.heldout_fvu:
        say("   held-out FVU per layer:")
        for layer, fvu in fit_res.heldout_fvu.items():
            say(f"     {layer:<10} {fvu:.4f}")
    say(f"   SAEs: {fit_res.out}/<layer>/  (load with Sae.load_many('{fit_res.out}', local=True))")


def run_rounds(recipe: Recipe) -> int:
    """Collect window r of the data into the store, train round r from round r-1, repeat."""
    t0 = time.perf_counter()
    rank, _ = init_distributed()
    runs = Path(recipe.train.out)
    progress = runs / "rounds.json"
    state = json.loads(progress.read_text()) if progress.is_file() else {"done": -1}
    done = state["done"]
    window, ctx_len = recipe.collect.max_tokens, recipe.collect.ctx_len
    if not window:
        raise UserError(f"recipe {recipe.name} runs in rounds but sets no collect.max_tokens (the window per round)")
    if window % ctx_len:  # collection rounds a window up to whole sequences: the next round's would overlap it
        raise UserError(f"recipe {recipe.name}: its window of {window:,} tokens per round is not a whole number of "
                        f"{ctx_len}-token sequences, so rounds would overlap; make collect.max_tokens a multiple of "
                        f"collect.ctx_len")
    if state.get("window", window) != window:
        raise UserError(f"{progress}: its {done + 1} finished round(s) trained on windows of {state['window']:,} "
                        f"tokens, and recipe {recipe.name} has windows of {window:,}, which would train some tokens "
                        f"again or skip some; keep the window, or start afresh in another train.out")
    train = recipe.train
    if train.lr_schedule != "constant" and not train.lr_schedule_steps:  # one decay over every round
        per_round = most_steps(window, train.batch_size, train.epochs, train.max_tokens)
        train = dataclasses.replace(train, lr_schedule_steps=recipe.rounds * per_round)
    fit_res = None
    for r in range(done + 1, recipe.rounds):
        c = dataclasses.replace(recipe.collect, skip_tokens=r * window)
        say(f"== round {r + 1}/{recipe.rounds}: tokens {c.skip_tokens:,} to {c.skip_tokens + window:,}")
        same = _store_window(c.out) == c.skip_tokens
        barrier()  # every rank has looked before rank 0 replaces the store
        try:
            _collect(c, replace=not same)
        except DataExhausted:
            say(f"   the data ends before token {c.skip_tokens:,}: stopping after {r} round(s)")
            break
        out = runs / f"round_{r:04d}"
        prev = runs / f"round_{r - 1:04d}" if r else None
        fit_res = fit(dataclasses.replace(train, out=out, init_from=prev, resume=out.exists()))
        if rank == 0:
            # The round folders go, their metrics stay: metrics/round_N.jsonl (+ .eval.json), one curve in order.
            (runs / "metrics").mkdir(exist_ok=True)
            for name, keep in (("metrics.jsonl", f"round_{r:04d}.jsonl"), ("eval.json", f"round_{r:04d}.eval.json")):
                if (out / name).is_file():
                    atomic_write(runs / "metrics" / keep, (out / name).read_text())
            atomic_write(progress, json.dumps({"done": r, "latest": str(out), "window": window}) + "\n")
            for old in runs.glob("round_*"):  # round r's checkpoint holds everything round r+1 needs
                if old != out:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()
    say(f"== done in {time.perf_counter() - t0:.0f}s")
    if fit_res is not None:
        _report(fit_res)
    elif progress.is_file():
        say(f"   SAEs of the last finished round: {json.loads(progress.read_text())['latest']}/<layer>/")
    return 0


def _store_window(path: Path) -> int | None:
    """The --skip-tokens of the store at `path`, or None when there is no readable store."""
    if not path.exists():
        return None
    try:
        return ActivationStore(path).meta["data"].get("skip_tokens", 0)
    except UserError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.run", description=__doc__.splitlines()[0])
    p.add_argument("recipe", help=f"one of {', '.join(sorted(PRESETS))}, or FILE.py:FUNCTION returning a Recipe")
    p.add_argument("--resume-training", action="store_true", help="continue the last training checkpoint (a recipe in rounds always continues where it stopped)")

    def one_line(message: str):  # as the other CLIs: one line, exit code 2
        print(f"error: {message}; see `python -m pipelines.run --help`", file=sys.stderr)
        raise SystemExit(2)

    p.error = one_line
    args = p.parse_args(argv)
    try:
        return run(args.recipe, resume_training=args.resume_training)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
