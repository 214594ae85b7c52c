"""Tolerances derived from floating-point arithmetic, shared by the tests. No bare 1e-5 anywhere.

CI runs on whatever CPU it gets (AMD or Intel, with or without AVX-512/AMX), and each CPU path sums in its own
order, so float results differ in the last bits. A tolerance here is one of two things:

1. ``rounding_bound``: an a-priori bound, eps(dtype) x the magnitude of the terms x a stated operation count.
   Right for short computations whose every operation we can count (a merge W + B A, one scheduler step).
   ``lower_precision_bound`` scales a measured float32 error to a coarser format (float16, TF32).
2. ``twin_bound``: a bound measured on the same computation run twice, in float32 and in float64 (the float64
   "twin": the same networks converted to float64, the same inputs, the float64 step). The float32 run's
   distance from its twin is the float32 rounding error of exactly this computation on this CPU path, however
   it grew through the network and the steps. Another float32 evaluation of the same quantity (another
   summation order, another backend, another batch) has an error of the same size, so the two float32 results
   lie within a small multiple of it of each other. Right for end-to-end comparisons through a UNet, where an
   a-priori bound per element would be hopelessly loose or wrong.

Both scale with the arithmetic: on a CPU whose kernels round more (or less), the measured error and the allowed
difference move together, so the ratio, not the absolute numbers, is what the tests hold to. A real bug (the
wrong expert's weights, a missing LoRA delta, a wrong scalar) changes results by 1e-3 to 1 while these bounds
are 1e-6 to 1e-4: orders of magnitude apart.

Comparisons that are exact by construction (the same operations on the same inputs, e.g. a call repeated, or
threads vs. sequential calls of the same function) assert equality instead, and say why.

Set MSDDA_TOLERANCE_LOG=/some/file to append one JSON line per check (test, what, error, bound, ratio; for
``assert_differ`` the ratio is factor x bound / difference): that is how the worst ratios per CPU path are
collected. A check passes with ratio <= 1 (differ: < 1).
"""
from __future__ import annotations

import json
import os

import torch

__all__ = ["TWIN_MULTIPLE", "DIFFER_FACTOR", "eps", "rounding_bound", "float_error", "twin_bound",
           "lower_precision_bound", "assert_within", "assert_error_below", "assert_differ", "generate_float64"]

# How far apart two float32 evaluations of the same quantity may be, in units of one evaluation's measured
# float32-vs-float64 error. Two evaluations whose errors are of the same size differ by at most 2x that
# (triangle inequality); the rest is room for the compared path's summation order rounding a few times more
# than the reference path's on some CPU path. Measured on eight CPU code paths (ATEN_CPU_CAPABILITY
# default/avx2/avx512, oneDNN AVX2 and SSE4.1, MKL AVX2 and COMPATIBLE, NumPy without AVX2/AVX-512, 1-3 threads):
# the compared paths differ by at most about 2x the reference's float32 error (ratio 0.25 of this bound), while the
# bugs tried (a missing or misrouted LoRA delta, swapped ORT experts, a mix coefficient off by 1e-3) exceed it
# 25x to 25000x.
TWIN_MULTIPLE = 8.0

# "These two results differ" must mean "differ by far more than an equality check would allow": a difference
# below DIFFER_FACTOR x the equality tolerance could be rounding, so it proves nothing.
DIFFER_FACTOR = 10.0


def eps(dtype: torch.dtype = torch.float32) -> float:
    """Machine epsilon: the gap between 1 and the next representable number (twice the unit roundoff u)."""
    return torch.finfo(dtype).eps


def rounding_bound(magnitude, ops: int, dtype: torch.dtype = torch.float32):
    """ops x eps(dtype) x magnitude: the a-priori error bound of a computation of ``ops`` dependent roundings.

    Standard forward error analysis (Higham, Accuracy and Stability of Numerical Algorithms, ch. 3): each
    floating-point operation rounds with relative error at most u = eps/2, so a result built from terms through
    at most n operations errs by at most gamma_n * sum|terms| ~= n u sum|terms|. ``magnitude`` is that sum of
    absolute values (a float, or a tensor for an elementwise bound); using eps = 2u leaves a factor 2 for the
    rounding of inputs and constants into ``dtype``. It is a worst case: actual errors are typically a small
    fraction of it (random-walk accumulation), which is the margin that makes it hold on every CPU.
    """
    return ops * eps(dtype) * magnitude


def float_error(value: torch.Tensor, twin: torch.Tensor) -> float:
    """max |value - twin|, computed in float64: how far a float32 result is from its float64 twin."""
    return (value.double() - twin.double()).abs().max().item()


def twin_bound(reference: torch.Tensor, reference64: torch.Tensor, multiple: float = TWIN_MULTIPLE) -> float:
    """``multiple`` x the measured float32 error of the reference path: max |reference - reference64|.

    ``reference`` is the float32 result of the path a test compares against, ``reference64`` the same path run
    in float64 (networks, inputs and step in float64). Why it is right: see the module docstring (2). The
    measured error is floored at one rounding of the largest value (eps(float32) x max |reference64|), so a
    reference that happens to be exact on this CPU does not demand bitwise equality of the compared path.
    """
    if reference.dtype == torch.float64:
        raise TypeError("twin_bound: the reference must be the low-precision run, its twin the float64 one")
    floor = eps(reference.dtype) * reference64.abs().max().item()
    return multiple * max(float_error(reference, reference64), floor)


def lower_precision_bound(twin_error: float, low_eps: float, multiple: float = 2.0) -> float:
    """Bound for the same computation run in a coarser arithmetic (float16, TensorRT's TF32) against float32.

    ``twin_error`` is the float32 computation's measured error (max |float32 - float64 twin|). To first order a
    computation's rounding error is proportional to the unit roundoff, so the coarse run errs about
    low_eps / eps(float32) times as much (float16: 2^-10 / 2^-23 = 8192); ``multiple`` (2) covers the rounding
    of its inputs and weights into the coarse format and the float32 reference's own error.
    """
    return multiple * (low_eps / eps(torch.float32)) * twin_error


def _log(what: str, err: float, bound: float, ratio: float) -> None:
    path = os.environ.get("MSDDA_TOLERANCE_LOG")
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
    with open(path, "a") as fh:
        fh.write(json.dumps({"test": test, "what": what, "err": err, "bound": bound, "ratio": ratio}) + "\n")


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound, what: str = "") -> float:
    """Assert |actual - expected| <= bound everywhere (bound: a float, or a tensor broadcast elementwise).

    Returns the worst error/bound ratio (<= 1 when it passes)."""
    err = (actual.double() - expected.double()).abs()
    if not torch.isfinite(err).all():
        raise AssertionError(f"{what}: non-finite values ({int((~torch.isfinite(err)).sum())} elements)")
    b = torch.as_tensor(bound, dtype=torch.float64)
    ratio_t = err / b.clamp_min(torch.finfo(torch.float64).tiny)
    ratio = ratio_t.max().item()
    worst = int(ratio_t.argmax())
    worst_err = err.flatten()[worst].item()
    worst_bound = b.expand_as(err).flatten()[worst].item()
    _log(what, worst_err, worst_bound, ratio)
    assert ratio <= 1.0, (f"{what}: |difference| {worst_err:.3g} exceeds the tolerance {worst_bound:.3g} "
                          f"(ratio {ratio:.3g}; max |difference| {err.max().item():.3g})")
    return ratio


def assert_error_below(error: float, bound: float, what: str = "") -> float:
    """Assert a recorded error (e.g. an exporter's max |ONNX Runtime - torch|) is <= bound; returns the ratio."""
    ratio = error / bound if bound > 0 else float("inf")
    _log(what, error, bound, ratio)
    assert error <= bound, f"{what}: error {error:.3g} exceeds the tolerance {bound:.3g} (ratio {ratio:.3g})"
    return ratio


def assert_differ(a: torch.Tensor, b: torch.Tensor, bound: float, what: str = "",
                  factor: float = DIFFER_FACTOR) -> float:
    """Assert max |a - b| > factor x bound: a and b really differ, by far more than rounding could explain and
    than the equality tolerance ``bound`` of the same comparison would let through. Returns the difference."""
    diff = float_error(a, b)
    _log(f"differ: {what}", diff, factor * bound, factor * bound / diff if diff > 0 else float("inf"))
    assert diff > factor * bound, (f"{what}: max |difference| {diff:.3g} is not above {factor:g} x the "
                                   f"tolerance {bound:.3g}: the two could be equal up to rounding")
    return diff


# ---------------------------------------------------------------------------------------------------------------
# float64 twins of the runtime
# ---------------------------------------------------------------------------------------------------------------
def generate_float64(engine, **kwargs):
    """``engine.generate(**kwargs)`` for an Engine built with dtype=torch.float64: the float64 twin of a float32
    Engine's generate (the same networks converted to float64, the same seeds, x_T and noise values). A float64
    Engine steps with the float64 definition ``fused_expert_step_ref`` (same arguments, same Philox noise)."""
    if engine.dtype != torch.float64:
        raise TypeError(f"generate_float64 needs an Engine built with dtype=torch.float64, not {engine.dtype}")
    return engine.generate(**kwargs)
