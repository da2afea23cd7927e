"""What the benchmarks share."""

from __future__ import annotations

import os
import sys


def apply_omp_wait_policy(policy: str, module: str) -> None:
    """Restart this benchmark under OMP_WAIT_POLICY=policy ('default' leaves it unset).

    libgomp busy-waits after every parallel region unless it manages more threads than there are
    CPUs. A process with extra threads of its own (a store loader, writer threads) tips it over and
    stops spinning; a bare loop does not, and on a loaded machine its spinning threads can halve its
    speed. Side-by-side timings are only fair under one policy; libgomp reads it once, at load.
    """
    want = None if policy == "default" else policy
    if os.environ.get("OMP_WAIT_POLICY") != want:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | ({"OMP_WAIT_POLICY": want} if want else {})
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


def run_and_report(bench, args, *, prefix: str, command: str) -> dict:
    """Run `bench(tmp)` in a temporary folder, save JSON if asked, print the command that reproduces it."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=args.tmp_dir))
    try:
        report = bench(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["command"] = command
    if args.out_json:
        args.out_json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.out_json}")
    print(f"\nreproduce with:\n  {command}")
    return report
