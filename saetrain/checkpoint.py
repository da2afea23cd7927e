"""Training checkpoints: SAEs, Adam state, dead-latent counters and the position in the data order.

`checkpoints/step_N/` is written in full (every rank its own layers), then `checkpoints/LATEST`
is replaced atomically by rank 0; a crash leaves the previous checkpoint in force. Everything
is safetensors or JSON: nothing is unpickled on resume.
"""

from __future__ import annotations

import json
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
