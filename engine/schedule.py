"""Diffusion schedule: float64 tables on the host and per-step scalars (the step itself: msdda.kernels.gaussian_step).

Plain functions, no state (improved-diffusion style). Everything here follows diffusers 0.42.1's
``DDPMScheduler`` / ``DDIMScheduler`` exactly (same betas, same timestep spacing, same previous-timestep rule,
same variance conventions), but every scalar is computed once, in float64, and handed to the step as python
floats (:class:`~msdda.kernels.fused_step.StepScalars`), so the sampler does no per-step host math.

Notation (Ho et al. 2020; Nichol & Dhariwal 2021; Song et al. 2021):

    beta_t                         betas[t]
    alpha_t = 1 - beta_t           alphas[t]
    abar_t  = prod_{s<=t} alpha_s  alphas_cumprod[t]     (abar_{-1} := 1; DDIM: final_alpha_cumprod)
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    v   = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0

One step, for a network output ``out`` (the eps / v / x0 channels) at x_t, is (ARCHITECTURE.md section 2):

    x0   = px * x_t + po * out
    x0c  = clamp(x0, -clip, clip)                       (clip = inf when clipping is off)
    mean = mx * x_t + m0 * x0c + mo * out
    var  = FIXED:          exp(log_var_fixed)          (log_var_fixed = -inf: no noise)
           LEARNED_RANGE:  exp(frac*lv_max + (1-frac)*lv_min),  frac = (v + 1) / 2
           LEARNED:        v                            (diffusers' "learned": the channel is the variance)
    x_{t_prev} = mean + sqrt(var) * z,   z ~ N(0, I)

where v is the variance channel (channels C..2C of a 2C-channel output).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from msdda.kernels import StepScalars, VarMode, gaussian_step

__all__ = [
    "TrainSchedule",
    "SchedulerOptions",
    "BETA_SCHEDULES",
    "PREDICTION_TYPES",
    "VARIANCE_TYPES",
    "TIMESTEP_SPACINGS",
    "MAX_TRAIN_TIMESTEPS",
    "make_schedule",
    "schedule_from_diffusers_config",
    "inference_timesteps",
    "previous_timesteps",
    "step_scalars",
    "precompute_step_scalars",
    "gaussian_step",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
KINDS = ("ddpm", "ddim")
# Training schedules in use have 1000 (DDPM, Stable Diffusion) to 4000 (improved DDPM) steps. A config far above
# this is damaged or hostile: the tables would take gigabytes and minutes to build, so it is refused.
MAX_TRAIN_TIMESTEPS = 100_000


def _choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, allowed))}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Training schedule
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TrainSchedule:
    """The float64 training noise schedule (read-only numpy arrays, all of shape [T], T = num_train_timesteps).

    betas                          beta_t, bit-equal (after float32->float64 upcast) to diffusers' ``scheduler.betas``
    alphas                         alpha_t = 1 - beta_t
    alphas_cumprod                 abar_t = prod_{s<=t} alpha_s (accumulated in float64)
    alphas_cumprod_prev            abar_{t-1}, with abar_{-1} = 1
    sqrt_alphas_cumprod            sqrt(abar_t)
    sqrt_one_minus_alphas_cumprod  sqrt(1 - abar_t)

    Hashable and comparable by ``key`` (the arguments that produced it), never by the arrays, so it can key
    ``functools.lru_cache``.
    """

    betas: np.ndarray
    alphas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    num_train_timesteps: int
    key: tuple = field(repr=False)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrainSchedule):
            return NotImplemented
        return self is other or self.key == other.key

    def __repr__(self) -> str:
        key = self.key[:3] + ("<betas>",) if self.key[0] == "trained" else self.key
        return f"TrainSchedule(key={key})"


def _diffusers_betas(num_train_timesteps, beta_schedule, beta_start, beta_end, trained_betas) -> torch.Tensor:
    """The float32 betas exactly as diffusers' DDPM/DDIM constructors compute them."""
    n = num_train_timesteps
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    # squaredcos_cap_v2 (Nichol & Dhariwal's cosine schedule, betas capped at 0.999), computed in python floats
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor(
        [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=torch.float32
    )


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """diffusers' ``rescale_zero_terminal_snr`` (Lin et al. 2023, Algorithm 1), in its float32 arithmetic."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    s0 = alphas_bar_sqrt[0].clone()
    sT = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= sT
    alphas_bar_sqrt *= s0 / (s0 - sT)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


@functools.lru_cache(maxsize=64)
def _make_schedule_cached(key: tuple) -> TrainSchedule:
    kind, n, rescale = key[0], key[1], key[2]
    if kind == "trained":
        betas32 = _diffusers_betas(n, None, None, None, list(key[3]))
    else:
        betas32 = _diffusers_betas(n, kind, key[3], key[4], None)
    if rescale:
        betas32 = _rescale_zero_terminal_snr(betas32)
    betas = betas32.double().numpy().copy()
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    arrays = dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=np.sqrt(abar),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
    )
    for a in arrays.values():
        a.setflags(write=False)
    return TrainSchedule(**arrays, num_train_timesteps=n, key=key)


def make_schedule(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    *,
    trained_betas: Sequence[float] | None = None,
    rescale_betas_zero_snr: bool = False,
) -> TrainSchedule:
    """Build the float64 :class:`TrainSchedule` whose betas equal diffusers' DDPMScheduler/DDIMScheduler betas.

    ``beta_schedule``: "linear" (linspace(beta_start, beta_end, T)), "scaled_linear" (linspace of the square
    roots, squared; Stable Diffusion) or "squaredcos_cap_v2" (cosine, betas capped at 0.999; beta_start/end unused).
    The betas are produced by diffusers' own float32 arithmetic and upcast, so they are bit-equal to
    ``scheduler.betas``; alphas and the cumulative product abar_t are then accumulated in float64 (diffusers
    accumulates them in float32, a relative difference of ~1e-6 at t = T-1).
    ``trained_betas`` overrides the schedule; ``rescale_betas_zero_snr`` applies diffusers' zero-terminal-SNR
    rescaling (abar_{T-1} = 0). Cached: equal arguments return the same object.
    """
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, (int, np.integer)):
        raise ValueError(f"num_train_timesteps must be an int, got {num_train_timesteps!r}")
    n = int(num_train_timesteps)
    if n > MAX_TRAIN_TIMESTEPS:
        raise ValueError(f"num_train_timesteps must be <= {MAX_TRAIN_TIMESTEPS}, got {n}")
    if trained_betas is not None:
        try:
            tb = tuple(float(b) for b in np.asarray(trained_betas, dtype=np.float64).reshape(-1))
        except (TypeError, ValueError):
            raise ValueError("trained_betas must be a non-empty sequence of floats in (0, 1)") from None
        if len(tb) > MAX_TRAIN_TIMESTEPS:
            raise ValueError(f"trained_betas has {len(tb)} entries, more than {MAX_TRAIN_TIMESTEPS}")
        if len(tb) < 1 or not all(0.0 < b < 1.0 for b in tb):
            raise ValueError("trained_betas must be a non-empty sequence of floats in (0, 1)")
        return _make_schedule_cached(("trained", len(tb), bool(rescale_betas_zero_snr), tb))
    if n < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {n}")
    _choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    beta_start, beta_end = float(beta_start), float(beta_end)
    if beta_schedule == "squaredcos_cap_v2":
        beta_start = beta_end = 0.0  # unused: keep them out of the cache key
    elif not (0.0 < beta_start < 1.0 and 0.0 < beta_end < 1.0):
        raise ValueError(f"beta_start and beta_end must lie in (0, 1), got {beta_start!r}, {beta_end!r}")
    return _make_schedule_cached((beta_schedule, n, bool(rescale_betas_zero_snr), beta_start, beta_end))


# ----------------------------------------------------------------------------------------------------------------
# diffusers scheduler configs
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SchedulerOptions:
    """The sampling options of a diffusers scheduler config, validated (defaults = DDPM/DDIM constructor defaults).

    ``kind`` is "ddpm" / "ddim" when the config's ``_class_name`` names one of those schedulers, else None.
    """

    prediction_type: str = "epsilon"
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    num_train_timesteps: int = 1000
    kind: str | None = None

    def step_kwargs(self) -> dict:
        """Keyword arguments for :func:`step_scalars` / :func:`precompute_step_scalars`."""
        return dict(
            prediction_type=self.prediction_type,
            variance_type=self.variance_type,
            clip_sample=self.clip_sample,
            clip_sample_range=self.clip_sample_range,
            set_alpha_to_one=self.set_alpha_to_one,
        )


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"{name} must be a bool, got {value!r}")


def _as_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def schedule_from_diffusers_config(config: Mapping[str, Any]) -> tuple[TrainSchedule, SchedulerOptions]:
    """Read a diffusers scheduler config (``scheduler.config`` or a parsed ``scheduler_config.json``).

    Returns ``(schedule, options)``. Missing keys take DDPMScheduler/DDIMScheduler's constructor defaults
    (note: ``clip_sample`` defaults to True there). Keys that do not change DDPM/DDIM sampling (``_class_name``,
    ``skip_prk_steps``, ...) are ignored. ``thresholding=True`` (dynamic thresholding), unknown
    beta_schedule / prediction_type / variance_type / timestep_spacing values, and ill-typed values raise a
    one-line ValueError.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a mapping, got {type(config).__name__}")

    def get(k, default):
        v = config.get(k, default)
        return default if v is None else v

    if _as_bool("thresholding", get("thresholding", False)):
        raise ValueError("thresholding=True (dynamic thresholding) is not supported; use clip_sample instead")
    n = _as_int("num_train_timesteps", get("num_train_timesteps", 1000), 1)
    if n > MAX_TRAIN_TIMESTEPS:
        raise ValueError(f"num_train_timesteps must be <= {MAX_TRAIN_TIMESTEPS}, got {n}")
    trained_betas = config.get("trained_betas")
    if trained_betas is not None and (not isinstance(trained_betas, Sequence) or isinstance(trained_betas, str)):
        raise ValueError(f"trained_betas must be a list of numbers, got {type(trained_betas).__name__}")
    if trained_betas is not None and len(trained_betas) != n:
        raise ValueError(f"trained_betas has {len(trained_betas)} entries but num_train_timesteps is {n}")
    beta_schedule = _choice("beta_schedule", get("beta_schedule", "linear"), BETA_SCHEDULES)
    clip_range = _as_float("clip_sample_range", get("clip_sample_range", 1.0))
    if not clip_range > 0:
        raise ValueError(f"clip_sample_range must be > 0, got {clip_range!r}")
    class_name = config.get("_class_name")
    opts = SchedulerOptions(
        prediction_type=_choice("prediction_type", get("prediction_type", "epsilon"), PREDICTION_TYPES),
        variance_type=_choice("variance_type", get("variance_type", "fixed_small"), VARIANCE_TYPES),
        clip_sample=_as_bool("clip_sample", get("clip_sample", True)),
        clip_sample_range=clip_range,
        timestep_spacing=_choice("timestep_spacing", get("timestep_spacing", "leading"), TIMESTEP_SPACINGS),
        steps_offset=_as_int("steps_offset", get("steps_offset", 0), 0),
        set_alpha_to_one=_as_bool("set_alpha_to_one", get("set_alpha_to_one", True)),
        num_train_timesteps=n,
        kind={"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim"}.get(class_name),
    )
    sched = make_schedule(
        n,
        beta_schedule,
        _as_float("beta_start", get("beta_start", 1e-4)),
        _as_float("beta_end", get("beta_end", 0.02)),
        trained_betas=trained_betas,
        rescale_betas_zero_snr=_as_bool("rescale_betas_zero_snr", get("rescale_betas_zero_snr", False)),
    )
    return sched, opts


# ----------------------------------------------------------------------------------------------------------------
# Inference timesteps
# ----------------------------------------------------------------------------------------------------------------


def _resolve(schedule_or_config) -> tuple[int, SchedulerOptions | None]:
    """-> (num_train_timesteps, options or None)."""
    if isinstance(schedule_or_config, TrainSchedule):
        return schedule_or_config.num_train_timesteps, None
    if isinstance(schedule_or_config, SchedulerOptions):
        return schedule_or_config.num_train_timesteps, schedule_or_config
    if isinstance(schedule_or_config, tuple) and len(schedule_or_config) == 2 and isinstance(
        schedule_or_config[1], SchedulerOptions
    ):
        return schedule_or_config[0].num_train_timesteps, schedule_or_config[1]
    if isinstance(schedule_or_config, Mapping):
        sched, opts = schedule_from_diffusers_config(schedule_or_config)
        return sched.num_train_timesteps, opts
    if isinstance(schedule_or_config, (int, np.integer)) and not isinstance(schedule_or_config, bool):
        return _as_int("num_train_timesteps", schedule_or_config, 1), None
    raise ValueError(
        "expected a TrainSchedule, SchedulerOptions, (schedule, options), a diffusers config dict or an int, "
        f"got {type(schedule_or_config).__name__}"
    )


def inference_timesteps(
    schedule_or_config,
    num_inference_steps: int,
    spacing: str | None = None,
    steps_offset: int | None = None,
) -> list[int]:
    """The descending inference timesteps, exactly as diffusers' DDPM/DDIM ``set_timesteps`` compute them.

    ``schedule_or_config``: a TrainSchedule, an int T, or a diffusers config dict / SchedulerOptions /
    ``(schedule, options)``; ``spacing`` and ``steps_offset`` default to the config's ``timestep_spacing`` and
    ``steps_offset`` when one is given, else "leading" and 0.

        leading:  arange(k) * (T // k) reversed, + steps_offset
        trailing: round(arange(T, 0, -T/k)) - 1          (steps_offset ignored, as in diffusers; the float
                                                         arange can yield k+1 entries for some k, also as there)
        linspace: round(linspace(0, T-1, k)) reversed     (steps_offset ignored)

    Returns a list of python ints of length ~k. Raises ValueError when k > T or a timestep falls outside
    [0, T) (e.g. leading with k = T and steps_offset = 1, where diffusers would fail at step time).
    """
    T, opts = _resolve(schedule_or_config)
    if spacing is None:
        spacing = opts.timestep_spacing if opts is not None else "leading"
    if steps_offset is None:
        steps_offset = opts.steps_offset if opts is not None else 0
    _choice("timestep spacing", spacing, TIMESTEP_SPACINGS)
    k = _as_int("num_inference_steps", num_inference_steps, 1)
    steps_offset = _as_int("steps_offset", steps_offset, 0)
    if k > T:
        raise ValueError(f"num_inference_steps={k} cannot be larger than num_train_timesteps={T}")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, k).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        step_ratio = T // k
        ts = (np.arange(0, k) * step_ratio).round()[::-1].copy().astype(np.int64)
        ts += steps_offset
    else:
        step_ratio = T / k
        ts = np.round(np.arange(T, 0, -step_ratio)).astype(np.int64)
        ts -= 1
    out = [int(t) for t in ts]
    if out[0] >= T or out[-1] < 0:
        raise ValueError(
            f"timesteps {out[0]}..{out[-1]} fall outside [0, {T}) (spacing={spacing}, steps_offset={steps_offset})"
        )
    return out


def previous_timesteps(
    schedule_or_config,
    timesteps: Sequence[int],
    *,
    kind: str,
    num_inference_steps: int | None = None,
) -> list[int]:
    """t_prev for each t in ``timesteps``, as diffusers' step computes it; -1 means "before the chain".

    kind="ddpm": the next entry of ``timesteps`` (``DDPMScheduler.previous_timestep`` after ``set_timesteps``,
    including custom timestep lists), -1 after the last.
    kind="ddim": t - T // num_inference_steps (default ``len(timesteps)``), whatever the spacing, so with
    "linspace"/"trailing" spacing t_prev need not be the next listed timestep (diffusers' behaviour); negative
    values are reported as -1 (diffusers then uses final_alpha_cumprod).
    """
    T, _ = _resolve(schedule_or_config)
    _choice("kind", kind, KINDS)
    ts = [int(t) for t in timesteps]
    if not ts:
        raise ValueError("timesteps is empty")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError("timesteps must be strictly descending")
    if ts[0] >= T or ts[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {T}), got {ts[0]}..{ts[-1]}")
    if kind == "ddpm":
        return ts[1:] + [-1]
    k = _as_int("num_inference_steps", len(ts) if num_inference_steps is None else num_inference_steps, 1)
    ratio = T // k
    return [max(t - ratio, -1) for t in ts]


# ----------------------------------------------------------------------------------------------------------------
# Step scalars
# ----------------------------------------------------------------------------------------------------------------


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def step_scalars(
    sched: TrainSchedule,
    t: int,
    t_prev: int,
    *,
    kind: str = "ddpm",
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    set_alpha_to_one: bool = True,
    use_clipped_model_output: bool = False,
) -> StepScalars:
    """Scalars of the step x_t -> x_{t_prev} (see the module docstring), computed in float64 from ``sched``.

    abar_t = alphas_cumprod[t]; abar_prev = alphas_cumprod[t_prev] for t_prev >= 0, else 1 (DDPM) or
    final_alpha_cumprod (DDIM: 1 if ``set_alpha_to_one`` else alphas_cumprod[0]).

    x0 from the output (px, po):  epsilon: (x_t - sqrt(1-abar_t) eps) / sqrt(abar_t) ; sample: out ;
                                  v_prediction: sqrt(abar_t) x_t - sqrt(1-abar_t) v.
    clip = clip_sample_range if clip_sample else inf.

    kind="ddpm" (DDPMScheduler.step): beta_t = 1 - abar_t/abar_prev,
        mean = sqrt(abar_prev) beta_t/(1-abar_t) * x0c + sqrt(1-beta_t) (1-abar_prev)/(1-abar_t) * x_t
        sigma2 = max((1-abar_prev)/(1-abar_t) beta_t, 1e-20)
        variance_type fixed_small / fixed_small_log -> var = sigma2 ; fixed_large / fixed_large_log -> var = beta_t
        (diffusers' fixed_large_log step is NaN: it takes sqrt of log(beta_t); the intended beta_t is used here) ;
        learned -> var = v ; learned_range -> lv_min = log(sigma2), lv_max = log(beta_t).
        No noise at t == 0 (var_mode FIXED, log_var_fixed = -inf) — diffusers tests t > 0, not t_prev >= 0.
    kind="ddim" (DDIMScheduler.step): sigma2 = eta^2 (1-abar_prev)/(1-abar_t) (1-abar_t/abar_prev),
        eps_hat = the eps implied by the *unclipped* output, or with ``use_clipped_model_output`` (GLIDE)
                  (x_t - sqrt(abar_t) x0c)/sqrt(1-abar_t)  [diffusers' default is False, as here]
        mean = sqrt(abar_prev) x0c + sqrt(1 - abar_prev - sigma2) eps_hat ; var = sigma2 (FIXED; -inf if 0).
        ``variance_type`` is validated but unused (a learned variance channel is ignored by DDIM).

    Returns python floats; ValueError on bad arguments or a non-finite coefficient (e.g. epsilon prediction
    at zero terminal SNR, or eta so large that 1 - abar_prev - sigma2 < 0).
    """
    _choice("kind", kind, KINDS)
    _choice("prediction_type", prediction_type, PREDICTION_TYPES)
    _choice("variance_type", variance_type, VARIANCE_TYPES)
    T = sched.num_train_timesteps
    t, t_prev = int(t), int(t_prev)
    if not 0 <= t < T:
        raise ValueError(f"timestep {t} outside [0, {T})")
    if t_prev >= t:
        raise ValueError(f"t_prev={t_prev} must be < t={t}")
    clip_sample_range = float(clip_sample_range)
    if clip_sample and not clip_sample_range > 0:
        raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range!r}")
    eta = float(eta)
    if kind == "ddim" and not (eta >= 0 and math.isfinite(eta)):
        raise ValueError(f"eta must be finite and >= 0, got {eta!r}")

    ac = sched.alphas_cumprod
    abar_t = float(ac[t])
    if t_prev >= 0:
        abar_prev = float(ac[t_prev])
    elif kind == "ddim" and not set_alpha_to_one:
        abar_prev = float(ac[0])
    else:
        abar_prev = 1.0
    bp_t = 1.0 - abar_t  # beta_prod_t
    bp_prev = 1.0 - abar_prev
    sa_t, sb_t, sa_prev = math.sqrt(abar_t), math.sqrt(bp_t), math.sqrt(abar_prev)

    if prediction_type == "epsilon":
        px, po = (1.0 / sa_t, -sb_t / sa_t) if sa_t > 0 else (math.inf, -math.inf)  # inf: zero terminal SNR
    elif prediction_type == "sample":
        px, po = 0.0, 1.0
    else:
        px, po = sa_t, -sb_t
    clip = clip_sample_range if clip_sample else math.inf

    var_mode, log_var_fixed, lv_min, lv_max = VarMode.FIXED, -math.inf, 0.0, 0.0
    if kind == "ddpm":
        alpha_t = abar_t / abar_prev
        beta_t = 1.0 - alpha_t
        m0 = sa_prev * beta_t / bp_t
        mx = math.sqrt(alpha_t) * bp_prev / bp_t
        mo = 0.0
        if t > 0:
            sigma2 = max(bp_prev / bp_t * beta_t, 1e-20)
            if variance_type in ("fixed_small", "fixed_small_log"):
                log_var_fixed = _log(sigma2)
            elif variance_type in ("fixed_large", "fixed_large_log"):
                log_var_fixed = _log(beta_t)
            elif variance_type == "learned":
                var_mode, log_var_fixed = VarMode.LEARNED, 0.0
            else:
                var_mode, log_var_fixed = VarMode.LEARNED_RANGE, 0.0
                lv_min, lv_max = math.log(sigma2), _log(beta_t)
    else:
        sigma2 = eta * eta * (bp_prev / bp_t) * (1.0 - abar_t / abar_prev)
        d2 = bp_prev - sigma2
        if d2 < 0:
            if d2 < -1e-12:
                raise ValueError(f"eta={eta} too large at t={t}: 1 - abar_prev - sigma^2 = {d2:.3g} < 0")
            d2 = 0.0
        d = math.sqrt(d2)  # coefficient of eps_hat ("direction pointing to x_t")
        if use_clipped_model_output:
            ex, e0, eo = 1.0 / sb_t, -sa_t / sb_t, 0.0
        elif prediction_type == "epsilon":
            ex, e0, eo = 0.0, 0.0, 1.0
        elif prediction_type == "sample":
            ex, e0, eo = 1.0 / sb_t, 0.0, -sa_t / sb_t
        else:
            ex, e0, eo = sb_t, 0.0, sa_t
        mx, m0, mo = d * ex, sa_prev + d * e0, d * eo
        if eta > 0:
            log_var_fixed = _log(sigma2)

    vals = dict(px=px, po=po, mx=mx, m0=m0, mo=mo, lv_min=lv_min, lv_max=lv_max)
    bad = [k for k, v in vals.items() if not math.isfinite(v)]
    if bad or math.isnan(log_var_fixed) or log_var_fixed == math.inf:
        raise ValueError(
            f"non-finite step scalars {bad or ['log_var_fixed']} at t={t}, t_prev={t_prev} "
            f"({prediction_type}, abar_t={abar_t:.3g}, abar_prev={abar_prev:.3g})"
        )
    return StepScalars(
        px=float(px),
        po=float(po),
        mx=float(mx),
        m0=float(m0),
        mo=float(mo),
        clip=float(clip),
        var_mode=var_mode,
        log_var_fixed=float(log_var_fixed),
        lv_min=float(lv_min),
        lv_max=float(lv_max),
    )


@functools.lru_cache(maxsize=256)
def _precompute_cached(sched, timesteps, prev, kwargs) -> tuple[StepScalars, ...]:
    kw = dict(kwargs)
    return tuple(step_scalars(sched, t, tp, **kw) for t, tp in zip(timesteps, prev))


def precompute_step_scalars(
    sched: TrainSchedule,
    timesteps: Sequence[int],
    prev_timesteps: Sequence[int] | None = None,
    *,
    kind: str = "ddpm",
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    set_alpha_to_one: bool = True,
    use_clipped_model_output: bool = False,
    num_inference_steps: int | None = None,
) -> tuple[StepScalars, ...]:
    """:func:`step_scalars` for every step of a schedule, once: ``result[i]`` is the step at ``timesteps[i]``.

    ``prev_timesteps`` defaults to :func:`previous_timesteps` (kind, num_inference_steps). Cached with
    ``functools.lru_cache`` on (schedule key, timesteps, prev, options): repeated calls with equal arguments
    return the same tuple object.
    """
    ts = tuple(int(t) for t in timesteps)
    prev = (
        tuple(previous_timesteps(sched, ts, kind=kind, num_inference_steps=num_inference_steps))
        if prev_timesteps is None
        else tuple(int(t) for t in prev_timesteps)
    )
    if len(prev) != len(ts):
        raise ValueError(f"got {len(ts)} timesteps but {len(prev)} previous timesteps")
    kwargs = (
        ("kind", kind),
        ("eta", float(eta)),
        ("prediction_type", prediction_type),
        ("variance_type", variance_type),
        ("clip_sample", bool(clip_sample)),
        ("clip_sample_range", float(clip_sample_range)),
        ("set_alpha_to_one", bool(set_alpha_to_one)),
        ("use_clipped_model_output", bool(use_clipped_model_output)),
    )
    return _precompute_cached(sched, ts, prev, kwargs)


# ----------------------------------------------------------------------------------------------------------------
# One sampling run's step table (the step's Gaussian itself is msdda.kernels.gaussian_step, re-exported here)
# ----------------------------------------------------------------------------------------------------------------


def step_plan(params: tuple[TrainSchedule, SchedulerOptions], num_inference_steps: int, *, kind: str,
              eta: float = 0.0) -> tuple[tuple[int, ...], tuple[StepScalars, ...]]:
    """(timesteps, StepScalars per step) for one sampling run, computed once on the host and cached.

    ``params`` is what :func:`schedule_from_diffusers_config` returns; ``kind`` "ddpm" or "ddim" (DDPM ignores
    ``eta``). The spacing, offset and step options come from the scheduler config, as diffusers would use them.
    """
    sched, opts = params
    ts = tuple(inference_timesteps(params, num_inference_steps))
    scalars = precompute_step_scalars(sched, ts, kind=kind, eta=float(eta) if kind == "ddim" else 0.0,
                                      num_inference_steps=num_inference_steps, **opts.step_kwargs())
    return ts, scalars
