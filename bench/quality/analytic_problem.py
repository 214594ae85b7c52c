"""A diffusion problem whose step-level optimum is known exactly (issue 17, the known-optimum benchmark).

- Data: a Gaussian mixture on 1x4x4 "images" (16 dimensions), so the posterior mean E[x0 | x_t] is analytic and
  the ideal base DDPM step p_base(x_{t-1} | x_t) = N(c0 E[x0 | x_t] + ct x_t, posterior variance) is known at
  every state, under the project's own schedule (``msdda.schedule``: linear betas, 1000 training steps, DDPM
  with diffusers' "learned" variance type, respaced to the run's steps).
- Rewards: r_k(x) = -a_k ||x - g_k||^2 on x_{t-1}, with curvatures a_k. Tilting the base step by exp(r_k / beta)
  gives a Gaussian again (/work/shared notes, "Quadratic rewards"): precision 1/s2 + 2 a_k / beta, mean
  s2' (mu / s2 + 2 a_k g_k / beta). Expert k is exactly that tilted step (pi_k), and the multi-objective
  optimum for weights w (sum w = 1) is the base tilted by sum_k w_k r_k, computed here directly
  (:func:`optimum_step`), never as a product of the experts.
- Networks: :class:`TiltedMixtureNet` is a torch module with a UNet's calling convention (x, timestep,
  class_labels, return_dict) and two output channels: the eps that makes the engine's DDPM mean equal the tilted
  mean, and the variance itself (diffusers' "learned"). :func:`make_engine` wraps them in an ordinary
  ``msdda.Engine(BaseModel(...), {name: module})``, so every method runs through the code users run.
  The base is class-conditional with one class (label 0; label 1 is the null class) only so that the shipped
  CoDe and RGG samplers, which pass class labels, run unchanged; the networks ignore the label.

All arithmetic here is float64 whatever the Engine's dtype (a network's output is then rounded to that dtype).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from msdda import Engine
from msdda.loading import BaseModel
from bench.zoo.gaussians import gaussian_kl
from msdda.schedule import inference_timesteps, previous_timesteps, schedule_from_diffusers_config

__all__ = ["SCHEDULER_CONFIG", "SAMPLE_SHAPE", "GaussianMixture", "QuadraticRewards", "Problem", "StepGaussian",
           "make_problem", "step_timesteps", "base_step", "tilted_step", "optimum_step", "TiltedMixtureNet",
           "make_engine", "expected_rewards", "gaussian_kl_sum"]

SAMPLE_SHAPE = (1, 4, 4)
SCHEDULER_CONFIG = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
                    "beta_start": 1e-4, "beta_end": 0.02, "variance_type": "learned", "clip_sample": False,
                    "prediction_type": "epsilon"}


@dataclass(frozen=True)
class GaussianMixture:
    """sum_j pi_j N(means_j, stds_j^2 I): means [J, *SAMPLE_SHAPE], stds [J], weights [J] (float64)."""
    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor

    def posterior_mean(self, x: torch.Tensor, abar: float) -> torch.Tensor:
        """E[x0 | x_t = x] for x_t = sqrt(abar) x0 + sqrt(1 - abar) e: x [B, *S] float64 -> [B, *S].

        Per component j, x_t ~ N(sqrt(abar) m_j, v_j I) with v_j = abar s_j^2 + 1 - abar, and
        E[x0 | x_t, j] = m_j + sqrt(abar) s_j^2 / v_j (x_t - sqrt(abar) m_j); the responsibilities weigh them."""
        sa = math.sqrt(abar)
        d = x[0].numel()
        v = abar * self.stds ** 2 + (1.0 - abar)                                   # [J]
        diff = x.unsqueeze(1) - sa * self.means.unsqueeze(0)                        # [B, J, *S]
        sq = diff.flatten(2).pow(2).sum(-1)                                         # [B, J]
        logits = torch.log(self.weights) - 0.5 * sq / v - 0.5 * d * torch.log(v)
        resp = torch.softmax(logits, dim=1)                                         # [B, J]
        gain = (sa * self.stds ** 2 / v).view(1, -1, *[1] * (x.dim() - 1))
        post = self.means.unsqueeze(0) + gain * diff                                # [B, J, *S]
        return (resp.view(*resp.shape, *[1] * (x.dim() - 1)) * post).sum(1)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        j = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, *self.means.shape[1:]), generator=generator, dtype=torch.float64)
        return self.means[j] + self.stds[j].view(-1, *[1] * (z.dim() - 1)) * z


@dataclass(frozen=True)
class QuadraticRewards:
    """r_k(x) = -a_k ||x - g_k||^2 (sum over the sample's elements): curvatures [K], goals [K, *S], float64."""
    names: tuple[str, ...]
    curvatures: torch.Tensor
    goals: torch.Tensor

    def reward_fns(self) -> dict:
        """{name: fn(x [B, *S], labels) -> [B]}: the form bench/quality/samplers.py (CoDe, RGG) takes."""
        def one(k):
            def fn(x, labels=None):
                g = self.goals[k].to(x.device, x.dtype)
                return -float(self.curvatures[k]) * (x - g).flatten(1).pow(2).sum(-1)
            return fn
        return {name: one(k) for k, name in enumerate(self.names)}


@dataclass(frozen=True)
class Problem:
    mixture: GaussianMixture
    rewards: QuadraticRewards
    beta: float
    alphas_cumprod: torch.Tensor = field(repr=False)      # float64 [T], the project's schedule

    def abar(self, t: int) -> float:
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])


def make_problem(curvatures: Sequence[float], *, beta: float = 1.0, seed: int = 0,
                 names: Sequence[str] | None = None) -> Problem:
    """The mixture (three components, seeded) and K quadratic rewards with these curvatures. The mixture and
    the goals depend only on ``seed`` (goal k is the k-th of a fixed seeded list), so settings that differ only
    in curvatures share data and goals."""
    gen = torch.Generator().manual_seed(1000 + seed)
    means = (torch.rand((3, *SAMPLE_SHAPE), generator=gen, dtype=torch.float64) * 1.6 - 0.8)
    mixture = GaussianMixture(means=means, stds=torch.tensor([0.15, 0.25, 0.35], dtype=torch.float64),
                              weights=torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    goal_pool = torch.rand((8, *SAMPLE_SHAPE), generator=gen, dtype=torch.float64) * 1.4 - 0.7
    k = len(curvatures)
    names = tuple(names) if names is not None else tuple(f"r{i + 1}" for i in range(k))
    rewards = QuadraticRewards(names=names, curvatures=torch.tensor([float(a) for a in curvatures],
                                                                     dtype=torch.float64), goals=goal_pool[:k])
    sched, _ = schedule_from_diffusers_config(SCHEDULER_CONFIG)
    return Problem(mixture=mixture, rewards=rewards, beta=float(beta),
                   alphas_cumprod=torch.tensor(sched.alphas_cumprod.copy(), dtype=torch.float64))


def step_timesteps(steps: int) -> tuple[list[int], list[int]]:
    """(t, t_prev) of each step of a ``steps``-step DDPM run, as msdda.schedule (and diffusers) space them."""
    params = schedule_from_diffusers_config(SCHEDULER_CONFIG)
    ts = inference_timesteps(params, steps)
    return ts, previous_timesteps(params, ts, kind="ddpm", num_inference_steps=steps)


@dataclass(frozen=True)
class StepGaussian:
    """One step's transition N(mean, var I per element): mean [B, *S]; var [B, *S] (0 on the last step)."""
    mean: torch.Tensor
    var: torch.Tensor


def base_step(problem: Problem, x: torch.Tensor, t: int, t_prev: int) -> StepGaussian:
    """The ideal base DDPM step from x_t (float64): mean c0 E[x0|x_t] + ct x_t with c0 = sqrt(abar_prev)
    beta_t / (1 - abar_t), ct = sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t), beta_t = 1 - abar_t / abar_prev
    (respaced), and the posterior variance (1 - abar_prev) / (1 - abar_t) beta_t; 0 on the last step."""
    abar, abar_prev = problem.abar(t), problem.abar(t_prev)
    beta_t = 1.0 - abar / abar_prev
    c0 = math.sqrt(abar_prev) * beta_t / (1.0 - abar)
    ct = math.sqrt(1.0 - beta_t) * (1.0 - abar_prev) / (1.0 - abar)
    x0 = problem.mixture.posterior_mean(x, abar)
    var = (1.0 - abar_prev) / (1.0 - abar) * beta_t if t_prev >= 0 else 0.0
    return StepGaussian(mean=c0 * x0 + ct * x, var=torch.full_like(x, var))


def tilted_step(problem: Problem, base: StepGaussian, curvature: torch.Tensor, pull: torch.Tensor) -> StepGaussian:
    """base tilted by exp(r / beta), r(x) = -curvature ||x||^2 + 2 <pull, x> + const (so r = -a ||x - g||^2 has
    curvature a and pull a g): precision 1/s2 + 2 curvature / beta, mean (mu / s2 + 2 pull / beta) / precision.
    A zero-variance step (the last) is a point mass, which any tilt leaves where it is."""
    if bool((base.var == 0).all()):
        return base
    precision = 1.0 / base.var + 2.0 * curvature / problem.beta
    var = 1.0 / precision
    return StepGaussian(mean=var * (base.mean / base.var + 2.0 * pull / problem.beta), var=var)


def optimum_step(problem: Problem, x: torch.Tensor, t: int, t_prev: int, weights: Sequence[float], *,
                 base: StepGaussian | None = None) -> StepGaussian:
    """The exact step-level optimum for weights w: the base step tilted by sum_k w_k r_k (curvature sum w_k a_k,
    pull sum w_k a_k g_k). Computed directly, not as a product of the experts' Gaussians. ``base``: the base
    step at x, when the caller has it already."""
    w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    a, g = problem.rewards.curvatures, problem.rewards.goals
    curvature = (w * a).sum()
    pull = (w * a).view(-1, *[1] * g[0].dim()).mul(g).sum(0)
    return tilted_step(problem, base if base is not None else base_step(problem, x, t, t_prev), curvature, pull)


def expected_rewards(problem: Problem, step: StepGaussian) -> torch.Tensor:
    """E_{x ~ N(mean, var)}[r_k(x)] = -a_k (||mean - g_k||^2 + sum var) -> [B, K]."""
    a, g = problem.rewards.curvatures, problem.rewards.goals
    sq = (step.mean.unsqueeze(1) - g.unsqueeze(0)).flatten(2).pow(2).sum(-1)     # [B, K]
    return -a * (sq + step.var.flatten(1).sum(-1, keepdim=True))


def gaussian_kl_sum(p: StepGaussian, q: StepGaussian) -> torch.Tensor:
    """KL(p || q) summed over a sample's elements -> [B] (diagonal Gaussians, var > 0)."""
    return gaussian_kl(p.mean, p.var, q.mean, q.var).flatten(1).sum(-1)


class TiltedMixtureNet(torch.nn.Module):
    """The exact single-objective step-level optimum pi_k as a network: the mixture's base step tilted by
    exp(-a ||x - g||^2 / beta) (a = 0: the base itself), output [N, 2, 4, 4]: channel 0 the eps whose DDPM mean
    is the tilted mean, channel 1 the tilted variance (diffusers' "learned" variance type reads it as is).

    The step each timestep belongs to (its t_prev) comes from the run's step count, as the tilt depends on the
    respaced step. The reward's curvature and goal are parameters (never trained), so the torch backend's
    device/dtype handling applies as to any UNet."""

    def __init__(self, problem: Problem, steps: int, curvature: float = 0.0, goal: torch.Tensor | None = None):
        super().__init__()
        self.problem = problem
        ts, prev = step_timesteps(steps)
        self.t_prev = dict(zip(ts, prev))
        self.curvature = torch.nn.Parameter(torch.tensor(float(curvature), dtype=torch.float64),
                                            requires_grad=False)
        goal = torch.zeros(SAMPLE_SHAPE, dtype=torch.float64) if goal is None else goal.double()
        self.goal = torch.nn.Parameter(goal.clone(), requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.curvature.dtype

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels=None, return_dict: bool = False):
        t = int(round(float(timestep.reshape(-1)[0])))
        t_prev = self.t_prev[t]
        x64 = x.double()
        a = self.curvature.double()
        base = base_step(self.problem, x64, t, t_prev)
        step = tilted_step(self.problem, base, a, a * self.goal.double())
        # eps with c0 x0(eps) + ct x_t = mean, x0(eps) = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
        abar, abar_prev = self.problem.abar(t), self.problem.abar(t_prev)
        beta_t = 1.0 - abar / abar_prev
        c0 = math.sqrt(abar_prev) * beta_t / (1.0 - abar)
        ct = math.sqrt(1.0 - beta_t) * (1.0 - abar_prev) / (1.0 - abar)
        x0 = (step.mean - ct * x64) / c0
        eps = (x64 - math.sqrt(abar) * x0) / math.sqrt(1.0 - abar)
        out = torch.cat([eps, step.var], dim=1).to(x.dtype)
        return (out,)


def make_engine(problem: Problem, steps: int, *, dtype: torch.dtype = torch.float64,
                curvatures: Sequence[float] | None = None) -> Engine:
    """msdda.Engine over the base (a = 0) and one expert per reward (its own curvature and goal), in ``dtype``.
    ``curvatures`` overrides the experts' (a test's deliberately wrong expert); default the rewards'."""
    a = problem.rewards.curvatures.tolist() if curvatures is None else list(curvatures)
    base = TiltedMixtureNet(problem, steps)
    experts = {name: TiltedMixtureNet(problem, steps, a[k], problem.rewards.goals[k])
               for k, name in enumerate(problem.rewards.names)}
    config = {"_class_name": "TiltedMixtureNet", "in_channels": SAMPLE_SHAPE[0], "out_channels": 2 * SAMPLE_SHAPE[0],
              "sample_size": SAMPLE_SHAPE[1], "num_class_embeds": 2}
    model = BaseModel(path=Path("known-optimum"), unet=base, unet_config=config, scheduler_config=SCHEDULER_CONFIG)
    return Engine(model, experts, dtype=dtype)
