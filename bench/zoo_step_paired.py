"""Paired msdda - mpa and msdda - soup reward differences at every mixed weight point of zoo evaluations.

Every strategy draws the same class labels and seeds at every point (bench/quality), so the per-sample
difference is paired; its mean gets a 95% interval mean ± 1.96·sd/√n (the report's convention).

    .venv/bin/python bench/zoo_step_paired.py bench/results/zoo_eval_step/legible_bold bench/results/zoo_eval_step/bold_compressible
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def paired(folder: Path) -> list[dict]:
    points: dict[tuple, dict] = {}
    for cache in sorted((folder / "cache").glob("*/")):
        for f in sorted(cache.glob("*.json")):
            d = json.loads(f.read_text())
            if d.get("strategy") in ("msdda", "mpa", "soup") and len(d.get("weights", {})) >= 2:
                points[(cache.name, d["strategy"], tuple(sorted(d["weights"].items())))] = d["rewards"]
    rows = []
    for (cache, strategy, w), rewards in sorted(points.items()):
        if strategy != "msdda":
            continue
        for other in ("mpa", "soup"):
            o = points.get((cache, other, w))
            if o is None:
                continue
            for k in rewards:
                diff = [a - b for a, b in zip(rewards[k], o[k])]
                n = len(diff)
                mean = sum(diff) / n
                sd = math.sqrt(sum((x - mean) ** 2 for x in diff) / (n - 1))
                rows.append({"folder": folder.name, "settings": cache, "weights": dict(w), "vs": other, "reward": k,
                             "n": n, "msdda": sum(rewards[k]) / n, "other": sum(o[k]) / n, "diff": mean,
                             "ci95": 1.96 * sd / math.sqrt(n)})
    return rows


def main(argv: list[str]) -> int:
    rows = [r for a in argv for r in paired(Path(a))]
    print("| pair | weights | vs | reward | msdda | other | msdda - other (95% CI) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        w = ", ".join(f"{k} {v:g}" for k, v in r["weights"].items())
        sig = "" if abs(r["diff"]) <= r["ci95"] else " *"
        print(f"| {r['folder']} | {w} | {r['vs']} | {r['reward']} | {r['msdda']:.3f} | {r['other']:.3f} | "
              f"{r['diff']:+.4f} ± {r['ci95']:.4f}{sig} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
