"""What batch invariance costs: ``Engine(row_block=Q)`` against plain batching, on the zoo (msdda, 3 experts).

    .venv/bin/python bench/row_blocks.py                 # Q in 4, 8, 16, 32; 1, 4 and 16 images per call

For each row block (None: plain batching) and each call size it times ``generate`` (after one warm-up call) and
reports milliseconds per denoising step and image-steps per second. Under guidance (the zoo's default) a call of
n images runs 2n rows through each expert, so a call of n images costs ceil(2n / Q) blocks of Q rows. One run,
in one process, so the ratios compare like with like. Results: bench/results/row_blocks-<machine>-<date>.json
(or --out).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def time_calls(engine, images: int, steps: int, repeats: int) -> float:
    """Seconds per denoising step of ``generate`` with ``images`` samples (mixed labels, one weight vector)."""
    kw = dict(steps=steps, guidance_scale=2.0, output_type="latent", class_labels=[i % 10 for i in range(images)],
              weights={"legible": 0.3, "bold": 0.3, "compressible": 0.4}, seed=list(range(images)))
    engine.generate(**kw)                                    # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        engine.generate(**kw)
    return (time.perf_counter() - start) / repeats / steps


def main(argv=None) -> int:
    import torch

    import msdda
    from msdda import zoo
    from msdda.atomic import atomic_write_json

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", default="none,4,8,16,32", help="row blocks to compare ('none': plain batching)")
    p.add_argument("--images", default="1,4,16", help="images per generate call")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = zoo.zoo_paths()
    experts = {n: paths[n] for n in zoo.OBJECTIVES}
    machine = f"cpu-{os.cpu_count()}core-{platform.machine()}"
    rows = []
    for block in [None if b.strip() == "none" else int(b) for b in args.blocks.split(",")]:
        engine = msdda.Engine.from_pretrained(paths["base"], experts, row_block=block)
        for images in (int(n) for n in args.images.split(",")):
            per_step = time_calls(engine, images, args.steps, args.repeats)
            rows.append({"row_block": block, "images": images, "ms_per_step": 1e3 * per_step,
                         "image_steps_per_s": images / per_step})
            print(f"row_block={block} images={images}: {1e3 * per_step:.1f} ms/step, "
                  f"{images / per_step:.1f} image-steps/s", flush=True)
    single = next(r["image_steps_per_s"] for r in rows if r["row_block"] is None and r["images"] == 1)
    for r in rows:
        r["vs_plain_single_image"] = r["image_steps_per_s"] / single
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"row_blocks-{machine}-{date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, {"machine": machine, "platform": platform.platform(), "torch": torch.__version__,
                            "threads": args.threads, "args": vars(args), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
