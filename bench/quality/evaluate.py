"""Zoo evaluation: the project's claim reproduced in miniature (``msdda eval``).

For every pair of the zoo's objectives and for the three together, sweep the preference weights and measure
every reward (mean and 95% interval over ``samples`` images per point) for each strategy:

    msdda   the exact product of the experts' Gaussians            Engine.generate(strategy="msdda")
    mpa     average of the experts' raw outputs (Diffusion Blend)  Engine.generate(strategy="mpa")
    soup    parameter averaging (rewarded soups)                   Engine.generate(strategy="soup")
    base    the base model alone (weight-independent: one point)   Engine.generate(strategy="base")
    code    CoDe-style best-of-N block selection from the base     :func:`code_sample`
    rgg     reward-gradient guidance of the base (differentiable rewards only)   :func:`rgg_sample`
    oracle  the MORL oracles (fine-tuned on the weighted reward) at their weights   Engine strategy expert:<oracle>

and report each strategy's Pareto-front hypervolume, msdda's distance to each MORL oracle, and each strategy's
generation time. Samples are paired: sample b always has class label b % 10 and seed ``seed + b``, whatever the
strategy or the weights, so two points differ only by what the strategy does.

Weights mean the same thing everywhere. The experts and oracles were trained (``msdda.zoo.rl``) on rewards
normalised by fixed scales s_k (the std of each reward over base samples) with the KL strength beta = KL_BETA,
so the target of weights w is p_base(x) exp(sum_k w_k r_k(x) / (s_k beta)). CoDe ranks candidates by
sum_k w_k r_k / s_k, and RGG follows the gradient of the same quantity with scale 1 / beta -- the first-order
(classifier-guidance) approximation of that very target; fixed once, never tuned.

Resumable: every (strategy, weight point) result is written atomically to ``<out>/cache/`` as soon as it is
done, keyed by a fingerprint of everything it depends on; a rerun skips finished points (weight points shared
by several combinations, e.g. the triple's edges and the pairs, are computed once). Outputs::

    <out>.json                 all numbers                         (bench/results/zoo_eval.json)
    <out>.md                   markdown tables for the README      (bench/results/zoo_eval.md)
    <out>/pareto_<a>_<b>.png   one Pareto plot per pair
    <out>/grid_<strategy>.png  images of each strategy at w = 0.5 for the oracle pair
    <out>/cache/<run>/         per-point per-sample rewards (the resume state; <run> names samples, steps,
                               guidance and seed, so runs with other settings never overwrite it)
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from msdda import schedule as sch
from msdda.atomic import atomic_write_bytes, atomic_write_json
from msdda.loading import file_sha256
from msdda.strategies import Plan
from msdda.kernels import fused_expert_step, philox_normal
from msdda.zoo import (DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, KL_BETA, OBJECTIVES, ORACLE_PAIR, ORACLE_WEIGHTS,
                       ORACLES, classifier_path, oracle_name, zoo_paths)

__all__ = [
    "EvalSettings", "STRATEGIES", "quick_settings", "evaluate", "main",
    "pair_weights", "simplex_weights", "combinations",
    "pareto_mask", "hypervolume",
    "candidate_seeds", "code_sample", "rgg_sample", "weighted_reward", "tweedie_x0",
    "make_rewards", "load_reward_scales", "trained_beta", "estimate_seconds", "measure_throughput",
]

STRATEGIES = ("msdda", "mpa", "soup", "base", "code", "rgg", "oracle")
WEIGHTED = ("msdda", "mpa", "soup", "code", "rgg")   # strategies swept over the weights
ENGINE_STRATEGIES = ("msdda", "mpa", "soup")
MIN_HONEST_SAMPLES = 256
SEED_STRIDE = 2**40          # candidate n of sample b draws its noise with seed_b + n * SEED_STRIDE


# ================================================================================================================
# settings
# ================================================================================================================


@dataclass(frozen=True)
class EvalSettings:
    """Everything the numbers depend on. The defaults are the real evaluation."""

    samples: int = 256                 # images per weight point (class labels b % 10, seeds seed + b)
    steps: int = DEFAULT_STEPS         # DDPM steps (the zoo's default)
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    seed: int = 0
    pair_step: float = 0.1             # w in {0, 0.1, ..., 1} for each pair
    triple_step: float = 0.2           # simplex grid for the triple (see simplex_weights)
    code_candidates: int = 8           # CoDe: N candidates per block
    code_block: int = 5                # CoDe: steps per block
    rgg_scale: float | None = None     # RGG: None -> 1 / beta, the experts' trained KL strength
    batch_size: int = 128              # images per Engine.generate call (CoDe: batch_size // N per call)
    timing_images: int = 64            # images per strategy in the timing pass
    grid_images: int = 40              # images in each grid (4 rows of the 10 digits)
    hv_margin: float = 0.05            # reference point = min - hv_margin * (max - min), per objective
    bootstrap: int = 500               # paired bootstrap replicates for the hypervolume intervals

    def rgg(self) -> float:
        return float(self.rgg_scale) if self.rgg_scale is not None else 1.0 / KL_BETA

    def validate(self) -> None:
        for name in ("samples", "steps", "code_candidates", "code_block", "batch_size", "timing_images"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("pair_step", "triple_step"):
            v = getattr(self, name)
            n = round(1.0 / v) if v > 0 else 0
            if not (0 < v <= 1) or abs(n * v - 1.0) > 1e-9:
                raise ValueError(f"{name} must divide 1 (e.g. 0.1, 0.2, 0.25, 0.5), got {v!r}")
        if not (math.isfinite(self.guidance_scale)):
            raise ValueError(f"guidance_scale must be finite, got {self.guidance_scale!r}")
        if not 0 <= self.seed < SEED_STRIDE - self.samples:
            raise ValueError(f"seed must lie in [0, 2**40 - samples), got {self.seed}")


def trained_beta(paths: Mapping[str, Path], names: Sequence[str] = OBJECTIVES) -> tuple[float, str]:
    """The KL strength the experts were trained with (``<expert>/metrics.json`` config.beta, written by the
    zoo's training), else the package's KL_BETA. -> (beta, where it came from)."""
    for name in names:
        if name in paths:
            try:
                m = json.loads((Path(paths[name]) / "metrics.json").read_text())
                return float(m["config"]["beta"]), str(Path(paths[name]) / "metrics.json")
            except (OSError, KeyError, TypeError, ValueError):
                continue
    return float(KL_BETA), "msdda.zoo.KL_BETA"


def quick_settings(steps: int | None = None) -> EvalSettings:
    """The ``--quick`` smoke evaluation: 8 samples, w in {0, 0.5, 1}, 10 steps. NOT the real evaluation."""
    return EvalSettings(samples=8, steps=steps or 10, pair_step=0.5, triple_step=0.5, timing_images=8,
                        grid_images=8, bootstrap=100)


# ================================================================================================================
# weight grids and combinations
# ================================================================================================================


def pair_weights(pair: Sequence[str], step: float = 0.1) -> list[dict[str, float]]:
    """[{a: w, b: 1 - w}] for w = 0, step, ..., 1 (w is the first objective's weight, as for the oracles)."""
    n = round(1.0 / step)
    a, b = pair
    return [{a: round(i / n, 10), b: round(1 - i / n, 10)} for i in range(n + 1)]


def simplex_weights(objectives: Sequence[str], step: float = 0.2) -> list[dict[str, float]]:
    """All weight vectors with entries in {0, step, ..., 1} summing to 1 (a regular simplex grid).

    The default step 0.2 (21 points for three objectives) is chosen because its 15 edge points are exactly
    points of the pairs' 0.1 grids (0, 0.2, ..., 1), which are evaluated anyway, so the triple costs only its
    6 interior points; step 0.25 would be coarser (15 points, 3 interior) and yet need 12 new points.
    """
    n = round(1.0 / step)
    k = len(objectives)
    out = []
    for combo in itertools.product(range(n + 1), repeat=k - 1):
        if sum(combo) <= n:
            parts = list(combo) + [n - sum(combo)]
            out.append({o: round(p / n, 10) for o, p in zip(objectives, parts)})
    return sorted(out, key=lambda w: tuple(-w[o] for o in objectives))


def combinations(objectives: Sequence[str] = OBJECTIVES) -> list[tuple[str, ...]]:
    """Every pair of objectives, then all of them together."""
    combos = [tuple(p) for p in itertools.combinations(objectives, 2)]
    if len(objectives) > 2:
        combos.append(tuple(objectives))
    return combos


def combo_name(objectives: Sequence[str]) -> str:
    return "+".join(objectives)


def _canonical(weights: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    """Weights with zeros dropped, in OBJECTIVES order (then any others, sorted): the cache identity."""
    order = {o: i for i, o in enumerate(OBJECTIVES)}
    items = [(k, round(float(v), 10)) for k, v in weights.items() if float(v) != 0.0]
    return tuple(sorted(items, key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


# ================================================================================================================
# Pareto fronts and hypervolume (maximisation)
# ================================================================================================================


def pareto_mask(points) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``points`` [n, d] (maximising every column).

    Row i is dominated when some row j is >= in every column and > in at least one. Duplicates are all kept.
    """
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"points must be [n, d], got shape {p.shape}")
    n = p.shape[0]
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        ge = np.all(p >= p[i], axis=1)
        gt = np.any(p > p[i], axis=1)
        if np.any(ge & gt):
            keep[i] = False
    return keep


def hypervolume(points, ref) -> float:
    """Exact hypervolume dominated by ``points`` [n, d] above the reference point ``ref`` [d] (maximising).

    The union of the boxes [ref, p]. d = 1: max - ref; d = 2: a sweep over x (descending); d >= 3: slicing
    along the last objective (between consecutive distinct levels the cross-section is the (d-1)-dimensional
    hypervolume of the points at or above the level). Points not strictly above ``ref`` in every objective
    contribute nothing.
    """
    p = np.asarray(points, dtype=np.float64).reshape(-1, len(ref)) if len(points) else np.zeros((0, len(ref)))
    r = np.asarray(ref, dtype=np.float64)
    if p.size and not np.all(np.isfinite(p)):
        raise ValueError("hypervolume: points contain NaN or Inf")
    p = p[np.all(p > r, axis=1)]
    if p.shape[0] == 0:
        return 0.0
    return float(_hv(p[pareto_mask(p)], r))


def _hv(p: np.ndarray, r: np.ndarray) -> float:
    d = p.shape[1]
    if d == 1:
        return float(p[:, 0].max() - r[0])
    if d == 2:
        order = np.argsort(-p[:, 0], kind="stable")
        area, best_y = 0.0, r[1]
        for i in order:
            x, y = p[i]
            if y > best_y:
                area += (x - r[0]) * (y - best_y)
                best_y = y
        return area
    levels = np.unique(p[:, -1])[::-1]          # distinct last-objective values, descending
    vol = 0.0
    for k, z in enumerate(levels):
        below = levels[k + 1] if k + 1 < len(levels) else r[-1]
        sl = p[p[:, -1] >= z][:, :-1]
        vol += _hv(sl[pareto_mask(sl)], r[:-1]) * (z - below)
    return vol


# ================================================================================================================
# rewards
# ================================================================================================================


def make_rewards(classifier_file: str | Path | None = None, device="cpu") -> dict[str, Callable]:
    """{name: fn(images [B,1,16,16] in [-1,1], labels [B]) -> [B]} for the zoo's objectives (the classifier on
    ``device``; labels follow the images)."""
    import copy

    from msdda.zoo import rewards as R

    clf = R.load_classifier(classifier_file)
    if torch.device(device).type != "cpu":
        clf = copy.deepcopy(clf).to(device)         # never move the shared cached instance

    def legible(images, labels):
        return R.legible(images, labels.to(images.device), classifier=clf)

    return {"legible": legible, "bold": R.bold, "compressible": R.compressible}


def load_reward_scales(root: str | Path | None) -> dict[str, float] | None:
    """s_k = std of each reward over base samples (``<root>/base/metrics.json``, written by the zoo's training);
    the normalisation the experts and oracles were trained with. None when the file is absent."""
    path = Path(root if root is not None else zoo_paths()["base"].parent) / "base" / "metrics.json"
    try:
        m = json.loads(path.read_text())
        return {k: float(v["std"]) for k, v in m["reward_stats"]["per_reward"].items()}
    except (OSError, KeyError, TypeError, ValueError):
        return None


def weighted_reward(images: torch.Tensor, labels: torch.Tensor, weights: Mapping[str, float],
                    reward_fns: Mapping[str, Callable], scales: Mapping[str, float] | None = None) -> torch.Tensor:
    """sum_k w_k r_k(images) / s_k over the objectives with w_k != 0 -> [B] (differentiable where r_k is)."""
    total = None
    for name, w in weights.items():
        if float(w) == 0.0:
            continue
        s = float(scales[name]) if scales is not None else 1.0
        term = reward_fns[name](images, labels).to(device=images.device, dtype=torch.float32) * (float(w) / s)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("weighted_reward: every weight is zero")
    return total


def score_all(x0: torch.Tensor, labels: torch.Tensor, reward_fns: Mapping[str, Callable]) -> dict[str, np.ndarray]:
    """Every reward of x_0 (clamped to [-1, 1]) -> {name: float64 array [B]}."""
    images = x0.detach().float().clamp(-1.0, 1.0)
    labels = labels.to(images.device)
    with torch.no_grad():
        return {name: fn(images, labels).double().cpu().numpy() for name, fn in reward_fns.items()}


# ================================================================================================================
# base-model samplers built from the engine's plain pieces: CoDe and reward-gradient guidance
# ================================================================================================================


def _uses_cfg(engine, guidance_scale: float) -> bool:
    return guidance_scale != 1.0 and (engine.is_text or bool(engine.num_classes))


def _base_denoiser(engine, cond, cfg: bool):
    """(x [B, C, H, W], t) -> the base model's raw output [1, (2,) B, C_out, H, W]: the Engine's own denoiser
    for the single-network plan of the base (member 0)."""
    return engine._denoiser(Plan("single", (0,), torch.ones(1, 1, dtype=torch.float64)), cond, cfg)


def _base_setup(engine, class_labels, seeds, steps: int, eta: float, guidance_scale: float):
    """What both base-model samplers start from: (cfg, g, labels, timesteps, scalars, seeds [B] int64, x_T)."""
    cfg = _uses_cfg(engine, guidance_scale)
    g = float(guidance_scale) if cfg else None
    labels = [int(c) for c in class_labels]
    timesteps, scalars = sch.step_plan(engine.sched_params, steps, kind=engine.scheduler, eta=float(eta))
    seed_t = torch.tensor(list(seeds), dtype=torch.int64, device=engine.device)
    x = philox_normal(seed_t, 0, engine.sample_shape).to(engine.device, engine.dtype)
    return cfg, g, labels, timesteps, scalars, seed_t, x


def _guided(raw: torch.Tensor, C: int, g: float | None) -> torch.Tensor:
    """raw [1, (2,) B, C_out, H, W] -> [B, C_out, H, W]: out = u + g (c - u) on the first C channels, the
    variance channel from the conditional half (as the fused step does)."""
    if g is None:
        return raw[0]
    u, c = raw[0, 0], raw[0, 1]
    return torch.cat([u[:, :C] + g * (c[:, :C] - u[:, :C]), c[:, C:]], dim=1)


def tweedie_x0(raw: torch.Tensor, x_t: torch.Tensor, scalars, guidance_scale: float | None, *,
               clip: bool = True) -> torch.Tensor:
    """The x0 estimate px * x_t + po * out of a raw output [1, (2,) B, C_out, H, W] at x_t (clamped to the
    step's clip range when ``clip``)."""
    C = x_t.shape[1]
    out = _guided(raw, C, guidance_scale)[:, :C]
    x0 = scalars.px * x_t + scalars.po * out
    if clip and math.isfinite(scalars.clip):
        x0 = x0.clamp(-scalars.clip, scalars.clip)
    return x0


def candidate_seeds(seeds: Sequence[int], n: int) -> torch.Tensor:
    """int64 [n * B], candidate-major: candidate 0 of sample b uses seed_b (the base model's own noise),
    candidate j > 0 uses seed_b + j * 2**40 (seeds must be < 2**40)."""
    s = torch.as_tensor(list(seeds), dtype=torch.int64)
    if bool((s < 0).any()) or bool((s >= SEED_STRIDE).any()):
        raise ValueError("CoDe seeds must lie in [0, 2**40)")
    if n * SEED_STRIDE >= 2**63:
        raise ValueError(f"too many candidates ({n})")
    return torch.cat([s + j * SEED_STRIDE for j in range(n)])


def _tile(t: torch.Tensor, n: int, dim: int = 0) -> torch.Tensor:
    """Repeat along ``dim`` n times, candidate-major (row n*B + b is row b)."""
    return torch.cat([t] * n, dim=dim) if n > 1 else t


def code_sample(engine, class_labels: Sequence[int], seeds: Sequence[int], weights: Mapping[str, float],
                reward_fns: Mapping[str, Callable], *, steps: int, guidance_scale: float, n_candidates: int = 8,
                block: int = 5, reward_scales: Mapping[str, float] | None = None, eta: float = 1.0) -> torch.Tensor:
    """CoDe-style blockwise best-of-N sampling from the base model -> x_0 [B, C, H, W].

    From the current x (shared by all candidates), each block runs ``block`` ancestral steps of the base model
    for N candidates with independent noise (candidate seeds :func:`candidate_seeds`, Philox offset 1 + step as
    in the engine), then each sample keeps the candidate whose Tweedie x0 estimate at the block's end (x_0
    itself after the last block) scores best on ``sum_k w_k r_k / s_k`` (ties: the lowest candidate). The base
    output that gave the kept candidate's estimate is reused as the next block's first step, where all
    candidates share x. N = 1 is exactly the base model's sampler.
    """
    B, N = len(seeds), int(n_candidates)
    if N < 1 or block < 1:
        raise ValueError("n_candidates and block must be >= 1")
    dev = engine.device
    cfg, g, labels, timesteps, scalars, _, x = _base_setup(engine, class_labels, seeds, steps, eta, guidance_scale)
    denoise1 = _base_denoiser(engine, engine._conditioning(B, cfg, None, None, None, None, labels), cfg)
    denoiseN = _base_denoiser(engine, engine._conditioning(N * B, cfg, None, None, None, None, labels * N), cfg)
    cand = candidate_seeds(seeds, N).to(dev)
    one = torch.ones(N * B, 1, dtype=torch.float32, device=dev)
    labels_n = torch.tensor(labels * N, dtype=torch.int64, device=dev)
    batch_axis = 2 if cfg else 1
    rows = torch.arange(B, device=dev)
    raw_first = None
    n = len(timesteps)
    with torch.inference_mode():
        i = 0
        while i < n:
            end = min(i + block, n)
            if raw_first is None:
                raw_first = denoise1(x, timesteps[i])
            xc = _tile(x, N)
            for j in range(i, end):
                raw = _tile(raw_first, N, batch_axis) if j == i else denoiseN(xc, timesteps[j])
                xc = fused_expert_step(raw, xc, one, scalars[j], guidance_scale=g, seed=cand, offset=1 + j)
            if end < n:
                raw_next = denoiseN(xc, timesteps[end])
                x0 = tweedie_x0(raw_next, xc, scalars[end], g)
            else:
                raw_next, x0 = None, xc
            score = weighted_reward(x0.float().clamp(-1.0, 1.0), labels_n, weights, reward_fns, reward_scales)
            best = score.view(N, B).argmax(0).to(dev)                     # [B]
            x = xc.view(N, B, *xc.shape[1:])[best, rows]
            if raw_next is not None:
                r = raw_next.unflatten(batch_axis, (N, B))
                raw_first = r[:, :, best, rows] if cfg else r[:, best, rows]
            else:
                raw_first = None
            i = end
    return x


def rgg_sample(engine, class_labels: Sequence[int], seeds: Sequence[int], weights: Mapping[str, float],
               reward_fns: Mapping[str, Callable], *, steps: int, guidance_scale: float, scale: float,
               reward_scales: Mapping[str, float] | None = None, eta: float = 1.0,
               differentiable: frozenset | set | None = None) -> torch.Tensor:
    """Reward-gradient guidance of the base model -> x_0 [B, C, H, W].

    At each step: the base's (guided) output at x_t, its Tweedie estimate x0_hat = px x_t + po out (not
    clamped, so the gradient is not cut where the estimate leaves [-1, 1]), the gradient
    grad = d/dx_t sum_b sum_k w_k r_k(x0_hat_b) / s_k (through the network), and the step
    x_prev = [the base's own step from x_t: mean + sqrt(var) z] + var * scale * grad, with var the step's
    variance (0 on the last, deterministic step). scale = 0 is exactly the base model's sampler.
    """
    if differentiable is not None:
        bad = [k for k, w in weights.items() if float(w) != 0 and k not in differentiable]
        if bad:
            raise ValueError(f"reward-gradient guidance needs differentiable rewards; {bad[0]!r} is not")
    B = len(seeds)
    dev = engine.device
    cfg, g, labels, timesteps, scalars, seed_t, x = _base_setup(engine, class_labels, seeds, steps, eta,
                                                                guidance_scale)
    denoise = _base_denoiser(engine, engine._conditioning(B, cfg, None, None, None, None, labels), cfg)
    one = torch.ones(B, 1, dtype=torch.float32, device=dev)
    labels_t = torch.tensor(labels, dtype=torch.int64, device=dev)
    C = x.shape[1]
    for i, t in enumerate(timesteps):
        sc = scalars[i]
        if scale != 0.0:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                raw = denoise(xg, t)
                x0_hat = tweedie_x0(raw, xg, sc, g, clip=False)
                r = weighted_reward(x0_hat, labels_t, weights, reward_fns, reward_scales).sum()
                (grad,) = torch.autograd.grad(r, xg)
            raw = raw.detach()
        else:
            with torch.no_grad():
                raw = denoise(x, t)
            grad = None
        with torch.no_grad():
            x_next = fused_expert_step(raw, x, one, sc, guidance_scale=g, seed=seed_t, offset=1 + i)
            if grad is not None:
                _, var, _ = sch.gaussian_step(_guided(raw, C, g), x, sc)
                x_next = x_next + (var * scale * grad).to(x_next.dtype)
        x = x_next.detach()
    return x


# ================================================================================================================
# work items and the cache
# ================================================================================================================


@dataclass(frozen=True)
class Item:
    """One (strategy, weight point): ``weights`` canonical (zeros dropped); base: (); oracle: its w point."""

    strategy: str
    weights: tuple[tuple[str, float], ...] = ()
    oracle: str | None = None

    @property
    def key(self) -> str:
        if self.strategy == "oracle":
            return f"oracle/{self.oracle}"
        if self.strategy == "base":
            return "base/base"
        return f"{self.strategy}/" + "_".join(f"{k}-{v:.4f}" for k, v in self.weights)

    def label(self) -> str:
        if self.strategy == "oracle":
            return self.oracle
        if self.strategy == "base":
            return "base"
        return f"{self.strategy} " + ",".join(f"{k}={v:g}" for k, v in self.weights)

    def wdict(self) -> dict[str, float]:
        return dict(self.weights)


def _oracle_items(pair: Sequence[str]) -> list[Item]:
    return [Item("oracle", _canonical({pair[0]: w, pair[1]: round(1 - w, 10)}), oracle_name(w, tuple(pair)))
            for w in ORACLE_WEIGHTS]


def build_plan(combos: Sequence[tuple[str, ...]], strategies: Sequence[str], settings: EvalSettings,
               differentiable: frozenset | set, oracle_pair: Sequence[str] | None = ORACLE_PAIR
               ) -> dict[str, dict[str, list[Item]]]:
    """{combination name: {strategy: [items in weight order]}}. Items shared between combinations are equal
    objects (same key), so they are computed once."""
    plan: dict[str, dict[str, list[Item]]] = {}
    for combo in combos:
        grid = pair_weights(combo, settings.pair_step) if len(combo) == 2 else simplex_weights(combo, settings.triple_step)
        per: dict[str, list[Item]] = {}
        for s in strategies:
            if s in WEIGHTED:
                if s == "rgg" and not all(o in differentiable for o in combo):
                    continue
                per[s] = [Item(s, _canonical(w)) for w in grid]
            elif s == "base":
                per[s] = [Item("base")]
            elif s == "oracle" and oracle_pair is not None and tuple(combo) == tuple(oracle_pair):
                per[s] = _oracle_items(combo)
        plan[combo_name(combo)] = per
    return plan


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cache_path(cache_dir: Path, item: Item) -> Path:
    return cache_dir / (item.key.replace("/", "__") + ".json")


def _read_cache(path: Path, fingerprint: str) -> dict | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if d.get("fingerprint") != fingerprint or "rewards" not in d:
        return None
    return d


# ================================================================================================================
# the evaluator
# ================================================================================================================


def resolve_models(zoo_root: str | Path | None = None, models: Mapping[str, str | Path] | None = None,
                   objectives: Sequence[str] = OBJECTIVES, oracles: Sequence[str] = ORACLES) -> dict[str, Path]:
    """{zoo name: model folder} for base, the experts and the oracles (``models`` overrides ``zoo_root``)."""
    paths = dict(zoo_paths(zoo_root))
    if models:
        paths.update({k: Path(v) for k, v in models.items()})
    return {k: paths[k] for k in ("base", *objectives, *oracles) if k in paths}


def missing_models(paths: Mapping[str, Path]) -> list[str]:
    return [k for k, p in paths.items()
            if not ((p / "unet" / "config.json").exists() or (p / "config.json").exists())]


def _save_grid(x0: torch.Tensor, path: Path, cols: int = 10, scale: int = 4) -> None:
    from PIL import Image

    u8 = ((x0.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()[:, 0]
    n, h, w = u8.shape
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    pad = 2
    grid = Image.new("L", (cols * (w * scale + pad) + pad, rows * (h * scale + pad) + pad), 255)
    for i in range(n):
        r, c = divmod(i, cols)
        im = Image.fromarray(u8[i], mode="L").resize((w * scale, h * scale), Image.NEAREST)
        grid.paste(im, (pad + c * (w * scale + pad), pad + r * (h * scale + pad)))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


class _quiet_diffusers:
    """Silence diffusers' loading chatter (accelerate hints, dtype notes) while the models load."""

    def __enter__(self):
        try:
            from diffusers.utils import logging as dl

            self._dl, self._level = dl, dl.get_verbosity()
            dl.set_verbosity_error()
        except Exception:  # pragma: no cover
            self._dl = None
        return self

    def __exit__(self, *exc):
        if self._dl is not None:
            self._dl.set_verbosity(self._level)
        return False


class Evaluator:
    """An Engine over base + experts + oracles, the rewards and the settings; runs one item at a time."""

    def __init__(self, paths: Mapping[str, Path], settings: EvalSettings, *, reward_fns=None, differentiable=None,
                 reward_scales=None, classifier_file=None, device="cpu", backend: str = "torch"):
        self.settings = settings
        self.paths = dict(paths)
        self.device = device
        self.backend = backend
        self._engines: dict[str, object] = {}
        self.engine = self.engine_for(backend)
        from msdda.zoo.rewards import DIFFERENTIABLE

        if reward_fns is None:
            reward_fns = make_rewards(classifier_file, device)
            self.rewards_id = file_sha256(classifier_file if classifier_file is not None else classifier_path())
        else:
            self.rewards_id = "custom"
        if differentiable is None:
            differentiable = DIFFERENTIABLE
        self.reward_fns = dict(reward_fns)
        self.differentiable = frozenset(differentiable or ())
        self.reward_scales = dict(reward_scales) if reward_scales is not None else None
        self.models = {m.name: m.sha256 for m in self.engine.models}

    def engine_for(self, backend: str):
        """The Engine on ``backend`` over all the models, built once. RGG needs autograd, so it always runs on
        torch; the other strategies run on the evaluator's backend (same samples up to float rounding)."""
        if backend not in self._engines:
            from msdda.engine import Engine

            experts = {k: str(v) for k, v in self.paths.items() if k != "base"}
            with _quiet_diffusers():
                self._engines[backend] = Engine.from_pretrained(str(self.paths["base"]), experts,
                                                                device=self.device, backend=backend)
        return self._engines[backend]

    def backend_of(self, strategy: str) -> str:
        return "torch" if strategy == "rgg" else self.backend

    # ---------------------------------------------------------------- identities
    def fingerprint(self, strategy: str) -> str:
        s = self.settings
        common = dict(samples=s.samples, steps=s.steps, guidance_scale=s.guidance_scale, seed=s.seed,
                      scheduler=self.engine.scheduler, dtype=str(self.engine.dtype), models=self.models,
                      rewards=sorted(self.reward_fns), rewards_id=self.rewards_id)
        if strategy == "code":
            common.update(code=(s.code_candidates, s.code_block), scales=self.reward_scales)
        if strategy == "rgg":
            common.update(rgg=s.rgg(), scales=self.reward_scales)
        return _fingerprint(common)

    # ---------------------------------------------------------------- generation
    def generate(self, item: Item, seeds: Sequence[int], labels: Sequence[int], backend: str | None = None
                 ) -> torch.Tensor:
        """x_0 [len(seeds), C, H, W] of one item for these samples (one call; the caller chunks).
        backend: override the strategy's backend (the timing pass runs every strategy on torch)."""
        s, eng = self.settings, self.engine_for(backend or self.backend_of(item.strategy))
        w = item.wdict()
        if item.strategy in ENGINE_STRATEGIES:
            return eng.generate(class_labels=list(labels), weights={k: v for k, v in w.items()},
                                num_images=len(seeds), steps=s.steps, guidance_scale=s.guidance_scale,
                                seed=list(seeds), strategy=item.strategy, output_type="latent").latents
        if item.strategy in ("base", "oracle"):
            strategy = "base" if item.strategy == "base" else f"expert:{item.oracle}"
            return eng.generate(class_labels=list(labels), num_images=len(seeds), steps=s.steps,
                                guidance_scale=s.guidance_scale, seed=list(seeds), strategy=strategy,
                                output_type="latent").latents
        if item.strategy == "code":
            return code_sample(eng, labels, seeds, w, self.reward_fns, steps=s.steps,
                               guidance_scale=s.guidance_scale, n_candidates=s.code_candidates,
                               block=s.code_block, reward_scales=self.reward_scales)
        if item.strategy == "rgg":
            return rgg_sample(eng, labels, seeds, w, self.reward_fns, steps=s.steps, guidance_scale=s.guidance_scale,
                              scale=s.rgg(), reward_scales=self.reward_scales, differentiable=self.differentiable)
        raise ValueError(f"unknown strategy {item.strategy!r}")

    def chunk_size(self, strategy: str) -> int:
        b = self.settings.batch_size
        return max(1, b // self.settings.code_candidates) if strategy == "code" else b

    def run_item(self, item: Item, *, on_chunk: Callable[[int], None] | None = None,
                 keep: int = 0) -> tuple[dict, torch.Tensor | None]:
        """Generate and score all samples of one item -> (cache record, the first ``keep`` images or None)."""
        s = self.settings
        rewards: dict[str, list] = {k: [] for k in self.reward_fns}
        kept, gen_seconds = [], 0.0
        step = self.chunk_size(item.strategy)
        for start in range(0, s.samples, step):
            idx = list(range(start, min(start + step, s.samples)))
            seeds = [s.seed + b for b in idx]
            labels = [b % 10 for b in idx]
            t0 = time.perf_counter()
            x0 = self.generate(item, seeds, labels)
            gen_seconds += time.perf_counter() - t0
            sc = score_all(x0, torch.tensor(labels, dtype=torch.int64), self.reward_fns)
            for k, v in sc.items():
                rewards[k].extend(float(f"{x:.7g}") for x in v)
            if keep and sum(len(k) for k in kept) < keep:
                kept.append(x0[: keep - sum(len(k) for k in kept)].detach().cpu())
            if on_chunk is not None:
                on_chunk(len(idx))
        record = {"key": item.key, "strategy": item.strategy, "weights": item.wdict(), "oracle": item.oracle,
                  "fingerprint": self.fingerprint(item.strategy), "n": s.samples, "rewards": rewards,
                  "backend": self.backend_of(item.strategy),
                  "generation_seconds": gen_seconds, "seconds_per_image": gen_seconds / s.samples,
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        return record, (torch.cat(kept) if kept else None)

    # ---------------------------------------------------------------- cost model
    def forward_rows(self, item: Item) -> float:
        """UNet rows (image-forwards) this item needs: the unit of the time estimate."""
        s = self.settings
        per = s.steps * (2 if _uses_cfg(self.engine, s.guidance_scale) else 1) * s.samples
        k = max(1, len(item.weights))
        # measured on the zoo's UNet (CPU): RGG's forward + backward ~2.2 forwards; CoDe ~1.15 N forwards per
        # step (N candidates, plus scoring N Tweedie estimates per block)
        return per * {"msdda": k, "mpa": k, "soup": 1, "base": 1, "oracle": 1,
                      "code": 1.15 * s.code_candidates, "rgg": 2.2}[item.strategy]


def measure_throughput(engine, rows: int = 256, seconds: float = 2.0) -> float:
    """The base UNet's forward throughput in rows (images) per second, on a batch of ``rows``."""
    from msdda.backends import Conditioning

    C, H, W = engine.sample_shape
    x = torch.randn(rows, C, H, W, dtype=engine.dtype, device=engine.device)
    cond = Conditioning(class_labels=torch.randint(0, engine.num_classes, (rows,), device=engine.device)) \
        if engine.num_classes else Conditioning()
    with torch.inference_mode():
        engine.backend.forward(x, 500, cond, (0,))
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 2:
            engine.backend.forward(x, 500, cond, (0,))
            n += 1
    return n * rows / (time.perf_counter() - t0)


def estimate_seconds(evaluator: Evaluator, items: Sequence[Item], rows_per_second: float) -> float:
    return sum(evaluator.forward_rows(it) for it in items) / rows_per_second


# ================================================================================================================
# statistics and the report
# ================================================================================================================


def _stats(values: Sequence[float]) -> tuple[float, float, float]:
    a = np.asarray(values, dtype=np.float64)
    sd = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return float(a.mean()), sd, 1.96 * sd / math.sqrt(max(a.size, 1))


def _point_summary(rec: dict) -> dict:
    mean, sd, ci = {}, {}, {}
    for k, v in rec["rewards"].items():
        mean[k], sd[k], ci[k] = _stats(v)
    return {"weights": rec["weights"], "oracle": rec.get("oracle"), "n": rec["n"], "mean": mean, "sd": sd,
            "ci95": ci, "seconds_per_image": rec.get("seconds_per_image")}


def _combo_report(combo: tuple[str, ...], per: Mapping[str, list[Item]], records: Mapping[str, dict],
                  settings: EvalSettings, rng_seed: int = 0) -> dict:
    objs = list(combo)
    strategies = {}
    arrays = {}                        # strategy -> [points, objectives, samples]
    for s, items in per.items():
        recs = [records[it.key] for it in items if it.key in records]
        if not recs:
            continue
        pts = [_point_summary(r) for r in recs]
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
        entry.update(hypervolume=hv, hypervolume_normalized=hv / box if box > 0 else float("nan"),
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


def _oracle_comparison(combo_rep: dict, per: Mapping[str, list[Item]], records: Mapping[str, dict],
                       reward_names: Sequence[str], scales: Mapping[str, float] | None) -> list[dict]:
    """For each oracle: every weighted strategy's point at the same weights vs the oracle, per reward."""
    objs = combo_rep["objectives"]
    rows = []
    for oit in per.get("oracle", []):
        orec = records.get(oit.key)
        if orec is None:
            continue
        o = _point_summary(orec)
        entry = {"oracle": oit.oracle, "weights": oit.wdict(), "w": oit.wdict().get(objs[0], 0.0),
                 "oracle_mean": o["mean"], "oracle_ci95": o["ci95"], "strategies": {}}
        for s, items in per.items():
            if s in ("oracle", "base"):
                continue
            match = [it for it in items if it.weights == oit.weights and it.key in records]
            if not match:
                continue
            rec = records[match[0].key]
            p = _point_summary(rec)
            diff = {k: p["mean"][k] - o["mean"][k] for k in reward_names}
            within = {k: abs(diff[k]) <= o["ci95"][k] for k in reward_names}
            paired = {}
            for k in reward_names:
                d = np.asarray(rec["rewards"][k]) - np.asarray(orec["rewards"][k])
                m, sd, ci = _stats(d)
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


_COLORS = {"msdda": "tab:red", "mpa": "tab:blue", "soup": "tab:green", "code": "tab:purple", "rgg": "tab:orange",
           "base": "black", "oracle": "tab:brown"}


def _plot_pair(combo_rep: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = combo_rep["objectives"]
    fig, ax = plt.subplots(figsize=(6.4, 5.0), dpi=120)
    for s, e in combo_rep["strategies"].items():
        xs = [p["mean"][a] for p in e["points"]]
        ys = [p["mean"][b] for p in e["points"]]
        xe = [p["ci95"][a] for p in e["points"]]
        ye = [p["ci95"][b] for p in e["points"]]
        lab = f"{s} (HV {e['hypervolume']:.3g})"
        if s == "oracle":
            ax.errorbar(xs, ys, xerr=xe, yerr=ye, fmt="s", ms=8, color=_COLORS[s], capsize=3, label=lab, zorder=5)
            for p, x, y in zip(e["points"], xs, ys):
                ax.annotate(f"w={p['weights'].get(a, 0):g}", (x, y), textcoords="offset points", xytext=(6, 6),
                            fontsize=8, color=_COLORS[s])
        elif s == "base":
            ax.errorbar(xs, ys, xerr=xe, yerr=ye, fmt="*", ms=12, color=_COLORS[s], capsize=3, label=lab, zorder=4)
        else:
            ax.errorbar(xs, ys, xerr=xe, yerr=ye, fmt="o-", ms=3.5, lw=1.2, color=_COLORS.get(s), capsize=2,
                        alpha=0.9, label=lab)
            if s == "msdda" and xs:                     # mark the sweep's direction at its two ends
                for p, x, y in ((e["points"][0], xs[0], ys[0]), (e["points"][-1], xs[-1], ys[-1])):
                    ax.annotate(f"{a}={p['weights'].get(a, 0):g}", (x, y), textcoords="offset points",
                                xytext=(5, -11), fontsize=7, color=_COLORS[s])
    r = combo_rep["reference_point"]
    ax.plot([r[a]], [r[b]], "x", color="gray", label="HV reference")
    ax.set_xlabel(f"{a} reward (mean, 95% CI)")
    ax.set_ylabel(f"{b} reward (mean, 95% CI)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _fmt(x, digits=4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def _markdown(results: dict) -> str:
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


# ================================================================================================================
# the driver
# ================================================================================================================


def _outputs(out: str | Path) -> tuple[Path, Path, Path]:
    out = Path(out)
    return out, out.with_name(out.name + ".json"), out.with_name(out.name + ".md")


def _timing_pass(ev: Evaluator, strategies: Sequence[str], oracle_items: Sequence[Item], pair: Sequence[str],
                 images: int) -> dict:
    """Each strategy generates the same ``images`` images (oracle pair, w = 0.5), back to back in this process,
    all on the torch backend (RGG needs it), so the times compare strategies, not backends."""
    half = _canonical({pair[0]: 0.5, pair[1]: 0.5})
    seeds = list(range(ev.settings.seed, ev.settings.seed + images))
    labels = [b % 10 for b in range(images)]
    items = []
    for s in strategies:
        if s in WEIGHTED:
            if s == "rgg" and not all(o in ev.differentiable for o in pair):
                continue
            items.append(Item(s, half))
        elif s == "base":
            items.append(Item("base"))
        elif s == "oracle":
            mid = [it for it in oracle_items if it.weights == half]
            if mid:
                items.append(mid[0])
    warm = replace(ev.settings, steps=min(ev.settings.steps, 2))
    saved = ev.settings
    ev.settings = warm
    try:
        for it in items:                               # warm-up: first-call overheads out of the measurement
            ev.generate(it, seeds[:2], labels[:2], backend="torch")
    finally:
        ev.settings = saved
    result = {}
    for it in items:
        t0 = time.perf_counter()
        for start in range(0, images, ev.chunk_size(it.strategy)):
            sl = slice(start, start + ev.chunk_size(it.strategy))
            ev.generate(it, seeds[sl], labels[sl], backend="torch")
        result[it.strategy] = (time.perf_counter() - t0) / images
    return result


def evaluate(*, out: str | Path = "bench/results/zoo_eval", settings: EvalSettings | None = None,
             zoo_root: str | Path | None = None, models: Mapping[str, str | Path] | None = None,
             strategies: Sequence[str] | None = None, objectives: Sequence[str] = OBJECTIVES,
             combos: Sequence[Sequence[str]] | None = None, reward_fns: Mapping[str, Callable] | None = None,
             differentiable=None, reward_scales: Mapping[str, float] | None = None,
             classifier_file: str | Path | None = None, device: str = "cpu", progress: bool = True,
             timing: bool = True, plots: bool = True, quick: bool = False, backend: str = "torch",
             log=print) -> dict:
    """Run (or resume) the evaluation and write ``<out>.json``, ``<out>.md`` and ``<out>/*.png``.

    zoo_root / models: where the models are (``models`` {zoo name: folder} overrides single entries);
    strategies: a subset of STRATEGIES (default all); combos: the objective combinations (default every pair and
    the triple); reward_fns / differentiable / reward_scales: override the zoo's rewards (tests); reward_scales
    default: the zoo's ``base/metrics.json`` (else 1 for every reward, recorded in the results); backend: the
    Engine backend for generation (RGG and the timing pass always use torch). Returns the
    results dict plus ``"run": {"computed": [...], "skipped": [...]}`` for this call.
    """
    settings = settings or EvalSettings()
    settings.validate()
    strategies = list(strategies or STRATEGIES)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
    combos = [tuple(c) for c in (combos or combinations(objectives))]
    used_objs = sorted({o for c in combos for o in c}, key=lambda o: (list(OBJECTIVES) + [o]).index(o))
    oracle_pair = tuple(ORACLE_PAIR) if "oracle" in strategies and tuple(ORACLE_PAIR) in combos else None
    oracle_names = [oracle_name(w) for w in ORACLE_WEIGHTS] if oracle_pair else []
    paths = resolve_models(zoo_root, models, used_objs, oracle_names)
    missing = missing_models(paths)
    if missing:
        root = Path(zoo_root) if zoo_root is not None else zoo_paths()["base"].parent
        raise FileNotFoundError(f"zoo models not found: {', '.join(missing)} (under {root}); train them with "
                                f"`python -m msdda.zoo.train all` or pass models=")
    scales_source = "given"
    if reward_scales is None:
        reward_scales = load_reward_scales(Path(paths["base"]).parent)
        scales_source = f"{Path(paths['base']) / 'metrics.json'}" if reward_scales is not None else \
            "none: base/metrics.json not found, every s_k = 1"
    if classifier_file is None and zoo_root is not None and classifier_path(zoo_root).exists():
        classifier_file = classifier_path(zoo_root)

    beta, beta_source = trained_beta(paths)
    rgg_source = "given"
    if settings.rgg_scale is None:
        settings = replace(settings, rgg_scale=1.0 / beta)
        rgg_source = f"1 / beta, beta = {beta:g} from {beta_source}"

    out_dir, json_path, md_path = _outputs(out)
    ev = Evaluator(paths, settings, reward_fns=reward_fns, differentiable=differentiable,
                   reward_scales=reward_scales, classifier_file=classifier_file, device=device, backend=backend)
    # one cache folder per run-level setting (samples, steps, guidance, seed): an explicit --steps/--samples
    # run never overwrites another's points; within it every point also carries its own fingerprint
    run_id = f"n{settings.samples}_s{settings.steps}_g{settings.guidance_scale:g}_seed{settings.seed}"
    cache_dir = out_dir / "cache" / run_id
    cache_dir.mkdir(parents=True, exist_ok=True)
    plan = build_plan(combos, strategies, settings, ev.differentiable, oracle_pair)
    unique: dict[str, Item] = {}
    for per in plan.values():
        for items in per.values():
            for it in items:
                unique.setdefault(it.key, it)

    grid_pair = oracle_pair or (combos[0] if len(combos[0]) == 2 else None)
    grid_keys = {}
    if grid_pair is not None:
        half = _canonical({grid_pair[0]: 0.5, grid_pair[1]: 0.5})
        for s, items in plan[combo_name(grid_pair)].items():
            for it in items:
                if it.weights == half or s == "base":
                    grid_keys[it.key] = out_dir / f"grid_{s}.png"

    records, todo, skipped = {}, [], []
    for key, it in unique.items():
        rec = _read_cache(_cache_path(cache_dir, it), ev.fingerprint(it.strategy))
        if rec is not None and rec.get("n") == settings.samples:
            records[key] = rec
            skipped.append(key)
        else:
            todo.append(it)
    # cheapest first so that results accumulate early; CoDe last
    todo.sort(key=lambda it: (ev.forward_rows(it), it.key))

    estimate = None
    if todo:
        rate = measure_throughput(ev.engine, rows=min(2 * settings.batch_size, 256),
                                  seconds=2.0 if settings.samples >= 64 else 0.3)
        estimate = estimate_seconds(ev, todo, rate)
        log(f"zoo eval: {len(todo)} of {len(unique)} points to compute ({len(skipped)} cached), "
            f"{settings.samples} samples x {settings.steps} steps each; measured UNet throughput "
            f"{rate:.0f} image-forwards/s -> estimated {estimate / 3600:.2f} h ({estimate / 60:.1f} min)")
        if estimate > 2 * 3600:
            log(f"zoo eval: WARNING: the estimate ({estimate / 3600:.1f} h) is over 2 hours on this machine; "
                "it is resumable (rerun the same command to continue), or lower --samples / --steps explicitly")

    from tqdm import tqdm

    computed = []
    bar = tqdm(total=len(todo) * settings.samples, unit="img", desc="zoo eval", disable=not progress,
               mininterval=2.0, dynamic_ncols=True) if todo else None
    try:
        for it in todo:
            if bar is not None:
                bar.set_description(it.label()[:48])
            keep = settings.grid_images if it.key in grid_keys else 0
            rec, imgs = ev.run_item(it, on_chunk=(bar.update if bar is not None else None), keep=keep)
            atomic_write_json(_cache_path(cache_dir, it), rec)
            records[it.key] = rec
            computed.append(it.key)
            if imgs is not None:
                _save_grid(imgs, grid_keys[it.key])
    finally:
        if bar is not None:
            bar.close()
    # grids whose point was cached but whose image is missing: regenerate just those samples
    for key, path in grid_keys.items():
        if key in records and not path.exists():
            n = min(settings.grid_images, settings.samples)
            x0 = ev.generate(unique[key], [settings.seed + b for b in range(n)], [b % 10 for b in range(n)])
            _save_grid(x0, path)

    # ------------------------------------------------------------ timing pass (one process, back to back)
    timing_rec = None
    if timing:
        tp = cache_dir / "timing.json"
        tfp = _fingerprint({"strategies": strategies, "images": settings.timing_images, "steps": settings.steps,
                            "code": (settings.code_candidates, settings.code_block), "rgg": settings.rgg(),
                            "models": ev.models, "batch": settings.batch_size, "backend": "torch"})
        timing_rec = _read_cache_any(tp)
        if timing_rec is None or timing_rec.get("fingerprint") != tfp:
            pair = grid_pair or combos[0][:2]
            oracle_items = plan.get(combo_name(pair), {}).get("oracle", [])
            log(f"zoo eval: timing pass ({settings.timing_images} images per strategy)")
            spi = _timing_pass(ev, strategies, oracle_items, pair, settings.timing_images)
            timing_rec = {"fingerprint": tfp, "seconds_per_image": spi, "images": settings.timing_images,
                          "batch_size": settings.batch_size, "threads": torch.get_num_threads(), "backend": "torch",
                          "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                          "weights": {pair[0]: 0.5, pair[1]: 0.5}, "steps": settings.steps}
            atomic_write_json(tp, timing_rec)

    # ------------------------------------------------------------ report
    reward_names = list(ev.reward_fns)
    results = {
        "settings": {**asdict(settings), "rgg_scale": settings.rgg(), "rgg_scale_source": rgg_source,
                     "kl_beta": beta, "quick": quick,
                     "reward_scales": reward_scales, "reward_scales_source": scales_source,
                     "strategies": strategies, "objectives": used_objs,
                     "class_labels": "sample b has class b % 10", "seeds": f"sample b has seed {settings.seed} + b",
                     "models": {k: {"path": str(p), "sha256": ev.models.get(k if k != "base" else "base")}
                                for k, p in paths.items()},
                     "code_note": "CoDe: N candidates per block from the base model; each block keeps, per sample, "
                                  "the candidate whose Tweedie x0 estimate has the best sum_k w_k r_k/s_k",
                     "rgg_note": "RGG: x_prev = base step + var * scale * d/dx_t sum_k w_k r_k(x0_hat)/s_k, "
                                 "scale = 1/beta, the experts' KL strength (the first-order guidance toward p_base exp(r/beta), the "
                                 "target the experts and oracles were trained for); only on combinations of "
                                 "differentiable rewards",
                     "backend": backend, "backend_note": "generation backend of every strategy but RGG (torch, "
                     "it needs autograd); each cached point records its own backend; the backends agree to float "
                     "rounding, so the fingerprint of a point does not include it",
                     "point_backends": sorted({r.get("backend", "torch") for r in records.values()}),
                     "torch": torch.__version__, "threads": torch.get_num_threads()},
        "rewards": reward_names,
        "estimate_seconds_this_run": estimate,
        "timing": {**{k: v for k, v in (timing_rec or {}).items() if k != "fingerprint"},
                   "eval_seconds_per_image": _eval_spi(records)},
        "combinations": {},
    }
    for combo in combos:
        name = combo_name(combo)
        rep = _combo_report(combo, plan[name], records, settings)
        if oracle_pair is not None and tuple(combo) == oracle_pair:
            rep["oracle_comparison"] = _oracle_comparison(rep, plan[name], records, reward_names, reward_scales)
        results["combinations"][name] = rep
    outcome = {}
    for name, rep in results["combinations"].items():
        if "msdda_hv_is_max" in rep:
            outcome[f"msdda_hv_is_max[{name}]"] = rep["msdda_hv_is_max"]
        for row in rep.get("oracle_comparison", []):
            m = row["strategies"].get("msdda")
            if m:
                outcome[f"msdda_within_oracle_ci[{row['oracle']}]"] = m["within_all"]
                outcome[f"msdda_within_oracle_ci_pair_rewards[{row['oracle']}]"] = m["within_pair_objectives"]
    results["expected_outcome"] = outcome

    if plots:
        for combo in combos:
            rep = results["combinations"][combo_name(combo)]
            if len(combo) == 2 and rep.get("strategies"):
                _plot_pair(rep, out_dir / f"pareto_{combo[0]}_{combo[1]}.png",
                           f"{combo[0]} vs {combo[1]}: {settings.samples} samples/point, {settings.steps} steps")
    results["files"] = {"json": str(json_path), "markdown": str(md_path),
                        "plots": sorted(p.name for p in out_dir.glob("pareto_*.png")),
                        "grids": sorted(p.name for p in out_dir.glob("grid_*.png"))}
    atomic_write_json(json_path, results)
    atomic_write_bytes(md_path, _markdown(results).encode())
    return {**results, "run": {"computed": computed, "skipped": skipped}}


def _read_cache_any(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _eval_spi(records: Mapping[str, dict]) -> dict:
    """Seconds per image over the evaluation's own points (may span processes after a resume)."""
    tot: dict[str, list[float]] = {}
    for r in records.values():
        t = tot.setdefault(r["strategy"], [0.0, 0.0])
        t[0] += r.get("generation_seconds", 0.0)
        t[1] += r.get("n", 0)
    return {s: v[0] / v[1] for s, v in tot.items() if v[1]}


def _parse_strategies(strategies) -> list[str] | None:
    if strategies is None:
        return None
    if isinstance(strategies, str):
        strategies = [s.strip() for s in strategies.split(",") if s.strip()]
    alias = {"oracles": "oracle", "morl": "oracle", "rg": "rgg"}
    return [alias.get(s, s) for s in strategies]


def main(samples: int = 256, steps: int | None = None, strategies=None, out: str | Path = "bench/results/zoo_eval",
         quick: bool = False, **kwargs) -> int:
    """The ``msdda eval`` entry point. Returns an exit code (0 ok, 2 bad input or missing models).

    quick: a smoke run (8 samples, w in {0, 0.5, 1}, 10 steps unless ``steps``), written to ``<out>_quick``
    so it never overwrites the real results. Extra keyword arguments go to :func:`evaluate` (zoo_root=,
    models=, threads= sets torch's thread count, batch_size=).
    """
    threads = kwargs.pop("threads", None)
    batch_size = kwargs.pop("batch_size", None)
    if threads:
        torch.set_num_threads(int(threads))
    try:
        if quick:
            settings = quick_settings(steps)
            out = str(out).rstrip("/") + "_quick"
            print(f"zoo eval: --quick smoke run ({settings.samples} samples/point, {settings.steps} steps, "
                  f"w in {{0, 0.5, 1}}) -> {out}.json; not the real evaluation", file=sys.stderr)
        else:
            settings = EvalSettings(samples=int(samples), steps=int(steps) if steps is not None else DEFAULT_STEPS)
            if settings.samples < MIN_HONEST_SAMPLES:
                print(f"zoo eval: WARNING: {settings.samples} samples per point (< {MIN_HONEST_SAMPLES}); the "
                      "intervals will be wide and the results say so in settings.samples", file=sys.stderr)
            if settings.steps != DEFAULT_STEPS:
                print(f"zoo eval: note: {settings.steps} steps instead of the zoo's {DEFAULT_STEPS}", file=sys.stderr)
        if batch_size:
            settings = replace(settings, batch_size=int(batch_size))
        results = evaluate(out=out, settings=settings, strategies=_parse_strategies(strategies), quick=quick,
                           log=lambda m: print(m, file=sys.stderr), **kwargs)
    except (ValueError, FileNotFoundError) as exc:
        print(f"msdda: error: {' '.join(str(exc).split())}", file=sys.stderr)
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
