"""The fake Hub (`tests/hub_server.py`) serving dataset repos to the real `datasets` and `huggingface_hub`.

Nothing is mocked but the Hub's address: `datasets.load_dataset` of a Hub id and of pinned
`hf://datasets/...` files, `HfApi().dataset_info`/`list_repo_files`, and the refusal of a repo with a
loading script all run the libraries' own code against the fake Hub's HTTP API.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

try:
    from tests.hub_server import FakeHub, serve_hub
except ImportError:  # run from inside tests/
    from hub_server import FakeHub, serve_hub

TRAIN = [{"text": f"train row {i}", "n": i} for i in range(5)]
TEST = [{"text": f"test row {i}", "n": 100 + i} for i in range(3)]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_repo(folder: Path, files: dict[str, list[dict] | str]) -> Path:
    """A repo folder: `*.jsonl` and `*.parquet` files from rows, other files from text."""
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        elif name.endswith(".parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(content), path)
        else:
            write_jsonl(path, content)
    return folder


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    with serve_hub(monkeypatch, tmp_path / "hf_home") as fake:
        yield fake
    assert not fake.errors


def rows(ds) -> list[dict]:
    return [dict(r) for r in ds]


@pytest.mark.parametrize(
    "layout",
    [
        {"README.md": "# A dataset\n", "train.jsonl": TRAIN},
        # No card at all, and the splits from folder names as datasets recognises them.
        {"data/train/part-0.jsonl": TRAIN[:2], "data/train/part-1.jsonl": TRAIN[2:], "data/test/part-0.jsonl": TEST},
        # Parquet, as `push_to_hub` writes it: an LFS file on the Hub.
        {"README.md": "# A dataset\n", "data/train-00000-of-00001.parquet": TRAIN},
    ],
    ids=["flat", "split-folders", "parquet"],
)
def test_load_dataset_by_hub_id(hub: FakeHub, tmp_path: Path, layout):
    import datasets

    hub.add_repo("org/data", write_repo(tmp_path / "repo", layout), repo_type="dataset")
    # A model with the same id is another repo, with other files.
    hub.add_repo("org/data", write_repo(tmp_path / "model", {"config.json": "{}"}))

    assert rows(datasets.load_dataset("org/data", split="train")) == TRAIN
    if "data/test/part-0.jsonl" in layout:
        assert rows(datasets.load_dataset("org/data", split="test")) == TEST
    data_files = sorted(f for f in layout if f.endswith((".jsonl", ".parquet")))
    assert sorted(set(hub.downloaded("org/data", repo_type="dataset")) - {"README.md"}) == data_files
    assert hub.downloaded("org/data") == []  # nothing of the model
    # Its cache is under the test's home, not the user's.
    assert Path(datasets.config.HF_DATASETS_CACHE).is_relative_to(tmp_path)
    assert list((tmp_path / "hf_home" / "datasets").iterdir())


def test_dataset_info_and_list_repo_files(hub: FakeHub, tmp_path: Path):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    files = {"README.md": "# A dataset\n", "train.jsonl": TRAIN, "data/test.jsonl": TEST, "data/x.parquet": TEST}
    sha = hub.add_repo("org/data", write_repo(tmp_path / "repo", files), repo_type="dataset")
    old_sha = hub.add_repo("org/data", write_repo(tmp_path / "v1", {"train.jsonl": TRAIN[:1]}), "v1", "dataset")
    model_sha = hub.add_repo("org/data", write_repo(tmp_path / "model", {"config.json": "{}"}))
    assert len({sha, old_sha, model_sha}) == 3

    api = HfApi()
    info = api.dataset_info("org/data")
    assert info.id == "org/data" and info.sha == sha
    assert sorted(s.rfilename for s in info.siblings) == sorted(files)
    siblings = {s.rfilename: s for s in api.dataset_info("org/data", files_metadata=True).siblings}
    assert {f: s.size for f, s in siblings.items()} == {f: (tmp_path / "repo" / f).stat().st_size for f in files}
    parquet = (tmp_path / "repo" / "data/x.parquet").read_bytes()
    assert siblings["data/x.parquet"].lfs.sha256 == hashlib.sha256(parquet).hexdigest()
    assert siblings["train.jsonl"].lfs is None
    assert api.dataset_info("org/data", revision="v1").sha == old_sha
    assert api.dataset_info("org/data", revision=old_sha).siblings[0].rfilename == "train.jsonl"

    assert api.list_repo_files("org/data", repo_type="dataset") == sorted(files)
    assert api.list_repo_files("org/data", repo_type="dataset", revision="v1") == ["train.jsonl"]
    assert api.list_repo_files("org/data") == ["config.json"]  # the model
    assert api.model_info("org/data").sha == model_sha

    with pytest.raises(RepositoryNotFoundError):
        api.dataset_info("org/missing")
    with pytest.raises(RevisionNotFoundError):
        api.dataset_info("org/data", revision="v2")


def test_load_hf_paths_pinned_by_commit(hub: FakeHub, tmp_path: Path):
    import datasets
    from huggingface_hub import HfFileSystem

    files = {"README.md": "# A dataset\n", "train.jsonl": TRAIN, "more/train-2.jsonl": TEST}
    old_sha = hub.add_repo("org/data", write_repo(tmp_path / "old", {"train.jsonl": TRAIN[:1]}), "v1", "dataset")
    sha = hub.add_repo("org/data", write_repo(tmp_path / "repo", files), repo_type="dataset")

    urls = [f"hf://datasets/org/data@{sha}/{f}" for f in ("train.jsonl", "more/train-2.jsonl")]
    assert rows(datasets.load_dataset("json", data_files=urls, split="train")) == TRAIN + TEST
    old = f"hf://datasets/org/data@{old_sha}/train.jsonl"
    assert rows(datasets.load_dataset("json", data_files=[old], split="train")) == TRAIN[:1]
    assert {"train.jsonl", "more/train-2.jsonl"} <= set(hub.downloaded("org/data", repo_type="dataset"))

    # HfFileSystem as such: listing, globbing, metadata of one path (paths-info) and ranged reads.
    fs = HfFileSystem()
    root = f"datasets/org/data@{sha}"
    assert fs.glob(f"{root}/**/*.jsonl") == [f"{root}/more/train-2.jsonl", f"{root}/train.jsonl"]
    info = fs.info(f"{root}/more/train-2.jsonl", refresh=True)
    assert info["type"] == "file" and info["size"] == (tmp_path / "repo" / "more/train-2.jsonl").stat().st_size
    assert any(r.method == "POST" and r.path.endswith(f"/paths-info/{sha}") for r in hub.requests)
    assert not fs.exists(f"{root}/nothing.jsonl")
    content = (tmp_path / "repo" / "train.jsonl").read_bytes()
    with fs.open(f"{root}/train.jsonl", "rb", block_size=16) as f:
        f.seek(20)
        assert f.read(30) == content[20:50]
        assert f.read() == content[50:]


def test_a_repo_with_a_loading_script_is_refused_by_datasets(hub: FakeHub, tmp_path: Path):
    import datasets

    files = {"README.md": "# A scripted dataset\n", "data.py": "raise SystemExit('never run')\n", "train.jsonl": TRAIN}
    hub.add_repo("org/data", write_repo(tmp_path / "repo", files), repo_type="dataset")
    with pytest.raises(RuntimeError, match=r"^Dataset scripts are no longer supported, but found data\.py$"):
        datasets.load_dataset("org/data", split="train")
    assert "data.py" in hub.fetched("org/data", repo_type="dataset")


def test_a_missing_dataset_is_datasets_own_error(hub: FakeHub):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match="org/missing"):
        datasets.load_dataset("org/missing", split="train")
