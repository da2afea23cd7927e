"""Running per-layer statistics: mean and variance per dimension, and token-norm quantiles.

Merged with Chan et al.'s parallel update, so shards (and ranks) can be combined in any
grouping; norms go into a fixed log-spaced histogram, which merges by addition.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import numpy as np

NORM_BINS = np.logspace(-4, 7, 1101)  # 100 bins per decade, 1e-4 .. 1e7
QUANTILES = (0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999)


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f8").tobytes()).decode()


def _unb64(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<f8").copy()


@dataclass
class RunningStats:
    d: int
    count: int = 0
    mean: np.ndarray = field(default=None)  # (d,) float64
    m2: np.ndarray = field(default=None)  # (d,) float64: sum of squared deviations
    norm_hist: np.ndarray = field(default=None)  # (len(NORM_BINS) + 1,) int64
    norm_max: float = 0.0
    nonfinite: int = 0

    def __post_init__(self) -> None:
        if self.mean is None:
            self.mean = np.zeros(self.d)
            self.m2 = np.zeros(self.d)
            self.norm_hist = np.zeros(len(NORM_BINS) + 1, dtype=np.int64)

    @classmethod
    def of(cls, x) -> RunningStats:
        """Statistics of a `(tokens, d)` block (a torch tensor or numpy array of any float dtype).

        Computed in fp32 (torch's pairwise sums) around the block's own mean, so there is no
        cancellation; blocks are merged in fp64.
        """
        import torch

        x = torch.as_tensor(x).float()
        finite = torch.isfinite(x.sum(dim=1))  # a NaN or inf anywhere in a row makes its sum non-finite
        s = cls(x.shape[1], nonfinite=int((~finite).sum()))
        if not bool(finite.all()):
            x = x[finite]
        if len(x):
            s.count = len(x)
            mean = x.mean(0)
            s.mean = mean.double().numpy()
            s.m2 = (x - mean).square_().sum(0).double().numpy()
            norms = torch.linalg.vector_norm(x, dim=1).numpy()
            s.norm_hist = np.bincount(np.searchsorted(NORM_BINS, norms), minlength=len(NORM_BINS) + 1)
            s.norm_max = float(norms.max())
        return s

    def merge(self, other: RunningStats) -> RunningStats:
        n = self.count + other.count
        out = RunningStats(self.d, nonfinite=self.nonfinite + other.nonfinite)
        out.norm_hist = self.norm_hist + other.norm_hist
        out.norm_max = max(self.norm_max, other.norm_max)
        if n:
            delta = other.mean - self.mean
            out.count = n
            out.mean = self.mean + delta * (other.count / n)
            out.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return out

    @property
    def var(self) -> np.ndarray:
        return self.m2 / max(self.count - 1, 1)

    def norm_quantiles(self) -> dict[str, float]:
        """Approximate quantiles of the token norm (bin upper edges, within 2.3%)."""
        if not self.count:
            return {}
        cdf = np.cumsum(self.norm_hist) / self.count
        edges = np.append(NORM_BINS, np.inf)
        out = {f"p{q * 100:g}": float(min(edges[np.searchsorted(cdf, q)], self.norm_max)) for q in QUANTILES}
        out["max"] = self.norm_max
        return out

    def to_json(self) -> dict:
        nz = np.nonzero(self.norm_hist)[0]
        return {
            "d": self.d,
            "count": self.count,
            "nonfinite": self.nonfinite,
            "mean": _b64(self.mean),
            "m2": _b64(self.m2),
            "norm_hist": {str(int(i)): int(self.norm_hist[i]) for i in nz},
            "norm_max": self.norm_max,
        }

    @classmethod
    def from_json(cls, d: dict) -> RunningStats:
        s = cls(d["d"], count=d["count"], nonfinite=d.get("nonfinite", 0), norm_max=d["norm_max"])
        s.mean, s.m2 = _unb64(d["mean"]), _unb64(d["m2"])
        for i, c in d["norm_hist"].items():
            s.norm_hist[int(i)] = c
        return s

    def summary(self) -> dict:
        """What `actcache info` prints and the trainer reads: scalars only."""
        return {
            "count": self.count,
            "nonfinite_tokens": self.nonfinite,
            "mean_norm": float(np.linalg.norm(self.mean)),
            "mean_var": float(self.var.mean()) if self.count else 0.0,
            "norm_quantiles": self.norm_quantiles(),
        }
