"""Crash safety of `actcache collect`: SIGKILL, a killed torchrun, a full disk; then `--resume`.

Every interrupted store must show only committed shards (intact, checksummed, equal to an
uninterrupted run) and, once resumed, be identical to the uninterrupted reference.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from actcache.cli import main as actcache_main
from sae_core import UserError
from sae_core.store import ActivationStore, verify_store
from sae_core.store.format import store_state
from sae_core.store.manifest import manifest_files
from sae_core.store.writer import ShardWriter
from tests.conftest import TINY_TEXT

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
CTX = 32
LAYERS = (0, 2, 3)
COPIES = 3  # TINY_TEXT three times: 99 sequences of 32 -> 50 shards of 2 sequences (the last: 1)
SHARDS = 50
# One thread everywhere, so every run (subprocess, torchrun rank, in-process) computes alike.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
RUN_TIMEOUT = 300


# --------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("crash_text")
    for r in range(COPIES):
        for i, t in enumerate(TINY_TEXT):
            (path / f"doc{r}_{i}.txt").write_text(t)
    return path


@pytest.fixture(scope="module")
def argv(tiny_model_dir, data_dir):
    """The `actcache collect` arguments every run here uses (so they can resume each other)."""

    def make(out: Path, *extra: str) -> list[str]:
        return [
            "collect", "--out", str(out), "--model", str(tiny_model_dir), "--dataset", str(data_dir),
            "--ctx-len", str(CTX), "--seqs-per-shard", "2", "--batch-size", "1",
            "--layers", ",".join(map(str, LAYERS)), "--dtype", "float32", "--device", "cpu",
            "--no-progress", *extra,
        ]

    return make


@dataclass
class Reference:
    path: Path
    store: ActivationStore
    tokens: torch.Tensor
    acts: dict[int, torch.Tensor]


@pytest.fixture(scope="module")
def ref(tmp_path_factory, argv) -> Reference:
    """An uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("crash_ref") / "ref.zarr"
    res = run_to_end(python_cmd(argv(out)), out.with_suffix(".log"))
    assert f"({(2 * SHARDS - 1) * CTX:,} committed" in res
    store = ActivationStore(out)
    assert store.complete and store.layout.num_shards == SHARDS
    n = store.layout.num_tokens
    return Reference(out, store, store.tokens(), {layer: store.read(layer, 0, n) for layer in LAYERS})


# ---------------------------------------------------------------------------------- helpers
def python_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "actcache", *args]


def torchrun_cmd(args: list[str]) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(port), "-m", "actcache", *args]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:  # the child keeps its own descriptor
        return subprocess.Popen(
            cmd, cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def run_to_end(cmd: list[str], log: Path) -> str:
    """Run a command to completion; return its output (stdout and stderr)."""
    proc = start(cmd, log)
    try:
        proc.wait(timeout=RUN_TIMEOUT)
    finally:
        if proc.returncode is None:
            kill_tree(proc)
    assert proc.returncode == 0, log.read_text()
    return log.read_text()


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except (OSError, IndexError):
        return True


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and everything it started.

    torchrun starts each worker in a session of its own, so killing torchrun's process group
    alone would leave both ranks running (and writing) as orphans: kill them by pid first.
    """
    if proc.poll() is not None:
        return
    workers = descendants(proc.pid)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while not all(gone(pid) for pid in workers):
        assert time.monotonic() < deadline, f"workers {workers} survive SIGKILL"
        time.sleep(0.01)


def committed(out: Path) -> set[int]:
    """Shards listed in the store's manifest files (manifest.json, manifest.rank<R>.json)."""
    shards: set[int] = set()
    for p in out.glob("manifest*.json"):
        with contextlib.suppress(OSError, ValueError):  # a rank file folded in meanwhile
            shards |= {int(s) for s in json.loads(p.read_text())["shards"]}
    return shards


def created(out: Path) -> bool:
    """The store exists with its metadata (the last step of creating it)."""
    try:
        return "actcache" in json.loads((out / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False


def at_least(n: int):
    return lambda out: len(committed(out)) >= n


def kill_when(proc: subprocess.Popen, out: Path, ready, log: Path, poll: float = 0.01) -> None:
    """SIGKILL `proc` (and its workers) as soon as `ready(out)`; fail if the run ends first."""
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while not ready(out):
            if proc.poll() is not None:
                pytest.fail(
                    f"the run ended (exit {proc.returncode}) before its kill point; "
                    f"the dataset is too small to interrupt it:\n{log.read_text()}"
                )
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(poll)
    finally:
        kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}:\n{log.read_text()}"


def cli(args: list[str]) -> int:
    """`actcache ARGS` in this process; its exit code."""
    try:
        actcache_main(args)
    except SystemExit as e:
        return e.code or 0
    return 0


@contextlib.contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def shard_tokens(store: ActivationStore, shards) -> int:
    return sum(len(store.layout.shard_tokens_range(s)) for s in shards)


def committed_files(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every committed shard file: a resumed run must leave them alone."""
    store = ActivationStore(out)
    return {
        rel: ((out / rel).stat().st_ino, (out / rel).stat().st_mtime_ns)
        for rec in store.manifest.shards.values()
        for rel in rec.files
    }


def check_interrupted(out: Path, ref: Reference) -> set[int]:
    """An interrupted store: readers see exactly the committed shards, each intact and final."""
    shards = committed(out)
    store = ActivationStore(out)
    lay = store.layout
    assert set(store.committed_shards) == shards
    assert not store.complete and len(shards) < lay.num_shards, "killed after the last commit"
    last = lay.num_shards - 1  # the one short shard (1 sequence)
    full = len(shards - {last})
    assert store.num_tokens == full * lay.shard_tokens + (CTX if last in shards else 0)
    assert store.num_tokens == shard_tokens(store, shards)
    gap = min(set(range(lay.num_shards)) - shards)
    r = lay.shard_tokens_range(gap)
    with pytest.raises(UserError, match=f"shard {gap}, which is not committed"):
        store.read(LAYERS[-1], r.start, r.stop)
    # With no range, the reads stop before the first shard that is not committed.
    assert store.committed_prefix == r.start and len(store.tokens()) == r.start
    for s in shards:
        r = lay.shard_tokens_range(s)
        assert torch.equal(store.tokens(r.start, r.stop), ref.tokens[r.start : r.stop]), s
        for layer in LAYERS:
            assert torch.equal(store.read(layer, r.start, r.stop), ref.acts[layer][r.start : r.stop])
    assert verify_store(out) == []
    return shards


def assert_same_as_reference(out: Path, ref: Reference) -> None:
    store = ActivationStore(out)
    assert store.complete
    assert [p.name for p in manifest_files(out)] == ["manifest.json"], "per-rank manifests remain"
    assert store.meta == ref.store.meta
    assert store.committed_shards == ref.store.committed_shards == list(range(SHARDS))
    for s, rec in ref.store.manifest.shards.items():
        got = store.manifest.shards[s]
        assert got.tokens == rec.tokens, s
        assert got.files == rec.files, f"shard {s}: files differ from the reference (bytes or crc32)"
    assert torch.equal(store.tokens(), ref.tokens)
    n = store.layout.num_tokens
    for layer in LAYERS:
        assert torch.equal(store.read(layer, 0, n), ref.acts[layer]), layer
        got, want = store.stats(layer), ref.store.stats(layer)
        assert (got.count, got.nonfinite, got.norm_max) == (want.count, want.nonfinite, want.norm_max)
        np.testing.assert_array_equal(got.norm_hist, want.norm_hist)
        np.testing.assert_allclose(got.mean, want.mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got.var, want.var, rtol=1e-12, atol=1e-12)
    assert verify_store(out) == []
    assert cli(["verify", str(out)]) == 0


def resume_to_end(out: Path, argv, ref: Reference, log: Path) -> None:
    """A single-process `--resume` that must write exactly the missing shards, then match."""
    before = committed(out)
    untouched = committed_files(out)
    text = run_to_end(python_cmd(argv(out, "--resume")), log)
    todo = ref.store.layout.num_tokens - shard_tokens(ref.store, before)
    assert f"wrote {todo:,} tokens" in text, text
    assert committed_files(out).items() >= untouched.items(), "resume rewrote committed shards"
    assert_same_as_reference(out, ref)


# ------------------------------------------------------------------------------------ tests
# Kill chains, each on a store of its own: a fresh run killed at the first point, the
# resumed run at the next and so on; then a resume to the end. Committed counts are totals.
KILL_CHAINS = {
    # Killed once the store exists but nothing is committed; the resumed run after its first
    # commit.
    "before-first-commit": ["created", 1],
    # Killed as soon as the group's zarr.json appears (most likely while its arrays are being
    # created); the resumed run starts the store afresh and is killed after its first commit.
    "during-creation": ["zarr.json", 1],
    # Killed after >= 5 commits; the resumed run after >= 12 in all.
    "mid-run": [5, 12],
}


def kill_chain(tmp_path: Path, argv, ref: Reference, name: str, kill_points: list) -> None:
    out = tmp_path / f"{name}.zarr"
    seen = -1
    for i, point in enumerate(kill_points):
        log = tmp_path / f"{name}.run{i}.log"
        proc = start(python_cmd(argv(out, *(["--resume"] if i else []))), log)
        if point == "created":
            kill_when(proc, out, created, log, poll=0.005)
        elif point == "zarr.json":
            kill_when(proc, out, lambda out: (out / "zarr.json").exists(), log, poll=0.001)
            if not created(out):
                assert store_state(out) == "creating" and not committed(out)
                with pytest.raises(UserError, match="is incomplete: its creation was interrupted, nothing is committed"):
                    ActivationStore(out)
                continue
        else:
            kill_when(proc, out, at_least(point), log)
        shards = check_interrupted(out, ref)
        if point == "created" and shards:  # the poll came too late: still a valid crash
            warnings.warn(f"{name}: killed after {len(shards)} commits, not before", stacklevel=1)
        assert len(shards) > seen, f"{name}: the resumed run committed nothing before its kill"
        seen = len(shards)
        assert shards == set(range(len(shards))), "one process commits its shards in order"
    resume_to_end(out, argv, ref, tmp_path / f"{name}.resume.log")


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path, argv, ref):
    """Both kill chains at once (each run mostly keeps one core busy)."""
    with ThreadPoolExecutor(len(KILL_CHAINS)) as pool:
        futures = [
            pool.submit(kill_chain, tmp_path, argv, ref, name, points)
            for name, points in KILL_CHAINS.items()
        ]
        for f in futures:
            f.result()


@pytest.mark.slow
def test_torchrun_two_ranks_equals_single_process(tmp_path, argv, ref):
    out = tmp_path / "ddp.zarr"
    text = run_to_end(torchrun_cmd(argv(out)), tmp_path / "ddp.log")
    # Each rank takes every other missing shard; rank 0 reports what all wrote and what all committed.
    n = ref.store.num_tokens
    assert f"wrote {n:,} tokens" in text and f"({n:,} committed" in text, text
    assert_same_as_reference(out, ref)


@pytest.mark.slow
def test_torchrun_killed_then_single_process_resume(tmp_path, argv, ref):
    out = tmp_path / "ddp.zarr"
    log = tmp_path / "ddp.log"
    proc = start(torchrun_cmd(argv(out)), log)
    kill_when(proc, out, at_least(10), log)
    names = {p.name for p in manifest_files(out)}
    # the (empty) manifest.json of the store's creation, the ranks' commits not yet folded into it
    assert names & {"manifest.rank0.json", "manifest.rank1.json"}, names
    assert names <= {"manifest.json", "manifest.rank0.json", "manifest.rank1.json"}, names
    check_interrupted(out, ref)
    resume_to_end(out, argv, ref, tmp_path / "resume.log")


def test_ctrl_c_says_what_is_committed_then_resumes(tmp_path, argv, ref):
    """SIGINT mid-run: exit code 130, one line on stderr with the committed tokens and how to continue."""
    out = tmp_path / "int.zarr"
    log = tmp_path / "int.log"
    proc = start(python_cmd(argv(out)), log)
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while len(committed(out)) < 3:
            assert proc.poll() is None, f"the run ended before its interrupt:\n{log.read_text()}"
            assert time.monotonic() < deadline, "interrupt point never reached"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=RUN_TIMEOUT)
    finally:
        kill_tree(proc)
    assert proc.returncode == 130, log.read_text()
    shards = check_interrupted(out, ref)
    tokens = ActivationStore(out).num_tokens
    assert log.read_text().strip().splitlines() == [
        f"interrupted: {tokens:,} of {ref.store.num_tokens:,} tokens are committed in {out}; "
        "run the same `actcache collect` command with --resume to continue"
    ]
    assert shards == set(range(len(shards)))
    resume_to_end(out, argv, ref, tmp_path / "int.resume.log")


def test_recollected_shards_are_counted_once_across_ranks(tmp_path):
    """A shard set aside (failed verification) keeps its statistics; a rank that re-collects it adds
    its files, and folding the rank's manifest in does not count it twice."""
    from sae_core.store.manifest import Manifest, ShardRecord
    from sae_core.store.stats import RunningStats

    x = [torch.randn(8, 4, dtype=torch.float64) for _ in range(3)]
    main = Manifest({i: ShardRecord(i, (8 * i, 8 * i + 8), {}) for i in range(3)},
                    {"a": RunningStats.of(x[0]).merge(RunningStats.of(x[1])).merge(RunningStats.of(x[2]))})
    aside = main.set_aside({1: "f fails its checksum"})
    assert sorted(aside.shards) == [0, 2] and aside.recollect == {1: "f fails its checksum"}
    assert aside.stats["a"].count == 24
    # A rank writer (its own, empty manifest; told shard 1 is counted) commits the files, not the stats.
    from sae_core.store.layout import StoreLayout
    from sae_core.store.writer import create_store

    layout = StoreLayout(num_sequences=6, ctx_len=4, seqs_per_shard=2, chunk_tokens=4)
    create_store(tmp_path, {"dtype": "float32", "arrays": {"a": {"d": 4}}}, layout, {"a": 4}, "none")
    writer = ShardWriter(tmp_path, layout=layout, dtype="float32", manifest=Manifest(), rank=1, fsync=False,
                         counted=frozenset({1}))
    writer.submit(1, {"a": x[1].float()}, np.arange(8))
    writer.close()
    rank = Manifest.from_json((tmp_path / "manifest.rank1.json").read_text(), "rank1")
    assert sorted(rank.shards) == [1] and rank.stats == {}
    folded = Manifest.from_json(aside.to_json(), "m").merged_with(rank)
    assert sorted(folded.shards) == [0, 1, 2] and folded.recollect == {} and folded.stats["a"].count == 24


def fill_disk_after(monkeypatch, shards: int) -> None:
    """Writing the tokens of shard number `shards` + 1 (and any later) fails: disk full."""
    calls = itertools.count(1)
    write_tokens = ShardWriter._write_tokens

    def full(self, shard, rows, tokens):
        if next(calls) > shards:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_tokens(self, shard, rows, tokens)

    monkeypatch.setattr(ShardWriter, "_write_tokens", full)


def test_disk_full_mid_run_then_resume(tmp_path, argv, ref, monkeypatch, capsys):
    out = tmp_path / "full.zarr"
    fill_disk_after(monkeypatch, 3)
    with one_thread():
        assert cli(argv(out)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: disk full") and "--resume" in lines[0], lines[0]
    assert f"{3 * 2 * CTX} tokens are committed" in lines[0], lines[0]
    assert check_interrupted(out, ref) == {0, 1, 2}

    monkeypatch.undo()
    untouched = committed_files(out)
    with one_thread():
        assert cli(argv(out, "--resume")) == 0
    assert f"wrote {ref.store.num_tokens - 3 * 2 * CTX:,} tokens" in capsys.readouterr().out
    assert committed_files(out).items() >= untouched.items()
    assert_same_as_reference(out, ref)

    # Resuming a complete store (say, killed after its last commit) writes nothing.
    done = committed_files(out)
    with one_thread():
        assert cli(argv(out, "--resume")) == 0
    assert "wrote 0 tokens" in capsys.readouterr().out
    assert committed_files(out) == done
    assert_same_as_reference(out, ref)


def test_resume_over_torn_uncommitted_shard_file(tmp_path, argv, ref, monkeypatch, capsys):
    out = tmp_path / "torn.zarr"
    fill_disk_after(monkeypatch, 3)
    with one_thread():
        assert cli(argv(out)) == 2
    monkeypatch.undo()
    assert committed(out) == {0, 1, 2}
    # What a crash in the middle of writing shard 3 can leave (power loss; or with a zarr
    # whose LocalStore writes files in place): a shard file cut short.
    torn = out / "layers" / "layer_0" / "c" / "3" / "0"
    torn.parent.mkdir(parents=True, exist_ok=True)
    good = (ref.path / "layers" / "layer_0" / "c" / "3" / "0").read_bytes()
    torn.write_bytes(good[: len(good) // 2])
    capsys.readouterr()
    with one_thread():
        assert cli(argv(out, "--resume")) == 0
    assert_same_as_reference(out, ref)


def test_reading_while_rank0_folds_the_manifests(tmp_path, monkeypatch):
    """A reader that catches the end-of-run fold midway (shards in manifest.json and still in their rank's
    file, or a rank file listed then deleted) gets every shard once; a real overlap is still an error."""
    from sae_core.store import manifest as m

    a, b = m.Manifest({0: m.ShardRecord(0, (0, 4), {})}), m.Manifest({1: m.ShardRecord(1, (4, 8), {})})
    m.Manifest({**a.shards, **b.shards}).save(tmp_path, None)  # folded, the rank file not yet deleted
    b.save(tmp_path, 1)
    assert sorted(m.read_manifests(tmp_path).shards) == [0, 1]
    (tmp_path / "manifest.rank1.json").unlink()

    calls, real = [], m.manifest_files
    listed = [tmp_path / "manifest.json", tmp_path / "manifest.rank1.json"]  # listed, then deleted
    monkeypatch.setattr(m, "manifest_files", lambda root: real(root) if calls.append(1) or len(calls) > 1 else listed)
    assert sorted(m.read_manifests(tmp_path).shards) == [0, 1]

    monkeypatch.setattr(m, "FOLD_RETRY_S", 0.2)
    m.Manifest({1: b.shards[1], 2: m.ShardRecord(2, (8, 12), {})}).save(tmp_path, 1)  # stays: they overlap
    with pytest.raises(UserError, match="two manifests of this store overlap"):
        m.read_manifests(tmp_path)
