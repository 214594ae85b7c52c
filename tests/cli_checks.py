"""What the CLI tests check of a command's output."""
from __future__ import annotations


def one_error_line(capsys, message: str) -> str:
    """The captured stderr is exactly one line, ``msdda: error: ...`` containing ``message``; returns it."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("msdda: error:") and message in lines[0], err
    return lines[0]
