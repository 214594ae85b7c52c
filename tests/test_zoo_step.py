"""The step-level experts' recipe (bench/zoo/step.py): its fit target on tiny cases against brute force, and the
zoo's "step" flavour paths."""
from __future__ import annotations

import math

import pytest
import torch

from bench.zoo.step import weighted_moments, weighted_nll
from msdda import zoo
from tolerance import assert_within, rounding_bound


def _case(seed: int = 0, m: int = 5, b: int = 3):
    g = torch.Generator().manual_seed(seed)
    samples = torch.randn(m, b, 1, 2, 2, generator=g, dtype=torch.float64) * 0.7 + 0.3
    log_w = torch.randn(m, b, generator=g, dtype=torch.float64) * 3.0
    return samples, log_w


def test_weighted_moments_match_brute_force():
    samples, log_w = _case()
    m, b = log_w.shape
    mean, var, ess = weighted_moments(samples, log_w)
    for j in range(b):
        w = [math.exp(float(log_w[i, j])) for i in range(m)]
        w = [x / sum(w) for x in w]
        expected_ess = torch.tensor(1.0 / sum(x * x for x in w), dtype=torch.float64)
        assert_within(ess[j], expected_ess, rounding_bound(m, 4 * m, torch.float64), "ess")
        for p in range(4):
            xs = [float(samples[i, j].flatten()[p]) for i in range(m)]
            mu = sum(wi * xi for wi, xi in zip(w, xs))
            v = sum(wi * (xi - mu) ** 2 for wi, xi in zip(w, xs))
            mag = sum(abs(xi) for xi in xs) + 1.0
            assert_within(mean[j].flatten()[p], torch.tensor(mu, dtype=torch.float64),
                          rounding_bound(mag, 4 * m, torch.float64), "mean")
            assert_within(var[j].flatten()[p], torch.tensor(v, dtype=torch.float64),
                          rounding_bound(mag * mag, 8 * m, torch.float64), "var")


def test_ess_limits():
    samples, _ = _case(m=6)
    _, _, ess_uniform = weighted_moments(samples, torch.zeros(6, 3, dtype=torch.float64))
    assert torch.equal(ess_uniform, torch.full((3,), 6.0, dtype=torch.float64)) or \
        (ess_uniform - 6.0).abs().max() <= rounding_bound(6.0, 12, torch.float64)
    one_hot = torch.full((6, 3), -1e4, dtype=torch.float64)
    one_hot[2] = 0.0
    mean, var, ess = weighted_moments(samples, one_hot)
    assert torch.equal(mean, samples[2]) and torch.equal(var, torch.zeros_like(var))
    assert torch.equal(ess, torch.ones(3, dtype=torch.float64))


def test_weighted_nll_is_the_weighted_proposal_nll_and_minimised_at_the_moments():
    samples, log_w = _case(seed=1)
    w = torch.softmax(log_w, 0).view(*log_w.shape, 1, 1, 1)
    tm, tv, _ = weighted_moments(samples, log_w)
    g = torch.Generator().manual_seed(3)
    mu = tm + 0.5 * torch.randn(tm.shape, generator=g, dtype=torch.float64)
    var = tv * torch.exp(torch.randn(tv.shape, generator=g, dtype=torch.float64))
    brute = (w * 0.5 * (var.log() + (samples - mu).pow(2) / var)).sum(0)
    mag = (0.5 * (var.log().abs() + (samples - mu).pow(2) / var)).sum(0)
    assert_within(weighted_nll(mu, var, tm, tv), brute, rounding_bound(mag, 16 * samples.shape[0], torch.float64),
                  "moment form vs brute force")
    # the minimiser: zero gradient at (m, v), and every perturbation costs
    mu0, lv0 = tm.clone().requires_grad_(True), tv.log().clone().requires_grad_(True)
    weighted_nll(mu0, lv0.exp(), tm, tv).sum().backward()
    assert mu0.grad.abs().max() <= rounding_bound(1.0, 16, torch.float64)
    assert lv0.grad.abs().max() <= rounding_bound(1.0, 16, torch.float64)
    at_min = weighted_nll(tm, tv, tm, tv)
    for d_mu, d_lv in ((0.01, 0.0), (-0.01, 0.0), (0.0, 0.05), (0.0, -0.05)):
        assert (weighted_nll(tm + d_mu * tv.sqrt(), tv * math.exp(d_lv), tm, tv) > at_min).all()


def test_step_flavour_paths():
    step = zoo.zoo_paths(flavour="step")
    assert tuple(step) == ("base",) + zoo.OBJECTIVES
    assert step["base"] == zoo.zoo_paths()["base"]
    assert all(step[k].parent == zoo.flavour_dir("step") == zoo.ZOO_DIR / "step" for k in zoo.OBJECTIVES)
    assert zoo.zoo_paths(flavour="default") == zoo.zoo_paths()
    with pytest.raises(ValueError, match="unknown zoo flavour"):
        zoo.zoo_paths(flavour="nope")


@pytest.mark.parametrize("name", zoo.OBJECTIVES)
def test_shipped_step_experts(name):
    """The step flavour's experts ship as small safetensors UNets of the base's architecture."""
    import json

    folder = zoo.zoo_paths(flavour="step")[name] / "unet"
    weights = folder / "diffusion_pytorch_model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= 3.2e6
    ignore = {"_name_or_path", "_diffusers_version"}
    cfg = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k not in ignore}
    base = {k: v for k, v in json.loads((zoo.zoo_paths()["base"] / "unet" / "config.json").read_text()).items()
            if k not in ignore}
    assert cfg == base
