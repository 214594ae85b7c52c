"""Many independent ``Engine.generate`` requests served by as few engine calls as possible.

Requests that agree on every per-call argument (steps, eta, guidance, strategy, output, ...) are merged into one
call with per-sample weights, seeds and conditioning; the others form their own groups. A group whose merged call
fails is split in halves until the failing requests stand alone, so one bad request (an unknown expert, an
infeasible composition) fails only itself and the rest still share calls.

Exact batching. A sample's noise depends only on its own seed, but the CPU math libraries do not compute a row
the same way at every batch size: MKL's sgemm (``nn.Linear``) gives a row different last bits for 1, 2-3 and
4+ rows, oneDNN's convolutions pick kernels by batch size and thread count. So a merged call is, by default, run
under ``SeparateRequestRows``: every linear and convolution is computed on each request's own rows, in the
shapes that request's direct call has, while everything else (the Python-level UNet traversal, norms,
activations, the fused step) still runs once for the whole batch. Each image is then bit-identical to
``engine.generate`` of its request alone on the same machine and thread count, with one exception outside this
module: the fused step's CPU torch path (no Triton) treats a call with a single sample differently from a call
with several (``msdda.kernels.compose``), so a one-image request can differ from its direct call in the last
bits there. ``exact=False`` skips the regrouping and merges plainly: faster, with images equal to the direct
call only to float32 rounding.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["Share", "SeparateRequestRows", "encode_png", "generate_many", "merge_key", "per_sample_fields"]

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


def encode_png(image) -> bytes:
    """PNG bytes of a PIL image, encoded exactly as ``msdda generate`` writes its files (PIL's defaults), so a
    served or batch-generated image and a file written by the CLI compare byte for byte."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


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
            value = [value + i for i in range(n)]           # the engine's rule: sample i gets seed + i
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


def merge_key(call: Mapping, *, exact: bool = True):
    """Requests with equal keys can share one engine call; None means the request must run alone."""
    if per_sample_fields(call) is None or set(call) - _MERGEABLE:
        return None
    if exact and call.get("strategy", "msdda") == "soup":
        return None     # soup runs one averaged network per distinct weight vector, over rows from several requests
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


# ---------------------------------------------------------------------- exact batching
def _layout_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (dense) re-laid-out with ``like``'s dimension order in memory (e.g. channels-last), because the math
    libraries choose their kernels by memory layout as well as by shape."""
    if t.dim() < 2 or like.is_contiguous():
        return t
    order = sorted(range(like.dim()), key=lambda d: (-like.stride(d), d))   # outermost dimension first
    inverse = [order.index(d) for d in range(like.dim())]
    return t.permute(order).contiguous().permute(inverse)


class SeparateRequestRows(TorchFunctionMode):
    """Run every linear layer and convolution on each request's rows separately (see the module docstring).

    ``counts``: samples per request, in the order their rows are concatenated in the merged call. An input whose
    leading dimension is m * sum(counts) is taken as m blocks of the batch (the CFG halves, stacked experts), so
    request r's rows are its samples in every block, in the order its own call would have them. Row groups only
    regroup row-wise operations, so a tensor that is not laid out that way still gets correct values. Modes are
    per thread: enter it in the thread that calls ``Engine.generate``.
    """

    SPLIT_ROWS = frozenset({torch.nn.functional.linear, torch.nn.functional.conv1d, torch.nn.functional.conv2d,
                       torch.nn.functional.conv3d, torch.nn.functional.conv_transpose1d,
                       torch.nn.functional.conv_transpose2d, torch.nn.functional.conv_transpose3d})

    def __init__(self, counts: Sequence[int]):
        super().__init__()
        self.counts = tuple(int(n) for n in counts)
        self.total = sum(self.counts)
        self._rows: dict[tuple, tuple] = {}

    def _row_groups(self, rows: int, device) -> tuple[list[torch.Tensor], torch.Tensor]:
        key = (rows, str(device))
        if key not in self._rows:
            blocks = rows // self.total
            groups, start = [], 0
            for n in self.counts:
                groups.append(torch.cat([torch.arange(b * self.total + start, b * self.total + start + n)
                                         for b in range(blocks)]).to(device))
                start += n
            self._rows[key] = (groups, torch.cat(groups))
        return self._rows[key]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if len(self.counts) > 1 and args and isinstance(args[0], torch.Tensor):
            if func in self.SPLIT_ROWS:
                return self._per_request(func, args, kwargs, dim=0)
            if func is torch.bmm:     # LoRA deltas: [members, rows, features] (rows of a@b depend on a's rows only)
                return self._per_request(func, args, kwargs, dim=1)
        return func(*args, **kwargs)

    def _per_request(self, func, args, kwargs, dim: int):
        x = args[0]
        rows = x.shape[dim] if x.dim() >= 2 else 0
        if rows < self.total or rows % self.total:
            return func(*args, **kwargs)
        groups, order = self._row_groups(rows, x.device)
        outs = [func(_layout_like(x.index_select(dim, g), x), *args[1:], **kwargs) for g in groups]
        shape = list(outs[0].shape)
        shape[dim] = rows
        out = _layout_like(outs[0].new_empty(shape), outs[0])
        out.index_copy_(dim, order, torch.cat(outs, dim))
        return out


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


def _run(engine, calls: Sequence[Mapping], exact: bool) -> list:
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
        if exact:
            with SeparateRequestRows(counts):
                out = engine.generate(**merged)
        else:
            out = engine.generate(**merged)
    except Exception:  # noqa: BLE001 -- someone in the group is bad: find out who, the others still share calls
        half = len(calls) // 2
        return _run(engine, calls[:half], exact) + _run(engine, calls[half:], exact)
    return _shares(out, counts, merged.get("output_type", "pil"))


def generate_many(engine, calls: Sequence[Mapping], *, exact: bool = True) -> list:
    """Run ``Engine.generate(**call)`` for every call, sharing engine calls where the calls allow.

    Returns, in order, one ``Share`` or the exception that call raised. With ``exact`` (the default) every
    Share is bit-identical to ``engine.generate(**call)`` on its own (same machine, same thread count); a
    backend that is not torch (ONNX Runtime, TensorRT) computes rows outside torch, so there ``exact`` runs each
    call alone.
    """
    if exact and getattr(engine, "backend_name", "torch") != "torch":
        return [r for call in calls for r in _run(engine, [call], exact)]
    groups: dict = {}
    order = []
    for i, call in enumerate(calls):
        key = merge_key(call, exact=exact)
        key = ("alone", i) if key is None else key
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(i)
    results: list = [None] * len(calls)
    for key in order:
        members = groups[key]
        for i, result in zip(members, _run(engine, [calls[i] for i in members], exact)):
            results[i] = result
    return results
