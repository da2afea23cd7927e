"""The TopK sparse autoencoder of Gao et al. (2024), in EleutherAI's checkpoint layout.

    pre_acts = relu(W_enc (x - b_dec) + b_enc)         # (..., num_latents)
    top_acts, top_indices = topk(pre_acts, k)           # (..., k)
    x_hat = sum_j top_acts[j] * W_dec[top_indices[j]] + b_dec

Parameter names match EleutherAI's `sae.safetensors`: `encoder.weight (num_latents, d_in)`,
`encoder.bias`, `W_dec (num_latents, d_in)`, `b_dec (d_in)`.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .config import SaeConfig
from .decode import decode
from .encode import selected_encode
from .errors import UserError

# AuxK runs dense over the dead latents while there are at most this many per selected one
# (see Sae._auxk_decode). CPU, measured by benchmarks/auxk.py (SmolLM2 shape, 2 cores): dense
# is 1.5-2x faster up to 4.8, even at 9.6, slower at 16. CUDA, H200 at the Llama-3-8B shape
# (k_aux 2048, 131072 latents): dense 1.5-2.2x faster from 1 to 64 per selected one (every latent
# dead), so 64 picks dense wherever that shape can go; the crossover lies beyond (estimated ~150).
AUXK_DENSE_RATIO = {"cpu": 8, "cuda": 64}

# Under autocast, the sparse products of `Sae.forward` gather rows from copies of W_enc and W_dec
# in the autocast dtype (as autocast's matmuls read their weights), halving the bytes the
# gathers move; gradients still reach the fp32 weights in fp32. False: gather the fp32 weights.
AUTOCAST_GATHERS = True


class _Reads(NamedTuple):
    """The copies of the weights the sparse gathers read (None: the weights themselves)."""

    W_enc: Tensor | None = None
    W_dec: Tensor | None = None


class EncoderOutput(NamedTuple):
    top_acts: Tensor
    """Activations of the top-k latents, `(..., k)`."""
    top_indices: Tensor
    """Indices of the top-k latents, `(..., k)`."""


class ForwardOutput(NamedTuple):
    sae_out: Tensor
    """Reconstruction, same shape as the input."""
    latent_acts: Tensor
    """Activations of the top-k latents."""
    latent_indices: Tensor
    """Indices of the top-k latents."""
    fvu: Tensor
    """Fraction of variance unexplained: sum of squared errors over the total variance."""
    auxk_loss: Tensor
    """AuxK loss: how well the top dead latents predict the residual (0 without dead latents)."""
    multi_topk_fvu: Tensor
    """FVU when decoding the top 4k latents (0 unless `cfg.multi_topk`)."""


def _sum_squares(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype).pow(2).sum()


class Sae(nn.Module):
    def __init__(
        self,
        d_in: int,
        cfg: SaeConfig,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        *,
        decoder: bool = True,
    ):
        super().__init__()
        if isinstance(d_in, bool) or not isinstance(d_in, numbers.Integral) or d_in < 1:
            raise UserError(f"d_in must be a positive whole number, got {d_in!r}")
        d_in = int(d_in)
        self.cfg = cfg
        self.d_in = d_in
        self.num_latents = cfg.resolve_num_latents(d_in)
        if cfg.k > self.num_latents:
            raise UserError(
                f"k={cfg.k} is larger than the number of latents ({self.num_latents}); "
                "lower k or raise expansion_factor/num_latents"
            )

        self.encoder = nn.Linear(d_in, self.num_latents, device=device, dtype=dtype)
        self.W_dec = nn.Parameter(self.encoder.weight.data.clone()) if decoder else None
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))
        with torch.no_grad():
            self.encoder.bias.zero_()
            if self.W_dec is not None and cfg.normalize_decoder:
                # Gao et al.: the encoder starts as the transpose of the unit-norm decoder.
                self.set_decoder_norm_to_unit_norm()
                self.encoder.weight.copy_(self.W_dec)

    @property
    def device(self) -> torch.device:
        return self.encoder.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.weight.dtype

    # ----------------------------------------------------------------------------------- math
    def pre_acts(self, x: Tensor) -> Tensor:
        """ReLU of the encoder applied to `x - b_dec`, `(..., num_latents)`."""
        self._check_input(x)
        return self._pre_acts(x, _Reads())

    def _pre_acts(self, x: Tensor, reads: _Reads) -> Tensor:
        W = self.encoder.weight if reads.W_enc is None else reads.W_enc
        # Centred in the wider of the two dtypes, then cast: an fp32 input to a bf16 SAE loses no more
        # than the cast of the difference (not of x and b_dec, then their difference).
        return nn.functional.relu(nn.functional.linear((x - self.b_dec).to(self.dtype), W, self.encoder.bias))

    def _reads(self) -> _Reads:
        """Autocast-dtype copies of the weights for this forward's gathers (see AUTOCAST_GATHERS)."""
        device = self.encoder.weight.device.type
        if not (AUTOCAST_GATHERS and torch.is_autocast_enabled(device)):
            return _Reads()
        lowp = torch.get_autocast_dtype(device)
        if lowp.itemsize >= self.dtype.itemsize:
            return _Reads()
        with torch.no_grad():
            return _Reads(self.encoder.weight.to(lowp), None if self.W_dec is None else self.W_dec.to(lowp))

    def select_topk(self, pre_acts: Tensor, k: int | None = None) -> EncoderOutput:
        return EncoderOutput(*pre_acts.topk(self.cfg.k if k is None else k, dim=-1, sorted=False))

    def encode(self, x: Tensor) -> EncoderOutput:
        """Top-k latents of `x`, any leading shape `(..., d_in)`."""
        return self.select_topk(self.pre_acts(x))

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """Reconstruction `(..., d_in)` from `(..., k)` latents."""
        if top_acts.shape != top_indices.shape:
            raise ValueError(
                f"top_acts {tuple(top_acts.shape)} and top_indices {tuple(top_indices.shape)} must have one shape "
                "(..., k): pass both outputs of encode"
            )
        return self._decode_sparse(top_acts, top_indices) + self.b_dec

    def _decoder(self) -> Tensor:
        if self.W_dec is None:
            raise RuntimeError("this SAE was loaded with decoder=False; reload it with decoder=True to decode")
        return self.W_dec

    def _decode_sparse(self, top_acts: Tensor, top_indices: Tensor, reads: _Reads = _Reads()) -> Tensor:
        return decode(top_indices, top_acts.to(self.dtype), self._decoder(), reads.W_dec)

    def forward(
        self, x: Tensor, dead_mask: Tensor | None = None, *, total_variance: Tensor | None = None
    ) -> ForwardOutput:
        """Reconstruct `x` and compute the training losses.

        `dead_mask` is a `(num_latents,)` bool tensor of latents that have not fired for a
        while; the AuxK loss (Gao et al., appendix B.1) makes the top `d_in // 2` of them
        predict the residual `x - x_hat`, scaled down when fewer latents are dead.

        The losses are sums of squared errors over `total_variance`, by default `x`'s summed
        squared deviation from its mean over all tokens (every leading dimension). A caller splitting
        a batch into micro-batches passes the whole batch's, so that the micro-batches' losses add up
        to the batch's (and a micro-batch of one token, which has no variance of its own, is no
        special case). The losses are summed in fp32 at least (an fp16 sum of squares overflows).
        """
        self._check_input(x)
        self._check_dead_mask(dead_mask, x)
        lead = x.shape[:-1]
        given = x.reshape(-1, self.d_in)
        x = given.to(self.dtype)
        sae_in = x - self.b_dec
        reads = self._reads()
        # Dense pre-activations without autograd: only the selected entries get gradients. From the input
        # as given, so that the latents are those `encode` picks (centred before a cast to a narrower dtype).
        with torch.no_grad():
            pre_acts = self._pre_acts(given, reads)
        top_acts, top_indices = self._selected(sae_in, pre_acts, self.cfg.k, reads)
        sae_out = self._decode_sparse(top_acts, top_indices, reads) + self.b_dec
        residual = x - sae_out

        # Denominator that puts every loss on the scale of the data's variance.
        acc = torch.promote_types(x.dtype, torch.float32)
        if total_variance is None:
            total_variance = (x.to(acc) - x.to(acc).mean(0)).pow(2).sum()
        total_variance = torch.as_tensor(total_variance, dtype=acc, device=x.device).clamp_min(torch.finfo(acc).tiny)
        fvu = _sum_squares(residual, acc) / total_variance

        num_dead = int(dead_mask.sum()) if dead_mask is not None else 0
        if num_dead > 0:
            k_aux = max(self.d_in // 2, 1)
            scale = min(num_dead / k_aux, 1.0)
            residual_hat = self._auxk_decode(sae_in, pre_acts, dead_mask, num_dead, min(k_aux, num_dead), reads)
            auxk_loss = scale * _sum_squares(residual_hat - residual.detach(), acc) / total_variance
        else:
            auxk_loss = fvu.new_tensor(0.0)

        if self.cfg.multi_topk:
            multi_k = min(4 * self.cfg.k, self.num_latents)
            multi_out = self._decode_sparse(*self._selected(sae_in, pre_acts, multi_k, reads), reads) + self.b_dec
            multi_topk_fvu = _sum_squares(multi_out - x, acc) / total_variance
        else:
            multi_topk_fvu = fvu.new_tensor(0.0)

        return ForwardOutput(
            sae_out.reshape(*lead, self.d_in),
            top_acts.reshape(*lead, top_acts.shape[-1]),
            top_indices.reshape(*lead, top_indices.shape[-1]),
            fvu,
            auxk_loss,
            multi_topk_fvu,
        )

    def _auxk_decode(
        self, sae_in: Tensor, pre_acts: Tensor, dead_mask: Tensor, num_dead: int, k: int, reads: _Reads
    ) -> Tensor:
        """Decode (without `b_dec`) the top `k` dead latents of each token, with gradients.

        With few dead latents per selected one (the usual case: k = d_in / 2 is large) this runs
        dense over the dead part of the dictionary: the codes fill a large fraction of each
        (tokens, dead) row, and three matmuls over `num_dead` latents cost far less than sparse
        products gathering `k` rows per token. Else, sparse products as for the main top-k.
        """
        if num_dead > AUXK_DENSE_RATIO.get(sae_in.device.type, 8) * k:
            # k <= num_dead, so no -inf is selected: the values are the dead latents' pre-activations.
            auxk_pre = torch.where(dead_mask[None], pre_acts, -torch.inf)
            return self._decode_sparse(*self._selected(sae_in, auxk_pre, k, reads), reads)
        dead = dead_mask.nonzero().squeeze(1)
        pre = nn.functional.relu(nn.functional.linear(sae_in, self.encoder.weight[dead], self.encoder.bias[dead]))
        values, indices = pre.topk(k, dim=-1, sorted=False)
        codes = torch.zeros_like(pre).scatter(-1, indices, values)
        return codes @ self._decoder()[dead]

    def _selected(self, sae_in: Tensor, pre_acts: Tensor, k: int, reads: _Reads) -> EncoderOutput:
        """Top-k of the (no-grad) pre-activations, re-attached to autograd with sparse gradients."""
        values, indices = pre_acts.topk(k, dim=-1, sorted=False)
        acts = selected_encode(sae_in, self.encoder.weight, self.encoder.bias, indices, values, reads.W_enc)
        return EncoderOutput(acts, indices)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a torch tensor (..., d_in={self.d_in}), got {type(x).__name__}; "
                            "convert it with torch.as_tensor")
        if x.dim() == 0 or x.shape[-1] != self.d_in:
            width = "is a scalar" if x.dim() == 0 else f"has last dimension {x.shape[-1]}"
            raise ValueError(
                f"input {width} but this SAE has d_in={self.d_in}; "
                "pass hidden states of the layer (and model) it was trained on"
            )

    def _check_dead_mask(self, dead_mask: Tensor | None, x: Tensor) -> None:
        if dead_mask is None:
            return
        if not isinstance(dead_mask, Tensor):
            raise ValueError(f"dead_mask must be a bool tensor of shape ({self.num_latents},), got {type(dead_mask).__name__}")
        if dead_mask.dtype != torch.bool or dead_mask.shape != (self.num_latents,):
            got = f"{dead_mask.dtype} of shape {tuple(dead_mask.shape)}"
            hint = " (this is forward(x, dead_mask), not sparsify's forward(x, y))" if dead_mask.shape == x.shape else ""
            raise ValueError(
                f"dead_mask must be a bool tensor of shape ({self.num_latents},), one flag per latent, got {got}{hint}"
            )

    # ------------------------------------------------------------------------- decoder norm
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        assert self.W_dec is not None
        eps = torch.finfo(self.W_dec.dtype).eps
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True) + eps)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out of `W_dec.grad` the component along each (unit-norm) decoder row."""
        assert self.W_dec is not None and self.W_dec.grad is not None
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    # ---------------------------------------------------------------------------------- I/O
    def save_to_disk(self, path: str | Path) -> None:
        """Write `cfg.json` and `sae.safetensors` into the folder `path`."""
        from .checkpoint import save_sae

        save_sae(self, path)

    @staticmethod
    def load_from_disk(
        path: str | Path,
        device: str | torch.device = "cpu",
        *,
        dtype: torch.dtype | None = None,
        decoder: bool = True,
    ) -> Sae:
        """Load one SAE folder (`cfg.json` + `sae.safetensors`)."""
        from .checkpoint import load_sae

        return load_sae(path, device=device, dtype=dtype, decoder=decoder)

    @staticmethod
    def load_from_hub(
        repo_id: str,
        layer: int | str | None = None,
        device: str | torch.device = "cpu",
        *,
        hookpoint: str | None = None,
        revision: str | None = None,
        dtype: torch.dtype | None = None,
        decoder: bool = True,
    ) -> Sae:
        """Download (only) the folder of one layer or hookpoint of a Hub repo and load it.

        `layer=10` finds `layer_10` (hidden_states[10]) or else `layers.10`, warning that a folder named by
        module path holds that module's output, hidden_states[11] (docs/layers.md); a name
        (`"layers.10.mlp"`) is a folder, as `hookpoint=`.
        The first three arguments are positional as in EleutherAI's sparsify (repo, hookpoint, device).
        """
        from .hub import load_from_hub

        return load_from_hub(
            repo_id, layer, hookpoint=hookpoint, revision=revision, device=device, dtype=dtype, decoder=decoder
        )

    @staticmethod
    def load_many_from_hub(
        repo_id: str,
        layers: list[int | str] | None = None,
        pattern: str | None = None,
        *,
        revision: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        decoder: bool = True,
    ) -> dict[str, Sae]:
        """Load several SAEs of a Hub repo, naturally sorted by folder name."""
        from .hub import load_many_from_hub

        return load_many_from_hub(
            repo_id, layers, pattern, revision=revision, device=device, dtype=dtype, decoder=decoder
        )

    @staticmethod
    def load_many(
        path_or_repo: str | Path,
        local: bool = False,
        layers: list[int | str] | None = None,
        device: str | torch.device = "cpu",
        *,
        pattern: str | None = None,
        revision: str | None = None,
        dtype: torch.dtype | None = None,
        decoder: bool = True,
    ) -> dict[str, Sae]:
        """Load every SAE folder of a local folder (`local=True`) or a Hub repo, naturally sorted
        (positional arguments as in EleutherAI's sparsify: name, local, layers, device)."""
        from .checkpoint import load_many_local
        from .hub import load_many_from_hub

        if local:
            return load_many_local(path_or_repo, layers, pattern, device=device, dtype=dtype, decoder=decoder)
        return load_many_from_hub(
            str(path_or_repo), layers, pattern, revision=revision, device=device, dtype=dtype, decoder=decoder
        )
