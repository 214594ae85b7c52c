"""Issue 19's classes, each with cases of our own: the folder rule (export and batch never touch a file they did
not write, inside or outside --out: user files, symlinked subfolders, a concurrent run), the file rule (FIFOs,
devices, links refused in one line, never waited on), one line for any exception (<= 300 characters), and the
repair of a nulled grid hash. Tiny models only; no Ray."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from msdda import cli
from msdda.errors import MAX_ERROR_CHARS, one_line, short_value
from msdda.runfolder import LOCK_NAME, RunFolder, RunFolderError
from cli_checks import one_error_line


@pytest.fixture(scope="module")
def models(learned_variance_models):
    base, experts = learned_variance_models
    return base, experts["a"]


def _tree(folder: Path) -> dict:
    """Every entry below ``folder`` (links not followed): what 'untouched' compares."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = os.lstat(p)
        out[str(p.relative_to(folder))] = (st.st_mode, st.st_mtime_ns, os.readlink(p) if p.is_symlink() else
                                           (p.read_bytes() if p.is_file() else None))
    return out


def _user_folder(path: Path) -> Path:
    """A folder of the user's, holding files named like msdda's own."""
    path.mkdir(parents=True)
    for name in ("manifest.json", "base.onnx", "a.onnx.data", "run.json", "manifest.parquet", "00000.png",
                 ".base.onnx.abcdefgh.tmp", ".manifest.parquet.abcd1234.tmp", "notes.txt"):
        (path / name).write_text(f"the user's {name}")
    return path


# ---------------------------------------------------------------------- the folder rule: export
def _export(models, out):
    base, a = models
    return cli.main(["export", "--base", str(base), "--expert", f"a={a}", "--out", str(out)])


def test_export_refuses_a_folder_of_user_files_untouched(models, tmp_path, capsys):
    out = _user_folder(tmp_path / "mine")
    before = _tree(out)
    assert _export(models, out) == 2
    one_error_line(capsys, "was not written by msdda")       # their manifest.json is no msdda manifest
    assert _tree(out) == before
    (out / "manifest.json").unlink()
    before = _tree(out)
    assert _export(models, out) == 2
    one_error_line(capsys, "not empty")
    assert _tree(out) == before


def test_export_refuses_a_generate_run_folder(models, tmp_path, capsys):
    base, a = models
    run = tmp_path / "run"
    assert cli.main(["generate", "--base", str(base), "--expert", f"a={a}", "--class", "1", "--steps", "2",
                     "--num-images", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    before = _tree(run)
    assert _export(models, run) == 2
    one_error_line(capsys, "differs in: command")
    assert _tree(run) == before


def test_export_into_its_own_folder_again_and_locked(models, tmp_path, capsys):
    out = tmp_path / "engines"
    assert _export(models, out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "export" and manifest["members"] == ["base", "a"]
    assert _export(models, out) == 0                          # its own folder: re-exported in place
    capsys.readouterr()
    with RunFolder(out, {"command": "export"}, lambda n: False):      # a concurrent run holds the lock
        assert _export(models, out) == 2
        one_error_line(capsys, "another msdda run is writing")


# ---------------------------------------------------------------------- the folder rule: batch
def _batch(jobs, out):
    return cli.main(["batch", "--input", str(jobs), "--out", str(out), "--num-cpus", "1"])


@pytest.fixture
def refused_jobs(tmp_path):
    """A jobs file whose rows are all refused before Ray starts: a batch folder is made without Ray."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"id": "x", "class": 1, "seed": -5}\n')
    return jobs


def test_batch_refuses_a_folder_of_user_files_untouched(refused_jobs, tmp_path, capsys):
    out = _user_folder(tmp_path / "mine")
    (out / "images").mkdir()
    (out / "images" / "x.png").write_text("the user's image named like job x")
    (out / "images" / ".x.png.abcdefgh.tmp").write_text("the user's file named like a temp file")
    before = _tree(out)
    assert _batch(refused_jobs, out) == 2
    one_error_line(capsys, "was not written by msdda")      # their run.json is no msdda manifest
    assert _tree(out) == before
    (out / "run.json").unlink()
    before = _tree(out)
    assert _batch(refused_jobs, out) == 2
    one_error_line(capsys, "not empty")
    assert _tree(out) == before


def test_batch_never_writes_through_a_symlinked_subfolder(refused_jobs, tmp_path, capsys):
    out = tmp_path / "out"
    assert _batch(refused_jobs, out) == 2                      # a batch folder of ours, its one row refused
    capsys.readouterr()
    assert (out / "run.json").is_file() and (out / "manifest.parquet").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.png").write_text("not ours")
    (elsewhere / ".x.png.abcdefgh.tmp").write_text("not ours either")
    for sub in ("images", "manifest.parts"):
        real = out / sub
        real.rmdir()
        real.symlink_to(elsewhere, target_is_directory=True)
        before = _tree(elsewhere), _tree(out)
        assert _batch(refused_jobs, out) == 2
        one_error_line(capsys, "is a symbolic link")
        assert (_tree(elsewhere), _tree(out)) == before
        real.unlink()
        real.mkdir()


def test_batch_folder_is_locked_and_specials_refused(refused_jobs, tmp_path, capsys):
    out = tmp_path / "out"
    assert _batch(refused_jobs, out) == 2
    capsys.readouterr()
    with RunFolder(out, {}, lambda n: False, manifest="run.json"):        # another batch holds the folder
        assert _batch(refused_jobs, out) == 2
        one_error_line(capsys, "another msdda run is writing")
    (out / "manifest.parquet").unlink()
    os.mkfifo(out / "manifest.parquet")                        # a FIFO where a manifest is read: no hang
    done = []
    worker = threading.Thread(target=lambda: done.append(_batch(refused_jobs, out)), daemon=True)
    worker.start()
    worker.join(120)
    assert done == [2], "batch hung on a FIFO"
    capsys.readouterr()


# ---------------------------------------------------------------------- the file rule: generate's lock and manifest
@pytest.mark.parametrize("special", ["fifo_lock", "fifo_manifest", "symlink_lock", "dev_manifest"])
def test_generate_refuses_special_files_in_one_line(models, tmp_path, capsys, special):
    base, a = models
    out = tmp_path / "o"
    out.mkdir()
    target = out / (LOCK_NAME if "lock" in special else "manifest.json")
    if special.startswith("fifo"):
        os.mkfifo(target)
    elif special == "symlink_lock":
        (tmp_path / "theirs").write_text("x")
        target.symlink_to(tmp_path / "theirs")
    else:
        target.symlink_to("/dev/zero")
    args = ["generate", "--base", str(base), "--expert", f"a={a}", "--class", "1", "--steps", "2", "--num-images",
            "1", "--out", str(out)]
    done = []
    worker = threading.Thread(target=lambda: done.append(cli.main(args)), daemon=True)
    worker.start()
    worker.join(120)
    assert done == [2], f"generate hung on {special}"
    line = one_error_line(capsys)
    assert any(w in line for w in ("named pipe", "symbolic link", "device", "not a regular file")), line
    assert sorted(p.name for p in out.iterdir()) == [target.name] and (tmp_path / "theirs").exists() \
        if special == "symlink_lock" else True


def test_runfolder_subfolder_refuses_links_and_files(tmp_path):
    with RunFolder(tmp_path / "o", {"command": "t"}, lambda n: True) as run:
        assert run.subfolder("images").is_dir()
        (tmp_path / "o" / "file").write_text("x")
        with pytest.raises(RunFolderError, match="not a folder"):
            run.subfolder("file")
        (tmp_path / "o" / "link").symlink_to(tmp_path, target_is_directory=True)
        with pytest.raises(RunFolderError, match="symbolic link"):
            run.subfolder("link")


# ---------------------------------------------------------------------- a nulled grid hash is repaired
def test_nulled_grid_hash_is_repaired_on_rerun(models, tmp_path):
    base, a = models
    out = tmp_path / "o"
    args = ["generate", "--base", str(base), "--expert", f"a={a}", "--class", "1", "--steps", "2", "--num-images",
            "2", "--out", str(out)]
    assert cli.main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    good = dict(manifest["sha256"])
    for edit in (None, 7, "not-a-hash"):
        manifest["sha256"]["grid.png"] = edit
        manifest["sha256"]["00001.png"] = edit
        (out / "manifest.json").write_text(json.dumps(manifest))
        assert cli.main(args) == 0
        assert json.loads((out / "manifest.json").read_text())["sha256"] == good


# ---------------------------------------------------------------------- any exception as one short line
class _Wrapper(Exception):
    """Stands for Ray's RayTaskError: the real error in ``.cause``, a whole traceback as its text."""

    def __init__(self, cause):
        super().__init__("Traceback (most recent call last):\n" + "  File x\n" * 140 + repr(cause))
        self.cause = cause


@pytest.mark.parametrize("exc, expect, status", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 81604378624 bytes. Error code 12 (Cannot allocate memory)"), "out of memory", 2),
    (MemoryError(), "out of memory", 2),
    (RecursionError("maximum recursion depth exceeded"), "nested too deeply", 2),
    (OverflowError("Python int too large to convert to C long"), "number too large", 2),
    (ValueError("x" * 50_000_000), "xxx", 2),
    (ValueError("line one\n\n  line two"), "line one line two", 2),
    (FileNotFoundError(2, "No such file or directory", "/nope"), "No such file or directory: /nope", 2),
    (_Wrapper(ValueError("base folder does not load")), "base folder does not load", 2),
    (KeyError("internal"), "KeyError", 1),
    (IndexError("list index out of range"), "IndexError", 1),
])
def test_any_exception_is_one_short_line(exc, expect, status):
    line = cli.error_line(exc)
    assert line.startswith("msdda: error: ") and "\n" not in line and len(line) <= MAX_ERROR_CHARS
    assert expect in line
    assert cli.exit_status(exc if not isinstance(exc, _Wrapper) else exc.cause) == status


def test_main_turns_an_unexpected_exception_into_one_line(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB")

    monkeypatch.setitem(cli.COMMANDS, "export", boom)
    assert cli.main(["export", "--out", "x"]) == 2
    assert "out of memory" in one_error_line(capsys)
    monkeypatch.setitem(cli.COMMANDS, "export", lambda args: [][1])
    assert cli.main(["export", "--out", "x"]) == 1
    assert "IndexError" in one_error_line(capsys)


def test_short_value_bounds_any_value():
    assert len(short_value("y" * 10_000_000)) <= 60
    deep = []
    for _ in range(100_000):
        deep = [deep]
    assert len(short_value(deep)) <= 60 and len(short_value(list(range(10**6)))) <= 60
    assert len(one_line(_Wrapper(RecursionError()))) <= MAX_ERROR_CHARS


# ---------------------------------------------------------------------- API types: one-line ValueErrors
@pytest.fixture(scope="module")
def engine(models):
    from msdda import Engine

    base, a = models
    return Engine.from_pretrained(str(base), {"a": str(a)})


def _latent_cases():
    import numpy as np
    import torch

    shape = (1, 1, 8, 8)
    return [
        (torch.tensor(0.5), "0-d tensor"),
        (torch.empty(shape, device="meta"), "meta device"),
        (torch.zeros(shape, dtype=torch.complex64), "real floating-point"),
        (torch.zeros(shape, dtype=torch.bool), "real floating-point"),
        (torch.zeros(shape, dtype=torch.int64), "real floating-point"),
        (torch.zeros(shape).to_sparse(), "dense"),
        ("latents", "must be a torch tensor"),
        ([[0.0]], "must be a torch tensor"),
        (np.array(["a"], dtype=object), "tensor of numbers"),
    ]


@pytest.mark.parametrize("index", range(9))
def test_bad_latents_and_noise_are_one_line_value_errors(engine, index):
    value, message = _latent_cases()[index]
    for kwargs in ({"latents": value}, {"noise": value}):
        with pytest.raises(ValueError, match=message) as info:
            engine.generate(class_labels=1, steps=2, **kwargs)
        assert "\n" not in str(info.value) and len(str(info.value)) <= MAX_ERROR_CHARS


@pytest.mark.parametrize("base, experts, message", [
    (123, None, "base must be a folder path"),
    (None, None, "base must be a folder path"),
    ("x", {"a": 5}, "expert 'a' must be a folder path"),
    ("x", ["a"], "experts must be a mapping"),
])
def test_from_pretrained_type_errors_are_value_errors(base, experts, message):
    from msdda import Engine

    with pytest.raises(ValueError, match=message):
        Engine.from_pretrained(base, experts)


def test_negative_prompt_on_a_class_model_is_refused_everywhere(engine, models, tmp_path, capsys):
    with pytest.raises(ValueError, match="negative_prompt is for text-conditioned bases"):
        engine.generate(class_labels=1, steps=2, negative_prompt="blurry")
    with pytest.raises(ValueError, match="negative_prompt is for text-conditioned bases"):
        engine.check_request(class_labels=1, steps=2, negative_prompt="blurry", output_type="latent")  # serve, batch
    base, a = models
    assert cli.main(["generate", "--base", str(base), "--class", "1", "--negative-prompt", "x", "--steps", "2",
                     "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "--negative-prompt is for text-conditioned bases")


# ---------------------------------------------------------------------- LoRA messages
@pytest.fixture(scope="module")
def lora_base(tmp_path_factory, tiny_sd_models):
    from tiny_models import write_lora_adapter

    root = tmp_path_factory.mktemp("lora")
    base = tiny_sd_models[0]
    return base, write_lora_adapter(base, root / "good", seed=1, rank=4) / "pytorch_lora_weights.safetensors"


def _edited_lora(good, folder, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(good)
    key = sorted(k for k in state if k.endswith("lora.down.weight"))[0]
    edit(state, key, key.replace("lora.down", "lora.up"))
    folder.mkdir()
    save_file(state, folder / "pytorch_lora_weights.safetensors")
    return folder


def _set(state, key, value):
    state[key] = value


@pytest.mark.parametrize("edit, message", [
    (lambda s, d, u: _set(s, d, s[d].to(torch_dtype("int32"))), "has dtype I32; LoRA weights must be floating point"),
    (lambda s, d, u: _set(s, d, s[d][:0]), "rank-0 (empty) factor"),
    (lambda s, d, u: (_set(s, d, s[d][:0]), _set(s, u, s[u][:, :0])), "rank-0 (empty) factor"),
    (lambda s, d, u: _set(s, u, s[u].repeat(1, 2, *([1] * (s[u].dim() - 2)))),
     "rank 4 in its down factor (lora_A) but rank 8 in its up factor (lora_B)"),
    (lambda s, d, u: s[d].view(-1).__setitem__(0, float("nan")), "holds NaN or Inf"),
    (lambda s, d, u: s[u].view(-1).__setitem__(3, float("inf")), "holds NaN or Inf"),
])
def test_lora_refusals_are_one_line_naming_the_file(lora_base, tmp_path, capsys, edit, message):
    from msdda.loading import LoadError

    base, good = lora_base
    folder = _edited_lora(good, tmp_path / "bad", edit)
    from msdda import Engine

    with pytest.raises(LoadError) as info:
        Engine.from_pretrained(str(base), {"x": str(folder)})
    text = str(info.value)
    assert message in text and str(folder) in text and "\n" not in text and len(text) <= MAX_ERROR_CHARS, text
    capsys.readouterr()
    assert cli.main(["generate", "--base", str(base), "--expert", f"x={folder}", "--prompt", "a", "--steps", "2",
                     "--num-images", "1", "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, message[:20])            # and nothing of diffusers' own printed before it
    assert not (tmp_path / "o").exists()


def torch_dtype(name):
    import torch

    return getattr(torch, name)


@pytest.mark.parametrize("damage", ["no_config", "bad_json", "fifo_config"])
def test_batch_base_that_cannot_load_fails_before_ray(tmp_path, capsys, damage):
    base = tmp_path / "base"
    (base / "unet").mkdir(parents=True)
    if damage == "bad_json":
        (base / "unet" / "config.json").write_text("{not json")
    elif damage == "fifo_config":
        os.mkfifo(base / "unet" / "config.json")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"class": 1, "seed": 1}\n')
    done = []
    worker = threading.Thread(target=lambda: done.append(cli.main(["batch", "--input", str(jobs), "--out",
                                                                   str(tmp_path / "out"), "--base", str(base)])),
                              daemon=True)
    worker.start()
    worker.join(120)
    assert done == [2]
    captured = capsys.readouterr()
    assert "Ray" not in captured.out
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("msdda: error: --base") and len(lines[0]) <= MAX_ERROR_CHARS
    assert not (tmp_path / "out").exists()


def test_export_replaces_links_in_its_folder_never_their_targets(models, tmp_path, capsys):
    """A file of ours replaced by a link to a file outside --out: re-exporting replaces the link itself (atomic
    rename), the outside file is left as it was; a link where the lock file goes is refused."""
    out = tmp_path / "engines"
    assert _export(models, out) == 0
    outside = tmp_path / "precious.onnx"
    outside.write_bytes(b"the user's file outside --out")
    (out / "a.onnx").unlink()
    (out / "a.onnx").symlink_to(outside)
    assert _export(models, out) == 0
    assert outside.read_bytes() == b"the user's file outside --out"
    assert not (out / "a.onnx").is_symlink() and (out / "a.onnx").stat().st_size > 1000
    (out / LOCK_NAME).unlink()
    (out / LOCK_NAME).symlink_to(outside)
    capsys.readouterr()
    assert _export(models, out) == 2
    one_error_line(capsys, "symbolic link")
    assert outside.read_bytes() == b"the user's file outside --out"
