"""Recipes that rebuild the whole zoo from scratch, seeded and resumable.

    python bench/train_zoo.py {classifier,base,expert,oracle,all} [--out DIR] [--steps N] [--tiny]
                              [--name NAME ...] [--seed S] [--force] [--ckpt-dir DIR]

(or ``python -m bench.zoo.train ...`` from the repository root). Each stage checkpoints often (safetensors:
weights, EMA, optimizer state, step, elapsed time; never pickle) and resumes from its last checkpoint when re-run;
a finished stage is skipped unless --force. Per-step randomness is derived from (seed, step), so a resumed run
draws the same batches as an uninterrupted one. ``all`` runs classifier -> base -> experts -> oracles and logs
each stage's duration into <out>/durations.json and <out>/README.md. ``--tiny`` shrinks every size (a few
steps, tiny batches) for tests. The default --out is the package's own zoo folder (msdda.zoo.ZOO_DIR).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from msdda.zoo import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, NULL_CLASS, ZOO_DIR, flavour_dir

from .ckpt import load_checkpoint, save_checkpoint
from .common import format_seconds, log, read_json, record_duration, seeded_generator, write_card, write_json
from .rl import reevaluate, train_experts, train_oracles

SEED = 0


# ----------------------------------------------------------------------------------------------------------------
# classifier
# ----------------------------------------------------------------------------------------------------------------

def train_classifier(out: Path, ckpt_dir: Path, *, steps: int | None, tiny: bool, seed: int, force: bool) -> dict:
    from safetensors.torch import save_file

    from msdda.zoo.classifier import DigitClassifier

    from .data import augment, train_val_split

    final = out / "classifier.safetensors"
    ck = ckpt_dir / "classifier.safetensors"
    if final.exists() and not force:
        log(f"classifier: {final} exists, skipping (--force to rebuild)")
        return {}
    steps = steps if steps is not None else (4 if tiny else 2000)
    batch = 16 if tiny else 64
    (xtr, ytr), (xva, yva) = train_val_split()
    torch.manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    meta = load_checkpoint(ck, model, opt) if not force else None
    meta = meta or {"step": 0, "elapsed": 0.0}
    if meta["step"]:
        log(f"classifier: resuming from step {meta['step']}")
    t0, last = time.time() - meta["elapsed"], time.time()
    for step in range(meta["step"], steps):
        g = seeded_generator(seed, step, 1)
        idx = torch.randint(0, xtr.shape[0], (batch,), generator=g)
        x = augment(xtr[idx], g)
        lr = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        for grp in opt.param_groups:
            grp["lr"] = lr
        loss = torch.nn.functional.cross_entropy(model(x), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 250 == 0:
            log(f"classifier step {step + 1}/{steps} loss {loss.item():.4f}")
        if time.time() - last > 30 or step + 1 == steps:
            save_checkpoint(ck, model, opt, {"step": step + 1, "elapsed": time.time() - t0})
            last = time.time()
    model.eval()
    with torch.no_grad():
        acc = (model(xva).argmax(1) == yva).float().mean().item()
        tr_acc = (model(xtr).argmax(1) == ytr).float().mean().item()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(final))
    elapsed = time.time() - t0
    nparams = sum(p.numel() for p in model.parameters())
    log(f"classifier: val acc {acc:.4f} train acc {tr_acc:.4f} ({nparams} params) in {elapsed:.0f}s")
    metrics = {"val_accuracy": acc, "train_accuracy": tr_acc, "params": nparams, "steps": steps,
               "duration_s": elapsed}
    write_json(out / "classifier_metrics.json", metrics)
    record_duration(out, "classifier", elapsed)
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# base diffusion model
# ----------------------------------------------------------------------------------------------------------------

BASE_STEPS = 5000
BASE_BATCH = 128
BASE_LR = 4e-4
BASE_WARMUP = 200
BASE_EMA = 0.999
LABEL_DROPOUT = 0.1


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, m in zip(ema.parameters(), model.parameters()):
        e.lerp_(m, 1.0 - decay)


def train_base(out: Path, ckpt_dir: Path, *, steps: int | None, tiny: bool, seed: int, force: bool) -> dict:
    from .data import train_val_split
    from .diffusion import hybrid_loss, make_scheduler, make_unet, train_schedule

    folder = out / "base"
    ck = ckpt_dir / "base.safetensors"
    if (folder / "unet" / "config.json").exists() and not force:
        log(f"base: {folder} exists, skipping (--force to rebuild)")
        return {}
    steps = steps if steps is not None else (3 if tiny else BASE_STEPS)
    batch = 8 if tiny else BASE_BATCH
    (xtr, ytr), _ = train_val_split()
    torch.manual_seed(seed)
    unet = make_unet()
    ema = copy.deepcopy(unet)
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=BASE_LR, weight_decay=0.0)
    meta = (load_checkpoint(ck, unet, opt, ema) if not force else None) or {"step": 0, "elapsed": 0.0}
    if meta["step"]:
        log(f"base: resuming from step {meta['step']} ({meta['elapsed']:.0f}s already spent)")
    sched = make_scheduler()
    schedule = train_schedule()
    unet.train()
    t0, last = time.time() - meta["elapsed"], time.time()
    run_mse = run_vb = 0.0
    for step in range(meta["step"], steps):
        g = seeded_generator(seed, step, 2)
        idx = torch.randint(0, xtr.shape[0], (batch,), generator=g)
        x0, y = xtr[idx], ytr[idx].clone()
        y[torch.rand(batch, generator=g) < LABEL_DROPOUT] = NULL_CLASS
        t = torch.randint(0, schedule.num_train_timesteps, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        lr = BASE_LR * min(1.0, (step + 1) / BASE_WARMUP)
        for grp in opt.param_groups:
            grp["lr"] = lr
        loss, parts = hybrid_loss(unet, schedule, x0, y, t, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        _ema_update(ema, unet, min(BASE_EMA, (1 + step) / (10 + step)))
        run_mse = 0.98 * run_mse + 0.02 * parts["mse"] if step else parts["mse"]
        run_vb = 0.98 * run_vb + 0.02 * parts["vb"] if step else parts["vb"]
        if (step + 1) % 100 == 0:
            el = time.time() - t0
            log(f"base step {step + 1}/{steps} mse {run_mse:.4f} vb {run_vb:.4f} ({el:.0f}s, "
                f"{el / (step + 1):.3f}s/step)")
        if time.time() - last > 60 or step + 1 == steps:
            save_checkpoint(ck, unet, opt, {"step": step + 1, "elapsed": time.time() - t0}, ema=ema)
            last = time.time()
    train_elapsed = time.time() - t0
    folder.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(str(folder / "unet"), safe_serialization=True)
    sched.save_pretrained(str(folder / "scheduler"))
    log(f"base: trained {steps} steps in {train_elapsed:.0f}s; saved to {folder}")
    nparams = sum(p.numel() for p in ema.parameters())
    metrics: dict = {"train_steps": steps, "batch": batch, "train_duration_s": train_elapsed, "params": nparams}
    t_eval = time.time()
    if (out / "classifier.safetensors").exists():
        metrics.update(evaluate_base(out, tiny=tiny, seed=seed))
    metrics["eval_duration_s"] = time.time() - t_eval
    write_json(folder / "metrics.json", metrics)
    record_duration(out, "base", train_elapsed + metrics["eval_duration_s"])
    _base_card(folder, metrics, seed)
    return metrics


def reevaluate_base(out: Path, *, tiny: bool, seed: int) -> dict:
    folder = out / "base"
    metrics = read_json(folder / "metrics.json", {})
    t = time.time()
    metrics.update(evaluate_base(out, tiny=tiny, seed=seed))
    metrics["eval_duration_s"] = time.time() - t
    write_json(folder / "metrics.json", metrics)
    _base_card(folder, metrics, seed)
    return metrics


def _sample_labels(n: int) -> torch.Tensor:
    return torch.arange(n) % 10


@torch.no_grad()
def evaluate_base(out: Path, *, tiny: bool, seed: int) -> dict:
    """Class accuracy of CFG samples at DEFAULT_STEPS for a few guidance scales (diffusers' reference sampler),
    and reward statistics (mean, std, correlations) over base samples at the default guidance scale."""
    from diffusers import DDPMScheduler, UNet2DModel

    from msdda.zoo.rewards import load_classifier

    unet = UNet2DModel.from_pretrained(str(out / "base" / "unet"), low_cpu_mem_usage=False).eval()
    sched = DDPMScheduler.from_pretrained(str(out / "base" / "scheduler"))
    clf = load_classifier(out / "classifier.safetensors")
    n = 20 if tiny else 300
    steps = 4 if tiny else DEFAULT_STEPS
    scales = [DEFAULT_GUIDANCE_SCALE] if tiny else [1.0, 1.5, 2.0, 3.0]
    res: dict = {"eval_steps": steps, "accuracy_by_guidance": {}}
    for gs in scales:
        labels = _sample_labels(n)
        x = _sample_chunked(unet, labels, steps, gs, seed + 12345, sched)
        acc = (clf(x).argmax(1) == labels).float().mean().item()
        res["accuracy_by_guidance"][str(gs)] = {"n": n, "accuracy": acc}
        log(f"base eval: guidance {gs}: class accuracy {acc:.4f} (n={n}, {steps} steps)")
    # the headline number: a fresh, larger draw at the default guidance scale; also the reward statistics
    n2 = 20 if tiny else 1000
    labels = _sample_labels(n2)
    x = _sample_chunked(unet, labels, steps, DEFAULT_GUIDANCE_SCALE, seed + 777, sched)
    acc = (clf(x).argmax(1) == labels).float().mean().item()
    res["default_guidance_scale"] = DEFAULT_GUIDANCE_SCALE
    res["class_accuracy_default"] = {"n": n2, "accuracy": acc}
    log(f"base eval: DEFAULT guidance {DEFAULT_GUIDANCE_SCALE}: class accuracy {acc:.4f} (n={n2})")
    res["reward_stats"] = reward_stats(x, labels, clf)
    return res


def _sample_chunked(unet, labels, steps, gs, seed, sched, chunk=500):
    from .diffusion import sample_reference

    xs = [sample_reference(unet, labels[i:i + chunk], steps=steps, guidance_scale=gs, seed=seed + i, scheduler=sched)
          for i in range(0, labels.shape[0], chunk)]
    return torch.cat(xs)


def reward_stats(x: torch.Tensor, labels: torch.Tensor, clf=None) -> dict:
    from msdda.zoo.rewards import REWARDS, legible

    vals = {}
    for k, f in REWARDS.items():
        vals[k] = (legible(x, labels, classifier=clf) if (k == "legible" and clf is not None) else f(x, labels)).float()
    stats = {k: {"mean": v.mean().item(), "std": v.std().item(), "min": v.min().item(), "max": v.max().item()}
             for k, v in vals.items()}
    names = list(vals)
    corr = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            va, vb = vals[a], vals[b]
            c = torch.corrcoef(torch.stack([va, vb]))[0, 1].item()
            # Spearman too: legible is heavy-tailed
            ra, rb = va.argsort().argsort().float(), vb.argsort().argsort().float()
            s = torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()
            corr[f"{a}~{b}"] = {"pearson": c, "spearman": s}
    return {"n": int(x.shape[0]), "per_reward": stats, "correlations": corr}


def _base_card(folder: Path, m: dict, seed: int) -> None:
    from .diffusion import SCHEDULER_CONFIG, UNET_CONFIG

    acc = m.get("class_accuracy_default", {})
    write_card(folder, "msdda zoo: base model", {
        "What": "Class-conditional DDPM on scikit-learn digits (16x16, 1 channel, [-1, 1], ink bright), "
                "epsilon prediction + learned-range variance (Improved DDPM). Classes 0..9, class 10 = null "
                "(classifier-free guidance).",
        "Data": "sklearn load_digits, bilinear upsample 8x8 -> 16x16, deterministic train split (1500 images; "
                "bench/zoo/data.py).",
        "Architecture": f"diffusers UNet2DModel {json.dumps(UNET_CONFIG)}; {m.get('params')} parameters, fp32.",
        "Scheduler": f"diffusers DDPMScheduler {json.dumps(SCHEDULER_CONFIG)} (scheduler/).",
        "Loss": "Improved-DDPM hybrid: L_simple (eps MSE) + L_vb(t) in bits/dim with stop-gradient on the mean, "
                "t uniform over 1000 steps == L_simple + 0.001 * L_vlb. Label dropout 10% to the null class.",
        "Training": {"steps": m.get("train_steps"), "batch": m.get("batch"), "optimizer": f"AdamW lr {BASE_LR}, "
                     f"warmup {BASE_WARMUP}, grad-clip 1.0", "EMA": f"{BASE_EMA} (the saved weights are the EMA)",
                     "seed": seed, "train duration": format_seconds(m.get("train_duration_s", 0)),
                     "eval duration": format_seconds(m.get("eval_duration_s", 0)),
                     "recipe": "python bench/train_zoo.py base"},
        "Measured": {"class accuracy at default guidance "
                     f"{m.get('default_guidance_scale')} ({m.get('eval_steps')} DDPM steps, n={acc.get('n')})":
                     acc.get("accuracy"),
                     "accuracy by guidance scale (n=300 each)": json.dumps(
                         {k: round(v["accuracy"], 4) for k, v in m.get("accuracy_by_guidance", {}).items()}),
                     "reward stats over base samples": json.dumps(m.get("reward_stats", {}).get("per_reward"), indent=None),
                     "reward correlations over base samples": json.dumps(m.get("reward_stats", {}).get("correlations"))},
    })


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def _default_ckpt_dir(out: Path) -> Path:
    if out.resolve() == ZOO_DIR.resolve():
        return ZOO_DIR.parents[2] / ".cache" / "zoo_ckpt"
    return out / "_ckpt"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/train_zoo.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["classifier", "base", "expert", "oracle", "all", "step-expert"],
                    help="step-expert: the step-level experts of bench/zoo/step.py (zoo flavour \"step\"; not in all)")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: the package's zoo folder (step-expert: its \"step\" flavour folder)")
    ap.add_argument("--zoo-root", type=Path, default=ZOO_DIR,
                    help="step-expert only: the zoo whose base, classifier and reward scales it starts from")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (base/classifier) or RL iterations")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes, for tests")
    ap.add_argument("--name", nargs="*", default=None, help="expert objectives / oracle weights to build")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--force", action="store_true", help="rebuild even if the output exists (ignores checkpoints)")
    ap.add_argument("--ckpt-dir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("MSDDA_ZOO_THREADS", "2")),
                    help="torch threads (default 2, or $MSDDA_ZOO_THREADS); use 1 on a CPU shared with other jobs")
    ap.add_argument("--eval-only", action="store_true",
                    help="re-measure existing models (base / experts / oracles) and rewrite their cards")
    ap.add_argument("--fit-only", action="store_true",
                    help="step-expert only: fit, skip the measurements (run once more without it to measure)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.stage == "step-expert":
        from .step import train_step_experts

        out = a.out or flavour_dir("step")
        ckpt_dir = a.ckpt_dir or (_default_ckpt_dir(ZOO_DIR) if a.out is None else a.out / "_ckpt")
        train_step_experts(out, ckpt_dir, zoo_root=a.zoo_root, names=a.name, steps=a.steps, tiny=a.tiny,
                           seed=a.seed, force=a.force, measure=not a.fit_only)
        return 0
    out = a.out or ZOO_DIR
    ckpt_dir = a.ckpt_dir or _default_ckpt_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(steps=a.steps, tiny=a.tiny, seed=a.seed, force=a.force)
    stages = ["classifier", "base", "expert", "oracle"] if a.stage == "all" else [a.stage]
    for st in stages:
        t = time.time()
        log(f"=== stage {st} ===")
        if st == "classifier":
            train_classifier(out, ckpt_dir, **kw)
        elif st == "base" and a.eval_only:
            reevaluate_base(out, tiny=a.tiny, seed=a.seed)
        elif st == "base":
            train_base(out, ckpt_dir, **kw)
        elif st in ("expert", "oracle") and a.eval_only:
            reevaluate(out, st, names=a.name, tiny=a.tiny, seed=a.seed)
        elif st == "expert":
            train_experts(out, ckpt_dir, names=a.name, **kw)
        elif st == "oracle":
            train_oracles(out, ckpt_dir, names=a.name, **kw)
        log(f"=== stage {st} finished in {time.time() - t:.0f}s (this run) ===")
    write_zoo_readme(out)
    return 0


def write_zoo_readme(out: Path) -> None:
    from msdda.atomic import atomic_write_text

    from .readme import render_zoo_readme

    atomic_write_text(out / "README.md", render_zoo_readme(out))


if __name__ == "__main__":
    sys.exit(main())
