"""msdda's research code and benchmarks: not part of the installed runtime (pip install -e '.[bench]').

- ``bench.quality``: the zoo evaluation (scoring, Pareto fronts and hypervolume, CoDe and reward-gradient
  guidance over the Engine's public seam, the resumable point cache, reports and plots); run it with
  ``python bench/eval_zoo.py``.
- ``bench.zoo``: the recipes that train the zoo shipped in ``msdda.zoo``; run them with
  ``python bench/train_zoo.py``.
- ``run.py``, ``bench_*.py``, ``gpu_check.py``: the benchmark suite.
"""
