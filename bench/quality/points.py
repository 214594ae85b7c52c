"""The evaluation's work items: one (strategy, weight point) each, the Engine that generates them, and the
resumable cache of their per-sample rewards.

Every item is written atomically to ``<out>/cache/<run>/`` as soon as it is done, keyed by a fingerprint of
everything it depends on; a rerun skips finished items (items shared by several combinations, e.g. the
triple's edges and the pairs, are computed once).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from msdda.loading import file_sha256
from msdda.zoo import ORACLE_PAIR, ORACLE_WEIGHTS, OBJECTIVES, ORACLES, classifier_path, oracle_name, zoo_paths

from .grids import canonical_weights, combo_name, pair_weights, simplex_weights
from .samplers import code_sample, rgg_sample
from .scoring import make_rewards, score_all
from .settings import ENGINE_STRATEGIES, WEIGHTED, EvalSettings

__all__ = ["Item", "build_plan", "fingerprint", "cache_path", "read_cache", "read_json_or_none", "resolve_models",
           "missing_models", "Evaluator", "measure_throughput", "estimate_seconds", "timing_pass"]


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


def oracle_items(pair: Sequence[str]) -> list[Item]:
    return [Item("oracle", canonical_weights({pair[0]: w, pair[1]: round(1 - w, 10)}), oracle_name(w, tuple(pair)))
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
                per[s] = [Item(s, canonical_weights(w)) for w in grid]
            elif s == "base":
                per[s] = [Item("base")]
            elif s == "oracle" and oracle_pair is not None and tuple(combo) == tuple(oracle_pair):
                per[s] = oracle_items(combo)
        plan[combo_name(combo)] = per
    return plan


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_path(cache_dir: Path, item: Item) -> Path:
    return cache_dir / (item.key.replace("/", "__") + ".json")


def read_json_or_none(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_cache(path: Path, fingerprint: str) -> dict | None:
    """A finished item's record, or None when it is missing, damaged or from other settings."""
    d = read_json_or_none(path)
    if d is None or d.get("fingerprint") != fingerprint or "rewards" not in d:
        return None
    return d


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


class _QuietDiffusers:
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
        from msdda.zoo.rewards import DIFFERENTIABLE

        self.settings = settings
        self.paths = dict(paths)
        self.device = device
        self.backend = backend
        self._engines: dict[str, object] = {}
        self.engine = self.engine_for(backend)
        if reward_fns is None:
            reward_fns = make_rewards(classifier_file, device)
            self.rewards_id = file_sha256(classifier_file if classifier_file is not None else classifier_path())
        else:
            self.rewards_id = "custom"
        self.reward_fns = dict(reward_fns)
        self.differentiable = frozenset(DIFFERENTIABLE if differentiable is None else differentiable)
        self.reward_scales = dict(reward_scales) if reward_scales is not None else None
        self.models = {m.name: m.sha256 for m in self.engine.models}

    def engine_for(self, backend: str):
        """The Engine on ``backend`` over all the models, built once. RGG needs autograd, so it always runs on
        torch; the other strategies run on the evaluator's backend (same samples up to float rounding)."""
        if backend not in self._engines:
            from msdda import Engine

            experts = {k: str(v) for k, v in self.paths.items() if k != "base"}
            with _QuietDiffusers():
                self._engines[backend] = Engine.from_pretrained(str(self.paths["base"]), experts,
                                                                device=self.device, backend=backend)
        return self._engines[backend]

    def backend_of(self, strategy: str) -> str:
        return "torch" if strategy == "rgg" else self.backend

    def models_of(self, item: Item) -> dict[str, str]:
        """{name: sha256} of the models an item's samples come from: the base, plus the experts it weights
        (msdda, mpa, soup) or its oracle. CoDe and RGG steer the base with the rewards, so they use no expert."""
        names = ["base"]
        if item.strategy in ENGINE_STRATEGIES:
            names += sorted(item.wdict())
        elif item.strategy == "oracle":
            names.append(item.oracle)
        return {n: self.models[n] for n in names}

    def fingerprint(self, item: Item) -> str:
        """Everything an item's numbers depend on (not the backend: the backends agree to float rounding), so
        a point is shared by every evaluation whose models it uses are the same files (e.g. CoDe, RGG, the base
        and the oracles between the zoo's flavours, which share the base)."""
        return fingerprint(self._fingerprint_fields(item.strategy, self.models_of(item)))

    def legacy_fingerprint(self, strategy: str) -> str:
        """The fingerprint points were written with before it was scoped to an item's own models (every model
        the Engine held): accepted when read back, so the committed caches stay valid."""
        return fingerprint(self._fingerprint_fields(strategy, self.models))

    def _fingerprint_fields(self, strategy: str, models: Mapping[str, str]) -> dict:
        s = self.settings
        common = dict(samples=s.samples, steps=s.steps, guidance_scale=s.guidance_scale, seed=s.seed,
                      scheduler=self.engine.scheduler, dtype=str(self.engine.dtype), models=dict(models),
                      rewards=sorted(self.reward_fns), rewards_id=self.rewards_id)
        if strategy == "code":
            common.update(code=(s.code_candidates, s.code_block), scales=self.reward_scales)
        if strategy == "rgg":
            common.update(rgg=s.rgg(), scales=self.reward_scales)
        return common

    def generate(self, item: Item, seeds: Sequence[int], labels: Sequence[int], backend: str | None = None,
                 steps: int | None = None) -> torch.Tensor:
        """x_0 [len(seeds), C, H, W] of one item for these samples (one call; the caller chunks).
        backend / steps: override the strategy's backend and the settings' steps (the timing pass)."""
        s, eng = self.settings, self.engine_for(backend or self.backend_of(item.strategy))
        steps = s.steps if steps is None else steps
        w = item.wdict()
        common = dict(steps=steps, guidance_scale=s.guidance_scale)
        if item.strategy in ENGINE_STRATEGIES or item.strategy in ("base", "oracle"):
            strategy = {"base": "base", "oracle": f"expert:{item.oracle}"}.get(item.strategy, item.strategy)
            return eng.generate(class_labels=list(labels), weights=w if item.strategy in ENGINE_STRATEGIES else None,
                                num_images=len(seeds), seed=list(seeds), strategy=strategy, output_type="latent",
                                **common).latents
        if item.strategy == "code":
            return code_sample(eng, labels, seeds, w, self.reward_fns, n_candidates=s.code_candidates,
                               block=s.code_block, reward_scales=self.reward_scales, **common)
        if item.strategy == "rgg":
            return rgg_sample(eng, labels, seeds, w, self.reward_fns, scale=s.rgg(), reward_scales=self.reward_scales,
                              differentiable=self.differentiable, **common)
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
                  "fingerprint": self.fingerprint(item), "n": s.samples, "rewards": rewards,
                  "backend": self.backend_of(item.strategy),
                  "generation_seconds": gen_seconds, "seconds_per_image": gen_seconds / s.samples,
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        return record, (torch.cat(kept) if kept else None)

    def forward_rows(self, item: Item) -> float:
        """UNet rows (image-forwards) this item needs: the unit of the time estimate."""
        s = self.settings
        per = s.steps * (2 if self.engine.uses_guidance(s.guidance_scale) else 1) * s.samples
        k = max(1, len(item.weights))
        # measured on the zoo's UNet (CPU): RGG's forward + backward ~2.2 forwards; CoDe ~1.15 N forwards per
        # step (N candidates, plus scoring N x0 estimates per block)
        return per * {"msdda": k, "mpa": k, "soup": 1, "base": 1, "oracle": 1,
                      "code": 1.15 * s.code_candidates, "rgg": 2.2}[item.strategy]


def measure_throughput(engine, rows: int = 256, seconds: float = 2.0) -> float:
    """The base UNet's forward throughput in rows (images) per second, on a batch of ``rows``."""
    labels = [b % (engine.num_classes - 1) for b in range(rows)] if engine.num_classes else None
    denoise = engine.denoiser(engine.plan("base"), engine.conditioning(rows, cfg=False, class_labels=labels), False)
    x = torch.randn(rows, *engine.sample_shape, generator=torch.Generator().manual_seed(0))
    x = x.to(engine.device, engine.dtype)
    with torch.inference_mode():
        denoise(x, 500)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 2:
            denoise(x, 500)
            n += 1
    return n * rows / (time.perf_counter() - t0)


def estimate_seconds(evaluator: Evaluator, items: Sequence[Item], rows_per_second: float) -> float:
    return sum(evaluator.forward_rows(it) for it in items) / rows_per_second


def timing_pass(ev: Evaluator, strategies: Sequence[str], oracle_items: Sequence[Item], pair: Sequence[str],
                images: int) -> dict[str, float]:
    """Seconds per image of each strategy generating the same ``images`` images (``pair`` at w = 0.5), back to
    back in this process, all on the torch backend (RGG needs it), so the times compare strategies, not
    backends."""
    half = canonical_weights({pair[0]: 0.5, pair[1]: 0.5})
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
            items.extend(it for it in oracle_items if it.weights == half)
    for it in items:                               # warm-up: first-call overheads out of the measurement
        ev.generate(it, seeds[:2], labels[:2], backend="torch", steps=min(ev.settings.steps, 2))
    result = {}
    for it in items:
        t0 = time.perf_counter()
        for start in range(0, images, ev.chunk_size(it.strategy)):
            sl = slice(start, start + ev.chunk_size(it.strategy))
            ev.generate(it, seeds[sl], labels[sl], backend="torch")
        result[it.strategy] = (time.perf_counter() - t0) / images
    return result
