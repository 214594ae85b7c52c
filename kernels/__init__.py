"""msdda.kernels: the composed diffusion step as pure tensor math (no model knowledge; never imports msdda).

- ``compose_gaussians`` / ``compose_gaussians_ref``: sample prod_k N(mu_k, var_k)^{c_k} (ARCHITECTURE.md 1).
- ``fused_expert_step`` / ``fused_expert_step_ref`` / ``gaussian_from_output_ref``, ``StepScalars``, ``VarMode``:
  the same from raw network outputs in one launch (ARCHITECTURE.md 2).
- ``philox_normal``: the kernels' Philox noise, reproduced in torch (ARCHITECTURE.md 3).
- ``raise_if_bad``: the deferred check of ``validate=False, error_count=...``.
"""
from .compose import compose_gaussians, compose_gaussians_ref, raise_if_bad
from .fused_step import StepScalars, VarMode, fused_expert_step, fused_expert_step_ref, gaussian_from_output_ref
from .philox import philox_normal

__all__ = [
    "compose_gaussians",
    "compose_gaussians_ref",
    "fused_expert_step",
    "fused_expert_step_ref",
    "gaussian_from_output_ref",
    "StepScalars",
    "VarMode",
    "philox_normal",
    "raise_if_bad",
]
