"""The `saetrain` command: fit TopK SAEs from an activation store, and evaluate them."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from sae_core.cli import field_docs, make_app, run_app

from .config import TrainConfig

app = make_app("Train one TopK SAE per layer from an activation store written by `actcache collect`.")
_doc = field_docs(TrainConfig)
_D = TrainConfig.__dataclass_fields__


def _default(name: str):
    return _D[name].default


@app.command()
def fit(
    store: Path = typer.Option(..., help=_doc["store"]),
    out: Path = typer.Option(..., "--out", "-o", help=_doc["out"]),
    layers: str | None = typer.Option(None, help=_doc["layers"]),
    k: int = typer.Option(_default("k"), help=_doc["k"]),
    expansion_factor: int = typer.Option(_default("expansion_factor"), help=_doc["expansion_factor"]),
    num_latents: int = typer.Option(_default("num_latents"), help=_doc["num_latents"]),
    batch_size: int = typer.Option(_default("batch_size"), help=_doc["batch_size"]),
    grad_acc_steps: int = typer.Option(_default("grad_acc_steps"), help=_doc["grad_acc_steps"]),
    micro_acc_steps: int = typer.Option(_default("micro_acc_steps"), help=_doc["micro_acc_steps"]),
    lr: float | None = typer.Option(None, help=_doc["lr"]),
    lr_warmup_steps: int = typer.Option(_default("lr_warmup_steps"), help=_doc["lr_warmup_steps"]),
    lr_schedule: str = typer.Option(_default("lr_schedule"), metavar="constant|linear|cosine", help=_doc["lr_schedule"]),
    lr_schedule_steps: int = typer.Option(_default("lr_schedule_steps"), help=_doc["lr_schedule_steps"]),
    auxk_alpha: float = typer.Option(_default("auxk_alpha"), help=_doc["auxk_alpha"]),
    dead_feature_threshold: int = typer.Option(_default("dead_feature_threshold"), help=_doc["dead_feature_threshold"]),
    multi_topk: bool = typer.Option(False, "--multi-topk", help=_doc["multi_topk"]),
    max_tokens: int | None = typer.Option(None, help=_doc["max_tokens"]),
    epochs: int = typer.Option(_default("epochs"), help=_doc["epochs"]),
    seed: int = typer.Option(_default("seed"), help=_doc["seed"]),
    exclude_first_tokens: int = typer.Option(0, help=_doc["exclude_first_tokens"]),
    exclude_token_ids: list[str] | None = typer.Option(None, metavar="IDS", help=_doc["exclude_token_ids"] + " Several may follow the flag (or repeat it, or comma-separate)."),
    holdout: float = typer.Option(_default("holdout"), help=_doc["holdout"]),
    shuffle_window: int = typer.Option(_default("shuffle_window"), help=_doc["shuffle_window"]),
    save_every: int = typer.Option(_default("save_every"), help=_doc["save_every"]),
    resume: bool = typer.Option(False, "--resume", help=_doc["resume"]),
    init_from: Path | None = typer.Option(None, metavar="RUN", help=_doc["init_from"]),
    overwrite: bool = typer.Option(False, "--overwrite", help=_doc["overwrite"]),
    distribute_layers: bool = typer.Option(False, "--distribute-layers", help=_doc["distribute_layers"]),
    device: str = typer.Option("auto", help=_doc["device"]),
    grad_clip: float = typer.Option(_default("grad_clip"), help=_doc["grad_clip"]),
    read_threads: int = typer.Option(_default("read_threads"), help=_doc["read_threads"]),
    wandb: str | None = typer.Option(None, help=_doc["wandb"]),
    progress: bool = typer.Option(True, "--progress/--no-progress", help=_doc["progress"]),
) -> None:
    """Stream the store into one TopK SAE per layer; write runs/NAME/layer_L/{cfg.json,sae.safetensors}."""
    from sae_core import UserError
    from sae_core.errors import out_of_memory

    from .trainer import fit as run

    given = ",".join(exclude_token_ids or [])  # repeated flags add up
    try:
        ids = [int(x) for x in given.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--exclude-token-ids must be comma-separated integers, got {given!r}") from None
    cfg = TrainConfig(
        store=store, out=out, layers=layers, k=k, expansion_factor=expansion_factor, num_latents=num_latents,
        multi_topk=multi_topk, batch_size=batch_size, grad_acc_steps=grad_acc_steps, micro_acc_steps=micro_acc_steps,
        lr=lr, lr_warmup_steps=lr_warmup_steps, lr_schedule=lr_schedule, lr_schedule_steps=lr_schedule_steps,
        auxk_alpha=auxk_alpha, dead_feature_threshold=dead_feature_threshold,
        max_tokens=max_tokens, epochs=epochs, seed=seed, exclude_first_tokens=exclude_first_tokens,
        exclude_token_ids=ids, holdout=holdout, shuffle_window=shuffle_window, save_every=save_every, resume=resume,
        init_from=init_from,
        overwrite=overwrite, distribute_layers=distribute_layers, device=device, grad_clip=grad_clip,
        read_threads=read_threads, wandb=wandb, progress=progress,
    )
    with out_of_memory("raise --micro-acc-steps (it splits each batch; --resume continues a run with it), or start "
                       "again with a smaller --batch-size or fewer or smaller SAEs per process (--layers, "
                       "--expansion-factor, --distribute-layers)"):
        res = run(cfg)
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:  # rank 0 speaks for the run
        return
    if res.heldout_fvu:
        typer.echo("held-out FVU: " + "  ".join(f"{n} {v:.4f}" for n, v in res.heldout_fvu.items()))
    typer.echo(f"trained {len(res.layers)} SAE(s), {res.steps} steps, {res.tokens:,} tokens in {res.seconds:.1f}s -> {res.out}")
    if res.steps < lr_warmup_steps:
        typer.echo(f"note: the run ended at step {res.steps:,}, before its lr warmup did (--lr-warmup-steps "
                   f"{lr_warmup_steps:,}): the lr reached {res.steps / lr_warmup_steps:.0%} of its target; lower "
                   "--lr-warmup-steps for a run at the full rate (a run continuing this one with --init-from goes on "
                   "warming up)")
    if auxk_alpha > 0 and res.chain_tokens <= dead_feature_threshold:
        typer.echo(f"note: a latent counts as dead after {dead_feature_threshold:,} tokens without firing "
                   f"(--dead-feature-threshold), more than the {res.chain_tokens:,} trained on, so AuxK, which revives "
                   "dead latents, never acted; lower it for a run this short (e.g. to a tenth of its tokens)")


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="Run folder written by `saetrain fit`."),
    store: Path | None = typer.Option(None, help="Store to evaluate on (default: the run's store)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    layers: str | None = typer.Option(None, help="Layers to evaluate, as fit's --layers (among the run's); default all."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto: where the SAEs run."),
) -> None:
    """Held-out FVU of a run's SAEs on the chunks the run held out."""
    from sae_core import Sae, UserError
    from sae_core.models import resolve_device
    from sae_core.store import ActivationStore

    from .evaluate import heldout_fvu
    from .settings import read_run_config, select_layers

    cfg = read_run_config(run_dir)
    if not cfg["holdout_chunks"]:
        raise UserError(f"{run_dir} held out no chunks; train with --holdout FRACTION to evaluate")
    dev = resolve_device(device)
    if store is None and not Path(cfg["store"]).exists():
        raise UserError(f"the store {run_dir} was trained on, {cfg['store']}, does not exist (moved?); pass its "
                        "new path or a copy of it with --store PATH")
    st = ActivationStore(store or cfg["store"])
    if (
        st.meta["data"]["fingerprint"] != cfg["store_fingerprint"]
        or cfg.get("store_model", st.meta.get("model", {}).get("id")) != st.meta.get("model", {}).get("id")
        or cfg.get("store_chunk_tokens", st.layout.chunk_tokens) != st.layout.chunk_tokens
    ):
        raise UserError(
            f"{st.path} is not the store {run_dir} was trained on (other data, order or model), so its held-out "
            "chunks mean nothing there; pass that store or a copy of it"
        )
    chosen = cfg["layers"] if layers is None else select_layers(st, layers)
    if missing := [n for n in chosen if n not in cfg["layers"]]:
        raise UserError(f"{run_dir} has no SAE for {', '.join(missing)}; it has {', '.join(cfg['layers'])}: pick --layers among them")
    saes = Sae.load_many(run_dir, local=True, layers=chosen, device=dev)
    fvu = heldout_fvu(saes, st, cfg["holdout_chunks"], exclude_first_tokens=cfg["exclude_first_tokens"],
                      exclude_token_ids=cfg["exclude_token_ids"], device=dev)
    typer.echo(json.dumps(fvu, indent=2) if as_json else "\n".join(f"{n}: {v:.4f}" for n, v in fvu.items()))


def main(argv: list[str] | None = None) -> None:
    run_app(app, argv)
