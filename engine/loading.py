"""Loading models from local diffusers folders: safetensors only, with compatibility checks.

A *base* is one of
- a diffusers pipeline folder (``model_index.json``: UNet2DConditionModel, text encoder, tokenizer, VAE, scheduler);
- a folder holding ``unet/`` (and optionally ``scheduler/``), as the embedded zoo stores its models;
- a single UNet2DModel folder (``config.json`` + ``diffusion_pytorch_model.safetensors``).

An *expert* is a UNet folder of the base's architecture (any of the layouts above; only its UNet is used), or a
LoRA adapter (diffusers ``pytorch_lora_weights.safetensors`` or peft ``adapter_model.safetensors``) merged onto
the base UNet's weights at load time. Nothing is ever unpickled: a folder holding only ``.bin``/``.ckpt``/``.pt``
weights is refused.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from msdda.hashing import file_sha256

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
LORA_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
# Config keys that do not change what a UNet computes from its weights, so experts may differ in them.
_NON_STRUCTURAL = {"_name_or_path", "_diffusers_version", "_use_default_values", "_class_name"}


class LoadError(ValueError):
    """A model folder is missing, unsafe, corrupt or incompatible. The message is one line."""


@dataclass(frozen=True)
class BaseModel:
    """What the runtime needs from a base: its UNet, the scheduler config, and the optional text/VAE parts."""
    path: Path
    unet: torch.nn.Module
    unet_config: dict
    scheduler_config: dict
    text_encoder: torch.nn.Module | None = None
    tokenizer: object | None = None
    vae: torch.nn.Module | None = None
    weights_sha256: str = ""
    extra: dict = field(default_factory=dict)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _require_dir(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise LoadError(f"model folder not found: {path}")
    if not path.is_dir():
        raise LoadError(f"not a model folder: {path}")
    return path


def _refuse_pickles(folder: Path) -> None:
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles and not any(p.suffix == ".safetensors" for p in folder.iterdir()):
        raise LoadError(f"{folder}: only pickle checkpoints ({', '.join(sorted(pickles))}); refusing to unpickle, "
                        "convert the weights to safetensors")


def unet_folder(path) -> Path:
    """The folder holding the UNet's config.json inside any supported layout."""
    path = _require_dir(path)
    for candidate in (path / "unet", path):
        if (candidate / "config.json").is_file():
            _refuse_pickles(candidate)
            return candidate
    raise LoadError(f"{path}: no UNet found (expected model_index.json, unet/config.json or config.json)")


def read_json(path: Path) -> dict:
    """A JSON object from ``path`` (every config a model folder holds is one); anything else is a LoadError."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise LoadError(f"{path}: unreadable JSON ({_one_line(exc)})") from None
    if not isinstance(obj, dict):
        raise LoadError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


# Largest UNet sample_size (per side) accepted from a config: pixel models up to 1024x1024 and latents of far
# larger images fit; a bigger value is a damaged config and would allocate gigabytes per image.
MAX_SAMPLE_SIZE = 4096


def check_unet_config(config: dict, path: Path) -> None:
    """The sizes a runtime allocates from (sample_size, channels) in the config at ``path`` are positive integers
    in sane ranges."""
    size = config.get("sample_size")
    sides = size if isinstance(size, (list, tuple)) else [size]
    if len(sides) not in (1, 2) or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SAMPLE_SIZE
                                           for v in sides):
        raise LoadError(f"{path}: sample_size must be an integer (or two) in 1..{MAX_SAMPLE_SIZE}, got {size!r}")
    for key in ("in_channels", "out_channels"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1024:
            raise LoadError(f"{path}: {key} must be an integer in 1..1024, got {value!r}")


def check_scheduler_config(config: dict, path: Path) -> None:
    """The scheduler config builds a schedule msdda can sample with (bounded num_train_timesteps, known
    schedule and prediction types); the tables are cached, so the Engine reuses this work."""
    from msdda.schedule import schedule_from_diffusers_config

    try:
        schedule_from_diffusers_config(config)
    except ValueError as exc:
        raise LoadError(f"{path}: {_one_line(exc)}") from None


def load_unet(folder: Path, dtype=None) -> tuple[torch.nn.Module, dict, str]:
    """Load a UNet folder (safetensors only). Returns (module in eval mode, config, sha256 of the weights)."""
    import diffusers

    config = read_json(folder / "config.json")
    cls_name = config.get("_class_name", "UNet2DModel")
    if cls_name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise LoadError(f"{folder}: unsupported UNet class {cls_name!r}")
    check_unet_config(config, folder / "config.json")
    weights = folder / UNET_WEIGHTS
    if not weights.is_file():
        _refuse_pickles(folder)
        raise LoadError(f"{folder}: missing {UNET_WEIGHTS}")
    try:
        unet = getattr(diffusers, cls_name).from_pretrained(folder, use_safetensors=True, torch_dtype=dtype)
    except Exception as exc:  # corrupt header, truncated file, shape mismatch...
        raise LoadError(f"{folder}: cannot load UNet weights ({_one_line(exc)})") from None
    return unet.eval().requires_grad_(False), config, file_sha256(weights)


def structural_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _NON_STRUCTURAL}


def scheduler_config_for(path: Path, unet_dir: Path) -> dict | None:
    for candidate in (path / "scheduler", unet_dir.parent / "scheduler", path):
        cfg = candidate / "scheduler_config.json"
        if cfg.is_file():
            config = read_json(cfg)
            check_scheduler_config(config, cfg)
            return config
    return None


def load_base(path, dtype=None) -> BaseModel:
    path = _require_dir(path)
    udir = unet_folder(path)
    unet, config, sha = load_unet(udir, dtype)
    sched = scheduler_config_for(path, udir)
    if sched is None:
        raise LoadError(f"{path}: no scheduler/scheduler_config.json beside the UNet")
    text_encoder = tokenizer = vae = None
    if (path / "model_index.json").is_file():
        text_encoder, tokenizer, vae = _load_pipeline_parts(path, dtype)
    return BaseModel(path=path, unet=unet, unet_config=config, scheduler_config=sched, text_encoder=text_encoder,
                     tokenizer=tokenizer, vae=vae, weights_sha256=sha)


def _load_pipeline_parts(path: Path, dtype):
    index = read_json(path / "model_index.json")
    text_encoder = tokenizer = vae = None
    try:
        if "text_encoder" in index and (path / "text_encoder").is_dir():
            from transformers import CLIPTextModel, CLIPTokenizer
            _refuse_pickles(path / "text_encoder")
            text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True,
                                                         dtype=dtype).eval().requires_grad_(False)
            tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
        if "vae" in index and (path / "vae").is_dir():
            from diffusers import AutoencoderKL
            _refuse_pickles(path / "vae")
            vae = AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True,
                                                torch_dtype=dtype).eval().requires_grad_(False)
    except LoadError:
        raise
    except Exception as exc:
        raise LoadError(f"{path}: cannot load pipeline components ({_one_line(exc)})") from None
    return text_encoder, tokenizer, vae


def _lora_file(path: Path) -> Path | None:
    for name in LORA_FILES:
        if (path / name).is_file():
            return path / name
    return None


def load_expert(name: str, path, base: BaseModel, dtype=None) -> tuple[torch.nn.Module, str]:
    """Load expert ``name`` and check it against the base. Returns (module, sha256 of its weights)."""
    path = _require_dir(path)
    lora = _lora_file(path)
    if lora is not None:
        return merge_lora(base.unet, lora, path), file_sha256(lora)
    _refuse_pickles(path)
    udir = unet_folder(path)
    unet, config, sha = load_unet(udir, dtype)
    check_compatible(name, config, base.unet_config)
    sched = scheduler_config_for(path, udir)
    if sched is not None:
        check_scheduler_compatible(name, sched, base.scheduler_config)
    return unet, sha


def check_compatible(name: str, config: dict, base_config: dict) -> None:
    a, b = structural_config(config), structural_config(base_config)
    if config.get("_class_name") != base_config.get("_class_name"):
        raise LoadError(f"expert {name!r} is a {config.get('_class_name')}, the base a {base_config.get('_class_name')}")
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        k = diff[0]
        what = {"sample_size": "latent shape", "in_channels": "latent shape", "out_channels": "output channels"}.get(k, "architecture")
        raise LoadError(f"expert {name!r} has a different {what} from the base: {k}={a.get(k)!r} vs {b.get(k)!r}"
                        + (f" (and {len(diff) - 1} more keys)" if len(diff) > 1 else ""))


_SCHED_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type", "variance_type",
               "trained_betas")


def check_scheduler_compatible(name: str, sched: dict, base_sched: dict) -> None:
    for key in _SCHED_KEYS:
        if key in sched and key in base_sched and sched[key] != base_sched[key]:
            label = "prediction type" if key == "prediction_type" else "scheduler"
            raise LoadError(f"expert {name!r} has a different {label} from the base: {key}={sched[key]!r} vs "
                            f"{base_sched[key]!r}")


@dataclass(frozen=True)
class LoraFactor:
    """One adapted layer's low-rank update, delta W = up @ down (the scale alpha / r already folded into up).

    down: [r, in] for a Linear, [r, in, kh, kw] for a Conv2d (it runs with the layer's stride and padding);
    up: [out, r] (a 1x1 convolution for a Conv2d)."""
    down: torch.Tensor
    up: torch.Tensor


# A merged LoRA expert carries its factors under this attribute, so that a backend may run it as the base plus
# a batched low-rank delta (msdda.backends.lora) instead of as a separate network.
LORA_FACTORS_ATTR = "msdda_lora_factors"


def read_lora(base_unet: torch.nn.Module, lora_path: Path, folder: Path) -> dict[str, LoraFactor]:
    """{module name: LoraFactor} of a LoRA adapter on ``base_unet``, checked against the base's layers.

    Reads diffusers (``...lora.down.weight``/``lora.up.weight`` or ``lora_A``/``lora_B``) and peft
    (``base_model.model....lora_A.weight``) key layouts; alpha comes from ``adapter_config.json`` (peft) or
    ``...alpha`` entries, else alpha = r.
    """
    from safetensors.torch import load_file

    try:
        lora = load_file(lora_path)
    except Exception as exc:
        raise LoadError(f"{lora_path}: unreadable LoRA weights ({_one_line(exc)})") from None
    cfg_path = folder / "adapter_config.json"
    cfg = read_json(cfg_path) if cfg_path.is_file() else {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora.items():
        k = key
        for prefix in ("base_model.model.", "unet."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        for tag, role in ((".lora_A.weight", "A"), (".lora.down.weight", "A"), (".lora_B.weight", "B"),
                          (".lora.up.weight", "B"), (".alpha", "alpha")):
            if k.endswith(tag):
                pairs.setdefault(k[: -len(tag)], {})[role] = tensor
                break
    modules = dict(base_unet.named_modules())
    factors = {}
    for target, parts in pairs.items():
        target = target.replace(".processor", "").replace("_lora", "")
        if "A" not in parts or "B" not in parts:
            raise LoadError(f"{lora_path}: incomplete LoRA pair for {target}")
        module = modules.get(target)
        if module is None or not hasattr(module, "weight"):
            raise LoadError(f"{lora_path}: LoRA targets {target!r}, which the base UNet does not have")
        a, b = parts["A"].float(), parts["B"].float()
        rank = a.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(cfg.get("lora_alpha", rank))
        weight = module.weight
        if b.shape[0] != weight.shape[0] or a[0].numel() != weight[0].numel() or b[0].numel() != rank:
            raise LoadError(f"{lora_path}: LoRA for {target} has shape {(b.shape[0], a[0].numel())}, weight is "
                            f"{tuple(weight.shape)}")
        factors[target] = LoraFactor(down=a.reshape(rank, *weight.shape[1:]),
                                     up=b.reshape(b.shape[0], rank) * (alpha / rank))
    return factors


def merge_lora(base_unet: torch.nn.Module, lora_path: Path, folder: Path) -> torch.nn.Module:
    """A copy of the base UNet with a LoRA adapter merged: W' = W + (alpha / r) * B @ A (see ``read_lora``).
    The copy carries the factors under ``LORA_FACTORS_ATTR``."""
    import copy

    factors = read_lora(base_unet, lora_path, folder)
    merged = copy.deepcopy(base_unet)
    modules = dict(merged.named_modules())
    for target, f in factors.items():
        weight = modules[target].weight
        with torch.no_grad():
            weight += (f.up @ f.down.flatten(1)).reshape(weight.shape).to(weight.dtype)
    setattr(merged, LORA_FACTORS_ATTR, factors)
    return merged.eval().requires_grad_(False)
