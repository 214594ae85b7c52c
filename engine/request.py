"""``Request``: one generation request, checked once by the Engine that will run it.

``Engine.check_request(...)`` takes ``Engine.generate``'s arguments, checks every one of them against the loaded
models (and the Engine's limits) and returns a frozen ``Request`` with the per-sample values expanded: a seed, a
weight dict and a coefficient row per sample, class labels per sample, the steps and guidance with the model's
defaults filled in, SDXL's micro-conditioning as one ``MicroConditioning``. ``Engine.generate(request)``,
``Engine.start(request)``, the step scheduler and the coalescer take it as it is and check nothing again.

Every way in builds one through that one check, each from its own format:

- ``msdda generate`` / ``msdda sweep``: ``msdda.cli`` checks the flags' conditioning against the base, then
  ``check_request`` builds the run's request (image i with seed ``--seed`` + i), run in chunks (``take``);
- ``msdda serve``: ``msdda.http_api.parse_request`` turns a ``POST /v1/generate`` body (its JSON shape checked by
  pydantic) into ``check_request``'s arguments, and the replica checks them once;
- ``Request.from_job_row(row, engine)``: one row of an ``msdda batch`` jobs file (shape checked by
  ``msdda.batch.read_jobs``).

Checked requests combine without another check: ``Request.concat`` joins requests that agree on every
whole-call field (``merge_key``) into one engine call, ``Request.take`` keeps some of a request's samples. A
request is trusted only by the Engine that checked it (``Engine.generate`` refuses another Engine's).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import torch

from msdda.conditioning import NO_MICRO, MicroConditioning
from msdda.strategies import Plan, resolve
from msdda.validation import prompt_rows

__all__ = ["Request"]


@dataclass(frozen=True, eq=False)
class Request:
    """A checked generation request (build it with ``Engine.check_request`` or a ``from_*`` constructor).

    Per sample b < batch: ``seeds[b]``, ``weights[b]`` (the weights as given, per sample; empty for a single
    network), ``coefficients[b]`` (c_k over the Engine's members, base first), ``class_labels[b]``. The
    conditioning inputs are kept as given (prompts are encoded when the request starts); tensors are checked
    for shape and finiteness."""
    batch: int
    seeds: tuple[int, ...]
    weights: tuple[dict, ...]
    strategy: str
    coefficients: torch.Tensor          # [batch, members] float64 on the host
    members: tuple[str, ...]            # the Engine's networks, base first
    steps: int
    eta: float
    guidance_scale: float
    latent_size: tuple[int, int]
    output_type: str = "pil"
    prompt: str | tuple[str, ...] | None = None
    negative_prompt: str | tuple[str, ...] | None = None
    num_images_per_prompt: int = 1
    class_labels: tuple[int, ...] | None = None
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    micro: MicroConditioning = NO_MICRO
    latents: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    checked_by: int = field(default=0, repr=False)     # Engine.request_token of the Engine that checked it

    @functools.cached_property
    def plan(self) -> Plan:
        """Which networks run, with which coefficients: derived from the strategy and the coefficients, once."""
        return resolve(self.strategy, self.members, self.coefficients)

    # ------------------------------------------------------------------ from a batch job row
    @classmethod
    def from_job_row(cls, row: Mapping, engine) -> "Request":
        """The request of one ``msdda batch`` job row (one image): ``class`` or ``prompt``, ``weights`` (an object
        or its JSON text), ``seed`` and optionally ``steps``, ``guidance_scale``, ``eta``, ``strategy``; the
        row's ``id`` and fields that are null are not the engine's."""
        call = {"class_labels": row.get("class"), "prompt": row.get("prompt"), "seed": row.get("seed"),
                "steps": row.get("steps"), "guidance_scale": row.get("guidance_scale"), "eta": row.get("eta"),
                "strategy": row.get("strategy")}
        weights = row.get("weights")
        call["weights"] = json.loads(weights) if isinstance(weights, str) else weights
        return engine.check_request(**{k: v for k, v in call.items() if v is not None}, output_type="pil")

    # ------------------------------------------------------------------ combining checked requests
    @property
    def merge_key(self):
        """Requests with equal keys can run as one engine call (``concat``); None: this one runs alone (it holds
        tensors or per-prompt negative prompts). Requests with and without per-sample weights (a single network)
        never share a call."""
        tensors = (self.prompt_embeds, self.negative_prompt_embeds, self.pooled_prompt_embeds,
                   self.negative_pooled_prompt_embeds, self.latents, self.noise)
        if any(t is not None for t in tensors) or not isinstance(self.negative_prompt, (str, type(None))):
            return None
        return (self.checked_by, self.members, self.strategy, self.steps, self.eta, self.guidance_scale,
                self.output_type, self.negative_prompt, self.latent_size, self.micro,
                self.prompt is None, self.class_labels is None, bool(self.weights))

    def prompts_per_sample(self) -> tuple[str, ...] | None:
        """One prompt per sample (diffusers' layout: each prompt's images consecutive)."""
        if self.prompt is None:
            return None
        prompts, repeat = prompt_rows(self.prompt if isinstance(self.prompt, str) else list(self.prompt),
                                      self.batch, self.num_images_per_prompt)
        return tuple(p for p in prompts for _ in range(repeat))

    @classmethod
    def concat(cls, requests: Sequence["Request"]) -> "Request":
        """One request holding every sample of ``requests`` (in order), which share one ``merge_key``: each
        sample keeps its seed, weights, coefficients, label and prompt, so with a batch-invariant Engine
        (``row_block``) its image is the same bits as in its own request."""
        first = requests[0]
        if len(requests) == 1:
            return first
        key = first.merge_key
        if key is None or any(r.merge_key != key for r in requests):
            raise ValueError("these requests cannot share one engine call (their whole-call fields differ)")
        coeff = torch.cat([r.coefficients for r in requests])
        prompts = None if first.prompt is None else tuple(p for r in requests for p in r.prompts_per_sample())
        return replace(first, batch=sum(r.batch for r in requests),
                       seeds=tuple(s for r in requests for s in r.seeds),
                       weights=tuple(w for r in requests for w in r.weights), coefficients=coeff,
                       class_labels=None if first.class_labels is None else
                       tuple(c for r in requests for c in r.class_labels),
                       prompt=prompts, num_images_per_prompt=1)

    def take(self, rows: Sequence[int]) -> "Request":
        """The request of samples ``rows`` of this one (each keeps its seed, weights, label and prompt)."""
        rows = list(rows)
        if self.merge_key is None:
            raise ValueError("a request with tensors or per-prompt negative prompts cannot be split by sample")
        if not rows or not all(0 <= i < self.batch for i in rows):
            raise ValueError(f"rows must be sample indices in 0..{self.batch - 1}")
        coeff = self.coefficients[rows]
        if isinstance(self.prompt, str):
            prompt = self.prompt
        else:
            per_sample = self.prompts_per_sample()
            prompt = None if per_sample is None else tuple(per_sample[i] for i in rows)
        return replace(self, batch=len(rows), seeds=tuple(self.seeds[i] for i in rows),
                       weights=tuple(self.weights[i] for i in rows) if self.weights else (),
                       coefficients=coeff,
                       class_labels=None if self.class_labels is None else tuple(self.class_labels[i] for i in rows),
                       prompt=prompt, num_images_per_prompt=1)
