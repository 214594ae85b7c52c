"""The small CNN digit classifier behind the ``legible`` reward (weights: models/classifier.safetensors).

Smooth activations (SiLU) and no batch-norm, so it is deterministic in eval and its input gradient is usable
for reward-gradient guidance. ~66k parameters (fp32, ~260 kB). Trained on the zoo's train split with light
augmentation (random +-2 px shifts, Gaussian pixel noise) so that it also judges imperfect generated samples
(the recipe: bench/zoo/train.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import NUM_CLASSES


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
