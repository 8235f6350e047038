"""The one error type a user sees: what is wrong and how to fix it. The CLI prints it without a traceback (exit 2)."""


class UserError(Exception):
    """Bad input or a refused operation. The message names the problem and the fix."""
