"""``msdda``: the command line. A thin layer over the Python API.

Every bad input ends with one line on stderr (``msdda: error: ...``) and exit status 2, never a traceback.
Images and manifests are written atomically; an interrupted ``generate`` started again with the same
arguments continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from msdda import batch, serve  # the Ray commands; Ray itself is imported only when they run

EXIT_BAD_INPUT = 2


class CliError(ValueError):
    """Bad command-line input. Printed as one line, exit status 2."""


# ---------------------------------------------------------------------- parsing helpers
def parse_weights(text: str | None) -> dict[str, float] | None:
    """'a=0.7,b=0.3' -> {'a': 0.7, 'b': 0.3}."""
    if text is None:
        return None
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name:
            raise CliError(f"--weights: expected NAME=VALUE, got {part!r}")
        try:
            w = float(value)
        except ValueError:
            raise CliError(f"--weights: {name}={value!r} is not a number") from None
        if not math.isfinite(w):
            raise CliError(f"--weights: weight for {name!r} is not a finite number ({value})")
        if w < 0:
            raise CliError(f"--weights: weight for {name!r} is negative ({value})")
        if name in out:
            raise CliError(f"--weights: {name!r} given twice")
        out[name] = w
    if not out:
        raise CliError("--weights: no weights given")
    return out


def parse_experts(items: list[str] | None) -> dict[str, str]:
    experts: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise CliError(f"--expert: expected NAME=PATH, got {item!r}")
        if name in experts:
            raise CliError(f"--expert: {name!r} given twice")
        experts[name] = path
    return experts


def parse_betas(text: str | None) -> dict[str, float] | None:
    if text is None:
        return None
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            raise CliError(f"--expert-betas: expected NAME=NUMBER, got {part!r}") from None
        if not sep or not math.isfinite(out[name]) or out[name] <= 0:
            raise CliError(f"--expert-betas: KL strength for {name!r} must be a positive number")
    return out


def resolve_models(args) -> tuple[str, dict[str, str]]:
    """--base/--expert, or the embedded zoo when neither is given."""
    experts = parse_experts(args.expert)
    if args.base is None and not experts:
        from msdda.zoo import zoo_paths, OBJECTIVES

        paths = zoo_paths()
        return str(paths["base"]), {name: str(paths[name]) for name in OBJECTIVES}
    if args.base is None:
        raise CliError("--expert needs --base (or give neither to use the embedded zoo)")
    return args.base, experts


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models (default: the embedded digits zoo)")
    g.add_argument("--base", metavar="PATH", help="base model: a diffusers pipeline folder, a folder with unet/, or a UNet folder")
    g.add_argument("--expert", metavar="NAME=PATH", action="append",
                   help="an aligned expert: a UNet folder of the base's architecture or a LoRA adapter (repeatable)")
    g.add_argument("--backend", default="torch", choices=("torch", "onnxruntime", "tensorrt"), help="network runtime (default torch)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    g.add_argument("--scheduler", choices=("ddpm", "ddim"), help="sampler family (default: the base's own)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    cond = g.add_mutually_exclusive_group()
    cond.add_argument("--prompt", help="text prompt (text-conditioned bases)")
    cond.add_argument("--class", dest="class_label", type=int, metavar="N", help="class label (class-conditional bases)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default 50, the zoo's default for the zoo)")
    g.add_argument("--eta", type=float, default=1.0, help="DDIM eta (default 1.0)")
    g.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale (default 7.5, or the zoo's)")
    g.add_argument("--seed", type=int, default=0, help="seed of image 0; image i uses seed + i (default 0)")
    g.add_argument("--strategy", default="msdda", help="msdda | mpa | soup | base | expert:NAME (default msdda)")
    g.add_argument("--normalize", action="store_true", help="rescale weights to sum to 1 instead of refusing")
    g.add_argument("--expert-betas", metavar="NAME=B,...", help="per-expert KL strengths beta_k; adds the base with exponent 1 - sum c_k")
    g.add_argument("--batch-size", type=int, default=8, help="images per forward batch (default 8)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msdda", description="Compose aligned diffusion experts at denoising time (MSDDA).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,sweep,eval,export,serve,batch}")

    gen = sub.add_parser("generate", help="generate images with weights chosen per run",
                         description="Generate images composing the experts with the given weights. Writes "
                                     "OUT/00000.png..., OUT/grid.png and OUT/manifest.json; re-running the same "
                                     "command after an interruption continues where it stopped.")
    _add_model_args(gen)
    _add_sampling_args(gen)
    gen.add_argument("--weights", metavar="NAME=W,...", help="expert weights, e.g. legible=0.6,bold=0.4 (default: equal)")
    gen.add_argument("--num-images", type=int, default=16, help="number of images (default 16)")
    gen.add_argument("--out", default="out", metavar="DIR", help="output folder (default ./out)")

    sweep = sub.add_parser("sweep", help="generate over a grid of weights between two experts",
                           description="For w in linspace(0, 1, --points): weights A=w, B=1-w. Writes OUT/w0.50/grid.png ... and OUT/summary.json.")
    _add_model_args(sweep)
    _add_sampling_args(sweep)
    sweep.add_argument("--pair", required=False, metavar="A,B", help="the two experts to sweep between (default: the first two)")
    sweep.add_argument("--points", type=int, default=5, help="number of weights (default 5)")
    sweep.add_argument("--num-images", type=int, default=8, help="images per weight (default 8)")
    sweep.add_argument("--out", default="sweep", metavar="DIR", help="output folder (default ./sweep)")

    ev = sub.add_parser("eval", help="evaluate strategies on the embedded zoo (rewards, Pareto fronts, hypervolume)")
    ev.add_argument("--samples", type=int, default=256, help="samples per weight point (default 256)")
    ev.add_argument("--steps", type=int, default=None, help="denoising steps (default: the zoo's)")
    ev.add_argument("--strategies", default=None, help="comma-separated subset (default: all)")
    ev.add_argument("--out", default="bench/results/zoo_eval", metavar="DIR", help="results folder")
    ev.add_argument("--quick", action="store_true", help="a small smoke evaluation (few samples and weights)")
    ev.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"),
                    help="generation backend (default torch; RGG always runs on torch)")

    ex = sub.add_parser("export", help="export UNets to ONNX (and TensorRT where available)",
                        description="Export the base and every expert UNet to verified ONNX files. With no models named, exports the embedded zoo.")
    ex.add_argument("--base", metavar="PATH")
    ex.add_argument("--expert", metavar="NAME=PATH", action="append")
    ex.add_argument("--out", required=True, metavar="DIR")
    ex.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 17 (default 17)")
    ex.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    ex.add_argument("--dynamic-hw", action="store_true", help="dynamic height and width (batch is always dynamic)")
    serve.add_command(sub)
    batch.add_command(sub)
    return parser


# ---------------------------------------------------------------------- commands
def _engine(args):
    from msdda import Engine

    base, experts = resolve_models(args)
    return Engine.from_pretrained(base, experts, backend=args.backend, device=args.device, scheduler=args.scheduler)


def _defaults(args, engine) -> tuple[int, float]:
    from msdda import zoo

    using_zoo = args.base is None
    steps = args.steps if args.steps is not None else (zoo.DEFAULT_STEPS if using_zoo else 50)
    gscale = args.guidance_scale if args.guidance_scale is not None else (zoo.DEFAULT_GUIDANCE_SCALE if using_zoo else 7.5)
    if steps < 1:
        raise CliError(f"--steps must be >= 1, got {steps}")
    return steps, gscale


def _conditioning_kwargs(args, engine) -> dict:
    if engine.is_text:
        if args.prompt is None:
            raise CliError("this base is text-conditioned: pass --prompt")
        return {"prompt": args.prompt}
    if args.prompt is not None:
        raise CliError("this base is not text-conditioned: use --class, not --prompt")
    if engine.num_classes:
        if args.class_label is None:
            raise CliError(f"this base is class-conditional: pass --class N (0..{engine.num_classes - 2})")
        return {"class_labels": args.class_label}
    return {}


def run_batches(engine, args, weights, out_dir: Path, num_images: int, progress_desc: str) -> list[Path]:
    """Generate images 0..num_images-1 into out_dir, skipping those already written (resume)."""
    from tqdm import tqdm

    from msdda.atomic import atomic_save_image

    steps, gscale = _defaults(args, engine)
    cond = _conditioning_kwargs(args, engine)
    betas = parse_betas(args.expert_betas)
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    paths = [out_dir / f"{i:05d}.png" for i in range(num_images)]
    todo = [i for i, p in enumerate(paths) if not _valid_png(p)]
    bar = tqdm(total=len(todo) * steps, desc=progress_desc, unit="step", disable=None)
    for start in range(0, len(todo), args.batch_size):
        chunk = todo[start:start + args.batch_size]
        out = engine.generate(**cond, weights=weights, num_images=len(chunk), steps=steps, eta=args.eta,
                              guidance_scale=gscale, seed=[args.seed + i for i in chunk], strategy=args.strategy,
                              normalize=args.normalize, expert_betas=betas,
                              callback=lambda i, n: bar.update(1))
        for i, image in zip(chunk, out.images):
            atomic_save_image(paths[i], image)
    bar.close()
    return paths


def _valid_png(path: Path) -> bool:
    if not path.is_file():
        return False
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:
        return False


def save_grid(paths: list[Path], dest: Path) -> None:
    from PIL import Image

    from msdda.atomic import atomic_save_image

    images = [Image.open(p).convert("RGB") for p in paths]
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    scale = max(1, 64 // max(w, h))
    grid = Image.new("RGB", (cols * w * scale + (cols + 1) * 2, rows * h * scale + (rows + 1) * 2), "white")
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.resize((w * scale, h * scale), Image.NEAREST), (2 + c * (w * scale + 2), 2 + r * (h * scale + 2)))
    atomic_save_image(dest, grid)


def _manifest(args, engine, weights, steps, gscale, num_images) -> dict:
    import msdda

    return {
        "msdda_version": msdda.__version__,
        "models": [{"name": m.name, "path": m.path, "sha256": m.sha256} for m in engine.models],
        "weights": weights, "normalize": args.normalize, "expert_betas": parse_betas(args.expert_betas),
        "strategy": args.strategy, "backend": args.backend, "device": args.device, "scheduler": engine.scheduler,
        "steps": steps, "eta": args.eta, "guidance_scale": gscale, "seed": args.seed,
        "seeds": [args.seed + i for i in range(num_images)], "num_images": num_images,
        "prompt": args.prompt, "class": args.class_label,
    }


def _prepare_out(out_dir: Path, manifest: dict) -> None:
    """Create out_dir, or check that it holds the same run (resume); write the manifest atomically."""
    from msdda.atomic import atomic_write_json

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create output folder {out_dir}: {exc.strerror}") from None
    path = out_dir / "manifest.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            raise CliError(f"{path} is corrupt; remove it or use another --out") from None
        old_run = {k: v for k, v in old.items() if k != "complete"}
        if old_run != manifest:
            changed = sorted(k for k in set(old_run) | set(manifest) if old_run.get(k) != manifest.get(k))
            raise CliError(f"{out_dir} holds a different run (differs in: {', '.join(changed)}); use another --out")
    atomic_write_json(path, {**manifest, "complete": False})


def cmd_generate(args) -> int:
    weights = parse_weights(args.weights)
    if args.num_images < 1:
        raise CliError(f"--num-images must be >= 1, got {args.num_images}")
    engine = _engine(args)
    _check_weights(weights, engine, args.normalize)
    steps, gscale = _defaults(args, engine)
    out_dir = Path(args.out)
    manifest = _manifest(args, engine, weights, steps, gscale, args.num_images)
    _prepare_out(out_dir, manifest)
    paths = run_batches(engine, args, weights, out_dir, args.num_images, "generate")
    save_grid(paths, out_dir / "grid.png")
    from msdda.atomic import atomic_write_json

    atomic_write_json(out_dir / "manifest.json", {**manifest, "complete": True,
                                                  "images": [p.name for p in paths], "grid": "grid.png"})
    print(f"wrote {len(paths)} images, {out_dir / 'grid.png'} and {out_dir / 'manifest.json'}")
    return 0


def _check_weights(weights, engine, normalize) -> None:
    if weights is None:
        return
    unknown = sorted(set(weights) - set(engine.experts))
    if unknown:
        raise CliError(f"unknown expert {unknown[0]!r} in --weights; experts are: {', '.join(engine.experts) or 'none'}")
    total = sum(weights.values())
    if total <= 0:
        raise CliError("--weights: all weights are zero")
    if not normalize and abs(total - 1) > 1e-6:
        raise CliError(f"--weights sum to {total:g}, not 1 (add --normalize to rescale)")


def cmd_sweep(args) -> int:
    from msdda.atomic import atomic_write_json

    engine = _engine(args)
    if args.pair:
        pair = [p.strip() for p in args.pair.split(",")]
        if len(pair) != 2:
            raise CliError(f"--pair: expected A,B, got {args.pair!r}")
    else:
        pair = list(engine.experts[:2])
    if len(pair) != 2 or any(p not in engine.experts for p in pair):
        raise CliError(f"--pair must name two loaded experts ({', '.join(engine.experts) or 'none'})")
    if args.points < 2:
        raise CliError(f"--points must be >= 2, got {args.points}")
    steps, gscale = _defaults(args, engine)
    out_root = Path(args.out)
    summary = {"pair": pair, "points": []}
    for j in range(args.points):
        w = round(j / (args.points - 1), 6)
        weights = {pair[0]: w, pair[1]: round(1 - w, 6)}
        out_dir = out_root / f"w{w:.2f}"
        manifest = _manifest(args, engine, weights, steps, gscale, args.num_images)
        _prepare_out(out_dir, manifest)
        paths = run_batches(engine, args, weights, out_dir, args.num_images, f"{pair[0]}={w:.2f}")
        save_grid(paths, out_dir / "grid.png")
        atomic_write_json(out_dir / "manifest.json", {**manifest, "complete": True, "images": [p.name for p in paths]})
        summary["points"].append({"weights": weights, "grid": f"{out_dir.name}/grid.png",
                                  **_zoo_rewards(engine, args, paths)})
    atomic_write_json(out_root / "summary.json", summary)
    print(f"wrote {args.points} grids and {out_root / 'summary.json'}")
    return 0


def _zoo_rewards(engine, args, paths) -> dict:
    """Mean zoo rewards of the written images, when the models are the zoo's (else nothing)."""
    if args.base is not None or args.class_label is None:
        return {}
    import numpy as np
    import torch
    from PIL import Image

    from msdda.zoo.rewards import REWARDS

    images = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("L"), np.float32) / 127.5 - 1)[None]
                          for p in paths])
    labels = torch.full((len(paths),), args.class_label, dtype=torch.int64)
    return {"rewards": {name: float(fn(images, labels).mean()) for name, fn in REWARDS.items()}}


def cmd_eval(args) -> int:
    from msdda.evaluate import main as evaluate

    return evaluate(samples=args.samples, steps=args.steps, strategies=args.strategies, out=args.out, quick=args.quick,
                    backend=args.backend)


def cmd_export(args) -> int:
    from msdda.export import export_models

    experts = parse_experts(args.expert)
    if experts and args.base is None:
        raise CliError("--expert needs --base (or give neither to export the embedded zoo)")
    manifest = export_models(args.base, experts, args.out, opset=args.opset, precision=args.precision,
                             dynamic_hw=args.dynamic_hw)
    print(f"exported {len(manifest.get('models', manifest))} models to {args.out}")
    return 0


COMMANDS = {"generate": cmd_generate, "sweep": cmd_sweep, "eval": cmd_eval, "export": cmd_export, "serve": serve.run,
            "batch": batch.run}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, PermissionError) as exc:   # LoadError, ExportError, CliError...
        print(f"msdda: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("msdda: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
