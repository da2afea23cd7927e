"""Training checkpoints: SAEs, Adam state, dead-latent counters and the position in the data order.

`checkpoints/step_N/` is written in full (every rank its own layers), then `checkpoints/LATEST`
is replaced atomically by rank 0; a crash leaves the previous checkpoint in force. Everything
is safetensors or JSON: nothing is unpickled on resume.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from sae_core import Sae, UserError
from sae_core.checkpoint import Unreadable, reading, save_safetensors
from sae_core.store.manifest import atomic_write

LATEST = "LATEST"
# What state.json holds: the step, and the position in the data order.
STATE_KEYS = ("step", "epoch", "epoch_tokens", "tokens_seen")


def _damaged(folder: Path) -> str:
    return f"the checkpoint {folder} is damaged: restore it from a copy, or train that run again (--overwrite)"


def ckpt_root(out: Path) -> Path:
    return out / "checkpoints"


def save_layer(folder: Path, sae: Sae, opt: torch.optim.Optimizer, since_fired: torch.Tensor) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sae.save_to_disk(folder)
    names = {id(p): n for n, p in sae.named_parameters()}
    tensors = {"num_tokens_since_fired": since_fired.cpu()}
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                tensors[f"{names[id(p)]}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    save_safetensors(tensors, folder / "optimizer.safetensors")


def load_layer(folder: Path, sae: Sae, opt: torch.optim.Optimizer) -> torch.Tensor:
    try:
        loaded = Sae.load_from_disk(folder, device=sae.device, dtype=sae.dtype)
    except UserError as e:  # the problem, with the fix for a checkpoint
        raise UserError(f"{str(e).split('; ')[0]}; {_damaged(folder.parent)}") from None
    with torch.no_grad():
        for (_, p), (_, q) in zip(sae.named_parameters(), loaded.named_parameters(), strict=True):
            p.copy_(q)
    path = folder / "optimizer.safetensors"
    with reading(path, _damaged(folder.parent)):
        tensors = load_file(str(path), device=str(sae.device))
        since_fired = tensors["num_tokens_since_fired"]
    for name, p in sae.named_parameters():
        state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        if state:  # the fused Adam keeps its step counter on the parameter's device
            opt.state[p] = state
    return since_fired


def write_state(root: Path, step: int, state: dict) -> None:
    (root / f"step_{step}").mkdir(parents=True, exist_ok=True)
    atomic_write(root / f"step_{step}" / "state.json", json.dumps(state, indent=2))


def publish(root: Path, step: int) -> None:
    """Make step_N the checkpoint in force, then drop older ones."""
    atomic_write(root / LATEST, f"step_{step}\n")
    for p in root.glob("step_*"):
        if p.name != f"step_{step}":
            shutil.rmtree(p, ignore_errors=True)


def latest(out: Path) -> tuple[Path, dict] | None:
    """The checkpoint in force and its state, None before the first; a damaged one is a one-line error."""
    root = ckpt_root(out)
    if not (root / LATEST).is_file():
        return None
    name = (root / LATEST).read_text(errors="replace").strip()
    if not re.fullmatch(r"step_\d+", name):
        with reading(root / LATEST, _damaged(root)):
            raise Unreadable(f"it names {name[:40]!r}, not a step_N folder")
    folder = root / name
    with reading(folder / "state.json", _damaged(folder)):
        state = json.loads((folder / "state.json").read_text())
        if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in STATE_KEYS):
            raise Unreadable(f"it lacks one of {', '.join(STATE_KEYS)}")
    return folder, state


def replaced_path(out: Path) -> Path:
    """Where `--overwrite` keeps the run it replaces until the new one has a checkpoint of its own."""
    out = out.absolute()
    return out.with_name(f".{out.name}.replaced")


def latest_or_none(out: Path):
    try:
        return latest(out)
    except (OSError, ValueError):  # a report or a clean-up must not hide the error that led to it
        return None


def restore_replaced(out: Path) -> bool:
    """A run that `--overwrite` was replacing goes back in place if the new one stopped before its first
    checkpoint (a corrupt chunk, Ctrl-C, running out of memory): nothing is lost for nothing."""
    try:
        old = replaced_path(out)
        if not old.is_dir() or latest_or_none(out) is not None:
            return False
        failed = old.with_name(old.name.removesuffix(".replaced") + ".failed")
        shutil.rmtree(failed, ignore_errors=True)
        if out.exists():  # renamed whole (another rank may still be writing into it), then deleted
            os.replace(out, failed)
        os.replace(old, out)
        shutil.rmtree(failed, ignore_errors=True)
        return True
    except (OSError, ValueError):  # (it must not hide the error that stopped the run)
        return False


def publish_sae(folder: Path, sae: Sae) -> None:
    """Write layer_L/ through a temporary folder so a reader never sees half an SAE; where the file
    system can swap two folders in one step, never a missing one either."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sae.save_to_disk(tmp)
    if folder.exists() and exchange(tmp, folder):
        shutil.rmtree(tmp)  # the previous SAE
        return
    old = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux's renameat2 with RENAME_EXCHANGE); False where that is not
    available (another OS, an old kernel or C library, a file system without it)."""
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is None:
        return False
    at_cwd, rename_exchange = -100, 2
    if rename(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))
