"""The zoo evaluation (research code, not installed; run it with ``python bench/eval_zoo.py``).

    settings.py   the strategies, EvalSettings, the experts' KL strength
    grids.py      the weight points of each combination of objectives
    scoring.py    the rewards, their scales and the weighted reward
    samplers.py   CoDe and reward-gradient guidance over the Engine's public seam
    points.py     the work items, the Engine that generates them, the resumable cache, the timing pass
    pareto.py     Pareto fronts and exact hypervolume
    report.py     statistics, hypervolume intervals, the oracle comparison, markdown
    plots.py      Pareto plots (matplotlib) and image grids
    evaluate.py   ``evaluate()``: the whole run

The known-optimum benchmark (``python bench/known_optimum.py``; docs/known-optimum.md):

    analytic_problem.py  a Gaussian-mixture diffusion problem with quadratic step rewards: the exact base step,
                         the tilted (optimal) steps, and the experts as torch modules inside an msdda.Engine
    known_optimum.py     every method against the exact optimum: per-step KL, objective, final samples, figure
"""
