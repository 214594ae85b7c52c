"""Backends run a group of same-architecture networks on one batch. Picked once, when an Engine is built.

Every backend has the same shape (ARCHITECTURE.md section 5)::

    members: tuple[str, ...]                      # network names, e.g. ("base", "legible", "bold")
    forward(x, t, cond, members) -> Tensor       # [len(members), N, C_out, H, W]
    soup(coeffs) -> Callable[[x, t, cond], Tensor]  # one network with parameters sum_k c_k theta_k

Backends hold only what they loaded at construction; they keep no per-call state, so one backend serves
concurrent calls from several threads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Conditioning:
    """What the networks are conditioned on, already batched to N = (2 if CFG else 1) * B rows.

    encoder_hidden_states: [N, L, D] for text-conditioned UNets; class_labels: [N] int64 for class-conditioned
    ones; both None for unconditional models.
    """
    encoder_hidden_states: torch.Tensor | None = None
    class_labels: torch.Tensor | None = None


BACKENDS = ("torch", "onnxruntime", "tensorrt")


def make_backend(name: str, networks: dict, **options):
    """Build the named backend over ``networks`` ({member name: torch module}, same architecture)."""
    if name == "torch":
        from .torch_backend import TorchBackend
        return TorchBackend(networks, **options)
    if name == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend
        return OnnxRuntimeBackend(networks, **options)
    if name == "tensorrt":
        from .tensorrt_backend import TensorRTBackend
        return TensorRTBackend(networks, **options)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
