"""A fake Hugging Face Hub for tests: a local HTTP server that serves model and dataset repos from folders.

It implements just enough of the Hub's HTTP API for the real `huggingface_hub` client
(`snapshot_download`, `hf_hub_download`, `HfApi().list_repo_files`/`list_repo_tree`/`model_info`/
`dataset_info`/`get_paths_info`, `HfFileSystem`) and the real `datasets` library (`load_dataset` of
a Hub id or of `hf://datasets/...` files) to work against it, and records every request so tests
can assert what was downloaded. `{type}s` is `models` or `datasets`; `{prefix}` is empty for a
model and `datasets/` for a dataset:

    GET  /api/{type}s/{repo_id}[/revision/{rev}]          repo info: `sha`, `siblings` (`?blobs=true`: sizes)
    GET  /api/{type}s/{repo_id}/tree/{rev}[/{path}]       tree listing (`?recursive=true`), one page
    POST /api/{type}s/{repo_id}/paths-info/{rev}          entries of the given `paths` (form data) that exist
    HEAD /{prefix}{repo_id}/resolve/{rev}/{path}          file metadata: X-Repo-Commit, ETag, size
    GET  /{prefix}{repo_id}/resolve/{rev}/{path}          file content (a `Range: bytes=a-b` gives a 206)

Errors carry the `X-Error-Code` header the real Hub sends (`RepoNotFound`, `RevisionNotFound`,
`EntryNotFound`), which the client turns into its typed exceptions. Files named `*.safetensors`
(and, in dataset repos, `*.parquet`/`*.arrow`) are described as LFS files (sha256 ETag, `lfs` entry
in the tree), the rest as plain git blobs.

Everything else is a 404, as on the real Hub for a page it lacks. `datasets` asks for files a repo
may lack (`.huggingface.yaml`, `dataset_infos.json`, a loading script `{name}.py`) and gets an
`EntryNotFound` 404 for each; its calls to the dataset viewer (`datasets-server.` + the endpoint's
host) and its download counter (an S3 bucket) go to other hosts, which `serve_hub` turns off.

Usage (see `serve_hub`): `with serve_hub(monkeypatch, tmp_path) as hub: hub.add_repo(...)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

LFS_SUFFIXES = (".safetensors", ".bin", ".pt")
DATASET_LFS_SUFFIXES = LFS_SUFFIXES + (".parquet", ".arrow")
"""A new dataset repo's `.gitattributes` on the Hub also puts these in LFS (models': the above)."""
REPO_TYPES = ("model", "dataset")
_NOT_FOUND = "Sorry, we can't find the page you are looking for."


class Request(NamedTuple):
    method: str
    path: str
    """URL path with each segment unquoted, e.g. `/org/repo/resolve/main/layer_0/cfg.json`."""
    query: dict[str, list[str]]


@dataclass
class _Revision:
    name: str
    sha: str
    folder: Path


@dataclass
class _Repo:
    repo_id: str
    repo_type: str = "model"
    revisions: dict[str, _Revision] = field(default_factory=dict)

    def resolve(self, rev: str) -> _Revision | None:
        if rev in self.revisions:
            return self.revisions[rev]
        for r in self.revisions.values():
            if r.sha == rev:
                return r
        return None


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def _files(folder: Path) -> list[str]:
    """Every file under `folder` as a repo path (`a/b.txt`), sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(path: str, repo_type: str = "model") -> bool:
    return path.endswith(DATASET_LFS_SUFFIXES if repo_type == "dataset" else LFS_SUFFIXES)


def _entry(rev: _Revision, repo_type: str, rel: str) -> dict:
    """The tree / paths-info entry of repo path `rel` (an existing file or folder)."""
    p = rev.folder / rel
    if p.is_dir():
        oid = hashlib.sha1(f"tree {rev.sha} {rel}".encode()).hexdigest()
        return {"type": "directory", "oid": oid, "size": 0, "path": rel}
    data = p.read_bytes()
    entry: dict = {"type": "file", "oid": _git_blob_sha1(data), "size": len(data), "path": rel}
    if _is_lfs(rel, repo_type):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """`bytes=a-b`, `bytes=a-` or `bytes=-n` as (first, last) byte, inclusive; None: unsatisfiable.

    Raises ValueError for a header this server does not understand (several ranges, other units,
    garbage), which it then ignores, as HTTP allows: the whole file comes with a 200.
    """
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        raise ValueError(f"unsupported Range header {header!r}")
    first, _, last = spec.strip().partition("-")
    if not first:  # the last n bytes
        n = int(last)
        return (max(size - n, 0), size - 1) if n > 0 and size > 0 else None
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start < 0 or (last and int(last) < start):
        raise ValueError(f"invalid Range header {header!r}")
    return (start, end) if start < size else None


class FakeHub:
    """The repos served and the log of requests; thread-safe."""

    def __init__(self) -> None:
        self._repos: dict[tuple[str, str], _Repo] = {}
        """By (repo type, repo id): a model and a dataset may share an id."""
        self._lock = threading.Lock()
        self._salt = uuid.uuid4().hex
        self.requests: list[Request] = []
        self.errors: list[str] = []
        """Tracebacks of exceptions raised while handling a request (a bug in this server)."""
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------ repos
    def add_repo(self, repo_id: str, folder: str | Path, revision: str = "main", repo_type: str = "model") -> str:
        """Serve `folder` as revision `revision` of repo `repo_id` of type `repo_type` ("model" or
        "dataset"); returns its commit sha."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder")
        if repo_type not in REPO_TYPES:
            raise ValueError(f"repo_type must be one of {REPO_TYPES}, not {repo_type!r}")
        key = repo_id if repo_type == "model" else f"{repo_type}/{repo_id}"
        sha = hashlib.sha1(f"{self._salt}/{key}@{revision}".encode()).hexdigest()
        with self._lock:
            repo = self._repos.setdefault((repo_type, repo_id), _Repo(repo_id, repo_type))
            repo.revisions[revision] = _Revision(revision, sha, folder)
        return sha

    # -------------------------------------------------------------------------------- log
    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def resolved(self, repo_id: str | None = None, method: str | None = "GET", repo_type: str = "model") -> list[str]:
        """Paths in repos of type `repo_type` requested through `/resolve/` with `method` (None:
        any), in order."""
        out = []
        with self._lock:
            requests = list(self.requests)
        for r in requests:
            if method is not None and r.method != method:
                continue
            parts = r.path.lstrip("/").split("/")
            if "resolve" not in parts:
                continue
            i = parts.index("resolve")
            is_dataset = parts[0] == "datasets"
            if is_dataset != (repo_type == "dataset"):
                continue
            if repo_id is not None and "/".join(parts[int(is_dataset) : i]) != repo_id:
                continue
            out.append("/".join(parts[i + 2 :]))
        return out

    def downloaded(self, repo_id: str | None = None, repo_type: str = "model") -> list[str]:
        """Repo paths whose content was downloaded (GET /resolve/), sorted.

        The client skips the GET of a file whose content (ETag) is already in its cache, e.g. a
        second folder's cfg.json identical to the first's; `fetched` includes those.
        """
        return sorted(self.resolved(repo_id, "GET", repo_type))

    def fetched(self, repo_id: str | None = None, repo_type: str = "model") -> list[str]:
        """Repo paths the client asked for at all (HEAD or GET /resolve/), sorted, once each."""
        return sorted(set(self.resolved(repo_id, None, repo_type)))

    # ----------------------------------------------------------------------------- server
    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (idempotent); afterwards connections to `url` are refused."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join(timeout=5)
        self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None

    # --------------------------------------------------------------------------- handling
    def _log(self, method: str, path: str, query: dict[str, list[str]]) -> None:
        with self._lock:
            self.requests.append(Request(method, path, query))

    def _find_repo(self, repo_type: str, segments: list[str]) -> tuple[_Repo, list[str]]:
        """Split URL segments into a served repo of `repo_type` and the rest; RepoNotFound if none matches."""
        with self._lock:
            for n in (2, 1):
                repo = self._repos.get((repo_type, "/".join(segments[:n])))
                if repo is not None and len(segments) >= n:
                    return repo, segments[n:]
        raise _HubError(404, "RepoNotFound", "Repository not found")

    @staticmethod
    def _revision(repo: _Repo, rev: str) -> _Revision:
        r = repo.resolve(rev)
        if r is None:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return r

    def handle(
        self, method: str, raw_path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        headers = {k.lower(): v for k, v in (headers or {}).items()}
        split = urlsplit(raw_path)
        raw_segments = [s for s in split.path.split("/") if s]
        segments = [unquote(s) for s in raw_segments]
        query = parse_qs(split.query)
        self._log(method, "/" + "/".join(segments), query)

        if segments[:1] == ["api"] and len(segments) >= 2 and segments[1] in ("models", "datasets"):
            repo_type = segments[1][: -len("s")]
            repo, rest = self._find_repo(repo_type, segments[2:])
            if rest[:1] == ["paths-info"] and len(rest) == 2:
                if method != "POST":
                    raise _HubError(405, None, "Method not allowed")
                form = parse_qs(body.decode())
                return self._json(self._paths_info(repo, self._revision(repo, rest[1]), form.get("paths", [])))
            if method != "GET":
                raise _HubError(405, None, "Method not allowed")
            blobs = query.get("blobs", ["false"])[-1].lower() in ("true", "1")
            if not rest:
                return self._json(self._info(repo, self._revision(repo, "main"), blobs))
            if rest[0] == "revision" and len(rest) == 2:
                return self._json(self._info(repo, self._revision(repo, rest[1]), blobs))
            if rest[0] == "tree" and len(rest) >= 2:
                rev = self._revision(repo, rest[1])
                recursive = query.get("recursive", ["false"])[-1].lower() in ("true", "1")
                return self._json(self._tree(repo, rev, "/".join(rest[2:]), recursive))
            raise _HubError(404, None, _NOT_FOUND)

        if "resolve" in segments:
            if method not in ("GET", "HEAD"):
                raise _HubError(405, None, "Method not allowed")
            i = segments.index("resolve")
            repo_type, start = ("dataset", 1) if segments[0] == "datasets" else ("model", 0)
            repo, rest = self._find_repo(repo_type, segments[start:i])
            if rest or len(segments) < i + 3:
                raise _HubError(404, None, _NOT_FOUND)
            rev = self._revision(repo, segments[i + 1])
            return self._resolve(
                repo, rev, "/".join(segments[i + 2 :]), with_body=method == "GET", range_header=headers.get("range")
            )

        raise _HubError(404, None, _NOT_FOUND)

    @staticmethod
    def _json(obj: object) -> tuple[int, dict[str, str], bytes]:
        return 200, {"Content-Type": "application/json; charset=utf-8"}, json.dumps(obj).encode()

    @staticmethod
    def _info(repo: _Repo, rev: _Revision, blobs: bool = False) -> dict:
        key = repo.repo_id if repo.repo_type == "model" else f"{repo.repo_type}/{repo.repo_id}"
        info: dict = {"_id": hashlib.md5(key.encode()).hexdigest()[:24], "id": repo.repo_id}
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id  # a dataset's info has no such field
        siblings = []
        for f in _files(rev.folder):
            sibling: dict = {"rfilename": f}
            if blobs:  # `files_metadata=True`: what the tree says of the file
                entry = _entry(rev, repo.repo_type, f)
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if "lfs" in entry:
                    sibling["lfs"] = {"sha256": entry["lfs"]["oid"], "size": entry["size"], "pointerSize": 134}
            siblings.append(sibling)
        info.update({
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": rev.sha,
            "private": False,
            "disabled": False,
            "gated": False,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "siblings": siblings,
        })
        return info

    @staticmethod
    def _tree(repo: _Repo, rev: _Revision, path: str, recursive: bool) -> list[dict]:
        base = rev.folder / path if path else rev.folder
        if ".." in path.split("/") or not base.is_dir():
            raise _HubError(404, "EntryNotFound", f"{path} does not exist on {rev.name}", {"X-Repo-Commit": rev.sha})
        children = base.rglob("*") if recursive else base.iterdir()
        return [_entry(rev, repo.repo_type, p.relative_to(rev.folder).as_posix()) for p in sorted(children)]

    @staticmethod
    def _paths_info(repo: _Repo, rev: _Revision, paths: list[str]) -> list[dict]:
        """The entries of `paths` that exist, in the order asked, each once; the rest are left out."""
        out, seen = [], set()
        for path in paths:
            path = path.strip("/")
            if not path or path in seen or ".." in path.split("/") or not (rev.folder / path).exists():
                continue
            seen.add(path)
            out.append(_entry(rev, repo.repo_type, path))
        return out

    @staticmethod
    def _resolve(
        repo: _Repo, rev: _Revision, path: str, *, with_body: bool, range_header: str | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        file = rev.folder / path
        if not path or ".." in path.split("/") or not file.is_file():
            raise _HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": rev.sha})
        data = file.read_bytes()
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(len(data)),
            "X-Repo-Commit": rev.sha,
            "Accept-Ranges": "bytes",
        }
        if _is_lfs(path, repo.repo_type):
            sha256 = hashlib.sha256(data).hexdigest()
            headers.update({"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(data))})
        else:
            headers["ETag"] = f'"{_git_blob_sha1(data)}"'
        whole = 200, headers, data if with_body else b""
        if range_header is None:
            return whole
        try:
            span = _parse_range(range_header, len(data))
        except ValueError:
            return whole
        if span is None:
            # What the Hub (its CDN) answers to a read past the end; the client takes it as EOF.
            raise _HubError(416, None, "Requested Range Not Satisfiable", {"Content-Range": f"bytes */{len(data)}"})
        first, last = span
        part = data[first : last + 1]
        headers.update({"Content-Length": str(len(part)), "Content-Range": f"bytes {first}-{last}/{len(data)}"})
        return 206, headers, part if with_body else b""


class _Handler(BaseHTTPRequestHandler):
    fake_hub: FakeHub  # set on the subclass made by FakeHub.start
    server_version = "FakeHub/0.1"

    def _serve(self, method: str) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
            request_body = self.rfile.read(length) if length else b""
            status, headers, body = self.fake_hub.handle(method, self.path, request_body, dict(self.headers.items()))
        except _HubError as e:
            status = e.status
            body = json.dumps({"error": e.message}).encode()
            headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), **e.headers}
            headers["X-Error-Message"] = e.message
            if e.code is not None:
                headers["X-Error-Code"] = e.code
        except Exception:
            # A bug in this server: record it for the test to fail on, and answer 400, which the
            # client does not retry (a 500 would be retried with back-off, slowly).
            self.fake_hub.errors.append(traceback.format_exc())
            status, body = 400, b'{"error": "fake hub crashed"}'
            headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if method != "HEAD" and body:
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._serve("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass


def set_offline(monkeypatch: pytest.MonkeyPatch, offline: bool = True) -> None:
    """Turn huggingface_hub's offline mode on (or off) for the rest of the test."""
    from huggingface_hub import constants

    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # Read from the environment once, at import; `constants.is_offline_mode()` returns this.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


def _point_datasets_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, home: Path) -> None:
    """Point `datasets` at `endpoint`, with its caches under `home` (`home/datasets`, `home/modules`).

    Like huggingface_hub, `datasets` reads the environment once, at import, into `datasets.config`,
    and reads `config.X` at call time. Two of its requests would leave the machine, so they are
    turned off: the download counter (a HEAD to an S3 bucket on every Hub load) and the dataset
    viewer's `/info` (a GET to `datasets-server.` + the endpoint's host, which does not resolve
    here; it answers the parquet export's dataset infos, which a fake repo never has).
    """
    import datasets.config as config

    cache = home / "datasets"
    modules = home / "modules"
    downloads = cache / config.DOWNLOADED_DATASETS_DIR
    for name in ("HF_DATASETS_OFFLINE", "HF_DATASETS_DOWNLOADED_DATASETS_PATH", "HF_DATASETS_EXTRACTED_DATASETS_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_MODULES_CACHE", str(modules))
    monkeypatch.setenv("HF_UPDATE_DOWNLOAD_COUNTS", "0")
    for name, value in {
        "HF_ENDPOINT": endpoint,
        "HUB_DATASETS_URL": endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HF_CACHE_HOME": str(home),
        "HF_DATASETS_CACHE": cache,
        "HF_MODULES_CACHE": modules,
        "DEFAULT_DOWNLOADED_DATASETS_PATH": str(downloads),
        "DOWNLOADED_DATASETS_PATH": downloads,
        "DEFAULT_EXTRACTED_DATASETS_PATH": str(downloads / config.EXTRACTED_DATASETS_DIR),
        "EXTRACTED_DATASETS_PATH": downloads / config.EXTRACTED_DATASETS_DIR,
        "HF_HUB_OFFLINE": False,
        "HF_DATASETS_OFFLINE": False,
        "HF_UPDATE_DOWNLOAD_COUNTS": False,
        "USE_PARQUET_EXPORT": False,
    }.items():
        monkeypatch.setattr(config, name, value)


@contextlib.contextmanager
def serve_hub(monkeypatch: pytest.MonkeyPatch, home: str | Path) -> Iterator[FakeHub]:
    """Start a `FakeHub` and point huggingface_hub and `datasets` at it, with fresh caches under `home`.

    huggingface_hub reads its settings from the environment once, at import, into
    `huggingface_hub.constants`; its functions then read `constants.X` at call time. So the
    environment is set (for anything started later) and those constants are patched too;
    likewise `datasets.config` (see `_point_datasets_at`).
    The server is stopped on exit; a request the server failed on makes the exit raise.
    """
    from huggingface_hub import constants

    home = Path(home)
    cache = home / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    hub = FakeHub().start()
    try:
        endpoint = hub.url
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setenv("HF_HOME", str(home))
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")

        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HOME", str(home))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", os.path.join(home, "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", os.path.join(home, "stored_tokens"))
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        _point_datasets_at(monkeypatch, endpoint, home)
        yield hub
    finally:
        hub.stop()
    if hub.errors:
        raise AssertionError("the fake Hub failed on a request:\n" + "\n".join(hub.errors))
