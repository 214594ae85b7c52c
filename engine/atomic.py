"""Atomic file writes: a file appears whole or not at all (temp file in the same folder, fsync, os.replace).

The temp file of ``NAME`` is ``.NAME.XXXXXXXX.tmp`` beside it; a process killed mid-write (kill -9) leaves it
behind, and :func:`temp_file_target` tells an owner which of its files such a leftover belonged to.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

TEMP_SUFFIX = ".tmp"
# mkstemp's random part: 8 characters of [a-z0-9_].
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")

# mkstemp creates files 0600; finished files get the mode a plain open() would give them (0666 & ~umask).
# Read once, at import: os.umask can only be read by setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: not every filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then os.replace: readers see the old
    file or the whole new one, never a half-written one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), _FILE_MODE)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):   # the original error (ENOSPC, EIO...) is the one to report
            Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path, obj) -> Path:
    """Strict JSON: NaN or Infinity anywhere in ``obj`` raises ValueError before anything is written."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def temp_file_target(filename: str) -> str | None:
    """The name of the file whose atomic write left the temp file ``filename`` (``.NAME.XXXXXXXX.tmp`` ->
    ``NAME``), or None when ``filename`` is not such a temp file."""
    m = _TEMP_NAME.match(filename)
    return m.group("target") if m else None


def atomic_save_image(path, image) -> Path:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
