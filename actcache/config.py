"""`CollectConfig`: every setting of `actcache collect`; field docstrings double as CLI help."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sae_core.config import check_fields
from sae_core.layers import as_spec
from sae_core.store import DEFAULT_CODEC


@dataclass
class CollectConfig:
    out: Path
    """Store to write (a folder, conventionally NAME.zarr)."""
    model: str | None = None
    """Hub id, local folder or .gguf file; default: the embedded SmolLM2-135M-Instruct."""
    gguf_file: str | None = None
    """GGUF file name inside --model (a folder or Hub repo)."""
    revision: str | None = None
    """Model revision (branch, tag or commit) on the Hub."""
    dataset: str | None = None
    """Hub id, local file or folder (.txt/.md/.jsonl/.json/.parquet/.csv), or a saved dataset; default: embedded Shakespeare."""
    dataset_config: str | None = None
    """Configuration (subset) of a Hub dataset that has several, e.g. wikitext-103-raw-v1."""
    split: str = "train"
    """Dataset split; a folder's files are split by name (train.jsonl, data/test/...) when all are named by one, else all are train."""
    text_column: str = "text"
    """Column holding the text (ignored for a pre-tokenized dataset with input_ids)."""
    ctx_len: int = 2048
    """Tokens per sequence."""
    batch_size: int = 8
    """Sequences per forward pass."""
    max_tokens: int | None = None
    """Stop after this many tokens (rounded up to whole sequences)."""
    skip_tokens: int = 0
    """Start this many tokens into the sequence order (rounded up to whole sequences); with --max-tokens: one window."""
    dtype: str = "bfloat16"
    """Dtype activations are stored in: bfloat16, float16 or float32."""
    model_dtype: str | None = None
    """Dtype the model runs in; default float32 on CPU, bfloat16 on CUDA."""
    load_in_8bit: bool = False
    """Load the model in 8-bit (bitsandbytes, CUDA only)."""
    device: str | None = "auto"
    """cpu, cuda, cuda:N or auto."""
    layers: str | None = None
    """Layer spec: 0-31, 0,4,8, 0-29:2 or all (layer L = hidden_states[L]); default all."""
    hookpoints: list[str] = field(default_factory=list)
    """Module paths with fnmatch wildcards (instead of --layers); the module outputs are stored."""
    codec: str = DEFAULT_CODEC
    """Compression: zstd, blosc-zstd, blosc-lz4, gzip or none."""
    seed: int | None = 0
    """Seed of the data order; None (or a negative seed) keeps the dataset's order."""
    resume: bool = False
    """Continue a store after its last committed shard."""
    overwrite: bool = False
    """Replace an existing store."""
    shard_mb: float = 32.0
    """Target shard size per layer in MiB (the unit written and committed at once)."""
    chunk_mb: float = 2.0
    """Target chunk size in MiB (the unit read and compressed)."""
    seqs_per_shard: int | None = None
    """Sequences per shard (overrides --shard-mb)."""
    chunk_tokens: int | None = None
    """Tokens per chunk (overrides --chunk-mb; must divide the shard)."""
    write_threads: int = 0
    """Threads compressing and writing shards; 0: 2 on CPU, up to 8 with a GPU (the forward pass then leaves the CPU free)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        self.layers = as_spec(self.layers)
        if isinstance(self.hookpoints, str) or self.hookpoints is None:  # one pattern, or none
            self.hookpoints = [] if self.hookpoints is None else [self.hookpoints]
        check_fields(self)
