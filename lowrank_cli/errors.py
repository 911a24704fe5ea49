"""The one exception type every user-facing error is raised as."""


class LowrankError(Exception):
    """A problem with the user's input: one sentence naming the file, key or value at fault.

    The CLI prints it as a single line and exits with status 1; library users catch it.
    """
