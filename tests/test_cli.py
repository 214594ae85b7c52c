"""The command line: outputs, manifest, run folders (resume, finished-folder reruns, locks, foreign files, stale
temp files, OS errors), bounds checked before anything is loaded or written, and one-line errors with exit
status 2."""
from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from msdda import cli
from tiny_models import damaged_copy, make_tiny_unet2d, perturbed_copy
from cli_checks import one_error_line

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(learned_variance_models):
    base, experts = learned_variance_models
    return base, experts["a"], experts["b"]


def _args(models, out, *extra, num_images=3):
    base, a, b = models
    return ["generate", "--base", str(base), "--expert", f"a={a}", "--expert", f"b={b}", "--class", "3",
            "--steps", "2", "--num-images", str(num_images), "--batch-size", "2", "--guidance-scale", "2",
            "--out", str(out), *extra]


def _snapshot(folder: Path) -> dict:
    """name -> (bytes, mtime_ns) of every entry: what 'left as it was' compares."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


# ---------------------------------------------------------------------- outputs
def test_generate_writes_images_grid_and_manifest(models, tmp_path):
    out = tmp_path / "run"
    assert cli.main(_args(models, out, "--weights", "a=0.7,b=0.3")) == 0
    assert sorted(p.name for p in out.iterdir()) == [".msdda.lock", "00000.png", "00001.png", "00002.png",
                                                      "grid.png", "manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["command"] == "generate"
    assert manifest["weights"] == {"a": 0.7, "b": 0.3}
    assert manifest["seeds"] == [0, 1, 2] and manifest["steps"] == 2 and manifest["strategy"] == "msdda"
    assert [m["name"] for m in manifest["models"]] == ["base", "a", "b"]
    assert all(len(m["sha256"]) == 64 for m in manifest["models"])
    assert manifest["msdda_version"] and manifest["backend"] == "torch"
    assert manifest["dtype"] == "float32" and manifest["dtype_default"] is True   # no --dtype on the CPU: float32
    from msdda.loading import file_sha256
    assert manifest["sha256"] == {n: file_sha256(out / n) for n in ("00000.png", "00001.png", "00002.png", "grid.png")}


def test_dtype_and_cuda_graphs_flags(models, tmp_path):
    """--dtype bfloat16 runs the networks in bfloat16 and the manifest says it was chosen, not the default;
    --no-cuda-graphs is accepted everywhere (graphs exist only for torch on CUDA)."""
    out = tmp_path / "bf16"
    assert cli.main(_args(models, out, "--dtype", "bfloat16", "--no-cuda-graphs", num_images=1)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["dtype_default"] is False
    args = cli.build_parser().parse_args(_args(models, out))
    assert args.cuda_graphs is True and args.dtype == "auto"
    assert cli.build_parser().parse_args(_args(models, out, "--no-cuda-graphs")).cuda_graphs is False


def test_normalize_rescales_weights(models, tmp_path):
    assert cli.main(_args(models, tmp_path / "n", "--weights", "a=1,b=3", "--normalize")) == 0


def test_sweep_writes_grids_and_summary_and_reruns_as_a_noop(models, tmp_path, capsys):
    base, a, b = models
    out = tmp_path / "sweep"
    args = ["sweep", "--base", str(base), "--expert", f"a={a}", "--expert", f"b={b}", "--class", "2",
            "--steps", "2", "--points", "3", "--num-images", "2", "--out", str(out)]
    assert cli.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [p["weights"]["a"] for p in summary["points"]] == [0.0, 0.5, 1.0]
    for p in summary["points"]:
        assert (out / p["grid"]).is_file()
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    before = {d: _snapshot(out / d) for d in ("w0.00", "w0.50", "w1.00")}
    root_before = {n: ((out / n).read_bytes(), (out / n).stat().st_mtime_ns) for n in ("summary.json", "manifest.json")}
    assert cli.main(args) == 0
    assert {d: _snapshot(out / d) for d in before} == before
    assert {n: ((out / n).read_bytes(), (out / n).stat().st_mtime_ns) for n in root_before} == root_before
    capsys.readouterr()
    # a generate pointed at the sweep's folder is another run
    assert cli.main(_args(models, out)) == 2
    one_error_line(capsys, "holds a different run")


# ---------------------------------------------------------------------- resume and finished folders
def test_interrupted_run_resumes_without_loss_or_duplication(models, tmp_path, monkeypatch):
    full = tmp_path / "full"
    assert cli.main(_args(models, full, "--weights", "a=0.5,b=0.5")) == 0

    from msdda.engine import Engine

    real = Engine.generate
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    part = tmp_path / "part"
    monkeypatch.setattr(Engine, "generate", flaky)
    assert cli.main(_args(models, part, "--weights", "a=0.5,b=0.5")) == 130
    assert sorted(p.name for p in part.glob("*.png")) == ["00000.png", "00001.png"]
    assert json.loads((part / "manifest.json").read_text())["complete"] is False
    first = (part / "00000.png").stat().st_mtime_ns
    monkeypatch.setattr(Engine, "generate", real)
    (part / "00001.png").write_bytes(b"truncated")        # a half-written file from a crash is redone
    assert cli.main(_args(models, part, "--weights", "a=0.5,b=0.5")) == 0
    assert (part / "00000.png").stat().st_mtime_ns == first  # not regenerated
    for name in ("00000.png", "00001.png", "00002.png", "grid.png"):
        assert (part / name).read_bytes() == (full / name).read_bytes()
    assert json.loads((part / "manifest.json").read_text()) == json.loads((full / "manifest.json").read_text())


def test_same_command_on_finished_folder_is_a_noop(models, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_args(models, out)) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert cli.main(_args(models, out)) == 0
    assert _snapshot(out) == before                      # nothing rewritten, not even the grid or manifest
    assert "already holds this run" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["bitflip", "other_valid_png", "truncated", "deleted"])
def test_damaged_image_in_finished_folder_is_remade(models, tmp_path, damage):
    out = tmp_path / "run"
    assert cli.main(_args(models, out)) == 0
    before = _snapshot(out)
    target = out / "00001.png"
    data = bytearray(target.read_bytes())
    if damage == "bitflip":
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "other_valid_png":                    # decodes fine: only the recorded sha256 catches it
        target.write_bytes((out / "00000.png").read_bytes())
    elif damage == "truncated":
        target.write_bytes(bytes(data[: len(data) // 2]))
    else:
        target.unlink()
    assert cli.main(_args(models, out)) == 0
    after = _snapshot(out)
    assert after["00001.png"][0] == before["00001.png"][0]
    for name in ("00000.png", "00002.png"):              # the intact ones are not touched
        assert after[name] == before[name]
    assert after["manifest.json"][0] == before["manifest.json"][0]
    assert after["grid.png"][0] == before["grid.png"][0]
    assert _temp_files(out) == []


def test_other_run_in_same_folder_is_refused(models, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_args(models, out, "--weights", "a=0.5,b=0.5")) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert cli.main(_args(models, out, "--weights", "a=0.6,b=0.4")) == 2
    line = one_error_line(capsys, "holds a different run")
    assert "weights" in line and "images" not in line and "sha256" not in line
    assert _snapshot(out) == before


# ---------------------------------------------------------------------- errors leave the folder as found
@pytest.mark.parametrize("extra, message", [
    (["--class", "10"], "class labels must lie in 0..9"),
    (["--strategy", "magic"], "unknown strategy"),
    (["--guidance-scale", "nan"], "guidance_scale must be a finite number"),
    (["--weights", "a=0.5,b=0.5", "--expert-betas", "a=40,b=40"], "infeasible composition over (base, a, b): "),
    (["--steps", "1001", "--max-steps", "5000"], "num_train_timesteps (1000)"),
])
def test_error_after_loading_leaves_no_folder_and_corrected_command_works(models, tmp_path, capsys, extra, message):
    out = tmp_path / "parent" / "x"
    assert cli.main(_args(models, out, *extra)) == 2
    one_error_line(capsys, message)
    assert not (tmp_path / "parent").exists()            # not the folder, not the parent it would have made
    assert cli.main(_args(models, out)) == 0


def test_error_leaves_a_users_empty_folder_empty(models, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    assert cli.main(_args(models, out, "--weights", "a=0.5,b=0.5", "--expert-betas", "a=40,b=40")) == 2
    one_error_line(capsys, "infeasible composition")
    assert out.is_dir() and list(out.iterdir()) == []


@pytest.mark.parametrize("content", ["text", "png"])
def test_users_file_in_fresh_folder_is_left_alone(models, tmp_path, capsys, content):
    out = tmp_path / "mine"
    out.mkdir()
    if content == "text":
        (out / "00001.png").write_text("my notes, not an image")
    else:                                                 # a valid, unrelated PNG is not adopted either
        from PIL import Image
        Image.new("L", (8, 8), 128).save(out / "00000.png")
    before = _snapshot(out)
    assert cli.main(_args(models, out)) == 2
    one_error_line(capsys, "holds no msdda manifest")
    assert _snapshot(out) == before                       # not even a lock file was created


@pytest.mark.parametrize("content", [b"[]", b"null", b"{not json", b'{"weights": 1}'])
def test_foreign_or_damaged_manifest_is_refused(models, tmp_path, capsys, content):
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_bytes(content)
    before = _snapshot(out)
    assert cli.main(_args(models, out)) == 2
    one_error_line(capsys, "damaged or was not written by msdda")
    assert _snapshot(out) == before


def test_out_is_a_file(models, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(_args(models, blocker)) == 2
    one_error_line(capsys, "not a folder")
    assert cli.main(_args(models, blocker / "sub")) == 2
    one_error_line(capsys, str(blocker))
    assert blocker.read_text() == "x"


# ---------------------------------------------------------------------- OS errors
def _patched_os(monkeypatch, module, **overrides):
    """Give ``module`` its own ``os`` with some functions replaced (the real os module stays untouched)."""
    import types

    fake = types.SimpleNamespace(**{**vars(os), **overrides})
    monkeypatch.setattr(module, "os", fake)


def _fail_png_writes(monkeypatch, err: int, after: int = 0):
    """Make the atomic write of every PNG after the first ``after`` fail with ``err`` at fsync (data written to
    the temp file, like a disk that fills up)."""
    import msdda.atomic as atomic

    seen = {"n": 0}

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if name.endswith(".tmp") and ".png." in name:
            seen["n"] += 1
            if seen["n"] > after:
                raise OSError(err, os.strerror(err))
        return os.fsync(fd)

    _patched_os(monkeypatch, atomic, fsync=fsync)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_os_error_on_first_write_is_one_line_and_leaves_nothing(models, tmp_path, capsys, monkeypatch, err):
    out = tmp_path / "o"
    _fail_png_writes(monkeypatch, err)
    assert cli.main(_args(models, out)) == 2
    one_error_line(capsys, f"cannot write {out / '00000.png'}: {os.strerror(err)}")
    assert not out.exists()


def test_os_error_midway_keeps_finished_images_and_resumes(models, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    _fail_png_writes(monkeypatch, errno.ENOSPC, after=2)  # the first batch (2 images) lands, the third fails
    assert cli.main(_args(models, out)) == 2
    one_error_line(capsys, "No space left on device")
    assert sorted(p.name for p in out.iterdir()) == [".msdda.lock", "00000.png", "00001.png", "manifest.json"]
    manifest = (out / "manifest.json").read_bytes()
    assert json.loads(manifest)["complete"] is False
    assert cli.main(_args(models, out)) == 2              # still full: the resumed folder's manifest is unchanged
    one_error_line(capsys, "No space left on device")
    assert (out / "manifest.json").read_bytes() == manifest and _temp_files(out) == []
    monkeypatch.undo()
    assert cli.main(_args(models, out)) == 0
    assert json.loads((out / "manifest.json").read_text())["complete"] is True


def test_cannot_create_folder_is_one_line(models, tmp_path, capsys, monkeypatch):
    import msdda.runfolder as rf

    def mkdir(path, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    _patched_os(monkeypatch, rf, mkdir=mkdir)
    assert cli.main(_args(models, tmp_path / "o")) == 2
    one_error_line(capsys, f"cannot create folder {tmp_path / 'o'}: Read-only file system")


def _can_mount_read_only(tmp_path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    cmd = f"mount --bind -o ro {probe} {probe} && touch {probe}/x"
    for flags in (["-m"], ["-rm"]):
        r = subprocess.run(["unshare", *flags, "sh", "-c", cmd], capture_output=True, text=True)
        if "Read-only file system" in r.stderr:
            return flags
    return False


def test_real_read_only_file_system(models, tmp_path):
    """A read-only bind mount in a private mount namespace (root, or an unprivileged user namespace): a fresh
    run is one line; a finished folder on it is verified without writing."""
    flags = _can_mount_read_only(tmp_path)
    if not flags:
        pytest.skip("no mount namespace here (unshare -m / -rm refused): the monkeypatched EROFS tests cover it")
    disk = tmp_path / "disk"
    disk.mkdir()
    assert cli.main(_args(models, disk / "done")) == 0
    # one process on the read-only mount runs both commands (one interpreter start-up, not two)
    script = textwrap.dedent(f"""
        import contextlib, io, sys
        from msdda import cli
        for out in ("fresh", "done"):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = cli.main({_args(models, "OUT")!r}[:-1] + [{str(disk)!r} + "/" + out])
            print("RESULT", out, rc, repr(err.getvalue()))
    """)
    cmd = f'mount --bind -o ro {disk} {disk} && exec "$0" -c "$1"'
    r = subprocess.run(["unshare", *flags, "sh", "-c", cmd, sys.executable, script], capture_output=True, text=True,
                       timeout=300)
    lines = [ln[len("RESULT "):] for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 2, r.stdout + r.stderr
    assert lines[0] == "fresh 2 " + repr(f"msdda: error: cannot create folder {disk / 'fresh'}: Read-only file "
                                          "system\n"), r.stdout + r.stderr
    assert lines[1] == "done 0 ''", r.stdout + r.stderr
    assert not (disk / "fresh").exists()


# ---------------------------------------------------------------------- real processes
def _hooked_cli(args, *, on_write: int, marker: Path, release: Path | None = None) -> subprocess.Popen:
    """A real ``msdda generate`` process that, when fsyncing the temp file of its ``on_write``-th image (bytes
    written, not yet renamed into place), creates ``marker`` and then waits: until ``release`` exists, or
    forever when it is None (to be killed there). Timing-free tests of what happens mid-write."""
    script = textwrap.dedent(f"""
        import os, sys, time
        import msdda.atomic as atomic
        real = os.fsync
        count = [0]
        def fsync(fd):
            name = os.readlink(f"/proc/self/fd/{{fd}}")
            if name.endswith(".tmp") and "/.0000" in name:
                count[0] += 1
                if count[0] == {on_write}:
                    open({str(marker)!r}, "w").write(name)
                    while {str(release) if release else ""!r} == "" or not os.path.exists({str(release)!r}):
                        time.sleep(0.01)
            return real(fd)
        atomic.os.fsync = fsync
        from msdda import cli
        sys.exit(cli.main({args!r}))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("MSDDA_VERBOSE", None)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _wait_for(path: Path, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_two_concurrent_processes_one_is_refused(models, tmp_path):
    """Process A holds the folder (it is in the middle of writing its first image); process B, the same plain
    command on the same folder, is refused with one line and touches nothing; A then finishes the run."""
    out = tmp_path / "o"
    args = _args(models, out, num_images=4)
    marker, release = tmp_path / "writing", tmp_path / "go"
    a = _hooked_cli(args, on_write=1, marker=marker, release=release)
    try:
        _wait_for(marker, a)
        before = _snapshot(out)
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        env.pop("MSDDA_VERBOSE", None)
        b = subprocess.run([sys.executable, "-m", "msdda.cli", *args], capture_output=True, text=True, env=env,
                           timeout=300)
        assert b.returncode == 2 and b.stderr.splitlines() == [
            f"msdda: error: another msdda run is writing to {out}; wait for it to finish or use another --out"], b.stderr
        assert _snapshot(out) == before
    finally:
        release.write_text("")
    a_out, a_err = a.communicate(timeout=300)
    assert a.returncode == 0 and a_err == "", a_err
    assert json.loads((out / "manifest.json").read_text())["complete"] is True


def test_kill_9_during_a_write_then_same_command_completes(models, tmp_path):
    """A process killed (SIGKILL) in the middle of writing image 2 leaves that image's temp file; the same command
    then removes it, completes the folder, and matches an uninterrupted run."""
    out, ref = tmp_path / "o", tmp_path / "ref"
    args = _args(models, out, num_images=4)
    marker = tmp_path / "writing"
    proc = _hooked_cli(args, on_write=3, marker=marker)
    try:
        _wait_for(marker, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    temps = _temp_files(out)
    assert len(temps) == 1 and temps[0].startswith(".00002.png."), temps
    assert not (out / "00002.png").exists()
    assert cli.main(args) == 0
    assert _temp_files(out) == []
    assert cli.main(_args(models, ref, num_images=4)) == 0
    for name in ("00000.png", "00001.png", "00002.png", "00003.png", "grid.png", "manifest.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes()


# ---------------------------------------------------------------------- bad input: one line, exit 2
@pytest.mark.parametrize("extra, message", [
    (["--weights", "zzz=1"], "unknown expert 'zzz'"),
    (["--weights", "a=-0.5,b=1.5"], "negative"),
    (["--weights", "a=nan,b=0.5"], "not a finite number"),
    (["--weights", "a=0.5,b=0.6"], "sum to 1.1, not 1"),
    (["--weights", "a=oops"], "is not a number"),
    (["--weights", "a=0.5,b=0.5", "--strategy", "magic"], "unknown strategy"),
    (["--weights", "a=0.5,b=0.5", "--strategy", "expert:zzz"], "unknown expert 'zzz' in strategy"),
    (["--expert-betas", "a=1,b=1,zzz=1"], "unknown expert 'zzz' in --expert-betas"),
    (["--expert-betas", "a=1"], "no KL strength for 'b'"),
    (["--class", "-1"], "class labels must lie in 0..9"),
    (["--prompt", "a cat", "--class", "1"], "not allowed with argument"),
])
def test_bad_input_after_loading_exits_2_with_one_line(models, tmp_path, capsys, extra, message):
    argv = _args(models, tmp_path / "x", *extra)
    if "--class" in extra:                                  # replace the default --class 3
        i = argv.index("--class")
        del argv[i:i + 2]
    assert cli.main(argv) == 2
    one_error_line(capsys, message)
    assert not (tmp_path / "x").exists()


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model is loaded: these inputs must be refused before."""
    from msdda.engine import Engine

    def refuse(*a, **k):
        raise AssertionError("models were loaded before the input was refused")

    monkeypatch.setattr(Engine, "from_pretrained", refuse)


@pytest.mark.parametrize("command, extra, message", [
    ("generate", ["--num-images", "3000000"], "num_images must be <= 10000"),
    ("generate", ["--num-images", "1000000000"], "num_images must be <= 10000"),
    ("generate", ["--num-images", "0"], "num_images must be >= 1"),
    ("generate", ["--steps", "5000"], "steps must be <= 1000"),
    ("generate", ["--steps", "0"], "steps must be >= 1"),
    ("generate", ["--num-images", "20", "--max-images", "10"], "num_images must be <= 10"),
    ("generate", ["--max-images", "0"], "--max-images must be >= 1"),
    ("generate", ["--num-images", "1.5"], "invalid int value"),
    ("generate", ["--seed", "1.5"], "invalid int value"),
    ("generate", ["--seed", "-1"], "seed must be >= 0"),
    ("generate", ["--seed", str(2**63 - 2), "--num-images", "4"], "must stay below 2**63"),
    ("generate", ["--weights", "legible=1e308,bold=1e308", "--normalize"], "overflow"),
    ("generate", ["--weights", "legible=1e400"], "not a finite number"),
    ("generate", ["--weights", "legible=0,bold=0", "--normalize"], "all zero"),
    ("generate", ["--weights", "legible=0.5,legible=0.5"], "given twice"),
    ("generate", ["--expert-betas", "legible=1,legible=2"], "given twice"),
    ("generate", ["--expert-betas", "legible=-1"], "must be a finite number > 0"),
    ("generate", ["--expert-betas", "legible=0"], "must be a finite number > 0"),
    ("generate", ["--expert-betas", "legible=inf"], "must be a finite number > 0"),
    ("generate", ["--expert-betas", "legible"], "expected NAME=VALUE"),
    ("generate", ["--guidance-scale", "nan"], "guidance_scale must be a finite number"),
    ("generate", ["--guidance-scale", "inf"], "guidance_scale must be a finite number"),
    ("generate", ["--eta", "-1"], "eta must be >= 0"),
    ("generate", ["--batch-size", "0"], "batch_size must be >= 1"),
    ("generate", ["--device", "bogus"], "unknown device 'bogus'"),
    ("generate", ["--backend", "nope"], "invalid choice"),
    ("generate", ["--bogus-flag"], "unrecognized arguments"),
    ("sweep", ["--num-images", "0"], "num_images must be >= 1"),
    ("sweep", ["--pair", "legible,legible"], "the two experts must differ"),
    ("sweep", ["--pair", "legible"], "expected A,B"),
    ("sweep", ["--points", "1"], "--points must be >= 2"),
    ("sweep", ["--points", "500"], "--points must be <= 101"),
    ("sweep", ["--points", "101", "--num-images", "100"], "more than the limit of 10000"),
])
def test_bad_input_is_refused_before_loading(no_loading, tmp_path, capsys, command, extra, message):
    assert cli.main([command, "--class", "3", *extra, "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, message)
    assert not (tmp_path / "o").exists()


def test_cuda_without_cuda_is_one_line(no_loading, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        assert cli.main(["generate", "--device", f"cuda:{torch.cuda.device_count()}", "--out", str(tmp_path)]) == 2
        one_error_line(capsys, "CUDA device(s) present")
    else:
        assert cli.main(["generate", "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
        one_error_line(capsys, "no CUDA device is available")


def test_foreign_folder_is_refused_before_loading(no_loading, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(["generate", "--class", "3", "--out", str(tmp_path)]) == 2
    one_error_line(capsys, "holds no msdda manifest")


def test_missing_and_incompatible_models_exit_2(models, tmp_path, capsys):
    base, a, b = models
    assert cli.main(["generate", "--base", str(tmp_path / "nope"), "--class", "1", "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "model folder not found")
    other = make_tiny_unet2d(tmp_path / "other", learned_variance=False, num_class_embeds=11)
    assert cli.main(["generate", "--base", str(base), "--expert", f"o={other}", "--class", "1",
                     "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "different output channels")
    assert cli.main(["generate", "--base", str(base), "--expert", "broken", "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "expected NAME=PATH")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("where, content, message", [
    ("unet/config.json", "[]", "expected a JSON object, found list"),
    ("unet/config.json", "null", "expected a JSON object, found NoneType"),
    ("scheduler/scheduler_config.json", "[]", "expected a JSON object, found list"),
    ("scheduler/scheduler_config.json", "null", "expected a JSON object, found NoneType"),
    ("scheduler/scheduler_config.json", {"num_train_timesteps": 10**12}, "num_train_timesteps must be <= 100000"),
    ("scheduler/scheduler_config.json", {"num_train_timesteps": 0}, "num_train_timesteps must be an int >= 1"),
    ("unet/config.json", {"sample_size": 10**9}, "sample_size must be an integer (or two) in 1..4096"),
    ("unet/config.json", {"sample_size": -8}, "sample_size must be an integer"),
])
def test_damaged_configs_are_one_line_load_errors(models, tmp_path, capsys, where, content, message):
    broken = damaged_copy(models[0], tmp_path / "broken", where, content)
    t0 = time.monotonic()
    assert cli.main(["generate", "--base", str(broken), "--class", "1", "--out", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys, message)
    assert str(broken / where) in line
    assert not (tmp_path / "o").exists()
    assert time.monotonic() - t0 < 120    # a guard against the old minutes-long loop, not a timing assertion


def test_one_line_even_with_library_warnings(models, tmp_path):
    """A real process, with Python warnings forced on (-W always) and a library logging a warning: an error after
    loading is the only stderr line. --verbose lets library output through again."""
    args = _args(models, tmp_path / "o")
    args[args.index("--class") + 1] = "10"
    script = ("import logging, sys, warnings\nfrom msdda import cli\n"
              "real = cli.cmd_generate\n"
              "def noisy(args):\n"
              "    logging.getLogger('diffusers').warning('a diffusers warning')\n"
              "    warnings.warn('a python warning')\n"
              "    return real(args)\n"
              "cli.COMMANDS['generate'] = noisy\n"
              "sys.exit(cli.main(sys.argv[1:]))\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("MSDDA_VERBOSE", None)
    quiet = subprocess.run([sys.executable, "-W", "always", "-c", script, *args], capture_output=True, text=True,
                           env=env, timeout=300)
    assert quiet.returncode == 2 and quiet.stderr.splitlines() == [
        "msdda: error: class labels must lie in 0..9 (class 10 is the null class used for guidance), got 10"], \
        quiet.stderr
    verbose = subprocess.run([sys.executable, "-c", script, *args, "--verbose"], capture_output=True, text=True,
                             env=env, timeout=300)
    assert verbose.returncode == 2 and verbose.stderr.splitlines()[-1].startswith("msdda: error: class labels")
    assert "a diffusers warning" in verbose.stderr and "a python warning" in verbose.stderr


@pytest.mark.parametrize("value, verbose", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_msdda_verbose_environment_variable(monkeypatch, value, verbose):
    monkeypatch.setenv("MSDDA_VERBOSE", value)
    assert cli.verbose_requested(argparse.Namespace()) is verbose
    assert cli.verbose_requested(argparse.Namespace(verbose=True))     # the flag wins over the variable


def test_library_output_is_restored_after_main():
    import logging
    import warnings

    import transformers.utils.logging as tlog

    level = logging.getLogger("diffusers").level
    bars = tlog.is_progress_bar_enabled()
    with cli.library_output(False):
        assert not tlog.is_progress_bar_enabled()           # "Loading weights" bars would precede the error
        assert logging.getLogger("diffusers").level > logging.CRITICAL
        with warnings.catch_warnings(record=True) as seen:   # keeps the quiet filters, records what passes them
            warnings.warn("hidden")
        assert seen == []
    assert logging.getLogger("diffusers").level == level and tlog.is_progress_bar_enabled() == bars
    with cli.library_output(True):
        assert logging.getLogger("diffusers").level == level


def test_text_pipeline_run_and_one_line_error(tmp_path, capsys):
    """A text-conditioned pipeline (text encoder, tokenizer, VAE): its loading prints nothing, an error after
    loading is one line, and a finished folder reruns as a no-op."""
    from tiny_models import make_tiny_sd_pipeline

    base = make_tiny_sd_pipeline(tmp_path / "sd")
    expert = perturbed_copy(base, tmp_path / "sd_a", seed=1, scale=0.2)
    args = ["generate", "--base", str(base), "--expert", f"a={expert}", "--steps", "2", "--num-images", "2",
            "--out", str(tmp_path / "o")]
    capsys.readouterr()
    assert cli.main([*args, "--class", "1"]) == 2
    one_error_line(capsys, "this base is text-conditioned: pass --prompt")
    assert cli.main([*args, "--prompt", "a cat"]) == 0
    before = _snapshot(tmp_path / "o")
    assert cli.main([*args, "--prompt", "a cat"]) == 0
    assert _snapshot(tmp_path / "o") == before and capsys.readouterr().err == ""
    assert cli.main([*args, "--prompt", "a dog"]) == 2
    one_error_line(capsys, "holds a different run (differs in: prompt)")


def test_help_is_complete():
    text = subprocess.run([sys.executable, "-m", "msdda.cli", "generate", "--help"], capture_output=True, text=True,
                          check=True).stdout
    for opt in ("--base", "--expert", "--weights", "--prompt", "--class", "--num-images", "--steps", "--seed",
                "--strategy", "--backend", "--out", "--normalize", "--max-images", "--max-steps", "--verbose"):
        assert opt in text
    top = subprocess.run([sys.executable, "-m", "msdda.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("generate", "sweep", "export"):
        assert cmd in top


# ---------------------------------------------------------------------- export
@pytest.mark.slow
def test_export_writes_verified_onnx_and_manifest(models, tmp_path):
    base, a, b = models
    out = tmp_path / "engines"
    assert cli.main(["export", "--base", str(base), "--expert", f"a={a}", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    names = {p.name for p in out.glob("*.onnx")}
    assert {"base.onnx", "a.onnx"} <= names
    assert manifest


@pytest.mark.parametrize("make_args, message", [
    (lambda m, t: ["--base", str(t / "missing")], "not found"),
    (lambda m, t: ["--base", str(m[0]), "--opset", "13"], "opset"),
    (lambda m, t: ["--base", str(m[0]), "--opset", "16"], "opset must be an integer >= 17"),
    (lambda m, t: ["--opset", "16"], "opset must be an integer >= 17"),
    (lambda m, t: ["--opset", "99"], "newer than the exporter supports"),
    (lambda m, t: ["--expert", f"a={m[1]}"], "--expert needs --base"),
])
def test_export_bad_input_exits_2_and_creates_no_folder(models, tmp_path, capsys, make_args, message):
    assert cli.main(["export", *make_args(models, tmp_path), "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, message)
    assert not (tmp_path / "o").exists()


def test_export_unwritable_out_exits_2(models, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert cli.main(["export", "--base", str(models[0]), "--out", str(blocker / "engines")]) == 2
    one_error_line(capsys)
