"""The Quick start's setting (msdda, class 3, weights legible=0.6, bold=0.4, the zoo's 50 steps and guidance)
on both zoo flavours: the legibility judge's score (msdda.zoo.rewards.legible), class accuracy and mean ink,
paired over the same seeds. Decides whether the "step" flavour may replace the default (docs/zoo-step-experts.md).

    .venv/bin/python bench/zoo_step_quickstart.py --num-images 64
"""
from __future__ import annotations

import argparse
import json
import math

import torch

import msdda
from msdda.zoo import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, FLAVOURS, zoo_paths
from msdda.zoo.rewards import bold, legible, load_classifier


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    clf = load_classifier()
    labels = torch.full((a.num_images,), 3)
    res, per = {}, {}
    for flavour in FLAVOURS:
        p = zoo_paths(flavour=flavour)
        eng = msdda.Engine.from_pretrained(p["base"], {"legible": p["legible"], "bold": p["bold"]})
        out = eng.generate(class_labels=3, weights={"legible": 0.6, "bold": 0.4}, num_images=a.num_images,
                           steps=DEFAULT_STEPS, guidance_scale=DEFAULT_GUIDANCE_SCALE,
                           seed=list(range(a.num_images)))
        x = out.latents.float().clamp(-1.0, 1.0)
        per[flavour] = legible(x, labels, classifier=clf)
        res[flavour] = {"legible": per[flavour].mean().item(),
                        "legible_sem": (per[flavour].std() / math.sqrt(a.num_images)).item(),
                        "class_accuracy": (clf(x).argmax(1) == 3).float().mean().item(),
                        "bold": bold(x).mean().item()}
    d = per["step"] - per["default"]
    res["step_minus_default_legible"] = {"mean": d.mean().item(),
                                         "ci95_halfwidth": 1.96 * (d.std() / math.sqrt(a.num_images)).item()}
    res["num_images"] = a.num_images
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
