"""Bookkeeping shared by the zoo's training recipes (train.py, rl.py): logging, seeded per-step generators,
JSON records, stage durations and model cards. Every file is written atomically (msdda.atomic)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from msdda.atomic import atomic_write_json, atomic_write_text

__all__ = ["log", "seeded_generator", "read_json", "write_json", "record_duration", "write_card", "format_seconds"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def seeded_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """The generator of one training step, a function of (seed, step, salt) only: a resumed run draws the same
    batches as an uninterrupted one."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt * 104_729) % (2**63 - 1))


def read_json(path: Path, default):
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def write_json(path: Path, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)


def record_duration(out: Path, stage: str, seconds: float) -> None:
    d = read_json(out / "durations.json", {})
    d[stage] = round(float(seconds), 1)
    write_json(out / "durations.json", d)


def write_card(folder: Path, title: str, sections: dict[str, object]) -> None:
    """A model card, folder/README.md: one section per key; dict values become bullet lists."""
    lines = [f"# {title}", ""]
    for k, v in sections.items():
        lines.append(f"## {k}")
        lines.append("")
        if isinstance(v, dict):
            for kk, vv in v.items():
                lines.append(f"- **{kk}**: {vv}")
        else:
            lines.append(str(v))
        lines.append("")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "README.md", "\n".join(lines))


def format_seconds(s: float) -> str:
    return f"{s:.0f} s ({s / 60:.1f} min)"
