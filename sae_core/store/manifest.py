"""The commit protocol: a shard counts once its files are on disk and a manifest lists it.

Each writer (one per rank) owns one manifest file, replaced atomically (write a temporary
file, fsync, rename). Readers take the union of all manifest files. At the end of a torchrun
collection rank 0 folds the per-rank files into manifest.json and deletes them; a reader that
catches that midway sees a shard in both files (counted once) or a rank file gone (reads again).
"""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .stats import RunningStats

MANIFEST = "manifest.json"
# How long a reader retries while rank 0 folds per-rank manifests into manifest.json.
FOLD_RETRY_S = 10.0


def manifest_name(rank: int | None) -> str:
    return MANIFEST if rank is None else f"manifest.rank{rank}.json"


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


def file_problem(root: Path, rel: str, info: dict, *, checksum: bool) -> str | None:
    """What is wrong with a committed shard file against its manifest entry (None: nothing): missing,
    a size other than recorded (a cheap check), or, with `checksum`, another CRC32 (reads it all)."""
    f = root / rel
    try:
        size = f.stat().st_size
    except FileNotFoundError:
        return f"{rel} is missing"
    if size != info["bytes"]:
        return f"{rel} has {size} bytes, manifest says {info['bytes']}"
    if checksum and file_crc32(f) != info["crc32"]:
        return f"{rel} fails its checksum"
    return None


def damaged_shards(path: Path, manifest: Manifest) -> dict[int, str]:
    """Committed shards whose files are missing or of the wrong size (one `stat` per file; `verify`
    reads them for their checksums): shard -> the first problem found."""
    bad: dict[int, str] = {}
    for shard, rec in sorted(manifest.shards.items()):
        for rel, info in sorted(rec.files.items()):
            if why := file_problem(path, rel, info, checksum=False):
                bad[shard] = why
                break
    return bad


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


@dataclass
class ShardRecord:
    shard: int
    tokens: tuple[int, int]
    files: dict[str, dict]  # relative path -> {"crc32": int, "bytes": int}

    def to_json(self) -> dict:
        return {"tokens": list(self.tokens), "files": self.files}


@dataclass
class Manifest:
    shards: dict[int, ShardRecord] = field(default_factory=dict)
    stats: dict[str, RunningStats] = field(default_factory=dict)
    # Shards that were committed, then failed verification (`actcache verify`, or the size check
    # of `--resume`) and were uncommitted: shard -> what was wrong. Their statistics stay counted
    # (a re-collected shard is the same data), so committing one again does not add them twice.
    recollect: dict[int, str] = field(default_factory=dict)

    def to_json(self) -> str:
        d = {
            "shards": {str(i): r.to_json() for i, r in sorted(self.shards.items())},
            "stats": {k: v.to_json() for k, v in self.stats.items()},
        }
        if self.recollect:
            d["recollect"] = {str(i): why for i, why in sorted(self.recollect.items())}
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, source: str) -> Manifest:
        try:
            d = json.loads(text)
            shards = {
                int(i): ShardRecord(int(i), tuple(r["tokens"]), r["files"]) for i, r in d["shards"].items()
            }
            stats = {k: RunningStats.from_json(v) for k, v in d.get("stats", {}).items()}
            recollect = {int(i): str(why) for i, why in d.get("recollect", {}).items()}
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"{source} is corrupt ({type(e).__name__}: {e}): the record of committed shards is lost; restore it "
                "from a copy or collect again with --overwrite"
            ) from None
        return cls(shards, stats, recollect)

    def save(self, root: Path, rank: int | None) -> None:
        atomic_write(root / manifest_name(rank), self.to_json())

    def merged_with(self, other: Manifest) -> Manifest:
        """Union of two manifests; stats of `other` are added only if it brings new shards."""
        new = set(other.shards) - set(self.shards)
        stats = dict(self.stats)
        if new:
            if set(other.shards) & set(self.shards):
                raise UserError("two manifests of this store overlap; run `actcache verify` and re-collect")
            for k, v in other.stats.items():
                stats[k] = stats[k].merge(v) if k in stats else v
        shards = {**self.shards, **other.shards}
        recollect = {i: why for i, why in {**self.recollect, **other.recollect}.items() if i not in shards}
        return Manifest(shards, stats, recollect)

    def set_aside(self, bad: dict[int, str]) -> Manifest:
        """Uncommit the shards in `bad` (shard -> what is wrong) so that `--resume` re-collects them."""
        shards = {i: r for i, r in self.shards.items() if i not in bad}
        return Manifest(shards, dict(self.stats), {**self.recollect, **{i: bad[i] for i in bad if i in self.shards}})


def manifest_files(root: Path) -> list[Path]:
    main = root / MANIFEST
    ranks = sorted(root.glob("manifest.rank*.json"))
    return ([main] if main.is_file() else []) + ranks


def read_manifests(root: Path) -> Manifest:
    """The union of every manifest of a store: what is committed."""
    deadline = time.monotonic() + FOLD_RETRY_S
    while True:
        try:
            out = Manifest()
            for p in manifest_files(root):
                out = out.merged_with(Manifest.from_json(p.read_text(), str(p)))
            return out
        except FileNotFoundError:  # a rank file listed, then folded and deleted
            if time.monotonic() > deadline:  # not a fold in progress
                raise
            time.sleep(0.05)
