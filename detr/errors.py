"""The project's error type for what a user gave wrong (a config, a file, a model, data, an option).

The command line prints these as one line naming the problem; every other exception is a bug and
keeps its traceback. It is a `ValueError`, so code that catches bad values catches it too.
"""


class RaydetrError(ValueError):
    """A problem with the user's input or setup, stated in its message."""
