"""msdda.export.onnx: ONNX export of tiny diffusers UNets, verified in ONNX Runtime against torch.

ONNX Runtime and torch run the same float32 network with different kernels, so they agree only up to float32
rounding. Every bound on their difference here is torch's own float32 error on such inputs, measured against its
float64 twin (the same UNet converted to float64), x TWIN_MULTIPLE (tests/tolerance.py)."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from msdda.export import (DEFAULT_TOLERANCE, ArtifactCache, ExportError, export_unet_onnx, onnx_for_unet,
                          onnx_initializers, unet_export_spec)
from msdda.exporting import export_models
from tolerance import (TWIN_MULTIPLE, assert_error_below, assert_within, eps, float_error, lower_precision_bound,
                       twin_bound)

pytestmark = pytest.mark.slow   # every test exports ONNX graphs and verifies them in ONNX Runtime


@pytest.fixture(scope="module")
def pixel(learned_variance_models):
    """A class-conditional, learned-variance tiny UNet2DModel folder and an expert of the same architecture."""
    base, experts = learned_variance_models
    return base, experts["a"]


@pytest.fixture(scope="module")
def pixel_unet(pixel):
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(pixel[0] / "unet").eval()


@pytest.fixture(scope="module")
def sd(tiny_sd_models):
    return tiny_sd_models[0]


def _io(path):
    m = onnx.load(os.fspath(path), load_external_data=False)
    elem = {v: k for k, v in onnx.TensorProto.DataType.items()}

    def desc(v):
        tt = v.type.tensor_type
        return elem[tt.elem_type], [d.dim_param or d.dim_value for d in tt.shape.dim]

    return {v.name: desc(v) for v in m.graph.input}, {v.name: desc(v) for v in m.graph.output}


def _float64_twin(unet):
    """The same UNet in float64 (a copy: the caller's module is untouched)."""
    return copy.deepcopy(unet).to(torch.float64)


def _torch_outputs(unet, unet64, sample, timestep, **kwargs):
    """(float32 output, float64 twin's output) of one forward on the same (float32-valued) inputs."""
    as64 = {k: (v.double() if v.is_floating_point() else v) for k, v in kwargs.items()}
    with torch.no_grad():
        out = unet(sample, timestep, **kwargs, return_dict=False)[0]
        out64 = unet64(sample.double(), timestep.double(), **as64, return_dict=False)[0]
    return out, out64


def _twin_error(unet, cases, *, num_classes=None, text_shape=None, seed=0) -> float:
    """torch's float32 error (max |float32 - float64 twin|) on inputs drawn as the exporter draws its
    verification inputs (randn samples, integer timesteps in [0, 999], random labels or text embeddings), for
    each (N, H, W) case. export_unet_onnx records ONNX Runtime's error against torch on its own such inputs."""
    unet64 = _float64_twin(unet)
    channels = unet.config.in_channels
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for n, h, w in cases:
        kwargs = {}
        sample = torch.randn(n, channels, h, w, generator=g)
        timestep = (torch.rand(n, generator=g) * 999).round()
        if num_classes:
            kwargs["class_labels"] = torch.randint(0, num_classes, (n,), generator=g)
        if text_shape:
            kwargs["encoder_hidden_states"] = torch.randn(n, *text_shape, generator=g)
        worst = max(worst, float_error(*_torch_outputs(unet, unet64, sample, timestep, **kwargs)))
    return worst


def _ort_vs_torch(path, unet, feeds, kwargs):
    """Assert ONNX Runtime's output is within the twin bound of torch's on ``feeds``."""
    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(["out"], {k: v.numpy() for k, v in feeds.items()})[0])
    ref, ref64 = _torch_outputs(unet, _float64_twin(unet), feeds["sample"].float(), feeds["timestep"], **kwargs)
    return assert_within(got, ref, twin_bound(ref, ref64), "ORT vs torch")


def test_class_conditional_export_contract_and_agreement(tmp_path, pixel_unet):
    rec = export_unet_onnx(pixel_unet, tmp_path / "u.onnx", **unet_export_spec(pixel_unet))
    assert rec.path.is_file() and rec.verified and rec.cond == "class"
    assert (rec.rtol, rec.atol) == DEFAULT_TOLERANCE["fp32"]
    assert rec.verify_cases == ((3, 8, 8),)           # traced at N=2, verified at N=3: the batch axis is dynamic
    assert_error_below(rec.max_abs_err, TWIN_MULTIPLE * _twin_error(pixel_unet, rec.verify_cases, num_classes=11),
                       "recorded ORT error, class")
    inputs, outputs = _io(rec.path)
    assert inputs == {"sample": ("FLOAT", ["N", 1, 8, 8]), "timestep": ("FLOAT", ["N"]),
                      "class_labels": ("INT64", ["N"])}
    assert outputs == {"out": ("FLOAT", ["N", 2, 8, 8])}
    # an independent check at another batch size, with out-of-range-free labels incl. the null class
    g = torch.Generator().manual_seed(7)
    feeds = {"sample": torch.randn(5, 1, 8, 8, generator=g), "timestep": torch.tensor([0., 10., 500., 999., 3.]),
             "class_labels": torch.tensor([0, 3, 9, 10, 1])}
    _ort_vs_torch(rec.path, pixel_unet, feeds, {"class_labels": feeds["class_labels"]})
    meta = {p.key: p.value for p in onnx.load(os.fspath(rec.path), load_external_data=False).metadata_props}
    assert meta["msdda.cond"] == "class" and meta["msdda.weights_sha256"] == rec.weights_sha256


def test_text_conditional_export(tmp_path, sd):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sd / "unet").eval()
    spec = unet_export_spec(unet)
    assert spec == {"sample_shape": (4, 16, 16), "cond": "text", "text_shape": (77, 32)}
    rec = export_unet_onnx(unet, tmp_path / "sd.onnx", **spec, dynamic_hw=True)
    inputs, outputs = _io(rec.path)
    assert inputs["sample"] == ("FLOAT", ["N", 4, "H", "W"])
    assert inputs["encoder_hidden_states"] == ("FLOAT", ["N", 77, 32])
    assert outputs["out"] == ("FLOAT", ["N", 4, "H", "W"])
    assert len(rec.verify_cases) == 2 and rec.verify_cases[1][1:] == (18, 20)   # another H, W verified too
    assert_error_below(rec.max_abs_err, TWIN_MULTIPLE * _twin_error(unet, rec.verify_cases, text_shape=(77, 32)),
                       "recorded ORT error, text")


def test_fp16_export_and_static_batch(tmp_path, pixel_unet):
    before = {k: v.clone() for k, v in pixel_unet.state_dict().items()}
    pixel_unet.train()
    rec = export_unet_onnx(pixel_unet, tmp_path / "h.onnx", sample_shape=(1, 8, 8), cond="class", precision="fp16",
                           dynamic_batch=False, batch=4)
    assert pixel_unet.training and next(pixel_unet.parameters()).dtype == torch.float32   # caller's module untouched
    pixel_unet.eval()
    assert all(torch.equal(before[k], v) for k, v in pixel_unet.state_dict().items())
    inputs, outputs = _io(rec.path)
    assert inputs["sample"] == ("FLOAT16", [4, 1, 8, 8]) and inputs["timestep"] == ("FLOAT", [4])
    assert outputs["out"] == ("FLOAT16", [4, 2, 8, 8])
    assert rec.verify_cases == ((4, 8, 8),)
    # the float16 graph errs about eps(float16) / eps(float32) = 8192 x what the same float32 forward errs
    # (tolerance.lower_precision_bound)
    bound = lower_precision_bound(_twin_error(pixel_unet, rec.verify_cases, num_classes=11), eps(torch.float16))
    assert_error_below(rec.max_abs_err, bound, "recorded ORT error, fp16")


def test_external_data(tmp_path, pixel_unet):
    rec = export_unet_onnx(pixel_unet, tmp_path / "ext.onnx", sample_shape=(1, 8, 8), cond="class",
                           external_data=True)
    # every float32 parameter tensor of 1 KiB or more (the exporter's size_threshold) lives in the data file;
    # the graph keeps only the small ones, so it is smaller than the weights it no longer holds
    big = sum(4 * p.numel() for p in pixel_unet.parameters() if 4 * p.numel() >= 1024)
    assert rec.external_data and (tmp_path / "ext.onnx.data").stat().st_size >= big
    assert (tmp_path / "ext.onnx").stat().st_size < big
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]   # no temporaries left


def test_failed_verification_keeps_nothing(tmp_path, pixel_unet):
    """Demanding bitwise equality makes verification fail: ONNX Runtime's kernels sum in another order than
    torch's, so of the 384 outputs some differ in the last bits (measured: max 8e-7)."""
    target = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="differs from torch") as info:
        export_unet_onnx(pixel_unet, target, sample_shape=(1, 8, 8), cond="class", rtol=0.0, atol=0.0)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(opset=13), "opset must be an integer >= 17"),
    (dict(precision="int8"), "precision"),
    (dict(cond="image"), "cond must be"),
    (dict(sample_shape=(1, 8)), "sample_shape"),
    (dict(sample_shape=(3, 8, 8)), "in_channels"),
    (dict(cond="text", text_shape=(77, 32)), "needs a text-conditioned UNet2DConditionModel"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, pixel_unet, kwargs, match):
    args = dict(sample_shape=(1, 8, 8), cond="class") | kwargs
    with pytest.raises(ExportError, match=match) as info:
        export_unet_onnx(pixel_unet, tmp_path / "x.onnx", **args)
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)
    assert not (tmp_path / "x.onnx").exists()


def test_experts_export_to_the_same_graph(tmp_path, pixel):
    """One initializer per parameter (no by-value de-duplication): a base with untrained (equal-valued) biases
    and a perturbed expert export identical initializer names and shapes, which TensorRT refit relies on."""
    from diffusers import UNet2DModel

    a = UNet2DModel.from_pretrained(pixel[0] / "unet")
    b = UNet2DModel.from_pretrained(pixel[1] / "unet")
    pa = export_unet_onnx(a, tmp_path / "a.onnx", **unet_export_spec(a)).path
    pb = export_unet_onnx(b, tmp_path / "b.onnx", **unet_export_spec(b)).path
    wa, wb = onnx_initializers(pa), onnx_initializers(pb)
    assert {k: v.shape for k, v in wa.items()} == {k: v.shape for k, v in wb.items()}
    ma = onnx.load(os.fspath(pa))
    mb = onnx.load(os.fspath(pb))
    assert [n.op_type for n in ma.graph.node] == [n.op_type for n in mb.graph.node]
    assert any(not np.array_equal(wa[k], wb[k]) for k in wa)


def test_onnx_for_unet_reuses_the_cache(tmp_path, pixel_unet, monkeypatch):
    cache = ArtifactCache(tmp_path / "cache")
    spec = unet_export_spec(pixel_unet)
    p1 = onnx_for_unet(pixel_unet, cache=cache, **spec)
    import msdda.export.onnx as mod

    def boom(*a, **k):
        raise AssertionError("exported again despite a valid cached artifact")

    monkeypatch.setattr(mod, "export_unet_onnx", boom)
    assert onnx_for_unet(pixel_unet, cache=cache, **spec) == p1
    entry = cache.read_manifest()["artifacts"]
    assert len(entry) == 1 and next(iter(entry.values()))["file"].endswith("unet.onnx")


def test_export_pipeline_writes_manifest(tmp_path, pixel):
    base, expert = pixel
    manifest = export_models(base, {"sharp": expert}, tmp_path / "out")
    assert manifest["members"] == ["base", "sharp"] and manifest["cond"] == "class"
    assert manifest["inputs"] == {"sample": ["N", 1, 8, 8], "timestep": ["N"], "class_labels": ["N"]}
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["models"]["sharp"]["file"] == "sharp.onnx"
    from diffusers import UNet2DModel

    for name, m in on_disk["models"].items():
        assert (tmp_path / "out" / m["file"]).stat().st_size == m["size"]
        unet = UNet2DModel.from_pretrained((base if name == "base" else expert) / "unet").eval()
        assert_error_below(m["max_abs_err"], TWIN_MULTIPLE * _twin_error(unet, [(3, 8, 8)], num_classes=11),
                           f"recorded ORT error, {name}")
        meta = {p.key: p.value for p in onnx.load(str(tmp_path / "out" / m["file"])).metadata_props}
        assert meta["msdda.weights_sha256"] == m["weights_sha256"]          # the tag travels inside the file
        assert meta["msdda.exporter"].startswith("msdda ")


@pytest.mark.parametrize("case", ["missing_base", "missing_expert", "bad_name", "no_base"])
def test_pipeline_bad_input(tmp_path, pixel, case):
    base, expert = pixel
    with pytest.raises(ExportError) as info:
        if case == "missing_base":
            export_models(tmp_path / "nope", {}, tmp_path / "out")
        elif case == "missing_expert":
            export_models(base, {"x": tmp_path / "nope"}, tmp_path / "out")
        elif case == "bad_name":
            export_models(base, {"base": expert}, tmp_path / "out")
        else:
            export_models(None, {"x": expert}, tmp_path / "out")
    msg = str(info.value)
    assert "\n" not in msg and msg
    if case.startswith("missing"):
        assert "not found" in msg
    if case == "bad_name":
        assert "bad expert name 'base'" in msg
    assert not (tmp_path / "out").exists()


def test_zoo_export(tmp_path):
    """``msdda export`` with no models exports the embedded zoo's base and single-objective experts."""
    from msdda import cli
    from msdda.zoo import OBJECTIVES

    assert cli.main(["export", "--out", str(tmp_path / "zoo")]) == 0
    manifest = json.loads((tmp_path / "zoo" / "manifest.json").read_text())
    assert manifest["members"] == ["base", *OBJECTIVES]
    from diffusers import UNet2DModel

    from msdda.zoo import zoo_paths

    paths = dict(zoo_paths())
    for name, m in manifest["models"].items():
        unet = UNet2DModel.from_pretrained(Path(paths[name]) / "unet").eval()
        cases = [(3, *manifest["sample_shape"][1:])]
        bound = TWIN_MULTIPLE * _twin_error(unet, cases, num_classes=unet.config.num_class_embeds)
        assert_error_below(m["max_abs_err"], bound, f"recorded ORT error, zoo {name}")
