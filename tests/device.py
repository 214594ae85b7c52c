"""Which device the kernel tests run on: the CPU under the Triton interpreter, or CUDA (the compiled kernels)
when the caller sets MSDDA_TEST_GPU=1. A module of its own so that test files import it rather than conftest."""
import os

GPU = os.environ.get("MSDDA_TEST_GPU") == "1"
DEV = "cuda" if GPU else "cpu"
