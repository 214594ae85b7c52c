"""The evaluation's pictures: a Pareto plot per pair of objectives (matplotlib) and image grids (PIL)."""
from __future__ import annotations

import io
import math
from pathlib import Path

import torch

from msdda.atomic import atomic_write_bytes

__all__ = ["plot_pair", "save_grid"]

_COLORS = {"msdda": "tab:red", "mpa": "tab:blue", "soup": "tab:green", "code": "tab:purple", "rgg": "tab:orange",
           "base": "black", "oracle": "tab:brown"}


def plot_pair(combo_rep: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = combo_rep["objectives"]
    fig, ax = plt.subplots(figsize=(6.4, 5.0), dpi=120)
    for s, e in combo_rep["strategies"].items():
        xs = [p["mean"][a] for p in e["points"]]
        ys = [p["mean"][b] for p in e["points"]]
        xe = [p["ci95"][a] for p in e["points"]]
        ye = [p["ci95"][b] for p in e["points"]]
        lab = f"{s} (HV {e['hypervolume']:.3g})"
        if s == "oracle":
            ax.errorbar(xs, ys, xerr=xe, yerr=ye, fmt="s", ms=8, color=_COLORS[s], capsize=3, label=lab, zorder=5)
            for p, x, y in zip(e["points"], xs, ys):
                ax.annotate(f"w={p['weights'].get(a, 0):g}", (x, y), textcoords="offset points", xytext=(6, 6),
                            fontsize=8, color=_COLORS[s])
        elif s == "base":
            ax.errorbar(xs, ys, xerr=xe, yerr=ye, fmt="*", ms=12, color=_COLORS[s], capsize=3, label=lab, zorder=4)
        else:
            ax.errorbar(xs, ys, xerr=xe, yerr=ye, fmt="o-", ms=3.5, lw=1.2, color=_COLORS.get(s), capsize=2,
                        alpha=0.9, label=lab)
            if s == "msdda" and xs:                     # mark the sweep's direction at its two ends
                for p, x, y in ((e["points"][0], xs[0], ys[0]), (e["points"][-1], xs[-1], ys[-1])):
                    ax.annotate(f"{a}={p['weights'].get(a, 0):g}", (x, y), textcoords="offset points",
                                xytext=(5, -11), fontsize=7, color=_COLORS[s])
    r = combo_rep["reference_point"]
    ax.plot([r[a]], [r[b]], "x", color="gray", label="HV reference")
    ax.set_xlabel(f"{a} reward (mean, 95% CI)")
    ax.set_ylabel(f"{b} reward (mean, 95% CI)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())



def save_grid(x0: torch.Tensor, path: Path, cols: int = 10, scale: int = 4) -> None:
    from PIL import Image

    u8 = ((x0.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()[:, 0]
    n, h, w = u8.shape
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    pad = 2
    grid = Image.new("L", (cols * (w * scale + pad) + pad, rows * (h * scale + pad) + pad), 255)
    for i in range(n):
        r, c = divmod(i, cols)
        im = Image.fromarray(u8[i], mode="L").resize((w * scale, h * scale), Image.NEAREST)
        grid.paste(im, (pad + c * (w * scale + pad), pad + r * (h * scale + pad)))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
