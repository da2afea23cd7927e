"""`TrainConfig`: every setting of `saetrain fit`; field docstrings double as CLI help."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sae_core.config import check_fields
from sae_core.layers import as_spec


@dataclass
class TrainConfig:
    store: Path
    """Activation store written by `actcache collect`."""
    out: Path
    """Run folder: SAEs (layer_L/), config.json, metrics.jsonl, checkpoints."""
    layers: str | None = None
    """Layers to train: numbers and ranges as in actcache (0-29:2), array names (layer_3) or fnmatch patterns; default all."""
    k: int = 32
    """Latents kept per token."""
    expansion_factor: int = 32
    """Latents per input dimension (when --num-latents is 0)."""
    num_latents: int = 0
    """Number of latents; 0 means d_in * expansion_factor."""
    normalize_decoder: bool = True
    """Keep decoder rows unit-norm."""
    multi_topk: bool = False
    """Add the Multi-TopK loss (4k latents, weight 1/8)."""
    batch_size: int = 4096
    """Tokens per optimizer step (summed over data-parallel ranks and accumulation steps)."""
    grad_acc_steps: int = 1
    """Batches accumulated per optimizer step."""
    micro_acc_steps: int = 1
    """Splits of each batch to save memory (gradients accumulated)."""
    lr: float | None = None
    """Learning rate; default 2e-4 / sqrt(num_latents / 2**14)."""
    lr_warmup_steps: int = 1000
    """Linear warmup steps."""
    lr_schedule: str = "constant"
    """After the warmup: constant (Gao et al.), or a linear or cosine decay to 0 at --lr-schedule-steps."""
    lr_schedule_steps: int = 0
    """Optimizer step where a linear or cosine decay reaches 0, counted from the start of an --init-from chain; 0: this run's end (its decay then starts at its first step)."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_feature_threshold: int = 10_000_000
    """Tokens without firing after which a latent counts as dead."""
    max_tokens: int | None = None
    """Stop after this many training tokens (rounded up to whole optimizer steps)."""
    epochs: int = 1
    """Passes over the training tokens."""
    seed: int = 0
    """Seed of the data order, holdout and initialisation."""
    exclude_first_tokens: int = 0
    """Drop the first N positions of each sequence (attention sinks)."""
    exclude_token_ids: list[int] = field(default_factory=list)
    """Drop tokens with these ids (e.g. BOS)."""
    holdout: float = 0.0
    """Fraction of the store's chunks held out for evaluation, never trained on."""
    shuffle_window: int = 64
    """Chunks mixed token-by-token in memory at a time (the shuffle buffer)."""
    save_every: int = 1000
    """Checkpoint every N optimizer steps (0: only at the end)."""
    resume: bool = False
    """Continue from the run folder's last checkpoint."""
    init_from: Path | None = None
    """Start from another run's last checkpoint (SAEs, Adam state, dead-latent counters, step): train on the next store."""
    overwrite: bool = False
    """Replace an existing run folder (a saetrain run or an empty folder; any other folder is refused)."""
    distribute_layers: bool = False
    """Under torchrun: give each rank a share of the layers instead of data parallelism."""
    device: str | None = "auto"
    """cpu, cuda, cuda:N or auto."""
    grad_clip: float = 1.0
    """Gradient-norm clipping per SAE (0 disables)."""
    read_threads: int = 4
    """Threads reading and decompressing chunks."""
    wandb: str | None = None
    """Log to this Weights & Biases project (optional)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        self.layers = as_spec(self.layers)
        self.exclude_token_ids = [] if self.exclude_token_ids is None else self.exclude_token_ids
        check_fields(self)
