"""msdda's benchmark suite, one command:

    .venv/bin/python bench/run.py            # -> bench/results/<machine>-<date>.json + a short table
    .venv/bin/python bench/run.py --quick    # smoke run (small sizes), nothing written

1. The combine step (pytest-benchmark, bench/bench_compose.py): the fused path vs the same math as separate
   torch ops vs torch.compile (and the Triton kernel on a GPU), with bytes per second and the fraction of a
   measured copy's bandwidth.
2. End to end (bench/bench_e2e.py): msdda vs Diffusion Blend's diffusers loop and vs single-model generation,
   over K, batch and backends, with the per-step split (networks / combine / rest) and peak memory.
3. Networks (bench/bench_networks.py): one expert's UNet forward under each execution option (torch eager,
   torch.compile, ONNX Runtime fp32 / fused attention / int8 dynamic / int8 static) with its error.
Every comparison is a ratio of two measurements taken in this run on this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_e2e  # noqa: E402
from msdda.atomic import atomic_write_json  # noqa: E402
import bench_networks  # noqa: E402


def compose_benchmarks(quick: bool, select: str | None = None) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "compose.json"
        # -n 0: the project's addopts run tests on xdist workers, under which pytest-benchmark measures nothing
        cmd = [sys.executable, "-m", "pytest", str(ROOT / "bench" / "bench_compose.py"), "--benchmark-enable",
               "-n", "0", "-q", "-p", "no:cacheprovider", f"--benchmark-json={out}"]
        if quick:
            cmd += ["-k", "8x4x64x64 and (torch_path or naive or copy) and not 8-"]
        elif select:
            cmd += ["-k", select]
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
        data = json.loads(out.read_text())
    rows = []
    for b in data["benchmarks"]:
        rows.append({"name": b["name"], "median_us": b["stats"]["median"] * 1e6, **b.get("extra_info", {})})
    return rows


def compose_table(rows) -> str:
    """GB/s from the median (pytest-benchmark's extra_info uses the mean, which outliers inflate), and the
    fraction of the ``copy`` row's bandwidth at the same size, K and variance layout."""
    def key(name):
        return name.rsplit("-", 1)[0]

    copy = {key(r["name"]): r["bytes"] / r["median_us"] * 1e-3 for r in rows if r["name"].endswith("-copy]")}
    lines = ["| benchmark | median µs | GB/s (median) | of copy bandwidth |", "|---|---|---|---|"]
    for r in rows:
        gbs = r["bytes"] / r["median_us"] * 1e-3 if "bytes" in r else None
        ref = copy.get(key(r["name"]))
        lines.append(f"| {r['name']} | {r['median_us']:.0f} | {'' if gbs is None else f'{gbs:.1f}'} | "
                     f"{'' if ref is None or gbs is None else f'{100 * gbs / ref:.0f}%'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip-compose", action="store_true")
    p.add_argument("--compose-select", default=None, help="pytest -k expression for the compose benchmarks")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--out", default=None, help="results file (default bench/results/<machine>-<date>.json)")
    p.add_argument("--skip-networks", action="store_true", help="skip the per-network execution options")
    p.add_argument("--ks", default="1,2,3,4")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--backends", default=",".join(bench_e2e.BACKENDS), help="torch+lora: torch with group='lora'")
    p.add_argument("--models", default=",".join(bench_e2e.MODELS), help="tiny-sd (text, DDIM), zoo (digits, DDPM), tiny-sd-lora (LoRA experts)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    result = {"machine": bench_e2e.machine_name(), "date": str(date.today()),
              "python": sys.version.split()[0], "commands": " ".join(["bench/run.py", *(argv or sys.argv[1:])])}
    if not args.skip_compose:
        result["compose"] = compose_benchmarks(args.quick, args.compose_select)
        print(compose_table(result["compose"]))
    if not args.skip_e2e:
        if args.quick:
            ks, batches, steps, repeats = (2,), (2,), 2, 1
        else:
            ks = tuple(int(k) for k in args.ks.split(","))
            batches = tuple(int(b) for b in args.batches.split(","))
            steps, repeats = args.steps, args.repeats
        result["e2e"] = bench_e2e.run(ks, batches, tuple(args.backends.split(",")), steps, repeats,
                                      models=tuple(args.models.split(",")))
        print(bench_e2e.table(result["e2e"]))
    if not args.skip_networks:
        result["networks"] = bench_networks.run(repeats=3 if args.quick else 30, threads=(1,) if args.quick else (1, 2),
                                                compile=not args.quick)
        print(bench_networks.table(result["networks"]))
    if not args.quick:
        out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"{result['machine']}-{result['date']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, result)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
