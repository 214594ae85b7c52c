"""bench/gpu_check.py's kernel sections, run here on the CPU under the Triton interpreter at tiny sizes: the same
functions a GPU run calls (cases, verification, timing, bytes, the copy it is compared with, host launch costs),
so a GPU session cannot fail on their logic. The timings here mean nothing; the structure and the checks do."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernel_cases_cover_the_targets(gpu_check):
    cases = list(gpu_check.kernel_cases())
    for kernel in ("compose", "fused_step"):
        mine = [c for c in cases if c["kernel"] == kernel]
        assert {c["size"] for c in mine} == {"K=3 8x3x512x512", "K=2 8x4x128x128"}
        assert {c["dtype"] for c in mine} == {"float32", "float16"}
        assert len({c["var"] for c in mine}) == 2  # per-element and per-expert variances
    assert {c["noise"] for c in cases if c["kernel"] == "compose"} == {"given", "philox"}


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
