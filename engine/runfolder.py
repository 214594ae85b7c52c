"""Run folders: the one rule for a folder msdda may write into, shared by ``msdda generate``, ``sweep``,
``export`` and ``batch``. Locked, resumable, and never touching a file the run did not write.

A run folder holds the run's own files (the command says which names are its own), the run's
``manifest.json`` (its parameters, then what it finished) and a lock file ``.msdda.lock``. Used as
``with RunFolder(path, params, owns) as run: ...``:

1. the folder is created if missing (remembering what was created), and an exclusive non-blocking
   ``fcntl.flock`` is taken on ``.msdda.lock`` inside it for the whole run: a second run on the folder is
   refused at once, and the kernel drops the lock if the process dies;
2. under the lock, a folder without our manifest must hold nothing but the lock file and our manifest's stale
   temp files (left by kill -9 while the manifest, always written first, was being written), else it is
   refused untouched; a folder with our manifest
   must describe the same run (only the parameters are compared, never what a finished run adds). Our stale
   temp files are then deleted;
3. a fresh folder gets its manifest (``complete: false``) before any other file, which marks it as ours;
   a resumed folder's manifest is left as it is until the run completes;
4. if the run fails before it finished any file, everything it wrote is removed again (the folder and its
   parents too, where it created them): the folder is left as it was found. Once a file is finished the
   folder stays, so the same command resumes it.

A folder msdda may write into is therefore one it created, or one recognised by its own manifest (each
command names its manifest: ``manifest.json``, or ``run.json`` for ``msdda batch``). Symbolic links are never
followed out of it: the manifest and lock file must be regular files (not links, FIFOs, devices or sockets:
msdda.atomic's file rule, so nothing can make a run hang), subfolders (``RunFolder.subfolder``) must be real
folders, and stale temp files are only ever removed from the folder itself or its real subfolders. In a folder
without our manifest, the only files msdda removes are its manifest's own stale temp files.

Every OS error (read-only file system, no space left, permission denied) becomes a one-line
``RunFolderError`` naming the path; atomic writes leave no half-written file behind.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Callable, Mapping

from msdda.atomic import (MAX_JSON_BYTES, UnsafeFileError, atomic_write_bytes, atomic_write_json, encode_png,
                          open_regular, read_json, read_regular, temp_file_target)

__all__ = ["RunFolder", "RunFolderError", "LOCK_NAME", "MANIFEST", "check_target", "image_intact"]

LOCK_NAME = ".msdda.lock"
MANIFEST = "manifest.json"


class RunFolderError(ValueError):
    """The output folder cannot be used (another run holds it, it holds other files, an OS error). One line."""


def _os_message(action: str, path: Path, exc: OSError) -> str:
    reason = (exc.strerror or os.strerror(exc.errno)) if exc.errno else str(exc)
    return f"cannot {action} {path}: {reason}"


def _read_manifest(path: Path) -> dict:
    try:
        obj = read_json(path, max_bytes=MAX_JSON_BYTES, follow=False)
    except UnsafeFileError as exc:
        raise RunFolderError(str(exc)) from None
    except OSError as exc:
        raise RunFolderError(_os_message("read", path, exc)) from None
    except ValueError:
        obj = None
    if not isinstance(obj, dict) or not isinstance(obj.get("command"), str):
        raise RunFolderError(f"{path} is damaged or was not written by msdda; refusing to touch {path.parent} "
                             "(remove it or use another --out)")
    return obj


def _list(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError as exc:
        raise RunFolderError(_os_message("read folder", folder, exc)) from None


def check_target(path, owns: Callable[[str], bool] | None = None, manifest: str = MANIFEST) -> dict | None:
    """Whether ``path`` may take a run: it does not exist, or it is a folder that holds our manifest (returned),
    or only our lock and our manifest's stale temp files. Anything else is refused. Run again under the lock by
    ``RunFolder``; calling it early only refuses sooner. (``owns`` is unused: kept for callers.)"""
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            raise RunFolderError(f"{path} is a dangling symbolic link; use another --out")
        return None
    if not path.is_dir():
        raise RunFolderError(f"{path} exists and is not a folder; use another --out")
    entries = _list(path)
    if manifest in entries:
        return _read_manifest(path / manifest)
    foreign = [e for e in entries if e != LOCK_NAME and temp_file_target(e) != manifest]
    if foreign:
        raise RunFolderError(f"{path} is not empty ({len(foreign)} entries, e.g. {foreign[0]!r}) and holds no msdda "
                             "manifest; refusing to write into it: use an empty or new folder")
    return None


def _remove_stale_temps(folder: Path, owns: Callable[[str], bool], manifest: str | None) -> None:
    """Remove the temp files our atomic writes left in ``folder`` (kill -9): regular files only (never a link or
    anything else that merely has such a name), of the manifest or of names ``owns`` accepts."""
    for name in _list(folder):
        target = temp_file_target(name)
        if target is None or not (target == manifest or owns(target)):
            continue
        path = folder / name
        try:
            if stat.S_ISREG(os.lstat(path).st_mode):
                path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise RunFolderError(_os_message("remove stale temp file", path, exc)) from None


#: the largest image file msdda reads back to verify it
MAX_IMAGE_BYTES = 1 << 28


def image_intact(path: Path, sha256: str | None = None) -> bool:
    """Whether ``path`` is a whole image msdda may trust: a regular file (not a link, through the file rule) of
    bounded size that, with ``sha256``, hashes to it (exact: the bytes msdda wrote); without, decodes completely
    (PNG chunk checksums verified and every pixel decoded, not just the header). The one image check of
    generate, sweep and batch."""
    import io

    try:
        data = read_regular(path, max_bytes=MAX_IMAGE_BYTES, follow=False)
    except (OSError, ValueError):
        return False
    if sha256 is not None:
        return hashlib.sha256(data).hexdigest() == sha256
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # PIL raises many types for damaged files (SyntaxError, OSError, ValueError...)
        return False


class RunFolder:
    """One run's output folder; see the module docstring. ``params``: the run's parameters (JSON values),
    compared with a resumed folder's manifest. ``owns(name)``: whether a file name is one this kind of run
    writes (its stale temp files are cleaned)."""

    def __init__(self, path, params: Mapping, owns: Callable[[str], bool], *, manifest: str = MANIFEST):
        self.path = Path(path)
        self.manifest = manifest
        self.params = json.loads(json.dumps(dict(params), allow_nan=False))   # as they read back from JSON
        self.owns = owns
        self.previous: dict | None = None       # the manifest found on entry (a resumed run)
        self.finished: list[str] = []           # files this run completed
        self.written_sha256: dict[str, str] = {}  # sha256 of the bytes this run wrote, by file name (images)
        self._created: list[Path] = []          # folders this run created, deepest last
        self._lock_fd: int | None = None
        self._created_lock = False
        self._wrote_manifest = False

    @property
    def resumed(self) -> bool:
        return self.previous is not None

    # ------------------------------------------------------------------ entry and exit
    def __enter__(self) -> "RunFolder":
        try:
            self._make_folder()
            self._lock()
            self._adopt()
        except BaseException:
            self._release(undo=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._release(undo=exc_type is not None and not self.finished)
        return False

    def _make_folder(self) -> None:
        check_target(self.path, manifest=self.manifest)                    # refuse early, before creating anything
        missing = []
        for folder in (self.path, *self.path.parents):
            if folder.exists() or folder.is_symlink():
                break
            missing.append(folder)
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
            except FileExistsError:
                continue                                        # made by a concurrent run: not ours to remove
            except OSError as exc:
                self._remove_created()
                raise RunFolderError(_os_message("create folder", folder, exc)) from None
            self._created.append(folder)

    def _lock(self) -> None:
        lock = self.path / LOCK_NAME
        try:
            try:
                fd = open_regular(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, follow=False)
                self._created_lock = True
            except FileExistsError:   # flock needs no write access: a finished folder on a read-only disk verifies
                fd = open_regular(lock, os.O_RDONLY, follow=False)   # a FIFO or link here is refused, not waited on
        except UnsafeFileError as exc:
            raise RunFolderError(str(exc)) from None
        except OSError as exc:
            raise RunFolderError(_os_message("create lock file", lock, exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if self._created_lock:               # the other run holds the folder; our new file is unused
                self._created_lock = False
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderError(f"another msdda run is writing to {self.path}; wait for it to finish or use "
                                     "another --out") from None
            raise RunFolderError(_os_message("lock", lock, exc)) from None
        self._lock_fd = fd

    def _adopt(self) -> None:
        self.previous = check_target(self.path, manifest=self.manifest)
        if self.previous is not None:
            changed = sorted(k for k in self.params if self.previous.get(k) != self.params[k])
            if changed:
                raise RunFolderError(f"{self.path} holds a different run (differs in: {', '.join(changed)}); use "
                                     "another --out")
        # Without our manifest, only the manifest's own temp files can be ours (it is written first).
        owns = self.owns if self.previous is not None else (lambda name: False)
        _remove_stale_temps(self.path, owns, self.manifest)
        if self.previous is None:
            self._write(self.manifest, lambda p: atomic_write_json(p, {**self.params, "complete": False}))
            self._wrote_manifest = True

    def _release(self, *, undo: bool) -> None:
        """Unlock; with ``undo`` (nothing finished), first remove what this run wrote into a fresh folder."""
        if undo and self.previous is None:
            with contextlib.suppress(OSError):
                if self._wrote_manifest:
                    (self.path / self.manifest).unlink(missing_ok=True)
                if self._created_lock:
                    (self.path / LOCK_NAME).unlink(missing_ok=True)
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
        if undo and self.previous is None:
            self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            try:
                folder.rmdir()                   # only if empty: never anything another process put there
            except OSError:
                break
        self._created = []

    # ------------------------------------------------------------------ subfolders
    def subfolder(self, name: str, owns: Callable[[str], bool] = lambda name: True) -> Path:
        """The run's subfolder ``name`` (one level), created if missing. One that exists must be a real folder:
        a symbolic link (to a folder outside, say) is refused, so nothing is ever written or removed through
        it. Stale temp files of names ``owns`` accepts are removed from it when the folder is ours (our manifest
        was found). A subfolder this run created is removed again, if empty, when the run is undone."""
        path = self.path / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            try:
                os.mkdir(path)
            except OSError as exc:
                raise RunFolderError(_os_message("create folder", path, exc)) from None
            self._created.append(path)
            return path
        except OSError as exc:
            raise RunFolderError(_os_message("read", path, exc)) from None
        if stat.S_ISLNK(st.st_mode):
            raise RunFolderError(f"{path} is a symbolic link; msdda writes only into real folders it owns (remove the "
                                 "link or use another --out)")
        if not stat.S_ISDIR(st.st_mode):
            raise RunFolderError(f"{path} exists and is not a folder; remove it or use another --out")
        if self.resumed:
            _remove_stale_temps(path, owns, None)
        return path

    # ------------------------------------------------------------------ writing
    def _write(self, name: str, write) -> Path:
        path = self.path / name
        try:
            write(path)
        except OSError as exc:
            raise RunFolderError(_os_message("write", path, exc)) from None
        return path

    def write_image(self, name: str, image) -> Path:
        """Write ``image`` as PNG; its sha256 (of the bytes written, so never read back) goes into
        ``written_sha256``."""
        data = encode_png(image)
        path = self._write(name, lambda p: atomic_write_bytes(p, data))
        self.written_sha256[name] = hashlib.sha256(data).hexdigest()
        self.finished.append(name)
        return path

    def write_json(self, name: str, obj) -> Path:
        """Write ``obj`` as strict JSON (no NaN), unless the file already holds exactly that: a rerun of a
        finished run rewrites nothing."""
        path = self.path / name
        try:
            unchanged = read_json(path, follow=False) == json.loads(json.dumps(obj, allow_nan=False))
        except (OSError, ValueError):
            unchanged = False
        if not unchanged:
            self._write(name, lambda p: atomic_write_json(p, obj))
        self.finished.append(name)
        return path

    def note_finished(self, name: str) -> None:
        """Record a finished file written by another RunFolder inside this one (a sweep's point folder)."""
        self.finished.append(name)
