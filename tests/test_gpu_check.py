"""bench/gpu_check.py's kernel sections, run here on the CPU under the Triton interpreter at tiny sizes: the same
functions a GPU run calls (cases, verification, timing, bytes, the copy it is compared with, host launch costs),
so a GPU session cannot fail on their logic. The timings here mean nothing; the structure and the checks do."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernel_cases_cover_the_targets_and_the_kernels_accept_them(gpu_check):
    """Every row of the GPU run's roofline table, at a tiny spatial size but with its own K, channels, dtype,
    variance kind and noise, built by the same case builder and verified against the plain reference as the GPU
    run verifies it: a case the kernels refuse or get wrong fails here, not in a GPU session."""
    cases = list(gpu_check.kernel_cases())
    for kernel in ("compose", "fused_step"):
        mine = [c for c in cases if c["kernel"] == kernel]
        assert {c["size"] for c in mine} == set(gpu_check.KERNEL_SIZES)
        assert {c["dtype"] for c in mine} == {"float32", "float16"}
        assert len({c["var"] for c in mine}) == 2  # per-element and per-expert variances
    assert {c["noise"] for c in cases if c["kernel"] == "compose"} == {"given", "philox"}
    for case in cases:
        K, (B, C, H, W) = case["K"], case["shape"]
        assert K == int(case["size"].split()[0][2:]) and case["size"].endswith(f"{B}x{C}x{H}x{W}"), case
        tiny = dict(case, shape=[2, C, 4, 4])
        build = gpu_check._compose_case if case["kernel"] == "compose" else gpu_check._fused_case
        sets, call, nbytes, check, _ = build(tiny, torch.device("cpu"), True)
        err, tol, bad = check()
        assert 0 <= err <= tol and bad == 0, (case, err, tol, bad)
        assert call(sets[0]).shape == (2, C, 4, 4) and nbytes > 0


def test_sections_run_on_cpu(gpu_check, tmp_path, capsys):
    record = gpu_check.run_kernel_sections(device="cpu", quick=True)
    kernels, launch = record["checks"]["kernels"], record["checks"]["launch"]
    assert "error" not in kernels, kernels.get("traceback")
    cases = kernels["cases"]
    assert len(cases) == 6  # quick: every dtype, variance kind and noise once per kernel
    for kernel in ("compose", "fused_step"):
        mine = [c for c in cases if c["kernel"] == kernel]
        assert {c["dtype"] for c in mine} == {"float32", "float16"} and len({c["var"] for c in mine}) == 2
    assert {c["noise"] for c in cases if c["kernel"] == "compose"} == {"given", "philox"}
    for c in kernels["cases"]:
        assert c["ok"], c
        assert c["max_err_vs_ref_f64"] <= c["tolerance"] and c["bad_elements"] == 0
        assert c["bytes"] > 0 and c["input_sets"] == 1 and c["timing"] == "wall"
        for key in ("ms", "gbps", "copy_gbps", "frac_of_copy"):
            assert c[key] > 0 and math.isfinite(c[key]), (key, c)
        if c["kernel"] == "fused_step":
            assert c["wrapper_ms"] > 0
    # bytes: compose K=2 float32 per-element variances with given noise reads 2 means, 2 variances, the noise,
    # and writes x_prev: 6 tensors of 2x4x8x8 float32
    row = next(c for c in kernels["cases"] if c["kernel"] == "compose" and c["dtype"] == "float32"
               and c["var"] == "elem" and c["noise"] == "given")
    assert row["bytes"] == 6 * 512 * 4
    assert "error" not in launch, launch.get("traceback")
    assert launch["ok"] and launch["graph"].startswith("skipped")
    for key in ("plain_us", "plan_us", "plan_unchecked_us", "bare_jit_us"):
        assert launch[key] > 0
    gpu_check.print_table(record)
    out = gpu_check.results_path(record)
    assert out.parent == REPO / "bench" / "results" and out.name.startswith("gpu-cpu-")
    gpu_check.write_record(record, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["checks"]["kernels"]["cases"][0]["kernel"] == "compose"
    assert "% of copy" in capsys.readouterr().out


@pytest.mark.slow
def test_e2e_section_runs_on_cpu(gpu_check, tmp_path):
    """The e2e section at the tiny configuration on the CPU, CUDA graphs through their eager seam: every method
    and split part timed, graph latents equal to eager ones bit for bit (streams on and off), msdda's one-expert
    path equal to diffusers' StableDiffusionPipeline from the same x_T to float32 rounding, the backend's resident
    parameter bytes the networks' own, the targets computed, the record written and printed."""
    record = gpu_check.run_e2e_section(device="cpu", quick=True)
    e2e = record["checks"]["e2e"]
    assert "error" not in e2e, e2e.get("traceback")
    assert e2e["ok"] and e2e["spec"] == "tiny" and e2e["dtype"] == "float32"
    methods = {"msdda_graph_streams", "msdda_graph_no_streams", "msdda_eager", "one_expert_graph",
               "diffusers_single", "db_loop"}
    assert set(e2e["batches"]) == {"1", "2"}
    for res in e2e["batches"].values():
        assert set(res) == methods | {"split"}
        assert all(res[m]["ms"] > 0 and res[m]["peak_bytes"] is None for m in methods)
        split = res["split"]
        for part in ("unet_eager_ms", "msdda_step_graph_streams_ms", "msdda_step_graph_no_streams_ms",
                     "msdda_step_eager_ms", "db_step_ms", "encode_ms", "decode_ms"):
            assert split[part] > 0, part
        assert "unet_graph_ms" not in split            # a CUDA graph of one UNet needs a GPU
    graph_checks = [c for c in e2e["checks"] if c["check"].startswith("graph vs eager")]
    assert len(graph_checks) == 4 and all(c["bitwise"] and c["max_abs_diff"] == 0 and not c["failed"]
                                          for c in graph_checks)
    vs_diffusers = next(c for c in e2e["checks"] if "diffusers" in c["check"])
    # float32 on both sides: the DDIM arithmetic differs only in rounding order (a few ulp per step)
    assert vs_diffusers["rel_diff"] <= 64 * torch.finfo(torch.float32).eps, vs_diffusers
    mem = e2e["memory"]
    assert mem["backend_resident_ratio"] == 1.0 and mem["networks_bytes"] > 0
    assert set(e2e["targets_met"]) == {"msdda_vs_diffusers_single_b1", "msdda_vs_one_expert_b1",
                                       "db_loop_vs_msdda_b1", "msdda_vs_db_loop_blast", "param_memory_ratio"}
    assert all(v > 0 for k, v in e2e["targets"].items() if k != "param_memory_ratio")
    gpu_check.print_table(record)
    gpu_check.write_record(record, tmp_path / "e2e.json")
    assert json.loads((tmp_path / "e2e.json").read_text())["checks"]["e2e"]["K"] == 2


def test_e2e_settings_and_sd15_networks_fit_together(gpu_check, tmp_path):
    """The GPU run's settings are the issue's (fp16, 50 DDIM steps, CFG 7.5, batch 1 and 8), and the SD1.5
    networks it builds (gpu_check.sd_models, the same call, on the meta device: no memory, no arithmetic) have
    SD1.5's sizes and fit together: text states feed the UNet's cross-attention, the VAE's latents are the UNet's
    input at 1/8 of 512 pixels, and one CFG step's shapes flow through the UNet and the VAE decoder."""
    s = gpu_check.e2e_settings(False, torch.device("cuda"))
    assert (s.spec, s.batches, s.steps, s.guidance, s.dtype) == ("sd15", (1, 8), 50, 7.5, torch.float16)
    meta = torch.device("meta")
    m = gpu_check.sd_models("sd15", meta, torch.float16, tmp_path)
    unet = m.unets[0]
    assert 855e6 < sum(p.numel() for p in unet.parameters()) < 865e6
    assert 120e6 < sum(p.numel() for p in m.text_encoder.parameters()) < 126e6      # CLIP ViT-L/14's text tower
    assert 80e6 < sum(p.numel() for p in m.vae.parameters()) < 87e6
    ids = m.tokenizer(["a cat", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (2, 77)
    with torch.no_grad():
        states = m.text_encoder(ids.to(meta)).last_hidden_state
        latents = torch.empty(2, unet.config.in_channels, 64, 64, device=meta, dtype=torch.float16)
        eps = unet(latents, torch.tensor([981, 981], device=meta), encoder_hidden_states=states).sample
        image = m.vae.decode(eps[:1] / m.vae.config.scaling_factor).sample
    assert unet.config.cross_attention_dim == 768 and unet.config.sample_size == 64
    assert states.shape == (2, 77, unet.config.cross_attention_dim)
    assert eps.shape == latents.shape and image.shape == (1, 3, 512, 512) == (1, 3, *(m.vae.config.sample_size,) * 2)
