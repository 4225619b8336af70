"""The one exception type that means "the invocation is wrong", not "the program is broken"."""


class UsageError(ValueError):
    """A bad flag value, path or size found at start-up; `train_flax.py` prints it as one line and exits 2.

    The message says what is wrong and what to do, naming the flag. A `ValueError`, so that code
    raising ValueError for bad values can switch to it without breaking its callers.
    """
