"""The weight points: a grid per pair of objectives, a simplex grid for more, and their cache identity."""
from __future__ import annotations

import itertools
from typing import Mapping, Sequence

from msdda.zoo import OBJECTIVES

__all__ = ["pair_weights", "simplex_weights", "combinations", "combo_name", "canonical_weights"]


def pair_weights(pair: Sequence[str], step: float = 0.1) -> list[dict[str, float]]:
    """[{a: w, b: 1 - w}] for w = 0, step, ..., 1 (w is the first objective's weight, as for the oracles)."""
    n = round(1.0 / step)
    a, b = pair
    return [{a: round(i / n, 10), b: round(1 - i / n, 10)} for i in range(n + 1)]


def simplex_weights(objectives: Sequence[str], step: float = 0.2) -> list[dict[str, float]]:
    """All weight vectors with entries in {0, step, ..., 1} summing to 1 (a regular simplex grid).

    The default step 0.2 (21 points for three objectives) is chosen because its 15 edge points are exactly
    points of the pairs' 0.1 grids (0, 0.2, ..., 1), which are evaluated anyway, so the triple costs only its
    6 interior points; step 0.25 would be coarser (15 points, 3 interior) and yet need 12 new points.
    """
    n = round(1.0 / step)
    k = len(objectives)
    out = []
    for combo in itertools.product(range(n + 1), repeat=k - 1):
        if sum(combo) <= n:
            parts = list(combo) + [n - sum(combo)]
            out.append({o: round(p / n, 10) for o, p in zip(objectives, parts)})
    return sorted(out, key=lambda w: tuple(-w[o] for o in objectives))


def combinations(objectives: Sequence[str] = OBJECTIVES) -> list[tuple[str, ...]]:
    """Every pair of objectives, then all of them together."""
    combos = [tuple(p) for p in itertools.combinations(objectives, 2)]
    if len(objectives) > 2:
        combos.append(tuple(objectives))
    return combos


def combo_name(objectives: Sequence[str]) -> str:
    return "+".join(objectives)


def canonical_weights(weights: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    """Weights with zeros dropped, in OBJECTIVES order (then any others, sorted): the cache identity."""
    order = {o: i for i, o in enumerate(OBJECTIVES)}
    items = [(k, round(float(v), 10)) for k, v in weights.items() if float(v) != 0.0]
    return tuple(sorted(items, key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
