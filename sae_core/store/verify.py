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
    """Return a list of problems (empty when the store is sound); with `set_aside`, set bad shards aside."""
    store = ActivationStore(path)
    bad: dict[int, list[str]] = {}
    expected_files = [array_path(n) for n in store.layers]
    for shard, rec in sorted(store.manifest.shards.items()):
        found = bad.setdefault(shard, [])
        rows = store.layout.shard_tokens_range(shard)
        if tuple(rec.tokens) != (rows.start, rows.stop):
            found.append(f"manifest says tokens {rec.tokens}, layout says [{rows.start}, {rows.stop})")
        wanted = {shard_file(a, shard, 2) for a in expected_files} | {shard_file("tokens", shard, 1)}
        found += [f"{rel} is not listed in the manifest" for rel in sorted(wanted - set(rec.files))]
        found += [why for rel, info in sorted(rec.files.items())
                  if (why := file_problem(store.path, rel, info, checksum=True))]
    bad = {s: whys for s, whys in bad.items() if whys}
    outcome = _set_aside(store.path, {s: "; ".join(w) for s, w in bad.items()}) if bad and set_aside else None
    return [f"shard {s}: {why}" + (f"; {outcome}" if outcome else "") for s, whys in bad.items() for why in whys]


def _set_aside(path: Path, bad: dict[int, str]) -> str:
    """Uncommit the bad shards under the writer lock; return what was done, for the report."""
    from .writer import consolidate_manifests, lock_store

    try:
        lock = lock_store(path)
    except UserError:
        return "not set aside while `actcache collect` writes this store: run `actcache verify --repair` again once it ends"
    except OSError as e:
        return f"cannot set the shard aside ({e.strerror or e}): re-collect the store with --overwrite"
    try:
        manifest = consolidate_manifests(path)
        manifest.set_aside(bad).save(path, None)
    except OSError as e:
        return f"cannot set the shard aside ({e.strerror or e}): re-collect the store with --overwrite"
    finally:
        lock.close()
    return f"shard set aside (uncommitted): {RECOLLECT_HINT}"
