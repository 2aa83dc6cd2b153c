"""What the user sees on the console: the one error type, the wrapper that prints it, our logger.

A `UserError` (and its subclasses: `data.DataError`, `prompt.TemplateError`) is a problem with
the user's input or files: printed as one `error: ...` line on stderr, exit status 2, no traceback.
Nothing here imports another module of the project.
"""

from __future__ import annotations

import logging
import math
import sys

logger = logging.getLogger("vicuna")  # the project's one logger: our lines on stderr


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


def quiet_libraries() -> None:
    """Keep the console to our lines: library notices that every command would print and no user
    can act on are dropped (warnings that matter still show)."""
    import warnings

    # bitsandbytes on the CPU: an optional faster kernel package is missing; the built-in one runs
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # bitsandbytes 8-bit layers with float32 activations: "inputs will be cast ... to float16" on
    # every matmul of every forward pass (hundreds of lines for one perplexity chunk)
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    # transformers 5 deprecates a name that peft and the Trainer still call
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    logging.getLogger("transformers").setLevel(logging.WARNING)


def setup_logging(verbose: bool = False) -> None:
    """Our lines on stderr with a timestamp, and the libraries' routine notices off (every command)."""
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(stream=sys.stderr, level=level, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(level)
    quiet_libraries()


def check_utf8(flag: str, value: str | None) -> None:
    """Refuse text from the command line that was not valid UTF-8 (Python hands such bytes over as
    lone surrogates, which no tokenizer or terminal can take)."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(value[e.start])
        where = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else "a lone surrogate"
        raise UserError(f"{flag} is not valid UTF-8 ({where} at character {e.start}); pass UTF-8 text") from None


# --- values from a request or a flag, checked: the page controls and GenerationParams share these


def shown(value) -> str:
    """A short description of a refused value: numbers as they are, anything else by its type."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "null"
    if isinstance(value, (int, float)):
        return f"{value:g}"
    return {str: "text", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def check_number(label: str, value, low: float, high: float, integer: bool = False):
    """A finite number within [low, high] (a whole one when `integer`), else UserError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{label} must be a number from {low:g} to {high:g}, got {shown(value)}")
    if not low <= value <= high:
        raise UserError(f"{label} must be from {low:g} to {high:g}, got {value:g}")
    if integer:
        if value != int(value):
            raise UserError(f"{label} must be a whole number, got {value:g}")
        return int(value)
    return float(value)


def check_bool(label: str, value) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{label} must be true or false, got {shown(value)}")
    return value
