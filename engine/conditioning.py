"""What the networks are conditioned on: prompts (encoded by diffusers' own ``encode_prompt``), precomputed
embeddings, SDXL's micro-conditioning, class labels, or nothing.

``Conditioner`` holds the Engine's conditioning methods (``conditioning``, ``encode_prompt``, ``time_ids``,
``check_label_conditioning``); ``Engine`` inherits them, so this module is the Engine's conditioning half, kept
apart from construction and sampling. It reads the Engine's loaded base (``base``, ``is_text``, ``is_sdxl``,
``bare_unet``, ``num_classes``, ``vae_scale_factor``), ``device``, ``dtype``, ``limits``, ``row_block`` and
``prompt_pipe``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from msdda.backends import Conditioning
from msdda.errors import one_line
from msdda.loading import SDXL_TIME_IDS, BaseModel, LoadError, pooled_embeds_width
from msdda.validation import (batch_tensor, check_class_labels, check_num_images_per_prompt, check_size_pair,
                              negative_prompt_rows, per_sample, prompt_rows)

__all__ = ["Conditioner", "MicroConditioning", "NO_MICRO", "prompt_pipeline"]


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's micro-conditioning, as ``StableDiffusionXLPipeline`` names it, in pixels: the original size, the
    crop's top-left corner and the target size; sizes None mean the image's own. The ``negative_`` values
    condition the unconditional half under guidance (used only when both negative sizes are given, as in the
    pipeline)."""
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] = (0, 0)
    negative_target_size: tuple[int, int] | None = None

    @classmethod
    def checked(cls, **values) -> "MicroConditioning":
        """From the pipeline's keyword values, each a (height, width) pair of ints (sizes >= 1; None allowed
        for sizes); anything else is a one-line ValueError."""
        out = {}
        for name, value in values.items():
            if value is None and name.endswith("size"):
                out[name] = None
            else:
                out[name] = check_size_pair(name, value, lo=0 if "crops" in name else 1)
        return cls(**out)

    def sizes(self, negative: bool = False) -> tuple:
        """(original_size, crops_coords_top_left, target_size) of the conditional (or negative) half."""
        if negative:
            return self.negative_original_size, self.negative_crops_coords_top_left, self.negative_target_size
        return self.original_size, self.crops_coords_top_left, self.target_size

    @property
    def has_negative(self) -> bool:
        return self.negative_original_size is not None and self.negative_target_size is not None


NO_MICRO = MicroConditioning()


class Conditioner:
    """The Engine's conditioning methods (see the module docstring)."""

    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder hidden states [len(prompts), L, D] in the Engine's dtype (text-conditioned bases; SDXL:
        both encoders' penultimate hidden states, concatenated, as its UNet takes them)."""
        return self._encode(list(prompts), 1, cfg=False)[0]

    def _encode(self, prompts, repeat: int, *, cfg: bool, negative=None, prompt_embeds=None,
                negative_prompt_embeds=None, pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None):
        """diffusers' own ``encode_prompt`` of the base's pipeline class on the base's encoders: (prompt embeds,
        negative embeds, pooled, negative pooled), each with ``repeat`` rows per prompt; None where n/a."""
        if self.row_block is not None and prompts is not None and len(prompts) > 1 and prompt_embeds is None \
                and negative_prompt_embeds is None \
                and (negative is None or isinstance(negative, str) or len(negative) == len(prompts)):
            # batch invariance: one prompt per encoder call (text encoding is cheap next to the sampling)
            parts = [self._encode([p], repeat, cfg=cfg, negative=negative if negative is None or
                                  isinstance(negative, str) else [negative[i]],
                                  negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
                     for i, p in enumerate(prompts)]
            return tuple(None if part[0] is None else torch.cat(part) for part in zip(*parts))
        pipe = self.prompt_pipe
        kwargs = dict(prompt=prompts, device=self.device, num_images_per_prompt=repeat,
                      do_classifier_free_guidance=cfg, negative_prompt=negative, prompt_embeds=prompt_embeds,
                      negative_prompt_embeds=negative_prompt_embeds)
        with torch.inference_mode():
            if not self.is_sdxl:
                embeds, negative_embeds = pipe.encode_prompt(**kwargs)
                return embeds.to(self.dtype), _to(negative_embeds, self.dtype), None, None
            out = pipe.encode_prompt(**kwargs, pooled_prompt_embeds=pooled_prompt_embeds,
                                     negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
        return tuple(_to(t, self.dtype) for t in out)

    def time_ids(self, rows: int, latent_size: tuple[int, int], *, original_size=None, crops_coords_top_left=(0, 0),
                 target_size=None) -> torch.Tensor:
        """SDXL's micro-conditioning [rows, 6]: original size, crop top-left, target size in pixels; the sizes
        default to the image's (height, width), as in StableDiffusionXLPipeline."""
        micro = MicroConditioning.checked(original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                                          target_size=target_size)
        return self._time_ids(rows, latent_size, micro.sizes())

    def _time_ids(self, rows: int, latent_size: tuple[int, int], sizes: tuple) -> torch.Tensor:
        original_size, crops_coords_top_left, target_size = sizes
        pixels = (latent_size[0] * self.vae_scale_factor, latent_size[1] * self.vae_scale_factor)
        values = tuple(original_size or pixels) + tuple(crops_coords_top_left) + tuple(target_size or pixels)
        assert len(values) == SDXL_TIME_IDS
        return torch.tensor([values], dtype=self.dtype, device=self.device).repeat(rows, 1)

    def conditioning(self, batch: int, *, cfg: bool, prompt=None, prompt_embeds=None, negative_prompt=None,
                     negative_prompt_embeds=None, class_labels=None, num_images_per_prompt: int = 1,
                     pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, latent_size=None,
                     original_size=None, crops_coords_top_left=(0, 0), target_size=None,
                     negative_original_size=None, negative_crops_coords_top_left=(0, 0),
                     negative_target_size=None) -> Conditioning:
        """What the networks are conditioned on for ``batch`` samples: [2B] rows under ``cfg`` (unconditional
        half first: the negative prompt, or the null class), else [B].

        Text bases follow diffusers' conventions: ``prompt`` is a string (every image), a list of B prompts, or
        a list of B / ``num_images_per_prompt`` prompts (each making that many consecutive images); or give
        ``prompt_embeds`` [B or 1, L, D]. Under cfg, ``negative_prompt`` (a string, one per prompt or one per
        image) or ``negative_prompt_embeds``; the default is the empty prompt, or zeros for an SDXL pipeline
        with ``force_zeros_for_empty_prompt``. SDXL also takes ``pooled_prompt_embeds`` (with prompt_embeds)
        and its micro-conditioning (``original_size``, ``crops_coords_top_left``, ``target_size`` and their
        ``negative_`` forms, in pixels; sizes default to the image's, from ``latent_size``). The prompts are
        encoded by diffusers' own ``encode_prompt``. Class-conditional bases take ``class_labels`` (an int or one
        per sample, 0..num_classes - 2). Unconditional bases take nothing. Anything else is a ValueError.
        """
        if self.is_text:
            micro = MicroConditioning.checked(
                original_size=original_size, crops_coords_top_left=crops_coords_top_left, target_size=target_size,
                negative_original_size=negative_original_size,
                negative_crops_coords_top_left=negative_crops_coords_top_left,
                negative_target_size=negative_target_size) if self.is_sdxl else NO_MICRO
            return self._text_conditioning(
                batch, cfg, prompt=prompt, prompt_embeds=prompt_embeds, negative_prompt=negative_prompt,
                negative_prompt_embeds=negative_prompt_embeds,
                num_images_per_prompt=check_num_images_per_prompt(num_images_per_prompt, self.limits),
                pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                latent_size=latent_size or tuple(self.sample_shape[1:]), micro=micro)
        labels = self.check_label_conditioning(batch, prompt=prompt, prompt_embeds=prompt_embeds,
                                               negative_prompt=negative_prompt,
                                               negative_prompt_embeds=negative_prompt_embeds, class_labels=class_labels)
        return self._label_conditioning(labels, cfg)

    def check_label_conditioning(self, batch: int, *, prompt=None, prompt_embeds=None, negative_prompt=None,
                                 negative_prompt_embeds=None, class_labels=None) -> tuple[int, ...] | None:
        """A class-conditional or unconditional base's conditioning arguments checked: the class label of each of
        ``batch`` samples (None for an unconditional base). Prompts are refused on these bases."""
        if prompt is not None or prompt_embeds is not None:
            raise ValueError("this base is not text-conditioned: use class_labels= (or nothing), not a prompt")
        if negative_prompt is not None or negative_prompt_embeds is not None:
            # the CLI, the server and the API refuse it alike: a class or unconditional base has no negative prompt
            raise ValueError("negative_prompt is for text-conditioned bases")
        if self.num_classes:
            if class_labels is None:
                raise ValueError(f"this base is class-conditional: pass class_labels= (0..{self.num_classes - 2})")
            return tuple(check_class_labels(per_sample(class_labels, batch, "class_labels"), self.num_classes))
        if class_labels is not None:
            raise ValueError("this base is unconditional: class_labels are not accepted")
        return None

    def _label_conditioning(self, labels: Sequence[int] | None, cfg: bool) -> Conditioning:
        """Checked class labels (or None: unconditional) as the networks' conditioning; under ``cfg`` the null
        class's rows first."""
        if labels is None:
            return Conditioning()
        labels = torch.tensor(list(labels), dtype=torch.int64, device=self.device)
        if cfg:
            labels = torch.cat([torch.full_like(labels, self.num_classes - 1), labels])
        return Conditioning(class_labels=labels)

    def _text_conditioning(self, batch, cfg, *, prompt, prompt_embeds, negative_prompt, negative_prompt_embeds,
                           num_images_per_prompt, pooled_prompt_embeds, negative_pooled_prompt_embeds, latent_size,
                           micro: MicroConditioning) -> Conditioning:
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass prompt= or prompt_embeds=, not both")
        if self.is_sdxl and prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("an SDXL base needs pooled_prompt_embeds= with prompt_embeds=")
        if self.is_sdxl and cfg and negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("an SDXL base needs negative_pooled_prompt_embeds= with negative_prompt_embeds=")
        if not self.is_sdxl and (pooled_prompt_embeds is not None or negative_pooled_prompt_embeds is not None):
            raise ValueError("pooled prompt embeddings are for SDXL bases")
        per_prompt = num_images_per_prompt            # checked by the caller (conditioning, or check_request)
        if self.bare_unet:
            return self._bare_conditioning(
                batch, cfg, per_prompt, prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, latent_size=latent_size, micro=micro)
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("this base is text-conditioned: pass prompt= or prompt_embeds=")
            prompts, repeat = prompt_rows(prompt, batch, per_prompt)
            prompts, negatives, repeat = negative_prompt_rows(negative_prompt if cfg else None, prompts, repeat)
            if negative_prompt_embeds is not None:
                negatives = None
            embeds = dict(prompt_embeds=None, pooled_prompt_embeds=None)
        else:
            prompts, repeat, negatives = None, 1, None
            embeds = dict(prompt_embeds=_embedding_rows(prompt_embeds, batch, per_prompt, "prompt_embeds", self),
                          pooled_prompt_embeds=_embedding_rows(pooled_prompt_embeds, batch, per_prompt,
                                                     "pooled_prompt_embeds", self))
            if cfg and negative_prompt is not None and negative_prompt_embeds is None:
                negatives = per_sample(negative_prompt, batch, "negative_prompt")
        negative_embeds = dict(
            negative_prompt_embeds=_embedding_rows(negative_prompt_embeds, batch, per_prompt, "negative_prompt_embeds", self),
            negative_pooled_prompt_embeds=_embedding_rows(negative_pooled_prompt_embeds, batch, per_prompt,
                                                "negative_pooled_prompt_embeds", self))
        if not cfg:
            negative_embeds = dict(negative_prompt_embeds=None, negative_pooled_prompt_embeds=None)
        try:
            hidden, negative_hidden, pooled, negative_pooled = self._encode(
                prompts, repeat, cfg=cfg, negative=negatives, **embeds, **negative_embeds)
        except (TypeError, ValueError) as exc:       # diffusers' own argument checks
            raise ValueError(one_line(exc)) from None
        if hidden.shape[0] != batch:
            raise ValueError(f"prompt_embeds give {hidden.shape[0]} rows for {batch} images")
        if cfg and negative_hidden.shape != hidden.shape:
            raise ValueError(f"negative_prompt_embeds {tuple(negative_hidden.shape)} and prompt_embeds "
                             f"{tuple(hidden.shape)} differ in shape")
        return self._text_cond(batch, cfg, hidden, negative_hidden, pooled, negative_pooled, latent_size, micro)

    def _bare_conditioning(self, batch, cfg, per_prompt, *, prompt, negative_prompt, prompt_embeds,
                           negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, latent_size,
                           micro: MicroConditioning) -> Conditioning:
        """A text UNet without its text stack: the caller's embeddings, checked against the UNet's widths."""
        why = "this base is a UNet folder without a text encoder"
        if prompt is not None or negative_prompt is not None:
            name = "prompt" if prompt is not None else "negative_prompt"
            raise ValueError(f"{why}: pass prompt_embeds= (and negative_prompt_embeds= for guidance) instead of "
                             f"{name}=")
        if prompt_embeds is None:
            raise ValueError(f"{why}: pass prompt_embeds=")
        if cfg and negative_prompt_embeds is None:
            raise ValueError(f"{why}: guidance needs negative_prompt_embeds= (or guidance_scale=1)")
        width = self.base.unet_config["cross_attention_dim"]
        pooled_width = pooled_embeds_width(self.base)
        given = [("prompt_embeds", prompt_embeds, width), ("pooled_prompt_embeds", pooled_prompt_embeds, pooled_width)]
        if cfg:
            given += [("negative_prompt_embeds", negative_prompt_embeds, width),
                      ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds, pooled_width)]
        rows = {}
        for name, t, last in given:
            if t is None:
                continue
            t = torch.as_tensor(t)
            if t.dim() != (3 if "pooled" not in name else 2) or t.shape[-1] != last:
                shape = "[B, L, " if "pooled" not in name else "[B, "
                raise ValueError(f"{name} must have shape {shape}{last}] for this UNet, got {tuple(t.shape)}")
            rows[name] = _embedding_rows(t, batch, per_prompt, name, self)
        hidden, negative_hidden = rows["prompt_embeds"], rows.get("negative_prompt_embeds")
        if cfg and negative_hidden.shape != hidden.shape:
            raise ValueError(f"negative_prompt_embeds {tuple(negative_hidden.shape)} and prompt_embeds "
                             f"{tuple(hidden.shape)} differ in shape")
        return self._text_cond(batch, cfg, hidden, negative_hidden, rows.get("pooled_prompt_embeds"),
                               rows.get("negative_pooled_prompt_embeds"), latent_size, micro)

    def _text_cond(self, batch, cfg, hidden, negative_hidden, pooled, negative_pooled, latent_size,
                   micro: MicroConditioning) -> Conditioning:
        """The UNet's conditioning from encoded text (and, for SDXL, pooled text and micro-conditioning)."""
        if not self.is_sdxl:
            return Conditioning(encoder_hidden_states=torch.cat([negative_hidden, hidden]) if cfg else hidden)
        time_ids = self._time_ids(batch, latent_size, micro.sizes())
        if not cfg:
            return Conditioning(encoder_hidden_states=hidden, text_embeds=pooled, time_ids=time_ids)
        # as StableDiffusionXLPipeline: the negative half takes the same time ids unless both negative sizes given
        negative_ids = self._time_ids(batch, latent_size, micro.sizes(negative=True)) if micro.has_negative \
            else time_ids
        return Conditioning(encoder_hidden_states=torch.cat([negative_hidden, hidden]),
                            text_embeds=torch.cat([negative_pooled, pooled]), time_ids=torch.cat([negative_ids, time_ids]))


def prompt_pipeline(base: BaseModel):
    """A diffusers pipeline object over the base's own text encoders and tokenizers (nothing copied), used only
    for its ``encode_prompt``: StableDiffusionXLPipeline for SDXL bases (with the folder's
    ``force_zeros_for_empty_prompt``), else StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if base.text_encoder is None or base.tokenizer is None:
        raise LoadError(f"{base.path}: a text-conditioned base needs a pipeline folder with text_encoder/ and "
                        "tokenizer/ (model_index.json)")
    if base.kind == "sdxl":
        return StableDiffusionXLPipeline(
            vae=None, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
            tokenizer_2=base.tokenizer_2, unet=base.unet, scheduler=None, add_watermarker=False,
            force_zeros_for_empty_prompt=bool(base.pipeline_config.get("force_zeros_for_empty_prompt", True)))
    return StableDiffusionPipeline(vae=None, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _to(t, dtype):
    return None if t is None else t.to(dtype)


def _embedding_rows(t, batch: int, per_prompt: int, name: str, engine: "Conditioner"):
    """Precomputed embeddings [R, ...] as [batch, ...] on the Engine's device and dtype: R = batch, 1 (every
    image), or batch / num_images_per_prompt (each row for that many consecutive images)."""
    if t is None:
        return None
    t = torch.as_tensor(t)
    if t.dim() == 3:
        t = batch_tensor(t, batch, name) if t.shape[0] in (1, batch) else t
    if t.shape[0] * per_prompt == batch and t.shape[0] != batch:
        t = t.repeat_interleave(per_prompt, dim=0)
    elif t.shape[0] == 1:
        t = t.expand(batch, *t.shape[1:])
    if t.shape[0] != batch:
        raise ValueError(f"{name} has {t.shape[0]} rows for {batch} images")
    return t.to(engine.device, engine.dtype)
