"""What the Engine hands its backend, obtained at construction through msdda.export's public API and cache.

- torch: the loaded modules themselves.
- onnxruntime: an ``OnnxSet``: one ONNX graph per member, from ``onnx_paths`` / ``onnx_dir`` (an export folder
  written by ``msdda export``) where given, else the cached export of the member's module; every file must carry
  the ``weights_hash`` of the module loaded for that member (checked here, and again by the backend on load).
- tensorrt: ``EnginePlans`` over that set (plan files are built, refitted and cached by msdda.export.tensorrt
  when the backend asks for a batch size; the backend only reads and deserializes them).

Options taken here (the rest go to the backend): ``cache_dir`` (a folder or an ArtifactCache; default
``$MSDDA_CACHE`` or ``~/.cache/msdda``), ``onnx_paths`` ({member: file}), ``onnx_dir`` (an export folder) and,
for TensorRT, ``precision``, ``refit``, ``dynamic``, ``max_batch``, ``timing_cache`` and any other keyword
(TensorRT build options such as ``workspace_bytes``, ``optimization_level``, ``strip_weights``).
"""
from __future__ import annotations

from typing import Mapping

__all__ = ["backend_source", "BACKEND_RUNTIME_OPTIONS"]

# Options each artifact backend's constructor takes itself; everything else is about obtaining its artifacts.
BACKEND_RUNTIME_OPTIONS = {"onnxruntime": ("threads", "parallel"), "tensorrt": ("batch",)}
_PLAN_FIELDS = ("precision", "refit", "dynamic", "max_batch", "timing_cache")


def backend_source(backend: str, networks: Mapping, *, spec: Mapping, options: Mapping) -> tuple[object, dict]:
    """(what ``make_backend(backend, ...)`` loads, the options left for the backend's constructor).

    networks: {member: torch module}; spec: the graphs' I/O (sample_shape, cond, text_shape). Raises
    ArtifactMismatch (a ValueError) when a given file was made from other weights or names no weights."""
    if backend not in BACKEND_RUNTIME_OPTIONS:
        return networks, dict(options)
    from msdda.export import ArtifactCache, onnx_set_for, read_export_folder, weights_hash

    options = dict(options)
    runtime = {k: options.pop(k) for k in BACKEND_RUNTIME_OPTIONS[backend] if k in options}
    if backend == "tensorrt":
        from msdda.export.tensorrt import require_tensorrt

        require_tensorrt()                      # before minutes of export, not after
    cache = options.pop("cache_dir", None)
    cache = cache if isinstance(cache, ArtifactCache) else ArtifactCache(cache)
    onnx_dir, onnx_paths = options.pop("onnx_dir", None), options.pop("onnx_paths", None)
    given = {} if onnx_dir is None else {k: v for k, v in read_export_folder(onnx_dir).items() if k in networks}
    given.update(onnx_paths or {})
    if backend == "onnxruntime" and options:
        raise ValueError(f"unknown option {sorted(options)[0]!r} for backend='onnxruntime'")
    weights = {name: weights_hash(net) for name, net in networks.items()}
    onnx = onnx_set_for(networks, cache=cache, weights_sha256=weights, onnx_paths=given, **spec)
    if backend == "onnxruntime":
        return onnx, runtime
    from msdda.export.tensorrt import EnginePlans

    fields = {k: options.pop(k) for k in _PLAN_FIELDS if k in options}
    return EnginePlans(onnx, build_options=options, **fields), runtime
