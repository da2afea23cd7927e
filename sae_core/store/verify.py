"""`actcache verify`: every committed shard file present with the checksum its manifest records."""

from __future__ import annotations

from pathlib import Path

from .format import array_path, shard_file
from .manifest import file_crc32
from .reader import ActivationStore


def verify_store(path: str | Path) -> list[str]:
    """Return a list of problems (empty when the store is sound)."""
    store = ActivationStore(path)
    problems = []
    expected_files = [array_path(n) for n in store.layers]
    for shard, rec in sorted(store.manifest.shards.items()):
        rows = store.layout.shard_tokens_range(shard)
        if tuple(rec.tokens) != (rows.start, rows.stop):
            problems.append(f"shard {shard}: manifest says tokens {rec.tokens}, layout says [{rows.start}, {rows.stop})")
        wanted = {shard_file(a, shard, 2) for a in expected_files} | {shard_file("tokens", shard, 1)}
        for rel in sorted(wanted - set(rec.files)):
            problems.append(f"shard {shard}: {rel} is not listed in the manifest")
        for rel, info in sorted(rec.files.items()):
            f = store.path / rel
            if not f.is_file():
                problems.append(f"shard {shard}: {rel} is missing")
            elif f.stat().st_size != info["bytes"]:
                problems.append(f"shard {shard}: {rel} has {f.stat().st_size} bytes, manifest says {info['bytes']}")
            elif file_crc32(f) != info["crc32"]:
                problems.append(f"shard {shard}: {rel} fails its checksum")
    return problems
