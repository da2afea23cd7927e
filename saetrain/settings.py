"""What `saetrain fit` checks and resolves before it trains: the settings, the layers, the run folder."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
from fnmatch import fnmatch
from pathlib import Path

from sae_core import UserError
from sae_core.checkpoint import Unreadable, reading
from sae_core.errors import folder_contents
from sae_core.store import ActivationStore

from .config import TrainConfig
from .order import split_holdout

# Settings that define the training trajectory: --resume refuses if any differs.
# (--micro-acc-steps may change: it splits a batch without changing the step.)
RESUME_KEYS = (
    "store_fingerprint", "layers", "k", "num_latents_per_layer", "normalize_decoder", "multi_topk", "batch_size",
    "grad_acc_steps", "lr", "lr_warmup_steps", "lr_schedule", "lr_schedule_steps", "auxk_alpha",
    "dead_feature_threshold", "grad_clip", "seed", "exclude_first_tokens", "exclude_token_ids", "holdout",
    "shuffle_window", "data_parallel_world", "init_from",
)


# What the lr does after its warmup (saetrain.schedule.lr_factor).
LR_SCHEDULES = ("constant", "linear", "cosine")


def default_lr(num_latents: int) -> float:
    """2e-4 at 2**14 latents, scaled by 1/sqrt(num_latents)."""
    return 2e-4 / math.sqrt(num_latents / 2**14)


def select_layers(store: ActivationStore, spec: str | None) -> list[str]:
    """The store arrays `--layers` names, in the store's order: layer numbers and ranges (as
    actcache's), array names (`layer_3`, `model.layers.3.mlp`) and fnmatch patterns of them."""
    from sae_core import parse_layers
    from sae_core.layers import spec_items

    if spec is None:
        return store.layers
    items = [item for item in spec_items(spec) if item]
    if not items:  # "" or ",": as parse_layers refuses it
        raise UserError(f"--layers: malformed layer spec {spec!r} (it names no layer); use e.g. '0-31', '0,4,8', "
                        f"'0-29:2', 'all' or names of the store's arrays ({', '.join(store.layers)})")
    wanted: set[str] = set()
    numbers = []
    for item in items:
        if item.lower() in ("all", "*"):
            wanted.update(store.layers)
        elif item.lower().startswith("all:") and store.layer_ids is not None:  # every step-th layer the store has
            wanted.update(f"layer_{i}" for i in parse_layers(item, max(store.layer_ids) + 1) if i in store.layer_ids)
        elif item in store.layers:
            wanted.add(item)
        elif any(c in item for c in "*?["):
            matched = [n for n in store.layers if fnmatch(n, item)]
            if not matched:
                raise UserError(f"--layers {item!r} matches none of the layers of {store.path}: {', '.join(store.layers)}")
            wanted.update(matched)
        elif re.fullmatch(r"[\d:-]+|all:.*", item.lower()):
            numbers.append(item)
        else:
            raise UserError(f"--layers {item!r}: {store.path} has no such array; it has {', '.join(store.layers)}")
    if numbers:
        if store.layer_ids is None:
            store.resolve(numbers[0])  # names the store's arrays
        ids = parse_layers(",".join(numbers), 1 << 20)
        missing = [i for i in ids if i not in store.layer_ids]
        if missing:
            raise UserError(f"store {store.path} has no layer {missing[0]}; it has layers {store.layer_ids}")
        wanted.update(f"layer_{i}" for i in ids)
    return [n for n in store.layers if n in wanted]


def validate(cfg: TrainConfig) -> None:
    for name in ("batch_size", "grad_acc_steps", "micro_acc_steps", "epochs", "k", "expansion_factor", "read_threads",
                 "shuffle_window"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("lr", "auxk_alpha", "grad_clip", "holdout"):
        value = getattr(cfg, name)
        if value is not None and not math.isfinite(value):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name in ("num_latents", "lr_warmup_steps", "lr_schedule_steps", "auxk_alpha", "dead_feature_threshold",
                 "exclude_first_tokens", "save_every", "grad_clip"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise UserError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {cfg.lr_schedule!r}")
    if cfg.lr_schedule_steps and cfg.lr_schedule == "constant":
        raise UserError(f"--lr-schedule-steps {cfg.lr_schedule_steps} sets where a decay ends, and --lr-schedule is "
                        "constant; pass --lr-schedule linear or cosine, or drop --lr-schedule-steps")
    if cfg.lr is not None and not cfg.lr > 0:
        raise UserError(f"--lr must be positive, got {cfg.lr} (leave it out for the default scaling law)")
    bad_ids = [i for i in cfg.exclude_token_ids if not 0 <= i < 2**31]
    if bad_ids:
        raise UserError(f"--exclude-token-ids takes token ids (0 to 2**31 - 1), got {bad_ids[0]}")
    if cfg.max_tokens is not None and cfg.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {cfg.max_tokens}")
    if not -(2**31) <= cfg.seed < 2**31:
        raise UserError(f"--seed must be between -2**31 and 2**31 - 1, got {cfg.seed}")
    if not 0 <= cfg.holdout < 1:
        raise UserError(f"--holdout must be a fraction in [0, 1), got {cfg.holdout}")
    if cfg.resume and cfg.overwrite:
        raise UserError("pass either --resume or --overwrite, not both")
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise UserError("--wandb needs the wandb package: pip install wandb (or drop --wandb)")
    check_out(cfg)


# What `saetrain fit` writes into config.json (besides the settings): how a run folder is recognised.
RUN_KEYS = ("store_fingerprint", "layers", "num_latents_per_layer", "holdout_chunks")


# What evaluation, --resume and --init-from read from a run's config.json.
CONFIG_KEYS = (*RUN_KEYS, "store", "d_in", "exclude_first_tokens", "exclude_token_ids")


def read_run_config(run: Path) -> dict:
    """A run's config.json; a missing one says the folder is not a run, a damaged one is a one-line error."""
    path = run / "config.json"
    if not path.is_file():
        raise UserError(f"{run} is not a saetrain run (no config.json); pass a `saetrain fit --out` folder")
    with reading(path, "restore it from a copy, or train that run again (--overwrite)"):
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise Unreadable("not a JSON object")
        if missing := [k for k in CONFIG_KEYS if k not in config]:
            raise Unreadable(f"it lacks {', '.join(missing)}")
        if not all(isinstance(config[k], t) for k, t in
                   (("layers", list), ("holdout_chunks", list), ("d_in", dict), ("num_latents_per_layer", dict))):
            raise Unreadable("layers, holdout_chunks, d_in or num_latents_per_layer has the wrong type")
    return config


# What `saetrain fit` writes in a run folder besides the SAE folders (and its dot-named temporaries).
RUN_ENTRIES = {"config.json", "metrics.jsonl", "eval.json", "plan.json", "checkpoints", "wandb"}


def is_run(folder: Path) -> bool:
    """Whether `folder` is a run written by `saetrain fit`: its config.json holds saetrain's keys, or,
    damaged, sits among nothing but what a run holds (so that --overwrite can replace it)."""
    config = folder / "config.json"
    try:
        data = json.loads(config.read_text())
        if isinstance(data, dict):  # readable: saetrain's or another tool's (a model's config.json)
            return all(k in data for k in RUN_KEYS)
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        pass
    return config.is_file() and all(
        p.name in RUN_ENTRIES or p.name.startswith(".") or (p / "cfg.json").is_file() for p in folder.iterdir()
    )


def check_out(cfg: TrainConfig) -> None:
    """Refuse a run folder that would destroy or mix with other data, before anything is deleted or written.

    `--overwrite` (and `--resume`) take only an empty folder or a saetrain run; the store is never
    the run folder, inside it or around it.
    """
    out, store = Path(cfg.out), Path(cfg.store)
    o, s = out.resolve(), store.resolve()
    if o == s or o in s.parents or s in o.parents:
        how = "is" if o == s else "contains" if o in s.parents else "is inside"
        raise UserError(f"--out {out} {how} the store {store}; choose an --out outside the store (e.g. runs/NAME)")
    if out.is_symlink() and (cfg.overwrite or not out.exists()):
        raise UserError(f"--out {out} is a symbolic link (to {os.readlink(out)}); pass the folder itself")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the run")
    if (above := next((p for p in out.absolute().parents if p.exists()), None)) and not above.is_dir():
        raise UserError(f"--out {out} is under {above}, a file; pass a folder path for the run")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if cfg.resume and (out / "config.json").is_file():
        read_run_config(out)  # a damaged run is named as such, not as "not a run"
    # A crash between creating the folder and renaming config.json in leaves only its temporary file.
    if not is_run(out) and not all(n.startswith(".config.json.tmp") for n in entries):
        raise UserError(f"--out {out} is not a saetrain run (it holds {folder_contents(entries)}); choose another --out")
    if not (cfg.resume or cfg.overwrite):
        raise UserError(f"{out} already exists; pass --resume to continue the run or --overwrite to replace it")
    here = Path.cwd().resolve()
    if cfg.overwrite and (o == here or o in here.parents):
        raise UserError(f"--out {out} holds the current folder, which --overwrite would replace under this process; "
                        "run from outside it")
    if cfg.overwrite and cfg.init_from is not None and o in Path(cfg.init_from).resolve().parents:
        raise UserError(f"--init-from {cfg.init_from} is inside --out {out}, which --overwrite deletes; "
                        "move it or choose another --out")


def resolve_config(cfg: TrainConfig, store: ActivationStore, layers: list[str], world: int) -> dict:
    dp_world = 1 if cfg.distribute_layers else world
    if cfg.batch_size % (cfg.grad_acc_steps * dp_world):
        raise UserError(
            f"--batch-size {cfg.batch_size} must be divisible by --grad-acc-steps x data-parallel ranks "
            f"({cfg.grad_acc_steps} x {dp_world})"
        )
    loader_batch = cfg.batch_size // (cfg.grad_acc_steps * dp_world)
    if cfg.micro_acc_steps > loader_batch:
        raise UserError(
            f"--micro-acc-steps {cfg.micro_acc_steps} splits batches of {loader_batch} token(s) (--batch-size "
            f"{cfg.batch_size} / (--grad-acc-steps {cfg.grad_acc_steps} x data-parallel ranks {dp_world})) into "
            f"micro-batches of less than 1 token; use at most {loader_batch} or raise --batch-size"
        )
    d_in = {n: store.d(n) for n in layers}
    num_latents = {n: cfg.num_latents or d * cfg.expansion_factor for n, d in d_in.items()}
    for n, m in num_latents.items():
        if cfg.k > m:
            raise UserError(f"--k {cfg.k} is larger than the number of latents of {n} ({m}); lower --k or raise --expansion-factor")
    train, hold = split_holdout(store.committed_chunks(), cfg.holdout, cfg.seed)
    if not train:
        n = len(hold)
        held = (f"1 committed chunk and --holdout {cfg.holdout} holds it out (any fraction above 0 holds out at "
                "least one whole chunk)" if n == 1 else
                f"{n} committed chunks and --holdout {cfg.holdout} holds out all of them (it rounds to whole chunks)")
        lower = "" if n == 1 else f"a --holdout below {math.floor((n - 0.5) / n * 1e4) / 1e4:g}, "
        raise UserError(
            f"store {store.path} has {held}, leaving none to train on; pass {lower}--holdout 0 (no held-out "
            "evaluation), or collect more tokens or smaller chunks (actcache collect --max-tokens / --chunk-tokens)"
        )
    lrs = {n: cfg.lr or default_lr(m) for n, m in num_latents.items()}
    return {
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()},
        "store": str(Path(cfg.store).resolve()),  # `saetrain evaluate` finds it from any working directory
        "exclude_token_ids": sorted(set(cfg.exclude_token_ids)),  # a set: [9, 5, 9] and [5, 9] are one setting
        "layers": layers,
        "store_fingerprint": store.meta["data"]["fingerprint"],
        "store_model": store.meta.get("model", {}).get("id"),
        "store_tokens": store.num_tokens,
        "store_chunk_tokens": store.layout.chunk_tokens,  # what the held-out chunk numbers count in
        "d_in": d_in,
        "num_latents_per_layer": num_latents,
        "lr": cfg.lr,
        "lr_per_layer": lrs,
        "holdout_chunks": hold,
        "train_chunks": len(train),
        "world": world,
        "data_parallel_world": dp_world,
        "loader_batch": loader_batch,
    }
