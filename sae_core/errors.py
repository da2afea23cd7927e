"""The exception the CLIs turn into a one-line error and exit code 2, and what goes with it."""

import contextlib
import os


class UserError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


def several_ranks() -> bool:
    """Whether this process is one of several ranks of a torchrun job (WORLD_SIZE > 1)."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1")


def collective(e: UserError) -> UserError:
    """Mark `e` as a refusal every rank of a torchrun job meets alike, with one message (see
    `sae_core.distributed`): the CLIs print it from the first rank of each node only."""
    e.collective = True
    return e


def folder_contents(names: list[str]) -> str:
    """The first entries of a folder for an error that refuses it: `a, b, c, ... (7 entries)`."""
    return ", ".join(names[:3]) + (f", ... ({len(names)} entries)" if len(names) > 3 else "")


def first_line(e: BaseException) -> str:
    """`Type: first line of the message` of an exception from a library, to quote inside a UserError."""
    text = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextlib.contextmanager
def out_of_memory(fix: str):
    """An allocation the GPU or the host cannot make (torch's OutOfMemoryError, the CPU allocator's
    RuntimeError, Python's MemoryError) as a UserError: what failed, then `fix`."""
    try:
        yield
    except MemoryError:
        raise UserError(f"out of memory; {fix}") from None
    except RuntimeError as e:
        text = str(e)
        if type(e).__name__ != "OutOfMemoryError" and "can't allocate memory" not in text and "out of memory" not in text:
            raise
        raise UserError(f"out of memory ({first_line(e)}); {fix}") from None
