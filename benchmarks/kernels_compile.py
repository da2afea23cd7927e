"""What the Triton kernels of `sae_core.kernels` compile to for a GPU, on a machine without one.

Triton compiles ahead of time for any target (`triton.compile` with a `GPUTarget`; its wheel
ships `ptxas` and `cuobjdump`), so this checks, with no GPU and no CUDA driver, what the CPU
interpreter cannot: that each kernel compiles for the target (sm_90 = H100/H200 and sm_80 =
A100 by default), how many registers it takes, whether it spills to local memory, and how
wide its global loads are. Each kernel is compiled for the dtypes its callers pass
(`decode.py`, `encode.py`) at the tile sizes its wrapper picks for the Llama-3-8B shape
(d_in 4096, k 192), twice: specialised like a launch on aligned tensors (pointers and integer
arguments divisible by 16, as Triton's JIT specialises them for d_in 4096 or 576), where the
gathered rows must load 16 bytes per thread per instruction, and without that specialisation
(d_in 577, say), where they may not.

    python -m benchmarks.kernels_compile [--arch 90,80]

prints one line per compilation and exits non-zero if any fails, spills or (aligned) loads its
rows narrower than 16 bytes. `tests/test_kernels_compile.py` runs the same checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The Llama-3-8B shape of benchmarks/kernels.py; the wrappers' tile choice depends only on d and k.
D, K = 4096, 192
# Integer arguments of each kernel (i32 at a launch: all are below 2**31).
_INT = "i32"


@dataclasses.dataclass(frozen=True)
class Case:
    op: str  # gather_sum, gather_dot or scatter_rows (a key of sae_core.kernels.TILES)
    pointers: dict  # pointer argument -> Triton element type
    label: str  # the call site it stands for
    stage: str = ""  # a second kernel of the op ("fixup": scatter_rows' sum of a long segment's pieces)
    row_rank: int = 2  # the rank of the loads whose width counts (the rows; 1 where a program loads one row)

    @property
    def kernel(self) -> str:
        """The kernel's name in sae_core.kernels."""
        return f"_{self.op}{'_' + self.stage if self.stage else ''}_kernel"


def cases() -> list[Case]:
    """Each kernel with the pointer dtypes its callers pass (see decode.py and encode.py)."""
    out = []
    for dt in ("bf16", "fp16", "fp32", "fp64"):
        # decoder forward (acts in W_dec's dtype) and, without autocast, encoder backward to x.
        out.append(Case("gather_sum", dict(idx_ptr="i64", w_ptr=dt, W_ptr=dt, out_ptr=dt), f"W {dt}"))
        # decoder backward to the activations: grad_y has W_dec's dtype.
        out.append(Case("gather_dot", dict(idx_ptr="i64", W_ptr=dt, rows_ptr=dt, out_ptr=dt), f"W {dt}"))
        # decoder / encoder backward to the weights: fp32 weights (fp64 for fp64), rows in the SAE's dtype.
        acc = "fp64" if dt == "fp64" else "fp32"
        scatter = dict(seg_ptr="i64", tok_ptr="i64", w_ptr=acc, rows_ptr=dt, out_ptr=acc)
        out.append(Case("scatter_rows", scatter | dict(owner_ptr="i64", chunk_ptr="i64", partial_ptr=acc), f"rows {dt}"))
        if dt in ("fp32", "fp64"):  # the fix-up sees only the accumulation dtype
            fixup = dict(owner_ptr="i64", count_ptr="i64", partial_ptr=acc, out_ptr=acc)
            out.append(Case("scatter_rows", fixup, f"out {acc}", stage="fixup", row_rank=1))
    # Under autocast: fp32 weights (activations, encoder gradients) gathering bf16 copies of W.
    out.append(Case("gather_sum", dict(idx_ptr="i64", w_ptr="fp32", W_ptr="bf16", out_ptr="bf16"), "w fp32 W bf16"))
    return out


@dataclasses.dataclass
class Result:
    arch: int
    case: Case
    aligned: bool
    regs: int | None = None
    local_bytes: int | None = None  # spills and stack (per thread)
    shared_bytes: int | None = None  # static and dynamic, per program
    row_load: int | None = None  # bytes per thread per load instruction from the gathered rows
    seconds: float = 0.0
    error: str | None = None

    def problems(self) -> list[str]:
        if self.error:
            return [f"does not compile: {self.error}"]
        out = []
        if self.local_bytes:
            out.append(f"uses {self.local_bytes} bytes of local memory per thread (register spills)")
        if self.aligned and (self.row_load or 0) < 16:
            out.append(f"loads its rows {self.row_load} bytes per thread at a time although aligned (want 16)")
        return out


def _launch(kernels, case: Case, tiles: dict | None) -> tuple[dict, dict]:
    """(constexprs, compile options) the wrapper passes at the Llama-3 shape."""
    import triton.language as tl

    cfg = kernels.launch_config(case.op, D, K, tiles)
    options = {k: cfg.pop(k) for k in ("num_warps", "enable_fp_fusion")}
    if case.stage == "fixup":
        options["num_warps"] = kernels._fixup_warps(cfg["BLOCK_D"])
    cfg["ACC"] = tl.float64 if "fp64" in case.pointers.values() else tl.float32
    return {k: v for k, v in cfg.items() if k in getattr(kernels, case.kernel).arg_names}, options


def _tools_dir() -> Path:
    from triton.backends.nvidia import compiler

    return Path(compiler.__file__).parent / "bin"


def _resources(cubin: bytes) -> dict:
    """REG, LOCAL, STACK, SHARED of the one function in `cubin` (cuobjdump --dump-resource-usage)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(_tools_dir() / "cuobjdump"), "--dump-resource-usage", f.name],
            capture_output=True, text=True, check=True,
        ).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}


_ELEM_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "i32": 4, "i64": 8}


def row_load_bytes(ttgir: str, rank: int = 2) -> int | None:
    """Bytes each thread loads per instruction from the gathered rows: the narrowest load of `rank` dimensions.

    The gathered rows are the kernels' only 2-D loads (`tensor<BxDx!tt.ptr<T>, #layout>`), plain
    (`tt.load`) or, in a software-pipelined loop (STAGES > 1), asynchronous copies to shared
    memory; the layout's `sizePerThread` along the row is the vector width Triton's coalescing
    pass derived from what it could prove about alignment, and the PTX loads follow it.
    """
    layouts = {
        name: [int(v) for v in per_thread.split(",")]
        for name, per_thread in re.findall(r"^#(\w+) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\]", ttgir, re.M)
    }
    widths = [
        layouts[layout][-1] * _ELEM_BYTES[elem]
        for elem, layout in re.findall(
            r"= (?:tt\.load|ttg\.async_copy_global_to_local) .*: tensor<" + r"\d+x" * rank + r"!tt\.ptr<(\w+)>, #(\w+)>",
            ttgir,
        )
    ]
    return min(widths) if widths else None


def compile_case(case: Case, arch: int, aligned: bool, tiles: dict | None = None) -> Result:
    """Compile `case` for sm_`arch` with the tiles of `sae_core.kernels.TILES` (or `tiles`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sae_core import kernels

    res = Result(arch, case, aligned)
    fn = getattr(kernels, case.kernel)
    constexprs, options = _launch(kernels, case, tiles)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = "*" + case.pointers[name] if name.endswith("_ptr") else _INT
        # Triton's JIT marks a pointer divisible by 16 when its address is (torch's allocations are)
        # and an integer when its value is; unaligned rows (d_in 577) leave the integers unmarked.
        if name.endswith("_ptr") or aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        usage = _resources(compiled.asm["cubin"])
    except Exception as e:  # noqa: BLE001 - reported, the caller decides
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        return res
    finally:
        res.seconds = time.perf_counter() - t0
    res.regs = usage.get("REG")
    res.local_bytes = usage.get("LOCAL", 0) + usage.get("STACK", 0)
    res.shared_bytes = max(usage.get("SHARED", 0), getattr(compiled.metadata, "shared", 0) or 0)
    res.row_load = row_load_bytes(compiled.asm["ttgir"], case.row_rank)
    return res


def compile_all(arches=(90, 80)) -> list[Result]:
    return [compile_case(c, arch, aligned) for arch in arches for c in cases() for aligned in (True, False)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels_compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="90,80", help="comma-separated compute capabilities (90 = H100/H200)")
    args = p.parse_args(argv)
    import triton

    print(f"triton {triton.__version__}, ptxas from {_tools_dir()}")
    print(f"{'arch':>5} {'kernel':<22} {'dtypes':<14} {'aligned':<8} {'regs':>4} {'local':>5} {'smem':>6} {'row B':>6} {'s':>5}  problems")
    bad = 0
    for r in compile_all(tuple(int(a) for a in args.arch.split(","))):
        problems = r.problems()
        bad += bool(problems)
        print(f"sm_{r.arch:<3} {r.case.kernel.strip('_'):<22} {r.case.label:<14} {str(r.aligned):<8} "
              f"{r.regs if r.regs is not None else '-':>4} {r.local_bytes if r.local_bytes is not None else '-':>5} "
              f"{r.shared_bytes if r.shared_bytes is not None else '-':>6} "
              f"{r.row_load if r.row_load is not None else '-':>6} {r.seconds:5.1f}  {'; '.join(problems)}")
    print(f"{bad} problem(s)" if bad else "all compiled, no spills, 16-byte row loads where aligned")
    print("reproduce: python -m benchmarks.kernels_compile --arch " + args.arch)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
