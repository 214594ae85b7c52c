"""Half precision (issue 10 item 5) on the CPU: the default-dtype decision with a fake device check, the VAE's
decode precision as diffusers' pipelines choose it, and bfloat16 / float16 end to end through ``generate`` on a
tiny Stable Diffusion pipeline (text encoder, UNets, fused step, VAE), eager and through the graph seam."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

import msdda
from msdda.graphs import StepGraphCache, replay_eagerly
from msdda.precision import all_finite, default_dtype, stored_dtypes, vae_decode_dtype

CUDA = torch.device("cuda")


def _weights(path, *dtypes):
    save_file({f"w{i}": torch.zeros(2, dtype=d) for i, d in enumerate(dtypes)} | {"steps": torch.zeros(1, dtype=torch.int64)},
              path)
    return path


def supports(*dtypes):
    return lambda device, dtype: device.type == "cuda" and dtype in dtypes


def test_default_dtype_decision(tmp_path):
    f32 = _weights(tmp_path / "f32.safetensors", torch.float32)
    f16 = _weights(tmp_path / "f16.safetensors", torch.float16, torch.float32)
    bf16 = _weights(tmp_path / "bf16.safetensors", torch.bfloat16)
    f64 = _weights(tmp_path / "f64.safetensors", torch.float64)
    both = supports(torch.float16, torch.bfloat16)
    assert stored_dtypes(f16) == {"F16", "F32", "I64"}
    assert default_dtype(CUDA, [f32, f16], supports=both)[0] == torch.float16
    assert default_dtype(CUDA, [f32, bf16], supports=both)[0] == torch.bfloat16   # bf16 stored: fp16 could overflow
    assert default_dtype(CUDA, [bf16], supports=supports(torch.float16))[0] is None   # no bf16 on this GPU: fp32
    assert default_dtype(CUDA, [f32], supports=supports())[0] is None
    assert default_dtype(CUDA, [f32, f64], supports=both)[0] is None                 # float64 weights: keep fp32
    assert default_dtype(CUDA, [tmp_path / "missing.safetensors"], supports=both)[0] is None
    dtype, why = default_dtype("cpu", [f32], supports=both)
    assert dtype is None and "CUDA" in why
    assert "float16 on CUDA: weights stored in float16, float32" == default_dtype(CUDA, [f16], supports=both)[1]


def test_vae_decode_dtype_follows_diffusers():
    xl, sd = "StableDiffusionXLPipeline", "StableDiffusionPipeline"
    assert vae_decode_dtype(torch.float16, True, xl) == torch.float32     # SDXL's needs_upcasting
    assert vae_decode_dtype(torch.float16, False, xl) == torch.float16    # an fp16-fixed VAE
    assert vae_decode_dtype(torch.float16, True, sd) == torch.float16     # StableDiffusionPipeline never upcasts
    assert vae_decode_dtype(torch.bfloat16, True, xl) == torch.bfloat16   # diffusers upcasts float16 only
    assert vae_decode_dtype(torch.float16, True, None) == torch.float16


def test_all_finite():
    net = torch.nn.Linear(2, 2)
    assert all_finite(net.parameters())
    with torch.no_grad():
        net.weight[0, 0] = 7e4
    # 7e4 is beyond float16's largest finite value
    assert all_finite(net.parameters()) and not all_finite(net.half().parameters())


@pytest.fixture(scope="module")
def sd(tiny_sd_models):
    base, experts = tiny_sd_models
    return base, {"a": experts["a"]}


def test_the_default_dtype_reads_the_unet_files_of_full_networks_only(sd, tmp_path):
    """What ``default_dtype`` is given: the base's and every full expert's UNet weights; LoRA folders (diffusers
    and kohya layouts) and folders that are not models contribute nothing (the loader reports those)."""
    import shutil

    from msdda.lora import unet_weight_files
    from tiny_models import write_lora_adapter

    base, experts = sd
    lora = write_lora_adapter(base, tmp_path / "lora", seed=1)
    kohya = tmp_path / "kohya"
    kohya.mkdir()
    shutil.copy(lora / "pytorch_lora_weights.safetensors", kohya / "style.safetensors")
    files = unet_weight_files(base, [experts["a"], lora, kohya, tmp_path / "missing"])
    assert files == [base / "unet/diffusion_pytorch_model.safetensors",
                     experts["a"] / "unet/diffusion_pytorch_model.safetensors"]
    assert unet_weight_files(base, [], variant="fp16") == []          # no such variant: the loader says so


KW = dict(prompt=["a cat", "two dogs"], num_images=2, steps=3, weights={"a": 1.0}, expert_betas={"a": 0.6},
          seed=[1, 2], guidance_scale=7.5)


@pytest.fixture(scope="module")
def fp32_latents(sd):
    eng = msdda.Engine.from_pretrained(*sd)
    assert eng.dtype == torch.float32 and eng.dtype_default      # no dtype on the CPU: float32, chosen by default
    return eng.generate(output_type="latent", **KW).latents


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_end_to_end(sd, fp32_latents, dtype):
    """Every part runs in ``dtype`` (the SD pipeline's VAE too: StableDiffusionPipeline decodes in the VAE's
    dtype); the latents stay within rounding of the float32 run: half an ulp of ``dtype`` per stored tensor,
    compounded over the steps, relative to the latents' magnitude (observed: about a quarter of this bound)."""
    eng = msdda.Engine.from_pretrained(*sd, dtype=dtype)
    assert eng.dtype == dtype and not eng.dtype_default
    assert {p.dtype for p in eng.backend.networks[0].parameters()} == {dtype}
    assert eng.base.text_encoder.dtype == dtype and eng.base.vae.dtype == dtype
    out = eng.generate(output_type="pil", **KW)
    assert out.latents.dtype == dtype and bool(torch.isfinite(out.latents).all())
    assert len(out.images) == 2 and out.images[0].size == (32, 32)
    err = (out.latents.float() - fp32_latents).abs().max().item()
    bound = 2 * KW["steps"] * torch.finfo(dtype).eps * fp32_latents.abs().max().item()
    assert err <= bound, (err, bound)
    # the graph seam in half precision: the same bits as the eager loop
    eng.step_graphs = StepGraphCache(capture=replay_eagerly)
    assert torch.equal(eng.generate(output_type="latent", **KW).latents, out.latents)


def test_an_xl_pipeline_decodes_with_an_upcast_vae(tiny_sdxl_models):
    """A float16 VAE with force_upcast in an SDXL model decodes in float32, as diffusers'
    StableDiffusionXLPipeline does; the UNets stay float16. (An SD model's VAE stays float16: the test above.)"""
    base = msdda.loading.load_base(tiny_sdxl_models[0], torch.float16)
    assert base.vae.config.force_upcast and base.vae.dtype == torch.float16
    eng = msdda.Engine(base, {}, dtype=torch.float16)
    assert eng.base.vae.dtype == torch.float32 and eng.dtype == torch.float16
    images = eng.generate(prompt="a cat", steps=2, seed=0, output_type="np", guidance_scale=2.0, strategy="base").images
    assert images.dtype.kind == "f" and math.isfinite(float(images.sum()))
