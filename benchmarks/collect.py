"""How much slower is `actcache collect` than a bare forward pass, and what do the codecs cost?

One run, one model, the same batches of the embedded Shakespeare corpus throughout:
  1. tokens/s of the bare forward pass vs `collect()` writing every requested layer (alternated);
  2. the forward time with `Capture` (early exit) for a few layer sets, relative to a bare pass;
  3. per codec: stored bytes/token/layer, compression ratio, write and read MB/s on real activations.
Device-agnostic (`--device auto` picks CUDA when present). Ends with the command that reproduces it.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import statistics
import sys
import time
import timeit
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import zarr

from actcache import collection as ac
from actcache import data, packing
from actcache.config import CollectConfig
from actcache.hooks import Capture
from benchmarks._common import apply_omp_wait_policy, run_and_report
from sae_core import d_model, load_model, num_layers, parse_layers
from sae_core.models import resolve_device
from sae_core.store import CODECS, DEFAULT_CODEC, plan_layout
from sae_core.store.format import compressors, to_storage
from sae_core.store.stats import RunningStats

MB = 1e6


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.collect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, help="tokens per pass, rounded up to whole sequences "
                   "(default 8192 on CPU, about 5 minutes on 2 cores; 262144 on CUDA)")
    p.add_argument("--ctx-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--layers", default="all", help="layers collect writes (section 1)")
    p.add_argument("--codec", default=DEFAULT_CODEC, choices=CODECS, help="codec collect writes with")
    p.add_argument("--codec-layers", default="0,10,20,29", help="layers for the codec table (section 3)")
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "default"],
                   help="OMP_WAIT_POLICY for every mode (the run restarts itself to apply it)")
    p.add_argument("--seqs-per-shard", type=int, default=4,
                   help="shard size; small enough that a short run has several shards, so writing overlaps the forward")
    p.add_argument("--write-threads", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3, help="runs of each measurement; medians are reported")
    p.add_argument("--tmp-dir", help="where the temporary stores go (default: the system temp folder)")
    p.add_argument("--out-json", type=Path, help="also write every number here as JSON")
    args = p.parse_args(argv)
    args.device = str(resolve_device(args.device))
    if args.tokens is None:
        args.tokens = 262144 if args.device.startswith("cuda") else 8192
    return args


def command_line(args: argparse.Namespace) -> str:
    argv = [sys.executable, "-m", "benchmarks.collect"]
    for key, value in vars(args).items():
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spans(layout, batch_size: int) -> list[tuple[int, int]]:
    """The (first, last + 1) sequences of each batch, exactly as `collect._run` cuts them."""
    out = []
    for shard in range(layout.num_shards):
        r = layout.shard_sequences(shard)
        out += [(b0, min(b0 + batch_size, r.stop)) for b0 in range(r.start, r.stop, batch_size)]
    return out


def timed_pass(fn, seqs: np.ndarray, batches, device: torch.device) -> float:
    """Seconds for `fn(ids)` over every batch; ids are moved to the device inside, as collect does."""
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b0, b1 in batches:
            fn(torch.from_numpy(seqs[b0:b1].astype(np.int64)).to(device, non_blocking=True))
    sync(device)
    return time.perf_counter() - t0


@contextmanager
def timing_collect(into: dict):
    """Time `collect._run` (the loop: forward, copies, shard hand-over, final drain of the writes)
    and `ShardWriter.close` (the drain alone) by wrapping them where `collect()` looks them up.
    This leaves out model loading, tokenizing the whole corpus, the width probe and store creation,
    which `CollectResult.seconds` includes and which do not grow with the number of tokens."""
    run, writer_cls = ac._run, ac.ShardWriter

    class TimedWriter(writer_cls):
        def close(self) -> None:
            t0 = time.perf_counter()
            try:
                super().close()
            finally:
                into["drain_s"] = time.perf_counter() - t0

    def timed_run(*a, **kw):
        t0 = time.perf_counter()
        try:
            return run(*a, **kw)
        finally:
            into["loop_s"] = time.perf_counter() - t0

    ac._run, ac.ShardWriter = timed_run, TimedWriter
    try:
        yield
    finally:
        ac._run, ac.ShardWriter = run, writer_cls


def run_collect(args, tmp: Path, i: int) -> dict:
    out = tmp / f"collect{i}.zarr"
    cfg = CollectConfig(out=out, ctx_len=args.ctx_len, batch_size=args.batch_size, max_tokens=args.tokens,
                        dtype="bfloat16", device=args.device, layers=args.layers, codec=args.codec, seed=0,
                        seqs_per_shard=args.seqs_per_shard, write_threads=args.write_threads, progress=False)
    t: dict = {}
    with timing_collect(t):
        res = ac.collect(cfg)
    t |= {"total_s": res.seconds, "tokens": res.tokens_written,
          "stored_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())}
    if i == 0:
        t["fingerprint"] = zarr.open_group(str(out), mode="r").attrs["actcache"]["data"]["fingerprint"]
    shutil.rmtree(out)
    return t


def codec_table(acts: dict[str, np.ndarray], layout, args, tmp: Path) -> dict:
    """Each codec on whole shards with the store's array settings; then a chunk-by-chunk read."""
    out = {}
    for codec in CODECS:
        row = {"layers": {}, "write_s": 0.0, "read_s": 0.0, "raw": 0, "stored": 0}
        for name, a in acts.items():
            writes, reads = [], []
            for r in range(args.repeats):
                root = tmp / f"{codec}-{name}-{r}.zarr"
                arr = zarr.open_group(str(root), mode="w", zarr_format=3).create_array(
                    "x", shape=a.shape, chunks=(layout.chunk_tokens, a.shape[1]),
                    shards=(layout.shard_tokens, a.shape[1]), dtype=a.dtype, compressors=compressors(codec),
                    fill_value=0)
                t0 = time.perf_counter()
                for s in range(layout.num_shards):
                    rows = layout.shard_tokens_range(s)
                    arr[rows.start:rows.stop] = a[rows.start:rows.stop]
                writes.append(time.perf_counter() - t0)
                stored = sum(f.stat().st_size for f in (root / "x" / "c").rglob("*") if f.is_file())
                arr = zarr.open_array(str(root / "x"), mode="r", zarr_format=3)
                t0 = time.perf_counter()
                for c in range(layout.num_chunks):
                    rows = layout.chunk_tokens_range(c)
                    back = arr[rows.start:rows.stop]
                reads.append(time.perf_counter() - t0)
                assert np.array_equal(back, a[rows.start:rows.stop])
                shutil.rmtree(root)
            row["layers"][name] = {"ratio": a.nbytes / stored, "bytes_per_token": stored / len(a)}
            row["write_s"] += statistics.median(writes)
            row["read_s"] += statistics.median(reads)
            row["raw"] += a.nbytes
            row["stored"] += stored
        tokens = sum(len(a) for a in acts.values())
        out[codec] = {"bytes_per_token_per_layer": row["stored"] / tokens, "ratio": row["raw"] / row["stored"],
                      "write_mb_s": row["raw"] / MB / row["write_s"], "read_mb_s": row["raw"] / MB / row["read_s"],
                      "layers": row["layers"]}
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if argv is None:  # bare and collect under one OpenMP wait policy (see _common.py)
        apply_omp_wait_policy(args.omp_wait_policy, "benchmarks.collect")
    device = torch.device(args.device)
    run_and_report(lambda tmp: bench(args, device, tmp), args, prefix="bench-collect-", command=command_line(args))


def bench(args, device: torch.device, tmp: Path) -> dict:
    model, tokenizer = load_model(None, device=device)
    n_layers, d = num_layers(model), d_model(model)
    seqs, _ = packing.window(data.load_documents(None), tokenizer, args.ctx_len, 0, 0, math.ceil(args.tokens / args.ctx_len))
    tokens = seqs.size
    layout = plan_layout(num_sequences=len(seqs), ctx_len=args.ctx_len, bytes_per_token=d * 2,
                         seqs_per_shard=args.seqs_per_shard)
    batches = spans(layout, args.batch_size)
    env = {"device": str(device), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "cpus": os.cpu_count(), "model_dtype": str(next(model.parameters()).dtype), "tokens": tokens,
           "batches": len(batches), "shards": layout.num_shards, "shard_tokens": layout.shard_tokens,
           "chunk_tokens": layout.chunk_tokens, **({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {})}
    print("  ".join(f"{k}={v}" for k, v in env.items()))

    def bare(ids):
        model(input_ids=ids, use_cache=False)

    def bare_blocks(ids):  # the stricter baseline: every block and the final norm, no lm_head / logits
        model.get_decoder()(input_ids=ids, use_cache=False)

    timed_pass(bare, seqs, batches[:1], device)  # warm-up
    timed_pass(bare_blocks, seqs, batches[:1], device)

    # 1. bare forward vs collect, alternated so drifting load on a shared machine hits both alike.
    bare_s, blocks_s, runs = [], [], []
    for i in range(args.repeats):
        bare_s.append(timed_pass(bare, seqs, batches, device))
        blocks_s.append(timed_pass(bare_blocks, seqs, batches, device))
        runs.append(run_collect(args, tmp, i))
        print(f"  repeat {i}: bare {bare_s[-1]:.2f}s  bare blocks {blocks_s[-1]:.2f}s  collect loop {runs[-1]['loop_s']:.2f}s "
              f"(drain {runs[-1]['drain_s']:.2f}s)  collect total {runs[-1]['total_s']:.2f}s", flush=True)
    if runs[0]["fingerprint"] != packing.fingerprint(seqs) or runs[0]["tokens"] != tokens:
        raise SystemExit("collect saw different sequences than the bare pass; the comparison is void")
    med = {k: statistics.median(r[k] for r in runs) for k in ("loop_s", "drain_s", "total_s")}
    bare_tps = tokens / statistics.median(bare_s)
    n_written = len(parse_layers(args.layers, n_layers))
    throughput = {
        "bare_tok_s": bare_tps,
        "bare_blocks_tok_s": tokens / statistics.median(blocks_s),
        "collect_loop_tok_s": tokens / med["loop_s"],
        "collect_loop_excl_drain_tok_s": tokens / (med["loop_s"] - med["drain_s"]),
        "collect_result_tok_s": tokens / med["total_s"],
        "layers_written": n_written,
        "stored_bytes_per_token": runs[0]["stored_bytes"] / tokens,
        "bare_s": bare_s, "bare_blocks_s": blocks_s, "collect_runs": runs,
    }
    print(f"\n1. throughput, {tokens} tokens, {n_written} layers in bf16, codec {args.codec} "
          f"(medians of {args.repeats}; collect loop = collect._run incl. final drain of writes)")
    for label, key in (("bare forward", "bare_tok_s"), ("bare blocks (no lm_head)", "bare_blocks_tok_s"),
                       ("collect loop", "collect_loop_tok_s"),
                       ("collect loop excl. final drain", "collect_loop_excl_drain_tok_s"),
                       ("collect end-to-end (CollectResult)", "collect_result_tok_s")):
        tps = throughput[key]
        print(f"  {label:36s} {tps:10.0f} tok/s   ratio to bare {tps / bare_tps:5.2f}"
              f"   to bare blocks {tps / throughput['bare_blocks_tok_s']:5.2f}")
    print(f"  stored {throughput['stored_bytes_per_token']:.0f} B/token "
          f"({throughput['stored_bytes_per_token'] / n_written:.0f} per layer, raw {2 * d})")

    # 2. early exit: forward with Capture for a few layer sets, relative to a bare pass.
    sets = {"{0}": [0], f"{{0-{max(1, n_layers // 5) - 1}}}": list(range(max(1, n_layers // 5))),
            f"{{0-{max(1, n_layers // 2) - 1}}}": list(range(max(1, n_layers // 2))),
            f"{{0-{n_layers - 1}}}": list(range(n_layers)), f"{{{n_layers - 1}}}": [n_layers - 1]}
    times: dict[str, list[float]] = {"bare": [], **{k: [] for k in sets}}
    for r in range(args.repeats):  # the order rotates each repeat, so no set always runs first
        for label in (labels := list(times))[r % len(labels):] + labels[: r % len(labels)]:
            cap = Capture(model, layers=sets[label]) if label in sets else None
            times[label].append(timed_pass(cap or bare, seqs, batches, device))
            if cap:
                cap.remove()
    base = statistics.median(times["bare"])
    early = {k: {"seconds": statistics.median(v), "relative": statistics.median(v) / base} for k, v in times.items()}
    print(f"\n2. early exit: forward with Capture, relative to a bare full pass ({base:.2f}s)")
    for label, e in early.items():
        print(f"  layers {label:8s} {e['seconds']:7.2f}s  {e['relative']:5.2f} x bare")

    # 3. codecs on real activations, captured once in bf16 (stored as uint16 bits, as the store does).
    codec_layers = parse_layers(args.codec_layers, n_layers)
    cap = Capture(model, layers=codec_layers)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in cap.names}
    with torch.inference_mode():
        for b0, b1 in batches:
            for name, x in cap(torch.from_numpy(seqs[b0:b1].astype(np.int64)).to(device)).items():
                parts[name].append(to_storage(x.reshape(-1, d).to("cpu", torch.bfloat16), "bfloat16"))
    cap.remove()
    acts = {n: np.concatenate(p) for n, p in parts.items()}
    codecs = codec_table(acts, layout, args, tmp)
    # The writer also computes RunningStats per layer shard on the same thread pool: its cost per MB.
    x = torch.from_numpy(acts[cap.names[-1]].view(np.int16)).view(torch.bfloat16)
    stats_s = timeit.repeat(lambda: RunningStats.of(x.float().numpy()), number=1, repeat=args.repeats)
    stats_mb_s = x.numel() * 2 / MB / statistics.median(stats_s)
    print(f"\n3. codecs: layers {args.codec_layers}, {tokens} tokens each, whole shards through zarr "
          f"(write = compress + write to page cache, no fsync; read = chunk by chunk, page cache warm)")
    print(f"  {'codec':11s} {'B/tok/layer':>11s} {'ratio':>6s} " + " ".join(f"{n[6:]:>5s}" for n in acts)
          + f" {'write MB/s':>10s} {'read MB/s':>10s}")
    for codec, c in codecs.items():
        print(f"  {codec:11s} {c['bytes_per_token_per_layer']:11.0f} {c['ratio']:6.2f} "
              + " ".join(f"{c['layers'][n]['ratio']:5.2f}" for n in acts)
              + f" {c['write_mb_s']:10.0f} {c['read_mb_s']:10.0f}")
    print(f"  (columns after 'ratio' are the ratio per layer; raw bf16 is {2 * d} B/tok/layer; "
          f"RunningStats.of, also run per layer shard by the writer: {stats_mb_s:.0f} MB/s of bf16)")
    return {"env": env, "args": {k: str(v) for k, v in vars(args).items()}, "throughput": throughput,
            "early_exit": early, "codecs": codecs, "running_stats_mb_s": stats_mb_s}


if __name__ == "__main__":
    main()
