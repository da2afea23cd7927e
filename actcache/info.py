"""`actcache info`: what a store holds, as a dict (for --json) or as text."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sae_core.store import ActivationStore
from sae_core.store.format import STORAGE_DTYPES


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def store_info(path: str | Path) -> dict:
    store = ActivationStore(path)
    store.check_manifest()
    meta = store.meta
    files = [f for rec in store.manifest.shards.values() for f in rec.files.values()]
    data_bytes = sum(f["bytes"] for f in files)
    itemsize = np.dtype(STORAGE_DTYPES[store.dtype_name]).itemsize
    logical = store.num_tokens * (sum(a["d"] for a in meta["arrays"].values()) * itemsize + 4)
    return {
        "path": str(store.path),
        "model": meta["model"],
        "layers": meta["layers"],
        "hookpoints": meta["hookpoints"],
        "arrays": {name: a["d"] for name, a in meta["arrays"].items()},
        "dtype": store.dtype_name,
        "ctx_len": meta["ctx_len"],
        "codec": meta["codec"],
        "dataset": meta["data"]["dataset"],
        "dataset_config": meta["data"].get("dataset_config"),
        "split": meta["data"].get("split"),
        "data_fingerprint": meta["data"]["fingerprint"],
        "tokens_committed": store.num_tokens,
        "tokens_planned": store.layout.num_tokens,
        "complete": store.complete,
        "shards_committed": len(store.manifest.shards),
        "shards_planned": store.layout.num_shards,
        "shards_set_aside": {str(i): why for i, why in sorted(store.manifest.recollect.items())},
        "layout": store.layout.to_dict(),
        "bytes_on_disk": _disk_bytes(store.path),
        "bytes_committed_data": data_bytes,
        "compression_ratio": round(logical / data_bytes, 4) if data_bytes else None,
        "stats": {name: s.summary() for name, s in store.manifest.stats.items()},
        "tool": meta["tool"],
    }


def format_info(info: dict) -> str:
    gb = info["bytes_on_disk"] / 1e9
    lines = [
        f"store       {info['path']}",
        f"model       {info['model']['id']}" + (f" @ {info['model']['revision']}" if info["model"]["revision"] else ""),
        f"dataset     {info['dataset']}" + "".join(
            f"  {k} {info[k]}" for k in ("dataset_config", "split") if info[k] is not None
        ),
        f"layers      {', '.join(info['arrays'])}" if len(info["arrays"]) <= 8 else
        f"layers      {len(info['arrays'])}: {next(iter(info['arrays']))} .. {list(info['arrays'])[-1]}",
        f"tokens      {info['tokens_committed']:,} committed of {info['tokens_planned']:,}"
        + ("" if info["complete"] else f"  (INCOMPLETE: {info['shards_committed']}/{info['shards_planned']} shards)"),
        *(f"set aside   shard {i}: {why} (re-collect with `actcache collect ... --resume`)"
          for i, why in info.get("shards_set_aside", {}).items()),
        f"dtype       {info['dtype']}  ctx_len {info['ctx_len']}  codec {info['codec']}",
        f"on disk     {gb:.3f} GB  compression ratio {info['compression_ratio']}",
    ]
    for name, s in info["stats"].items():
        q = s["norm_quantiles"]
        lines.append(
            f"  {name:<14} norm p50 {q.get('p50', 0):9.2f}  p99 {q.get('p99', 0):9.2f}  max {q.get('max', 0):9.2f}"
            + (f"  NON-FINITE tokens: {s['nonfinite_tokens']}" if s["nonfinite_tokens"] else "")
        )
    return os.linesep.join(lines)
