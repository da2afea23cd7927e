"""Preparing the data order: a window's cost against tokenizing and packing the whole dataset.

`actcache collect --max-tokens W [--skip-tokens S]` needs the documents only up to the end of the
window's last block (actcache/packing.py), and the packed sequences of large data are cached, so
the next window continues where the last stopped. This times, on one text file made of `--copies`
copies of the embedded Shakespeare (cut into ~256 KiB documents, as any large text file is):

- packing everything, uncached (what a collection of the whole dataset costs);
- the first window, cold (empty cache); the second window (extends the cache); the first again (read back);

and prints each as a ratio of the whole.

    python -m benchmarks.data [--copies 10] [--corpus-bytes 0] [--ctx-len 2048] [--window-tokens 1048576] [--model M]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=10, help="copies of the embedded corpus in the text file")
    p.add_argument("--corpus-bytes", type=int, default=0, help="use only this many bytes of each copy (0: all)")
    p.add_argument("--ctx-len", type=int, default=2048)
    p.add_argument("--window-tokens", type=int, default=1 << 20, help="tokens per window")
    p.add_argument("--model", default=None, help="tokenizer of this model (default: the embedded SmolLM2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp-dir", type=Path, default=None)
    p.add_argument("--out-json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from benchmarks._common import run_and_report

    command = "python -m benchmarks.data " + shlex.join(sys.argv[1:] if argv is None else argv)
    run_and_report(lambda tmp: bench(args, tmp), args, prefix="bench-data-", command=command)
    return 0


def bench(args, tmp: Path) -> dict:
    from transformers import AutoTokenizer

    from actcache import data, packing
    from sae_core.corpus import embedded_corpus_files
    from sae_core.models import convert_gguf, default_gguf_path

    tokenizer = AutoTokenizer.from_pretrained(args.model or str(convert_gguf(default_gguf_path())))
    corpus = "".join(f.read_text() for f in embedded_corpus_files())
    corpus = corpus[: args.corpus_bytes or len(corpus)]
    text = tmp / "corpus.txt"
    with open(text, "w") as f:
        for _ in range(args.copies):
            f.write(corpus)
    docs = data.load_documents(str(text))
    count = -(-args.window_tokens // args.ctx_len)
    saved = os.environ.get("SAE_CORE_CACHE")
    os.environ["SAE_CORE_CACHE"] = str(tmp / "cache")  # an empty cache of its own
    try:
        def timed(fn):
            t0 = time.perf_counter()
            out = fn()
            return out, time.perf_counter() - t0

        whole, t_whole = timed(lambda: packing.pack(docs, tokenizer, args.ctx_len, args.seed))
        runs = {}
        for name, first in (("first window, cold", 0), ("second window", count), ("first window again", 0)):
            seqs, seconds = timed(lambda first=first: packing.window(docs, tokenizer, args.ctx_len, args.seed, first, count)[0])
            runs[name] = seconds
        packed = len(os.listdir(tmp / "cache" / "packed")) if (tmp / "cache" / "packed").is_dir() else 0
    finally:
        if saved is None:
            os.environ.pop("SAE_CORE_CACHE", None)
        else:
            os.environ["SAE_CORE_CACHE"] = saved
    tokens = whole.size
    print(f"{text.stat().st_size / 1e6:.1f} MB of text in {docs.num_docs} documents, {tokens:,} tokens packed at "
          f"ctx {args.ctx_len}; window {count} sequences ({count * args.ctx_len:,} tokens); cache entries {packed}")
    print(f"{'':<28}{'seconds':>9}{'vs whole':>10}")
    print(f"{'whole dataset, uncached':<28}{t_whole:>9.2f}{1:>10.3f}")
    for name, seconds in runs.items():
        print(f"{name:<28}{seconds:>9.2f}{seconds / t_whole:>10.3f}")
    return {"text_bytes": text.stat().st_size, "documents": docs.num_docs, "tokens": int(tokens),
            "window_sequences": count, "whole_s": t_whole, **{k.replace(" ", "_").replace(",", ""): v
                                                                for k, v in runs.items()}}


if __name__ == "__main__":
    sys.exit(main())
