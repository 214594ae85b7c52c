"""The zoo's diffusion model for training: architecture, noise schedule, Improved-DDPM hybrid loss, and the
diffusers reference sampler.

Architecture: ``diffusers.UNet2DModel`` (see ``UNET_CONFIG``), class-conditional with 11 class embeddings
(0..9 digits, 10 = null class for classifier-free guidance), 1 input channel, 2 output channels
(epsilon, and the learned-range variance channel v in [-1, 1]-ish).

Schedule: 1000 training steps, ``squaredcos_cap_v2`` (the cosine schedule of Improved DDPM; better than linear
betas for 16x16 images, where the linear schedule destroys the signal too early). ``clip_sample=True``
(predicted x0 clamped to [-1, 1], the data range) at sampling time. Timestep spacing: diffusers' default
"leading".

Loss (Nichol & Dhariwal 2021, "hybrid"): L = L_simple + L_vb(t), with t uniform, where L_vb(t) is the
per-timestep VLB term in bits/dim computed with a stop-gradient on the predicted mean (so L_vb only trains the
variance channel). Since E_t[L_vb(t)] = L_vlb / T with T = 1000, this is exactly L_simple + lambda * L_vlb with
lambda = 0.001 (the IDDPM code's "rescaled" vb term, num_timesteps / 1000 = 1).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from msdda.kernels import apply_guidance
from msdda.sampling import sample
from msdda.schedule import TrainSchedule, make_schedule

from .gaussians import gaussian_kl
from msdda.zoo import NULL_CLASS

NUM_TRAIN_TIMESTEPS = 1000
BETA_SCHEDULE = "squaredcos_cap_v2"
CLIP_SAMPLE = True

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=1,
    out_channels=2,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=8,  # the mid block's self-attention at 8x8
    num_class_embeds=11,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=NUM_TRAIN_TIMESTEPS,
    beta_schedule=BETA_SCHEDULE,
    variance_type="learned_range",
    prediction_type="epsilon",
    clip_sample=CLIP_SAMPLE,
    clip_sample_range=1.0,
    timestep_spacing="leading",
    steps_offset=0,
)

__all__ = ["UNET_CONFIG", "SCHEDULER_CONFIG", "make_unet", "make_scheduler", "train_schedule", "hybrid_loss",
           "guided_output", "sample_reference"]


def make_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(**UNET_CONFIG)


def make_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def train_schedule() -> TrainSchedule:
    """The float64 1000-step training schedule (msdda.schedule; its betas equal diffusers' ``scheduler.betas``)."""
    return make_schedule(NUM_TRAIN_TIMESTEPS, BETA_SCHEDULE)


def _at(values: np.ndarray, t: torch.Tensor) -> torch.Tensor:
    """float64 per-timestep values gathered at t [B] -> float32 [B, 1, 1, 1]."""
    return torch.from_numpy(values[t.cpu().numpy()]).float().view(-1, 1, 1, 1)      # fancy indexing copies


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_loglik(x, means, log_scales):
    centered = x - means
    inv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_1m_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_1m_cdf_min, log_delta))


def hybrid_loss(model, schedule: TrainSchedule, x0, labels, t, noise) -> tuple[torch.Tensor, dict]:
    """Improved DDPM hybrid loss for one batch at per-sample timesteps t [B]. Returns (loss, {"mse":..., "vb":...}).

    The VLB term needs the true posterior q(x_{t-1} | x_t, x0) and IDDPM's clipped log-variance range at each
    sample's own t (its t = 0 decoder term uses the t = 1 posterior variance, where diffusers' sampler has
    variance 0), so it is computed here from the schedule's float64 arrays rather than from the sampler's
    per-step scalars."""
    s = schedule
    abar, abar_prev, beta = s.alphas_cumprod, s.alphas_cumprod_prev, s.betas
    post_var = beta * (1.0 - abar_prev) / (1.0 - abar)
    post_logvar = np.log(np.concatenate([post_var[1:2], post_var[1:]]))      # IDDPM: clipped at t = 0
    post_c1 = beta * np.sqrt(abar_prev) / (1.0 - abar)
    post_c2 = (1.0 - abar_prev) * np.sqrt(s.alphas) / (1.0 - abar)
    x_t = _at(s.sqrt_alphas_cumprod, t) * x0 + _at(s.sqrt_one_minus_alphas_cumprod, t) * noise
    out = model(x_t, t, class_labels=labels).sample
    eps, v = out[:, :1], out[:, 1:]
    mse = (eps - noise).pow(2).mean()
    # VLB term with a stop-gradient on the mean: only the variance channel learns from it.
    eps_sg = eps.detach()
    x0_pred = _at(np.sqrt(1.0 / abar), t) * x_t - _at(np.sqrt(1.0 / abar - 1.0), t) * eps_sg
    mean = _at(post_c1, t) * x0_pred + _at(post_c2, t) * x_t
    frac = (v + 1.0) / 2.0
    logvar = frac * _at(np.log(beta), t) + (1.0 - frac) * _at(post_logvar, t)
    true_mean = _at(post_c1, t) * x0 + _at(post_c2, t) * x_t
    true_logvar = _at(post_logvar, t)
    kl = gaussian_kl(true_mean, true_logvar.exp(), mean, logvar.exp()).flatten(1).mean(1) / math.log(2.0)
    nll = -_discretized_gaussian_loglik(x0, mean, 0.5 * logvar).flatten(1).mean(1) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    vb = vb.mean() * (NUM_TRAIN_TIMESTEPS / 1000.0)
    return mse + vb, {"mse": float(mse.detach()), "vb": float(vb.detach())}


def guided_output(unet, x: torch.Tensor, t, labels: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The zoo UNet's classifier-free-guided output [B, 2, H, W] at x (eps guided, variance channel from the
    conditional half: msdda.kernels.apply_guidance)."""
    null = torch.full_like(labels, NULL_CLASS)
    out = unet(torch.cat([x, x]), t, class_labels=torch.cat([null, labels])).sample
    return apply_guidance(out.unflatten(0, (2, x.shape[0])), x, guidance_scale)


@torch.no_grad()
def sample_reference(unet, labels: torch.Tensor, *, steps: int = 50, guidance_scale: float = 2.0,
                     seed: int = 0, scheduler=None) -> torch.Tensor:
    """Ancestral DDPM sampling with diffusers' own DDPMScheduler.step (learned-range variance) and CFG.

    The independent reference used to measure the base model's quality: its step is diffusers' own, not
    msdda.schedule's (only the loop, msdda.sampling.sample, and the guidance, apply_guidance, are shared).
    """
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(dict(scheduler.config)) if scheduler is not None else make_scheduler()
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(labels.shape[0], 1, 16, 16, generator=g)

    def step(out: torch.Tensor, x_t: torch.Tensor, i: int) -> torch.Tensor:
        return sched.step(out, sched.timesteps[i], x_t, generator=g).prev_sample

    x = sample(lambda x_t, t: guided_output(unet, x_t, t, labels, guidance_scale), step, x, sched.timesteps)
    return x.clamp(-1.0, 1.0)
