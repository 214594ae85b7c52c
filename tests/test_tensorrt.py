"""msdda.export.tensorrt and the TensorRT backend.

GPU-free everywhere: profile/shape derivation from the ONNX graph, engine cache keys, refit weight matching (on
real exports of two experts), the backend's one-line error without tensorrt. Tests that need tensorrt itself
(and a GPU) use pytest.importorskip("tensorrt").
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from msdda.export import ExportError, export_unet_onnx, onnx_initializers, unet_export_spec, weights_hash
from msdda.export.tensorrt import (ShapeProfile, TensorRTUnavailable, derive_profile, match_refit_weights,
                                   normalize_weight_name, onnx_io, tensorrt_cache_key)
from tolerance import assert_differ, assert_within, float_error, lower_precision_bound

pytestmark = pytest.mark.slow   # the module builds ONNX graphs of its test UNets


@pytest.fixture(scope="module")
def graphs(tmp_path_factory, learned_variance_models):
    """ONNX exports of a base and an expert (class-conditional), plus a dynamic-H/W export of the base."""
    from diffusers import UNet2DModel

    root = tmp_path_factory.mktemp("trt")
    base, expert = learned_variance_models[0], learned_variance_models[1]["a"]
    a = UNet2DModel.from_pretrained(base / "unet")
    b = UNet2DModel.from_pretrained(expert / "unet")
    spec = unet_export_spec(a)
    return {"base": export_unet_onnx(a, root / "base.onnx", **spec).path,
            "expert": export_unet_onnx(b, root / "expert.onnx", **spec).path,
            "hw": export_unet_onnx(a, root / "hw.onnx", **spec, dynamic_hw=True, verify=False).path,
            "weights": {"base": weights_hash(a), "expert": weights_hash(b)}, "spec": spec,
            "folders": {"base": base, "expert": expert}}


# ------------------------------------------------------------------------------------------ shapes and profiles
def test_onnx_io_reads_the_contract(graphs):
    inputs, outputs = onnx_io(graphs["base"])
    assert {n: (s.dtype, s.shape) for n, s in inputs.items()} == {
        "sample": ("float32", ("N", 1, 8, 8)), "timestep": ("float32", ("N",)), "class_labels": ("int64", ("N",))}
    assert outputs["out"].shape == ("N", 2, 8, 8)


def test_static_profile_by_default(graphs):
    p = derive_profile(graphs["base"], batch=4)
    assert p.is_static
    assert p.shapes["sample"] == ((4, 1, 8, 8),) * 3
    assert p.shapes["timestep"] == ((4,),) * 3 and p.shapes["class_labels"] == ((4,),) * 3
    assert p.opt("sample") == (4, 1, 8, 8)


def test_dynamic_profile_on_request(graphs):
    p = derive_profile(graphs["base"], batch=4, dynamic=True)
    assert not p.is_static
    assert p.shapes["sample"] == ((1, 1, 8, 8), (4, 1, 8, 8), (8, 1, 8, 8))
    p = derive_profile(graphs["base"], batch=2, dynamic=True, batch_range=(2, 16))
    assert p.shapes["class_labels"] == ((2,), (2,), (16,))
    with pytest.raises(ExportError, match="outside batch_range"):
        derive_profile(graphs["base"], batch=32, dynamic=True, batch_range=(1, 16))


def test_dynamic_hw_profile(graphs):
    with pytest.raises(ExportError, match="dynamic H/W"):
        derive_profile(graphs["hw"], batch=2)
    p = derive_profile(graphs["hw"], batch=2, hw=(8, 8))
    assert p.is_static and p.shapes["sample"][0] == (2, 1, 8, 8)
    p = derive_profile(graphs["hw"], batch=2, hw=(16, 16), dynamic=True, hw_range=((8, 8), (32, 24)))
    assert p.shapes["sample"] == ((1, 1, 8, 8), (2, 1, 16, 16), (4, 1, 32, 24))


def test_unknown_dynamic_dims_are_refused():
    from msdda.export.tensorrt import TensorSpec

    with pytest.raises(ExportError, match="dynamic dims"):
        derive_profile({"x": TensorSpec("x", "float32", ("batch", 3))}, batch=1)


# ------------------------------------------------------------------------------------------ cache keys
def test_engine_cache_key(graphs):
    p = derive_profile(graphs["base"], batch=2)
    k = tensorrt_cache_key(graphs["base"], profile=p, compute_capability="sm_90", tensorrt_version="10.9.0")
    same = tensorrt_cache_key(graphs["base"], profile=p, compute_capability="sm_90", tensorrt_version="10.9.0")
    assert k.digest == same.digest and k.kind == "tensorrt" and k.filename == "unet.plan"
    others = [
        tensorrt_cache_key(graphs["base"], profile=p, compute_capability="sm_80", tensorrt_version="10.9.0"),
        tensorrt_cache_key(graphs["base"], profile=p, compute_capability="sm_90", tensorrt_version="10.10.0"),
        tensorrt_cache_key(graphs["expert"], profile=p, compute_capability="sm_90", tensorrt_version="10.9.0"),
        tensorrt_cache_key(graphs["base"], profile=derive_profile(graphs["base"], batch=4),
                           compute_capability="sm_90", tensorrt_version="10.9.0"),
        tensorrt_cache_key(graphs["base"], profile=p, precision="bf16", compute_capability="sm_90",
                           tensorrt_version="10.9.0"),
        tensorrt_cache_key(graphs["base"], profile=p, refit="refit", compute_capability="sm_90",
                           tensorrt_version="10.9.0"),
    ]
    assert len({k.digest, *(o.digest for o in others)}) == 1 + len(others)
    with pytest.raises(ExportError, match="precision"):
        tensorrt_cache_key(graphs["base"], profile=p, precision="int4", compute_capability="sm_90")


# ------------------------------------------------------------------------------------------ refit matching
def test_refit_matching_between_two_experts(graphs):
    """Every initializer of the expert's graph feeds the same-named weight of an engine built from the base."""
    base, expert = onnx_initializers(graphs["base"]), onnx_initializers(graphs["expert"])
    refittable = list(base)               # TensorRT names refittable weights after the ONNX initializers
    mapping = match_refit_weights(expert, refittable, shapes={k: v.shape for k, v in base.items()})
    assert mapping == {k: k for k in refittable}
    assert any(k.startswith("unet.") for k in mapping) and any(k.startswith("onnx::") for k in mapping)


def test_refit_matching_rules():
    onnx_w = {"unet.conv_in.weight": torch.zeros(4, 1, 3, 3), "unet.conv_in.bias": torch.zeros(4),
              "onnx::MatMul_12": torch.zeros(8, 8)}
    # exact, then prefix-normalised (a torch state dict has no "unet." prefix)
    assert match_refit_weights(onnx_w, ["unet.conv_in.weight", "onnx::MatMul_12"]) == {
        "unet.conv_in.weight": "unet.conv_in.weight", "onnx::MatMul_12": "onnx::MatMul_12"}
    state = {"conv_in.weight": torch.zeros(4, 1, 3, 3), "conv_in.bias": torch.zeros(4)}
    assert match_refit_weights(state, ["unet.conv_in.weight", "unet.conv_in.bias"]) == {
        "unet.conv_in.weight": "conv_in.weight", "unet.conv_in.bias": "conv_in.bias"}
    # an unmatched refittable weight would keep the old expert's values: refused unless strict=False
    with pytest.raises(ExportError, match="1 engine weights have no source") as info:
        match_refit_weights(state, ["unet.conv_in.weight", "onnx::MatMul_99"])
    assert "\n" not in str(info.value)
    assert match_refit_weights(state, ["unet.conv_in.weight", "onnx::MatMul_99"], strict=False) == {
        "unet.conv_in.weight": "conv_in.weight"}
    # sizes are checked when known (element counts, as TensorRT's weight prototypes give them)
    with pytest.raises(ExportError, match="differ in size"):
        match_refit_weights(state, ["unet.conv_in.bias"], shapes={"unet.conv_in.bias": 5})
    assert match_refit_weights(state, ["unet.conv_in.bias"], shapes={"unet.conv_in.bias": (4,)})
    # ambiguity (two sources normalise to one name) is not guessed
    with pytest.raises(ExportError, match="no source"):
        match_refit_weights({"unet.a": 1, "model.a": 2}, ["module.a"])
    assert normalize_weight_name("unet.down_blocks.0.weight") == "down_blocks.0.weight"


# ------------------------------------------------------------------------------------------ without tensorrt
def test_backend_without_tensorrt_is_a_one_line_error():
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    from msdda.backends import make_backend

    with pytest.raises(TensorRTUnavailable, match="TensorRT is not available") as info:
        make_backend("tensorrt", {"base": torch.nn.Linear(1, 1)})
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)
    from msdda.export.tensorrt import build_engine

    with pytest.raises(TensorRTUnavailable):
        build_engine("x.onnx", profile=ShapeProfile({}))


# ------------------------------------------------------------------------------------------ with tensorrt (GPU)
def test_build_refit_and_run_engines(graphs, nets, tmp_path):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    import onnxruntime as ort

    from msdda.export import ArtifactCache
    from msdda.export.tensorrt import deserialize, engine_for_onnx, refit_engine

    cache = ArtifactCache(tmp_path / "cache")
    profile = derive_profile(graphs["base"], batch=2)
    plan_path = engine_for_onnx(graphs["base"], cache=cache, profile=profile, precision="fp32", refit="refit")
    assert any((tmp_path / "cache" / "tensorrt").glob("timing-*.cache"))
    refitted = refit_engine(plan_path.read_bytes(), graphs["expert"])
    engine = deserialize(refitted)
    ctx = engine.create_execution_context()
    g = torch.Generator().manual_seed(0)
    feeds = {"sample": torch.randn(2, 1, 8, 8, generator=g), "timestep": torch.tensor([10.0, 900.0]),
             "class_labels": torch.tensor([1, 10])}
    dev = {k: v.cuda() for k, v in feeds.items()}
    out = torch.empty(2, 2, 8, 8, device="cuda")
    for k, v in dev.items():
        ctx.set_tensor_address(k, v.data_ptr())
    ctx.set_tensor_address("out", out.data_ptr())
    assert ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    ref = torch.from_numpy(ort.InferenceSession(str(graphs["expert"])).run(["out"], {k: v.numpy() for k, v in
                                                                                   feeds.items()})[0])
    # TensorRT may run an fp32 build in TF32 (10-bit mantissa, eps 2^-10): the bound is the float32 twin error of
    # the same forward (torch float32 vs float64) scaled to TF32's epsilon (tolerance.lower_precision_bound)
    expert, expert64 = _torch_out(nets["expert"], feeds["sample"], 0, feeds["class_labels"], feeds["timestep"],
                                  twin=True)
    tol = lower_precision_bound(float_error(expert, expert64), 2.0 ** -10)
    assert_within(out.cpu(), ref, tol, "refitted TensorRT engine vs ORT expert")
    # the expert's weights, not the base's: the base's output is far outside that tolerance
    base = _torch_out(nets["base"], feeds["sample"], 0, feeds["class_labels"], feeds["timestep"])
    assert_differ(out.cpu(), base, tol, "refitted engine vs base")


# ------------------------------------------------------------------------------------------ bench/gpu_check.py
def test_gpu_check_exits_cleanly_without_a_gpu(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bench/gpu_check.py would run the real checks")
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    res = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "r.json")], capture_output=True,
                         text=True, timeout=120, env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0, res.stderr
    assert "no CUDA GPU is visible" in res.stdout and "nothing to check" in res.stdout
    assert not (tmp_path / "r.json").exists() and res.stderr == ""


# ------------------------------------------------------------------------------------------ backend logic (test double)
class _FakeEngine:
    """Stands in for an ICudaEngine: its "plan" is the ONNX graph's bytes; it runs the graph in ONNX Runtime on
    host memory at the bound addresses. Refit rewrites the graph's initializers; serialize returns the graph.
    Each new engine asks for more scratch memory than the last, unless ``memory_override`` is set."""
    memory_override = None

    def __init__(self, plan: bytes, index: int):
        import onnx

        self.model = onnx.load_from_string(plan)
        inputs, outputs = onnx_io(self.model)
        self.specs = {**inputs, **outputs}
        self.inputs, self.output = list(inputs), next(iter(outputs))
        self.device_memory_size_v2 = self.memory_override or 4096 * (index + 1)
        self.num_io_tensors = len(self.specs)
        self._session()

    def _session(self):
        import onnxruntime as ort

        self.session = ort.InferenceSession(self.model.SerializeToString(), providers=["CPUExecutionProvider"])

    def refit(self, weights) -> int:
        from onnx import numpy_helper

        mapping = match_refit_weights(weights, [t.name for t in self.model.graph.initializer])
        for t in self.model.graph.initializer:
            t.CopyFrom(numpy_helper.from_array(np.asarray(weights[mapping[t.name]]).astype(
                numpy_helper.to_array(t).dtype), t.name))
        self._session()
        return len(mapping)

    def serialize(self) -> bytes:
        return self.model.SerializeToString()

    def get_tensor_name(self, i):
        return [*self.inputs, self.output][i]

    def get_tensor_mode(self, name):
        return _FakeTRT.TensorIOMode.INPUT if name in self.inputs else _FakeTRT.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return np.dtype(self.specs[name].dtype)

    def create_execution_context(self, strategy):
        assert strategy == _FakeTRT.ExecutionContextAllocationStrategy.USER_MANAGED
        return _FakeContext(self)


class _FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.memory = engine, {}, {}, None

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)

    def get_tensor_shape(self, name):
        n = self.shapes["sample"][0]
        return tuple(n if isinstance(d, str) else d for d in self.engine.specs[name].shape)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def set_device_memory(self, ptr, size):
        self.memory = (ptr, size)

    def _array(self, name, shape):
        import ctypes

        dtype = np.dtype(self.engine.specs[name].dtype)
        count = int(np.prod(shape))
        buf = (ctypes.c_byte * (count * dtype.itemsize)).from_address(self.addresses[name])
        return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)

    def execute_async_v3(self, stream_handle):
        assert self.memory is not None and self.memory[1] >= self.engine.device_memory_size_v2
        feeds = {n: self._array(n, self.shapes[n]).copy() for n in self.engine.inputs}
        out = self.engine.session.run([self.engine.output], feeds)[0]
        self._array(self.engine.output, out.shape)[...] = out
        return True


class _FakeTRT:
    MSDDA_TEST_DOUBLE = True
    __version__ = "10.0-test-double"
    bfloat16 = object()

    class TensorIOMode:
        INPUT, OUTPUT = "input", "output"

    class ExecutionContextAllocationStrategy:
        USER_MANAGED = "user-managed"

    @staticmethod
    def nptype(dt):
        return dt


class _Calls:
    """What the test double was asked to do: TensorRT builds, refits, and every engine still alive."""

    def __init__(self):
        import weakref

        self.builds, self.refits, self.alive = [], [], weakref.WeakSet()


@pytest.fixture
def fake_trt(monkeypatch):
    """msdda.export.tensorrt's TensorRT calls replaced by the test double (everything else, the artifact cache,
    plan headers, refits through the cache and the backend, is the real code)."""
    import msdda.export.tensorrt as T

    calls, counter = _Calls(), iter(range(10_000))

    def build_engine(onnx_path, *, profile, precision="fp16", timing_cache=None, refit="none", **kw):
        import json

        import onnx

        calls.builds.append((str(onnx_path), refit, profile.as_dict()))
        model = onnx.load(str(onnx_path))          # the "plan": the graph, marked with what it was built for
        model.metadata_props.add(key="test.build", value=json.dumps([profile.as_dict(), precision, refit]))
        return model.SerializeToString()

    def deserialize(plan, logger=None):
        engine = _FakeEngine(plan, next(counter))
        calls.alive.add(engine)
        return engine

    def refit_cuda_engine(engine, weights, **kw):
        calls.refits.append(len(weights))
        return engine.refit(weights)

    monkeypatch.setattr(T, "require_tensorrt", lambda: _FakeTRT)
    monkeypatch.setattr(T, "compute_capability", lambda device=None: "sm_test")
    monkeypatch.setattr(T, "build_engine", build_engine)
    monkeypatch.setattr(T, "deserialize", deserialize)
    monkeypatch.setattr(T, "refit_cuda_engine", refit_cuda_engine)
    return calls


def _plans(graphs, cache, members=("base", "expert"), **kw):
    from msdda.export import onnx_set
    from msdda.export.tensorrt import EnginePlans

    spec = graphs["spec"]
    onnx = onnx_set({m: graphs[m] for m in members}, graphs["weights"], cache=cache, spec=spec)
    return EnginePlans(onnx, **kw)


@pytest.fixture(scope="module")
def nets(graphs):
    from diffusers import UNet2DModel

    return {name: UNet2DModel.from_pretrained(folder / "unet").eval() for name, folder in graphs["folders"].items()}


def _torch_out(net, x, t, labels, timesteps=None, *, twin=False):
    """net's output at timestep t (or per-sample ``timesteps``); twin=True: (output, float64 twin's output)."""
    timesteps = torch.full((x.shape[0],), float(t)) if timesteps is None else timesteps
    with torch.no_grad():
        return net(x, torch.full((x.shape[0],), float(t), dtype=x.dtype), class_labels=labels, return_dict=False)[0]


def _assert_matches_torch(got, net, x, t, labels):
    """``got`` (the stand-in's engines: ONNX Runtime, float32) against ``net`` run in float64. Allowed error: the
    module's own float32-vs-float64 error on these inputs (ONNX Runtime orders the same float32 operations
    differently, hence a factor of 8; measured: about 1.1) plus float32 rounding of the largest value."""
    import copy

    ref64 = _torch_out(copy.deepcopy(net).double(), x.double(), t, labels)
    err32 = (_torch_out(net, x, t, labels).double() - ref64).abs().max().item()
    bound = 8 * err32 + 4 * torch.finfo(torch.float32).eps * ref64.abs().max().item()
    err = (got.double() - ref64).abs().max().item()
    assert err <= bound, f"max |got - float64 reference| = {err:.3g} > {bound:.3g}"


def test_backend_logic_with_a_tensorrt_test_double(fake_trt, graphs, nets, tmp_path):
    from msdda.backends import Conditioning
    from msdda.backends.tensorrt_backend import TensorRTBackend

    be = TensorRTBackend(_plans(graphs, tmp_path / "c"), device="cpu", batch=2)
    assert be.members == ("base", "expert") and be.refit == "refit" and be.dtype == torch.float32
    assert len(fake_trt.builds) == 1 and fake_trt.builds[0][1] == "refit"   # ONE build; the expert is refitted
    assert len(fake_trt.refits) == 1
    assert fake_trt.builds[0][2]["sample"] == [[2, 1, 8, 8]] * 3            # static profile at the given batch
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 8, 8, generator=g)
    labels = torch.tensor([4, 10])
    cond = Conditioning(class_labels=labels)
    out = be.forward(x, 321, cond, (0, 1))
    assert out.shape == (2, 2, 2, 8, 8)
    # the engines run each network's ONNX graph (ONNX Runtime in the test double): float32 kernels other than
    # torch's, so the bound is torch's float32 error (float64 twin) x TWIN_MULTIPLE
    refs = {name: _torch_out(nets[name], x, 321, labels, twin=True) for name in be.members}
    for k, name in enumerate(be.members):
        _assert_matches_torch(out[k], nets[name], x, 321, labels)
    # the same engine on the same input (selection and order are only which engines run, into which slot): exact
    torch.testing.assert_close(be.forward(x, 321, cond, (1,))[0], out[1], atol=0, rtol=0)
    torch.testing.assert_close(be.forward(x, 321, cond, (1, 0)), out.flip(0), atol=0, rtol=0)
    es = be._sets[2]
    assert {c.memory for c in es.contexts} == {(be._scratch.data_ptr(), be.scratch_bytes)}   # one shared scratch
    assert be.scratch_bytes == max(e.device_memory_size_v2 for e in es.engines)
    out_buf = es.out.data_ptr()
    assert out.data_ptr() != out_buf                                    # callers never hold the engines' buffer
    # another batch size: another (static) engine set, built on first use, sharing the scratch
    x3 = torch.randn(3, 1, 8, 8, generator=g)
    out3 = be.forward(x3, 5, Conditioning(class_labels=torch.tensor([1, 2, 3])), (0, 1))
    _assert_matches_torch(out3[1], nets["expert"], x3, 5, torch.tensor([1, 2, 3]))
    assert len(fake_trt.builds) == 2 and len(fake_trt.refits) == 2 and set(be._sets) == {2, 3}
    assert all(c.memory[0] == be._scratch.data_ptr() for s in be._sets.values() for c in s.contexts)
    with pytest.raises(ValueError, match="class_labels"):
        be.forward(x, 1, Conditioning(), (0,))


def test_soup_and_graphed_sampler_with_the_test_double(fake_trt, graphs, nets, tmp_path):
    import copy
    import json

    from msdda import schedule as sch
    from msdda.backends import Conditioning
    from msdda.backends.tensorrt_backend import TensorRTBackend
    from msdda.kernels import fused_expert_step

    be = TensorRTBackend(_plans(graphs, tmp_path / "c"), device="cpu", batch=2)
    # soup: parameters 0.3 base + 0.7 expert, by refitting with the mixed initializers
    soup = copy.deepcopy(nets["base"])
    sb, se = nets["base"].state_dict(), nets["expert"].state_dict()
    soup.load_state_dict({k: 0.3 * sb[k] + 0.7 * se[k] if sb[k].is_floating_point() else sb[k] for k in sb})
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 7])
    got = be.soup({0: 0.3, 1: 0.7})(x, 99, Conditioning(class_labels=labels))
    _assert_matches_torch(got[0], soup, x, 99, labels)

    # the graphed loop (CFG, Philox noise, deferred validation) equals the eager loop step for step
    sched_cfg = json.loads((graphs["folders"]["base"] / "scheduler" / "scheduler_config.json").read_text())
    timesteps, scalars = sch.step_plan(sch.schedule_from_diffusers_config(sched_cfg), 3, kind="ddpm")
    B = 1
    cond = Conditioning(class_labels=torch.tensor([10, 3]))            # unconditional half first
    coeff = torch.tensor([[0.4, 0.6]])
    seeds = torch.tensor([42], dtype=torch.int64)
    x_T = torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    xt = x_T.clone()
    for i, (t, sc) in enumerate(zip(timesteps, scalars)):
        raw = be.forward(torch.cat([xt, xt]), t, cond, (0, 1)).unflatten(1, (2, B))
        xt = fused_expert_step(raw, xt, coeff, sc, guidance_scale=2.0, seed=seeds, offset=1 + i)
    sampler = be.graphed_sampler(batch=B, cfg=True)
    x0, errors = sampler.run(x_T, timesteps, scalars, coeff=coeff, seeds=seeds, cond=cond, guidance_scale=2.0)
    # exact: the "graphs" run the same engines on the same batch of 2B rows and the same fused step with the same
    # arguments (validation deferred to error_count changes no arithmetic)
    torch.testing.assert_close(x0, xt, atol=0, rtol=0)
    assert int(errors) == 0
    x0b, _ = sampler.run(x_T, timesteps, scalars, coeff=coeff, seeds=seeds, cond=cond, guidance_scale=2.0)
    torch.testing.assert_close(x0b, x0, atol=0, rtol=0)                 # replayed "graphs": same result
    assert len(sampler._graphs) == 1


# ------------------------------------------------------------------------------------------ plans are what they claim
def test_plan_files_carry_their_weights_sha256(fake_trt, graphs, tmp_path):
    from msdda.export.artifacts import WEIGHTS_KEY, read_plan
    from msdda.hashing import file_sha256

    plans = _plans(graphs, tmp_path / "c")
    profile, paths = plans.plans(2)
    assert plans.refit == "refit" and len(paths) == 2 and paths[0] != paths[1]
    for name, path in zip(plans.members, paths):
        meta, blob = read_plan(path)
        assert meta[WEIGHTS_KEY] == graphs["weights"][name] and meta["msdda.refit"] == "refit"
        assert blob[:4] != b"MSDD"                                          # TensorRT's plan follows the header
    assert read_plan(paths[1])[0]["msdda.refit_of"] == file_sha256(paths[0])
    assert plans.plans(2)[1] == paths and len(fake_trt.builds) == 1 and len(fake_trt.refits) == 1   # cached


def _match_manifest(cache, path) -> None:
    """Edit the cache manifest so that its record of ``path`` (size, sha256) matches the file as it is now."""
    import json

    from msdda.hashing import file_sha256

    manifest = json.loads((cache / "manifest.json").read_text())
    (entry,) = [e for e in manifest["artifacts"].values() if cache / e["file"] == path]
    meta = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    entry.update(meta)
    entry["files"][path.name] = meta
    (cache / "manifest.json").write_text(json.dumps(manifest))


def test_swapped_cached_plans_with_a_matching_manifest_are_rebuilt(fake_trt, graphs, nets, tmp_path):
    """The base's and the expert's cached plans swapped, and the cache manifest edited to match: only the plans'
    own headers tell, and the next backend rebuilds both instead of running the base with the expert's weights."""
    from msdda.backends import Conditioning
    from msdda.backends.tensorrt_backend import TensorRTBackend
    from msdda.export.artifacts import WEIGHTS_KEY, read_plan

    cache = tmp_path / "c"
    _, (p_base, p_expert) = _plans(graphs, cache).plans(2)
    blob = p_base.read_bytes()
    p_base.write_bytes(p_expert.read_bytes())
    p_expert.write_bytes(blob)
    _match_manifest(cache, p_base)
    _match_manifest(cache, p_expert)
    builds = len(fake_trt.builds)

    be = TensorRTBackend(_plans(graphs, cache), device="cpu", batch=2)
    assert len(fake_trt.builds) == builds + 1                              # the refittable engine, built again
    assert read_plan(p_base)[0][WEIGHTS_KEY] == graphs["weights"]["base"]
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([2, 5])
    out = be.forward(x, 250, Conditioning(class_labels=labels), (0, 1))
    for k, name in enumerate(be.members):
        _assert_matches_torch(out[k], nets[name], x, 250, labels)


def test_backend_refuses_a_plan_made_from_other_weights(fake_trt, graphs, tmp_path, monkeypatch):
    """The backend reads each plan's header itself: handed the expert's plan for the base, it refuses it."""
    from msdda.backends.tensorrt_backend import TensorRTBackend
    from msdda.export.artifacts import ArtifactMismatch
    from msdda.export.tensorrt import EnginePlans

    plans = _plans(graphs, tmp_path / "c")
    profile, paths = plans.plans(2)
    monkeypatch.setattr(EnginePlans, "plans", lambda self, n: (profile, paths[::-1]))
    with pytest.raises(ArtifactMismatch) as info:
        TensorRTBackend(plans, device="cpu", batch=2)
    msg = str(info.value)
    assert "\n" not in msg and "'base'" in msg
    assert graphs["weights"]["base"] in msg and graphs["weights"]["expert"] in msg


def test_plan_without_msdda_header(fake_trt, graphs, tmp_path):
    """A bare TensorRT plan (no header) is refused by a loader, and rebuilt when it is a cache entry."""
    from msdda.export.artifacts import ArtifactMismatch, read_plan

    bare = tmp_path / "bare.plan"
    bare.write_bytes(b"\x00serialized engine")
    with pytest.raises(ArtifactMismatch, match="not an msdda plan file"):
        read_plan(bare)
    cache = tmp_path / "c"
    plans = _plans(graphs, cache, members=("base",))
    assert plans.refit == "none"                                           # one graph: nothing to refit
    _, (path,) = plans.plans(2)
    path.write_bytes(read_plan(path)[1])                                   # strip the header in place
    _match_manifest(cache, path)
    builds = len(fake_trt.builds)
    _, (again,) = plans.plans(2)
    assert again == path and len(fake_trt.builds) == builds + 1 and read_plan(path)[0]


# ------------------------------------------------------------------------------------------ soups own their engines
def test_soup_engines_belong_to_the_call_not_the_backend(fake_trt, graphs, nets, tmp_path, monkeypatch):
    """TensorRT soups used to be added to the backend's engine table and never removed. Now each soup callable
    owns its engines: the backend's table and scratch do not change, and the engines are freed with the
    callable. Soups that fit the shared scratch use it; larger ones get their own."""
    import copy
    import gc

    from msdda.backends import Conditioning
    from msdda.backends.tensorrt_backend import TensorRTBackend

    be = TensorRTBackend(_plans(graphs, tmp_path / "c"), device="cpu", batch=2)
    gc.collect()
    members_alive = len(fake_trt.alive)
    assert members_alive == 2
    scratch = (be._scratch.data_ptr(), be.scratch_bytes)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = Conditioning(class_labels=torch.tensor([0, 7]))
    sb, se = nets["base"].state_dict(), nets["expert"].state_dict()
    for i, w in enumerate((0.3, 0.5, 0.3, 0.9, 0.1)):
        monkeypatch.setattr(_FakeEngine, "memory_override", 1 if i % 2 else None)   # fits the shared scratch
        net = be.soup({0: 1 - w, 1: w})
        out = net(x, 99, cond)
        soup = copy.deepcopy(nets["base"])
        soup.load_state_dict({k: (1 - w) * sb[k] + w * se[k] if sb[k].is_floating_point() else sb[k] for k in sb})
        _assert_matches_torch(out[0], soup, x, 99, cond.class_labels)
        x3, labels3 = torch.cat([x, x[:1]]), torch.tensor([0, 7, 0])
        out3 = net(x3, 99, Conditioning(class_labels=labels3))           # another batch size: another engine set
        _assert_matches_torch(out3[0], soup, x3, 99, labels3)
        assert set(be._sets) == {2}                                        # nothing added to the backend
        assert (be._scratch.data_ptr(), be.scratch_bytes) == scratch       # nor its scratch grown or moved
        del net, out, out3
        gc.collect()
        assert len(fake_trt.alive) == members_alive                        # the soup's engines are gone
    assert all(c.memory[0] == be._scratch.data_ptr() for c in be._sets[2].contexts)


def test_concurrent_soups_and_forwards_match_sequential(fake_trt, graphs, nets, tmp_path):
    from threads import run_at_once

    from msdda.backends import Conditioning
    from msdda.backends.tensorrt_backend import TensorRTBackend

    be = TensorRTBackend(_plans(graphs, tmp_path / "c"), device="cpu", batch=2)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    cond = Conditioning(class_labels=torch.tensor([1, 4]))
    jobs = [("soup", 0.2), ("forward", None), ("soup", 0.7), ("soup", 0.2), ("forward", None), ("soup", 0.5)]

    def run(kind, w):
        if kind == "forward":
            return be.forward(x, 500, cond, (0, 1))
        return be.soup({0: 1 - w, 1: w})(x, 500, cond)

    sequential = [run(*j) for j in jobs]
    results = run_at_once(run, jobs)
    for got, want in zip(results, sequential):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert set(be._sets) == {2}


# ------------------------------------------------------------------------------------------ EnginePlans (GPU-free)
def test_engine_plans_settings(graphs, tmp_path):
    from msdda.export.tensorrt import EnginePlans

    two = _plans(graphs, tmp_path / "c")
    assert two.refit == "refit" and two.members == ("base", "expert")
    assert _plans(graphs, tmp_path / "c", refit="none").refit == "none"
    assert _plans(graphs, tmp_path / "c", members=("base",)).refit == "none"
    assert two.profile(4).is_static and two.profile(4).shapes["sample"][1] == (4, 1, 8, 8)
    dyn = _plans(graphs, tmp_path / "c", dynamic=True, max_batch=16)
    assert dyn.profile(4).shapes["sample"] == ((1, 1, 8, 8), (4, 1, 8, 8), (16, 1, 8, 8))
    with pytest.raises(ExportError, match="precision"):
        _plans(graphs, tmp_path / "c", precision="int4")
    with pytest.raises(ExportError, match="refit"):
        _plans(graphs, tmp_path / "c", refit="sometimes")
    assert isinstance(two, EnginePlans)


def test_same_architecture_reads_shapes(graphs, tmp_path):
    import onnx
    from onnx import numpy_helper

    from msdda.export.tensorrt import same_architecture

    assert same_architecture([graphs["base"], graphs["expert"]])
    model = onnx.load(str(graphs["base"]))
    first = model.graph.initializer[0]
    first.CopyFrom(numpy_helper.from_array(np.zeros((3, 5), np.float32), first.name))
    onnx.save_model(model, str(tmp_path / "other.onnx"))
    assert not same_architecture([graphs["base"], tmp_path / "other.onnx"])


# ------------------------------------------------------------------------------------------ through the Engine
def test_engine_with_tensorrt_gets_its_plans_from_export(fake_trt, graphs, tmp_path):
    """Engine.from_pretrained(backend="tensorrt"): the Engine exports (cache), builds one refittable engine and
    refits the expert through msdda.export, the backend loads the plans. Every strategy agrees with the ONNX
    Runtime backend (the same graphs) at least as closely as ONNX Runtime agrees with torch."""
    import msdda

    folders = graphs["folders"]
    kw = dict(cache_dir=tmp_path / "c")
    trt = msdda.Engine.from_pretrained(folders["base"], {"expert": folders["expert"]}, backend="tensorrt", device="cpu",
                                       batch=4, **kw)
    assert trt.backend.refit == "refit" and len(fake_trt.builds) == 1 and set(trt.backend._sets) == {4}
    ort = msdda.Engine.from_pretrained(folders["base"], {"expert": folders["expert"]}, backend="onnxruntime", **kw)
    assert trt.backend.onnx_paths == ort.backend.onnx_paths          # one export, shared through the cache
    ref = msdda.Engine.from_pretrained(folders["base"], {"expert": folders["expert"]})
    # expert_betas: c = (0.4 base, 0.6 expert), so the soup really mixes two members
    gen = dict(class_labels=[1, 4], weights={"expert": 1.0}, expert_betas={"expert": 0.6}, num_images=2, steps=3,
               seed=9, guidance_scale=2.0, output_type="latent")
    for strategy in ("msdda", "mpa", "soup", "expert:expert"):
        a, b, c = (e.generate(strategy=strategy, **gen).latents for e in (trt, ort, ref))
        eps_scale = 4 * torch.finfo(torch.float32).eps * c.abs().max().item()
        assert (a - b).abs().max().item() <= (b - c).abs().max().item() + eps_scale, strategy
    assert set(trt.backend._sets) == {4}                               # the soup left nothing behind


def test_engine_with_tensorrt_refuses_before_exporting_without_it(graphs, tmp_path):
    import importlib.util

    import msdda

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    folders = graphs["folders"]
    with pytest.raises(TensorRTUnavailable):
        msdda.Engine.from_pretrained(folders["base"], {"expert": folders["expert"]}, backend="tensorrt",
                                     cache_dir=tmp_path / "c")
    assert not (tmp_path / "c" / "onnx").exists()
