"""SDXL through msdda against diffusers' own StableDiffusionXLPipeline: a tiny SDXL-architecture pipeline built
from configs (two text encoders, pooled text embeddings, time ids), DDIM with eta 0, the same x_T.

Tolerance: diffusers is also run in float64 (the reference). msdda's float32 latents must lie within a small
multiple of diffusers' own float32-vs-float64 error on the same inputs (what float32 rounding does to this
computation on this CPU) of the float64 reference; a wrong embedding, time id or scheduler step is off by orders of
magnitude more. (msdda's fused step runs in float32/16 only, so the float64 twin is diffusers'.)"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import msdda
from tiny_models import write_lora_adapter

pytestmark = pytest.mark.slow   # tiny SDXL pipelines, compared with diffusers

STEPS = 3
GUIDANCE = 5.0
@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, tiny_sdxl_models):
    root = tmp_path_factory.mktemp("sdxl")
    base, expert = tiny_sdxl_models
    lora = write_lora_adapter(base, root / "lora", seed=3, rank=4)
    return base, expert, lora


def _diffusers(base, dtype, latents, *, unet_from=None, lora=None, **call):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    pipe = StableDiffusionXLPipeline.from_pretrained(base, dtype=dtype)
    if unet_from is not None:
        pipe.unet = UNet2DConditionModel.from_pretrained(unet_from / "unet", dtype=dtype)
    if lora is not None:
        pipe.load_lora_weights(str(lora), weight_name="pytorch_lora_weights.safetensors")
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    pipe.set_progress_bar_config(disable=True)
    out = pipe(num_inference_steps=STEPS, eta=0.0, latents=latents.to(dtype), guidance_scale=GUIDANCE,
               output_type="latent", **call)
    return out.images.double()


def _msdda(base, dtype, latents, *, experts=None, strategy="base", **call):
    eng = msdda.Engine.from_pretrained(base, experts or {}, dtype=dtype, scheduler="ddim")
    out = eng.generate(steps=STEPS, eta=0.0, latents=latents, guidance_scale=GUIDANCE, output_type="latent",
                       strategy=strategy, **call)
    return out.latents.double()


def _check_against_diffusers(base, latents, msdda_kw, diffusers_kw):
    ours = _msdda(base, torch.float32, latents, **msdda_kw)
    ref32 = _diffusers(base, torch.float32, latents, **diffusers_kw)
    ref64 = _diffusers(base, torch.float64, latents, **diffusers_kw)
    rounding = float((ref32 - ref64).abs().max())
    assert 0 < rounding < 1e-3
    assert float((ours - ref64).abs().max()) <= 4 * rounding
    return ours


def test_sdxl_base_matches_diffusers(sdxl):
    """strategy="base" on SDXL: prompts as a list with num_images_per_prompt (the batch), the default negative
    (zeros: force_zeros_for_empty_prompt), both encoders, pooled embeddings, default time ids."""
    base, _, _ = sdxl
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    call = dict(prompt=["a red cube", "two dogs"], num_images_per_prompt=2)
    out = _check_against_diffusers(base, latents, dict(**call), dict(**call))
    assert out.shape == (4, 4, 16, 16)


def test_sdxl_expert_with_negative_prompt_and_micro_conditioning_matches_diffusers(sdxl):
    """expert:NAME (a full UNet) with a negative prompt per prompt and explicit original/target sizes and crop."""
    base, expert, _ = sdxl
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    call = dict(prompt=["a cat", "a tree at night"], negative_prompt=["blurry", "ugly"], original_size=(64, 48),
                crops_coords_top_left=(4, 2), target_size=(32, 32))
    _check_against_diffusers(base, latents, dict(experts={"x": expert}, strategy="expert:x", **call),
                             dict(unet_from=expert, **call))


def test_sdxl_lora_expert_matches_diffusers_fuse_lora(sdxl):
    """A LoRA expert of the SDXL UNet equals diffusers' load_lora_weights + fuse_lora."""
    base, _, lora = sdxl
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    call = dict(prompt="a lighthouse", num_images_per_prompt=2, negative_prompt="fog")
    _check_against_diffusers(base, latents, dict(experts={"l": lora}, strategy="expert:l", **call),
                             dict(lora=lora, **call))


def test_sdxl_composition_of_a_full_and_a_lora_expert(sdxl):
    """msdda over a full expert and a LoRA expert of one SDXL base runs and moves the samples off the base's."""
    base, expert, lora = sdxl
    eng = msdda.Engine.from_pretrained(base, {"x": expert, "l": lora}, scheduler="ddim")
    kw = dict(prompt=["a cat", "a dog"], steps=2, eta=0.0, output_type="latent", seed=[3, 4], guidance_scale=3.0)
    composed = eng.generate(weights={"x": 0.5, "l": 0.5}, **kw).latents
    alone = eng.generate(strategy="base", **kw).latents
    assert torch.isfinite(composed).all()
    assert (composed - alone).abs().max() > 1e-3


def test_sdxl_conditioning_and_refusals(sdxl):
    base, _, _ = sdxl
    eng = msdda.Engine.from_pretrained(base, scheduler="ddim")
    assert eng.is_sdxl and eng.vae_scale_factor == 2
    cond = eng.conditioning(3, cfg=True, prompt="a cat")
    assert cond.encoder_hidden_states.shape == (6, 77, 64)
    assert cond.text_embeds.shape == (6, 32) and cond.time_ids.shape == (6, 6)
    assert cond.time_ids[0].tolist() == [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]    # latent 16 x VAE factor 2
    assert bool((cond.encoder_hidden_states[:3] == 0).all())                  # force_zeros_for_empty_prompt
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        eng.conditioning(1, cfg=False, prompt_embeds=torch.zeros(1, 77, 64))
    with pytest.raises(ValueError, match="TensorRT"):
        msdda.Engine(eng.base, {}, backend="tensorrt")


def test_sdxl_other_sizes_and_precomputed_embeddings(sdxl):
    """height/width change the latent and the default time ids; prompt_embeds + pooled_prompt_embeds give the
    same images as the prompt they were encoded from."""
    base, _, _ = sdxl
    eng = msdda.Engine.from_pretrained(base, scheduler="ddim")
    kw = dict(steps=2, eta=0.0, output_type="latent", seed=7, guidance_scale=2.0, strategy="base")
    out = eng.generate(prompt="a boat", height=40, width=24, **kw)
    assert out.latents.shape == (1, 4, 20, 12)
    with pytest.raises(ValueError, match="height must be a multiple of 2 pixels"):
        eng.generate(prompt="a boat", height=41, **kw)
    pipe = msdda.engine.prompt_pipeline(eng.base)
    embeds, _, pooled, _ = pipe.encode_prompt(["a boat"], device="cpu", do_classifier_free_guidance=False)
    by_text = eng.generate(prompt="a boat", **kw).latents
    by_embeds = eng.generate(prompt_embeds=embeds, pooled_prompt_embeds=pooled, **kw).latents
    assert torch.equal(by_text, by_embeds)


def test_sdxl_onnx_runtime_and_export(sdxl, tmp_path):
    """The ONNX graph of an SDXL UNet takes text_embeds and time_ids; ONNX Runtime's forward equals torch's
    within a multiple of torch's own float32-vs-float64 error on the same inputs."""
    from msdda.backends import Conditioning
    from msdda.exporting import export_models

    base, _, _ = sdxl
    manifest = export_models(base, {}, tmp_path / "onnx")
    assert manifest["cond"] == "text_time"
    assert manifest["inputs"]["text_embeds"] == ["N", 32] and manifest["inputs"]["time_ids"] == ["N", 6]
    import onnx

    graph = onnx.load(str(tmp_path / "onnx" / "base.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input if not i.name.startswith("unet.")] == [
        "sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]

    ort = msdda.Engine.from_pretrained(base, backend="onnxruntime",                     # the exported graph
                                       onnx_paths={"base": tmp_path / "onnx" / "base.onnx"})
    t32 = msdda.Engine.from_pretrained(base)
    t64 = msdda.Engine.from_pretrained(base, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    cond = t32.conditioning(2, cfg=False, prompt=["a cat", "a dog"])
    cond64 = Conditioning(**{k: v.double() for k, v in vars(cond).items() if v is not None})
    with torch.inference_mode():
        a = ort.backend.forward(x, 500, cond, (0,)).double()
        b = t32.backend.forward(x, 500, cond, (0,)).double()
        c = t64.backend.forward(x.double(), 500, cond64, (0,))
    rounding = float((b - c).abs().max())
    assert float((a - b).abs().max()) <= 8 * rounding


def test_cli_generates_with_an_sdxl_base_and_a_lora_expert(sdxl, tmp_path, capsys):
    from msdda.cli import main

    base, _, lora = sdxl
    out = tmp_path / "out"
    rc = main(["generate", "--base", str(base), "--expert", f"a={lora}", "--prompt", "a cat", "--negative-prompt",
               "blurry", "--num-images", "2", "--steps", "2", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["00000.png", "00001.png", "grid.png", "manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["negative_prompt"] == "blurry" and [m["name"] for m in manifest["models"]] == ["base", "a"]
    from PIL import Image

    assert np.asarray(Image.open(out / "00000.png")).shape == (32, 32, 3)


def test_an_sdxl_unet_without_both_text_encoders_is_refused(sdxl, tmp_path):
    """An SDXL refiner-like folder (no first text encoder) or mismatched added-embedding sizes: one-line
    LoadErrors at load, not a failure mid-generation."""
    import shutil

    from msdda.loading import LoadError

    base, _, _ = sdxl
    folder = tmp_path / "no_te1"
    shutil.copytree(base, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder"] = index["tokenizer"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(LoadError, match="needs text_encoder and text_encoder_2"):
        msdda.Engine.from_pretrained(folder)
