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
    ones; both None for unconditional models. SDXL's added conditioning (the UNet's ``added_cond_kwargs``):
    text_embeds [N, P], the pooled projection of the second text encoder, and time_ids [N, 6], the
    micro-conditioning (original height, width, crop top, left, target height, width).
    """
    encoder_hidden_states: torch.Tensor | None = None
    class_labels: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None


BACKENDS = ("torch", "onnxruntime", "tensorrt")


def full_networks(networks: dict) -> dict:
    """{member name: torch module}: LoRA adapters merged onto the first network (the base), for backends that
    need one full network per member (ONNX export)."""
    from msdda.loading import LoraAdapter, merged_network

    base = next(iter(networks.values()))
    return {name: merged_network(base, net) if isinstance(net, LoraAdapter) else net for name, net in networks.items()}


def make_backend(name: str, networks: dict, **options):
    """Build the named backend over ``networks`` ({member name: torch module or msdda.loading.LoraAdapter of the
    first, the base}, same architecture). The torch backend keeps LoRA adapters as factors (group="lora") or
    merges them itself; the others get merged networks."""
    if name == "torch":
        from .torch_backend import TorchBackend
        return TorchBackend(networks, **options)
    networks = full_networks(networks)
    if name == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend
        return OnnxRuntimeBackend(networks, **options)
    if name == "tensorrt":
        from .tensorrt_backend import TensorRTBackend
        return TensorRTBackend(networks, **options)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
