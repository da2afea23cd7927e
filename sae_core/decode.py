"""Sparse decoding: `y[n] = sum_j acts[n, j] * W_dec[idx[n, j]]`.

Only the k active rows of the decoder are touched. This is the torch reference; the Triton
kernels sit behind the same signature.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def eager_decode(top_indices: Tensor, top_acts: Tensor, W_dec: Tensor) -> Tensor:
    """Decode `(..., k)` latents with a `(num_latents, d_in)` decoder into `(..., d_in)`.

    `embedding_bag` gathers and sums the k rows without a `(tokens, k, d_in)` intermediate;
    its backward gives the gradient of `W_dec` (a scatter onto the active rows) and of
    `top_acts` (a gather-dot with the output gradient).
    """
    lead = top_indices.shape[:-1]
    k = top_indices.shape[-1]
    idx = top_indices.reshape(-1, k)
    acts = top_acts.reshape(-1, k).to(W_dec.dtype)
    y = F.embedding_bag(idx, W_dec, per_sample_weights=acts, mode="sum")
    return y.reshape(*lead, W_dec.shape[-1])


def decode(top_indices: Tensor, top_acts: Tensor, W_dec: Tensor) -> Tensor:
    """Sparse decode with the best available implementation."""
    return eager_decode(top_indices, top_acts, W_dec)


__all__ = ["decode", "eager_decode"]

