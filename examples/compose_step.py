"""The composed MSDDA step on its own: run with .venv/bin/python examples/compose_step.py"""
import torch
from msdda.kernels import compose_gaussians, compose_gaussians_ref

K, B = 2, 4
mean = torch.randn(K, B, 1, 16, 16)                  # mu_k   [K, B, *S]
var = torch.rand(K, B, 1, 16, 16) * 0.1 + 0.01       # var_k  per element (learned variances)
w = torch.tensor([0.6, 0.4])                         # c_k = w_k
x_prev = compose_gaussians(mean, var, w, seed=1234, offset=7)   # Philox (seed, offset): reproducible
assert torch.equal(x_prev, compose_gaussians(mean, var, w, seed=1234, offset=7))
ref = compose_gaussians_ref(mean, var, w, seed=1234, offset=7)  # float64 definition, same noise
print((x_prev - ref).abs().max())
mu = compose_gaussians(mean, var, w, noise=0)        # noise=0 returns the product's mean
try:
    compose_gaussians(mean, var, torch.tensor([2.0, -1.5]), noise=0)   # c_2 < 0: P may be <= 0
except ValueError as e:
    print("ValueError:", e)
