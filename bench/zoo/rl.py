"""KL-regularised step-level RL fine-tuning of the base model: the zoo's experts and MORL oracles.

The policy is the classifier-free-guided DDPM sampler of a fine-tuned copy of the base UNet (guidance
``DEFAULT_GUIDANCE_SCALE``, ``DEFAULT_STEPS`` steps, the base's scheduler), and each denoising step is the Gaussian
``p_theta(x_{t_prev} | x_t) = N(mean, var)`` that :func:`msdda.kernels.gaussian_step` builds from the guided
eps channel and the (conditional) learned-range variance channel -- exactly the step the engine composes.

Objective (the same ``beta = KL_BETA`` for every expert and oracle):

    J(theta) = E[ r(x_0) / s ] - beta * E[ sum_t KL( p_theta(. | x_t) || p_base(. | x_t) ) ]

with ``s`` a fixed per-objective scale: the std of the raw reward over base samples (measured at the end of the
base stage, models/base/metrics.json). For a MORL oracle on (a, b) with weight w, r/s is replaced by
``w * r_a / s_a + (1 - w) * r_b / s_b``. Fixed (not per-batch) normalisation keeps beta's meaning identical
across experts, and makes each oracle's KL-regularised target exactly the geometric mixture
p_a^w p_b^(1-w) of the experts' targets -- the relation MSDDA's product of Gaussians relies on.

Each iteration: roll out B trajectories on-policy (no grad) for B/G distinct random classes, G trajectories
each; compute the final rewards and leave-one-out per-class advantages
``A_i = clip(r_i/s - mean_{j != i, same class}(r_j/s), -5, 5)`` (a per-prompt baseline as in DDPO's per-prompt
stat tracking: it removes the class-dependent reward offsets -- e.g. a "1" has less ink and a lower legibility
margin than an "8" -- from the advantages without biasing the gradient), then one optimizer step on

    loss = mean over S randomly chosen stochastic steps and the batch of
           [ -A * log p_theta(x_{t_prev} | x_t) + beta * KL(p_theta(. | x_t) || p_base(. | x_t)) ]

(log-prob and KL summed over pixels; analytic Gaussian KL, both the mean and the variance channel learn).
This is DDPO's per-step policy gradient (on-policy, so the importance ratio is 1 and no clipping is needed)
plus DPOK-style per-step KL. The deterministic last step (t = 0, no noise) has no density and is not trained.
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

from msdda.kernels import VarMode, gaussian_step
from msdda.sampling import sample
from msdda.schedule import schedule_from_diffusers_config, step_plan
from msdda.zoo import (DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, KL_BETA, NUM_CLASSES, OBJECTIVES, ORACLE_PAIR,
                       ORACLE_WEIGHTS, oracle_name, zoo_paths)

from .ckpt import load_checkpoint, save_checkpoint
from .common import format_seconds, log, read_json, record_duration, seeded_generator, write_card, write_json
from .diffusion import guided_output
from .gaussians import gaussian_kl, gaussian_log_prob

__all__ = ["RLConfig", "StepTable", "rollout", "train_rl", "train_experts", "train_oracles", "evaluate_member",
           "reward_scales", "VAR_PROBE_T"]

#: timesteps at which the mean log-variance of each member is reported
VAR_PROBE_T = (980, 500, 200, 100, 40, 20)


@dataclass
class RLConfig:
    iters: int = 70
    batch: int = 32
    group: int = 4  # G: trajectories per class in a batch (batch / group distinct classes)
    sample_steps: int = DEFAULT_STEPS
    train_steps_per_iter: int = 12  # S: stochastic steps (of ~49) trained per iteration
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    lr: float = 3e-5
    beta: float = KL_BETA
    adv_clip: float = 5.0
    grad_clip: float = 1.0
    eval_n: int = 500

    def __post_init__(self):
        if self.group < 2 or self.batch % self.group or self.batch // self.group > NUM_CLASSES:
            raise ValueError(f"batch={self.batch} must be group={self.group} (>= 2) times at most {NUM_CLASSES} classes")

    @classmethod
    def tiny(cls) -> "RLConfig":
        return cls(iters=2, batch=4, group=2, sample_steps=4, train_steps_per_iter=2, eval_n=8)


class StepTable:
    """Timesteps and StepScalars of the sampler (msdda.schedule.step_plan of the base's diffusers scheduler
    config), and the indices of its stochastic steps (those with a density: not the last, variance-0 step)."""

    def __init__(self, scheduler_config: dict, steps: int):
        self.timesteps, self.scalars = step_plan(schedule_from_diffusers_config(scheduler_config), steps, kind="ddpm")
        self.stochastic = [i for i, s in enumerate(self.scalars)
                           if not (int(s.var_mode) == int(VarMode.FIXED) and s.log_var_fixed == -math.inf)]


@torch.no_grad()
def rollout(unet, table: StepTable, labels: torch.Tensor, gs: float, g: torch.Generator,
            probe=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestral sampling with msdda's step Gaussian. Returns (x_0 clamped to [-1,1], traj [n+1, B, ...]).

    ``probe(i, t, x_t, out, mean, var)`` is called at every step (for variance statistics)."""
    x = torch.randn(labels.shape[0], 1, 16, 16, generator=g)
    traj = [x]

    def step(out: torch.Tensor, x_t: torch.Tensor, i: int) -> torch.Tensor:
        mean, var, _ = gaussian_step(out, x_t, table.scalars[i])
        if probe is not None:
            probe(i, table.timesteps[i], x_t, out, mean, var)
        z = torch.randn(x_t.shape, generator=g)
        x_prev = mean + var.sqrt() * z if i in table.stochastic else mean
        traj.append(x_prev)
        return x_prev

    x = sample(lambda x_t, t: guided_output(unet, x_t, t, labels, gs), step, x, table.timesteps)
    return x.clamp(-1.0, 1.0), torch.stack(traj)


def reward_scales(out: Path) -> dict[str, float]:
    """s_k: std of each raw reward over base samples (models/base/metrics.json)."""
    m = json.loads((out / "base" / "metrics.json").read_text())
    return {k: float(v["std"]) for k, v in m["reward_stats"]["per_reward"].items()}


def _reward_fn(weights: dict[str, float], scales: dict[str, float], classifier_file: Path):
    from msdda.zoo.rewards import REWARDS, load_classifier

    clf = load_classifier(classifier_file)

    def f(x, y):
        tot = torch.zeros(x.shape[0])
        raw = {}
        for k, w in weights.items():
            r = REWARDS[k](x, y, classifier=clf) if k == "legible" else REWARDS[k](x, y)
            raw[k] = r.detach().float()
            tot = tot + w * raw[k] / scales[k]
        return tot, raw

    return f


def _load_unet(path: Path):
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(str(path), low_cpu_mem_usage=False)


def train_rl(out: Path, ckpt_dir: Path, name: str, weights: dict[str, float], cfg: RLConfig, *, seed: int,
             force: bool) -> dict:
    """Fine-tune a copy of out/base on sum_k weights[k] * r_k / s_k; save to out/<name>/unet."""
    folder = out / name
    ck = ckpt_dir / f"rl_{name}.safetensors"
    stage = f"{'oracle' if name.startswith('morl_') else 'expert'}:{name}"
    if (folder / "unet" / "config.json").exists() and not force:
        log(f"{name}: {folder} exists, skipping (--force to rebuild)")
        return {}
    scales = reward_scales(out)
    sched_cfg = json.loads((out / "base" / "scheduler" / "scheduler_config.json").read_text())
    table = StepTable(sched_cfg, cfg.sample_steps)
    base = _load_unet(out / "base" / "unet").eval()
    for p in base.parameters():
        p.requires_grad_(False)
    policy = copy.deepcopy(base).train()
    for p in policy.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    meta = (load_checkpoint(ck, policy, opt) if not force else None) or {"iter": 0, "elapsed": 0.0, "history": []}
    if meta["iter"]:
        log(f"{name}: resuming from iteration {meta['iter']} ({meta['elapsed']:.0f}s already spent)")
    rfn = _reward_fn(weights, scales, out / "classifier.safetensors")
    salt = zlib.crc32(name.encode()) % 10_000
    t0, last = time.time() - meta["elapsed"], time.time()
    hist = meta["history"]
    for it in range(meta["iter"], cfg.iters):
        g = seeded_generator(seed, it, salt)
        n_cls = cfg.batch // cfg.group
        labels = torch.randperm(NUM_CLASSES, generator=g)[:n_cls].repeat_interleave(cfg.group)
        policy.eval()
        x0, traj = rollout(policy, table, labels, cfg.guidance_scale, g)
        policy.train()
        rn, raw = rfn(x0, labels)
        grp = rn.view(n_cls, cfg.group)
        loo = (grp.sum(1, keepdim=True) - grp) / (cfg.group - 1)  # leave-one-out class baseline
        adv = (grp - loo).reshape(-1).clamp(-cfg.adv_clip, cfg.adv_clip)
        k = min(cfg.train_steps_per_iter, len(table.stochastic))
        pick = torch.randperm(len(table.stochastic), generator=g)[:k].tolist()
        opt.zero_grad(set_to_none=True)
        kl_tot = 0.0
        for j in pick:
            i = table.stochastic[j]
            t, sc = table.timesteps[i], table.scalars[i]
            x_t, x_prev = traj[i], traj[i + 1]
            with torch.no_grad():
                mb, vb, _ = gaussian_step(guided_output(base, x_t, t, labels, cfg.guidance_scale), x_t, sc)
            m, v, _ = gaussian_step(guided_output(policy, x_t, t, labels, cfg.guidance_scale), x_t, sc)
            logp = gaussian_log_prob(x_prev, m, v).flatten(1).sum(1)
            kl = gaussian_kl(m, v, mb, vb).flatten(1).sum(1)
            loss = (-(adv * logp) + cfg.beta * kl).mean() / k
            loss.backward()
            kl_tot += kl.mean().item()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        opt.step()
        # per-iteration record: normalised reward, raw rewards, KL summed over all stochastic steps (estimate)
        rec = {"it": it, "r_norm": rn.mean().item(), "kl_sum": kl_tot / k * len(table.stochastic),
               **{f"r_{kk}": vv.mean().item() for kk, vv in raw.items()}}
        hist.append(rec)
        if (it + 1) % 5 == 0 or it == 0:
            el = time.time() - t0
            log(f"{name} it {it + 1}/{cfg.iters} r_norm {rec['r_norm']:.3f} "
                + " ".join(f"{kk} {vv.mean().item():.4f}" for kk, vv in raw.items())
                + f" KL(sum_t) {rec['kl_sum']:.2f} ({el:.0f}s, {el / (it + 1 - 0):.1f}s/it)")
        if time.time() - last > 45 or it + 1 == cfg.iters:
            save_checkpoint(ck, policy, opt, {"iter": it + 1, "elapsed": time.time() - t0, "history": hist})
            last = time.time()
    train_elapsed = time.time() - t0
    policy.eval()
    folder.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(str(folder / "unet"), safe_serialization=True)
    log(f"{name}: trained {cfg.iters} iterations in {train_elapsed:.0f}s; saved to {folder}")
    t_eval = time.time()
    metrics = evaluate_member(out, name, cfg, seed=seed)
    metrics.update({"weights": weights, "reward_scales": scales, "config": asdict(cfg), "seed": seed,
                    "train_duration_s": train_elapsed, "eval_duration_s": time.time() - t_eval,
                    "history_first5": hist[:5], "history_last5": hist[-5:]})
    write_json(folder / "metrics.json", metrics)
    record_duration(out, stage, train_elapsed + metrics["eval_duration_s"])
    _rl_card(folder, name, metrics)
    return metrics


@torch.no_grad()
def evaluate_member(out: Path, name: str, cfg: RLConfig, *, seed: int) -> dict:
    """Rewards, class accuracy and per-step variance statistics of one member on a fixed seeded draw (the same
    labels and noise for every member). Also refreshes out/rl_summary.json (which holds the base's numbers)."""
    from msdda.zoo.rewards import REWARDS, load_classifier

    sched_cfg = json.loads((out / "base" / "scheduler" / "scheduler_config.json").read_text())
    table = StepTable(sched_cfg, cfg.sample_steps)
    model = _load_unet(out / name / "unet").eval()
    base = _load_unet(out / "base" / "unet").eval() if name != "base" else model
    clf = load_classifier(out / "classifier.safetensors")
    n = cfg.eval_n
    labels = torch.arange(n) % NUM_CLASSES
    probe_t = set(VAR_PROBE_T) & set(table.timesteps) or {table.timesteps[len(table.timesteps) // 2]}
    lv_own: dict[int, float] = {}
    dlv_base: dict[int, float] = {}

    def probe(i, t, x, out_, mean, var):
        if t in probe_t and var.dim() > 0:
            lv_own[t] = var.log().mean().item()
            if name != "base":
                _, vb, _ = gaussian_step(guided_output(base, x, t, labels, cfg.guidance_scale), x, table.scalars[i])
                dlv_base[t] = (var.log() - vb.log()).mean().item()

    x0, _ = rollout(model, table, labels, cfg.guidance_scale, torch.Generator().manual_seed(seed + 4242), probe=probe)
    rewards = {}
    for k, f in REWARDS.items():
        v = f(x0, labels, classifier=clf) if k == "legible" else f(x0, labels)
        rewards[k] = {"mean": v.mean().item(), "std": v.std().item()}
    acc = (clf(x0).argmax(1) == labels).float().mean().item()
    res = {"eval_n": n, "eval_steps": cfg.sample_steps, "guidance_scale": cfg.guidance_scale, "rewards": rewards,
           "class_accuracy": acc, "mean_log_var": {str(t): lv_own[t] for t in sorted(lv_own, reverse=True)},
           "mean_dlog_var_vs_base_same_xt": {str(t): dlv_base[t] for t in sorted(dlv_base, reverse=True)}}
    summ = read_json(out / "rl_summary.json", {})
    summ[name] = {k: res[k] for k in ("rewards", "class_accuracy", "mean_log_var", "mean_dlog_var_vs_base_same_xt")}
    write_json(out / "rl_summary.json", summ)
    log(f"eval {name}: " + " ".join(f"{k} {v['mean']:.4f}" for k, v in rewards.items()) + f" acc {acc:.3f} "
        + "logvar " + " ".join(f"t{t}:{v:.3f}" for t, v in res["mean_log_var"].items()))
    return res


def _by_t(d: dict) -> str:
    """{"t": value} as JSON, timesteps descending (json files store keys sorted as strings)."""
    return json.dumps({k: round(d[k], 4) for k in sorted(d, key=lambda k: -int(k))})


def _rl_card(folder: Path, name: str, m: dict) -> None:
    base = read_json(folder.parent / "rl_summary.json", {}).get("base", {})
    gains = {k: f"{v['mean']:.4f} (base {base.get('rewards', {}).get(k, {}).get('mean', float('nan')):.4f})"
             for k, v in m["rewards"].items()}
    c = m["config"]
    write_card(folder, f"msdda zoo: {name}", {
        "What": ("Single-objective aligned expert" if not name.startswith("morl_") else "MORL oracle")
                + f", fine-tuned from ../base on the reward sum_k w_k r_k / s_k with w = {m['weights']} and "
                f"s = {json.dumps({k: round(v, 5) for k, v in m['reward_scales'].items()})} (std of each raw "
                "reward over base samples).",
        "Recipe": "KL-regularised step-level RL (bench/zoo/rl.py): DDPO-style on-policy per-step policy gradient "
                  "-A * log p_theta(x_{t-1}|x_t) with A = clip(r/s - leave-one-out mean of the same class's "
                  "trajectories, -5, 5), plus beta * analytic "
                  "Gaussian KL(p_theta(.|x_t) || p_base(.|x_t)) at the same x_t; full fine-tuning of the UNet, "
                  "mean and learned-range variance channels both trained. "
                  f"`python bench/train_zoo.py {'oracle' if name.startswith('morl_') else 'expert'} --name "
                  f"{name if not name.startswith('morl_') else name.rsplit('_w', 1)[1]}`",
        "Settings": {"beta (KL strength, shared by all experts and oracles)": c["beta"],
                     "iterations": c["iters"], "trajectories per iteration": c["batch"],
                     "trajectories per class (baseline group)": c.get("group"),
                     "sampler": f"{c['sample_steps']} DDPM steps, CFG {c['guidance_scale']}",
                     "stochastic steps trained per iteration": c["train_steps_per_iter"],
                     "optimizer": f"AdamW lr {c['lr']}, grad-clip {c['grad_clip']}", "seed": m["seed"],
                     "train duration": format_seconds(m["train_duration_s"]),
                     "eval duration": format_seconds(m["eval_duration_s"])},
        "Measured (seeded draw shared with the base, n=%d)" % m["eval_n"]: {
            **{f"reward {k}": v for k, v in gains.items()},
            "class accuracy": f"{m['class_accuracy']:.4f} (base {base.get('class_accuracy', float('nan')):.4f})",
            "mean log-variance by timestep (own trajectory)": _by_t(m["mean_log_var"]),
            "base's mean log-variance by timestep": _by_t(base.get("mean_log_var", {})),
            "mean (log var - base log var) at the same x_t": _by_t(m["mean_dlog_var_vs_base_same_xt"]),
            "training curve (first/last iterations)": json.dumps([{k: round(v, 3) for k, v in h.items()} for h in m["history_first5"][:2] + m["history_last5"][-2:]]),
        },
    })


def reevaluate(out: Path, stage: str, *, names=None, tiny=False, seed=0) -> None:
    """Re-measure existing members (the base's rl_summary entry first) and rewrite their metrics and cards."""
    cfg = _cfg(None, tiny)
    evaluate_member(out, "base", cfg, seed=seed)
    if stage == "expert":
        members = list(names or OBJECTIVES)
    else:
        members = [oracle_name(float(w)) for w in (names or ORACLE_WEIGHTS)]
    for name in members:
        folder = out / name
        m = read_json(folder / "metrics.json", None)
        if m is None:
            continue
        t = time.time()
        m.update(evaluate_member(out, name, RLConfig(**m["config"]), seed=seed))
        m["eval_duration_s"] = time.time() - t
        write_json(folder / "metrics.json", m)
        _rl_card(folder, name, m)


@torch.no_grad()
def variance_stats(out: Path, *, n: int = 200, seed: int = 0, steps: int = DEFAULT_STEPS,
                   guidance_scale: float = DEFAULT_GUIDANCE_SCALE, members: dict[str, Path] | None = None) -> dict:
    """Every member's step log-variance at the SAME states: x_t taken from base trajectories (seeded draw), each
    member evaluated there at the VAR_PROBE_T steps. Writes out/variance_stats.json:
    {"mean_log_var": {member: {t: mean}}, "mean_abs_dlog_var": {"a|b": {t: mean |log var_a - log var_b|}}}.
    ``members`` ({name: model folder}, one named "base") defaults to out's zoo."""
    if members is None:
        members = {k: p for k, p in zoo_paths(out).items() if (p / "unet" / "config.json").exists()}
    sched_cfg = json.loads((members["base"] / "scheduler" / "scheduler_config.json").read_text())
    table = StepTable(sched_cfg, steps)
    models = {k: _load_unet(p / "unet").eval() for k, p in members.items()}
    labels = torch.arange(n) % NUM_CLASSES
    _, traj = rollout(models["base"], table, labels, guidance_scale, torch.Generator().manual_seed(seed + 999))
    logv: dict[str, dict[int, torch.Tensor]] = {k: {} for k in models}
    for i, t in enumerate(table.timesteps):
        if t not in VAR_PROBE_T or i not in table.stochastic:
            continue
        for k, m in models.items():
            _, var, _ = gaussian_step(guided_output(m, traj[i], t, labels, guidance_scale), traj[i], table.scalars[i])
            logv[k][t] = var.log()
    res = {"n": n, "mean_log_var": {k: {str(t): v.mean().item() for t, v in d.items()} for k, d in logv.items()},
           "mean_abs_dlog_var": {}}
    names = list(models)
    for a_i, a in enumerate(names):
        for b in names[a_i + 1:]:
            res["mean_abs_dlog_var"][f"{a}|{b}"] = {str(t): (logv[a][t] - logv[b][t]).abs().mean().item()
                                                    for t in logv[a]}
    write_json(out / "variance_stats.json", res)
    return res


def rewrite_cards(out: Path) -> None:
    """Regenerate every RL member's model card from its metrics.json (no re-evaluation)."""
    for name in tuple(OBJECTIVES) + tuple(oracle_name(w) for w in ORACLE_WEIGHTS):
        m = read_json(out / name / "metrics.json", None)
        if m is not None:
            _rl_card(out / name, name, m)


def _cfg(steps: int | None, tiny: bool) -> RLConfig:
    cfg = RLConfig.tiny() if tiny else RLConfig()
    if steps is not None:
        cfg.iters = steps
    return cfg


def _ensure_base_eval(out: Path, cfg: RLConfig, seed: int) -> None:
    if "base" not in read_json(out / "rl_summary.json", {}):
        evaluate_member(out, "base", cfg, seed=seed)


def train_experts(out: Path, ckpt_dir: Path, *, names=None, steps=None, tiny=False, seed=0, force=False) -> dict:
    cfg = _cfg(steps, tiny)
    _ensure_base_eval(out, cfg, seed)
    res = {}
    for obj in names or OBJECTIVES:
        if obj not in OBJECTIVES:
            raise SystemExit(f"unknown objective {obj!r}; expected one of {OBJECTIVES}")
        res[obj] = train_rl(out, ckpt_dir, obj, {obj: 1.0}, cfg, seed=seed, force=force)
    return res


def train_oracles(out: Path, ckpt_dir: Path, *, names=None, steps=None, tiny=False, seed=0, force=False) -> dict:
    cfg = _cfg(steps, tiny)
    _ensure_base_eval(out, cfg, seed)
    ws = [float(w) for w in names] if names else list(ORACLE_WEIGHTS)
    a, b = ORACLE_PAIR
    res = {}
    for w in ws:
        name = oracle_name(w)
        res[name] = train_rl(out, ckpt_dir, name, {a: w, b: 1.0 - w}, cfg, seed=seed, force=force)
    variance_stats(out, n=8 if tiny else 200, seed=seed, steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale)
    return res
