"""Triton kernels for the three sparse primitives of `sae_core.ops`, same signatures and semantics.

With `indices` `(N, k)` selecting rows of a `(L, d)` matrix `W`:

- `triton_gather_sum(indices, weights, W) -> (N, d)` in `W.dtype`:
  `y[n] = sum_j weights[n, j] * W[indices[n, j]]`. One program per (block of tokens, block of
  `d`); it loops over the k selections, loading one `(tokens, d)` tile of gathered rows each.
- `triton_gather_dot(indices, W, rows) -> (N, k)` in `W.dtype`:
  `out[n, j] = W[indices[n, j]] . rows[n]`. One program per (token, block of k); it loops over
  `d` in blocks. No `(N, k, d)` tensor is formed.
- `triton_scatter_rows(indices, weights, rows, num_latents) -> (num_latents, d)` in `weights.dtype`:
  `out[l] = sum over (n, j) with indices[n, j] == l of weights[n, j] * rows[n]`. No atomics: the
  flattened indices are sorted on the device (stable sort, so the result is deterministic), the
  segment of each latent in that order is found with `searchsorted` (CSR offsets, the same as
  `cumsum(bincount)` but without the host sync CUDA's `bincount` makes), and one program per
  (latent, block of `d`) sums its segment and writes its output row once; latents no token
  selected get zeros. A segment longer than `SEGMENT_CHUNK` entries (a latent many tokens
  select) is summed in pieces: its first by the latent's program, the others by extra programs
  into an fp32 buffer (at most `PARTIAL_ELEMENTS`: pieces grow with very large batches), which
  a second kernel adds to the row in order; so one popular latent no longer sets the kernel's
  pace, and the sum is still deterministic.

All kernels accumulate in fp32 (fp64 when the output dtype is fp64, so `gradcheck` can run);
inputs may be fp16, bf16, fp32 or fp64 and need not share a dtype (each is cast on load). Other
dtypes fall back to the torch reference. They use only plain loads/stores, `tl.arange`,
`tl.zeros`, `tl.sum` and `tl.range` loops (no `tl.dot`, no autotuning), so they run unchanged
under the CPU interpreter (`TRITON_INTERPRET=1`, set before triton is imported) and on any CUDA
GPU Triton supports; tile sizes are fixed (`TILES`), which tests may patch to force several blocks.

Limits: indices are not range-checked (the torch reference raises on an out-of-range index;
here an index outside `[0, L)` reads out of bounds in the gathers and is ignored by
`triton_scatter_rows`), and the outputs carry no autograd graph (the callers in `decode.py` and
`encode.py` are `autograd.Function`s).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import ops

# Whether the kernels below were built for the CPU interpreter (triton reads the variable when
# `triton.jit` decorates them, i.e. when this module is imported).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Fixed tile sizes of each kernel (no autotuning: it cannot run in the interpreter, and a first
# training step that tunes is slow), read at call time (tests and benchmarks/kernels_tune.py
# replace entries); powers of two. BLOCK_D and BLOCK_K are caps: a launch uses the smallest power
# of two >= d (or k), at least 16, up to the cap. STAGES > 1 software-pipelines the kernel's loop
# (the next iterations' gathers in flight through shared memory while one is summed); 1 leaves it
# to plain vectorised loads. The values are the best of benchmarks/kernels_tune.py on an H200 at
# the Llama-3-8B shape, bf16 and fp32 (docs/benchmarks.md): pipelining did not pay there.
TILES = {
    # BLOCK_N tokens x BLOCK_D of d per program, looping over the k selections
    "gather_sum": dict(BLOCK_N=16, BLOCK_D=256, STAGES=1, num_warps=8),
    # one token x BLOCK_K selections per program, looping over d in steps of BLOCK_D
    "gather_dot": dict(BLOCK_K=32, BLOCK_D=64, STAGES=1, num_warps=4),
    # one latent x BLOCK_D of d per program, summing its segment BLOCK_S entries at a time
    "scatter_rows": dict(BLOCK_S=4, BLOCK_D=512, STAGES=1, num_warps=4),
}

# Entries of a latent's segment one scatter_rows program sums at most: a latent selected by many
# tokens is split into pieces summed in parallel, then added in order (deterministic), so a few
# popular latents do not leave one program running long after the others. The pieces' partial
# sums go to a buffer sized for the worst case (tokens x k / chunk rows of d): pieces grow past
# SEGMENT_CHUNK where that buffer would exceed PARTIAL_ELEMENTS (64 MB of fp32).
SEGMENT_CHUNK = 512
PARTIAL_ELEMENTS = 2**24


def launch_config(op: str, d: int, k: int, tiles: dict | None = None) -> dict:
    """The tile constexprs and launch options of `op`'s kernel for rows of width `d` and `k` selections
    (with `tiles` in place of `TILES[op]` if given)."""
    cfg = dict(TILES[op] if tiles is None else tiles)
    cfg["BLOCK_D"] = _block(d, cfg["BLOCK_D"])
    if "BLOCK_K" in cfg:
        cfg["BLOCK_K"] = _block(k, cfg["BLOCK_K"])
    # FMA contraction on explicitly: triton 3.6 defaults to it, later releases warn and will not.
    cfg["enable_fp_fusion"] = True
    return cfg


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _gather_sum_kernel(
    idx_ptr, w_ptr, W_ptr, out_ptr, N, K, D, stride_W, stride_out,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_d < D)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    for j in tl.range(0, K, num_stages=STAGES):
        idx = tl.load(idx_ptr + offs_n * K + j, mask=mask_n, other=0).to(tl.int64)
        w = tl.load(w_ptr + offs_n * K + j, mask=mask_n, other=0).to(ACC)
        rows = tl.load(W_ptr + idx[:, None] * stride_W + offs_d[None, :], mask=mask, other=0)
        acc += w[:, None] * rows.to(ACC)
    out = out_ptr + offs_n[:, None] * stride_out + offs_d[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gather_dot_kernel(
    idx_ptr, W_ptr, rows_ptr, out_ptr, K, D, stride_W, stride_rows,
    ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    idx = tl.load(idx_ptr + n * K + offs_k, mask=mask_k, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=ACC)
    for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        r = tl.load(rows_ptr + n * stride_rows + offs_d, mask=mask_d, other=0).to(ACC)
        Wt = tl.load(
            W_ptr + idx[:, None] * stride_W + offs_d[None, :],
            mask=mask_k[:, None] & mask_d[None, :],
            other=0,
        ).to(ACC)
        acc += Wt * r[None, :]
    tl.store(out_ptr + n * K + offs_k, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=mask_k)


@triton.jit
def _scatter_rows_kernel(
    seg_ptr, tok_ptr, w_ptr, rows_ptr, out_ptr, owner_ptr, chunk_ptr, partial_ptr,
    L, D, CHUNK, stride_rows, stride_out, stride_partial,
    ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
):
    # Programs 0..L-1 sum the first CHUNK entries of latent `pid`'s segment into out[pid]; program
    # L + e sums chunk chunk[e] (>= 1) of latent owner[e] into partial[e] (owner[e] == L: no work).
    pid = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    extra = pid >= L
    e = tl.where(extra, pid - L, 0)
    latent = tl.where(extra, tl.load(owner_ptr + e, mask=extra, other=0), pid)
    chunk = tl.where(extra, tl.load(chunk_ptr + e, mask=extra, other=0), 0)
    valid = latent < L
    latent = tl.where(valid, latent, 0)
    start = tl.load(seg_ptr + latent) + chunk * CHUNK
    end = tl.where(valid, tl.minimum(tl.load(seg_ptr + latent + 1), start + CHUNK), start)
    acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=ACC)
    for s0 in tl.range(start, end, BLOCK_S, num_stages=STAGES):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask_s = offs_s < end
        tok = tl.load(tok_ptr + offs_s, mask=mask_s, other=0).to(tl.int64)
        w = tl.load(w_ptr + offs_s, mask=mask_s, other=0).to(ACC)
        r = tl.load(
            rows_ptr + tok[:, None] * stride_rows + offs_d[None, :],
            mask=mask_s[:, None] & mask_d[None, :],
            other=0,
        ).to(ACC)
        acc += w[:, None] * r
    total = tl.sum(acc, axis=0)
    # (scalar conditions enter the masks through the bound on d: the interpreter cannot AND a
    # scalar bool with a vector)
    out_d = tl.where(extra, 0, D)
    partial_d = tl.where(extra & valid, D, 0)
    tl.store(out_ptr + latent * stride_out + offs_d, total.to(out_ptr.dtype.element_ty), mask=offs_d < out_d)
    tl.store(partial_ptr + e * stride_partial + offs_d, total, mask=offs_d < partial_d)


@triton.jit
def _scatter_rows_fixup_kernel(
    owner_ptr, count_ptr, partial_ptr, out_ptr, D, stride_partial, stride_out,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program e adds partial[e], ..., partial[e + count[e] - 1] (the later chunks of latent
    # owner[e], in order) to out[owner[e]]; count[e] is 0 but at a latent's first extra chunk.
    e = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    count = tl.load(count_ptr + e)
    mask = offs_d < tl.where(count > 0, D, 0)
    out = out_ptr + tl.where(count > 0, tl.load(owner_ptr + e), 0) * stride_out + offs_d
    acc = tl.load(out, mask=mask, other=0).to(ACC)
    for c in tl.range(0, count):
        acc += tl.load(partial_ptr + (e + c) * stride_partial + offs_d, mask=mask, other=0)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------- wrappers
def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def _rowmajor(t: Tensor) -> Tensor:
    """`t` with unit stride along its last dimension (a view when it already has one)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _supported(*tensors: Tensor) -> bool:
    """Whether the kernels can run on these tensors (else the wrappers use the torch reference)."""
    return all(t.dtype in _FLOAT_DTYPES for t in tensors)


def _check_device(*tensors: Tensor) -> None:
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise ValueError(f"all tensors must be on one device, got {[str(t.device) for t in tensors]}")
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors (got {device.type}); on CPU set TRITON_INTERPRET=1 "
            "before importing triton to run them in the interpreter, or use SAE_CORE_KERNELS=torch"
        )


def _on(device: torch.device):
    """Launch on `device` (triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_indices(indices: Tensor, weights: Tensor | None = None) -> None:
    if indices.dim() != 2:
        raise ValueError(f"indices must be (tokens, k), got shape {tuple(indices.shape)}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
    if weights is not None and weights.shape != indices.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must have the shape of indices {tuple(indices.shape)}")


def triton_gather_sum(indices: Tensor, weights: Tensor, W: Tensor) -> Tensor:
    """`y[n] = sum_j weights[n, j] * W[indices[n, j]]`, `(N, d)` in `W.dtype`."""
    _check_indices(indices, weights)
    if W.dim() != 2:
        raise ValueError(f"W must be (num_latents, d), got shape {tuple(W.shape)}")
    if not _supported(weights, W):  # e.g. fp8 or integer W: not worth a kernel
        return ops.torch_gather_sum(indices, weights, W)
    _check_device(indices, weights, W)
    N, K = indices.shape
    D = W.shape[1]
    if N == 0 or D == 0 or K == 0:
        return torch.zeros(N, D, dtype=W.dtype, device=W.device)
    indices, weights, W = indices.contiguous(), weights.contiguous(), _rowmajor(W)
    out = torch.empty(N, D, dtype=W.dtype, device=W.device)
    cfg = launch_config("gather_sum", D, K)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(D, cfg["BLOCK_D"]))
    with _on(W.device):
        _gather_sum_kernel[grid](indices, weights, W, out, N, K, D, W.stride(0), out.stride(0), ACC=_acc(W.dtype), **cfg)
    return out


def triton_gather_dot(indices: Tensor, W: Tensor, rows: Tensor) -> Tensor:
    """`out[n, j] = W[indices[n, j]] . rows[n]`, `(N, k)` in `W.dtype`."""
    _check_indices(indices)
    N, K = indices.shape
    if W.dim() != 2 or rows.dim() != 2 or rows.shape != (N, W.shape[1]):
        raise ValueError(f"W {tuple(W.shape)} and rows {tuple(rows.shape)} must be (L, d) and (tokens={N}, d)")
    if not _supported(W, rows):
        return ops.torch_gather_dot(indices, W, rows)
    _check_device(indices, W, rows)
    D = W.shape[1]
    if N == 0 or K == 0 or D == 0:
        return torch.zeros(N, K, dtype=W.dtype, device=W.device)
    indices, W, rows = indices.contiguous(), _rowmajor(W), _rowmajor(rows)
    out = torch.empty(N, K, dtype=W.dtype, device=W.device)
    cfg = launch_config("gather_dot", D, K)
    grid = (N, triton.cdiv(K, cfg["BLOCK_K"]))
    with _on(W.device):
        _gather_dot_kernel[grid](indices, W, rows, out, K, D, W.stride(0), rows.stride(0), ACC=_acc(W.dtype), **cfg)
    return out


def triton_scatter_rows(indices: Tensor, weights: Tensor, rows: Tensor, num_latents: int) -> Tensor:
    """`out[l] = sum over (n, j) with indices[n, j] == l of weights[n, j] * rows[n]`, in `weights.dtype`."""
    _check_indices(indices, weights)
    N, K = indices.shape
    if rows.dim() != 2 or rows.shape[0] != N:
        raise ValueError(f"rows must be (tokens={N}, d), got shape {tuple(rows.shape)}")
    if not _supported(weights, rows):
        return ops.torch_scatter_rows(indices, weights, rows, num_latents)
    _check_device(indices, weights, rows)
    D = rows.shape[1]
    out = torch.empty(num_latents, D, dtype=weights.dtype, device=rows.device)
    if N == 0 or K == 0 or D == 0 or num_latents == 0:
        return out.zero_()
    rows = _rowmajor(rows)
    # CSR by latent: entry s of the sorted order is (latent sorted_idx[s], token tokens[s]).
    sorted_idx, order = torch.sort(indices.reshape(-1), stable=True)
    tokens = torch.div(order, K, rounding_mode="floor")
    w_sorted = weights.reshape(-1)[order]
    bounds = torch.arange(num_latents + 1, device=indices.device, dtype=sorted_idx.dtype)
    segments = torch.searchsorted(sorted_idx, bounds)  # latent l owns [segments[l], segments[l + 1])
    piece = max(SEGMENT_CHUNK, triton.cdiv(N * K, max(1, PARTIAL_ELEMENTS // D)))
    owner, chunk, count = _extra_chunks(segments, N * K, piece)
    acc = torch.float64 if weights.dtype == torch.float64 else torch.float32
    partial = torch.empty(owner.numel(), D, dtype=acc, device=rows.device)
    cfg = launch_config("scatter_rows", D, K)
    grid = (num_latents + owner.numel(), triton.cdiv(D, cfg["BLOCK_D"]))
    with _on(rows.device):
        _scatter_rows_kernel[grid](
            segments, tokens, w_sorted, rows, out, owner, chunk, partial, num_latents, D, piece,
            rows.stride(0), out.stride(0), partial.stride(0), ACC=_acc(acc), **cfg,
        )
        if owner.numel():
            _scatter_rows_fixup_kernel[(owner.numel(), grid[1])](
                owner, count, partial, out, D, partial.stride(0), out.stride(0), ACC=_acc(acc),
                BLOCK_D=cfg["BLOCK_D"], num_warps=_fixup_warps(cfg["BLOCK_D"]), enable_fp_fusion=True,
            )
    return out


def _fixup_warps(block_d: int) -> int:
    """Warps of the fix-up kernel: 4 fp32 of a row per thread (16-byte loads)."""
    return max(1, min(8, block_d // 128))


def _extra_chunks(segments: Tensor, entries: int, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """The pieces after the first of each latent's segment, as three int64 vectors of one length E.

    Latent l's segment of `n` entries is summed in cdiv(n, chunk) pieces: the first by program l,
    each other by an "extra" program. Extra e sums piece chunk[e] (>= 1) of latent owner[e]; a
    latent's extras are consecutive, and count[e] is their number at the first of them (0
    elsewhere). E = entries // chunk bounds the number of extras (the sum over latents of
    (n - 1) // chunk is at most entries // chunk) without reading the segments back to the host;
    unused extras have owner L and count 0.
    """
    e = torch.arange(entries // chunk, device=segments.device)
    if not e.numel():  # no segment can be longer than one piece
        return e, e, e
    L = segments.numel() - 1
    extras = ((segments[1:] - segments[:-1]) - 1).clamp(min=0) // chunk
    ends = torch.cumsum(extras, 0)  # latent l's extras are [ends[l] - extras[l], ends[l])
    owner = torch.searchsorted(ends, e, right=True)
    used, latent = owner < L, owner.clamp(max=L - 1)
    chunk_no = torch.where(used, e - (ends - extras)[latent] + 1, 0)
    count = torch.where(used & (chunk_no == 1), extras[latent], 0)
    return owner, chunk_no, count
