"""Sparse decoding: `y[n] = sum_j acts[n, j] * W_dec[idx[n, j]]`.

Only the k active rows of the decoder are touched, forward and backward:
`grad W_dec` scatters `acts x grad_y` onto the active rows (a sparse product, no per-element
atomics), and `grad acts` is a gather-dot of `W_dec[idx]` with `grad_y`, in token blocks so
that no `(tokens, k, d_in)` tensor is formed. This is the torch reference; the Triton
kernels sit behind the same signature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Sparse products when k * SPARSE_RATIO <= num_latents; otherwise a dense scatter + matmul is
# faster (measured on CPU: sparse ~3x faster at k / num_latents = 1/144, dense wins at 1/16).
SPARSE_RATIO = 32
# Elements of the gathered (tokens, k, d_in) block formed at a time in the backward pass.
BLOCK_ELEMENTS = 1 << 22


def scatter_rows(indices: Tensor, weights: Tensor, rows: Tensor, num_latents: int) -> Tensor:
    """`out[l] = sum over (n, j) with indices[n, j] == l of weights[n, j] * rows[n]`, `(num_latents, d)`.

    The gradient of a sparse decode with respect to its weight matrix (and of a selected
    encode with respect to the encoder): a `(num_latents x tokens)` sparse matrix times `rows`.
    """
    num_tokens, k = indices.shape
    if k * SPARSE_RATIO <= num_latents:
        tokens = torch.arange(num_tokens, device=indices.device).repeat_interleave(k)
        with torch.sparse.check_sparse_tensor_invariants(False):
            G_t = torch.sparse_coo_tensor(
                torch.stack([indices.reshape(-1), tokens]), weights.reshape(-1), (num_latents, num_tokens)
            )
        return torch.sparse.mm(G_t, rows)
    G = torch.zeros(num_tokens, num_latents, dtype=weights.dtype, device=weights.device)
    return G.scatter_add_(1, indices, weights).T @ rows


def gather_dot(indices: Tensor, W: Tensor, rows: Tensor) -> Tensor:
    """`out[n, j] = W[indices[n, j]] . rows[n]`, `(tokens, k)`, in blocks of tokens."""
    num_tokens, k = indices.shape
    step = max(1, BLOCK_ELEMENTS // max(k * W.shape[1], 1))
    out = torch.empty(num_tokens, k, dtype=W.dtype, device=W.device)
    for s in range(0, num_tokens, step):
        out[s : s + step] = torch.bmm(W[indices[s : s + step]], rows[s : s + step, :, None]).squeeze(-1)
    return out


def _bag(indices: Tensor, acts: Tensor, W: Tensor) -> Tensor:
    return F.embedding_bag(indices, W, per_sample_weights=acts, mode="sum")


class _EagerDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices: Tensor, acts: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(indices, acts, W_dec)
        return _bag(indices, acts, W_dec)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        indices, acts, W_dec = ctx.saved_tensors
        grad_y = grad_y.to(W_dec.dtype)
        grad_acts = gather_dot(indices, W_dec, grad_y) if ctx.needs_input_grad[1] else None
        grad_W = scatter_rows(indices, acts, grad_y, W_dec.shape[0]) if ctx.needs_input_grad[2] else None
        return None, grad_acts, grad_W


def eager_decode(top_indices: Tensor, top_acts: Tensor, W_dec: Tensor) -> Tensor:
    """Decode `(..., k)` latents with a `(num_latents, d_in)` decoder into `(..., d_in)`."""
    lead = top_indices.shape[:-1]
    k = top_indices.shape[-1]
    idx = top_indices.reshape(-1, k)
    acts = top_acts.reshape(-1, k).to(W_dec.dtype)
    if torch.is_grad_enabled() and (acts.requires_grad or W_dec.requires_grad):
        y = _EagerDecode.apply(idx, acts, W_dec)
    else:
        y = _bag(idx, acts, W_dec)
    return y.reshape(*lead, W_dec.shape[-1])


def decode(top_indices: Tensor, top_acts: Tensor, W_dec: Tensor) -> Tensor:
    """Sparse decode with the best available implementation."""
    return eager_decode(top_indices, top_acts, W_dec)
