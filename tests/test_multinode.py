"""``msdda batch`` and ``msdda serve`` on a Ray cluster of three nodes on this machine.

``ray.cluster_utils.Cluster`` (Ray's own test cluster) starts a head and two worker nodes, each a separate raylet
with 1 CPU, all on 127.0.0.1. Actors and replicas ask for 1 CPU each (``--num-cpus 1``), so two of them must run
on two different nodes. Each node's processes carry ``MSDDA_TEST_NODE`` (the raylet's environment, inherited by
its workers) and every process of the module carries ``MSDDA_TEST_TAG``, so the tests can tell which node runs a
replica and check that nothing is left when the cluster is shut down. The commands are real subprocesses that
join the cluster through $RAY_ADDRESS.

The tests share the cluster and remove nodes from it: the batch test removes one of the worker nodes, the serve
test (run after it, or alone) needs two nodes with a free CPU and removes the one under a replica.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import pyarrow.parquet as pq
import pytest

from processes import free_port, process_environ, process_title, processes_with

ray_cluster_utils = pytest.importorskip("ray.cluster_utils")

ROWS = 16
STEPS = 4                  # enough work per row that both actors are still busy when a node is removed
WAIT_S = 90                # the most any one phase may take on a loaded 2-core machine


@pytest.fixture(scope="module")
def cluster():
    tag = uuid.uuid4().hex
    os.environ["MSDDA_TEST_TAG"] = tag
    try:
        c = ray_cluster_utils.Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": False, "env_vars": {"MSDDA_TEST_NODE": "head"}})
        for name in ("node-1", "node-2"):
            c.add_node(num_cpus=1, env_vars={"MSDDA_TEST_NODE": name})
        c.wait_for_nodes()
    finally:
        del os.environ["MSDDA_TEST_TAG"]
    yield c, tag
    c.shutdown()
    deadline = time.monotonic() + 30
    while processes_with("MSDDA_TEST_TAG", tag) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_with("MSDDA_TEST_TAG", tag) == [], "processes of the test cluster outlived it"


def _env(c, tag) -> dict:
    return dict(os.environ, RAY_ADDRESS=c.address, MSDDA_TEST_TAG=tag, PYTHONUNBUFFERED="1")


def _recorded(out) -> dict[str, str]:
    """{row id: node id} of the rows the running job has recorded so far (its manifest parts)."""
    found = {}
    for part in sorted((out / "manifest.parts").glob("part-*.parquet")):
        try:
            records = pq.read_table(part).to_pylist()
        except Exception:  # noqa: BLE001 -- a part being renamed into place is read on the next poll
            continue
        found.update({r["id"]: r["node_id"] for r in records if r["error"] is None})
    return found


def test_batch_spreads_over_nodes_and_survives_a_node_removed(cluster, tmp_path):
    c, tag = cluster
    rows = [{"id": f"row-{i:02d}", "class": i % 10, "seed": 700 + i, "steps": STEPS,
             "weights": {"legible": 0.5, "bold": 0.5}} for i in range(ROWS)]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "msdda.cli", "batch", "--input", str(jobs), "--out", str(out),
               "--concurrency", "2", "--num-cpus", "1", "--batch-size", "1"]
    proc = subprocess.Popen(command, env=_env(c, tag), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = {n.node_id: n for n in c.worker_nodes}
    removed, before_removal = None, {}
    deadline = time.monotonic() + WAIT_S
    while proc.poll() is None and time.monotonic() < deadline:
        before_removal = _recorded(out)
        producing = set(before_removal.values())
        victim = next((workers[n] for n in sorted(producing) if n in workers), None)
        if len(producing) >= 2 and victim is not None:
            c.remove_node(victim)        # its raylet, object store and the actor on it are killed
            removed, removed_at = victim.node_id, time.time()
            break
        time.sleep(0.2)
    try:
        stdout, stderr = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert removed is not None, f"rows were not made on two nodes while the job ran: {before_removal}"
    assert len(before_removal) < ROWS
    if proc.returncode != 0:
        # Ray gave up on the lost actor's rows: the same command resumes the job, making only the missing rows
        rerun = subprocess.run(command, env=_env(c, tag), capture_output=True, text=True, timeout=WAIT_S)
        assert rerun.returncode == 0, rerun.stderr
        stdout = rerun.stdout
    else:
        assert stderr == "", stderr
    assert "wrote" in stdout

    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    ids = [r["id"] for r in rows]
    assert [m["id"] for m in manifest] == ids                                   # every row exactly once
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i}.png" for i in ids]
    for m in manifest:
        assert m["error"] is None
        assert m["file_sha256"] == hashlib.sha256((out / "images" / f"{m['id']}.png").read_bytes()).hexdigest()
    assert len({m["node_id"] for m in manifest}) >= 2
    # nothing was made on the removed node after it was gone (rows it finished before may be recorded later)
    assert all(m["finished_at"] < removed_at for m in manifest if m["node_id"] == removed)
    assert any(m["finished_at"] > removed_at for m in manifest)
    assert list((out / "manifest.parts").iterdir()) == []


def _generate(port: int, seed: int) -> dict:
    body = json.dumps({"class_labels": seed % 10, "steps": 2, "seed": seed}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/generate", data=body,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def _replica_nodes(tag: str) -> dict[str, str]:
    """{pid: MSDDA_TEST_NODE} of the cluster's live Serve replicas."""
    return {pid: process_environ(pid).get("MSDDA_TEST_NODE", "?") for pid in processes_with("MSDDA_TEST_TAG", tag)
            if process_title(pid).startswith("ray::ServeReplica")}


def test_serve_two_replicas_on_two_nodes_keeps_answering(cluster):
    c, tag = cluster
    port = free_port()
    # Every node here has the address 127.0.0.1, so only one Serve proxy can bind the port: Serve is started
    # with its proxy on the head alone (on a real cluster each node's proxy binds its own address).
    subprocess.run([sys.executable, "-c", "import ray; from ray import serve; ray.init(); serve.start("
                    f"proxy_location='HeadOnly', http_options={{'host': '127.0.0.1', 'port': {port}}})"],
                   env=_env(c, tag), check=True, capture_output=True, timeout=WAIT_S)
    proc = subprocess.Popen([sys.executable, "-m", "msdda.cli", "serve", "--replicas", "2", "--num-cpus", "1",
                             "--host", "127.0.0.1", "--port", str(port)],
                            env=_env(c, tag), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while not any("http://" in line for line in lines) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert any("http://" in line for line in lines), (lines, proc.poll(), proc.poll() is not None and proc.stderr.read())
        assert [_generate(port, s)["seeds"] for s in range(4)] == [[s] for s in range(4)]
        replicas = _replica_nodes(tag)
        assert len(replicas) == 2 and len(set(replicas.values())) == 2, replicas    # one replica on each of two nodes

        victim = next(n for n in c.worker_nodes if n.node_id and
                      any(node == process_environ(str(n.all_processes["raylet"][0].process.pid)).get("MSDDA_TEST_NODE")
                          for node in replicas.values()))
        c.remove_node(victim)
        # Requests go on being answered: by the surviving replica, and by one Serve starts in the lost one's place
        # where a node has room. A request already routed to the dead replica may fail while Serve notices.
        answered, failures = 0, 0
        deadline = time.monotonic() + WAIT_S
        while answered < 4 and time.monotonic() < deadline:
            try:
                assert _generate(port, 100 + answered)["seeds"] == [100 + answered]
                answered += 1
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                answered, failures = 0, failures + 1
                time.sleep(0.5)
        assert answered == 4, f"serve stopped answering after a node was removed ({failures} failed requests)"
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=WAIT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
    reader.join(5)
    assert proc.returncode == 0
    assert proc.stderr.read() == ""
