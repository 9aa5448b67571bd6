"""How the CLI turns an exception into a message for a person.

Any exception class that carries ``user_message = True`` (set on the error roots of every
package) is printed as ``error: <message>`` with its ``exit_code`` (default 1) instead of a
traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


def user_facing(exc: BaseException) -> str | None:
    if getattr(exc, "user_message", False):
        return str(exc)
    return None
