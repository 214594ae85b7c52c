"""Renders the zoo's models/README.md from the json files the training stages leave behind."""
from __future__ import annotations

import json
from pathlib import Path

from msdda.zoo import KL_BETA, OBJECTIVES, ORACLE_PAIR


def _j(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def render_zoo_readme(out: Path) -> str:
    d = _j(out / "durations.json") or {}
    lines = ["# msdda default model zoo", "",
             "Built from scratch by `python bench/train_zoo.py all` on CPU; each folder has its own model card "
             "(data, architecture, loss, steps, beta, rewards, seed, duration, measured metrics). The shipped "
             "weights were trained with `MSDDA_ZOO_THREADS=1` (one torch thread) on a 2-core machine shared with "
             "other jobs, so the durations below include that contention (base training ran at 0.21 s/step with "
             "2 threads on the idle machine, 0.35-0.5 s/step as actually run). Stage durations (wall time including each stage's evaluation, "
             "summed over resumed runs):", "",
             "| stage | duration |", "|---|---|"]
    rank = {"classifier": 0, "base": 1}
    for k, v in sorted(d.items(), key=lambda kv: (rank.get(kv[0], 2 if kv[0].startswith("expert") else 3), kv[0])):
        lines.append(f"| {k} | {v:.0f} s ({v / 60:.1f} min) |")
    if d:
        tot = sum(d.values())
        lines.append(f"| **total** | {tot:.0f} s ({tot / 60:.1f} min) |")
    lines.append("")
    c = _j(out / "classifier_metrics.json")
    if c:
        lines += [f"Reward classifier (`classifier.safetensors`): val accuracy {c['val_accuracy']:.4f}, "
                  f"{c['params']} params.", ""]
    b = _j(out / "base" / "metrics.json")
    if b and "class_accuracy_default" in b:
        a = b["class_accuracy_default"]
        lines += [f"Base model: {a['accuracy']:.4f} of {a['n']} class-conditioned samples classified as their class "
                  f"({b['eval_steps']} DDPM steps, guidance {b['default_guidance_scale']}; diffusers' "
                  "DDPMScheduler as the sampler). By guidance scale: "
                  + ", ".join(f"{k}: {v['accuracy']:.3f}" for k, v in b.get("accuracy_by_guidance", {}).items())
                  + ".", ""]
        rs = b.get("reward_stats")
        if rs:
            lines += [f"Rewards over {rs['n']} base samples (raw units; msdda.zoo.rewards). The std is the fixed "
                      "per-objective scale s_k that RL divides each reward by:", "",
                      "| reward | mean | std | min | max |", "|---|---|---|---|---|"]
            for k, v in sorted(rs["per_reward"].items(), key=lambda kv: OBJECTIVES.index(kv[0])
                               if kv[0] in OBJECTIVES else 99):
                lines.append(f"| {k} | {v['mean']:.4f} | {v['std']:.4f} | {v['min']:.4f} | {v['max']:.4f} |")
            lines += ["", "Correlations over base samples (negative = conflict):", "",
                      "| pair | Pearson | Spearman |", "|---|---|---|"]
            for k, v in rs["correlations"].items():
                lines.append(f"| {k} | {v['pearson']:+.3f} | {v['spearman']:+.3f} |")
            lines.append("")
    rl = _j(out / "rl_summary.json")
    if rl:
        lines += ["## Experts and oracles", "",
                  f"KL-regularised step-level RL from the base, KL strength beta = {KL_BETA} for all; oracles on "
                  f"w * r_{ORACLE_PAIR[0]}/s + (1 - w) * r_{ORACLE_PAIR[1]}/s. Mean rewards and class accuracy "
                  "over one seeded evaluation draw shared by all members (msdda.schedule sampler, 50 DDPM steps, "
                  "default guidance):", ""]
        keys = next(iter(rl.values()))["rewards"].keys()
        objs = [o for o in OBJECTIVES if o in keys] + [o for o in keys if o not in OBJECTIVES]
        lines.append("| model | " + " | ".join(objs) + " | class acc |")
        lines.append("|---|" + "---|" * (len(objs) + 1))
        order = [n for n in ("base",) + tuple(OBJECTIVES) if n in rl] + sorted(n for n in rl if n.startswith("morl_"))
        order += [n for n in rl if n not in order]
        rl = {n: rl[n] for n in order}
        for name, m in rl.items():
            lines.append(f"| {name} | " + " | ".join(f"{m['rewards'][o]['mean']:.4f}" for o in objs)
                         + f" | {m.get('class_accuracy', float('nan')):.3f} |")
        ts = sorted(next(iter(rl.values())).get("mean_log_var", {}).keys(), key=lambda k: -int(k))
        lines += ["", "Mean log-variance of each member's step Gaussian along its own trajectory, by timestep "
                  "(learned-range variance; at t=980 the range is ~0 wide, so all members agree there):", "",
                  "| model | " + " | ".join(f"t={t}" for t in ts) + " |", "|---|" + "---|" * len(ts)]
        for name, m in rl.items():
            lines.append(f"| {name} | " + " | ".join(f"{m.get('mean_log_var', {}).get(t, float('nan')):.4f}"
                                                     for t in ts) + " |")
        lines += ["", "Mean (log var - base log var) at the same x_t (the member's own trajectory):", "",
                  "| model | " + " | ".join(f"t={t}" for t in ts) + " |", "|---|" + "---|" * len(ts)]
        for name, m in rl.items():
            if name == "base":
                continue
            d = m.get("mean_dlog_var_vs_base_same_xt", {})
            lines.append(f"| {name} | " + " | ".join(f"{d.get(t, float('nan')):+.4f}" for t in ts) + " |")
        lines.append("")
    vs = _j(out / "variance_stats.json")
    if vs:
        ts = sorted(next(iter(vs["mean_log_var"].values())).keys(), key=lambda k: -int(k))
        lines += [f"Variance at shared states (`variance_stats.json`): x_t from {vs['n']} base trajectories, every "
                  "member's step log-variance evaluated there. Mean log-variance, and mean |log var_a - log var_b| "
                  "(per pixel and sample) for base/expert pairs and each oracle vs the base:", "", "| model | " + " | ".join(f"t={t}" for t in ts) + " |",
                  "|---|" + "---|" * len(ts)]
        for name, d in vs["mean_log_var"].items():
            lines.append(f"| {name} | " + " | ".join(f"{d[t]:.4f}" for t in ts) + " |")
        lines += ["", "| pair | " + " | ".join(f"t={t}" for t in ts) + " |", "|---|" + "---|" * len(ts)]
        for pair, d in vs["mean_abs_dlog_var"].items():
            a, b = pair.split("|")
            if a.startswith("morl_") and b.startswith("morl_") or a.startswith("morl_") or (
                    b.startswith("morl_") and a != "base"):
                continue  # the README shows base/expert pairs and oracle-vs-base; the json has all pairs
            lines.append(f"| {pair.replace('|', ' vs ')} | " + " | ".join(f"{d[t]:.4f}" for t in ts) + " |")
        lines.append("")
    return "\n".join(lines)
