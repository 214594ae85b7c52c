"""msdda.kernels: the composed diffusion step as pure tensor math (no model knowledge; never imports msdda).

- ``compose_gaussians`` / ``compose_gaussians_ref``: sample prod_k N(mu_k, var_k)^{c_k} (ARCHITECTURE.md 1).
- ``gaussian_step`` (+ ``apply_guidance``, ``StepScalars``, ``VarMode``, ``StepGaussian``): a network output to
  the step's Gaussian {mean, var, x0}, the one definition every other module uses (ARCHITECTURE.md 2).
- ``fused_expert_step`` / ``fused_expert_step_ref`` / ``gaussian_from_output_ref``: K experts' raw outputs to
  x_prev in one launch, its fast twin (ARCHITECTURE.md 2).
- ``prepare_fused_step`` -> ``FusedStepPlan``: the fused step checked once per schedule, then one launch per step
  with no host-side tensor work, reading the step's scalars from a device step table (CUDA-graph ready).
- ``philox_normal``: the kernels' Philox noise, reproduced in torch (ARCHITECTURE.md 3).
- ``raise_if_bad``: the deferred check of ``validate=False, error_count=...``.

Modules: ``args`` (argument checks and preparation), ``errors`` (bad-element explanations), ``launch`` (backend
choice, autotuned configurations, prepared launches), ``product`` (the Triton device functions both kernels
share), ``compose``, ``fused_step``, ``plan``, ``gaussian``, ``philox``.
"""
from .compose import compose_gaussians, compose_gaussians_ref
from .errors import raise_if_bad
from .fused_step import STEP_TABLE_COLUMNS, fused_expert_step, fused_expert_step_ref, gaussian_from_output_ref
from .gaussian import StepGaussian, StepScalars, VarMode, apply_guidance, gaussian_step
from .philox import philox_normal
from .plan import FusedStepPlan, prepare_fused_step

__all__ = [
    "compose_gaussians",
    "compose_gaussians_ref",
    "fused_expert_step",
    "fused_expert_step_ref",
    "gaussian_from_output_ref",
    "gaussian_step",
    "apply_guidance",
    "StepGaussian",
    "StepScalars",
    "VarMode",
    "philox_normal",
    "raise_if_bad",
    "prepare_fused_step",
    "FusedStepPlan",
    "STEP_TABLE_COLUMNS",
]
