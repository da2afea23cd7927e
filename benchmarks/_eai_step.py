"""Time EleutherAI's real `sparsify.Trainer.fit` (eai-sparsify) on cached activations, one hookpoint.

Run by `benchmarks/train.py` with the Python of a separate virtualenv holding eai-sparsify; it
imports nothing of this repository. sparsify trains from a language model's forward hooks, so
the "model" here is `ActivationTable`: the input ids are row numbers of the activation table,
and its single module `layers.0` (the hookpoint) outputs those rows. The hidden states
sparsify's hook receives are therefore exactly the cached activations, in the given order, and
everything from `Trainer.__init__` (SAE init, optimizer, LR schedule) to the per-step code of
`Trainer.fit` (hook: mask, clone, b_dec init, decoder renorm, forward/backward, dead-latent
bookkeeping; then gradient projection, optimizer and scheduler step) is sparsify's own code.
The one extra cost is the "model forward", an embedding gather of batch x d_in floats.

A forward pre-hook on the table stamps the start of every batch; step i lasts from stamp i to
stamp i+1, so the final checkpoint `fit` writes is not timed. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch
from torch import nn


class ActivationTable(nn.Module):
    """A stand-in language model whose hidden states at `layers.0` are rows of `acts`."""

    def __init__(self, acts: torch.Tensor):
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(acts, freeze=True)
        self.layers = nn.ModuleList([nn.Identity()])

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dummy_inputs(self) -> dict:
        return {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    def forward(self, input_ids: torch.Tensor, **_) -> torch.Tensor:
        return self.layers[0](self.embed(input_ids))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--acts", required=True, help=".npy of bfloat16 bits (uint16), (tokens, d_in)")
    p.add_argument("--batch-size", type=int, required=True, help="tokens per step")
    p.add_argument("--expansion-factor", type=int, required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--auxk-alpha", type=float, required=True)
    p.add_argument("--optimizer", default="adam", choices=["adam", "signum", "muon"])
    p.add_argument("--warmup", type=int, required=True, help="steps left out of the timing")
    p.add_argument("--threads", type=int, required=True)
    args = p.parse_args()

    import sparsify
    from sparsify import SaeConfig, TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    acts = torch.from_numpy(np.load(args.acts)).view(torch.bfloat16).float()
    ids = torch.arange(len(acts) // args.batch_size * args.batch_size).reshape(-1, args.batch_size)
    dataset = [{"input_ids": row} for row in ids]  # one "sequence" of batch_size tokens per step
    model = ActivationTable(acts)
    with tempfile.TemporaryDirectory() as save_dir:
        cfg = TrainConfig(
            SaeConfig(expansion_factor=args.expansion_factor, k=args.k), batch_size=1, optimizer=args.optimizer,
            auxk_alpha=args.auxk_alpha, hookpoints=["layers.0"], log_to_wandb=False, save_every=10**9,
            save_dir=save_dir,
        )
        trainer = Trainer(cfg, dataset, model)
        stamps: list[float] = []
        model.register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter()))
        trainer.fit()
    steps = np.diff(stamps)[args.warmup:]
    print(json.dumps({
        "tok_s": len(steps) * args.batch_size / steps.sum(), "timed_steps": len(steps),
        "step_s_median": float(np.median(steps)), "sparsify": sparsify.__version__, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "optimizer": type(trainer.optimizers[0]).__name__,
        "mkldnn_fp32_precision": torch.backends.mkldnn.matmul.fp32_precision,
        "decoder": sparsify.sparse_coder.decoder_impl.__name__,
    }))


if __name__ == "__main__":
    main()
