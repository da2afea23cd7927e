"""SAE training tokens/s on CPU: fed from the store vs from memory vs EleutherAI's eai-sparsify.

One run, one layer of a store of SmolLM2 activations (`--store`, built there first if missing;
else a temporary one of `--tokens` tokens), the same batches in the same order for all three:

  store   `saetrain.loader.StoreLoader.batches` (background window reads, zstd decode, shuffle)
          feeding `saetrain.trainer.LayerTrainer`, the per-step code of `saetrain.trainer._train`
          (geometric-median b_dec on the first batch, `backward`, `step`);
  memory  the same loop over the same batches, read into a list beforehand: store / memory is
          what the loader costs (target >= 0.95);
  eai     EleutherAI's own `sparsify.Trainer.fit`, run in its own virtualenv (`--eai-python`)
          by benchmarks/_eai_step.py on the same activations (saved to a temporary .npy). sparsify
          trains from an LM's forward hooks; the helper's stand-in "model" outputs the cached
          activations at its hookpoint, so every line of its step loop is sparsify's own code.

Same d_in, latents (expansion x d_in), k, tokens per step, fp32 SAE weights, Adam (sparsify's
default is its signum optimizer; `--eai-optimizer signum` times that), auxk_alpha and dead-latent
threshold (no latent dies in so short a run), torch threads. Differences that remain are each
trainer's own: ours clips the gradient norm (grad_clip=1.0), sparsify calls
`torch.set_float32_matmul_precision("high")` (reported; on a CPU without AMX, as checked here,
the fp32 matmuls come out bit-identical to "highest").
The first `--warmup` steps of every pass are not timed (they include the first window read and
the b_dec initialisation); the modes alternate `--repeats` times, in rotating order, and the
medians (and the best pass, less sensitive to other load on a shared machine) are reported.
All three run under one OpenMP wait policy (`--omp-wait-policy`, default PASSIVE): with libgomp's
default, only the store-fed run (whose loader thread adds OpenMP threads) stops busy-waiting,
which on a loaded CPU alone made it up to 1.8x faster than the same loop fed from memory.
Ends with the command that reproduces the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import apply_omp_wait_policy, run_and_report
from sae_core import SaeConfig
from sae_core.store import ActivationStore
from saetrain.config import TrainConfig
from saetrain.loader import StoreLoader
from saetrain.settings import default_lr, select_layers
from saetrain.trainer import LayerTrainer, geometric_median

EAI_HELPER = Path(__file__).with_name("_eai_step.py")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, help="store to read; built there (layer --layer) if it does not exist")
    p.add_argument("--tokens", type=int, default=61440, help="tokens of a store this run builds")
    p.add_argument("--layer", default="15", help="the layer to train on")
    p.add_argument("--max-tokens", type=int, help="tokens per pass (default: the whole store)")
    p.add_argument("--batch-size", type=int, default=1024, help="tokens per step")
    p.add_argument("--expansion-factor", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--shuffle-window", type=int, default=8,
                   help="chunks per loader window; small enough that a pass reads several windows")
    p.add_argument("--read-threads", type=int, default=TrainConfig.read_threads)
    p.add_argument("--warmup", type=int, default=5, help="steps per pass left out of the timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both trainers")
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "default"],
                   help="OMP_WAIT_POLICY for all three (the run restarts itself to apply it; see below)")
    p.add_argument("--eai-python", default="/tmp/eai-venv/bin/python", help="Python of the eai-sparsify venv")
    p.add_argument("--eai-optimizer", default="adam", choices=["adam", "signum"])
    p.add_argument("--tmp-dir", help="where temporary files go (default: the system temp folder)")
    p.add_argument("--out-json", type=Path, help="also write every number here as JSON")
    return p.parse_args(argv)


def command_line(args: argparse.Namespace) -> str:
    argv = [sys.executable, "-m", "benchmarks.train"]
    for key, value in vars(args).items():
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(argv)


def ensure_store(args: argparse.Namespace, tmp: Path) -> Path:
    path = args.store or tmp / "store.zarr"
    if not path.exists():
        from actcache.collection import collect
        from actcache.config import CollectConfig

        print(f"building {path}: layer {args.layer}, {args.tokens} tokens (about 500 tok/s on 2 cores)", flush=True)
        res = collect(CollectConfig(out=path, layers=args.layer, ctx_len=256, max_tokens=args.tokens,
                                    dtype="bfloat16", device="cpu", progress=False))
        print(f"  {res.tokens_written} tokens in {res.seconds:.0f}s", flush=True)
    return path


class Bench:
    """Everything fixed for the run: the store, the layer, the configs, where a pass stops."""

    def __init__(self, args: argparse.Namespace, store: ActivationStore):
        self.args, self.store = args, store
        self.name = select_layers(store, args.layer)[0]
        self.d_in = store.d(self.name)
        self.num_latents = self.d_in * args.expansion_factor
        self.cfg = TrainConfig(store=store.path, out=Path("unused"), k=args.k, expansion_factor=args.expansion_factor,
                               batch_size=args.batch_size, shuffle_window=args.shuffle_window,
                               read_threads=args.read_threads, progress=False)
        self.chunks = store.committed_chunks()
        total = self.loader().epoch_tokens(0)
        if args.max_tokens:
            total = min(total, args.max_tokens)
        self.steps = total // args.batch_size  # whole batches only, so all three modes see the same steps
        self.stop = self.steps * args.batch_size
        if self.steps <= args.warmup + 1:
            raise SystemExit(f"{self.stop} tokens make {self.steps} steps; need more than --warmup + 1")

    def loader(self) -> StoreLoader:  # as `saetrain.trainer.fit` builds it for one process on the CPU
        return StoreLoader(self.store, [self.name], self.chunks, seed=self.cfg.seed, window=self.cfg.shuffle_window,
                           read_threads=self.cfg.read_threads)

    def trainer(self) -> LayerTrainer:  # as `fit` builds it, same seed every pass
        sae_cfg = SaeConfig(expansion_factor=self.cfg.expansion_factor, normalize_decoder=self.cfg.normalize_decoder,
                            num_latents=self.num_latents, k=self.cfg.k, multi_topk=self.cfg.multi_topk)
        return LayerTrainer(self.name, self.d_in, self.cfg, sae_cfg, default_lr(self.num_latents),
                            torch.device("cpu"), seed=self.cfg.seed * 100_003)

    def train_pass(self, batches) -> dict:
        """`_train`'s per-step code on one layer; the clock starts after `--warmup` steps."""
        t, warmup = self.trainer(), self.args.warmup
        t0 = time.perf_counter()
        first_batch_s, tokens, start = 0.0, 0, 0.0
        for step, batch in enumerate(batches):
            x = batch.acts[t.name]
            if step == 0:
                first_batch_s = time.perf_counter() - t0
                with torch.no_grad():
                    t.sae.b_dec.copy_(geometric_median(x.to(torch.float32)))
            t.backward(x.to(torch.float32), False)
            t.step(step, len(x), False)
            if step >= warmup:
                tokens += len(x)
            if step == warmup - 1:
                start = time.perf_counter()
        seconds = time.perf_counter() - start
        return {"tok_s": tokens / seconds, "tokens": tokens, "seconds": seconds, "first_batch_s": first_batch_s}

    def from_store(self) -> dict:
        return self.train_pass(self.loader().batches(0, self.args.batch_size, stop=self.stop))

    def eai(self, acts_npy: Path) -> dict:
        a = self.args
        cmd = [a.eai_python, str(EAI_HELPER), "--acts", str(acts_npy), "--batch-size", str(a.batch_size),
               "--expansion-factor", str(a.expansion_factor), "--k", str(a.k), "--auxk-alpha", str(self.cfg.auxk_alpha),
               "--optimizer", a.eai_optimizer, "--warmup", str(a.warmup), "--threads", str(a.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=acts_npy.parent)
        if proc.returncode:
            raise SystemExit(f"eai-sparsify run failed ({shlex.join(cmd)}):\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if argv is None:  # all three modes under one OpenMP wait policy (see _common.py)
        apply_omp_wait_policy(args.omp_wait_policy, "benchmarks.train")
    if args.warmup < 1:
        raise SystemExit("--warmup must be at least 1 (the first step initialises b_dec)")
    if not Path(args.eai_python).exists():
        raise SystemExit(f"{args.eai_python} not found; install eai-sparsify in its own venv:\n"
                         "  python3 -m venv /tmp/eai-venv && /tmp/eai-venv/bin/pip install torch==2.13.0 eai-sparsify")
    torch.set_num_threads(args.threads)
    run_and_report(lambda tmp: bench(args, tmp), args, prefix="bench-train-", command=command_line(args))


def bench(args: argparse.Namespace, tmp: Path) -> dict:
    store = ActivationStore(ensure_store(args, tmp))
    b = Bench(args, store)
    loader = b.loader()
    windows = loader.windows(0)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(default)"),
           "store": str(store.path), "layer": b.name, "store_dtype": store.dtype_name, "d_in": b.d_in,
           "latents": b.num_latents, "k": args.k, "batch": args.batch_size, "steps_per_pass": b.steps,
           "timed_steps": b.steps - args.warmup, "chunk_tokens": store.layout.chunk_tokens,
           "windows_per_epoch": len(windows), "window_chunks": args.shuffle_window}
    print("  ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    if len(windows) < 3:
        print("note: under 3 loader windows per pass, so the store-fed timing sees few window reads; "
              "use a bigger store or a smaller --shuffle-window")

    # The in-memory batches: exactly what the loader yields, read into a list once.
    t0 = time.perf_counter()
    in_memory = list(loader.batches(0, args.batch_size, stop=b.stop))
    env["read_all_s"] = time.perf_counter() - t0
    acts = torch.cat([x.acts[b.name] for x in in_memory])
    acts_npy = tmp / "acts.npy"
    np.save(acts_npy, acts.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    print(f"read {len(acts)} tokens into memory in {env['read_all_s']:.2f}s "
          f"({len(acts) / env['read_all_s']:.0f} tok/s, no training)", flush=True)

    modes = {"store": b.from_store, "memory": lambda: b.train_pass(in_memory), "eai": lambda: b.eai(acts_npy)}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for i in range(args.repeats):  # alternated, order rotated: drifting load on a shared machine hits all alike
        order = list(modes)[i % 3:] + list(modes)[:i % 3]
        for m in order:
            runs[m].append(modes[m]())
        print(f"  repeat {i}: " + "  ".join(f"{m} {runs[m][-1]['tok_s']:7.0f} tok/s" for m in order), flush=True)
    env["eai"] = {k: v for k, v in runs["eai"][0].items() if k not in ("tok_s", "step_s_median")}

    med = {m: statistics.median(r["tok_s"] for r in rs) for m, rs in runs.items()}
    best = {m: max(r["tok_s"] for r in rs) for m, rs in runs.items()}
    pairs = (("store", "memory"), ("store", "eai"), ("memory", "eai"))
    ratios = {f"{a}_over_{z}": med[a] / med[z] for a, z in pairs}
    best_ratios = {f"{a}_over_{z}": best[a] / best[z] for a, z in pairs}
    e = env["eai"]
    print(f"\nSAE training tokens/s, medians of {args.repeats} passes, {b.steps - args.warmup} timed steps of "
          f"{args.batch_size} tokens each (d_in {b.d_in}, {b.num_latents} latents, k {args.k}, fp32, "
          f"{args.threads} threads)")
    labels = {"store": "saetrain, fed by StoreLoader", "memory": "saetrain, batches in memory",
              "eai": f"eai-sparsify {e['sparsify']} Trainer.fit ({e['optimizer']}, {e['decoder']})"}
    print(f"  {'':54s} {'median':>8s} {'best':>8s}")
    for m, label in labels.items():
        print(f"  {label:54s} {med[m]:8.0f} {best[m]:8.0f} tok/s")
    for (a, z), target in zip(pairs, ("(target >= 0.95)", "(target > 1)", ""), strict=True):
        key = f"{a}_over_{z}"
        print(f"  {a + ' / ' + z:14s} {ratios[key]:5.2f}  best/best {best_ratios[key]:5.2f}  {target}")
    print(f"  time to the first batch from the store (untimed warm-up): "
          f"{statistics.median(r['first_batch_s'] for r in runs['store']):.2f}s; eai torch {e['torch']}, "
          f"its fp32 matmul precision setting {e['mkldnn_fp32_precision']}")
    return {"env": env, "args": {k: str(v) for k, v in vars(args).items()}, "tok_s_median": med, "tok_s_best": best,
            "ratios": ratios, "best_ratios": best_ratios, "runs": runs}


if __name__ == "__main__":
    main()
