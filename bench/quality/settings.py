"""What the evaluation's numbers depend on: the strategies, the settings, and the experts' KL strength."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from msdda.zoo import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, KL_BETA, OBJECTIVES

from .samplers import SEED_STRIDE

__all__ = ["STRATEGIES", "WEIGHTED", "ENGINE_STRATEGIES", "MIN_HONEST_SAMPLES", "EvalSettings", "quick_settings",
           "trained_beta"]

STRATEGIES = ("msdda", "mpa", "soup", "base", "code", "rgg", "oracle")
WEIGHTED = ("msdda", "mpa", "soup", "code", "rgg")   # strategies swept over the weights
ENGINE_STRATEGIES = ("msdda", "mpa", "soup")
MIN_HONEST_SAMPLES = 256


@dataclass(frozen=True)
class EvalSettings:
    """Everything the numbers depend on. The defaults are the real evaluation."""

    samples: int = 256                 # images per weight point (class labels b % 10, seeds seed + b)
    steps: int = DEFAULT_STEPS         # DDPM steps (the zoo's default)
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    seed: int = 0
    pair_step: float = 0.1             # w in {0, 0.1, ..., 1} for each pair
    triple_step: float = 0.2           # simplex grid for the triple (see grids.simplex_weights)
    code_candidates: int = 8           # CoDe: N candidates per block
    code_block: int = 5                # CoDe: steps per block
    rgg_scale: float | None = None     # RGG: None -> 1 / beta, the experts' trained KL strength
    batch_size: int = 128              # images per Engine.generate call (CoDe: batch_size // N per call)
    timing_images: int = 64            # images per strategy in the timing pass
    grid_images: int = 40              # images in each grid (4 rows of the 10 digits)
    hv_margin: float = 0.05            # reference point = min - hv_margin * (max - min), per objective
    bootstrap: int = 500               # paired bootstrap replicates for the hypervolume intervals

    def rgg(self) -> float:
        return float(self.rgg_scale) if self.rgg_scale is not None else 1.0 / KL_BETA

    def validate(self) -> None:
        for name in ("samples", "steps", "code_candidates", "code_block", "batch_size", "timing_images"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("pair_step", "triple_step"):
            v = getattr(self, name)
            n = round(1.0 / v) if v > 0 else 0
            if not (0 < v <= 1) or abs(n * v - 1.0) > 1e-9:
                raise ValueError(f"{name} must divide 1 (e.g. 0.1, 0.2, 0.25, 0.5), got {v!r}")
        if not (math.isfinite(self.guidance_scale)):
            raise ValueError(f"guidance_scale must be finite, got {self.guidance_scale!r}")
        if not 0 <= self.seed < SEED_STRIDE - self.samples:
            raise ValueError(f"seed must lie in [0, 2**40 - samples), got {self.seed}")


def quick_settings(steps: int | None = None) -> EvalSettings:
    """The ``--quick`` smoke evaluation: 8 samples, w in {0, 0.5, 1}, 10 steps. NOT the real evaluation."""
    return EvalSettings(samples=8, steps=steps or 10, pair_step=0.5, triple_step=0.5, timing_images=8,
                        grid_images=8, bootstrap=100)


def trained_beta(paths: Mapping[str, Path], names: Sequence[str] = OBJECTIVES) -> tuple[float, str]:
    """The KL strength the experts were trained with (``<expert>/metrics.json`` config.beta, written by the
    zoo's training), else the package's KL_BETA. -> (beta, where it came from)."""
    for name in names:
        if name in paths:
            try:
                m = json.loads((Path(paths[name]) / "metrics.json").read_text())
                return float(m["config"]["beta"]), str(Path(paths[name]) / "metrics.json")
            except (OSError, KeyError, TypeError, ValueError):
                continue
    return float(KL_BETA), "msdda.zoo.KL_BETA"
