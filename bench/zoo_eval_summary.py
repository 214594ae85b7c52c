"""The headline numbers of a zoo evaluation results file, as markdown (as docs/zoo-and-evaluation.md has them).

    .venv/bin/python bench/zoo_eval_summary.py [bench/results/zoo_eval/zoo_eval.json]
"""
from __future__ import annotations

import json
import sys


def summary(results: dict) -> str:
    out = []
    spi = (results.get("timing") or {}).get("seconds_per_image", {})
    strategies = results["settings"]["strategies"]
    out += ["| combination | " + " | ".join(strategies) + " | msdda largest? |", "|---|" + "---|" * (len(strategies) + 1)]
    for name, c in results["combinations"].items():
        if not c.get("strategies"):
            continue
        cells = []
        for s in strategies:
            e = c["strategies"].get(s)
            cells.append("-" if e is None else (f"**{e['hypervolume_normalized']:.3f}**" if s == "msdda"
                                                 else f"{e['hypervolume_normalized']:.3f}"))
        verdict = "yes" if c.get("msdda_hv_is_max") else "no (" + ", ".join(c.get("beats_msdda", [])) + ")"
        out.append(f"| {name} | " + " | ".join(cells) + f" | {verdict} |")
    out.append("")
    for name, c in results["combinations"].items():
        for row in c.get("oracle_comparison", []):
            cells = []
            for s in ("msdda", "mpa", "soup", "code", "rgg"):
                e = row["strategies"].get(s)
                if e:
                    inside = "in CI" if all(e["within_oracle_ci95"].values()) else "outside on " + ", ".join(
                        k for k, v in e["within_oracle_ci95"].items() if not v)
                    cells.append(f"{s}: {e['distance_normalized']:.3g} ({inside})")
            out.append(f"- {name} w = {row['w']:g}: normalized distance to the oracle: " + "; ".join(cells))
    out.append("")
    if spi:
        b = spi.get("base")
        out.append("Generation s/image: " + ", ".join(f"{s} {v:.3g} ({v / b:.2f}x base)" for s, v in
                                                        sorted(spi.items(), key=lambda kv: kv[1])))
    return "\n".join(out)


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "bench/results/zoo_eval/zoo_eval.json"
    with open(path) as fh:
        print(summary(json.load(fh)))
