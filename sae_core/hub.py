"""Loading SAEs from the Hugging Face Hub, downloading only the folders asked for (a local folder is read in place)."""

from __future__ import annotations

import contextlib
import re
from glob import escape
from pathlib import Path

import torch
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from natsort import natsorted

from .checkpoint import (
    CFG_NAME,
    WEIGHTS_NAME,
    as_layer,
    layer_folder,
    layer_folder_names,
    layer_list,
    load_many_local,
    load_sae,
    sae_folders,
    select_folders,
)
from .config import as_path
from .errors import UserError, first_line
from .online import not_cached, offline_unless_reachable
from .sae import Sae


def local_folder(name: str | Path) -> Path | None:
    """The local folder `name` names, or None for a Hub repo id.

    As transformers' `from_pretrained`: an existing folder is read locally (whatever its name); a
    name that can only be a path (it starts with `/`, `.` or `~`, or has more than one `/`) and
    does not exist is refused here rather than sent to the Hub as a repo id. Any other name is a
    repo id, even where a folder of its owner's name exists here (`hf download --local-dir
    EleutherAI/...` leaves one); if the Hub has no such repo, the error says it is no folder either.
    """
    text = str(name)
    path = as_path(text)
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{text} is a file, not a folder; pass a folder of SAE folders or a Hub repo id (owner/name)")
    if text.startswith(("/", ".", "~")) or text.count("/") > 1:
        raise UserError(f"folder {text} does not exist; pass an existing folder of SAE folders (e.g. runs/NAME) "
                        "or a Hub repo id (owner/name)")
    return None


def _download(repo_id: str, revision: str | None, allow_patterns: list[str]) -> Path:
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns))
    except HFValidationError as e:
        raise UserError(
            f"{repo_id!r} is neither a local folder nor a Hub repo id ({first_line(e)}); pass an existing "
            "folder or a repo id such as EleutherAI/sae-llama-3-8b-32x"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"Hub repo {repo_id!r} not found (or private: log in with `hf auth login` or set HF_TOKEN), "
            f"nor is {repo_id} a local folder"
        ) from None
    except RevisionNotFoundError:
        raise UserError(f"Hub repo {repo_id!r} has no revision {revision!r}; check the branch, tag or commit") from None
    except LocalEntryNotFoundError:
        # (the folder names as given: glob.escape wrapped their `[`, `*` and `?` in brackets)
        folders = " or ".join(sorted({re.sub(r"\[(.)\]", r"\1", p.split("/")[0]) for p in allow_patterns if "/" in p} - {"*"}))
        what = f"{folders} of {repo_id!r}" if folders else f"Hub repo {repo_id!r}"
        raise UserError(f"{not_cached(what)} (nor is {repo_id} a local folder)") from None


def _cached_repo_files(repo_id: str, revision: str | None) -> list[str] | None:
    """Every file of the repo, from the listing an earlier download cached (huggingface_hub >= 1.x)."""
    try:
        from huggingface_hub import get_cached_repo_tree
    except ImportError:
        return None
    try:
        return [f.path for f in get_cached_repo_tree(repo_id, revision=revision)]
    except Exception:
        return None


def list_hub_saes(repo_id: str, revision: str | None = None, *, after_download: bool = False) -> list[str]:
    """Top-level folders of a Hub repo that hold an SAE (`<folder>/cfg.json`), naturally sorted.

    `after_download=True` (right after a `snapshot_download` of this revision): first read the
    repo's file listing that download cached, which is current, instead of asking the Hub again.
    """
    files = _cached_repo_files(repo_id, revision) if after_download else None
    if files is None:
        try:
            files = HfApi().list_repo_files(repo_id, revision=revision)
        except Exception:
            # Offline or unreachable (the HTTP library's connection errors are not OSErrors):
            # the file listing cached by an earlier download names every folder; without one,
            # fall back on the folders the local cache holds.
            files = _cached_repo_files(repo_id, revision)
            if files is None:
                try:
                    root = Path(
                        snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=[])
                    )
                except Exception:
                    return []
                return sae_folders(root)
    return natsorted({f.split("/")[0] for f in files if f.count("/") == 1 and f.endswith("/" + CFG_NAME)})


def _folder_patterns(names: list[str], *, glob: bool = False) -> list[str]:
    """`allow_patterns` for the SAE files of these folders: names taken literally (huggingface_hub
    matches with fnmatch, where `[3]` is a character class), or with `glob=True` as patterns."""
    names = names if glob else [escape(n) for n in names]
    return [f"{n}/{CFG_NAME}" for n in names] + [f"{n}/{WEIGHTS_NAME}" for n in names]


def load_from_hub(
    repo_id: str,
    layer: int | str | None = None,
    *,
    hookpoint: str | None = None,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    decoder: bool = True,
) -> Sae:
    if layer is not None:
        layer = as_layer(layer)
        if isinstance(layer, str):  # a folder name, as sparsify's load_from_hub(repo, "layers.10") takes it
            if hookpoint is not None:
                raise UserError("pass either layer= or hookpoint=, not both")
            layer, hookpoint = None, layer
    if layer is not None and hookpoint is not None:
        raise UserError("pass either layer= or hookpoint=, not both")
    local = local_folder(repo_id)
    # Where the Hub is asked and cannot be reached, read only its local cache instead of retrying for a minute.
    with contextlib.nullcontext() if local is not None else offline_unless_reachable():
        return _load_one(repo_id, local, layer, hookpoint, revision, device=device, dtype=dtype, decoder=decoder)


def _load_one(repo_id, local, layer, hookpoint, revision, **load) -> Sae:
    where = f"folder {local}" if local is not None else f"Hub repo {repo_id!r}"

    def listing(root: Path) -> list[str]:
        return sae_folders(root) if local is not None else list_hub_saes(repo_id, revision, after_download=True)

    if layer is None and hookpoint is None:
        root = local if local is not None else _download(repo_id, revision, [CFG_NAME, WEIGHTS_NAME])
        if (root / CFG_NAME).is_file():
            return load_sae(root, **load)
        raise UserError(
            f"{where} holds one SAE per layer; pass layer=N or hookpoint=NAME "
            f"(it has: {', '.join(listing(root)) or 'none found'})"
        )

    candidates = layer_folder_names(layer) if layer is not None else [hookpoint]
    root = local if local is not None else _download(repo_id, revision, _folder_patterns(candidates))
    present = [name for name in candidates if (root / name / CFG_NAME).is_file()]
    name = layer_folder(layer, present) if layer is not None else next(iter(present), None)
    if name is not None:
        return load_sae(root / name, **load)
    what = f"layer {layer}" if layer is not None else f"hookpoint {hookpoint!r}"
    raise UserError(f"{where} has no SAE for {what}; it has: {', '.join(listing(root)) or 'none found'}")


def load_many_from_hub(
    repo_id: str,
    layers: list[int | str] | None = None,
    pattern: str | None = None,
    *,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    decoder: bool = True,
) -> dict[str, Sae]:
    local = local_folder(repo_id)
    if local is not None:  # an existing folder is read where it is, as `Sae.load_many(..., local=True)`
        return load_many_local(local, layers, pattern, device=device, dtype=dtype, decoder=decoder)
    with offline_unless_reachable():
        root, names = _download_many(repo_id, layers, pattern, revision)
    return load_many_local(root, names, device=device, dtype=dtype, decoder=decoder)


def _download_many(repo_id: str, layers, pattern, revision) -> tuple[Path, list[str]]:
    """Fetch the SAE folders of a Hub repo that `layers` and `pattern` choose: (snapshot, their names)."""
    where = f"Hub repo {repo_id!r}"
    layers = layer_list(layers)
    if layers is None:
        # Every top-level SAE folder (filtered by pattern): fetch only cfg.json and weights of those. Without
        # a listing (offline, none cached), what the cache holds (fnmatch's `*` would also match nested ones).
        listed = list_hub_saes(repo_id, revision)
        if listed:
            allow = _folder_patterns(select_folders(listed, None, pattern, where=where))
        else:
            allow = _folder_patterns([pattern or "*"], glob=True)
    else:
        wanted = [as_layer(w) for w in layers]
        names = [n for want in wanted for n in (layer_folder_names(want) if isinstance(want, int) else [want])]
        allow = _folder_patterns(names)
    root = _download(repo_id, revision, allow)
    available = sae_folders(root, layers)
    if not available:
        listed = list_hub_saes(repo_id, revision, after_download=True)
        if listed:
            # Names the missing layer or the pattern that matched nothing.
            select_folders(listed, layers, pattern, where=where)
        raise UserError(f"{where} has no SAE folders matching the request; it has: {', '.join(listed) or 'none'}")
    try:
        return root, select_folders(available, layers, pattern, where=where)
    except UserError:
        # Name what the whole repo has, not just what was downloaded.
        select_folders(list_hub_saes(repo_id, revision, after_download=True) or available, layers, pattern, where=where)
        raise
