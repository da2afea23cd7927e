"""Training recipe choices, compared by the held-out FVU of the same run with one choice changed.

Two choices, as a grid: the encoder's starting row norm (`--norms`; `saetrain` starts the encoder
as the unit-norm decoder's transpose scaled to `saetrain.trainer.ENCODER_INIT_NORM`, 1/sqrt(3), the
row norm of the Kaiming-uniform encoder EleutherAI's sparsify starts from) and the lr after its
warmup (`--lr-schedules`: constant, linear, cosine). This trains the layers of a store once per
pair through `saetrain.fit`, everything else equal (data order, held-out chunks, lr), and prints
the held-out FVU, the mean training FVU of the last 20 steps and the held-out latents that never
fire.

    python -m benchmarks.fit_quality --store acts.zarr [--norms 1,0.577,0.3] [--lr-schedules constant,linear]
                                     [--epochs 3 --lr-warmup-steps 50]

(`actcache collect --layers 9,15 --max-tokens 300000 --ctx-len 256 --out acts.zarr` makes the
store of docs/benchmarks.md.)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fit_quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--layers", default=None, help="as saetrain fit --layers (default: all)")
    p.add_argument("--norms", default=None, help="comma-separated encoder row norms (default: saetrain's)")
    p.add_argument("--lr-schedules", default="constant", help="comma-separated --lr-schedule values")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--expansion-factor", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr-warmup-steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=None, help="as saetrain fit --lr (default: its scaling law)")
    p.add_argument("--holdout", type=float, default=0.05)
    p.add_argument("--exclude-first-tokens", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    return p.parse_args(argv)


@torch.no_grad()
def never_fired(saes: dict, store, chunks: list[int], exclude_first_tokens: int) -> dict[str, float]:
    """Per SAE, the fraction of latents that no held-out token (as the evaluation reads them) selects."""
    from saetrain.loader import StoreLoader

    fired = {n: torch.zeros(sae.num_latents, dtype=torch.bool) for n, sae in saes.items()}
    loader = StoreLoader(store, list(saes), chunks, seed=0, window=len(chunks), exclude_first_tokens=exclude_first_tokens)
    for batch in loader.batches(0, 4096):
        for n, sae in saes.items():
            fired[n][sae.encode(batch.acts[n].float()).top_indices.flatten()] = True
    return {n: 1 - f.float().mean().item() for n, f in fired.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    import saetrain.trainer as trainer
    from sae_core import Sae
    from sae_core.store import ActivationStore
    from saetrain import TrainConfig, fit

    if args.threads:
        torch.set_num_threads(args.threads)
    norms = [float(n) for n in args.norms.split(",")] if args.norms else [trainer.ENCODER_INIT_NORM]
    store = ActivationStore(args.store)
    default, rows = trainer.ENCODER_INIT_NORM, []
    with tempfile.TemporaryDirectory(prefix="fit-quality-") as tmp:
        try:
            for norm in norms:
                for schedule in args.lr_schedules.split(","):
                    trainer.ENCODER_INIT_NORM = norm
                    out = Path(tmp) / f"norm{norm}-{schedule}"
                    res = fit(TrainConfig(
                        store=args.store, out=out, layers=args.layers, k=args.k, expansion_factor=args.expansion_factor,
                        batch_size=args.batch_size, epochs=args.epochs, lr_warmup_steps=args.lr_warmup_steps,
                        lr=args.lr, lr_schedule=schedule, holdout=args.holdout, exclude_first_tokens=args.exclude_first_tokens,
                        progress=False,
                    ))
                    config = json.loads((out / "config.json").read_text())
                    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                    dead = never_fired(Sae.load_many(out, local=True), store, config["holdout_chunks"],
                                       args.exclude_first_tokens)
                    for layer, fvu in res.heldout_fvu.items():
                        last = [m["fvu"] for m in metrics if m["layer"] == layer][-20:]
                        rows.append((layer, norm, schedule, fvu, sum(last) / len(last), dead[layer]))
        finally:
            trainer.ENCODER_INIT_NORM = default
    print(f"\n{'layer':>10} {'row norm':>9} {'lr schedule':>12} {'held-out FVU':>13} {'train FVU (last 20)':>20} "
          f"{'never fire':>11}")
    for layer, norm, schedule, fvu, train, dead in sorted(rows, key=lambda r: (r[0], -r[1])):
        print(f"{layer:>10} {norm:>9.3f} {schedule:>12} {fvu:>13.4f} {train:>20.4f} {dead:>10.1%}")
    print(f"\nreproduce with:\n  python -m benchmarks.fit_quality {shlex.join(sys.argv[1:] if argv is None else argv)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
