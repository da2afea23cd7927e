"""The sparse primitives on a CUDA GPU: Triton kernels vs the torch reference vs dense matmuls.

One run prints, for each shape (`llama3-8b`: d_in 4096, 131072 latents, k 192; `small`: d_in 576,
4608 latents, k 32; 8192 tokens by default) and dtype (bf16, fp32):

  1. correctness of each Triton kernel against the torch reference and an exact reference
     (fp32 math on the bf16 inputs; fp64 math on the fp32 inputs), normwise relative error;
  2. time of each primitive (`gather_sum` = decoder forward, `gather_dot` = decoder backward to
     the activations, `scatter_rows` = decoder backward to W_dec) for `triton`
     (sae_core.kernels), `torch` (sae_core.ops.torch_*) and `dense` (the matmul a dense decoder
     does instead: Z @ W, (G @ W.T).gather, Z.T @ G, with Z the dense (tokens, latents) codes,
     built outside the timing), and the whole sparse decoder forward+backward
     (`sae_core.decode.decode` with SAE_CORE_KERNELS=triton / torch) against dense Z @ W_dec
     forward+backward. Each line gives the achieved TFLOP/s (useful FLOPs: 2*tokens*k*d per
     sparse product, 2*tokens*latents*d per dense one) and GB/s (the minimum traffic: each
     gathered row read once per selection, so L2 hits can take it past HBM's peak) beside the roofline (H200 by default:
     989 TFLOP/s dense bf16, 67 TFLOP/s fp32 without tensor cores, 4.8 TB/s HBM; the sparse
     kernels are gathers, bound by bandwidth, so GB/s against HBM is their figure of merit);
  3. a whole SAE training step, in tokens/s: `sae_core.Sae.forward` (bf16 autocast, fp32
     weights) + backward + decoder-gradient projection + fused Adam + decoder renorm, with the
     Triton primitives (gathering bf16 copies of the weights, the default under autocast, and
     gathering the fp32 weights: `sae_core.sae.AUTOCAST_GATHERS`) and the torch ones, against
     EleutherAI's `sparsify.SparseCoder` doing the same step when eai-sparsify is importable
     (skipped otherwise); once without dead latents and once with `--dead-frac` of them dead,
     so that AuxK (k_aux = d_in / 2) runs.

Indices are sampled like top-k selections (k distinct latents per token); `--skew s` makes
latent popularity follow a power law of exponent s (0 = uniform), which lengthens the segments
`scatter_rows` sums. Timings are CUDA-event medians after warm-up, without flushing L2 between
repetitions. Needs a CUDA GPU with triton; on a machine without one it prints one line and exits
with status 1. Ends with the command that reproduces the run; `--out-json` saves every number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import statistics
import sys
import time
from unittest import mock

import torch

SHAPES = {
    "llama3-8b": dict(d=4096, latents=131072, k=192),
    "small": dict(d=576, latents=4608, k=32),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# H200 SXM datasheet figures (dense, no sparsity): the roofline printed beside each number.
H200 = dict(bf16_tflops=989.0, tf32_tflops=494.0, fp32_tflops=67.0, hbm_gbps=4800.0)
# Where everything runs; main() insists on CUDA. (A smoke test may set "cpu" and call the sections
# under TRITON_INTERPRET=1 with a tiny shape.)
DEVICE = "cuda"
# Normwise relative error a kernel may have against the exact reference.
CHECK_TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-5}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shapes", default="llama3-8b,small", help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated, of bf16, fp32")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per batch")
    p.add_argument("--skew", type=float, default=0.0, help="power-law exponent of latent popularity (0: uniform)")
    p.add_argument("--straggler-skew", type=float, default=1.0,
                   help="with --skew 0, also time scatter_rows on indices of this skew (0: skip), where one latent "
                        "is in most tokens: split into pieces (the default) and summed whole by one program")
    p.add_argument("--min-time", type=float, default=0.25, help="seconds of repetitions per measurement (at least 3)")
    p.add_argument("--train-steps", type=int, default=10, help="timed training steps per configuration")
    p.add_argument("--train-warmup", type=int, default=3, help="untimed training steps first")
    p.add_argument("--dead-frac", type=float, default=0.1, help="fraction of dead latents in the AuxK configuration")
    p.add_argument("--skip-check", action="store_true", help="skip the correctness check")
    p.add_argument("--skip-primitives", action="store_true", help="skip the primitive timings")
    p.add_argument("--skip-train", action="store_true", help="skip the training-step timings")
    p.add_argument("--tf32", action="store_true", help="allow TF32 in the dense fp32 matmuls (roofline 494 TFLOP/s)")
    p.add_argument("--peak-tflops-bf16", type=float, default=H200["bf16_tflops"])
    p.add_argument("--peak-tflops-fp32", type=float, default=None, help="default: 67 (494 with --tf32)")
    p.add_argument("--peak-gbps", type=float, default=H200["hbm_gbps"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-json", help="also write every number to this JSON file")
    args = p.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    args.dtypes = [s.strip() for s in args.dtypes.split(",") if s.strip()]
    for s in args.shapes:
        if s not in SHAPES:
            p.error(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    for s in args.dtypes:
        if s not in DTYPES:
            p.error(f"unknown dtype {s!r}; choose from {', '.join(DTYPES)}")
    if args.peak_tflops_fp32 is None:
        args.peak_tflops_fp32 = H200["tf32_tflops"] if args.tf32 else H200["fp32_tflops"]
    return args


# ------------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def kernels_env(value: str):
    """SAE_CORE_KERNELS=value inside the block (sae_core.ops reads it at every call)."""
    old = os.environ.get("SAE_CORE_KERNELS")
    os.environ["SAE_CORE_KERNELS"] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ["SAE_CORE_KERNELS"]
        else:
            os.environ["SAE_CORE_KERNELS"] = old


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def cuda_time(fn, min_time: float, warmup: int = 2, max_reps: int = 200) -> float:
    """Median milliseconds of `fn()` over at least 3 repetitions and about `min_time` seconds."""
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    while len(times) < 3 or (sum(times) < 1e3 * min_time and len(times) < max_reps):
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def sample_indices(tokens: int, latents: int, k: int, skew: float, gen: torch.Generator) -> torch.Tensor:
    """`(tokens, k)` distinct latents per token, like top-k; popularity ~ rank^-skew (Gumbel top-k)."""
    logits = None
    if skew > 0:
        rank = torch.randperm(latents, device=DEVICE, generator=gen).float() + 1
        logits = -skew * rank.log()
    out = torch.empty(tokens, k, dtype=torch.long, device=DEVICE)
    chunk = max(1, (1 << 27) // latents)
    for s in range(0, tokens, chunk):
        n = min(chunk, tokens - s)
        u = torch.rand(n, latents, device=DEVICE, generator=gen).clamp_min_(1e-20)
        score = -(-u.log()).log()  # Gumbel noise
        if logits is not None:
            score += logits
        out[s : s + n] = score.topk(k, dim=-1, sorted=False).indices
    return out


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((a.double() - ref).norm() / ref.norm().clamp_min(1e-300))


class Report:
    def __init__(self, args):
        self.args = args
        self.records: list[dict] = []
        self.failures: list[str] = []

    def peak_tflops(self, dtype: torch.dtype) -> float:
        return self.args.peak_tflops_bf16 if dtype == torch.bfloat16 else self.args.peak_tflops_fp32

    def timing(self, shape, dtype, op, impl, ms, flops, nbytes, dense_ms=None):
        tflops = flops / ms / 1e9
        gbps = nbytes / ms / 1e6
        rec = dict(kind="primitive", shape=shape, dtype=str(dtype)[6:], op=op, impl=impl, ms=ms, flops=flops,
                   bytes=nbytes, tflops=tflops, gbps=gbps, speedup_vs_dense=(dense_ms / ms) if dense_ms else None)
        self.records.append(rec)
        speed = f"{dense_ms / ms:8.1f}x" if dense_ms else " " * 9
        print(f"  {op:<22}{impl:<8}{ms:10.3f}{tflops:10.2f}{100 * tflops / self.peak_tflops(dtype):8.1f}%"
              f"{gbps:10.0f}{100 * gbps / self.args.peak_gbps:8.1f}%{speed}")


def timing_header(report: Report, dtype: torch.dtype):
    print(f"  {'op':<22}{'impl':<8}{'ms':>10}{'TFLOP/s':>10}{'%peak':>9}{'GB/s':>10}{'%HBM':>9}{'vs dense':>9}")
    print(f"  (roofline: {report.peak_tflops(dtype):.0f} TFLOP/s {str(dtype)[6:]} dense, {report.args.peak_gbps:.0f} GB/s HBM)")


def min_traffic(op: str, N: int, k: int, d: int, L: int, e: int) -> int:
    """Bytes a primitive must move at least: each gathered row read once per selection (element
    size `e`), indices (8 bytes) and weights read once, the output written once (scatter_rows: fp32)."""
    if op in ("gather_sum", "gather_dot"):
        return N * k * (d * e + 8 + e) + N * d * e
    if op == "scatter_rows":
        return N * k * (8 + 4 + d * e) + L * d * 4
    raise ValueError(op)


def primitive_args(idx, acts, W, gy, L) -> dict[str, tuple]:
    """The arguments of each primitive here: the decoder's forward (gather_sum) and its backward to
    the activations (gather_dot) and to W_dec (scatter_rows, given fp32 weights as its callers do)."""
    return {"gather_sum": (idx, acts, W), "gather_dot": (idx, W, gy), "scatter_rows": (idx, acts.float(), gy, L)}


# ------------------------------------------------------------------------------- the sections
def make_inputs(cfg, tokens, dtype, skew, seed):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    d, L, k = cfg["d"], cfg["latents"], cfg["k"]
    idx = sample_indices(tokens, L, k, skew, gen)
    acts = torch.rand(tokens, k, device=DEVICE, generator=gen).to(dtype)
    W = torch.randn(L, d, device=DEVICE, generator=gen).div_(math.sqrt(d)).to(dtype)
    grad_y = torch.randn(tokens, d, device=DEVICE, generator=gen).to(dtype)
    return idx, acts, W, grad_y


def check(report: Report, name, cfg, tokens, dtype, args):
    from sae_core import kernels, ops

    idx, acts, W, gy = make_inputs(cfg, tokens, dtype, args.skew, args.seed)
    L = cfg["latents"]
    exact = torch.float64 if dtype == torch.float32 else torch.float32
    w32 = acts.float()  # the callers pass fp32 weights to scatter_rows
    cases = [
        ("gather_sum", lambda: kernels.triton_gather_sum(idx, acts, W), lambda: ops.torch_gather_sum(idx, acts, W),
         lambda: ops.torch_gather_sum(idx, acts.to(exact), W.to(exact))),
        ("gather_dot", lambda: kernels.triton_gather_dot(idx, W, gy), lambda: ops.torch_gather_dot(idx, W, gy),
         lambda: ops.torch_gather_dot(idx, W.to(exact), gy.to(exact))),
        ("scatter_rows", lambda: kernels.triton_scatter_rows(idx, w32, gy, L),
         lambda: ops.torch_scatter_rows(idx, w32, gy, L),
         lambda: ops.torch_scatter_rows(idx, w32.to(exact), gy.to(exact), L)),
    ]
    for op, tri, ref, ex in cases:
        t, r, e = tri(), ref(), ex()
        err_t, err_r, err_tr = rel_err(t, e), rel_err(r, e), rel_err(t, r)
        finite = bool(torch.isfinite(t).all())
        ok = finite and t.dtype == r.dtype and t.shape == r.shape and err_t <= CHECK_TOL[dtype]
        t = r = e = None  # free before the next case
        report.records.append(dict(kind="check", shape=name, dtype=str(dtype)[6:], op=op, triton_vs_exact=err_t,
                                   torch_vs_exact=err_r, triton_vs_torch=err_tr, tol=CHECK_TOL[dtype], ok=ok))
        print(f"  {op:<14} triton vs exact {err_t:9.2e}   torch vs exact {err_r:9.2e}   triton vs torch "
              f"{err_tr:9.2e}   (tol {CHECK_TOL[dtype]:.0e})  {'ok' if ok else 'FAIL'}")
        if not ok:
            report.failures.append(f"check {name} {dtype} {op}: rel err {err_t:.2e}, finite={finite}")


def primitives(report: Report, name, cfg, tokens, dtype, args):
    from sae_core import kernels, ops
    from sae_core.decode import decode

    idx, acts, W, gy = make_inputs(cfg, tokens, dtype, args.skew, args.seed)
    d, L, k = cfg["d"], cfg["latents"], cfg["k"]
    N = tokens
    e = W.element_size()
    sparse_flops = 2 * N * k * d
    dense_flops = 2 * N * L * d
    Z = torch.zeros(N, L, dtype=dtype, device=DEVICE).scatter_(1, idx, acts)
    mt = args.min_time

    def dense_bytes(m, kk, n):
        return (m * kk + kk * n + m * n) * e

    timing_header(report, dtype)
    # The dense product each primitive stands in for, with its minimum traffic.
    dense = {
        "gather_sum": (lambda: Z @ W, dense_bytes(N, L, d)),  # decoder forward
        "gather_dot": (lambda: (gy @ W.T).gather(1, idx), dense_bytes(N, d, L)),  # decoder backward to acts
        "scatter_rows": (lambda: Z.T @ gy, dense_bytes(L, N, d)),  # decoder backward to W_dec (fp32 output)
    }
    sparse_bytes = 0
    for op, call_args in primitive_args(idx, acts, W, gy, L).items():
        nbytes = min_traffic(op, N, k, d, L, e)
        sparse_bytes += nbytes
        dense_fn, dense_nbytes = dense[op]
        dense_ms = cuda_time(dense_fn, mt)
        for impl, fn in (("triton", getattr(kernels, f"triton_{op}")), ("torch", getattr(ops, f"torch_{op}"))):
            report.timing(name, dtype, op, impl, cuda_time(lambda fn=fn, a=call_args: fn(*a), mt), sparse_flops, nbytes,
                          dense_ms)
        report.timing(name, dtype, op, "dense", dense_ms, dense_flops, dense_nbytes)
    if args.skew == 0 and args.straggler_skew > 0:
        skewed = sample_indices(N, L, k, args.straggler_skew, torch.Generator(device=DEVICE).manual_seed(args.seed + 1))
        longest = int(torch.bincount(skewed.reshape(-1), minlength=L).max())
        # split: segments summed in pieces of SEGMENT_CHUNK (the default); whole: one program per segment
        for impl, chunk in (("triton", kernels.SEGMENT_CHUNK), ("whole", N * k + 1)):
            with mock.patch.object(kernels, "SEGMENT_CHUNK", chunk):
                ms = cuda_time(lambda: kernels.triton_scatter_rows(skewed, acts.float(), gy, L), mt)
            report.timing(name, dtype, f"scatter_rows skew {args.straggler_skew:g}", impl, ms, sparse_flops,
                          min_traffic("scatter_rows", N, k, d, L, e))
            report.records[-1]["longest_segment"] = longest
        print(f"  (skew {args.straggler_skew:g}: the most selected latent is in {longest:,} of {N:,} tokens; "
              f"'whole' sums each latent's segment in one program, 'triton' in pieces of {kernels.SEGMENT_CHUNK})")

    # the whole decoder, forward + backward (to acts and W_dec)
    acts_g = acts.clone().requires_grad_()
    W_g = W.clone().requires_grad_()
    Z_g = Z.clone().requires_grad_()

    def sparse_step():
        y = decode(idx, acts_g, W_g)
        torch.autograd.grad(y, (acts_g, W_g), gy)

    def dense_step():
        y = Z_g @ W_g
        torch.autograd.grad(y, (Z_g, W_g), gy)

    dense_ms = cuda_time(dense_step, mt)
    for impl in ("triton", "torch"):
        with kernels_env(impl):
            ms = cuda_time(sparse_step, mt)
        report.timing(name, dtype, "decoder fwd+bwd", impl, ms, 3 * sparse_flops, sparse_bytes, dense_ms)
    report.timing(name, dtype, "decoder fwd+bwd", "dense", dense_ms, 3 * dense_flops,
                  sum(nbytes for _, nbytes in dense.values()))


def load_sparsify():
    """(SparseCoder class, its config class, version) of eai-sparsify, or None (saying why) when it does not import."""
    try:
        import sparsify
    except Exception as e:  # not installed, or a dependency missing: skip that comparison
        print(f"eai-sparsify does not import ({type(e).__name__}: {e}); the step comparison is skipped. "
              "pip install eai-sparsify, or on a machine without PyPI carry the wheels of benchmarks/gpu_wheels.sh")
        return None
    coder = getattr(sparsify, "SparseCoder", None) or getattr(sparsify, "Sae", None)
    config = getattr(sparsify, "SparseCoderConfig", None) or getattr(sparsify, "SaeConfig", None)
    if coder is None or config is None:
        print(f"eai-sparsify {getattr(sparsify, '__version__', '?')} has neither SparseCoder nor Sae; skipped")
        return None
    return coder, config, getattr(sparsify, "__version__", "?")


def train(report: Report, name, cfg, tokens, args, eai):
    import sae_core.sae as sae_module
    from sae_core import Sae, SaeConfig

    d, L, k = cfg["d"], cfg["latents"], cfg["k"]
    gen = torch.Generator(device=DEVICE).manual_seed(args.seed)
    x = torch.randn(tokens, d, device=DEVICE, generator=gen).to(torch.bfloat16)  # LM activations are bf16
    if eai is None:
        print("  eai-sparsify: not importable here (see above); skipped")
    default_gathers = sae_module.AUTOCAST_GATHERS
    try:
        for dead_frac in (0.0, args.dead_frac):
            dead = None
            if dead_frac > 0:
                dead = torch.zeros(L, dtype=torch.bool, device=DEVICE)
                dead[torch.randperm(L, device=DEVICE, generator=gen)[: int(dead_frac * L)]] = True
            label = f"{int(dead.sum()) if dead is not None else 0} dead latents"
            # (label, SAE_CORE_KERNELS, sae_core.sae.AUTOCAST_GATHERS, eai-sparsify or None)
            runs = [("ours (triton)", "triton", True, None), ("ours (triton, fp32 gathers)", "triton", False, None),
                    ("ours (torch)", "torch", True, None)]
            if eai is not None:
                runs.append((f"eai-sparsify {eai[2]}", None, True, eai))
            for impl, backend, autocast_gathers, eai_mod in runs:
                sae_module.AUTOCAST_GATHERS = autocast_gathers
                torch.manual_seed(args.seed)
                if eai_mod is None:
                    sae = Sae(d, SaeConfig(expansion_factor=L // d, num_latents=L, k=k), device=DEVICE)
                else:
                    sae = eai_mod[0](d, eai_mod[1](expansion_factor=L // d, num_latents=L, k=k), device=DEVICE)
                opt = torch.optim.Adam(sae.parameters(), lr=2e-4, fused=True)

                def step(sae=sae, opt=opt, dead=dead):
                    with torch.autocast(DEVICE, dtype=torch.bfloat16):
                        out = sae(x, dead_mask=dead)
                        loss = out.fvu + out.auxk_loss / 32
                    loss.backward()
                    sae.remove_gradient_parallel_to_decoder_directions()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    sae.set_decoder_norm_to_unit_norm()

                with kernels_env(backend) if backend else contextlib.nullcontext():
                    for _ in range(args.train_warmup):
                        step()
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(args.train_steps):
                        step()
                    sync()
                    seconds = time.perf_counter() - t0
                tps = tokens * args.train_steps / seconds
                ms = 1e3 * seconds / args.train_steps
                report.records.append(dict(kind="train", shape=name, impl=impl, dead=label, tokens=tokens,
                                           ms_per_step=ms, tokens_per_s=tps))
                print(f"  {impl:<30}{label:<22}{ms:10.2f} ms/step {tps:14,.0f} tokens/s")
                del sae, opt
                torch.cuda.empty_cache()
    finally:
        sae_module.AUTOCAST_GATHERS = default_gathers


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.kernels: no CUDA GPU here (torch.cuda.is_available() is False); "
              "these are GPU kernel timings, run it on a machine with one", file=sys.stderr)
        return 1
    try:
        import triton

        from sae_core import kernels  # noqa: F401
    except ImportError as e:
        print(f"benchmarks.kernels: triton or sae_core.kernels does not import ({e}); pip install triton", file=sys.stderr)
        return 1
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    report = Report(args)
    eai = load_sparsify()
    props = torch.cuda.get_device_properties(0)
    print(f"GPU {props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, triton "
          f"{triton.__version__}, eai-sparsify {eai[2] if eai else 'not installed'}")
    print(f"tokens {args.tokens}, index skew {args.skew}, TF32 {'on' if args.tf32 else 'off'}; roofline "
          f"{args.peak_tflops_bf16:.0f} TFLOP/s bf16, {args.peak_tflops_fp32:.0f} TFLOP/s fp32, {args.peak_gbps:.0f} GB/s")
    cmd = "python -m benchmarks.kernels " + shlex.join(sys.argv[1:] if argv is None else argv)

    def save() -> None:  # after every section, so that a run stopped at a time limit keeps its numbers
        if args.out_json:
            with open(args.out_json, "w") as f:
                json.dump(dict(command=cmd, gpu=props.name, args=vars(args), records=report.records,
                               failures=report.failures), f, indent=1, default=str)

    for name in args.shapes:
        cfg = SHAPES[name]
        desc = f"{name}: d_in {cfg['d']}, latents {cfg['latents']}, k {cfg['k']}, tokens {args.tokens}"
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            if not args.skip_check:
                print(f"\n== correctness, {desc}, {dname}")
                check(report, name, cfg, args.tokens, dtype, args)
                torch.cuda.empty_cache()
                save()
            if not args.skip_primitives:
                print(f"\n== primitives, {desc}, {dname}")
                primitives(report, name, cfg, args.tokens, dtype, args)
                torch.cuda.empty_cache()
                save()
        if not args.skip_train:
            print(f"\n== training step (fp32 weights, bf16 autocast, Adam), {desc}")
            train(report, name, cfg, args.tokens, args, eai)
            save()
    if args.out_json:
        print(f"\nwrote {args.out_json}")
    if report.failures:
        print("\nFAILED:\n  " + "\n  ".join(report.failures))
    print(f"\nreproduce: {cmd.rstrip()}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
