"""Held-out evaluation: FVU of each SAE on chunks it never saw."""

from __future__ import annotations

import torch

from sae_core import Sae, UserError
from sae_core.store import ActivationStore

from .loader import StoreLoader


@torch.no_grad()
def heldout_fvu(
    saes: dict[str, Sae], store: ActivationStore, chunks: list[int], *, batch_size: int = 4096,
    exclude_first_tokens: int = 0, exclude_token_ids: list[int] | None = None, device="cpu",
) -> dict[str, float]:
    """FVU over all held-out tokens: sum of squared errors / sum of squared deviations from their mean."""
    if not chunks or not saes:
        return {}
    loader = StoreLoader(
        store, list(saes), chunks, seed=0, window=len(chunks), exclude_first_tokens=exclude_first_tokens,
        exclude_token_ids=exclude_token_ids, device=device,
    )
    sse = {n: 0.0 for n in saes}
    s1 = {n: 0.0 for n in saes}
    s2 = {n: 0.0 for n in saes}
    count = 0
    for batch in loader.batches(0, batch_size):
        count += len(batch.token_index)
        for name, sae in saes.items():
            x = batch.acts[name].to(sae.device, torch.float32)
            x_hat = sae.decode(*sae.encode(x)).float()
            sse[name] += (x - x_hat).double().pow(2).sum().item()
            s1[name] = s1[name] + x.double().sum(0)
            s2[name] += x.double().pow(2).sum().item()
    if count < 2:
        raise UserError(f"{count} held-out token(s) are left after the exclusions, and the FVU needs at least 2 (it "
                        "divides by their variance); nothing to evaluate on")
    out = {}
    for name in saes:
        total_var = s2[name] - (s1[name].pow(2).sum().item() / count)
        if not total_var > 0:
            raise UserError(f"the {count} held-out tokens of {name} are all alike (no variance), so its FVU is "
                            "undefined; hold out more (--holdout)")
        out[name] = sse[name] / total_var
    return out
