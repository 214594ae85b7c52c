"""The zoo's training data: scikit-learn's 8x8 handwritten digits, upsampled to 16x16, and the classifier's
augmentation.

``load_digits`` ships inside scikit-learn (no download): 1797 grey images with values 0..16 (ink is *high*),
10 classes. We upsample bilinearly (``F.interpolate(..., mode="bilinear", align_corners=False)``) to 16x16 and
map 0..16 to [-1, 1], so background is -1 and ink is bright (close to +1).

The train/val split is deterministic: a fixed permutation drawn from a seeded ``torch.Generator`` (seed
``SPLIT_SEED``), the last ``N_VAL`` images are validation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
SPLIT_SEED = 0
N_VAL = 297  # 1500 train / 297 val

__all__ = ["IMAGE_SIZE", "load_digits_16", "train_val_split", "to_unit", "from_unit", "augment"]


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]."""
    return (x + 1.0) * 0.5


def from_unit(u: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return u * 2.0 - 1.0


def load_digits_16() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (images [N, 1, 16, 16] float32 in [-1, 1], labels [N] int64), in sklearn's order."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype("float32")).unsqueeze(1) / 16.0  # [N,1,8,8] in [0,1]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = from_unit(x.clamp(0.0, 1.0)).contiguous()
    y = torch.from_numpy(d.target.astype("int64"))
    return x, y


def train_val_split() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((x_train, y_train), (x_val, y_val)); deterministic (seeded permutation)."""
    x, y = load_digits_16()
    g = torch.Generator().manual_seed(SPLIT_SEED)
    perm = torch.randperm(x.shape[0], generator=g)
    tr, va = perm[:-N_VAL], perm[-N_VAL:]
    return (x[tr], y[tr]), (x[va], y[va])


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The classifier's training augmentation: random integer shifts in [-2, 2] (background-padded) and Gaussian
    pixel noise (std U(0, 0.2)), so that it also judges imperfect generated samples."""
    b = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dx = torch.randint(0, 5, (b,), generator=g)
    dy = torch.randint(0, 5, (b,), generator=g)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + IMAGE_SIZE, dx[i]:dx[i] + IMAGE_SIZE] for i in range(b)])
    sigma = torch.rand(b, 1, 1, 1, generator=g) * 0.2
    return (out + sigma * torch.randn(out.shape, generator=g)).clamp(-1.0, 1.0)
