"""Encoder gradients restricted to the selected latents.

In a TopK SAE only the selected pre-activations reach the loss, so the encoder's backward
needs only them (Gao et al. 2024, appendix D): `grad W_enc` and `grad b_enc` are scatters
of the k selected entries per token, and `grad x` is a k-row gather-sum with `W_enc` (a
sparse decode). Neither the dense `(tokens, num_latents)` gradient nor a `(tokens, k, d_in)`
tensor is formed. The primitives and their torch/Triton implementations are in `ops.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops


class _SelectedEncode(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, indices: Tensor, values: Tensor, W_read: Tensor | None
    ) -> Tensor:
        ctx.save_for_backward(x, W_enc if W_read is None else W_read, indices, values)
        ctx.weight_dtype = W_enc.dtype
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, W_enc, indices, values = ctx.saved_tensors  # W_enc: the copy the gather reads, if one was given
        acc = torch.promote_types(ctx.weight_dtype, torch.float32)  # fp32 accumulation for bf16/fp16
        g = torch.where(values > 0, grad, 0).to(acc)  # ReLU
        num_latents = W_enc.shape[0]
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = ops.gather_sum(indices, g, W_enc).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_W = ops.scatter_rows(indices, g, x, num_latents).to(ctx.weight_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(num_latents, dtype=acc, device=g.device)
            grad_b = grad_b.index_add_(0, indices.reshape(-1), g.reshape(-1)).to(ctx.weight_dtype)
        return grad_x, grad_W, grad_b, None, None, None


def selected_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, indices: Tensor, values: Tensor, W_read: Tensor | None = None
) -> Tensor:
    """`relu(x @ W_enc[indices].T + b_enc[indices])`, given its forward `values`, with sparse gradients.

    `x` is `(tokens, d_in)` (already centred by `b_dec`), `indices` and `values` `(tokens, k)`:
    the selected latents and their activations, computed without autograd from the dense
    pre-activations. Gradients flow to `x`, `W_enc` and `b_enc` through the selected entries only;
    the gather for `x`'s gradient reads `W_read` (a lower-precision copy of `W_enc`) when given.
    """
    return _SelectedEncode.apply(x, W_enc, b_enc, indices, values, W_read)
