"""`actcache verify`: every committed shard file present with the checksum its manifest records.

With `set_aside` (`actcache verify --repair`), a committed shard that fails is set aside:
uncommitted in the manifest (its statistics stay counted, see `Manifest.recollect`), so that
`actcache collect ... --resume` re-collects it. Without, the store is only read.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .format import array_path, shard_file
from .manifest import file_problem
from .reader import ActivationStore

RECOLLECT_HINT = "run the same `actcache collect` command with --resume to re-collect it"


def verify_store(path: str | Path, *, set_aside: bool = False) -> list[str]:
    """Return a list of problems (empty when the store is sound); with `set_aside`, set bad shards
    aside, checking and uncommitting under the writer lock (no collection commits meanwhile)."""
    store = ActivationStore(path)
    store.check_manifest()
    if not set_aside:
        return _report(_problems(store))
    from .writer import consolidate_manifests, lock_store

    try:
        lock = lock_store(Path(path))
    except UserError:
        busy = "not set aside while `actcache collect` writes this store: run `actcache verify --repair` again once it ends"
        return _report(_problems(ActivationStore(path)), busy)
    try:
        bad = _problems(ActivationStore(path))
        if not bad:
            return []
        try:
            consolidate_manifests(Path(path)).set_aside({s: "; ".join(w) for s, w in bad.items()}).save(Path(path), None)
        except OSError as e:
            return _report(bad, f"cannot set the shard aside ({e.strerror or e}): re-collect the store with --overwrite")
        return _report(bad, f"shard set aside (uncommitted): {RECOLLECT_HINT}")
    finally:
        lock.close()


def _problems(store: ActivationStore) -> dict[int, list[str]]:
    """Committed shard -> what is wrong with it (shards without problems left out)."""
    _ = store._arrays  # every array's metadata opens (else a one-line error): re-collecting shards cannot fix it
    bad: dict[int, list[str]] = {}
    expected_files = [array_path(n) for n in store.layers]
    for shard, rec in sorted(store.manifest.shards.items()):
        found = []
        rows = store.layout.shard_tokens_range(shard)
        if tuple(rec.tokens) != (rows.start, rows.stop):
            found.append(f"manifest says tokens {rec.tokens}, layout says [{rows.start}, {rows.stop})")
        wanted = {shard_file(a, shard, 2) for a in expected_files} | {shard_file("tokens", shard, 1)}
        found += [f"{rel} is not listed in the manifest" for rel in sorted(wanted - set(rec.files))]
        found += [why for rel, info in sorted(rec.files.items())
                  if (why := file_problem(store.path, rel, info, checksum=True))]
        if found:
            bad[shard] = found
    return bad


def _report(bad: dict[int, list[str]], outcome: str | None = None) -> list[str]:
    return [f"shard {s}: {why}" + (f"; {outcome}" if outcome else "") for s, whys in bad.items() for why in whys]
