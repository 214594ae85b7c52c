"""``msdda bench`` (msdda.benchmark) and a text UNet folder alone as a base (prompt_embeds, no text stack).

Nothing here asserts a speed: the checks are the record's fields, that the K-vs-one ratio is the ratio of medians
of runs made in this process (interleaved repeat by repeat), and what a bare UNet accepts and refuses."""
from __future__ import annotations

import json
import shutil
import statistics

import pytest
import torch

from msdda import Engine, cli
from cli_checks import one_error_line
from tiny_models import perturbed_copy

FAST = ["--steps", "1", "--warmup", "0", "--repeats", "2", "--quiet"]


@pytest.fixture
def generate_calls(monkeypatch):
    """Every Engine.generate call's strategy and batch, in order (the calls still run)."""
    calls = []
    real = Engine.generate

    def logged(self, request, **kwargs):       # msdda bench runs checked Requests
        calls.append((request.strategy, request.batch))
        return real(self, request, **kwargs)

    monkeypatch.setattr(Engine, "generate", logged)
    return calls


def test_bench_on_the_zoo_prints_a_table_and_writes_the_record(tmp_path, capsys, generate_calls):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--batch-sizes", "1,2", "--strategies", "msdda", *FAST, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "expert:legible" in stdout and "(ref)" in stdout and f"wrote {out}" in stdout
    record = json.loads(out.read_text())
    ran = record["what_ran"]
    assert {"msdda", "torch", "diffusers", "device", "device_name", "backend", "dtype", "cuda_graphs"} <= set(ran)
    assert ran["backend"] == "torch" and ran["dtype"] == "float32" and ran["cuda_graphs"] is False
    assert ran["torch"] == torch.__version__
    assert record["experts"] == ["legible", "bold", "compressible"]
    assert record["steps"] == 1 and record["guidance_scale"] == 2.0        # the zoo's default guidance
    assert record["reference"] == "expert:legible" and record["strategies"] == ["msdda"]
    rows = {(r["batch_size"], r["strategy"]): r for r in record["results"]}
    assert set(rows) == {(b, s) for b in (1, 2) for s in ("msdda", "expert:legible")}
    for (batch, strategy), row in rows.items():
        assert len(row["seconds"]) == 2 and all(t > 0 for t in row["seconds"])
        median = statistics.median(row["seconds"])
        assert row["median_s"] == median and row["min_s"] <= median <= row["max_s"]
        assert row["per_image_s"] == median / batch and row["per_step_s"] == median / 1
        assert row["images_per_s"] == batch / median
        assert row["peak_cuda_memory_bytes"] is None                     # CPU
        ref = rows[batch, "expert:legible"]
        assert row["vs_one_network"] == median / statistics.median(ref["seconds"])
        assert row["networks"] == (1 if strategy.startswith("expert:") else 3)
    assert rows[1, "expert:legible"]["reference_only"] is True and rows[1, "msdda"]["reference_only"] is False
    # every timed number came from a call in this process, interleaved: each repeat runs every strategy once
    order = ["msdda", "expert:legible"]
    assert generate_calls == [(s, b) for b in (1, 2) for _ in range(2) for s in order]


def test_bench_refuses_bad_flags_before_loading(tmp_path, capsys, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("models were loaded before the input was refused")

    monkeypatch.setattr(Engine, "from_pretrained", refuse)
    for extra, message in [(["--strategies", "msdda,expert:zzz"], "unknown expert 'zzz'"),
                           (["--batch-sizes", "1,x"], "is not an integer"),
                           (["--batch-sizes", "0"], "--batch-sizes must be >= 1"),
                           (["--repeats", "0"], "--repeats must be >= 1"),
                           (["--out", str(tmp_path)], "is a folder")]:
        assert cli.main(["bench", *extra]) == 2
        one_error_line(capsys, message)


# ---------------------------------------------------------------------- a text UNet folder alone
def _bare_copy(pipe, dst):
    """The UNet and scheduler of a pipeline folder, without text encoder, tokenizer, VAE or model_index.json."""
    dst.mkdir()
    shutil.copytree(pipe / "unet", dst / "unet")
    shutil.copytree(pipe / "scheduler", dst / "scheduler")
    return dst


@pytest.fixture(scope="module")
def sd_bare(tmp_path_factory, tiny_sd_models):
    root = tmp_path_factory.mktemp("bare")
    pipe = tiny_sd_models[0]
    expert = perturbed_copy(pipe, root / "expert", seed=3, scale=0.3)
    return pipe, _bare_copy(pipe, root / "bare"), expert


def test_bare_unet_runs_on_prompt_embeds_as_the_pipeline_does(sd_bare):
    pipe, bare, expert = sd_bare
    full = Engine.from_pretrained(pipe, {"e": expert})
    alone = Engine.from_pretrained(bare, {"e": expert})
    assert alone.bare_unet and not full.bare_unet and alone.base.text_encoder is None
    embeds, negative = full.encode_prompt(["a red cube"]), full.encode_prompt([""])
    kwargs = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, num_images=2, steps=2,
                  guidance_scale=3.0, seed=4, output_type="latent", weights={"e": 1.0})
    torch.testing.assert_close(alone.generate(**kwargs).latents, full.generate(**kwargs).latents, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt="a cat", output_type="latent"), "instead of prompt="),
    (dict(negative_prompt="x", output_type="latent", prompt_embeds=torch.zeros(1, 77, 32)), "negative_prompt="),
    (dict(output_type="latent"), "pass prompt_embeds="),
    (dict(prompt_embeds=torch.zeros(1, 77, 32), output_type="latent"), "needs negative_prompt_embeds="),
    (dict(prompt_embeds=torch.zeros(1, 77, 32)), "output_type='latent'"),
    (dict(prompt_embeds=torch.zeros(1, 77, 16), negative_prompt_embeds=torch.zeros(1, 77, 16),
          output_type="latent"), "[B, L, 32]"),
])
def test_bare_unet_refuses_prompts_in_one_line(sd_bare, kwargs, message):
    _, bare, _ = sd_bare
    engine = Engine.from_pretrained(bare)
    with pytest.raises(ValueError) as info:
        engine.generate(strategy="base", steps=1, **kwargs)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_bench_and_generate_on_a_bare_unet(sd_bare, tmp_path, capsys):
    _, bare, expert = sd_bare
    out = tmp_path / "b.json"
    args = ["--base", str(bare), "--expert", f"e={expert}"]
    assert cli.main(["bench", *args, "--batch-sizes", "2", *FAST, "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["conditioning"].startswith("random prompt_embeds [1, 77, 32]")
    assert record["output_type"] == "latent" and record["guidance_scale"] == 7.5
    assert {r["strategy"] for r in record["results"]} == {"msdda", "expert:e"}
    capsys.readouterr()
    assert cli.main(["generate", *args, "--prompt", "a cat", "--out", str(tmp_path / "g")]) == 2
    one_error_line(capsys, "without a text encoder")
    assert not (tmp_path / "g").exists()


def test_bare_sdxl_unet_takes_pooled_embeds(tmp_path, tiny_sdxl_models):
    pipe = tiny_sdxl_models[0]
    full = Engine.from_pretrained(pipe)
    alone = Engine.from_pretrained(_bare_copy(pipe, tmp_path / "bare"))
    assert alone.bare_unet and alone.is_sdxl
    embeds, negative, pooled, negative_pooled = full._encode(["a cat"], 1, cfg=True, negative=[""])
    kwargs = dict(strategy="base", prompt_embeds=embeds, negative_prompt_embeds=negative,
                  pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled, steps=2,
                  guidance_scale=3.0, output_type="latent", original_size=(32, 32), target_size=(32, 32),
                  negative_original_size=(8, 8), negative_target_size=(8, 8))   # explicit: the bare UNet has no
    # VAE, so its image size in pixels assumes diffusers' factor 8 where this pipeline's tiny VAE has 2
    torch.testing.assert_close(alone.generate(**kwargs).latents, full.generate(**kwargs).latents, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pooled_prompt_embeds="):
        alone.generate(**{**kwargs, "pooled_prompt_embeds": None})
