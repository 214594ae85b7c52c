"""The zoo's diffusion model: architecture, noise schedule, Improved-DDPM hybrid loss, reference sampler.

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

import torch

from .data import NULL_CLASS

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

__all__ = ["UNET_CONFIG", "SCHEDULER_CONFIG", "make_unet", "make_scheduler", "TrainTables", "hybrid_loss",
           "sample_reference", "cfg_split"]


def make_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(**UNET_CONFIG)


def make_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


class TrainTables:
    """float64 IDDPM tables for the 1000-step training schedule (taken from diffusers' betas)."""

    def __init__(self, scheduler=None):
        scheduler = scheduler or make_scheduler()
        b = scheduler.betas.double()
        ac = torch.cumprod(1.0 - b, 0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        self.betas = b
        self.alphas_cumprod = ac
        self.sqrt_ac = ac.sqrt()
        self.sqrt_1mac = (1.0 - ac).sqrt()
        self.sqrt_recip_ac = (1.0 / ac).sqrt()
        self.sqrt_recipm1_ac = (1.0 / ac - 1.0).sqrt()
        pv = b * (1.0 - ac_prev) / (1.0 - ac)
        self.post_var = pv
        self.post_logvar_clipped = torch.log(torch.cat([pv[1:2], pv[1:]]))
        self.post_c1 = b * ac_prev.sqrt() / (1.0 - ac)
        self.post_c2 = (1.0 - ac_prev) * (1.0 - b).sqrt() / (1.0 - ac)
        self.log_betas = torch.log(b)

    def at(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return getattr(self, name)[t].float().view(-1, 1, 1, 1)


def _normal_kl(m1, lv1, m2, lv2):
    return 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv2))


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


def hybrid_loss(model, tables: TrainTables, x0, labels, t, noise) -> tuple[torch.Tensor, dict]:
    """Improved DDPM hybrid loss for one batch. Returns (loss, {"mse":..., "vb":...})."""
    x_t = tables.at("sqrt_ac", t) * x0 + tables.at("sqrt_1mac", t) * noise
    out = model(x_t, t, class_labels=labels).sample
    eps, v = out[:, :1], out[:, 1:]
    mse = (eps - noise).pow(2).mean()
    # VLB term with a stop-gradient on the mean: only the variance channel learns from it.
    eps_sg = eps.detach()
    x0_pred = tables.at("sqrt_recip_ac", t) * x_t - tables.at("sqrt_recipm1_ac", t) * eps_sg
    mean = tables.at("post_c1", t) * x0_pred + tables.at("post_c2", t) * x_t
    frac = (v + 1.0) / 2.0
    logvar = frac * tables.at("log_betas", t) + (1.0 - frac) * tables.at("post_logvar_clipped", t)
    true_mean = tables.at("post_c1", t) * x0 + tables.at("post_c2", t) * x_t
    true_logvar = tables.at("post_logvar_clipped", t)
    kl = _normal_kl(true_mean, true_logvar, mean, logvar).flatten(1).mean(1) / math.log(2.0)
    nll = -_discretized_gaussian_loglik(x0, mean, 0.5 * logvar).flatten(1).mean(1) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    vb = vb.mean() * (NUM_TRAIN_TIMESTEPS / 1000.0)
    return mse + vb, {"mse": float(mse.detach()), "vb": float(vb.detach())}


def cfg_split(out: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """[2B, 2, H, W] (uncond first) -> guided [B, 2, H, W]: eps = u + g (c - u), variance channel from c."""
    u, c = out.chunk(2)
    eps = u[:, :1] + guidance_scale * (c[:, :1] - u[:, :1])
    return torch.cat([eps, c[:, 1:]], dim=1)


@torch.no_grad()
def sample_reference(unet, labels: torch.Tensor, *, steps: int = 50, guidance_scale: float = 2.0,
                     seed: int = 0, scheduler=None) -> torch.Tensor:
    """Ancestral DDPM sampling with diffusers' own DDPMScheduler.step (learned-range variance) and CFG.

    This is the independent reference used to measure the base model's quality; it does not use msdda.schedule.
    """
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(dict(scheduler.config)) if scheduler is not None else make_scheduler()
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    b = labels.shape[0]
    x = torch.randn(b, 1, 16, 16, generator=g)
    null = torch.full_like(labels, NULL_CLASS)
    lab2 = torch.cat([null, labels])
    for t in sched.timesteps:
        out = unet(torch.cat([x, x]), t, class_labels=lab2).sample
        x = sched.step(cfg_split(out, guidance_scale), t, x, generator=g).prev_sample
    return x.clamp(-1.0, 1.0)
