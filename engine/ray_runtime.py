"""What ``msdda serve`` and ``msdda batch`` share: the Engine description that Ray workers load, and starting (or
joining) Ray. Their model flags are ``msdda.cli_common.add_model_args``, as for every command.

Ray is imported only inside functions: ``import msdda.cli`` stays light, and Ray is an optional extra
(``pip install 'msdda[serve]'``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from msdda.validation import DEFAULT_LIMITS, Limits

__all__ = ["ModelSpec", "model_spec", "start_ray", "stop_ray", "require_ray"]


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


def start_ray(*, num_cpus: int | None = None, metrics_port: int | None = None) -> tuple[bool, str]:
    """Join the Ray this process already uses, or the cluster at $RAY_ADDRESS, or start a local one.

    Returns (started, where): started is True when this call started a local Ray (the caller then owns it and
    stops it with ``stop_ray``); where says which Ray, its session folder and its Prometheus metrics URL.
    """
    ray = require_ray()
    if ray.is_initialized():
        return False, "Ray: the one this process already uses"
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, logging_level="warning")
        return False, f"Ray: the cluster at {os.environ['RAY_ADDRESS']}"
    options = {"_metrics_export_port": metrics_port} if metrics_port else {}
    # address="local": a Ray of its own, even when someone's `ray start` cluster runs on this machine (ray.init()
    # with no address would join that one: /tmp/ray/ray_current_cluster)
    context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                       logging_level="warning", **options)
    info = context.address_info
    return True, (f"Ray: local, session {info.get('session_dir')}; "
                  f"metrics: http://{info.get('node_ip_address')}:{info.get('metrics_export_port')}/metrics")


def stop_ray() -> None:
    """Stop the local Ray this process started: its raylet, GCS, workers and actors end with it."""
    import ray

    ray.shutdown()
