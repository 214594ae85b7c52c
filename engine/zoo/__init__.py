"""msdda's embedded default model zoo: a small class-conditional digits diffusion model and its aligned experts.

The runtime part only: the shipped weights, where they are, the zoo's constants, and its rewards
(``msdda.zoo.rewards``, torch-only, used by ``msdda sweep``). Everything here was trained from scratch on
scikit-learn's digits (16x16, 1 channel) by the recipes in the repository's bench/zoo/
(``python bench/train_zoo.py all``; see models/README.md for the recipe, the measured durations and metrics).

Layout (``ZOO_DIR`` = this package's ``models/`` folder)::

    models/classifier.safetensors       the reward classifier (legible)
    models/base/{unet,scheduler}/       base UNet2DModel (eps + learned-range variance) + DDPMScheduler config
    models/<objective>/unet/            one KL-regularised RL expert per objective in OBJECTIVES
    models/morl_<a>_<b>_w<w>/unet/      MORL oracles fine-tuned on w*r_a/s_a + (1-w)*r_b/s_b

Load a member with ``UNet2DModel.from_pretrained(zoo_paths()[name], subfolder="unet")``; all members share the
base's scheduler (``scheduler_path()``).
"""
from __future__ import annotations

from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent / "models"

#: the single-objective experts, in a fixed order
OBJECTIVES: tuple[str, ...] = ("legible", "bold", "compressible")
#: the objective pair the MORL oracles interpolate, and their weights w (reward = w*r_a + (1-w)*r_b, normalised)
ORACLE_PAIR: tuple[str, str] = ("legible", "bold")
ORACLE_WEIGHTS: tuple[float, ...] = (0.2, 0.5, 0.8)
#: zoo sampling defaults: 50 DDPM steps (diffusers "leading" spacing), classifier-free guidance scale
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 2.0
#: KL strength shared by every expert and oracle (the training recipe: bench/zoo/rl.py)
KL_BETA = 0.1
NULL_CLASS = 10
NUM_CLASSES = 10


def oracle_name(w: float, pair: tuple[str, str] = ORACLE_PAIR) -> str:
    return f"morl_{pair[0]}_{pair[1]}_w{w:.1f}"


ORACLES: tuple[str, ...] = tuple(oracle_name(w) for w in ORACLE_WEIGHTS)


#: zoo flavours: "default" (the RL experts above) and "step" (step-level experts with a learned variance, trained by
#: bench/zoo/step.py; they live in models/step/ and share the default base, scheduler and classifier; no oracles)
FLAVOURS: tuple[str, ...] = ("default", "step")


def flavour_dir(flavour: str = "default", root: str | Path | None = None) -> Path:
    """The folder holding a flavour's experts."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown zoo flavour {flavour!r}; expected one of {', '.join(FLAVOURS)}")
    root = Path(root) if root is not None else ZOO_DIR
    return root if flavour == "default" else root / flavour


def zoo_paths(root: str | Path | None = None, flavour: str = "default") -> dict[str, Path]:
    """{"base": ..., "legible": ..., "bold": ..., "compressible": ..., "morl_...": ...} -> model folders
    (each holds a diffusers ``unet/`` subfolder; ``base`` also holds ``scheduler/``). The "step" flavour has the
    same base and its own experts, and no MORL oracles."""
    experts = flavour_dir(flavour, root)
    root = Path(root) if root is not None else ZOO_DIR
    if flavour == "step":
        return {"base": root / "base", **{n: experts / n for n in OBJECTIVES}}
    return {n: root / n for n in ("base",) + OBJECTIVES + ORACLES}


def scheduler_path(root: str | Path | None = None) -> Path:
    """The diffusers DDPMScheduler config folder shared by every zoo member."""
    return (Path(root) if root is not None else ZOO_DIR) / "base" / "scheduler"


def classifier_path(root: str | Path | None = None) -> Path:
    return (Path(root) if root is not None else ZOO_DIR) / "classifier.safetensors"


__all__ = ["ZOO_DIR", "OBJECTIVES", "ORACLE_PAIR", "ORACLE_WEIGHTS", "ORACLES", "DEFAULT_STEPS",
           "DEFAULT_GUIDANCE_SCALE", "KL_BETA", "NULL_CLASS", "NUM_CLASSES", "FLAVOURS", "oracle_name", "flavour_dir",
           "zoo_paths",
           "scheduler_path", "classifier_path"]
