"""msdda.schedule against diffusers 0.42.1's own DDPMScheduler.step / DDIMScheduler.step.

Every step of each chain is checked. Our Gaussian (mean, var), from the precomputed float64 StepScalars, with the
*same* standard-normal z diffusers used, gives x_prev = mean + sqrt(var) * z. Each element is held to an a-priori
rounding bound (tests/tolerance.py ``rounding_bound``: eps x magnitude x operation count), built from

  magnitude = |mx x_t| + |m0| (|px x_t| + |po out|) + |mo out| + sqrt(var) |z| (1 + |log var|)

(the sum of the absolute values of the step's terms, in float64; the log term covers a variance that is exp of a
computed log-variance), against three references:
  1. diffusers' step run in float64 (the same scheduler object with its alphas_cumprod / one / final_alpha_cumprod
     swapped for our float64 table, fed float64 tensors: diffusers' exact algorithm, no float32 noise) vs. our
     float64 evaluation: both are float64 roundings of the same formula, within OPS_DIFFUSERS x eps(float64) x
     kappa x magnitude. kappa (``_cancellation``) is how much diffusers' subtractions 1 - abar_t, 1 - abar_prev,
     1 - abar_t/abar_prev and 1 - abar_prev - sigma^2 amplify the relative error of their operands
     (a / (1 - a) for 1 - a). Measured worst: 0.11 of the bound.
  2. the same float64 replay vs. our *float32* evaluation (what a float32 runtime computes): our step from
     float64 scalars has no such cancellation, within OPS_OURS x eps(float32) x magnitude. Measured worst: 0.28.
  3. stock diffusers (float32 tables, float32 arithmetic) vs. our float64 evaluation: this is diffusers' *own*
     float32 error. Its table alphas_cumprod = cumprod(1 - betas) in float32 carries a relative error of up to
     2 (t + 1) u = (t + 1) eps after t + 1 roundings of 1 - beta and t products, and abar_t / abar_prev up to
     (t - t_prev + 1) eps; both are amplified by the cancellations above (it recomputes beta_t = 1 - abar_t/abar_prev
     in float32, which cancels catastrophically at small t). So the bound is eps(float32) x magnitude x
     (OPS_DIFFUSERS kappa + table terms), ``_stock_factor``. Measured worst: 0.02 of it (an a-priori worst case;
     checks 1 and 2 are the tight ones).
The measured worst ratios hold on eight CPU code paths (ATEN_CPU_CAPABILITY default/avx2/avx512, oneDNN AVX2 and
SSE4.1, MKL AVX2 and COMPATIBLE, NumPy without AVX2/AVX-512, 1-3 threads).

The chain follows stock diffusers' prev_sample, so every step sees identical inputs. Model outputs are random
(eps / v / x0 channels ~ N(0, 1); a learned_range channel ~ U[-1, 1]; a learned channel a positive variance).
DDPM's noise is replayed by monkeypatching diffusers' ``randn_tensor`` in scheduling_ddpm (it returns our z and
counts the draws: diffusers draws only when t > 0); DDIM takes ``variance_noise`` directly.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers import scheduling_ddpm

from msdda.kernels import StepScalars, VarMode
from msdda.schedule import (
    SchedulerOptions,
    TrainSchedule,
    gaussian_step,
    inference_timesteps,
    make_schedule,
    precompute_step_scalars,
    previous_timesteps,
    schedule_from_diffusers_config,
    step_scalars,
)
from bench.zoo.gaussians import gaussian_kl, gaussian_log_prob
from tolerance import assert_within, rounding_bound

# Roundings on the longest dependency path of one step, counted in units of eps = 2u (so each count is twice the
# number of roundings: the slack covers the rounding of float64 scalars into float32 and libm's 1-ulp exp/log/pow).
# Ours: x0 = px x + po out (coefficient, product, sum), x0 m0 (coefficient, product), + mx x, + mo out, + std z:
# 8 roundings. Diffusers: alpha_prod_t[_prev] lookups, 1 - a, a_t / a_prev, 1 - that, ** 0.5 (pow), the
# coefficient products and quotients, then the same products and sums over the tensors: at most 24 roundings.
OPS_OURS = 8
OPS_DIFFUSERS = 24
SHAPE = (2, 3, 4, 4)
BETAS = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
}


def _magnitude(out: torch.Tensor, x_t: torch.Tensor, z: torch.Tensor, sc: StepScalars) -> torch.Tensor:
    """Sum of the absolute values of the step's terms per element, float64 (see the module docstring)."""
    C = x_t.shape[1]
    o, x = out[:, :C].double(), x_t.double()
    x0_terms = (sc.px * x).abs() + (sc.po * o).abs()
    mag = (sc.mx * x).abs() + abs(sc.m0) * x0_terms + (sc.mo * o).abs()
    var = torch.as_tensor(gaussian_step(out.double(), x, sc)[1], dtype=torch.float64)
    log_var = torch.where(var > 0, var.clamp_min(torch.finfo(torch.float64).tiny).log().abs(), 0.0)
    return mag + var.sqrt() * z.double().abs() * (1 + log_var)


def _abar_prev(sched, opts, kind: str, t_prev: int) -> float:
    if t_prev >= 0:
        return float(sched.alphas_cumprod[t_prev])
    return float(sched.alphas_cumprod[0]) if kind == "ddim" and not opts.set_alpha_to_one else 1.0


def _amplification(a: float) -> float:
    """Relative-error amplification of 1 - a: a / (1 - a) (0 when a == 1, where 1 - a is exactly 0)."""
    return a / (1 - a) if a < 1 else 0.0


def _cancellation(abar_t: float, abar_prev: float, sc: StepScalars, kind: str) -> float:
    """kappa of a step: the largest amplification of diffusers' subtractions (at least 1)."""
    kappa = max(1.0, _amplification(abar_t), _amplification(abar_prev), _amplification(abar_t / abar_prev))
    if kind == "ddim" and sc.var_mode == VarMode.FIXED and math.isfinite(sc.log_var_fixed):
        rest = 1 - abar_prev - math.exp(sc.log_var_fixed)          # 1 - abar_prev - sigma^2
        if rest > 0:
            kappa = max(kappa, (1 - abar_prev) / rest)
    return kappa


def _stock_factor(t: int, t_prev: int, abar_t: float, abar_prev: float, kappa: float) -> float:
    """OPS_DIFFUSERS kappa + the float32 table's error terms (module docstring, check 3), in units of eps."""
    table = 2 * (t + 1) * max(1.0, _amplification(abar_t), _amplification(abar_prev))
    return OPS_DIFFUSERS * kappa + table + 2 * (t - t_prev + 1) * _amplification(abar_t / abar_prev)


def _float64_replica(ref, sched):
    """The same diffusers scheduler object, its tables swapped for our float64 ones: diffusers' exact algorithm
    in float64 arithmetic (fed float64 tensors)."""
    ref.alphas_cumprod = torch.from_numpy(sched.alphas_cumprod.copy())
    ref.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(ref, "final_alpha_cumprod"):
        ref.final_alpha_cumprod = torch.tensor(1.0 if ref.config.set_alpha_to_one else sched.alphas_cumprod[0],
                                               dtype=torch.float64)
    return ref


def _run_chain(kind, monkeypatch, *, steps, config, eta=0.0, use_clipped=False, seed=0):
    """Run a diffusers chain and compare every step."""
    cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
    ref = cls(**config)
    ref.set_timesteps(steps)
    sched, opts = schedule_from_diffusers_config(json.loads(ref.to_json_string()))  # as scheduler_config.json
    assert opts.kind == kind
    ts = inference_timesteps((sched, opts), steps)
    assert ts == ref.timesteps.tolist()
    scalars = precompute_step_scalars(
        sched, ts, kind=kind, eta=eta, use_clipped_model_output=use_clipped, **opts.step_kwargs()
    )
    assert len(scalars) == len(ts) and all(isinstance(s, StepScalars) for s in scalars)
    ref64 = cls(**config)
    ref64.set_timesteps(steps)
    _float64_replica(ref64, sched)

    g = torch.Generator().manual_seed(seed)
    learned = kind == "ddpm" and opts.variance_type in ("learned", "learned_range")
    z_box, draws = [None], []

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == SHAPE and dtype == z_box[0].dtype
        draws.append(1)
        return z_box[0]

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", fake_randn)
    x = torch.randn(SHAPE, generator=g)
    prev_ts = previous_timesteps(sched, ts, kind=kind)
    for i, (t, t_prev, sc) in enumerate(zip(ts, prev_ts, scalars)):
        out = torch.randn(SHAPE, generator=g)
        if learned:
            if opts.variance_type == "learned_range":
                v = torch.rand(SHAPE, generator=g) * 2 - 1
            else:
                v = torch.rand(SHAPE, generator=g) * 0.05 + 1e-4
            out = torch.cat([out, v], dim=1)
        z = torch.randn(SHAPE, generator=g)
        preds = []
        for r, dt in ((ref, torch.float32), (ref64, torch.float64)):
            z_box[0] = z.to(dt)
            o, xx = out.to(dt), x.to(dt)
            if kind == "ddpm":
                preds.append(r.step(o, t, xx).prev_sample)
            else:
                preds.append(r.step(o, t, xx, eta=eta, use_clipped_model_output=use_clipped,
                                    variance_noise=z_box[0]).prev_sample)
        prev32, prev64 = preds
        assert prev64.dtype == torch.float64

        mean64, var64, _ = gaussian_step(out.double(), x.double(), sc)
        mean32, var32, _ = gaussian_step(out, x, sc)
        assert mean32.dtype == torch.float32 and var32.dtype == torch.float32
        ours64 = mean64 + var64.sqrt() * z.double()
        ours32 = mean32 + var32.sqrt() * z
        what = f"{kind} step {i} (t={t}, {sc.var_mode!r})"
        magnitude = _magnitude(out, x, z, sc)
        abar_t, abar_prev = float(sched.alphas_cumprod[t]), _abar_prev(sched, opts, kind, t_prev)
        kappa = _cancellation(abar_t, abar_prev, sc, kind)
        assert_within(ours64, prev64, rounding_bound(kappa * magnitude, OPS_DIFFUSERS, torch.float64),
                      f"{what}: ours float64 vs diffusers float64")
        assert_within(ours32, prev64, rounding_bound(magnitude, OPS_OURS, torch.float32),
                      f"{what}: ours float32 vs diffusers float64")
        stock = _stock_factor(t, t_prev, abar_t, abar_prev, kappa)
        assert_within(ours64, prev32, rounding_bound(stock * magnitude, 1, torch.float32),
                      f"{what}: ours float64 vs stock diffusers float32")
        x = prev32
    if kind == "ddpm":
        assert len(draws) == 2 * sum(1 for t in ts if t > 0)  # diffusers adds no noise at t == 0


# ------------------------------------------------------------------------------------------------------------
# Step-by-step agreement with diffusers
# ------------------------------------------------------------------------------------------------------------

PREDS = ["epsilon", "v_prediction", "sample"]


@pytest.mark.parametrize("steps", [50, 1000])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned", "learned_range"])
def test_ddpm_matches_diffusers(monkeypatch, variance_type, pred, clip, steps):
    config = dict(BETAS["linear"], variance_type=variance_type, prediction_type=pred, clip_sample=clip)
    _run_chain("ddpm", monkeypatch, steps=steps, config=config, seed=steps + 7 * len(variance_type))


@pytest.mark.parametrize("steps", [50, 1000])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_diffusers(monkeypatch, eta, pred, clip, steps):
    config = dict(BETAS["linear"], prediction_type=pred, clip_sample=clip)
    _run_chain("ddim", monkeypatch, steps=steps, config=config, eta=eta, seed=steps + int(10 * eta))


@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_use_clipped_model_output_matches_diffusers(monkeypatch, eta, pred):
    """GLIDE's re-derivation of eps from the clipped x0 (diffusers' use_clipped_model_output=True)."""
    config = dict(BETAS["linear"], prediction_type=pred, clip_sample=True, clip_sample_range=0.5)
    _run_chain("ddim", monkeypatch, steps=50, config=config, eta=eta, use_clipped=True)


@pytest.mark.parametrize(
    "kind,betas,extra",
    [
        ("ddpm", "scaled_linear", dict(timestep_spacing="leading", steps_offset=1)),
        ("ddpm", "squaredcos_cap_v2", dict(timestep_spacing="trailing")),
        ("ddpm", "linear", dict(timestep_spacing="linspace", variance_type="learned_range")),
        ("ddpm", "linear", dict(variance_type="fixed_small_log")),
        ("ddpm", "scaled_linear", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                      timestep_spacing="trailing")),
        ("ddim", "scaled_linear", dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)),
        ("ddim", "squaredcos_cap_v2", dict(timestep_spacing="trailing", clip_sample=True)),
        ("ddim", "linear", dict(timestep_spacing="linspace")),
        ("ddim", "scaled_linear", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                      timestep_spacing="trailing")),
    ],
)
@pytest.mark.parametrize("steps", [7, 50])
def test_other_schedules_and_spacings_match_diffusers(monkeypatch, kind, betas, extra, steps):
    config = dict(BETAS[betas], clip_sample=False)
    config.update(extra)
    _run_chain(kind, monkeypatch, steps=steps, config=config, eta=0.5)


def test_ddpm_custom_timesteps_match_diffusers(monkeypatch):
    ref = DDPMScheduler(clip_sample=False, variance_type="fixed_large")
    custom = [999, 700, 512, 300, 101, 40, 3]
    ref.set_timesteps(timesteps=custom)
    sched = make_schedule()
    prev = previous_timesteps(sched, custom, kind="ddpm")
    assert prev == [int(ref.previous_timestep(t)) for t in custom] == [700, 512, 300, 101, 40, 3, -1]
    scalars = precompute_step_scalars(sched, custom, kind="ddpm", variance_type="fixed_large")
    g = torch.Generator().manual_seed(3)
    ref64 = DDPMScheduler(clip_sample=False, variance_type="fixed_large")
    ref64.set_timesteps(timesteps=custom)
    _float64_replica(ref64, sched)
    z_box = [None]
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: z_box[0])
    x = torch.randn(SHAPE, generator=g)
    opts = SchedulerOptions()
    for t, t_prev, sc in zip(custom, prev, scalars):
        out, z = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        z_box[0] = z
        prev_sample = ref.step(out, t, x).prev_sample
        z_box[0] = z.double()
        prev64 = ref64.step(out.double(), t, x.double()).prev_sample
        mean, var, _ = gaussian_step(out.double(), x.double(), sc)
        ours = mean + var.sqrt() * z.double()
        magnitude = _magnitude(out, x, z, sc)
        abar_t, abar_prev = float(sched.alphas_cumprod[t]), _abar_prev(sched, opts, "ddpm", t_prev)
        kappa = _cancellation(abar_t, abar_prev, sc, "ddpm")
        assert_within(ours, prev64, rounding_bound(kappa * magnitude, OPS_DIFFUSERS, torch.float64),
                      f"custom t={t}: ours float64 vs diffusers float64")
        stock = _stock_factor(t, t_prev, abar_t, abar_prev, kappa)
        assert_within(ours, prev_sample, rounding_bound(stock * magnitude, 1, torch.float32),
                      f"custom t={t}: ours float64 vs stock diffusers float32")
        x = prev_sample
    # the last step (t=3 -> "before the chain") still adds noise in diffusers (t > 0): fixed_large's beta = 1-abar_3
    assert scalars[-1].var_mode == VarMode.FIXED and math.isfinite(scalars[-1].log_var_fixed)


def test_fixed_large_log_is_nan_in_diffusers_and_fixed_large_here(monkeypatch):
    """Quirk: DDPMScheduler.step with variance_type='fixed_large_log' takes sqrt(log(beta_t)) -> NaN.
    We give it the intended variance beta_t (same as fixed_large)."""
    ref = DDPMScheduler(variance_type="fixed_large_log")
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    assert torch.isnan(ref.step(out, 500, x).prev_sample).all()
    s = make_schedule()
    assert step_scalars(s, 500, 499, variance_type="fixed_large_log") == step_scalars(
        s, 500, 499, variance_type="fixed_large"
    )


# ------------------------------------------------------------------------------------------------------------
# Schedules, timesteps, configs
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("betas", list(BETAS))
def test_betas_equal_diffusers(betas, rescale):
    for cls in (DDPMScheduler, DDIMScheduler):
        ref = cls(**BETAS[betas], rescale_betas_zero_snr=rescale)
        s = make_schedule(1000, **BETAS[betas], rescale_betas_zero_snr=rescale)
        assert s.betas.dtype == np.float64 and s.alphas_cumprod.dtype == np.float64
        np.testing.assert_array_equal(s.betas, ref.betas.double().numpy())  # bit-equal
        # diffusers' float32 cumprod(1 - betas): t + 1 roundings of 1 - beta and t products, so abar_t errs by at
        # most 2 (t + 1) u = (t + 1) eps relative to our float64 table (module docstring, check 3)
        theirs = torch.from_numpy(ref.alphas_cumprod.double().numpy())
        rtol = rounding_bound(torch.arange(1, len(theirs) + 1, dtype=torch.float64), 1, torch.float32)
        assert_within(torch.tensor(s.alphas_cumprod), theirs, rtol * theirs.abs(), f"{betas} alphas_cumprod")
    np.testing.assert_array_equal(s.alphas_cumprod, np.cumprod(1 - s.betas))
    np.testing.assert_array_equal(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    assert s.alphas_cumprod_prev[0] == 1.0
    with pytest.raises(ValueError):
        s.betas[0] = 0.5  # read-only


def test_schedule_hashable_cached_and_precompute_cached():
    a, b = make_schedule(), make_schedule(1000, "linear", 1e-4, 0.02)
    assert a is b and hash(a) == hash(b) and a == b
    c = make_schedule(1000, "scaled_linear", 0.00085, 0.012)
    assert c != a
    tb = make_schedule(trained_betas=a.betas)
    np.testing.assert_array_equal(tb.betas, a.betas)
    assert isinstance(hash(tb), int) and tb != a
    ts = inference_timesteps(a, 50)
    s1 = precompute_step_scalars(a, ts, kind="ddim", eta=0.0)
    s2 = precompute_step_scalars(a, tuple(ts), kind="ddim", eta=0)
    assert s1 is s2
    assert precompute_step_scalars(a, ts, kind="ddim", eta=1.0) is not s1


@pytest.mark.parametrize("T", [1000, 37])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
def test_inference_and_previous_timesteps_match_diffusers(T, spacing, offset):
    for k in sorted({1, 2, 3, 7, 10, 25, 50, 333, T - 1, T} & set(range(1, T + 1))):
        cfg = dict(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
        ddpm, ddim = DDPMScheduler(**cfg), DDIMScheduler(**cfg)
        ddpm.set_timesteps(k)
        ddim.set_timesteps(k)
        expected = ddpm.timesteps.tolist()
        assert expected == ddim.timesteps.tolist()
        if expected[0] >= T:  # leading, k = T, steps_offset = 1: diffusers would index out of range at step time
            with pytest.raises(ValueError):
                inference_timesteps(T, k, spacing, offset)
            continue
        ts = inference_timesteps(T, k, spacing, offset)
        assert ts == expected and all(type(t) is int for t in ts)
        assert inference_timesteps(dict(ddpm.config), k) == expected  # spacing/offset read from the config
        assert previous_timesteps(T, ts, kind="ddpm") == [int(ddpm.previous_timestep(t)) for t in ts]
        ddim_prev = [t - T // ddim.num_inference_steps for t in ts]
        assert previous_timesteps(T, ts, kind="ddim") == [max(p, -1) for p in ddim_prev]


def test_config_round_trip_and_defaults():
    ref = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, variance_type="learned_range",
        prediction_type="v_prediction", clip_sample=True, clip_sample_range=2.0, timestep_spacing="trailing",
        steps_offset=1,
    )
    sched, opts = schedule_from_diffusers_config(json.loads(ref.to_json_string()))
    assert isinstance(sched, TrainSchedule) and sched is make_schedule(1000, "scaled_linear", 0.00085, 0.012)
    assert opts == SchedulerOptions("v_prediction", "learned_range", True, 2.0, "trailing", 1, True, 1000, "ddpm")
    # Stable Diffusion 1.x's scheduler_config.json (a PNDM config): missing keys take DDIM/DDPM defaults
    sd = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
          "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
          "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
          "clip_sample": False}
    sched, opts = schedule_from_diffusers_config(sd)
    ddim = DDIMScheduler.from_config(sd)
    np.testing.assert_array_equal(sched.betas, ddim.betas.double().numpy())
    assert (opts.prediction_type, opts.clip_sample, opts.set_alpha_to_one, opts.steps_offset, opts.kind) == (
        ddim.config.prediction_type, False, False, 1, None)
    assert schedule_from_diffusers_config({})[1] == SchedulerOptions()  # diffusers' defaults (clip_sample=True)


@pytest.mark.parametrize(
    "bad",
    [
        {"thresholding": True},
        {"prediction_type": "flow"},
        {"variance_type": "huge"},
        {"timestep_spacing": "karras"},
        {"beta_schedule": "sigmoid"},
        {"clip_sample": "yes"},
        {"clip_sample_range": -1.0},
        {"steps_offset": -1},
        {"num_train_timesteps": 0},
        {"beta_start": 2.0},
        {"trained_betas": [0.1, 0.2], "num_train_timesteps": 3},
    ],
)
def test_bad_config_raises_one_line_value_error(bad):
    with pytest.raises(ValueError) as e:
        schedule_from_diffusers_config(bad)
    msg = str(e.value)
    assert "\n" not in msg and msg
    assert next(iter(bad)) in msg
    schedule_from_diffusers_config({"thresholding": False, "dynamic_thresholding_ratio": 0.9})  # fine


def test_bad_arguments_raise():
    s = make_schedule()
    with pytest.raises(ValueError, match="prediction_type"):
        step_scalars(s, 10, 9, prediction_type="x0")
    with pytest.raises(ValueError, match="variance_type"):
        step_scalars(s, 10, 9, variance_type="small")
    with pytest.raises(ValueError, match="kind"):
        step_scalars(s, 10, 9, kind="euler")
    with pytest.raises(ValueError, match="outside"):
        step_scalars(s, 1000, 999)
    with pytest.raises(ValueError, match="t_prev"):
        step_scalars(s, 10, 10)
    with pytest.raises(ValueError, match="eta"):
        step_scalars(s, 500, 480, kind="ddim", eta=-0.1)
    with pytest.raises(ValueError, match="eta"):
        step_scalars(s, 500, 480, kind="ddim", eta=3.0)  # 1 - abar_prev - sigma^2 < 0 (diffusers: NaN)
    with pytest.raises(ValueError, match="larger"):
        inference_timesteps(s, 1001)
    with pytest.raises(ValueError, match="spacing"):
        inference_timesteps(s, 10, "cosine")
    with pytest.raises(ValueError, match="descending"):
        previous_timesteps(s, [10, 20], kind="ddpm")
    zsnr = make_schedule(1000, "scaled_linear", 0.00085, 0.012, rescale_betas_zero_snr=True)
    assert zsnr.alphas_cumprod[-1] == 0.0
    with pytest.raises(ValueError, match="non-finite"):
        step_scalars(zsnr, 999, 979, kind="ddim")  # epsilon prediction is undefined at zero SNR
    step_scalars(zsnr, 999, 979, kind="ddim", prediction_type="v_prediction")  # fine
    sc = step_scalars(s, 500, 499, variance_type="learned_range")
    with pytest.raises(ValueError, match="2C"):
        gaussian_step(torch.zeros(SHAPE), torch.zeros(SHAPE), sc)


# ------------------------------------------------------------------------------------------------------------
# Torch helpers
# ------------------------------------------------------------------------------------------------------------


def test_zero_variance_cases():
    s = make_schedule()
    assert step_scalars(s, 0, -1, variance_type="learned_range").log_var_fixed == -math.inf  # DDPM t=0
    assert step_scalars(s, 0, -1, variance_type="learned_range").var_mode == VarMode.FIXED
    ddim0 = step_scalars(s, 500, 480, kind="ddim", eta=0.0)
    assert ddim0.var_mode == VarMode.FIXED and ddim0.log_var_fixed == -math.inf
    mean, var, _ = gaussian_step(torch.randn(SHAPE), torch.randn(SHAPE), ddim0)
    assert var.dim() == 0 and var.item() == 0.0 and mean.shape == SHAPE
    # a learned-variance network under DDIM: the variance channel is ignored
    out6 = torch.randn(2, 6, 4, 4)
    m6, _, _ = gaussian_step(out6, torch.ones(SHAPE), ddim0)
    m3, _, _ = gaussian_step(out6[:, :3], torch.ones(SHAPE), ddim0)
    assert torch.equal(m6, m3)


def test_gaussian_step_differentiable():
    s = make_schedule()
    g = torch.Generator().manual_seed(1)
    shape = (1, 2, 2, 2)
    for sc in (
        step_scalars(s, 600, 580, variance_type="learned_range", clip_sample=True, clip_sample_range=50.0),
        step_scalars(s, 600, 580, kind="ddim", eta=0.7, prediction_type="v_prediction"),
        step_scalars(s, 600, 580, variance_type="learned", prediction_type="sample"),
    ):
        C = 4 if sc.var_mode != VarMode.FIXED else 2
        out = torch.randn((1, C, 2, 2), generator=g, dtype=torch.float64)
        if sc.var_mode == VarMode.LEARNED_RANGE:
            out[:, 2:] = out[:, 2:].tanh()
        if sc.var_mode == VarMode.LEARNED:
            out[:, 2:] = out[:, 2:].abs() + 0.1
        out.requires_grad_(True)
        x_t = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
        x_prev = torch.randn(shape, generator=g, dtype=torch.float64)
        mean_b = torch.randn(shape, generator=g, dtype=torch.float64)

        def f(o, x):
            mean, var, _ = gaussian_step(o, x, sc)
            return gaussian_log_prob(x_prev, mean, var).sum() + gaussian_kl(mean, var, mean_b, 0.5).sum()

        # gradcheck's own float64 tolerances (step 1e-6, atol 1e-5, rtol 1e-3) hold here: central differences
        # err by h^2 |f'''| ~ 1e-12 plus rounding u |f| / h ~ 1e-10 |f| (|f| < 100), far below them, while a
        # wrong derivative is off by O(1)
        assert torch.autograd.gradcheck(f, (out, x_t))


def test_log_prob_and_kl_match_torch_distributions():
    """float64 formulas vs torch.distributions' float64 formulas: each side rounds at most ~10 times on terms
    whose absolute values sum to ``magnitude`` (the scale passes through sqrt and back: 2 more), so they agree
    within rounding_bound(magnitude, 12, float64) elementwise."""
    g = torch.Generator().manual_seed(2)
    x, ma, mb = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(3))
    va, vb = (torch.rand(SHAPE, generator=g, dtype=torch.float64) + 0.05 for _ in range(2))
    Na, Nb = torch.distributions.Normal(ma, va.sqrt()), torch.distributions.Normal(mb, vb.sqrt())

    def log_prob_magnitude(var):
        var = torch.as_tensor(var, dtype=torch.float64)
        return ((x - ma) ** 2 / var + var.log().abs() + math.log(2 * math.pi)) / 2

    kl_magnitude = (va.log().abs() + vb.log().abs() + (va + (ma - mb) ** 2) / vb + 1) / 2
    assert_within(gaussian_log_prob(x, ma, va), Na.log_prob(x),
                  rounding_bound(log_prob_magnitude(va), 12, torch.float64), "log_prob")
    assert_within(gaussian_kl(ma, va, mb, vb), torch.distributions.kl_divergence(Na, Nb),
                  rounding_bound(kl_magnitude, 12, torch.float64), "kl")
    # KL(a || a) is exactly 0: log va - log va = 0, (va + 0) / va = 1, 1 - 1 = 0, all exact in IEEE arithmetic
    assert torch.equal(gaussian_kl(ma, va, ma, va), torch.zeros(SHAPE, dtype=torch.float64))
    assert_within(gaussian_log_prob(x, ma, 0.3), torch.distributions.Normal(ma, 0.3**0.5).log_prob(x),
                  rounding_bound(log_prob_magnitude(0.3), 12, torch.float64), "log_prob, scalar variance")
