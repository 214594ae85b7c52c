"""CoDe and reward-gradient guidance: base-model samplers built from the Engine's public seam.

Both are plain functions in the k-diffusion manner: ``Engine.denoiser`` is the network, ``msdda.sampling.sample``
is the loop, ``msdda.kernels`` does the step (``fused_expert_step``, the same path as ``Engine.generate``) and
the Gaussian (``gaussian_step``: CFG, x0, mean and variance). What each adds is small: CoDe runs the loop per
block of steps for N candidates and keeps the best; RGG wraps the denoiser so that it also takes the reward's
gradient, and adds the gradient step to the base step.

Both draw the same noise as ``Engine.generate(strategy="base")``: x_T with Philox offset 0 of each sample's
seed, step i with offset 1 + i.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import torch

from msdda.kernels import fused_expert_step, gaussian_step, philox_normal
from msdda.sampling import Denoise, sample

from .scoring import weighted_reward

__all__ = ["SEED_STRIDE", "candidate_seeds", "code_sample", "rgg_sample"]

SEED_STRIDE = 2**40          # candidate n of sample b draws its noise with seed_b + n * SEED_STRIDE


def candidate_seeds(seeds: Sequence[int], n: int) -> torch.Tensor:
    """int64 [n * B], candidate-major: candidate 0 of sample b uses seed_b (the base model's own noise),
    candidate j > 0 uses seed_b + j * 2**40 (seeds must be < 2**40)."""
    s = torch.as_tensor(list(seeds), dtype=torch.int64)
    if bool((s < 0).any()) or bool((s >= SEED_STRIDE).any()):
        raise ValueError("CoDe seeds must lie in [0, 2**40)")
    if n * SEED_STRIDE >= 2**63:
        raise ValueError(f"too many candidates ({n})")
    return torch.cat([s + j * SEED_STRIDE for j in range(n)])


def _tile(t: torch.Tensor, n: int, dim: int = 0) -> torch.Tensor:
    """Repeat along ``dim`` n times, candidate-major (row n*B + b is row b)."""
    return torch.cat([t] * n, dim=dim) if n > 1 else t


def _base_denoiser(engine, class_labels: Sequence[int], cfg: bool) -> Denoise:
    """The base model alone (strategy "base") on these class labels: (x [B, ...], t) -> raw [1, (2,) B, ...]."""
    cond = engine.conditioning(len(class_labels), cfg=cfg, class_labels=list(class_labels))
    return engine.denoiser(engine.plan("base"), cond, cfg)


def _initial_latents(engine, seeds: torch.Tensor) -> torch.Tensor:
    return philox_normal(seeds, 0, engine.sample_shape).to(engine.device, engine.dtype)


def _reuse_first(first: torch.Tensor, denoise: Denoise) -> Denoise:
    """A denoiser that answers its first call with ``first`` (an output computed already) and calls
    ``denoise`` after that."""
    pending = [first]

    def call(x: torch.Tensor, t: int) -> torch.Tensor:
        return pending.pop() if pending else denoise(x, t)

    return call


def code_sample(engine, class_labels: Sequence[int], seeds: Sequence[int], weights: Mapping[str, float],
                reward_fns: Mapping[str, Callable], *, steps: int, guidance_scale: float, n_candidates: int = 8,
                block: int = 5, reward_scales: Mapping[str, float] | None = None, eta: float = 1.0) -> torch.Tensor:
    """CoDe-style blockwise best-of-N sampling from the base model -> x_0 [B, C, H, W].

    From the current x (shared by all candidates), each block runs ``block`` ancestral steps of the base model
    for N candidates with independent noise (candidate seeds :func:`candidate_seeds`, Philox offset 1 + step as
    in the engine), then each sample keeps the candidate whose x0 estimate at the block's end (x_0 itself after
    the last block) scores best on ``sum_k w_k r_k / s_k`` (ties: the lowest candidate). The base output that
    gave the kept candidate's estimate is reused as the next block's first step, where all candidates share x.
    N = 1 is exactly the base model's sampler.
    """
    B, N = len(seeds), int(n_candidates)
    if N < 1 or block < 1:
        raise ValueError("n_candidates and block must be >= 1")
    labels = [int(c) for c in class_labels]
    dev = engine.device
    cfg = engine.uses_guidance(guidance_scale)
    g = float(guidance_scale) if cfg else None
    timesteps, scalars = engine.step_tables(steps, eta)
    denoise_one = _base_denoiser(engine, labels, cfg)                  # the B samples
    denoise_all = _base_denoiser(engine, labels * N, cfg)              # their N * B candidates
    cand = candidate_seeds(seeds, N).to(dev)
    one = torch.ones(N * B, 1, dtype=torch.float32, device=dev)
    labels_n = torch.tensor(labels * N, dtype=torch.int64, device=dev)
    batch_axis = 2 if cfg else 1                                      # raw is [1, (2,) N * B, C_out, H, W]
    rows = torch.arange(B, device=dev)
    x = _initial_latents(engine, torch.tensor(list(seeds), dtype=torch.int64, device=dev))
    raw_first, n, start = None, len(timesteps), 0
    with torch.inference_mode():
        while start < n:
            end = min(start + block, n)
            if raw_first is None:
                raw_first = denoise_one(x, timesteps[start])

            def step(raw: torch.Tensor, x_t: torch.Tensor, i: int, start=start) -> torch.Tensor:
                j = start + i
                return fused_expert_step(raw, x_t, one, scalars[j], guidance_scale=g, seed=cand, offset=1 + j)

            xc = sample(_reuse_first(_tile(raw_first, N, batch_axis), denoise_all), step, _tile(x, N),
                        timesteps[start:end])
            if end < n:
                raw_next = denoise_all(xc, timesteps[end])
                x0 = gaussian_step(raw_next[0], xc, scalars[end], guidance_scale=g).x0
            else:
                raw_next, x0 = None, xc
            score = weighted_reward(x0.float().clamp(-1.0, 1.0), labels_n, weights, reward_fns, reward_scales)
            best = score.view(N, B).argmax(0).to(dev)                     # [B]
            x = xc.view(N, B, *xc.shape[1:])[best, rows]
            if raw_next is not None:
                r = raw_next.unflatten(batch_axis, (N, B))
                raw_first = r[:, :, best, rows] if cfg else r[:, best, rows]
            else:
                raw_first = None
            start = end
    return x


def rgg_sample(engine, class_labels: Sequence[int], seeds: Sequence[int], weights: Mapping[str, float],
               reward_fns: Mapping[str, Callable], *, steps: int, guidance_scale: float, scale: float,
               reward_scales: Mapping[str, float] | None = None, eta: float = 1.0,
               differentiable: frozenset | set | None = None) -> torch.Tensor:
    """Reward-gradient guidance of the base model -> x_0 [B, C, H, W].

    At each step: the base's (guided) output at x_t, its x0 estimate x0_hat = px x_t + po out (not clamped,
    so the gradient is not cut where the estimate leaves [-1, 1]), the gradient
    grad = d/dx_t sum_b sum_k w_k r_k(x0_hat_b) / s_k (through the network), and the step
    x_prev = [the base's own step from x_t: mean + sqrt(var) z] + var * scale * grad, with var the step's
    variance (0 on the last, deterministic step). scale = 0 is exactly the base model's sampler.
    """
    if differentiable is not None:
        bad = [k for k, w in weights.items() if float(w) != 0 and k not in differentiable]
        if bad:
            raise ValueError(f"reward-gradient guidance needs differentiable rewards; {bad[0]!r} is not")
    labels = [int(c) for c in class_labels]
    dev = engine.device
    cfg = engine.uses_guidance(guidance_scale)
    g = float(guidance_scale) if cfg else None
    timesteps, scalars = engine.step_tables(steps, eta)
    step_of = {t: i for i, t in enumerate(timesteps)}
    base = _base_denoiser(engine, labels, cfg)
    seed_t = torch.tensor(list(seeds), dtype=torch.int64, device=dev)
    one = torch.ones(len(labels), 1, dtype=torch.float32, device=dev)
    labels_t = torch.tensor(labels, dtype=torch.int64, device=dev)
    gradients: dict[int, torch.Tensor] = {}        # step index -> the reward's gradient at that step's x_t

    def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
        """The base's output at x; with scale != 0 it also leaves d reward(x0_hat) / d x in ``gradients``."""
        if scale == 0.0:
            return base(x, t)
        i = step_of[t]
        unclipped = dataclasses.replace(scalars[i], clip=math.inf)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            raw = base(xg, t)
            x0_hat = gaussian_step(raw[0], xg, unclipped, guidance_scale=g).x0
            reward = weighted_reward(x0_hat, labels_t, weights, reward_fns, reward_scales).sum()
            (gradients[i],) = torch.autograd.grad(reward, xg)
        return raw.detach()

    def step(raw: torch.Tensor, x_t: torch.Tensor, i: int) -> torch.Tensor:
        x_prev = fused_expert_step(raw, x_t, one, scalars[i], guidance_scale=g, seed=seed_t, offset=1 + i)
        grad = gradients.pop(i, None)
        if grad is not None:
            var = gaussian_step(raw[0], x_t, scalars[i], guidance_scale=g).var
            x_prev = x_prev + (var * scale * grad).to(x_prev.dtype)
        return x_prev

    with torch.no_grad():
        return sample(denoise, step, _initial_latents(engine, seed_t), timesteps)
