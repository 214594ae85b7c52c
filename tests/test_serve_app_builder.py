"""``msdda.serve:app_builder``, Ray Serve's own way in: ``serve run`` with a config file, and ``serve run`` with the
import path and ``key=value`` arguments; both answer POST /v1/generate on 127.0.0.1.

The module starts one local Ray of its own with Serve on a free port (``serve run --address`` deploys into it, so
neither a stranger's ``ray start`` cluster on this machine nor port 8000 is touched); each test deploys its own
application under its own name and route prefix, so the two run side by side in that Serve (as two applications
of one cluster would). At the end the holder stops Serve and Ray, and no process tagged with its environment may
be left. Bounded in time; the zoo, 2-step requests.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from processes import free_port, tagged

STARTUP_S = 240
BODY = {"class_labels": 3, "weights": {"legible": 0.5, "bold": 0.5}, "steps": 2, "seed": 1}
SERVE = str(Path(sys.executable).with_name("serve"))


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
    while tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = tagged(tag)
    for pid in left:                       # our own leftovers only (tagged by this test's environment)
        try:
            os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
    assert not left, f"processes left behind: {left}"


def _env(tag: str) -> dict:
    # RAY_AUTH_MODE=disabled: Ray 2.60 turns token authentication on for a new local cluster, and `serve run`
    # from another process then failed to connect to it here ("Failed to connect to Ray cluster"); this test's
    # cluster is its own and short-lived
    return dict(os.environ, MSDDA_TEST_TAG=tag, PYTHONUNBUFFERED="1", RAY_ADDRESS="", RAY_AUTH_MODE="disabled")


HOLDER = """
import sys, ray
from ray import serve
ctx = ray.init(address="local", num_cpus=2, include_dashboard=False)
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[1])})
print(ctx.address_info["gcs_address"], flush=True)
sys.stdin.read()                      # until the test closes our stdin
serve.shutdown()
ray.shutdown()
"""


class RayHolder:
    """A local Ray of this test's own, with Serve listening on ``port`` (what an operator's ``ray start`` +
    ``serve start --http-port`` would be; a process of ours, so it is stopped and checked for leftovers)."""

    def __init__(self, tmp_path: Path):
        self.port, self.tag = free_port(), uuid.uuid4().hex
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "holder.log"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(self.port)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=True, env=_env(self.tag),
                                         start_new_session=True)
        self.address = self.proc.stdout.readline().strip()
        if not self.address:
            self.close()
            pytest.fail(f"the Ray holder did not start; see {self.log}")

    def serve_run(self, tmp_path: Path, *args: str, route_prefix: str = "") -> str:
        """``serve run --address <ours> --non-blocking ARGS``; fails the test unless it deploys and answers under
        ``route_prefix``, whose URL it returns."""
        run_log = tmp_path / "serve_run.log"
        with open(run_log, "w") as out:
            done = subprocess.run([SERVE, "run", "--address", self.address, "--non-blocking", *args],
                                  stdout=out, stderr=subprocess.STDOUT, env=_env(self.tag), cwd=tmp_path,
                                  timeout=STARTUP_S)
        assert done.returncode == 0, run_log.read_text()[-2000:]
        _wait_answering(self.url + route_prefix, self.proc, self.log)
        return self.url + route_prefix

    def close(self) -> None:
        self.proc.stdin.close()                  # the holder shuts Serve and its Ray down
        try:
            self.proc.wait(90)
        except subprocess.TimeoutExpired:
            pass
        _stop(self.proc, self.tag, sig=signal.SIGTERM)


def _models(url: str) -> dict:
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def holder(tmp_path_factory):
    ray_serve = RayHolder(tmp_path_factory.mktemp("ray_serve"))
    yield ray_serve
    ray_serve.close()


def test_serve_run_config_file(holder, tmp_path):
    config = tmp_path / "msdda-serve.yaml"
    config.write_text(textwrap.dedent(f"""\
        proxy_location: EveryNode
        http_options:
          host: 127.0.0.1
          port: {holder.port}
        applications:
          - name: msdda
            route_prefix: /
            import_path: msdda.serve:app_builder
            args:
              max_images: 2
              max_steps: 60
              num_cpus: 1
              batching: step
        """))
    url = holder.serve_run(tmp_path, str(config))
    status, answer = _post(url, BODY)
    assert status == 200 and len(answer["images"]) == 1 and answer["seeds"] == [1]
    info = _models(url)
    assert info["limits"] == {"max_images": 2, "max_steps": 60} and info["batching"] == "step"


def test_serve_run_import_path_with_arguments(holder, tmp_path):
    """``serve run msdda.serve:app_builder key=value ...`` (Serve's HTTP port set by the running Serve: ``serve
    run`` with an import path alone would listen on 8000), as a second application of the same Serve."""
    prefix = "/second"
    url = holder.serve_run(tmp_path, "--name", "second", "--route-prefix", prefix, "msdda.serve:app_builder",
                           "max_images=2", "max_steps=60", "num_cpus=1", "batching=gather", route_prefix=prefix)
    status, answer = _post(url, BODY)
    assert status == 200 and len(answer["images"]) == 1
    info = _models(url)
    assert info["batching"] == "gather" and info["limits"]["max_steps"] == 60
