"""Package attributes imported on first use (PEP 562), so that `actcache --help`, a usage error or
Ctrl-C at start-up does not first wait ~5 s for torch to import."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package` whose attribute `name` is `exports[name]`, a module
    relative to the package, imported when the attribute is first read (then kept in the package). A
    submodule is imported when read as an attribute too (`sae_core.models` after `import sae_core`)."""

    def __getattr__(name: str) -> object:
        if name not in exports:
            if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
                return importlib.import_module(f"{package}.{name}")
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(vars(importlib.import_module(package))))

    return __getattr__, __dir__
