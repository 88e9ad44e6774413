"""User-facing errors of the engine."""


class ArenaError(Exception):
    """A problem with the user's input that the user can fix.

    The message is one line naming the file, the offending value and the fix; the command line
    prints it and exits with status 2, the worker reports it as an ``error`` event.
    """
