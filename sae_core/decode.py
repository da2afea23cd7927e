"""Sparse decoding: `y[n] = sum_j acts[n, j] * W_dec[idx[n, j]]`, forward and backward sparse.

`grad W_dec` scatters `acts x grad_y` onto the active rows and `grad acts` is a gather-dot of
`W_dec[idx]` with `grad_y` (see `ops.py` for the primitives and their implementations).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices: Tensor, acts: Tensor, W_dec: Tensor) -> Tensor:
        ctx.save_for_backward(indices, acts, W_dec)
        return ops.gather_sum(indices, acts, W_dec)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        indices, acts, W_dec = ctx.saved_tensors
        grad_acts = ops.gather_dot(indices, W_dec, grad_y).to(acts.dtype) if ctx.needs_input_grad[1] else None
        grad_W = ops.scatter_rows(indices, acts.to(torch.promote_types(acts.dtype, torch.float32)), grad_y, W_dec.shape[0]).to(W_dec.dtype) if ctx.needs_input_grad[2] else None
        return None, grad_acts, grad_W


def decode(top_indices: Tensor, top_acts: Tensor, W_dec: Tensor) -> Tensor:
    """Decode `(..., k)` latents with a `(num_latents, d_in)` decoder into `(..., d_in)`."""
    lead = top_indices.shape[:-1]
    k = top_indices.shape[-1]
    idx = top_indices.reshape(-1, k)
    acts = top_acts.reshape(-1, k).to(W_dec.dtype)
    if torch.is_grad_enabled() and (acts.requires_grad or W_dec.requires_grad):
        y = _Decode.apply(idx, acts, W_dec)
    else:
        y = ops.gather_sum(idx, acts, W_dec)
    return y.reshape(*lead, W_dec.shape[-1])


def eager_decode(top_indices: Tensor, top_acts: Tensor, W_dec: Tensor) -> Tensor:
    """The same decode with the torch reference primitives, whatever the device."""
    lead = top_indices.shape[:-1]
    idx = top_indices.reshape(-1, top_indices.shape[-1])
    y = ops.torch_gather_sum(idx, top_acts.reshape(idx.shape), W_dec)
    return y.reshape(*lead, W_dec.shape[-1])
