"""Load test of ``msdda serve`` on loopback: N concurrent clients send M mixed requests, once per server setting.

    .venv/bin/python bench/serve_load.py                       # 16 clients x 1000 requests, the zoo, 50 steps
    .venv/bin/python bench/serve_load.py --clients 4 --requests 24 --steps 5 --out /tmp/smoke.json   # smoke

For each setting it starts its own ``msdda serve`` (a local Ray, 127.0.0.1), warms it up with one request,
then the clients share the M requests (mixed weights over the zoo's experts, class labels and seeds; every
request the same steps) and each checks its answer: HTTP 200, every image a PNG of the model's size. It
stops the server with SIGTERM before the next setting. Settings:

- ``exact``: dynamic batching on a batch-invariant Engine (``--row-block``), each response bit-identical to a
  direct Engine.generate on an Engine built the same way (the default server);
- ``fast``:  dynamic batching with --no-exact-batching (equal to a direct call to float32 rounding);
- ``single``: --max-batch-size 1, i.e. no batching: the baseline.

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
    "exact": [],
    "fast": ["--no-exact-batching"],
    "single": ["--max-batch-size", "1"],
}


def mixed_requests(n: int, steps: int, seed: int = 0) -> list[dict]:
    """n requests with weights drawn on the simplex over two or three experts, class labels and seeds."""
    from msdda.zoo import OBJECTIVES

    rng = random.Random(seed)
    out = []
    for i in range(n):
        experts = rng.sample(OBJECTIVES, rng.choice((2, 3)))
        cuts = sorted(rng.random() for _ in range(len(experts) - 1))
        parts = [b - a for a, b in zip([0.0] + cuts, cuts + [1.0])]
        weights = {e: round(w, 4) for e, w in zip(experts, parts)}
        weights[experts[-1]] = round(1 - sum(v for k, v in weights.items() if k != experts[-1]), 4)
        out.append({"class_labels": rng.randrange(10), "weights": weights, "seed": rng.randrange(2**31), "steps": steps})
    return out


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
    args = p.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
