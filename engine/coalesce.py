"""Many independent ``Engine.generate`` requests served by as few engine calls as possible.

Requests that agree on every per-call argument (steps, eta, guidance, strategy, output, ...) are merged into one
call with per-sample weights, seeds and conditioning; the others form their own groups. A group whose merged call
fails is split in halves until the failing requests stand alone, so one bad request (an unknown expert, an
infeasible composition) fails only itself and the rest still share calls.

Exactness comes from the Engine, not from here. A sample's noise depends only on its own seed, but CPU math
libraries compute a row's last bits differently at different row counts (MKL's sgemm, oneDNN's convolution
kernels), so on a plain Engine a merged call equals the separate calls only to float32 rounding. An Engine built
with ``row_block=Q`` runs every network call in blocks of exactly Q rows (``msdda.engine.in_row_blocks``): then
each request's share of a merged call is bit-identical to ``engine.generate`` of that request alone on that
Engine (same machine, same thread count), which is how ``msdda serve`` and ``msdda batch`` run by default.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from msdda.validation import seed_list

__all__ = ["Share", "generate_many", "merge_key", "per_sample_fields"]

#: Engine.generate arguments that hold for a whole call: requests must agree on them to share one
CALL_FIELDS = ("steps", "eta", "guidance_scale", "strategy", "output_type", "normalize", "expert_betas", "beta",
               "negative_prompt")
#: arguments that may differ per sample within one call
SAMPLE_FIELDS = ("class_labels", "prompt", "weights", "seed")
_MERGEABLE = frozenset(CALL_FIELDS + SAMPLE_FIELDS + ("num_images",))


@dataclass(frozen=True)
class Share:
    """One request's part of an engine call."""
    images: list | None          # PIL images (None for output_type="latent")
    latents: torch.Tensor        # x_0 [n, C, H, W]
    seeds: list[int]
    weights: list[dict]
    strategy: str
    batch_size: int              # samples in the engine call that made them



# ---------------------------------------------------------------------- grouping
def per_sample_fields(call: Mapping) -> dict | None:
    """The call's per-sample arguments as lists of length num_images, or None when they cannot be spread that
    way (a list of another length, a non-integer num_images): such a request runs alone, and the engine decides
    whether it is valid."""
    n = call.get("num_images", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return None
    out = {}
    for name in SAMPLE_FIELDS:
        value = call.get(name)
        if value is None:
            continue
        if name == "seed" and isinstance(value, int) and not isinstance(value, bool):
            try:
                value = seed_list(value, n)                 # the engine's rule for an int seed
            except ValueError:
                return None                                 # out of range: the engine refuses it alone
        elif isinstance(value, (list, tuple)):
            value = list(value)
        else:
            value = [value] * n
        if len(value) != n:
            return None
        out[name] = value
    if "seed" not in out:
        out["seed"] = list(range(n))                        # Engine.generate's default seed=0
    return out


def merge_key(call: Mapping):
    """Requests with equal keys can share one engine call; None means the request must run alone."""
    if per_sample_fields(call) is None or set(call) - _MERGEABLE:
        return None
    parts = [json.dumps(call.get(name), sort_keys=True, default=repr) for name in CALL_FIELDS]
    # whether a per-sample field is given at all changes what the engine does (default weights, no labels ...)
    parts.append(tuple(call.get(name) is None for name in SAMPLE_FIELDS if name != "seed"))
    return tuple(parts)


def _merged_call(calls: Sequence[Mapping]) -> dict:
    spread = [per_sample_fields(c) for c in calls]
    merged = {name: calls[0].get(name) for name in CALL_FIELDS if name in calls[0]}
    for name in SAMPLE_FIELDS:
        if name in spread[0]:
            merged[name] = [v for s in spread for v in s[name]]
    merged["num_images"] = sum(len(s["seed"]) for s in spread)
    return merged


# ---------------------------------------------------------------------- running
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


def _run(engine, calls: Sequence[Mapping]) -> list:
    """One engine call for ``calls`` (all with one merge key), bisected on failure."""
    if len(calls) == 1:
        try:
            out = engine.generate(**calls[0])
        except Exception as exc:  # noqa: BLE001 -- the caller maps it to this request's error
            return [exc]
        return _shares(out, [len(out.seeds)], calls[0].get("output_type", "pil"))
    merged = _merged_call(calls)
    counts = [len(per_sample_fields(c)["seed"]) for c in calls]
    try:
        out = engine.generate(**merged)
    except Exception:  # noqa: BLE001 -- someone in the group is bad: find out who, the others still share calls
        half = len(calls) // 2
        return _run(engine, calls[:half]) + _run(engine, calls[half:])
    return _shares(out, counts, merged.get("output_type", "pil"))


def generate_many(engine, calls: Sequence[Mapping]) -> list:
    """Run ``Engine.generate(**call)`` for every call, sharing engine calls where the calls allow.

    Returns, in order, one ``Share`` or the exception that call raised. On an Engine with a ``row_block`` every
    Share is bit-identical to ``engine.generate(**call)`` on its own (see the module docstring).
    """
    groups: dict = {}
    order = []
    for i, call in enumerate(calls):
        key = merge_key(call)
        key = ("alone", i) if key is None else key
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(i)
    results: list = [None] * len(calls)
    for key in order:
        members = groups[key]
        for i, result in zip(members, _run(engine, [calls[i] for i in members])):
            results[i] = result
    return results
