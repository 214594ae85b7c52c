"""Any exception as one short line: the one place the CLI, ``msdda batch``'s manifest and ``msdda serve``'s
JSON errors turn an exception into text.

A line is whitespace-collapsed and at most ``MAX_ERROR_CHARS`` characters, so a refused 50 MB value or a
145-line traceback wrapped by Ray never reaches a terminal or a response whole. Errors that carry no useful text
of their own get one: out of memory (``MemoryError``, and torch's ``RuntimeError: ... can't allocate memory`` /
CUDA's ``OutOfMemoryError``, which are not MemoryErrors), input nested too deeply (``RecursionError``), a number
too large (``OverflowError``). An exception Ray re-raised in the driver is reported by its cause.
"""
from __future__ import annotations

import reprlib

__all__ = ["MAX_ERROR_CHARS", "one_line", "short_value", "is_out_of_memory"]

#: the longest error line or JSON error message msdda prints or answers
MAX_ERROR_CHARS = 300
#: how much of a refused value an error quotes
MAX_QUOTE_CHARS = 60

_OOM_MARKERS = ("can't allocate memory", "cannot allocate memory", "out of memory", "defaultcpuallocator")


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or what torch raises when an allocation fails (a RuntimeError or torch.OutOfMemoryError)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc)[:2000].lower() for m in _OOM_MARKERS)


def _cause(exc: BaseException) -> BaseException:
    """The exception a wrapper stands for: Ray's RayTaskError/RayActorError keep it in ``.cause``; Ray Data's
    UserCodeException chains it as ``__cause__``."""
    seen = {id(exc)}
    while True:
        inner = getattr(exc, "cause", None)
        if not isinstance(inner, BaseException):
            inner = exc.__cause__ if type(exc).__module__.startswith("ray.") else None
        if not isinstance(inner, BaseException) or id(inner) in seen:
            return exc
        seen.add(id(inner))
        exc = inner


def one_line(exc: BaseException | str, limit: int = MAX_ERROR_CHARS, *, oom_hint: str = "") -> str:
    """``exc`` as one line of at most ``limit`` characters (an OS error names its path)."""
    if isinstance(exc, str):
        text = exc
    else:
        exc = _cause(exc)
        if is_out_of_memory(exc):
            text = "out of memory" + (f" ({oom_hint})" if oom_hint else "")
        elif isinstance(exc, RecursionError):
            text = "input nested too deeply"
        elif isinstance(exc, OSError) and exc.strerror:
            text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
        else:
            # str() of a huge message is built once; only its start is kept
            text = str(exc)[:4 * limit] or type(exc).__name__
            if isinstance(exc, OverflowError):
                text = f"number too large ({text})"
            elif isinstance(exc, (KeyError, TypeError, IndexError, AttributeError, AssertionError, RuntimeError)) \
                    and not isinstance(exc, ValueError):
                text = f"{type(exc).__name__}: {text}"    # an internal failure: the type says where to look
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def short_value(value, limit: int = MAX_QUOTE_CHARS) -> str:
    """A refused value for an error message: its repr, cut to ``limit`` characters (reprlib for containers, so a
    huge or deeply nested value is never rendered whole)."""
    if isinstance(value, str):
        text = repr(value[:limit + 1])
    else:   # reprlib bounds the work too: a huge or deeply nested list is never rendered whole
        short = reprlib.Repr()
        short.maxlevel, short.maxlist, short.maxdict = 3, 8, 8
        short.maxstring = short.maxother = short.maxlong = limit
        try:
            text = short.repr(value)
        except Exception:  # noqa: BLE001 -- a value whose repr fails is named by its type
            text = type(value).__name__
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
