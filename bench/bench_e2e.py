"""End-to-end benchmark: msdda's Engine against the way people compose experts today, in one process.

Baselines, on the same models, steps, batch and initial latents:
- ``loop``: Diffusion Blend's way. Each step calls each expert's diffusers UNet in turn on the classifier-free
  guidance batch, guides, averages the noise predictions by the weights, then calls diffusers' scheduler.step.
- ``single``: one diffusers generation with one model (the unit of "K x single-model time").

Every figure that compares two things is a ratio of medians measured here, interleaved run by run, so machine
noise hits both sides alike. Also reported: the per-step split (networks / combine / rest) and peak memory.

Run it through the suite: ``.venv/bin/python bench/run.py --skip-compose [--ks 1,2 --batches 8 ...]``.
"""
from __future__ import annotations

import importlib
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import make_tiny_sd_pipeline, perturbed_copy, write_lora_adapter  # noqa: E402


def machine_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "-")
    import os
    return f"cpu-{os.cpu_count()}core-{platform.machine()}"


# ---------------------------------------------------------------------- peak memory (Linux RSS high-water mark)
def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return _peak_rss_mb()


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    _reset_peak_rss()


# ---------------------------------------------------------------------- baselines
def diffusers_blend_loop(sched, unets, weights, cond_kwargs, latents, steps, guidance):
    """Diffusion Blend's way: each expert's UNet in turn on the CFG batch, guide, weighted average of the
    outputs, diffusers' scheduler.step. cond_kwargs: the UNet's conditioning for the [uncond; cond] batch.
    Learned-variance outputs ([eps, v], 2C channels) are guided on eps and keep the conditional v, as
    diffusers' own learned-variance pipelines do."""
    from diffusers import DDIMScheduler

    sched.set_timesteps(steps)
    step_kwargs = {"eta": 1.0} if isinstance(sched, DDIMScheduler) else {}
    x = latents.clone()
    C = x.shape[1]
    with torch.inference_mode():
        for t in sched.timesteps:
            pred = 0
            for w, unet in zip(weights, unets):
                u, c = unet(torch.cat([x, x]), t, **cond_kwargs).sample.chunk(2)
                guided = torch.cat([u[:, :C] + guidance * (c[:, :C] - u[:, :C]), c[:, C:]], 1)
                pred = pred + w * guided
            x = sched.step(pred, t, x, **step_kwargs).prev_sample
    return x


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------- step-cost split
@contextmanager
def step_split(engine):
    """Time the networks (backend.forward) and the combine (fused_expert_step) inside generate."""
    import msdda.engine as engine_mod

    acc = {"networks": 0.0, "combine": 0.0}
    backend, fused = engine.backend, engine_mod.fused_expert_step
    real_forward = backend.forward

    def forward(*a, **k):
        sync()
        t0 = time.perf_counter()
        out = real_forward(*a, **k)
        sync()
        acc["networks"] += time.perf_counter() - t0
        return out

    def combine(*a, **k):
        sync()
        t0 = time.perf_counter()
        out = fused(*a, **k)
        sync()
        acc["combine"] += time.perf_counter() - t0
        return out

    backend.forward, engine_mod.fused_expert_step = forward, combine
    try:
        yield acc
    finally:
        del backend.forward
        engine_mod.fused_expert_step = fused


# ---------------------------------------------------------------------- driver
@dataclass
class Model:
    """One benchmarked model family: the base and up to max(K) experts on disk, their UNets for the loop, the
    scheduler the loop uses, and the per-batch conditioning for msdda and for the loop."""
    name: str
    base: Path
    experts: dict
    guidance: float
    make_inputs: Callable        # (engine, batch) -> (msdda generate kwargs, loop UNet kwargs, latents)
    backends: tuple | None = None  # the backends this model is run on (None: all given)


def tiny_sd(tmp: Path, n: int) -> Model:
    base = make_tiny_sd_pipeline(tmp / "base")
    experts = {f"e{k}": perturbed_copy(base, tmp / f"e{k}", seed=k + 1, scale=0.2) for k in range(n)}

    def make_inputs(eng, batch):
        emb, neg = eng.encode_prompt(["a photo of a cat"] * batch), eng.encode_prompt([""] * batch)
        latents = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(batch))
        return (dict(prompt_embeds=emb, negative_prompt_embeds=neg), dict(encoder_hidden_states=torch.cat([neg, emb])),
                latents)

    return Model("tiny-sd-0.8M", base, experts, 7.5, make_inputs)


def tiny_sd_lora(tmp: Path, n: int) -> Model:
    """The tiny SD pipeline with rank-8 LoRA experts (attention and ResNet layers): the loop runs the merged
    experts; msdda runs them merged (``torch``) or as base + batched low-rank deltas (``torch+lora``)."""
    sd = tiny_sd(tmp, 0)
    experts = {f"l{k}": write_lora_adapter(sd.base, tmp / f"l{k}", seed=k + 1, rank=8) for k in range(n)}
    return Model("tiny-sd-0.8M-lora8", sd.base, experts, sd.guidance, sd.make_inputs, backends=("torch", "torch+lora"))


def zoo(n: int) -> Model:
    """The embedded digits zoo: its three experts, then the MORL oracles as further experts."""
    from msdda.zoo import DEFAULT_GUIDANCE_SCALE, NULL_CLASS, zoo_paths

    paths = zoo_paths()
    experts = {k: v for k, v in paths.items() if k != "base"}
    experts = dict(list(experts.items())[:n])

    def make_inputs(eng, batch):
        labels = torch.arange(batch) % 10
        latents = torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(batch))
        return (dict(class_labels=labels.tolist()),
                dict(class_labels=torch.cat([torch.full_like(labels, NULL_CLASS), labels])), latents)

    return Model("zoo-digits-0.65M", paths["base"], experts, DEFAULT_GUIDANCE_SCALE, make_inputs)


MODELS = ("tiny-sd", "zoo", "tiny-sd-lora")
BACKENDS = ("torch", "onnxruntime", "torch+lora")      # torch+lora: backend="torch", group="lora" (also +vmap)


def _backend_options(spec: str, cache_dir: Path) -> dict:
    name, _, group = spec.partition("+")
    opts = {"backend": name}
    if name != "torch":
        opts["cache_dir"] = cache_dir
    if group:
        opts["group"] = group
    return opts


def run(ks, batches, backends, steps, repeats, models=MODELS, log=print):
    from diffusers.schedulers import SchedulerMixin

    import msdda
    from msdda.loading import load_base
    from msdda.lora import load_expert

    rows = []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for model_name in models:
            model = {"tiny-sd": lambda: tiny_sd(tmp / "tiny-sd", max(ks)), "zoo": lambda: zoo(max(ks)),
                     "tiny-sd-lora": lambda: tiny_sd_lora(tmp / "tiny-sd-lora", max(ks))}[model_name]()
            base = load_base(model.base)
            # the loop's UNets: plain diffusers modules (LoRA experts merged, the fastest way to loop over them)
            unets = {n: load_expert(n, p, base)[0].to(device).eval() for n, p in model.experts.items()}
            sched_cls = getattr(importlib.import_module("diffusers"), base.scheduler_config["_class_name"])
            sched: SchedulerMixin = sched_cls.from_config(base.scheduler_config)
            for bk in backends:
                if model.backends is not None and bk not in model.backends or \
                        "+lora" in bk and model.backends is None:
                    continue
                opts = _backend_options(bk, tmp / "cache")
                for k in ks:
                    if k > len(model.experts):
                        continue
                    names = list(model.experts)[:k]
                    eng = msdda.Engine.from_pretrained(model.base, {n: model.experts[n] for n in names},
                                                       device=device, **opts)
                    rows_k = _measure(eng, model, names, unets, sched, batches, steps, repeats, device, bk, log)
                    rows.extend(rows_k)
    return rows


def _measure(eng, model, names, unets, sched, batches, steps, repeats, device, bk, log):
    k, guidance, rows = len(names), model.guidance, []
    weights = {n: 1.0 / k for n in names}
    for batch in batches:
        gen_kwargs, loop_kwargs, latents = model.make_inputs(eng, batch)
        latents = latents.to(device)
        common = dict(num_images=batch, steps=steps, guidance_scale=guidance, latents=latents, output_type="latent",
                      **gen_kwargs)
        ours = lambda: eng.generate(weights=weights, normalize=True, **common)  # noqa: E731
        loop = lambda: diffusers_blend_loop(sched, [unets[n] for n in names], [1.0 / k] * k,  # noqa: E731
                                            loop_kwargs, latents, steps, guidance)
        single = lambda: diffusers_blend_loop(sched, [unets[names[0]]], [1.0], loop_kwargs, latents,  # noqa: E731
                                              steps, guidance)
        ours_single = lambda: eng.generate(strategy=f"expert:{names[0]}", **common)  # noqa: E731
        runs = {"msdda": ours, "loop": loop, "single": single, "ours_single": ours_single}
        for fn in runs.values():      # warm up (ONNX Runtime arenas, allocator)
            fn()
        t = {key: [] for key in runs}
        for _ in range(repeats):      # interleaved
            for key, fn in runs.items():
                t[key].append(timed(fn))
        with step_split(eng) as split:
            total = timed(ours)
        reset_peak_memory()
        ours()
        peak = peak_memory_mb()
        med = {key: statistics.median(v) for key, v in t.items()}
        row = dict(model=model.name, backend=bk, K=k, batch=batch, steps=steps, cfg=guidance,
                   scheduler=type(sched).__name__,
                   msdda_s=med["msdda"], loop_s=med["loop"], single_s=med["single"],
                   speedup_vs_loop=med["loop"] / med["msdda"],
                   ours_single_s=med["ours_single"],
                   vs_K_single=med["msdda"] / (k * med["ours_single"]),
                   vs_K_diffusers_single=med["msdda"] / (k * med["single"]),
                   images_per_s=batch / med["msdda"], latency_per_image_s=med["msdda"] / batch,
                   s_per_step=med["msdda"] / steps,
                   split_networks=split["networks"] / total, split_combine=split["combine"] / total,
                   split_rest=1 - (split["networks"] + split["combine"]) / total,
                   peak_mem_mb=peak)
        rows.append(row)
        log(f"{model.name:16s} {bk:11s} K={k} B={batch:2d}: msdda {row['msdda_s']:.3f}s loop {row['loop_s']:.3f}s "
            f"x{row['speedup_vs_loop']:.2f} | msdda/(K*single, same backend) {row['vs_K_single']:.2f} | "
            f"combine {100 * row['split_combine']:.1f}% | peak {peak:.0f} MB")
    return rows


def table(rows) -> str:
    head = ("| model | backend | K | batch | msdda s | loop s | speedup vs loop | msdda / (K x single, same backend) | images/s | "
            "combine % of step | peak MB |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r.get('model', 'tiny-sd-0.8M')} | {r['backend']} | {r['K']} | {r['batch']} | {r['msdda_s']:.3f} | {r['loop_s']:.3f} | "
        f"{r['speedup_vs_loop']:.2f}x | {r['vs_K_single']:.2f} | {r['images_per_s']:.1f} | "
        f"{100 * r['split_combine']:.1f} | {r['peak_mem_mb']:.0f} |\n" for r in rows)
