"""The one exception type for mistakes a user can fix (bad path, argument, file or setting).

The command line prints a ``UserError`` as one line and exits 1; anything else is a bug
and keeps its traceback. It subclasses ``ValueError`` so ``except ValueError`` still works.
"""


class UserError(ValueError):
    """Bad input from the user; the message is one line naming the file, line or argument."""
