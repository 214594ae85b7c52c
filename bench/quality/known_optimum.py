"""The known-optimum benchmark (issue 17, part 1): every method against the exact step-level optimum.

For each case (a set of curvatures) and each weight vector w (sum w = 1):
- The exact optimal chain: from the same x_T and step noise as every method, x_{t-1} = m* + sqrt(v*) z with
  (m*, v*) = :func:`analytic_problem.optimum_step` (the base step tilted by sum_k w_k r_k, in float64).
- Each Engine strategy (msdda, mpa, base, expert:NAME) runs through ``Engine.denoiser`` (the experts as
  networks behind the torch backend), ``msdda.sampling.sample`` and the step the Engine itself uses
  (``fused_expert_step_ref`` in a float64 Engine, ``fused_expert_step`` in float32; ``mix_outputs`` first for
  mpa). The recording step calls that step three times per state: with the run's noise (the trajectory), with
  noise 0 (x = the transition's mean) and with noise 1 (x = mean + sd), so the transition's Gaussian is read off
  the shipped composition itself, not recomputed. Every recorded run's x_0 is compared with
  ``Engine.generate(latents=x_T, noise=...)`` of the same strategy and weights (``generate_max_abs_diff``).
- Per state x_t of a method's own trajectories: KL(method's step || optimum's step) (closed form), and the
  step-level objective E[sum_k w_k r_k(x_{t-1})] - beta KL(method's step || base step) (closed form, given
  x_t). Summed over the steps that add noise (the last DDPM step is deterministic in every method: a point
  mass, which no tilt moves), then averaged over trajectories with a 95% interval (1.96 standard errors), and
  paired with the optimal chain's (same noise).
- Final samples: the distance of the mean and covariance of x_0 from the optimal chain's, and a sliced
  Wasserstein-2 distance; ``floor`` is the same distances between the optimal chain and a second optimal chain
  with other seeds (what zero looks like at this sample size).
- CoDe and RGG (bench/quality/samplers.py, unchanged; in the float32 Engine, as their step is the float32
  kernel) with the same rewards r_k on their x0 estimates (their
  design: terminal-reward methods) and RGG scale 1/beta (the first-order step-level tilt): final-sample metrics
  only. CoDe's block-wise best-of-N transition has no closed-form density, and the shipped samplers return only
  x_0, so no per-step KL or step-level objective is reported for them.
- Soup is not run: the experts are closed-form functions of (a_k, g_k) with no shared trained
  parameterisation, so "averaging their parameters" would measure our choice of parameters, not a method
  (averaging (a, a g) would be exact, averaging (a, g) would not).
"""
from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from msdda.atomic import atomic_write_bytes, atomic_write_json
from msdda.kernels import fused_expert_step, fused_expert_step_ref, philox_normal
from msdda.sampling import sample
from msdda.strategies import mix_outputs

from .analytic_problem import (SAMPLE_SHAPE, Problem, StepGaussian, base_step, expected_rewards, gaussian_kl_sum,
                               make_engine, make_problem, optimum_step, step_timesteps)
from .samplers import code_sample, rgg_sample

__all__ = ["Settings", "FULL", "QUICK", "CASES", "weight_grid", "run", "merge", "plot", "markdown", "Trace",
           "trace_strategy", "optimal_chain", "sliced_w2"]

Z95 = 1.959963984540054
FLOOR_SEED_SHIFT = 1 << 30          # the second optimal chain's seeds: other Philox keys than the runs'


@dataclass(frozen=True)
class Settings:
    samples: int = 1024             # trajectories per method and weight
    steps: int = 50                 # DDPM steps (the zoo's default)
    grid: int = 16                  # K = 2 weights w_1 = i / grid (dyadic: exact in float32 and float64)
    k3_grid: int = 4                # K = 3: the simplex lattice with denominator k3_grid
    beta: float = 1.0
    seed: int = 0
    code_candidates: int = 8
    code_block: int = 5
    sw_directions: int = 128
    baselines: bool = True          # run CoDe and RGG
    float32: bool = True            # also msdda in a float32 Engine


FULL = Settings()
QUICK = Settings(samples=128, steps=10, grid=4, k3_grid=2, code_block=4, sw_directions=64)

# (name, curvatures a_k, what it is)
CASES = (
    ("distinct", (0.5, 4.0), "two objectives, curvatures 0.5 and 4: the experts' variances differ"),
    ("equal", (2.0, 2.0), "control: equal curvatures, so equal variances, where msdda and mpa must coincide"),
    ("k3", (0.5, 2.0, 8.0), "three objectives, curvatures 0.5, 2 and 8"),
)


def compositions(k: int, total: int):
    """Every k-tuple of non-negative integers summing to ``total``, the first entry descending."""
    if k == 1:
        yield (total,)
        return
    for i in range(total, -1, -1):
        for rest in compositions(k - 1, total - i):
            yield (i, *rest)


def weight_grid(k: int, denominator: int) -> list[tuple[float, ...]]:
    """Every w with sum 1 whose entries are multiples of 1/denominator (K = 2: denominator + 1 points)."""
    return [tuple(c / denominator for c in comp) for comp in compositions(k, denominator)]


# ------------------------------------------------------------------------------------------------ trajectories
@dataclass
class Trace:
    """One strategy's run: states x_T..x_0 [steps + 1, B, *S] and each step's transition (mean, var) [steps, B, *S]."""
    states: torch.Tensor
    means: torch.Tensor
    variances: torch.Tensor
    generate_max_abs_diff: float = math.nan
    base_steps: list | None = None       # the base step at each state, computed once per trace (base_steps_of)


def base_steps_of(problem: Problem, trace: Trace, steps: int) -> list[StepGaussian]:
    """The ideal base step at each of the trace's states (cached on the trace: every weight reuses them)."""
    if trace.base_steps is None:
        ts, prev = step_timesteps(steps)
        trace.base_steps = [base_step(problem, trace.states[i], t, tp) for i, (t, tp) in enumerate(zip(ts, prev))]
    return trace.base_steps


def shared_noise(seeds: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x_T and every step's z as the Engine draws them for these seeds (Philox offsets 0 and 1 + i), float64."""
    x_T = philox_normal(seeds, 0, SAMPLE_SHAPE).double()
    z = torch.stack([philox_normal(seeds, 1 + i, SAMPLE_SHAPE) for i in range(steps)]).double()
    return x_T, z


def trace_strategy(engine, strategy: str, weights: dict | None, x_T: torch.Tensor, z: torch.Tensor,
                   steps: int, *, check_generate: bool = True) -> Trace:
    """Run ``strategy`` through the Engine's networks, loop and step, recording each transition's Gaussian.

    The recording combine is Engine.generate's (mix_outputs for mpa, the per-sample coefficients as float32,
    the Engine's step function for its dtype); with ``check_generate`` the run's x_0 is compared with
    Engine.generate's for the same latents and noise."""
    batch = x_T.shape[0]
    dtype = engine.dtype
    plan = engine.plan(strategy, weights if strategy in ("msdda", "mpa") else None, batch=batch)
    cond = engine.conditioning(batch, cfg=False, class_labels=0)
    denoise = engine.denoiser(plan, cond, False)
    timesteps, scalars = engine.step_tables(steps)
    step_coeff = (plan.coeff if plan.kind == "product" else torch.ones(batch, 1, dtype=torch.float64)).float()
    mix_coeff = plan.coeff.float()
    step_fn = fused_expert_step_ref if dtype == torch.float64 else fused_expert_step
    noise = z.to(dtype)
    states, means, variances = [x_T.to(dtype)], [], []

    def combine(raw: torch.Tensor, x_t: torch.Tensor, i: int) -> torch.Tensor:
        if plan.kind == "mix":
            raw = mix_outputs(raw, mix_coeff)
        mean = step_fn(raw, x_t, step_coeff, scalars[i], noise=torch.zeros_like(x_t))
        plus_sd = step_fn(raw, x_t, step_coeff, scalars[i], noise=torch.ones_like(x_t))
        x_prev = step_fn(raw, x_t, step_coeff, scalars[i], noise=noise[i])
        means.append(mean)
        variances.append((plus_sd.double() - mean.double()) ** 2)
        states.append(x_prev)
        return x_prev

    with torch.inference_mode():
        x0 = sample(denoise, combine, x_T.to(dtype), timesteps)
    trace = Trace(states=torch.stack(states).double(), means=torch.stack(means).double(),
                  variances=torch.stack(variances))
    if check_generate:
        out = engine.generate(class_labels=0, weights=weights if strategy in ("msdda", "mpa") else None,
                              strategy=strategy, num_images=batch, steps=steps, guidance_scale=1.0,
                              latents=x_T.to(dtype), noise=noise, output_type="latent")
        trace.generate_max_abs_diff = float((out.latents.double() - x0.double()).abs().max())
    return trace


def optimal_chain(problem: Problem, weights: Sequence[float], x_T: torch.Tensor, z: torch.Tensor,
                  steps: int) -> Trace:
    """The exact optimal chain in float64 from x_T with step noise z."""
    ts, prev = step_timesteps(steps)
    x, states, means, variances = x_T, [x_T], [], []
    for i, (t, tp) in enumerate(zip(ts, prev)):
        opt = optimum_step(problem, x, t, tp, weights)
        x = opt.mean + opt.var.sqrt() * z[i]
        states.append(x)
        means.append(opt.mean)
        variances.append(opt.var)
    return Trace(states=torch.stack(states), means=torch.stack(means), variances=torch.stack(variances))


# ------------------------------------------------------------------------------------------------ measurements
def interval(values: torch.Tensor) -> dict:
    """Mean and the half-width of its 95% interval (normal approximation, 1.96 standard errors)."""
    v = values.double()
    half = Z95 * float(v.std(unbiased=True)) / math.sqrt(v.numel()) if v.numel() > 1 else math.nan
    return {"mean": float(v.mean()), "ci95": half}


def step_measures(problem: Problem, trace: Trace, weights: Sequence[float], steps: int) -> dict:
    """Per sample: KL to the optimum summed over the noisy steps, the step-level objective, and the optimum's
    objective at the same states; per step: the mean KL. Plus the last (deterministic) step's distance from the
    optimum's (the base's) mean."""
    ts, prev = step_timesteps(steps)
    w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    kl_sum = torch.zeros(trace.states.shape[1], dtype=torch.float64)
    objective = torch.zeros_like(kl_sum)
    optimum_here = torch.zeros_like(kl_sum)
    kl_per_step, kl_max = [], 0.0
    bases = base_steps_of(problem, trace, steps)
    for i, (t, tp) in enumerate(zip(ts, prev)):
        x_t, base = trace.states[i], bases[i]
        opt = optimum_step(problem, x_t, t, tp, weights, base=base)
        if tp < 0:
            last_step_mean_diff = float((trace.means[i] - opt.mean).abs().max())
            last_step_var_max = float(trace.variances[i].abs().max())
            continue
        step = StepGaussian(mean=trace.means[i], var=trace.variances[i])
        kl = gaussian_kl_sum(step, opt)
        kl_sum += kl
        kl_per_step.append(float(kl.mean()))
        kl_max = max(kl_max, float(kl.abs().max()))   # (float64 rounding makes a zero KL about -1e-16 too)
        objective += expected_rewards(problem, step) @ w - problem.beta * gaussian_kl_sum(step, base)
        optimum_here += expected_rewards(problem, opt) @ w - problem.beta * gaussian_kl_sum(opt, base)
    return {"kl_sum": kl_sum, "kl_per_step": kl_per_step, "kl_max": kl_max, "objective": objective,
            "optimum_here": optimum_here, "last_step_mean_diff": last_step_mean_diff,
            "last_step_var_max": last_step_var_max}


def sliced_w2(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> float:
    """Sliced Wasserstein-2 between two equal-size samples [N, D]: sqrt of the mean over unit directions of the
    one-dimensional W2^2 (sorted projections)."""
    pa = torch.sort(a @ directions.T, dim=0).values
    pb = torch.sort(b @ directions.T, dim=0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def final_measures(problem: Problem, x0: torch.Tensor, x0_opt: torch.Tensor, weights: Sequence[float],
                   directions: torch.Tensor) -> dict:
    a, b = x0.double().flatten(1), x0_opt.double().flatten(1)
    w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    terminal = expected_rewards(problem, StepGaussian(mean=x0.double(), var=torch.zeros_like(x0.double()))) @ w
    return {"mean_dist": float((a.mean(0) - b.mean(0)).norm()),
            "cov_dist": float((torch.cov(a.T) - torch.cov(b.T)).norm()),
            "sw2": sliced_w2(a, b, directions), "terminal_reward": interval(terminal)}


def method_record(problem: Problem, trace: Trace, opt_trace: Trace, opt_measures: dict, weights, steps,
                  directions, *, per_step: bool = False) -> dict:
    m = step_measures(problem, trace, weights, steps)
    kl = {"sum_mean": float(m["kl_sum"].mean()), "max_abs_per_step_state": m["kl_max"]}
    if per_step:
        kl["per_step_mean"] = m["kl_per_step"]
    return {
        "kl_to_optimum": kl,
        "objective": interval(m["objective"]),
        "objective_minus_optimum": interval(m["objective"] - opt_measures["objective"]),
        # at the method's own states the optimum's objective exceeds the method's by exactly beta KL: a check
        "objective_gap_at_own_states": float((m["optimum_here"] - m["objective"]).mean()),
        "last_step_mean_diff": m["last_step_mean_diff"],
        "final": final_measures(problem, trace.states[-1], opt_trace.states[-1], weights, directions),
        "generate_max_abs_diff": trace.generate_max_abs_diff,
    }


def sampler_record(problem: Problem, x0: torch.Tensor, opt_trace: Trace, weights, directions) -> dict:
    return {"kl_to_optimum": None, "objective": None,
            "final": final_measures(problem, x0, opt_trace.states[-1], weights, directions)}


# ------------------------------------------------------------------------------------------------ the run
def run_case(name: str, curvatures: Sequence[float], settings: Settings, log=print) -> dict:
    steps, n = settings.steps, settings.samples
    problem = make_problem(curvatures, beta=settings.beta, seed=settings.seed)
    names = problem.rewards.names
    k = len(names)
    engine = make_engine(problem, steps)
    # CoDe and RGG step with the float32 kernel (fused_expert_step takes no float64), so they run in float32
    engine32 = make_engine(problem, steps, dtype=torch.float32) if settings.float32 or settings.baselines else None
    seeds = torch.arange(n, dtype=torch.int64) + settings.seed * n
    x_T, z = shared_noise(seeds, steps)
    x_T2, z2 = shared_noise(seeds + FLOOR_SEED_SHIFT, steps)
    directions = torch.nn.functional.normalize(
        torch.randn((settings.sw_directions, x_T[0].numel()), generator=torch.Generator().manual_seed(7),
                    dtype=torch.float64), dim=1)
    grid = weight_grid(k, settings.grid if k == 2 else settings.k3_grid)
    fixed = {"base": trace_strategy(engine, "base", None, x_T, z, steps)}
    for e in names:
        fixed[f"expert:{e}"] = trace_strategy(engine, f"expert:{e}", None, x_T, z, steps)
    reward_fns = problem.rewards.reward_fns()
    points = []
    for weights in grid:
        t0 = time.perf_counter()
        wd = dict(zip(names, weights))
        opt = optimal_chain(problem, weights, x_T, z, steps)
        opt2 = optimal_chain(problem, weights, x_T2, z2, steps)
        opt_m = step_measures(problem, opt, weights, steps)
        methods, final = {}, {}
        for strategy in ("msdda", "mpa"):
            tr = trace_strategy(engine, strategy, wd, x_T, z, steps)
            final[strategy] = tr.states[-1]
            methods[strategy] = method_record(problem, tr, opt, opt_m, weights, steps, directions, per_step=True)
        if settings.float32:
            methods["msdda_float32"] = method_record(
                problem, trace_strategy(engine32, "msdda", wd, x_T, z, steps), opt, opt_m, weights, steps,
                directions)
        for label, tr in fixed.items():
            methods[label] = method_record(problem, tr, opt, opt_m, weights, steps, directions)
        if settings.baselines:
            labels, seed_list = [0] * n, [int(s) for s in seeds]
            x0 = code_sample(engine32, labels, seed_list, wd, reward_fns, steps=steps, guidance_scale=1.0,
                             n_candidates=settings.code_candidates, block=settings.code_block)
            methods["code"] = sampler_record(problem, x0, opt, weights, directions)
            x0 = rgg_sample(engine32, labels, seed_list, wd, reward_fns, steps=steps, guidance_scale=1.0,
                            scale=1.0 / settings.beta)
            methods["rgg"] = sampler_record(problem, x0, opt, weights, directions)
        points.append({
            "weights": wd,
            "optimum": {"objective": interval(opt_m["objective"]),
                        "terminal_reward": final_measures(problem, opt.states[-1], opt.states[-1], weights,
                                                          directions)["terminal_reward"]},
            "floor": {key: v for key, v in final_measures(problem, opt2.states[-1], opt.states[-1], weights,
                                                          directions).items() if key != "terminal_reward"},
            # the same noise through both: equal up to rounding exactly where the experts' variances are equal
            "msdda_vs_mpa_final_max_abs_diff": float((final["msdda"] - final["mpa"]).abs().max()),
            "methods": methods,
        })
        kls = {m: methods[m]["kl_to_optimum"]["sum_mean"] for m in ("msdda", "mpa")}
        log(f"  {name} w={tuple(round(v, 4) for v in weights)}: msdda KL {kls['msdda']:.3g}, "
            f"mpa KL {kls['mpa']:.3g} ({time.perf_counter() - t0:.1f} s)")
    return {"curvatures": list(curvatures), "goals": problem.rewards.goals.flatten(1).tolist(),
            "objectives": list(names), "points": points}


def summarize(cases: dict) -> dict:
    """The relations the issue's "done when" names, read off the results."""
    out = {}
    for name, case in cases.items():
        pts = case["points"]
        mixed = [p for p in pts if sum(w > 0 for w in p["weights"].values()) >= 2]   # two experts or more

        def worst(method, key):
            return max(p["methods"][method]["kl_to_optimum"][key] for p in pts)

        s = {
            "msdda_kl_max": worst("msdda", "max_abs_per_step_state"),
            "msdda_objective_within_interval": all(
                abs(p["methods"]["msdda"]["objective"]["mean"] - p["optimum"]["objective"]["mean"])
                <= p["optimum"]["objective"]["ci95"] for p in pts),
            "msdda_objective_max_abs_diff": max(abs(p["methods"]["msdda"]["objective_minus_optimum"]["mean"])
                                                for p in pts),
            "mpa_kl_sum_min_mixed": min(p["methods"]["mpa"]["kl_to_optimum"]["sum_mean"] for p in mixed),
            "mpa_kl_sum_max": max(p["methods"]["mpa"]["kl_to_optimum"]["sum_mean"] for p in pts),
            "mpa_objective_minus_optimum_worst": min(p["methods"]["mpa"]["objective_minus_optimum"]["mean"]
                                                     for p in pts),
            "msdda_vs_mpa_final_max_abs_diff_mixed": max(p["msdda_vs_mpa_final_max_abs_diff"] for p in mixed),
            "generate_max_abs_diff": max(p["methods"][m]["generate_max_abs_diff"] for p in pts
                                         for m in ("msdda", "mpa", "msdda_float32") if m in p["methods"]),
        }
        if "msdda_float32" in pts[0]["methods"]:
            s["msdda_float32_kl_max"] = worst("msdda_float32", "max_abs_per_step_state")
        out[name] = s
    return out


def run(settings: Settings, out: Path, *, cases=CASES, log=print, figure: bool = True) -> dict:
    """Run every case and write ``out`` (JSON) and, with ``figure``, ``out`` with suffix .png."""
    torch.manual_seed(settings.seed)
    t0 = time.perf_counter()
    results = {}
    for name, curvatures, what in cases:
        log(f"{name}: {what}")
        results[name] = dict(run_case(name, curvatures, settings, log=log), description=what)
    report = {
        "benchmark": "known_optimum",
        "settings": asdict(settings),
        "problem": {"sample_shape": list(SAMPLE_SHAPE), "beta": settings.beta, "mixture_components": 3,
                    "scheduler": "DDPM, linear betas 1e-4..0.02, 1000 training steps, variance_type learned",
                    "rewards": "r_k(x) = -a_k ||x - g_k||^2 on x_{t-1}"},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "cases": results,
        "summary": summarize(results),
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, report)
    if figure:
        plot(report, out.with_suffix(".png"))
    return report


def merge(parts: Sequence[Path], out: Path, *, figure: bool = True) -> dict:
    """One report from runs of disjoint subsets of the cases with the same settings (each case is independent
    and seeded on its own, so this equals one run of them all, elapsed time aside: the sum of the parts')."""
    import json

    reports = [json.loads(Path(p).read_text()) for p in parts]
    first = reports[0]
    if any(r["settings"] != first["settings"] for r in reports):
        raise ValueError("the parts were run with different settings")
    cases = {}
    for r in reports:
        if set(r["cases"]) & set(cases):
            raise ValueError(f"case(s) {sorted(set(r['cases']) & set(cases))} appear in two parts")
        cases.update(r["cases"])
    order = [name for name, _, _ in CASES if name in cases] + [n for n in cases if n not in dict.fromkeys(
        name for name, _, _ in CASES)]
    cases = {name: cases[name] for name in order}
    report = dict(first, cases=cases, summary=summarize(cases),
                  elapsed_s=round(sum(r["elapsed_s"] for r in reports), 1),
                  parts=[{"cases": list(r["cases"]), "elapsed_s": r["elapsed_s"]} for r in reports])
    out = Path(out)
    atomic_write_json(out, report)
    if figure:
        plot(report, out.with_suffix(".png"))
    return report


# ------------------------------------------------------------------------------------------------ the tables
def _pm(entry: dict | None, digits: int = 2) -> str:
    return "n/a" if entry is None else f"{entry['mean']:.{digits}f} ± {entry['ci95']:.{digits}f}"


def markdown(report: dict) -> str:
    """Two tables: the relations per case (over all weights), and every method at one mixed weight per case."""
    lines = ["| case | curvatures | weight points | msdda max KL per state (float64) | msdda max KL per state (float32) "
             "| max abs(msdda objective - optimum's) | mpa KL summed over steps, mixed weights (min - max) "
             "| mpa objective - optimum's, worst | max abs(x_0 msdda - x_0 mpa), mixed weights |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, case in report["cases"].items():
        s = report["summary"][name]
        f32 = s.get("msdda_float32_kl_max")
        lines.append(
            f"| {name} | {', '.join(f'{a:g}' for a in case['curvatures'])} | {len(case['points'])} "
            f"| {s['msdda_kl_max']:.1e} | {'n/a' if f32 is None else f'{f32:.1e}'} "
            f"| {s['msdda_objective_max_abs_diff']:.1e} | {s['mpa_kl_sum_min_mixed']:.3g} - {s['mpa_kl_sum_max']:.3g} "
            f"| {s['mpa_objective_minus_optimum_worst']:.3g} | {s['msdda_vs_mpa_final_max_abs_diff_mixed']:.2g} |")
    for name, case in report["cases"].items():
        k = len(case["objectives"])
        target = 1.0 / k
        point = min(case["points"], key=lambda p: sum((w - target) ** 2 for w in p["weights"].values()))
        w = ", ".join(f"{n} {v:g}" for n, v in point["weights"].items())
        fl = point["floor"]
        lines += ["", f"**{name}** at w = ({w}): the exact optimum's objective {_pm(point['optimum']['objective'])}; "
                      f"sampling floor (a second optimal chain, other seeds): sliced W2 {fl['sw2']:.3f}, "
                      f"mean distance {fl['mean_dist']:.3f}.", "",
                  "| method | KL to the optimum, summed over steps | objective | objective - optimum's (paired) "
                  "| final: sliced W2 | final: mean distance | final: covariance distance | final: sum w_k r_k(x_0) |",
                  "|---|---|---|---|---|---|---|---|"]
        order = ["msdda", "msdda_float32", "mpa", "base"] + [f"expert:{n}" for n in case["objectives"]] + \
            ["code", "rgg"]
        for m in [m for m in order if m in point["methods"]]:
            e = point["methods"][m]
            kl = "n/a" if e["kl_to_optimum"] is None else f"{e['kl_to_optimum']['sum_mean']:.3g}"
            f = e["final"]
            lines.append(f"| {m} | {kl} | {_pm(e['objective'])} | {_pm(e.get('objective_minus_optimum'))} "
                         f"| {f['sw2']:.3f} | {f['mean_dist']:.3f} | {f['cov_dist']:.3f} "
                         f"| {_pm(f['terminal_reward'])} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ the figure
_STYLE = {"msdda": ("tab:red", "-", "o"), "mpa": ("tab:blue", "--", "s"), "base": ("black", ":", None),
          "msdda_float32": ("tab:pink", "-", "x")}
KL_FLOOR = 1e-20        # the figure's lower limit: KLs at float64 rounding are drawn there


def plot(report: dict, path: Path) -> None:
    """The step-level objective (the exact optimum's as a wide grey line), and the KL to the optimum, against
    w_1: the distinct-curvature pair (top) and the equal-curvature control (bottom), one line per method."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [c for c in ("distinct", "equal") if c in report["cases"]]
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 4.2 * len(rows)), dpi=110, squeeze=False)
    for r, name in enumerate(rows):
        case = report["cases"][name]
        pts = case["points"]
        first = case["objectives"][0]
        xs = [p["weights"][first] for p in pts]
        methods = [m for m in pts[0]["methods"] if pts[0]["methods"][m]["objective"] is not None]
        opt = [p["optimum"]["objective"]["mean"] for p in pts]
        axes[r][0].plot(xs, opt, color="grey", lw=6, alpha=0.35, label="exact optimum")
        for m in methods:
            color, ls, marker = _STYLE.get(m, (None, "-.", None))
            obj = [p["methods"][m]["objective"]["mean"] for p in pts]
            ci = [p["methods"][m]["objective"]["ci95"] for p in pts]
            axes[r][0].errorbar(xs, obj, yerr=ci, label=m, color=color, ls=ls, marker=marker, ms=3, capsize=2)
            kl = [max(p["methods"][m]["kl_to_optimum"]["sum_mean"], KL_FLOOR) for p in pts]
            axes[r][1].plot(xs, kl, label=m, color=color, ls=ls, marker=marker, ms=3)
        # the y range of msdda, mpa and the optimum: the base and single experts lie far below at most weights
        shown = opt + [p["methods"][m]["objective"]["mean"] for p in pts for m in ("msdda", "mpa")]
        pad = 0.15 * (max(shown) - min(shown) + 1.0)
        axes[r][0].set_ylim(min(shown) - pad, max(shown) + pad)
        axes[r][0].set_ylabel("step-level objective (nats; higher is better)")
        axes[r][0].legend(fontsize=7, ncol=2)
        axes[r][1].set_yscale("log")
        axes[r][1].set_ylim(KL_FLOOR / 3, None)
        axes[r][1].set_ylabel(f"sum over steps of KL to the optimum (floor {KL_FLOOR:g})")
        a = ", ".join(f"{v:g}" for v in case["curvatures"])
        for ax in axes[r]:
            ax.set_xlabel(f"w_{first} (w_2 = 1 - w_1)")
            ax.set_title(f"{name}: curvatures ({a})", fontsize=10)
            ax.grid(alpha=0.3)
        axes[r][1].legend(fontsize=7, ncol=2)
    s = report["settings"]
    fig.suptitle(f"Known optimum: {s['samples']} trajectories, {s['steps']} DDPM steps, beta {s['beta']:g} "
                 "(95% intervals)", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
