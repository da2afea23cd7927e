"""What both command-line tools share: one-line errors with exit code 2, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

import typer

from .errors import UserError


def run_app(app: typer.Typer, argv: list[str] | None = None) -> None:
    """Run a typer app; a `UserError` becomes `error: <message>` on stderr and exit code 2."""
    try:
        app(args=argv, standalone_mode=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def entry_point(app: typer.Typer) -> Callable[[], None]:
    return lambda: run_app(app)
