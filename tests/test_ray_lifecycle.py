"""What ``msdda batch`` and ``msdda serve`` leave behind and print when they start their own local Ray.

Real subprocesses, with no $RAY_ADDRESS: each starts a local Ray of its own. Every process they start carries
``MSDDA_TEST_TAG`` (inherited environment), so the test sees whether any of them outlives the command.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from processes import processes_with

pytest.importorskip("ray")


def _run(args, tag, timeout=240):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MSDDA_VERBOSE")}
    env["MSDDA_TEST_TAG"] = tag
    return subprocess.run([sys.executable, "-m", "msdda.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_batch_returns_after_its_ray_is_gone_and_a_refused_row_is_one_line(tmp_path):
    rows = [{"id": "a", "class": 1, "seed": 1, "steps": 2},
            {"id": "refused", "class": 2, "seed": 2, "steps": 2, "weights": {"no-such-expert": 1.0}},
            {"id": "b", "class": 3, "seed": 3, "steps": 2}]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tag = uuid.uuid4().hex
    done = _run(["batch", "--input", str(jobs), "--out", str(tmp_path / "out"), "--num-cpus", "1",
                 "--batch-size", "3"], tag)
    left = processes_with("MSDDA_TEST_TAG", tag)        # read at once: the command must not return before they end
    assert left == [], f"Ray processes outlived msdda batch: {left}"
    assert done.returncode == 2
    # Ray's own lines (token authentication, core_worker, "(raylet) ...") are gone: the refusal is the only line
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("msdda: error: 1 of 3 rows failed"), done.stderr
    assert "no-such-expert" in done.stderr
    assert "Ray: local" in done.stdout and (tmp_path / "out" / "images" / "b.png").is_file()


def test_serve_with_a_folder_that_is_no_model_fails_before_ray(tmp_path):
    (tmp_path / "empty").mkdir()
    tag = uuid.uuid4().hex
    done = _run(["serve", "--base", str(tmp_path / "empty")], tag, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no UNet found" in done.stderr, done.stderr
    assert "Ray" not in done.stdout and processes_with("MSDDA_TEST_TAG", tag) == []   # refused before Ray started
