"""The zoo evaluation (the project's claim in miniature): the command line of bench/quality/evaluate.py.

    .venv/bin/python bench/eval_zoo.py --out DIR           # the real evaluation -> DIR/zoo_eval.{json,md}, DIR/*.png
    .venv/bin/python bench/eval_zoo.py --quick --out DIR   # smoke run (8 samples, w in {0, 0.5, 1}, 10 steps)
    .venv/bin/python bench/eval_zoo.py --threads 2 --backend onnxruntime --out bench/results/zoo_eval   # tracked

--out is a folder (default ./zoo_eval, or ./zoo_eval_quick with --quick). Resumable: rerun the same command after
an interruption and finished points are read back from DIR/cache/. Needs the bench extra (matplotlib):
pip install -e '.[bench]'. Bad input or missing models: one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # the repository root: bench/ is not installed

import torch  # noqa: E402

from bench.quality.evaluate import evaluate  # noqa: E402
from bench.quality.settings import MIN_HONEST_SAMPLES, STRATEGIES, EvalSettings, quick_settings  # noqa: E402
from msdda.zoo import DEFAULT_STEPS, FLAVOURS, OBJECTIVES, zoo_paths  # noqa: E402

ALIASES = {"oracles": "oracle", "morl": "oracle", "rg": "rgg"}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/eval_zoo.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256, help="samples per weight point (default 256)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the zoo's, 50)")
    ap.add_argument("--strategies", default=None, help=f"comma-separated subset of {','.join(STRATEGIES)}")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="results folder (default ./zoo_eval, or ./zoo_eval_quick with --quick)")
    ap.add_argument("--quick", action="store_true", help="a small smoke evaluation; not the real one")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--batch-size", type=int, default=None, help="images per generate call (default 128)")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"),
                    help="generation backend (default torch; RGG and the timing pass always run on torch)")
    ap.add_argument("--zoo-root", default=None, help="model folder (default: the embedded zoo)")
    ap.add_argument("--flavour", default="default", choices=FLAVOURS,
                    help="which experts (msdda.zoo.zoo_paths; default: the RL experts; step: bench/zoo/step.py's)")
    ap.add_argument("--combos", default=None,
                    help="objective combinations, e.g. legible+bold,bold+compressible (default: every pair and the triple)")
    ap.add_argument("--pair-step", type=float, default=None, help="weight grid step for pairs (default 0.1)")
    ap.add_argument("--reuse-from", action="append", default=[], metavar="DIR",
                    help="another evaluation's --out folder: its points with this run's fingerprint (same settings, "
                         "same model files for that point, e.g. the base, CoDe, RGG and the oracles of the other "
                         "flavour) are copied instead of recomputed (repeatable)")
    return ap.parse_args(argv)


def settings_from(args: argparse.Namespace) -> EvalSettings:
    if args.quick:
        settings = quick_settings(args.steps)
    else:
        settings = EvalSettings(samples=args.samples, steps=args.steps if args.steps is not None else DEFAULT_STEPS)
    if args.pair_step is not None:
        settings = replace(settings, pair_step=args.pair_step)
    return replace(settings, batch_size=args.batch_size) if args.batch_size else settings


def main(argv=None) -> int:
    """Run the evaluation; returns the exit status (0 done, 2 bad input or missing models)."""
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out if args.out is not None else ("zoo_eval_quick" if args.quick else "zoo_eval"))
    strategies = None
    if args.strategies is not None:
        strategies = [ALIASES.get(s.strip(), s.strip()) for s in args.strategies.split(",") if s.strip()]

    def note(msg: str) -> None:
        print(msg, file=sys.stderr)

    try:
        settings = settings_from(args)
        if args.quick:
            note(f"zoo eval: --quick smoke run ({settings.samples} samples/point, {settings.steps} steps, "
                 f"w in {{0, 0.5, 1}}) -> {out}; not the real evaluation")
        else:
            if settings.samples < MIN_HONEST_SAMPLES:
                note(f"zoo eval: WARNING: {settings.samples} samples per point (< {MIN_HONEST_SAMPLES}); the "
                     "intervals will be wide and the results say so in settings.samples")
            if settings.steps != DEFAULT_STEPS:
                note(f"zoo eval: note: {settings.steps} steps instead of the zoo's {DEFAULT_STEPS}")
        combos = None
        if args.combos is not None:
            combos = [tuple(o.strip() for o in c.split("+")) for c in args.combos.split(",") if c.strip()]
            bad = [o for c in combos for o in c if o not in OBJECTIVES]
            if bad or any(len(c) < 2 for c in combos):
                raise ValueError(f"--combos: each combination joins at least two of {', '.join(OBJECTIVES)} "
                                 f"with '+', got {args.combos!r}")
        models = None
        if args.flavour != "default":
            paths = zoo_paths(args.zoo_root, flavour=args.flavour)
            models = {k: paths[k] for k in OBJECTIVES}
        results = evaluate(out=out, settings=settings, strategies=strategies, quick=args.quick, device=args.device,
                           zoo_root=args.zoo_root, models=models, combos=combos, backend=args.backend,
                           reuse_from=args.reuse_from, log=note)
    except (ValueError, FileNotFoundError) as exc:
        print(f"eval_zoo: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    run = results["run"]
    print(f"zoo eval: {len(run['computed'])} points computed, {len(run['skipped'])} from cache; wrote "
          f"{results['files']['json']} and {results['files']['markdown']}")
    for name, rep in results["combinations"].items():
        if rep.get("strategies"):
            hv = ", ".join(f"{s} {e['hypervolume']:.4g}" for s, e in
                           sorted(rep["strategies"].items(), key=lambda kv: -kv[1]["hypervolume"]))
            print(f"  {name}: HV {hv}")
    for k, v in results["expected_outcome"].items():
        print(f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
