"""``msdda batch --input JOBS --out DIR``: offline generation with Ray Data, one row per image, resumable.

JOBS (JSON Lines or Parquet) has one row per image: ``id`` (optional: the row number), ``class`` or ``prompt``,
``weights`` ({expert: w}, or its JSON text), ``seed``, and optionally ``steps``, ``guidance_scale``, ``eta``,
``strategy``. Rows go through ``Dataset.map_batches`` over an actor pool of Engines; each actor runs its batch of
rows through ``msdda.coalesce.generate_many`` (rows that agree on steps/guidance/strategy share one engine
call), writes ``DIR/images/<id>.png`` atomically and returns the rows' manifest records, which the driver
appends to ``DIR/manifest.parts/`` as they arrive and folds into ``DIR/manifest.parquet`` at the end.

Hostile rows: a row that cannot be made (a wrong type, an unknown field, an id that is no file name or appears
twice, a seed outside [0, 2**63), JSON nested too deeply...) is refused before Ray starts and recorded in the
manifest with its one-line reason (``error``, ``refused: true``), as a row the engine refuses (a ValueError) is;
the others are still made. A refused row is not tried again while its job fields are unchanged. Refused
rows without a usable id are recorded as ``row N``. The command then exits 2 with one line.

The output folder follows msdda's folder rule (``msdda.runfolder``): created by msdda or recognised by its
``run.json``, locked for the run (a second run on it is refused), ``images/`` and ``manifest.parts/`` real
subfolders (never symbolic links), and no file in it touched that msdda did not write.

Resume: a row is done when its image exists, decodes, and has the sha256 its manifest record gives for the same
job fields; every other row (missing, damaged, changed, failed) is made again. An image is written before its
record, so a kill at any point loses nothing and duplicates nothing: an image without a record is simply made
again (with exact batching, to the same bytes).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import time
from pathlib import Path

from msdda.errors import is_out_of_memory, one_line, short_value
from msdda.ray_runtime import ModelSpec, model_spec, ray_session, require_ray
from msdda.runfolder import RunFolder, image_intact
from msdda.validation import check_seed

__all__ = ["JOB_FIELDS", "add_command", "read_jobs", "pending_rows", "run", "EngineWorker"]

#: a job row's fields, in manifest order (weights as JSON text)
JOB_FIELDS = ("id", "prompt", "class", "weights", "seed", "steps", "guidance_scale", "eta", "strategy")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RUN_INFO = "run.json"          # the folder's msdda manifest: the models and settings of the batch
INT64 = (-2 ** 63, 2 ** 63 - 1)
MAX_JOBS_BYTES = 1 << 30      # the largest jobs file read (the file rule: a regular file of bounded size)
MAX_MANIFEST_BYTES = 1 << 32
# what one row's failure may raise while it is checked: each is that row's one line, never the whole file's
ROW_ERRORS = (ValueError, TypeError, RecursionError, OverflowError)


def _manifest_schema():
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("prompt", pa.string()), ("class", pa.int64()), ("weights", pa.string()),
        ("seed", pa.int64()), ("steps", pa.int64()), ("guidance_scale", pa.float64()), ("eta", pa.float64()),
        ("strategy", pa.string()),
        ("image", pa.string()),              # path relative to DIR; null when the row failed
        ("file_sha256", pa.string()),
        ("models", pa.string()),             # JSON [{name, sha256}] of the Engine that made it
        ("backend", pa.string()), ("exact_batching", pa.bool_()),
        ("engine_call_samples", pa.int64()),  # samples in the Engine.generate call that made it
        ("batch_seconds", pa.float64()),     # wall time of the actor batch it was part of
        ("finished_at", pa.float64()),       # unix time the image was written
        ("error", pa.string()),              # the one-line reason when the row was refused or failed
        ("refused", pa.bool_()),             # refused as input (not a transient failure): a rerun skips it while
                                             # its job fields are unchanged
        ("node_id", pa.string()),            # the Ray node whose actor made it (on a cluster: which machine)
    ])


# ---------------------------------------------------------------------- jobs
def _bad(msg: str):
    from msdda.cli_common import CliError

    return CliError(msg)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    return _is_number(v) and math.isfinite(v)


def _normalize_row(raw: dict, index: int, spec: ModelSpec) -> dict:
    """A job row with every field present (defaults filled in), weights as canonical JSON text."""
    where = f"row {index}"
    unknown = sorted(set(raw) - set(JOB_FIELDS))
    if unknown:
        raise _bad(f"{where}: unknown field {short_value(unknown[0])}; fields are: {', '.join(JOB_FIELDS)}")
    row = {k: raw.get(k) for k in JOB_FIELDS}
    row["id"] = f"{index:06d}" if row["id"] is None else row["id"]
    if not isinstance(row["id"], str) or not _ID.fullmatch(row["id"]):
        raise _bad(f"{where}: id {short_value(row['id'])} is not a usable file name (letters, digits, '.', '_', '-'; "
                   "at most 128 characters, not starting with '.' or '-')")
    where = f"row {index} (id {row['id']!r})"
    weights = row["weights"]
    if isinstance(weights, str):
        try:
            weights = json.loads(weights)
        except json.JSONDecodeError:
            raise _bad(f"{where}: weights {short_value(weights)} is not JSON") from None
        except RecursionError:
            raise _bad(f"{where}: weights is JSON nested too deeply") from None
    if isinstance(weights, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in weights):
        if not all(isinstance(p[0], str) for p in weights):
            raise _bad(f"{where}: weights must be an object {{expert: number}}, got {short_value(weights)}")
        weights = dict(weights)                     # a Parquet map column reads as [(key, value), ...]
    if weights is not None:
        if not isinstance(weights, dict) or not all(isinstance(k, str) and (v is None or _is_number(v))
                                                    for k, v in weights.items()):
            raise _bad(f"{where}: weights must be an object {{expert: number}}, got {short_value(weights)}")
        weights = {k: v for k, v in weights.items() if v is not None}   # a Parquet struct column fills gaps with null
    row["weights"] = None if weights is None else json.dumps(weights, sort_keys=True)
    checks = [("seed", _is_int, "an integer"), ("class", _is_int, "an integer"), ("steps", _is_int, "an integer"),
              ("prompt", lambda v: isinstance(v, str), "a string"), ("strategy", lambda v: isinstance(v, str), "a string"),
              ("guidance_scale", _is_finite, "a finite number"), ("eta", _is_finite, "a finite number")]
    for name, ok, what in checks:
        value = row[name]
        if isinstance(value, float) and name in ("seed", "class", "steps") and value.is_integer():
            value = row[name] = int(value)          # Parquet/pandas may widen an int column with nulls to float
        if value is not None and not ok(value):
            raise _bad(f"{where}: {name} must be {what}, got {short_value(value)}")
        if _is_int(value) and not INT64[0] <= value <= INT64[1]:
            raise _bad(f"{where}: {name} {short_value(value)} does not fit in 64 bits")
    if row["seed"] is None:
        raise _bad(f"{where}: no seed (every row names its seed, so its image is reproducible)")
    try:
        check_seed(row["seed"])     # [0, 2**63): the engine's rule, checked before Ray starts
    except ValueError as exc:
        raise _bad(f"{where}: {exc}") from None
    if row["prompt"] is not None and row["class"] is not None:
        raise _bad(f"{where}: give prompt or class, not both")
    row["steps"] = spec.default_steps if row["steps"] is None else row["steps"]
    row["guidance_scale"] = float(spec.default_guidance_scale if row["guidance_scale"] is None else row["guidance_scale"])
    row["eta"] = 1.0 if row["eta"] is None else float(row["eta"])
    row["strategy"] = row["strategy"] or "msdda"
    return row


def refused_record(row_id: str, error: str) -> dict:
    """The manifest record of a row refused before the engine saw it: its id and its one-line reason."""
    return {**{k: None for k in _manifest_schema().names}, "id": row_id, "error": error, "refused": True}


def read_jobs(path, spec: ModelSpec) -> tuple[list[dict], list[dict]]:
    """(rows, refused) of a JSONL or Parquet jobs file. Each row is checked for shape (ids unique and usable as
    file names, known fields, types, seeds in range); a row that fails is a refused manifest record with one line
    and the rest go on. Whether the values suit the models is for the engine to say, row by row. Only a file that
    cannot be read at all is refused whole."""
    from msdda.atomic import UnsafeFileError, read_regular

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".jsonl", ".ndjson", ".json"):
        raise _bad(f"--input: {path} must be .jsonl (JSON Lines) or .parquet")
    try:
        data = read_regular(path, max_bytes=MAX_JOBS_BYTES)
    except UnsafeFileError as exc:
        raise _bad(f"--input: {exc}") from None
    except OSError as exc:
        raise _bad(f"--input: cannot read {path}: {exc.strerror}") from None
    raw_rows = []       # a dict per row, or the one-line reason the row is no object
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            raw_rows = pq.read_table(io.BytesIO(data)).to_pylist()
        except Exception as exc:  # noqa: BLE001 -- any unreadable file is one line for the user
            raise _bad(f"--input: cannot read {path} as Parquet: {one_line(exc, 200)}") from None
    else:
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise _bad(f"--input: {path} is not UTF-8 text") from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                item = f"line {n} is not JSON ({exc.msg})"
            except RecursionError:
                item = f"line {n} is JSON nested too deeply"
            raw_rows.append(item if isinstance(item, (dict, str)) else f"line {n} is not a JSON object")
    if not raw_rows:
        raise _bad(f"--input: {path} has no rows")
    rows, refused, seen = [], [], {}
    for index, raw in enumerate(raw_rows):
        raw_id = raw.get("id") if isinstance(raw, dict) else None
        usable_id = raw_id if isinstance(raw_id, str) and _ID.fullmatch(raw_id) else None
        try:
            if isinstance(raw, str):
                raise _bad(f"row {index}: {raw}")
            row = _normalize_row(raw, index, spec)
            if row["id"] in seen:
                raise _bad(f"row {index}: id {row['id']!r} appears twice (first in row {seen[row['id']]}); ids "
                           "name the image files and must be unique")
        except ROW_ERRORS as exc:
            # a refused row keeps its id unless another row holds it ("row N" is never a valid id: no clash)
            record_id = usable_id if usable_id is not None and usable_id not in seen else f"row {index}"
            refused.append(refused_record(record_id, one_line(exc)))
        else:
            rows.append(row)
        if usable_id is not None:
            seen.setdefault(usable_id, index)
    return rows, refused


# ---------------------------------------------------------------------- manifest and resume
def _read_records(out: Path) -> list[dict]:
    """Manifest records from the final manifest and any parts a killed run left, oldest first."""
    import pyarrow.parquet as pq

    from msdda.atomic import read_regular

    files = [out / "manifest.parquet"] + sorted((out / "manifest.parts").glob("part-*.parquet"))
    records = []
    for f in files:
        try:    # a link, FIFO or damaged file is no record: those rows are checked (and made) again
            records.extend(pq.read_table(io.BytesIO(read_regular(f, max_bytes=MAX_MANIFEST_BYTES,
                                                                  follow=False))).to_pylist())
        except Exception:  # noqa: BLE001 -- a damaged manifest file only means those rows are checked again
            continue
    return records


def pending_rows(rows: list[dict], out: Path) -> tuple[list[dict], dict]:
    """(rows still to make, {id: record} of rows already done: made and verified, or refused by the engine as
    input with the same job fields, which would be refused again)."""
    latest = {}
    for rec in _read_records(out):
        latest[rec["id"]] = rec
    done, todo = {}, []
    for row in rows:
        rec = latest.get(row["id"])
        same = rec is not None and all(rec.get(k) == row[k] for k in JOB_FIELDS)
        if same and rec.get("error") is None and rec.get("file_sha256") is not None and \
                image_intact(out / "images" / f"{row['id']}.png", rec["file_sha256"]):
            done[row["id"]] = rec
        elif same and rec.get("error") is not None and rec.get("refused") is True:
            done[row["id"]] = rec
        else:
            todo.append(row)
    return todo, done


def _write_parquet(path: Path, records: list[dict]) -> None:
    """Write ``records`` atomically, unless the file already holds exactly these bytes (a rerun that made
    nothing rewrites nothing)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from msdda.atomic import atomic_write_bytes, read_regular

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records, schema=_manifest_schema()), buf)
    try:
        if read_regular(path, max_bytes=MAX_MANIFEST_BYTES, follow=False) == buf.getvalue():
            return
    except (OSError, ValueError):
        pass
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------- the Ray Data worker
class EngineWorker:
    """A ``map_batches`` callable class: each actor of the pool loads the Engine once and makes its batches."""

    def __init__(self, spec: ModelSpec, out_dir: str, exact: bool):
        import ray

        self.engine = spec.load()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.images = Path(out_dir) / "images"
        self.exact = exact
        self.backend = spec.backend
        self.models = json.dumps([{"name": m.name, "sha256": m.sha256} for m in self.engine.models])

    def __call__(self, batch):
        import pyarrow as pa

        from msdda.atomic import atomic_write_bytes
        from msdda.atomic import encode_png
        from msdda.coalesce import generate_many
        from msdda.request import Request

        rows = batch.to_pylist()
        start = time.perf_counter()
        checked = []                     # each row's Request, or the ValueError that refused it
        for row in rows:
            try:
                checked.append(Request.from_job_row(row, self.engine))
            except ValueError as exc:
                checked.append(exc)
        made = iter(generate_many(self.engine, [c for c in checked if isinstance(c, Request)]))
        results = [c if isinstance(c, ValueError) else next(made) for c in checked]
        seconds = time.perf_counter() - start
        records = []
        for row, result in zip(rows, results):
            rec = {**{k: row[k] for k in JOB_FIELDS}, "models": self.models, "backend": self.backend,
                   "exact_batching": self.exact, "batch_seconds": seconds, "image": None, "file_sha256": None,
                   "engine_call_samples": None, "error": None, "refused": False, "node_id": self.node_id}
            if isinstance(result, Exception):
                rec["error"] = one_line(result)
                # a ValueError is the engine refusing the row's values: the same row would be refused again
                rec["refused"] = isinstance(result, ValueError) and not is_out_of_memory(result)
            else:
                png = encode_png(result.images[0])
                atomic_write_bytes(self.images / f"{row['id']}.png", png)   # the image first, then its record
                rec.update(image=f"images/{row['id']}.png", file_sha256=hashlib.sha256(png).hexdigest(),
                           engine_call_samples=result.batch_size)
            rec["finished_at"] = time.time()
            records.append(rec)
        return pa.Table.from_pylist(records, schema=_manifest_schema())


# ---------------------------------------------------------------------- command line
def add_command(sub) -> argparse.ArgumentParser:
    """Add ``msdda batch`` to the CLI's subparsers."""
    p = sub.add_parser("batch", help="generate a jobs file of images with Ray Data (resumable)",
                       description="Generate one image per row of a JSONL or Parquet jobs file with Ray Data "
                                   "map_batches over a pool of Engine actors. Writes OUT/images/<id>.png and "
                                   "OUT/manifest.parquet; running it again skips verified images and remakes the "
                                   "rest. Uses a local Ray, or the cluster at $RAY_ADDRESS.")
    p.add_argument("--input", required=True, metavar="JOBS", help="jobs file: .jsonl or .parquet, one row per image")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    from msdda.cli_common import add_model_args
    from msdda.serve import add_batching_args

    add_model_args(p, device_default=None)
    g = p.add_argument_group("Ray Data")
    g.add_argument("--concurrency", type=int, default=1, help="Engine actors in the pool (default 1)")
    g.add_argument("--batch-size", type=int, default=16, help="rows per map_batches call (default 16)")
    g.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs per actor, also its torch threads (default: all cores / concurrency)")
    g.add_argument("--num-gpus", type=float, default=0, help="GPUs per actor (default 0)")
    add_batching_args(g)
    return p


def run_info(spec: ModelSpec, exact: bool) -> dict:
    """The batch folder's manifest (``run.json``): the models and settings every image of it is made with. A
    folder holding another batch's is refused (msdda.runfolder compares them)."""
    return {"command": "batch", "base": spec.base, "experts": spec.experts, "backend": spec.backend,
            "scheduler": spec.scheduler, "variant": spec.variant, "dtype": spec.dtype, "exact_batching": exact,
            "row_block": spec.row_block}


def owns_batch_file(name: str) -> bool:
    """The entries of a batch folder: run.json, manifest.parquet and the two subfolders."""
    return name in (RUN_INFO, "manifest.parquet", "images", "manifest.parts")


def owns_image(name: str) -> bool:
    return name.endswith(".png") and _ID.fullmatch(name[:-4]) is not None


def owns_part(name: str) -> bool:
    return re.fullmatch(r"part-\d+-\d+\.parquet", name) is not None


def run(args) -> int:
    """``msdda batch``: make every pending row, then write the manifest. Exit 2 when some rows were refused."""
    for name in ("concurrency", "batch_size"):
        if getattr(args, name) < 1:
            raise _bad(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (math.isfinite(args.num_gpus) and args.num_gpus >= 0):
        raise _bad(f"--num-gpus must be >= 0, got {args.num_gpus}")
    cpus = args.num_cpus if args.num_cpus is not None else max(1, (os.cpu_count() or 1) // args.concurrency)
    if cpus < 1:
        raise _bad(f"--num-cpus must be >= 1, got {cpus}")
    from msdda.serve import batches_exactly, engine_row_block

    spec = model_spec(args, threads=cpus, num_gpus=args.num_gpus, row_block=engine_row_block(args, args.batch_size))
    exact = batches_exactly(spec.row_block, args.batch_size)
    rows, refused = read_jobs(args.input, spec)
    out = Path(args.out)
    with RunFolder(out, run_info(spec, exact), owns_batch_file, manifest=RUN_INFO) as folder:
        images = folder.subfolder("images", owns_image)
        parts = folder.subfolder("manifest.parts", owns_part)
        manifest = _make_rows(args, spec, exact, rows, refused, out, images, parts, cpus, folder)
    failed = [r for r in manifest if r["error"] is not None]
    print(f"msdda batch: wrote {len(manifest) - len(failed)} images and {out / 'manifest.parquet'}", flush=True)
    if failed:
        raise _bad(f"{len(failed)} of {len(manifest)} rows failed (first: id {failed[0]['id']!r}: "
                   f"{failed[0]['error']}); their manifest rows say why")
    return 0


def _make_rows(args, spec: ModelSpec, exact: bool, rows: list[dict], refused: list[dict], out: Path, images: Path,
               parts: Path, cpus: int, folder: RunFolder) -> list[dict]:
    """Make every pending row with Ray Data, then write the manifest (refused rows included). Returns it."""
    todo, done = pending_rows(rows, out)
    made = sum(r["error"] is None for r in done.values())
    refused_before = len(done) - made
    print(f"msdda batch: {len(rows) + len(refused)} rows, {made} already done, {len(todo)} to make"
          + (f", {len(refused) + refused_before} refused" if refused or refused_before else ""), flush=True)
    new = []
    if todo:
        require_ray()
        folder.note_finished(RUN_INFO)     # images may appear from here on: the folder stays, resumable
        import logging

        import ray.data

        from msdda.cli_common import verbose_requested

        # The session ends (a local Ray stopped, its workers and actors exited) before the command returns.
        with ray_session(num_cpus=max(os.cpu_count() or 1, cpus * args.concurrency),
                         verbose=verbose_requested(args)) as session:
            print(f"msdda batch: {session.where}", flush=True)
            logging.getLogger("ray.data").setLevel(logging.ERROR)   # progress is printed below, one line a part
            ray.data.DataContext.get_current().enable_progress_bars = False
            ds = ray.data.from_items(todo).map_batches(
                EngineWorker, fn_constructor_kwargs={"spec": spec, "out_dir": str(out), "exact": exact},
                batch_size=args.batch_size, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=args.concurrency), num_cpus=cpus, num_gpus=args.num_gpus)
            for part in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                records = part.to_pylist()
                _write_parquet(parts / f"part-{time.time_ns()}-{os.getpid()}.parquet", records)
                new.extend(records)
                print(f"msdda batch: {made + sum(r['error'] is None for r in new)}/{len(rows)} images", flush=True)
    by_id = {**done, **{r["id"]: r for r in new}}
    manifest = [by_id[r["id"]] for r in rows if r["id"] in by_id] + refused
    _write_parquet(out / "manifest.parquet", manifest)
    folder.note_finished("manifest.parquet")
    for part in parts.glob("part-*.parquet"):
        if owns_part(part.name):
            part.unlink(missing_ok=True)
    return manifest
