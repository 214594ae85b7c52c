"""Tiny diffusers models built from configs, for tests and benchmarks. No download.

- ``make_tiny_unet2d``: a pixel-space UNet2DModel folder (optionally class-conditional, optionally with a
  learned-range variance channel), plus a DDPM scheduler config beside it.
- ``make_tiny_sd_pipeline``: a StableDiffusionPipeline folder with a tiny UNet2DConditionModel, a tiny CLIP
  text encoder and a byte-level tokenizer written by hand, a tiny VAE and a DDIM scheduler.
- ``perturbed_copy``: an "expert" of the same architecture: the source weights plus seeded noise, so experts
  really differ from the base.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def _seeded(seed: int):
    torch.manual_seed(seed)


def tiny_unet2d_config(*, learned_variance: bool = True, num_class_embeds: int | None = None,
                       sample_size: int = 8, channels: int = 1) -> dict:
    return dict(
        sample_size=sample_size, in_channels=channels,
        out_channels=2 * channels if learned_variance else channels,
        layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=num_class_embeds,
    )


def make_tiny_unet2d(path, *, learned_variance: bool = True, num_class_embeds: int | None = None,
                     seed: int = 0, sample_size: int = 8, channels: int = 1, scheduler: str = "ddpm",
                     clip_sample: bool = True):
    """Write a tiny UNet2DModel folder (``path/unet``) and a scheduler config (``path/scheduler``)."""
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

    path = Path(path)
    _seeded(seed)
    unet = UNet2DModel(**tiny_unet2d_config(learned_variance=learned_variance, num_class_embeds=num_class_embeds,
                                            sample_size=sample_size, channels=channels))
    unet.save_pretrained(path / "unet", safe_serialization=True)
    variance_type = "learned_range" if learned_variance else "fixed_small"
    sched_cls = DDPMScheduler if scheduler == "ddpm" else DDIMScheduler
    kwargs = dict(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip_sample)
    if sched_cls is DDPMScheduler:
        kwargs["variance_type"] = variance_type
    sched_cls(**kwargs).save_pretrained(path / "scheduler")
    return path


def perturbed_copy(src, dst, *, seed: int, scale: float = 0.02, subfolder: str = "unet"):
    """Copy a model folder with every weight perturbed by seeded noise of relative size ``scale``."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    weights = dst / subfolder / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in state.items():
        if tensor.is_floating_point():
            # noise relative to the tensor's mean magnitude; the 1e-3 floor is not a tolerance: it gives tensors
            # initialised to zero a perturbation too, so every parameter of the expert differs from the base
            noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
            state[name] = (tensor.float() + scale * (tensor.float().abs().mean() + 1e-3) * noise).to(tensor.dtype)
    save_file(state, weights)
    return dst


def write_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer with a tiny vocabulary: every printable ASCII character, its end-of-word
    form, a few merges, and CLIP's special tokens."""
    path.mkdir(parents=True, exist_ok=True)
    chars = [chr(i) for i in range(33, 127)]
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = ["t h", "th e</w>", "a n", "an d</w>", "o f</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}))
    (path / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}))


def tiny_sd_unet_config(sample_size: int = 16) -> dict:
    return dict(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=16,
    )


def tiny_vae(sample_size: int):
    """A tiny AutoencoderKL (4 latent channels, scale factor 2) for latents of sample_size^2."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8,
                         sample_size=2 * sample_size)


def make_tiny_sd_pipeline(path, *, seed: int = 0, sample_size: int = 16):
    """Write a tiny StableDiffusionPipeline folder (latent 4 x sample_size^2, 77-token text, DDIM)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    _seeded(seed)
    unet = UNet2DConditionModel(**tiny_sd_unet_config(sample_size))
    vae = tiny_vae(sample_size)
    tok_dir = path / "_tok"
    write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    import shutil
    shutil.rmtree(tok_dir)
    return path


LORA_SUFFIXES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                 "attn2.to_v", "attn2.to_out.0", "resnets.0.conv1", "resnets.0.conv2", "time_emb_proj")


def write_lora_adapter(base, dst, *, seed: int, rank: int = 4, scale: float = 0.5,
                       suffixes: tuple[str, ...] = LORA_SUFFIXES, subfolder: str = "unet"):
    """A seeded random LoRA adapter (diffusers key layout, ``pytorch_lora_weights.safetensors``) on every
    Linear / Conv2d of the base UNet whose name ends with one of ``suffixes``. Up is nonzero (unlike a fresh
    adapter), so the expert really differs from the base."""
    from diffusers import UNet2DConditionModel, UNet2DModel
    from safetensors.torch import save_file

    base = Path(base)
    cfg = json.loads((base / subfolder / "config.json").read_text())
    cls = UNet2DConditionModel if cfg["_class_name"] == "UNet2DConditionModel" else UNet2DModel
    unet = cls.from_pretrained(base / subfolder)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if not name.endswith(suffixes) or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        w = module.weight
        down = torch.randn(rank, *w.shape[1:], generator=gen) / w[0].numel() ** 0.5
        up = torch.randn(w.shape[0], rank, *([1, 1] if w.dim() == 4 else []), generator=gen)
        up *= scale * w.abs().mean() / rank ** 0.5
        state[f"unet.{name}.lora.down.weight"] = down
        state[f"unet.{name}.lora.up.weight"] = up
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(state, dst / "pytorch_lora_weights.safetensors")
    return dst


def tiny_sdxl_unet_config(sample_size: int = 16) -> dict:
    """SDXL's UNet layout at toy size: added text-time conditioning (pooled text embedding + 6 micro-conditioning
    numbers, each embedded in ``addition_time_embed_dim``), both text encoders' hidden states concatenated
    (32 + 32 = 64) as cross-attention context, linear projections and per-block transformer depths."""
    return dict(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=16,
    )


def make_tiny_sdxl_pipeline(path, *, seed: int = 0, sample_size: int = 16, force_zeros_for_empty_prompt: bool = True):
    """Write a tiny StableDiffusionXLPipeline folder: a UNet2DConditionModel with ``addition_embed_type=
    "text_time"``, a CLIPTextModel and a CLIPTextModelWithProjection (projection 32, so the pooled embedding is
    32 wide), two byte-level tokenizers, a tiny VAE (scale factor 2) and a DDIM scheduler."""
    import shutil

    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    _seeded(seed)
    unet = UNet2DConditionModel(**tiny_sdxl_unet_config(sample_size))
    vae = tiny_vae(sample_size)
    tok_dir = path / "_tok"
    write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir)
    text_config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    shutil.rmtree(tok_dir)
    return path


def kohya_lora_keys(state: dict) -> dict:
    """A diffusers-layout LoRA state dict (``unet.<module>.lora.down.weight`` / ``.lora.up.weight``) renamed to
    the kohya-ss / A1111 layout that sd-scripts writes for SD 1.x, whose UNet it trains under diffusers' module
    names: ``lora_unet_<module with '.' replaced by '_'>.lora_down.weight`` / ``.lora_up.weight``, plus one
    ``.alpha`` scalar per module (here alpha = rank / 2, so the scale alpha / rank = 0.5 is exercised; the
    up factors are doubled so that the expert's weights equal the diffusers file's)."""
    out = {}
    for key, tensor in state.items():
        module, _, role = key[len("unet."):].rpartition(".lora.")
        name = "lora_unet_" + module.replace(".", "_")
        if role == "down.weight":
            out[f"{name}.lora_down.weight"] = tensor
            out[f"{name}.alpha"] = torch.tensor(tensor.shape[0] / 2)
        else:
            out[f"{name}.lora_up.weight"] = tensor * 2
    return out


def damaged_copy(src, dst, where: str, content) -> Path:
    """A copy of the model folder ``src`` at ``dst`` with the JSON file ``where`` damaged: ``content`` a dict
    (merged into the file's object) or text (replacing the file)."""
    import json
    import shutil

    shutil.copytree(src, dst)
    path = Path(dst) / where
    if isinstance(content, dict):
        content = json.dumps({**json.loads(path.read_text()), **content})
    path.write_text(content)
    return Path(dst)

