"""The known-optimum benchmark (issue 17): msdda, mpa, the base, each expert, CoDe and RGG against the exact
step-level optimum of a diffusion problem where it is known in closed form (bench/quality/known_optimum.py;
docs/known-optimum.md explains the problem and the numbers).

    .venv/bin/python bench/known_optimum.py --quick --out /tmp/known_optimum_quick.json   # about a minute
    .venv/bin/python bench/known_optimum.py                                  # -> bench/results/known_optimum.json

Writes the JSON and, beside it, the figure (same name, .png). Needs the bench extra (matplotlib).
Bad input: one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # the repository root: bench/ is not installed

from bench.quality.known_optimum import CASES, FULL, QUICK, markdown, merge, run  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "known_optimum.json"


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/known_optimum.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the small setting the test runs (not the real one)")
    ap.add_argument("--out", default=None, metavar="FILE.json",
                    help=f"results JSON (default {DEFAULT_OUT.relative_to(DEFAULT_OUT.parents[2])}, or "
                         "./known_optimum_quick.json with --quick)")
    ap.add_argument("--samples", type=int, default=None, help="trajectories per method and weight")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the tensors are tiny, and on a shared machine more "
                         "threads mostly wait for each other)")
    ap.add_argument("--no-figure", action="store_true", help="write the JSON only")
    ap.add_argument("--cases", default=None,
                    help=f"comma-separated subset of {','.join(n for n, _, _ in CASES)} (default: all)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="PART.json",
                    help="instead of running: merge runs of disjoint --cases subsets into --out")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    settings = QUICK if args.quick else FULL
    if args.samples is not None:
        if args.samples < 2:
            print("bench/known_optimum.py: --samples must be >= 2", file=sys.stderr)
            return 2
        settings = replace(settings, samples=args.samples)
    if args.threads < 1:
        print("bench/known_optimum.py: --threads must be >= 1", file=sys.stderr)
        return 2
    import torch
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else (Path("known_optimum_quick.json") if args.quick else DEFAULT_OUT)
    if out.suffix != ".json":
        print(f"bench/known_optimum.py: --out must name a .json file, not {str(out)!r}", file=sys.stderr)
        return 2
    if args.merge:
        try:
            report = merge([Path(p) for p in args.merge], out, figure=not args.no_figure)
        except (OSError, ValueError, KeyError) as exc:
            print(f"bench/known_optimum.py: cannot merge: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        print(markdown(report))
        print(f"wrote {out} (merged from {len(args.merge)} parts)")
        return 0
    cases = CASES
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in {n for n, _, _ in CASES}]
        if unknown or not wanted:
            print(f"bench/known_optimum.py: unknown case {unknown[0] if unknown else args.cases!r}; choose from "
                  f"{','.join(n for n, _, _ in CASES)}", file=sys.stderr)
            return 2
        cases = tuple(c for c in CASES if c[0] in wanted)
    report = run(settings, out, cases=cases, figure=not args.no_figure)
    print(markdown(report))
    print(f"wrote {out} ({report['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
