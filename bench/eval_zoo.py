"""The zoo evaluation (the project's claim in miniature): a thin driver over ``msdda.evaluate.main``.

    .venv/bin/python bench/eval_zoo.py                    # the real evaluation -> bench/results/zoo_eval.{json,md}
    .venv/bin/python bench/eval_zoo.py --quick            # smoke run -> bench/results/zoo_eval_quick.{json,md}
    nohup .venv/bin/python bench/eval_zoo.py --threads 2 --backend onnxruntime > /tmp/zoo_eval.log 2>&1 &  # background

Same as ``msdda eval``, plus --threads, --batch-size and --device. Resumable: rerun the same command after an
interruption and finished points are read back from bench/results/zoo_eval/cache/.
"""
from __future__ import annotations

import argparse
import sys

from msdda.evaluate import STRATEGIES, main


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256, help="samples per weight point (default 256)")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the zoo's, 50)")
    ap.add_argument("--strategies", default=None, help=f"comma-separated subset of {','.join(STRATEGIES)}")
    ap.add_argument("--out", default="bench/results/zoo_eval", help="results prefix (default bench/results/zoo_eval)")
    ap.add_argument("--quick", action="store_true", help="small smoke evaluation, written to <out>_quick")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--batch-size", type=int, default=None, help="images per generate call (default 128)")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"),
                    help="generation backend (default torch; RGG and the timing pass always run on torch)")
    ap.add_argument("--zoo-root", default=None, help="model folder (default: the embedded zoo)")
    return ap.parse_args(argv)


if __name__ == "__main__":
    a = parse()
    sys.exit(main(samples=a.samples, steps=a.steps, strategies=a.strategies, out=a.out, quick=a.quick,
                  threads=a.threads, batch_size=a.batch_size, device=a.device, zoo_root=a.zoo_root,
                  backend=a.backend))
