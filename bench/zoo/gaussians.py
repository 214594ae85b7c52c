"""Gaussian log-density and KL, for training the zoo (rl.py, diffusion.py, step.py) and measuring the
known-optimum benchmark (bench/quality). The runtime never needs them: the step's Gaussian itself is
``msdda.kernels.gaussian_step``."""
from __future__ import annotations

import math

import torch

__all__ = ["gaussian_log_prob", "gaussian_kl"]

_LOG_2PI = math.log(2 * math.pi)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor | float) -> torch.Tensor:
    """Per-element log N(x; mean, var) = -((x-mean)^2/var + log(2 pi var)) / 2; shapes broadcast.

    Differentiable in all arguments; needs var > 0 (a zero-variance step has no density).
    """
    var = torch.as_tensor(var, dtype=mean.dtype, device=mean.device)
    return -0.5 * ((x - mean) ** 2 / var + torch.log(var) + _LOG_2PI)


def gaussian_kl(
    mean_a: torch.Tensor, var_a: torch.Tensor | float, mean_b: torch.Tensor, var_b: torch.Tensor | float
) -> torch.Tensor:
    """Per-element KL(N(mean_a, var_a) || N(mean_b, var_b)) in nats; shapes broadcast, differentiable.

    = (log(var_b/var_a) + (var_a + (mean_a-mean_b)^2)/var_b - 1) / 2 ; needs var_a, var_b > 0.
    """
    var_a = torch.as_tensor(var_a, dtype=mean_a.dtype, device=mean_a.device)
    var_b = torch.as_tensor(var_b, dtype=mean_b.dtype, device=mean_b.device)
    return 0.5 * (torch.log(var_b) - torch.log(var_a) + (var_a + (mean_a - mean_b) ** 2) / var_b - 1.0)
