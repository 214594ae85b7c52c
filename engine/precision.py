"""The precision the networks run in: half precision by default on CUDA when the weights allow it, and the VAE
decoded in the precision diffusers' own pipeline uses.

- ``stored_dtypes(file)``: the dtypes a safetensors file stores (its header only; no tensor is read).
- ``default_dtype(device, weight_files)``: ``Engine.from_pretrained``'s choice when no dtype is given, with why.
  On CUDA: bfloat16 when any weight is stored in bfloat16 (converting it to float16 could overflow) and the GPU
  has bfloat16; float16 when every floating weight is stored in float16 or float32 (the loader then checks that
  no converted weight overflowed, ``all_finite``); else the loader's default, float32. Elsewhere float32 (CPUs
  have few fast half-precision kernels).
- ``vae_decode_dtype(vae_dtype, force_upcast, pipeline)``: float32 where diffusers upcasts (its
  Stable Diffusion XL family of pipelines, for a float16 VAE whose config says ``force_upcast``); the VAE's own
  dtype elsewhere (``StableDiffusionPipeline`` decodes in it).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

__all__ = ["all_finite", "cuda_supports", "default_dtype", "stored_dtypes", "vae_decode_dtype"]

_HALF_SAFE = {"F16", "F32"}        # stored dtypes whose weights convert to float16 (values permitting)
_FLOATS = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


def stored_dtypes(path) -> set[str] | None:
    """The safetensors dtype names ("F16", "BF16", "F32", ...) of the tensors in ``path``, from its header; None
    if the file cannot be read (the loader reports that)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {f.get_slice(k).get_dtype() for k in f.keys()}
    except Exception:
        return None


def cuda_supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``device`` (CUDA) runs ``dtype`` natively: float16 on every GPU torch supports, bfloat16 where
    torch says so (compute capability 8.0 and later)."""
    if dtype == torch.bfloat16:
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported()
    return dtype == torch.float16


def default_dtype(device, weight_files: Iterable, *,
                  supports: Callable[[torch.device, torch.dtype], bool] = cuda_supports) -> tuple[torch.dtype | None, str]:
    """(dtype, why) for networks loaded without a dtype onto ``device``: see the module docstring. None means the
    loader's default (float32). ``supports(device, dtype)`` is the device check (injected in tests)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, f"float32 on {device.type} (half precision is the default on CUDA only)"
    stored: set[str] = set()
    for path in weight_files:
        names = stored_dtypes(path)
        if names is None:
            return None, f"float32: cannot read the dtypes stored in {path}"
        stored |= names & _FLOATS
    if "BF16" in stored:
        if supports(device, torch.bfloat16):
            return torch.bfloat16, "bfloat16 on CUDA: weights stored in bfloat16"
        return None, "float32: weights stored in bfloat16 and this GPU has no bfloat16"
    if stored and stored <= _HALF_SAFE and supports(device, torch.float16):
        return torch.float16, f"float16 on CUDA: weights stored in {', '.join(sorted(_name(s) for s in stored))}"
    return None, f"float32: weights stored in {', '.join(sorted(_name(s) for s in stored)) or 'no float dtype'}"


def _name(stored: str) -> str:
    return {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}.get(stored, stored)


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Every floating tensor in ``tensors`` is finite (a float32 weight beyond float16's range became inf)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def vae_decode_dtype(vae_dtype: torch.dtype, force_upcast: bool, pipeline: str | None) -> torch.dtype:
    """The dtype diffusers' pipeline ``pipeline`` decodes latents in: float32 for a float16 VAE with
    ``force_upcast`` in the Stable Diffusion XL family (``needs_upcasting`` there), else the VAE's dtype."""
    if vae_dtype == torch.float16 and force_upcast and pipeline is not None and "XL" in pipeline:
        return torch.float32
    return vae_dtype
