"""fused_expert_step: one launch from raw network outputs, against the float64 definition (and the torch path)."""
import dataclasses
import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msdda.kernels import (
    StepScalars,
    VarMode,
    compose_gaussians,
    fused_expert_step,
    fused_expert_step_ref,
    gaussian_from_output_ref,
    gaussian_step,
    launch,
    raise_if_bad,
)

from device import DEV, GPU  # noqa: E402,F401  (conftest's autouse fixture sets the default device)

# Allowance beyond "2x the same-precision torch expression", relative to max |x_prev| (see test_compose.FLOOR)
FLOOR = {torch.float32: 16 * torch.finfo(torch.float32).eps, torch.float16: torch.finfo(torch.float16).eps,
         torch.bfloat16: torch.finfo(torch.bfloat16).eps}


def use_backend(use_triton: bool):
    return mock.patch.object(launch, "use_triton", lambda device: use_triton)


@pytest.fixture(params=["triton", "torch"])
def impl(request):
    with use_backend(request.param == "triton"):
        yield request.param


def scalars(mode=VarMode.FIXED, clip=math.inf, log_var_fixed=math.log(0.04)):
    """DDPM-like epsilon-prediction scalars (values need not come from a real schedule for these tests)."""
    return StepScalars(px=1.25, po=-0.6, mx=0.55, m0=0.45, mo=0.0, clip=clip, var_mode=mode,
                       log_var_fixed=log_var_fixed, lv_min=-5.0, lv_max=-2.5)


def make_raw(K, B, C, S, mode, cfg, seed=0, dtype=torch.float32):
    """raw [K, (2,) B, C_out, *S] whose variance channel keeps every var_k in a range where P > 0 for the
    coefficients used below (LEARNED_RANGE: v in [-1, 1]; LEARNED: v in [0.05, 0.1])."""
    g = torch.Generator(DEV).manual_seed(seed)
    c_out = C if mode == VarMode.FIXED else 2 * C
    raw = torch.randn(K, *((2,) if cfg else ()), B, c_out, *S, generator=g)
    v = raw.narrow(raw.dim() - len(S) - 1, C, c_out - C)  # the variance channels (a view)
    if mode == VarMode.LEARNED_RANGE:
        v.copy_(2 * torch.rand(v.shape, generator=g) - 1)
    elif mode == VarMode.LEARNED:
        v.copy_(0.05 + 0.05 * torch.rand(v.shape, generator=g))
    return raw.to(dtype)


COEFF = torch.tensor([0.8, 0.5, -0.3])  # a base model with a negative exponent: sum c = 1


def naive(raw, x_t, coeff, sc, guidance_scale=None, noise=None):
    """The same step as plain torch in x_t's dtype: ``gaussian_step`` (the one definition), then the product of
    Gaussians as a user would write it (no zero-variance limit: the cases using this have none)."""
    dt = x_t.dtype
    mean, var, _ = gaussian_step(raw.to(dt), x_t, sc, guidance_scale=guidance_scale)
    K = mean.shape[0]
    c = (coeff.t() if coeff.dim() == 2 else coeff[:, None]).to(dt).reshape(K, -1, *([1] * (x_t.dim() - 1)))
    w = c / var
    P = w.sum(0)
    x = (w * mean).sum(0) / P
    return x if noise is None else x + noise.to(dt) / P.sqrt()


def close(x, ref, naive_x=None, dtype=torch.float32):
    """|x - ref| within max(2x the naive float32 expression's error, FLOOR) relative to max |ref| (at least 1:
    the outputs here are O(1), and the noise-free limit cases can be smaller)."""
    scale = max(ref.abs().max().item(), 1.0)
    e_naive = 0.0 if naive_x is None else (naive_x.double() - ref.double()).abs().max().item()
    return (x.double() - ref.double()).abs().max().item() <= max(2 * e_naive, FLOOR[dtype] * scale)


@pytest.mark.parametrize("mode", list(VarMode), ids=lambda m: m.name)
@pytest.mark.parametrize("cfg", [None, 4.0], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("clip", [math.inf, 1.0], ids=["noclip", "clip"])
def test_matches_reference(impl, mode, cfg, clip):
    K, B, C, S = 3, 2, 3, (5, 6)
    raw = make_raw(K, B, C, S, mode, cfg, seed=int(mode) * 4 + (cfg is not None) * 2 + (clip == 1.0))
    x_t = torch.randn(B, C, *S)
    coeff = COEFF if mode != VarMode.LEARNED_RANGE else torch.tensor([0.8, 0.5, -0.1])
    sc = scalars(mode, clip)
    noise = torch.randn(B, C, *S)
    for kw in (dict(noise=noise), dict(seed=17, offset=3)):
        x = fused_expert_step(raw, x_t, coeff, sc, guidance_scale=cfg, **kw)
        ref = fused_expert_step_ref(raw, x_t, coeff, sc, guidance_scale=cfg, **kw)
        assert x.shape == (B, C, *S) and x.dtype == x_t.dtype
        e_naive = naive(raw, x_t, coeff, sc, cfg, noise) if "noise" in kw else None
        assert close(x, ref, e_naive), (x - ref).abs().max()
    if clip == 1.0:  # the clamp is active somewhere, or the test would not test it
        out = raw[:, 0, :, :C] + cfg * (raw[:, 1, :, :C] - raw[:, 0, :, :C]) if cfg else raw[:, :, :C]
        assert (sc.px * x_t + sc.po * out).abs().max() > 1.0


def test_is_compose_of_gaussians(impl):
    """The fused step equals compose_gaussians on gaussian_from_output_ref's Gaussians, Philox noise included."""
    K, B, C, S = 3, 2, 2, (4, 4)
    raw = make_raw(K, B, C, S, VarMode.LEARNED, True, seed=5)
    x_t = torch.randn(B, C, *S)
    sc = scalars(VarMode.LEARNED)
    mean, var = gaussian_from_output_ref(raw, x_t, sc, guidance_scale=2.0)
    assert mean.shape == (K, B, C, *S) and var.shape == (K, B, C, *S) and mean.dtype == torch.float64
    seeds = torch.tensor([4, 9])
    x = fused_expert_step(raw, x_t, COEFF, sc, guidance_scale=2.0, seed=seeds, offset=2)
    y = compose_gaussians(mean.float(), var.float(), COEFF, seed=seeds, offset=2)
    assert close(x, y)


def test_gaussian_from_output_ref_formulas():
    K, B, C, S = 2, 1, 1, (3,)
    x_t = torch.tensor([[[0.5, -1.0, 2.0]]], dtype=torch.float64)
    raw = torch.zeros(K, 2, B, 2 * C, *S, dtype=torch.float64)
    raw[:, 0, :, 0] = 1.0  # unconditional eps
    raw[:, 1, :, 0] = 3.0  # conditional eps
    raw[:, 1, :, 1] = torch.tensor([-1.0, 0.0, 1.0])  # conditional variance channel
    raw[:, 0, :, 1] = 5.0  # the unconditional variance channel is ignored
    sc = StepScalars(px=2.0, po=-1.0, mx=0.5, m0=0.25, mo=0.1, clip=1.5, var_mode=VarMode.LEARNED_RANGE,
                     lv_min=-4.0, lv_max=-1.0)
    mean, var = gaussian_from_output_ref(raw, x_t, sc, guidance_scale=1.5)
    out = 1.0 + 1.5 * (3.0 - 1.0)
    x0 = (2.0 * x_t - out).clamp(-1.5, 1.5)
    assert torch.allclose(mean[0], 0.5 * x_t + 0.25 * x0 + 0.1 * out, rtol=0, atol=1e-15)
    assert torch.allclose(var[0, 0, 0], torch.tensor([-4.0, -2.5, -1.0], dtype=torch.float64).exp(), rtol=1e-15)
    m, v = gaussian_from_output_ref(raw[:, 1], x_t, dataclasses.replace(sc, var_mode=VarMode.FIXED,
                                                                        log_var_fixed=math.log(0.3)))
    assert v.shape == (K,) and torch.allclose(v, torch.tensor(0.3, dtype=torch.float64))
    _, v = gaussian_from_output_ref(raw[:, 1].abs(), x_t, dataclasses.replace(sc, var_mode=VarMode.LEARNED))
    assert torch.equal(v[0, 0, 0], torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("mode", [VarMode.FIXED, VarMode.LEARNED], ids=lambda m: m.name)
def test_zero_variance_ddim_eta0(impl, mode):
    """log_var_fixed = -inf (or a learned variance of 0): x_prev is the c-weighted mean of the mu_k, no noise."""
    K, B, C, S = 3, 2, 2, (3, 5)
    raw = make_raw(K, B, C, S, mode, None, seed=3)
    if mode == VarMode.LEARNED:
        raw[:, :, C:] = 0.0
    x_t = torch.randn(B, C, *S)
    sc = scalars(mode, log_var_fixed=-math.inf)
    x = fused_expert_step(raw, x_t, COEFF, sc, seed=1)
    mean, _ = gaussian_from_output_ref(raw, x_t, sc)
    want = (COEFF.double()[:, None, None, None, None] * mean).sum(0) / COEFF.sum()
    assert close(x, want)
    assert close(x, fused_expert_step_ref(raw, x_t, COEFF, sc, noise=0))


@pytest.mark.parametrize("raw_dtype, xt_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.float16)], ids=str)
def test_low_precision(impl, raw_dtype, xt_dtype):
    K, B, C, S = 2, 2, 3, (4, 5)
    raw = make_raw(K, B, C, S, VarMode.LEARNED_RANGE, 3.0, seed=6, dtype=raw_dtype)
    x_t = torch.randn(B, C, *S).to(xt_dtype)
    sc = scalars(VarMode.LEARNED_RANGE)
    coeff = torch.tensor([0.6, 0.4])
    x = fused_expert_step(raw, x_t, coeff, sc, guidance_scale=3.0, noise=0)
    ref = fused_expert_step_ref(raw.double(), x_t.double(), coeff, sc, guidance_scale=3.0, noise=0)
    assert x.dtype == xt_dtype
    assert close(x, ref, dtype=xt_dtype)  # float32 inside, one rounding to x_t's dtype


def test_layouts(impl):
    """Per-sample coefficients, a non-contiguous raw (K and B axes swapped in memory), a strided x_t and noise, and a
    FIXED step on a learned-sigma model (C_out = 2C, the variance channels ignored)."""
    K, B, C, S = 3, 3, 2, (3, 4)
    raw = make_raw(K, B, C, S, VarMode.LEARNED, None, seed=8).transpose(0, 1).contiguous().transpose(0, 1)
    assert not raw.is_contiguous()
    x_t = torch.randn(B, 2 * C, *S)[:, C:]
    noise = torch.randn(B, C, *S, 2)[..., 0]
    coeff = torch.tensor([[0.7, 0.5, -0.2], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    for mode in (VarMode.LEARNED, VarMode.FIXED):
        sc = scalars(mode)
        x = fused_expert_step(raw, x_t, coeff, sc, noise=noise)
        assert close(x, fused_expert_step_ref(raw, x_t, coeff, sc, noise=noise))


def test_errors(impl):
    K, B, C, S = 3, 2, 2, (3, 3)
    raw = make_raw(K, B, C, S, VarMode.LEARNED, None, seed=9)
    x_t = torch.randn(B, C, *S)
    sc = scalars(VarMode.LEARNED)
    with pytest.raises(ValueError, match="C_out = 2C"):
        fused_expert_step(raw[:, :, :C], x_t, COEFF, sc, noise=0)
    with pytest.raises(ValueError, match=r"\[K, 2, B, C_out, \*S\]"):
        fused_expert_step(raw, x_t, COEFF, sc, guidance_scale=2.0, noise=0)
    with pytest.raises(ValueError, match="does not match"):
        fused_expert_step(raw[:, :1], x_t, COEFF, sc, noise=0)
    with pytest.raises(ValueError, match="sampling is always explicit"):
        fused_expert_step(raw, x_t, COEFF, sc)
    with pytest.raises(TypeError, match="StepScalars"):
        fused_expert_step(raw, x_t, COEFF, dataclasses.asdict(sc), noise=0)
    with pytest.raises(ValueError, match="noise must be"):
        fused_expert_step(raw, x_t, COEFF, sc, noise=torch.zeros(B, 2 * C, *S))
    bad = raw.clone()
    bad[1, 0, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/Inf in raw.*NaN/Inf in mu_k at 1 of 36 elements"):
        fused_expert_step(bad, x_t, COEFF, sc, noise=0)
    bad = raw.clone()
    bad[2, 1, C:] = -1.0  # a negative learned variance
    with pytest.raises(ValueError, match=r"negative var_k at 18 of 36 elements \(samples \[1\]\)"):
        fused_expert_step(bad, x_t, COEFF, sc, noise=0)
    with pytest.raises(ValueError, match=r"P = sum_k c_k/var_k <= 0 at 36 of 36 elements.*c_2=-3"):
        fused_expert_step(raw, x_t, torch.tensor([0.5, 0.5, -3.0]), sc, noise=0)
    count = torch.zeros(1, dtype=torch.int32)
    fused_expert_step(raw, x_t, torch.tensor([0.5, 0.5, -3.0]), sc, noise=0, validate=False, error_count=count)
    assert int(count) == 36
    with pytest.raises(ValueError, match="36 elements"):
        raise_if_bad(count, torch.tensor([0.5, 0.5, -3.0]))


def test_step_scalars():
    sc = StepScalars(px=1, po=2, mx=3, m0=4, mo=5, var_mode=1)
    assert sc.var_mode is VarMode.LEARNED_RANGE and isinstance(sc.px, float) and sc.clip == math.inf
    with pytest.raises(dataclasses.FrozenInstanceError):
        sc.px = 2.0
    with pytest.raises(ValueError, match="clip"):
        StepScalars(px=1, po=2, mx=3, m0=4, mo=5, clip=0.0)
    with pytest.raises(ValueError):
        StepScalars(px=1, po=2, mx=3, m0=4, mo=5, var_mode=7)
    with pytest.raises(ValueError, match="log_var_fixed"):
        StepScalars(px=1, po=2, mx=3, m0=4, mo=5, log_var_fixed=math.nan)
    assert [int(m) for m in VarMode] == [0, 1, 2]


@settings(max_examples=20, deadline=None)
@given(
    K=st.integers(1, 4),
    B=st.integers(1, 3),
    C=st.integers(1, 4),
    S=st.lists(st.integers(1, 7), min_size=0, max_size=2),
    mode=st.sampled_from(list(VarMode)),
    cfg=st.sampled_from([None, 1.0, 5.5]),
    clip=st.sampled_from([math.inf, 1.0]),
    use_triton=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_property_matches_reference(K, B, C, S, mode, cfg, clip, use_triton, seed):
    S = tuple(S)
    raw = make_raw(K, B, C, S, mode, cfg, seed=seed)
    x_t = torch.randn(B, C, *S)
    coeff = torch.rand(K, generator=torch.Generator(DEV).manual_seed(seed)) + 0.1  # positive: P > 0 for any var
    sc = scalars(mode, clip)
    noise = torch.randn(B, C, *S)
    with use_backend(use_triton):
        x = fused_expert_step(raw, x_t, coeff, sc, guidance_scale=cfg, noise=noise)
        xs = fused_expert_step(raw, x_t, coeff, sc, guidance_scale=cfg, seed=seed, offset=seed % 3)
    ref = fused_expert_step_ref(raw, x_t, coeff, sc, guidance_scale=cfg, noise=noise)
    assert x.shape == (B, C, *S)
    assert close(x, ref, naive(raw, x_t, coeff, sc, cfg, noise))
    assert close(xs, fused_expert_step_ref(raw, x_t, coeff, sc, guidance_scale=cfg, seed=seed, offset=seed % 3))


def test_concurrent_calls_match_sequential(impl):
    """Backends may be driven from several threads at once (ARCHITECTURE.md 5); the step must not care (the Triton
    interpreter is not thread-safe by itself, so interpreted launches are serialised)."""
    from threads import run_at_once

    K, B, C, S = 2, 1, 2, (4, 4)
    jobs = [(make_raw(K, B, C, S, VarMode.LEARNED_RANGE, 2.0, seed=i), torch.randn(B, C, *S)) for i in range(4)]
    sc = scalars(VarMode.LEARNED_RANGE)
    coeff = torch.tensor([0.6, 0.4])
    run = lambda raw, x_t: fused_expert_step(raw, x_t, coeff, sc, guidance_scale=2.0, seed=3)  # noqa: E731
    want = [run(*j) for j in jobs]
    got = run_at_once(run, jobs, repeats=3)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
