"""``msdda batch``: Ray Data generation of a jobs file, its manifest, and resuming after a kill.

One local Ray (2 CPUs) serves the module. The first run goes through ``msdda.cli.main`` in this process (it joins
the Ray already started here); the killed run is a real ``msdda batch`` subprocess joining the same Ray through
$RAY_ADDRESS, stopped with SIGKILL while it writes. Images are compared with ``Engine.generate`` of each row alone,
with the actors' torch thread count.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from msdda import cli
from msdda.atomic import encode_png
from processes import tagged

ACTOR_THREADS = 1     # --num-cpus of the runs below, i.e. each actor's torch threads
STEPS = 2


def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"id": f"img-{i:02d}", "class": i % 10, "seed": 1000 + i, "steps": STEPS + (i % 2),
             "weights": {"legible": round((i % 5) / 4, 2), "bold": round(1 - (i % 5) / 4, 2)}}
            for i in range(start, start + n)]


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray on this machine for the module; every process it starts carries a tag, so the test can check
    that none is left after ray.shutdown()."""
    import ray

    tag = uuid.uuid4().hex
    os.environ["MSDDA_TEST_TAG"] = tag
    try:
        context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    finally:
        del os.environ["MSDDA_TEST_TAG"]
    yield context.address_info["address"]
    ray.shutdown()
    deadline = time.monotonic() + 30
    while tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert tagged(tag) == []


@pytest.fixture(scope="module")
def zoo_engine():
    import msdda
    from msdda.zoo import OBJECTIVES, zoo_paths

    paths = zoo_paths()
    return msdda.Engine.from_pretrained(str(paths["base"]), {n: str(paths[n]) for n in OBJECTIVES})


def _direct_png(engine, row: dict) -> bytes:
    threads = torch.get_num_threads()
    torch.set_num_threads(ACTOR_THREADS)
    try:
        out = engine.generate(class_labels=row["class"], weights=row["weights"], seed=row["seed"],
                              steps=row["steps"], guidance_scale=2.0)
    finally:
        torch.set_num_threads(threads)
    return encode_png(out.images[0])


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _batch_args(jobs, out, *extra):
    return ["batch", "--input", str(jobs), "--out", str(out), "--batch-size", "2", "--num-cpus", str(ACTOR_THREADS),
            *extra]


# ---------------------------------------------------------------------- bad input: one line, before Ray starts
HOSTILE_ROWS = [   # (JSONL line, what its refusal says); none of them may reach Ray or stop the others
    ('{"id": "a", "class": 1}', "no seed"),
    ('{"id": "a", "class": 2, "seed": 2}', "appears twice"),              # a's id was taken by the row above
    ('{"id": "../x", "class": 1, "seed": 1}', "not a usable file name"),
    ('{"class": 1, "seed": 1, "wieghts": {}}', "unknown field 'wieghts'"),
    ('{"class": 1, "seed": "one"}', "seed must be an integer"),
    ('{"class": 1, "seed": 1, "weights": {"legible": "x"}}', "weights must be an object"),
    ("{not json", "is not JSON"),
    ('{"class": 1, "seed": 18446744073709551616}', "does not fit in 64 bits"),   # 2**64: the old OverflowError
    ('{"class": 1, "seed": -1}', "seed must be"),
    ('{"class": 1, "seed": 1, "steps": -99999999999999999999999}', "does not fit in 64 bits"),
    ('{"class": 1, "seed": 1, "guidance_scale": 1e400}', "guidance_scale must be a finite number"),
    ('{"class": 1, "seed": 1, "eta": NaN}', "eta must be a finite number"),
    ('{"class": 1, "seed": 1, "weights": [[["a"], 1]]}', "weights must be an object"),            # unhashable key
    ('{"class": 1, "seed": 1, "weights": [[{"a": 1}, 1]]}', "weights must be an object"),
    ('{"class": 1, "seed": 1, "weights": "' + "[" * 50000 + "]" * 50000 + '"}', "nested too deeply"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('[1, 2]', "not a JSON object"),
    ('{"class": 1, "seed": 1, "prompt": "' + "p" * 100000 + '", "id": 7}', "not a usable file name"),
    ('{"class": 1, "seed": 1, "' + "k" * 100000 + '": 1}', "unknown field"),
]


def test_hostile_rows_are_refused_one_line_each_before_ray(tmp_path, capsys):
    """Every hostile row is recorded as refused with its one-line reason, the command exits 2 with one line, Ray
    never starts (no row reaches it), and a rerun rewrites nothing."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(line + "\n" for line, _ in HOSTILE_ROWS))
    out = tmp_path / "out"
    assert cli.main(_batch_args(jobs, out)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("msdda: error: ") and "\n" not in err and len(err) <= 300
    assert "Ray" not in captured.out
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(manifest) == len(HOSTILE_ROWS)
    for rec, (_, message) in zip(manifest, HOSTILE_ROWS):
        assert rec["image"] is None and message in rec["error"] and len(rec["error"]) <= 300, rec["error"]
    assert manifest[0]["id"] == "a" and manifest[1]["id"] == "row 1"       # the duplicate gets no id of its own
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert cli.main(_batch_args(jobs, out)) == 2
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def _folder_named_jsonl(d):
    (d / "dir.jsonl").mkdir()
    return d / "dir.jsonl"


def _empty_jsonl(d):
    (d / "empty.jsonl").write_text("\n\n")
    return d / "empty.jsonl"


@pytest.mark.parametrize("make_input, message", [
    (lambda d: d / "missing.jsonl", "cannot read"),
    (_folder_named_jsonl, "is a folder"),
    (_empty_jsonl, "has no rows"),
    (lambda d: d / "jobs.csv", "must be .jsonl"),
])
def test_unreadable_jobs_file_is_one_line(tmp_path, capsys, make_input, message):
    """Only a jobs file that cannot be read at all is refused whole, and before the output folder exists."""
    assert cli.main(_batch_args(make_input(tmp_path), tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("msdda: error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_fifo_jobs_file_is_refused_not_waited_on(tmp_path, capsys):
    fifo = tmp_path / "jobs.jsonl"
    os.mkfifo(fifo)
    assert cli.main(_batch_args(fifo, tmp_path / "out")) == 2
    assert "named pipe" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--row-block", "0"], "--row-block must be positive"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--dtype", "float8"], "invalid choice"),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, capsys, flags, message):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"class": 1, "seed": 1}\n')
    assert cli.main(_batch_args(jobs, tmp_path / "out") + flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("msdda: error: ") and "\n" not in err and message in err


# ---------------------------------------------------------------------- runs
@pytest.mark.slow
def test_parquet_jobs_images_and_manifest(ray_address, zoo_engine, tmp_path, capsys):
    """A Parquet jobs file; the manifest holds the job's fields, the models' and the file's sha256 and timing;
    a row the engine refuses is recorded with its reason (exit 2, one line) and the others are made."""
    rows = _rows(3) + [{"id": "typo", "class": 1, "seed": 5, "steps": STEPS, "weights": {"legibel": 1.0}}]
    jobs = tmp_path / "jobs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), jobs)          # weights become a struct column (nulls for gaps)
    out = tmp_path / "out"
    assert cli.main(_batch_args(jobs, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("msdda: error: 1 of 4 rows failed") and "unknown expert 'legibel'" in err
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [m["id"] for m in manifest] == [r["id"] for r in rows]
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{r['id']}.png" for r in rows[:3]]
    models = json.loads(manifest[0]["models"])
    assert [m["name"] for m in models] == ["base", "legible", "bold", "compressible"]
    assert models == [{"name": m.name, "sha256": m.sha256} for m in zoo_engine.models]
    for rec, row in zip(manifest[:3], rows):
        data = (out / rec["image"]).read_bytes()
        assert rec["file_sha256"] == hashlib.sha256(data).hexdigest() and rec["error"] is None
        assert (rec["class"], rec["seed"], rec["steps"], rec["strategy"]) == (row["class"], row["seed"], row["steps"], "msdda")
        assert json.loads(rec["weights"]) == {k: v for k, v in row["weights"].items()}
        assert rec["batch_seconds"] > 0 and rec["finished_at"] > 0 and rec["engine_call_samples"] >= 1
    assert manifest[3]["image"] is None and "unknown expert 'legibel'" in manifest[3]["error"]
    assert (out / "images" / "img-01.png").read_bytes() == _direct_png(zoo_engine, rows[1])


@pytest.mark.slow
def test_resume_after_kill_loses_and_duplicates_nothing(ray_address, zoo_engine, tmp_path, capsys):
    rows = _rows(8)
    jobs = _write_jsonl(tmp_path / "jobs.jsonl", rows)
    out = tmp_path / "out"
    env = dict(os.environ, RAY_ADDRESS=ray_address)
    proc = subprocess.Popen([sys.executable, "-m", "msdda.cli", *_batch_args(jobs, out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    parts = out / "manifest.parts"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if parts.is_dir() and any(parts.glob("part-*.parquet")):      # some rows recorded, the rest still to come
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    made = sorted((out / "images").glob("*.png"))
    recorded = {r["id"] for f in parts.glob("part-*.parquet") for r in pq.read_table(f).to_pylist()}
    assert recorded and len(made) < len(rows)
    damaged = out / "images" / f"{sorted(recorded)[0]}.png"
    damaged.write_bytes(damaged.read_bytes()[:40])            # a damaged file is made again
    # recorded images are verified and kept; an image written just before the kill, without its record yet,
    # is made again (to the same bytes, checked below)
    kept = [p for p in made if p.stem in recorded and p != damaged]
    kept_mtimes = {p.name: p.stat().st_mtime_ns for p in kept}

    assert cli.main(_batch_args(jobs, out)) == 0
    assert "already done" in capsys.readouterr().out
    ids = [r["id"] for r in rows]
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i}.png" for i in ids]   # no temp files left
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [m["id"] for m in manifest] == ids                                                  # once each
    assert list((out / "manifest.parts").iterdir()) == []
    for p in kept:
        assert p.stat().st_mtime_ns == kept_mtimes[p.name]                                     # not made twice
    for rec, row in zip(manifest, rows):
        data = (out / "images" / f"{row['id']}.png").read_bytes()
        assert rec["file_sha256"] == hashlib.sha256(data).hexdigest()
        assert data == _direct_png(zoo_engine, row), row["id"]
    from PIL import Image

    Image.open(io.BytesIO(damaged.read_bytes())).load()

    # nothing left to do: a third run makes nothing and keeps the manifest
    assert cli.main(_batch_args(jobs, out)) == 0
    assert f"{len(rows)} already done, 0 to make" in capsys.readouterr().out
    assert pq.read_table(out / "manifest.parquet").to_pylist() == manifest


def test_mixed_good_and_hostile_rows_finish_and_rerun_is_a_no_op(ray_address, zoo_engine, tmp_path, capsys):
    """Good rows are made, hostile ones (an int64-overflowing seed, deep or unhashable weights, an engine refusal)
    recorded as refused with one line each; the same command again makes and rewrites nothing."""
    good = _rows(2)
    lines = [json.dumps(good[0]), '{"id": "big", "class": 1, "seed": 18446744073709551616}',
             '{"id": "deep", "class": 1, "seed": 1, "weights": "' + "[" * 50000 + "]" * 50000 + '"}',
             '{"id": "pairs", "class": 1, "seed": 1, "weights": [[["legible"], 1]]}',
             '{"id": "typo", "class": 1, "seed": 1, "steps": 2, "weights": {"legibel": 1}}', json.dumps(good[1])]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert cli.main(_batch_args(jobs, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msdda: error: 4 of 6 rows failed") and len(err[0]) <= 300
    manifest = {r["id"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert set(manifest) == {"img-00", "img-01", "big", "deep", "pairs", "typo"}
    for row in good:
        assert manifest[row["id"]]["error"] is None
        assert (out / "images" / f"{row['id']}.png").read_bytes() == _direct_png(zoo_engine, row)
    for rid, words in [("big", "does not fit in 64 bits"), ("deep", "nested too deeply"),
                       ("pairs", "weights must be an object"), ("typo", "unknown expert 'legibel'")]:
        assert manifest[rid]["image"] is None and words in manifest[rid]["error"], manifest[rid]
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")}
    assert cli.main(_batch_args(jobs, out)) == 2
    assert "2 already done, 0 to make, 4 refused" in capsys.readouterr().out
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")}
    assert after == before                          # the engine's refusal is recorded as such: not tried again
    assert manifest["typo"]["refused"] is True and manifest["img-00"]["refused"] is False
