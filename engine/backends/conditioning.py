"""The conditioning every backend takes (one leaf module: the backends import it, and the package's factory
imports the backends lazily, so nothing imports in a circle)."""
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
