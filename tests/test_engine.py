"""Runtime: Engine.generate over tiny diffusers models, every strategy, both backends, concurrency."""
from __future__ import annotations


import numpy as np
import pytest
import torch

import msdda
from msdda.loading import LoadError
from tiny_models import make_tiny_unet2d, perturbed_copy
from threads import run_at_once
from tolerance import assert_differ, assert_within, generate_float64, rounding_bound, twin_bound

STEPS = 4


@pytest.fixture(scope="session")
def pixel_models(learned_variance_models):
    """Class-conditional learned-variance base (DDPM) and two perturbed experts."""
    return learned_variance_models


@pytest.fixture(scope="session")
def fixed_var_models(tmp_path_factory):
    """Unconditional fixed-variance base and experts: equal variances, so msdda == mpa (without x0 clipping,
    which would make the step non-affine in the network output)."""
    root = tmp_path_factory.mktemp("fixed")
    base = make_tiny_unet2d(root / "base", learned_variance=False, clip_sample=False)
    return base, {"a": perturbed_copy(base, root / "a", seed=3, scale=0.3),
                  "b": perturbed_copy(base, root / "b", seed=4, scale=0.3)}


@pytest.fixture(scope="session")
def sd_models(tiny_sd_models):
    return tiny_sd_models


@pytest.fixture(scope="session")
def pixel_engine(pixel_models):
    base, experts = pixel_models
    return msdda.Engine.from_pretrained(base, experts)


@pytest.fixture(scope="session")
def pixel_engine64(pixel_models):
    """The float64 twin of pixel_engine: the same networks in float64 (tolerance.generate_float64)."""
    base, experts = pixel_models
    return msdda.Engine.from_pretrained(base, experts, dtype=torch.float64)


def _gen(engine, **kw):
    """x_0 latents; a float64 Engine generates as the float64 twin (tolerance.generate_float64)."""
    kw.setdefault("steps", STEPS)
    kw.setdefault("output_type", "latent")
    kw.setdefault("class_labels", 3)
    kw.setdefault("guidance_scale", 2.0)
    if engine.dtype == torch.float64:
        return generate_float64(engine, **kw).latents
    return engine.generate(**kw).latents


def _same(got, want):
    """Bitwise equality, for comparisons that are exact by construction (the caller says why)."""
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("strategy", ["msdda", "mpa", "soup", "base", "expert:a", "expert:b"])
def test_every_strategy_runs_and_is_finite(pixel_engine, strategy):
    lat = _gen(pixel_engine, weights={"a": 0.6, "b": 0.4}, num_images=2, strategy=strategy)
    assert lat.shape == (2, 1, 8, 8) and torch.isfinite(lat).all()


def test_strategies_differ_where_they_should(pixel_engine, pixel_engine64):
    """Each pair differs by far more than the float32 error of the reference strategy (its float64 twin)."""
    w = {"a": 0.5, "b": 0.5}
    out = {s: _gen(pixel_engine, weights=w, strategy=s) for s in ("msdda", "mpa", "base", "expert:a")}
    tol = {s: twin_bound(out[s], _gen(pixel_engine64, weights=w, strategy=s)) for s in ("mpa", "base")}
    assert_differ(out["msdda"], out["base"], tol["base"], "msdda vs base")
    assert_differ(out["expert:a"], out["base"], tol["base"], "expert:a vs base")
    # learned, distinct variances: the exact product differs from output averaging
    assert_differ(out["msdda"], out["mpa"], tol["mpa"], "msdda vs mpa")


def test_single_expert_weight_equals_that_expert(pixel_engine):
    """w = (1, 0): the product of one Gaussian is that Gaussian; msdda, mpa, soup and expert:a coincide.

    Exactly, by construction: a zero weight drops b from the plan, so msdda runs expert a alone with c = 1.0,
    the very step expert:a runs; mpa's mix multiplies by 1.0 and sums one term (both exact); soup's parameters
    are 1.0 * theta_a (exact), evaluated by the same module code on the same inputs."""
    a = _gen(pixel_engine, weights={"a": 1.0}, strategy="expert:a")
    for s in ("msdda", "mpa", "soup"):
        _same(_gen(pixel_engine, weights={"a": 1.0, "b": 0.0}, strategy=s), a)


def test_msdda_equals_mpa_with_equal_variances(fixed_var_models):
    """Equal in exact arithmetic; in float32 the two step formulas round differently and the UNet carries the
    difference through the steps, so the bound is mpa's own float32 error (its float64 twin) x TWIN_MULTIPLE."""
    base, experts = fixed_var_models
    eng = msdda.Engine.from_pretrained(base, experts)
    eng64 = msdda.Engine.from_pretrained(base, experts, dtype=torch.float64)
    for w in ({"a": 0.3, "b": 0.7}, {"a": 0.8, "b": 0.2}):
        kw = dict(weights=w, class_labels=None, num_images=2)
        m = _gen(eng, strategy="msdda", **kw)
        p = _gen(eng, strategy="mpa", **kw)
        assert_within(m, p, twin_bound(p, _gen(eng64, strategy="mpa", **kw)), f"msdda vs mpa, {w}")


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

    def diffusers_loop(dtype):
        unet = UNet2DModel.from_pretrained(base / "unet").eval().to(dtype)
        sched = DDPMScheduler.from_pretrained(base / "scheduler")
        sched.set_timesteps(STEPS)
        if dtype == torch.float64:   # diffusers' algorithm in float64: its float32 tables recomputed in float64
            sched.alphas_cumprod = torch.cumprod(1.0 - sched.betas.double(), 0)
            sched.one = torch.tensor(1.0, dtype=torch.float64)
        x = x_T.to(dtype)
        with torch.no_grad():
            for i, t in enumerate(sched.timesteps):
                out = unet(x, t, class_labels=torch.tensor([1, 7])).sample
                # diffusers' DDPM step draws its own z; make it draw ours so both runs see the same noise
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(ddpm_mod, "randn_tensor", lambda *a, **k: noise[i].to(dtype))
                    x = sched.step(out, t, x).prev_sample
        return x

    # The bound is what diffusers' own float32 arithmetic of this loop produces (its float64 twin: the same
    # UNet and scheduler algorithm in float64) x TWIN_MULTIPLE; ours runs the same UNet in float32 and a step
    # from float64 scalars, so it errs no more than diffusers does.
    ref = diffusers_loop(torch.float32)
    assert_within(ours, ref, twin_bound(ref, diffusers_loop(torch.float64)), "strategy=base vs diffusers DDPM")


# A batch and a single call are the same math, but the CPU kernels block (and so sum) differently for another
# batch size: the bound is the batched call's float32 error (its float64 twin) x TWIN_MULTIPLE.
def test_per_sample_weights_match_separate_calls(pixel_engine, pixel_engine64):
    ws = [{"a": 0.9, "b": 0.1}, {"a": 0.2, "b": 0.8}, {"a": 0.5, "b": 0.5}]
    kw = dict(weights=ws, seed=[10, 11, 12], num_images=3)
    together = _gen(pixel_engine, **kw)
    tol = twin_bound(together, _gen(pixel_engine64, **kw))
    for i, w in enumerate(ws):
        alone = _gen(pixel_engine, weights=w, seed=[10 + i], num_images=1)
        assert_within(together[i:i + 1], alone, tol, f"sample {i} batched vs alone")


def test_per_sample_weights_with_soup_match_separate_calls(pixel_engine, pixel_engine64):
    ws = [{"a": 0.9, "b": 0.1}, {"a": 0.2, "b": 0.8}, {"a": 0.9, "b": 0.1}]
    kw = dict(weights=ws, seed=[3, 4, 5], num_images=3, strategy="soup", class_labels=[1, 2, 3])
    together = _gen(pixel_engine, **kw)
    tol = twin_bound(together, _gen(pixel_engine64, **kw))
    for i, w in enumerate(ws):
        alone = _gen(pixel_engine, weights=w, seed=[3 + i], num_images=1, strategy="soup", class_labels=[1 + i])
        assert_within(together[i:i + 1], alone, tol, f"soup sample {i} batched vs alone")


def test_same_seed_same_image_whatever_the_batch(pixel_engine, pixel_engine64):
    w = {"a": 0.4, "b": 0.6}
    batch = _gen(pixel_engine, weights=w, seed=[5, 99, 7], num_images=3)
    tol = twin_bound(batch, _gen(pixel_engine64, weights=w, seed=[5, 99, 7], num_images=3))
    single = _gen(pixel_engine, weights=w, seed=[99], num_images=1)
    assert_within(batch[1:2], single, tol, "seed 99 in a batch vs alone")
    again = _gen(pixel_engine, weights=w, seed=[5, 99, 7], num_images=3)
    _same(batch, again)                 # the same call again: the same operations on the same inputs
    other = _gen(pixel_engine, weights=w, seed=[6, 98, 8], num_images=3)
    assert_differ(batch, other, tol, "other seeds")


def test_four_threads_match_sequential(pixel_engine):
    _check_threads_match_sequential(pixel_engine)


@pytest.mark.slow
def test_four_threads_match_sequential_onnxruntime(pixel_models, tmp_path):
    pytest.importorskip("onnxruntime")
    base, experts = pixel_models
    _check_threads_match_sequential(msdda.Engine.from_pretrained(base, experts, backend="onnxruntime",
                                                                 cache_dir=tmp_path))


def _check_threads_match_sequential(pixel_engine):
    """Exact: each thread runs the same call as the sequential run, the same operations on the same inputs in the
    same process (same thread-pool size, so the same summation order): any difference is shared state."""
    jobs = [dict(weights={"a": w, "b": 1 - w}, seed=[s], strategy=st)
            for w, s, st in ((0.1, 1, "msdda"), (0.5, 2, "mpa"), (0.7, 3, "msdda"), (0.9, 4, "soup"))]
    sequential = [_gen(pixel_engine, **j) for j in jobs]
    results = run_at_once(lambda job: _gen(pixel_engine, **job), [(j,) for j in jobs])
    for got, want in zip(results, sequential):
        _same(got, want)


def test_injected_noise_is_used(pixel_engine, pixel_engine64):
    x_T = torch.zeros(1, 1, 8, 8)
    z0 = torch.zeros(STEPS, 1, 1, 8, 8)
    kw = dict(weights={"a": 0.5, "b": 0.5}, latents=x_T)
    a = _gen(pixel_engine, noise=z0, **kw)
    b = _gen(pixel_engine, noise=z0 + 1, **kw)
    assert_differ(a, b, twin_bound(a, _gen(pixel_engine64, noise=z0, **kw)), "noise z vs z + 1")
    _same(a, _gen(pixel_engine, noise=z0, **kw))       # the same call again: same operations, same inputs


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
    """DDIM: every expert has the same (schedule) variance, so the exact rule reduces to averaging. Equal in
    exact arithmetic; the bound is mpa's float32 error (its float64 twin, text encoder included) x TWIN_MULTIPLE."""
    base, experts = sd_models
    eng = msdda.Engine.from_pretrained(base, experts)
    eng64 = msdda.Engine.from_pretrained(base, experts, dtype=torch.float64)
    kw = dict(prompt="a dog", weights={"a": 0.3, "b": 0.7}, steps=3, output_type="latent", num_images=2)
    mpa = eng.generate(strategy="mpa", **kw).latents
    assert_within(eng.generate(strategy="msdda", **kw).latents, mpa,
                  twin_bound(mpa, generate_float64(eng64, strategy="mpa", **kw).latents), "text msdda vs mpa")


# ORT vs torch: the same networks, but ORT's float32 kernels (fused, blocked differently) round differently; the
# bound is torch's float32 error on the same generation (its float64 twin) x TWIN_MULTIPLE.
@pytest.mark.slow
def test_onnxruntime_backend_matches_torch(pixel_models, pixel_engine64, tmp_path):
    pytest.importorskip("onnxruntime")
    base, experts = pixel_models
    t = msdda.Engine.from_pretrained(base, experts, backend="torch")
    o = msdda.Engine.from_pretrained(base, experts, backend="onnxruntime", cache_dir=tmp_path)
    for strategy in ("msdda", "mpa", "soup", "base", "expert:a"):
        kw = dict(weights={"a": 0.6, "b": 0.4}, strategy=strategy, num_images=2)
        a = _gen(t, **kw)
        b = _gen(o, **kw)
        assert_within(b, a, twin_bound(a, _gen(pixel_engine64, **kw)), f"ORT vs torch, {strategy}")


@pytest.mark.slow
def test_onnxruntime_backend_text_pipeline(sd_models, tmp_path):
    pytest.importorskip("onnxruntime")
    base, experts = sd_models
    t = msdda.Engine.from_pretrained(base, experts, backend="torch")
    t64 = msdda.Engine.from_pretrained(base, experts, backend="torch", dtype=torch.float64)
    o = msdda.Engine.from_pretrained(base, experts, backend="onnxruntime", cache_dir=tmp_path)
    kw = dict(prompt="a cat", weights={"a": 0.5, "b": 0.5}, steps=3, output_type="latent", num_images=2)
    ref = t.generate(**kw).latents
    assert_within(o.generate(**kw).latents, ref, twin_bound(ref, generate_float64(t64, **kw).latents),
                  "ORT vs torch, text")


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
    # W + sum_r b_r a_r in float32: rank products, rank - 1 additions and one addition to W, each rounding once;
    # the elementwise bound is (rank + 1) eps (|W| + |b| |a|) (tolerance.rounding_bound)
    exact = weight.double() + (b.double().flatten(1) @ a.double().flatten(1)).reshape(weight.shape)
    magnitude = weight.double().abs() + (b.double().abs().flatten(1) @ a.double().abs().flatten(1)).reshape(weight.shape)
    assert_within(merged, exact, rounding_bound(magnitude, ops=rank + 1), "merged LoRA weight")
    # a missing or doubled delta is caught: the delta is far above the bound
    assert_differ(merged, weight, rounding_bound(magnitude, ops=rank + 1).max().item(), "merged vs base weight")
    assert np.isfinite(_gen(eng, weights={"l": 1.0}).numpy()).all()
