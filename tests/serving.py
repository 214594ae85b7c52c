"""One ``msdda serve`` process for a test module: started on a free port of 127.0.0.1 with a tag in its
environment (so every process it and its Ray start can be found), its banner awaited, stopped with SIGTERM."""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest

from processes import free_port, tagged

STARTUP_S = 240              # Ray + Serve + one replica loading the zoo, on a busy 2-core machine


class ServeProcess:
    def __init__(self, tmp_path, flags, *, threads: int, env: dict | None = None):
        self.tag, self.port = uuid.uuid4().hex, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp_path / "server.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "msdda.cli", "serve", "--port", str(self.port), "--num-cpus", str(threads),
             *flags], env=dict(os.environ if env is None else env, MSDDA_TEST_TAG=self.tag, PYTHONUNBUFFERED="1"),
            stdout=subprocess.PIPE, stderr=self.log, text=True, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.proc.stdout], daemon=True).start()
        self.banner = self._wait_banner()

    def _wait_banner(self) -> str:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line.startswith("msdda serve: http"):
                return line
        self.stop()
        pytest.fail(f"msdda serve did not start; see {self.log.name}")

    def request(self, method: str, path: str, body=None, *, raw: bytes | None = None, timeout: float = 300):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def models(self) -> dict:
        return self.request("GET", "/v1/models")[1]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.log.close()

    def close(self):
        """Stop the server, then check that nothing it or its Ray started outlives it."""
        self.stop()
        deadline = time.monotonic() + 30
        while tagged(self.tag) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not tagged(self.tag)
