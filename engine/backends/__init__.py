"""Backends run a group of same-architecture networks on one batch. Picked once, when an Engine is built.

Every backend has the same shape (ARCHITECTURE.md section 5)::

    members: tuple[str, ...]                      # network names, e.g. ("base", "legible", "bold")
    forward(x, t, cond, members) -> Tensor       # [len(members), N, C_out, H, W]
    soup(coeffs) -> Callable[[x, t, cond], Tensor]  # one network with parameters sum_k c_k theta_k

Backends hold only what they loaded at construction; they keep no per-call state, so one backend serves
concurrent calls from several threads. They build nothing: the torch backend takes the loaded modules, the
ONNX Runtime and TensorRT backends take the artifacts the Engine obtained from msdda.export (an ``OnnxSet`` /
``EnginePlans``) and only load them, checking each file's own weights sha256 against the member's.
"""
from __future__ import annotations

from .conditioning import Conditioning  # noqa: F401  (the interface type, re-exported)

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def make_backend(name: str, source, **options):
    """Build the named backend over what it loads: ``source`` is {member name: torch module} (same architecture)
    for "torch", an ``msdda.export.OnnxSet`` for "onnxruntime", an ``msdda.export.tensorrt.EnginePlans`` for
    "tensorrt"."""
    if name == "torch":
        from .torch_backend import TorchBackend
        return TorchBackend(source, **options)
    if name == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend
        return OnnxRuntimeBackend(source, **options)
    if name == "tensorrt":
        from .tensorrt_backend import TensorRTBackend
        return TensorRTBackend(source, **options)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
