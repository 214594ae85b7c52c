"""libmsdda_step: the CMake build (AOT Triton compile of the fused-step kernel, no GPU needed), ctest, and the
C ABI seen from Python through ctypes. The GPU half of the C test skips without a GPU (bench/gpu_check.py and
``ctest`` on a GPU machine run it)."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    build = tmp_path_factory.mktemp("aot_build")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cfg = subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), f"-DMSDDA_PYTHON={sys.executable}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    out = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "24 cubins (sm_80, sm_90)" in out.stdout
    return build


def test_ctest_passes(build_dir):
    res = subprocess.run(["ctest", "--test-dir", str(build_dir), "--output-on-failure"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "msdda_step_abi" in res.stdout and "0 tests failed" in res.stdout


def test_library_links_no_cuda(build_dir):
    lib = build_dir / "libmsdda_step.so"
    assert lib.exists()
    if shutil.which("ldd"):
        deps = subprocess.run(["ldd", str(lib)], capture_output=True, text=True).stdout
        assert "libcuda" not in deps and "libcudart" not in deps


def test_generated_cubins_are_the_fused_step_kernel(build_dir):
    src = (build_dir / "msdda_step_kernels.c").read_text()
    assert "fused_step_kernel compiled ahead of time by Triton" in src
    assert src.count('"fused_step_kernel"') == 24
    assert "/* sm_80 " in src and "/* sm_90 " in src


def _lib(build_dir):
    lib = ctypes.CDLL(str(build_dir / "libmsdda_step.so"))
    lib.msdda_step_status_string.restype = ctypes.c_char_p
    lib.msdda_step_triton_version.restype = ctypes.c_char_p
    lib.msdda_step_version.restype = ctypes.c_uint32
    return lib


def test_abi_from_python(build_dir):
    import triton

    lib = _lib(build_dir)
    header = (REPO / "export" / "aot" / "msdda_step.h").read_text()
    major = int(header.split("#define MSDDA_STEP_VERSION_MAJOR ")[1].split()[0])
    assert lib.msdda_step_version() // 10000 == major
    assert lib.msdda_step_triton_version().decode() == triton.__version__
    archs = (ctypes.c_int * 4)()
    assert lib.msdda_step_compiled_archs(archs, 4) == 2 and list(archs[:2]) == [80, 90]
    assert lib.msdda_step_launch(None, None) == 1                      # MSDDA_STEP_ERR_INVALID_ARGUMENT
    init = lib.msdda_step_init()
    if init != 0:                                                      # no driver / no GPU here
        assert lib.msdda_step_status_string(init).decode().startswith("no CUDA")
