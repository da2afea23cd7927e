"""The Triton kernels compile for real GPUs (sm_90, sm_80) without spills and with wide row loads.

The CPU interpreter (`tests/kernels_interpret.py`) checks what the kernels compute but not that
they compile: it runs their Python. Triton compiles ahead of time for any target without a GPU
(`benchmarks/kernels_compile.py`), so here every kernel is compiled for the dtypes its callers
pass, and its resource use is checked from the cubin and the layouts Triton chose.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

from benchmarks import kernels_compile  # noqa: E402


def _needs_compiled_kernels():
    from sae_core import kernels

    if kernels.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1: the kernels were built for the interpreter, not for compilation")


@pytest.mark.parametrize("arch", [90, 80])
def test_every_kernel_compiles_without_spills(arch):
    _needs_compiled_kernels()
    results = [kernels_compile.compile_case(c, arch, aligned) for c in kernels_compile.cases() for aligned in (True, False)]
    from sae_core import kernels

    assert {r.case.op for r in results} == set(kernels.TILES)  # every kernel is checked
    problems = [f"sm_{arch} {r.case.kernel} {r.case.label} aligned={r.aligned}: {p}" for r in results for p in r.problems()]
    assert not problems, "\n".join(problems)
    for r in results:
        assert r.regs is not None and 0 < r.regs <= 255, r
        # Unaligned rows (d_in 577) still load at least one element per instruction, never a byte at a time.
        assert r.row_load >= 2, r


def test_every_tiling_the_tuner_tries_compiles_without_spills():
    """benchmarks/kernels_tune.py's candidates, for the training (fp32) and bf16 paths on sm_90."""
    _needs_compiled_kernels()
    from benchmarks.kernels_tune import CANDIDATES

    problems = []
    for case in kernels_compile.cases():
        if not case.label.endswith(("fp32", "bf16")):
            continue
        for tiles in CANDIDATES[case.op]:
            r = kernels_compile.compile_case(case, 90, aligned=True, tiles=tiles)
            problems += [f"{case.kernel} {case.label} {tiles}: {p}" for p in r.problems()]
    assert not problems, "\n".join(problems)


def test_row_load_width_is_read_from_the_layout():
    """The parser finds the narrowest 2-D load; 1-D loads (indices, weights) do not count."""
    ttgir = """
#blocked = #ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [1, 32], warpsPerCTA = [4, 1], order = [1, 0]}>
#blocked1 = #ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [1, 32], warpsPerCTA = [1, 4], order = [1, 0]}>
#blocked2 = #ttg.blocked<{sizePerThread = [4], threadsPerWarp = [32], warpsPerCTA = [4], order = [0]}>
      %a = tt.load %p, %m, %c : tensor<16x256x!tt.ptr<bf16>, #blocked> loc(#loc1)
      %b = tt.load %q, %m, %c : tensor<16x!tt.ptr<i64>, #blocked2> loc(#loc2)
"""
    assert kernels_compile.row_load_bytes(ttgir) == 16
    assert kernels_compile.row_load_bytes(ttgir + "  %c = tt.load %r : tensor<32x128x!tt.ptr<f32>, #blocked1>\n") == 4
    pipelined = "  %d = ttg.async_copy_global_to_local %r, %s mask %m : tensor<16x256x!tt.ptr<f32>, #blocked1> -> <16x256xf32>\n"
    assert kernels_compile.row_load_bytes(ttgir + pipelined) == 4
    assert kernels_compile.row_load_bytes("") is None


def test_a_kernel_that_does_not_compile_is_reported(monkeypatch):
    """A compilation error becomes a reported problem, not a crash of the whole check."""
    _needs_compiled_kernels()
    case = kernels_compile.Case("gather_sum", dict(idx_ptr="i64", w_ptr="bf16", W_ptr="bf16", out_ptr="bf16"), "bad")
    from sae_core import kernels

    monkeypatch.setitem(kernels.TILES, "gather_sum", {**kernels.TILES["gather_sum"], "BLOCK_N": 3})  # not a power of 2
    r = kernels_compile.compile_case(case, 90, aligned=True)
    assert r.error and r.problems() == [f"does not compile: {r.error}"]
