"""Helpers for tests/test_fit_distributed.py: `saetrain fit` in subprocesses and under torchrun.

Run as a module (`torchrun ... -m tests.fit_fixtures fit ARGS`), this file is `saetrain` with a
spy: after the run every rank writes the parameters it trained to $FIT_DUMP/rank{R}.safetensors,
so a test can check that data-parallel replicas stayed identical.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = str(Path(sys.executable))
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# The settings every run of these tests shares (the brief's command line, less --out/--layers).
COMMON = [
    "--expansion-factor", "4", "--k", "4", "--batch-size", "64", "--lr-warmup-steps", "5",
    "--device", "cpu", "--no-progress", "--seed", "1", "--holdout", "0.1",
]
SEED, HOLDOUT, BATCH = 1, 0.1, 64


def env() -> dict[str, str]:
    """One thread per process (2 shared cores; equal numerics across runs), no inherited torchrun state."""
    e = {k: v for k, v in os.environ.items()
         if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
             PYTHONPATH=os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit_argv(store: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", "--store", str(store), "--out", str(out), *COMMON, *extra]


def saetrain(store: Path, out: Path, *extra: str) -> list[str]:
    return [PYTHON, "-m", "saetrain", *fit_argv(store, out, *extra)]


def torchrun(nproc: int, module: str, argv: list[str]) -> list[str]:
    return [TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", str(free_port()), "-m", module, *argv]


class Job:
    """A command in the background; stdout/stderr go to files next to `log`."""

    def __init__(self, cmd: list[str], log: Path, **env_extra: str):
        log.parent.mkdir(parents=True, exist_ok=True)
        self.cmd, self.log = cmd, log
        self._out = open(f"{log}.out", "w")  # noqa: SIM115 - closed in wait()
        self._err = open(f"{log}.err", "w")  # noqa: SIM115
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**env(), **env_extra}, stdout=self._out,
                                     stderr=self._err, start_new_session=True)
        self.seconds: float | None = None

    def kill(self) -> None:
        """SIGKILL the process and its children (its own session, started by us), if still running."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._out.close()
        self._err.close()

    def wait(self, timeout: float = 600) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"timed out after {timeout}s: {' '.join(self.cmd)}\n{self.stderr[-3000:]}") from None
        finally:
            self._out.close()
            self._err.close()
        if self.seconds is None:
            self.seconds = time.perf_counter() - self.t0
        return rc

    def ok(self, timeout: float = 600) -> Job:
        rc = self.wait(timeout)
        assert rc == 0, f"exit {rc}: {' '.join(self.cmd)}\n{self.stderr[-3000:]}"
        return self

    @property
    def stdout(self) -> str:
        return Path(f"{self.log}.out").read_text()

    @property
    def stderr(self) -> str:
        return Path(f"{self.log}.err").read_text()


def latest_step(out: Path) -> int | None:
    """Step of checkpoints/LATEST, or None (read only LATEST: the step folder may be replaced meanwhile)."""
    try:
        text = (out / "checkpoints" / "LATEST").read_text().strip()
    except FileNotFoundError:
        return None
    return int(text.removeprefix("step_")) if text.startswith("step_") else None


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]


def max_metrics_step(out: Path) -> int:
    try:
        text = (out / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    steps = [json.loads(ln)["step"] for ln in text.splitlines() if ln.endswith("}")]
    return max(steps, default=0)


def train_chunk_tokens(store_path: Path) -> tuple[list[int], int]:
    """The training chunks of a run with SEED/HOLDOUT, and their tokens."""
    from sae_core.store import ActivationStore
    from saetrain.order import split_holdout

    store = ActivationStore(store_path)
    train, _ = split_holdout(store.committed_chunks(), HOLDOUT, SEED)
    return train, sum(len(store.layout.chunk_tokens_range(c)) for c in train)


def steps_per_epoch(tokens: int, batch: int = BATCH) -> int:
    return math.ceil(tokens / batch)


def _spy_main(argv: list[str]) -> None:
    """`saetrain` that dumps each rank's trained parameters at exit (see the module docstring)."""
    from safetensors.torch import save_file

    import saetrain.trainer as trainer

    seen: dict = {}
    real_train = trainer._train

    def spy(cfg, resolved, trainers, *a, **k):
        seen.update(trainers)
        return real_train(cfg, resolved, trainers, *a, **k)

    trainer._train = spy
    from saetrain.cli import main

    try:
        main(argv)
    finally:
        if seen:
            dump = Path(os.environ["FIT_DUMP"])
            dump.mkdir(parents=True, exist_ok=True)
            tensors = {f"{n}/{p}": v.detach().cpu().contiguous()
                       for n, t in seen.items() for p, v in t.sae.state_dict().items()}
            save_file(tensors, str(dump / f"rank{os.environ.get('RANK', '0')}.safetensors"))


if __name__ == "__main__":
    _spy_main(sys.argv[1:])
