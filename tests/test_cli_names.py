"""diffusers' argument names, the model's own sampling defaults through every entry point, and the CLI's
--version, --onnx-dir, checks before loading and progress in logs."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

from msdda import Engine, cli, zoo
from msdda.loading import LoadError, sampling_defaults
from cli_checks import one_error_line

FAST = ["--steps", "2", "--num-images", "2", "--batch-size", "2"]


@pytest.fixture(scope="module")
def models(learned_variance_models):
    return learned_variance_models


@pytest.fixture(scope="module")
def zoo_engine():
    paths = zoo.zoo_paths()
    return Engine.from_pretrained(paths["base"], {n: paths[n] for n in zoo.OBJECTIVES[:2]})


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("models were loaded before the input was refused")

    monkeypatch.setattr(Engine, "from_pretrained", refuse)


# ---------------------------------------------------------------------- diffusers' names, model defaults
def test_num_inference_steps_is_steps(zoo_engine):
    kwargs = dict(class_labels=3, seed=1, output_type="latent")
    a = zoo_engine.generate(num_inference_steps=2, **kwargs).latents
    torch.testing.assert_close(a, zoo_engine.generate(steps=2, **kwargs).latents, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pass steps= or num_inference_steps="):
        zoo_engine.generate(steps=3, num_inference_steps=3, **kwargs)
    with pytest.raises(ValueError, match="not both"):
        zoo_engine.check_request(steps=3, num_inference_steps=4)


def test_the_zoo_defaults_through_the_api(zoo_engine):
    assert (zoo_engine.default_steps, zoo_engine.default_guidance_scale) == (50, 2.0)
    checked = zoo_engine.check_request(class_labels=3)
    assert (checked.steps, checked.guidance_scale) == (50, 2.0)
    kwargs = dict(class_labels=3, seed=2, steps=2, output_type="latent")
    by_default = zoo_engine.generate(**kwargs).latents
    torch.testing.assert_close(by_default, zoo_engine.generate(guidance_scale=2.0, **kwargs).latents, rtol=0, atol=0)
    assert not torch.equal(by_default, zoo_engine.generate(guidance_scale=7.5, **kwargs).latents)


def test_other_models_default_to_diffusers_values(models):
    base, experts = models
    engine = Engine.from_pretrained(base, experts)
    assert (engine.default_steps, engine.default_guidance_scale) == (50, 7.5)
    assert sampling_defaults(base) == (50, 7.5)
    # the zoo's base states its own, in diffusers' names; they are the zoo's constants
    assert sampling_defaults(zoo.zoo_paths()["base"]) == (zoo.DEFAULT_STEPS, zoo.DEFAULT_GUIDANCE_SCALE) == (50, 2.0)


@pytest.mark.parametrize("content, message", [
    ('{"guidance_scale": "high"}', "guidance_scale must be a finite number"),
    ('{"num_inference_steps": 0}', "num_inference_steps must be an integer >= 1"),
    ('{"steps": 5}', "unknown key 'steps'"),
    ("[1]", "expected a JSON object"),
])
def test_a_bad_sampling_defaults_file_is_a_load_error(tmp_path, content, message):
    (tmp_path / "sampling_defaults.json").write_text(content)
    with pytest.raises(LoadError, match=message):
        sampling_defaults(tmp_path)
    (tmp_path / "sampling_defaults.json").write_text('{"guidance_scale": 4}')
    assert sampling_defaults(tmp_path) == (50, 4.0)


def test_the_zoo_defaults_through_the_cli(tmp_path):
    assert cli.main(["generate", "--class", "3", "--num-images", "1", "--steps", "2", "--quiet",
                     "--out", str(tmp_path / "o")]) == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["guidance_scale"] == 2.0
    assert manifest["scheduler"] == "ddpm" and manifest["eta"] is None     # DDPM has no eta to record


@pytest.mark.parametrize("zoo_named", [False, True])
def test_the_zoo_defaults_for_serve_and_batch(zoo_named):
    """serve and batch take their defaults from ModelSpec (msdda.ray_runtime.model_spec), with the zoo given
    implicitly or by path."""
    from msdda.ray_runtime import model_spec

    for command in ("serve", "batch"):
        argv = [command] + (["--input", "jobs.jsonl", "--out", "o"] if command == "batch" else [])
        if zoo_named:
            paths = zoo.zoo_paths()
            argv += ["--base", str(paths["base"]), "--expert", f"legible={paths['legible']}"]
        args = cli.build_parser().parse_args(argv)
        spec = model_spec(args, threads=1, num_gpus=0, row_block=None)
        assert (spec.default_steps, spec.default_guidance_scale) == (50, 2.0)


def test_eta_help_does_not_claim_ddim_for_ddpm():
    text = cli.build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    assert "DDPM samplers, the zoo's among them, have no eta" in " ".join(text.split())


# ---------------------------------------------------------------------- --version, --onnx-dir
def test_version():
    import msdda

    out = subprocess.run([sys.executable, "-m", "msdda.cli", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"msdda {msdda.__version__}", out.stderr


def test_generate_onnx_dir_matches_the_python_onnx_dir(models, tmp_path, monkeypatch):
    from PIL import Image

    from msdda.exporting import export_models

    monkeypatch.setenv("MSDDA_CACHE", str(tmp_path / "cache"))
    base, experts = models
    export_models(base, experts, tmp_path / "engines")
    flags = ["--base", str(base), *(f"--expert={n}={p}" for n, p in experts.items())]
    assert cli.main(["generate", *flags, "--backend", "onnxruntime", "--onnx-dir", str(tmp_path / "engines"),
                     "--class", "3", "--weights", "a=0.6,b=0.4", "--guidance-scale", "2", *FAST, "--quiet",
                     "--out", str(tmp_path / "o")]) == 0
    assert not (tmp_path / "cache" / "onnx").exists()             # the folder's files ran, nothing exported
    engine = Engine.from_pretrained(base, experts, backend="onnxruntime", onnx_dir=tmp_path / "engines")
    images = engine.generate(class_labels=3, weights={"a": 0.6, "b": 0.4}, guidance_scale=2.0, steps=2,
                             num_images=2, seed=[0, 1]).images
    for i, image in enumerate(images):
        written = Image.open(tmp_path / "o" / f"{i:05d}.png")
        assert written.tobytes() == image.tobytes()


def test_onnx_dir_flag_checks(no_loading, tmp_path, capsys):
    assert cli.main(["generate", "--class", "3", "--onnx-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "add --backend onnxruntime")
    assert cli.main(["generate", "--class", "3", "--backend", "onnxruntime", "--onnx-dir", str(tmp_path / "none"),
                     "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "is not a folder")


# ---------------------------------------------------------------------- checks before loading
@pytest.mark.parametrize("command, extra, message", [
    ("generate", ["--class", "3", "--weights", "legible=0.5,zzz=0.5"], "unknown expert 'zzz'"),
    ("generate", ["--class", "3", "--strategy", "expert:zzz"], "unknown expert 'zzz'"),
    ("generate", ["--class", "3", "--expert-betas", "legible=1,zzz=1"], "unknown expert 'zzz'"),
    ("generate", [], "pass --class N"),
    ("generate", ["--prompt", "a cat"], "not text-conditioned"),
    ("sweep", ["--class", "3", "--pair", "legible,zzz"], "unknown expert 'zzz'"),
])
def test_names_and_classes_are_refused_before_loading(no_loading, tmp_path, capsys, command, extra, message):
    assert cli.main([command, *extra, "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, message)
    assert not (tmp_path / "o").exists()


def test_unknown_expert_of_named_models_is_refused_before_loading(no_loading, models, tmp_path, capsys):
    base, experts = models
    flags = ["--base", str(base), *(f"--expert={n}={p}" for n, p in experts.items())]
    assert cli.main(["generate", *flags, "--class", "1", "--weights", "a=0.5,c=0.5",
                     "--out", str(tmp_path / "o")]) == 2
    one_error_line(capsys, "unknown expert 'c'")


# ---------------------------------------------------------------------- progress in logs
class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 1.0          # every reading one second later
        return self.now


def test_progress_lines_on_a_non_terminal(monkeypatch):
    from msdda.progress import FIRST_LINE_AFTER_S, Progress

    monkeypatch.setenv("MSDDA_PROGRESS_AFTER_S", str(FIRST_LINE_AFTER_S))

    stream = io.StringIO()
    with Progress(20, "generate", stream=stream, clock=FakeClock()) as bar:
        for _ in range(20):
            bar.update()
    lines = stream.getvalue().splitlines()
    assert lines and all(line.startswith("msdda: generate: ") for line in lines)
    assert lines[-1].startswith("msdda: generate: 20/20 steps (100%)")
    assert 5 <= len(lines) <= 11          # about one per 10%, none in the first FIRST_LINE_AFTER_S (20 ticks)

    quiet = io.StringIO()
    with Progress(20, "generate", stream=quiet, clock=FakeClock(), quiet=True) as bar:
        bar.update(20)
    assert quiet.getvalue() == ""


def test_generate_writes_progress_to_a_redirected_stderr(monkeypatch, tmp_path, capsys):
    """Through the CLI, with stderr captured (not a terminal): lines appear, and --quiet removes them."""
    monkeypatch.setenv("MSDDA_PROGRESS_AFTER_S", "0")
    argv = ["generate", "--class", "3", "--num-images", "1", "--steps", "3"]
    assert cli.main([*argv, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith("msdda: generate: 3/3 steps (100%)") for line in err), err
    assert cli.main([*argv, "--quiet", "--out", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().err == ""


def test_help_lists_the_new_flags():
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices
    for command in ("generate", "sweep", "bench", "serve", "batch"):
        assert "--onnx-dir" in sub[command].format_help(), command
    for command in ("generate", "sweep", "bench"):
        assert "--quiet" in sub[command].format_help(), command
