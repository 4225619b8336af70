"""The exception types that end a run with one line instead of a traceback."""


class UsageError(ValueError):
    """A bad flag value, path or size found at start-up; `train_flax.py` prints it as one line and exits 2.

    The message says what is wrong and what to do, naming the flag. A `ValueError`, so that code
    raising ValueError for bad values can switch to it without breaking its callers.
    """


class RunError(RuntimeError):
    """The run cannot go on for a reason outside the program (e.g. a checkpoint cannot be written);
    `train_flax.py` prints it as one line and exits 1. The message says what failed and what to do."""
