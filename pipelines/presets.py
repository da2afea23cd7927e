"""Named recipes: each returns the collection and training configs of one run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from actcache import CollectConfig
from saetrain import TrainConfig


@dataclass
class Recipe:
    name: str
    description: str
    collect: CollectConfig
    train: TrainConfig
    rounds: int = 1
    """Windows of `collect.max_tokens` tokens, collected and trained one after another: the store holds
    one window at a time (it replaces the last), and each round's training starts from the last
    round's SAEs, Adam state and step (`saetrain fit --init-from`). A decaying `train.lr_schedule`
    without `lr_schedule_steps` decays over the steps of every round (`rounds x` those of a window)."""


def smollm2_demo(root: Path = Path("out/smollm2-demo")) -> Recipe:
    """The main job on the embedded default: ~10 minutes on 2 CPU cores."""
    store = root / "acts.zarr"
    return Recipe(
        "smollm2-demo",
        "SmolLM2-135M on Shakespeare: 200k tokens of layers 3, 9, 15, 21; 8x TopK SAEs (k=32), 2 epochs, 5% held out",
        CollectConfig(out=store, layers="3,9,15,21", ctx_len=256, batch_size=8, max_tokens=200_000, dtype="bfloat16"),
        TrainConfig(
            store=store, out=root / "saes", k=32, expansion_factor=8, batch_size=1024, epochs=2, lr_warmup_steps=50,
            exclude_first_tokens=1, holdout=0.05, dead_feature_threshold=100_000, save_every=100,
        ),
    )


def tiny_debug(root: Path = Path("out/tiny-debug")) -> Recipe:
    """Seconds-long smoke run: two early layers, a few thousand tokens."""
    store = root / "acts.zarr"
    return Recipe(
        "tiny-debug",
        "SmolLM2-135M, layers 0-1, 4k tokens, 2x SAEs",
        CollectConfig(out=store, layers="0,1", ctx_len=128, max_tokens=4096, dtype="bfloat16"),
        TrainConfig(store=store, out=root / "saes", k=8, expansion_factor=2, batch_size=512, lr_warmup_steps=2,
                    holdout=0.1, save_every=0),
    )


# Tokens per round of llama3-8b-32x: 32 layers x 4096 x 2 bytes = 256 KiB a token, so a window of
# 2**25 tokens is an 8 TiB store (zstd saves a few percent on bf16).
LLAMA3_WINDOW = 2**25


def llama3_8b_32x(root: Path = Path("out/llama3-8b-32x")) -> Recipe:
    """The recipe behind EleutherAI/sae-llama-3-8b-32x: every layer of Llama-3-8B, 32x latents, k=192.

    Needs GPUs, Hub access and ~8 TiB of disk: `torchrun --nproc_per_node 8 -m pipelines.run
    llama3-8b-32x` collects a window of 2**25 tokens data-parallel, trains on it with the layers
    spread over the ranks, and repeats with the next window (8.5B tokens would be 2 PiB at once);
    it stops early if the dataset ends first, as RedPajama-Data-1T-Sample (a 1B-token sample, by its
    card) does after about 30 windows. As EleutherAI's `sae` trained them, the lr decays linearly,
    in one decay over all 254 rounds (so where the data ends after 30, at about 90% of its peak).
    """
    store = root / "acts.zarr"
    return Recipe(
        "llama3-8b-32x",
        "Llama-3-8B, layers 0-31, up to 8.5B tokens of RedPajama-1T-Sample (~1B) at ctx 2048 in windows of 2**25; "
        "32x TopK SAEs, k=192, lr decaying linearly over all rounds",
        CollectConfig(
            out=store, model="meta-llama/Meta-Llama-3-8B", dataset="togethercomputer/RedPajama-Data-1T-Sample",
            layers="0-31", ctx_len=2048, batch_size=16, dtype="bfloat16", max_tokens=LLAMA3_WINDOW,
        ),
        TrainConfig(
            store=store, out=root / "saes", k=192, expansion_factor=32, batch_size=8 * 2048 * 8, lr_warmup_steps=1000,
            lr_schedule="linear", distribute_layers=True, holdout=0.001, save_every=1000,
        ),
        rounds=-(-8_500_000_000 // LLAMA3_WINDOW),
    )


PRESETS: dict[str, Callable[[], Recipe]] = {
    "smollm2-demo": smollm2_demo,
    "tiny-debug": tiny_debug,
    "llama3-8b-32x": llama3_8b_32x,
}
