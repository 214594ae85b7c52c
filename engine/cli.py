"""``msdda``: the command line. A thin layer over the Python API.

Every bad input ends with one line on stderr (``msdda: error: ...``) and exit status 2, never a traceback.
Library warnings and logging (diffusers, transformers, accelerate, torch, Python ``warnings``) are silenced
unless ``--verbose`` or ``MSDDA_VERBOSE=1`` is given, so that line is the only one.

``generate`` and ``sweep`` check everything they can (arguments, models, conditioning, strategy, weights
against the experts) before they create or touch the output folder, and write into run folders
(``msdda.runfolder``): locked for the whole run, resumed by the same command, verified and repaired when the
same command meets a finished folder, and refused when they hold anything else.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path

from msdda import batch, serve  # the Ray commands; Ray itself is imported only when they run
from msdda.cli_common import (CliError, add_model_args, check_model_flags, default_sampling, parse_experts,
                              resolve_models, torch_dtype, uses_zoo, verbose_requested)

EXIT_BAD_INPUT = 2
GRID = "grid.png"
SUMMARY = "summary.json"
MAX_SWEEP_POINTS = 101          # point folders are named w0.00 ... w1.00: two decimals tell 101 apart
# Loggers of the libraries msdda drives; silenced (with Python warnings) unless --verbose.
LIBRARY_LOGGERS = ("diffusers", "transformers", "accelerate", "peft", "torch", "huggingface_hub", "onnxruntime",
                   "onnx")
_QUIET_ENV = {"DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error",
              "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors raised as one-line CliErrors (argparse itself prints usage lines first)."""

    def error(self, message):
        raise CliError(f"{message} (see {self.prog} --help)")


# ---------------------------------------------------------------------- quiet libraries
@contextlib.contextmanager
def library_output(verbose: bool):
    """Within the block, libraries print nothing: their loggers are raised above CRITICAL, Python warnings are
    ignored, and the environment variables diffusers/transformers read on first import say 'error'. Restored
    afterwards (``main`` may run in-process, e.g. under tests)."""
    if verbose:
        yield
        return
    saved_env = {k: os.environ.get(k) for k in _QUIET_ENV}
    for k, v in _QUIET_ENV.items():
        os.environ.setdefault(k, v)
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    saved_levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    # Libraries imported earlier in this process read the environment already: turn their bars off directly.
    bars = [m for m in (sys.modules.get(n) for n in ("diffusers.utils.logging", "transformers.utils.logging"))
            if m is not None and m.is_progress_bar_enabled()]
    for module in bars:
        module.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for module in bars:
            module.enable_progress_bar()
        for lg, level in zip(loggers, saved_levels):
            lg.setLevel(level)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------- parsing helpers
def parse_assignments(text: str | None, option: str) -> dict[str, float] | None:
    """'a=0.7,b=0.3' -> {'a': 0.7, 'b': 0.3}: the syntax, numbers and duplicate names of --weights and
    --expert-betas (their values are checked by msdda.validation, as the API checks them)."""
    if text is None:
        return None
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise CliError(f"{option}: expected NAME=VALUE, got {part!r}")
        try:
            number = float(value)
        except ValueError:
            raise CliError(f"{option}: {name}={value!r} is not a number") from None
        if name in out:
            raise CliError(f"{option}: {name!r} given twice")
        out[name] = number
    if not out:
        raise CliError(f"{option}: nothing given")
    return out


def parse_weights(text: str | None) -> dict[str, float] | None:
    """'a=0.7,b=0.3' -> {'a': 0.7, 'b': 0.3}; finite and >= 0 (msdda.validation.check_weights)."""
    from msdda.validation import check_weights

    weights = parse_assignments(text, "--weights")
    return None if weights is None else check_weights(weights, option="--weights")


def parse_betas(text: str | None) -> dict[str, float] | None:
    """'a=1,b=2' -> {'a': 1.0, 'b': 2.0}; finite and > 0 (msdda.validation.check_expert_betas)."""
    from msdda.validation import check_expert_betas

    betas = parse_assignments(text, "--expert-betas")
    return None if betas is None else check_expert_betas(betas, option="--expert-betas")


def parse_pair(text: str | None) -> list[str] | None:
    if text is None:
        return None
    pair = [p.strip() for p in text.split(",")]
    if len(pair) != 2 or not all(pair):
        raise CliError(f"--pair: expected A,B, got {text!r}")
    if pair[0] == pair[1]:
        raise CliError(f"--pair: the two experts must differ, got {text!r}")
    return pair


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    cond = g.add_mutually_exclusive_group()
    cond.add_argument("--prompt", help="text prompt (text-conditioned bases)")
    cond.add_argument("--class", dest="class_label", type=int, metavar="N", help="class label (class-conditional bases)")
    g.add_argument("--negative-prompt", metavar="TEXT", help="negative prompt for guidance (text bases; default: "
                   "the empty prompt, or zeros for SDXL pipelines with force_zeros_for_empty_prompt)")
    g.add_argument("--height", type=int, metavar="PX", help="image height in pixels (default: the model's)")
    g.add_argument("--width", type=int, metavar="PX", help="image width in pixels (default: the model's)")
    g.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: the model's own, 50 for the zoo and diffusers' pipelines)")
    g.add_argument("--eta", type=float, default=1.0, help="DDIM's eta, the noise of each DDIM step (default 1.0); "
                   "DDPM samplers, the zoo's among them, have no eta and ignore it")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's own: the zoo's 2.0, else 7.5)")
    g.add_argument("--seed", type=int, default=0, help="seed of image 0; image i uses seed + i (default 0)")
    g.add_argument("--strategy", default="msdda", help="msdda | mpa | soup | base | expert:NAME (default msdda)")
    g.add_argument("--normalize", action="store_true", help="rescale weights to sum to 1 instead of refusing")
    g.add_argument("--expert-betas", metavar="NAME=B,...", help="per-expert KL strengths beta_k; adds the base with exponent 1 - sum c_k")
    g.add_argument("--batch-size", type=int, default=8, help="images per forward batch (default 8)")


def _add_limit_args(p: argparse.ArgumentParser) -> None:
    from msdda.validation import DEFAULT_LIMITS

    g = p.add_argument_group("limits (refused before anything is allocated)")
    g.add_argument("--max-images", type=int, default=None, metavar="N",
                   help=f"largest number of images one command makes (default {DEFAULT_LIMITS.max_images})")
    g.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help=f"largest number of denoising steps (default {DEFAULT_LIMITS.max_steps})")


def _add_quiet_arg(p: argparse.ArgumentParser,
                   help="no progress on stderr (default: a bar on a terminal, else a line every 10%% or 10 s)") -> None:
    p.add_argument("--quiet", action="store_true", help=help)


def _add_verbose_arg(p: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    # SUPPRESS on subcommands, so that `msdda --verbose generate` is not reset by the subcommand's default
    p.add_argument("--verbose", action="store_true", default=default,
                   help="show library warnings and logging (also MSDDA_VERBOSE=1)")


def build_parser() -> argparse.ArgumentParser:
    import msdda

    parser = ArgumentParser(prog="msdda", description="Compose aligned diffusion experts at denoising time (MSDDA).")
    parser.add_argument("--version", action="version", version=f"msdda {msdda.__version__}")
    _add_verbose_arg(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,sweep,bench,export,serve,batch}")

    gen = sub.add_parser("generate", help="generate images with weights chosen per run",
                         description="Generate images composing the experts with the given weights. Writes "
                                     "OUT/00000.png..., OUT/grid.png and OUT/manifest.json. The same command "
                                     "again continues an interrupted run, or verifies a finished one and remakes "
                                     "only damaged or missing images; a folder holding another run or other "
                                     "files is refused, and so is a second run while one is writing.")
    add_model_args(gen)
    _add_sampling_args(gen)
    gen.add_argument("--weights", metavar="NAME=W,...", help="expert weights, e.g. legible=0.6,bold=0.4 (default: equal)")
    gen.add_argument("--num-images", type=int, default=16, help="number of images (default 16)")
    gen.add_argument("--out", default="out", metavar="DIR", help="output folder (default ./out)")
    _add_limit_args(gen)
    _add_quiet_arg(gen)
    _add_verbose_arg(gen)

    sweep = sub.add_parser("sweep", help="generate over a grid of weights between two experts",
                           description="For w in linspace(0, 1, --points): weights A=w, B=1-w. Writes "
                                       "OUT/w0.50/grid.png ... and OUT/summary.json; resumes and refuses like "
                                       "generate.")
    add_model_args(sweep)
    _add_sampling_args(sweep)
    sweep.add_argument("--pair", required=False, metavar="A,B", help="the two experts to sweep between (default: the first two)")
    sweep.add_argument("--points", type=int, default=5, help=f"number of weights, 2..{MAX_SWEEP_POINTS} (default 5)")
    sweep.add_argument("--num-images", type=int, default=8, help="images per weight (default 8)")
    sweep.add_argument("--out", default="sweep", metavar="DIR", help="output folder (default ./sweep)")
    _add_limit_args(sweep)
    _add_quiet_arg(sweep)
    _add_verbose_arg(sweep)

    bench = sub.add_parser("bench", help="time generation on these models: a table, and the full record as JSON",
                           description="Time Engine.generate per batch size and strategy (warmup, then repeats "
                                       "interleaved strategy by strategy), and the cost of the K experts against "
                                       "one network, from runs in this process. A text UNet folder alone runs on "
                                       "random prompt embeddings of its widths.")
    add_model_args(bench)
    b = bench.add_argument_group("benchmark")
    b.add_argument("--batch-sizes", default="1,8", metavar="N,N", help="images per call, each timed (default 1,8)")
    b.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: the model's own)")
    b.add_argument("--guidance-scale", type=float, default=None, help="guidance scale (default: the model's own)")
    b.add_argument("--warmup", type=int, default=1, help="untimed calls per batch size and strategy (default 1)")
    b.add_argument("--repeats", type=int, default=5, help="timed calls per batch size and strategy (default 5)")
    b.add_argument("--strategies", metavar="S,S", default=None,
                   help="strategies to time: msdda, mpa, soup, base, expert:NAME (default: msdda and the first "
                        "expert alone); one network alone is always timed as the reference")
    b.add_argument("--seed", type=int, default=0, help="seed of the timed calls (default 0)")
    b.add_argument("--out", metavar="FILE.json", help="write the full record here (atomically)")
    _add_quiet_arg(bench, help="no per-repeat progress lines on stderr")
    _add_verbose_arg(bench)

    ex = sub.add_parser("export", help="export UNets to ONNX (and TensorRT where available)",
                        description="Export the base and every expert UNet to verified ONNX files. With no models named, exports the embedded zoo.")
    ex.add_argument("--base", metavar="PATH")
    ex.add_argument("--expert", metavar="NAME=PATH", action="append")
    ex.add_argument("--out", required=True, metavar="DIR")
    ex.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 17 (default 17)")
    ex.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    ex.add_argument("--dynamic-hw", action="store_true", help="dynamic height and width (batch is always dynamic)")
    _add_verbose_arg(ex)
    serve.add_command(sub)
    batch.add_command(sub)
    return parser


# ---------------------------------------------------------------------- checks before loading
def _limits(args):
    from msdda.validation import Limits

    given = {k: getattr(args, k, None) for k in ("max_images", "max_steps")}
    try:
        return Limits(**{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        raise CliError(f"--{str(exc).replace('_', '-')}") from None


def base_conditioning(args):
    """What the base named by the model flags is conditioned on, from its configs alone (msdda.loading)."""
    from msdda.loading import base_conditioning as read

    base, _ = resolve_models(args)
    return read(base)


def check_experts_named(args, *, weights=None, expert_betas=None, strategy=None, pair=None) -> None:
    """Expert names in --weights, --expert-betas, --strategy and --pair against the experts the model flags
    name (before loading: an unknown name costs no model load)."""
    from msdda.validation import check_expert_betas, check_strategy, check_weights

    _, experts = resolve_models(args)
    names = tuple(experts)
    if weights is not None:
        check_weights(weights, names, option="--weights")
    if expert_betas is not None:
        check_expert_betas(expert_betas, names, option="--expert-betas")
    if strategy is not None:
        check_strategy(strategy, names)
    unknown = [p for p in pair or () if p not in names]
    if unknown:
        raise CliError(f"--pair: unknown expert {unknown[0]!r}; experts are: {', '.join(names) or 'none'}")


def _sampling(args, limits, num_images: int) -> dict:
    """The sampling arguments shared by generate and sweep, checked before any model is loaded."""
    from msdda import validation as v

    default_steps, default_guidance = default_sampling(args)
    steps = args.steps if args.steps is not None else default_steps
    gscale = args.guidance_scale if args.guidance_scale is not None else default_guidance
    checked = dict(steps=v.check_steps(steps, limits), guidance_scale=v.check_guidance_scale(gscale),
                   eta=v.check_eta(args.eta), strategy=args.strategy, normalize=args.normalize,
                   expert_betas=parse_betas(args.expert_betas))
    v.check_seed(args.seed, num_images)
    v.check_batch_size(args.batch_size, limits)
    v.check_device(args.device)
    v.check_variant(args.variant)
    for name in ("height", "width"):
        if getattr(args, name) is not None:
            v.check_int(f"--{name}", getattr(args, name), lo=1)
    return checked


def _engine(args, limits=None):
    from msdda import Engine
    from msdda.validation import DEFAULT_LIMITS

    base, experts = resolve_models(args)
    artifacts = {} if getattr(args, "onnx_dir", None) is None else {"onnx_dir": args.onnx_dir}
    return Engine.from_pretrained(base, experts, backend=args.backend, device=args.device, scheduler=args.scheduler,
                                  limits=limits or DEFAULT_LIMITS, variant=args.variant, dtype=torch_dtype(args.dtype),
                                  cuda_graphs=args.cuda_graphs, **artifacts)


def _check_before_loading(args, sampling: dict, weights, *, pair=None) -> None:
    """What generate and sweep can judge from the flags and the models' configs alone: the model flags, expert
    names, and the conditioning flags against what the base takes (the Engine checks all again once loaded)."""
    check_model_flags(args)
    check_experts_named(args, weights=weights, expert_betas=sampling["expert_betas"], strategy=sampling["strategy"],
                        pair=pair)
    _conditioning_kwargs(args, base_conditioning(args))


# ---------------------------------------------------------------------- checks after loading
def _conditioning_kwargs(args, engine) -> dict:
    """generate's conditioning arguments from the flags. ``engine``: a loaded Engine, or the base's
    ``msdda.loading.BaseConditioning`` (read before loading; same fields)."""
    size = {k: getattr(args, k) for k in ("height", "width") if getattr(args, k) is not None}
    if engine.is_text and engine.bare_unet:
        raise CliError("this base is a text UNet folder without a text encoder: the CLI has no prompt embeddings "
                       "to give it (use msdda bench, or Engine.generate(prompt_embeds=...))")
    if engine.is_text:
        if args.prompt is None:
            raise CliError("this base is text-conditioned: pass --prompt")
        negative = {} if args.negative_prompt is None else {"negative_prompt": args.negative_prompt}
        return {"prompt": args.prompt, **negative, **size}
    if args.prompt is not None:
        raise CliError("this base is not text-conditioned: use --class, not --prompt")
    if args.negative_prompt is not None:
        raise CliError("--negative-prompt is for text-conditioned bases")
    if engine.num_classes:
        if args.class_label is None:
            raise CliError(f"this base is class-conditional: pass --class N (0..{engine.num_classes - 2})")
        return {"class_labels": args.class_label, **size}
    if args.class_label is not None:
        raise CliError("this base is unconditional: --class is not accepted")
    return size


def _request(args, engine, sampling: dict, weights, num_images: int):
    """The run's ``msdda.Request``: every image i with seed ``--seed`` + i, checked once by the Engine
    (conditioning, strategy, weights and betas against the loaded experts, steps against the schedule) before
    any output exists. ``generate_into`` runs it in chunks (``Request.take``) without checking again."""
    return engine.check_request(**_conditioning_kwargs(args, engine), weights=weights, num_images=num_images,
                                seed=args.seed, **sampling)


def _run_params(args, engine, request, sampling: dict, weights) -> dict:
    """What defines the run's images; the same command again must give the same parameters."""
    import msdda

    return {
        "command": "generate", "msdda_version": msdda.__version__,
        "models": [{"name": m.name, "path": m.path, "sha256": m.sha256} for m in engine.models],
        "weights": weights, "normalize": sampling["normalize"], "expert_betas": sampling["expert_betas"],
        "strategy": sampling["strategy"], "backend": args.backend, "device": args.device,
        "dtype": str(engine.dtype).removeprefix("torch."), "dtype_default": engine.dtype_default,
        "scheduler": engine.scheduler, "steps": request.steps,
        "eta": request.eta if engine.scheduler == "ddim" else None,     # DDPM has no eta
        "guidance_scale": request.guidance_scale, "seed": args.seed,
        "seeds": list(request.seeds), "num_images": request.batch,
        "prompt": args.prompt, "class": args.class_label,
        **{k: getattr(args, k) for k in ("negative_prompt", "height", "width", "variant") if getattr(args, k) is not None},
    }


# ---------------------------------------------------------------------- writing a run
def owns_generate_file(name: str) -> bool:
    """The files a generate run folder holds: NNNNN.png, grid.png, manifest.json."""
    return name in ("manifest.json", GRID) or re.fullmatch(r"\d{5,}\.png", name) is not None


def owns_sweep_file(name: str) -> bool:
    return name in ("manifest.json", SUMMARY)


def image_names(num_images: int) -> list[str]:
    return [f"{i:05d}.png" for i in range(num_images)]


def _recorded_sha256(previous: dict | None) -> dict:
    """The sha256 of each file a finished run recorded (empty for a fresh or unfinished run)."""
    if not previous or previous.get("complete") is not True or not isinstance(previous.get("sha256"), dict):
        return {}
    # A hash edited to null (or to anything but hex text) is no record: the file is verified by decoding and
    # its hash recorded again, so the folder is fully verifiable after the rerun.
    return {k: v for k, v in previous["sha256"].items()
            if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)}


def generate_into(engine, run, request, *, batch_size: int, desc: str, quiet: bool = False) -> list[str]:
    """Make every image of the checked ``request`` that is missing or damaged in ``run`` (image i is sample i,
    with its own seed), then the grid and the finished manifest. Returns the names of the images made.
    Progress per ``msdda.progress``."""
    from msdda.progress import Progress
    from msdda.runfolder import image_intact

    names = image_names(request.batch)
    recorded = _recorded_sha256(run.previous)
    todo = [i for i, name in enumerate(names) if not image_intact(run.path / name, recorded.get(name))]
    bar = Progress(len(todo) * request.steps, desc, quiet=quiet)
    made = {}                     # name -> the image this run made (kept for the grid: never read back)
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            out = engine.generate(request.take(chunk), callback=lambda i, n: bar.update(1))
            for i, image in zip(chunk, out.images):
                run.write_image(names[i], image)
                made[names[i]] = image
    finally:
        bar.close()
    _finish(run, names, made)
    return list(made)


def _finish(run, names: list[str], made: dict) -> None:
    """Record every image's sha256, remake the grid if anything changed, and write the finished manifest
    (only when it differs from the one on disk: a rerun of a finished, intact folder writes nothing). The
    hashes of what this run wrote come from the bytes it wrote; only images an interrupted run left (verified
    by decoding, not recorded) are read to hash them."""
    from msdda.loading import file_sha256
    from msdda.runfolder import MANIFEST, image_intact

    recorded = _recorded_sha256(run.previous)
    sha = {}
    try:
        for name in names:
            sha[name] = (run.written_sha256[name] if name in made else recorded[name] if name in recorded
                         else file_sha256(run.path / name))
    except OSError as exc:
        raise CliError(f"cannot read {exc.filename}: {exc.strerror}") from None
    if made or GRID not in recorded or not image_intact(run.path / GRID, recorded[GRID]):
        save_grid(run, names, made)
        sha[GRID] = run.written_sha256[GRID]
    else:
        sha[GRID] = recorded[GRID]
    run.write_json(MANIFEST, {**run.params, "complete": True, "images": names, "grid": GRID, "sha256": sha})


def save_grid(run, names: list[str], in_memory: dict) -> None:
    """The grid of the run's images: those in ``in_memory`` (made by this run) as they are, the others read
    from the folder."""
    from PIL import Image

    images = [(in_memory[n] if n in in_memory else Image.open(run.path / n)).convert("RGB") for n in names]
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    scale = max(1, 64 // max(w, h))
    grid = Image.new("RGB", (cols * w * scale + (cols + 1) * 2, rows * h * scale + (rows + 1) * 2), "white")
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.resize((w * scale, h * scale), Image.NEAREST), (2 + c * (w * scale + 2), 2 + r * (h * scale + 2)))
    run.write_image(GRID, grid)


# ---------------------------------------------------------------------- commands
def cmd_generate(args) -> int:
    from msdda.runfolder import RunFolder, check_target
    from msdda.validation import check_num_images, normalized_weights

    limits = _limits(args)
    num_images = check_num_images(args.num_images, limits)
    weights = parse_weights(args.weights)
    if weights is not None:
        normalized_weights(list(weights.values()), normalize=args.normalize, label="--weights")
    sampling = _sampling(args, limits, num_images)
    _check_before_loading(args, sampling, weights)
    out = Path(args.out)
    check_target(out, owns_generate_file)                     # refuse a foreign folder before loading models
    engine = _engine(args, limits)
    request = _request(args, engine, sampling, weights, num_images)
    params = _run_params(args, engine, request, sampling, weights)
    with RunFolder(out, params, owns_generate_file) as run:
        made = generate_into(engine, run, request, batch_size=args.batch_size, desc="generate", quiet=args.quiet)
    if run.resumed and not made:
        print(f"{out} already holds this run, verified: {num_images} images, {out / GRID}, {out / 'manifest.json'}")
    else:
        print(f"wrote {len(made)} images, {out / GRID} and {out / 'manifest.json'}")
    return 0


def cmd_sweep(args) -> int:
    from msdda.runfolder import RunFolder, check_target
    from msdda.validation import check_int, check_num_images

    limits = _limits(args)
    pair = parse_pair(args.pair)
    points = check_int("--points", args.points, lo=2, hi=MAX_SWEEP_POINTS)
    num_images = check_num_images(args.num_images, limits)
    if points * num_images > limits.max_images:
        raise CliError(f"--points x --num-images = {points * num_images} images, more than the limit of "
                       f"{limits.max_images} (raise it with --max-images)")
    sampling = _sampling(args, limits, num_images)
    _check_before_loading(args, sampling, None, pair=pair)
    out_root = Path(args.out)
    check_target(out_root, owns_sweep_file)
    engine = _engine(args, limits)
    if pair is None:
        if len(engine.experts) < 2:
            raise CliError(f"sweep needs two experts; loaded: {', '.join(engine.experts) or 'none'}")
        pair = list(engine.experts[:2])
    unknown = [p for p in pair if p not in engine.experts]
    if unknown:
        raise CliError(f"--pair: unknown expert {unknown[0]!r}; experts are: {', '.join(engine.experts) or 'none'}")
    plan = []
    for j in range(points):
        w = round(j / (points - 1), 6)
        weights = {pair[0]: w, pair[1]: round(1 - w, 6)}
        request = _request(args, engine, sampling, weights, num_images)
        plan.append((f"w{w:.2f}", weights, request, _run_params(args, engine, request, sampling, weights)))
    root_params = {**plan[0][3], "command": "sweep", "pair": pair, "points": points, "weights": None}
    with RunFolder(out_root, root_params, owns_sweep_file) as root:
        summary = {"pair": pair, "points": []}
        for label, weights, request, params in plan:
            point = RunFolder(out_root / label, params, owns_generate_file)
            try:
                with point:
                    generate_into(engine, point, request, batch_size=args.batch_size,
                                  desc=f"{pair[0]}={weights[pair[0]]:.2f}", quiet=args.quiet)
            finally:
                if point.finished or point.resumed:
                    root.note_finished(label)
            summary["points"].append({"weights": weights, "grid": f"{label}/{GRID}",
                                      **_zoo_rewards(args, [point.path / n for n in image_names(num_images)])})
        root.write_json(SUMMARY, summary)
        root.write_json("manifest.json", {**root.params, "complete": True, "summary": SUMMARY,
                                          "folders": [label for label, *_ in plan]})
    print(f"wrote {points} grids and {out_root / SUMMARY}")
    return 0


def _zoo_rewards(args, paths) -> dict:
    """Mean zoo rewards of the written images, when the models are the zoo's (else nothing)."""
    if not uses_zoo(args) or args.class_label is None:
        return {}
    import numpy as np
    import torch
    from PIL import Image

    from msdda.zoo.rewards import REWARDS

    images = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("L"), np.float32) / 127.5 - 1)[None]
                          for p in paths])
    labels = torch.full((len(paths),), args.class_label, dtype=torch.int64)
    return {"rewards": {name: float(fn(images, labels).mean()) for name, fn in REWARDS.items()}}


def cmd_export(args) -> int:
    from msdda.export import check_export_options
    from msdda.exporting import export_models

    experts = parse_experts(args.expert)
    if experts and args.base is None:
        raise CliError("--expert needs --base (or give neither to export the embedded zoo)")
    check_export_options(args.opset, args.precision)          # before resolving the zoo or loading anything
    base, experts = resolve_models(args)
    manifest = export_models(base, experts, args.out, opset=args.opset, precision=args.precision,
                             dynamic_hw=args.dynamic_hw)
    print(f"exported {len(manifest.get('models', manifest))} models to {args.out}")
    return 0


def parse_batch_sizes(text: str, limits) -> tuple[int, ...]:
    """'1,8' -> (1, 8): distinct integers in 1..max_images."""
    from msdda.validation import check_int

    sizes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            size = int(part)
        except ValueError:
            raise CliError(f"--batch-sizes: {part!r} is not an integer") from None
        check_int("--batch-sizes", size, lo=1, hi=limits.max_images)
        if size in sizes:
            raise CliError(f"--batch-sizes: {size} given twice")
        sizes.append(size)
    if not sizes:
        raise CliError("--batch-sizes: nothing given")
    return tuple(sizes)


def cmd_bench(args) -> int:
    from msdda import validation as v
    from msdda.atomic import atomic_write_json
    from msdda.benchmark import BenchSettings, format_table, run_benchmark

    limits = v.DEFAULT_LIMITS
    sizes = parse_batch_sizes(args.batch_sizes, limits)
    strategies = None if args.strategies is None else tuple(filter(None, (s.strip() for s in
                                                                          args.strategies.split(","))))
    if strategies is not None and (not strategies or len(set(strategies)) != len(strategies)):
        raise CliError(f"--strategies: expected distinct names, got {args.strategies!r}")
    if args.steps is not None:
        v.check_steps(args.steps, limits)
    if args.guidance_scale is not None:
        v.check_guidance_scale(args.guidance_scale)
    v.check_int("--warmup", args.warmup, lo=0)
    v.check_int("--repeats", args.repeats, lo=1)
    v.check_seed(args.seed, max(sizes))
    v.check_device(args.device)
    v.check_variant(args.variant)
    check_model_flags(args)
    for strategy in strategies or ():
        check_experts_named(args, strategy=strategy)
    if args.out is not None and Path(args.out).is_dir():
        raise CliError(f"--out: {args.out} is a folder; give a file name such as bench.json")
    base_conditioning(args)                                  # a missing or unreadable base, before loading
    engine = _engine(args, limits)
    settings = BenchSettings(batch_sizes=sizes, steps=args.steps, warmup=args.warmup, repeats=args.repeats,
                             strategies=strategies, guidance_scale=args.guidance_scale, seed=args.seed)
    progress = None if args.quiet else (lambda line: print(f"msdda: bench: {line}", file=sys.stderr, flush=True))
    record = run_benchmark(engine, settings, progress=progress)
    print(format_table(record))
    if args.out is not None:
        atomic_write_json(Path(args.out), record)
        print(f"wrote {args.out}")
    return 0


COMMANDS = {"generate": cmd_generate, "sweep": cmd_sweep, "bench": cmd_bench, "export": cmd_export, "serve": serve.run, "batch": batch.run}


ERROR_PREFIX = "msdda: error: "
# Errors that mean "this input cannot be done" (exit 2); anything else is msdda's own failure (exit 1), but is
# still one line unless --verbose.
INPUT_ERRORS = (ValueError, OSError, MemoryError, RecursionError, OverflowError)


def error_line(exc: BaseException) -> str:
    """The one stderr line for an error: ``msdda: error: ...``, at most MAX_ERROR_CHARS characters
    (msdda.errors.one_line: an OS error names its path, out of memory says so)."""
    from msdda.errors import MAX_ERROR_CHARS, one_line

    return ERROR_PREFIX + one_line(exc, MAX_ERROR_CHARS - len(ERROR_PREFIX),
                                   oom_hint="lower --num-images or --batch-size")


def exit_status(exc: BaseException) -> int:
    from msdda.errors import is_out_of_memory

    return EXIT_BAD_INPUT if isinstance(exc, INPUT_ERRORS) or is_out_of_memory(exc) else 1


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (kill, a job scheduler) unwinds like Ctrl-C, so a run folder is cleaned up as on any error.
    Only the main thread may set handlers; elsewhere the default stays."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except CliError as exc:
        print(error_line(exc), file=sys.stderr)
        return EXIT_BAD_INPUT
    with library_output(verbose_requested(args)), _sigterm_interrupts():
        try:
            return COMMANDS[args.command](args)
        except KeyboardInterrupt:
            print("msdda: interrupted; run the same command again to continue", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 -- LoadError, CliError, RunFolderError, OOM, Ray's wrappers...
            if verbose_requested(args):
                import traceback

                traceback.print_exc()
            print(error_line(exc), file=sys.stderr)
            return exit_status(exc)


if __name__ == "__main__":
    sys.exit(main())
