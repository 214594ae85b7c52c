"""What ``msdda serve`` and ``msdda batch`` share: the Engine description that Ray workers load, and starting (or
joining) Ray. Their model flags are ``msdda.cli_common.add_model_args``, as for every command.

Ray is imported only inside functions: ``import msdda.cli`` stays light, and Ray is an optional extra
(``pip install 'msdda[serve]'``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field

from msdda.validation import DEFAULT_LIMITS, Limits

__all__ = ["ModelSpec", "model_spec", "RaySession", "start_ray", "stop_ray", "ray_session", "require_ray"]


@dataclass(frozen=True)
class ModelSpec:
    """Everything a Ray worker needs to load the same Engine: plain values, so it pickles anywhere. On a
    cluster the paths must be readable by every node (shared storage)."""
    base: str
    experts: dict = field(default_factory=dict)
    backend: str = "torch"
    device: str = "cpu"
    scheduler: str | None = None
    variant: str | None = None
    dtype: str = "auto"               # --dtype: a torch dtype name, or "auto" (the Engine chooses)
    cuda_graphs: bool = True
    threads: int = 1                  # torch CPU threads in each worker (bitwise results depend on it)
    row_block: int | None = None      # Engine(row_block=): batch-invariant network calls (exact batching)
    limits: Limits = DEFAULT_LIMITS   # the Engine's (room for one merged call of many requests)
    default_steps: int = 50
    default_guidance_scale: float = 7.5
    onnx_dir: str | None = None       # --onnx-dir: a folder written by msdda export (onnxruntime / tensorrt)

    def load(self):
        """Load the Engine (in the worker) and give torch its thread count."""
        import torch

        from msdda import Engine
        from msdda.cli_common import torch_dtype

        torch.set_num_threads(self.threads)
        artifacts = {} if self.onnx_dir is None else {"onnx_dir": self.onnx_dir}
        return Engine.from_pretrained(self.base, self.experts, backend=self.backend, device=self.device,
                                      scheduler=self.scheduler, variant=self.variant, dtype=torch_dtype(self.dtype),
                                      cuda_graphs=self.cuda_graphs, row_block=self.row_block,
                                      limits=self.limits, **artifacts)


def model_spec(args, *, threads: int, num_gpus: float, row_block: int | None,
               limits: Limits = DEFAULT_LIMITS) -> ModelSpec:
    """The Engine the model flags (``msdda.cli_common.add_model_args``) describe, with the zoo's sampling defaults when
    the models are the zoo's."""
    from msdda.cli_common import CliError, check_model_flags, default_sampling, resolve_models

    check_model_flags(args)
    base, experts = resolve_models(args)
    for name, path in [("--base", base), *((f"--expert {n}", p) for n, p in experts.items())]:
        if not os.environ.get("RAY_ADDRESS") and not os.path.exists(path):
            raise CliError(f"{name}: {path} does not exist")
    if os.path.exists(base):
        # A base whose UNet config does not load is refused here, in a second (the config read and checked as the
        # loader will, through the file rule; no weights), not by a Ray worker after Ray started (a minute)
        from msdda.loading import LoadError, check_unet_config, read_json, unet_folder

        try:
            folder = unet_folder(base)
            check_unet_config(read_json(folder / "config.json"), folder)
        except LoadError as exc:
            raise CliError(f"--base: {exc}") from None
    default_steps, default_guidance = default_sampling(args)
    device = args.device or ("cuda" if num_gpus > 0 else "cpu")
    return ModelSpec(base=str(base), experts={n: str(p) for n, p in experts.items()}, backend=args.backend,
                     device=device, scheduler=args.scheduler, variant=args.variant, dtype=args.dtype,
                     cuda_graphs=args.cuda_graphs, threads=threads, row_block=row_block, limits=limits,
                     default_steps=default_steps,
                     default_guidance_scale=default_guidance, onnx_dir=args.onnx_dir)


def require_ray():
    """Import Ray, or fail with one line that says how to get it."""
    try:
        import ray
    except ImportError:
        from msdda.cli_common import CliError

        raise CliError("Ray is not installed: pip install 'msdda[serve]'") from None
    return ray


class RaySession:
    """The Ray one command uses, from ``start_ray``: ``owned`` when this command started a local Ray (stopped,
    and its processes waited for, by ``stop_ray``), ``joined`` when it connected to the cluster at $RAY_ADDRESS
    (disconnected by ``stop_ray``: the cluster then ends the job's actors), neither when the process already used
    a Ray (left as it is). ``where`` says which Ray, its session folder and its metrics URL."""

    def __init__(self, owned: bool, joined: bool, where: str, *, saved_stderr: int | None, known_pids: set):
        self.owned, self.joined, self.where = owned, joined, where
        self.saved_stderr = saved_stderr    # the real fd 2 while Ray's output goes to /dev/null (None: verbose)
        self.known_pids = known_pids        # this process's children from before a local Ray started


#: seconds ``stop_ray`` waits for a local Ray's processes to exit after ray.shutdown() before killing them
PROCESS_EXIT_WAIT_S = 20.0


def start_ray(*, num_cpus: int | None = None, metrics_port: int | None = None, verbose: bool = False) -> RaySession:
    """Use the Ray this process already uses, or the cluster at $RAY_ADDRESS, or start a local one. End the
    session with ``stop_ray`` (or use ``ray_session``).

    Unless ``verbose``, Ray prints nothing until ``stop_ray``: its Python loggers are set to ERROR (the "Token
    authentication is enabled" warning), the driver does not relay workers' output (log_to_driver), and file
    descriptor 2 points to /dev/null, which is the only way to silence the C++ core worker's lines
    (``core_worker.cc: ...``) and the coloured ``(raylet)`` lines the driver prints (``RAY_BACKEND_LOG_LEVEL``
    itself prints a line). Python's ``sys.stderr`` object is left alone: msdda prints its one-line errors after
    ``stop_ray``, and Ray's own log files (its session folder) keep everything.
    """
    ray = require_ray()
    import psutil

    saved_stderr = None if verbose else _silence_stderr()
    try:
        level = logging.INFO if verbose else logging.ERROR
        if ray.is_initialized():
            return RaySession(False, False, "Ray: the one this process already uses", saved_stderr=saved_stderr,
                              known_pids=set())
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=verbose, logging_level=level)
            return RaySession(False, True, f"Ray: the cluster at {os.environ['RAY_ADDRESS']}",
                              saved_stderr=saved_stderr, known_pids=set())
        known = {p.pid for p in psutil.Process().children(recursive=True)}
        options = {"_metrics_export_port": metrics_port} if metrics_port else {}
        # address="local": a Ray of its own, even when someone's `ray start` cluster runs on this machine
        # (ray.init() with no address would join that one: /tmp/ray/ray_current_cluster)
        context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=verbose,
                           logging_level=level, **options)
        info = context.address_info
        return RaySession(True, False, f"Ray: local, session {info.get('session_dir')}; metrics: "
                                       f"http://{info.get('node_ip_address')}:{info.get('metrics_export_port')}/metrics",
                          saved_stderr=saved_stderr, known_pids=known)
    except BaseException:
        if saved_stderr is not None:
            _restore_stderr(saved_stderr)
        raise


def stop_ray(session: RaySession) -> None:
    """End what ``start_ray`` began: stop a local Ray it started and return only once every process of it (GCS,
    raylet, workers, actors) has exited; disconnect from a cluster it joined; then let Ray's output through
    again."""
    import psutil
    import ray

    try:
        if session.owned:
            started = [p for p in psutil.Process().children(recursive=True) if p.pid not in session.known_pids]
            ray.shutdown()
            _wait_for_exit(psutil, started)
        elif session.joined:
            ray.shutdown()
    finally:
        if session.saved_stderr is not None:
            _restore_stderr(session.saved_stderr)
            session.saved_stderr = None


@contextlib.contextmanager
def ray_session(*, num_cpus: int | None = None, metrics_port: int | None = None, verbose: bool = False):
    """``start_ray`` ... ``stop_ray`` around a block; yields the ``RaySession``."""
    session = start_ray(num_cpus=num_cpus, metrics_port=metrics_port, verbose=verbose)
    try:
        yield session
    finally:
        stop_ray(session)


def _wait_for_exit(psutil, processes) -> None:
    """Wait for the local Ray's processes (ray.shutdown() signals them but does not wait for workers); kill
    what is left after ``PROCESS_EXIT_WAIT_S``."""
    _, alive = psutil.wait_procs(processes, timeout=PROCESS_EXIT_WAIT_S)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def _silence_stderr() -> int:
    """Point fd 2 at /dev/null; returns a copy of the real one for ``_restore_stderr``."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    return saved


def _restore_stderr(saved: int) -> None:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
