"""What ``msdda.cli`` and the Ray commands (``msdda.serve``, ``msdda.batch``, ``msdda.ray_runtime``) share: the
CLI's one error type, the model flags every command takes, and how those flags name models, dtypes and sampling
defaults. A leaf below all of them, so that cli can import serve and batch while they import this, not cli (no
import circle: tests/test_layering.py)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

DTYPES = ("float32", "float16", "bfloat16")   # --dtype: torch dtype names


class CliError(ValueError):
    """Bad command-line input. Printed as one line, exit status 2."""


def parse_experts(items: list[str] | None) -> dict[str, str]:
    from msdda.validation import check_expert_name

    experts: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise CliError(f"--expert: expected NAME=PATH, got {item!r}")
        check_expert_name(name, option="--expert")
        if name in experts:
            raise CliError(f"--expert: {name!r} given twice")
        experts[name] = path
    return experts


def resolve_models(args) -> tuple[str, dict[str, str]]:
    """--base/--expert, or the embedded zoo when neither is given."""
    experts = parse_experts(args.expert)
    if args.base is None and not experts:
        from msdda.zoo import zoo_paths, OBJECTIVES

        paths = zoo_paths()
        return str(paths["base"]), {name: str(paths[name]) for name in OBJECTIVES}
    if args.base is None:
        raise CliError("--expert needs --base (or give neither to use the embedded zoo)")
    return args.base, experts


def torch_dtype(name: str):
    """--dtype's value as a torch dtype; None for "auto" (the Engine chooses)."""
    import torch

    return None if name == "auto" else getattr(torch, name)


def add_model_args(p: argparse.ArgumentParser, *, device_default: str | None = "cpu") -> None:
    """The model flags of generate, sweep, export, serve and batch (the embedded zoo when neither --base nor
    --expert is given). ``device_default`` None: serve and batch pick cuda when given GPUs (``--num-gpus``)."""
    g = p.add_argument_group("models (default: the embedded digits zoo)")
    g.add_argument("--base", metavar="PATH", help="base model: a diffusers pipeline folder, a folder with unet/, or a UNet folder")
    g.add_argument("--expert", metavar="NAME=PATH", action="append",
                   help="an aligned expert: a UNet folder of the base's architecture or a LoRA adapter (repeatable)")
    g.add_argument("--backend", default="torch", choices=("torch", "onnxruntime", "tensorrt"), help="network runtime (default torch)")
    default_text = device_default or "cuda when --num-gpus > 0, else cpu"
    g.add_argument("--device", default=device_default, help=f"torch device, e.g. cpu or cuda (default {default_text})")
    g.add_argument("--scheduler", choices=("ddpm", "ddim"), help="sampler family (default: the base's own)")
    g.add_argument("--variant", metavar="NAME", help="load *.NAME.safetensors weights, e.g. fp16 (as diffusers' variant=)")
    g.add_argument("--dtype", choices=("auto",) + DTYPES, default="auto",
                   help="network precision (default auto: float16 on CUDA when the weights allow it, else float32)")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="run every step eagerly instead of replaying one captured CUDA graph (torch on CUDA)")
    g.add_argument("--onnx-dir", metavar="DIR", help="the folder `msdda export --out DIR` wrote: run its ONNX files "
                   "(with --backend onnxruntime or tensorrt) instead of exporting into the cache")


def uses_zoo(args) -> bool:
    """Whether the model flags name no models (the embedded zoo)."""
    return args.base is None and not args.expert


def default_sampling(args) -> tuple[int, float]:
    """(steps, guidance scale) when a command is not given them: the base's own (``msdda.loading.sampling_defaults``,
    the rule ``Engine.generate`` uses: the zoo's 50 and 2.0, else diffusers' 50 and 7.5)."""
    from msdda.loading import sampling_defaults

    base, _ = resolve_models(args)
    return sampling_defaults(base)


def check_model_flags(args) -> None:
    """The model flags that can be judged before loading: --onnx-dir's backend and folder."""
    if getattr(args, "onnx_dir", None) is None:
        return
    if args.backend == "torch":
        raise CliError("--onnx-dir runs exported ONNX files: add --backend onnxruntime (or tensorrt)")
    if not Path(args.onnx_dir).is_dir():
        raise CliError(f"--onnx-dir: {args.onnx_dir} is not a folder (write one with msdda export --out DIR)")


def verbose_requested(args) -> bool:
    """--verbose or MSDDA_VERBOSE=1: libraries, Ray included, may print (the Ray commands ask this too)."""
    verbose_env = os.environ.get("MSDDA_VERBOSE", "").strip().lower() not in ("", "0", "false", "no")
    return bool(getattr(args, "verbose", False)) or verbose_env
