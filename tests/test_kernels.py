"""The Triton kernels of `sae_core.kernels`, checked in a subprocess under Triton's CPU interpreter.

`TRITON_INTERPRET=1` only takes effect if it is set before triton is imported, which this pytest
process may already have done; so the checks live in `tests/kernels_interpret.py` and run in a
fresh Python with the variable set (on a CUDA machine that file can also be run directly, against
the compiled kernels).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_under_interpreter():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "SAE_CORE_KERNELS"}
    env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", "tests/kernels_interpret.py", "-q", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed (rc={proc.returncode}):\n{out[-20000:]}"
    assert " passed" in out and "skipped" not in out.splitlines()[-1], out[-2000:]


def test_cpu_tensors_without_interpreter_are_refused():
    """Compiled (non-interpreted) kernels cannot take CPU tensors: a clear error, not a crash."""
    pytest.importorskip("triton")
    from sae_core import kernels

    if kernels.INTERPRET:
        pytest.skip("this process runs the interpreter")
    idx = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.triton_gather_sum(idx, torch.ones(2, 1), torch.randn(3, 4))
