"""sha256 of a file, streamed: the one implementation the loader (model folders), the run folders (images) and
the export cache (artifacts) share. Sits below msdda.export, so that export/ needs nothing from the loader."""
from __future__ import annotations

import hashlib
import os

__all__ = ["file_sha256"]


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
