"""Layer specs: `"0-31"`, `"0,4,8"`, `"0-29:2"`, `"all"`, resolved against a model's depth.

Layer L is `hidden_states[L]`: the residual stream entering block L (layer 0 is the output
of the embedding). Valid layers are `0 .. num_layers - 1`.
"""

from __future__ import annotations

import numbers
import re

from .errors import UserError

_ITEM = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+))?)?$")
_HELP = "use e.g. '0-31', '0,4,8', '0-29:2' or 'all'"


def parse_layers(spec: str | int | list[int], num_layers: int) -> list[int]:
    """Resolve a layer spec to a sorted list of distinct layers in `0 .. num_layers - 1`."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    if isinstance(spec, int):
        layers = [spec]
    elif isinstance(spec, (list, tuple)):
        layers = [int(x) for x in spec]
    else:
        layers = _parse_spec(str(spec), num_layers)
    if not layers:
        raise UserError(f"layer spec {spec!r} selects no layers; {_HELP}")
    bad = [x for x in layers if not 0 <= x < num_layers]
    if bad:
        raise UserError(
            f"layer {bad[0]} is out of range: the model has layers 0-{num_layers - 1} "
            f"(layer L is the residual stream entering block L); {_HELP}"
        )
    return sorted(set(layers))


def as_spec(layers: str | int | list | tuple | None) -> str | None:
    """A layer spec from Python's other spellings of it: `3` -> `"3"`, `[0, 4, "layer_8"]` -> `"0,4,layer_8"`."""
    def item(x) -> bool:
        return isinstance(x, (numbers.Integral, str)) and not isinstance(x, bool)

    if item(layers) and not isinstance(layers, str):
        return str(int(layers))
    if isinstance(layers, (list, tuple)) and all(item(x) for x in layers):
        return ",".join(x if isinstance(x, str) else str(int(x)) for x in layers)
    return layers


def spec_items(spec: str) -> list[str]:
    """The items of a spec: separated by commas or whitespace (`"0 4 8"` is `"0,4,8"`), with spaces
    around `-` and `:` ignored (`"0 - 29 : 2"` is `"0-29:2"`)."""
    text = re.sub(r"\s*([-:])\s*", r"\1", spec.strip())
    return [item for part in text.split(",") for item in (part.split() or [""])]  # "1,,2": an empty item


def _parse_spec(spec: str, num_layers: int) -> list[int]:
    layers: list[int] = []
    for item in spec_items(spec):
        if item.lower() in ("all", "*"):
            layers.extend(range(num_layers))
            continue
        if item.lower().startswith("all:"):  # every step-th layer from 0 (`all:4,31`: and the last)
            step = item[4:]
            if not step.isdigit() or int(step) < 1:
                raise UserError(f"malformed layer spec {spec!r}: the step after 'all:' must be a whole number >= 1; {_HELP}")
            layers.extend(range(0, num_layers, int(step)))
            continue
        m = _ITEM.match(item)
        if not m:
            raise UserError(f"malformed layer spec {spec!r} (at {item!r}); {_HELP}")
        start, stop, step = m.group(1), m.group(2), m.group(3)
        if stop is None:
            layers.append(int(start))
            continue
        lo, hi, st = int(start), int(stop), int(step or 1)
        if hi < lo or st < 1:
            raise UserError(f"malformed layer range {item!r} in {spec!r}: need start <= end and step >= 1; {_HELP}")
        layers.extend(range(lo, hi + 1, st))
    return layers


def format_layers(layers: list[int]) -> str:
    """Compact spec for a sorted list: `[0,1,2,5]` -> `"0-2,5"`."""
    parts, i = [], 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        parts.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    return ",".join(parts)
