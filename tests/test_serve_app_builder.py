"""``msdda.serve:app_builder``, Ray Serve's own way in: ``serve run`` with a config file, and ``serve run`` with the
import path and ``key=value`` arguments into a running Serve; both answer POST /v1/generate on 127.0.0.1.

Each part starts its own local Ray (no process of it is left: the process group is checked) and is bounded in
time. The zoo, 2-step requests.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

STARTUP_S = 240
BODY = {"class_labels": 3, "weights": {"legible": 0.5, "bold": 0.5}, "steps": 2, "seed": 1}
SERVE = str(Path(sys.executable).with_name("serve"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tagged(tag: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if f"MSDDA_TEST_TAG={tag}".encode() in fh.read():
                    found.append(pid)
        except OSError:
            continue
    return found


def _post(url: str, body: dict, timeout: float = 120):
    req = urllib.request.Request(url + "/v1/generate", data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, json.loads(resp.read())


def _wait_answering(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the process exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(1)
    pytest.fail(f"nothing answered at {url}; see {log}")


def _stop(proc: subprocess.Popen, tag: str, sig=signal.SIGINT) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    deadline = time.monotonic() + 30
    while _tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _tagged(tag)
    for pid in left:                       # our own leftovers only (tagged by this test's environment)
        try:
            os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
    assert not left, f"processes left behind: {left}"


def _env(tag: str) -> dict:
    return dict(os.environ, MSDDA_TEST_TAG=tag, PYTHONUNBUFFERED="1", RAY_ADDRESS="")


def test_serve_run_config_file(tmp_path):
    port, tag = _free_port(), uuid.uuid4().hex
    config = tmp_path / "msdda-serve.yaml"
    config.write_text(textwrap.dedent(f"""\
        proxy_location: EveryNode
        http_options:
          host: 127.0.0.1
          port: {port}
        applications:
          - name: msdda
            route_prefix: /
            import_path: msdda.serve:app_builder
            args:
              max_images: 2
              max_steps: 10
              num_cpus: 1
              batching: step
        """))
    log = tmp_path / "serve_run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([SERVE, "run", str(config)], stdout=out, stderr=subprocess.STDOUT, env=_env(tag),
                                cwd=tmp_path, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_answering(url, proc, log)
        status, answer = _post(url, BODY)
        assert status == 200 and len(answer["images"]) == 1 and answer["seeds"] == [1]
        with urllib.request.urlopen(url + "/v1/models", timeout=30) as resp:
            info = json.loads(resp.read())
        assert info["limits"] == {"max_images": 2, "max_steps": 10} and info["batching"] == "step"
    finally:
        _stop(proc, tag)


HOLDER = """
import sys, ray
from ray import serve
ctx = ray.init(num_cpus=2, include_dashboard=False)
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[1])})
print(ctx.address_info["gcs_address"], flush=True)
sys.stdin.read()                      # until the test closes our stdin
serve.shutdown()
ray.shutdown()
"""


def test_serve_run_import_path_with_arguments(tmp_path):
    """``serve run msdda.serve:app_builder key=value ...`` into a running Serve (its HTTP port set by
    ``serve.start``, as an operator would; ``serve run`` with an import path always asks for port 8000)."""
    port, tag = _free_port(), uuid.uuid4().hex
    log = tmp_path / "holder.log"
    with open(log, "w") as err:
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(port)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=err, text=True, env=_env(tag),
                                  start_new_session=True)
    try:
        address = holder.stdout.readline().strip()
        assert address, f"the Ray holder did not start; see {log}"
        run_log = tmp_path / "serve_run.log"
        with open(run_log, "w") as out:
            done = subprocess.run([SERVE, "run", "--address", address, "--non-blocking", "msdda.serve:app_builder",
                                   "max_images=2", "max_steps=10", "num_cpus=1", "batching=gather"],
                                  stdout=out, stderr=subprocess.STDOUT, env=_env(tag), cwd=tmp_path,
                                  timeout=STARTUP_S)
        assert done.returncode == 0, run_log.read_text()[-2000:]
        url = f"http://127.0.0.1:{port}"
        _wait_answering(url, holder, log)
        status, answer = _post(url, BODY)
        assert status == 200 and len(answer["images"]) == 1
        with urllib.request.urlopen(url + "/v1/models", timeout=30) as resp:
            info = json.loads(resp.read())
        assert info["batching"] == "gather" and info["limits"]["max_steps"] == 10
    finally:
        holder.stdin.close()                  # the holder shuts Serve and its Ray down
        try:
            holder.wait(90)
        except subprocess.TimeoutExpired:
            pass
        _stop(holder, tag, sig=signal.SIGTERM)
