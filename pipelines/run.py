"""Run a named recipe end to end: `python -m pipelines.run smollm2-demo`.

Collection resumes an unfinished store and is skipped when the store is complete; training
starts afresh (or resumes with --resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from sae_core import UserError
from sae_core.store import ActivationStore

from .presets import PRESETS


def run(name: str, *, resume_training: bool = False) -> int:
    recipe = PRESETS[name]()
    print(f"== {recipe.name}: {recipe.description}")
    from actcache import collect
    from saetrain import fit

    t0 = time.perf_counter()
    c = recipe.collect
    done = c.out.exists() and ActivationStore(c.out).complete
    if done:
        print(f"== activations: {c.out} is complete, skipping collection")
    else:
        print(f"== collecting activations into {c.out}")
        res = collect(dataclasses.replace(c, resume=c.out.exists()))
        print(f"   {res.tokens_written:,} tokens in {res.seconds:.0f}s")
    print(f"== training SAEs into {recipe.train.out}")
    t = dataclasses.replace(recipe.train, resume=resume_training, overwrite=not resume_training)
    fit_res = fit(t)
    print(f"== done in {time.perf_counter() - t0:.0f}s: {fit_res.steps} steps, {fit_res.tokens:,} training tokens")
    if fit_res.heldout_fvu:
        print("   held-out FVU per layer:")
        for layer, fvu in fit_res.heldout_fvu.items():
            print(f"     {layer:<10} {fvu:.4f}")
    print(f"   SAEs: {fit_res.out}/<layer>/  (load with Sae.load_many('{fit_res.out}', local=True))")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", choices=sorted(PRESETS))
    p.add_argument("--resume-training", action="store_true", help="continue the last training checkpoint")
    args = p.parse_args(argv)
    try:
        return run(args.recipe, resume_training=args.resume_training)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
