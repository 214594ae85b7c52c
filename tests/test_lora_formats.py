"""LoRA experts in the layouts users have (diffusers, kohya-ss / A1111, PEFT), read through diffusers' own
conversion, compared with diffusers itself (load_lora_weights + fuse_lora) and PEFT itself (merge_and_unload);
and held as factors, never as K full copies, under group="lora".

Tolerance: diffusers is also run in float64 (the reference); msdda's float32 latents must lie within a small
multiple of diffusers' own float32-vs-float64 error of it."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import msdda
from msdda.loading import LoadError
from tiny_models import kohya_lora_keys, write_lora_adapter

STEPS = 3
GUIDANCE = 4.0
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def sd(tmp_path_factory, tiny_sd_models):
    root = tmp_path_factory.mktemp("loraformats")
    base = tiny_sd_models[0]
    diffusers_dir = write_lora_adapter(base, root / "diffusers", seed=1, rank=4)
    state = load_file(diffusers_dir / DIFFUSERS_FILE)
    kohya_dir = root / "kohya"
    kohya_dir.mkdir()
    save_file(kohya_lora_keys(state), kohya_dir / "style_v1.safetensors")     # the name a user downloads it under
    # PEFT's own layout (PeftModel.save_pretrained): base_model.model.<module>.lora_A / lora_B, and the config
    # beside it; lora_alpha = 2 r (scale 2) with the up factors halved, so the expert equals the diffusers file's
    peft_dir = root / "peft"
    peft_dir.mkdir()
    peft_state, targets = {}, set()
    for key, tensor in state.items():
        module, _, role = key[len("unet."):].rpartition(".lora.")
        targets.add(module)
        if role == "down.weight":
            peft_state[f"base_model.model.{module}.lora_A.weight"] = tensor
        else:
            peft_state[f"base_model.model.{module}.lora_B.weight"] = tensor / 2
    save_file(peft_state, peft_dir / "adapter_model.safetensors")
    (peft_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": sorted(targets), "lora_dropout": 0.0,
        "bias": "none", "init_lora_weights": True}))
    return base, {"diffusers": (diffusers_dir, DIFFUSERS_FILE), "kohya": (kohya_dir, "style_v1.safetensors"),
                  "peft": (peft_dir, "adapter_model.safetensors")}


def _diffusers(base, dtype, latents, lora_dir, weight_name, **call):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, dtype=dtype, safety_checker=None)
    pipe.load_lora_weights(str(lora_dir), weight_name=weight_name)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.set_progress_bar_config(disable=True)
    return pipe(num_inference_steps=STEPS, eta=0.0, latents=latents.to(dtype), guidance_scale=GUIDANCE,
                output_type="latent", **call).images.double()


def _msdda(base, latents, lora_dir, **call):
    eng = msdda.Engine.from_pretrained(base, {"style": lora_dir}, scheduler="ddim")
    return eng.generate(steps=STEPS, eta=0.0, latents=latents, guidance_scale=GUIDANCE, output_type="latent",
                        strategy="expert:style", **call).latents.double()


CALL = dict(prompt=["a red apple", "the sea"], negative_prompt=["dark", "blurry"])


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_lora_expert_matches_diffusers_fuse_lora(sd, layout):
    base, files = sd
    lora_dir, weight_name = files[layout]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = _msdda(base, latents, lora_dir, **CALL)
    ref32 = _diffusers(base, torch.float32, latents, lora_dir, weight_name, **CALL)
    ref64 = _diffusers(base, torch.float64, latents, lora_dir, weight_name, **CALL)
    rounding = float((ref32 - ref64).abs().max())
    assert 0 < rounding < 1e-3
    assert float((ours - ref64).abs().max()) <= 4 * rounding
    if layout != "diffusers":
        return
    # the LoRA really changes the images (else this test could not fail)
    plain = msdda.Engine.from_pretrained(base, scheduler="ddim").generate(
        steps=STEPS, eta=0.0, latents=latents, guidance_scale=GUIDANCE, output_type="latent", strategy="base",
        **CALL).latents.double()
    assert float((plain - ref64).abs().max()) > 100 * rounding


def test_the_three_layouts_give_the_same_expert(sd):
    """kohya (alpha = r / 2, up doubled) and PEFT (lora_alpha = 2 r, up halved) encode the diffusers file's
    weights with power-of-two scales, so the merged experts are bit-identical; PEFT's own merge_and_unload of
    the PEFT folder gives the same weights."""
    from peft import PeftModel

    from msdda.loading import load_base
    from msdda.lora import load_expert

    base, files = sd
    model = load_base(base)
    merged = {layout: dict(load_expert(layout, folder, model)[0].named_parameters())
              for layout, (folder, _) in files.items()}
    for layout in ("kohya", "peft"):
        for name, p in merged["diffusers"].items():
            assert torch.equal(p, merged[layout][name]), (layout, name)
    unet = load_base(base).unet
    peft_merged = dict(PeftModel.from_pretrained(unet, str(files["peft"][0])).merge_and_unload().named_parameters())
    changed = 0
    for name, p in merged["peft"].items():
        torch.testing.assert_close(p, peft_merged[name], rtol=0, atol=4 * torch.finfo(p.dtype).eps * float(p.abs().max()))
        changed += not torch.equal(p, dict(model.unet.named_parameters())[name])
    assert changed == 50                                    # every adapted layer's weight moved


def _lora(path, tensors):
    path.mkdir()
    save_file(tensors, path / DIFFUSERS_FILE)
    return path


def test_text_encoder_weights_are_refused_naming_the_keys(sd, tmp_path):
    base, files = sd
    state = load_file(files["diffusers"][0] / DIFFUSERS_FILE)
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    state[f"{te}.lora.down.weight"] = torch.zeros(4, 32)
    state[f"{te}.lora.up.weight"] = torch.zeros(32, 4)
    with pytest.raises(LoadError, match=r"also adapts the text encoder \(2 keys, e.g. 'text_encoder\.text_model") as e:
        msdda.Engine.from_pretrained(base, {"x": _lora(tmp_path / "te", state)})
    assert "\n" not in str(e.value)
    kohya = kohya_lora_keys(load_file(files["diffusers"][0] / DIFFUSERS_FILE))
    kohya["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 32)
    kohya["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(32, 4)
    (tmp_path / "kte").mkdir()
    save_file(kohya, tmp_path / "kte" / "a.safetensors")
    with pytest.raises(LoadError, match="also adapts the text encoder"):
        msdda.Engine.from_pretrained(base, {"x": tmp_path / "kte"})


def test_dora_and_unknown_keys_are_refused(sd, tmp_path):
    base, files = sd
    state = load_file(files["diffusers"][0] / DIFFUSERS_FILE)
    dora = dict(state, **{"unet.down_blocks.0.resnets.0.conv1.lora_magnitude_vector": torch.ones(32)})
    with pytest.raises(LoadError, match="DoRA"):
        msdda.Engine.from_pretrained(base, {"x": _lora(tmp_path / "dora", dora)})
    odd = dict(state, **{"vae.decoder.conv_in.lora.down.weight": torch.ones(2, 2)})
    with pytest.raises(LoadError, match="unexpected LoRA key 'vae.decoder"):
        msdda.Engine.from_pretrained(base, {"x": _lora(tmp_path / "odd", odd)})


def test_group_lora_holds_the_base_weights_once(sd, tmp_path):
    """K LoRA experts under group='lora': the backend's resident parameter and buffer bytes are at most 1.05x
    the base UNet's own plus the adapters' factors (no merged copy, no stacked copy), and the group network's
    layers are the base's own tensors."""
    from msdda.backends.torch_backend import storage_bytes
    from msdda.loading import load_base
    from msdda.lora import read_lora_adapter

    base, files = sd
    experts = {f"e{k}": write_lora_adapter(base, tmp_path / f"e{k}", seed=10 + k, rank=4) for k in range(3)}
    eng = msdda.Engine.from_pretrained(base, experts, group="lora")
    unet = eng.base.unet
    base_bytes = storage_bytes([*unet.parameters(), *unet.buffers()])
    model = load_base(base)
    factor_bytes = sum(read_lora_adapter(model, folder / DIFFUSERS_FILE).nbytes for folder in experts.values())
    resident = eng.backend.resident_bytes()
    assert base_bytes <= resident <= 1.05 * (base_bytes + factor_bytes)
    ptrs = {p.data_ptr() for p in unet.parameters()}
    group_ptrs = {p.data_ptr() for p in eng.backend.lora_network.parameters()}
    assert group_ptrs == ptrs
    # the loop mode does hold K merged copies of the adapted layers: the bound is not trivially met
    loop = msdda.Engine.from_pretrained(base, experts)
    assert loop.backend.resident_bytes() > resident + 2 * factor_bytes


def test_attention_processor_layout_of_ddpo_pytorch(sd, tmp_path):
    """ddpo-pytorch (and TRL's DDPO trainer) save LoRA with ``unet.save_attn_procs``: attention layers only, no
    component prefix, ``<block>.processor.to_q_lora.down.weight``. diffusers loads such a file with
    ``unet.load_lora_adapter(..., prefix=None)``; msdda gives the same latents."""
    from diffusers import StableDiffusionPipeline

    base, files = sd
    procs = {}
    for key, tensor in load_file(files["diffusers"][0] / DIFFUSERS_FILE).items():
        module, _, role = key[len("unet."):].rpartition(".lora.")
        parent, _, proj = module.rpartition(".")
        if proj == "0":                                      # to_out.0
            parent, _, proj = parent.rpartition(".")
        if proj in ("to_q", "to_k", "to_v", "to_out"):
            procs[f"{parent}.processor.{proj}_lora.{role}"] = tensor
    folder = tmp_path / "ddpo"
    folder.mkdir()
    save_file(procs, folder / DIFFUSERS_FILE)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    ours = _msdda(base, latents, folder, **CALL)
    refs = {}
    for dtype in (torch.float32, torch.float64):
        pipe = StableDiffusionPipeline.from_pretrained(base, dtype=dtype, safety_checker=None)
        pipe.unet.load_lora_adapter(str(folder), weight_name=DIFFUSERS_FILE, prefix=None)
        pipe.set_progress_bar_config(disable=True)
        refs[dtype] = pipe(num_inference_steps=STEPS, eta=0.0, latents=latents.to(dtype), guidance_scale=GUIDANCE,
                           output_type="latent", **CALL).images.double()
    rounding = float((refs[torch.float32] - refs[torch.float64]).abs().max())
    assert 0 < rounding < 1e-3
    assert float((ours - refs[torch.float64]).abs().max()) <= 4 * rounding
    assert len(procs) == 2 * 32                              # 32 attention projections adapted
