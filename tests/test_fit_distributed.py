"""`saetrain fit` across processes: SIGKILL + --resume, torchrun --distribute-layers, data parallel.

Every run is a real subprocess (`python -m saetrain fit` or `torchrun`, gloo on CPU) with one
thread each; runs that do not depend on each other are started together to share the 2 cores.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from actcache import CollectConfig, collect
from sae_core import Sae
from saetrain.order import epoch_windows, split_holdout
from tests.conftest import TINY_TEXT
from tests.fit_fixtures import (
    HOLDOUT,
    SEED,
    Job,
    fit_argv,
    latest_step,
    max_metrics_step,
    metrics,
    saetrain,
    steps_per_epoch,
    torchrun,
    train_chunk_tokens,
)

ATOL = 1e-5
LAYERS = ["layer_0", "layer_1", "layer_2"]
REF12_ARGS = ("--layers", "1,2", "--save-every", "5", "--epochs", "2")
SINGLE3_ARGS = ("--layers", "0-2", "--save-every", "20", "--lr-schedule", "linear")


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir) -> Path:
    """~6.4k tokens of layers 0-3 (fp32) in 32-token chunks: ~200 chunks, ~90 steps of 64 per epoch."""
    text = tmp_path_factory.mktemp("fitdist_text")
    for i, t in enumerate(TINY_TEXT):
        (text / f"doc{i}.txt").write_text(t * 6)
    out = tmp_path_factory.mktemp("fitdist_store") / "s.zarr"
    collect(CollectConfig(out=out, model=str(tiny_model_dir), dataset=str(text), ctx_len=32, batch_size=16,
                          seqs_per_shard=4, chunk_tokens=32, dtype="float32", device="cpu", progress=False))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The run folders; at the end, kill whatever a failed test left running."""
    root = tmp_path_factory.mktemp("fitdist_runs")
    jobs: list[Job] = []
    yield root, jobs
    for job in jobs:
        job.kill()


def _start(runs, name: str, cmd: list[str], **env: str) -> Job:
    root, jobs = runs
    jobs.append(Job(cmd, root / "logs" / name, **env))
    return jobs[-1]


# Each job fixture starts its run and returns at once; a test waits with .ok().
@pytest.fixture(scope="module")
def ref12(store, runs) -> Job:
    """Uninterrupted training of layers 1,2 for two epochs, a checkpoint every 5 steps."""
    return _start(runs, "ref12", saetrain(store, runs[0] / "ref12", *REF12_ARGS))


@pytest.fixture(scope="module")
def single3(store, runs) -> Job:
    """Single-process training of layers 0-2 for one epoch: the reference of tests 2 and 3."""
    return _start(runs, "single3", saetrain(store, runs[0] / "single3", *SINGLE3_ARGS))


@pytest.fixture(scope="module")
def dist3(store, runs) -> Job:
    """The same as single3 under torchrun --distribute-layers, 2 ranks."""
    argv = fit_argv(store, runs[0] / "dist3", *SINGLE3_ARGS, "--distribute-layers")
    return _start(runs, "dist3", torchrun(2, "saetrain", argv))


@pytest.fixture(scope="module")
def dp2(store, runs) -> Job:
    """Layers 0-1 as in single3 under torchrun data parallel, 2 ranks, each dumping what it trained.

    (Each layer's SAE depends only on the data, the seed and its index in --layers, so single3's
    layer_0 and layer_1 are exactly what one process would train with --layers 0-1.)
    """
    argv = fit_argv(store, runs[0] / "dp2", "--layers", "0-1", "--save-every", "20", "--lr-schedule", "linear")
    return _start(runs, "dp2", torchrun(2, "tests.fit_fixtures", argv), FIT_DUMP=str(runs[0] / "dp2_dump"))


@pytest.fixture(scope="module")
def idle(store, runs) -> Job:
    argv = fit_argv(store, runs[0] / "idle", "--layers", "0", "--distribute-layers", "--max-tokens", "128")
    return _start(runs, "idle", torchrun(2, "saetrain", argv))


JOBS = ("ref12", "single3", "dist3", "dp2", "idle")


@pytest.fixture(scope="module", autouse=True)
def _prestart(request):
    """Start the runs the selected tests of this module need all at once: they overlap on the 2 cores."""
    here = [it for it in request.session.items if it.module is request.module]
    for name in JOBS:
        if any(name in it.fixturenames for it in here):
            request.getfixturevalue(name)


def assert_same_saes(got: Path, want: Path, layers: list[str]) -> None:
    a = Sae.load_many(got, local=True, layers=layers)
    b = Sae.load_many(want, local=True, layers=layers)
    assert list(a) == list(b) == layers
    for n in layers:
        sa, sb = a[n].state_dict(), b[n].state_dict()
        assert sa.keys() == sb.keys()
        for p in sa:
            torch.testing.assert_close(sa[p], sb[p], atol=ATOL, rtol=1e-5, msg=lambda m, n=n, p=p: f"{n}.{p}: {m}")


def by_step_layer(out: Path) -> dict[tuple[int, str], dict]:
    lines = metrics(out)
    keyed = {(ln["step"], ln["layer"]): ln for ln in lines}
    assert len(keyed) == len(lines), f"{out}/metrics.jsonl repeats a (step, layer)"
    return keyed


def assert_same_metrics(got: Path, want: Path) -> None:
    a, b = by_step_layer(got), by_step_layer(want)
    assert sorted(a) == sorted(b)
    for key in b:
        assert a[key]["tokens"] == b[key]["tokens"], key
        assert a[key]["lr"] == pytest.approx(b[key]["lr"], rel=1e-9), key
        assert a[key]["fvu"] == pytest.approx(b[key]["fvu"], abs=ATOL), key


def heldout(out: Path) -> dict[str, float]:
    return json.loads((out / "eval.json").read_text())["heldout_fvu"]


# --------------------------------------------------------------------------------- 1. SIGKILL + --resume
@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(store, runs, ref12):
    root = runs[0]
    ref_out, out = root / "ref12", root / "killed12"
    victim = _start(runs, "victim", saetrain(store, out, *REF12_ARGS))

    _, tokens = train_chunk_tokens(store)
    per_epoch = steps_per_epoch(tokens)
    total = 2 * per_epoch
    # Kill in the second epoch, with ~per_epoch - 10 steps to spare (each step also slows down
    # when the machine is busy, so the margin holds whatever the load): the checkpoint then holds
    # epoch 1 and a token offset inside it (after a window boundary), not just a fresh epoch.
    kill_at = per_epoch + 10
    deadline = time.monotonic() + 300
    while True:
        assert victim.proc.poll() is None, f"run ended (rc {victim.proc.returncode}) before the kill:\n{victim.stderr[-2000:]}"
        assert time.monotonic() < deadline, f"no checkpoint at step {kill_at} or later within 300 s"
        step = latest_step(out)
        # Also wait until metrics.jsonl runs past the checkpoint, so resuming has lines to drop.
        if step is not None and step >= kill_at and max_metrics_step(out) > step:
            break
        time.sleep(0.02)
    victim.proc.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run finished before SIGKILL landed"
    killed_at = latest_step(out)
    assert kill_at <= killed_at < total and not (out / "eval.json").exists()
    assert (out / "metrics.jsonl").exists() and max_metrics_step(out) < total

    resumed = _start(runs, "resumed", saetrain(store, out, *REF12_ARGS, "--resume")).ok()
    ref12.ok()
    assert f"{total} steps" in resumed.stdout and f"{total} steps" in ref12.stdout, (resumed.stdout, ref12.stdout)
    assert latest_step(out) == latest_step(ref_out) == total

    assert_same_saes(out, ref_out, ["layer_1", "layer_2"])
    assert_same_metrics(out, ref_out)
    assert {s for s, _ in by_step_layer(out)} == set(range(1, total + 1))
    fvu, ref_fvu = heldout(out), heldout(ref_out)
    assert fvu.keys() == ref_fvu.keys() == {"layer_1", "layer_2"}
    for n in fvu:
        assert fvu[n] == pytest.approx(ref_fvu[n], abs=ATOL), n
    print(f"killed at checkpoint {killed_at}/{total}; ref {ref12.seconds:.0f}s, resume {resumed.seconds:.0f}s")


# ------------------------------------------------------------------- 4. --resume refuses other settings
@pytest.mark.slow
def test_resume_refuses_different_settings(store, runs, ref12):
    ref12.ok()
    out = runs[0] / "refuse"
    shutil.copytree(runs[0] / "ref12", out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    job = _start(runs, "refuse", saetrain(store, out, *REF12_ARGS, "--resume", "--k", "8"))
    assert job.wait() == 2, job.stderr
    lines = job.stderr.strip().splitlines()
    assert len(lines) == 1, job.stderr
    assert lines[0].startswith("error: cannot resume") and "k differs" in lines[0], lines[0]
    assert "run: 4" in lines[0] and "now: 8" in lines[0], lines[0]
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before, "a refused --resume must leave the run folder untouched"



@pytest.mark.slow
def test_a_refusal_under_torchrun_is_said_once(store, runs, ref12):
    """Every rank refuses alike; the first rank says why, once, and torchrun exits non-zero."""
    ref12.ok()
    job = _start(runs, "refuse2", torchrun(2, "saetrain", fit_argv(store, runs[0] / "ref12", *REF12_ARGS, "--resume",
                                                                    "--k", "8")))
    assert job.wait() != 0, job.stderr
    errors = [line for line in job.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "k differs" in errors[0], job.stderr

@pytest.mark.slow
def test_a_diverging_layer_stops_every_rank_under_distribute_layers(store, runs):
    """Each rank trains its own layers; one whose loss stops being finite stops both ranks at that step (none
    is left waiting in a collective), with one error and nothing of that step saved."""
    out = runs[0] / "diverge"
    job = _start(runs, "diverge", torchrun(2, "saetrain", fit_argv(
        store, out, "--layers", "1,2", "--distribute-layers", "--lr", "1e30", "--grad-clip", "0",
        "--lr-warmup-steps", "1", "--save-every", "1")))
    assert job.wait(240) != 0, job.stderr
    errors = [line for line in job.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and " diverged at step " in errors[0], job.stderr
    for line in (out / "metrics.jsonl").read_text().splitlines():  # valid JSON and finite, up to the step before
        assert all(v == v and abs(v) != float("inf") for v in json.loads(line).values() if isinstance(v, float))


# ------------------------------------------------------------------------ 2. torchrun --distribute-layers
@pytest.mark.slow
def test_distribute_layers_over_two_ranks_equals_single_process(store, runs, dist3, single3):
    dist3.ok()
    single3.ok()
    out, ref = runs[0] / "dist3", runs[0] / "single3"

    plan = json.loads((out / "plan.json").read_text())
    assert sorted(plan) == ["rank0", "rank1"]
    mine = [set(plan["rank0"]), set(plan["rank1"])]
    assert mine[0] and mine[1] and not mine[0] & mine[1], plan  # 3 layers on 2 ranks: nobody idle, no overlap
    assert mine[0] | mine[1] == set(LAYERS), plan
    assert dist3.stdout.count("layer plan:") == 1, dist3.stdout

    assert_same_saes(out, ref, LAYERS)
    # Both ranks append to metrics.jsonl: every layer, every step, once, as in the single process.
    assert {ln["layer"] for ln in metrics(out)} == set(LAYERS)
    assert_same_metrics(out, ref)
    fvu, ref_fvu = heldout(out), heldout(ref)
    assert list(fvu) == list(ref_fvu) == LAYERS
    for n in LAYERS:
        assert fvu[n] == pytest.approx(ref_fvu[n], abs=ATOL), n
    print(f"distribute-layers {dist3.seconds:.0f}s, single process {single3.seconds:.0f}s")

    # Resumed in one process, the run has no layer plan any more: plan.json goes with it.
    resumed = runs[0] / "dist3-resumed"
    shutil.copytree(out, resumed)
    _start(runs, "dist3-resumed", saetrain(store, resumed, *SINGLE3_ARGS, "--resume")).ok()
    assert not (resumed / "plan.json").exists()
    assert_same_saes(resumed, ref, LAYERS)


# ---------------------------------------------------------------------------- 3. torchrun data parallel
def test_data_parallel_ranks_read_disjoint_parts_of_the_order(store):
    from sae_core.store import ActivationStore

    chunks = ActivationStore(store).committed_chunks()
    train, hold = split_holdout(chunks, HOLDOUT, SEED)
    for window in (1, 7, 64):
        for epoch in range(3):
            wins = [epoch_windows(train, seed=SEED, epoch=epoch, window=window, rank=r, world=2) for r in range(2)]
            ranks = [[c for w in ws for c in w] for ws in wins]
            assert not set(ranks[0]) & set(ranks[1])
            assert sorted(ranks[0] + ranks[1]) == sorted(train) and not set(ranks[0] + ranks[1]) & set(hold)
            assert abs(len(ranks[0]) - len(ranks[1])) <= 1
            assert all(1 <= len(w) <= window for ws in wins for w in ws)
            # The two ranks together visit what one process visits, dealt out in turn.
            single = [c for w in epoch_windows(train, seed=SEED, epoch=epoch, window=window) for c in w]
            assert ranks[0] == single[0::2] and ranks[1] == single[1::2]


@pytest.mark.slow
def test_data_parallel_converges_like_single_process(runs, dp2, single3):
    dp2.ok()
    single3.ok()
    out, ref, dump = runs[0] / "dp2", runs[0] / "single3", runs[0] / "dp2_dump"
    dp_fvu, sp_fvu = heldout(out), heldout(ref)
    assert list(dp_fvu) == ["layer_0", "layer_1"]
    # Both runs take the same optimizer steps (64 tokens each, summed over ranks) with the same LR
    # schedule over the same training tokens; only the order the tokens come in differs. The held-out
    # FVU after this one short epoch is ~0.06-0.12 and differs between data orders: over seeds 1-4,
    # |data parallel - single process| was at most 0.02, i.e. up to ~20% relative (so a 15% relative
    # band would be flaky). An absolute margin of 0.05 passes that noise with room, and "< 0.25"
    # (an untrained SAE is at ~1) catches runs that do not learn. Exact replica sync is a separate test.
    for n in dp_fvu:
        assert dp_fvu[n] < 0.25, (n, dp_fvu, sp_fvu)
        assert abs(dp_fvu[n] - sp_fvu[n]) < 0.05, (n, dp_fvu, sp_fvu)

    # Rank 0 alone writes metrics: one line per (step, layer), as many steps and tokens as one process.
    dp_lines, sp_lines = by_step_layer(out), by_step_layer(ref)
    assert sorted({s for s, _ in dp_lines}) == sorted({s for s, _ in sp_lines})
    assert {ln for _, ln in dp_lines} == {"layer_0", "layer_1"}
    last = max(s for s, _ in sp_lines)
    assert dp_lines[last, "layer_0"]["tokens"] == sp_lines[last, "layer_0"]["tokens"]
    # The linear decay would reach 0 a step after the last, worked out before the run from each rank's share.
    for run, lines in ((out, dp_lines), (ref, sp_lines)):
        config = json.loads((run / "config.json").read_text())
        assert config["lr_schedule_steps"] == last
        lr = config["lr_per_layer"]["layer_0"]
        assert lines[last, "layer_0"]["lr"] == pytest.approx(lr / (last - 5))  # (--lr-warmup-steps 5)
    assert not (out / "plan.json").exists()

    # What rank 0 trained is what it published.
    rank0 = load_file(str(dump / "rank0.safetensors"))
    saes = Sae.load_many(out, local=True)
    assert list(saes) == ["layer_0", "layer_1"]
    for n, sae in saes.items():
        for p, v in sae.state_dict().items():
            torch.testing.assert_close(rank0[f"{n}/{p}"], v, atol=0, rtol=0)
    print(f"data parallel {dp2.seconds:.0f}s; held-out FVU dp {dp_fvu} single {sp_fvu}")


@pytest.mark.slow
def test_data_parallel_replicas_stay_identical(runs, dp2):
    dp2.ok()
    dump = runs[0] / "dp2_dump"
    r0, r1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    assert r0.keys() == r1.keys()
    for k in r0:
        torch.testing.assert_close(r1[k], r0[k], atol=0, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
def test_distribute_layers_with_an_idle_rank(runs, idle):
    idle.ok()
    out = runs[0] / "idle"
    assert json.loads((out / "plan.json").read_text()) == {"rank0": ["layer_0"], "rank1": []}
    assert list(heldout(out)) == ["layer_0"]
