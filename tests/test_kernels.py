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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_gather_dot_equals_the_fused_one(dtype):
    """CUDA has no bf16 embedding_bag weight gradient, so there torch's gather_dot multiplies blocks of
    gathered rows (sae_core.ops._gather_dot_blocks): the same values as the fused path, whatever the
    block (here 1, 2 and 3 tokens of 10, and the whole), repeated indices included."""
    from sae_core.ops import _gather_dot_blocks, torch_gather_dot

    torch.manual_seed(0)
    W, rows = torch.randn(40, 24, dtype=dtype), torch.randn(10, 24)
    idx = torch.randint(0, 40, (10, 5))
    idx[3] = idx[4] = 7
    fused = torch_gather_dot(idx, W, rows)
    exact = (W.double()[idx] * rows.to(dtype).double()[:, None]).sum(-1)
    for elements in (1, 240, 720, 1 << 26):
        blocked = _gather_dot_blocks(idx, W, rows, elements=elements)
        assert blocked.dtype == fused.dtype == dtype and blocked.shape == idx.shape
        torch.testing.assert_close(blocked, fused, rtol=0, atol=1e-5 if dtype == torch.float32 else 0.05)
        torch.testing.assert_close(blocked.double(), exact, rtol=1e-2, atol=1e-5 if dtype == torch.float32 else 0.1)
