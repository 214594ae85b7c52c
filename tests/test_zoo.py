"""The embedded model zoo (msdda.zoo): shipped weights and rewards; and its training recipes (bench/zoo) on
--tiny settings."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from bench.zoo import train as T
from bench.zoo.diffusion import SCHEDULER_CONFIG, UNET_CONFIG
from msdda import zoo
from msdda.zoo import rewards as R

EXPECTED_MEMBERS = ("base", "legible", "bold", "compressible",
                    "morl_legible_bold_w0.2", "morl_legible_bold_w0.5", "morl_legible_bold_w0.8")


def _load(path):
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(str(path), subfolder="unet", low_cpu_mem_usage=False)


# ---------------------------------------------------------------------------------------------------------------
# the shipped zoo
# ---------------------------------------------------------------------------------------------------------------

def test_zoo_objectives_are_what_the_rewards_compute():
    """Each objective names a reward function, and its shipped expert is the zoo's best at that reward (its
    metrics.json records every reward on its samples); on real digits from the zoo's data each reward moves the
    way its objective says; autograd agrees with DIFFERENTIABLE; the defaults are the ones the experts were
    evaluated with."""
    from bench.zoo.data import train_val_split

    paths = zoo.zoo_paths()
    assert tuple(paths) == EXPECTED_MEMBERS
    assert all(p.parent == zoo.ZOO_DIR for p in paths.values())
    assert zoo.scheduler_path() == paths["base"] / "scheduler"
    assert (zoo.scheduler_path() / "scheduler_config.json").is_file()
    assert zoo.OBJECTIVES == ("legible", "bold", "compressible") and set(zoo.OBJECTIVES) == set(R.REWARDS)
    metrics = {n: json.loads((paths[n] / "metrics.json").read_text()) for n in zoo.OBJECTIVES}
    for objective in zoo.OBJECTIVES:
        assert set(metrics[objective]["rewards"]) == set(R.REWARDS), objective
        assert max(zoo.OBJECTIVES, key=lambda n: metrics[n]["rewards"][objective]["mean"]) == objective
        assert metrics[objective]["eval_steps"] == zoo.DEFAULT_STEPS == 50
        assert metrics[objective]["guidance_scale"] == zoo.DEFAULT_GUIDANCE_SCALE > 1.0

    _, (digits, labels) = train_val_split()
    digits, labels = digits[:32], labels[:32]
    # legible: the requested digit is more probable than the next one
    assert (R.legible(digits, labels) > R.legible(digits, (labels + 1) % 10)).float().mean() >= 0.9
    # bold: thicker strokes (a 3x3 maximum filter) are more ink
    thick = torch.nn.functional.max_pool2d(digits, 3, stride=1, padding=1)
    assert (R.bold(thick, labels) > R.bold(digits, labels)).all()
    # compressible: the same digits with pixel noise cost more PNG bytes
    noisy = (digits + 0.5 * torch.randn(digits.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert (R.compressible(noisy, labels) < R.compressible(digits, labels)).all()
    assert R.DIFFERENTIABLE < set(R.REWARDS)
    x = digits[:2].clone().requires_grad_(True)
    for name, reward in R.REWARDS.items():
        assert reward(x, labels[:2]).requires_grad == (name in R.DIFFERENTIABLE), name


@pytest.fixture(scope="module")
def shipped_base():
    return _load(zoo.zoo_paths()["base"])


@pytest.mark.parametrize("name", EXPECTED_MEMBERS)
def test_shipped_member_loads(name, shipped_base):
    folder = zoo.zoo_paths()[name]
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file(), f"{weights} missing: the zoo must ship trained weights"
    assert weights.stat().st_size <= 3.2e6
    assert (folder / "README.md").is_file() and (folder / "metrics.json").is_file()
    m = _load(folder)
    cfg = m.config
    assert cfg.sample_size == 16 and cfg.in_channels == 1 and cfg.out_channels == 2
    assert cfg.num_class_embeds == 11
    assert tuple(cfg.block_out_channels) == tuple(UNET_CONFIG["block_out_channels"])
    # runs: [B, 1, 16, 16] -> [B, 2, 16, 16]
    with torch.no_grad():
        out = m(torch.zeros(2, 1, 16, 16), 500, class_labels=torch.tensor([3, 10])).sample
    assert out.shape == (2, 2, 16, 16) and torch.isfinite(out).all()
    if name != "base":  # a real fine-tune, not a copy of the base
        diff = max((a - b).abs().max().item() for a, b in zip(m.parameters(), shipped_base.parameters()))
        assert diff > 1e-4


def test_shipped_scheduler_and_classifier():
    from diffusers import DDPMScheduler

    s = DDPMScheduler.from_pretrained(str(zoo.scheduler_path()))
    for k in ("variance_type", "prediction_type", "clip_sample", "beta_schedule", "num_train_timesteps"):
        assert s.config[k] == SCHEDULER_CONFIG[k]
    assert s.config.variance_type == "learned_range" and s.config.prediction_type == "epsilon"
    # the reward classifier is small and accurate on the held-out split
    from bench.zoo.data import train_val_split

    assert zoo.classifier_path().stat().st_size < 1e6
    clf = R.load_classifier()
    _, (xv, yv) = train_val_split()
    with torch.no_grad():
        acc = (clf(xv).argmax(1) == yv).float().mean().item()
    assert acc >= 0.97
    meta = json.loads((zoo.ZOO_DIR / "base" / "metrics.json").read_text())
    assert meta["class_accuracy_default"]["n"] >= 500
    assert (zoo.ZOO_DIR / "README.md").is_file()


# ---------------------------------------------------------------------------------------------------------------
# rewards
# ---------------------------------------------------------------------------------------------------------------

def test_data_split_deterministic():
    from bench.zoo.data import train_val_split

    (a, b), (c, d) = train_val_split()
    (a2, b2), _ = train_val_split()
    assert a.shape == (1500, 1, 16, 16) and c.shape == (297, 1, 16, 16)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert a.min() >= -1 and a.max() <= 1


def test_rewards_shapes_ranges_determinism():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(6, 1, 16, 16, generator=g) * 2 - 1)
    y = torch.arange(6)
    for name, f in R.REWARDS.items():
        r1, r2 = f(x, y), f(x.clone(), y.clone())
        assert r1.shape == (6,) and r1.dtype == torch.float32, name
        assert torch.isfinite(r1).all(), name
        assert torch.equal(r1, r2), f"{name} is not deterministic"
    assert (R.legible(x, y) <= 0).all()
    b = R.bold(x, y)
    assert ((b >= 0) & (b <= 1)).all()
    assert torch.allclose(R.bold(-torch.ones(1, 1, 16, 16), y[:1]), torch.zeros(1))
    assert torch.allclose(R.bold(torch.ones(1, 1, 16, 16), y[:1]), torch.ones(1))
    # compressible: a blank image compresses better than noise
    blank, noise = -torch.ones(1, 1, 16, 16), x[:1]
    assert R.compressible(blank, y[:1]) > R.compressible(noise, y[:1])


def test_differentiable_rewards_have_gradients():
    x = torch.zeros(3, 1, 16, 16, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    for name in R.DIFFERENTIABLE:
        (gx,) = torch.autograd.grad(R.REWARDS[name](x, y).sum(), x)
        assert torch.isfinite(gx).all() and gx.abs().sum() > 0, name
    assert not R.compressible(x, y).requires_grad


# ---------------------------------------------------------------------------------------------------------------
# the recipes, tiny
# ---------------------------------------------------------------------------------------------------------------

def _run(*args):
    assert T.main(list(args) + ["--tiny", "--threads", "1"]) == 0


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_tiny_recipes_with_resume(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    # uninterrupted: 4 base steps
    _run("base", "--out", str(a), "--steps", "4")
    # interrupted: 2 steps, then the final output is lost (as if killed before saving), then resumed to 4
    _run("classifier", "--out", str(b), "--steps", "3")
    _run("base", "--out", str(b), "--steps", "2")
    ck = b / "_ckpt" / "base.safetensors"
    assert ck.is_file()
    shutil.rmtree(b / "base")
    _run("base", "--out", str(b), "--steps", "4")
    wa, wb = _weights(a / "base"), _weights(b / "base")
    assert wa.keys() == wb.keys()
    for k in wa:  # per-step randomness depends only on (seed, step): resuming is exact
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)
    from safetensors import safe_open

    with safe_open(str(ck), "pt") as f:
        assert json.loads(f.metadata()["meta"])["step"] == 4
        assert any(k.startswith("optim.") and k.endswith("exp_avg_sq") for k in f.keys())
    assert (b / "base" / "scheduler" / "scheduler_config.json").is_file()
    assert "class_accuracy_default" in json.loads((b / "base" / "metrics.json").read_text())

    # an expert: 1 iteration, killed, resumed to 2
    _run("expert", "--out", str(b), "--name", "bold", "--steps", "1")
    shutil.rmtree(b / "bold")
    _run("expert", "--out", str(b), "--name", "bold", "--steps", "2")
    with safe_open(str(b / "_ckpt" / "rl_bold.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    assert meta["iter"] == 2 and len(meta["history"]) == 2
    # an oracle
    _run("oracle", "--out", str(b), "--name", "0.5", "--steps", "1")
    for name in ("bold", "morl_legible_bold_w0.5"):
        assert (b / name / "README.md").is_file()
        m = json.loads((b / name / "metrics.json").read_text())
        assert set(m["rewards"]) == set(R.REWARDS)
        assert m["config"]["beta"] == zoo.KL_BETA
    durations = json.loads((b / "durations.json").read_text())
    assert {"classifier", "base", "expert:bold", "oracle:morl_legible_bold_w0.5"} <= set(durations)
    assert "| base |" in (b / "README.md").read_text()
    # a finished stage is skipped on re-run
    before = (b / "bold" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    _run("expert", "--out", str(b), "--name", "bold", "--steps", "2")
    assert (b / "bold" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before


def test_rl_step_gaussian_matches_diffusers_sampler(shipped_base):
    """The step Gaussian the RL recipe trains (msdda.schedule) is diffusers' DDPMScheduler.step for the zoo's
    config: with the same generator, both samplers draw the same noise and give the same images."""
    from bench.zoo.diffusion import sample_reference
    from bench.zoo.rl import StepTable, rollout

    cfg = json.loads((zoo.scheduler_path() / "scheduler_config.json").read_text())
    table = StepTable(cfg, zoo.DEFAULT_STEPS)
    labels = torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        ours, _ = rollout(shipped_base, table, labels, zoo.DEFAULT_GUIDANCE_SCALE, torch.Generator().manual_seed(5))
        ref = sample_reference(shipped_base, labels, steps=zoo.DEFAULT_STEPS,
                               guidance_scale=zoo.DEFAULT_GUIDANCE_SCALE, seed=5)
    # Both are float32 samplers of the same steps, but diffusers accumulates alphas_cumprod in float32 over the
    # schedule's T = 1000 training steps (relative error up to T * eps; msdda.schedule accumulates in float64), and
    # every step coefficient derives from it: the images agree to that, relative to their magnitude.
    T = json.loads((zoo.scheduler_path() / "scheduler_config.json").read_text())["num_train_timesteps"]
    tol = T * torch.finfo(torch.float32).eps * float(ref.abs().max())
    torch.testing.assert_close(ours, ref, rtol=0, atol=tol)
