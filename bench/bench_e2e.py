"""End-to-end benchmark: msdda's Engine against the way people compose experts today, in one process.

The baseline is Diffusion Blend's loop: for each step, call each expert's diffusers UNet in turn on the
classifier-free-guidance batch, guide, average the noise predictions by the weights, then diffusers'
``scheduler.step``. Every comparison is a ratio of two runs on the same models, steps and batch, measured
here, in this process, interleaved (ABAB...) so machine noise hits both sides alike.

    .venv/bin/python bench/bench_e2e.py                 # the full sweep, writes bench/results/<machine>-<date>-e2e.json
    .venv/bin/python bench/bench_e2e.py --quick         # a smoke run
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import make_tiny_sd_pipeline, perturbed_copy  # noqa: E402


def machine_name() -> str:
    cpu = platform.processor() or platform.machine()
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "-")
    return f"{platform.machine()}-{torch.get_num_threads()}threads{('-' + cpu) if cpu and cpu != platform.machine() else ''}"


def diffusers_blend_loop(pipe, unets, weights, prompt_embeds, negative_embeds, latents, steps, guidance):
    """Diffusion Blend's way: each expert's UNet in turn, CFG, weighted eps average, scheduler.step."""
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    x = latents.clone()
    emb = torch.cat([negative_embeds, prompt_embeds])
    with torch.inference_mode():
        for t in sched.timesteps:
            eps = 0
            for w, unet in zip(weights, unets):
                out = unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample
                u, c = out.chunk(2)
                eps = eps + w * (u + guidance * (c - u))
            x = sched.step(eps, t, x, eta=1.0).prev_sample
    return x


def single_model_loop(pipe, prompt_embeds, negative_embeds, latents, steps, guidance):
    """One diffusers generation with the base alone (the unit of 'K x single-model time')."""
    return diffusers_blend_loop(pipe, [pipe.unet], [1.0], prompt_embeds, negative_embeds, latents, steps, guidance)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    import msdda

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    ks = (2,) if args.quick else (1, 2, 3)
    batches = (2,) if args.quick else (1, 8)
    backends = ("torch", "onnxruntime")
    steps, guidance = (3 if args.quick else args.steps), 7.5
    repeats = 1 if args.quick else args.repeats

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = make_tiny_sd_pipeline(tmp / "base")
        expert_paths = {f"e{k}": perturbed_copy(base, tmp / f"e{k}", seed=k + 1, scale=0.2) for k in range(max(ks))}
        pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
        unets = {n: UNet2DConditionModel.from_pretrained(pth / "unet").eval() for n, pth in expert_paths.items()}
        engines = {(bk, k): msdda.Engine.from_pretrained(base, {n: expert_paths[n] for n in list(expert_paths)[:k]},
                                                         backend=bk, **({"cache_dir": tmp / "cache"} if bk == "onnxruntime" else {}))
                   for bk in backends for k in ks}
        for batch in batches:
            g = torch.Generator().manual_seed(0)
            latents = torch.randn(batch, 4, 16, 16, generator=g)
            eng0 = engines[(backends[0], ks[0])]
            emb = eng0._encode_text(["a photo of a cat"] * batch)
            neg = eng0._encode_text([""] * batch)
            single = lambda: single_model_loop(pipe, emb, neg, latents, steps, guidance)  # noqa: E731
            single()
            t_single = timed(single, repeats)
            for k in ks:
                names = list(expert_paths)[:k]
                w = [1.0 / k] * k
                loop = lambda: diffusers_blend_loop(pipe, [unets[n] for n in names], w, emb, neg, latents, steps, guidance)  # noqa: E731
                loop()
                t_loop = timed(loop, repeats)
                for bk in backends:
                    eng = engines[(bk, k)]
                    run = lambda: eng.generate(prompt_embeds=emb, negative_prompt_embeds=neg, weights={n: 1.0 / k for n in names},  # noqa: E731
                                               num_images=batch, steps=steps, guidance_scale=guidance, latents=latents,
                                               output_type="latent", normalize=True)
                    run()
                    t_ours = timed(run, repeats)
                    row = dict(model="tiny-sd", backend=bk, K=k, batch=batch, steps=steps,
                               msdda_s=statistics.median(t_ours), loop_s=statistics.median(t_loop),
                               single_s=statistics.median(t_single))
                    row["speedup_vs_loop"] = row["loop_s"] / row["msdda_s"]
                    row["vs_K_single"] = row["msdda_s"] / (k * row["single_s"])
                    row["images_per_s"] = batch / row["msdda_s"]
                    row["s_per_step"] = row["msdda_s"] / steps
                    rows.append(row)
                    print(f"{bk:12s} K={k} B={batch:2d}: msdda {row['msdda_s']:.3f}s  loop {row['loop_s']:.3f}s  "
                          f"speedup {row['speedup_vs_loop']:.2f}x  msdda/(K*single) {row['vs_K_single']:.2f}", flush=True)
    result = {"machine": machine_name(), "date": str(date.today()), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "rows": rows}
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"{machine_name()}-{date.today()}-e2e.json"
    if not args.quick or args.out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
