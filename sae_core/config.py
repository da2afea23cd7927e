"""`SaeConfig`: the fields of EleutherAI's `cfg.json`, and the architectures we refuse."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

# Keys of published cfg.json files that change the architecture. A value other than the one
# given here means a model we cannot run; loading it as a plain TopK SAE would silently
# compute something else, so we refuse.
_ARCHITECTURE_KEYS: dict[str, Any] = {
    "signed": False,
    "transcode": False,
    "skip_connection": False,
    "activation": "topk",
    "encoder_pkm": False,
    "encoder_kron": False,
    "encoder_monarch": False,
    "encoder_halut": False,
    "monet": False,
}


@dataclass
class SaeConfig:
    """Hyperparameters of a TopK SAE, as written to `cfg.json` (plus `d_in`)."""

    expansion_factor: int = 32
    """Latents per input dimension; used when `num_latents` is 0."""
    normalize_decoder: bool = True
    """Keep the decoder rows at unit norm."""
    num_latents: int = 0
    """Number of latents; 0 means `d_in * expansion_factor`."""
    k: int = 32
    """Number of latents kept per token."""
    multi_topk: bool = False
    """Also compute the Multi-TopK FVU (4k latents) of Gao et al."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """Keys of a loaded cfg.json that we keep but do not use; written back on save."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise UserError(f"k must be at least 1, got {self.k}")
        if self.num_latents < 0:
            raise UserError(f"num_latents must be >= 0 (0 = d_in * expansion_factor), got {self.num_latents}")
        if self.num_latents == 0 and self.expansion_factor < 1:
            raise UserError(f"expansion_factor must be at least 1, got {self.expansion_factor}")

    def resolve_num_latents(self, d_in: int) -> int:
        return self.num_latents or d_in * self.expansion_factor

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "cfg.json") -> SaeConfig:
        """Build a config from a cfg.json dict, keeping unknown keys and refusing other architectures."""
        for key, expected in _ARCHITECTURE_KEYS.items():
            if key in d and d[key] != expected:
                raise UserError(
                    f"{source}: {key}={d[key]!r} is an architecture this library cannot run "
                    f"(only plain TopK SAEs, {key}={expected!r}); load it with EleutherAI's sparsify instead"
                )
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k != "d_in"}
        try:
            return cls(**known, extra=extra)
        except TypeError as e:
            raise UserError(f"{source}: {e}") from None
