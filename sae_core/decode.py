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
    def forward(ctx, indices: Tensor, acts: Tensor, W_dec: Tensor, W_read: Tensor | None) -> Tensor:
        W = W_dec if W_read is None else W_read  # the rows are read from W_read when given
        ctx.save_for_backward(indices, acts, W)
        ctx.grad_dtype = W_dec.dtype
        return ops.gather_sum(indices, acts, W)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        indices, acts, W = ctx.saved_tensors
        grad_acts = ops.gather_dot(indices, W, grad_y).to(acts.dtype) if ctx.needs_input_grad[1] else None
        grad_W = None
        if ctx.needs_input_grad[2]:
            weights = acts.to(torch.promote_types(acts.dtype, torch.float32))
            grad_W = ops.scatter_rows(indices, weights, grad_y, W.shape[0]).to(ctx.grad_dtype)
        return None, grad_acts, grad_W, None


def decode(top_indices: Tensor, top_acts: Tensor, W_dec: Tensor, W_read: Tensor | None = None) -> Tensor:
    """Decode `(..., k)` latents with a `(num_latents, d_in)` decoder into `(..., d_in)`.

    `W_read`, a copy of `W_dec` in another dtype (under autocast: bf16 of fp32 weights), is what
    the gathers read, forward and backward, halving their traffic; the result has its dtype, and
    the gradient still goes to `W_dec`, computed in fp32.
    """
    lead = top_indices.shape[:-1]
    k = top_indices.shape[-1]
    idx = top_indices.reshape(-1, k)
    acts = top_acts.reshape(-1, k).to(W_dec.dtype)
    if torch.is_grad_enabled() and (acts.requires_grad or W_dec.requires_grad):
        y = _Decode.apply(idx, acts, W_dec, W_read)
    else:
        y = ops.gather_sum(idx, acts, W_dec if W_read is None else W_read)
    return y.reshape(*lead, W_dec.shape[-1])


def eager_decode(top_indices: Tensor, top_acts: Tensor, W_dec: Tensor) -> Tensor:
    """The same decode with the torch reference primitives, whatever the device."""
    lead = top_indices.shape[:-1]
    idx = top_indices.reshape(-1, top_indices.shape[-1])
    y = ops.torch_gather_sum(idx, top_acts.reshape(idx.shape), W_dec)
    return y.reshape(*lead, W_dec.shape[-1])
