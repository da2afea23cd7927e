"""What both command-line tools share: one-line errors with exit code 2, no traceback."""

from __future__ import annotations

import ast
import contextlib
import inspect
import os
import signal
import sys
from collections.abc import Callable

import typer

from .errors import UserError, several_ranks


def make_app(help: str) -> typer.Typer:
    """A typer app with our conventions: no shell completion, help without arguments, plain tracebacks."""
    return typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help=help,
                       rich_markup_mode=None)


# Options that take several values: `--hookpoints A B` means `--hookpoints A,B` (click options
# take one value each; these split theirs at commas). Their commands have no positional arguments.
MULTI_VALUE_OPTIONS = ("--hookpoints", "--exclude-token-ids")


def join_multi_values(argv: list[str]) -> list[str]:
    """`--opt A B C` (and `--opt=A B`) -> `--opt A,B,C` for MULTI_VALUE_OPTIONS; other arguments unchanged."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        out.append(argv[i])
        i += 1
        name, eq, _ = out[-1].partition("=")
        if name not in MULTI_VALUE_OPTIONS:
            continue
        if not eq and i < len(argv):  # the first value, whatever it looks like
            out.append(argv[i])
            i += 1
        while i < len(argv) and not argv[i].startswith("-"):
            out[-1] += "," + argv[i]
            i += 1
    return out


# click's exception classes, of the click typer uses (recent typer releases bundle their own copy).
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_NoArgsIsHelp = getattr(sys.modules[_ClickException.__module__], "NoArgsIsHelpError", ())  # click >= 8.2


@contextlib.contextmanager
def _interrupt_on_term():
    """Under torchrun: SIGTERM interrupts as Ctrl-C does, once. torchrun answers a Ctrl-C by sending its
    workers SIGTERM a moment after the SIGINT, which killed them before they said where the run stands
    and how to resume; further signals are ignored while that report is made."""
    def interrupt(signum, frame):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt

    before = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def run_app(app: typer.Typer, argv: list[str] | None = None) -> None:
    """Run a typer app; a `UserError` or a usage error (an unknown option, a value of the wrong type)
    becomes `error: <message>` on stderr and exit code 2; Ctrl-C exits with 130."""
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    for i, arg in enumerate(args):  # a path option given "" would mean the current folder
        name, eq, value = arg.partition("=")
        if name.startswith("--") and ((eq and not value.strip()) or (not eq and i + 1 < len(args) and not args[i + 1].strip())):
            print(f"error: {name} is empty; pass a value, or leave the option out", file=sys.stderr)
            raise SystemExit(2)
    # Under torchrun a refusal every rank reaches together (a usage error, a `collective` one) is said by
    # the first rank of each node; any other error by the rank that met it, which it names.
    ranks = several_ranks()
    first = not ranks or os.environ.get("LOCAL_RANK", "0") == "0"
    prefix = f"error (rank {os.environ['RANK']}): " if ranks and os.environ.get("RANK", "0") != "0" else "error: "
    try:
        with _interrupt_on_term() if ranks else contextlib.nullcontext():
            code = app(args=join_multi_values(args), standalone_mode=False)
    except UserError as e:
        if first or not getattr(e, "collective", False):
            print(f"{prefix}{e}", file=sys.stderr)
        raise SystemExit(2) from None
    except _NoArgsIsHelp as e:  # the command alone: its help
        e.show()
        raise SystemExit(e.exit_code) from None
    except _ClickException as e:
        ctx = getattr(e, "ctx", None)
        hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
        if first:
            print(f"{prefix}{e.format_message().rstrip('.')}{hint}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except PermissionError as e:  # a read-only folder or file, wherever the command met it
        where = f" to {e.filename}" if e.filename else ""
        print(f"error: permission denied{where}; make it writable by this user or choose another path", file=sys.stderr)
        raise SystemExit(2) from None
    except typer.Abort:
        print("Aborted!", file=sys.stderr)
        raise SystemExit(1) from None
    raise SystemExit(code if isinstance(code, int) else 0)


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
