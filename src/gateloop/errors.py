"""The exceptions the CLI turns into an exit code: bad user input, and a run stopped by a signal.

The CLI prints either as a single line: a UserError exits with code 2, a StopRequested with
128 + the signal's number (as a process killed by it would); anything else is a bug and keeps its
traceback.
"""

import signal


class UserError(Exception):
    """Bad input from the user: a clear message naming the problem, no traceback."""


class StopRequested(Exception):
    """A signal (SIGTERM, Ctrl-C) stopped a training loop between two steps, with `step` steps done."""

    def __init__(self, signum: int, step: int, note: str = ""):
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}" + (f"; {note}" if note else ""))
