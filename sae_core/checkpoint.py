"""EleutherAI's SAE checkpoint format: a folder per hookpoint with `cfg.json` and `sae.safetensors`.

Loading reads JSON and safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from fnmatch import fnmatch
from pathlib import Path

import torch
from natsort import natsorted
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import SaeConfig, as_path
from .errors import UserError, first_line
from .models import as_dtype, resolve_device
from .sae import Sae

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae.safetensors"


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread at once)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1], 8) for ln in f if ln.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file` with the file mode any other new file gets: safetensors creates
    its files readable by their owner only (0600), which hides SAEs from a shared machine's users."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


class Unreadable(ValueError):
    """Raised inside `reading` for what a file lacks: quoted as it is."""


@contextlib.contextmanager
def reading(path: Path, fix: str):
    """A file that cannot be read (missing, truncated, not safetensors, not JSON, lacking an entry) as
    one line naming it and `fix`; errors of the disk itself pass through."""
    try:
        yield
    except UserError:
        raise
    except (SafetensorError, ValueError, KeyError, TypeError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        why = str(e) if isinstance(e, Unreadable) else f"no entry {e}" if isinstance(e, KeyError) else first_line(e)
        raise UserError(f"{path} cannot be read ({why}); {fix}") from None


def save_sae(sae: Sae, path: str | Path) -> None:
    if sae.W_dec is None:
        raise UserError("this SAE was loaded with decoder=False, so its checkpoint would lack W_dec; "
                        "reload it with decoder=True to save it")
    path = as_path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().contiguous() for name, p in sae.state_dict().items()}
    save_safetensors(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})
    (path / CFG_NAME).write_text(json.dumps({**sae.cfg.to_dict(), "d_in": sae.d_in}, indent=2) + "\n")


def is_sae_folder(path: Path) -> bool:
    return (path / CFG_NAME).is_file()


def sae_folders(root: Path, asked: list[int | str] | None = None) -> list[str]:
    """Names of the subfolders of `root` that hold an SAE, naturally sorted; hidden ones (a writer's
    `.layer_3.tmp`) are not among them. Folders deeper down count where `asked` names them (`k32/layers.0`)."""
    if not root.is_dir():
        return []
    names = {p.name for p in root.iterdir() if not p.name.startswith(".") and p.is_dir() and is_sae_folder(p)}
    names |= {a for a in asked or [] if isinstance(a, str) and "/" in a and is_sae_folder(root / a)}
    return natsorted(names)


def layer_folder_names(layer: int) -> list[str]:
    """Folder names a layer's SAE is published under: `layer_10` (older repos), `layers.10` (newer)."""
    return [f"layer_{layer}", f"layers.{layer}"]


def _outside_package() -> int:
    """The `stacklevel` of the first caller outside sae_core, so that a warning names the user's line."""
    package, frame, level = os.path.dirname(__file__), sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def layer_folder(layer: int, present: list[str] | set[str]) -> str | None:
    """The folder `layer=N` loads among the `present` names: `layer_N` (hidden_states[N], as saetrain
    writes), else `layers.N`. Repos named by module path (sparsify's hookpoints, EleutherAI's repos since
    July 2024) hold there the *output* of block N, hidden_states[N + 1]; loading it says so and names the
    folder of hidden_states[N]."""
    for name in layer_folder_names(layer):
        if name in present:
            if name.startswith("layers."):
                before = f"layers.{layer - 1}" if layer > 0 else "embed_tokens"
                warnings.warn(
                    f"layer={layer} loads folder {name!r}, which in a repo named by module path holds the "
                    f"output of block {layer}, hidden_states[{layer + 1}]; for hidden_states[{layer}] "
                    f"(layer {layer} here) name the folder instead: {before!r}",
                    UserWarning,
                    stacklevel=_outside_package(),
                )
            return name
    return None


def as_layer(layer: int | str) -> int | str:
    """A layer given as a number (10 or "10") as an int; any other name (a hookpoint folder) unchanged."""
    return int(layer) if isinstance(layer, str) and layer.strip().isdigit() else layer


def layer_list(layers: list[int | str] | int | str | None) -> list[int | str] | None:
    """`layers=` as a list: one layer given alone is one layer, not the characters of its name."""
    return [layers] if isinstance(layers, (str, int)) else layers


def select_folders(
    available: list[str], layers: list[int | str] | None, pattern: str | None, *, where: str
) -> list[str]:
    """Pick folders by layer number or name (`layers`) and/or fnmatch `pattern`, naturally sorted."""
    chosen = list(available)
    layers = layer_list(layers)
    if layers is not None:
        chosen = []
        for want in layers:
            want = as_layer(want)
            if isinstance(want, int):
                name = layer_folder(want, available)
            else:
                name = want if want in available else None
            if name is None:
                what = f"layer {want}" if isinstance(want, int) else f"folder {want!r}"
                raise UserError(f"{where} has no SAE for {what}; it has: {', '.join(available) or 'none'}")
            chosen.append(name)
    if pattern is not None:
        chosen = [n for n in chosen if fnmatch(n, pattern)]
        if not chosen:
            raise UserError(
                f"no SAE folder of {where} matches pattern {pattern!r}; it has: {', '.join(available) or 'none'}"
            )
    return natsorted(set(chosen))


def _read_cfg(path: Path) -> tuple[int, SaeConfig]:
    cfg_path = path / CFG_NAME
    if not cfg_path.is_file():
        inner = sae_folders(path)
        if inner:
            raise UserError(
                f"{path} is a folder of SAE folders, not one SAE: load one of {', '.join(inner)} "
                "or use Sae.load_many(..., local=True)"
            )
        raise UserError(f"{path} has no {CFG_NAME}; point at a folder holding {CFG_NAME} and {WEIGHTS_NAME}")
    try:
        cfg_dict = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg_path} is not valid JSON ({e}); re-download or re-save the SAE") from None
    if not isinstance(cfg_dict, dict):
        raise UserError(f"{cfg_path} must hold a JSON object")
    if "d_in" not in cfg_dict:
        raise UserError(f"{cfg_path} has no 'd_in'; add the input width, e.g. \"d_in\": 4096")
    d_in = cfg_dict["d_in"]
    if not isinstance(d_in, int) or d_in < 1:
        raise UserError(f"{cfg_path}: d_in must be a positive integer, got {d_in!r}")
    return d_in, SaeConfig.from_dict(cfg_dict, source=str(cfg_path))


def load_sae(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    decoder: bool = True,
) -> Sae:
    """Load a folder in EleutherAI's layout; `dtype=None` keeps the stored dtype (fp32 or bf16); a
    dtype may also be named (`"bfloat16"`)."""
    path = as_path(path)
    device = resolve_device(device)
    if dtype is not None:
        dtype = as_dtype(dtype)
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise UserError(f"SAE folder {path} {what}; pass a folder holding {CFG_NAME} and {WEIGHTS_NAME}")
    d_in, cfg = _read_cfg(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise UserError(f"{path} has {CFG_NAME} but no {WEIGHTS_NAME}; re-download or re-save the SAE")

    num_latents = cfg.resolve_num_latents(d_in)
    expected = {
        "encoder.weight": (num_latents, d_in),
        "encoder.bias": (num_latents,),
        "W_dec": (num_latents, d_in),
        "b_dec": (d_in,),
    }
    if not decoder:
        del expected["W_dec"]
    tensors = {}
    with reading(weights, "re-download or re-save the SAE"), safe_open(str(weights), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        unknown = keys - set(expected) - {"W_dec"}
        if unknown:
            raise UserError(
                f"{weights} holds tensors {sorted(unknown)} that a plain TopK SAE does not have "
                "(a skip connection or transcoder?); this library cannot run it"
            )
        missing = set(expected) - keys
        if missing:
            raise UserError(f"{weights} lacks tensors {sorted(missing)}; the file is incomplete or not an SAE")
        for name, shape in expected.items():
            t = f.get_tensor(name)
            if tuple(t.shape) != shape:
                raise UserError(
                    f"{weights}: {name} has shape {tuple(t.shape)} but {CFG_NAME} (d_in={d_in}, "
                    f"{num_latents} latents) implies {shape}; the config and weights do not belong together"
                )
            tensors[name] = t
    dtype = dtype or tensors["encoder.weight"].dtype
    if not dtype.is_floating_point:
        raise UserError(f"{weights}: an SAE's dtype must be floating point, got {dtype}")

    # Build on the meta device (no random init of a large matrix), then adopt the loaded tensors.
    try:
        sae = Sae(d_in, cfg, device="meta", dtype=dtype, decoder=decoder)
    except UserError as e:  # e.g. k larger than the latents: name the file that says so
        raise UserError(f"{path / CFG_NAME}: {e}") from None
    sae.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, assign=True)
    return sae


def load_many_local(
    root: str | Path,
    layers: list[int | str] | None = None,
    pattern: str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    decoder: bool = True,
) -> dict[str, Sae]:
    root = as_path(root)
    if not root.is_dir():
        raise UserError(f"folder {root} does not exist; pass a folder of SAE folders (e.g. runs/NAME)")
    layers = layer_list(layers)
    available = sae_folders(root, layers)
    if not available:
        if (root / CFG_NAME).is_file():
            raise UserError(f"{root} is one SAE folder, not a folder of them: use Sae.load_from_disk({str(root)!r})")
        raise UserError(f"{root} holds no SAE folders (subfolders with {CFG_NAME})")
    names = select_folders(available, layers, pattern, where=str(root))
    return {n: load_sae(root / n, device=device, dtype=dtype, decoder=decoder) for n in names}
