"""What an artifact says about itself, and the check a loader runs before trusting it.

This is the loading half of msdda.export: the backends import it (and nothing that builds). Every artifact
msdda writes carries the sha256 of the weights it was made from *inside the file*, so a file is checked
against the model being loaded wherever it comes from (the cache, ``onnx_paths=``, an export folder), not
only against a manifest that could be edited beside it:

- ONNX graphs: ``metadata_props`` ``msdda.weights_sha256`` (``weights_hash`` of the exported module), plus the
  exporter (``msdda.exporter``) and the I/O spec (``msdda.cond``, ``msdda.sample_shape``, ...).
- TensorRT plans: the engine format has no user metadata, so msdda's plan files are a small header
  (``PLAN_MAGIC``, a length, a JSON object holding the same keys) followed by TensorRT's serialized engine.
  ``read_plan`` splits them; a plan without the header is refused.
- A soup (one network with parameters sum_k c_k theta_k) is tagged with ``soup_weights_tag`` of its members'
  weight hashes and coefficients.

A mismatch is an ``ArtifactMismatch`` (an ExportError, so a ValueError) whose one-line message names the
member, the file and both hashes.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Mapping, Sequence

from .cache import ExportError, one_line

__all__ = ["WEIGHTS_KEY", "EXPORTER_KEY", "PLAN_MAGIC", "EXPORT_KIND", "ArtifactMismatch", "exporter_id",
           "onnx_metadata", "check_weights_tag", "check_onnx_weights", "soup_weights_tag", "pack_plan", "read_plan",
           "read_export_folder"]

WEIGHTS_KEY = "msdda.weights_sha256"
EXPORTER_KEY = "msdda.exporter"
PLAN_MAGIC = b"MSDDA-TRT-PLAN\x00\x01"     # then a little-endian uint32 header length, the JSON header, the plan
EXPORT_KIND = "msdda-onnx"                 # manifest.json's "kind" in a folder written by ``msdda export``


class ArtifactMismatch(ExportError):
    """An artifact was not made from the weights of the model it is loaded for, or does not say. One line."""


def exporter_id() -> str:
    """What wrote an artifact: ``msdda <version>`` (recorded in it, and part of every cache key)."""
    from msdda import __version__

    return f"msdda {__version__}"


def onnx_metadata(path) -> dict[str, str]:
    """An ONNX file's ``metadata_props`` as a dict (the graph is parsed; external weights are not read)."""
    import onnx

    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:  # not a file, not an ONNX protobuf
        raise ExportError(f"{path}: not a readable ONNX file ({one_line(exc, 160)})") from None
    return {p.key: p.value for p in model.metadata_props}


def check_weights_tag(metadata: Mapping[str, str], expected: str, *, member: str, source) -> None:
    """Raise ArtifactMismatch unless ``metadata`` (an artifact's own) says it was made from weights ``expected``."""
    got = metadata.get(WEIGHTS_KEY)
    if not got:
        raise ArtifactMismatch(f"{source}: the artifact for {member!r} carries no {WEIGHTS_KEY} (not written by "
                               "msdda's exporter, or by an older one); export it again with msdda export")
    if got != expected:
        raise ArtifactMismatch(f"{source}: the artifact for {member!r} was made from weights {got}, but the "
                               f"loaded {member!r} has weights {expected}")


def check_onnx_weights(path, expected: str, *, member: str) -> dict[str, str]:
    """Check an ONNX file's own weights tag against ``expected``; returns its metadata."""
    metadata = onnx_metadata(path)
    check_weights_tag(metadata, expected, member=member, source=path)
    return metadata


def soup_weights_tag(parts: Sequence[tuple[str, float]]) -> str:
    """The weights tag of a soup: sha256 over its members' weight hashes and coefficients, in order."""
    text = json.dumps([[str(sha), repr(float(c))] for sha, c in parts])
    return hashlib.sha256(b"msdda-soup-v1\0" + text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- TensorRT plans
def pack_plan(plan: bytes, metadata: Mapping[str, str]) -> bytes:
    """A plan file's bytes: msdda's header (``metadata``: at least WEIGHTS_KEY) and TensorRT's plan."""
    if not metadata.get(WEIGHTS_KEY):
        raise ExportError(f"a plan file needs {WEIGHTS_KEY} in its header")
    header = json.dumps(dict(metadata), sort_keys=True).encode()
    return PLAN_MAGIC + struct.pack("<I", len(header)) + header + bytes(plan)


def read_plan(path) -> tuple[dict[str, str], bytes]:
    """(header metadata, TensorRT plan bytes) of a plan file written with ``pack_plan``."""
    blob = Path(path).read_bytes()
    start = len(PLAN_MAGIC) + 4
    if not blob.startswith(PLAN_MAGIC) or len(blob) < start:
        raise ArtifactMismatch(f"{path}: not an msdda plan file (no header with {WEIGHTS_KEY}); build it again")
    (size,) = struct.unpack("<I", blob[len(PLAN_MAGIC):start])
    try:
        metadata = json.loads(blob[start:start + size])
    except ValueError:
        metadata = None
    if not isinstance(metadata, dict):
        raise ArtifactMismatch(f"{path}: damaged msdda plan header; build it again")
    return {str(k): str(v) for k, v in metadata.items()}, blob[start + size:]


# ---------------------------------------------------------------------------------------------- export folders
def read_export_folder(folder) -> dict[str, Path]:
    """{member: ONNX file} of a folder written by ``msdda export`` (its manifest.json). The files are not trusted
    for being listed here: whoever loads them checks each one's own weights sha256."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{folder} is not an export folder (no manifest.json; write one with msdda export)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ExportError(f"{manifest_path}: unreadable ({one_line(exc, 160)})") from None
    models = manifest.get("models") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("kind") != EXPORT_KIND or not isinstance(models, dict):
        raise ExportError(f"{manifest_path} is not the manifest of an msdda export folder")
    out = {}
    for name, entry in models.items():
        file = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
            raise ExportError(f"{manifest_path}: model {name!r} names no file inside the folder")
        out[str(name)] = folder / file
    return out
