"""Zoo evaluation: the project's claim reproduced in miniature (run it with ``python bench/eval_zoo.py``).

For every pair of the zoo's objectives and for the three together, sweep the preference weights and measure
every reward (mean and 95% interval over ``samples`` images per point) for each strategy:

    msdda   the exact product of the experts' Gaussians            Engine.generate(strategy="msdda")
    mpa     average of the experts' raw outputs (Diffusion Blend)  Engine.generate(strategy="mpa")
    soup    parameter averaging (rewarded soups)                   Engine.generate(strategy="soup")
    base    the base model alone (weight-independent: one point)   Engine.generate(strategy="base")
    code    CoDe-style best-of-N block selection from the base     samplers.code_sample
    rgg     reward-gradient guidance of the base (differentiable rewards only)   samplers.rgg_sample
    oracle  the MORL oracles (fine-tuned on the weighted reward) at their weights   Engine strategy expert:<oracle>

and report each strategy's Pareto-front hypervolume, msdda's distance to each MORL oracle, and each strategy's
generation time. Samples are paired: sample b always has class label b % 10 and seed ``seed + b``, whatever the
strategy or the weights, so two points differ only by what the strategy does.

Weights mean the same thing everywhere. The experts and oracles were trained (bench/zoo/rl.py) on rewards
normalised by fixed scales s_k (the std of each reward over base samples) with the KL strength beta = KL_BETA,
so the target of weights w is p_base(x) exp(sum_k w_k r_k(x) / (s_k beta)). CoDe ranks candidates by
sum_k w_k r_k / s_k, and RGG follows the gradient of the same quantity with scale 1 / beta -- the first-order
(classifier-guidance) approximation of that very target; fixed once, never tuned.

Resumable (points.py). Outputs, all in the folder ``out``::

    zoo_eval.json           all numbers
    zoo_eval.md             markdown tables for the README
    pareto_<a>_<b>.png      one Pareto plot per pair
    grid_<strategy>.png     images of each strategy at w = 0.5 for the oracle pair
    cache/<run>/            per-point per-sample rewards (the resume state; <run> names samples, steps,
                            guidance and seed, so runs with other settings never overwrite it)
"""
from __future__ import annotations

import platform
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from msdda.atomic import atomic_write_bytes, atomic_write_json
from msdda.zoo import OBJECTIVES, ORACLE_PAIR, ORACLE_WEIGHTS, classifier_path, oracle_name, zoo_paths

from .grids import canonical_weights, combinations, combo_name
from .plots import plot_pair, save_grid
from .points import (Evaluator, Item, build_plan, cache_path, estimate_seconds, fingerprint, measure_throughput,
                     missing_models, read_cache, read_json_or_none, resolve_models, timing_pass)
from .report import combo_report, markdown, oracle_comparison, seconds_per_image
from .scoring import load_reward_scales
from .settings import STRATEGIES, EvalSettings, trained_beta

__all__ = ["evaluate", "RESULTS_JSON", "RESULTS_MD"]

RESULTS_JSON = "zoo_eval.json"
RESULTS_MD = "zoo_eval.md"


def evaluate(*, out: str | Path, settings: EvalSettings | None = None, zoo_root: str | Path | None = None,
             models: Mapping[str, str | Path] | None = None, strategies: Sequence[str] | None = None,
             objectives: Sequence[str] = OBJECTIVES, combos: Sequence[Sequence[str]] | None = None,
             reward_fns: Mapping[str, Callable] | None = None, differentiable=None,
             reward_scales: Mapping[str, float] | None = None, classifier_file: str | Path | None = None,
             device: str = "cpu", progress: bool = True, timing: bool = True, plots: bool = True,
             quick: bool = False, backend: str = "torch", reuse_from: Sequence[str | Path] = (), log=print) -> dict:
    """Run (or resume) the evaluation into the folder ``out`` (see the module docstring for what it writes).

    zoo_root / models: where the models are (``models`` {zoo name: folder} overrides single entries);
    strategies: a subset of STRATEGIES (default all); combos: the objective combinations (default every pair and
    the triple); reward_fns / differentiable / reward_scales: override the zoo's rewards (tests); reward_scales
    default: the zoo's ``base/metrics.json`` (else 1 for every reward, recorded in the results); backend: the
    Engine backend for generation (RGG and the timing pass always use torch); reuse_from: other evaluations'
    folders whose points are read (and copied into ``out``) where their fingerprint is this run's, i.e. the
    same settings and the same model files for that point (the base, CoDe, RGG and the oracles are shared by
    the zoo's flavours). Returns the
    results dict plus ``"run": {"computed": [...], "skipped": [...]}`` for this call.
    """
    settings = settings or EvalSettings()
    settings.validate()
    strategies = list(strategies or STRATEGIES)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
    combos = [tuple(c) for c in (combos or combinations(objectives))]
    used_objs = sorted({o for c in combos for o in c}, key=lambda o: (list(OBJECTIVES) + [o]).index(o))
    oracle_pair = tuple(ORACLE_PAIR) if "oracle" in strategies and tuple(ORACLE_PAIR) in combos else None
    paths = _find_models(zoo_root, models, used_objs, [oracle_name(w) for w in ORACLE_WEIGHTS] if oracle_pair else [])
    scales_source = "given"
    if reward_scales is None:
        reward_scales = load_reward_scales(Path(paths["base"]).parent)
        scales_source = str(Path(paths["base"]) / "metrics.json") if reward_scales is not None else \
            "none: base/metrics.json not found, every s_k = 1"
    if classifier_file is None and zoo_root is not None and classifier_path(zoo_root).exists():
        classifier_file = classifier_path(zoo_root)
    beta, beta_source = trained_beta(paths)
    rgg_source = "given"
    if settings.rgg_scale is None:
        settings = replace(settings, rgg_scale=1.0 / beta)
        rgg_source = f"1 / beta, beta = {beta:g} from {beta_source}"

    out = Path(out)
    ev = Evaluator(paths, settings, reward_fns=reward_fns, differentiable=differentiable,
                   reward_scales=reward_scales, classifier_file=classifier_file, device=device, backend=backend)
    # one cache folder per run-level setting (samples, steps, guidance, seed): an explicit --steps/--samples
    # run never overwrites another's points; within it every point also carries its own fingerprint
    cache_dir = out / "cache" / f"n{settings.samples}_s{settings.steps}_g{settings.guidance_scale:g}_seed{settings.seed}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    plan = build_plan(combos, strategies, settings, ev.differentiable, oracle_pair)
    unique: dict[str, Item] = {}
    for per in plan.values():
        for items in per.values():
            for it in items:
                unique.setdefault(it.key, it)
    grid_pair = oracle_pair or (combos[0] if len(combos[0]) == 2 else None)
    grid_files = _grid_files(plan, grid_pair, out)

    records, todo, skipped = {}, [], []
    for key, it in unique.items():
        rec = _cached_record(ev, it, cache_dir, [Path(d) / "cache" / cache_dir.name for d in reuse_from])
        if rec is not None:
            records[key] = rec
            skipped.append(key)
        else:
            todo.append(it)
    todo.sort(key=lambda it: (ev.forward_rows(it), it.key))       # cheapest first: results accumulate early
    estimate = _announce(ev, todo, len(unique), len(skipped), log)
    computed = _run_items(ev, todo, records, cache_dir, grid_files, progress)
    for key, path in grid_files.items():      # a grid whose point was cached but whose image is missing
        if key in records and not path.exists():
            n = min(settings.grid_images, settings.samples)
            save_grid(ev.generate(unique[key], [settings.seed + b for b in range(n)], [b % 10 for b in range(n)]), path)
    timing_rec = None
    if timing:
        pair = grid_pair or combos[0][:2]
        timing_rec = _timing(ev, strategies, plan.get(combo_name(pair), {}).get("oracle", []), pair, cache_dir, log)

    results = _results(ev, settings, plan, records, combos, oracle_pair, strategies, used_objs, paths, timing_rec,
                       estimate, quick=quick, backend=backend, beta=beta, rgg_source=rgg_source,
                       reward_scales=reward_scales, scales_source=scales_source)
    if plots:
        for combo in combos:
            rep = results["combinations"][combo_name(combo)]
            if len(combo) == 2 and rep.get("strategies"):
                plot_pair(rep, out / f"pareto_{combo[0]}_{combo[1]}.png",
                          f"{combo[0]} vs {combo[1]}: {settings.samples} samples/point, {settings.steps} steps")
    json_path, md_path = out / RESULTS_JSON, out / RESULTS_MD
    results["files"] = {"json": str(json_path), "markdown": str(md_path),
                        "plots": sorted(p.name for p in out.glob("pareto_*.png")),
                        "grids": sorted(p.name for p in out.glob("grid_*.png"))}
    atomic_write_json(json_path, results)
    atomic_write_bytes(md_path, markdown(results).encode())
    return {**results, "run": {"computed": computed, "skipped": skipped}}


def _cached_record(ev: Evaluator, item: Item, cache_dir: Path, others: Sequence[Path]) -> dict | None:
    """An item's finished record: from this run's cache, else from another evaluation's cache with the same
    fingerprint (copied here, marked ``reused_from``), else None. A record written with the fingerprint
    before it was scoped to the item's own models is accepted and rewritten with the scoped one."""
    own, n = cache_path(cache_dir, item), ev.settings.samples
    fp = ev.fingerprint(item)
    rec = read_cache(own, fp)
    if rec is None:
        rec = read_cache(own, ev.legacy_fingerprint(item.strategy))
        if rec is not None and rec.get("n") == n:
            atomic_write_json(own, {**rec, "fingerprint": fp})
    for other in others:
        if rec is not None:
            break
        rec = read_cache(cache_path(other, item), fp)
        if rec is not None and rec.get("n") == n:
            rec = {**rec, "reused_from": str(other)}
            atomic_write_json(own, rec)
    return rec if rec is not None and rec.get("n") == n else None


def _find_models(zoo_root, models, objectives, oracles) -> dict[str, Path]:
    paths = resolve_models(zoo_root, models, objectives, oracles)
    missing = missing_models(paths)
    if missing:
        root = Path(zoo_root) if zoo_root is not None else zoo_paths()["base"].parent
        raise FileNotFoundError(f"zoo models not found: {', '.join(missing)} (under {root}); train them with "
                                f"`python bench/train_zoo.py all` or pass models=")
    return paths


def _grid_files(plan, grid_pair, out: Path) -> dict[str, Path]:
    """{item key: grid image path} for each strategy's point at w = 0.5 of the grid pair (and the base)."""
    if grid_pair is None:
        return {}
    half = canonical_weights({grid_pair[0]: 0.5, grid_pair[1]: 0.5})
    return {it.key: out / f"grid_{s}.png" for s, items in plan[combo_name(grid_pair)].items()
            for it in items if it.weights == half or s == "base"}


def _announce(ev: Evaluator, todo: Sequence[Item], total: int, cached: int, log) -> float | None:
    """Measure the UNet's throughput and log how long the points still to do will take (None: nothing to do)."""
    if not todo:
        return None
    s = ev.settings
    rate = measure_throughput(ev.engine, rows=min(2 * s.batch_size, 256), seconds=2.0 if s.samples >= 64 else 0.3)
    estimate = estimate_seconds(ev, todo, rate)
    log(f"zoo eval: {len(todo)} of {total} points to compute ({cached} cached), {s.samples} samples x {s.steps} "
        f"steps each; measured UNet throughput {rate:.0f} image-forwards/s -> estimated {estimate / 3600:.2f} h "
        f"({estimate / 60:.1f} min)")
    if estimate > 2 * 3600:
        log(f"zoo eval: WARNING: the estimate ({estimate / 3600:.1f} h) is over 2 hours on this machine; "
            "it is resumable (rerun the same command to continue), or lower --samples / --steps explicitly")
    return estimate


def _run_items(ev: Evaluator, todo: Sequence[Item], records: dict, cache_dir: Path, grid_files: Mapping[str, Path],
               progress: bool) -> list[str]:
    """Compute every item still to do, writing each one's record (and its grid) as soon as it is done."""
    from tqdm import tqdm

    if not todo:
        return []
    computed = []
    s = ev.settings
    with tqdm(total=len(todo) * s.samples, unit="img", desc="zoo eval", disable=not progress, mininterval=2.0,
              dynamic_ncols=True) as bar:
        for it in todo:
            bar.set_description(it.label()[:48])
            rec, imgs = ev.run_item(it, on_chunk=bar.update, keep=s.grid_images if it.key in grid_files else 0)
            atomic_write_json(cache_path(cache_dir, it), rec)
            records[it.key] = rec
            computed.append(it.key)
            if imgs is not None:
                save_grid(imgs, grid_files[it.key])
    return computed


def _timing(ev: Evaluator, strategies, oracle_items, pair, cache_dir: Path, log) -> dict:
    """The timing pass's record, measured once per fingerprint (one process, back to back) and cached."""
    s = ev.settings
    path = cache_dir / "timing.json"
    fp = fingerprint({"strategies": strategies, "images": s.timing_images, "steps": s.steps,
                      "code": (s.code_candidates, s.code_block), "rgg": s.rgg(), "models": ev.models,
                      "batch": s.batch_size, "backend": "torch"})
    rec = read_json_or_none(path)
    if rec is not None and rec.get("fingerprint") == fp:
        return rec
    log(f"zoo eval: timing pass ({s.timing_images} images per strategy)")
    spi = timing_pass(ev, strategies, oracle_items, pair, s.timing_images)
    rec = {"fingerprint": fp, "seconds_per_image": spi, "images": s.timing_images, "batch_size": s.batch_size,
           "threads": torch.get_num_threads(), "backend": "torch",
           "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
           "weights": {pair[0]: 0.5, pair[1]: 0.5}, "steps": s.steps}
    atomic_write_json(path, rec)
    return rec


def _results(ev: Evaluator, settings: EvalSettings, plan, records, combos, oracle_pair, strategies, used_objs, paths,
             timing_rec, estimate, *, quick, backend, beta, rgg_source, reward_scales, scales_source) -> dict:
    reward_names = list(ev.reward_fns)
    results = {
        "settings": {**asdict(settings), "rgg_scale": settings.rgg(), "rgg_scale_source": rgg_source,
                     "kl_beta": beta, "quick": quick,
                     "reward_scales": reward_scales, "reward_scales_source": scales_source,
                     "strategies": strategies, "objectives": used_objs,
                     "class_labels": "sample b has class b % 10", "seeds": f"sample b has seed {settings.seed} + b",
                     "models": {k: {"path": str(p), "sha256": ev.models.get(k if k != "base" else "base")}
                                for k, p in paths.items()},
                     "code_note": "CoDe: N candidates per block from the base model; each block keeps, per sample, "
                                  "the candidate whose Tweedie x0 estimate has the best sum_k w_k r_k/s_k",
                     "rgg_note": "RGG: x_prev = base step + var * scale * d/dx_t sum_k w_k r_k(x0_hat)/s_k, "
                                 "scale = 1/beta, the experts' KL strength (the first-order guidance toward p_base exp(r/beta), the "
                                 "target the experts and oracles were trained for); only on combinations of "
                                 "differentiable rewards",
                     "backend": backend, "backend_note": "generation backend of every strategy but RGG (torch, "
                     "it needs autograd); each cached point records its own backend; the backends agree to float "
                     "rounding, so the fingerprint of a point does not include it",
                     "point_backends": sorted({r.get("backend", "torch") for r in records.values()}),
                     "torch": torch.__version__, "threads": torch.get_num_threads()},
        "rewards": reward_names,
        "estimate_seconds_this_run": estimate,
        "timing": {**{k: v for k, v in (timing_rec or {}).items() if k != "fingerprint"},
                   "eval_seconds_per_image": seconds_per_image(records)},
        "combinations": {},
    }
    for combo in combos:
        name = combo_name(combo)
        rep = combo_report(combo, plan[name], records, settings)
        if oracle_pair is not None and tuple(combo) == oracle_pair:
            rep["oracle_comparison"] = oracle_comparison(rep, plan[name], records, reward_names, reward_scales)
        results["combinations"][name] = rep
    outcome = {}
    for name, rep in results["combinations"].items():
        if "msdda_hv_is_max" in rep:
            outcome[f"msdda_hv_is_max[{name}]"] = rep["msdda_hv_is_max"]
        for row in rep.get("oracle_comparison", []):
            m = row["strategies"].get("msdda")
            if m:
                outcome[f"msdda_within_oracle_ci[{row['oracle']}]"] = m["within_all"]
                outcome[f"msdda_within_oracle_ci_pair_rewards[{row['oracle']}]"] = m["within_pair_objectives"]
    results["expected_outcome"] = outcome
    return results
