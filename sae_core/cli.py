"""What both command-line tools share: one-line errors with exit code 2, no traceback."""

from __future__ import annotations

import ast
import inspect
import sys
from collections.abc import Callable

import typer

from .errors import UserError


def make_app(help: str) -> typer.Typer:
    """A typer app with our conventions: no shell completion, help without arguments, plain tracebacks."""
    return typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help=help,
                       rich_markup_mode=None)


def run_app(app: typer.Typer, argv: list[str] | None = None) -> None:
    """Run a typer app; a `UserError` becomes `error: <message>` on stderr and exit code 2."""
    try:
        app(args=argv, standalone_mode=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def entry_point(app: typer.Typer) -> Callable[[], None]:
    return lambda: run_app(app)


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstrings under the fields of a dataclass: CLI help from the config itself."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for a, b in zip(body, body[1:], strict=False):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = b.value.value
    return docs
