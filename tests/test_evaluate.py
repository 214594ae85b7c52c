"""Zoo evaluation (bench/quality, bench/eval_zoo.py) on tiny stand-in models: hypervolume, Pareto filtering,
CoDe, RGG, and an end-to-end run of every strategy with resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import msdda
from bench import eval_zoo
from bench.quality import grids, pareto, samplers, scoring
from bench.quality.evaluate import RESULTS_JSON, RESULTS_MD, evaluate
from bench.quality.points import Evaluator, Item, resolve_models
from bench.quality.settings import STRATEGIES, EvalSettings
from msdda.kernels import fused_expert_step_ref, philox_normal
from msdda.sampling import sample
from msdda.zoo import OBJECTIVES, ORACLES
from msdda.zoo.rewards import bold
from tiny_models import make_tiny_unet2d, perturbed_copy

STEPS = 4


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def torch_step(monkeypatch):
    """Sample with the fused step's float32 torch path instead of the Triton interpreter: these tests are about
    the evaluation (the step itself is tested against its definition in test_fused_step.py), and the
    interpreter would dominate their time. The engine and these samplers use the same path, so comparisons
    between them stay exact."""
    from msdda.kernels import launch

    monkeypatch.setattr(launch, "TRITON_ON_CPU", False)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    """A zoo-shaped folder of tiny 16x16 class-conditional learned-variance UNets: base, experts, oracles."""
    root = tmp_path_factory.mktemp("tinyzoo")
    make_tiny_unet2d(root / "base", learned_variance=True, num_class_embeds=11, sample_size=16)
    for i, name in enumerate(OBJECTIVES + ORACLES):
        perturbed_copy(root / "base", root / name, seed=i + 1, scale=0.3)
    return root


@pytest.fixture(scope="module")
def base_engine(tiny_zoo):
    return msdda.Engine.from_pretrained(tiny_zoo / "base", {})


@pytest.fixture(scope="module")
def base_engine64(tiny_zoo):
    """The same base in float64: the twin that measures the float32 samplers' rounding error."""
    return msdda.Engine.from_pretrained(tiny_zoo / "base", {}, dtype=torch.float64)


@pytest.fixture(scope="module")
def zero_eps_engine(tmp_path_factory):
    """A base whose network outputs are identically 0 (eps = 0, variance channel 0): the Tweedie estimate is
    x_t / sqrt(abar_t), so d bold(x0_hat) / d x_t > 0 everywhere -- a case where RGG's direction is known."""
    from diffusers import UNet2DModel

    root = tmp_path_factory.mktemp("zero")
    make_tiny_unet2d(root / "base", learned_variance=True, num_class_embeds=11, sample_size=16)
    unet = UNet2DModel.from_pretrained(root / "base" / "unet")
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.zero_()
    unet.save_pretrained(root / "base" / "unet", safe_serialization=True)
    return msdda.Engine.from_pretrained(root / "base", {})


def _rewards():
    return scoring.make_rewards()


def float64_twin(engine64, labels, seeds, *, steps=STEPS, guidance_scale=2.0, strategy="base", weights=None,
                 noise=None) -> torch.Tensor:
    """``Engine.generate(..., output_type="latent")`` computed in float64 from the Engine's public seam: the same
    networks (an Engine built with dtype=float64), the same x_T and Philox step noise (or ``noise``), and the
    step's float64 definition (fused_expert_step_ref) in place of the float32 fused step."""
    B = len(seeds)
    cfg = engine64.uses_guidance(guidance_scale)
    g = float(guidance_scale) if cfg else None
    plan = engine64.plan(strategy, weights, batch=B)
    coeff = plan.coeff if plan.kind == "product" else torch.ones(B, 1, dtype=torch.float64)
    denoise = engine64.denoiser(plan, engine64.conditioning(B, cfg=cfg, class_labels=list(labels)), cfg)
    timesteps, scalars = engine64.step_tables(steps)
    seed_t = torch.tensor(list(seeds), dtype=torch.int64)

    def step(raw, x_t, i):
        z = {"noise": noise[i].double()} if noise is not None else {"seed": seed_t, "offset": 1 + i}
        return fused_expert_step_ref(raw, x_t, coeff, scalars[i], guidance_scale=g, **z)

    with torch.inference_mode():
        return sample(denoise, step, philox_normal(seed_t, 0, engine64.sample_shape).double(), timesteps)


def rounding_tolerance(x32: torch.Tensor, x64: torch.Tensor) -> float:
    """How far apart two float32 evaluations of one computation (differing only in summation order, e.g. batch
    size or backend kernels) may lie: each is within about its float32-vs-float64 error of the exact result
    (|x32 - x64| measures one), so they are within about twice that of each other; doubled again because the
    other evaluation's error is not the one measured, plus a floor of a few float32 ulps of the largest value."""
    eps = torch.finfo(torch.float32).eps
    return 4 * float((x32.double() - x64).abs().max()) + 4 * eps * float(x64.abs().max())


# ---------------------------------------------------------------------------------------------- hypervolume
def test_hypervolume_2d_hand_computed():
    pts = [(1, 3), (2, 2), (3, 1)]
    assert pareto.hypervolume(pts, (0, 0)) == 6.0          # 1*3 + 1*2 + 1*1
    assert pareto.hypervolume(pts + [(1, 1), (0.5, 2.5)], (0, 0)) == 6.0   # dominated points add nothing
    assert pareto.hypervolume(pts, (-1, -1)) == 13.0       # 2*4 + 1*3 + 1*2
    assert pareto.hypervolume([(2, 5)], (1, 1)) == 4.0
    assert pareto.hypervolume([(0.5, 9), (3, 0.5)], (1, 1)) == 0.0        # nothing strictly above the reference
    assert pareto.hypervolume([(2, 2), (2, 2)], (0, 0)) == 4.0   # duplicates count once
    assert pareto.hypervolume([], (0, 0)) == 0.0


def test_hypervolume_3d_hand_computed():
    assert pareto.hypervolume([(2, 3, 4)], (0, 0, 0)) == 24.0
    assert pareto.hypervolume([(2, 2, 1), (1, 1, 2)], (0, 0, 0)) == 5.0    # 4 + 2 - 1
    # three boxes of volume 3, pairwise overlaps 1, triple overlap 1: 9 - 3 + 1
    assert pareto.hypervolume([(3, 1, 1), (1, 3, 1), (1, 1, 3)], (0, 0, 0)) == 7.0
    # equal last objective: the 2D area times the height
    assert pareto.hypervolume([(1, 3, 2), (2, 2, 2), (3, 1, 2)], (0, 0, 0)) == 12.0
    assert pareto.hypervolume([(1, 3, 2), (2, 2, 2), (3, 1, 2)], (0, 0, 1)) == 6.0


def test_hypervolume_3d_matches_inclusion_exclusion():
    """Exact union volume of random boxes by inclusion-exclusion over all subsets."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        pts = rng.uniform(0.1, 1.0, size=(6, 3))
        ref = np.zeros(3)
        total = 0.0
        for mask in range(1, 2 ** len(pts)):
            sub = pts[[i for i in range(len(pts)) if mask >> i & 1]]
            total += (-1) ** (len(sub) + 1) * np.prod(sub.min(axis=0) - ref)
        # float64 rounding: one ulp of each of the 2**n - 1 terms, all at most 1 in size
        assert pareto.hypervolume(pts, ref) == pytest.approx(total, rel=0, abs=2 ** len(pts) * np.finfo(float).eps)


def test_pareto_mask():
    pts = np.array([[1, 3], [2, 2], [3, 1], [1, 1], [2, 2], [0.5, 3], [3, 0.5]])
    assert pareto.pareto_mask(pts).tolist() == [True, True, True, False, True, False, False]
    assert pareto.pareto_mask(np.array([[1, 1, 1], [1, 1, 2], [0, 5, 0]])).tolist() == [False, True, True]


def test_weight_grids():
    pw = grids.pair_weights(("legible", "bold"), 0.1)
    assert len(pw) == 11 and pw[0] == {"legible": 0.0, "bold": 1.0} and pw[-1] == {"legible": 1.0, "bold": 0.0}
    sw = grids.simplex_weights(OBJECTIVES, 0.2)
    # each weight is rounded to 10 decimals, so the sum of three is 1 to within 3 * 0.5e-10
    assert len(sw) == 21 and all(abs(sum(w.values()) - 1) <= 1.5e-10 for w in sw)
    pair_keys = {grids.canonical_weights(w) for a, b in grids.combinations()[:3] for w in grids.pair_weights((a, b), 0.1)}
    edges = [w for w in sw if min(w.values()) == 0]
    assert len(edges) == 15 and all(grids.canonical_weights(w) in pair_keys for w in edges)   # only 6 new points
    assert len(grids.simplex_weights(OBJECTIVES, 0.25)) == 15
    with pytest.raises(ValueError):
        EvalSettings(pair_step=0.3).validate()


# ---------------------------------------------------------------------------------------------- CoDe
def _base(engine, seeds, labels, steps=STEPS):
    return engine.generate(class_labels=labels, num_images=len(seeds), seed=[int(s) for s in seeds], steps=steps,
                           guidance_scale=2.0, strategy="base", output_type="latent").latents


def test_code_with_one_candidate_is_the_base_sampler(base_engine):
    seeds, labels = [3, 4, 5], [0, 1, 2]
    x = samplers.code_sample(base_engine, labels, seeds, {"bold": 1.0}, _rewards(), steps=STEPS, guidance_scale=2.0,
                      n_candidates=1, block=2)     # two blocks: exercises the reuse of the block-end output
    # the very same operations on the same batch as Engine.generate: equal to the bit
    torch.testing.assert_close(x, _base(base_engine, seeds, labels), atol=0, rtol=0)


def test_code_picks_the_best_candidate(base_engine, base_engine64):
    """One block spanning the whole chain: CoDe must return, per sample, the best-scoring of N base-model
    chains that start from the sample's own x_T and draw their step noise with the candidate seeds."""
    seeds, labels, n = [10, 11, 12], [7, 2, 9], 3
    weights = {"legible": 0.3, "bold": 0.7}
    rewards = _rewards()
    x = samplers.code_sample(base_engine, labels, seeds, weights, rewards, steps=STEPS, guidance_scale=2.0,
                      n_candidates=n, block=STEPS)
    shape = base_engine.sample_shape
    x_T = philox_normal(torch.tensor(seeds), 0, shape)
    cand = samplers.candidate_seeds(seeds, n).view(n, len(seeds))
    noise = [torch.stack([philox_normal(cand[j], 1 + i, shape) for i in range(STEPS)]) for j in range(n)]
    xs = torch.stack([base_engine.generate(
        class_labels=labels, num_images=len(seeds), steps=STEPS, guidance_scale=2.0, strategy="base",
        latents=x_T, noise=noise[j], output_type="latent").latents for j in range(n)])      # [N, B, ...]
    lab = torch.tensor(labels)
    scores = torch.stack([scoring.weighted_reward(xs[j].clamp(-1, 1), lab, weights, rewards) for j in range(n)])
    best = scores.argmax(0)
    # CoDe runs the candidates as one batch of N * B, the reference per candidate: the same float32 computation
    # in another summation order, so they agree to the chain's float32 rounding
    x64 = torch.stack([float64_twin(base_engine64, labels, seeds, noise=noise[j]) for j in range(n)])
    tol = rounding_tolerance(xs, x64)
    torch.testing.assert_close(x, xs[best, torch.arange(len(seeds))], atol=tol, rtol=0)
    assert not torch.equal(xs[0], xs[1])                               # the candidates really differ


# ---------------------------------------------------------------------------------------------- RGG
def test_rgg_with_scale_zero_is_the_base_sampler(base_engine):
    seeds, labels = [1, 2], [4, 5]
    x = samplers.rgg_sample(base_engine, labels, seeds, {"legible": 0.5, "bold": 0.5}, _rewards(), steps=STEPS,
                     guidance_scale=2.0, scale=0.0)
    torch.testing.assert_close(x, _base(base_engine, seeds, labels), atol=0, rtol=0)     # the same operations


def test_rgg_moves_the_reward_the_right_way(zero_eps_engine):
    seeds, labels = [0, 1, 2, 3], [0, 1, 2, 3]
    base = _base(zero_eps_engine, seeds, labels)
    guided = samplers.rgg_sample(zero_eps_engine, labels, seeds, {"bold": 1.0}, _rewards(), steps=STEPS,
                          guidance_scale=2.0, scale=20.0)
    lab = torch.tensor(labels)
    # every pixel moved up (where the step clips x0 it may only stay, up to a float32 ulp of its value)
    assert bool((guided >= base - torch.finfo(torch.float32).eps * base.abs()).all())
    assert bool((bold(guided, lab) > bold(base, lab)).all())          # bolder, sample by sample
    with pytest.raises(ValueError, match="differentiable"):
        samplers.rgg_sample(zero_eps_engine, labels, seeds, {"compressible": 1.0}, _rewards(), steps=STEPS,
                     guidance_scale=2.0, scale=1.0, differentiable={"legible", "bold"})


# ---------------------------------------------------------------------------------------------- end to end
SMALL = EvalSettings(samples=2, steps=2, pair_step=0.5, triple_step=0.5, code_candidates=2, code_block=1,
                       batch_size=2, timing_images=1, grid_images=2, bootstrap=20)
PAIR = ("legible", "bold")
QUIET = dict(progress=False, log=lambda m: None)


@pytest.mark.slow
def test_end_to_end_every_strategy_then_resume(tiny_zoo, tmp_path):
    out = tmp_path / "results"
    res = evaluate(out=out, settings=SMALL, zoo_root=tiny_zoo, combos=[PAIR], **QUIET)
    # files: everything inside the folder `out`
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    assert (out / RESULTS_JSON).exists() and (out / RESULTS_MD).exists()
    assert (out / "pareto_legible_bold.png").exists()
    for s in STRATEGIES:
        assert (out / f"grid_{s}.png").exists(), s
    saved = json.loads((out / RESULTS_JSON).read_text())
    lb = saved["combinations"]["legible+bold"]
    assert set(lb["strategies"]) == set(STRATEGIES)
    for s, e in lb["strategies"].items():
        assert e["hypervolume"] >= 0 and all(np.isfinite(list(p["mean"].values())).all() for p in e["points"])
        assert e["n_points"] == {"base": 1, "oracle": 3}.get(s, 3)
    assert [row["w"] for row in lb["oracle_comparison"]] == [0.2, 0.5, 0.8]
    assert "msdda" in lb["oracle_comparison"][1]["strategies"]        # w = 0.5 is on the grid
    assert set(saved["timing"]["seconds_per_image"]) == set(STRATEGIES)
    assert "**msdda**" in (out / RESULTS_MD).read_text()
    n_items = len(res["run"]["computed"])
    assert n_items == 1 + 3 + 3 * 5 and not res["run"]["skipped"]    # base, 3 oracles, 3 points x 5 strategies

    # resume: nothing recomputed, same numbers
    again = evaluate(out=out, settings=SMALL, zoo_root=tiny_zoo, combos=[PAIR], **QUIET)
    assert again["run"]["computed"] == [] and len(again["run"]["skipped"]) == n_items
    assert again["combinations"]["legible+bold"]["strategies"]["msdda"]["hypervolume"] == \
        lb["strategies"]["msdda"]["hypervolume"]

    # a missing and a damaged cache file are recomputed, and only those
    (cache,) = (out / "cache").iterdir()                                 # one folder per run-level setting
    assert cache.name == "n2_s2_g2_seed0"
    (cache / "msdda__legible-0.5000_bold-0.5000.json").unlink()
    (cache / "soup__bold-1.0000.json").write_text('{"truncated": ')
    third = evaluate(out=out, settings=SMALL, zoo_root=tiny_zoo, combos=[PAIR], timing=False, **QUIET)
    assert sorted(third["run"]["computed"]) == ["msdda/legible-0.5000_bold-0.5000", "soup/bold-1.0000"]
    # paired samples: the recomputed point is identical to the first run's
    m1 = [p for p in lb["strategies"]["msdda"]["points"] if p["weights"] == {"legible": 0.5, "bold": 0.5}][0]
    m3 = [p for p in third["combinations"]["legible+bold"]["strategies"]["msdda"]["points"]
          if p["weights"] == {"legible": 0.5, "bold": 0.5}][0]
    assert m1["mean"] == m3["mean"]                     # the same computation in the same process: to the bit


def test_points_are_shared_by_the_models_they_use_and_legacy_records_are_read(tiny_zoo, tmp_path):
    """--reuse-from: another evaluation's point is taken exactly when its fingerprint is this run's, i.e. the
    same settings and the same files for the models that point uses. Here run B swaps the legible expert for
    another file: the base, CoDe (steered base) and msdda at bold = 1 are reused, the points that weight the
    swapped expert are recomputed. A record with the pre-scoping fingerprint (every model the Engine held) is
    still read, and rewritten with the scoped one."""
    kw = dict(settings=SMALL, zoo_root=tiny_zoo, combos=[PAIR], strategies=["base", "code", "msdda"],
              timing=False, plots=False, **QUIET)
    a = evaluate(out=tmp_path / "a", **kw)
    assert len(a["run"]["computed"]) == 1 + 3 + 3
    b = evaluate(out=tmp_path / "b", models={"legible": tiny_zoo / "compressible"}, reuse_from=[tmp_path / "a"], **kw)
    assert sorted(b["run"]["computed"]) == ["msdda/legible-0.5000_bold-0.5000", "msdda/legible-1.0000"]
    assert len(b["run"]["skipped"]) == 5
    (cache_a,) = (tmp_path / "a" / "cache").iterdir()
    cache_b = tmp_path / "b" / "cache" / cache_a.name
    for key in b["run"]["skipped"]:
        name = key.replace("/", "__") + ".json"
        rec_a, rec_b = (json.loads((c / name).read_text()) for c in (cache_a, cache_b))
        assert rec_b["reused_from"] == str(cache_a) and rec_b["rewards"] == rec_a["rewards"]

    paths = resolve_models(tiny_zoo, None, PAIR, [])
    ev = Evaluator(paths, SMALL)
    item = Item("msdda", (("bold", 1.0),))                    # uses base and bold, not legible
    path = cache_a / "msdda__bold-1.0000.json"
    rec = json.loads(path.read_text())
    assert rec["fingerprint"] == ev.fingerprint(item) != ev.legacy_fingerprint("msdda")
    path.write_text(json.dumps({**rec, "fingerprint": ev.legacy_fingerprint("msdda")}))
    again = evaluate(out=tmp_path / "a", **{**kw, "strategies": ["msdda"]})
    assert again["run"]["computed"] == []
    assert json.loads(path.read_text())["fingerprint"] == ev.fingerprint(item)


@pytest.mark.slow
def test_triple_reuses_pair_points_and_changed_settings_recompute(tiny_zoo, tmp_path):
    out = tmp_path / "e"
    kw = dict(zoo_root=tiny_zoo, combos=[PAIR, OBJECTIVES], strategies=["msdda", "code"], timing=False,
              plots=False, **QUIET)
    res = evaluate(out=out, settings=SMALL, **kw)
    # pair: 3 points; triple at step 0.5: 6 points, 3 of them (legible, bold, legible=bold=0.5) the pair's
    assert len(res["run"]["computed"]) == 2 * 6
    tri = res["combinations"]["legible+bold+compressible"]
    assert tri["strategies"]["msdda"]["n_points"] == 6 and len(tri["reference_point"]) == 3
    assert tri["strategies"]["msdda"]["hypervolume"] >= 0
    again = evaluate(out=out, settings=EvalSettings(**{**SMALL.__dict__, "code_candidates": 3}), **kw)
    assert len(again["run"]["computed"]) == 6 and all(k.startswith("code/") for k in again["run"]["computed"])


def test_command_line_reports_missing_models_in_one_line(tmp_path, capsys):
    assert eval_zoo.main(["--quick", "--out", str(tmp_path / "q"), "--zoo-root", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("eval_zoo: error: zoo models not found: base")
    assert not any("Traceback" in line for line in err)


@pytest.mark.slow
def test_onnxruntime_backend_matches_torch_and_records_backends(tiny_zoo, tmp_path):
    """--backend onnxruntime: the same samples as torch up to float rounding (so the two may share a cache);
    RGG still runs on torch (it needs autograd) and each point says which backend produced it."""
    pytest.importorskip("onnxruntime")
    kw = dict(settings=SMALL, zoo_root=tiny_zoo, combos=[PAIR], strategies=["msdda", "code", "rgg"],
              timing=False, plots=False, **QUIET)
    ref = evaluate(out=tmp_path / "t", **kw)
    ort = evaluate(out=tmp_path / "o", backend="onnxruntime", **kw)
    assert not ort["run"]["skipped"]
    for a, b in zip(*(r["combinations"]["legible+bold"]["strategies"]["rgg"]["points"] for r in (ref, ort))):
        assert a["mean"] == b["mean"]                                  # torch under either backend
    cache = next((tmp_path / "o" / "cache").iterdir())
    backends = {json.loads(p.read_text())["strategy"]: json.loads(p.read_text())["backend"]
                for p in cache.glob("*.json")}
    assert backends == {"msdda": "onnxruntime", "code": "onnxruntime", "rgg": "torch"}
    assert ort["settings"]["point_backends"] == ["onnxruntime", "torch"]

    # the samples themselves: ORT's float32 kernels against torch's, within the composition's float32 rounding
    experts = {name: tiny_zoo / name for name in PAIR}
    gen = dict(class_labels=[0, 1], seed=[0, 1], num_images=2, steps=SMALL.steps, guidance_scale=2.0,
               weights={"legible": 0.5, "bold": 0.5}, output_type="latent")
    x_torch = msdda.Engine.from_pretrained(tiny_zoo / "base", experts).generate(**gen).latents
    x_ort = msdda.Engine.from_pretrained(tiny_zoo / "base", experts, backend="onnxruntime").generate(**gen).latents
    x64 = float64_twin(msdda.Engine.from_pretrained(tiny_zoo / "base", experts, dtype=torch.float64), [0, 1], [0, 1],
                       steps=SMALL.steps, strategy="msdda", weights=gen["weights"])
    torch.testing.assert_close(x_ort, x_torch, atol=rounding_tolerance(x_torch, x64), rtol=0)
