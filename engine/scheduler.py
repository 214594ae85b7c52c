"""Step-level continuous batching: many checked ``Request``s interleaved one denoising step at a time.

A diffusion step is an iteration (as a token is in an LLM server). The scheduler keeps a running set of
samples, each with its own request, step index, latents, seed, coefficients and conditioning rows, and every
``iteration``:

1. drops the samples of cancelled requests and of requests past their deadline;
2. admits waiting samples first-come-first-served, up to ``max_rows`` running samples, no request holding more
   than ``max_rows_per_request`` of them (so a later request always finds room beside a large one: a large
   request is admitted in slices);
3. runs ONE network call per group of running samples that use the same networks (same members, guidance on or
   off, latent size), each sample at its own timestep (a per-sample timestep tensor), then the fused step of
   each (request, step index) group with that request's scalars, coefficients and Philox noise
   (``Engine.combine_step``, the call ``generate`` makes);
4. retires finished requests: ``Engine.finish`` decodes them and the ticket is answered.

Requests that differ in step count, guidance scale, eta, strategy (msdda / mpa), weights, seeds and labels share
iterations. A ``soup`` request (its network is built for its weights) takes a turn instead: it runs whole, as
``Engine.generate``, between iterations.

Exactness: on a batch-invariant Engine (``row_block`` set) every network call computes a row from that row alone,
the step is elementwise per sample, and the noise is keyed by the sample's seed, so each request's result is
bit-identical to ``engine.generate(request)`` alone, whatever joined or left around it (tested). On a plain
Engine a row's last bits depend on the call's row count, so results equal ``generate``'s to float32 rounding
of the network outputs, propagated through the steps.

The module holds no global state and imports no Ray: ``msdda.serve`` runs one scheduler per replica on its own
thread (``run_until``); tests drive ``iteration`` directly.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from msdda.backends import Conditioning
from msdda.kernels import raise_if_bad
from msdda.request import Request

__all__ = ["Cancelled", "DeadlineExceeded", "StepScheduler", "Ticket", "default_max_rows"]


class Cancelled(Exception):
    """The request was cancelled (its client went away) before it finished."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before it finished."""


def default_max_rows(row_block: int | None, max_images: int) -> int:
    """The default row budget: room for one request of the largest size beside others, in whole row blocks
    (a network call costs ceil(rows / row_block) blocks, so a budget off the block grid buys nothing)."""
    block = row_block or 16
    rows = 2 * max(max_images, block)
    return -(-rows // block) * block


class Ticket:
    """One submitted request. ``result`` (a ``GenerateOutput``) or ``error`` once ``done`` is set."""

    def __init__(self, request: Request, deadline: float | None):
        self.request = request
        self.deadline = deadline          # time.monotonic() value, or None
        self.size = request.batch         # samples
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None
        self.batch_size = 0               # the most samples of one iteration that stepped this request's samples
        self.cancel_requested = False
        self._callbacks: list[Callable[["Ticket"], None]] = []
        self._lock = threading.Lock()

    def cancel(self) -> None:
        """Ask the scheduler to drop this request; its samples leave the running set at the next iteration."""
        self.cancel_requested = True

    def add_done_callback(self, fn: Callable[["Ticket"], None]) -> None:
        with self._lock:
            if not self.done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def _settle(self, result=None, error: BaseException | None = None) -> None:
        with self._lock:
            if self.done.is_set():
                return
            self.result, self.error = result, error
            self.done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)


@dataclass(eq=False)      # identity: jobs are found in queues by who they are
class _Job:
    ticket: Ticket
    run: object = None          # msdda.engine.SampleRun, once admitted
    admitted: int = 0           # samples admitted so far (the next one's index)
    finished: int = 0
    running: int = 0
    x0: list | None = None      # final latents per sample index


@dataclass(eq=False)
class _Sample:
    job: _Job
    index: int                  # within its request
    step: int                   # next step to run
    x: torch.Tensor             # [1, C, H, W]
    cond: dict                  # Conditioning field -> rows ([2, ...] unconditional then conditional, or [1, ...])


class StepScheduler:
    """Continuous batching over one Engine (see the module docstring). ``submit`` and ``Ticket.cancel`` may be
    called from any thread; ``iteration`` from one thread at a time (``run_until`` is that loop)."""

    def __init__(self, engine, *, max_rows: int, max_rows_per_request: int | None = None,
                 reserved_rows: int | None = None, on_iteration: Callable[[dict], None] | None = None):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.engine = engine
        self.max_rows = int(max_rows)
        self.max_rows_per_request = int(max_rows_per_request or max(1, self.max_rows // 2))
        # The last ``reserved_rows`` places of the budget are for small requests (at most that many samples):
        # however many large requests run, a small one that arrives finds room at the next iteration.
        self.reserved_rows = int(self.max_rows // 4 if reserved_rows is None else reserved_rows)
        if not 0 <= self.reserved_rows < self.max_rows:
            raise ValueError(f"reserved_rows must be in 0..{self.max_rows - 1}, got {self.reserved_rows}")
        self.on_iteration = on_iteration
        # per-sample timesteps into one network call: the torch and ONNX Runtime backends take them; TensorRT's
        # engines bind one timestep per call, so there samples are grouped by timestep too
        self.per_sample_timesteps = engine.backend_name != "tensorrt"
        self._incoming: deque[_Job] = deque()
        self._waiting: deque[_Job] = deque()
        self._running: list[_Sample] = []
        self._wake = threading.Condition()
        self.iterations = 0

    # ------------------------------------------------------------------ submission
    def submit(self, request: Request, *, timeout_s: float | None = None) -> Ticket:
        """Queue a request checked by this scheduler's Engine (``engine.check_request(...)`` or a
        ``Request.from_*``); the ticket is answered when it finishes, fails or is dropped."""
        if not isinstance(request, Request) or request.checked_by != self.engine.request_token:
            raise ValueError("submit takes a msdda.Request checked by this scheduler's Engine "
                             "(engine.check_request(...))")
        deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
        job = _Job(Ticket(request, deadline))
        with self._wake:
            self._incoming.append(job)
            self._wake.notify()
        return job.ticket

    def counts(self) -> dict:
        """{"running_samples", "waiting_samples", "waiting_requests", "iterations"} now (a snapshot read without
        a lock: good for a gauge)."""
        waiting = list(self._waiting) + list(self._incoming)
        return {"running_samples": len(self._running),
                "waiting_samples": sum(j.ticket.size - j.admitted for j in waiting),
                "waiting_requests": len(waiting), "iterations": self.iterations}

    def has_work(self) -> bool:
        return bool(self._running or self._waiting or self._incoming)

    def run_until(self, stop: threading.Event, idle_wait_s: float = 0.5) -> None:
        """Iterate while there is work, sleep while there is none, until ``stop`` is set."""
        while not stop.is_set():
            with self._wake:
                if not self.has_work():
                    self._wake.wait(idle_wait_s)
                    continue
            self.iteration()

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    # ------------------------------------------------------------------ one iteration
    def iteration(self) -> dict:
        """Drop, admit, one step for every running sample, retire. Returns what it did (also passed to
        ``on_iteration``): rows stepped, network calls, requests finished, seconds."""
        start = time.perf_counter()
        with self._wake:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
        self._drop_abandoned()
        self._admit()
        rows = len(self._running)
        calls = self._step_all() if self._running else 0
        retired = self._retire()
        self.iterations += 1
        info = {"rows": rows, "network_calls": calls, "retired": retired, "seconds": time.perf_counter() - start,
                **self.counts()}
        if self.on_iteration is not None:
            self.on_iteration(info)
        return info

    def _fail(self, job: _Job, error: BaseException) -> None:
        self._running = [s for s in self._running if s.job is not job]
        if job in self._waiting:
            self._waiting.remove(job)
        job.ticket._settle(error=error)

    def _drop_abandoned(self) -> None:
        now = time.monotonic()
        jobs = {id(s.job): s.job for s in self._running}
        jobs.update({id(j): j for j in self._waiting})
        for job in jobs.values():
            t = job.ticket
            if t.cancel_requested:
                self._fail(job, Cancelled("the request was cancelled"))
            elif t.deadline is not None and now >= t.deadline:
                self._fail(job, DeadlineExceeded("the request's timeout passed before it finished"))

    def is_small(self, job: "_Job") -> bool:
        """Whether a request may use the reserved places of the budget (it has at most that many samples)."""
        return job.ticket.size <= self.reserved_rows

    def _admit(self) -> None:
        """FCFS by sample: each waiting request in arrival order takes what the budget and its own cap allow; one
        at its cap (a large request admitted in slices) lets the next ones in. Large requests together hold at
        most ``max_rows - reserved_rows`` places, so the reserve stays free for small requests."""
        budget = self.max_rows - len(self._running)
        large_room = self.max_rows - self.reserved_rows - sum(not self.is_small(s.job) for s in self._running)
        for job in list(self._waiting):
            if budget <= 0:
                break
            if job.run is None and not self._start(job):
                continue                # answered already: refused, or run whole in its turn (a soup)
            room = budget if self.is_small(job) else min(budget, large_room)
            take = min(room, self.max_rows_per_request - job.running, job.ticket.size - job.admitted)
            if take <= 0:
                continue
            if not self.is_small(job):
                large_room -= take
            run = job.run
            for b in range(job.admitted, job.admitted + take):
                self._running.append(_Sample(job, b, 0, run.x_T[b:b + 1],
                                             _cond_rows(run.cond, b, run.cfg, run.request.batch)))
            job.admitted += take
            job.running += take
            budget -= take
            if job.admitted == job.ticket.size:
                self._waiting.remove(job)

    def _start(self, job: _Job) -> bool:
        """Prepare the head request (conditioning, x_T): True when it joins the running set, False when
        it was answered here (refused, or run whole in its turn) and left the queue."""
        try:
            with torch.inference_mode():
                run = self.engine.start(job.ticket.request)
            if run.request.plan.kind == "soup":       # its own network per weight vector: a turn of its own
                self._waiting.remove(job)
                job.ticket.batch_size = run.request.batch
                job.ticket._settle(self.engine.generate(job.ticket.request))
                return False
        except Exception as exc:  # noqa: BLE001 -- this request's error, answered to it alone
            if job in self._waiting:
                self._waiting.remove(job)
            job.ticket._settle(error=exc)
            return False
        job.run = run
        job.x0 = [None] * run.request.batch
        return True

    def _groups(self) -> dict:
        """Running samples by what their network call needs in common."""
        groups: dict = {}
        for s in self._running:
            run = s.job.run
            key = (run.request.plan.members, run.request.plan.kind, run.cfg, tuple(s.x.shape), tuple(
                (k, None if v is None else tuple(v.shape[1:])) for k, v in sorted(s.cond.items())))
            if not self.per_sample_timesteps:
                key += (run.timesteps[s.step],)
            groups.setdefault(key, []).append(s)
        return groups

    def _step_all(self) -> int:
        groups = self._groups()
        for samples in groups.values():
            try:
                self._step_group(samples)
            except Exception as exc:  # noqa: BLE001 -- an engine failure fails the requests of this call only
                for job in {id(s.job): s.job for s in samples}.values():
                    self._fail(job, exc)
        return len(groups)

    def _step_group(self, samples: list[_Sample]) -> None:
        eng = self.engine
        first = samples[0].job.run
        cfg = first.cfg
        x = torch.cat([s.x for s in samples])
        names = samples[0].cond.keys()
        cond = Conditioning(**{k: None if samples[0].cond[k] is None else
                               torch.cat([s.cond[k][h:h + 1] for h in ((0, 1) if cfg else (0,)) for s in samples])
                               for k in names})
        if self.per_sample_timesteps:
            t = torch.tensor([s.job.run.timesteps[s.step] for s in samples], dtype=torch.float32, device=x.device)
        else:
            t = first.timesteps[samples[0].step]
        with torch.inference_mode():
            raw = eng.denoiser(first.request.plan, cond, cfg)(x, t)   # [K, (2,) n, C_out, H, W]
            by_step: dict = {}
            for pos, s in enumerate(samples):
                by_step.setdefault((id(s.job), s.step), []).append(pos)
            for positions in by_step.values():
                job, i = samples[positions[0]].job, samples[positions[0]].step
                if job.ticket.done.is_set():        # failed earlier in this iteration
                    continue
                pick = torch.as_tensor(positions, device=raw.device)
                part = raw[:, :, pick] if cfg else raw[:, pick]
                try:
                    x_prev = eng.combine_step(job.run, part, x[pick], i, [samples[p].index for p in positions])
                except ValueError as exc:           # step 0's validation: an infeasible composition
                    self._fail(job, eng.infeasible(job.run.request.plan, exc))
                    continue
                for row, p in enumerate(positions):
                    samples[p].x = x_prev[row:row + 1]
                    samples[p].step += 1
                job.ticket.batch_size = max(job.ticket.batch_size, len(samples))

    def _retire(self) -> int:
        keep, finished = [], {}
        for s in self._running:
            if s.step < len(s.job.run.timesteps):
                keep.append(s)
                continue
            s.job.x0[s.index] = s.x
            s.job.finished += 1
            s.job.running -= 1
            if s.job.finished == s.job.ticket.size:
                finished[id(s.job)] = s.job
        self._running = keep
        for job in finished.values():
            try:
                raise_if_bad(job.run.error_count, job.run.request.plan.coeff)
                with torch.inference_mode():
                    out = self.engine.finish(job.run, torch.cat(job.x0))
            except ValueError as exc:       # a bad element counted by a later step
                job.ticket._settle(error=self.engine.infeasible(job.run.request.plan, exc))
            except Exception as exc:  # noqa: BLE001 -- decoding failed: this request's error
                job.ticket._settle(error=exc)
            else:
                job.ticket._settle(out)
            job.x0 = None
        return len(finished)


def _cond_rows(cond: Conditioning, b: int, cfg: bool, batch: int) -> dict:
    """Sample b's rows of each conditioning tensor: [unconditional, conditional] under cfg, else [its row]."""
    rows = {}
    for k, v in vars(cond).items():
        if v is None:
            rows[k] = None
        elif cfg:
            rows[k] = torch.cat([v[b:b + 1], v[batch + b:batch + b + 1]])
        else:
            rows[k] = v[b:b + 1]
    return rows
