"""Load test of ``msdda serve`` on loopback: N concurrent clients send M mixed requests, once per server setting.

    .venv/bin/python bench/serve_load.py                       # 16 clients x 1000 requests, the zoo, 50 steps
    .venv/bin/python bench/serve_load.py --clients 4 --requests 24 --steps 5 --out /tmp/smoke.json   # smoke
    .venv/bin/python bench/serve_load.py --workload mixed      # gathered batches vs the step scheduler

``--workload mixed`` (settings ``gather,step``): open-loop arrivals at a fixed rate for --duration-s: small
requests (1 image, --small-steps steps drawn uniformly) with a large one (16 images, --large-steps steps) at
each of --large-at seconds; every request is answered or times out before the next setting. Reported per
setting: throughput (images/s from the first arrival to the last answer), the small requests' p50/p99, the large
ones' latencies, lost/failed; a plot of latency against arrival time next to the JSON.

For each setting it starts its own ``msdda serve`` (a local Ray, 127.0.0.1), warms it up with one request,
then the clients share the M requests (mixed weights over the zoo's experts, class labels and seeds; every
request the same steps) and each checks its answer: HTTP 200, every image a PNG of the model's size. It
stops the server with SIGTERM before the next setting. Settings:

- ``exact``: dynamic batching on a batch-invariant Engine (``--row-block``), each response bit-identical to a
  direct Engine.generate on an Engine built the same way (the default server);
- ``fast``:  dynamic batching with --no-exact-batching (equal to a direct call to float32 rounding);
- ``single``: --max-batch-size 1, i.e. no batching: the baseline.

(These three run the gathered scheduler, ``--batching gather``, as they did when first measured. The mixed
workload compares ``gather`` with ``step``, both exact.)

Reported per setting: p50/p99 latency, images/s, the histogram of engine-call sizes the responses report,
lost (no answer), failed (non-200) and invalid-image counts; and the throughput ratios to ``single``. Bounded:
each setting stops sending after --budget-s seconds, and each request times out after --request-timeout-s.
Results: bench/results/serve_load-<machine>-<date>.json (or --out).
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import platform
import queue
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "exact": ["--batching", "gather"],
    "fast": ["--batching", "gather", "--no-exact-batching"],
    "single": ["--batching", "gather", "--max-batch-size", "1"],
    "gather": ["--batching", "gather"],
    "step": ["--batching", "step"],
}


def mixed_requests(n: int, steps: int, seed: int = 0, expert_counts=(2, 3)) -> list[dict]:
    """n requests with weights drawn on the simplex over two or three experts, class labels and seeds."""
    from msdda.zoo import OBJECTIVES

    rng = random.Random(seed)
    out = []
    for i in range(n):
        experts = rng.sample(OBJECTIVES, rng.choice(expert_counts))
        cuts = sorted(rng.random() for _ in range(len(experts) - 1))
        parts = [b - a for a, b in zip([0.0] + cuts, cuts + [1.0])]
        weights = {e: round(w, 4) for e, w in zip(experts, parts)}
        weights[experts[-1]] = round(1 - sum(v for k, v in weights.items() if k != experts[-1]), 4)
        out.append({"class_labels": rng.randrange(10), "weights": weights, "seed": rng.randrange(2**31), "steps": steps})
    return out


def mixed_stream(duration_s: float, rate: float, small_steps: tuple[int, int], large_at: list[float],
                 large_steps: int, seed: int = 0, expert_counts=(3,)) -> list[tuple[float, str, dict]]:
    """(arrival second, "small" | "large", body): small requests every 1/rate s (1 image, steps uniform in
    small_steps), a 16-image large request at each of large_at; weights, labels and seeds as mixed_requests
    (weights over all three experts by default: one set of networks, so the step scheduler can put every sample
    in one network call; requests over different expert sets share iterations but not calls)."""
    rng = random.Random(seed)
    n = int(duration_s * rate)
    bodies = mixed_requests(n + len(large_at), 1, seed, expert_counts)
    stream = [(k / rate, "small", {**bodies[k], "steps": rng.randint(*small_steps)}) for k in range(n)]
    for j, at in enumerate(large_at):
        body = bodies[n + j]
        stream.append((at, "large", {**body, "num_images": 16, "steps": large_steps,
                                     "class_labels": [(body["class_labels"] + i) % 10 for i in range(16)]}))
    return sorted(stream, key=lambda item: item[0])


def run_open_loop(url: str, stream: list, timeout_s: float, size: tuple[int, int]) -> dict:
    """Send each request at its arrival time (its own thread: arrivals do not wait for answers)."""
    records, lock = [], threading.Lock()
    start = time.monotonic()

    def send(at, kind, body):
        delay = at - (time.monotonic() - start)
        if delay > 0:
            time.sleep(delay)
        t0 = time.monotonic()
        status, answer = post(url, body, timeout_s)
        rec = {"kind": kind, "arrival_s": t0 - start, "latency_s": time.monotonic() - t0, "status": status,
               "done_s": time.monotonic() - start, "steps": body["steps"]}
        if status == 200:
            rec.update(images=len(answer["images"]), valid=valid_images(answer, size))
        with lock:
            records.append(rec)

    with concurrent.futures.ThreadPoolExecutor(len(stream)) as pool:
        for f in [pool.submit(send, *item) for item in stream]:
            f.result()
    ok = [r for r in records if r["status"] == 200]
    wall = max(r["done_s"] for r in records) if records else 0.0

    def pct(kind, q):
        lat = sorted(r["latency_s"] for r in ok if r["kind"] == kind)
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

    images = sum(r["images"] for r in ok)
    return {
        "sent": len(records), "ok": len(ok), "lost": sum(r["status"] is None for r in records),
        "failed": sum(r["status"] not in (None, 200) for r in records),
        "invalid_images": sum(not r["valid"] for r in ok), "wall_s": wall, "images": images,
        "images_per_s": images / wall if wall else 0.0,
        "small_p50_s": pct("small", 0.5), "small_p99_s": pct("small", 0.99), "small_max_s": pct("small", 1.0),
        "large_latency_s": [r["latency_s"] for r in sorted(ok, key=lambda r: r["arrival_s"]) if r["kind"] == "large"],
        "records": sorted(records, key=lambda r: r["arrival_s"]),
    }


def plot_mixed(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (name, stats), colour in zip(result["settings"].items(), ("tab:red", "tab:blue", "tab:green")):
        for kind, marker in (("small", "o"), ("large", "s")):
            recs = [r for r in stats["records"] if r["kind"] == kind and r["status"] == 200]
            ax.scatter([r["arrival_s"] for r in recs], [r["latency_s"] for r in recs], s=14 if kind == "small" else 60,
                       marker=marker, color=colour, alpha=0.8,
                       label=f"{name}: {kind} (p99 {stats['small_p99_s']:.1f} s)" if kind == "small" else
                       f"{name}: {kind}")
    ax.set_yscale("log")
    ax.set_xlabel("arrival time (s)")
    ax.set_ylabel("latency (s)")
    ax.set_title(f"msdda serve, mixed load on {result['machine']}: gathered batches vs step scheduler")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(extra: list[str], threads: int, log_path: Path, startup_s: float):
    port = _free_port()
    cmd = [sys.executable, "-m", "msdda.cli", "serve", "--port", str(port), "--num-cpus", str(threads), *extra]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if lines.get(timeout=1).startswith("msdda serve: http"):
                return proc, f"http://127.0.0.1:{port}", log
        except queue.Empty:
            continue
    stop_server(proc, log)
    raise SystemExit(f"serve_load: msdda serve did not start; see {log_path}")


def stop_server(proc, log) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    log.close()


def post(url: str, body: dict, timeout: float) -> tuple[int | None, dict | None]:
    req = urllib.request.Request(url + "/v1/generate", data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (OSError, ValueError):       # refused, reset, timed out, or not JSON: the request is lost
        return None, None


def valid_images(answer: dict, size: tuple[int, int]) -> bool:
    from PIL import Image

    try:
        for b64 in answer["images"]:
            with Image.open(io.BytesIO(base64.b64decode(b64, validate=True))) as im:
                im.load()
                if im.size != size:
                    return False
        return bool(answer["images"])
    except Exception:  # noqa: BLE001 -- anything that does not decode is an invalid image
        return False


def run_load(url: str, requests: list[dict], clients: int, budget_s: float, timeout_s: float,
             size: tuple[int, int]) -> dict:
    todo: queue.Queue = queue.Queue()
    for body in requests:
        todo.put(body)
    records = []
    lock = threading.Lock()
    start = time.monotonic()

    def client():
        while time.monotonic() - start < budget_s:
            try:
                body = todo.get_nowait()
            except queue.Empty:
                return
            t0 = time.monotonic()
            status, answer = post(url, body, timeout_s)
            rec = {"latency_s": time.monotonic() - t0, "status": status}
            if status == 200:
                rec.update(images=len(answer["images"]), batch_size=answer["batch_size"],
                           valid=valid_images(answer, size))
            with lock:
                records.append(rec)

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.monotonic() - start
    ok = [r for r in records if r["status"] == 200]
    lat = sorted(r["latency_s"] for r in ok)
    images = sum(r["images"] for r in ok)
    return {
        "sent": len(records), "not_sent_budget": len(requests) - len(records), "ok": len(ok),
        "lost": sum(r["status"] is None for r in records),
        "failed": sum(r["status"] not in (None, 200) for r in records),
        "server_errors_5xx": sum((r["status"] or 0) >= 500 for r in records),
        "invalid_images": sum(not r["valid"] for r in ok),
        "wall_s": wall, "images": images, "images_per_s": images / wall if wall else 0.0,
        "latency_p50_s": statistics.median(lat) if lat else None,
        "latency_p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        "latency_max_s": lat[-1] if lat else None,
        "engine_call_samples_histogram": dict(sorted(Counter(r["batch_size"] for r in ok).items())),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--settings", default="exact,fast,single", help="comma-separated subset of " + ",".join(SETTINGS))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="the server's --num-cpus (torch threads)")
    p.add_argument("--max-batch-size", type=int, default=16, help="--max-batch-size of the batching settings")
    p.add_argument("--batch-wait-ms", type=float, default=None, help="the servers' --batch-wait-ms (default: theirs)")
    p.add_argument("--row-block", type=int, default=None,
                   help="--row-block of the exact setting (default: the server's)")
    p.add_argument("--budget-s", type=float, default=3600.0, help="per setting: stop sending after this long")
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--startup-s", type=float, default=300.0)
    p.add_argument("--out", default=None, help="results JSON (default bench/results/serve_load-<machine>-<date>.json)")
    p.add_argument("--workload", choices=("uniform", "mixed"), default="uniform")
    p.add_argument("--rate", type=float, default=0.2, help="mixed: small requests per second")
    p.add_argument("--duration-s", type=float, default=60.0, help="mixed: seconds of arrivals")
    p.add_argument("--mixed-experts", default="3", help="mixed: how many experts a request's weights use, e.g. 2,3")
    p.add_argument("--max-running-samples", type=int, default=None,
                   help="mixed: the step scheduler's --max-running-samples (default: the server's)")
    p.add_argument("--small-steps", default="20-50", help="mixed: the small requests' step range")
    p.add_argument("--large-at", default="5", help="mixed: arrival seconds of the 16-image requests")
    p.add_argument("--large-steps", type=int, default=200, help="mixed: the 16-image requests' steps")
    args = p.parse_args(argv)
    if args.workload == "mixed":
        return main_mixed(args)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or not settings:
        p.error(f"--settings: unknown {unknown}; choose from {', '.join(SETTINGS)}")

    from msdda.atomic import atomic_write_json

    requests = mixed_requests(args.requests, args.steps)
    machine = f"cpu-{os.cpu_count()}core-{platform.machine()}"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"serve_load-{machine}-{date.today()}.json"
    result = {"machine": machine, "platform": platform.platform(), "python": platform.python_version(),
              "args": vars(args), "settings": {}}
    logs = Path(tempfile.mkdtemp(prefix="serve_load-"))      # the servers' stderr, outside the repository
    print(f"serve_load: server logs in {logs}", flush=True)
    for name in settings:
        extra = list(SETTINGS[name])
        if name != "single":
            extra += ["--max-batch-size", str(args.max_batch_size)]
        if name == "exact" and args.row_block is not None:
            extra += ["--row-block", str(args.row_block)]
        if args.batch_wait_ms is not None:
            extra += ["--batch-wait-ms", str(args.batch_wait_ms)]
        extra += ["--max-steps", str(max(args.steps, 50))]
        print(f"serve_load: {name}: starting msdda serve {' '.join(extra)}", flush=True)
        proc, url, log = start_server(extra, args.threads, logs / f"{name}.log", args.startup_s)
        try:
            post(url, requests[0], args.request_timeout_s)                    # warm-up, not counted
            with urllib.request.urlopen(url + "/v1/models", timeout=60) as resp:
                info = json.loads(resp.read())
            stats = run_load(url, requests, args.clients, args.budget_s, args.request_timeout_s, (16, 16))
        finally:
            stop_server(proc, log)
        stats["server_flags"] = extra
        stats["server"] = {k: info.get(k) for k in ("max_batch_size", "exact_batching", "row_block", "torch_threads",
                                                    "backend", "device")}
        result["settings"][name] = stats
        print(f"serve_load: {name}: {stats['ok']}/{stats['sent']} ok, lost {stats['lost']}, failed {stats['failed']}, "
              f"invalid {stats['invalid_images']}; {stats['images_per_s']:.2f} images/s, "
              f"p50 {stats['latency_p50_s']}, p99 {stats['latency_p99_s']}; "
              f"batch sizes {stats['engine_call_samples_histogram']}", flush=True)
    base = result["settings"].get("single", {}).get("images_per_s")
    if base:
        result["throughput_vs_single"] = {n: s["images_per_s"] / base for n, s in result["settings"].items()}
        print(f"serve_load: throughput vs --max-batch-size 1: {result['throughput_vs_single']}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"serve_load: wrote {out}")
    return 0


def main_mixed(args) -> int:
    from msdda.atomic import atomic_write_json

    settings = ["gather", "step"] if args.settings == "exact,fast,single" else \
        [s.strip() for s in args.settings.split(",") if s.strip()]
    lo, hi = (int(v) for v in args.small_steps.split("-"))
    large_at = [float(v) for v in args.large_at.split(",") if v.strip()]
    stream = mixed_stream(args.duration_s, args.rate, (lo, hi), large_at, args.large_steps,
                          expert_counts=tuple(int(v) for v in args.mixed_experts.split(",")))
    machine = f"cpu-{os.cpu_count()}core-{platform.machine()}"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"serve_mixed-{machine}-{date.today()}.json"
    load = os.getloadavg()
    result = {"machine": machine, "platform": platform.platform(), "python": platform.python_version(),
              "loadavg_at_start": load, "args": vars(args), "settings": {}}
    logs = Path(tempfile.mkdtemp(prefix="serve_mixed-"))
    print(f"serve_load: mixed: {len(stream)} requests; server logs in {logs}; load average {load}", flush=True)
    for name in settings:
        extra = SETTINGS[name] + ["--max-batch-size", str(args.max_batch_size), "--max-images", "16",
                                  "--max-steps", str(max(args.large_steps, hi, 50))]
        if args.batch_wait_ms is not None:
            extra += ["--batch-wait-ms", str(args.batch_wait_ms)]
        if name == "step" and args.max_running_samples is not None:
            extra += ["--max-running-samples", str(args.max_running_samples)]
        proc, url, log = start_server(extra, args.threads, logs / f"{name}.log", args.startup_s)
        try:
            post(url, {**stream[0][2], "steps": 2}, args.request_timeout_s)          # warm-up, not counted
            with urllib.request.urlopen(url + "/v1/models", timeout=60) as resp:
                info = json.loads(resp.read())
            stats = run_open_loop(url, stream, args.request_timeout_s, (16, 16))
        finally:
            stop_server(proc, log)
        stats["server_flags"] = extra
        stats["server"] = {k: info.get(k) for k in ("batching", "max_batch_size", "max_running_samples",
                                                    "exact_batching", "row_block", "torch_threads")}
        stats["loadavg_after"] = os.getloadavg()
        result["settings"][name] = stats
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, result)                      # what is measured so far, should a later setting fail
        print(f"serve_load: {name}: {stats['ok']}/{stats['sent']} ok, lost {stats['lost']}, failed {stats['failed']}; "
              f"{stats['images_per_s']:.2f} images/s; small p50 {stats['small_p50_s']:.2f} s p99 "
              f"{stats['small_p99_s']:.2f} s; large {[round(x, 1) for x in stats['large_latency_s']]}", flush=True)
    if {"gather", "step"} <= set(result["settings"]):
        g, st = result["settings"]["gather"], result["settings"]["step"]
        result["step_vs_gather"] = {"small_p99_lower_x": g["small_p99_s"] / st["small_p99_s"],
                                    "small_p50_lower_x": g["small_p50_s"] / st["small_p50_s"],
                                    "throughput_x": st["images_per_s"] / g["images_per_s"]}
        print(f"serve_load: step vs gather: {result['step_vs_gather']}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    plot_mixed(result, out.with_suffix(".png"))
    print(f"serve_load: wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
