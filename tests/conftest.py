"""Test configuration.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, so it is set here, before any
kernel module is imported, unless the caller chose otherwise (a GPU run sets MSDDA_TEST_GPU=1 to test the
compiled kernels instead).
"""
import os

if os.environ.get("MSDDA_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# CLI progress lines (msdda.progress) only where a test asks for them: a loaded CI machine can make a tiny run
# slow enough to print them, and many tests check that a command's stderr is empty or one error line.
os.environ.setdefault("MSDDA_PROGRESS_AFTER_S", "inf")


import pytest  # noqa: E402

# MSDDA_TEST_GPU=1: the kernel tests run on CUDA tensors, i.e. on the compiled kernels.
GPU = os.environ.get("MSDDA_TEST_GPU") == "1"
DEV = "cuda" if GPU else "cpu"


@pytest.fixture(autouse=True, scope="module")
def default_device_fixture():
    import torch

    if GPU:
        torch.set_default_device("cuda")
    yield
    if GPU:
        torch.set_default_device("cpu")
