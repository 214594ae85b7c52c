"""prepare_fused_step / FusedStepPlan: checked once, one launch per step, the step's scalars read from a device step
table. Every step must equal fused_expert_step with that step's scalars, bit for bit (ARCHITECTURE.md section 2)."""
import math
from unittest import mock

import pytest
import torch

from msdda import schedule as sch
from msdda.kernels import (
    STEP_TABLE_COLUMNS,
    FusedStepPlan,
    StepScalars,
    VarMode,
    fused_expert_step,
    fused_expert_step_ref,
    launch,
    prepare_fused_step,
)

from device import DEV, GPU  # noqa: E402,F401

FLOOR32 = 16 * torch.finfo(torch.float32).eps  # as test_compose.FLOOR[float32]


@pytest.fixture(params=["triton", "torch"])
def impl(request):
    """Plans and by-value calls both on the Triton kernel (interpreted on CPU) or both on the float32 torch path."""
    with mock.patch.object(launch, "use_triton", lambda device: request.param == "triton"):
        yield request.param


SCHEDULES = {
    # DDPM with learned-range variances: every step LEARNED_RANGE but the last, which is FIXED with variance 0
    "ddpm_learned_range": ({"variance_type": "learned_range"}, "ddpm", 0.0),
    # DDIM with v-prediction and eta 0.7: FIXED variances that change every step, clipping on
    "ddim_v_eta07": ({"prediction_type": "v_prediction"}, "ddim", 0.7),
    # DDIM eta 0: every variance 0 (the zero-variance limit at every step), no clipping
    "ddim_eta0": ({"clip_sample": False}, "ddim", 0.0),
}


def schedule(name, steps=5):
    config, kind, eta = SCHEDULES[name]
    params = sch.schedule_from_diffusers_config({"num_train_timesteps": 1000, **config})
    return sch.step_plan(params, steps, kind=kind, eta=eta)[1]


def step_inputs(scalars, K=3, B=2, C=3, S=(4, 4), cfg=True, seed=0):
    """Per step: raw [K, (2,) B, C_out, *S] (C_out = 2C when a step reads the variance channel, which stays in
    [-1, 1]) and x_t; plus positive per-sample coefficients [B, K] (P > 0 whatever the variances)."""
    g = torch.Generator(DEV).manual_seed(seed)
    learned = any(s.var_mode != VarMode.FIXED for s in scalars)
    C_out = 2 * C if learned else C
    raws, xs = [], []
    for _ in scalars:
        raw = torch.randn(K, *((2,) if cfg else ()), B, C_out, *S, generator=g)
        if learned:
            raw.narrow(raw.dim() - len(S) - 1, C, C).copy_(2 * torch.rand(K, *((2,) if cfg else ()), B, C, *S,
                                                                          generator=g) - 1)
        raws.append(raw)
        xs.append(torch.randn(B, C, *S, generator=g))
    return raws, xs, 0.2 + torch.rand(B, K, generator=g)


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_step_equals_by_value(impl, name):
    """Over a whole schedule (variance mode, variance, clip and offset changing per step), with CFG and per-sample
    coefficients: the plan, stepped by an int or by a device counter, gives fused_expert_step's bits."""
    scalars = schedule(name)
    modes = {int(s.var_mode) for s in scalars}
    if name == "ddpm_learned_range":
        assert modes == {0, 1} and scalars[-1].var_mode == VarMode.FIXED and scalars[-1].log_var_fixed == -math.inf
    raws, xs, coeff = step_inputs(scalars)
    g = 3.5
    plan = prepare_fused_step(raws[0], xs[0], coeff, scalars, guidance_scale=g, seed=100)
    assert isinstance(plan, FusedStepPlan) and plan.steps == len(scalars)
    assert plan.table.shape == (len(scalars), len(STEP_TABLE_COLUMNS)) and plan.table.dtype == torch.float32
    counter = torch.zeros(1, dtype=torch.int64, device=DEV)
    out = torch.empty_like(xs[0])
    for i, s in enumerate(scalars):
        want = fused_expert_step(raws[i], xs[i], coeff, s, guidance_scale=g, seed=100, offset=1 + i)
        assert same_bits(plan.launch(raws[i], xs[i], step=i), want), i
        assert plan.launch(raws[i], xs[i], out, step=counter) is out
        assert same_bits(out, want), i
        counter.add_(1)  # what a captured graph does after the launch
        ref = fused_expert_step_ref(raws[i], xs[i], coeff, s, guidance_scale=g, seed=100, offset=1 + i)
        assert (want.double() - ref.double()).abs().max() <= FLOOR32 * max(1.0, ref.abs().max().item()) * 4
    assert int(plan.error_count) == 0
    plan.raise_if_bad()


def test_noise_table_and_zero_noise(impl):
    """noise [steps, B, C, *S]: step i uses noise[i], as fused_expert_step with noise=noise[i]; noise=0: x_prev = mu.
    Without CFG, K = 2, per-expert coefficients."""
    scalars = schedule("ddpm_learned_range", steps=3)
    raws, xs, _ = step_inputs(scalars, K=2, cfg=False, seed=1)
    coeff = torch.tensor([0.7, 0.6])
    noise = torch.randn(len(scalars), *xs[0].shape)
    plan = prepare_fused_step(raws[0], xs[0], coeff, scalars, noise=noise)
    plan0 = prepare_fused_step(raws[0], xs[0], coeff, scalars, noise=0)
    for i, s in enumerate(scalars):
        want = fused_expert_step(raws[i], xs[i], coeff, s, noise=noise[i])
        assert same_bits(plan.launch(raws[i], xs[i], step=i), want)
        assert same_bits(plan0.launch(raws[i], xs[i], step=i), fused_expert_step(raws[i], xs[i], coeff, s, noise=0))


def test_runtime_expert_loop(impl):
    """K = 9 experts: beyond the unrolled K <= 8, the kernel loops over K at run time; same bits as by value."""
    scalars = schedule("ddim_v_eta07", steps=2)
    raws, xs, _ = step_inputs(scalars, K=9, B=1, S=(3, 4), seed=2)
    coeff = torch.full((9,), 1 / 9)
    plan = prepare_fused_step(raws[0], xs[0], coeff, scalars, guidance_scale=2.0, seed=5, offset=7)
    for i, s in enumerate(scalars):
        want = fused_expert_step(raws[i], xs[i], coeff, s, guidance_scale=2.0, seed=5, offset=7 + i)
        assert same_bits(plan.launch(raws[i], xs[i], step=i), want)


def test_bad_elements_are_counted_not_raised(impl):
    """A NaN in one step's output is counted into the plan's error_count (no sync), and raise_if_bad reports it; a
    device step outside the schedule counts every element and reads nothing outside the table."""
    scalars = schedule("ddim_v_eta07", steps=3)
    raws, xs, coeff = step_inputs(scalars, seed=3)
    count = torch.zeros(1, dtype=torch.int32, device=DEV)
    plan = prepare_fused_step(raws[0], xs[0], coeff, scalars, guidance_scale=1.5, seed=1, error_count=count)
    assert plan.error_count is count
    bad = raws[1].clone()
    bad[0, 1, 1, 2, 3, 0] = float("nan")  # expert 0, conditional half, sample 1, channel 2
    plan.launch(raws[0], xs[0], step=0)
    plan.launch(bad, xs[1], step=1)
    assert int(count) == 1
    with pytest.raises(ValueError, match=r"1 elements had precision P = sum_k c_k/var_k <= 0 or a non-finite value"):
        plan.raise_if_bad()
    if impl == "triton":  # the device counter is the kernel's business; the torch path reads the int
        count.zero_()
        plan.launch(raws[2], xs[2], step=torch.tensor([len(scalars)], device=DEV))
        assert int(count) == xs[2].numel()


def test_argument_and_layout_errors():
    scalars = schedule("ddpm_learned_range", steps=2)
    raws, xs, coeff = step_inputs(scalars, seed=4)
    raw, x_t = raws[0], xs[0]
    with pytest.raises(TypeError, match="StepScalars"):
        prepare_fused_step(raw, x_t, coeff, [], guidance_scale=2.0, seed=1)
    with pytest.raises(ValueError, match="C_out = 2C"):
        prepare_fused_step(raw[:, :, :, :3], x_t, coeff, scalars, guidance_scale=2.0, seed=1)
    with pytest.raises(ValueError, match="sampling is always explicit"):
        prepare_fused_step(raw, x_t, coeff, scalars, guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"noise must be \[steps, B, C, \*S\]"):
        prepare_fused_step(raw, x_t, coeff, scalars, guidance_scale=2.0, noise=torch.zeros(3, *x_t.shape))
    with pytest.raises(ValueError, match="offset"):
        prepare_fused_step(raw, x_t, coeff, scalars, guidance_scale=2.0, seed=1, offset=2**32 - 1)
    with pytest.raises(ValueError, match="non-finite coefficients"):
        prepare_fused_step(raw, x_t, torch.full_like(coeff, math.nan), scalars, guidance_scale=2.0, seed=1)
    with pytest.raises(ValueError, match="flatten to one contiguous axis"):
        prepare_fused_step(raw.transpose(-1, -2), x_t.transpose(-1, -2), coeff, scalars, guidance_scale=2.0, seed=1)
    plan = prepare_fused_step(raw, x_t, coeff, scalars[0], guidance_scale=2.0, seed=1)  # one StepScalars: one step
    assert plan.steps == 1
    plan.launch(raw, x_t, step=0)
    cases = [
        (dict(raw=raw[:, :, :1]), "raw"),
        (dict(raw=raw.to(torch.float16)), "raw"),
        (dict(x_t=x_t.double()), "x_t"),
        (dict(out=torch.empty(2, 3, 4, 5)), "out must be"),
        (dict(out=torch.empty(2, 3, 4, 4).transpose(-1, -2)), "out must be"),
        (dict(step=1), "step must be"),
        (dict(step=-1), "step must be"),
        (dict(step=torch.zeros(1, dtype=torch.int32)), "int64 tensor"),
    ]
    for over, pattern in cases:
        kw = dict(raw=raw, x_t=x_t, out=None, step=0)
        kw.update(over)
        with pytest.raises(ValueError, match=pattern):
            plan.launch(kw["raw"], kw["x_t"], kw["out"], step=kw["step"])


def test_plan_of_fixed_steps_specialises_and_matches_reference(impl):
    """All steps FIXED (one variance mode): the plan compiles that mode in, still reading the per-step variance and
    guidance from the table; a StepScalars with clipping and a learned-sigma model (C_out = 2C, ignored)."""
    scalars = [StepScalars(px=1.2, po=-0.5, mx=0.6, m0=0.4, mo=0.1, clip=1.0, var_mode=VarMode.FIXED,
                           log_var_fixed=math.log(v)) for v in (0.3, 0.1, 0.02)]
    raws, xs, coeff = step_inputs([StepScalars(1, 1, 1, 1, 1, var_mode=VarMode.LEARNED)] * 3, K=2, seed=5)
    plan = prepare_fused_step(raws[0], xs[0], coeff, scalars, guidance_scale=4.0, seed=9)
    for i, s in enumerate(scalars):
        got = plan.launch(raws[i], xs[i], step=i)
        assert same_bits(got, fused_expert_step(raws[i], xs[i], coeff, s, guidance_scale=4.0, seed=9, offset=1 + i))
