"""Test configuration and the fixtures several test files share.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, so it is set here, before any
kernel module is imported, unless the caller chose otherwise (a GPU run sets MSDDA_TEST_GPU=1 to test the
compiled kernels instead).

The tiny models that several files use are built once per session here. Their folders are shared, so a test
must never write into them: a test that damages or extends a model copies it first (tiny_models.damaged_copy,
perturbed_copy). Test files import helpers from tests/device.py and tests/tiny_models.py, never from this file.
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
from device import GPU  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def default_device_fixture():
    import torch

    if GPU:
        torch.set_default_device("cuda")
    yield
    if GPU:
        torch.set_default_device("cpu")


@pytest.fixture(scope="session")
def learned_variance_models(tmp_path_factory):
    """A class-conditional (11 classes), learned-range-variance DDPM base and two experts of its architecture,
    ``a`` and ``b``, whose variances differ from the base's: ``(base, {"a": path, "b": path})``."""
    from tiny_models import make_tiny_unet2d, perturbed_copy

    root = tmp_path_factory.mktemp("learned_variance")
    base = make_tiny_unet2d(root / "base", learned_variance=True, num_class_embeds=11)
    return base, {"a": perturbed_copy(base, root / "a", seed=1, scale=0.3),
                  "b": perturbed_copy(base, root / "b", seed=2, scale=0.3)}


@pytest.fixture(scope="session")
def tiny_sd_models(tmp_path_factory):
    """The tiny Stable Diffusion pipeline (DDIM, 16x16 latents) and two full-weight experts ``a`` and ``b``:
    ``(base, {"a": path, "b": path})``."""
    from tiny_models import make_tiny_sd_pipeline, perturbed_copy

    root = tmp_path_factory.mktemp("tiny_sd")
    base = make_tiny_sd_pipeline(root / "base")
    return base, {"a": perturbed_copy(base, root / "a", seed=5, scale=0.2),
                  "b": perturbed_copy(base, root / "b", seed=6, scale=0.2)}


@pytest.fixture(scope="session")
def tiny_sdxl_models(tmp_path_factory):
    """The tiny Stable Diffusion XL pipeline (DDIM, 16x16 latents, zeros for an empty prompt) and one
    full-weight expert: ``(base, expert)``."""
    from tiny_models import make_tiny_sdxl_pipeline, perturbed_copy

    root = tmp_path_factory.mktemp("tiny_sdxl")
    base = make_tiny_sdxl_pipeline(root / "base")
    return base, perturbed_copy(base, root / "expert", seed=5, scale=0.05)
