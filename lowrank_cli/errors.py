"""The one exception type every user-facing error is raised as."""

from __future__ import annotations


class LowrankError(Exception):
    """A problem with the user's input: one sentence naming the file, key or value at fault.

    Library messages name function arguments and recipe keys, never command-line flags.
    `param` says which argument or recipe key the error is about (e.g. ``"kappa"``,
    ``"device"``), so that the command line can name its own option for it. The CLI prints
    the error as a single line and exits with status 1; library users catch it.
    """

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param
