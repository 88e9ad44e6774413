"""User-facing errors of the engine."""


class ArenaError(Exception):
    """A problem with the user's input that the user can fix.

    The message is one line naming the file, the offending value and the fix; the command line
    prints it and exits with status 2, the worker reports it as an ``error`` event.
    """


class Cancelled(Exception):
    """Raised inside training when the caller asks to stop (e.g. SIGTERM in the worker).

    Defined here, torch-free, so that a worker that only relays a server's job (no torch
    installed) can raise and catch it; :mod:`arenaseg.training` re-exports it."""
