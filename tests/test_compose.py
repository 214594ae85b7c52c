"""compose_gaussians: the Triton kernel (interpreted here) and the torch CPU path against the float64 definition."""
import math
import os
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msdda.kernels import compose_gaussians, compose_gaussians_ref, launch, philox_normal, raise_if_bad
from msdda.kernels.args import prepare_compose
from msdda.kernels.errors import product_moments_ref

from device import DEV, GPU  # noqa: E402,F401  (conftest's autouse fixture sets the default device)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Kernel error allowance beyond "2x the same-precision torch expression", relative to max |x_prev|, in units of
# the output dtype's epsilon. float32: up to 8 experts' float32 terms, each within about 2 ulp (the reciprocal
# rsqrt(v)^2 + a Newton step is within an ulp, then a product and a sum), so 16 eps. float16 / bfloat16: the
# float32 result is rounded to the dtype once (half an ulp of the largest value), so 1 eps covers it with the
# float32 work, which is 2**13 (fp16) or 2**16 (bf16) times finer.
FLOOR_EPS = {torch.float32: 16, torch.float16: 1, torch.bfloat16: 1}
FLOOR = {dt: n * torch.finfo(dt).eps for dt, n in FLOOR_EPS.items()}


def use_backend(use_triton: bool):
    """Context: the wrappers pick the Triton kernel (interpreted on CPU) or the float32 torch path."""
    return mock.patch.object(launch, "use_triton", lambda device: use_triton)


@pytest.fixture(params=["triton", "torch"])
def impl(request):
    """Run the public wrappers on the Triton kernel (interpreted on CPU) or on the float32 torch path."""
    with use_backend(request.param == "triton"):
        yield request.param


def make_case(K, B, S, *, var_kind="elem", per_sample=False, reference=True, seed=0, dtype=torch.float32):
    """Experts that compose to a proper Gaussian (P > 0), with distinct per-element variances.

    With ``reference`` expert 0 is a base model N(m0, v0) with exponent c_0 = 1 - sum_k w_k (negative when
    sum w > 1) and the others are sharper, var_k = 1/(1/v0 + d_k) with d_k >= 0, so P = 1/v0 + sum w_k d_k > 0.
    Returns mean [K, B, *S] (dtype), var (var_kind: "k" [K], "kb" [K, B], "elem" [K, B, *S], float32),
    coeff ([K] or [B, K], float32)."""
    g = torch.Generator(DEV).manual_seed(seed)
    vshape = {"k": (K,), "kb": (K, B), "elem": (K, B, *S)}[var_kind]
    rand = lambda *shape: torch.rand(shape, generator=g, dtype=torch.float64)  # noqa: E731
    mean = torch.randn(K, B, *S, generator=g, dtype=torch.float64)
    w = 0.2 + 0.8 * rand(*((B, K) if per_sample else (K,)))
    if reference and K > 1:
        v0 = 0.5 + 1.5 * rand(*vshape[1:])
        d = 2.0 * rand(K - 1, *vshape[1:])
        var = torch.cat([v0[None], 1 / (1 / v0 + d)])
        w[..., 0] = 1 - w[..., 1:].sum(-1)  # c_0 = 1 - sum_k w_k, typically negative here
    else:
        var = 0.1 + rand(*vshape)
    return mean.to(dtype), var.float(), w.float()


def product_magnitude(mean, var, coeff, z):
    """Per element, the size of the terms x_prev = (sum_k c_k mu_k/var_k)/P + z/sqrt(P) is built from, in float64
    [B, *S]: a rounding bound is eps x this (Higham's sum of absolute values), however much the sums cancel.
    With S1 = sum |c_k/var_k| and S2 = sum |c_k mu_k/var_k|: the numerator errs by ~S2, P by ~S1, so
    mu = num/P errs by ~(S2 + S1 |mu|)/P and z/sqrt(P) by ~|z| S1/(2 P^1.5) on top of its own rounding."""
    K, B = mean.shape[:2]
    extra = (1,) * (mean.dim() - 2)
    m = mean.double()
    c = (coeff.t() if coeff.dim() == 2 else coeff[:, None]).double().reshape(K, -1, *extra)
    v = var.double().reshape(*var.shape, *(1,) * (mean.dim() - var.dim()))
    P = (c / v).sum(0)
    mu = (c * m / v).sum(0) / P
    S1 = (c.abs() / v).sum(0)
    S2 = (c.abs() * m.abs() / v).sum(0)
    zz = z.double().abs().reshape(B, *mean.shape[2:])
    return (S2 + S1 * mu.abs()) / P + zz / P.sqrt() * (1 + S1 / P)


def naive(mean, var, coeff, noise):
    """The plain same-precision torch expression (what a user would write), computed in mean's dtype."""
    K, B = mean.shape[:2]
    dt, extra = mean.dtype, (1,) * (mean.dim() - 2)
    c = (coeff.t() if coeff.dim() == 2 else coeff[:, None]).to(dt).reshape(K, -1, *extra)
    v = var.to(dt).reshape(*var.shape, *(1,) * (mean.dim() - var.dim()))
    w = c / v
    P = w.sum(0)
    return (w * mean).sum(0) / P + noise.to(dt) / P.sqrt()


def err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def run(mean, var, coeff, **kw):
    return compose_gaussians(mean, var, coeff, **kw)


# ------------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", range(1, 9))
def test_accuracy_vs_float64(impl, dtype, K):
    var_kind = ["k", "kb", "elem"][K % 3]
    mean, var, coeff = make_case(K, 3, (3, 5, 7), var_kind=var_kind, per_sample=K % 2 == 0, seed=K, dtype=dtype)
    noise = torch.randn(3, 3, 5, 7, generator=torch.Generator(DEV).manual_seed(K)).to(dtype)
    ref = compose_gaussians_ref(mean, var, coeff, noise=noise)  # float64 on the dtype-rounded inputs
    want = compose_gaussians_ref(mean.double(), var.double(), coeff.double(), noise=noise.double())
    x = run(mean, var, coeff, noise=noise)
    assert x.dtype == dtype and x.shape == (3, 3, 5, 7)
    scale = want.abs().max().item()
    e_kernel = err(x, want)
    e_naive = err(naive(mean, var, coeff, noise), want)
    assert e_kernel <= max(2 * e_naive, FLOOR[dtype] * scale), (e_kernel, e_naive)
    assert err(x, ref) <= FLOOR[dtype] * scale


@pytest.mark.parametrize(
    "var_kind, per_sample, layout",
    [("k", False, "contiguous"), ("kb", True, "contiguous"), ("elem", False, "mean_strided"),
     ("elem", True, "all_transposed"), ("partial", False, "noise_strided"), ("kb1", True, "mean_strided")],
)
def test_layouts_and_broadcasts(impl, var_kind, per_sample, layout):
    K, B, S = 3, 2, (4, 6, 5)
    kind = {"partial": "elem", "kb1": "kb"}.get(var_kind, var_kind)
    mean, var, coeff = make_case(K, B, S, var_kind=kind, per_sample=per_sample, seed=7)
    if var_kind == "partial":  # [K, B, C, 1, 1]: per-channel variances
        var = var[..., :1, :1]
    if var_kind == "kb1":  # [K, 1]: shared over the batch
        var = var[:, :1]
    noise = torch.randn(B, *S)
    if layout == "mean_strided":  # a slice of a bigger [K, B, 2C, ...] tensor: K and B strided, S contiguous
        big = torch.randn(K, B, 2 * S[0], *S[1:])
        big[:, :, : S[0]] = mean
        mean = big[:, :, : S[0]]
        assert not mean.is_contiguous()
    if layout == "all_transposed":  # S not flattenable: copied
        mean = mean.transpose(-1, -2).contiguous().transpose(-1, -2)
        var = var.transpose(-1, -2).contiguous().transpose(-1, -2)
        noise = noise.transpose(-1, -2).contiguous().transpose(-1, -2)
        coeff = coeff.t().contiguous().t()
        assert not mean.is_contiguous() and not var.is_contiguous() and not coeff.is_contiguous()
    if layout == "noise_strided":
        noise = torch.randn(B, 2, *S)[:, 1]
    x = run(mean, var, coeff, noise=noise)
    ref = compose_gaussians_ref(mean, var, coeff, noise=noise)
    assert err(x, ref) <= FLOOR[torch.float32] * ref.abs().max().item()


def test_coeff_as_python_list(impl):
    mean, var, _ = make_case(2, 2, (9,), reference=False)
    x = run(mean, var, [0.3, 0.7], noise=0)
    ref = compose_gaussians_ref(mean, var, torch.tensor([0.3, 0.7]), noise=0)
    assert err(x, ref) <= FLOOR[torch.float32] * ref.abs().max().item()


def test_empty_and_scalar_samples(impl):
    mean, var, coeff = make_case(2, 3, (), reference=False)  # S = (): one element per sample
    x = run(mean, var, coeff, noise=torch.randn(3))
    assert x.shape == (3,)
    assert run(torch.zeros(2, 0, 4), torch.ones(2), torch.ones(2), seed=0).shape == (0, 4)


# ------------------------------------------------------------------------------------------------- exactness


def _quadratic_case(seed=0, K=3, shape=(2, 3, 4, 5)):
    """Reference step N(m0, s0^2), rewards r_k(x) = -a_k (x - b_k)^2, temperature beta, weights w (per element)."""
    g = torch.Generator(DEV).manual_seed(seed)
    r = lambda: torch.rand(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    m0, s0sq = torch.randn(*shape, generator=g, dtype=torch.float64), 0.2 + r()
    a = torch.stack([0.1 + 2 * r() for _ in range(K)])
    b = torch.randn(K, *shape, generator=g, dtype=torch.float64)
    w = torch.tensor([0.6, 0.5, 0.3][:K], dtype=torch.float64)  # sum w = 1.4: reference exponent c_0 = -0.4
    return m0, s0sq, a, b, w, 0.7


def test_exactness_quadratic_rewards():
    """p_k ∝ p_ref exp(r_k/beta) are Gaussian; composing them with c_k = w_k and the reference with
    c_0 = 1 - sum w (here negative) must give the optimum p_ref exp(sum_k w_k r_k / beta) in closed form.
    float64 allowance: both sides are a few float64 operations on the same inputs, each within half an ulp, but
    the negative exponent c_0 cancels part of P; 256 eps (5.7e-14) covers a cancellation of ~50 times."""
    m0, s0sq, a, b, w, beta = _quadratic_case()
    prec_k = 1 / s0sq + 2 * a / beta  # expert k: precision and mean of p_ref exp(r_k / beta)
    mu_k = (m0 / s0sq + 2 * a * b / beta) / prec_k
    prec_opt = 1 / s0sq + 2 * (w[:, None, None, None, None] * a).sum(0) / beta
    mu_opt = (m0 / s0sq + 2 * (w[:, None, None, None, None] * a * b).sum(0) / beta) / prec_opt

    mean = torch.cat([m0[None], mu_k])  # [1 + K, B, *S]
    var = torch.cat([s0sq[None], 1 / prec_k])  # distinct per-element variances
    coeff = torch.cat([1 - w.sum()[None], w])
    assert coeff[0] < 0
    mu = compose_gaussians_ref(mean, var, coeff, noise=0)
    x1 = compose_gaussians_ref(mean, var, coeff, noise=torch.ones_like(m0))  # mu + 1/sqrt(P)
    assert mu.dtype == torch.float64
    eps64 = torch.finfo(torch.float64).eps
    assert ((mu - mu_opt).abs() / mu_opt.abs()).max() < 256 * eps64  # it is exact, not merely close
    # x1 - mu = 1/sqrt(P): its own subtraction loses up to |x1|/|x1 - mu| ulps, relative to P
    lost = (x1.abs() / (x1 - mu).abs()).max().item()
    assert ((1 / (x1 - mu) ** 2 - prec_opt).abs() / prec_opt).max() < 4 * lost * eps64 + 256 * eps64

    # the float32 kernel on the same problem: as close as the same float32 torch expression, or the floor
    m32, v32, c32 = mean.float(), var.float(), coeff.float()
    e_naive = err(naive(m32, v32, c32, torch.zeros_like(m32[0])), mu_opt)
    for use_triton in (True, False):
        with use_backend(use_triton):
            got = compose_gaussians(m32, v32, c32, noise=0)
        assert err(got, mu_opt) <= max(2 * e_naive, FLOOR[torch.float32] * mu_opt.abs().max().item())


def test_exactness_single_expert_is_identity(impl):
    mean, var, _ = make_case(1, 2, (3, 4), reference=False)
    noise = torch.randn(2, 3, 4)
    x = run(mean, var, torch.ones(1), noise=noise)
    want = mean[0].double() + noise.double() * var[0].double().sqrt()
    assert err(x, want) <= FLOOR[torch.float32] * want.abs().max().item()


# ------------------------------------------------------------------------------------------------- noise


def test_same_seed_same_output_and_paths_agree(impl):
    mean, var, coeff = make_case(3, 3, (4, 8), seed=2)
    x1 = run(mean, var, coeff, seed=123, offset=5)
    x2 = run(mean, var, coeff, seed=123, offset=5)
    assert torch.equal(x1, x2)
    assert not torch.equal(x1, run(mean, var, coeff, seed=124, offset=5))
    assert not torch.equal(x1, run(mean, var, coeff, seed=123, offset=6))
    ref = compose_gaussians_ref(mean, var, coeff, seed=123, offset=5)  # the same Philox draws, in float64
    assert err(x1, ref) <= FLOOR[torch.float32] * ref.abs().max().item()
    # int seed s means per-sample seeds s + b
    seeds = torch.tensor([123, 124, 125])
    assert torch.equal(x1, run(mean, var, coeff, seed=seeds, offset=5))


def test_sample_noise_independent_of_batch(impl):
    mean, var, coeff = make_case(2, 3, (5, 5), var_kind="kb", per_sample=True, seed=4)
    seeds = torch.tensor([10, 20, 30])
    x = run(mean, var, coeff, seed=seeds, offset=1)
    for b in range(3):
        xb = run(mean[:, b:b + 1], var[:, b:b + 1], coeff[b:b + 1], seed=seeds[b:b + 1], offset=1)
        assert torch.equal(xb[0], x[b])


def test_noise_moments(impl):
    """(x - mu) sqrt(P) is N(0, 1): mean ~ 0 and variance ~ 1, i.e. x has variance 1/P about mu."""
    mean, var, coeff = make_case(3, 4, (64, 64), seed=5)
    x = run(mean, var, coeff, seed=77, offset=3).double()
    a = prepare_compose(mean, var, coeff, 0, None, 0, None, ref=True)
    mu, prec, _, ok = product_moments_ref(a.mean, a.var, a.coeff)
    assert bool(ok.all())
    zhat = ((x.reshape(4, -1) - mu) * prec.sqrt()).flatten()
    n = zhat.numel()
    assert abs(zhat.mean()) < 5 / math.sqrt(n)
    assert abs(zhat.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(((x.reshape(4, -1) - mu) ** 2 * prec).mean() - 1) < 5 * math.sqrt(2 / n)


def test_explicit_noise_required(impl):
    mean, var, coeff = make_case(2, 1, (3,))
    with pytest.raises(ValueError, match="sampling is always explicit"):
        run(mean, var, coeff)
    with pytest.raises(ValueError, match="not both"):
        run(mean, var, coeff, noise=0, seed=1)
    assert torch.equal(run(mean, var, coeff, noise=0), run(mean, var, coeff, noise=torch.zeros(1, 3)))


# ------------------------------------------------------------------------------------------------- zero variance


def test_zero_variance_limit(impl):
    K, B, S = 3, 2, (4, 5)
    mean, var, coeff = make_case(K, B, S, var_kind="elem", reference=False, seed=8)
    var[0, :, 0] = 0.0  # expert 0 deterministic on channel 0
    var[1, :, 0, :2] = 0.0  # and expert 1 too on part of it
    var[:, 1, 3] = 0.0  # all experts deterministic on channel 3 of sample 1
    noise = torch.randn(B, *S)
    x = run(mean, var, coeff, noise=noise)
    ref = compose_gaussians_ref(mean, var, coeff, noise=noise)
    tol = FLOOR[torch.float32] * ref.abs().max().item()
    assert err(x, ref) < tol
    c = coeff.double()[:, None, None, None]
    m, v = mean.double(), var.double()
    # channel 0: c-weighted mean of the zero-variance experts, no noise
    z0 = v[:, :, 0] == 0
    want = (torch.where(z0, c[:, :, 0] * m[:, :, 0], 0).sum(0) / torch.where(z0, c[:, :, 0], 0).sum(0))
    assert err(x[:, 0], want) < tol
    assert err(x[1, 3], (c[:, 0, 0] * m[:, 1, 3]).sum(0) / c.sum()) < tol


def test_ddim_eta0_all_zero_variance(impl):
    mean, _, coeff = make_case(4, 2, (3, 3), reference=False, seed=9)
    coeff = torch.tensor([1.5, 0.5, -0.4, -0.6])  # negative exponents are fine while sum c > 0
    x = run(mean, torch.zeros(4), coeff, seed=1)  # the noise is ignored
    c = coeff.double()
    want = (c[:, None, None, None] * mean.double()).sum(0) / c.sum()
    # sum c = 1 out of sum |c| = 3: the float32 sums cancel, so the allowance scales with sum |c| / |sum c|
    assert err(x, want) <= FLOOR[torch.float32] * (c.abs().sum() / c.sum()).item() * want.abs().max().item()
    with pytest.raises(ValueError, match=r"zero-variance experts with sum of c_k <= 0 at 18 of 18"):
        run(mean, torch.zeros(4), torch.tensor([0.5, 0.5, -0.4, -0.6]), noise=0)


# ------------------------------------------------------------------------------------------------- errors


def test_nonpositive_precision_raises(impl):
    K, B, S = 3, 2, (4, 5)
    mean, var, _ = make_case(K, B, S, reference=False, seed=10)
    coeff = torch.tensor([0.5, -2.0, 0.1])
    a = prepare_compose(mean, var, coeff, 0, None, 0, None, ref=True)
    _, prec, _, _ = product_moments_ref(a.mean, a.var, a.coeff)
    nbad = int((prec <= 0).sum())
    assert 0 < nbad < B * 20
    for fn in (run, compose_gaussians_ref):
        with pytest.raises(ValueError) as e:
            fn(mean, var, coeff, noise=torch.randn(B, *S))
        msg = str(e.value)
        assert "\n" not in msg
        assert f"P = sum_k c_k/var_k <= 0 at {nbad} of {B * 20} elements" in msg
        assert "c = [0.5, -2, 0.1]" in msg and "c_1=-2" in msg  # names the offending coefficient


def test_per_sample_coefficients_named(impl):
    mean, var, _ = make_case(2, 3, (4,), var_kind="kb", reference=False, seed=11)
    coeff = torch.tensor([[0.5, 0.5], [1.0, -5.0], [0.2, 0.8]])
    var = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"at 4 of 12 elements \(samples \[1\]\).*sample 1: c = \[1, -5\]"):
        run(mean, var, coeff, noise=0)


@pytest.mark.parametrize("where", ["mean", "var", "noise", "coeff_nan", "coeff_inf", "var_inf_k", "mean_inf"])
def test_nonfinite_inputs_raise(impl, where):
    K, B, S = 3, 2, (4, 5)
    mean, var, coeff = make_case(K, B, S, seed=12)
    noise = torch.randn(B, *S)
    if where == "mean":
        mean[1, 0, 2, 3] = float("nan")
    elif where == "mean_inf":
        mean[0, 1, 0, 0] = -float("inf")
    elif where == "var":
        var[2, 1, 1, 1] = float("nan")
    elif where == "var_inf_k":
        var = torch.tensor([1.0, float("inf"), 2.0])
    elif where == "noise":
        noise[1, 3, 4] = float("inf")
    elif where == "coeff_nan":
        coeff[1] = float("nan")
    else:
        coeff[0] = float("inf")
    name = {"mean_inf": "mean", "var_inf_k": "var"}.get(where, where)
    pattern = "non-finite coefficients" if where.startswith("coeff") else f"NaN/Inf in {name}"
    for fn in (run, compose_gaussians_ref):
        with pytest.raises(ValueError, match=pattern):
            fn(mean, var, coeff, noise=noise)


def test_deferred_error_count(impl):
    mean, var, coeff = make_case(2, 2, (3, 4), seed=13)
    mean[0, 0, 0, 0] = float("nan")
    count = torch.zeros(1, dtype=torch.int32)
    x = run(mean, var, coeff, noise=0, validate=False, error_count=count)
    assert x.shape == (2, 3, 4)
    assert int(count) == 1
    run(mean, var, coeff, noise=0, validate=False, error_count=count)  # accumulates over steps
    assert int(count) == 2
    with pytest.raises(ValueError, match=r"2 elements had precision P = sum_k c_k/var_k <= 0 or a non-finite value"):
        raise_if_bad(count, coeff)
    ok = torch.zeros(1, dtype=torch.int32)
    mean[0, 0, 0, 0] = 0.0
    run(mean, var, coeff, noise=0, validate=False, error_count=ok)
    raise_if_bad(ok, coeff)  # nothing counted: no raise
    run(mean, var, torch.tensor([float("nan"), 1.0]), noise=0, validate=False)  # unchecked: no raise


def test_argument_errors(impl):
    mean, var, coeff = make_case(2, 2, (3,), reference=False)
    cases = [
        (dict(mean=mean.double()), TypeError, "dtype"),
        (dict(mean=mean.to(torch.int32)), TypeError, "dtype"),
        (dict(mean=mean[0, 0]), ValueError, r"\[K, B, \*S\]"),
        (dict(mean=mean[:0]), ValueError, "K >= 1"),
        (dict(var=torch.ones(3)), ValueError, "does not broadcast"),
        (dict(var=torch.ones(2, 2, 2)), ValueError, "does not broadcast"),
        (dict(var=torch.ones(2, 2, 3, 1)), ValueError, r"\[K\], \[K, B\] or \[K, B, \*S\]"),
        (dict(var=torch.ones(2, dtype=torch.int64)), TypeError, "var must have dtype"),
        (dict(coeff=torch.ones(3)), ValueError, "coeff must be"),
        (dict(coeff=torch.ones(2, dtype=torch.int64)), TypeError, "coeff must be a float"),
        (dict(var=torch.ones(2, device="meta")), ValueError, "one device"),
        (dict(coeff=torch.ones(2, device="meta")), ValueError, "one device"),
        (dict(noise=torch.ones(2, 4)), ValueError, "noise must be"),
        (dict(noise=torch.ones(2, 3, device="meta")), ValueError, "one device"),
        (dict(noise=None, seed=torch.tensor([1, 2], dtype=torch.int32)), ValueError, "int64"),
        (dict(noise=None, seed=1.5), TypeError, "seed must be"),
        (dict(offset=-1), ValueError, "offset"),
        (dict(error_count=torch.zeros(1)), TypeError, "error_count"),
    ]
    for over, exc, pattern in cases:
        kw = dict(mean=mean, var=var, coeff=coeff, noise=torch.zeros(2, 3))
        kw.update(over)
        m, v, c = kw.pop("mean"), kw.pop("var"), kw.pop("coeff")
        with pytest.raises(exc, match=pattern):
            run(m, v, c, **kw)


# ------------------------------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(
    K=st.integers(1, 6),
    B=st.integers(1, 3),
    S=st.lists(st.integers(1, 9), min_size=0, max_size=3),
    dtype=st.sampled_from(DTYPES),
    var_kind=st.sampled_from(["k", "kb", "elem"]),
    per_sample=st.booleans(),
    reference=st.booleans(),
    noise_kind=st.sampled_from(["tensor", "zero", "seed"]),
    use_triton=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(K, B, S, dtype, var_kind, per_sample, reference, noise_kind, use_triton, seed):
    mean, var, coeff = make_case(K, B, tuple(S), var_kind=var_kind, per_sample=per_sample, reference=reference,
                                 seed=seed, dtype=dtype)
    kw = {"tensor": dict(noise=torch.randn(B, *S).to(dtype)), "zero": dict(noise=0),
          "seed": dict(seed=seed, offset=seed % 5)}[noise_kind]
    with use_backend(use_triton):
        x = compose_gaussians(mean, var, coeff, **kw)
    ref = compose_gaussians_ref(mean, var, coeff, **kw)
    want = compose_gaussians_ref(mean.double(), var.double(), coeff.double(),
                                 **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    assert x.shape == (B, *S) and x.dtype == dtype
    z = {"tensor": lambda: kw["noise"], "zero": lambda: torch.zeros(B, *S),
         "seed": lambda: philox_normal(torch.arange(seed, seed + B), seed % 5, tuple(S))}[noise_kind]()
    # per element, by the terms' magnitudes rather than the result's: with a negative reference exponent the sums
    # cancel, and a result near 0 says nothing about the rounding of the terms it came from
    bound = FLOOR[dtype] * product_magnitude(mean, var, coeff, z)
    bound = bound.reshape(x.shape) + FLOOR[dtype] * ref.double().abs()  # + the rounding of ref itself to dtype
    assert (x.double() - ref.double()).abs().le(bound).all()
    if noise_kind != "seed":
        e_naive = err(naive(mean, var, coeff, kw["noise"] if noise_kind == "tensor" else torch.zeros(B, *S)), want)
        assert err(x, want) <= max(2 * e_naive, bound.max().item())


# ------------------------------------------------------------------------------------------------- real compiler

_COMPILE_SCRIPT = r"""
import itertools, json, subprocess, sys
import torch
# the kernels compiled for sm_90 with Triton's bundled ptxas (bench/kernel_asm.py, the same specialisation as the
# JIT): 16-byte vector loads for float32 and float16, no shared memory, no spills
out = subprocess.run([sys.executable, "bench/kernel_asm.py", "--only", sys.argv[1], "--json", sys.argv[2]],
                     capture_output=True, text=True)
assert out.returncode == 0, out.stderr[-3000:]
cases = json.load(open(sys.argv[2]))["cases"]
assert len(cases) >= 4, list(cases)
for name, r in cases.items():
    assert r["ptx_ld_v4"] > 0 and r["ptx_ld_v2"] == 0 and r["ptx_st_v4"] > 0, (name, r)
    assert r["ptx_shared"] == 0 and r["ptx_barriers"] == 0 and r["local"] == 0, (name, r)

# and without the interpreter, CPU tensors take the torch path (chosen once, at import)
from msdda.kernels import compose, compose_gaussians, launch
assert not launch.TRITON_ON_CPU and not launch.use_triton(torch.device("cpu"))
calls = []
orig = compose.compose_torch
compose.compose_torch = lambda *a, **k: calls.append(1) or orig(*a, **k)
compose_gaussians(torch.randn(2, 3, 4), torch.ones(2), torch.ones(2), seed=1)
assert calls == [1]
print("compiled")
"""


def test_kernels_compile_for_sm90_and_cpu_dispatch(tmp_path):
    """Interpreted tests cannot see compiler-only problems: compile both kernels to cubin for sm_90 with Triton's
    bundled ptxas (no GPU needed), in a process without TRITON_INTERPRET, and check the vector widths; there, CPU
    tensors take the torch path."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton build has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo = Path(__file__).resolve().parents[1]
    cases = ("compose K=2 8x4x128x128 fp16 var=elem noise=philox|compose K=2 8x4x128x128 fp32 var=elem noise=given"
             "|fused K=2 8x4x128x128 fp16 cfg table|fused K=3 8x3x512x512 fp32 cfg learned_range")
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, cases, str(tmp_path / "asm.json")],
                       env=env, capture_output=True, text=True, timeout=600, cwd=repo)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize("var_kind", ["elem", "expert"])
def test_a_sample_is_the_same_alone_or_in_a_batch(impl, var_kind):
    """Bit for bit: a sample's x_prev depends only on its own inputs and seed, never on how many samples share
    the call (a one-sample call has coefficients [1, K], which once took another formula on the torch path).
    Serving relies on this: requests batched together must equal their calls alone."""
    g = torch.Generator().manual_seed(3)
    K, B, N = 3, 4, 300
    mean = torch.randn(K, B, N, generator=g)
    var = (torch.rand(K, B, N, generator=g) if var_kind == "elem" else torch.rand(K, B, generator=g)) + 0.1
    coeff = torch.rand(B, K, generator=g) + 0.1
    seeds = torch.arange(B, dtype=torch.int64) + 11
    together = compose_gaussians(mean, var, coeff, seed=seeds, offset=5)
    for b in range(B):
        alone = compose_gaussians(mean[:, b:b + 1], var[:, b:b + 1], coeff[b:b + 1], seed=seeds[b:b + 1], offset=5)
        assert torch.equal(alone[0], together[b]), f"sample {b}"
