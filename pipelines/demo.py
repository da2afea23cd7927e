"""`make demo`: the main job on the embedded default (SmolLM2-135M + Shakespeare).

Until the collection and training stages land, this runs what exists end to end: it loads
the embedded SmolLM2 model, runs it on a Shakespeare passage, checks its loss, and encodes
the residual stream of a few layers with *randomly initialised* TopK SAEs, reporting what a
trained SAE will be measured on (FVU, L0).
"""

from __future__ import annotations

import time

import torch

from sae_core import Sae, SaeConfig, load_model, num_layers, parse_layers
from sae_core.corpus import embedded_corpus_files


def main(layers: str = "0-29:6", ctx_len: int = 256, num_sequences: int = 4) -> None:
    t0 = time.perf_counter()
    model, tokenizer = load_model()
    print(f"loaded SmolLM2-135M-Instruct ({num_layers(model)} layers) in {time.perf_counter() - t0:.1f}s")
    text = embedded_corpus_files()[0].read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[0, : ctx_len * num_sequences].reshape(num_sequences, ctx_len)
    with torch.no_grad():
        out = model(ids, labels=ids, output_hidden_states=True)
    print(f"loss on {ids.numel()} tokens of Shakespeare: {out.loss.item():.3f} (perplexity {out.loss.exp().item():.1f})")
    torch.manual_seed(0)
    print("NOTE: SAEs below are randomly initialised (training lands with `saetrain fit`).")
    for layer in parse_layers(layers, num_layers(model)):
        h = out.hidden_states[layer]
        sae = Sae(h.shape[-1], SaeConfig(expansion_factor=8, k=32))
        with torch.no_grad():
            sae.b_dec.copy_(h.reshape(-1, h.shape[-1]).mean(0))
            res = sae(h)
        print(f"layer {layer:2d}: |h| median {h.norm(dim=-1).median().item():8.2f}  random-SAE FVU {res.fvu.item():.3f}  L0 {sae.cfg.k}")


if __name__ == "__main__":
    main()
