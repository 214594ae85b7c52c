"""``Engine``: loaded networks + schedule, and ``generate`` as a pure function of its arguments.

The Engine owns what it loaded (backend, text encoder, VAE, schedule tables) and nothing per call: every
``generate`` builds its own latents, conditioning, coefficients and closures, so one Engine serves concurrent
calls from several threads.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from msdda import schedule as sch
from msdda.backend_artifacts import backend_source
from msdda.backends import Conditioning, make_backend
from msdda.conditioning import NO_MICRO, Conditioner, MicroConditioning, prompt_pipeline
from msdda.export.artifacts import ArtifactMismatch
from msdda.graphs import StepGraphCache, StepInputs, sample_graphed
from msdda.kernels import (StepScalars, fused_expert_step, fused_expert_step_ref, philox_normal, prepare_fused_step,
                           raise_if_bad)
from msdda.loading import (MAX_SAMPLE_SIZE, BaseModel, LoadError, bare_text_unet, check_base_parts, check_compatible,
                           check_scheduler_config, check_unet_config, load_base, sampling_defaults)
from msdda.lora import LoraAdapter, load_expert_weights, merged_network, unet_weight_files
from msdda.precision import all_finite, default_dtype, vae_decode_dtype
from msdda.request import Request
from msdda.sampling import Denoise, sample
from msdda.strategies import Plan, coefficient_matrix, mix_outputs, resolve
from msdda.validation import (DEFAULT_LIMITS, Limits, batch_size, check_device, check_eta, check_expert_name,
                              check_generator, check_guidance_scale, check_image_size, check_int, check_noise,
                              check_num_images_per_prompt, check_steps, check_strategy, check_variant,
                              per_sample_weights, real_tensor, seed_list)

__all__ = ["Engine", "GenerateOutput", "Request", "MicroConditioning", "CheckedRequest", "Limits", "SampleRun"]

log = logging.getLogger("msdda")


@dataclass(frozen=True)
class GenerateOutput:
    """images: list of PIL images (or a tensor/array per ``output_type``); latents: x_0 [B, C, H, W]."""
    images: object
    latents: torch.Tensor
    seeds: list[int] = field(default_factory=list)
    weights: list[dict] = field(default_factory=list)
    strategy: str = "msdda"


#: the name ``check_request``'s result had before it became ``msdda.Request`` (kept for one release)
CheckedRequest = Request
_REQUEST_TOKENS = itertools.count(1)      # each Engine's token: a Request is trusted by the Engine that checked it


@dataclass(frozen=True)
class SampleRun:
    """One ``generate`` call prepared by ``Engine.start``: what its step loop reads. Per sample b: x_T[b],
    seeds[b], step_coeff[b], mix_coeff[b]; the conditioning's rows b (and B + b, the unconditional half first,
    under cfg). error_count: the deferred bad-element counter of its steps (int32 [1] on the device)."""
    request: Request
    cond: Conditioning
    cfg: bool
    timesteps: tuple[int, ...]
    scalars: tuple[StepScalars, ...]
    seeds: torch.Tensor
    x_T: torch.Tensor
    noise: torch.Tensor | None
    step_coeff: torch.Tensor
    mix_coeff: torch.Tensor
    error_count: torch.Tensor
    guidance: float | None
    output_type: str
    strategy: str


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    sha256: str


class Engine(Conditioner):
    """A base model, K aligned experts, one backend and one schedule family, loaded once."""

    def __init__(self, base: BaseModel, experts: Mapping[str, "torch.nn.Module | LoraAdapter"], *, backend="torch",
                 device="cpu",
                 dtype=None, scheduler: str | None = None, models: Sequence[ModelInfo] = (),
                 backend_options: Mapping | None = None, limits: Limits = DEFAULT_LIMITS, cuda_graphs: bool = True,
                 dtype_default: bool = False, row_block: int | None = None):
        for name in experts:
            _check_expert_name(name)
        # Batch invariance: every network call (UNets, text encoders, VAE) sees exactly row_block rows
        # (``in_row_blocks``), so a sample's bits do not depend on the other samples of its call.
        self.row_block = None if row_block is None else check_int("row_block", row_block, lo=1)
        self.request_token = next(_REQUEST_TOKENS)
        if not isinstance(limits, Limits):
            raise ValueError(f"limits must be a msdda.validation.Limits, not {limits!r}")
        self.limits = limits
        self.device = check_device(device)
        self.base = base
        self.members = ("base",) + tuple(experts)
        self.models = tuple(models)
        cfg = base.unet_config
        self.kind = base.kind
        self.is_text = self.kind in ("text", "sdxl")
        self.is_sdxl = self.kind == "sdxl"
        if self.is_sdxl and backend == "tensorrt":
            raise ValueError("SDXL's added conditioning (text_embeds, time_ids) is not wired into the TensorRT "
                             "backend; use backend='torch' or 'onnxruntime'")
        self.num_classes = cfg.get("num_class_embeds")
        self.sample_shape = (cfg["in_channels"], cfg["sample_size"], cfg["sample_size"]) \
            if isinstance(cfg["sample_size"], int) else (cfg["in_channels"], *cfg["sample_size"])
        # pixels per latent element (the VAE's downsampling; 1 for pixel-space models), and the multiple of pixels
        # an image side must be: diffusers' pipelines take any multiple of the VAE factor (its UNet pads what
        # its downsampling does not divide); a UNet2DModel needs whole downsamplings.
        # A latent (text) UNet folder alone has no VAE: 8, as diffusers' pipelines assume without one.
        self.vae_scale_factor = 2 ** (len(base.vae.config.block_out_channels) - 1) if base.vae is not None else \
            (8 if self.is_text else 1)
        self.size_multiple = self.vae_scale_factor if self.is_text else \
            2 ** (len(cfg.get("block_out_channels") or (0,)) - 1)
        self.sched_params = sch.schedule_from_diffusers_config(base.scheduler_config)
        kind = scheduler or ("ddim" if "DDIM" in base.scheduler_config.get("_class_name", "") else "ddpm")
        if kind not in ("ddpm", "ddim"):
            raise ValueError(f"unknown scheduler {scheduler!r}; choose 'ddpm' or 'ddim'")
        self.scheduler = kind
        self.learned_variance = cfg["out_channels"] == 2 * cfg["in_channels"]
        networks = {"base": base.unet, **experts}
        cond = "text_time" if self.is_sdxl else "text" if self.is_text else ("class" if self.num_classes else "none")
        text_shape = None
        if self.is_text:
            text_shape = (base.tokenizer.model_max_length if base.tokenizer else 77, cfg["cross_attention_dim"])
        if backend != "torch":  # the torch backend runs LoRA adapters as factors; exported graphs need full networks
            networks = {name: merged_network(base.unet, net) if isinstance(net, LoraAdapter) else net
                        for name, net in networks.items()}
        self.backend_name = backend
        try:   # artifacts (ONNX files, TensorRT plans) come from msdda.export; the backend only loads them
            source, options = backend_source(backend, networks, options=backend_options or {}, spec=dict(
                sample_shape=self.sample_shape, cond=cond, text_shape=text_shape))
            self.backend = make_backend(backend, source, device=self.device, dtype=dtype, **options)
        except ArtifactMismatch as exc:       # a file made from other weights than the model loaded for it
            raise LoadError(str(exc)) from None
        self.dtype = self.backend.dtype
        # The kernels compute in float32. A float64 Engine (a verification twin of a float32 one) steps with the
        # float64 definition instead, chosen once here.
        self._step_fn = fused_expert_step_ref if self.dtype == torch.float64 else fused_expert_step
        for part in (base.text_encoder, base.text_encoder_2, base.vae):
            if part is not None:
                part.to(self.device)
        # A text UNet folder alone (no text encoder beside it) runs on precomputed prompt_embeds only.
        self.bare_unet = bare_text_unet(base)
        self.prompt_pipe = prompt_pipeline(base) if self.is_text and not self.bare_unet else None
        # What generate uses when not given steps / guidance_scale: the model's own (its sampling_defaults.json)
        self.default_steps, self.default_guidance_scale = sampling_defaults(base.path)
        self.dtype_default = bool(dtype_default)   # True: from_pretrained chose the dtype (no dtype was given)
        if base.vae is not None:   # decode in the precision diffusers' pipeline for this model decodes in
            vae_dtype = vae_decode_dtype(base.vae.dtype, bool(base.vae.config.get("force_upcast", False)),
                                         "StableDiffusionXLPipeline" if self.is_sdxl else "StableDiffusionPipeline")
            if vae_dtype != base.vae.dtype:   # (Module.to: ModelMixin.to warns about fp32 modules, moot in fp32)
                torch.nn.Module.to(base.vae, vae_dtype)
        # Whole-step CUDA graphs (msdda.graphs): the torch backend on CUDA, unless cuda_graphs=False, or a float64
        # Engine (a verification twin, which steps with the float64 definition above, never the kernels).
        self.step_graphs = StepGraphCache() if cuda_graphs and backend == "torch" and self.device.type == "cuda" \
            and self.dtype != torch.float64 else None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, base, experts: Mapping[str, str] | None = None, *, backend: str = "torch",
                        device="cpu", dtype=None, scheduler: str | None = None, limits: Limits = DEFAULT_LIMITS,
                        variant: str | None = None, cuda_graphs: bool = True, row_block: int | None = None,
                        **backend_options) -> "Engine":
        """Load a base (SD or SDXL pipeline, ``unet/`` folder or UNet folder) and experts {name: folder: a UNet,
        or a LoRA file in diffusers, kohya/A1111 or PEFT layout} from local disk.

        Every network is built in ``dtype`` (float32 when None) by its loader, with accelerate's low-memory path,
        and loaded strictly: a missing, unexpected or misshapen tensor is a LoadError. ``variant``: load
        ``*.<variant>.safetensors`` weights (e.g. "fp16"), as diffusers' ``variant=``. ``scheduler``: "ddpm" or
        "ddim"; None keeps the base's own scheduler class. Experts whose architecture, prediction type, latent
        shape or scheduler differ from the base are refused here. ``limits``: the largest ``num_images`` and
        ``steps`` one call accepts (``msdda.validation.Limits``). LoRA experts stay low-rank factors: the torch
        backend's group="lora" runs them on the base's weights, held once; other modes merge them.
        ``backend_options``: the backend's own (``group=`` for torch, ``threads=``/``parallel=`` for onnxruntime,
        ``batch=`` for tensorrt) and, for onnxruntime/tensorrt, where their artifacts come from: ``cache_dir=``,
        ``onnx_paths={member: file}``, ``onnx_dir=`` (a folder written by ``msdda export``) and TensorRT's build
        settings (msdda.backend_artifacts). A given file must carry the loaded model's weights sha256, else
        LoadError. ``dtype``: None chooses (``msdda.precision.default_dtype``): for the torch backend on CUDA
        float16 when the weights allow it, else float32; ``engine.dtype`` and ``engine.dtype_default`` record the
        choice. ``cuda_graphs``: capture each step as a CUDA graph (torch backend on CUDA; ``msdda.graphs``).
        ``row_block``: make the Engine batch-invariant (see ``Engine.row_block``; what ``msdda serve`` uses).
        """
        if experts is not None and not isinstance(experts, Mapping):
            raise ValueError(f"experts must be a mapping {{name: folder}}, got {type(experts).__name__}")
        for what, path in (("base", base), *((f"expert {n!r}", p) for n, p in (experts or {}).items())):
            if not isinstance(path, (str, os.PathLike)):
                raise ValueError(f"{what} must be a folder path (str or os.PathLike), got {type(path).__name__}")
        check_device(device)                      # before loading anything
        for name in experts or {}:
            _check_expert_name(name)
        variant = check_variant(variant)
        chosen = dtype is None
        if chosen and backend == "torch" and check_device(device).type == "cuda":   # (ORT/TensorRT: their own)
            dtype, _ = default_dtype(device, unet_weight_files(base, (experts or {}).values(), variant))
        base_model = load_base(base, dtype, variant)
        loaded, infos = {}, [ModelInfo("base", str(base), base_model.weights_sha256)]
        for name, path in (experts or {}).items():
            loaded[name], sha = load_expert_weights(name, path, base_model, dtype, variant)
            infos.append(ModelInfo(name, str(path), sha))
        if chosen and dtype == torch.float16 and not all_finite(network_tensors([base_model.unet, *loaded.values()])):
            log.warning("msdda: float16 overflows some weights of these models; loading them in float32")
            engine = cls.from_pretrained(base, experts, backend=backend, device=device, dtype=torch.float32,
                                         scheduler=scheduler, limits=limits, variant=variant,
                                         cuda_graphs=cuda_graphs, row_block=row_block, **backend_options)
            engine.dtype_default = True
            return engine
        return cls(base_model, loaded, backend=backend, device=device, dtype=dtype, scheduler=scheduler,
                   models=infos, backend_options=backend_options, limits=limits, cuda_graphs=cuda_graphs,
                   dtype_default=chosen, row_block=row_block)

    @classmethod
    def from_pipe(cls, pipe, experts: Mapping | None = None, *, backend: str = "torch", device=None, dtype=None,
                  scheduler: str | None = None, limits: Limits = DEFAULT_LIMITS, row_block: int | None = None,
                  **backend_options) -> "Engine":
        """Wrap an already-loaded diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` without
        copying its weights: the Engine runs ``pipe``'s own UNet, text encoders and VAE (device and dtype default
        to the UNet's, so nothing is moved or cast, except that a float16 SDXL VAE whose config says
        ``force_upcast`` decodes in float32, as diffusers' own pipeline does).

        experts: {name: a folder (as in ``from_pretrained``), a UNet module of the pipeline's architecture, or a
        ``msdda.lora.LoraAdapter``}. The scheduler config is ``pipe.scheduler``'s.
        """
        unet = getattr(pipe, "unet", None)
        if unet is None or not hasattr(pipe, "scheduler"):
            raise LoadError(f"from_pipe needs a diffusers pipeline with a UNet and a scheduler, not "
                            f"{type(pipe).__name__}")
        device = check_device(device if device is not None else unet.device)
        name = str(getattr(pipe, "name_or_path", "") or getattr(pipe.config, "_name_or_path", "") or "<pipeline>")
        unet_config = {"_class_name": type(unet).__name__, **dict(unet.config)}
        scheduler_config = {"_class_name": type(pipe.scheduler).__name__, **dict(pipe.scheduler.config)}
        check_unet_config(unet_config, Path(name))
        check_scheduler_config(scheduler_config, Path(name))
        parts = {k: getattr(pipe, k, None) for k in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                                     "vae")}
        settings = {k: v for k, v in dict(pipe.config).items()
                    if not k.startswith("_") and not (isinstance(v, (list, tuple)) and len(v) == 2)}
        base_model = BaseModel(path=Path(name), unet=unet, unet_config=unet_config, scheduler_config=scheduler_config,
                               pipeline_config=settings, **parts)
        check_base_parts(base_model)
        loaded, infos = {}, [ModelInfo("base", name, "")]
        for expert_name, expert in (experts or {}).items():
            _check_expert_name(expert_name)
            if isinstance(expert, LoraAdapter):
                loaded[expert_name], sha, where = expert, expert.sha256, str(expert.path)
            elif isinstance(expert, torch.nn.Module):
                config = {"_class_name": type(expert).__name__, **dict(getattr(expert, "config", {}))}
                check_compatible(expert_name, config, unet_config)
                loaded[expert_name], sha, where = expert, "", f"<{type(expert).__name__}>"
            else:
                loaded[expert_name], sha = load_expert_weights(expert_name, expert, base_model, dtype or unet.dtype)
                where = str(expert)
            infos.append(ModelInfo(expert_name, where, sha))
        return cls(base_model, loaded, backend=backend, device=device, dtype=dtype or unet.dtype,
                   scheduler=scheduler, models=infos, backend_options=backend_options, limits=limits,
                   row_block=row_block)

    @property
    def experts(self) -> tuple[str, ...]:
        return self.members[1:]

    # ------------------------------------------------------------------ the public seam
    # What ``generate`` is built from, public so that samplers and denoiser wrappers outside the package (CoDe,
    # reward-gradient guidance in bench/quality/) compose the same pieces instead of copying them.

    def uses_guidance(self, guidance_scale: float) -> bool:
        """Whether sampling at ``guidance_scale`` runs classifier-free guidance: g != 1 on a conditional base."""
        return guidance_scale != 1.0 and (self.is_text or bool(self.num_classes))

    def plan(self, strategy: str = "msdda", weights=None, *, batch: int | None = None, normalize: bool = False,
             expert_betas: Mapping[str, float] | None = None, beta: float = 1.0) -> Plan:
        """Resolve a strategy and weights into a :class:`~msdda.strategies.Plan` (which networks run, with
        which per-sample coefficients c_k [batch, K]), as ``generate`` does.

        weights: {expert: w} for every sample, a list of such dicts (one per sample), or None (equal weights;
        ``base`` and ``expert:NAME`` need none). batch: the number of samples (default: the list's length, else
        1). normalize / expert_betas / beta: as in ``generate``.
        """
        if batch is None:
            batch = len(weights) if isinstance(weights, (list, tuple)) else 1
        elif isinstance(weights, (list, tuple)) and len(weights) != batch:
            raise ValueError(f"weights has {len(weights)} entries for {batch} samples")
        strategy = check_strategy(strategy, self.experts)
        per_sample_w = per_sample_weights(weights, batch, self.experts, strategy)
        return resolve(strategy, self.members, self._coefficients(per_sample_w, batch, normalize, expert_betas, beta))

    def _coefficients(self, per_sample_w: list[dict], batch: int, normalize: bool, expert_betas, beta) -> torch.Tensor:
        """c [batch, members] from per-sample weights (zeros for a single network, which needs none)."""
        if not per_sample_w:
            return torch.zeros(batch, len(self.members), dtype=torch.float64)
        return coefficient_matrix(per_sample_w, self.members, normalize=normalize, expert_betas=expert_betas,
                                  beta=beta)

    def step_tables(self, steps: int, eta: float = 1.0) -> tuple[tuple[int, ...], tuple[StepScalars, ...]]:
        """(timesteps, StepScalars per step) of this Engine's scheduler, computed on the host once per
        (steps, eta) and cached; DDPM ignores ``eta``."""
        return sch.step_plan(self.sched_params, steps, kind=self.scheduler, eta=float(eta))

    def denoiser(self, plan: Plan, cond: Conditioning, cfg: bool) -> Denoise:
        """The networks of ``plan`` as one denoiser ``(x [B, C, H, W], t) -> raw``, for ``msdda.sampling.sample``;
        t is one timestep, or (torch and onnxruntime backends) a float32 tensor [B] of one per sample.

        raw is [K, B, C_out, H, W] (K = len(plan.members); 1 for a soup), or with ``cfg``
        [K, 2, B, C_out, H, W] (unconditional first). ``cond`` comes from :meth:`conditioning` with the same
        ``cfg``. Holds no state between calls, so wrappers may call it from any thread.
        """
        if plan.kind == "soup":
            call = self._soup_call(plan, cond, cfg)
        else:
            forward = self._rows(functools.partial(self.backend.forward, members=plan.members))
            call = lambda x_in, t: forward(x_in, t, cond)  # noqa: E731

        def denoise(x: torch.Tensor, t) -> torch.Tensor:
            if not cfg:
                return call(x, t)
            if _per_row(t, x.shape[0]):                           # per-sample timesteps: both halves take them
                t = torch.cat([t, t])
            raw = call(torch.cat([x, x]), t)                      # [K, 2B, C_out, H, W], unconditional first
            return raw.unflatten(1, (2, x.shape[0]))              # [K, 2, B, C_out, H, W]

        return denoise

    # ------------------------------------------------------------------ generation
    def generate(self, *args, request: Request | None = None, callback: Callable[[int, int], None] | None = None,
                 **kwargs) -> GenerateOutput:
        """Generate samples, composing the experts per ``strategy``.

        The batch follows diffusers: ``prompt`` a string or a list of prompts, ``num_images_per_prompt`` images
        of each (consecutive), ``negative_prompt`` a string or a list; ``num_images`` (with a string prompt, or
        none) multiplies ``num_images_per_prompt``. ``height`` / ``width``: the image size in pixels (a
        multiple of the VAE's factor; default the UNet's sample_size); the torch backend runs any such size,
        exported backends the size they were built for. SDXL bases also take ``pooled_prompt_embeds`` and the
        micro-conditioning of ``StableDiffusionXLPipeline`` (``original_size``, ``crops_coords_top_left``,
        ``target_size`` and their ``negative_`` forms).

        weights: {expert: w} for every sample, or a list of such dicts (one per sample); experts not named get
        weight 0. seed: an int (sample b gets seed + b) or a list of ints, one per sample. There is no
        ``generator``: every random number comes from Philox keyed by the sample's seed (the initial latents at
        offset 0, step i's noise at offset 1 + i), so an image depends only on its own seed, not on the batch it
        is in, the device (CPU and GPU draw the same numbers) or any global RNG state. latents: x_T
        [B, C, H, W]. noise: z for every step, [steps, B, C, H, W]. Returns images and x_0 latents.

        ``steps`` is also accepted under diffusers' name ``num_inference_steps`` (one of the two, not both);
        ``steps`` and ``guidance_scale`` default to the model's own (``default_steps``,
        ``default_guidance_scale``: the zoo's 50 and 2.0, else diffusers' 50 and 7.5). A text UNet folder loaded
        alone (``bare_unet``) takes ``prompt_embeds`` (and ``negative_prompt_embeds`` for guidance; SDXL also
        ``pooled_prompt_embeds`` and ``negative_pooled_prompt_embeds``), never ``prompt``, and returns latents
        (``output_type="latent"``: it has no VAE).

        Or pass a checked ``msdda.Request`` (``engine.check_request(...)``, positionally or as ``request=``):
        it runs as it is, unchecked. ``callback(i, steps)`` is called after each step.
        """
        run = self.start(*args, request=request, **kwargs)
        plan, cond, cfg, timesteps, scalars, seed_tensor, x, noise, step_coeff, mix_coeff, error_count, g = (
            run.request.plan, run.cond, run.cfg, run.timesteps, run.scalars, run.seeds, run.x_T, run.noise,
            run.step_coeff, run.mix_coeff, run.error_count, run.guidance)
        denoise = self.denoiser(plan, cond, cfg)

        step_fn = self._step_fn
        prepared = []  # the step prepared once, at step 0 (it needs raw's layout); every later step is a launch

        def combine(raw: torch.Tensor, x_t: torch.Tensor, i: int) -> torch.Tensor:
            if plan.kind == "mix":
                raw = mix_outputs(raw, mix_coeff)
            if prepared:
                return prepared[0].launch(raw, x_t, step=i)
            z = {"noise": noise[i]} if noise is not None else {"seed": seed_tensor, "offset": 1 + i}
            x = step_fn(raw, x_t, step_coeff, scalars[i], guidance_scale=g, validate=(i == 0),
                      error_count=error_count, **z)  # step 0 validates: a bad composition explained
            # the plan is bit-identical to fused_expert_step per step
            if step_fn is fused_expert_step and raw.is_contiguous() and x_t.is_contiguous():
                z = {"noise": noise} if noise is not None else {"seed": seed_tensor}
                prepared.append(prepare_fused_step(raw, x_t, step_coeff, scalars, guidance_scale=g,
                                                   error_count=error_count, **z))
            return x

        try:
            with torch.inference_mode():
                x0 = None
                if self.step_graphs is not None and plan.kind != "soup":   # one captured step, replayed
                    inputs = StepInputs(x=x, cond=cond, timesteps=timesteps, scalars=scalars, guidance=g,
                                        step_coeff=step_coeff, mix_coeff=mix_coeff,
                                        seeds=seed_tensor if noise is None else None, noise=noise)
                    x0 = sample_graphed(self.step_graphs, inputs, members=plan.members, kind=plan.kind,
                                        capacity=self.limits.max_steps, coeff=plan.coeff, callback=callback,
                                        denoise_for=lambda static_cond: self.denoiser(plan, static_cond, cfg))
                if x0 is None:   # eager: no graphs here, or this configuration's capture failed
                    x0 = sample(denoise, combine, x, timesteps, callback=callback)
            raise_if_bad(error_count, plan.coeff)
        except ValueError as exc:
            raise self.infeasible(plan, exc) from None
        return self.finish(run, x0)

    def start(self, *args, request: Request | None = None, **kwargs) -> "SampleRun":
        """Everything ``generate`` computes before its first step, for the same arguments (less ``callback``):
        the conditioning, schedule tables, x_T and coefficients of a checked request. ``generate`` is ``start``,
        the step loop (``denoiser`` + ``combine_step``), then ``finish``; a step scheduler (``msdda.scheduler``)
        runs the same pieces with the samples of many runs interleaved."""
        req = self._request_of(args, request, kwargs)
        batch = req.batch
        cfg = self.uses_guidance(req.guidance_scale)
        if self.is_text:
            prompt = list(req.prompt) if isinstance(req.prompt, tuple) else req.prompt
            negative = list(req.negative_prompt) if isinstance(req.negative_prompt, tuple) else req.negative_prompt
            cond = self._text_conditioning(
                batch, cfg, prompt=prompt, prompt_embeds=req.prompt_embeds, negative_prompt=negative,
                negative_prompt_embeds=req.negative_prompt_embeds, num_images_per_prompt=req.num_images_per_prompt,
                pooled_prompt_embeds=req.pooled_prompt_embeds,
                negative_pooled_prompt_embeds=req.negative_pooled_prompt_embeds, latent_size=req.latent_size,
                micro=req.micro)
        else:
            cond = self._label_conditioning(req.class_labels, cfg)
        timesteps, scalars = self.step_tables(req.steps, req.eta)
        seed_tensor = torch.tensor(req.seeds, dtype=torch.int64, device=self.device)
        if req.latents is None:
            x = philox_normal(seed_tensor, 0, (self.sample_shape[0], *req.latent_size)).to(self.device, self.dtype)
        else:
            x = req.latents.to(self.device, self.dtype)
        noise = None if req.noise is None else req.noise.to(self.device, self.dtype)
        plan = req.plan
        step_coeff = (plan.coeff if plan.kind == "product" else torch.ones(batch, 1, dtype=torch.float64))
        step_coeff = step_coeff.to(self.device, torch.float32)
        mix_coeff = plan.coeff.to(self.device, torch.float32)
        error_count = torch.zeros(1, dtype=torch.int32, device=self.device)
        g = float(req.guidance_scale) if cfg else None
        return SampleRun(request=req, cond=cond, cfg=cfg, timesteps=tuple(timesteps), scalars=tuple(scalars),
                         seeds=seed_tensor, x_T=x, noise=noise, step_coeff=step_coeff, mix_coeff=mix_coeff,
                         error_count=error_count, guidance=g, output_type=req.output_type, strategy=req.strategy)

    def _request_of(self, args: tuple, request, kwargs: dict) -> Request:
        """The checked Request of a ``generate`` / ``start`` call: the one given (checked by this Engine), or one
        checked now from generate's arguments."""
        if args and isinstance(args[0], Request):
            if request is not None:
                raise ValueError("pass one Request, positionally or as request=, not both")
            request, args = args[0], args[1:]
        if request is None:
            return self.check_request(*args, **kwargs)
        if args or kwargs:
            raise ValueError("pass a Request or generate's arguments, not both")
        if not isinstance(request, Request):
            raise ValueError(f"request must be a msdda.Request (from engine.check_request(...)), got "
                             f"{type(request).__name__}")
        if request.checked_by != self.request_token:
            raise ValueError("this Request was checked by another Engine: check it with this one "
                             "(engine.check_request(...))")
        return request

    def combine_step(self, run: "SampleRun", raw: torch.Tensor, x_t: torch.Tensor, i: int, rows=None, *,
                     error_count: torch.Tensor | None = None) -> torch.Tensor:
        """Step ``i`` of ``run`` for its samples ``rows`` (a list of sample indices; None: all): raw
        [K, (2,) n, ...] and x_t [n, ...] of those samples -> x_prev [n, ...]. The same kernel call, on the same
        per-sample values, as ``generate``'s step i, so each row is the same bits (the step is elementwise per
        sample and its noise is keyed by the sample's seed). Step 0 validates (a ValueError explains a bad
        composition; see ``infeasible``); later steps count bad elements into ``error_count`` (default the
        run's), read by ``raise_if_bad``."""
        pick = (lambda t: t) if rows is None else (lambda t: t[torch.as_tensor(rows, device=t.device)])
        plan = run.request.plan
        if plan.kind == "mix":
            raw = mix_outputs(raw, pick(run.mix_coeff))
        z = {"noise": pick(run.noise[i])} if run.noise is not None else \
            {"seed": pick(run.seeds), "offset": 1 + i}
        return self._step_fn(raw, x_t, pick(run.step_coeff), run.scalars[i], guidance_scale=run.guidance,
                             validate=(i == 0), error_count=run.error_count if error_count is None else error_count,
                             **z)

    def infeasible(self, plan: Plan, exc: ValueError) -> ValueError:
        """``exc`` from a step, as the ValueError ``generate`` raises: naming the networks behind the
        coefficient columns."""
        names = ", ".join(self.members[m] for m in plan.members)
        return ValueError(f"infeasible composition over ({names}): {exc}")

    def finish(self, run: "SampleRun", x0: torch.Tensor) -> GenerateOutput:
        """``generate``'s result for ``run`` from its final latents x_0 (decoded per ``run.output_type``)."""
        return GenerateOutput(images=self.decode(x0, run.output_type), latents=x0, seeds=list(run.request.seeds),
                              weights=list(run.request.weights), strategy=run.strategy)

    def check_request(self, prompt=None, prompt_embeds=None, negative_prompt_embeds=None, class_labels=None, *,
                      weights=None, num_images: int = 1, steps: int | None = None, eta: float = 1.0,
                      guidance_scale: float | None = None, seed=0, strategy: str = "msdda", latents=None, noise=None,
                      output_type: str = "pil", negative_prompt=None, normalize: bool = False,
                      expert_betas: Mapping[str, float] | None = None, beta: float = 1.0,
                      num_images_per_prompt: int = 1, height: int | None = None, width: int | None = None,
                      pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, original_size=None,
                      crops_coords_top_left=(0, 0), target_size=None, negative_original_size=None,
                      negative_crops_coords_top_left=(0, 0), negative_target_size=None, generator=None,
                      num_inference_steps: int | None = None) -> Request:
        """``generate``'s arguments checked against this Engine (its experts, limits, conditioning and schedule)
        without running anything: the ``msdda.Request`` that ``generate`` / ``start`` then run as it is. A caller
        such as the CLI refuses bad input with it before it creates any output. ``steps`` / ``guidance_scale``
        None: the model's defaults (``default_steps``, ``default_guidance_scale``). Text prompts are checked
        against the base when they are encoded (``start``)."""
        if output_type not in ("pil", "pt", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'pt', 'np' or 'latent', not {output_type!r}")
        if self.bare_unet and prompt is not None:
            raise ValueError("this base is a UNet folder without a text encoder: pass prompt_embeds= (and "
                             "negative_prompt_embeds= for guidance) instead of prompt=")
        if self.is_text and self.base.vae is None and output_type != "latent":
            raise ValueError("this base has no VAE to decode images (a UNet folder alone): pass output_type='latent'")
        check_generator(generator)
        if latents is not None:
            latents = real_tensor(latents, "latents")     # before batch_size takes its len()
        strategy = check_strategy(strategy, self.experts)
        steps = one_name("steps", steps, "num_inference_steps", num_inference_steps)
        steps = check_steps(self.default_steps if steps is None else steps, self.limits,
                            self.sched_params[0].num_train_timesteps)
        guidance_scale = check_guidance_scale(self.default_guidance_scale if guidance_scale is None
                                              else guidance_scale)
        eta = check_eta(eta)
        latent_size = self.latent_size(height, width)
        batch = batch_size(num_images, weights, seed, latents, self.limits, prompt=prompt,   # bounded before
                           num_images_per_prompt=num_images_per_prompt, prompt_embeds=prompt_embeds)  # anything is built
        seeds = seed_list(seed, batch)
        per_sample_w = per_sample_weights(weights, batch, self.experts, strategy)
        coeff = self._coefficients(per_sample_w, batch, normalize, expert_betas, beta)
        micro, labels = NO_MICRO, None
        if self.is_text:
            check_num_images_per_prompt(num_images_per_prompt, self.limits)
            if self.is_sdxl:
                micro = MicroConditioning.checked(
                    original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size,
                    negative_original_size=negative_original_size,
                    negative_crops_coords_top_left=negative_crops_coords_top_left,
                    negative_target_size=negative_target_size)
        else:
            labels = self.check_label_conditioning(batch, prompt=prompt, prompt_embeds=prompt_embeds,
                                                   negative_prompt=negative_prompt,
                                                   negative_prompt_embeds=negative_prompt_embeds,
                                                   class_labels=class_labels)
        shape = (batch, self.sample_shape[0], *latent_size)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            if not bool(torch.isfinite(latents).all()):
                raise ValueError("latents contain NaN or Inf")
        if noise is not None:
            noise = check_noise(noise, steps, torch.empty(shape, device="meta"))
        return Request(
            batch=batch, seeds=tuple(seeds), weights=tuple(per_sample_w), strategy=strategy, coefficients=coeff,
            members=self.members, steps=steps, eta=eta,
            guidance_scale=guidance_scale, latent_size=latent_size, output_type=output_type,
            prompt=tuple(prompt) if isinstance(prompt, list) else prompt,
            negative_prompt=tuple(negative_prompt) if isinstance(negative_prompt, list) else negative_prompt,
            num_images_per_prompt=num_images_per_prompt, class_labels=labels, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, micro=micro, latents=latents, noise=noise,
            checked_by=self.request_token)

    def latent_size(self, height=None, width=None) -> tuple[int, int]:
        """The latent (height, width) of ``height`` x ``width``-pixel images (None: the UNet's sample_size);
        a size this base cannot take is a one-line ValueError."""
        default = tuple(self.sample_shape[1:])
        size = check_image_size(height, width, default=default, multiple=self.size_multiple,
                                scale=self.vae_scale_factor, max_latent=MAX_SAMPLE_SIZE)
        if size != default and self.backend_name != "torch":
            raise ValueError(f"the {self.backend_name} backend runs the size its graphs were built for "
                             f"({default[0] * self.vae_scale_factor}x{default[1] * self.vae_scale_factor} pixels); "
                             "use backend='torch' for other sizes")
        return size

    def _rows(self, call: Callable) -> Callable:
        """``call`` (x [N, ...], *args, Conditioning? -> [K, N, ...]) in blocks of ``row_block`` rows, or as it
        is when the Engine has no row block."""
        return call if self.row_block is None else in_row_blocks(call, self.row_block)

    def _soup_call(self, plan: Plan, cond: Conditioning, cfg: bool):
        """One averaged network per distinct weight vector in the batch, each run on its own rows."""
        batch = plan.coeff.shape[0]
        groups = []
        for row in torch.unique(plan.coeff, dim=0):
            samples = (plan.coeff == row).all(dim=1).nonzero().flatten()
            rows = torch.cat([samples, samples + batch]) if cfg else samples    # the CFG halves of those samples
            net = self._rows(self.backend.soup({m: float(row[j]) for j, m in enumerate(plan.members)}))
            sub = Conditioning(**{k: (None if v is None else v[rows.to(v.device)]) for k, v in vars(cond).items()})
            groups.append((rows.to(self.device), net, sub))
        if len(groups) == 1:
            _, net, _ = groups[0]
            return lambda x_in, t: net(x_in, t, cond)

        def call(x_in: torch.Tensor, t: int) -> torch.Tensor:
            outs = [(rows, net(x_in[rows], t, sub)) for rows, net, sub in groups]
            raw = outs[0][1].new_empty((1, x_in.shape[0], *outs[0][1].shape[2:]))
            for rows, out in outs:
                raw[:, rows] = out
            return raw

        return call

    def decode(self, x0: torch.Tensor, output_type: str = "pil"):
        """x_0 latents [B, C, H, W] as ``output_type`` ('latent', 'pt', 'np' or 'pil'), through the VAE
        (in row blocks on a batch-invariant Engine)."""
        if output_type == "latent":
            return x0
        if self.base.vae is not None:
            vae = self.base.vae
            decode = self._rows(lambda z: vae.decode(z, return_dict=False)[0].unsqueeze(0))
            with torch.inference_mode():
                pixels = decode(x0.to(vae.dtype) / vae.config.scaling_factor)[0]
        else:
            pixels = x0
        pixels = ((pixels.float().clamp(-1, 1) + 1) / 2).cpu()
        if output_type == "pt":
            return pixels
        arr = pixels.permute(0, 2, 3, 1).numpy()
        if output_type == "np":
            return arr
        from PIL import Image

        u8 = (arr * 255).round().astype(np.uint8)
        return [Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img) for img in u8]


# ---------------------------------------------------------------------- helpers
def _generate_signature() -> inspect.Signature:
    """What help(Engine.generate) and editors show: check_request's arguments, plus ``request=`` and ``callback=``
    (generate takes them as ``*args, **kwargs`` so that the argument list is written once)."""
    checked = inspect.signature(Engine.check_request)
    extra = [inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Request | None"),
             inspect.Parameter("callback", inspect.Parameter.KEYWORD_ONLY, default=None,
                               annotation="Callable[[int, int], None] | None")]
    return checked.replace(parameters=[*checked.parameters.values(), *extra], return_annotation="GenerateOutput")


Engine.generate.__signature__ = _generate_signature()
Engine.start.__signature__ = _generate_signature().replace(
    parameters=[q for q in _generate_signature().parameters.values() if q.name != "callback"],
    return_annotation="SampleRun")


def in_row_blocks(call: Callable, block: int) -> Callable:
    """``call(x [N, ...], *args) -> [K, N, ...]`` evaluated on blocks of exactly ``block`` rows: x's rows and
    those of every tensor in a Conditioning argument are cut into consecutive blocks, the last padded with copies
    of its last row, and the outputs' padding dropped.

    Why: CPU math libraries compute a row's last bits differently for different row counts (MKL's sgemm for 1,
    2-3 and 4+ rows; oneDNN picks convolution kernels by batch size), but within one row count a row's result
    depends only on that row: not on its position or on the other rows (checked on the zoo's UNet, and tested
    through generate). So with every network call at one row count, a sample's image is the same bits whatever
    else is in its batch, which lets a server batch requests from different users exactly. The price is the
    padding: a call of n rows costs ceil(n / block) blocks.
    """
    def blocked(x: torch.Tensor, *args):
        n = x.shape[0]
        if n == block:
            return call(x, *args)
        outs = []
        for start in range(0, n, block):
            rows = slice(start, min(start + block, n))
            part = [_padded_rows(x, rows, block)]
            part += [Conditioning(**{k: None if v is None else _padded_rows(v, rows, block)
                                     for k, v in vars(a).items()}) if isinstance(a, Conditioning)
                     else _padded_rows(a, rows, block) if _per_row(a, n) else a
                     for a in args]
            outs.append(call(*part)[:, :rows.stop - rows.start])
        return torch.cat(outs, dim=1)

    return blocked


def _per_row(arg, n: int) -> bool:
    """Whether a call argument holds one value per row of x (per-sample timesteps [n]), so it is blocked too."""
    return isinstance(arg, torch.Tensor) and arg.dim() == 1 and n > 1 and arg.shape[0] == n


def _padded_rows(t: torch.Tensor, rows: slice, block: int) -> torch.Tensor:
    part = t[rows]
    if part.shape[0] < block:
        part = torch.cat([part, part[-1:].expand(block - part.shape[0], *part.shape[1:])])
    return part


def one_name(name: str, value, alias: str, alias_value):
    """An argument given under msdda's name or diffusers' (``steps`` / ``num_inference_steps``): the one given,
    or None; both given is a one-line ValueError."""
    if value is not None and alias_value is not None:
        raise ValueError(f"pass {name}= or {alias}= (diffusers' name for it), not both")
    return alias_value if value is None else value


def _check_expert_name(name) -> None:
    """msdda.validation's one rule for expert names, as a LoadError (what model loading raises)."""
    try:
        check_expert_name(name)
    except ValueError as exc:
        raise LoadError(str(exc)) from None


def network_tensors(networks) -> list[torch.Tensor]:
    """Every parameter and buffer of ``networks`` (modules), and every factor of the LoRA adapters among them."""
    tensors = []
    for net in networks:
        if isinstance(net, LoraAdapter):
            tensors += [t for f in net.factors.values() for t in (f.down, f.up)]
        else:
            tensors += [*net.parameters(), *net.buffers()]
    return tensors
