"""The evaluation's report: per-point statistics, each combination's Pareto fronts and hypervolumes with paired
bootstrap intervals, the comparison with the MORL oracles, and the markdown tables."""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from .pareto import hypervolume, pareto_mask
from .points import Item
from .settings import EvalSettings

__all__ = ["mean_interval", "point_summary", "combo_report", "oracle_comparison", "seconds_per_image", "markdown"]


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, sd, half-width of the normal 95% interval of the mean)."""
    a = np.asarray(values, dtype=np.float64)
    sd = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return float(a.mean()), sd, 1.96 * sd / math.sqrt(max(a.size, 1))


def point_summary(rec: dict) -> dict:
    mean, sd, ci = {}, {}, {}
    for k, v in rec["rewards"].items():
        mean[k], sd[k], ci[k] = mean_interval(v)
    return {"weights": rec["weights"], "oracle": rec.get("oracle"), "n": rec["n"], "mean": mean, "sd": sd,
            "ci95": ci, "seconds_per_image": rec.get("seconds_per_image")}


def combo_report(combo: tuple[str, ...], per: Mapping[str, list[Item]], records: Mapping[str, dict],
                  settings: EvalSettings, rng_seed: int = 0) -> dict:
    objs = list(combo)
    strategies = {}
    arrays = {}                        # strategy -> [points, objectives, samples]
    for s, items in per.items():
        recs = [records[it.key] for it in items if it.key in records]
        if not recs:
            continue
        pts = [point_summary(r) for r in recs]
        strategies[s] = {"points": pts}
        arrays[s] = np.stack([np.stack([np.asarray(r["rewards"][o], dtype=np.float64) for o in objs]) for r in recs])
    if not strategies:
        return {"objectives": objs, "strategies": {}}
    allpts = np.concatenate([a.mean(axis=2) for a in arrays.values()])
    lo, hi = allpts.min(axis=0), allpts.max(axis=0)
    span = np.where(hi > lo, hi - lo, np.maximum(np.abs(lo), 1e-3))
    margin = settings.hv_margin * span
    ref = lo - margin
    box = float(np.prod(hi - ref))
    n = min(a.shape[2] for a in arrays.values())
    rng = np.random.default_rng(rng_seed)
    boot_idx = rng.integers(0, n, size=(settings.bootstrap, n)) if settings.bootstrap > 0 else None
    boot = {}
    for s, a in arrays.items():
        means = a.mean(axis=2)
        mask = pareto_mask(means)
        hv = hypervolume(means, ref)
        entry = strategies[s]
        # None for a degenerate box: the results JSON is strict and holds no NaN
        entry.update(hypervolume=hv, hypervolume_normalized=hv / box if box > 0 else None,
                     pareto=[int(i) for i in np.flatnonzero(mask)], n_points=int(means.shape[0]))
        if boot_idx is not None:
            bs = np.array([hypervolume(a[:, :, idx[: a.shape[2]]].mean(axis=2), ref) for idx in boot_idx])
            boot[s] = bs
            entry["hypervolume_ci95"] = [float(np.percentile(bs, 2.5)), float(np.percentile(bs, 97.5))]
    out = {"objectives": objs, "reference_point": dict(zip(objs, map(float, ref))),
           "reference_rule": f"per-objective minimum over all evaluated points of this combination minus "
                             f"{settings.hv_margin:g} x (max - min)",
           "margin": dict(zip(objs, map(float, margin))), "normalizing_box": box, "strategies": strategies}
    if "msdda" in strategies:
        hv_m = strategies["msdda"]["hypervolume"]
        others = {s: e["hypervolume"] for s, e in strategies.items() if s != "msdda"}
        out["msdda_hv_is_max"] = all(hv_m >= v for v in others.values())
        out["beats_msdda"] = sorted(s for s, v in others.items() if v > hv_m)
        if boot:
            out["p_msdda_hv_greater"] = {s: float(np.mean(boot["msdda"] > boot[s])) for s in boot if s != "msdda"}
    return out


def oracle_comparison(combo_rep: dict, per: Mapping[str, list[Item]], records: Mapping[str, dict],
                       reward_names: Sequence[str], scales: Mapping[str, float] | None) -> list[dict]:
    """For each oracle: every weighted strategy's point at the same weights vs the oracle, per reward."""
    objs = combo_rep["objectives"]
    rows = []
    for oit in per.get("oracle", []):
        orec = records.get(oit.key)
        if orec is None:
            continue
        o = point_summary(orec)
        entry = {"oracle": oit.oracle, "weights": oit.wdict(), "w": oit.wdict().get(objs[0], 0.0),
                 "oracle_mean": o["mean"], "oracle_ci95": o["ci95"], "strategies": {}}
        for s, items in per.items():
            if s in ("oracle", "base"):
                continue
            match = [it for it in items if it.weights == oit.weights and it.key in records]
            if not match:
                continue
            rec = records[match[0].key]
            p = point_summary(rec)
            diff = {k: p["mean"][k] - o["mean"][k] for k in reward_names}
            within = {k: abs(diff[k]) <= o["ci95"][k] for k in reward_names}
            paired = {}
            for k in reward_names:
                d = np.asarray(rec["rewards"][k]) - np.asarray(orec["rewards"][k])
                m, sd, ci = mean_interval(d)
                paired[k] = {"mean": m, "ci95": ci, "consistent_with_zero": abs(m) <= ci}
            dist = math.sqrt(sum(diff[k] ** 2 for k in objs))
            sc = scales or {}
            dist_n = math.sqrt(sum((diff[k] / sc.get(k, 1.0)) ** 2 for k in objs))
            entry["strategies"][s] = {"mean": p["mean"], "ci95": p["ci95"], "diff": diff, "within_oracle_ci95": within,
                                      "within_all": all(within.values()),
                                      "within_pair_objectives": all(within[k] for k in objs),
                                      "distance": dist, "distance_normalized": dist_n, "paired_difference": paired}
        rows.append(entry)
    return rows


def seconds_per_image(records: Mapping[str, dict]) -> dict:
    """Seconds per image over the evaluation's own points (may span processes after a resume)."""
    tot: dict[str, list[float]] = {}
    for r in records.values():
        t = tot.setdefault(r["strategy"], [0.0, 0.0])
        t[0] += r.get("generation_seconds", 0.0)
        t[1] += r.get("n", 0)
    return {s: v[0] / v[1] for s, v in tot.items() if v[1]}



def _fmt(x, digits=4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def markdown(results: dict) -> str:
    st = results["settings"]
    lines = ["# Zoo evaluation", ""]
    if st.get("quick"):
        lines += ["**Quick smoke run (`--quick`): too few samples for conclusions.**", ""]
    lines += [
        f"{st['samples']} samples per point (class labels b % 10, seeds {st['seed']} + b, shared by every strategy "
        f"and point), {st['steps']} DDPM steps, classifier-free guidance {st['guidance_scale']}. Means with 95% "
        f"intervals (mean ± 1.96·sd/√n). Pairs: w ∈ {{0, {st['pair_step']:g}, ..., 1}} (w = first objective's "
        f"weight); triple: simplex grid of step {st['triple_step']:g}. CoDe: N = {st['code_candidates']} "
        f"candidates, blocks of {st['code_block']} steps, from the base model. RGG: scale {st['rgg_scale']:g} "
        f"(= 1/β, the experts' KL strength) on Σ w_k r_k/s_k, differentiable rewards only. Hypervolume (HV): exact, reference point "
        f"= per-objective minimum over all evaluated points of the combination minus {st['hv_margin']:g}×range; "
        f"'HV norm.' divides by the box from the reference to the per-objective maxima; intervals are a paired "
        f"bootstrap over samples ({st['bootstrap']} replicates). Generation backend: "
        f"{st.get('backend', 'torch')} (RGG on torch; points produced by: {', '.join(st.get('point_backends', []))}).",
        ""]
    timing = results.get("timing") or {}
    spi = timing.get("seconds_per_image", {})
    for name, c in results["combinations"].items():
        if not c.get("strategies"):
            continue
        lines += [f"## {name.replace('+', ' + ')}", ""]
        ref = ", ".join(f"{k} {v:.4g}" for k, v in c["reference_point"].items())
        lines += [f"Reference point: {ref}.", ""]
        lines += ["| strategy | points | on front | HV | HV norm. | HV 95% CI | P(msdda HV > it) | s/image |",
                  "|---|---|---|---|---|---|---|---|"]
        order = sorted(c["strategies"].items(), key=lambda kv: -kv[1]["hypervolume"])
        for s, e in order:
            ci = e.get("hypervolume_ci95")
            p = (c.get("p_msdda_hv_greater") or {}).get(s)
            lines.append(f"| {'**' + s + '**' if s == 'msdda' else s} | {e['n_points']} | {len(e['pareto'])} | "
                         f"{_fmt(e['hypervolume'])} | {_fmt(e['hypervolume_normalized'], 3)} | "
                         f"{'[' + _fmt(ci[0]) + ', ' + _fmt(ci[1]) + ']' if ci else 'n/a'} | "
                         f"{_fmt(p, 3) if p is not None else '-'} | {_fmt(spi.get(s), 3)} |")
        if "msdda_hv_is_max" in c:
            verdict = "yes" if c["msdda_hv_is_max"] else f"no (higher: {', '.join(c['beats_msdda'])})"
            lines += ["", f"msdda has the largest hypervolume: **{verdict}**."]
        lines.append("")
        comp = c.get("oracle_comparison")
        if comp:
            rewards = list(comp[0]["oracle_mean"])
            lines += ["### msdda vs the MORL oracles", "",
                      "Oracle fine-tuned on w·r_a/s_a + (1−w)·r_b/s_b; msdda composes the experts with the same w. "
                      "'within' = msdda's mean lies in the oracle's 95% interval; the paired difference uses the "
                      "shared seeds.", "",
                      "| w | reward | oracle | msdda | mpa | soup | msdda within oracle CI | msdda − oracle (paired 95% CI) |",
                      "|---|---|---|---|---|---|---|---|"]
            for row in comp:
                m = row["strategies"].get("msdda")
                for k in rewards:
                    cells = []
                    for s in ("msdda", "mpa", "soup"):
                        e = row["strategies"].get(s)
                        cells.append(f"{e['mean'][k]:.4g} ± {e['ci95'][k]:.2g}" if e else "-")
                    within = ("yes" if m["within_oracle_ci95"][k] else "**no**") if m else "-"
                    pd_ = m["paired_difference"][k] if m else None
                    pds = f"{pd_['mean']:+.3g} ± {pd_['ci95']:.2g}" if pd_ else "-"
                    lines.append(f"| {row['w']:g} | {k} | {row['oracle_mean'][k]:.4g} ± {row['oracle_ci95'][k]:.2g} | "
                                 f"{' | '.join(cells)} | {within} | {pds} |")
            lines += ["", "Distance to the oracle in the pair's reward space (raw / each axis divided by s_k):", "",
                      "| w | " + " | ".join(("msdda", "mpa", "soup", "code", "rgg")) + " |", "|---|" + "---|" * 5]
            for row in comp:
                cells = []
                for s in ("msdda", "mpa", "soup", "code", "rgg"):
                    e = row["strategies"].get(s)
                    cells.append(f"{e['distance']:.3g} / {e['distance_normalized']:.3g}" if e else "-")
                lines.append(f"| {row['w']:g} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += ["<details><summary>all points</summary>", "",
                  "| strategy | weights | " + " | ".join(f"{k} (mean ± CI)" for k in results["rewards"]) + " |",
                  "|---|---|" + "---|" * len(results["rewards"])]
        for s, e in c["strategies"].items():
            for p in e["points"]:
                w = p.get("oracle") or (",".join(f"{k}={p['weights'][k]:g}" for k in c["objectives"]
                                                 if k in p["weights"]) or "-")
                lines.append(f"| {s} | {w} | " + " | ".join(
                    f"{p['mean'][k]:.4g} ± {p['ci95'][k]:.2g}" for k in results["rewards"]) + " |")
        lines += ["", "</details>", ""]
    if timing.get("seconds_per_image"):
        lines += ["## Generation time", "",
                  f"Seconds per image, each strategy generating the same {timing['images']} images (oracle pair, "
                  f"w = 0.5) one after another in one process on the {timing.get('backend', 'torch')} backend "
                  f"({timing.get('threads')} torch threads, "
                  f"{timing.get('machine')}).", "",
                  "| strategy | s/image | × base |", "|---|---|---|"]
        b = spi.get("base")
        for s, v in sorted(spi.items(), key=lambda kv: kv[1]):
            lines.append(f"| {s} | {v:.4g} | {(v / b if b else float('nan')):.3g} |")
        lines.append("")
    return "\n".join(lines)
