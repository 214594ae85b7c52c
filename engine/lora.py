"""Experts: how one loads (a full UNet folder, or a LoRA file of the base's UNet), and LoRA adapters end to end.

- ``load_expert_weights`` / ``load_expert`` / ``unet_weight_files``: an expert folder as a full UNet checked against
  the base, or as a ``LoraAdapter`` when it holds a LoRA file (``lora_file``: diffusers', PEFT's, or one
  kohya-ss / A1111 ``.safetensors``).
- ``read_lora_adapter``: a LoRA file as its low-rank factors on the base UNet's layers, read the way diffusers'
  ``load_lora_weights`` reads it (PEFT resolves the scales); ``merged_network`` merges one where a backend needs
  a full network; ``shared_copy`` is a structural copy holding the original's tensors.
- The LoRA group network (what the torch backend runs when every expert is a LoRA adapter), described below.

LoRA experts as one network: the base weights once, plus a batched low-rank delta per member.

When every expert is a LoRA adapter of the base, the K networks differ only by W_k = W + up_k @ down_k on the
adapted layers. So instead of K forwards with K merged weight sets, one forward runs the base UNet on the K
member batches stacked ([G*N, ...] for G selected members), and each adapted layer adds its members' deltas:

    y[g] = W x[g] + up_g (down_g x[g])        (Linear: two batched matmuls; Conv2d: two grouped convolutions)

The members of a call travel in a ContextVar set around that one forward: it is per thread (and per asyncio
task), so concurrent calls with different members never see each other's selection. Ranks may differ between
adapters (zero-padded to the largest, which adds exact zeros), and a member with no adapter on a layer (the
base itself) has a zero delta there.

The group network is a structural copy of the base whose layers hold the base's own parameter tensors
(``shared_copy``): the base's weights are stored once, whatever K, and the adapters' factors
stacked once per adapted layer. No expert is ever merged into a full copy here.
"""
from __future__ import annotations

import copy
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F

from msdda.errors import one_line
from msdda.hashing import file_sha256
from msdda.loading import (UNET_STEM, BaseModel, LoadError, check_compatible, check_scheduler_compatible, load_unet,
                           read_json, refuse_pickles, require_dir, scheduler_config_for, unet_folder, weight_files)

__all__ = ["LORA_FILES", "LoraAdapter", "LoraFactor", "forward_members", "load_expert", "load_expert_weights",
           "lora_file", "lora_group_network", "member_selection", "merged_network", "read_lora_adapter",
           "shared_copy", "soup_parameters", "unet_weight_files"]

LORA_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")


def short_error(exc: BaseException) -> str:
    return one_line(exc, 200)    # leaves room in the 300-character line for the path it is quoted with


# ---------------------------------------------------------------------------------------------------- LoRA
@dataclass(frozen=True)
class LoraFactor:
    """One adapted layer's low-rank update, delta W = up @ down (PEFT's scale, alpha / r, already folded into up).

    down: [r, in] for a Linear, [r, in, kh, kw] for a Conv2d (it runs with the layer's stride and padding);
    up: [out, r] (a 1x1 convolution for a Conv2d)."""
    down: torch.Tensor
    up: torch.Tensor


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA expert as its low-rank factors on the base UNet's layers ({module name: LoraFactor}), never merged
    here: a backend merges only where it needs a full network (``merged_network``)."""
    path: Path
    sha256: str
    factors: Mapping[str, LoraFactor]

    @property
    def nbytes(self) -> int:
        return sum(f.down.nbytes + f.up.nbytes for f in self.factors.values())


# The adapter name msdda gives a LoRA while PEFT resolves its scales on a weightless copy of the base.
_ADAPTER = "msdda"
# Where a LoRA file's keys point: diffusers' prefixes (the same names its pipelines use).
_UNET_PREFIX = "unet."
_TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.")
_PEFT_PREFIX = "base_model.model."


def read_lora_adapter(base: BaseModel, lora_path: Path) -> LoraAdapter:
    """A LoRA file of the base's UNet as a :class:`LoraAdapter`, read the way diffusers' ``load_lora_weights``
    reads it, so that merging it gives diffusers' ``fuse_lora`` weights:

    - the file goes through ``StableDiffusionPipeline.lora_state_dict`` (``StableDiffusionXLPipeline``'s for an
      SDXL base), which converts the kohya-ss / A1111 layout and returns its network alphas; a PEFT
      ``adapter_model.safetensors`` (``base_model.model.<module>`` keys) takes its LoRA config from
      ``adapter_config.json``;
    - the per-layer scale (alpha / r, rank and alpha patterns, rsLoRA) is the one PEFT computes when diffusers
      injects the adapter, found on a weightless (meta-device) copy of the base UNet.

    Refused with a one-line LoadError: text-encoder weights (msdda adapts the UNet only; the error names the
    keys), DoRA or LoRA bias terms, a layer the base does not have or that is not a Linear / Conv2d, a down
    without its up (or the reverse), and shapes that do not fit the base's weights."""
    from safetensors import safe_open

    folder = lora_path.parent
    try:
        with safe_open(lora_path, framework="pt") as fh:
            raw_keys = list(fh.keys())
            # dtypes and shapes from the header, before diffusers sees a tensor (it would print a whole dump)
            headers = {k: (fh.get_slice(k).get_dtype(), fh.get_slice(k).get_shape()) for k in raw_keys}
    except Exception as exc:
        raise LoadError(f"{lora_path}: unreadable LoRA weights ({short_error(exc)})") from None
    bad = [k for k in raw_keys if "dora_scale" in k or "lora_magnitude_vector" in k]
    if bad:
        raise LoadError(f"{lora_path}: DoRA adapters are not supported ({bad[0]!r})")
    _check_lora_header(headers, lora_path)
    state, alphas, metadata = _lora_state_dict(base, lora_path, raw_keys)
    text = sorted(k for k in state if k.startswith(_TEXT_PREFIXES))
    if text:
        raise LoadError(f"{lora_path}: this LoRA also adapts the text encoder ({len(text)} keys, e.g. {text[0]!r}); "
                        "msdda applies LoRA experts to the UNet only: save the UNet part alone (diffusers: "
                        "keys starting with 'unet.')")
    foreign = sorted(k for k in state if not k.startswith(_UNET_PREFIX))
    if foreign:
        raise LoadError(f"{lora_path}: unexpected LoRA key {foreign[0]!r} (neither 'unet.' nor a text encoder)")
    pairs = _lora_pairs(base.unet, state, lora_path)
    scales = _peft_scales(base.unet, state, alphas, metadata, lora_path)
    missing = sorted(set(pairs) - set(scales))
    if missing:
        raise LoadError(f"{lora_path}: PEFT did not place the LoRA for {missing[0]!r} on the base UNet")
    factors = {}
    for target, (a, b) in pairs.items():
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise LoadError(f"{lora_path}: the LoRA for {target} holds NaN or Inf values; this file cannot be used")
        weight = dict(base.unet.named_modules())[target].weight
        rank = a.shape[0]
        factors[target] = LoraFactor(down=a.float().reshape(rank, *weight.shape[1:]),
                                     up=b.float().reshape(b.shape[0], rank) * scales[target])
    return LoraAdapter(path=folder, sha256=file_sha256(lora_path), factors=factors)


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _check_lora_header(headers: Mapping[str, tuple[str, list]], lora_path: Path) -> None:
    """A LoRA file's tensors, from its header: floating point (network alphas may be any number), and no empty
    factor (rank 0)."""
    for key, (dtype, shape) in headers.items():
        if dtype not in _FLOAT_DTYPES and not key.endswith("alpha"):
            raise LoadError(f"{lora_path}: LoRA tensor {key!r} has dtype {dtype}; LoRA weights must be floating point "
                            "(F16, BF16, F32 or F64)")
        if 0 in shape:
            raise LoadError(f"{lora_path}: LoRA tensor {key!r} has shape {list(shape)}: a rank-0 (empty) factor")


def _lora_state_dict(base: BaseModel, lora_path: Path, raw_keys: list[str]):
    """(state dict with diffusers' 'unet.' / 'text_encoder.' prefixes, network alphas or None, LoRA config
    metadata or None) of one LoRA file, through diffusers' converter."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline if base.kind == "sdxl" else StableDiffusionPipeline
    try:
        state, alphas, metadata = pipeline.lora_state_dict(
            str(lora_path.parent), weight_name=lora_path.name, use_safetensors=True, local_files_only=True,
            unet_config=base.unet_config, return_lora_metadata=True)
    except Exception as exc:
        raise LoadError(f"{lora_path}: unreadable LoRA weights ({short_error(exc)})") from None
    if raw_keys and all(k.startswith(_PEFT_PREFIX) for k in raw_keys):
        # PEFT's own layout (PeftModel.save_pretrained on a UNet): the LoRA config lives in adapter_config.json.
        state = {_UNET_PREFIX + k[len(_PEFT_PREFIX):]: v for k, v in state.items()}
        config_path = lora_path.parent / "adapter_config.json"
        # diffusers reads LoRA metadata per component, under the same prefixes as the tensors
        metadata = {_UNET_PREFIX + k: v for k, v in _peft_config(read_json(config_path), config_path).items()} \
            if config_path.is_file() else None
    elif state and not any(k.startswith((_UNET_PREFIX, *_TEXT_PREFIXES)) for k in state):
        # diffusers' older UNet-only layout (save_attn_procs): module names with no component prefix.
        state = {_UNET_PREFIX + k: v for k, v in state.items()}
    if not state:
        raise LoadError(f"{lora_path}: holds no LoRA weights")
    return state, alphas, metadata


def _peft_config(config: dict, path: Path) -> dict:
    """The LoraConfig arguments of a PEFT adapter_config.json (the fields LoraConfig takes)."""
    import dataclasses

    from peft import LoraConfig

    if config.get("peft_type", "LORA") != "LORA":
        raise LoadError(f"{path}: a {config.get('peft_type')} adapter, not LoRA")
    names = {f.name for f in dataclasses.fields(LoraConfig)}
    return {k: v for k, v in config.items() if k in names}


def _lora_pairs(unet: torch.nn.Module, state: dict, lora_path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A [r, in, ...], B [out, r, ...])} of the UNet keys in PEFT naming (diffusers'
    ``convert_unet_state_dict_to_peft``), checked against the base's layers."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    unet_state = {k[len(_UNET_PREFIX):]: v for k, v in state.items()}
    if not any(".lora_A." in k or ".lora_B." in k for k in unet_state):
        unet_state = convert_unet_state_dict_to_peft(unet_state)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in unet_state.items():
        target, sep, role = key.rpartition(".lora_")
        if not sep or role not in ("A.weight", "B.weight"):
            raise LoadError(f"{lora_path}: unsupported LoRA tensor {key!r} (msdda reads lora_A / lora_B weights of "
                            "Linear and Conv2d layers)")
        parts.setdefault(target, {})[role[0]] = tensor
    modules = dict(unet.named_modules())
    pairs = {}
    for target, ab in sorted(parts.items()):
        if "A" not in ab or "B" not in ab:
            raise LoadError(f"{lora_path}: incomplete LoRA pair for {target} (has only lora_{next(iter(ab))})")
        module = modules.get(target)
        if module is None or not hasattr(module, "weight"):
            raise LoadError(f"{lora_path}: LoRA targets {target!r}, which the base UNet does not have")
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or getattr(module, "groups", 1) != 1:
            raise LoadError(f"{lora_path}: LoRA on {target} ({type(module).__name__}) is not supported; msdda adapts "
                            "Linear and Conv2d layers")
        a, b = ab["A"], ab["B"]
        weight = module.weight
        rank = a.shape[0]
        if a.dim() >= 2 and b.dim() >= 2 and b.shape[1] != rank:
            raise LoadError(f"{lora_path}: LoRA for {target} has rank {rank} in its down factor (lora_A) but rank "
                            f"{b.shape[1]} in its up factor (lora_B); the two ranks must match")
        if a.dim() < 2 or b.dim() < 2 or b.shape[0] != weight.shape[0] or b.shape[1] != rank \
                or b[0, 0].numel() != 1 or tuple(a.shape[1:]) != tuple(weight.shape[1:]):
            raise LoadError(f"{lora_path}: LoRA for {target} has shape {(b.shape[0], a[0].numel())}, weight is "
                            f"{tuple(weight.shape)}")
        pairs[target] = (a, b)
    return pairs


def _peft_scales(unet: torch.nn.Module, state: dict, alphas, metadata, lora_path: Path) -> dict[str, float]:
    """{module name: scale} as PEFT sets it when diffusers loads this LoRA (``load_lora_adapter``: LoraConfig
    from the file's ranks and network alphas, or from its metadata), found on a meta-device copy of the UNet so
    that no weight is allocated. UNet2DModel has no diffusers LoRA loader; PEFT is driven directly there, with
    the same config diffusers would build."""
    import accelerate
    from peft.tuners.lora import LoraLayer

    with accelerate.init_empty_weights():
        skeleton = type(unet).from_config(unet.config)
    try:
        if hasattr(skeleton, "load_lora_adapter"):
            skeleton.load_lora_adapter(state, prefix="unet", network_alphas=alphas, metadata=metadata,
                                       adapter_name=_ADAPTER, low_cpu_mem_usage=True)
        else:
            _inject_with_peft(skeleton, state, alphas, metadata)
    except LoadError:
        raise
    except Exception as exc:
        raise LoadError(f"{lora_path}: diffusers cannot place this LoRA on the base UNet ({short_error(exc)})") from None
    scales = {}
    for name, module in skeleton.named_modules():
        if isinstance(module, LoraLayer) and _ADAPTER in module.scaling:
            if module.use_dora.get(_ADAPTER) or module.lora_bias.get(_ADAPTER):
                raise LoadError(f"{lora_path}: DoRA / LoRA bias on {name} is not supported")
            scales[name] = float(module.scaling[_ADAPTER])
    return scales


def _inject_with_peft(skeleton: torch.nn.Module, state: dict, alphas, metadata) -> None:
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig, inject_adapter_in_model

    unet_state = {k[len(_UNET_PREFIX):]: v for k, v in state.items()}
    if not any(".lora_A." in k for k in unet_state):
        unet_state = convert_unet_state_dict_to_peft(unet_state)
    if metadata is None:
        ranks = {f"^{k}": v.shape[1] for k, v in unet_state.items() if "lora_B" in k and v.ndim > 1}
        alphas = {k[len(_UNET_PREFIX):]: v for k, v in (alphas or {}).items() if k.startswith(_UNET_PREFIX)}
        config = get_peft_kwargs(ranks, alphas or None, unet_state, is_unet=True)
    else:
        config = {k[len(_UNET_PREFIX):]: v for k, v in metadata.items() if k.startswith(_UNET_PREFIX)}
    inject_adapter_in_model(LoraConfig(**config), skeleton, adapter_name=_ADAPTER, state_dict=unet_state)


def lora_delta(factor: LoraFactor, weight_shape) -> torch.Tensor:
    """delta W = up @ down, shaped like the layer's weight (float32)."""
    return (factor.up @ factor.down.flatten(1)).reshape(weight_shape)


def shared_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of ``module`` whose parameters and buffers *are* the original's (no weight is copied):
    its layers may be wrapped or replaced without touching the original module."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


def merged_network(base_unet: torch.nn.Module, adapter: LoraAdapter) -> torch.nn.Module:
    """A full copy of the base UNet with the adapter merged, W' = W + up @ down, in the base's dtype: what
    diffusers' ``fuse_lora`` computes. Shares every tensor the adapter does not change with the base."""
    merged = shared_copy(base_unet)
    modules = dict(merged.named_modules())
    for target, f in adapter.factors.items():
        layer = modules[target]
        w = layer.weight
        layer.weight = torch.nn.Parameter((w.float() + lora_delta(f, w.shape).to(w.device)).to(w.dtype),
                                          requires_grad=False)
    return merged.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------- experts
def lora_file(path: Path) -> Path | None:
    for name in LORA_FILES:
        if (path / name).is_file():
            return path / name
    files = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    # A folder holding one .safetensors file and no config.json: a LoRA file as kohya-ss and A1111 name them.
    if len(files) == 1 and not (path / "config.json").is_file() and not (path / "unet").is_dir():
        return files[0]
    return None


def unet_weight_files(base, experts, variant: str | None = None) -> list[Path]:
    """The UNet weight files of a base and its full-weight experts (a LoRA adapter loads in the base's dtype): what
    the precision default reads. A folder that is not a model is left to the loader, which reports it."""
    files = []
    for path in (base, *experts):
        try:
            if lora_file(require_dir(path)) is None:
                files += [f for f in weight_files(unet_folder(path), UNET_STEM, variant) if f.suffix == ".safetensors"]
        except LoadError:
            pass
    return files


def load_expert_weights(name: str, path, base: BaseModel, dtype=None, variant: str | None = None
                        ) -> tuple["torch.nn.Module | LoraAdapter", str]:
    """Load expert ``name`` and check it against the base. Returns (a full UNet, or a :class:`LoraAdapter` of
    the base's UNet; the sha256 of its weights)."""
    path = require_dir(path)
    lora = lora_file(path)
    if lora is not None:
        adapter = read_lora_adapter(base, lora)
        return adapter, adapter.sha256
    refuse_pickles(path)
    udir = unet_folder(path)
    unet, config, sha = load_unet(udir, dtype, variant)
    check_compatible(name, config, base.unet_config)
    sched = scheduler_config_for(path, udir)
    if sched is not None:
        check_scheduler_compatible(name, sched, base.scheduler_config)
    return unet, sha


def load_expert(name: str, path, base: BaseModel, dtype=None, variant: str | None = None
                ) -> tuple[torch.nn.Module, str]:
    """Expert ``name`` as a full network (a LoRA adapter merged onto a copy of the base's UNet) and the sha256 of
    its weights: for tools that need one module per expert (ONNX export, benchmarks)."""
    expert, sha = load_expert_weights(name, path, base, dtype, variant)
    if isinstance(expert, LoraAdapter):
        expert = merged_network(base.unet, expert)
    return expert, sha


# ---------------------------------------------------------------------------------------------------- the LoRA group network
# The forward in progress: (factor rows [G], keep [G] or None) for its G member groups in stacking order. Rows
# index the adapters' stacked factors (member m >= 1 is row m - 1); the base member (0) has no row of its own:
# it borrows row 0 and its delta is multiplied by keep = 0, so no zero factors are stored for it.
_SELECTED: ContextVar[tuple] = ContextVar("msdda_lora_selected")


def member_selection(members, device) -> tuple:
    """What a forward of ``members`` selects: (factor rows [G] int64, keep [G] float or None) on ``device``."""
    rows = torch.tensor([max(m - 1, 0) for m in members], device=device)
    keep = None if 0 not in members else torch.tensor([float(m != 0) for m in members], device=device)
    return rows, keep


class _BatchedLora(torch.nn.Module):
    """A base layer plus every adapter's factors: down [K, r, in, *k], up [K, out, r] (zeros where an adapter
    does not touch this layer)."""

    def __init__(self, base: torch.nn.Module, down: torch.Tensor, up: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)


class BatchedLoraLinear(_BatchedLora):
    """A Linear whose input rows are G member groups; adds each group's low-rank delta (down [M, r, in])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sel, keep = _SELECTED.get()
        y = self.base(x)
        g = sel.numel()
        xg = x.reshape(g, -1, x.shape[-1])                                   # [G, rows, in]
        h = torch.bmm(xg, self.down[sel].transpose(1, 2))                    # [G, rows, r]
        delta = torch.bmm(h, self.up[sel].transpose(1, 2))                   # [G, rows, out]
        if keep is not None:
            delta = delta * keep.to(delta.dtype).view(g, 1, 1)
        return y + delta.reshape(y.shape)


class BatchedLoraConv2d(_BatchedLora):
    """A Conv2d (groups=1) whose batch is G member groups; adds each group's low-rank delta as two grouped
    convolutions over the groups laid side by side in channels (down [M, r, in, kh, kw], run with the layer's
    stride, padding and dilation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sel, keep = _SELECTED.get()
        y = self.base(x)
        g = sel.numel()
        n, c, h, w = x.shape
        xg = x.reshape(g, n // g, c, h, w).transpose(0, 1).reshape(n // g, g * c, h, w)
        down = self.down[sel]                                                 # [G, r, in, kh, kw]
        r = down.shape[1]
        b = self.base
        mid = F.conv2d(xg, down.reshape(g * r, *down.shape[2:]), None, b.stride, b.padding, b.dilation, groups=g)
        up = self.up[sel]                                                     # [G, out, r]
        delta = F.conv2d(mid, up.reshape(g * up.shape[1], r, 1, 1), None, groups=g)   # [n/g, G*out, h', w']
        delta = delta.reshape(n // g, g, up.shape[1], *delta.shape[2:]).transpose(0, 1)
        if keep is not None:
            delta = delta * keep.to(delta.dtype).view(g, 1, 1, 1, 1)
        return y + delta.reshape(y.shape)


def _stack(factors: list[dict | None], name: str, layer: torch.nn.Module, device, dtype):
    """(down [K, r_max, ...], up [K, out, r_max]) of one layer over the adapters, zero-padded."""
    present = [f[name] for f in factors if f and name in f]
    r_max = max(p.down.shape[0] for p in present)
    down = torch.zeros(len(factors), r_max, *layer.weight.shape[1:], device=device, dtype=dtype)
    up = torch.zeros(len(factors), layer.weight.shape[0], r_max, device=device, dtype=dtype)
    for m, f in enumerate(factors):
        if f and name in f:
            r = f[name].down.shape[0]
            down[m, :r] = f[name].down.to(device, dtype)
            up[m, :, :r] = f[name].up.to(device, dtype)
    return down, up


def lora_group_network(base: torch.nn.Module, adapters: list[LoraAdapter | None]) -> torch.nn.Module:
    """A copy of ``base`` sharing its parameters, whose adapted layers add the selected members' deltas (see the
    module docstring).

    adapters: one per member, in member order: None for the base itself, else a LoRA adapter of it. Raises
    ValueError when an adapted layer is not a Linear or a groups=1 Conv2d."""
    if adapters[0] is not None or any(a is None for a in adapters[1:]):
        raise ValueError("member 0 must be the base and every other member a LoRA adapter of it")
    factors = [a.factors for a in adapters[1:]]
    p = next(base.parameters())
    net = shared_copy(base)
    modules = dict(net.named_modules())
    for name in sorted({n for f in factors if f for n in f}):
        layer = modules.get(name)
        if layer is None:
            raise ValueError(f"LoRA targets {name!r}, which the base does not have")
        down, up = _stack(factors, name, layer, p.device, p.dtype)
        if isinstance(layer, torch.nn.Linear):
            wrapped = BatchedLoraLinear(layer, down, up)
        elif isinstance(layer, torch.nn.Conv2d) and layer.groups == 1:
            wrapped = BatchedLoraConv2d(layer, down, up)
        else:
            raise ValueError(f"LoRA on {name} ({type(layer).__name__}) cannot be batched; use group='loop'")
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else net, child, wrapped)
    return net.eval().requires_grad_(False)


def soup_parameters(net: torch.nn.Module, base: torch.nn.Module, coeffs: dict[int, float]) -> dict[str, torch.Tensor]:
    """The parameters of sum_m c_m theta_m over LoRA members of a group network ``net`` built on ``base``:
    (sum c) W everywhere, plus sum_m c_m up_m @ down_m on the adapted layers. Built per call (a soup needs one
    full network), never stored."""
    total = sum(coeffs.values())
    params = {k: total * v for k, v in base.named_parameters()}
    for name, layer in net.named_modules():
        if isinstance(layer, _BatchedLora):
            key = f"{name}.weight"
            w = params[key]
            for m, c in coeffs.items():
                if m:                                       # member m >= 1 is adapter row m - 1
                    w = w + c * (layer.up[m - 1] @ layer.down[m - 1].flatten(1)).reshape(w.shape)
            params[key] = w
    return params


def _repeat(value, g: int):
    """A conditioning tensor (or a dict of them: SDXL's added_cond_kwargs) stacked for g member groups."""
    if torch.is_tensor(value):
        return value.repeat(g, *([1] * (value.dim() - 1)))
    if isinstance(value, dict):
        return {k: _repeat(v, g) for k, v in value.items()}
    return value


def forward_members(net: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor, kwargs: dict,
                    members: tuple[int, ...], selected: torch.Tensor | None = None) -> torch.Tensor:
    """One forward of the group network for ``members``: x [N, C, H, W] -> [len(members), N, C_out, H, W].
    selected: ``member_selection(members, x.device)``, if the caller keeps one (a CUDA graph capture cannot hold
    the host-to-device copies that make it)."""
    g = len(members)
    stacked = {k: _repeat(v, g) for k, v in kwargs.items()}
    token = _SELECTED.set(selected if selected is not None else member_selection(members, x.device))
    try:
        out = net(x.repeat(g, 1, 1, 1), timestep.repeat(g), **stacked)[0]
    finally:
        _SELECTED.reset(token)
    return out.reshape(g, x.shape[0], *out.shape[1:])
