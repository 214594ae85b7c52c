"""Argument checks shared by the Python API and the command line: one function per argument.

Every check runs before anything is allocated or written and raises a one-line ``ValueError``. The CLI and
``Engine.generate`` call the same functions, so a value refused by one is refused by the other with the same
message.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "Limits", "DEFAULT_LIMITS", "SEED_BOUND", "STRATEGIES", "check_int", "check_num_images", "check_steps",
    "check_batch_size", "check_seed", "seed_list", "check_finite", "check_guidance_scale", "check_eta",
    "check_beta", "check_weights", "normalized_weights", "check_expert_betas", "check_strategy",
    "check_class_labels", "check_device", "batch_size", "per_sample_weights", "per_sample", "batch_tensor",
    "check_noise", "real_tensor", "check_num_images_per_prompt", "prompt_rows", "negative_prompt_rows", "check_image_size",
    "check_size_pair", "check_generator", "check_variant",
    "check_expert_name", "EXPERT_NAME_RULE",
]

SEED_BOUND = 2**63                     # Philox takes a 64-bit key; seeds live in [0, 2**63)
STRATEGIES = ("msdda", "mpa", "soup", "base", "expert:NAME")


# ---------------------------------------------------------------------- numbers
def check_int(name: str, value, *, lo: int | None = None, hi: int | None = None, hint: str = "") -> int:
    """An integer (Python or numpy, never a bool or a float, which would be silently truncated) in [lo, hi]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, not {value!r}")
    value = int(value)
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}{hint}")
    return value


def check_finite(name: str, value, *, lo: float | None = None, positive: bool = False) -> float:
    """A finite real number (int, float or numpy scalar; not a bool or a string)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, not {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value!r}")
    return value


@dataclass(frozen=True)
class Limits:
    """Upper bounds on one request, refused before any allocation. ``max_images``: images per call (and per
    CLI command); ``max_steps``: denoising steps. Raise them with ``Engine.from_pretrained(..., limits=
    Limits(max_images=..., max_steps=...))`` or the CLI's ``--max-images`` / ``--max-steps``."""
    max_images: int = 10_000
    max_steps: int = 1_000

    def __post_init__(self):
        check_int("max_images", self.max_images, lo=1)
        check_int("max_steps", self.max_steps, lo=1)


DEFAULT_LIMITS = Limits()


def check_num_images(value, limits: Limits = DEFAULT_LIMITS) -> int:
    return check_int("num_images", value, lo=1, hi=limits.max_images,
                     hint=" (the limit; raise it with Limits(max_images=...) or --max-images)")


def check_steps(value, limits: Limits = DEFAULT_LIMITS, num_train_timesteps: int | None = None) -> int:
    steps = check_int("steps", value, lo=1, hi=limits.max_steps,
                      hint=" (the limit; raise it with Limits(max_steps=...) or --max-steps)")
    if num_train_timesteps is not None and steps > num_train_timesteps:
        raise ValueError(f"steps must be <= the schedule's num_train_timesteps ({num_train_timesteps}), got {steps}")
    return steps


def check_batch_size(value, limits: Limits = DEFAULT_LIMITS) -> int:
    return check_int("batch_size", value, lo=1, hi=limits.max_images)


def check_guidance_scale(value) -> float:
    return check_finite("guidance_scale", value)


def check_eta(value) -> float:
    return check_finite("eta", value, lo=0)


def check_beta(value) -> float:
    """The shared KL strength beta of a composition: finite and > 0 (c_k = w_k beta_k / beta)."""
    return check_finite("beta", value, positive=True)


# ---------------------------------------------------------------------- seeds
def check_seed(seed, count: int = 1) -> int:
    """A scalar seed for ``count`` samples (sample b gets seed + b): an integer with seed + count - 1 < 2**63."""
    return check_int("seed", seed, lo=0, hi=SEED_BOUND - count,
                     hint=f" (seeds seed..seed+{count - 1} must stay below 2**63)" if count > 1 else "")


def seed_list(seed, batch: int) -> list[int]:
    """Per-sample seeds: an int (sample b gets seed + b) or a list of ints, one per sample. Call it after the
    batch size is checked: it materialises ``batch`` integers."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise ValueError(f"seed list has {len(seed)} entries for {batch} images")
        for s in seed:
            if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)) or not 0 <= int(s) < SEED_BOUND:
                raise ValueError(f"seeds must be integers in [0, 2**63), got {s!r}")
        return [int(s) for s in seed]
    from msdda.kernels.args import make_seeds   # the rule "sample b gets seed + b" is the kernels' own

    return make_seeds(check_seed(seed, batch), batch, "cpu").tolist()


# ---------------------------------------------------------------------- weights and strengths
def check_weights(weights, experts: Sequence[str] | None = None, *, option: str = "weights") -> dict[str, float]:
    """{expert: weight}: names among ``experts`` (when given), finite, >= 0. No sum check: see
    :func:`normalized_weights`."""
    if not isinstance(weights, Mapping):
        raise ValueError(f"{option} must be a dict {{expert: weight}}, not {type(weights).__name__}")
    _check_names(weights, experts, option)
    out = {}
    for name, value in weights.items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise ValueError(f"{option}: weight for {name!r} is not a number ({value!r})")
        w = float(value)
        if not math.isfinite(w):
            raise ValueError(f"{option}: weight for {name!r} is not a finite number ({value})")
        if w < 0:
            raise ValueError(f"{option}: weight for {name!r} is negative ({value}); weights must be >= 0")
        out[str(name)] = w
    return out


def normalized_weights(values: Sequence[float], *, normalize: bool, label: str = "weights") -> list[float]:
    """Checked weight values (see :func:`check_weights`) that sum to 1, or rescaled to sum to 1 with
    ``normalize``. The sum and the rescaled values must stay finite (1e308 + 1e308 overflows)."""
    total = sum(values)
    if not math.isfinite(total):
        raise ValueError(f"{label} sum to {total} (overflow); use smaller weights")
    if total <= 0:
        raise ValueError(f"{label} are all zero; give at least one expert a positive weight")
    if not normalize:
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"{label} sum to {total:g}, not 1 (pass normalize=True / --normalize)")
        return list(values)
    out = [v / total for v in values]
    if not all(math.isfinite(v) for v in out) or not math.isfinite(sum(out)):
        raise ValueError(f"{label} do not normalise to finite values")
    return out


def check_expert_betas(betas, experts: Sequence[str] | None = None, *, option: str = "expert_betas"
                       ) -> dict[str, float]:
    """{expert: beta_k}: names among ``experts`` (when given), every expert named, values finite and > 0."""
    if not isinstance(betas, Mapping):
        raise ValueError(f"{option} must be a dict {{expert: beta}}, not {type(betas).__name__}")
    _check_names(betas, experts, option)
    out = {}
    for name, value in betas.items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise ValueError(f"{option}: KL strength for {name!r} is not a number ({value!r})")
        b = float(value)
        if not math.isfinite(b) or b <= 0:
            raise ValueError(f"{option}: KL strength for {name!r} must be a finite number > 0, got {value}")
        out[str(name)] = b
    if experts is not None:
        missing = [n for n in experts if n not in out]
        if missing:
            raise ValueError(f"{option} has no KL strength for {missing[0]!r}")
    return out


def _check_names(mapping: Mapping, experts: Sequence[str] | None, option: str) -> None:
    for name in mapping:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{option}: expert names must be non-empty strings, not {name!r}")
    if experts is not None:
        unknown = [n for n in mapping if n not in experts]
        if unknown:
            raise ValueError(f"unknown expert {unknown[0]!r} in {option}; experts are: {', '.join(experts) or 'none'}")


# ---------------------------------------------------------------------- expert names
# An expert's name becomes a file name (``<name>.onnx`` in an export folder), a strategy (``expert:NAME``) and a
# key in ``--weights a=0.6,b=0.4``: so ASCII letters and digits, then also '_', '-' and '.' (never ',' '=' ':'
# '/' or a space), not starting with '.' or '-' (a hidden file, an option), and not "base" (the base model).
EXPERT_NAME_RULE = "use ASCII letters, digits, '_', '-' and '.', starting with a letter or digit (at most 100), not 'base'"
_EXPERT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def check_expert_name(name, *, option: str = "expert") -> str:
    """The one rule for expert names, used by ``Engine.from_pretrained``, the CLI's ``--expert`` and export."""
    if not isinstance(name, str) or _EXPERT_NAME.fullmatch(name) is None or name == "base":
        raise ValueError(f"{option}: bad expert name {name!r}: {EXPERT_NAME_RULE}")
    return name


# ---------------------------------------------------------------------- strategy, conditioning, device
def check_strategy(strategy, experts: Sequence[str]) -> str:
    if not isinstance(strategy, str):
        raise ValueError(f"strategy must be a string ({', '.join(STRATEGIES)}), not {strategy!r}")
    if strategy.startswith("expert:"):
        name = strategy.split(":", 1)[1]
        if name not in experts:
            raise ValueError(f"unknown expert {name!r} in strategy; experts are: {', '.join(experts) or 'none'}")
        return strategy
    if strategy not in STRATEGIES[:4]:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return strategy


def check_class_labels(labels: Sequence, num_classes: int) -> list[int]:
    """Class labels of a class-conditional base with ``num_classes`` embeddings: integers in
    0..num_classes-2 (the last class is the null class used for guidance)."""
    out = []
    for label in labels:
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)) \
                or not 0 <= int(label) <= num_classes - 2:
            raise ValueError(f"class labels must lie in 0..{num_classes - 2} (class {num_classes - 1} is the null "
                             f"class used for guidance), got {label!r}")
        out.append(int(label))
    return out


def check_device(device):
    """A torch device this build and machine can use: a parseable name, with CUDA/MPS present and the index
    in range."""
    import torch

    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise ValueError(f"unknown device {device!r}; use e.g. 'cpu', 'cuda' or 'cuda:0'") from None
    else:
        raise ValueError(f"device must be a string like 'cpu' or 'cuda', not {device!r}")
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA device is available to this torch build "
                             f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    if dev.type == "mps" and torch.backends.mps.is_available():
        return dev
    raise ValueError(f"device {device!r} is not available here; use 'cpu' or 'cuda'")


# ---------------------------------------------------------------------- diffusers' calling conventions
def check_num_images_per_prompt(value, limits: Limits = DEFAULT_LIMITS) -> int:
    return check_int("num_images_per_prompt", value, lo=1, hi=limits.max_images,
                     hint=" (the limit; raise it with Limits(max_images=...) or --max-images)")


def _prompt_list(prompt, name: str) -> list[str] | None:
    """A list prompt's entries (strings), or None for a single string / no prompt."""
    if prompt is None or isinstance(prompt, str):
        return None
    if not isinstance(prompt, (list, tuple)):
        raise ValueError(f"{name} must be a string or a list of strings, not {type(prompt).__name__}")
    if not prompt:
        raise ValueError(f"{name} is an empty list")
    for p in prompt:
        if not isinstance(p, str):
            raise ValueError(f"{name} entries must be strings, got {p!r}")
    return list(prompt)


def prompt_rows(prompt, batch: int, num_images_per_prompt: int = 1) -> tuple[list[str], int]:
    """(distinct prompts P, images per prompt r) with len(P) * r == batch, the way diffusers lays a batch out:
    a string makes every image; a list of ``batch`` prompts one image each; a list of ``batch /
    num_images_per_prompt`` prompts ``num_images_per_prompt`` consecutive images each."""
    prompts = _prompt_list(prompt, "prompt")
    if prompt is not None and prompts is None:
        return [prompt], batch
    if prompts is None:
        raise ValueError("prompt is required")
    if len(prompts) * num_images_per_prompt == batch:
        return prompts, num_images_per_prompt
    if len(prompts) == batch:
        return prompts, 1
    raise ValueError(f"prompt has {len(prompts)} entries x num_images_per_prompt {num_images_per_prompt}, "
                     f"for {batch} images")


def negative_prompt_rows(negative_prompt, prompts: list[str], repeat: int) -> tuple[list[str], list[str] | None, int]:
    """(prompts, negative prompts or None, images per prompt) for a negative prompt given as None, a string
    (every prompt's), a list with one per prompt, or a list with one per image (the prompts are then spread to
    one per image)."""
    negatives = _prompt_list(negative_prompt, "negative_prompt")
    if negative_prompt is None:
        return prompts, None, repeat
    if negatives is None:
        return prompts, [negative_prompt] * len(prompts), repeat
    if len(negatives) == len(prompts):
        return prompts, negatives, repeat
    if len(negatives) == len(prompts) * repeat:
        return [p for p in prompts for _ in range(repeat)], negatives, 1
    raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts x {repeat} images "
                     "per prompt")


def check_size_pair(name: str, value, *, lo: int = 0) -> tuple[int, int]:
    """Two integers (height, width or top, left) >= lo, as SDXL's micro-conditioning takes them."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ValueError(f"{name} must be two integers (height, width), not {value!r}")
    return tuple(check_int(name, v, lo=lo) for v in value)


def check_image_size(height, width, *, default: tuple[int, int], multiple: int, scale: int,
                     max_latent: int) -> tuple[int, int]:
    """The latent (height, width) for an image of ``height`` x ``width`` pixels (None: the model's default,
    ``default`` latent sides). Pixels must be multiples of ``multiple`` and the latent sides (pixels / ``scale``,
    the VAE's factor) at most ``max_latent``."""
    sides = []
    for name, value, side in (("height", height, default[0]), ("width", width, default[1])):
        if value is None:
            sides.append(side)
            continue
        value = check_int(name, value, lo=1)
        if value % multiple:
            raise ValueError(f"{name} must be a multiple of {multiple} pixels for this model, got {value}")
        if value // scale > max_latent:
            raise ValueError(f"{name} must be <= {max_latent * scale} pixels, got {value}")
        sides.append(value // scale)
    return sides[0], sides[1]


def check_generator(generator) -> None:
    """msdda takes no ``generator``: its noise is Philox from ``seed`` (see ``Engine.generate``)."""
    if generator is not None:
        raise ValueError("generator is not used by msdda: the noise of image b comes from seed + b (Philox, the "
                         "same on CPU and GPU and whatever the batch); pass seed= (an int or one per image)")


def check_variant(variant) -> str | None:
    """A weights variant name such as "fp16" (files ``*.fp16.safetensors``), or None."""
    if variant is None:
        return None
    if not isinstance(variant, str) or not variant or not variant.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"variant must be a name such as 'fp16', not {variant!r}")
    return variant


# ---------------------------------------------------------------------- per-sample arguments of generate
def batch_size(num_images, weights, seed, latents, limits: Limits = DEFAULT_LIMITS, *, prompt=None,
               num_images_per_prompt: int = 1, prompt_embeds=None) -> int:
    """The batch of one ``generate`` call: ``num_images`` x ``num_images_per_prompt``; or, when num_images is
    1, the length of a per-sample list (weights, seed, latents), or a list of prompts (or the rows of
    ``prompt_embeds``) x num_images_per_prompt, as diffusers lays it out. Bounded by ``limits.max_images``."""
    check_num_images(num_images, limits)
    per_prompt = check_num_images_per_prompt(num_images_per_prompt, limits)
    prompts = _prompt_list(prompt, "prompt")
    rows = len(prompts) if prompts is not None else (
        int(prompt_embeds.shape[0]) if getattr(prompt_embeds, "ndim", 0) == 3 and prompt_embeds.shape[0] > 1 else None)
    if rows is not None:
        implied = rows * per_prompt
        if num_images not in (1, implied):
            raise ValueError(f"prompt has {rows} entries x num_images_per_prompt {per_prompt} = {implied} images, "
                             f"but num_images is {num_images}")
        batch = check_num_images(implied, limits)
    else:
        batch = check_num_images(num_images * per_prompt, limits)
    for name, value in (("weights", weights), ("seed", seed)):
        if isinstance(value, (list, tuple)) and len(value) != batch:
            if batch == 1:
                batch = len(value)
            else:
                raise ValueError(f"{name} has {len(value)} entries for {batch} images")
    if latents is not None and batch == 1 and len(latents) > 1:
        batch = len(latents)
    return check_num_images(batch, limits)


def per_sample_weights(weights, batch: int, experts: Sequence[str], strategy: str) -> list[dict]:
    """Per-sample weight dicts; [] when the strategy runs one network and no weights were given."""
    if weights is None:
        if strategy == "base" or strategy.startswith("expert:"):
            return []
        if not experts:
            raise ValueError(f"strategy {strategy!r} needs experts; none are loaded")
        return [{name: 1.0 / len(experts) for name in experts} for _ in range(batch)]
    if isinstance(weights, Mapping):
        return [dict(weights) for _ in range(batch)]
    if isinstance(weights, (list, tuple)) and all(isinstance(w, Mapping) for w in weights):
        return [dict(w) for w in weights]
    raise ValueError("weights must be a dict {expert: weight} or a list of such dicts, one per sample")


def per_sample(value, batch: int, name: str) -> list:
    """One value per sample: a scalar (str or int) repeated, or a sequence / tensor of ``batch`` values."""
    import torch

    if isinstance(value, (str, int, np.integer)):
        return [value] * batch
    if isinstance(value, torch.Tensor):
        value = value.tolist() if value.dim() else [value.item()] * batch
    value = list(value)
    if len(value) != batch:
        raise ValueError(f"{name} has {len(value)} entries for {batch} images")
    return value


def batch_tensor(t, batch: int, name: str):
    """A [B, L, D] tensor (B = batch or 1, expanded to batch)."""
    import torch

    t = torch.as_tensor(t)
    if t.dim() != 3 or t.shape[0] not in (1, batch):
        raise ValueError(f"{name} must be [B, L, D] with B = {batch} (or 1), got {tuple(t.shape)}")
    return t.expand(batch, -1, -1)


def real_tensor(value, name: str):
    """``value`` as a tensor with data: a torch tensor or numpy array of a real floating-point dtype, dense, not on
    the meta device, not 0-d. Anything else is a one-line ValueError, never a TypeError from deep inside (and a
    complex tensor is refused, not silently cut to its real part)."""
    import torch

    if not isinstance(value, (torch.Tensor, np.ndarray)):
        raise ValueError(f"{name} must be a torch tensor (or numpy array), got {type(value).__name__}")
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:    # numpy object / string arrays
        raise ValueError(f"{name} must be a tensor of numbers ({type(exc).__name__})") from None
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense tensor, got layout {t.layout}")
    if t.is_meta:
        raise ValueError(f"{name} is on the meta device (it holds no data)")
    if t.is_complex() or not t.is_floating_point():
        raise ValueError(f"{name} must be a real floating-point tensor, got dtype {t.dtype}")
    if t.dim() == 0:
        raise ValueError(f"{name} must have a batch dimension, got a 0-d tensor")
    return t


def check_noise(noise, steps: int, x):
    """Injected per-step noise: [steps, *x.shape], finite."""
    import torch

    noise = real_tensor(noise, "noise")
    if tuple(noise.shape) != (steps, *x.shape):
        raise ValueError(f"noise must have shape {(steps, *x.shape)} ([steps, B, C, H, W]), got {tuple(noise.shape)}")
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("noise contains NaN or Inf")
    return noise
