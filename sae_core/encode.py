"""Encoder gradients restricted to the selected latents.

In a TopK SAE only the selected pre-activations reach the loss, so the encoder's backward
needs only them (Gao et al. 2024, appendix D): `grad W_enc` and `grad b_enc` are scatters
of the k selected entries per token, and `grad x` is a k-row gather-sum, i.e. a sparse
decode with `W_enc`. The dense `(tokens, num_latents)` gradient is never formed.
This is the torch reference; the Triton kernels sit behind the same signature.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .decode import _bag, scatter_rows


class _SelectedEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, indices: Tensor, values: Tensor) -> Tensor:
        ctx.save_for_backward(x, W_enc, indices, values)
        ctx.num_latents = W_enc.shape[0]
        return values

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, W_enc, indices, values = ctx.saved_tensors
        g = torch.where(values > 0, grad, 0).to(W_enc.dtype)  # ReLU
        flat_idx, flat_g = indices.reshape(-1), g.reshape(-1)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_b = torch.zeros(ctx.num_latents, dtype=W_enc.dtype, device=W_enc.device).index_add_(0, flat_idx, flat_g)
        if ctx.needs_input_grad[0]:
            grad_x = _bag(indices, g, W_enc).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_W = scatter_rows(indices, g, x.to(W_enc.dtype), ctx.num_latents)
        return grad_x, grad_W, grad_b, None, None


def eager_selected_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """`relu(x @ W_enc[indices].T + b_enc[indices])`, given its forward `values`, with sparse gradients.

    `x` is `(tokens, d_in)` (already centred by `b_dec`), `indices` and `values` `(tokens, k)`:
    the selected latents and their activations, computed without autograd from the dense
    pre-activations. Gradients flow to `x`, `W_enc` and `b_enc` through the selected entries only.
    """
    return _SelectedEncode.apply(x, W_enc, b_enc, indices, values)


def selected_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """Encode restricted to selected latents with the best available implementation."""
    return eager_selected_encode(x, W_enc, b_enc, indices, values)
