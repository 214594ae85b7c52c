"""Step-level aligned experts with a learned variance: the zoo's second flavour
(``msdda.zoo.zoo_paths(flavour="step")``).

The experts of rl.py are trained by trajectory-level policy gradient, which barely moves the variance channel, so
their step Gaussians have nearly the base's variance and MSDDA's product equals averaging on them. This recipe
instead distils each expert's *step-level* KL-regularised optimum, the distribution the paper's theorem is about:

    pi_k(x_{t-1} | x_t)  ∝  p_base(x_{t-1} | x_t) * exp(V_k(x_{t-1}) / beta)

by self-normalised importance sampling from the base transition, then fits the expert's Gaussian step (its eps
channel for the mean, its learned-range variance channel for the variance) to it.

1. Targets (``build_targets``, shared by every expert). ``n_traj`` seeded base trajectories (the guided DDPM sampler
   of the base, as rl.py's ``rollout``; labels 0..9 in turn). At every stochastic step i of every trajectory, the
   state x_t, the base step N(mu_b, var_b) and M proposals x^m = mu_b + sqrt(var_b) z^m. Each proposal's value
   is V_k(x^m) = r_k(x0_hat(x^m)) / s_k: the raw reward of the base's (guided, clipped) one-step x0 prediction at
   x^m and the next timestep, divided by the same fixed scale s_k as rl.py (std of r_k over base samples).
   Self-normalised weights w_m ∝ exp(V_k(x^m) / beta) (beta = KL_BETA, rl.py's) give, per pixel, the tilted
   distribution's weighted mean m_k = sum_m w_m x^m and weighted (plain, not bias-corrected) variance
   v_k = sum_m w_m (x^m - m_k)^2, and the effective sample size ESS = 1 / sum_m w_m^2 (reported).
2. Fit (``fit_expert``). A copy of the base UNet is trained on the weighted Gaussian negative log-likelihood of
   the proposals under its own guided step N(mu, var) (msdda.kernels.gaussian_step, what the engine composes):

       loss = mean over states and pixels of  sum_m w_m [ log var + (x^m - mu)^2 / var ] / 2
            = mean of  [ log var + (v_k + (m_k - mu)^2) / var ] / 2                 (``weighted_nll``)

   Its minimiser at one state is exactly (mu, var) = (m_k, v_k), the moments of the weighted proposals
   (tests/test_zoo_step.py checks both identities against brute force). Across states the network cannot follow
   each state's sampling noise; where it settles on the population mean, E[v_k + (m_k - mu)^2] is the tilted
   variance without the (1 - sum w^2) shrinkage of the plain weighted variance (exactly so for equal weights), so no
   separate bias correction is applied.

What this approximates, honestly:
- V_k is a one-step x0-prediction value, not the soft value beta * log E[exp(r_k(x_0)/beta) | x_{t-1}] the exact
  step-level optimum uses; it ignores the noise still to come.
- Self-normalised importance sampling with M proposals is biased for small ESS; ESS per timestep is recorded.
- States come from the base's trajectories, not the expert's own (the off-policy states of a distillation).
- The step Gaussians are diagonal: the tilt of a scalar value changes the covariance mostly along the value's
  gradient, and a per-pixel variance can only show its diagonal part.

Everything is seeded; targets are cached in chunks and the fit checkpoints (safetensors) and resumes.
"""
from __future__ import annotations

import copy
import json
import math
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from msdda.kernels import apply_guidance, gaussian_step
from msdda.schedule import schedule_from_diffusers_config
from msdda.zoo import (DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, KL_BETA, NULL_CLASS, NUM_CLASSES, OBJECTIVES, ZOO_DIR,
                       zoo_paths)

from .ckpt import load_checkpoint, save_checkpoint
from .common import format_seconds, log, read_json, record_duration, seeded_generator, write_card, write_json
from .diffusion import guided_output
from .rl import VAR_PROBE_T, StepTable, reward_scales, rollout, variance_stats

__all__ = ["StepConfig", "weighted_moments", "weighted_nll", "build_targets", "fit_expert", "train_step_experts"]


@dataclass
class StepConfig:
    n_traj: int = 10              # base trajectories whose states are the training set
    chunk: int = 10               # trajectories per cached target chunk
    proposals: int = 16           # M: proposals per state
    sample_steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    beta: float = KL_BETA
    fit_steps: int = 100
    batch: int = 16               # states per optimizer step (all at one timestep)
    lr: float = 2e-4
    grad_clip: float = 1.0
    eval_n: int = 30

    @classmethod
    def tiny(cls) -> "StepConfig":
        return cls(n_traj=2, chunk=2, proposals=4, sample_steps=4, fit_steps=2, batch=4, eval_n=4)


def weighted_moments(samples: torch.Tensor, log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-normalised importance moments over the leading (proposal) axis.

    samples [M, B, ...], log_w [M, B] (unnormalised log-weights) -> (mean [B, ...], var [B, ...], ess [B]) with
    w = softmax(log_w) over M, mean = sum w x, var = sum w (x - mean)^2 (plain: the minimiser of the weighted
    Gaussian NLL), ess = 1 / sum w^2."""
    w = torch.softmax(log_w.double(), dim=0)
    wx = w.view(*w.shape, *([1] * (samples.dim() - 2)))
    x = samples.double()
    mean = (wx * x).sum(0)
    var = (wx * (x - mean).pow(2)).sum(0)
    ess = 1.0 / w.pow(2).sum(0)
    return mean.to(samples.dtype), var.to(samples.dtype), ess.to(samples.dtype)


def weighted_nll(mu: torch.Tensor, var: torch.Tensor, target_mean: torch.Tensor,
                 target_var: torch.Tensor) -> torch.Tensor:
    """Per-element sum_m w_m [log var + (x^m - mu)^2 / var] / 2 written with the proposals' weighted moments
    (equal to it exactly: sum w (x - mu)^2 = v + (m - mu)^2). Minimised at (mu, var) = (target_mean, target_var)."""
    return 0.5 * (var.log() + (target_var + (target_mean - mu).pow(2)) / var)


def _x0_from_eps(x: torch.Tensor, eps: torch.Tensor, abar: float) -> torch.Tensor:
    return ((x - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)).clamp(-1.0, 1.0)


def _reward_table(scales: dict[str, float], classifier_file: Path):
    """(x [N,1,16,16], labels [N]) -> {objective: r_k / s_k [N]} for every objective."""
    from msdda.zoo.rewards import REWARDS, load_classifier

    clf = load_classifier(classifier_file)

    def f(x, y):
        return {k: (REWARDS[k](x, y, classifier=clf) if k == "legible" else REWARDS[k](x, y)).float() / scales[k]
                for k in OBJECTIVES}

    return f


def _load_unet(path: Path):
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(str(path), low_cpu_mem_usage=False)


@torch.no_grad()
def _targets_chunk(base, table: StepTable, abar, labels, cfg: StepConfig, g: torch.Generator, rfn) -> dict:
    """Targets of one chunk of trajectories: every stochastic step's state, its moments per objective, its ESS."""
    _, traj = rollout(base, table, labels, cfg.guidance_scale, g)
    b, m = labels.shape[0], cfg.proposals
    rows: dict[str, list[torch.Tensor]] = {"x_t": [], "step": [], "label": []}
    for k in OBJECTIVES:
        for part in ("mean", "var", "ess", "v_spread"):
            rows[f"{k}.{part}"] = []
    for i in table.stochastic:
        t, t_next = table.timesteps[i], table.timesteps[i + 1]
        x_t = traj[i]
        mu_b, var_b, _ = gaussian_step(guided_output(base, x_t, t, labels, cfg.guidance_scale), x_t, table.scalars[i])
        z = torch.randn((m, *x_t.shape), generator=g)
        props = mu_b + var_b.sqrt() * z                                               # [M, B, 1, 16, 16]
        flat = props.flatten(0, 1)
        lab = labels.repeat(m)
        eps = guided_output(base, flat, t_next, lab, cfg.guidance_scale)[:, :1]
        values = rfn(_x0_from_eps(flat, eps, float(abar[t_next])), lab)
        rows["x_t"].append(x_t)
        rows["step"].append(torch.full((b,), i, dtype=torch.int64))
        rows["label"].append(labels.clone())
        for k, v in values.items():
            v = v.view(m, b)
            mean, var, ess = weighted_moments(props, v / cfg.beta)
            rows[f"{k}.mean"].append(mean)
            rows[f"{k}.var"].append(var)
            rows[f"{k}.ess"].append(ess)
            rows[f"{k}.v_spread"].append(v.std(0))
    return {k: torch.cat(v).contiguous() for k, v in rows.items()}


def build_targets(base_dir: Path, classifier_file: Path, scales: dict[str, float], ckpt_dir: Path, cfg: StepConfig,
                  *, seed: int) -> dict[str, torch.Tensor]:
    """All chunks (computed once, cached as safetensors in ckpt_dir, reused by every expert and on resume)."""
    sched_cfg = json.loads((base_dir / "scheduler" / "scheduler_config.json").read_text())
    table = StepTable(sched_cfg, cfg.sample_steps)
    abar = schedule_from_diffusers_config(sched_cfg)[0].alphas_cumprod
    base = None
    rfn = _reward_table(scales, classifier_file)
    chunks = []
    tag = f"M{cfg.proposals}_S{cfg.sample_steps}_g{cfg.guidance_scale}_b{cfg.beta}_seed{seed}"
    for c in range((cfg.n_traj + cfg.chunk - 1) // cfg.chunk):
        path = ckpt_dir / f"step_targets_{tag}_chunk{c}.safetensors"
        if not path.exists():
            if base is None:
                base = _load_unet(base_dir / "unet").eval()
            t0 = time.time()
            n = min(cfg.chunk, cfg.n_traj - c * cfg.chunk)
            labels = (torch.arange(n) + c * cfg.chunk) % NUM_CLASSES
            data = _targets_chunk(base, table, abar, labels, cfg, seeded_generator(seed, c, 77), rfn)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            save_file(data, str(tmp))
            tmp.replace(path)
            log(f"step targets: chunk {c + 1} ({n} trajectories, {data['x_t'].shape[0]} states) in "
                f"{time.time() - t0:.0f}s; ESS mean "
                + " ".join(f"{k} {data[f'{k}.ess'].mean():.2f}" for k in OBJECTIVES))
        chunks.append(load_file(str(path)))
    return {k: torch.cat([ch[k] for ch in chunks]) for k in chunks[0]}


def ess_by_timestep(targets: dict[str, torch.Tensor], table: StepTable) -> dict[str, dict[str, float]]:
    """{objective: {t: mean ESS}} at VAR_PROBE_T (and the mean of the values' spread over proposals)."""
    res: dict[str, dict[str, float]] = {}
    for k in OBJECTIVES:
        res[k] = {}
        res[f"{k}.value_std"] = {}
        for i in table.stochastic:
            t = table.timesteps[i]
            if t in VAR_PROBE_T:
                sel = targets["step"] == i
                res[k][str(t)] = round(targets[f"{k}.ess"][sel].mean().item(), 3)
                res[f"{k}.value_std"][str(t)] = round(targets[f"{k}.v_spread"][sel].mean().item(), 4)
    return res


def fit_expert(base_dir: Path, out: Path, ckpt_dir: Path, name: str, targets: dict[str, torch.Tensor],
               cfg: StepConfig, *, seed: int, force: bool) -> float | None:
    """Fit a copy of the base to the weighted proposals of objective ``name``; saves out/<name>/unet. Returns the
    training seconds (None when the expert already exists)."""
    folder = out / name
    if (folder / "unet" / "config.json").exists() and not force:
        log(f"step {name}: {folder} exists, skipping (--force to rebuild)")
        return None
    sched_cfg = json.loads((base_dir / "scheduler" / "scheduler_config.json").read_text())
    table = StepTable(sched_cfg, cfg.sample_steps)
    policy = _load_unet(base_dir / "unet").train()
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    ck = ckpt_dir / f"step_{name}.safetensors"
    meta = (load_checkpoint(ck, policy, opt) if not force else None) or {"step": 0, "elapsed": 0.0, "history": []}
    if meta["step"]:
        log(f"step {name}: resuming from step {meta['step']} ({meta['elapsed']:.0f}s already spent)")
    n_states = targets["x_t"].shape[0]
    salt = zlib.crc32(("step:" + name).encode()) % 10_000
    t0, last = time.time() - meta["elapsed"], time.time()
    hist = meta["history"]
    for step in range(meta["step"], cfg.fit_steps):
        g = seeded_generator(seed, step, salt)
        # one sampler step per optimizer step (the step Gaussian's scalars are per timestep, so a batch at one
        # timestep is one UNet call), states drawn at random among that step's
        i = table.stochastic[int(torch.randint(0, len(table.stochastic), (1,), generator=g))]
        at_i = (targets["step"] == i).nonzero().squeeze(1)
        idx = at_i[torch.randint(0, at_i.numel(), (cfg.batch,), generator=g)]
        x_t, labels = targets["x_t"][idx], targets["label"][idx]
        tm, tv = targets[f"{name}.mean"][idx], targets[f"{name}.var"][idx]
        opt.zero_grad(set_to_none=True)
        t = table.timesteps[i]
        # the guided step, with the gradient through the conditional half only: no backward pass through the
        # null-class half, which moves only through the weights it shares with the conditional one
        with torch.no_grad():
            out_null = policy(x_t, t, class_labels=torch.full_like(labels, NULL_CLASS)).sample
        out_cond = policy(x_t, t, class_labels=labels).sample
        out_ = apply_guidance(torch.stack([out_null, out_cond]), x_t, cfg.guidance_scale)
        mu, var, _ = gaussian_step(out_, x_t, table.scalars[i])
        # relative to the per-element minimum (at mu = m, var = v), so the loss is >= 0 and comparable across t
        loss = (weighted_nll(mu, var, tm, tv) - 0.5 * (tv.log() + 1.0)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        opt.step()
        hist.append(round(loss.item(), 5))
        if (step + 1) % 25 == 0 or step == 0:
            el = time.time() - t0
            recent = hist[-25:]
            log(f"step {name} {step + 1}/{cfg.fit_steps} loss {sum(recent) / len(recent):.4f} ({el:.0f}s)")
        if time.time() - last > 45 or step + 1 == cfg.fit_steps:
            save_checkpoint(ck, policy, opt, {"step": step + 1, "elapsed": time.time() - t0, "history": hist})
            last = time.time()
    policy.eval()
    folder.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(str(folder / "unet"), safe_serialization=True)
    elapsed = time.time() - t0
    log(f"step {name}: fitted {cfg.fit_steps} steps in {elapsed:.0f}s; saved to {folder}")
    write_json(folder / "fit.json", {"config": asdict(cfg), "seed": seed, "train_duration_s": elapsed,
                                     "loss_first10": hist[:10], "loss_last10": hist[-10:]})
    return elapsed


@torch.no_grad()
def mean_rewards(models: dict[str, Path], zoo_root: Path, cfg: StepConfig, *, seed: int) -> dict:
    """Each member's mean raw rewards and class accuracy on one seeded draw (same labels and noise for all)."""
    from msdda.zoo.rewards import REWARDS, load_classifier

    sched_cfg = json.loads((zoo_root / "base" / "scheduler" / "scheduler_config.json").read_text())
    table = StepTable(sched_cfg, cfg.sample_steps)
    clf = load_classifier(zoo_root / "classifier.safetensors")
    labels = torch.arange(cfg.eval_n) % NUM_CLASSES
    res = {}
    for name, path in models.items():
        x0, _ = rollout(_load_unet(path / "unet").eval(), table, labels, cfg.guidance_scale,
                        torch.Generator().manual_seed(seed + 4242))
        r = {k: (f(x0, labels, classifier=clf) if k == "legible" else f(x0, labels)) for k, f in REWARDS.items()}
        res[name] = {"rewards": {k: {"mean": v.mean().item(), "sem": (v.std() / math.sqrt(len(v))).item()}
                                 for k, v in r.items()},
                     "class_accuracy": (clf(x0).argmax(1) == labels).float().mean().item()}
        log(f"eval {name}: " + " ".join(f"{k} {v['mean']:.4f}" for k, v in res[name]["rewards"].items())
            + f" acc {res[name]['class_accuracy']:.3f}")
    return res


def train_step_experts(out: Path, ckpt_dir: Path, *, zoo_root: Path = ZOO_DIR, names=None, steps=None, tiny=False,
                       seed=0, force=False, measure: bool = True) -> dict:
    """The whole recipe: targets, one fit per objective, then (``measure``) rewards and variance statistics
    (out/summary.json, out/variance_stats.json: the default zoo's RL experts and these, at the same base states).
    ``measure=False`` (--fit-only) lets the fits run as separate processes, with one measuring run after them."""
    cfg = StepConfig.tiny() if tiny else StepConfig()
    if steps is not None:
        cfg.fit_steps = steps
    names = list(names or OBJECTIVES)
    bad = [n for n in names if n not in OBJECTIVES]
    if bad:
        raise SystemExit(f"unknown objective {bad[0]!r}; expected one of {OBJECTIVES}")
    base_dir = zoo_root / "base"
    scales = reward_scales(zoo_root)
    t0 = time.time()
    targets = build_targets(base_dir, zoo_root / "classifier.safetensors", scales, ckpt_dir, cfg, seed=seed)
    t_targets = time.time() - t0
    table = StepTable(json.loads((base_dir / "scheduler" / "scheduler_config.json").read_text()), cfg.sample_steps)
    summary = read_json(out / "summary.json", {})
    summary.update({"config": asdict(cfg), "seed": seed, "reward_scales": scales,
                    "n_states": int(targets["x_t"].shape[0]), "ess_by_t": ess_by_timestep(targets, table)})
    if t_targets > 1.0:
        record_duration(out, "step:targets", t_targets)
    for name in names:
        el = fit_expert(base_dir, out, ckpt_dir, name, targets, cfg, seed=seed, force=force)
        if el is not None:
            record_duration(out, f"step:{name}", el)
    if not measure:
        return summary
    done = {n: out / n for n in OBJECTIVES if (out / n / "unet" / "config.json").exists()}
    for n, folder in done.items():      # again here, sequentially: --fit-only runs in parallel can race on the file
        fit = read_json(folder / "fit.json", {})
        if "train_duration_s" in fit:
            record_duration(out, f"step:{n}", fit["train_duration_s"])
    default = zoo_paths(zoo_root)
    members = {"base": default["base"], **{f"rl:{k}": default[k] for k in done},
               **{f"step:{k}": p for k, p in done.items()}}
    # rewards of the base and the new experts only (the RL experts' are in the default zoo's rl_summary.json)
    summary["mean_rewards"] = mean_rewards({k: p for k, p in members.items() if not k.startswith("rl:")}, zoo_root,
                                           cfg, seed=seed)
    write_json(out / "summary.json", summary)
    stats = variance_stats(out, n=8 if tiny else 30, seed=seed, steps=cfg.sample_steps,
                           guidance_scale=cfg.guidance_scale, members=members)
    pair_names = [(a, b) for ai, a in enumerate(OBJECTIVES) for b in OBJECTIVES[ai + 1:] if a in done and b in done]
    gap_pairs = {**{f"rl:{a}|rl:{b}": (default[a], default[b]) for a, b in pair_names},
                 **{f"step:{a}|step:{b}": (done[a], done[b]) for a, b in pair_names}}
    summary["kl_mpa_to_msdda_w0.5"] = composition_gap(gap_pairs, base_dir, n=8 if tiny else 30, seed=seed,
                                                      steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale)
    write_json(out / "summary.json", summary)
    _card(out, summary, stats)
    return summary


@torch.no_grad()
def composition_gap(pairs: dict[str, tuple[Path, Path]], base_dir: Path, *, n: int, seed: int,
                    steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE_SCALE, w: float = 0.5) -> dict:
    """How far msdda's step is from output averaging's (mpa) for two experts at weights (w, 1 - w), at the SAME
    base states: {"a|b": {t: mean over images of KL(mpa step || msdda step), summed over pixels, in nats}}.

    msdda's step is the product of the experts' guided step Gaussians (msdda.kernels.errors.product_moments_ref,
    the kernels' float64 reference); mpa's is gaussian_step of the averaged guided raw outputs (what the Engine's
    "mix" strategy steps with). Equal variances and no x0 clipping make the two identical (KL 0)."""
    from msdda.kernels.errors import product_moments_ref
    from .gaussians import gaussian_kl

    table = StepTable(json.loads((base_dir / "scheduler" / "scheduler_config.json").read_text()), steps)
    labels = torch.arange(n) % NUM_CLASSES
    _, traj = rollout(_load_unet(base_dir / "unet").eval(), table, labels, guidance_scale,
                      torch.Generator().manual_seed(seed + 999))
    res: dict[str, dict[str, float]] = {}
    for name, (pa, pb) in pairs.items():
        ua, ub = _load_unet(pa / "unet").eval(), _load_unet(pb / "unet").eval()
        res[name] = {}
        for i, t in enumerate(table.timesteps):
            if t not in VAR_PROBE_T or i not in table.stochastic:
                continue
            x = traj[i]
            oa, ob = guided_output(ua, x, t, labels, guidance_scale), guided_output(ub, x, t, labels, guidance_scale)
            (ma, va, _), (mb, vb, _) = gaussian_step(oa, x, table.scalars[i]), gaussian_step(ob, x, table.scalars[i])
            coeff = torch.tensor([[w, 1.0 - w]], dtype=torch.float64).expand(n, 2)
            mu, prec, _, _ = product_moments_ref(torch.stack([ma, mb]).flatten(2), torch.stack([va, vb]).flatten(2),
                                                 coeff)
            m_mix, v_mix, _ = gaussian_step(w * oa + (1.0 - w) * ob, x, table.scalars[i])
            kl = gaussian_kl(m_mix.flatten(1).double(), v_mix.flatten(1).double(), mu, 1.0 / prec).sum(1)
            res[name][str(t)] = kl.mean().item()
    return res


def _card(out: Path, summary: dict, stats: dict) -> None:
    c = summary["config"]
    dlv = stats["mean_abs_dlog_var"]
    write_card(out, "msdda zoo, flavour \"step\": step-level aligned experts with a learned variance", {
        "What": "Experts distilled from the step-level KL-regularised optimum p_base * exp(V_k / beta) by "
                "self-normalised importance sampling from the base transition (bench/zoo/step.py; "
                "`python bench/train_zoo.py step-expert`). They share ../base (scheduler, base UNet) and "
                "../classifier.safetensors with the default zoo. Load with msdda.zoo.zoo_paths(flavour=\"step\").",
        "Settings": {"trajectories (states)": f"{c['n_traj']} ({summary['n_states']})",
                     "proposals per state": c["proposals"], "beta": c["beta"],
                     "fit": f"{c['fit_steps']} AdamW steps, {c['batch']} states each, lr {c['lr']}",
                     "seed": summary["seed"]},
        "Mean ESS by timestep": json.dumps({k: v for k, v in summary["ess_by_t"].items() if "." not in k}),
        "Mean |log var_a - log var_b| at the same base states": "\n".join(
            f"- {k}: {json.dumps({t: round(v, 4) for t, v in sorted(d.items(), key=lambda kv: -int(kv[0]))})}"
            for k, d in dlv.items()),
        "Mean KL(mpa step || msdda step) at w = 0.5, nats per image, at the same base states": "\n".join(
            f"- {k}: {json.dumps({t: round(v, 4) for t, v in sorted(d.items(), key=lambda kv: -int(kv[0]))})}"
            for k, d in summary.get("kl_mpa_to_msdda_w0.5", {}).items()),
        "Mean rewards (seeded draw, n=%d)" % c["eval_n"]: "\n".join(
            f"- {m}: " + ", ".join(f"{k} {v['mean']:.4f}" for k, v in r["rewards"].items())
            + f", class accuracy {r['class_accuracy']:.3f}" for m, r in summary["mean_rewards"].items()),
    })
