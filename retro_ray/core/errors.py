"""The user's mistakes: errors the CLI reports as one line with exit code 2.

Every error a user can fix (a config value, an input file, a stage run out of order, a stage
folder held by another run) derives from ``UserError``; anything else is a bug and exits 1.
Errors raised inside Ray tasks and actors come back wrapped (``RayTaskError``,
``ActorDiedError``); ``find_user_error`` finds the user's mistake inside them.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message names the file, row or config field."""


def find_user_error(exc: BaseException) -> tuple[str, str] | None:
    """(error type, one-line message) of the user's mistake behind ``exc``, or None for a bug.

    Walks Ray's wrappers (``RayTaskError.cause``; an ``ActorDiedError`` whose actor's constructor
    failed holds that ``RayTaskError`` in its ``args``), Python's ``__cause__`` and ``__context__``.
    """
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):  # RayTaskError: str(e) is the whole remote traceback
            todo.insert(0, cause)
            continue
        if isinstance(e, UserError):
            return type(e).__name__, " ".join(str(e).split("\n")[0].split())
        todo.extend(a for a in e.args if isinstance(a, BaseException))
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return None
