"""The one error type the user sees, and the wrapper that prints it.

A `UserError` (and its subclasses: `data.DataError`, `prompt.TemplateError`) is a problem with
the user's input or files: printed as one `error: ...` line on stderr, exit status 2, no traceback.
Nothing here imports another module of the project.
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""


def one_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def cli_errors(fn):
    """Run `fn`; a UserError becomes `error: ...` on stderr and exit status 2, Ctrl-C exit 130."""

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {one_line(e) if len(str(e)) > 2000 else e}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    wrapper.__name__ = getattr(fn, "__name__", "main")
    wrapper.__doc__ = fn.__doc__
    return wrapper
