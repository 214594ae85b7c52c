"""Train msdda's embedded zoo from scratch (seeded, resumable): the command line of bench/zoo/train.py.

    .venv/bin/python bench/train_zoo.py all                          # every stage, into the package's zoo folder
    .venv/bin/python bench/train_zoo.py base --out /tmp/zoo --tiny   # a tiny run (a few steps) elsewhere

Needs the bench extra (scikit-learn for the digits): pip install -e '.[bench]'.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # the repository root: bench/ is not installed

from bench.zoo.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
