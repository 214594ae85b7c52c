"""The evaluation's rewards: the zoo's reward functions (msdda.zoo.rewards), their fixed scales s_k, the weighted
reward sum_k w_k r_k / s_k that CoDe ranks by and RGG follows, and the scoring of finished samples."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from msdda.zoo import zoo_paths
from msdda.zoo import rewards as zoo_rewards

__all__ = ["make_rewards", "load_reward_scales", "weighted_reward", "score_all"]


def make_rewards(classifier_file: str | Path | None = None, device="cpu") -> dict[str, Callable]:
    """{name: fn(images [B,1,16,16] in [-1,1], labels [B]) -> [B]} for the zoo's objectives (the classifier on
    ``device``; labels follow the images)."""
    clf = zoo_rewards.load_classifier(classifier_file)
    if torch.device(device).type != "cpu":
        clf = copy.deepcopy(clf).to(device)         # never move the shared cached instance

    def legible(images, labels):
        return zoo_rewards.legible(images, labels.to(images.device), classifier=clf)

    return {"legible": legible, "bold": zoo_rewards.bold, "compressible": zoo_rewards.compressible}


def load_reward_scales(root: str | Path | None) -> dict[str, float] | None:
    """s_k = std of each reward over base samples (``<root>/base/metrics.json``, written by the zoo's training);
    the normalisation the experts and oracles were trained with. None when the file is absent."""
    path = Path(root if root is not None else zoo_paths()["base"].parent) / "base" / "metrics.json"
    try:
        m = json.loads(path.read_text())
        return {k: float(v["std"]) for k, v in m["reward_stats"]["per_reward"].items()}
    except (OSError, KeyError, TypeError, ValueError):
        return None


def weighted_reward(images: torch.Tensor, labels: torch.Tensor, weights: Mapping[str, float],
                    reward_fns: Mapping[str, Callable], scales: Mapping[str, float] | None = None) -> torch.Tensor:
    """sum_k w_k r_k(images) / s_k over the objectives with w_k != 0 -> [B] (differentiable where r_k is)."""
    total = None
    for name, w in weights.items():
        if float(w) == 0.0:
            continue
        s = float(scales[name]) if scales is not None else 1.0
        term = reward_fns[name](images, labels).to(device=images.device, dtype=torch.float32) * (float(w) / s)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("weighted_reward: every weight is zero")
    return total


def score_all(x0: torch.Tensor, labels: torch.Tensor, reward_fns: Mapping[str, Callable]) -> dict[str, np.ndarray]:
    """Every reward of x_0 (clamped to [-1, 1]) -> {name: float64 array [B]}."""
    images = x0.detach().float().clamp(-1.0, 1.0)
    labels = labels.to(images.device)
    with torch.no_grad():
        return {name: fn(images, labels).double().cpu().numpy() for name, fn in reward_fns.items()}
