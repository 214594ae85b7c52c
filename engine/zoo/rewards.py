"""The zoo's three objectives. Plain deterministic functions ``reward(images, class_labels) -> Tensor[B]``.

``images``: [B, 1, 16, 16] in [-1, 1] (ink bright); ``class_labels``: [B] int (the requested digit).

- ``legible``: the temperature-calibrated log-probability of the requested class under the zoo's CNN classifier
  (models/classifier.safetensors): ``log_softmax(logits / LEGIBLE_TEMPERATURE)[class]`` with T = 8. Range
  (-inf, 0]. Differentiable in the images. Why T: the classifier is (correctly) so confident that its raw
  log p(class) is > -0.05 on essentially every base sample (std ~0.004), i.e. saturated, so it carries no signal
  for RL or guidance; at T = 8 it is a smooth, bounded function of the logit margin (base samples: mean ~-0.56,
  std ~0.18). The argmax (class accuracy) is unaffected by T.
- ``bold``: stroke weight = mean ink = mean of (x + 1) / 2. Range [0, 1]. Differentiable.
- ``compressible``: minus the PNG-encoded size of the 8-bit image (PIL, ``optimize=True``,
  ``compress_level=9``), offset by ``COMPRESS_OFFSET_BYTES`` and in units of ``COMPRESS_UNIT_BYTES``:
  ``-(png_bytes - 300) / 64``. Base samples encode to ~300 +- 15 bytes, so this is ~0 +- 0.23: the unit was
  chosen so that its spread over base samples is comparable to ``legible``'s (std ~0.18); ``bold``'s is ~0.03.
  (RL normalises every reward by its std over base samples anyway, see bench/zoo/rl.py.) NOT differentiable (returns a tensor
  without grad) -- the analogue of DDPO's JPEG compressibility; PNG is used because at 16x16 a JPEG file is
  dominated by its ~300-byte constant header and quantisation barely sees thin strokes.

Conflicts: more ink (bold) costs PNG bytes (compressible): on base samples their correlation is clearly
negative. ``legible`` is nearly uncorrelated with both over the base's natural variation; its conflict with
them shows when they are pushed (blobs and faded strokes are less legible) -- see models/README.md for the
measured correlations and each expert's effect on the other two rewards.

``DIFFERENTIABLE`` lists the rewards whose input gradient is meaningful (for reward-gradient guidance).
"""
from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from . import classifier_path
from .classifier import DigitClassifier

LEGIBLE_TEMPERATURE = 8.0
COMPRESS_UNIT_BYTES = 64.0
COMPRESS_OFFSET_BYTES = 300.0

__all__ = ["legible", "bold", "compressible", "REWARDS", "DIFFERENTIABLE", "load_classifier", "png_size",
           "COMPRESS_UNIT_BYTES", "COMPRESS_OFFSET_BYTES", "LEGIBLE_TEMPERATURE"]


@lru_cache(maxsize=4)
def _classifier_cached(path: str, mtime: float) -> DigitClassifier:
    from safetensors.torch import load_file

    m = DigitClassifier()
    m.load_state_dict(load_file(path))
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    """The reward classifier (eval mode, frozen); cached per file."""
    path = Path(path) if path is not None else classifier_path()
    if not path.exists():
        raise FileNotFoundError(f"reward classifier weights not found at {path}; train it with `python bench/train_zoo.py classifier`")
    return _classifier_cached(str(path), path.stat().st_mtime)


def legible(images: torch.Tensor, class_labels: torch.Tensor, *, classifier: DigitClassifier | None = None) -> torch.Tensor:
    clf = classifier if classifier is not None else load_classifier()
    x = images.to(torch.float32)
    logp = torch.log_softmax(clf(x) / LEGIBLE_TEMPERATURE, dim=-1)
    return logp.gather(1, class_labels.to(torch.long).view(-1, 1)).squeeze(1)


def bold(images: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
    return ((images.to(torch.float32) + 1.0) * 0.5).flatten(1).mean(1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    u = ((images.detach().to(torch.float32).cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return u.to(torch.uint8).numpy()


def png_size(img_u8: np.ndarray) -> int:
    """Bytes of the PNG encoding of one [H, W] uint8 image."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img_u8, mode="L").save(buf, format="PNG", optimize=True, compress_level=9)
    return buf.tell()


def compressible(images: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
    u8 = to_uint8(images)
    sizes = [png_size(u8[i, 0]) for i in range(u8.shape[0])]
    r = -(torch.tensor(sizes, dtype=torch.float32) - COMPRESS_OFFSET_BYTES) / COMPRESS_UNIT_BYTES
    return r.to(images.device)


REWARDS = {"legible": legible, "bold": bold, "compressible": compressible}
DIFFERENTIABLE = frozenset({"legible", "bold"})
