"""Runtime: Engine.generate over tiny diffusers models, every strategy, both backends, concurrency."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import msdda
from msdda.loading import LoadError
from tiny_models import make_tiny_sd_pipeline, make_tiny_unet2d, perturbed_copy

STEPS = 4


@pytest.fixture(scope="session")
def pixel_models(tmp_path_factory):
    """Class-conditional learned-variance base (DDPM) and two perturbed experts."""
    root = tmp_path_factory.mktemp("pixel")
    base = make_tiny_unet2d(root / "base", learned_variance=True, num_class_embeds=11)
    experts = {"a": perturbed_copy(base, root / "a", seed=1, scale=0.3),
               "b": perturbed_copy(base, root / "b", seed=2, scale=0.3)}
    return base, experts


@pytest.fixture(scope="session")
def fixed_var_models(tmp_path_factory):
    """Unconditional fixed-variance base and experts: equal variances, so msdda == mpa (without x0 clipping,
    which would make the step non-affine in the network output)."""
    root = tmp_path_factory.mktemp("fixed")
    base = make_tiny_unet2d(root / "base", learned_variance=False, clip_sample=False)
    return base, {"a": perturbed_copy(base, root / "a", seed=3, scale=0.3),
                  "b": perturbed_copy(base, root / "b", seed=4, scale=0.3)}


@pytest.fixture(scope="session")
def sd_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    base = make_tiny_sd_pipeline(root / "base")
    return base, {"a": perturbed_copy(base, root / "a", seed=5, scale=0.2),
                  "b": perturbed_copy(base, root / "b", seed=6, scale=0.2)}


@pytest.fixture(scope="session")
def pixel_engine(pixel_models):
    base, experts = pixel_models
    return msdda.Engine.from_pretrained(base, experts)


def _gen(engine, **kw):
    kw.setdefault("steps", STEPS)
    kw.setdefault("output_type", "latent")
    kw.setdefault("class_labels", 3)
    kw.setdefault("guidance_scale", 2.0)
    return engine.generate(**kw).latents


@pytest.mark.parametrize("strategy", ["msdda", "mpa", "soup", "base", "expert:a", "expert:b"])
def test_every_strategy_runs_and_is_finite(pixel_engine, strategy):
    lat = _gen(pixel_engine, weights={"a": 0.6, "b": 0.4}, num_images=2, strategy=strategy)
    assert lat.shape == (2, 1, 8, 8) and torch.isfinite(lat).all()


def test_strategies_differ_where_they_should(pixel_engine):
    w = {"a": 0.5, "b": 0.5}
    out = {s: _gen(pixel_engine, weights=w, strategy=s) for s in ("msdda", "mpa", "base", "expert:a")}
    assert not torch.allclose(out["msdda"], out["base"])
    assert not torch.allclose(out["expert:a"], out["base"])
    # learned, distinct variances: the exact product differs from output averaging
    assert not torch.allclose(out["msdda"], out["mpa"], atol=1e-5)


def test_single_expert_weight_equals_that_expert(pixel_engine):
    """w = (1, 0): the product of one Gaussian is that Gaussian; msdda, mpa and expert:a coincide."""
    a = _gen(pixel_engine, weights={"a": 1.0}, strategy="expert:a")
    for s in ("msdda", "mpa", "soup"):
        torch.testing.assert_close(_gen(pixel_engine, weights={"a": 1.0, "b": 0.0}, strategy=s), a, atol=1e-5, rtol=1e-5)


def test_msdda_equals_mpa_with_equal_variances(fixed_var_models):
    base, experts = fixed_var_models
    eng = msdda.Engine.from_pretrained(base, experts)
    for w in ({"a": 0.3, "b": 0.7}, {"a": 0.8, "b": 0.2}):
        m = _gen(eng, weights=w, strategy="msdda", class_labels=None, num_images=2)
        p = _gen(eng, weights=w, strategy="mpa", class_labels=None, num_images=2)
        torch.testing.assert_close(m, p, atol=2e-5, rtol=1e-5)


def test_base_strategy_matches_diffusers_ddpm_loop(pixel_models):
    """Replaying the same x_T and noise, strategy=base equals diffusers' own DDPM sampling loop."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod
    from diffusers import DDPMScheduler, UNet2DModel

    base, _ = pixel_models
    eng = msdda.Engine.from_pretrained(base, {})
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 1, 8, 8, generator=g)
    noise = torch.randn(STEPS, 2, 1, 8, 8, generator=g)
    ours = eng.generate(class_labels=[1, 7], num_images=2, steps=STEPS, guidance_scale=1.0, strategy="base",
                        latents=x_T, noise=noise, output_type="latent").latents

    unet = UNet2DModel.from_pretrained(base / "unet").eval()
    sched = DDPMScheduler.from_pretrained(base / "scheduler")
    sched.set_timesteps(STEPS)
    x = x_T.clone()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            out = unet(x, t, class_labels=torch.tensor([1, 7])).sample
            # diffusers' DDPM step draws its own z; make it draw ours so both runs see the same noise
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(ddpm_mod, "randn_tensor", lambda *a, **k: noise[i].clone())
                x = sched.step(out, t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


def test_per_sample_weights_match_separate_calls(pixel_engine):
    ws = [{"a": 0.9, "b": 0.1}, {"a": 0.2, "b": 0.8}, {"a": 0.5, "b": 0.5}]
    together = _gen(pixel_engine, weights=ws, seed=[10, 11, 12], num_images=3)
    for i, w in enumerate(ws):
        alone = _gen(pixel_engine, weights=w, seed=[10 + i], num_images=1)
        torch.testing.assert_close(together[i:i + 1], alone, atol=1e-5, rtol=1e-5)


def test_per_sample_weights_with_soup_match_separate_calls(pixel_engine):
    ws = [{"a": 0.9, "b": 0.1}, {"a": 0.2, "b": 0.8}, {"a": 0.9, "b": 0.1}]
    together = _gen(pixel_engine, weights=ws, seed=[3, 4, 5], num_images=3, strategy="soup", class_labels=[1, 2, 3])
    for i, w in enumerate(ws):
        alone = _gen(pixel_engine, weights=w, seed=[3 + i], num_images=1, strategy="soup", class_labels=[1 + i])
        torch.testing.assert_close(together[i:i + 1], alone, atol=1e-5, rtol=1e-5)


def test_same_seed_same_image_whatever_the_batch(pixel_engine):
    w = {"a": 0.4, "b": 0.6}
    batch = _gen(pixel_engine, weights=w, seed=[5, 99, 7], num_images=3)
    single = _gen(pixel_engine, weights=w, seed=[99], num_images=1)
    torch.testing.assert_close(batch[1:2], single, atol=1e-5, rtol=1e-5)
    again = _gen(pixel_engine, weights=w, seed=[5, 99, 7], num_images=3)
    torch.testing.assert_close(batch, again, atol=0, rtol=0)
    other = _gen(pixel_engine, weights=w, seed=[6, 98, 8], num_images=3)
    assert not torch.allclose(batch, other)


def test_four_threads_match_sequential(pixel_engine):
    _check_threads_match_sequential(pixel_engine)


def test_four_threads_match_sequential_onnxruntime(pixel_models, tmp_path):
    pytest.importorskip("onnxruntime")
    base, experts = pixel_models
    _check_threads_match_sequential(msdda.Engine.from_pretrained(base, experts, backend="onnxruntime",
                                                                 cache_dir=tmp_path))


def _check_threads_match_sequential(pixel_engine):
    jobs = [dict(weights={"a": w, "b": 1 - w}, seed=[s], strategy=st)
            for w, s, st in ((0.1, 1, "msdda"), (0.5, 2, "mpa"), (0.7, 3, "msdda"), (0.9, 4, "soup"))]
    sequential = [_gen(pixel_engine, **j) for j in jobs]
    results = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    errors = []

    def work(i):
        barrier.wait()
        try:
            results[i] = _gen(pixel_engine, **jobs[i])
        except BaseException as exc:  # surfaced below, with its message
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, repr(errors[0])
    for got, want in zip(results, sequential):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_injected_noise_is_used(pixel_engine):
    x_T = torch.zeros(1, 1, 8, 8)
    z0 = torch.zeros(STEPS, 1, 1, 8, 8)
    a = _gen(pixel_engine, weights={"a": 0.5, "b": 0.5}, latents=x_T, noise=z0)
    b = _gen(pixel_engine, weights={"a": 0.5, "b": 0.5}, latents=x_T, noise=z0 + 1)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, _gen(pixel_engine, weights={"a": 0.5, "b": 0.5}, latents=x_T, noise=z0))


def test_images_are_pil(pixel_engine):
    out = pixel_engine.generate(class_labels=2, weights={"a": 0.5, "b": 0.5}, num_images=2, steps=2,
                                guidance_scale=2.0)
    assert len(out.images) == 2 and out.images[0].size == (8, 8)


def test_text_pipeline_strategies(sd_models):
    base, experts = sd_models
    eng = msdda.Engine.from_pretrained(base, experts)
    for strategy in ("msdda", "mpa", "soup", "base", "expert:b"):
        out = eng.generate(prompt="a cat", weights={"a": 0.5, "b": 0.5}, num_images=2, steps=3, strategy=strategy)
        assert len(out.images) == 2 and out.images[0].size == (32, 32)
        assert torch.isfinite(out.latents).all()


def test_text_pipeline_equal_variances_msdda_is_mpa(sd_models):
    """DDIM: every expert has the same (schedule) variance, so the exact rule reduces to averaging."""
    base, experts = sd_models
    eng = msdda.Engine.from_pretrained(base, experts)
    kw = dict(prompt="a dog", weights={"a": 0.3, "b": 0.7}, steps=3, output_type="latent", num_images=2)
    torch.testing.assert_close(eng.generate(strategy="msdda", **kw).latents, eng.generate(strategy="mpa", **kw).latents,
                               atol=2e-5, rtol=1e-5)


def test_onnxruntime_backend_matches_torch(pixel_models, tmp_path):
    pytest.importorskip("onnxruntime")
    base, experts = pixel_models
    t = msdda.Engine.from_pretrained(base, experts, backend="torch")
    o = msdda.Engine.from_pretrained(base, experts, backend="onnxruntime", cache_dir=tmp_path)
    for strategy in ("msdda", "mpa", "soup", "base", "expert:a"):
        a = _gen(t, weights={"a": 0.6, "b": 0.4}, strategy=strategy, num_images=2)
        b = _gen(o, weights={"a": 0.6, "b": 0.4}, strategy=strategy, num_images=2)
        torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3)  # ORT vs torch: float32 kernels differ


def test_onnxruntime_backend_text_pipeline(sd_models, tmp_path):
    pytest.importorskip("onnxruntime")
    base, experts = sd_models
    t = msdda.Engine.from_pretrained(base, experts, backend="torch")
    o = msdda.Engine.from_pretrained(base, experts, backend="onnxruntime", cache_dir=tmp_path)
    kw = dict(prompt="a cat", weights={"a": 0.5, "b": 0.5}, steps=3, output_type="latent", num_images=2)
    torch.testing.assert_close(o.generate(**kw).latents, t.generate(**kw).latents, atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, message", [
    (dict(weights={"zzz": 1.0}), "unknown expert 'zzz'"),
    (dict(weights={"a": float("nan"), "b": 0.5}), "not a finite number"),
    (dict(weights={"a": -0.5, "b": 1.5}), "negative"),
    (dict(weights={"a": 0.5, "b": 0.6}), "sum to 1.1"),
    (dict(weights={"a": 0.0, "b": 0.0}), "all zero"),
    (dict(strategy="nope"), "unknown strategy"),
    (dict(strategy="expert:zzz"), "unknown expert 'zzz'"),
    (dict(class_labels=10), "class labels must lie in 0..9"),
    (dict(seed=[1, 2], num_images=3), "seed has 2 entries for 3 images"),
    (dict(latents=torch.zeros(1, 3, 8, 8)), "latents must have shape"),
    (dict(noise=torch.zeros(1, 1, 1, 8, 8)), "noise must have shape"),
    (dict(latents=torch.full((1, 1, 8, 8), float("nan"))), "NaN"),
    (dict(prompt="hi"), "not text-conditioned"),
])
def test_bad_generate_input_is_one_line_valueerror(pixel_engine, kwargs, message):
    kw = dict(weights={"a": 0.5, "b": 0.5})
    kw.update(kwargs)
    with pytest.raises(ValueError, match=message) as info:
        _gen(pixel_engine, **kw)
    assert "\n" not in str(info.value)


def test_infeasible_composition_is_refused(pixel_models):
    """Extrapolating past the experts (sum c_k > 1) gives the base a negative exponent; P <= 0 must raise."""
    base, experts = pixel_models
    eng = msdda.Engine.from_pretrained(base, experts)
    with pytest.raises(ValueError, match="P <= 0|precision") as info:
        _gen(eng, weights={"a": 0.5, "b": 0.5}, expert_betas={"a": 40.0, "b": 40.0})
    assert "\n" not in str(info.value)


def test_load_errors(pixel_models, tmp_path):
    base, experts = pixel_models
    with pytest.raises(LoadError, match="not found"):
        msdda.Engine.from_pretrained(tmp_path / "missing")
    other = make_tiny_unet2d(tmp_path / "other", learned_variance=False, num_class_embeds=11)
    with pytest.raises(LoadError, match="output channels"):
        msdda.Engine.from_pretrained(base, {"x": other})
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((base / "unet" / "config.json").read_text())
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(LoadError, match="refusing to unpickle"):
        msdda.Engine.from_pretrained(base, {"x": pickled})
    corrupt = perturbed_copy(base, tmp_path / "corrupt", seed=9)
    weights = corrupt / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(LoadError, match="cannot load UNet weights"):
        msdda.Engine.from_pretrained(base, {"x": corrupt})
    import json
    ddim = tmp_path / "pred"
    perturbed_copy(base, ddim, seed=10)
    cfg = json.loads((ddim / "scheduler" / "scheduler_config.json").read_text())
    cfg["prediction_type"] = "v_prediction"
    (ddim / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="prediction type"):
        msdda.Engine.from_pretrained(base, {"x": ddim})


def test_lora_expert_merges_onto_base(pixel_models, tmp_path):
    """A LoRA adapter (diffusers key layout) is merged: W' = W + (alpha/r) B A."""
    from safetensors.torch import save_file
    from diffusers import UNet2DModel

    base, _ = pixel_models
    unet = UNet2DModel.from_pretrained(base / "unet")
    target = "down_blocks.0.resnets.0.conv1"
    weight = dict(unet.named_modules())[target].weight
    rank = 2
    a = torch.randn(rank, *weight.shape[1:])                  # a Conv2d's LoRA: down [r, in, kh, kw], up [out, r, 1, 1]
    b = torch.randn(weight.shape[0], rank, 1, 1) * 0.01
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    save_file({f"unet.{target}.lora.down.weight": a, f"unet.{target}.lora.up.weight": b},
              lora_dir / "pytorch_lora_weights.safetensors")
    eng = msdda.Engine.from_pretrained(base, {"l": lora_dir})
    merged = dict(eng.backend._nets[1].named_modules())[target].weight
    torch.testing.assert_close(merged, weight + (b.flatten(1) @ a.flatten(1)).reshape(weight.shape))
    assert np.isfinite(_gen(eng, weights={"l": 1.0}).numpy()).all()
