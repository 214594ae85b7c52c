"""Bad elements: counted cheaply on the device, explained on the host only when something failed.

A composed step is undefined where the precision P = sum_k c_k/var_k <= 0, where zero-variance experts have
sum c <= 0, or where a value is NaN/Inf (ARCHITECTURE.md section 1). The kernels only count such elements (one
int32 on the device); these functions turn a count into one line that names the coefficients:

- ``product_moments_ref``: the float64 moments of the product, shared by ``compose_gaussians_ref`` (the
  definition) and the explanations.
- ``explain_bad``: the one-line description of what failed, where.
- ``finish_check``, ``check_coeff_finite``, ``raise_if_bad``: when to raise.
"""
from __future__ import annotations

import torch

from .args import ComposeArgs

__all__ = ["check_coeff_finite", "explain_bad", "finish_check", "format_coeff", "product_moments_ref",
           "raise_if_bad"]


def format_coeff(coeff: torch.Tensor, samples=None) -> str:
    """'c = [1.0, -0.5]' (coeff [1, K]) or per-sample rows for coeff [B, K]; non-positive c_k are named."""
    c = coeff.detach().double().cpu()
    rows = range(c.shape[0]) if c.shape[0] > 1 else [0]
    if samples is not None and c.shape[0] > 1:
        rows = samples
    parts = []
    for i, b in enumerate(rows):
        if i == 4:
            parts.append("...")
            break
        vals = c[b].tolist()
        bad = ", ".join(f"c_{k}={v:.6g}" for k, v in enumerate(vals) if not v > 0)
        where = f"sample {b}: " if c.shape[0] > 1 else ""
        parts.append(f"{where}c = [{', '.join(f'{v:.6g}' for v in vals)}] (sum {sum(vals):.6g}"
                     + (f"; c_k <= 0 or NaN: {bad})" if bad else ")"))
    return "; ".join(parts)


def product_moments_ref(mean, var, coeff, dtype=torch.float64):
    """Moments of the product of Gaussians, computed in ``dtype`` (float64: the definition; float32: the torch
    path's careful fallback, the kernel's precision).

    mean [K, B, N], var [Kv, Bv, Nv], coeff [Bc, K] -> (mu [B, N], P [B, N], has_zero [B, N], ok [B, N]) where
    has_zero marks the zero-variance limit (then mu is that limit and P is meaningless) and ok is False where the
    step is undefined (P <= 0, a zero-variance set with sum c <= 0, negative or non-finite var or mean)."""
    m = mean.to(dtype)
    v = var.to(dtype)
    c = coeff.to(dtype).t()[:, :, None]  # [K, Bc, 1]
    zero = v == 0
    w = torch.where(zero, 0.0, c / torch.where(zero, 1.0, v))
    prec = w.sum(0) + torch.zeros_like(m[0])
    mu = (w * m).sum(0) / prec
    czero = torch.where(zero, c, 0.0).sum(0) + torch.zeros_like(m[0])
    mzero = torch.where(zero, c * m, 0.0).sum(0)
    has0 = zero.any(0) & torch.ones_like(m[0], dtype=torch.bool)
    mu = torch.where(has0, mzero / czero, mu)
    good_in = (torch.isfinite(m) & torch.isfinite(v) & (v >= 0)).all(0)
    ok = good_in & torch.where(has0, czero > 0, prec > 0) & torch.isfinite(c).all(0)
    return mu, prec, has0, ok


def explain_bad(what: str, a: ComposeArgs, nbad: int, names=("mean", "var")) -> str:
    """One-line description of the failed elements of ``a`` (host, float64; called only after ``nbad`` > 0 were
    counted). ``names`` are what the message calls the means and variances (the fused step's are mu_k, var_k)."""
    mean, var, coeff = a.mean.cpu(), a.var.cpu(), a.coeff.cpu()
    B, N = mean.shape[1], mean.shape[2]
    total = B * N
    _, prec, has0, _ = product_moments_ref(mean, var, coeff)
    m_bad = (~torch.isfinite(mean.double())).any(0)
    v_bad = (~torch.isfinite(var.double())).any(0).expand(B, N)
    v_neg = (var.double() < 0).any(0).expand(B, N)
    p_bad = torch.where(has0, torch.zeros_like(has0), ~(prec > 0)) & ~m_bad & ~v_bad & ~v_neg
    z_bad = torch.zeros(B, N, dtype=torch.bool)
    if a.noise is not None:
        z_bad = ~torch.isfinite(a.noise.cpu().double())
    zc = torch.where(var.double() == 0, coeff.double().t()[:, :, None], 0.0).sum(0).expand(B, N)
    l_bad = has0 & ~(zc > 0) & ~m_bad & ~v_bad & ~v_neg
    failed = m_bad | v_bad | v_neg | p_bad | l_bad | z_bad
    samples = sorted(set(torch.nonzero(failed)[:, 0].tolist()))
    msgs = []
    if not torch.isfinite(coeff).all():
        msgs.append("non-finite coefficients")
    for name, mask in ((f"NaN/Inf in {names[0]}", m_bad), (f"NaN/Inf in {names[1]}", v_bad),
                       (f"negative {names[1]}", v_neg),
                       ("NaN/Inf in noise", z_bad)):
        if mask.any():
            msgs.append(f"{name} at {int(mask.sum())} of {total} elements")
    if p_bad.any():
        msgs.append(f"precision P = sum_k c_k/var_k <= 0 at {int(p_bad.sum())} of {total} elements")
    if l_bad.any():
        msgs.append(f"zero-variance experts with sum of c_k <= 0 at {int(l_bad.sum())} of {total} elements")
    if not msgs:  # fine in float64, not in the float32 the step computes in
        msgs.append(f"{nbad} of {total} elements failed in float32 (P rounds to <= 0 or x_prev overflows)")
        samples = None
    where = f" (samples {samples[:8]}{'...' if len(samples) > 8 else ''})" if samples else ""
    return f"{what}: {'; '.join(msgs)}{where}; coefficients: {format_coeff(coeff, samples or None)}"


def raise_if_bad(error_count: torch.Tensor, coeff, what: str = "sampling") -> None:
    """Raise ValueError if the deferred check (``validate=False, error_count=...``) counted any bad element.

    error_count: int32 tensor [1] (one host sync); coeff: the c_k used ([K] or [B, K]), named in the message."""
    n = int(error_count.item())
    if n:
        c = coeff if isinstance(coeff, torch.Tensor) else torch.tensor(coeff, dtype=torch.float64)
        c = c.reshape(-1, c.shape[-1]) if c.dim() else c.reshape(1, 1)
        raise ValueError(f"{what}: {n} elements had precision P = sum_k c_k/var_k <= 0 or a non-finite value; "
                         f"coefficients: {format_coeff(c)}")


def finish_check(nbad: int, validate: bool, error_count, explain) -> None:
    """Add nbad into error_count (if given); with validate raise ValueError(explain(nbad)) if nbad > 0."""
    if error_count is not None and nbad:
        error_count.add_(nbad)
    if validate and nbad:
        raise ValueError(explain(nbad))


def check_coeff_finite(what: str, coeff: torch.Tensor, validate: bool) -> None:
    """With validate, NaN/Inf coefficients held on the host are reported before the launch. On a GPU (no extra
    sync) and without validate, the kernel counts the elements they spoil like any other bad element."""
    if validate and coeff.device.type == "cpu" and not bool(torch.isfinite(coeff).all()):
        raise ValueError(f"{what}: non-finite coefficients; coefficients: {format_coeff(coeff)}")
