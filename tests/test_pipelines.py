"""diffusers' conventions: strict loading (missing / unexpected / misshapen tensors, weight variants),
``Engine.from_pipe`` without copies, and the calling conventions of its pipelines (prompt lists,
num_images_per_prompt, negative prompts, height/width, no generator)."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import msdda
from msdda.loading import LoadError
from tiny_models import write_lora_adapter

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
TEXT_FILE = "text_encoder/model.safetensors"


@pytest.fixture(scope="module")
def sd(tmp_path_factory, tiny_sd_models):
    root = tmp_path_factory.mktemp("pipelines")
    base = tiny_sd_models[0]
    lora = write_lora_adapter(base, root / "lora", seed=1, rank=4)
    return base, lora


def _damaged(src, dst, file, case):
    """A copy of a model folder whose ``file`` misses a tensor, has an extra one, or has one reshaped."""
    shutil.copytree(src, dst)
    state = load_file(dst / file)
    key = sorted(state)[3]
    if case == "missing":
        del state[key]
    elif case == "unexpected":
        key = "extra_block.weight"
        state[key] = torch.zeros(3)
    else:
        state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1)
    save_file(state, dst / file, metadata={"format": "pt"})
    return dst, key


@pytest.mark.parametrize("case, words", [("missing", "is missing tensor"), ("unexpected", "has unexpected tensor"),
                                         ("misshapen", "")])
@pytest.mark.parametrize("where", ["base unet", "expert unet", "text encoder"])
def test_a_damaged_network_is_a_load_error_naming_file_and_key(sd, tmp_path, case, words, where):
    """Never a random initialisation (diffusers and transformers only warn about these)."""
    base, _ = sd
    file = TEXT_FILE if where == "text encoder" else UNET_FILE
    damaged, key = _damaged(base, tmp_path / "damaged", file, case)
    with pytest.raises(LoadError) as info:
        if where == "expert unet":
            msdda.Engine.from_pretrained(base, {"x": damaged})
        else:
            msdda.Engine.from_pretrained(damaged)
    message = str(info.value)
    assert "\n" not in message and words in message and key in message, message
    assert str(damaged / file) in message or str(damaged / file.split("/")[0]) in message, message


def test_cli_refuses_an_expert_missing_a_tensor_in_one_line(sd, tmp_path, capsys):
    from msdda.cli import main

    base, _ = sd
    damaged, key = _damaged(base, tmp_path / "damaged", UNET_FILE, "missing")
    rc = main(["generate", "--base", str(base), "--expert", f"x={damaged}", "--prompt", "a", "--steps", "1",
               "--num-images", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("msdda: error: ") and key in err, err
    assert not (tmp_path / "out").exists()


def test_weight_variants(sd, tmp_path):
    """variant="fp16" loads *.fp16.safetensors (built in the requested dtype by the loaders); a variant that is
    not there is a one-line LoadError, from the API and the CLI."""
    from diffusers import StableDiffusionPipeline

    from msdda.cli import main

    base, _ = sd
    folder = tmp_path / "variants"
    shutil.copytree(base, folder)
    pipe = StableDiffusionPipeline.from_pretrained(base, dtype=torch.float16, safety_checker=None)
    pipe.save_pretrained(folder, variant="fp16", safe_serialization=True)
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    eng = msdda.Engine.from_pretrained(folder, variant="fp16")
    assert eng.base.unet.dtype == torch.float32 and eng.base.text_encoder.dtype == torch.float32
    fp16 = load_file(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    name, tensor = sorted(fp16.items())[0]
    assert tensor.dtype == torch.float16
    assert torch.equal(dict(eng.base.unet.named_parameters())[name], tensor.float())
    half = msdda.Engine.from_pretrained(folder, variant="fp16", dtype=torch.float16)
    assert half.base.unet.dtype == torch.float16
    with pytest.raises(LoadError, match=r"no 'bf16' variant of the UNet weights \(diffusion_pytorch_model.bf16"):
        msdda.Engine.from_pretrained(folder, variant="bf16")
    rc = main(["generate", "--base", str(folder), "--variant", "bf16", "--prompt", "a", "--out", str(tmp_path / "o")])
    assert rc == 2
    with pytest.raises(ValueError, match="variant must be a name"):
        msdda.Engine.from_pretrained(folder, variant="../x")


def test_from_pipe_wraps_a_loaded_pipeline_without_copying(sd):
    from diffusers import StableDiffusionPipeline

    from msdda.backends.torch_backend import storage_bytes
    from msdda.lora import read_lora_adapter

    base, lora = sd
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    unet_ptrs = {p.data_ptr() for p in pipe.unet.parameters()}
    wrapped = msdda.Engine.from_pipe(pipe, experts={"l": lora}, group="lora", scheduler="ddim")
    assert wrapped.base.unet is pipe.unet and wrapped.base.text_encoder is pipe.text_encoder
    assert wrapped.base.vae is pipe.vae
    assert {p.data_ptr() for p in wrapped.backend.lora_network.parameters()} == unet_ptrs
    assert {p.data_ptr() for p in pipe.unet.parameters()} == unet_ptrs              # nothing moved or cast
    own = storage_bytes([*pipe.unet.parameters(), *pipe.unet.buffers()])
    factors = read_lora_adapter(wrapped.base, lora / "pytorch_lora_weights.safetensors").nbytes
    assert own < wrapped.backend.resident_bytes() <= 1.05 * (own + factors)
    plain = msdda.Engine.from_pipe(pipe)                                               # the default group="loop"
    assert plain.backend.resident_bytes() == own
    loaded = msdda.Engine.from_pretrained(base, {"l": lora}, group="lora", scheduler="ddim")
    kw = dict(prompt=["a cat", "a dog"], weights={"l": 1.0}, steps=2, seed=[5, 6], guidance_scale=3.0,
              output_type="latent", negative_prompt="x")
    assert torch.equal(wrapped.generate(**kw).latents, loaded.generate(**kw).latents)


def test_from_pipe_sdxl_and_module_experts(tiny_sdxl_models):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    base, expert = tiny_sdxl_models
    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    unet = UNet2DConditionModel.from_pretrained(expert / "unet")
    wrapped = msdda.Engine.from_pipe(pipe, experts={"x": unet})
    loaded = msdda.Engine.from_pretrained(base, {"x": expert})
    kw = dict(prompt="a boat", num_images=2, steps=2, seed=1, guidance_scale=2.0, output_type="latent")
    assert torch.equal(wrapped.generate(**kw).latents, loaded.generate(**kw).latents)
    with pytest.raises(LoadError, match="different"):
        msdda.Engine.from_pipe(pipe, experts={"y": UNet2DConditionModel(sample_size=8, cross_attention_dim=64)})


def test_prompt_lists_and_images_per_prompt_follow_diffusers(sd):
    """A prompt list sets the batch, num_images_per_prompt repeats each prompt (consecutively), negative
    prompts come as a string or one per prompt: the same latents as StableDiffusionPipeline given the same x_T
    (within a multiple of diffusers' own float32-vs-float64 error)."""
    from diffusers import StableDiffusionPipeline

    base, _ = sd
    eng = msdda.Engine.from_pretrained(base, scheduler="ddim")
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    call = dict(prompt=["a cat", "a red ball"], num_images_per_prompt=2, negative_prompt=["dark", "blurry"])
    ours = eng.generate(latents=latents, steps=3, eta=0.0, guidance_scale=4.0, output_type="latent",
                        strategy="base", **call).latents.double()
    refs = {}
    for dtype in (torch.float32, torch.float64):
        pipe = StableDiffusionPipeline.from_pretrained(base, dtype=dtype, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        refs[dtype] = pipe(num_inference_steps=3, eta=0.0, latents=latents.to(dtype), guidance_scale=4.0,
                           output_type="latent", **call).images.double()
    rounding = float((refs[torch.float32] - refs[torch.float64]).abs().max())
    assert 0 < rounding < 1e-3
    assert ours.shape == (4, 4, 16, 16)
    assert float((ours - refs[torch.float64]).abs().max()) <= 4 * rounding


def test_calling_convention_checks(sd):
    base, _ = sd
    eng = msdda.Engine.from_pretrained(base)
    kw = dict(steps=1, output_type="latent", strategy="base")
    assert eng.generate(prompt=["a", "b", "c"], **kw).latents.shape[0] == 3
    assert eng.generate(prompt="a", num_images=2, num_images_per_prompt=3, **kw).latents.shape[0] == 6
    assert eng.generate(prompt="a", height=24, width=40, **kw).latents.shape == (1, 4, 12, 20)
    cases = [
        (dict(prompt=["a", "b"], num_images=3), "prompt has 2 entries x num_images_per_prompt 1 = 2 images"),
        (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "negative_prompt has 3 entries"),
        (dict(prompt=[]), "prompt is an empty list"),
        (dict(prompt=["a", 3]), "prompt entries must be strings"),
        (dict(prompt="a", num_images_per_prompt=0), "num_images_per_prompt must be >= 1"),
        (dict(prompt="a", height=25), "height must be a multiple of 2 pixels"),
        (dict(prompt="a", width=10**6), "width must be <="),
        (dict(prompt="a", generator=torch.Generator()), "generator is not used by msdda"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            eng.generate(**args, **kw)
        assert "\n" not in str(info.value)
