"""Atomic file writes: a file appears whole or not at all (temp file in the same folder, fsync, os.replace).

The temp file of ``NAME`` is ``.NAME.XXXXXXXX.tmp`` beside it; a process killed mid-write (kill -9) leaves it
behind, and :func:`temp_file_target` tells an owner which of its files such a leftover belonged to.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
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


def encode_png(image) -> bytes:
    """PNG bytes of a PIL image (PIL's defaults): the one encoding of every image msdda writes or serves, so a
    served, batch-made or CLI-written image compare byte for byte."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------- the files msdda may read
#: the largest JSON file msdda reads (manifests, configs, jobs files are far smaller)
MAX_JSON_BYTES = 64 * 1024 * 1024


class UnsafeFileError(ValueError):
    """A path msdda was to read or lock is not a regular file (a FIFO, device, socket, folder, or a symbolic
    link where none may be), or is larger than allowed. One line."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path, flags: int = os.O_RDONLY, *, max_bytes: int | None = None, follow: bool = True,
                 mode: int = 0o644) -> int:
    """Open ``path`` as a file descriptor, only if it is a regular file (of at most ``max_bytes``). The open
    itself cannot block: O_NONBLOCK makes opening a FIFO return at once, and the fstat then refuses it, so
    a named pipe, device or socket is refused in one line (UnsafeFileError), never waited on. ``follow=False``:
    a symbolic link is refused too (files inside msdda's own folders). OSError (missing, permission) passes
    through."""
    path = Path(path)
    extra = os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags | extra, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise UnsafeFileError(f"{path} is a symbolic link; msdda does not follow links in its folders") from None
        if exc.errno == errno.ENXIO:             # a FIFO opened for writing with no reader
            raise UnsafeFileError(f"{path} is a named pipe, not a regular file; refusing to open it") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(f"{path} is {_kind(st.st_mode)}, not a regular file; refusing to open it")
        if max_bytes is not None and st.st_size > max_bytes:
            raise UnsafeFileError(f"{path} is {st.st_size} bytes, more than the {max_bytes} msdda reads for it")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path, *, max_bytes: int = MAX_JSON_BYTES, follow: bool = True) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (see :func:`open_regular`)."""
    fd = open_regular(path, max_bytes=max_bytes, follow=follow)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:                    # grew while being read
        raise UnsafeFileError(f"{path} is more than the {max_bytes} bytes msdda reads for it")
    return data


def read_json(path, *, max_bytes: int = MAX_JSON_BYTES, follow: bool = True):
    """A JSON file through :func:`read_regular`. Raises ValueError (UnicodeDecodeError, JSONDecodeError, or
    RecursionError re-raised as ValueError for JSON nested too deeply) for bad content."""
    data = read_regular(path, max_bytes=max_bytes, follow=follow)
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
