"""Latency benchmarks of a loaded Engine, as ``msdda bench`` runs them (the CLI only parses flags and prints).

For every batch size, each strategy (``msdda``, ``mpa``, ``soup``, ``base``, ``expert:NAME``) runs ``warmup``
untimed calls, then ``repeats`` timed calls of ``Engine.generate``, interleaved strategy by strategy within each
repeat so that machine noise (other processes, clocks) hits every strategy alike. Reported per batch size and
strategy: the wall time of a call (median, min, max, spread), per image and per step, images/s, peak CUDA
memory, and the cost against one network on the same path: the median of the strategy over the median of a
single-network strategy (``expert:NAME`` or ``base``) timed in the same process, the same repeats, the same
batch. Conditioning is what the base takes: a class label, a prompt, or (a text UNet folder alone) random
``prompt_embeds`` of the UNet's widths, the same every call.
"""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = ["BenchSettings", "run_benchmark", "reference_strategy", "bench_request", "environment", "format_table"]

BENCH_PROMPT = "a photograph of an astronaut riding a horse"
SINGLE_NETWORK = ("base", "expert:")        # strategies that run exactly one network per step


@dataclass(frozen=True)
class BenchSettings:
    batch_sizes: tuple[int, ...] = (1, 8)
    steps: int | None = None                 # None: the model's default (Engine.default_steps)
    warmup: int = 1
    repeats: int = 5
    strategies: tuple[str, ...] | None = None   # None: msdda and its first expert alone
    guidance_scale: float | None = None      # None: the model's default
    seed: int = 0


def is_single_network(strategy: str) -> bool:
    return strategy == "base" or strategy.startswith("expert:")


def default_strategies(experts: Sequence[str]) -> tuple[str, ...]:
    return ("msdda", f"expert:{experts[0]}") if experts else ("base",)


def reference_strategy(strategies: Sequence[str], experts: Sequence[str]) -> tuple[str, bool]:
    """(the single-network strategy the others are compared with, whether it had to be added): the first
    ``base`` / ``expert:NAME`` given, else one expert alone (the base when there are none)."""
    for s in strategies:
        if is_single_network(s):
            return s, False
    return (f"expert:{experts[0]}" if experts else "base"), True


def bench_request(engine, *, batch: int, seed: int = 0) -> tuple[dict, str]:
    """(generate's conditioning keyword arguments for ``batch`` images on this base, what they are in words)."""
    if engine.is_text and engine.bare_unet:
        # random embeddings of the UNet's widths: the denoiser's cost does not depend on their values
        gen = torch.Generator().manual_seed(seed)
        cfg = engine.base.unet_config
        length = 77
        kwargs = {"prompt_embeds": torch.randn(1, length, cfg["cross_attention_dim"], generator=gen),
                  "negative_prompt_embeds": torch.randn(1, length, cfg["cross_attention_dim"], generator=gen)}
        if engine.is_sdxl:
            from msdda.loading import pooled_embeds_width

            width = pooled_embeds_width(engine.base)
            kwargs["pooled_prompt_embeds"] = torch.randn(1, width, generator=gen)
            kwargs["negative_pooled_prompt_embeds"] = torch.randn(1, width, generator=gen)
        return kwargs, f"random prompt_embeds [1, {length}, {cfg['cross_attention_dim']}] (UNet folder alone)"
    if engine.is_text:
        return {"prompt": BENCH_PROMPT}, f"prompt {BENCH_PROMPT!r}"
    if engine.num_classes:
        return {"class_labels": 0}, "class label 0"
    return {}, "unconditional"


def environment(engine) -> dict:
    """What ran: versions, device, backend, dtype, CUDA graphs."""
    import diffusers

    import msdda

    device = engine.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} torch threads)"
    return {"msdda": msdda.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version(), "device": str(device), "device_name": name,
            "backend": engine.backend_name, "dtype": str(engine.dtype).removeprefix("torch."),
            "cuda_graphs": engine.step_graphs is not None, "scheduler": engine.scheduler}


def _summary(times: list[float], batch: int, steps: int) -> dict:
    median = statistics.median(times)
    return {"seconds": times, "median_s": median, "min_s": min(times), "max_s": max(times),
            "stdev_s": statistics.stdev(times) if len(times) > 1 else 0.0,
            "per_image_s": median / batch, "per_step_s": median / steps, "images_per_s": batch / median}


def run_benchmark(engine, settings: BenchSettings = BenchSettings(),
                  progress: Callable[[str], None] | None = None) -> dict:
    """Time ``engine.generate`` per ``settings``; returns the JSON-ready record (see the module docstring)."""
    from msdda.validation import check_int

    experts = engine.experts
    strategies = tuple(settings.strategies or default_strategies(experts))
    reference, added = reference_strategy(strategies, experts)
    runs = strategies + ((reference,) if added else ())
    steps = engine.default_steps if settings.steps is None else settings.steps
    guidance = engine.default_guidance_scale if settings.guidance_scale is None else settings.guidance_scale
    warmup = check_int("warmup", settings.warmup, lo=0)
    repeats = check_int("repeats", settings.repeats, lo=1)
    output_type = "latent" if engine.base.vae is None and engine.is_text else "pt"
    cuda = engine.device.type == "cuda"

    calls = {}
    for batch in settings.batch_sizes:                 # everything checked before the first timed call
        cond, cond_text = bench_request(engine, batch=batch, seed=settings.seed)
        for strategy in runs:
            kwargs = dict(cond, strategy=strategy, num_images=batch, steps=steps, guidance_scale=guidance,
                          seed=settings.seed, output_type=output_type)
            calls[batch, strategy] = engine.check_request(**kwargs)

    def timed(request) -> float:
        if cuda:
            torch.cuda.synchronize(engine.device)
        start = time.perf_counter()
        engine.generate(request)
        if cuda:
            torch.cuda.synchronize(engine.device)
        return time.perf_counter() - start

    results = []
    for batch in settings.batch_sizes:
        times = {s: [] for s in runs}
        peak = {s: None for s in runs}
        for strategy in runs:
            for _ in range(warmup):
                timed(calls[batch, strategy])
        for r in range(repeats):
            for strategy in runs:       # interleaved: a slow moment hits every strategy of this repeat
                if cuda:
                    torch.cuda.reset_peak_memory_stats(engine.device)
                times[strategy].append(timed(calls[batch, strategy]))
                if cuda:
                    used = torch.cuda.max_memory_allocated(engine.device)
                    peak[strategy] = max(peak[strategy] or 0, used)
            if progress:
                progress(f"batch {batch}: repeat {r + 1}/{repeats}")
        ref_median = statistics.median(times[reference])
        for strategy in runs:
            row = {"batch_size": batch, "strategy": strategy, "networks": _networks(engine, strategy),
                   **_summary(times[strategy], batch, steps),
                   "vs_one_network": statistics.median(times[strategy]) / ref_median,
                   "peak_cuda_memory_bytes": peak[strategy], "reference_only": added and strategy == reference}
            results.append(row)
    return {"what_ran": environment(engine),
            "models": [{"name": m.name, "path": m.path, "sha256": m.sha256} for m in engine.models],
            "experts": list(experts), "steps": steps, "guidance_scale": guidance, "output_type": output_type,
            "conditioning": cond_text, "warmup": warmup, "repeats": repeats,
            "batch_sizes": list(settings.batch_sizes), "strategies": list(strategies),
            "reference": reference,
            "ratio_method": ("median wall time of the strategy / median wall time of the reference (one network), "
                             "both timed in this process, interleaved repeat by repeat, same batch and steps"),
            "results": results}


def _networks(engine, strategy: str) -> int:
    """How many networks a strategy runs per step (1 for base, expert:NAME and soup)."""
    return 1 if is_single_network(strategy) or strategy == "soup" else len(engine.experts)


def format_table(record: dict) -> str:
    """The short stdout table: one line per batch size and strategy."""
    head = f"{'batch':>5}  {'strategy':<20} {'s/call':>9} {'spread':>8} {'ms/image':>9} {'ms/step':>8} " \
           f"{'images/s':>9} {'vs one':>7}"
    lines = [head]
    for r in record["results"]:
        spread = r["max_s"] - r["min_s"]
        mark = " (ref)" if r["strategy"] == record["reference"] else ""
        lines.append(f"{r['batch_size']:>5}  {r['strategy']:<20} {r['median_s']:>9.4f} {spread:>8.4f} "
                     f"{1000 * r['per_image_s']:>9.2f} {1000 * r['per_step_s']:>8.3f} {r['images_per_s']:>9.2f} "
                     f"{r['vs_one_network']:>6.2f}x{mark}")
    w = record["what_ran"]
    lines.append(f"{w['device_name']}, {w['backend']} {w['dtype']}, CUDA graphs {'on' if w['cuda_graphs'] else 'off'}, "
                 f"{record['steps']} steps, guidance {record['guidance_scale']}, torch {w['torch']}, "
                 f"diffusers {w['diffusers']}; medians of {record['repeats']} runs")
    return "\n".join(lines)
