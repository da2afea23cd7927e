"""The `actcache` command: collect, info, verify."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from sae_core import UserError
from sae_core.cli import field_docs, make_app, run_app

from .config import CollectConfig

app = make_app("Run a language model once and cache many layers of its residual stream in a Zarr v3 store.")

_doc = field_docs(CollectConfig)


@app.command()
def collect(
    out: Path = typer.Option(..., "--out", "-o", help=_doc["out"]),
    model: str | None = typer.Option(None, help=_doc["model"]),
    dataset: str | None = typer.Option(None, help=_doc["dataset"]),
    layers: str | None = typer.Option(None, help=_doc["layers"]),
    hookpoints: list[str] | None = typer.Option(None, metavar="PATTERN", help=_doc["hookpoints"] + " Several may follow the flag (or repeat it, or comma-separate)."),
    dataset_config: str | None = typer.Option(None, help=_doc["dataset_config"]),
    split: str = typer.Option("train", help=_doc["split"]),
    text_column: str = typer.Option("text", help=_doc["text_column"]),
    ctx_len: int = typer.Option(2048, help=_doc["ctx_len"]),
    batch_size: int = typer.Option(8, help=_doc["batch_size"]),
    max_tokens: int | None = typer.Option(None, help=_doc["max_tokens"]),
    skip_tokens: int = typer.Option(0, help=_doc["skip_tokens"]),
    dtype: str = typer.Option("bfloat16", help=_doc["dtype"]),
    model_dtype: str | None = typer.Option(None, help=_doc["model_dtype"]),
    load_in_8bit: bool = typer.Option(False, "--load-in-8bit", help=_doc["load_in_8bit"]),
    device: str = typer.Option("auto", help=_doc["device"]),
    gguf_file: str | None = typer.Option(None, help=_doc["gguf_file"]),
    revision: str | None = typer.Option(None, help=_doc["revision"]),
    codec: str = typer.Option(CollectConfig.codec, help=_doc["codec"]),
    seed: int = typer.Option(0, help="Seed of the data order; a negative seed keeps the dataset's order."),
    resume: bool = typer.Option(False, "--resume", help=_doc["resume"]),
    overwrite: bool = typer.Option(False, "--overwrite", help=_doc["overwrite"]),
    shard_mb: float = typer.Option(32.0, help=_doc["shard_mb"]),
    chunk_mb: float = typer.Option(2.0, help=_doc["chunk_mb"]),
    seqs_per_shard: int | None = typer.Option(None, help=_doc["seqs_per_shard"]),
    chunk_tokens: int | None = typer.Option(None, help=_doc["chunk_tokens"]),
    write_threads: int = typer.Option(0, help=_doc["write_threads"]),
    progress: bool = typer.Option(True, "--progress/--no-progress", help=_doc["progress"]),
) -> None:
    """Run the model over the data once and write the requested layers into a store."""
    from sae_core.errors import out_of_memory

    from .collection import collect as run

    points = [p.strip() for item in (hookpoints or []) for p in item.split(",") if p.strip()]
    if hookpoints is not None and not points:
        raise UserError("--hookpoints names no module; pass patterns like 'model.layers.*.mlp', or leave it out for --layers")
    cfg = CollectConfig(
        out=out, model=model, gguf_file=gguf_file, revision=revision, dataset=dataset, dataset_config=dataset_config,
        split=split,
        text_column=text_column, ctx_len=ctx_len, batch_size=batch_size, max_tokens=max_tokens, skip_tokens=skip_tokens,
        dtype=dtype,
        model_dtype=model_dtype, load_in_8bit=load_in_8bit, device=device, layers=layers, hookpoints=points,
        codec=codec, seed=None if seed < 0 else seed, resume=resume, overwrite=overwrite, shard_mb=shard_mb,
        chunk_mb=chunk_mb, seqs_per_shard=seqs_per_shard, chunk_tokens=chunk_tokens,
        write_threads=write_threads, progress=progress,
    )
    with out_of_memory("lower --batch-size (--resume continues a collection with it), or start again with a "
                       "shorter --ctx-len or the model in 8 bits (--load-in-8bit)"):
        res = run(cfg)
    if res.tokens_committed >= 0:
        typer.echo(
            f"wrote {res.tokens_written:,} tokens in {res.seconds:.1f}s "
            f"({res.tokens_committed:,} committed in {res.path}); inspect with `actcache info {res.path}`"
        )


@app.command()
def info(
    store: Path = typer.Argument(..., help="Store to describe."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
) -> None:
    """What a store holds: model, layers, tokens, dtype, bytes on disk, compression ratio, statistics."""
    from .info import format_info, store_info

    i = store_info(store)
    typer.echo(json.dumps(i, indent=2) if as_json else format_info(i))


@app.command()
def verify(
    store: Path = typer.Argument(..., help="Store to check."),
    repair: bool = typer.Option(False, "--repair", help="Set damaged shards aside (uncommit them) for `collect --resume` to re-collect."),
) -> None:
    """Check every committed shard file is present and matches its checksum; exit 1 otherwise."""
    from sae_core.store import verify_store

    problems = verify_store(store, set_aside=repair)
    for p in problems:
        typer.echo(p, err=True)
    if problems:
        fix = "" if repair else (f"; run `actcache verify --repair {store}` to set the damaged shards aside, then the "
                                 "same `actcache collect` command with --resume to re-collect them")
        typer.echo(f"{store}: {len(problems)} problem(s){fix}", err=True)
        raise typer.Exit(1)
    from sae_core.store import ActivationStore

    s = ActivationStore(store)
    typer.echo(f"{store}: OK ({len(s.committed_shards)} of {s.layout.num_shards} shards committed, "
               f"{s.num_tokens:,} of {s.layout.num_tokens:,} tokens)")


def main(argv: list[str] | None = None) -> None:
    run_app(app, argv)
