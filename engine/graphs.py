"""Whole-step CUDA graphs for ``Engine.generate`` (the torch backend on CUDA; ARCHITECTURE.md section 8).

One step of ``generate`` runs on static buffers and a device step counter:

    t = timesteps[counter]                      # float32 table on the device, uploaded once per call
    raw = denoise(x, t)                         # the K networks on the CFG batch: [K, (2,) B, C_out, H, W]
    raw = mix_outputs(raw, mix_coeff)           # mpa only
    plan.launch(raw, x, out, step=counter)      # the fused step: scalars, guidance, Philox offset from the table
    counter += 1; x <- out

Every step is then the same work on the same addresses, so it is captured once as a CUDA graph and replayed
``steps`` times with no host work between replays. ``StepGraph.step`` is that function; it also runs eagerly (on
the CPU too), which is how the tests check it against ``generate``'s eager loop bit for bit.

- ``StepKey``: what a captured step is specialised on (batch, latent shape, members, CFG, dtype, strategy kind,
  noise mode, conditioning shapes, the fused kernel's variance modes and clipping, the step-table capacity).
  The step table holds ``capacity`` rows (the Engine's ``limits.max_steps``), so one graph serves any number of
  steps, any eta and any guidance scale; given noise ([steps, B, C, H, W]) makes the noise table, and so the
  key, depend on ``steps``.
- ``StepInputs``: one call's values, copied into a graph's static buffers before its first replay.
- ``StepGraph``: the static buffers, the step, and the replay of its capture.
- ``StepGraphCache``: graphs by key, owned by the Engine, bounded (least recently used idle graphs are dropped)
  and thread-safe: a graph serves one call at a time (``checkout`` / ``checkin``; a second concurrent call with
  the same key captures a second graph). A failed capture logs one line and that key runs eagerly from then on.
- ``capture_cuda_graph`` (the default capturer) and ``replay_eagerly`` (no capture: the seam the CPU tests use).
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from msdda.backends import Conditioning
from msdda.errors import one_line
from msdda.backends.torch_backend import concurrent_members
from msdda.kernels import StepScalars, prepare_fused_step, raise_if_bad
from msdda.kernels.fused_step import step_table_row
from msdda.sampling import Denoise
from msdda.strategies import mix_outputs

__all__ = ["StepKey", "StepInputs", "StepGraph", "StepGraphCache", "capture_cuda_graph", "replay_eagerly",
           "sample_graphed", "step_key", "step_table"]

log = logging.getLogger("msdda")

Capture = Callable[[Callable[[], None]], Callable[[], None]]   # step -> replay


@dataclass(frozen=True)
class StepKey:
    """What one captured step is specialised on."""
    batch: int
    latent: tuple[int, ...]        # x_t's [C, H, W]
    members: tuple[int, ...]       # the backend members the step runs
    cfg: bool
    dtype: torch.dtype
    kind: str                      # the plan's kind: "product" | "mix" | "single"
    noise: str                     # "philox", or "given/<steps>" (a noise table of that many steps)
    cond: tuple                    # (field, shape, dtype) of each conditioning tensor
    var_modes: tuple[int, ...]     # the schedule's variance modes (the fused kernel is specialised on them)
    clip: bool                     # x0 clipping on (a constexpr of the fused kernel)
    capacity: int                  # rows of the step table

    def describe(self) -> str:
        return (f"batch {self.batch}, latent {list(self.latent)}, members {list(self.members)}, "
                f"{'CFG' if self.cfg else 'no CFG'}, {str(self.dtype).removeprefix('torch.')}, {self.kind}, "
                f"noise {self.noise}")


@dataclass(frozen=True)
class StepInputs:
    """One ``generate`` call's values for a step graph (all on the device)."""
    x: torch.Tensor                      # x_T [B, C, H, W]
    cond: Conditioning                   # [2B] rows under CFG
    timesteps: Sequence[int]
    scalars: Sequence[StepScalars]       # one per step
    guidance: float | None               # the CFG scale, None without CFG
    step_coeff: torch.Tensor             # c_k of the fused step, float32 [B, K] ([B, 1] after a mix)
    mix_coeff: torch.Tensor              # mpa's mixing weights, float32 [B, K]
    seeds: torch.Tensor | None           # int64 [B]: Philox noise (step i at offset 1 + i)
    noise: torch.Tensor | None           # [steps, B, C, H, W]: given noise


def step_key(inputs: StepInputs, members: tuple[int, ...], kind: str, capacity: int) -> StepKey:
    steps = len(inputs.timesteps)
    cond = tuple((name, tuple(v.shape), v.dtype) for name, v in vars(inputs.cond).items() if v is not None)
    return StepKey(batch=inputs.x.shape[0], latent=tuple(inputs.x.shape[1:]), members=tuple(members),
                   cfg=inputs.guidance is not None, dtype=inputs.x.dtype, kind=kind,
                   noise="philox" if inputs.noise is None else f"given/{steps}", cond=cond,
                   var_modes=tuple(sorted({int(s.var_mode) for s in inputs.scalars})),
                   clip=any(s.clip < math.inf for s in inputs.scalars),
                   capacity=steps if inputs.noise is not None else capacity)


def step_table(scalars: Sequence[StepScalars], guidance: float | None, device) -> torch.Tensor:
    """The fused step's float32 step table for ``scalars`` (one row per step), as ``prepare_fused_step`` builds
    it: a graph's table is refilled with it for each call."""
    return torch.tensor([step_table_row(s, guidance) for s in scalars], dtype=torch.float32, device=device)


class StepGraph:
    """One step on static buffers (see the module docstring), and the replay of its capture.

    ``denoise_for(cond)`` makes the step's denoiser over the static conditioning (the Engine's ``denoiser``, so
    the graph runs exactly the networks the eager loop runs). ``load`` copies a call's values into the buffers;
    ``step`` is the function a capture records; ``sample`` loads, replays ``steps`` times and returns x_0.
    Used by one call at a time (``StepGraphCache`` checks graphs out)."""

    def __init__(self, key: StepKey, inputs: StepInputs, denoise_for: Callable[[Conditioning], Denoise]):
        x = inputs.x
        device = x.device
        self.key = key
        self.device = device
        self.x = torch.empty_like(x)                  # x_t in, x_prev after each step
        self.out = torch.empty_like(x)
        self.counter = torch.zeros(1, dtype=torch.int64, device=device)
        self.timesteps = torch.zeros(key.capacity, dtype=torch.float32, device=device)
        self.cond = Conditioning(**{k: None if v is None else torch.empty_like(v) for k, v in vars(inputs.cond).items()})
        self.step_coeff = torch.empty_like(inputs.step_coeff)
        self.mix_coeff = torch.empty_like(inputs.mix_coeff)
        self.seeds = None if inputs.seeds is None else torch.empty_like(inputs.seeds)
        self.noise = None if inputs.noise is None else torch.empty_like(inputs.noise)
        self.error_count = torch.zeros(1, dtype=torch.int32, device=device)
        self.denoise = denoise_for(self.cond)
        self.plan = None            # the FusedStepPlan over these buffers, prepared at the first step
        self.replay: Callable[[], None] | None = None
        self.steps = 0
        self._scalars, self._guidance = (), None
        self._done = torch.cuda.Event() if device.type == "cuda" else None   # the last call's work on its stream

    def load(self, inputs: StepInputs) -> None:
        """Copy one call's values into the static buffers and reset the counter (before the first replay)."""
        steps = len(inputs.timesteps)
        if steps > self.key.capacity:
            raise ValueError(f"{steps} steps do not fit a step graph of {self.key.capacity}")
        if self._done is not None:      # the previous call (maybe on another stream) has read x_0 out
            torch.cuda.current_stream(self.device).wait_event(self._done)
        self.x.copy_(inputs.x)
        for name, buf in vars(self.cond).items():
            if buf is not None:
                buf.copy_(getattr(inputs.cond, name))
        self.step_coeff.copy_(inputs.step_coeff)
        self.mix_coeff.copy_(inputs.mix_coeff)
        if self.seeds is not None:
            self.seeds.copy_(inputs.seeds)
        if self.noise is not None:
            self.noise.copy_(inputs.noise)
        self.timesteps[:steps].copy_(torch.tensor([float(t) for t in inputs.timesteps], dtype=torch.float32))
        self.counter.zero_()
        self.error_count.zero_()
        self.steps = steps
        self._scalars, self._guidance = tuple(inputs.scalars), inputs.guidance
        if self.plan is not None:
            if self.plan.prepared is None:
                self.plan = None   # the float32 torch path reads its prepared scalars, not the table: prepare again
            else:
                self.plan.table[:steps].copy_(step_table(self._scalars, self._guidance, self.device))

    def step(self) -> None:
        """One denoising step on the static buffers: the function a CUDA graph captures."""
        t = self.timesteps.index_select(0, self.counter)
        raw = self.denoise(self.x, t)
        if self.key.kind == "mix":
            raw = mix_outputs(raw, self.mix_coeff)
        if self.plan is None:
            self.plan = self._prepare(raw)
            self.plan.launch(raw, self.x, self.out, step=self.counter)       # checked once
        else:
            self.plan.launch(raw, self.x, self.out, step=self.counter, check=False)
        self.counter.add_(1)
        self.x.copy_(self.out)

    def _prepare(self, raw: torch.Tensor):
        """The fused step over this graph's buffers: its table holds ``capacity`` rows (the call's schedule, then
        its last row repeated, which keeps the set of variance modes the kernel is specialised on)."""
        scalars = list(self._scalars) + [self._scalars[-1]] * (self.key.capacity - len(self._scalars))
        z = {"noise": self.noise} if self.noise is not None else {"seed": self.seeds}
        plan = prepare_fused_step(raw, self.x, self.step_coeff, scalars, guidance_scale=self._guidance,
                                  error_count=self.error_count, **z)
        f = plan.args
        reads_buffers = f.coeff.data_ptr() == self.step_coeff.data_ptr() and (
            f.seeds.data_ptr() == self.seeds.data_ptr() if self.seeds is not None
            else plan.noise.data_ptr() == self.noise.data_ptr())
        if not reads_buffers:   # a later call refills the buffers: the plan must read them, not copies
            raise RuntimeError("the prepared fused step copied the graph's coefficient or noise buffers")
        return plan

    def sample(self, inputs: StepInputs, callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """x_0 of one call: load, replay every step, return a copy of the result (the buffers are reused)."""
        self.load(inputs)
        replay, steps = self.replay, self.steps
        for i in range(steps):
            replay()
            if callback is not None:
                callback(i + 1, steps)
        x0 = self.x.clone()
        if self._done is not None:
            self._done.record()
        return x0


def replay_eagerly(step: Callable[[], None]) -> Callable[[], None]:
    """A capturer that captures nothing: every replay runs the step eagerly (the CPU seam of the tests)."""
    return step


# One capture at a time in the process (every Engine's cache): captures never share a stream.
CAPTURE_LOCK = threading.Lock()


def capture_cuda_graph(step: Callable[[], None]) -> Callable[[], None]:
    """Capture ``step`` as a CUDA graph and return its replay. The step first runs once eagerly (that prepares
    the fused step: autotuning and compilation cannot run inside a capture; and it sets up cuBLAS/cuDNN for these
    shapes on every stream the step uses). Both run inside ``concurrent_members()``: full-weight experts on their
    own streams. The capture runs on its own stream, in thread-local mode (other threads' CUDA work goes on
    meanwhile), into a private memory pool that lives as long as the graph."""
    with concurrent_members():
        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=torch.cuda.Stream(), capture_error_mode="thread_local"):
            step()
    return graph.replay


class StepGraphCache:
    """Step graphs by ``StepKey``, owned by one Engine: at most ``capacity`` idle graphs are kept (the least
    recently used is dropped first, with its memory pool: a graph's activations, which no other graph shares);
    a graph checked out serves one call and is checked in after it. ``capture`` turns a step into its replay
    (``capture_cuda_graph``; ``replay_eagerly`` on the CPU). A capture that runs out of memory drops every idle
    graph and tries once more. A key whose capture failed is remembered (the last ``failures_kept``) and runs
    eagerly: one log line says why, once."""

    def __init__(self, capture: Capture = capture_cuda_graph, *, capacity: int = 4, failures_kept: int = 64):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capture = capture
        self.capacity = capacity
        self.failures_kept = failures_kept
        self._idle: list[tuple[StepKey, StepGraph]] = []   # least recently checked in first
        self._failed: dict[StepKey, str] = {}
        self._lock = threading.Lock()
        self.stats = {"captures": 0, "reuses": 0, "failures": 0, "evictions": 0}

    def checkout(self, key: StepKey, build: Callable[[], StepGraph]) -> StepGraph | None:
        """An idle graph for ``key``, or a new one (``build()`` then capture); None when ``key`` runs eagerly."""
        with self._lock:
            if key in self._failed:
                return None
            for i, (k, graph) in enumerate(self._idle):
                if k == key:
                    del self._idle[i]
                    self.stats["reuses"] += 1
                    return graph
        with CAPTURE_LOCK:
            try:
                graph = self._capture(build)
            except Exception as exc:  # any failure: this key runs eagerly, which reports real input errors itself
                reason = one_line(f"{type(exc).__name__}: {exc}")
                with self._lock:
                    self._failed[key] = reason
                    while len(self._failed) > self.failures_kept:
                        del self._failed[next(iter(self._failed))]
                    self.stats["failures"] += 1
                log.warning("msdda: CUDA graph capture failed (%s): %s; this configuration runs eagerly",
                            key.describe(), reason)
                return None
        with self._lock:
            self.stats["captures"] += 1
        return graph

    def _capture(self, build: Callable[[], StepGraph]) -> StepGraph:
        try:
            graph = build()
            graph.replay = self.capture(graph.step)
            return graph
        except torch.OutOfMemoryError:
            with self._lock:
                if not self._idle:
                    raise
                self.stats["evictions"] += len(self._idle)
                self._idle.clear()
        torch.cuda.empty_cache()      # the dropped graphs' pools go back before the second try
        graph = build()
        graph.replay = self.capture(graph.step)
        return graph

    def checkin(self, key: StepKey, graph: StepGraph) -> None:
        with self._lock:
            self._idle.append((key, graph))
            while len(self._idle) > self.capacity:
                del self._idle[0]
                self.stats["evictions"] += 1

    def failed(self) -> dict[StepKey, str]:
        """{key: why its capture failed} of the keys that run eagerly."""
        with self._lock:
            return dict(self._failed)

    def idle(self) -> list[tuple[StepKey, StepGraph]]:
        """The idle graphs, least recently used first (for inspection and benchmarks)."""
        with self._lock:
            return list(self._idle)

    def clear(self) -> None:
        """Drop every idle graph (and its memory) and forget failures."""
        with self._lock:
            self._idle.clear()
            self._failed.clear()


def sample_graphed(cache: StepGraphCache, inputs: StepInputs, *, members: tuple[int, ...], kind: str,
                   capacity: int, denoise_for: Callable[[Conditioning], Denoise], coeff,
                   callback: Callable[[int, int], None] | None = None) -> torch.Tensor | None:
    """x_0 of one call through a step graph of ``cache``, or None when its key runs eagerly (capture failed).

    Raises ValueError (as ``raise_if_bad``, naming ``coeff``) if any step counted a bad element: read before the
    graph goes back to the cache, whose next call resets its counter."""
    key = step_key(inputs, members, kind, capacity)

    def build() -> StepGraph:
        graph = StepGraph(key, inputs, denoise_for)
        graph.load(inputs)
        return graph

    graph = cache.checkout(key, build)
    if graph is None:
        return None
    try:
        x0 = graph.sample(inputs, callback)
        raise_if_bad(graph.error_count, coeff)
    finally:
        cache.checkin(key, graph)
    return x0
