"""`SaeConfig`: the fields of EleutherAI's `cfg.json`, and the architectures we refuse."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

# Keys of published cfg.json files that change the architecture. A value other than the one
# given here means a model we cannot run; loading it as a plain TopK SAE would silently
# compute something else, so we refuse.
_ARCHITECTURE_KEYS: dict[str, Any] = {
    "signed": False,
    "transcode": False,
    "skip_connection": False,
    "activation": "topk",
    "encoder_pkm": False,
    "encoder_kron": False,
    "encoder_monarch": False,
    "encoder_halut": False,
    "monet": False,
}


@dataclass
class SaeConfig:
    """Hyperparameters of a TopK SAE, as written to `cfg.json` (plus `d_in`)."""

    expansion_factor: int = 32
    """Latents per input dimension; used when `num_latents` is 0."""
    normalize_decoder: bool = True
    """Keep the decoder rows at unit norm."""
    num_latents: int = 0
    """Number of latents; 0 means `d_in * expansion_factor`."""
    k: int = 32
    """Number of latents kept per token."""
    multi_topk: bool = False
    """Also compute the Multi-TopK FVU (4k latents) of Gao et al."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """Keys of a loaded cfg.json that we keep but do not use; written back on save."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.k < 1:
            raise UserError(f"k must be at least 1, got {self.k}")
        if self.num_latents < 0:
            raise UserError(f"num_latents must be >= 0 (0 = d_in * expansion_factor), got {self.num_latents}")
        if self.num_latents == 0 and self.expansion_factor < 1:
            raise UserError(f"expansion_factor must be at least 1, got {self.expansion_factor}")

    def resolve_num_latents(self, d_in: int) -> int:
        return self.num_latents or d_in * self.expansion_factor

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "cfg.json") -> SaeConfig:
        """Build a config from a cfg.json dict, keeping unknown keys and refusing other architectures."""
        for key, expected in _ARCHITECTURE_KEYS.items():
            if key in d and d[key] != expected:
                raise UserError(
                    f"{source}: {key}={d[key]!r} is an architecture this library cannot run "
                    f"(only plain TopK SAEs, {key}={expected!r}); load it with EleutherAI's sparsify instead"
                )
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k != "d_in"}
        try:
            return cls(**known, extra=extra)
        except (TypeError, UserError) as e:
            raise UserError(f"{source}: {e}") from None


def check_fields(obj: Any, label: str | None = None) -> None:
    """Check each field of the dataclass `obj` against its annotation, converting where nothing is
    lost (an integral float such as `1e6` for an int, 0 or 1 for a bool, a str for a Path with `~`
    expanded, a path for a str, any iterable for a list); anything else is a UserError naming the
    field. Configs built from Python get the one-line error the CLI gives, before anything runs."""
    import typing

    try:
        hints = typing.get_type_hints(type(obj))
    except NameError:  # a subclass annotated with names only a type checker sees: nothing to check by
        return
    owner = label or type(obj).__name__
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        converted = _convert(value, hints[f.name])
        if converted is _INVALID:
            raise UserError(f"{owner}.{f.name} must be {_describe(hints[f.name])}, got {value!r}")
        if converted is not value:
            setattr(obj, f.name, converted)


def as_path(value: str | os.PathLike) -> Path:
    """A path given by a user, with `~` and `~user` expanded (left as it is for an unknown user, as a shell does)."""
    path = Path(value)
    try:
        return path.expanduser()
    except RuntimeError:
        return path


_INVALID = object()


def _convert(value: Any, hint: Any) -> Any:
    import numbers
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            if (out := _convert(value, arg)) is not _INVALID:
                return out
        return _INVALID
    if origin is list:
        if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
            return _INVALID
        items = [_convert(v, args[0]) for v in value]
        if any(v is _INVALID for v in items):
            return _INVALID
        return value if isinstance(value, list) and all(a is b for a, b in zip(items, value, strict=True)) else items
    if hint is bool:
        if isinstance(value, bool):
            return value
        if type(value).__name__ in ("bool_", "bool") or (isinstance(value, numbers.Integral) and value in (0, 1)):
            return bool(value)  # numpy's bool, 0 or 1
        return _INVALID
    if hint is int:
        if isinstance(value, bool):
            return _INVALID
        if isinstance(value, numbers.Integral):
            return value if type(value) is int else int(value)
        return int(value) if isinstance(value, numbers.Real) and float(value).is_integer() else _INVALID
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return _INVALID
        return value if type(value) is float else float(value)
    if hint is str:
        if isinstance(value, str) or type(value).__module__.split(".")[0] == "torch":  # a torch.device or dtype
            return value
        return os.fspath(value) if isinstance(value, os.PathLike) else _INVALID
    if hint is Path:
        if not isinstance(value, (str, os.PathLike)) or not str(value).strip():  # "" would mean the current folder
            return _INVALID
        path = as_path(value)
        return value if path == value and isinstance(value, Path) else path
    return value  # Any, dict: not checked


def _describe(hint: Any) -> str:
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return {bool: "True or False", int: "a whole number", float: "a number", str: "a string", Path: "a non-empty path",
            type(None): "None"}.get(hint, str(hint))
