"""The small CNN digit classifier behind the ``legible`` reward (weights: models/classifier.safetensors).

Smooth activations (SiLU) and no batch-norm, so it is deterministic in eval and its input gradient is usable
for reward-gradient guidance. ~66k parameters (fp32, ~260 kB). Trained on the zoo's train split with light
augmentation (random +-2 px shifts, Gaussian pixel noise) so that it also judges imperfect generated samples.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import NUM_CLASSES


class DigitClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 64, 3, padding=1)
        self.c4 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 1, 16, 16] in [-1, 1] -> logits [B, 10]."""
        h = F.silu(self.c1(x))
        h = F.avg_pool2d(F.silu(self.c2(h)), 2)  # 8x8
        h = F.avg_pool2d(F.silu(self.c3(h)), 2)  # 4x4
        h = F.silu(self.c4(h)).mean(dim=(2, 3))
        return self.fc(h)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random integer shifts in [-2, 2] (background-padded) and Gaussian pixel noise (std U(0, 0.2))."""
    b = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dx = torch.randint(0, 5, (b,), generator=g)
    dy = torch.randint(0, 5, (b,), generator=g)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + 16, dx[i]:dx[i] + 16] for i in range(b)])
    sigma = torch.rand(b, 1, 1, 1, generator=g) * 0.2
    return (out + sigma * torch.randn(out.shape, generator=g)).clamp(-1.0, 1.0)
