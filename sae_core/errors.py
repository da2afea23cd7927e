"""The one exception type the CLIs turn into a one-line error and exit code 2."""


class UserError(ValueError):
    """Bad input from the user: the message names the problem and the fix."""
