"""The step loop: a plain function over one denoiser and one combine callable (k-diffusion style).

All per-call state lives in local variables, so any number of calls may run at once.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

Denoise = Callable[[torch.Tensor, int], torch.Tensor]           # (x_t [B,C,H,W], t) -> raw [K,(2,)B,C_out,H,W]
Combine = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (raw, x_t, step index) -> x_prev


def sample(denoise: Denoise, combine: Combine, x: torch.Tensor, timesteps: Sequence[int], *,
           callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Run the reverse process from x_T [B, C, H, W] over ``timesteps`` (descending) and return x_0."""
    for i, t in enumerate(timesteps):
        x = combine(denoise(x, t), x, i)
        if callback is not None:
            callback(i + 1, len(timesteps))
    return x
