"""The one exception type the CLIs turn into a one-line error and exit code 2."""


class UserError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""


def folder_contents(names: list[str]) -> str:
    """The first entries of a folder for an error that refuses it: `a, b, c, ... (7 entries)`."""
    return ", ".join(names[:3]) + (f", ... ({len(names)} entries)" if len(names) > 3 else "")


def first_line(e: BaseException) -> str:
    """`Type: first line of the message` of an exception from a library, to quote inside a UserError."""
    text = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
