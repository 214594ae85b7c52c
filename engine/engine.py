"""``Engine``: loaded networks + schedule, and ``generate`` as a pure function of its arguments.

The Engine owns what it loaded (backend, text encoder, VAE, schedule tables) and nothing per call: every
``generate`` builds its own latents, conditioning, coefficients and closures, so one Engine serves concurrent
calls from several threads.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from msdda import schedule as sch
from msdda.backends import Conditioning, make_backend
from msdda.graphs import StepGraphCache, StepInputs, sample_graphed
from msdda.kernels import StepScalars, fused_expert_step, philox_normal, prepare_fused_step, raise_if_bad
from msdda.loading import LORA_FILES, UNET_WEIGHTS, BaseModel, LoadError, load_base, load_expert, unet_folder
from msdda.precision import all_finite, default_dtype, pipeline_class, vae_decode_dtype
from msdda.sampling import Denoise, sample
from msdda.strategies import Plan, coefficient_matrix, mix_outputs, resolve
from msdda.validation import (DEFAULT_LIMITS, Limits, batch_size, batch_tensor, check_class_labels, check_device,
                              check_eta, check_guidance_scale, check_noise, check_steps, check_strategy, per_sample,
                              per_sample_weights, seed_list)

__all__ = ["Engine", "GenerateOutput", "CheckedRequest", "Limits"]

log = logging.getLogger("msdda")


@dataclass(frozen=True)
class GenerateOutput:
    """images: list of PIL images (or a tensor/array per ``output_type``); latents: x_0 [B, C, H, W]."""
    images: object
    latents: torch.Tensor
    seeds: list[int] = field(default_factory=list)
    weights: list[dict] = field(default_factory=list)
    strategy: str = "msdda"


@dataclass(frozen=True)
class CheckedRequest:
    """The validated, per-sample form of one ``generate`` call's arguments (see ``Engine.check_request``)."""
    batch: int
    steps: int
    eta: float
    guidance_scale: float
    seeds: list[int]
    weights: list[dict]
    plan: Plan


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    sha256: str


class Engine:
    """A base model, K aligned experts, one backend and one schedule family, loaded once."""

    def __init__(self, base: BaseModel, experts: Mapping[str, torch.nn.Module], *, backend="torch", device="cpu",
                 dtype=None, scheduler: str | None = None, models: Sequence[ModelInfo] = (),
                 backend_options: Mapping | None = None, limits: Limits = DEFAULT_LIMITS, cuda_graphs: bool = True,
                 dtype_default: bool = False):
        if "base" in experts:
            raise LoadError("an expert may not be called 'base': that name is the base model")
        if not isinstance(limits, Limits):
            raise ValueError(f"limits must be a msdda.validation.Limits, not {limits!r}")
        self.limits = limits
        self.device = check_device(device)
        self.base = base
        self.members = ("base",) + tuple(experts)
        self.models = tuple(models)
        cfg = base.unet_config
        self.is_text = base.unet_config.get("_class_name") == "UNet2DConditionModel"
        self.num_classes = cfg.get("num_class_embeds")
        self.sample_shape = (cfg["in_channels"], cfg["sample_size"], cfg["sample_size"]) \
            if isinstance(cfg["sample_size"], int) else (cfg["in_channels"], *cfg["sample_size"])
        self.sched_params = sch.schedule_from_diffusers_config(base.scheduler_config)
        kind = scheduler or ("ddim" if "DDIM" in base.scheduler_config.get("_class_name", "") else "ddpm")
        if kind not in ("ddpm", "ddim"):
            raise ValueError(f"unknown scheduler {scheduler!r}; choose 'ddpm' or 'ddim'")
        self.scheduler = kind
        self.learned_variance = cfg["out_channels"] == 2 * cfg["in_channels"]
        networks = {"base": base.unet, **experts}
        options = dict(backend_options or {})
        if backend in ("onnxruntime", "tensorrt"):
            cond = "text" if self.is_text else ("class" if self.num_classes else "none")
            text_shape = None
            if self.is_text:
                text_shape = (base.tokenizer.model_max_length if base.tokenizer else 77, cfg["cross_attention_dim"])
            options.update(sample_shape=self.sample_shape, cond=cond, text_shape=text_shape)
        self.backend_name = backend
        self.backend = make_backend(backend, networks, device=self.device, dtype=dtype, **options)
        self.dtype = self.backend.dtype
        self.dtype_default = bool(dtype_default)   # True: from_pretrained chose the dtype (no dtype was given)
        for part in (base.text_encoder, base.vae):
            if part is not None:
                part.to(self.device)
        if base.vae is not None:   # decode in the precision diffusers' pipeline for this model decodes in
            vae_dtype = vae_decode_dtype(base.vae.dtype, bool(base.vae.config.get("force_upcast", False)),
                                         pipeline_class(base.path))
            if vae_dtype != base.vae.dtype:   # (Module.to: ModelMixin.to warns about fp32 modules, moot in fp32)
                torch.nn.Module.to(base.vae, vae_dtype)
        # Whole-step CUDA graphs (msdda.graphs): the torch backend on CUDA, unless cuda_graphs=False.
        self.step_graphs = StepGraphCache() if cuda_graphs and backend == "torch" and self.device.type == "cuda" \
            else None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, base, experts: Mapping[str, str] | None = None, *, backend: str = "torch",
                        device="cpu", dtype=None, scheduler: str | None = None, limits: Limits = DEFAULT_LIMITS,
                        cuda_graphs: bool = True, **backend_options) -> "Engine":
        """Load a base (pipeline, ``unet/`` folder or UNet folder) and experts {name: folder} from local disk.

        ``scheduler``: "ddpm" or "ddim"; None keeps the base's own scheduler class. Experts whose
        architecture, prediction type, latent shape or scheduler differ from the base are refused here.
        ``limits``: the largest ``num_images`` and ``steps`` one call accepts (``msdda.validation.Limits``).
        ``dtype``: None chooses (``msdda.precision.default_dtype``): for the torch backend on CUDA float16 when the
        weights allow it, else float32; ``engine.dtype`` and ``engine.dtype_default`` record the choice.
        ``cuda_graphs``: capture each step as a CUDA graph (torch backend on CUDA; ``msdda.graphs``).
        """
        check_device(device)                      # before loading anything
        chosen = dtype is None
        if chosen and backend == "torch" and check_device(device).type == "cuda":   # (ORT/TensorRT: their own)
            dtype, _ = default_dtype(device, _unet_weight_files(base, (experts or {}).values()))
        base_model = load_base(base, dtype)
        loaded, infos = {}, [ModelInfo("base", str(base), base_model.weights_sha256)]
        for name, path in (experts or {}).items():
            if not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
                raise LoadError(f"bad expert name {name!r}: use letters, digits, '_', '-' and '.'")
            loaded[name], sha = load_expert(name, path, base_model, dtype)
            infos.append(ModelInfo(name, str(path), sha))
        if chosen and dtype == torch.float16 and not all_finite([base_model.unet, *loaded.values()]):
            log.warning("msdda: float16 overflows some weights of these models; loading them in float32")
            engine = cls.from_pretrained(base, experts, backend=backend, device=device, dtype=torch.float32,
                                         scheduler=scheduler, limits=limits, cuda_graphs=cuda_graphs,
                                         **backend_options)
            engine.dtype_default = True
            return engine
        return cls(base_model, loaded, backend=backend, device=device, dtype=dtype, scheduler=scheduler,
                   models=infos, backend_options=backend_options, limits=limits, cuda_graphs=cuda_graphs,
                   dtype_default=chosen)

    @property
    def experts(self) -> tuple[str, ...]:
        return self.members[1:]

    # ------------------------------------------------------------------ the public seam
    # What ``generate`` is built from, public so that samplers and denoiser wrappers outside the package (CoDe,
    # reward-gradient guidance in bench/quality/) compose the same pieces instead of copying them.

    def uses_guidance(self, guidance_scale: float) -> bool:
        """Whether sampling at ``guidance_scale`` runs classifier-free guidance: g != 1 on a conditional base."""
        return guidance_scale != 1.0 and (self.is_text or bool(self.num_classes))

    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder hidden states [len(prompts), L, D] in the Engine's dtype (text-conditioned bases)."""
        tok = self.base.tokenizer
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        return self.base.text_encoder(ids)[0].to(self.dtype)

    def conditioning(self, batch: int, *, cfg: bool, prompt=None, prompt_embeds=None, negative_prompt=None,
                     negative_prompt_embeds=None, class_labels=None) -> Conditioning:
        """What the networks are conditioned on for ``batch`` samples: [2B] rows under ``cfg`` (unconditional
        half first: the negative prompt, or the null class), else [B].

        Text bases take ``prompt`` (a string or one per sample) or ``prompt_embeds`` [B or 1, L, D], and under
        cfg ``negative_prompt`` / ``negative_prompt_embeds`` (default: the empty prompt). Class-conditional
        bases take ``class_labels`` (an int or one per sample, 0..num_classes - 2). Unconditional bases take
        nothing. Anything else is a ValueError.
        """
        if self.is_text:
            if prompt_embeds is None:
                if prompt is None:
                    raise ValueError("this base is text-conditioned: pass prompt= or prompt_embeds=")
                prompts = per_sample(prompt, batch, "prompt")
                prompt_embeds = self.encode_prompt(prompts)
            prompt_embeds = batch_tensor(prompt_embeds, batch, "prompt_embeds").to(self.device, self.dtype)
            if not cfg:
                return Conditioning(encoder_hidden_states=prompt_embeds)
            if negative_prompt_embeds is None:
                negative_prompt_embeds = self.encode_prompt(per_sample(negative_prompt or "", batch, "negative_prompt"))
            negative_prompt_embeds = batch_tensor(negative_prompt_embeds, batch, "negative_prompt_embeds")
            if negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} and prompt_embeds "
                                 f"{tuple(prompt_embeds.shape)} differ in shape")
            return Conditioning(encoder_hidden_states=torch.cat([negative_prompt_embeds.to(prompt_embeds), prompt_embeds]))
        if prompt is not None or prompt_embeds is not None:
            raise ValueError("this base is not text-conditioned: use class_labels= (or nothing), not a prompt")
        if self.num_classes:
            if class_labels is None:
                raise ValueError(f"this base is class-conditional: pass class_labels= (0..{self.num_classes - 2})")
            labels = torch.as_tensor(per_sample(class_labels, batch, "class_labels"), dtype=torch.int64)
            if bool(((labels < 0) | (labels > self.num_classes - 2)).any()):
                raise ValueError(f"class labels must lie in 0..{self.num_classes - 2} (class {self.num_classes - 1} "
                                 "is the null class used for guidance)")
            labels = labels.to(self.device)
            if cfg:
                labels = torch.cat([torch.full_like(labels, self.num_classes - 1), labels])
            return Conditioning(class_labels=labels)
        if class_labels is not None:
            raise ValueError("this base is unconditional: class_labels are not accepted")
        return Conditioning()

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
        per_sample_w = per_sample_weights(weights, batch, self.experts, strategy)
        if per_sample_w:
            coeff = coefficient_matrix(per_sample_w, self.members, normalize=normalize, expert_betas=expert_betas,
                                       beta=beta)
        else:  # a single network (base / expert:NAME) needs no weights
            coeff = torch.zeros(batch, len(self.members), dtype=torch.float64)
        return resolve(strategy, self.members, coeff)

    def step_tables(self, steps: int, eta: float = 1.0) -> tuple[tuple[int, ...], tuple[StepScalars, ...]]:
        """(timesteps, StepScalars per step) of this Engine's scheduler, computed on the host once per
        (steps, eta) and cached; DDPM ignores ``eta``."""
        return sch.step_plan(self.sched_params, steps, kind=self.scheduler, eta=float(eta))

    def denoiser(self, plan: Plan, cond: Conditioning, cfg: bool) -> Denoise:
        """The networks of ``plan`` as one denoiser ``(x [B, C, H, W], t) -> raw``, for ``msdda.sampling.sample``.

        raw is [K, B, C_out, H, W] (K = len(plan.members); 1 for a soup), or with ``cfg``
        [K, 2, B, C_out, H, W] (unconditional first). ``cond`` comes from :meth:`conditioning` with the same
        ``cfg``. Holds no state between calls, so wrappers may call it from any thread.
        """
        backend = self.backend
        if plan.kind == "soup":
            call = self._soup_call(plan, cond, cfg)
        else:
            members = plan.members
            call = lambda x_in, t: backend.forward(x_in, t, cond, members)  # noqa: E731

        def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
            if not cfg:
                return call(x, t)
            raw = call(torch.cat([x, x]), t)                      # [K, 2B, C_out, H, W], unconditional first
            return raw.unflatten(1, (2, x.shape[0]))              # [K, 2, B, C_out, H, W]

        return denoise

    # ------------------------------------------------------------------ generation
    def generate(self, prompt=None, prompt_embeds=None, negative_prompt_embeds=None, class_labels=None, *,
                 weights=None, num_images: int = 1, steps: int = 50, eta: float = 1.0, guidance_scale: float = 7.5,
                 seed=0, strategy: str = "msdda", latents=None, noise=None, output_type: str = "pil",
                 negative_prompt=None, normalize: bool = False, expert_betas: Mapping[str, float] | None = None,
                 beta: float = 1.0, callback: Callable[[int, int], None] | None = None) -> GenerateOutput:
        """Generate ``num_images`` samples, composing the experts per ``strategy``.

        weights: {expert: w} for every sample, or a list of such dicts (one per sample); experts not named get
        weight 0. seed: an int (sample b gets seed + b) or a list of ints, one per sample. latents: x_T
        [B, C, H, W]. noise: z for every step, [steps, B, C, H, W]. Returns images and x_0 latents.
        """
        req = self.check_request(weights=weights, num_images=num_images, steps=steps, eta=eta,
                                 guidance_scale=guidance_scale, seed=seed, strategy=strategy, latents=latents,
                                 output_type=output_type, normalize=normalize, expert_betas=expert_betas, beta=beta,
                                 class_labels=class_labels)
        batch, steps, eta, guidance_scale, seeds, per_sample_w, plan = (
            req.batch, req.steps, req.eta, req.guidance_scale, req.seeds, req.weights, req.plan)

        cfg = self.uses_guidance(guidance_scale)
        cond = self.conditioning(batch, cfg=cfg, prompt=prompt, prompt_embeds=prompt_embeds,
                                 negative_prompt=negative_prompt, negative_prompt_embeds=negative_prompt_embeds,
                                 class_labels=class_labels)
        timesteps, scalars = self.step_tables(steps, eta)
        seed_tensor = torch.tensor(seeds, dtype=torch.int64, device=self.device)
        x = self._initial_latents(latents, seed_tensor, batch)
        if noise is not None:
            noise = check_noise(noise, steps, x).to(self.device, self.dtype)

        denoise = self.denoiser(plan, cond, cfg)
        step_coeff = (plan.coeff if plan.kind == "product" else torch.ones(batch, 1, dtype=torch.float64))
        step_coeff = step_coeff.to(self.device, torch.float32)
        mix_coeff = plan.coeff.to(self.device, torch.float32)
        error_count = torch.zeros(1, dtype=torch.int32, device=self.device)
        g = float(guidance_scale) if cfg else None

        prepared = []  # the step prepared once, at step 0 (it needs raw's layout); every later step is a launch

        def combine(raw: torch.Tensor, x_t: torch.Tensor, i: int) -> torch.Tensor:
            if plan.kind == "mix":
                raw = mix_outputs(raw, mix_coeff)
            if prepared:
                return prepared[0].launch(raw, x_t, step=i)
            z = {"noise": noise[i]} if noise is not None else {"seed": seed_tensor, "offset": 1 + i}
            x = fused_expert_step(raw, x_t, step_coeff, scalars[i], guidance_scale=g, validate=(i == 0),
                                  error_count=error_count, **z)  # step 0 validates: a bad composition explained
            if raw.is_contiguous() and x_t.is_contiguous():  # bit-identical to fused_expert_step per step
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
        except ValueError as exc:  # name the networks behind the coefficient columns
            names = ", ".join(self.members[m] for m in plan.members)
            raise ValueError(f"infeasible composition over ({names}): {exc}") from None
        images = self._decode(x0, output_type)
        return GenerateOutput(images=images, latents=x0, seeds=seeds, weights=per_sample_w, strategy=strategy)

    def check_request(self, *, weights=None, num_images=1, steps=50, eta=1.0, guidance_scale=7.5, seed=0,
                      strategy="msdda", latents=None, output_type="pil", normalize=False, expert_betas=None,
                      beta=1.0, class_labels=None) -> CheckedRequest:
        """Validate ``generate``'s arguments without running anything (the checks ``generate`` itself runs
        first), so that a caller, such as the CLI, can refuse bad input before it creates any output.
        ``class_labels`` (optional here) are checked against a class-conditional base's range."""
        if output_type not in ("pil", "pt", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'pt', 'np' or 'latent', not {output_type!r}")
        strategy = check_strategy(strategy, self.experts)
        steps = check_steps(steps, self.limits, self.sched_params[0].num_train_timesteps)
        guidance_scale = check_guidance_scale(guidance_scale)
        eta = check_eta(eta)
        batch = batch_size(num_images, weights, seed, latents, self.limits)   # bounded before anything is built
        seeds = seed_list(seed, batch)
        per_sample_w = per_sample_weights(weights, batch, self.experts, strategy)
        plan = self.plan(strategy, per_sample_w or None, batch=batch, normalize=normalize, expert_betas=expert_betas,
                         beta=beta)
        if class_labels is not None and self.num_classes:
            check_class_labels(per_sample(class_labels, batch, "class_labels"), self.num_classes)
        return CheckedRequest(batch=batch, steps=steps, eta=eta, guidance_scale=guidance_scale, seeds=seeds,
                              weights=per_sample_w, plan=plan)

    def _initial_latents(self, latents, seed_tensor: torch.Tensor, batch: int) -> torch.Tensor:
        if latents is None:
            return philox_normal(seed_tensor, 0, self.sample_shape).to(self.device, self.dtype)
        latents = torch.as_tensor(latents)
        if tuple(latents.shape) != (batch, *self.sample_shape):
            raise ValueError(f"latents must have shape {(batch, *self.sample_shape)}, got {tuple(latents.shape)}")
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("latents contain NaN or Inf")
        return latents.to(self.device, self.dtype)

    def _soup_call(self, plan: Plan, cond: Conditioning, cfg: bool):
        """One averaged network per distinct weight vector in the batch, each run on its own rows."""
        batch = plan.coeff.shape[0]
        groups = []
        for row in torch.unique(plan.coeff, dim=0):
            samples = (plan.coeff == row).all(dim=1).nonzero().flatten()
            rows = torch.cat([samples, samples + batch]) if cfg else samples    # the CFG halves of those samples
            net = self.backend.soup({m: float(row[j]) for j, m in enumerate(plan.members)})
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

    def _decode(self, x0: torch.Tensor, output_type: str):
        if output_type == "latent":
            return x0
        if self.base.vae is not None:
            vae = self.base.vae
            with torch.inference_mode():
                pixels = vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
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


def _unet_weight_files(base, experts) -> list[Path]:
    """The UNet weight files of a base and its full-weight experts (LoRA adapters merge in the base's dtype); a
    folder that is not a model is left to the loader, which reports it."""
    files = []
    for path in (base, *experts):
        if any((Path(path) / name).is_file() for name in LORA_FILES):
            continue
        try:
            files.append(unet_folder(path) / UNET_WEIGHTS)
        except LoadError:
            pass
    return files
