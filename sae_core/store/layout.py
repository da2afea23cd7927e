"""Pure planning of a store's layout: which tokens go in which shard and chunk.

A store holds `num_sequences` packed sequences of `ctx_len` tokens. Tokens are grouped into
shards of `seqs_per_shard` whole sequences (the unit of writing and of committing) and each
shard into chunks of `chunk_tokens` rows (the unit of reading and compression).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import UserError

MiB = 1 << 20
# The largest chunk a store may have (per layer): training reads chunks whole, a writer holds a shard.
MAX_CHUNK_BYTES = 256 * MiB


@dataclass(frozen=True)
class StoreLayout:
    num_sequences: int
    ctx_len: int
    seqs_per_shard: int
    chunk_tokens: int

    def __post_init__(self) -> None:
        if min(self.num_sequences, self.ctx_len, self.seqs_per_shard, self.chunk_tokens) < 1:
            raise ValueError(f"every layout size must be positive: {self}")
        if self.shard_tokens % self.chunk_tokens:
            raise ValueError(f"chunk_tokens={self.chunk_tokens} must divide shard_tokens={self.shard_tokens}")

    @property
    def shard_tokens(self) -> int:
        return self.seqs_per_shard * self.ctx_len

    @property
    def num_tokens(self) -> int:
        return self.num_sequences * self.ctx_len

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_sequences / self.seqs_per_shard)

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_tokens / self.chunk_tokens)

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_tokens // self.chunk_tokens

    def shard_sequences(self, shard: int) -> range:
        self._check(shard, self.num_shards, "shard")
        start = shard * self.seqs_per_shard
        return range(start, min(start + self.seqs_per_shard, self.num_sequences))

    def shard_tokens_range(self, shard: int) -> range:
        seqs = self.shard_sequences(shard)
        return range(seqs.start * self.ctx_len, seqs.stop * self.ctx_len)

    def chunk_tokens_range(self, chunk: int) -> range:
        self._check(chunk, self.num_chunks, "chunk")
        start = chunk * self.chunk_tokens
        return range(start, min(start + self.chunk_tokens, self.num_tokens))

    def chunk_shard(self, chunk: int) -> int:
        return chunk // self.chunks_per_shard

    def shard_chunks(self, shard: int) -> range:
        start = shard * self.chunks_per_shard
        return range(start, min(start + self.chunks_per_shard, self.num_chunks))

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def _check(i: int, n: int, what: str) -> None:
        if not 0 <= i < n:
            raise IndexError(f"{what} {i} out of range (0..{n - 1})")


def chunk_divisor(n: int, target: int, most: int) -> int:
    """The chunk for a shard of `n` tokens: its largest divisor up to `target`; where that is under a quarter
    of it (6 tokens for 2 sequences of 2049 = 3 x 683, 2 for a prime length), the divisor nearest `target` by
    ratio, above or below, up to `most`."""
    divisors = {c for d in range(1, math.isqrt(n) + 1) if n % d == 0 for c in (d, n // d)}
    below = max(c for c in divisors if c <= max(target, 1))
    if 4 * below >= target:
        return below
    return min((c for c in divisors if c <= most), key=lambda c: abs(math.log(c / target)))


def check_layout_options(
    *, shard_mb: float = 32.0, chunk_mb: float = 2.0, seqs_per_shard: int | None = None, chunk_tokens: int | None = None
) -> None:
    """Refuse layout options no store can have (a one-line error naming the option), before any work."""
    for flag, v in (("--shard-mb", shard_mb), ("--chunk-mb", chunk_mb)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise UserError(f"{flag} must be a positive number of MiB, got {v}")
    for flag, v, what in (("--seqs-per-shard", seqs_per_shard, "shards from --shard-mb"),
                          ("--chunk-tokens", chunk_tokens, "chunks from --chunk-mb")):
        if v is not None and v < 1:
            raise UserError(f"{flag} must be at least 1, got {v}; leave it out to size {what}")


def plan_layout(
    *,
    num_sequences: int,
    ctx_len: int,
    bytes_per_token: int,
    shard_mb: float = 32.0,
    chunk_mb: float = 2.0,
    seqs_per_shard: int | None = None,
    chunk_tokens: int | None = None,
) -> StoreLayout:
    """Choose shard and chunk sizes for a layer whose token costs `bytes_per_token` bytes.

    Shards of about `shard_mb` per layer (written whole: a crash loses at most one shard of
    work) and chunks of about `chunk_mb` (MB-scale reads, each compressed on its own).

    A shard never holds more sequences than the data has, except with an explicit
    `chunk_tokens`: then a shard is a whole number of chunks (the sharding codec needs it), so
    data smaller than one shard gets one shard that is partly beyond the end of the data. The
    last shard (and its last chunk) may always be partial: readers clip both at `num_tokens`.
    """
    check_layout_options(shard_mb=shard_mb, chunk_mb=chunk_mb, seqs_per_shard=seqs_per_shard, chunk_tokens=chunk_tokens)
    if num_sequences < 1:
        raise UserError("the dataset yields no complete sequence; lower --ctx-len or add data")
    if chunk_tokens is not None and chunk_tokens * bytes_per_token > MAX_CHUNK_BYTES:
        raise UserError(
            f"--chunk-tokens {chunk_tokens} makes chunks of {chunk_tokens * bytes_per_token / MiB:,.0f} MiB per layer, "
            f"and a chunk is read (and a shard held in memory) whole; use at most "
            f"{MAX_CHUNK_BYTES // bytes_per_token:,} tokens (leave it out for chunks of ~{chunk_mb:g} MiB)"
        )
    # Shards are whole sequences and whole chunks: a multiple of `unit` sequences.
    unit = 1 if chunk_tokens is None else chunk_tokens // math.gcd(chunk_tokens, ctx_len)
    if seqs_per_shard is None:
        auto = max(1, round(shard_mb * MiB / (ctx_len * bytes_per_token)))
        seqs_per_shard = max(unit, round(auto / unit) * unit)
    elif seqs_per_shard % unit:
        raise UserError(
            f"chunk size {chunk_tokens} tokens does not divide the shard size {seqs_per_shard * ctx_len} tokens "
            f"({seqs_per_shard} sequences of {ctx_len}); pick a divisor, or --seqs-per-shard a multiple of {unit}"
        )
    # No bigger than the data needs (rounded up to whole chunks when the chunk size is given).
    seqs_per_shard = min(seqs_per_shard, -(-num_sequences // unit) * unit)
    if chunk_tokens is None:
        target = max(1, int(chunk_mb * MiB / bytes_per_token))
        chunk_tokens = chunk_divisor(seqs_per_shard * ctx_len, target, max(1, MAX_CHUNK_BYTES // bytes_per_token))
    return StoreLayout(num_sequences, ctx_len, seqs_per_shard, chunk_tokens)
