"""The command line: outputs, manifest, resume after interruption, and one-line errors with exit status 2."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from msdda import cli
from tiny_models import make_tiny_unet2d, perturbed_copy


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base = make_tiny_unet2d(root / "base", learned_variance=True, num_class_embeds=11)
    a = perturbed_copy(base, root / "a", seed=1, scale=0.3)
    b = perturbed_copy(base, root / "b", seed=2, scale=0.3)
    return base, a, b


def _args(models, out, *extra):
    base, a, b = models
    return ["generate", "--base", str(base), "--expert", f"a={a}", "--expert", f"b={b}", "--class", "3",
            "--steps", "2", "--num-images", "3", "--batch-size", "2", "--guidance-scale", "2", "--out", str(out), *extra]


def test_generate_writes_images_grid_and_manifest(models, tmp_path):
    out = tmp_path / "run"
    assert cli.main(_args(models, out, "--weights", "a=0.7,b=0.3")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "00002.png", "grid.png", "manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert manifest["weights"] == {"a": 0.7, "b": 0.3}
    assert manifest["seeds"] == [0, 1, 2] and manifest["steps"] == 2 and manifest["strategy"] == "msdda"
    assert [m["name"] for m in manifest["models"]] == ["base", "a", "b"]
    assert all(len(m["sha256"]) == 64 for m in manifest["models"])
    assert manifest["msdda_version"] and manifest["backend"] == "torch"


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
    for name in ("00000.png", "00001.png", "00002.png"):
        assert (part / name).read_bytes() == (full / name).read_bytes()
    assert json.loads((part / "manifest.json").read_text())["complete"] is True


def test_other_run_in_same_folder_is_refused(models, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_args(models, out, "--weights", "a=0.5,b=0.5")) == 0
    assert cli.main(_args(models, out, "--weights", "a=0.6,b=0.4")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds a different run" in err and "weights" in err


@pytest.mark.parametrize("extra, message", [
    (["--weights", "zzz=1"], "unknown expert 'zzz'"),
    (["--weights", "a=-0.5,b=1.5"], "negative"),
    (["--weights", "a=nan,b=0.5"], "not a finite number"),
    (["--weights", "a=0.5,b=0.6"], "sum to 1.1, not 1"),
    (["--weights", "a=oops"], "is not a number"),
    (["--weights", "a=0.5,b=0.5", "--strategy", "magic"], "unknown strategy"),
    (["--weights", "a=0.5,b=0.5", "--expert-betas", "a=40,b=40"], "infeasible composition over (base, a, b): "),
])
def test_bad_input_exits_2_with_one_line(models, tmp_path, capsys, extra, message):
    assert cli.main(_args(models, tmp_path / "x", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("msdda: error:") and "\n" not in err and message in err, err


def test_normalize_rescales_weights(models, tmp_path):
    assert cli.main(_args(models, tmp_path / "n", "--weights", "a=1,b=3", "--normalize")) == 0


def test_missing_and_incompatible_models_exit_2(models, tmp_path, capsys):
    base, a, b = models
    assert cli.main(["generate", "--base", str(tmp_path / "nope"), "--class", "1", "--out", str(tmp_path / "o")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    other = make_tiny_unet2d(tmp_path / "other", learned_variance=False, num_class_embeds=11)
    assert cli.main(["generate", "--base", str(base), "--expert", f"o={other}", "--class", "1",
                     "--out", str(tmp_path / "o")]) == 2
    assert "different output channels" in capsys.readouterr().err
    assert cli.main(["generate", "--base", str(base), "--expert", "broken", "--out", str(tmp_path / "o")]) == 2
    assert "expected NAME=PATH" in capsys.readouterr().err


def test_sweep_writes_grids_and_summary(models, tmp_path):
    base, a, b = models
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "--base", str(base), "--expert", f"a={a}", "--expert", f"b={b}", "--class", "2",
                     "--steps", "2", "--points", "3", "--num-images", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [p["weights"]["a"] for p in summary["points"]] == [0.0, 0.5, 1.0]
    for p in summary["points"]:
        assert (out / p["grid"]).is_file()


def test_help_is_complete():
    text = subprocess.run([sys.executable, "-m", "msdda.cli", "generate", "--help"], capture_output=True, text=True,
                          check=True).stdout
    for opt in ("--base", "--expert", "--weights", "--prompt", "--class", "--num-images", "--steps", "--seed",
                "--strategy", "--backend", "--out", "--normalize"):
        assert opt in text
    top = subprocess.run([sys.executable, "-m", "msdda.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("generate", "sweep", "export"):
        assert cmd in top


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
    (lambda m, t: ["--expert", f"a={m[1]}"], "--expert needs --base"),
])
def test_export_bad_input_exits_2(models, tmp_path, capsys, make_args, message):
    assert cli.main(["export", *make_args(models, tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("msdda: error:") and "\n" not in err and message in err, err


def test_export_unwritable_out_exits_2(models, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert cli.main(["export", "--base", str(models[0]), "--out", str(blocker / "engines")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("msdda: error:") and "\n" not in err, err
