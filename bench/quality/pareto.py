"""Pareto fronts and exact hypervolume, maximising every objective."""
from __future__ import annotations

import numpy as np

__all__ = ["pareto_mask", "hypervolume"]


def pareto_mask(points) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``points`` [n, d] (maximising every column).

    Row i is dominated when some row j is >= in every column and > in at least one. Duplicates are all kept.
    """
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"points must be [n, d], got shape {p.shape}")
    n = p.shape[0]
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        ge = np.all(p >= p[i], axis=1)
        gt = np.any(p > p[i], axis=1)
        if np.any(ge & gt):
            keep[i] = False
    return keep


def hypervolume(points, ref) -> float:
    """Exact hypervolume dominated by ``points`` [n, d] above the reference point ``ref`` [d] (maximising).

    The union of the boxes [ref, p]. d = 1: max - ref; d = 2: a sweep over x (descending); d >= 3: slicing
    along the last objective (between consecutive distinct levels the cross-section is the (d-1)-dimensional
    hypervolume of the points at or above the level). Points not strictly above ``ref`` in every objective
    contribute nothing.
    """
    p = np.asarray(points, dtype=np.float64).reshape(-1, len(ref)) if len(points) else np.zeros((0, len(ref)))
    r = np.asarray(ref, dtype=np.float64)
    if p.size and not np.all(np.isfinite(p)):
        raise ValueError("hypervolume: points contain NaN or Inf")
    p = p[np.all(p > r, axis=1)]
    if p.shape[0] == 0:
        return 0.0
    return float(_front_volume(p[pareto_mask(p)], r))


def _front_volume(p: np.ndarray, r: np.ndarray) -> float:
    d = p.shape[1]
    if d == 1:
        return float(p[:, 0].max() - r[0])
    if d == 2:
        order = np.argsort(-p[:, 0], kind="stable")
        area, best_y = 0.0, r[1]
        for i in order:
            x, y = p[i]
            if y > best_y:
                area += (x - r[0]) * (y - best_y)
                best_y = y
        return area
    levels = np.unique(p[:, -1])[::-1]          # distinct last-objective values, descending
    vol = 0.0
    for k, z in enumerate(levels):
        below = levels[k + 1] if k + 1 < len(levels) else r[-1]
        sl = p[p[:, -1] >= z][:, :-1]
        vol += _front_volume(sl[pareto_mask(sl)], r[:-1]) * (z - below)
    return vol
