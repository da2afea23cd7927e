"""The three sparse primitives of a TopK SAE, and the choice between their implementations.

With `indices` `(tokens, k)` selecting rows of a `(num_latents, d)` matrix `W`:

- `gather_sum(indices, weights, W)`: `y[n] = sum_j weights[n, j] * W[indices[n, j]]`, `(tokens, d)`
  (decoder forward; encoder backward to its input),
- `gather_dot(indices, W, rows)`: `out[n, j] = W[indices[n, j]] . rows[n]`, `(tokens, k)`
  (decoder backward to the activations),
- `scatter_rows(indices, weights, rows, num_latents)`:
  `out[l] = sum over (n, j) with indices[n, j] == l of weights[n, j] * rows[n]`, `(num_latents, d)`
  (decoder and encoder backward to the weight matrices).

This module holds the torch reference of each (`torch_*`); `sae_core.kernels` holds Triton
kernels with the same signatures. `SAE_CORE_KERNELS=torch|triton` forces a choice; by default
Triton is used for CUDA tensors when it imports, torch otherwise.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

# Sparse products when k * SPARSE_RATIO <= num_latents; otherwise a dense scatter + matmul is
# faster (measured on CPU: sparse ~3x faster at k / num_latents = 1/144, dense wins at 1/16).
SPARSE_RATIO = 32


def torch_gather_sum(indices: Tensor, weights: Tensor, W: Tensor) -> Tensor:
    return F.embedding_bag(indices, W, per_sample_weights=weights.to(W.dtype), mode="sum")


def torch_gather_dot(indices: Tensor, W: Tensor, rows: Tensor) -> Tensor:
    # The gradient of embedding_bag with respect to its per-sample weights is exactly this
    # gather-dot, computed by torch's fused kernel without a (tokens, k, d) tensor (3x faster on
    # CPU than gathering blocks of W[indices] and multiplying). CUDA has no bf16 version of that
    # gradient (torch 2.11): there, blocks of tokens gather their rows and multiply.
    if W.is_cuda and W.dtype == torch.bfloat16:
        return _gather_dot_blocks(indices, W, rows)
    with torch.enable_grad():
        weights = torch.ones(indices.shape, dtype=W.dtype, device=W.device, requires_grad=True)
        y = F.embedding_bag(indices, W.detach(), per_sample_weights=weights, mode="sum")
        (grad,) = torch.autograd.grad(y, weights, grad_outputs=rows.to(W.dtype))
    return grad


def _gather_dot_blocks(indices: Tensor, W: Tensor, rows: Tensor, elements: int = 1 << 26) -> Tensor:
    """gather_dot over blocks of tokens whose gathered rows hold at most `elements` values."""
    num_tokens, k = indices.shape
    block = max(1, elements // max(k * W.shape[1], 1))
    out = torch.empty(indices.shape, dtype=W.dtype, device=W.device)
    for i in range(0, num_tokens, block):
        gathered = W[indices[i : i + block]]  # (block, k, d)
        out[i : i + block] = torch.bmm(gathered, rows[i : i + block].to(W.dtype).unsqueeze(2)).squeeze(2)
    return out


def torch_scatter_rows(indices: Tensor, weights: Tensor, rows: Tensor, num_latents: int) -> Tensor:
    num_tokens, k = indices.shape
    if k * SPARSE_RATIO <= num_latents:
        tokens = torch.arange(num_tokens, device=indices.device).repeat_interleave(k)
        with torch.sparse.check_sparse_tensor_invariants(False):
            G_t = torch.sparse_coo_tensor(
                torch.stack([indices.reshape(-1), tokens]), weights.reshape(-1), (num_latents, num_tokens)
            )
        return torch.sparse.mm(G_t, rows.to(weights.dtype))
    G = torch.zeros(num_tokens, num_latents, dtype=weights.dtype, device=weights.device)
    return G.scatter_add_(1, indices, weights).T @ rows.to(weights.dtype)


@functools.cache
def _triton_ops():
    try:
        from . import kernels
    except ImportError:
        return None
    return kernels


def forced_backend(device: torch.device | None = None) -> str | None:
    """The backend SAE_CORE_KERNELS forces ('torch', 'triton'), or None; a value that cannot work
    (unknown, or triton where it cannot run on `device`) is a one-line UserError."""
    from .errors import UserError

    forced = os.environ.get("SAE_CORE_KERNELS", "").strip().lower()
    if forced in ("", "auto"):
        return None
    if forced not in ("torch", "triton"):
        raise UserError(f"SAE_CORE_KERNELS={forced!r} is not a backend; set it to torch or triton, or unset it")
    if forced == "triton" and _triton_ops() is None:
        raise UserError("SAE_CORE_KERNELS=triton but triton does not import here; pip install triton, or unset it")
    if forced == "triton" and device is not None and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError(f"SAE_CORE_KERNELS=triton needs a CUDA device (this is {device.type}; TRITON_INTERPRET=1 runs "
                        "the kernels in Triton's interpreter); unset it or set it to torch")
    return forced


def backend(t: Tensor) -> str:
    """'triton' or 'torch' for tensors on t's device (see SAE_CORE_KERNELS)."""
    return forced_backend() or ("triton" if t.is_cuda and _triton_ops() is not None else "torch")


def gather_sum(indices: Tensor, weights: Tensor, W: Tensor) -> Tensor:
    if backend(W) == "triton":
        return _triton_ops().triton_gather_sum(indices, weights, W)
    return torch_gather_sum(indices, weights, W)


def gather_dot(indices: Tensor, W: Tensor, rows: Tensor) -> Tensor:
    if backend(W) == "triton":
        return _triton_ops().triton_gather_dot(indices, W, rows)
    return torch_gather_dot(indices, W, rows)


def scatter_rows(indices: Tensor, weights: Tensor, rows: Tensor, num_latents: int) -> Tensor:
    if backend(rows) == "triton":
        return _triton_ops().triton_scatter_rows(indices, weights, rows, num_latents)
    return torch_scatter_rows(indices, weights, rows, num_latents)
