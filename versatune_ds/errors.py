"""The one exception type for user mistakes.

The CLI prints a `UserError` as a single readable message on stderr and exits non-zero; any other
exception is a bug in versatune_ds and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a config value, a data row, a file, a flag.

    The message says what was given, where (file:line or config key) and how to fix it.
    """
