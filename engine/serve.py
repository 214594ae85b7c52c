"""``msdda serve``: a Ray Serve application around one loaded Engine, with a FastAPI ingress.

    POST /v1/generate   {"class_labels" | "prompt", "weights", "seed", "num_images", "steps", "guidance_scale",
                         "eta", "strategy", "output": "png" | "latent", "normalize", "expert_betas",
                         "negative_prompt"}
                        -> 200 {"images": [base64 PNG], "seeds", "weights", "strategy", "models", "batch_size", ...}
                        -> 422 {"error": "<one line>"} for a bad request; 500 {"error"} for an engine failure
    GET  /v1/models     experts, strategies, conditioning, defaults and limits
    GET  /healthz

Two schedulers (``--batching``). ``step`` (the default): step-level continuous batching by
``msdda.scheduler.StepScheduler`` on a thread of the replica: every iteration runs one denoising step for all
running samples, whatever request, step count or weights they have; a request joins at the next iteration and
leaves when done, when its client disconnects or when its ``timeout_s`` passes. ``gather``: concurrent requests
are gathered by ``@serve.batch`` and run by ``msdda.coalesce.generate_many`` to their end: requests that agree on
the whole-call fields share one ``Engine.generate`` call; a failing request is split off so it fails alone.
With exact batching (the default) the replica's Engine is batch-invariant (``row_block``, see
``msdda.coalesce``), so under either scheduler every response is bit-identical to ``Engine.generate`` of that
request alone on an Engine built the same way. ``app_builder`` is the Ray Serve application builder
(``serve run msdda.serve:app_builder base=... experts=...``, or a ``serve build``-style config file).

Metrics go through ``ray.serve.metrics`` to Ray's Prometheus endpoint (``ray_msdda_*``).
"""
# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (`request: Request`) at
# definition time, inside build_app, where fastapi is imported.
import argparse
import math
import time
from dataclasses import dataclass

from msdda.errors import one_line
from msdda.http_api import parse_request, response_body
from msdda.http_limits import HttpError, HttpLimits, read_body
from msdda.ray_runtime import ModelSpec, model_spec, require_ray, start_ray, stop_ray
from msdda.validation import Limits

__all__ = ["AppArgs", "ServeSettings", "add_command", "app_builder", "build_app", "run"]

APP_NAME = "msdda"
LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
ITERATION_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
BATCHING = ("step", "gather")


DEFAULT_ROW_BLOCK = 16     # --row-block: rows per network call under exact batching (README: "Exact batching")


@dataclass(frozen=True)
class ServeSettings:
    limits: Limits = Limits(max_images=16)   # per request (msdda.validation); the Engine's allow a whole batch
    max_batch_size: int = 16          # requests gathered into one batch
    batch_wait_s: float = 0.2
    row_block: int | None = DEFAULT_ROW_BLOCK   # the Engine's (None: plain batching, equal to float32 rounding)
    http: HttpLimits = HttpLimits()   # bounded reads: body size and time, connections, prompt length
    batching: str = "step"            # BATCHING: step-level continuous batching, or gathered @serve.batch
    max_running_samples: int | None = None   # the step scheduler's row budget (None: default_max_rows)
    max_timeout_s: float = 600.0      # cap of a request's timeout_s, and the deadline of requests without one

    @property
    def running_budget(self) -> int:
        from msdda.scheduler import default_max_rows

        return self.max_running_samples or default_max_rows(self.row_block, self.limits.max_images)

    @property
    def engine_limits(self) -> Limits:
        """The replica Engine's limits: room for a batch of requests at the per-request limits."""
        return Limits(self.limits.max_images * self.max_batch_size, self.limits.max_steps)


# ---------------------------------------------------------------------- the Ray Serve application
class SummedHistogram:
    """A Ray Serve Histogram, plus a Counter of the exact sum of what it observed. Ray's metrics agent exports a
    histogram's ``_sum`` rebuilt from its bucket counts, every observation at its bucket's midpoint (Ray's
    OpenTelemetry recorder), so a mean read from ``_sum / _count`` is off; ``<name>_observed_sum_total /
    <name>_count`` is exact. Built inside the replica (Ray's metrics need its process)."""

    def __init__(self, name: str, description: str, boundaries):
        from ray.serve.metrics import Counter, Histogram

        self.histogram = Histogram(name, description=description, boundaries=boundaries)
        self.total = Counter(f"{name}_observed_sum", description=f"The exact sum of {name}'s observations")

    def observe(self, value: float) -> None:
        self.histogram.observe(value)
        if value > 0:                 # a Ray Counter takes positive increments only; 0 adds nothing anyway
            self.total.inc(value)


def build_app(spec: ModelSpec, settings: ServeSettings, *, replicas: int = 1, num_cpus: float = 1,
              num_gpus: float = 0):
    """The bound Serve application: one deployment, ``replicas`` copies, each holding one Engine."""
    import asyncio

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    from msdda.scheduler import DeadlineExceeded

    api = FastAPI(title="msdda", description="Multi-objective denoising-time alignment of diffusion models")

    @serve.deployment(name="MsddaServer", num_replicas=replicas,
                      ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
                      # gather: room for one batch running and the next one gathering; step: every request is
                      # queued in the replica's scheduler (its FCFS order), not held back by Serve; plus room for
                      # slow clients sending their bodies (msdda.http_limits); the proxy queues a bounded number
                      # more, then 503
                      max_ongoing_requests=(max(2 * settings.max_batch_size, 8) if settings.batching == "gather"
                                            else max(4 * settings.running_budget, 64)) + settings.http.max_connections,
                      max_queued_requests=settings.http.max_queued)
    @serve.ingress(api)
    class MsddaServer:
        def __init__(self):
            from ray.serve.metrics import Counter

            from msdda.strategies import STRATEGIES

            self.engine = spec.load()
            self.models = [{"name": m.name, "sha256": m.sha256} for m in self.engine.models]
            eng = self.engine
            self.info = {
                "experts": list(eng.experts), "models": self.models, "strategies": list(STRATEGIES),
                "conditioning": "text" if eng.is_text else ("class" if eng.num_classes else "none"),
                "class_labels": [0, eng.num_classes - 2] if eng.num_classes and not eng.is_text else None,
                "default_steps": spec.default_steps, "default_guidance_scale": spec.default_guidance_scale,
                "limits": {"max_images": settings.limits.max_images, "max_steps": settings.limits.max_steps},
                "max_batch_size": settings.max_batch_size, "exact_batching":
                batches_exactly(settings.row_block, settings.max_batch_size if settings.batching == "gather" else 2),
                "row_block": settings.row_block,
                "backend": spec.backend, "device": spec.device, "torch_threads": spec.threads,
                "batching": settings.batching, "max_timeout_s": settings.max_timeout_s,
            }
            self.requests = Counter("msdda_requests", description="HTTP requests answered, by route and status",
                                    tag_keys=("route", "status"))
            self.errors = Counter("msdda_errors", description="Failed generate requests: bad_request (4xx) or "
                                  "engine (5xx)", tag_keys=("kind",))
            self.latency = SummedHistogram("msdda_request_latency_seconds", "POST /v1/generate latency",
                                           LATENCY_BUCKETS_S)
            self.batch_samples = SummedHistogram("msdda_batch_samples", "Samples per Engine.generate call",
                                                 BATCH_BUCKETS)
            self.batch_requests = SummedHistogram("msdda_batch_requests", "Requests per gathered batch", BATCH_BUCKETS)
            self.scheduler = None
            if settings.batching == "step":
                self._start_scheduler()

        def _start_scheduler(self):
            import threading

            from ray.serve.metrics import Counter, Gauge

            from msdda.scheduler import StepScheduler

            self.running = Gauge("msdda_running_samples", description="Samples in the step scheduler's running set")
            self.waiting = Gauge("msdda_waiting_samples", description="Samples waiting for admission")
            self.iteration_seconds = SummedHistogram("msdda_iteration_seconds", "Step scheduler iteration time (one "
                                                     "denoising step of every running sample)", ITERATION_BUCKETS_S)
            self.iteration_rows = SummedHistogram("msdda_iteration_samples", "Samples stepped per iteration",
                                                  BATCH_BUCKETS)
            self.dropped = Counter("msdda_dropped_requests", description="Requests dropped before they finished: "
                                   "disconnect (the client went away) or timeout", tag_keys=("reason",))
            self.scheduler = StepScheduler(self.engine, max_rows=settings.running_budget,
                                           on_iteration=self._observe_iteration)
            self.info.update(max_running_samples=self.scheduler.max_rows,
                             max_rows_per_request=self.scheduler.max_rows_per_request,
                             reserved_for_small_requests=self.scheduler.reserved_rows)
            self._stop = threading.Event()
            threading.Thread(target=self.scheduler.run_until, args=(self._stop,), name="msdda-step-scheduler",
                             daemon=True).start()

        def _observe_iteration(self, info: dict):
            self.running.set(info["running_samples"])
            self.waiting.set(info["waiting_samples"])
            if info["rows"]:
                self.iteration_seconds.observe(info["seconds"])
                self.iteration_rows.observe(info["rows"])

        def __del__(self):
            if getattr(self, "scheduler", None) is not None:
                self._stop.set()

        async def _generate_stepped(self, checked, timeout_s: float | None):
            """The request through the step scheduler: a Share, or the exception that ended it."""
            from msdda.coalesce import Share

            loop = asyncio.get_running_loop()
            answered = loop.create_future()

            def settle(ticket):
                loop.call_soon_threadsafe(lambda: answered.done() or answered.set_result(ticket))

            cap = settings.max_timeout_s
            ticket = self.scheduler.submit(checked, timeout_s=cap if timeout_s is None else min(timeout_s, cap))
            ticket.add_done_callback(settle)
            try:
                await answered
            except asyncio.CancelledError:     # Serve cancels the request when its HTTP client disconnects
                ticket.cancel()
                self.scheduler.wake()
                self.dropped.inc(tags={"reason": "disconnect"})
                raise
            if ticket.error is not None:
                if isinstance(ticket.error, DeadlineExceeded):
                    self.dropped.inc(tags={"reason": "timeout"})
                return ticket.error
            out = ticket.result
            images = None if checked.output_type == "latent" else list(out.images)
            return Share(images, out.latents, list(out.seeds), list(out.weights), out.strategy, ticket.batch_size)

        def _answer(self, route: str, status: int, body: dict):
            self.requests.inc(tags={"route": route, "status": str(status)})
            return JSONResponse(body, status_code=status)

        @serve.batch(max_batch_size=settings.max_batch_size, batch_wait_timeout_s=settings.batch_wait_s)
        async def _generate_batch(self, requests: list) -> list:
            self.batch_requests.observe(len(requests))
            return await asyncio.to_thread(self._generate_many, requests)

        def _generate_many(self, requests: list) -> list:
            from msdda.coalesce import generate_many

            results = generate_many(self.engine, requests)
            calls_seen = set()    # shares of one engine call are views of the same latents: observe it once
            for r in results:
                if not isinstance(r, Exception) and r.latents.untyped_storage().data_ptr() not in calls_seen:
                    calls_seen.add(r.latents.untyped_storage().data_ptr())
                    self.batch_samples.observe(r.batch_size)
            return results

        @api.post("/v1/generate")
        async def generate(self, request: Request):
            try:
                return await self._generate(request)
            except Exception as exc:  # noqa: BLE001 -- whatever failed: a short JSON 500, counted, server up
                self.errors.inc(tags={"kind": "engine"})
                return self._answer("/v1/generate", 500, {"error": one_line(f"internal error: {one_line(exc)}")})

        async def _generate(self, request):
            start = time.perf_counter()
            try:
                body = await read_body(request, settings.http)
            except HttpError as exc:
                self.errors.inc(tags={"kind": "bad_request"})
                return self._answer("/v1/generate", exc.status, {"error": one_line(exc)})
            try:
                call = parse_request(body, spec, settings.limits, max_prompt_chars=settings.http.max_prompt_chars)
                timeout_s = call.pop("timeout_s", None)
                checked = self.engine.check_request(**call)      # the one check; nothing after it checks again
            except ValueError as exc:
                self.errors.inc(tags={"kind": "bad_request"})
                return self._answer("/v1/generate", 422, {"error": one_line(exc)})
            if self.scheduler is not None:
                result = await self._generate_stepped(checked, timeout_s)
            else:
                result = await self._generate_batch(checked)
            self.latency.observe(time.perf_counter() - start)
            if isinstance(result, DeadlineExceeded):
                self.errors.inc(tags={"kind": "timeout"})
                return self._answer("/v1/generate", 504, {"error": one_line(result)})
            if isinstance(result, ValueError):     # the engine refused the arguments, or the composition
                self.errors.inc(tags={"kind": "bad_request"})
                return self._answer("/v1/generate", 422, {"error": one_line(result)})
            if isinstance(result, Exception):
                self.errors.inc(tags={"kind": "engine"})
                return self._answer("/v1/generate", 500,
                                    {"error": one_line(f"engine failure: {type(result).__name__}: {one_line(result)}")})
            try:
                body = await asyncio.to_thread(response_body, result, self.models, checked)
            except Exception as exc:  # noqa: BLE001 -- encoding failed: still one JSON line, and the server stays up
                self.errors.inc(tags={"kind": "engine"})
                return self._answer("/v1/generate", 500, {"error": one_line(f"encoding failure: {one_line(exc)}")})
            return self._answer("/v1/generate", 200, body)

        @api.get("/v1/models")
        async def list_models(self):
            live = self.scheduler.counts() if self.scheduler is not None else {}
            return self._answer("/v1/models", 200, {**self.info, **live})

        @api.get("/healthz")
        async def healthz(self):
            return self._answer("/healthz", 200, {"status": "ok"})

    return MsddaServer.bind()


# ---------------------------------------------------------------------- command line
def add_command(sub) -> argparse.ArgumentParser:
    """Add ``msdda serve`` to the CLI's subparsers."""
    p = sub.add_parser("serve", help="serve generation over HTTP with Ray Serve (dynamic batching)",
                       description="Serve POST /v1/generate, GET /v1/models and GET /healthz with Ray Serve. "
                                   "Concurrent requests share engine calls; each response equals Engine.generate "
                                   "of that request alone (exact batching). Starts a local Ray, or joins "
                                   "$RAY_ADDRESS. "
                                   "Ctrl-C or SIGTERM stops the server and the Ray it started.")
    from msdda.cli_common import add_model_args
    from msdda.http_limits import add_http_args

    add_model_args(p, device_default=None)
    g = p.add_argument_group("serving")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    g.add_argument("--max-batch-size", type=int, default=16, help="most requests gathered into one batch (default 16)")
    g.add_argument("--batch-wait-ms", type=float, default=200.0,
                   help="how long a batch waits for more requests after its first (default 200 ms: with 16 clients "
                        "on a 2-core CPU, 20 ms gathered 2.2 requests per batch on average, 200 ms all 16)")
    g.add_argument("--replicas", type=int, default=1, help="engine replicas (default 1)")
    g.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs per replica, also its torch threads (default: all cores / replicas)")
    g.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica (default 0)")
    g.add_argument("--max-steps", type=int, default=1000, help="largest 'steps' a request may ask for (default 1000)")
    g.add_argument("--max-images", type=int, default=16, help="most images one request may ask for (default 16)")
    add_batching_args(g)
    add_http_args(p.add_argument_group("HTTP limits (bounded reads: slow or oversized clients cost a bounded amount)"))
    g.add_argument("--batching", choices=BATCHING, default="step",
                   help="step (default): step-level continuous batching, a request joins the running samples at the "
                        "next denoising step and leaves when done; gather: gather concurrent requests "
                        "(--max-batch-size, --batch-wait-ms) and run each gathered batch to its end")
    g.add_argument("--max-running-samples", type=int, default=None,
                   help="step scheduler: most samples stepped together per iteration (default: twice the larger of "
                        "--max-images and --row-block, rounded up to whole row blocks); one request holds at most "
                        "half of them, so a later request starts beside a large one")
    g.add_argument("--max-timeout-s", type=float, default=600.0,
                   help="step scheduler: the cap of a request's 'timeout_s', and the deadline of requests that give "
                        "none (default 600)")
    g.add_argument("--metrics-port", type=int, default=None,
                   help="port of Ray's Prometheus metrics endpoint (default: Ray picks one and it is printed)")
    return p


def add_batching_args(g) -> None:
    """--exact-batching / --row-block, shared with ``msdda batch``."""
    g.add_argument("--exact-batching", action=argparse.BooleanOptionalAction, default=True,
                   help="run the engine batch-invariant (every network call on --row-block rows), so each image is "
                        "bit-identical to Engine.generate of its request alone (default on; --no-exact-batching "
                        "batches plainly: equal to float32 rounding)")
    g.add_argument("--row-block", type=int, default=DEFAULT_ROW_BLOCK,
                   help=f"rows per network call under exact batching (default {DEFAULT_ROW_BLOCK})")


def engine_row_block(args, max_batch: int) -> int | None:
    """The Engine's row_block for these flags: --row-block under exact batching, None when batching plainly or
    when every engine call holds one request anyway (batches of one row group: already exact, no padding)."""
    _positive("--row-block", args.row_block)
    return args.row_block if args.exact_batching and max_batch > 1 else None


def batches_exactly(row_block: int | None, max_batch: int) -> bool:
    """Whether every image equals Engine.generate of its request alone: the Engine is batch-invariant, or each
    engine call holds one request."""
    return row_block is not None or max_batch == 1


# ---------------------------------------------------------------------- Ray Serve application builder
try:        # the typed arguments of app_builder: pydantic comes with the [serve] extra, as Ray Serve does
    from pydantic import BaseModel as PydanticModel
    from pydantic import ConfigDict
except ImportError:                                     # pragma: no cover -- msdda without [serve]
    PydanticModel, ConfigDict = object, dict


class AppArgs(PydanticModel):
    """``app_builder``'s arguments: ``msdda serve``'s flags by their long names (``max_images``, ``batching``,
    ...), values as ``serve run`` passes them (strings, converted here) or as a config file's ``args`` gives
    them. ``experts``: {name: path}, or "name=path,name=path" on the ``serve run`` command line; no base and no
    experts: the embedded zoo."""
    model_config = ConfigDict(extra="forbid")
    base: str | None = None
    experts: dict[str, str] | str | None = None
    backend: str = "torch"
    device: str | None = None
    scheduler: str | None = None
    variant: str | None = None
    dtype: str = "auto"
    cuda_graphs: bool = True
    replicas: int = 1
    num_cpus: int | None = None
    num_gpus: float = 0
    max_images: int = 16
    max_steps: int = 1000
    exact_batching: bool = True
    row_block: int = DEFAULT_ROW_BLOCK
    batching: str = "step"
    max_running_samples: int | None = None
    max_timeout_s: float = 600.0
    max_batch_size: int = 16
    batch_wait_ms: float = 200.0


def app_builder(args: AppArgs):
    """The Ray Serve application builder: ``serve run msdda.serve:app_builder base=PATH experts=a=P,b=Q`` or a
    config file whose application has ``import_path: msdda.serve:app_builder`` and ``args: {...}`` (docs/
    serving-scheduler.md). Builds what ``msdda serve`` with the same flags deploys; Ray Serve's own ``serve``
    command then owns the cluster, the HTTP options and the lifetime."""
    if isinstance(args, dict):                          # called directly, not through Serve
        args = AppArgs.model_validate(args)
    argv = ["serve"]
    values = args.model_dump()
    experts = values.pop("experts")
    if isinstance(experts, str):
        experts = dict(part.split("=", 1) for part in experts.split(",") if part.strip())
    for name, path in (experts or {}).items():
        argv += ["--expert", f"{name}={path}"]
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):            # both flags default to on: --no-cuda-graphs, --no-exact-batching
            argv += [] if value else ["--no-" + name.replace("_", "-")]
        else:
            argv += [flag, str(value)]
    parser = argparse.ArgumentParser(prog="msdda.serve:app_builder", exit_on_error=False)
    add_command(parser.add_subparsers(dest="command"))
    try:
        parsed = parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as exc:
        raise ValueError(f"msdda.serve:app_builder: bad arguments {argv[1:]}: {exc}") from None
    spec, settings, cpus = configure(parsed)
    return build_app(spec, settings, replicas=parsed.replicas, num_cpus=cpus, num_gpus=parsed.num_gpus)


def deployment_error(serve) -> str | None:
    """The message of the last exception Serve recorded for the deployment (e.g. the replica's LoadError)."""
    import re

    try:
        app = serve.status().applications[APP_NAME]
        messages = [app.message] + [d.message for d in app.deployments.values()]
    except Exception:  # noqa: BLE001 -- no status to read: the caller falls back to Serve's own message
        return None
    errors = [m for text in messages for m in re.findall(r"^\s*[\w.]+(?:Error|Exception): (.+)$", text or "", re.M)
              if "Traceback (most recent call last)" not in m]
    return errors[-1].strip() if errors else None


def _positive(name: str, value, *, allow_zero=False) -> None:
    from msdda.cli_common import CliError

    ok = value is not None and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise CliError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {value}")


def _check_port_free(host: str, port: int, *, here: bool = True) -> None:
    import socket

    from msdda.cli_common import CliError

    if not 0 < port < 65536:
        raise CliError(f"--port must be in 1..65535, got {port}")
    if not here:      # the HTTP proxies listen on the cluster's nodes, not on this machine
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise CliError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def configure(args) -> tuple[ModelSpec, ServeSettings, int]:
    """``msdda serve``'s checked flags as (model spec, settings, CPUs per replica); CliError names a bad one."""
    import os

    for name in ("max_batch_size", "replicas", "max_steps", "max_images"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    _positive("--batch-wait-ms", args.batch_wait_ms, allow_zero=True)
    _positive("--max-timeout-s", args.max_timeout_s)
    if args.max_running_samples is not None:
        _positive("--max-running-samples", args.max_running_samples)
    _positive("--num-gpus", args.num_gpus, allow_zero=True)
    cpus = args.num_cpus if args.num_cpus is not None else max(1, (os.cpu_count() or 1) // args.replicas)
    _positive("--num-cpus", cpus)
    row_block = engine_row_block(args, args.max_batch_size if args.batching == "gather" else 2)
    from msdda.cli_common import CliError
    from msdda.http_limits import http_limits_from_args

    try:
        http = http_limits_from_args(args)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    settings = ServeSettings(Limits(args.max_images, args.max_steps), args.max_batch_size,
                             args.batch_wait_ms / 1000, row_block, http=http, batching=args.batching,
                             max_running_samples=args.max_running_samples, max_timeout_s=args.max_timeout_s)
    spec = model_spec(args, threads=cpus, num_gpus=args.num_gpus, row_block=row_block,
                      limits=settings.engine_limits)
    if spec.default_steps > args.max_steps:
        from msdda.cli_common import CliError

        raise CliError(f"--max-steps {args.max_steps} is below the models' default of {spec.default_steps} steps")
    return spec, settings, cpus


def run(args) -> int:
    """``msdda serve``: start (or join) Ray, deploy, serve until SIGTERM / Ctrl-C, then stop what it started."""
    import os
    import signal
    import threading

    spec, settings, cpus = configure(args)
    _check_port_free(args.host, args.port, here=not os.environ.get("RAY_ADDRESS"))
    require_ray()
    from msdda.cli_common import verbose_requested

    stop = threading.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    session = None
    try:
        from ray import serve

        session = start_ray(num_cpus=max(os.cpu_count() or 1, cpus * args.replicas),
                            metrics_port=args.metrics_port, verbose=verbose_requested(args))
        for sig in signals:   # after ray.init, whose core worker installs its own SIGTERM handler (it just dies)
            signal.signal(sig, lambda *_: stop.set())
        if not stop.is_set():
            import logging

            logging.getLogger("ray.serve").setLevel(logging.WARNING)     # this command prints its own status lines
            serve.start(http_options={"host": args.host, "port": args.port,
                                      "keep_alive_timeout_s": settings.http.keep_alive_timeout_s})
            try:
                serve.run(build_app(spec, settings, replicas=args.replicas, num_cpus=cpus, num_gpus=args.num_gpus),
                          name=APP_NAME, route_prefix="/", blocking=False)
            except RuntimeError as exc:
                from msdda.cli_common import CliError

                raise CliError(f"the server did not start: {deployment_error(serve) or one_line(exc)}") from None
            print(f"msdda serve: http://{args.host}:{args.port} (POST /v1/generate, GET /v1/models, GET /healthz); "
                  f"{session.where}; Ctrl-C or SIGTERM stops it", flush=True)
            stop.wait()
        print("msdda serve: stopping", flush=True)
    finally:
        try:
            if session is not None:
                try:
                    if session.owned:
                        serve.shutdown()
                    else:
                        serve.delete(APP_NAME)
                finally:
                    stop_ray(session)    # after the local Ray's processes have exited, or off the cluster
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return 0
