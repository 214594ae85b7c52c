"""Many independent checked ``Request``s served by as few engine calls as possible.

Requests that agree on every whole-call field (``Request.merge_key``: steps, eta, guidance, strategy, output,
negative prompt, image size, ...) are joined into one request (``Request.concat``), each sample keeping its own
seed, weights, coefficients and conditioning; the others form their own groups. A group whose joined call fails
is split in halves until the failing requests stand alone, so one bad request (an infeasible composition) fails
only itself and the rest still share calls. Nothing is checked here: each request was checked once, when it was
built (``Engine.check_request`` or a ``Request.from_*`` constructor).

Exactness comes from the Engine, not from here. A sample's noise depends only on its own seed, but CPU math
libraries compute a row's last bits differently at different row counts (MKL's sgemm, oneDNN's convolution
kernels), so on a plain Engine a joined call equals the separate calls only to float32 rounding. An Engine built
with ``row_block=Q`` runs every network call in blocks of exactly Q rows (``msdda.engine.in_row_blocks``): then
each request's share of a joined call is bit-identical to ``engine.generate(request)`` alone on that Engine
(same machine, same thread count), which is how ``msdda serve`` and ``msdda batch`` run by default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from msdda.request import Request

__all__ = ["Share", "generate_many"]


@dataclass(frozen=True)
class Share:
    """One request's part of an engine call."""
    images: list | None          # PIL images (None for output_type="latent")
    latents: torch.Tensor        # x_0 [n, C, H, W]
    seeds: list[int]
    weights: list[dict]
    strategy: str
    batch_size: int              # samples in the engine call that made them


def _shares(out, counts: Sequence[int], output_type: str) -> list[Share]:
    shares, start = [], 0
    batch = sum(counts)
    for n in counts:
        stop = start + n
        images = None if output_type == "latent" else list(out.images[start:stop])
        weights = list(out.weights[start:stop]) if out.weights else []
        shares.append(Share(images, out.latents[start:stop], list(out.seeds[start:stop]), weights, out.strategy,
                            batch))
        start = stop
    return shares


def _run(engine, requests: Sequence[Request]) -> list:
    """One engine call for ``requests`` (all with one merge key), bisected on failure."""
    try:
        out = engine.generate(Request.concat(requests))
    except Exception as exc:  # noqa: BLE001 -- someone in the group is bad: find out who, the others still share
        if len(requests) == 1:
            return [exc]
        half = len(requests) // 2
        return _run(engine, requests[:half]) + _run(engine, requests[half:])
    return _shares(out, [r.batch for r in requests], requests[0].output_type)


def generate_many(engine, requests: Sequence[Request]) -> list:
    """Run every checked request on ``engine``, sharing engine calls where the requests allow.

    Returns, in order, one ``Share`` or the exception that request raised. On an Engine with a ``row_block``
    every Share is bit-identical to ``engine.generate(request)`` on its own (see the module docstring).
    """
    groups: dict = {}
    for i, request in enumerate(requests):
        key = request.merge_key
        groups.setdefault(("alone", i) if key is None else key, []).append(i)
    results: list = [None] * len(requests)
    for members in groups.values():            # dicts keep insertion order: groups in order of first arrival
        for chunk in _within(members, [requests[i].batch for i in members], engine.limits.max_images):
            for i, result in zip(chunk, _run(engine, [requests[i] for i in chunk])):
                results[i] = result
    return results


def _within(members: list[int], sizes: list[int], max_images: int) -> list[list[int]]:
    """``members`` in consecutive chunks of at most ``max_images`` samples (the Engine's per-call limit, which
    each request met alone when it was checked)."""
    chunks, current, total = [], [], 0
    for i, n in zip(members, sizes):
        if current and total + n > max_images:
            chunks.append(current)
            current, total = [], 0
        current.append(i)
        total += n
    return chunks + [current] if current else chunks
