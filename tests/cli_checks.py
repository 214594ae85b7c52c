"""What the CLI tests check of a command's output."""
from __future__ import annotations

from msdda.errors import MAX_ERROR_CHARS


def one_error_line(capsys, message: str = "") -> str:
    """The captured stderr is exactly one line, ``msdda: error: ...`` of at most MAX_ERROR_CHARS characters,
    containing ``message``; returns it."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("msdda: error:") and message in lines[0], err
    assert len(lines[0]) <= MAX_ERROR_CHARS, lines[0]
    return lines[0]
