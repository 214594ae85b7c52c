"""Test configuration and the fixtures several test files share.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, so it is set here, before any
kernel module is imported, unless the caller chose otherwise (a GPU run sets MSDDA_TEST_GPU=1 to test the
compiled kernels instead).

The tiny models that several files use are built once per session here. Their folders are shared, so a test
must never write into them: a test that damages or extends a model copies it first (tiny_models.damaged_copy,
perturbed_copy). Test files import helpers from tests/device.py and tests/tiny_models.py, never from this file.

The suite runs on pytest-xdist workers (pyproject's addopts: ``-n auto``), one per core. Each test file is one
work unit (pytest_xdist_make_scheduler below), so its module-scoped fixtures are built once, on one worker; the
files that start Ray (RAY_GROUP) form one unit, so two local Ray clusters never run at once and the servers' timing
checks share the machine with one test worker, not with another Ray. ``-n 0`` runs everything in this process.
"""
import os
from pathlib import Path

if os.environ.get("MSDDA_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# CLI progress lines (msdda.progress) only where a test asks for them: a loaded CI machine can make a tiny run
# slow enough to print them, and many tests check that a command's stderr is empty or one error line.
os.environ.setdefault("MSDDA_PROGRESS_AFTER_S", "inf")
# One OpenMP thread per process, set before torch is imported. The tests' models are tiny, so an intra-op thread
# pool buys nothing (seven of the heaviest in-process modules: 98.8 s with one thread, 96.5 s with two), while
# workers, servers and documentation blocks running side by side with two threads each oversubscribe the cores,
# and an oversubscribed OpenMP barrier spins. Tests that need a thread count (servers' --num-cpus, the thread
# tests) set their own; subprocesses inherit this one.
os.environ.setdefault("OMP_NUM_THREADS", "1")


import pytest  # noqa: E402

# MSDDA_TEST_GPU=1: the kernel tests run on CUDA tensors, i.e. on the compiled kernels.
from device import GPU  # noqa: E402


# The test files that start a local Ray (or a server that starts one): one scheduling group, run one after another.
RAY_GROUP = frozenset({"test_batch", "test_multinode", "test_ray_lifecycle", "test_serve", "test_serve_app_builder",
                       "test_serve_scheduler"})


def scheduling_group(nodeid: str) -> str:
    """The xdist work unit a test belongs to: the Ray files together, each documentation file's blocks alone
    (independent processes, so they spread over the workers), every other test with the rest of its file (so
    its module-scoped fixtures are built once)."""
    module = nodeid.split("::", 1)[0]
    stem = Path(module).stem
    if stem in RAY_GROUP:
        return "ray"
    return nodeid if stem == "test_docs" else module


def pytest_xdist_make_scheduler(config, log):
    # xdist 3.8's own --dist loadgroup appends a group to item._nodeid, which pytest 9.2 no longer reads (a node's
    # id is item._id), so its groups had no effect here; a scheduler that splits the work by scheduling_group does
    # the same through xdist's hook. Only for the default distribution (what -n picks): an explicit --dist mode is
    # left to xdist.
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scheduling_group(nodeid)

    return GroupScheduling(config, log)


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
