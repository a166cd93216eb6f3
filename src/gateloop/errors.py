"""The one exception type for bad user input (config, data, run directories).

The CLI prints a UserError as a single line and exits with code 2; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a clear message naming the problem, no traceback."""
