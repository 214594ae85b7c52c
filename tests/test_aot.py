"""libmsdda_step: the CMake build (AOT Triton compile of the fused-step kernel, no GPU needed), ctest, and the
C ABI seen from Python through ctypes. The GPU half of the C test skips without a GPU (bench/gpu_check.py and
``ctest`` on a GPU machine run it)."""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed"),
              pytest.mark.slow]   # a CMake build of the C library


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


def elf_needed(path) -> list[str]:
    """The DT_NEEDED entries (the shared libraries it links) of an ELF64 little-endian file, read from its
    dynamic section: no external tool, so the check always runs."""
    data = Path(path).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path} is not a 64-bit little-endian ELF"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    # section header: name, type, flags, addr, offset, size, link, info, addralign, entsize
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    sht_dynamic, dt_needed = 6, 1
    needed = []
    for sec in sections:
        if sec[1] != sht_dynamic:
            continue
        strtab_offset = sections[sec[6]][4]                   # sh_link: the .dynstr section
        for off in range(sec[4], sec[4] + sec[5], 16):        # Elf64_Dyn: d_tag, d_val
            tag, val = struct.unpack_from("<qQ", data, off)
            if tag == 0:                                      # DT_NULL ends the table
                break
            if tag == dt_needed:
                end = data.index(b"\0", strtab_offset + val)
                needed.append(data[strtab_offset + val:end].decode())
    return needed


def test_library_links_no_cuda(build_dir):
    """The host library links no CUDA library (it loads the driver at run time, so it loads without a GPU)."""
    lib = build_dir / "libmsdda_step.so"
    needed = elf_needed(lib)
    assert any(n.startswith("libc.so") for n in needed), needed        # the parser really read the table
    cuda = re.compile(r"^lib(cuda|cudart|cublas|cudnn|cufft|curand|cusparse|cusolver|nvrtc|nvidia|nvJitLink)")
    assert not [n for n in needed if cuda.match(n)], needed
    if shutil.which("readelf"):                                        # agrees with binutils where present
        out = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
        assert sorted(needed) == sorted(line.split("[", 1)[1].split("]", 1)[0]
                                        for line in out.splitlines() if "(NEEDED)" in line)



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
