"""The known-optimum benchmark (bench/known_optimum.py): its quick setting, and the relations the committed full
run shows, asserted so that the benchmark cannot silently stop measuring.

- msdda's transition equals the exact step-level optimum up to float rounding at every weight (float64 Engine,
  and the float32 Engine within float32 rounding), and its objective equals the optimum's.
- mpa's KL and objective gap are far from zero wherever the curvatures differ, and zero (rounding) in the
  equal-curvature control, where msdda and mpa give the same samples.
- The recorded runs are Engine.generate's (the same x_0 bit for bit), the measurement detects a wrong expert,
  and the closed forms (the mixture's posterior mean, the tilt) agree with numerical quadrature.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from bench import known_optimum as entry
from bench.quality import analytic_problem as ap
from bench.quality import known_optimum as ko
from tolerance import DIFFER_FACTOR, assert_error_below, eps, rounding_bound

D = math.prod(ap.SAMPLE_SHAPE)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The --quick run (JSON read back from disk), with the fused step's float32 torch path instead of the
    Triton interpreter (CoDe, RGG and the float32 Engine use it; the step itself is tested against its
    definition in test_fused_step.py) and one torch thread (tiny tensors: more threads only wait)."""
    from msdda.kernels import launch

    out = tmp_path_factory.mktemp("known_optimum") / "quick.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(launch, "TRITON_ON_CPU", False)
            ko.run(ko.QUICK, out, log=lambda *_: None, figure=False)
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


def kl_rounding_bound(steps: int, dtype: torch.dtype = torch.float64) -> float:
    """What rounding alone can leave in a KL that is exactly 0, per state: d elements, each computing
    log(v_b) - log(v_a) + (v_a + dm^2)/v_b - 1 in about 8 dependent roundings of terms as large as
    2 |log v| + 2 (v down to the smallest posterior variance of the run)."""
    problem = ap.make_problem([1.0])
    ts, prev = ap.step_timesteps(steps)
    smallest = min((1 - problem.abar(tp)) / (1 - problem.abar(t)) * (1 - problem.abar(t) / problem.abar(tp))
                   for t, tp in zip(ts, prev) if tp >= 0)
    return rounding_bound(D * (2 * abs(math.log(smallest)) + 2), ops=8, dtype=dtype)


def float32_kl_bound(steps: int) -> float:
    """KL of the float32 Engine's msdda step from the float64 optimum: its mean and standard deviation carry
    float32 rounding, about ops x eps32 x |x| (|x| <= 6: x_T is standard normal, the data within [-1.2, 1.2])
    with 8 dependent roundings through network output and step (as above); the KL is second order in them,
    sum over elements of dm^2 / (2 v) + (dsd / sd)^2, largest at the smallest variance."""
    problem = ap.make_problem([1.0])
    ts, prev = ap.step_timesteps(steps)
    smallest = min((1 - problem.abar(tp)) / (1 - problem.abar(t)) * (1 - problem.abar(t) / problem.abar(tp))
                   for t, tp in zip(ts, prev) if tp >= 0)
    dx = 8 * eps(torch.float32) * 6.0
    return D * (dx ** 2 / (2 * smallest) + dx ** 2 / smallest)


def test_msdda_is_the_exact_optimum_at_every_weight(quick):
    bound64 = kl_rounding_bound(ko.QUICK.steps)
    bound32 = float32_kl_bound(ko.QUICK.steps)
    for name, case in quick["cases"].items():
        for p in case["points"]:
            m = p["methods"]["msdda"]
            assert_error_below(m["kl_to_optimum"]["max_abs_per_step_state"], bound64, f"{name} {p['weights']}")
            # the objective: the optimum's to rounding (|objective| ~ 1e2 summed over steps and elements)
            gap = m["objective_minus_optimum"]["mean"]
            assert_error_below(abs(gap), rounding_bound(abs(p["optimum"]["objective"]["mean"]), ops=8 * D,
                                                        dtype=torch.float64), f"{name} objective")
            assert abs(m["objective"]["mean"] - p["optimum"]["objective"]["mean"]) <= p["optimum"]["objective"]["ci95"]
            assert m["final"]["sw2"] <= rounding_bound(6.0, ops=16 * ko.QUICK.steps, dtype=torch.float64)
            f32 = p["methods"]["msdda_float32"]
            assert_error_below(f32["kl_to_optimum"]["max_abs_per_step_state"], bound32, f"{name} float32")
        assert quick["summary"][name]["msdda_objective_within_interval"]


def test_mpa_is_not_the_optimum_where_curvatures_differ(quick):
    bound64 = kl_rounding_bound(ko.QUICK.steps)
    for name in ("distinct", "k3"):
        for p in quick["cases"][name]["points"]:
            mixed = sum(w > 0 for w in p["weights"].values()) >= 2
            mpa = p["methods"]["mpa"]
            if not mixed:   # one expert at weight 1: mpa and msdda both run that expert alone
                assert_error_below(abs(mpa["kl_to_optimum"]["sum_mean"]), ko.QUICK.steps * bound64, "endpoint")
                continue
            kl = mpa["kl_to_optimum"]["sum_mean"]
            assert kl > DIFFER_FACTOR * ko.QUICK.steps * bound64 and kl > 0.1, (name, p["weights"], kl)
            gap = mpa["objective_minus_optimum"]
            assert gap["mean"] + gap["ci95"] < 0, (name, p["weights"], gap)     # significantly below
            # the optimum's objective at mpa's own states exceeds mpa's by exactly beta x the KL
            assert_error_below(abs(mpa["objective_gap_at_own_states"] - ko.QUICK.beta * kl),
                               rounding_bound(abs(mpa["objective"]["mean"]) + kl, ops=8 * D, dtype=torch.float64),
                               "objective gap = beta KL")
            assert p["msdda_vs_mpa_final_max_abs_diff"] > 1e3 * rounding_bound(6.0, 16, torch.float64)


def test_equal_curvatures_make_msdda_and_mpa_coincide(quick):
    bound64 = kl_rounding_bound(ko.QUICK.steps)
    for p in quick["cases"]["equal"]["points"]:
        assert_error_below(abs(p["methods"]["mpa"]["kl_to_optimum"]["sum_mean"]), ko.QUICK.steps * bound64,
                           f"mpa {p['weights']}")
        assert_error_below(p["msdda_vs_mpa_final_max_abs_diff"],
                           rounding_bound(6.0, ops=16 * ko.QUICK.steps, dtype=torch.float64), "msdda vs mpa")


def test_recorded_runs_are_engine_generate_and_the_baselines_ran(quick):
    for name, case in quick["cases"].items():
        # exact by construction: the recording loop is generate's combine on the same inputs (float64: the
        # same fused_expert_step_ref calls; float32: the prepared plan, bit-identical to fused_expert_step)
        assert quick["summary"][name]["generate_max_abs_diff"] == 0.0
        for p in case["points"]:
            assert {"msdda", "mpa", "base", "code", "rgg", *(f"expert:{e}" for e in case["objectives"])} \
                <= set(p["methods"])
    half = next(p for p in quick["cases"]["distinct"]["points"] if p["weights"]["r1"] == 0.5)
    base = half["methods"]["base"]["final"]["terminal_reward"]
    for m in ("code", "rgg"):   # both use the rewards: their samples score above the base's
        r = half["methods"][m]["final"]["terminal_reward"]
        assert r["mean"] - r["ci95"] > base["mean"] + base["ci95"], (m, r, base)


def test_the_measurement_sees_a_wrong_expert():
    """An Engine whose second expert has the wrong curvature: msdda's KL to the optimum is far from 0."""
    steps, n = 6, 16
    problem = ap.make_problem([0.5, 4.0])
    wrong = ap.make_engine(problem, steps, curvatures=[0.5, 4.0 * (1 + 1e-3)])
    x_T, z = ko.shared_noise(torch.arange(n), steps)
    weights = (0.5, 0.5)
    tr = ko.trace_strategy(wrong, "msdda", {"r1": 0.5, "r2": 0.5}, x_T, z, steps, check_generate=False)
    opt = ko.optimal_chain(problem, weights, x_T, z, steps)
    kl = ko.step_measures(problem, tr, weights, steps)["kl_sum"]
    assert float(kl.min()) > DIFFER_FACTOR * steps * kl_rounding_bound(steps)
    right = ap.make_engine(problem, steps)
    tr = ko.trace_strategy(right, "msdda", {"r1": 0.5, "r2": 0.5}, x_T, z, steps, check_generate=False)
    kl = ko.step_measures(problem, tr, weights, steps)["kl_sum"]
    assert_error_below(float(kl.abs().max()), steps * kl_rounding_bound(steps), "right experts")
    assert opt.states.shape == tr.states.shape


def test_closed_forms_match_quadrature():
    """The mixture's posterior mean and the tilted Gaussian against trapezoid sums on a fine 1-D grid (a smooth,
    Gaussian-decaying integrand on a wide grid: the trapezoid error is far below the summation's rounding)."""
    grid = torch.linspace(-12.0, 12.0, 48001, dtype=torch.float64)
    n = grid.numel()
    mixture = ap.GaussianMixture(means=torch.tensor([[-0.6], [0.2], [0.9]], dtype=torch.float64),
                                 stds=torch.tensor([0.15, 0.25, 0.35], dtype=torch.float64),
                                 weights=torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    prior = sum(w * torch.exp(-0.5 * ((grid - m) / s) ** 2) / s
                for w, m, s in zip(mixture.weights, mixture.means[:, 0], mixture.stds))
    for abar in (0.9, 0.3, 0.01):
        for x in (-1.5, 0.1, 2.0):
            like = torch.exp(-0.5 * (x - math.sqrt(abar) * grid) ** 2 / (1 - abar))
            numeric = torch.trapezoid(grid * prior * like, grid) / torch.trapezoid(prior * like, grid)
            exact = mixture.posterior_mean(torch.tensor([[x]], dtype=torch.float64), abar)[0, 0]
            assert_error_below(abs(float(numeric - exact)), rounding_bound(12.0, ops=n, dtype=torch.float64),
                               f"posterior mean abar={abar} x={x}")
    problem = ap.make_problem([1.0], beta=0.7)
    base = ap.StepGaussian(mean=torch.tensor([[0.3]], dtype=torch.float64),
                           var=torch.tensor([[0.05]], dtype=torch.float64))
    a, g = torch.tensor(3.0, dtype=torch.float64), -0.4
    tilted = ap.tilted_step(problem, base, a, a * g)
    dens = torch.exp(-0.5 * (grid - 0.3) ** 2 / 0.05 - float(a) * (grid - g) ** 2 / 0.7)
    z = torch.trapezoid(dens, grid)
    mean = torch.trapezoid(grid * dens, grid) / z
    var = torch.trapezoid((grid - mean) ** 2 * dens, grid) / z
    assert_error_below(abs(float(mean - tilted.mean[0, 0])), rounding_bound(12.0, ops=n, dtype=torch.float64), "mean")
    assert_error_below(abs(float(var - tilted.var[0, 0])), rounding_bound(144.0, ops=n, dtype=torch.float64), "var")


def test_weight_grid():
    assert ko.weight_grid(2, 4) == [(1.0, 0.0), (0.75, 0.25), (0.5, 0.5), (0.25, 0.75), (0.0, 1.0)]
    k3 = ko.weight_grid(3, 4)
    assert len(k3) == 15 and all(sum(w) == 1.0 for w in k3)


def test_bad_input_exits_2_with_one_line(capsys):
    assert entry.main(["--quick", "--out", "results.txt"]) == 2
    assert entry.main(["--samples", "1"]) == 2
    assert entry.main(["--threads", "0"]) == 2
    assert entry.main(["--cases", "distinct,nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("bench/known_optimum.py: ") for line in err)


def test_merged_parts_equal_one_run(quick, tmp_path):
    """Cases run in separate processes (--cases) merge into the report one run of them all writes."""
    parts = []
    for names in (["distinct"], ["equal", "k3"]):
        part = dict(quick, cases={n: quick["cases"][n] for n in names}, elapsed_s=1.0)
        parts.append(tmp_path / f"{names[0]}.json")
        parts[-1].write_text(json.dumps(part))
    merged = ko.merge(parts, tmp_path / "merged.json", figure=False)
    assert merged["cases"] == quick["cases"] and merged["summary"] == quick["summary"]
    with pytest.raises(ValueError, match="two parts"):
        ko.merge([parts[0], parts[0]], tmp_path / "twice.json", figure=False)
