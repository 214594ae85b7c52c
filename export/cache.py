"""A content-addressed cache of exported artifacts (ONNX graphs, TensorRT engines).

Layout under the root (``$MSDDA_CACHE`` or ``~/.cache/msdda``)::

    manifest.json                    {digest: {kind, file, sha256, size, files, key, created}}
    <kind>/<digest>/<file>           one folder per artifact (an ONNX graph may have a ``.data`` file beside it)
    locks/<digest>.lock              fcntl.flock: one builder per key, across processes
    locks/manifest.lock              guards read-modify-write of manifest.json
    tmp/                             builds happen here, then one os.replace moves the folder into place

A key (``CacheKey``) is the sha256 of a canonical JSON of: the weights' sha256 (``weights_hash``), the
architecture config, precision, the shape profile, the exporter/runtime versions and, for TensorRT, the GPU's
compute capability. An artifact is used only if every file the manifest lists for it exists with the recorded
size and sha256 (and the caller's ``validate`` loads it): a truncated, bit-flipped or mismatched file is deleted
and rebuilt, never used. Two processes asking for one key at once: the second blocks on the key's lock and then
finds the first one's artifact.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

__all__ = ["ExportError", "CacheKey", "ArtifactCache", "weights_hash", "config_hash", "default_cache_root",
           "runtime_versions", "file_sha256", "atomic_write_bytes", "atomic_write_text", "CACHE_FORMAT"]

# Bump when the export code changes what it writes for the same inputs: every old artifact then misses.
CACHE_FORMAT = 2          # 2: artifacts carry their weights' sha256 inside (ONNX metadata, plan headers)


class ExportError(ValueError):
    """Exporting or caching failed for a reason the user can fix. The message is one line (the CLI exits 2)."""


def default_cache_root() -> Path:
    env = os.environ.get("MSDDA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "msdda"


from msdda.errors import one_line  # noqa: E402,F401  (the one "exception as one line"; export modules import it from here)
from msdda.hashing import file_sha256  # noqa: E402  (one implementation, shared with the runtime)


# ---------------------------------------------------------------------------------------------- hashing
def _state_dict_of(obj) -> Mapping:
    import torch

    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, (str, os.PathLike)):
        from safetensors.torch import load_file

        path = Path(obj)
        files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise ExportError(f"no safetensors weights at {path}")
        state = {}
        for f in files:
            prefix = "" if f.parent == path or not path.is_dir() else f.parent.relative_to(path).as_posix() + "/"
            try:
                for k, v in load_file(f).items():
                    state[prefix + k] = v
            except Exception as exc:  # corrupt header, truncated file
                raise ExportError(f"{f}: unreadable safetensors ({one_line(exc)})") from None
        return state
    if isinstance(obj, Mapping):
        return obj
    raise TypeError(f"weights_hash takes a torch module, a state dict or a safetensors path, not {type(obj).__name__}")


def weights_hash(module_or_state_dict) -> str:
    """sha256 over every tensor of a state dict, in sorted-name order: name, dtype, shape, then the raw bytes
    (as stored: a bf16 tensor hashes its bf16 bits). Independent of device, memory layout and insertion order;
    equal to the hash of the same weights loaded back from safetensors. Accepts a module, a
    {name: tensor} mapping, or a .safetensors file / folder of them."""
    import torch

    state = _state_dict_of(module_or_state_dict)
    digest = hashlib.sha256(b"msdda-weights-v1\0")
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            tensor = torch.as_tensor(tensor)
        tensor = tensor.detach()
        header = f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{tuple(tensor.shape)}\0"
        digest.update(header.encode())
        if tensor.numel():
            flat = tensor.to("cpu").contiguous().reshape(-1)
            digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def config_hash(module_or_config) -> str:
    """sha256 of what defines the architecture: a diffusers config (minus bookkeeping keys) or, for other
    modules, the class name and module tree."""
    if isinstance(module_or_config, Mapping):
        cfg = dict(module_or_config)
        name = cfg.get("_class_name", "")
    else:
        cfg = dict(getattr(module_or_config, "config", None) or {})
        name = f"{type(module_or_config).__module__}.{type(module_or_config).__qualname__}"
        if not cfg:
            cfg = {"repr": repr(module_or_config)}
    cfg = {k: v for k, v in cfg.items() if k not in ("_name_or_path", "_diffusers_version", "_use_default_values")}
    text = json.dumps({"class": name, "config": cfg}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def runtime_versions(kind: str = "onnx") -> dict[str, str | None]:
    """The versions an artifact of ``kind`` depends on. ONNX graphs: torch (the exporter), onnx, onnxruntime
    (verification and constant folding) and onnx-graphsurgeon; TensorRT engines: tensorrt and onnx (the
    parser reads the graph), plus torch."""
    if kind == "onnx":
        names = ("torch", "onnx", "onnxruntime", "onnx-graphsurgeon")
    elif kind == "tensorrt":
        names = ("torch", "onnx", "tensorrt")
    else:
        names = ("torch", "onnx", "onnxruntime", "tensorrt")
    out = {n: _version(n) for n in names}
    from msdda import __version__

    out["msdda"] = __version__              # the exporter: what it writes may change with it
    if kind == "tensorrt" and out["tensorrt"] is None:
        for alt in ("tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu12"):
            if _version(alt):
                out["tensorrt"] = _version(alt)
                break
        if out["tensorrt"] is None:
            with contextlib.suppress(Exception):
                import tensorrt

                out["tensorrt"] = tensorrt.__version__
    return out


# ---------------------------------------------------------------------------------------------- keys
def _canonical(value):
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@dataclass(frozen=True)
class CacheKey:
    """What an artifact depends on. ``digest`` is sha256 of the canonical JSON of every field."""
    kind: str                                   # "onnx" | "tensorrt" | anything else a caller caches
    weights: str                                # sha256 of the weights (weights_hash), or of the source file
    precision: str                              # "fp32" | "fp16" | "bf16"
    profile: Mapping = field(default_factory=dict)   # shapes, cond, opset, dynamic axes, build flags...
    architecture: str = ""                      # config_hash of the module
    versions: Mapping = field(default_factory=dict)  # runtime_versions(kind) when left empty
    device: str | None = None                   # e.g. "sm_90" for TensorRT engines
    filename: str = "artifact.bin"              # file name inside the artifact's folder

    def __post_init__(self):
        if not self.kind.isidentifier():
            raise ValueError(f"cache key kind must be an identifier, not {self.kind!r}")
        if "/" in self.filename or self.filename in ("", ".", ".."):
            raise ValueError(f"bad artifact file name {self.filename!r}")
        if not self.versions:
            object.__setattr__(self, "versions", runtime_versions(self.kind))

    def as_dict(self) -> dict:
        return _canonical({"format": CACHE_FORMAT, "kind": self.kind, "weights": self.weights,
                           "precision": self.precision, "profile": self.profile, "architecture": self.architecture,
                           "versions": self.versions, "device": self.device, "filename": self.filename})

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- atomic io
# Shared with the runtime's outputs: one implementation of "appears whole or not at all".
from msdda.atomic import atomic_write_bytes, atomic_write_text, fsync_dir as _fsync_dir  # noqa: E402


@contextlib.contextmanager
def file_lock(path: Path, *, shared: bool = False) -> Iterator[None]:
    """An exclusive (or shared) fcntl.flock on ``path``, held for the block; released when the process dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ---------------------------------------------------------------------------------------------- the cache
class ArtifactCache:
    """Build-once, verify-on-every-use storage for exported artifacts. Safe across threads and processes."""

    def __init__(self, root=None):
        self.root = Path(root).expanduser() if root is not None else default_cache_root()
        self._ready = False

    def __repr__(self) -> str:
        return f"ArtifactCache({str(self.root)!r})"

    # ---- folders
    def _ensure_writable(self) -> None:
        if self._ready:
            return
        try:
            if self.root.exists() and not self.root.is_dir():
                raise ExportError(f"cache folder {self.root} is not a folder")
            for sub in (self.root, self.root / "locks", self.root / "tmp"):
                sub.mkdir(parents=True, exist_ok=True)
            probe = self.root / "tmp" / f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except ExportError:
            raise
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else one_line(exc)
            raise ExportError(f"cache folder {self.root} is not writable ({reason}); set MSDDA_CACHE to a "
                              "writable folder") from None
        self._ready = True

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def artifact_dir(self, key: CacheKey) -> Path:
        return self.root / key.kind / key.digest

    def path_for(self, key: CacheKey) -> Path:
        return self.artifact_dir(key) / key.filename

    # ---- manifest
    def read_manifest(self) -> dict:
        try:
            data = json.loads(self.manifest_path.read_text())
            return data if isinstance(data, dict) and isinstance(data.get("artifacts"), dict) else \
                {"format": CACHE_FORMAT, "artifacts": {}}
        except (OSError, ValueError):
            return {"format": CACHE_FORMAT, "artifacts": {}}

    def _update_manifest(self, digest: str, entry: dict | None) -> None:
        with file_lock(self.root / "locks" / "manifest.lock"):
            manifest = self.read_manifest()
            if entry is None:
                manifest["artifacts"].pop(digest, None)
            else:
                manifest["artifacts"][digest] = entry
            manifest["format"] = CACHE_FORMAT
            atomic_write_text(self.manifest_path, json.dumps(manifest, indent=1, sort_keys=True))

    def entry(self, key: CacheKey) -> dict | None:
        return self.read_manifest()["artifacts"].get(key.digest)

    # ---- validity
    def check(self, key: CacheKey, validate: Callable[[Path], None] | None = None) -> str | None:
        """None when the artifact for ``key`` is present and intact, else why not (one line)."""
        entry = self.entry(key)
        if entry is None:
            return "not in the manifest"
        if entry.get("key") != key.as_dict():
            return "manifest entry is for a different key"
        folder = self.artifact_dir(key)
        files = entry.get("files") or {}
        if key.filename not in files:
            return "manifest entry lists no main file"
        for rel, meta in files.items():
            f = folder / rel
            try:
                size = f.stat().st_size
            except OSError:
                return f"{rel} is missing"
            if size != meta.get("size"):
                return f"{rel} has {size} bytes, the manifest says {meta.get('size')}"
            if file_sha256(f) != meta.get("sha256"):
                return f"{rel} does not match its recorded sha256"
        if validate is not None:
            try:
                validate(folder / key.filename)
            except Exception as exc:  # a load failure means corrupt: rebuild
                return f"does not load ({one_line(exc, 160)})"
        return None

    # ---- the one entry point
    def get_or_build(self, key: CacheKey, build: Callable[[Path], None], *,
                     validate: Callable[[Path], None] | None = None) -> Path:
        """The path of ``key``'s artifact, building it with ``build(path)`` if it is absent or damaged.

        ``build`` writes ``path`` (and may write more files beside it, e.g. external data): it runs in a
        private temporary folder that is renamed into place only after it returned and the files were hashed
        (and ``validate(path)`` passed, if given). Raises ExportError if the cache folder is unwritable.
        """
        self._ensure_writable()
        if self.check(key, validate) is None:           # fast path: no lock needed for a finished artifact
            return self.path_for(key)
        with file_lock(self.root / "locks" / f"{key.digest}.lock"):
            reason = self.check(key, validate)          # another process may have built it while we waited
            if reason is None:
                return self.path_for(key)
            final = self.artifact_dir(key)
            if final.exists() or self.entry(key) is not None:
                self._update_manifest(key.digest, None)
                shutil.rmtree(final, ignore_errors=True)
            self._clean_tmp(key.digest)
            tmp = self.root / "tmp" / f"{key.digest}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            try:
                build(tmp / key.filename)
                if not (tmp / key.filename).is_file():
                    raise ExportError(f"building {key.kind} artifact wrote no {key.filename}")
                if validate is not None:
                    validate(tmp / key.filename)
                files = {}
                for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                    files[f.relative_to(tmp).as_posix()] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, final)
                _fsync_dir(final.parent)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            main = files[key.filename]
            self._update_manifest(key.digest, {
                "kind": key.kind, "file": f"{key.kind}/{key.digest}/{key.filename}", "sha256": main["sha256"],
                "size": main["size"], "files": files, "key": key.as_dict(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            return final / key.filename

    def _clean_tmp(self, digest: str) -> None:
        """Leftovers of a builder of this key that died: we hold the key's lock, so none is alive."""
        for stale in (self.root / "tmp").glob(f"{digest}-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def remove(self, key: CacheKey) -> None:
        self._ensure_writable()
        with file_lock(self.root / "locks" / f"{key.digest}.lock"):
            self._update_manifest(key.digest, None)
            shutil.rmtree(self.artifact_dir(key), ignore_errors=True)

