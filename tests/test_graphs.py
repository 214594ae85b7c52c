"""Whole-step CUDA graphs behind their seam (msdda.graphs), on the CPU.

- The static-buffer step (``StepGraph.step``, the function a CUDA graph captures) run step by step gives exactly
  ``generate``'s eager latents, bit for bit: msdda / mpa / base / expert strategies, DDPM learned-range and DDIM
  (eta 1 and 0), CFG and not, Philox and given noise, and a second call through the same graph with another
  schedule length, guidance, seeds and weights (the buffers and the step table are refilled, nothing recaptured).
- The cache (keys, bound, eviction, check-out under concurrent threads, one log line on a failing capture) with
  injected fake capturers.
"""
from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

import msdda
from msdda.backends import Conditioning
from msdda.graphs import StepGraph, StepGraphCache, StepInputs, replay_eagerly, step_key


@pytest.fixture(scope="module")
def pixel(learned_variance_models):
    """Class-conditional learned-range DDPM base and two experts (distinct variances)."""
    base, experts = learned_variance_models
    return msdda.Engine.from_pretrained(base, experts)


@pytest.fixture(scope="module")
def sd(tiny_sd_models):
    """Text-conditioned tiny Stable Diffusion pipeline (DDIM) and one full-weight expert."""
    base, experts = tiny_sd_models
    return msdda.Engine.from_pretrained(base, {"a": experts["a"]})


def _both(engine, **kw):
    """(eager latents, graph-seam latents, the cache) of the same call."""
    engine.step_graphs = None
    try:
        eager = engine.generate(output_type="latent", **kw).latents
        cache = StepGraphCache(capture=replay_eagerly)
        engine.step_graphs = cache
        graphed = engine.generate(output_type="latent", **kw).latents
    finally:
        engine.step_graphs = None
    return eager, graphed, cache


PIXEL = dict(class_labels=[3, 7], num_images=2, steps=3, seed=[4, 9])


@pytest.mark.parametrize("strategy, guidance", [("msdda", 2.0), ("mpa", 2.0), ("base", 2.0), ("expert:a", 2.0),
                                                ("msdda", 1.0)])
def test_graph_step_equals_eager_ddpm_learned_range(pixel, strategy, guidance):
    weights = {"a": 0.7, "b": 0.3} if strategy in ("msdda", "mpa") else None
    eager, graphed, cache = _both(pixel, strategy=strategy, weights=weights, guidance_scale=guidance, **PIXEL)
    assert torch.equal(graphed, eager)
    assert cache.stats["captures"] == 1 and not cache.failed()


@pytest.mark.parametrize("eta, guidance", [(1.0, 7.5), (0.0, 7.5), (1.0, 1.0)])
def test_graph_step_equals_eager_ddim(sd, eta, guidance):
    eager, graphed, _ = _both(sd, prompt=["a cat", "two dogs"], num_images=2, steps=2, eta=eta,
                              guidance_scale=guidance, weights={"a": 1.0}, expert_betas={"a": 0.6},
                              strategy="msdda", seed=[1, 2])   # c = (0.4 base, 0.6 a): K = 2
    assert torch.equal(graphed, eager)


def test_given_noise_and_latents(pixel):
    g = torch.Generator().manual_seed(3)
    kw = dict(weights={"a": 0.5, "b": 0.5}, guidance_scale=2.0, latents=torch.randn(2, 1, 8, 8, generator=g),
              noise=torch.randn(3, 2, 1, 8, 8, generator=g), **PIXEL)
    eager, graphed, cache = _both(pixel, **kw)
    assert torch.equal(graphed, eager)
    assert next(iter(cache.idle()))[0].noise == "given/3"


def test_one_graph_serves_other_schedules_guidance_seeds_and_weights(pixel):
    """The second and third calls reuse the first call's graph (same key): buffers and step table refilled."""
    cache = StepGraphCache(capture=replay_eagerly)
    calls = [dict(steps=3, guidance_scale=2.0, seed=[4, 9], weights=[{"a": 0.7, "b": 0.3}, {"a": 0.2, "b": 0.8}]),
             dict(steps=5, guidance_scale=3.5, seed=[11, 12], weights={"a": 0.4, "b": 0.6}),
             dict(steps=2, guidance_scale=2.0, seed=[4, 9], weights=[{"a": 0.7, "b": 0.3}, {"a": 0.2, "b": 0.8}])]
    for kw in calls:
        pixel.step_graphs = None
        eager = pixel.generate(class_labels=[3, 7], num_images=2, output_type="latent", **kw).latents
        pixel.step_graphs = cache
        try:
            graphed = pixel.generate(class_labels=[3, 7], num_images=2, output_type="latent", **kw).latents
        finally:
            pixel.step_graphs = None
        assert torch.equal(graphed, eager), kw
    assert cache.stats == {"captures": 1, "reuses": 2, "failures": 0, "evictions": 0}


def test_the_step_function_step_by_step(pixel):
    """StepGraph.step called by hand: the counter advances on the device, x holds x_prev after each step, and
    after the last step x is generate's eager x_0."""
    kw = dict(strategy="msdda", weights={"a": 0.7, "b": 0.3}, guidance_scale=2.0, output_type="latent", **PIXEL)
    eager = pixel.generate(**kw).latents
    plan = pixel.plan("msdda", {"a": 0.7, "b": 0.3}, batch=2)
    cond = pixel.conditioning(2, cfg=True, class_labels=[3, 7])
    timesteps, scalars = pixel.step_tables(3, 1.0)
    seeds = torch.tensor([4, 9])
    x_T = msdda.kernels.philox_normal(seeds, 0, pixel.sample_shape)
    coeff = plan.coeff.float()
    inputs = StepInputs(x=x_T, cond=cond, timesteps=timesteps, scalars=scalars, guidance=2.0, step_coeff=coeff,
                        mix_coeff=coeff, seeds=seeds, noise=None)
    graph = StepGraph(step_key(inputs, plan.members, plan.kind, 16), inputs, lambda c: pixel.denoiser(plan, c, True))
    graph.load(inputs)
    with torch.inference_mode():
        for i in range(3):
            graph.step()
            assert int(graph.counter) == i + 1
    assert torch.equal(graph.x, eager) and int(graph.error_count) == 0
    assert graph.plan.steps == 16      # the step table's capacity, not this call's length


def test_step_keys():
    x = torch.zeros(2, 4, 8, 8)
    cond = Conditioning(encoder_hidden_states=torch.zeros(4, 77, 32))
    from msdda.kernels import StepScalars, VarMode

    fixed = StepScalars(px=1.0, po=0.0, mx=1.0, m0=0.0, mo=0.0, var_mode=VarMode.FIXED, log_var_fixed=-3.0)

    def key(**kw):
        a = dict(x=x, cond=cond, timesteps=(900, 500), scalars=(fixed, fixed), guidance=7.5,
                 step_coeff=torch.ones(2, 2), mix_coeff=torch.ones(2, 2), seeds=torch.zeros(2, dtype=torch.int64),
                 noise=None)
        members = kw.pop("members", (1, 2))
        kind = kw.pop("kind", "product")
        a.update(kw)
        return step_key(StepInputs(**a), members, kind, 1000)

    k = key()
    # the schedule's length and values, the guidance scale's value and the seeds do not change the key
    assert key(timesteps=(999, 700, 300), scalars=(fixed,) * 3, guidance=3.0, seeds=torch.ones(2, dtype=torch.int64)) == k
    assert k.capacity == 1000 and k.noise == "philox"
    for other in (key(x=torch.zeros(3, 4, 8, 8), step_coeff=torch.ones(3, 2), mix_coeff=torch.ones(3, 2)),
                  key(x=torch.zeros(2, 4, 16, 16)), key(members=(0, 1)), key(kind="mix"), key(guidance=None),
                  key(x=x.bfloat16()), key(cond=Conditioning(encoder_hidden_states=torch.zeros(4, 64, 32))),
                  key(noise=torch.zeros(2, 2, 4, 8, 8), seeds=None),
                  key(scalars=(fixed, StepScalars(px=1.0, po=0.0, mx=1.0, m0=0.0, mo=0.0,
                                                  var_mode=VarMode.LEARNED_RANGE, lv_min=-6.0, lv_max=-4.0)))):
        assert other != k
    assert key(noise=torch.zeros(2, 2, 4, 8, 8), seeds=None).capacity == 2   # a given-noise table: this length


# ---------------------------------------------------------------------- the cache, with fake graphs
class FakeGraph:
    def __init__(self, key):
        self.key = key

    def step(self):
        pass


def _key(batch=1, **kw):
    from msdda.graphs import StepKey

    fields = dict(batch=batch, latent=(4, 8, 8), members=(0,), cfg=True, dtype=torch.float32, kind="single",
                  noise="philox", cond=(), var_modes=(0,), clip=False, capacity=10)
    fields.update(kw)
    return StepKey(**fields)


def test_cache_reuses_bounds_and_evicts_least_recently_used():
    captured = []
    cache = StepGraphCache(capture=lambda step: captured.append(step) or step, capacity=2)
    k1, k2, k3 = _key(1), _key(2), _key(3)
    g1 = cache.checkout(k1, lambda: FakeGraph(k1))
    cache.checkin(k1, g1)
    assert cache.checkout(k1, lambda: pytest.fail("an idle graph exists")) is g1   # reused, not rebuilt
    cache.checkin(k1, g1)
    for k in (k2, k3):
        cache.checkin(k, cache.checkout(k, lambda k=k: FakeGraph(k)))
    assert [k for k, _ in cache.idle()] == [k2, k3]          # k1, the least recently used, was dropped
    assert cache.stats == {"captures": 3, "reuses": 1, "failures": 0, "evictions": 1}
    assert len(captured) == 3
    g = cache.checkout(k1, lambda: FakeGraph(k1))            # dropped: captured again
    assert g is not g1 and cache.stats["captures"] == 4
    with pytest.raises(ValueError, match="capacity"):
        StepGraphCache(capacity=0)


def test_concurrent_calls_never_share_a_graph():
    """Eight threads check out the same key at once and hold it: eight distinct graphs; after they check in, the
    cache keeps at most its capacity, and later calls reuse them."""
    cache = StepGraphCache(capture=lambda step: step, capacity=3)
    key = _key()
    held, lock, barrier = [], threading.Lock(), threading.Barrier(8)

    def worker():
        barrier.wait()
        g = cache.checkout(key, lambda: FakeGraph(key))
        with lock:
            held.append(g)
        time.sleep(0.05)
        barrier_out.wait()
        cache.checkin(key, g)

    barrier_out = threading.Barrier(8)
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(g) for g in held}) == 8
    assert cache.stats["captures"] == 8 and len(cache.idle()) == 3 and cache.stats["evictions"] == 5
    again = cache.checkout(key, lambda: pytest.fail("idle graphs exist"))
    assert again in held


def test_failed_capture_logs_one_line_and_runs_eagerly(caplog):
    calls = []

    def broken(step):
        calls.append(step)
        raise RuntimeError("operation not permitted when stream is capturing\nsecond line")

    cache = StepGraphCache(capture=broken)
    key = _key()
    with caplog.at_level(logging.WARNING, logger="msdda"):
        assert cache.checkout(key, lambda: FakeGraph(key)) is None
        assert cache.checkout(key, lambda: FakeGraph(key)) is None     # remembered: not captured again
    assert len(calls) == 1 and cache.stats["failures"] == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "CUDA graph capture failed" in lines[0] and "operation not permitted" in lines[0] and "eagerly" in lines[0]
    assert "RuntimeError" in cache.failed()[key]
    assert cache.checkout(_key(2), lambda: FakeGraph(_key(2))) is None and len(calls) == 2   # another key: tried


def test_generate_falls_back_to_eager_once(pixel, caplog):
    """A capturer that fails: generate still gives the eager latents, and says why once across calls."""
    kw = dict(strategy="msdda", weights={"a": 0.5, "b": 0.5}, guidance_scale=2.0, output_type="latent", **PIXEL)
    pixel.step_graphs = None
    eager = pixel.generate(**kw).latents

    def broken(step):
        raise RuntimeError("capture unsupported here")

    pixel.step_graphs = StepGraphCache(capture=broken)
    try:
        with caplog.at_level(logging.WARNING, logger="msdda"):
            first = pixel.generate(**kw).latents
            second = pixel.generate(**kw).latents
    finally:
        pixel.step_graphs = None
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert len([r for r in caplog.records if "capture failed" in r.getMessage()]) == 1


def test_concurrent_generate_through_the_graph_seam(pixel):
    """Three threads, same configuration, different seeds: each gets its own graph (or a free one) and the
    latents of its own eager call."""
    seeds = [[1, 2], [3, 4], [5, 6]]
    kw = dict(strategy="msdda", weights={"a": 0.6, "b": 0.4}, guidance_scale=2.0, output_type="latent",
              class_labels=[3, 7], num_images=2, steps=2)
    pixel.step_graphs = None
    eager = [pixel.generate(seed=s, **kw).latents for s in seeds]
    cache = StepGraphCache(capture=replay_eagerly)
    pixel.step_graphs = cache
    results, errors, barrier = {}, [], threading.Barrier(3)

    def worker(i):
        try:
            barrier.wait()
            results[i] = pixel.generate(seed=seeds[i], **kw).latents
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        pixel.step_graphs = None
    assert not errors, errors
    for i in range(3):
        assert torch.equal(results[i], eager[i]), i
    assert cache.stats["captures"] + cache.stats["reuses"] == 3


def test_infeasible_composition_is_reported_through_the_graph(pixel):
    """Extrapolating past the experts (sum c_k = 40: the base's exponent is -39) makes P <= 0: the graph's deferred
    bad-element count raises the eager path's kind of ValueError, read before the graph goes back to the cache."""
    kw = dict(strategy="msdda", weights={"a": 0.5, "b": 0.5}, expert_betas={"a": 40.0, "b": 40.0},
              guidance_scale=2.0, output_type="latent", **PIXEL)
    cache = StepGraphCache(capture=replay_eagerly)
    pixel.step_graphs = cache
    try:
        with pytest.raises(ValueError, match=r"infeasible composition over \(base, a, b\): .*P = sum_k c_k/var_k <= 0"):
            pixel.generate(**kw)
    finally:
        pixel.step_graphs = None
    assert len(cache.idle()) == 1     # checked back in despite the error


def test_out_of_memory_drops_idle_graphs_and_retries_once(caplog):
    tries = []

    def tight(step):
        tries.append(step)
        if len(tries) == 2:          # the second capture finds no memory until the idle graph is gone
            raise torch.OutOfMemoryError("CUDA out of memory")
        return step

    cache = StepGraphCache(capture=tight)
    k1, k2 = _key(1), _key(2)
    cache.checkin(k1, cache.checkout(k1, lambda: FakeGraph(k1)))
    g2 = cache.checkout(k2, lambda: FakeGraph(k2))
    assert g2 is not None and len(tries) == 3 and cache.idle() == [] and cache.stats["evictions"] == 1
    with caplog.at_level(logging.WARNING, logger="msdda"):   # nothing idle left to drop: eager, one line
        tries.clear()
        tries.append(None)
        assert cache.checkout(_key(3), lambda: FakeGraph(_key(3))) is None
    assert "OutOfMemoryError" in caplog.records[0].getMessage()
