"""Loading models from local diffusers folders: safetensors only, strictly, with compatibility checks.

A *base* is one of
- a diffusers pipeline folder (``model_index.json``): Stable Diffusion (UNet2DConditionModel, a CLIP text encoder
  and tokenizer, VAE, scheduler) or Stable Diffusion XL (a UNet with ``addition_embed_type="text_time"``, a
  CLIPTextModel and a CLIPTextModelWithProjection with their tokenizers, VAE, scheduler);
- a folder holding ``unet/`` (and optionally ``scheduler/``), as the embedded zoo stores its models;
- a single UNet2DModel folder (``config.json`` + ``diffusion_pytorch_model.safetensors``).

An *expert* is a UNet folder of the base's architecture (any of the layouts above; only its UNet is used), or a
LoRA adapter of the base's UNet: a diffusers (``pytorch_lora_weights.safetensors``), kohya-ss / A1111
(``lora_unet_..._lora_down.weight`` + ``.alpha``: the folder's one ``.safetensors`` file) or PEFT
(``adapter_model.safetensors`` + ``adapter_config.json``) file, read through diffusers' own LoRA state-dict
conversion and PEFT's scaling rules, and kept as low-rank factors until a backend needs a merged network: that half,
with how an expert folder loads, is ``msdda.lora``.

Loading is strict: a missing, unexpected or misshapen tensor in any network is a one-line LoadError naming the
file and a key, never a random initialisation (diffusers and transformers only warn). Networks are built in the
requested dtype by the loaders themselves (``dtype=``; accelerate's low-memory path), and
``variant="fp16"`` picks ``*.fp16.safetensors`` weights. Nothing is ever unpickled: a folder holding only
``.bin``/``.ckpt``/``.pt`` weights is refused.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from msdda.atomic import MAX_JSON_BYTES, read_regular
from msdda.errors import one_line
from msdda.export.onnx import SDXL_TIME_IDS    # original (h, w), crop top-left (y, x), target (h, w)
from msdda.hashing import file_sha256

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
UNET_STEM = "diffusion_pytorch_model"
UNET_WEIGHTS = UNET_STEM + ".safetensors"
TRANSFORMERS_STEM = "model"
# The pipeline components msdda loads, by the class model_index.json names for them.
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
VAE_CLASSES = ("AutoencoderKL",)
# Config keys that do not change what a UNet computes from its weights, so experts may differ in them.
_NON_STRUCTURAL = {"_name_or_path", "_diffusers_version", "_use_default_values", "_class_name"}


class LoadError(ValueError):
    """A model folder is missing, unsafe, corrupt or incompatible. The message is one line."""


@dataclass(frozen=True)
class BaseModel:
    """What the runtime needs from a base: its UNet, the scheduler config, and the optional text/VAE parts.

    SDXL bases also hold ``text_encoder_2`` (a CLIPTextModelWithProjection, whose pooled projection is the UNet's
    ``text_embeds``) and ``tokenizer_2``. ``pipeline_config``: the pipeline-level settings of model_index.json
    (e.g. SDXL's ``force_zeros_for_empty_prompt``)."""
    path: Path
    unet: torch.nn.Module
    unet_config: dict
    scheduler_config: dict
    text_encoder: torch.nn.Module | None = None
    tokenizer: object | None = None
    vae: torch.nn.Module | None = None
    weights_sha256: str = ""
    extra: dict = field(default_factory=dict)
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object | None = None
    pipeline_config: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """"sdxl" (text + pooled text + time ids), "text" (Stable Diffusion-style cross-attention), or "pixel"
        (UNet2DModel: unconditional or class-conditional)."""
        return unet_kind(self.unet_config)


def unet_kind(config: dict) -> str:
    if config.get("_class_name") != "UNet2DConditionModel":
        return "pixel"
    return "sdxl" if config.get("addition_embed_type") == "text_time" else "text"


def _one_line(exc: BaseException) -> str:
    return one_line(exc, 200)    # leaves room in the 300-character line for the path it is quoted with


def require_dir(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise LoadError(f"model folder not found: {path}")
    if not path.is_dir():
        raise LoadError(f"not a model folder: {path}")
    return path


def refuse_pickles(folder: Path) -> None:
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles and not any(p.suffix == ".safetensors" for p in folder.iterdir()):
        raise LoadError(f"{folder}: only pickle checkpoints ({', '.join(sorted(pickles))}); refusing to unpickle, "
                        "convert the weights to safetensors")


def unet_folder(path) -> Path:
    """The folder holding the UNet's config.json inside any supported layout."""
    path = require_dir(path)
    for candidate in (path / "unet", path):
        if (candidate / "config.json").is_file():
            refuse_pickles(candidate)
            return candidate
    raise LoadError(f"{path}: no UNet found (expected model_index.json, unet/config.json or config.json)")


def read_json(path: Path) -> dict:
    """A JSON object from ``path`` (every config a model folder holds is one); anything else is a LoadError."""
    try:     # the file rule: a FIFO or device named config.json is refused, never waited on
        obj = json.loads(read_regular(path, max_bytes=MAX_JSON_BYTES))
    except (OSError, ValueError, RecursionError) as exc:    # UnsafeFileError, UnicodeDecodeError, JSONDecodeError
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


def weight_files(folder: Path, stem: str, variant: str | None = None) -> list[Path]:
    """The safetensors file(s) of one model in ``folder``: ``<stem>[.<variant>].safetensors``, or the shards its
    ``.safetensors.index.json`` names. Empty when there are none."""
    name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
    if (folder / name).is_file():
        return [folder / name]
    index = folder / f"{name}.index.json"
    if index.is_file():
        shards = read_json(index).get("weight_map")
        if not isinstance(shards, dict):
            raise LoadError(f"{index}: no weight_map")
        return [index] + [folder / s for s in sorted(set(shards.values()))]
    return []


def files_sha256(files: list[Path]) -> str:
    """sha256 of one weights file, or of the list of its shards' sha256 (index first) for a sharded model."""
    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("\n".join(file_sha256(f) for f in files).encode()).hexdigest()


def check_loading_info(info: dict, where: Path) -> None:
    """A model loaded strictly: no missing, unexpected or misshapen tensor in the loading report
    (``output_loading_info=True`` of diffusers or transformers), else a LoadError naming ``where`` and a key.
    (diffusers and transformers only warn about these, and initialise missing tensors at random.)"""
    for field_name, what in (("missing_keys", "is missing tensor"), ("unexpected_keys", "has unexpected tensor"),
                             ("mismatched_keys", "has misshapen tensor")):
        keys = sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in (info.get(field_name) or ()))
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise LoadError(f"{where} {what} {keys[0]!r}{more}; refusing to initialise or drop weights")
    errors = info.get("error_msgs") or ()
    if errors:
        raise LoadError(f"{where}: {_one_line(errors[0])}")


def _no_variant(folder: Path, what: str, stem: str, variant: str | None) -> LoadError:
    if variant:
        have = sorted(p.name for p in folder.glob(f"{stem}*.safetensors"))
        return LoadError(f"{folder}: no {variant!r} variant of the {what} weights ({stem}.{variant}.safetensors)"
                         + (f"; found {', '.join(have)}" if have else ""))
    return LoadError(f"{folder}: missing {stem}.safetensors")


def load_strict(cls, folder: Path, *, what: str, stem: str, dtype=None, variant: str | None = None
                ) -> tuple[torch.nn.Module, list[Path]]:
    """``cls.from_pretrained(folder)`` from safetensors only, in ``dtype`` (float32 when None), with every tensor
    of the checkpoint used and every parameter loaded (see :func:`check_loading_info`). Returns (module in eval
    mode without gradients, its weights files). The dtype is the loader's own (``dtype=``, diffusers' and
    transformers' name for it), so networks are built in it: no cast afterwards."""
    files = weight_files(folder, stem, variant)
    if not files:
        refuse_pickles(folder)
        raise _no_variant(folder, what, stem, variant)
    where = files[0] if len(files) == 1 else folder
    # ignore_mismatched_sizes: transformers then reports a misshapen tensor by name (instead of raising a message
    # that points at a log); the report is refused below, so nothing re-initialised is ever used
    kwargs = {"dtype": dtype or torch.float32, "use_safetensors": True, "local_files_only": True,
              "output_loading_info": True, "ignore_mismatched_sizes": is_transformers_model(cls)}
    if variant:
        kwargs["variant"] = variant
    try:
        model, info = cls.from_pretrained(folder, **kwargs)
    except Exception as exc:  # corrupt header, truncated file, shape mismatch...
        raise LoadError(f"{where}: cannot load {what} weights ({_one_line(exc)})") from None
    check_loading_info(info, where)
    return model.eval().requires_grad_(False), files


def is_transformers_model(cls) -> bool:
    """Whether ``cls`` is a transformers model (else a diffusers one)."""
    return cls.__module__.startswith("transformers.")


def load_unet(folder: Path, dtype=None, variant: str | None = None) -> tuple[torch.nn.Module, dict, str]:
    """Load a UNet folder (safetensors only, strictly). Returns (module in eval mode, config, sha256 of the
    weights)."""
    import diffusers

    config = read_json(folder / "config.json")
    cls_name = config.get("_class_name", "UNet2DModel")
    if cls_name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise LoadError(f"{folder}: unsupported UNet class {cls_name!r}")
    check_unet_config(config, folder / "config.json")
    unet, files = load_strict(getattr(diffusers, cls_name), folder, what="UNet", stem=UNET_STEM, dtype=dtype,
                              variant=variant)
    return unet, config, files_sha256(files)


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


def load_base(path, dtype=None, variant: str | None = None) -> BaseModel:
    """Load a base model folder (see the module docstring) in ``dtype`` (float32 when None), from the
    ``variant`` weights when given (e.g. "fp16": ``*.fp16.safetensors``)."""
    path = require_dir(path)
    udir = unet_folder(path)
    unet, config, sha = load_unet(udir, dtype, variant)
    sched = scheduler_config_for(path, udir)
    if sched is None:
        raise LoadError(f"{path}: no scheduler/scheduler_config.json beside the UNet")
    parts, pipeline_config = {}, {}
    if (path / "model_index.json").is_file():
        parts, pipeline_config = load_pipeline_parts(path, dtype, variant)
    base = BaseModel(path=path, unet=unet, unet_config=config, scheduler_config=sched, weights_sha256=sha,
                     pipeline_config=pipeline_config, **parts)
    check_base_parts(base)
    return base


def load_pipeline_parts(path: Path, dtype=None, variant: str | None = None) -> tuple[dict, dict]:
    """The text encoders, tokenizers and VAE a pipeline folder's model_index.json names (each loaded strictly,
    from safetensors), and its pipeline-level settings (keys not naming a component)."""
    import diffusers
    import transformers

    index = read_json(path / "model_index.json")
    parts, settings = {}, {}
    for key, value in index.items():
        if key.startswith("_"):
            continue
        if not (isinstance(value, list) and len(value) == 2):
            settings[key] = value
            continue
        library, cls_name = value
        folder = path / key
        if key in ("unet", "scheduler") or cls_name is None or not folder.is_dir():
            continue
        if key in ("text_encoder", "text_encoder_2"):
            if cls_name not in TEXT_ENCODER_CLASSES:
                raise LoadError(f"{folder}: unsupported text encoder class {cls_name!r} (msdda loads "
                                f"{', '.join(TEXT_ENCODER_CLASSES)})")
            refuse_pickles(folder)
            parts[key], _ = load_strict(getattr(transformers, cls_name), folder, what="text encoder",
                                        stem=TRANSFORMERS_STEM, dtype=dtype, variant=variant)
        elif key in ("tokenizer", "tokenizer_2"):
            if cls_name not in TOKENIZER_CLASSES:
                raise LoadError(f"{folder}: unsupported tokenizer class {cls_name!r}")
            try:
                parts[key] = getattr(transformers, cls_name).from_pretrained(folder, local_files_only=True)
            except Exception as exc:
                raise LoadError(f"{folder}: cannot load the tokenizer ({_one_line(exc)})") from None
        elif key == "vae":
            if cls_name not in VAE_CLASSES:
                raise LoadError(f"{folder}: unsupported VAE class {cls_name!r}")
            refuse_pickles(folder)
            parts[key], _ = load_strict(getattr(diffusers, cls_name), folder, what="VAE", stem=UNET_STEM,
                                        dtype=dtype, variant=variant)
    return parts, settings


def check_base_parts(base: BaseModel) -> None:
    """The parts of a base fit together: a text UNet has a text encoder and tokenizer when the pipeline names
    them; an SDXL UNet has both encoders, and its added embedding takes the pooled projection plus six time
    ids (as ``StableDiffusionXLPipeline`` builds them)."""
    config = base.unet_config
    embed = config.get("addition_embed_type")
    if embed not in (None, "text_time"):
        raise LoadError(f"{base.path}: UNet addition_embed_type={embed!r} is not supported (msdda runs "
                        "Stable Diffusion and SDXL UNets)")
    for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if (getattr(base, encoder) is None) != (getattr(base, tokenizer) is None):
            raise LoadError(f"{base.path}: {encoder} and {tokenizer} must come together")
    if base.kind != "sdxl":
        if base.text_encoder_2 is not None:
            raise LoadError(f"{base.path}: a second text encoder needs an SDXL UNet (addition_embed_type="
                            "'text_time')")
        return
    if all(getattr(base, part) is None for part in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")):
        return        # a bare SDXL UNet: the caller gives prompt_embeds and pooled_prompt_embeds (bare_text_unet)
    if base.text_encoder is None or base.text_encoder_2 is None:
        raise LoadError(f"{base.path}: an SDXL UNet needs text_encoder and text_encoder_2 (with their tokenizers) "
                        "in the pipeline folder")
    projection = getattr(base.text_encoder_2.config, "projection_dim", None)
    if not hasattr(base.text_encoder_2, "text_projection") or not projection:
        raise LoadError(f"{base.path}: text_encoder_2 must be a CLIPTextModelWithProjection (its pooled "
                        "projection is the UNet's text_embeds)")
    expected = base.unet.add_embedding.linear_1.in_features
    given = config["addition_time_embed_dim"] * SDXL_TIME_IDS + projection
    if given != expected:
        raise LoadError(f"{base.path}: the UNet's added embedding takes {expected} inputs, but "
                        f"{SDXL_TIME_IDS} time ids x addition_time_embed_dim {config['addition_time_embed_dim']} + "
                        f"text_encoder_2 projection_dim {projection} = {given} (an SDXL refiner is not supported)")
    width = base.text_encoder.config.hidden_size + base.text_encoder_2.config.hidden_size
    if config.get("cross_attention_dim") != width:
        raise LoadError(f"{base.path}: the UNet's cross_attention_dim {config.get('cross_attention_dim')} differs "
                        f"from the two text encoders' hidden sizes together ({width})")


# A base's own sampling defaults, in diffusers' argument names, in an optional file beside its UNet (the zoo's
# base ships one); without it, diffusers' StableDiffusionPipeline defaults.
SAMPLING_DEFAULTS_FILE = "sampling_defaults.json"
DIFFUSERS_DEFAULT_STEPS = 50
DIFFUSERS_DEFAULT_GUIDANCE_SCALE = 7.5


def sampling_defaults(path) -> tuple[int, float]:
    """(steps, guidance scale) a base samples with when a caller gives none: its folder's
    ``sampling_defaults.json`` ({"num_inference_steps": N, "guidance_scale": G}; either may be left out), else
    diffusers' 50 and 7.5. Every entry point (Engine.generate, the CLI, serve, batch) asks this one rule, from
    the folder alone, so the CLI can state the defaults before loading anything."""
    steps, guidance = DIFFUSERS_DEFAULT_STEPS, DIFFUSERS_DEFAULT_GUIDANCE_SCALE
    file = Path(path) / SAMPLING_DEFAULTS_FILE
    if not file.is_file():
        return steps, guidance
    given = read_json(file)
    unknown = sorted(set(given) - {"num_inference_steps", "guidance_scale"})
    if unknown:
        raise LoadError(f"{file}: unknown key {unknown[0]!r} (expected num_inference_steps, guidance_scale)")
    steps = given.get("num_inference_steps", steps)
    guidance = given.get("guidance_scale", guidance)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise LoadError(f"{file}: num_inference_steps must be an integer >= 1, not {steps!r}")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or guidance != guidance \
            or abs(guidance) == float("inf"):
        raise LoadError(f"{file}: guidance_scale must be a finite number, not {guidance!r}")
    return steps, float(guidance)


@dataclass(frozen=True)
class BaseConditioning:
    """What a base is conditioned on, read from its configs alone (nothing loaded), so that a caller such as the
    CLI can check its flags first: ``kind`` as ``BaseModel.kind``, ``num_classes`` (class-conditional bases,
    counting the null class), ``bare_unet`` (a text UNet with no text encoder beside it)."""
    kind: str
    num_classes: int | None
    bare_unet: bool

    @property
    def is_text(self) -> bool:
        return self.kind in ("text", "sdxl")


def base_conditioning(path) -> BaseConditioning:
    """A base folder's :class:`BaseConditioning`, from its UNet config and model_index.json (LoadError when
    they are missing or unreadable, as loading would say)."""
    path = require_dir(path)
    config = read_json(unet_folder(path) / "config.json")
    kind = unet_kind(config)
    index = read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    encoder = index.get("text_encoder")
    has_encoder = isinstance(encoder, list) and len(encoder) == 2 and encoder[1] is not None \
        and (path / "text_encoder").is_dir()
    return BaseConditioning(kind=kind, num_classes=config.get("num_class_embeds"),
                            bare_unet=kind in ("text", "sdxl") and not has_encoder)


def bare_text_unet(base: BaseModel) -> bool:
    """Whether ``base`` is a text-conditioned UNet loaded without its text stack (a UNet folder alone): it runs on
    precomputed ``prompt_embeds``, never on prompts."""
    return base.kind in ("text", "sdxl") and base.text_encoder is None


def pooled_embeds_width(base: BaseModel) -> int | None:
    """The width of SDXL's pooled text embedding (``pooled_prompt_embeds``'s last dimension), read from the UNet's
    added embedding: its inputs are the pooled embedding and SDXL_TIME_IDS x addition_time_embed_dim. None for other
    bases."""
    if base.kind != "sdxl":
        return None
    return base.unet.add_embedding.linear_1.in_features - base.unet_config["addition_time_embed_dim"] * SDXL_TIME_IDS


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
