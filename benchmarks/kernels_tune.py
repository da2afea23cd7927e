"""Tile sizes of the Triton kernels, swept on a CUDA GPU: which entry of `sae_core.kernels.TILES` is fastest.

The kernels use fixed tiles (`TILES`: no autotuning, which the CPU interpreter cannot run and
which would make the first training step slow). This times each kernel at one shape (default the
Llama-3-8B SAE: d_in 4096, 131072 latents, k 192, 8192 tokens) over a short list of tilings, each
of which compiles without spills (tests/test_kernels_compile.py), for bf16 (the training path
under autocast: the gathers read bf16 copies of the weights, and scatter_rows sums bf16 gradient
rows) and fp32 (training without autocast; the encoder's scatter_rows sums fp32 inputs), and
prints them fastest first with GB/s against the minimum traffic, the default marked, and the
`TILES` entry to adopt; then the same for `SEGMENT_CHUNK`, the pieces `scatter_rows` sums a long
segment in, on indices where a few latents are in most tokens (popularity ~ rank^-1).

    python -m benchmarks.kernels_tune [--shape llama3-8b] [--dtypes bf16,fp32] [--skew 0]

Needs a CUDA GPU; on a machine without one it prints one line and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

import torch

from benchmarks import kernels as bench

# Tilings to try per kernel (the defaults of sae_core.kernels.TILES are added): tile shapes with
# plain loads, then software pipelining (STAGES 2, 3) of the default tile and of a narrower one.
CANDIDATES = {
    "gather_sum": [
        dict(BLOCK_N=n, BLOCK_D=dd, STAGES=st, num_warps=w)
        for n, dd, st, w in [(4, 512, 1, 4), (8, 256, 1, 4), (8, 512, 1, 4), (16, 256, 1, 8), (16, 512, 1, 8),
                             (32, 128, 1, 4), (32, 256, 1, 8),
                             (16, 256, 2, 4), (16, 256, 3, 4), (8, 256, 2, 4), (8, 256, 3, 4)]
    ],
    "gather_dot": [
        dict(BLOCK_K=kk, BLOCK_D=dd, STAGES=st, num_warps=w)
        for kk, dd, st, w in [(16, 128, 1, 4), (16, 256, 1, 4), (32, 64, 1, 4), (32, 256, 1, 8), (64, 64, 1, 4),
                              (64, 128, 1, 8), (128, 64, 1, 8),
                              (32, 128, 2, 4), (32, 128, 3, 4), (64, 64, 2, 4), (64, 64, 3, 4)]
    ],
    "scatter_rows": [
        dict(BLOCK_S=s, BLOCK_D=dd, STAGES=st, num_warps=w)
        for s, dd, st, w in [(4, 512, 1, 4), (8, 256, 1, 4), (8, 512, 1, 4), (16, 128, 1, 4), (16, 512, 1, 8),
                             (32, 128, 1, 8), (32, 256, 1, 8),
                             (16, 256, 2, 4), (16, 256, 3, 4), (8, 256, 2, 4), (8, 256, 3, 4)]
    ],
}


# Pieces scatter_rows sums a latent's segment in (sae_core.kernels.SEGMENT_CHUNK), timed on skewed
# indices (a few latents in most tokens), where they matter; the default is added.
CHUNKS = [64, 128, 256, 1024, 2048, 8192]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels_tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(bench.SHAPES))
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated, of bf16, fp32")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--skew", type=float, default=0.0, help="power-law exponent of latent popularity (0: uniform)")
    p.add_argument("--min-time", type=float, default=0.05, help="seconds of repetitions per tiling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-json")
    args = p.parse_args(argv)
    args.dtypes = [s.strip() for s in args.dtypes.split(",") if s.strip()]
    for s in args.dtypes:
        if s not in bench.DTYPES:
            p.error(f"unknown dtype {s!r}; choose from {', '.join(bench.DTYPES)}")
    return args


def sweep(op: str, call, min_time: float) -> list[tuple[dict, float]]:
    """(tiling, median ms) of `call()` under each candidate tiling of `op`, fastest first."""
    from sae_core import kernels

    default = dict(kernels.TILES[op])
    tried = [default] + [c for c in CANDIDATES[op] if c != default]
    out = []
    try:
        for tiling in tried:
            kernels.TILES[op] = tiling
            out.append((tiling, bench.cuda_time(call, min_time)))
    finally:
        kernels.TILES[op] = default
    return sorted(out, key=lambda r: r[1])


def tune(cfg: dict, N: int, dname: str, args) -> list[dict]:
    """Sweep the three kernels at one shape and dtype; print each table and return its records."""
    from sae_core import kernels

    d, L, k = cfg["d"], cfg["latents"], cfg["k"]
    dtype = bench.DTYPES[dname]
    idx, acts, W, gy = bench.make_inputs(cfg, N, dtype, args.skew, args.seed)
    records = []
    for op, call_args in bench.primitive_args(idx, acts, W, gy, L).items():
        nbytes = bench.min_traffic(op, N, k, d, L, W.element_size())
        fn = getattr(kernels, f"triton_{op}")
        results = sweep(op, lambda fn=fn, call_args=call_args: fn(*call_args), args.min_time)
        default_ms = next(ms for t, ms in results if t == kernels.TILES[op])
        print(f"\n== {op}, {dname}  (minimum traffic {nbytes / 1e9:.2f} GB)")
        for tiling, ms in results:
            mark = "  <- default" if tiling == kernels.TILES[op] else ""
            print(f"  {str(tiling):<64}{ms:9.3f} ms {nbytes / ms / 1e6:8.0f} GB/s {default_ms / ms:6.2f}x{mark}")
            records.append(dict(op=op, dtype=dname, tiling=tiling, ms=ms, gbps=nbytes / ms / 1e6))
        best, best_ms = results[0]
        print(f"  best: TILES[{op!r}] = {best}  ({default_ms / best_ms:.2f}x the default)")
    records += tune_chunk(cfg, N, dname, acts, gy, args)
    return records


def tune_chunk(cfg: dict, N: int, dname: str, acts, gy, args) -> list[dict]:
    """Sweep SEGMENT_CHUNK for scatter_rows on indices of popularity ~ rank^-max(skew, 1)."""
    from sae_core import kernels

    d, L, k = cfg["d"], cfg["latents"], cfg["k"]
    skew = max(args.skew, 1.0)
    idx = bench.sample_indices(N, L, k, skew, torch.Generator(device=bench.DEVICE).manual_seed(args.seed + 1))
    longest = int(torch.bincount(idx.reshape(-1), minlength=L).max())
    nbytes = bench.min_traffic("scatter_rows", N, k, d, L, gy.element_size())
    default = kernels.SEGMENT_CHUNK
    results = []
    try:
        for chunk in [default] + [c for c in CHUNKS if c != default]:
            kernels.SEGMENT_CHUNK = chunk
            results.append((chunk, bench.cuda_time(lambda: kernels.triton_scatter_rows(idx, acts.float(), gy, L),
                                                   args.min_time)))
    finally:
        kernels.SEGMENT_CHUNK = default
    results.sort(key=lambda r: r[1])
    default_ms = dict(results)[default]
    print(f"\n== scatter_rows SEGMENT_CHUNK, {dname}, skew {skew:g} (the most selected latent in {longest:,} of {N:,} tokens)")
    for chunk, ms in results:
        mark = "  <- default" if chunk == default else ""
        print(f"  {chunk:<64}{ms:9.3f} ms {nbytes / ms / 1e6:8.0f} GB/s {default_ms / ms:6.2f}x{mark}")
    print(f"  best: SEGMENT_CHUNK = {results[0][0]}  ({default_ms / results[0][1]:.2f}x the default)")
    return [dict(op="scatter_rows", dtype=dname, tiling=dict(SEGMENT_CHUNK=c), skew=skew, ms=ms, gbps=nbytes / ms / 1e6)
            for c, ms in results]


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.kernels_tune: no CUDA GPU here; these are GPU timings, run it on a machine with one",
              file=sys.stderr)
        return 1
    cfg = bench.SHAPES[args.shape]
    d, L, k, N = cfg["d"], cfg["latents"], cfg["k"], args.tokens
    print(f"GPU {torch.cuda.get_device_name(0)}; {args.shape}: d_in {d}, latents {L}, k {k}, tokens {N}, "
          f"skew {args.skew}")
    cmd = "python -m benchmarks.kernels_tune " + shlex.join(sys.argv[1:] if argv is None else argv)
    records = []
    for dname in args.dtypes:
        records += tune(cfg, N, dname, args)
        torch.cuda.empty_cache()
        if args.out_json:  # after every dtype, so that a run stopped at a time limit keeps its numbers
            with open(args.out_json, "w") as f:
                json.dump(dict(command=cmd, args=vars(args), records=records), f, indent=1)
    print(f"\nreproduce: {cmd.rstrip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
