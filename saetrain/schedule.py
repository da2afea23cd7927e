"""The lr schedule of `saetrain fit`: a linear warmup, then constant or a linear or cosine decay to 0.

A decay's end is known before the first step: given (`--lr-schedule-steps`) or the run's last step,
counted here the way the loader and the trainer cut the data into optimizer steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from sae_core import UserError

from .config import TrainConfig


def lr_factor(step: int, warmup: int, schedule: str = "constant", end: int | None = None, start: int = 0) -> float:
    """The multiple of the lr that optimizer step `step` (from 0) takes.

    A linear warmup over `warmup` steps (the first step takes 1/warmup), then constant, or a linear
    or cosine decay from step `begin = max(warmup, start)` that would reach 0 at step `end`: the last
    step of a run that ends there takes 1/(end - begin) of the lr under the linear one (with start 0,
    transformers' get_linear_schedule_with_warmup, which EleutherAI's `sae` trained with).
    """
    f = min(1.0, (step + 1) / max(warmup, 1))
    begin = max(warmup, start)
    if schedule == "constant" or step < begin:
        return f
    p = min(1.0, (step - begin) / max(end - begin, 1))
    return 1 - p if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * p))


def lr_decay(cfg: TrainConfig, epoch_tokens: Callable[[int], int], step_tokens: int, ranks: int,
             first: int) -> tuple[int, int] | None:
    """The steps a decaying lr starts from and reaches 0 at (None: constant), for a run that starts at step
    `first` (that of the run it continues, or 0). Given --lr-schedule-steps, the decay is the chain's: from
    the warmup's end to that step. Otherwise it is this run's: from its first step (a run continuing
    another starts it at the full lr) to its end."""
    if cfg.lr_schedule == "constant":
        return None
    end = first + planned_steps(epoch_tokens, step_tokens, ranks, cfg.epochs, cfg.max_tokens)
    if cfg.lr_schedule_steps and cfg.lr_schedule_steps < end:
        raise UserError(f"--lr-schedule-steps {cfg.lr_schedule_steps:,} ends the {cfg.lr_schedule} decay before the run "
                        f"does (at step {end:,}), leaving its last steps at lr 0; raise it (0: the run's end) or train "
                        "fewer tokens (--epochs, --max-tokens)")
    return (0, cfg.lr_schedule_steps) if cfg.lr_schedule_steps else (first, end)


def planned_steps(epoch_tokens: Callable[[int], int], step_tokens: int, ranks: int, epochs: int,
                  max_tokens: int | None) -> int:
    """The optimizer steps a run takes from its start, as `saetrain.trainer` makes them: steps of
    `step_tokens` per rank over `epoch_tokens(epoch)` tokens per rank, the last of an epoch taking its
    tail (StoreLoader.batches), until the epochs are done or `max_tokens` are seen (counted over the
    `ranks` data-parallel ranks, after whole steps)."""
    size, steps, budget = step_tokens, 0, max_tokens or math.inf
    for epoch in range(epochs):
        n = epoch_tokens(epoch)
        full = (n - size - size // 2) // size + 1 if n >= size + size // 2 else 0  # then a tail of 0.5-1.5 steps
        in_epoch = full + (n > full * size)
        if budget <= n * ranks:  # max_tokens ends the run inside this epoch
            return steps + min(-(-budget // (size * ranks)), in_epoch)
        steps, budget = steps + in_epoch, budget - n * ranks
    return steps


def most_steps(epoch_tokens: int, batch_size: int, epochs: int = 1, max_tokens: int | None = None) -> int:
    """At most the optimizer steps of a run over epochs of at most `epoch_tokens` kept tokens (any holdout,
    exclusions or data-parallel split): an epoch takes at most ceil(tokens / step) steps, and only the
    last step of an epoch holds less than a whole one, so --max-tokens takes at most one more per epoch."""
    most = epochs * -(-epoch_tokens // batch_size)
    return min(most, -(-max_tokens // batch_size) + epochs - 1) if max_tokens else most
