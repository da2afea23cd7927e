"""AuxK, dense over the dead latents vs sparse products: an SAE training step's time per dead fraction.

`Sae.forward` computes the AuxK loss (the top k_aux = d_in / 2 dead latents predicting the
residual) dense over the dead part of the dictionary while there are at most
`sae_core.sae.AUXK_DENSE_RATIO[device]` dead latents per selected one, else with the sparse
products of the main top-k. This times forward + backward of fvu + auxk_loss / 32 both ways,
alternating them, for several dead fractions, and prints the ratio and which way the threshold
picks ("per select": dead latents per selected one, num_dead / min(k_aux, num_dead)).

    python -m benchmarks.auxk [--device cpu] [--d-in 576 --latents 4608 --k 32 --tokens 1024]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.auxk", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--latents", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--dead-fracs", default="0.01,0.1,0.3,0.6,1.0", help="comma-separated fractions of latents dead")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per way and fraction (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import sae_core.sae as sae_module
    from sae_core import Sae, SaeConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    sae = Sae(args.d_in, SaeConfig(num_latents=args.latents, k=args.k), device=device)
    x = torch.randn(args.tokens, args.d_in, device=device)
    autocast = device.type == "cuda"
    k_aux = max(args.d_in // 2, 1)
    threshold = dict(sae_module.AUXK_DENSE_RATIO)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(dead):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = sae(x, dead_mask=dead)
            loss = out.fvu + out.auxk_loss / 32
        loss.backward()
        sae.zero_grad(set_to_none=True)

    print(f"{device.type}: d_in {args.d_in}, latents {args.latents}, k {args.k}, tokens {args.tokens}, "
          f"k_aux {k_aux}, threads {torch.get_num_threads()}; AUXK_DENSE_RATIO {threshold}")
    print(f"{'dead':>7} {'per select':>10} {'sparse ms':>10} {'dense ms':>9} {'dense speedup':>14}  threshold picks")
    g = torch.Generator().manual_seed(args.seed)
    try:
        for frac in (float(f) for f in args.dead_fracs.split(",")):
            dead = torch.zeros(args.latents, dtype=torch.bool)
            dead[torch.randperm(args.latents, generator=g)[: max(1, int(frac * args.latents))]] = True
            dead = dead.to(device)
            num_dead = int(dead.sum())
            times = {"sparse": [], "dense": []}
            for rep in range(args.repeats + 2):
                for way, ratio in (("sparse", 0), ("dense", 10**12)):
                    sae_module.AUXK_DENSE_RATIO = {device.type: ratio}
                    sync()
                    t0 = time.perf_counter()
                    step(dead)
                    sync()
                    if rep >= 2:
                        times[way].append(1e3 * (time.perf_counter() - t0))
            sparse, dense = statistics.median(times["sparse"]), statistics.median(times["dense"])
            kk = min(k_aux, num_dead)
            picks = "dense" if num_dead <= threshold.get(device.type, 8) * kk else "sparse"
            print(f"{num_dead:>7} {num_dead / kk:>10.1f} {sparse:>10.1f} {dense:>9.1f} {sparse / dense:>13.2f}x  {picks}")
    finally:
        sae_module.AUXK_DENSE_RATIO = threshold
    print("\nreproduce: python -m benchmarks.auxk " + shlex.join(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
