"""msdda.validation: the argument checks the API and the CLI share. Bounds and types are refused with one-line
ValueErrors before anything is allocated; what is accepted is accepted by both."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import msdda
from msdda import validation as v
from msdda.loading import LoadError
from tiny_models import damaged_copy


@pytest.fixture(scope="module")
def models(learned_variance_models):
    return learned_variance_models


@pytest.fixture(scope="module")
def engine(models):
    base, experts = models
    return msdda.Engine.from_pretrained(base, experts, limits=v.Limits(max_images=6, max_steps=20))


def _gen(engine, **kw):
    kw = {"class_labels": 3, "steps": 2, "guidance_scale": 2.0, "output_type": "latent",
          "weights": {"a": 0.5, "b": 0.5}, **kw}
    return engine.generate(**kw)


# ---------------------------------------------------------------------- the API
def test_numpy_integers_are_accepted(engine):
    out = _gen(engine, num_images=np.int64(2), steps=np.int32(2), seed=np.uint32(5))
    assert out.latents.shape[0] == 2 and out.seeds == [5, 6]
    torch.testing.assert_close(out.latents, _gen(engine, num_images=2, steps=2, seed=5).latents, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(seed=1.5), "seed must be an integer, not 1.5"),                 # never truncated to 1
    (dict(seed=np.float64(2.0)), "seed must be an integer"),
    (dict(seed=True), "seed must be an integer"),
    (dict(seed=-1), "seed must be >= 0"),
    (dict(seed=2**63 - 1, num_images=2), "must stay below 2**63"),
    (dict(seed=[0, 1.5], num_images=2), "seeds must be integers"),
    (dict(num_images=2.0), "num_images must be an integer"),
    (dict(num_images=0), "num_images must be >= 1"),
    (dict(num_images=7), "num_images must be <= 6"),                     # the engine's limits
    (dict(seed=list(range(7))), "num_images must be <= 6"),              # a per-sample list is bounded too
    (dict(steps=21), "steps must be <= 20"),
    (dict(steps=2.5), "steps must be an integer"),
    (dict(beta=0), "beta must be > 0"),
    (dict(beta=-1.0), "beta must be > 0"),
    (dict(beta=float("nan")), "beta must be a finite number"),
    (dict(strategy=None), "strategy must be a string"),
    (dict(strategy=3), "strategy must be a string"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(guidance_scale="7"), "guidance_scale must be a number"),
    (dict(eta=float("inf")), "eta must be a finite number"),
    (dict(eta=-0.5), "eta must be >= 0"),
    (dict(weights={"a": 1e308, "b": 1e308}, normalize=True), "overflow"),
    (dict(weights={"a": "0.5", "b": 0.5}), "not a number"),
    (dict(weights={"a": True}), "not a number"),
    (dict(expert_betas={"a": 1.0, "b": 1.0, "zzz": 1.0}), "unknown expert 'zzz' in expert_betas"),
    (dict(expert_betas={"a": 1.0}), "no KL strength for 'b'"),
    (dict(expert_betas={"a": -1.0, "b": 1.0}), "must be a finite number > 0"),
    (dict(expert_betas={"a": 0.0, "b": 1.0}), "must be a finite number > 0"),
    (dict(expert_betas={"a": float("inf"), "b": 1.0}), "must be a finite number > 0"),
    (dict(expert_betas={"a": 1e308, "b": 1e308}, beta=1e-308), "overflow"),
    (dict(class_labels=10), "class labels must lie in 0..9"),
    (dict(class_labels=[1, 2.5], num_images=2), "class labels must lie in 0..9"),
    (dict(output_type="gif"), "output_type must be"),
])
def test_bad_api_input_is_one_line_valueerror(engine, kwargs, message):
    with pytest.raises(ValueError) as info:
        _gen(engine, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_check_request_runs_no_network(engine, monkeypatch):
    """check_request (what the CLI calls before creating its folder) validates without running a network."""
    def forbidden(*a, **k):
        raise AssertionError("a network ran")

    monkeypatch.setattr(engine.backend, "forward", forbidden)
    req = engine.check_request(weights={"a": 1.0, "b": 3.0}, normalize=True, num_images=3, steps=4, seed=7,
                               class_labels=3)
    assert req.batch == 3 and req.seeds == (7, 8, 9) and req.steps == 4 and req.class_labels == (3, 3, 3)
    torch.testing.assert_close(req.plan.coeff[0], torch.tensor([0.25, 0.75], dtype=torch.float64))
    # the request runs as it is: generate(req) equals generate(**the same arguments), and trusts it (no re-check)
    monkeypatch.undo()
    out = engine.generate(req)
    direct = engine.generate(weights={"a": 1.0, "b": 3.0}, normalize=True, num_images=3, steps=4, seed=7,
                             class_labels=3)
    assert torch.equal(out.latents, direct.latents) and out.seeds == [7, 8, 9]
    def checked_again(*a, **k):
        raise AssertionError("a checked request was checked again")

    monkeypatch.setattr(engine, "check_request", checked_again)
    engine.generate(req.take([1]))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="a Request or generate's arguments, not both"):
        engine.generate(req, steps=3)
    with pytest.raises(ValueError, match="class labels"):
        engine.check_request(class_labels=10, steps=2)


def test_steps_bounded_by_the_schedule(models):
    base, experts = models
    eng = msdda.Engine.from_pretrained(base, experts, limits=v.Limits(max_steps=5000))
    with pytest.raises(ValueError, match=r"num_train_timesteps \(1000\), got 1001"):
        eng.check_request(steps=1001, class_labels=3)
    assert eng.limits.max_steps == 5000 and msdda.Engine.from_pretrained(base).limits == v.Limits()


@pytest.mark.parametrize("device, message", [
    ("bogus", "unknown device 'bogus'"),
    (3, "device must be a string"),
    ("cuda:99", "CUDA"),
])
def test_bad_device_is_refused_before_loading(tmp_path, device, message):
    # the base does not exist: the device error must come first, before any loading
    with pytest.raises(ValueError, match=message):
        msdda.Engine.from_pretrained(tmp_path / "missing", device=device)


def test_limits_are_checked():
    assert v.Limits() == v.DEFAULT_LIMITS and v.Limits().max_images == 10_000 and v.Limits().max_steps == 1_000
    for bad in (dict(max_images=0), dict(max_steps=-1), dict(max_images=1.5), dict(max_steps=True)):
        with pytest.raises(ValueError):
            v.Limits(**bad)


def test_limits_object_is_required(models):
    base, _ = models
    with pytest.raises(ValueError, match="limits must be a msdda.validation.Limits"):
        msdda.Engine.from_pretrained(base, limits={"max_images": 5})


# ---------------------------------------------------------------------- the shared functions
def test_check_int_accepts_numpy_refuses_floats_and_bools():
    assert v.check_int("n", np.int16(3)) == 3 and type(v.check_int("n", np.int64(3))) is int
    for bad in (3.0, np.float32(3), True, np.bool_(True), "3", None):
        with pytest.raises(ValueError, match="must be an integer"):
            v.check_int("n", bad)


def test_normalized_weights():
    assert v.normalized_weights([1.0, 3.0], normalize=True) == [0.25, 0.75]
    assert v.normalized_weights([0.3, 0.7], normalize=False) == [0.3, 0.7]
    for values, normalize, message in (([1e308, 1e308], True, "overflow"), ([0.0, 0.0], True, "all zero"),
                                       ([0.5, 0.6], False, "sum to 1.1"), ([5e-324, 0.0], True, None)):
        if message is None:                              # a subnormal total still normalises to a finite 1
            assert v.normalized_weights(values, normalize=normalize) == [1.0, 0.0]
            continue
        with pytest.raises(ValueError, match=message):
            v.normalized_weights(values, normalize=normalize)


def test_seed_list_is_not_built_for_refused_sizes():
    assert v.seed_list(5, 3) == [5, 6, 7]
    with pytest.raises(ValueError, match="num_images must be <= 10000"):
        v.batch_size(10**9, None, 0, None)              # refused before any list of 10**9 seeds could exist
    with pytest.raises(ValueError, match="seed list has 2 entries for 3 images"):
        v.seed_list([1, 2], 3)


def test_check_weights_and_betas_messages_name_the_option():
    with pytest.raises(ValueError, match="--weights: weight for 'a' is negative"):
        v.check_weights({"a": -1.0}, option="--weights")
    with pytest.raises(ValueError, match="unknown expert 'z' in --expert-betas"):
        v.check_expert_betas({"z": 1.0}, ["a"], option="--expert-betas")
    assert v.check_expert_betas({"a": np.float32(2)}, ["a"]) == {"a": 2.0}
    assert math.isfinite(v.check_beta(np.float64(0.5)))


def test_check_strategy():
    assert v.check_strategy("expert:a", ["a"]) == "expert:a"
    for bad, message in ((None, "must be a string"), ("expert:z", "unknown expert 'z'"), ("nope", "unknown strategy")):
        with pytest.raises(ValueError, match=message):
            v.check_strategy(bad, ["a"])


# ---------------------------------------------------------------------- configs
@pytest.mark.parametrize("where, content, message", [
    ("unet/config.json", "[]", "expected a JSON object"),
    ("unet/config.json", "null", "expected a JSON object"),
    ("unet/config.json", {"sample_size": 100000}, "sample_size must be"),
    ("unet/config.json", {"sample_size": [8, 8, 8]}, "sample_size must be"),
    ("unet/config.json", {"in_channels": 0}, "in_channels must be"),
    ("scheduler/scheduler_config.json", "[]", "expected a JSON object"),
    ("scheduler/scheduler_config.json", {"num_train_timesteps": 10**9}, "num_train_timesteps must be <= 100000"),
    ("scheduler/scheduler_config.json", {"num_train_timesteps": "1000"}, "num_train_timesteps must be an int"),
    ("scheduler/scheduler_config.json", {"trained_betas": "abc"}, "trained_betas must be a list"),
])
def test_damaged_configs_are_load_errors(models, tmp_path, where, content, message):
    broken = damaged_copy(models[0], tmp_path / "broken", where, content)
    with pytest.raises(LoadError, match=message) as info:
        msdda.Engine.from_pretrained(broken)
    assert str(broken / where) in str(info.value) and "\n" not in str(info.value)


def test_make_schedule_bounds():
    from msdda.schedule import MAX_TRAIN_TIMESTEPS, make_schedule

    with pytest.raises(ValueError, match="num_train_timesteps must be <="):
        make_schedule(10**10)
    assert make_schedule(MAX_TRAIN_TIMESTEPS).num_train_timesteps == MAX_TRAIN_TIMESTEPS


def test_atomic_json_refuses_nan(tmp_path):
    from msdda.atomic import atomic_write_json

    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "x.json", {"g": float("nan")})
    assert list(tmp_path.iterdir()) == []
