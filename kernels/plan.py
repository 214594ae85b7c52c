"""A fused step prepared once per ``generate``, launched once per step (ARCHITECTURE.md section 2).

    plan = prepare_fused_step(raw, x_t, coeff, scalars_per_step, guidance_scale=g, seed=seeds)
    for i in range(steps):
        ...
        plan.launch(raw_i, x_i, out_i, step=i)           # or step=<int64 [1] tensor on the device>
    plan.raise_if_bad()                                  # one sync, after the loop

Everything ``fused_expert_step`` checks per call (shapes, dtypes, strides, devices, K, CFG, noise, the
coefficients) is checked here once; the schedule's StepScalars become a float32 step table on the device (one row
per step: STEP_TABLE_COLUMNS), and the kernel reads its row, ``step + step_ptr[0]``, on the device. So

- a launch does no host-side tensor work: it passes the three tensors and the step to the compiled kernel;
- with ``step`` an int64 [1] device tensor (a step counter), launches differ in nothing the host holds, so one
  CUDA graph that captured ``plan.launch(raw, x_t, out, step=counter)`` (and an in-graph ``counter.add_(1)``)
  serves every step of the schedule, whatever each step's variance mode (DDPM with learned variances ends with
  a FIXED, noise-free step) or guidance;
- the bad-element check is deferred into ``plan.error_count`` (int32 [1] on the device), read once by
  ``raise_if_bad``.

Each step's result equals ``fused_expert_step`` with that step's scalars, noise and offset, bit for bit: the same
kernel, reading the same float32 values from the table instead of its arguments (tested over whole schedules).
"""
from __future__ import annotations

import dataclasses
import math
import torch

from . import launch
from .args import check_device, check_float, prepare_fused
from .errors import check_coeff_finite, raise_if_bad
from .fused_step import (
    STEP_TABLE_COLUMNS,
    fused_step_kernel,
    fused_step_kernel_tuned,
    fused_torch,
    kernel_arguments,
    kernel_constexprs,
    step_table_row,
)
from .gaussian import StepScalars, VarMode

__all__ = ["FusedStepPlan", "prepare_fused_step"]

_SLOTS = ("raw_ptr", "xt_ptr", "out_ptr", "step_ptr", "step")


class FusedStepPlan:
    """A prepared fused step: see the module docstring and ``prepare_fused_step``. Immutable after construction
    (the device error counter aside), so one plan may be launched from several threads."""

    def __init__(self, f, raw, x_t, scalars, table, noise, error_count):
        self.args = f  # FusedArgs of the example: raw [K, G, B, C_out * prod(S)] and x_t [B, N] views, coeff, seeds
        self.scalars = tuple(scalars)
        self.steps = len(self.scalars)
        self.shape = f.shape  # x_prev's [B, C, *S]
        self.dtype = f.x_t.dtype
        self.device = f.x_t.device
        self.table = table  # float32 [steps, len(STEP_TABLE_COLUMNS)] on the device
        self.noise = noise  # [steps, B, N] or None
        self.error_count = error_count
        self._zero_step = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.prepared = None  # the launch.PreparedLaunch of the Triton kernel (None on the float32 torch path)
        # what every launch must match: the example's shapes, strides, dtypes and 16-byte alignment
        self._raw_key = (raw.shape, raw.stride(), raw.dtype)
        self._xt_key = (x_t.shape, x_t.stride(), x_t.dtype)
        self._aligned = (raw.data_ptr() % 16 == 0, x_t.data_ptr() % 16 == 0)
        if launch.use_triton(self.device) and f.x_t.numel():
            modes = {int(s.var_mode) for s in self.scalars}
            var_mode = modes.pop() if len(modes) == 1 else -1  # one mode: specialise on it; else read per step
            B, N = f.x_t.shape
            # the table stands in for the pointers the chosen constexprs never read
            fixed_args = kernel_arguments(f, table, error_count, noise=noise, table=table, step_ptr=self._zero_step,
                                          stride_ns=noise.stride(0) if noise is not None else 0,
                                          n_steps=self.steps)
            fixed = {n: v for n, v in zip(fused_step_kernel.arg_names, fixed_args) if n not in _SLOTS}
            clip = any(s.clip < math.inf for s in self.scalars)
            fixed.update(kernel_constexprs(f, var_mode, True, True, clip))
            # the tuning run writes a scratch output and counter, never the caller's
            example = dict(raw_ptr=f.raw, xt_ptr=f.x_t, step_ptr=self._zero_step, step=0,
                           out_ptr=torch.empty((B, N), dtype=self.dtype, device=self.device),
                           err_ptr=torch.zeros(1, dtype=torch.int32, device=self.device))
            self.prepared = launch.PreparedLaunch(fused_step_kernel, fused_step_kernel_tuned, fixed, _SLOTS, example,
                                                 N, B)

    def check(self, raw, x_t, out, step) -> None:
        """Raise ValueError unless raw, x_t and out have the example's layout (shape, strides, dtype, device,
        alignment) and step is in range: attribute reads only, no tensor work."""
        if (raw.shape, raw.stride(), raw.dtype) != self._raw_key or raw.device != self.device:
            raise ValueError(f"raw {tuple(raw.shape)} {raw.dtype} strides {raw.stride()} on {raw.device} differs "
                             f"from the prepared {self._raw_key} on {self.device}")
        if (x_t.shape, x_t.stride(), x_t.dtype) != self._xt_key or x_t.device != self.device:
            raise ValueError(f"x_t {tuple(x_t.shape)} {x_t.dtype} strides {x_t.stride()} on {x_t.device} differs "
                             f"from the prepared {self._xt_key} on {self.device}")
        if out.shape != self.shape or out.dtype != self.dtype or out.device != self.device or \
                not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {self.dtype} tensor {self.shape} on {self.device}, got "
                             f"{out.dtype} {tuple(out.shape)} on {out.device}")
        for name, t, aligned in (("raw", raw, self._aligned[0]), ("x_t", x_t, self._aligned[1]), ("out", out, True)):
            if aligned and t.data_ptr() % 16:
                raise ValueError(f"{name} must be 16-byte aligned like the prepared example")
        if isinstance(step, torch.Tensor):
            if step.dtype != torch.int64 or step.numel() != 1 or step.device != self.device:
                raise ValueError(f"a device step must be an int64 tensor [1] on {self.device}")
        elif isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < self.steps:
            raise ValueError(f"step must be an int in [0, {self.steps}) or an int64 [1] tensor, got {step!r}")

    def launch(self, raw, x_t, out=None, step=0, *, check: bool = True) -> torch.Tensor:
        """x_prev of step ``step`` into ``out`` ([B, C, *S], contiguous; allocated when None), with no sync.

        raw, x_t: that step's outputs and latents, laid out like the prepared example. step: an int, or an int64
        [1] tensor on the device whose value the kernel reads when it runs (for CUDA graphs); an index outside
        the schedule counts every element as bad. check=False skips the host-side layout check (``check``)."""
        if out is None:
            out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        if check:
            self.check(raw, x_t, out, step)
        if self.prepared is None:
            return self._launch_torch(raw, x_t, out, step)
        if isinstance(step, torch.Tensor):
            self.prepared.launch(raw, x_t, out, step, 0)
        else:
            self.prepared.launch(raw, x_t, out, self._zero_step, step)
        return out

    def _launch_torch(self, raw, x_t, out, step):
        """The float32 torch path (CPU without the interpreter): ``fused_torch`` with the step's scalars."""
        i = int(step)
        f = self.args
        if not 0 <= i < self.steps:
            self.error_count.add_(out.numel())
            return out
        noise = self.noise[i] if self.noise is not None else f.noise
        fi = dataclasses.replace(f, raw=raw.reshape(f.raw.shape), x_t=x_t.reshape(f.x_t.shape), scalars=self.scalars[i],
                                 noise=noise, offset=f.offset + i)
        out.copy_(fused_torch(fi, validate=False, error_count=self.error_count))
        return out

    def raise_if_bad(self, what: str = "sampling") -> None:
        """ValueError if any launch counted a bad element (one host sync)."""
        raise_if_bad(self.error_count, self.args.coeff, what)


def prepare_fused_step(raw, x_t, coeff, scalars, *, guidance_scale=None, seed=None, noise=None, offset: int = 1,
                       error_count=None) -> FusedStepPlan:
    """Check a schedule's fused steps once and prepare their launches (see the module docstring).

    raw, x_t: tensors laid out as every step's will be (e.g. the first step's): raw [K, (2,) B, C_out, *S] (CFG
    axis with ``guidance_scale``), x_t [B, C, *S]. coeff: c_k [K] or [B, K], fixed for the plan.
    scalars: the schedule, one StepScalars per step (or a single StepScalars: a one-step plan); C_out must be 2C
    if any step reads the variance channel.
    Noise, exactly one of: seed (int s: per-sample seeds s + b, or int64 [B]): step i draws Philox noise at offset
    ``offset + i`` (the runtime's convention is offset 1 + i for step i, 0 for x_T); noise: a tensor
    [steps, B, C, *S] (step i uses noise[i]), or 0 (x_prev = mu).
    error_count: an int32 [1] device tensor to add bad-element counts into (default: a fresh one,
    ``plan.error_count``). NaN/Inf coefficients raise ValueError here."""
    if isinstance(scalars, StepScalars):
        scalars = [scalars]
    scalars = list(scalars)
    if not scalars or not all(isinstance(s, StepScalars) for s in scalars):
        raise TypeError("scalars must be a StepScalars or a non-empty sequence of them (one per step)")
    steps = len(scalars)
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset or offset + steps > 2**32:
        raise ValueError(f"offset must be an int with offset + steps <= 2**32, got {offset!r}")
    learned = any(s.var_mode != VarMode.FIXED for s in scalars)
    table_noise = isinstance(noise, torch.Tensor)
    f = prepare_fused(raw, x_t, coeff, None, guidance_scale, 0 if table_noise else noise, seed, offset,
                      error_count, learned=learned)
    device = f.x_t.device
    check_coeff_finite("prepare_fused_step", f.coeff, True)
    B, N = f.x_t.shape
    noise_table = None
    if table_noise:
        check_float("noise", noise, (torch.float32, torch.float16, torch.bfloat16, torch.float64))
        check_device("noise", noise, device)
        if tuple(noise.shape) != (steps, *f.shape):
            raise ValueError(f"noise must be [steps, B, C, *S] = {(steps, *f.shape)}, got {tuple(noise.shape)}")
        noise_table = noise.reshape(steps, B, N)
        if N > 1 and noise_table.stride(2) != 1:
            noise_table = noise_table.contiguous()
        f = dataclasses.replace(f, noise=noise_table[0], zero_noise=False)  # NOISE == 1
    if f.raw.data_ptr() != raw.data_ptr() or f.x_t.data_ptr() != x_t.data_ptr():
        raise ValueError("prepare_fused_step needs raw and x_t whose [C_out, *S] / [C, *S] axes flatten to one "
                         "contiguous axis (a launch passes them as they are): make them contiguous once")
    if error_count is None:
        error_count = torch.zeros(1, dtype=torch.int32, device=device)
    table = torch.tensor([step_table_row(s, f.guidance) for s in scalars], dtype=torch.float32, device=device)
    assert table.shape[1] == len(STEP_TABLE_COLUMNS)
    return FusedStepPlan(f, raw, x_t, scalars, table, noise_table, error_count)
