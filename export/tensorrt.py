"""TensorRT 10 engines from msdda's ONNX graphs: profiles, builds, timing cache, refit.

GPU-free (tested everywhere):
- ``onnx_io(path)``: the graph's input/output names, dtypes and (symbolic) shapes, read without the weights.
- ``derive_profile(path_or_io, batch=, ...)``: min/opt/max shapes per input. Static by default (min = opt = max,
  the fastest engines); ``dynamic=True`` gives batch (and, for graphs exported with dynamic H/W, spatial)
  ranges.
- ``tensorrt_cache_key(...)``: what an engine depends on (ONNX file hashes, profile, precision, flags,
  TensorRT version, GPU compute capability).
- ``match_refit_weights(onnx_initializers, refittable_names)``: which ONNX initializer feeds which refittable
  engine weight.

Needs tensorrt (imported lazily, inside the functions):
- ``build_engine(onnx_path, profile=, precision=, timing_cache=, refit=)`` -> serialized plan bytes.
- ``engine_for_onnx(onnx_path, cache=, ...)`` -> Path of a cached, verified plan file.
- ``refitted_engine_for(plan_path, onnx_path, cache=)`` -> Path of a cached plan file: that engine refitted with
  another graph's weights.
- ``refit_engine(engine_bytes, onnx_path_or_state)`` -> refitted plan bytes; ``refit_cuda_engine`` in place.
- ``EnginePlans``: what the Engine hands the TensorRT backend: the members' ONNX graphs (an OnnxSet) and the
  build settings; ``plans(batch)`` returns one plan file per member for that batch's profile (built, or
  refitted, through the cache on first use) and ``soup(coeffs)`` the same for a soup. The backend only reads
  the files (``msdda.export.artifacts.read_plan``) and deserializes them.

Plan files are msdda's header (the weights' sha256 of the graph they were built or refitted from, the ONNX
files' sha256, precision, refit mode; ``msdda.export.artifacts``) followed by TensorRT's plan: the engine
format has no user metadata, and the header lets a loader refuse a plan made from other weights even when the
cache manifest was edited to match it.

Refit: build one engine with ``refit="refit"`` (BuilderFlag.REFIT) and load each other expert's weights of the
same architecture into a copy of it. msdda's exporter keeps one initializer per parameter (no by-value
de-duplication), so every expert's graph has the same initializer names and the match is exact.
``refit="identical"`` (BuilderFlag.REFIT_IDENTICAL) builds an engine that may only be refitted with the very
weights it was built from (used with ``strip_weights=True`` for small plan files); it cannot take another
expert's weights.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .artifacts import EXPORTER_KEY, WEIGHTS_KEY, check_weights_tag, exporter_id, onnx_metadata, pack_plan, read_plan
from .cache import (ArtifactCache, CacheKey, ExportError, atomic_write_bytes, file_lock, file_sha256, one_line,
                    runtime_versions)
from .onnx_set import OnnxSet

__all__ = ["TensorSpec", "ShapeProfile", "onnx_io", "derive_profile", "tensorrt_cache_key", "match_refit_weights",
           "normalize_weight_name", "build_engine", "engine_for_onnx", "refitted_engine_for", "refit_engine",
           "refit_cuda_engine", "deserialize", "EnginePlans", "require_tensorrt", "TensorRTUnavailable",
           "compute_capability", "onnx_files_sha256", "PRECISIONS", "REFIT_MODES"]

PRECISIONS = ("fp16", "bf16", "fp32")
REFIT_MODES = ("none", "refit", "identical")


class TensorRTUnavailable(ExportError):
    """tensorrt (or a CUDA GPU) is missing. One line."""


def require_tensorrt():
    """``import tensorrt`` (>= 10) or raise TensorRTUnavailable with a one-line reason."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or a broken install failing to load libnvinfer
        raise TensorRTUnavailable(f"TensorRT is not available ({type(exc).__name__}: {one_line(exc, 120)}); "
                                  "install msdda[tensorrt] on a machine with an NVIDIA GPU, or use "
                                  "--backend onnxruntime/torch") from None
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is too old: msdda needs TensorRT 10")
    return trt


def compute_capability(device=None) -> str:
    """'sm_90' for the current (or given) CUDA device."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("no CUDA GPU is visible: TensorRT engines need one")
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


# ---------------------------------------------------------------------------------------------- graph I/O
@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                 # numpy dtype name: "float32", "float16", "int64"
    shape: tuple               # ints for static dims, strings (dim_param) for dynamic ones


def onnx_io(path_or_model) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
    """({input name: spec}, {output name: spec}) of an ONNX graph; initializers are not inputs."""
    import onnx

    model = path_or_model
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(path_or_model), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}

    def spec(v) -> TensorSpec:
        tt = v.type.tensor_type
        dims = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or f"?{v.name}:{i}")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        return TensorSpec(v.name, dtype, tuple(dims))

    inputs = {v.name: spec(v) for v in model.graph.input if v.name not in inits}
    outputs = {v.name: spec(v) for v in model.graph.output}
    return inputs, outputs


@dataclass(frozen=True)
class ShapeProfile:
    """{input name: (min shape, opt shape, max shape)} for one TensorRT optimisation profile."""
    shapes: Mapping[str, tuple]

    @property
    def is_static(self) -> bool:
        return all(lo == opt == hi for lo, opt, hi in self.shapes.values())

    def opt(self, name: str) -> tuple:
        return tuple(self.shapes[name][1])

    def max(self, name: str) -> tuple:
        return tuple(self.shapes[name][2])

    def as_dict(self) -> dict:
        return {n: [list(s) for s in v] for n, v in sorted(self.shapes.items())}


def derive_profile(graph, *, batch: int = 1, hw: tuple[int, int] | None = None, dynamic: bool = False,
                   batch_range: tuple[int, int] | None = None,
                   hw_range: tuple[tuple[int, int], tuple[int, int]] | None = None) -> ShapeProfile:
    """An optimisation profile from the graph's input shapes.

    graph: an ONNX path/model or onnx_io(...)[0]. Static dims are kept. Symbolic dims: "N" (the batch) takes
    ``batch``; "H"/"W" take ``hw`` (required when the graph has them). ``dynamic=False`` (default) gives a static
    profile (min = opt = max). ``dynamic=True`` spans batch_range (default (1, max(batch, 2 * batch))) and, for
    dynamic H/W graphs, hw_range (default hw .. hw, i.e. spatial stays fixed unless a range is given).
    """
    inputs = graph if isinstance(graph, Mapping) else onnx_io(graph)[0]
    if not isinstance(batch, int) or batch < 1:
        raise ExportError(f"batch must be a positive integer, not {batch!r}")
    lo_b, hi_b = batch_range if batch_range else ((1, max(batch, 2 * batch)) if dynamic else (batch, batch))
    if not lo_b <= batch <= hi_b or lo_b < 1:
        raise ExportError(f"batch {batch} is outside batch_range ({lo_b}, {hi_b})")
    symbolic = {s for spec in inputs.values() for s in spec.shape if isinstance(s, str)}
    values: dict[str, tuple[int, int, int]] = {"N": (lo_b, batch, hi_b)}
    if symbolic & {"H", "W"}:
        if hw is None:
            raise ExportError("the graph has dynamic H/W: pass hw=(H, W) for the profile")
        (hl, wl), (hh, wh) = hw_range if hw_range else (tuple(hw), tuple(hw))
        if not (hl <= hw[0] <= hh and wl <= hw[1] <= wh):
            raise ExportError(f"hw {tuple(hw)} is outside hw_range {hw_range}")
        values["H"] = (hl, hw[0], hh)
        values["W"] = (wl, hw[1], wh)
    unknown = symbolic - set(values)
    if unknown:
        raise ExportError(f"cannot derive a profile for dynamic dims {sorted(unknown)}: msdda graphs use N, H, W")
    shapes = {}
    for name, spec in inputs.items():
        lo, opt, hi = [], [], []
        for d in spec.shape:
            if isinstance(d, str):
                a, b, c = values[d]
            else:
                a = b = c = d
            lo.append(a), opt.append(b), hi.append(c)
        if not dynamic:
            lo, hi = opt, opt
        shapes[name] = (tuple(lo), tuple(opt), tuple(hi))
    return ShapeProfile(shapes)


def onnx_files_sha256(onnx_path) -> str:
    """sha256 of the graph file, and of its external data file when there is one."""
    p = Path(onnx_path)
    digest = file_sha256(p)
    data = p.with_name(p.name + ".data")
    if data.exists():
        digest = f"{digest}+{file_sha256(data)}"
    return digest


def tensorrt_cache_key(onnx_path, *, profile: ShapeProfile, precision: str = "fp16", refit: str = "none",
                       strip_weights: bool = False, compute_capability: str, tensorrt_version: str | None = None,
                       options: Mapping | None = None, onnx_sha256: str | None = None) -> CacheKey:
    """The cache key of an engine: GPU-free, so it can be computed and tested anywhere."""
    if precision not in PRECISIONS:
        raise ExportError(f"TensorRT precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if refit not in REFIT_MODES:
        raise ExportError(f"refit must be one of {', '.join(REFIT_MODES)}, not {refit!r}")
    versions = runtime_versions("tensorrt")
    if tensorrt_version is not None:
        versions["tensorrt"] = tensorrt_version
    return CacheKey(kind="tensorrt", weights=onnx_sha256 or onnx_files_sha256(onnx_path), precision=precision,
                    profile={"shapes": profile.as_dict(), "refit": refit, "strip_weights": strip_weights,
                             "options": dict(options or {})},
                    versions=versions, device=compute_capability, filename="unet.plan")


# ---------------------------------------------------------------------------------------------- refit matching
_PREFIXES = ("unet.", "model.", "module.")


def normalize_weight_name(name: str) -> str:
    """A parameter name without the wrapper prefix the exporter adds (``unet.``) or common ones."""
    for p in _PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def match_refit_weights(onnx_initializers: Mapping[str, Any], refittable_names: Sequence[str], *,
                        strict: bool = True, shapes: Mapping[str, tuple] | None = None) -> dict[str, str]:
    """{refittable engine weight name: ONNX initializer (or state-dict) name}. Pure and GPU-free.

    Matching, in order: the exact name; then the name with the exporter's ``unet.`` (or ``model.``/``module.``)
    prefix removed on either side, when that is unique. With ``shapes`` ({refittable name: shape or element
    count}), a candidate whose size differs is rejected. ``strict``: raise ExportError if any refittable weight
    is unmatched (an unmatched weight would silently keep the old expert's values).
    """
    by_norm: dict[str, list[str]] = {}
    for name in onnx_initializers:
        by_norm.setdefault(normalize_weight_name(name), []).append(name)

    def size_ok(refit_name: str, onnx_name: str) -> bool:
        if not shapes or refit_name not in shapes:
            return True
        value = onnx_initializers[onnx_name]
        got = int(np.prod(getattr(value, "shape", ()), dtype=np.int64)) if hasattr(value, "shape") else None
        want = shapes[refit_name]
        want = int(np.prod(want, dtype=np.int64)) if isinstance(want, (tuple, list)) else int(want)
        return got is None or got == want

    mapping, missing, mismatched = {}, [], []
    for r in refittable_names:
        if r in onnx_initializers:
            cand = [r]
        else:
            cand = by_norm.get(normalize_weight_name(r), [])
        if len(cand) == 1 and size_ok(r, cand[0]):
            mapping[r] = cand[0]
        elif len(cand) == 1:
            mismatched.append(r)
        else:
            missing.append(r)
    if strict and (missing or mismatched):
        parts = []
        if missing:
            parts.append(f"{len(missing)} engine weights have no source ({', '.join(missing[:4])}"
                         f"{', ...' if len(missing) > 4 else ''})")
        if mismatched:
            parts.append(f"{len(mismatched)} differ in size ({', '.join(mismatched[:4])})")
        raise ExportError("cannot refit: " + "; ".join(parts) + ": the weights are not of the engine's architecture")
    return mapping


# ---------------------------------------------------------------------------------------------- builds (TensorRT)
def _logger(trt, logger=None):
    return logger or trt.Logger(trt.Logger.WARNING)


def _parse(trt, builder, onnx_path, logger):
    network = builder.create_network(0)          # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path} ({one_line(errors, 240)})")
    return network, parser


@contextlib.contextmanager
def _timing_cache(trt, config, path: Path | None):
    """Load the persisted timing cache into ``config``; merge and write it back after the build."""
    if path is None:
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = path.read_bytes() if path.exists() else b""
    cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        cache = config.create_timing_cache(b"")                    # from another TensorRT / GPU: start over
        config.set_timing_cache(cache, ignore_mismatch=False)
    yield
    with file_lock(path.with_name(path.name + ".lock")):
        merged = config.get_timing_cache()
        if path.exists():                                          # another build may have written meanwhile
            with contextlib.suppress(Exception):
                other = config.create_timing_cache(path.read_bytes())
                merged.combine(other, True)
        atomic_write_bytes(path, bytes(memoryview(merged.serialize())))


def build_engine(onnx_path, *, profile: ShapeProfile, precision: str = "fp16", timing_cache=None,
                 refit: str = "none", strip_weights: bool = False, workspace_bytes: int | None = None,
                 optimization_level: int | None = None, logger=None) -> bytes:
    """Build a serialized TensorRT engine (plan) from an ONNX graph with one optimisation profile.

    precision: "fp16" (BuilderFlag.FP16), "bf16" (BF16) or "fp32" (TF32 allowed). refit: "none", "refit"
    (REFIT: any weights of the same architecture) or "identical" (REFIT_IDENTICAL). strip_weights: STRIP_PLAN
    (weights are refitted from the ONNX at load; needs refit != "none").
    """
    trt = require_tensorrt()
    if precision not in PRECISIONS:
        raise ExportError(f"TensorRT precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if refit not in REFIT_MODES:
        raise ExportError(f"refit must be one of {', '.join(REFIT_MODES)}, not {refit!r}")
    if strip_weights and refit == "none":
        raise ExportError("strip_weights needs a refittable engine (refit='refit' or 'identical')")
    logger = _logger(trt, logger)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, onnx_path, logger)
    config = builder.create_builder_config()
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    if refit == "refit":
        config.set_flag(trt.BuilderFlag.REFIT)
    elif refit == "identical":
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
    if strip_weights:
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if optimization_level is not None:
        config.builder_optimization_level = int(optimization_level)
    opt_profile = builder.create_optimization_profile()
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(profile.shapes):
        raise ExportError(f"profile inputs {sorted(profile.shapes)} differ from the graph's {sorted(names)}")
    for name, (lo, opt, hi) in profile.shapes.items():
        opt_profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    config.add_optimization_profile(opt_profile)
    with _timing_cache(trt, config, timing_cache):
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    return bytes(memoryview(plan))


_RUNTIME: list = []        # one trt.Runtime per process, kept alive for as long as its engines


def deserialize(engine_bytes: bytes, logger=None):
    trt = require_tensorrt()
    if not _RUNTIME:
        _RUNTIME.append(trt.Runtime(_logger(trt, logger)))
    engine = _RUNTIME[0].deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise ExportError("TensorRT could not deserialize the engine (corrupt, or built by another version/GPU)")
    return engine


def default_timing_cache(cache: ArtifactCache) -> Path:
    try:
        import tensorrt as trt

        version = trt.__version__
    except Exception:
        version = "none"
    return cache.root / "tensorrt" / f"timing-{version}-{compute_capability()}.cache"


def _graph_weights(onnx_path, weights_sha256: str | None) -> str:
    """The weights tag a plan built from ``onnx_path`` carries: the graph's own (or the caller's, checked)."""
    meta = onnx_metadata(onnx_path)
    if weights_sha256 is not None:
        check_weights_tag(meta, weights_sha256, member="the engine's graph", source=onnx_path)
        return weights_sha256
    tag = meta.get(WEIGHTS_KEY)
    if not tag:
        raise ExportError(f"{onnx_path}: the graph carries no {WEIGHTS_KEY}; export it with msdda export")
    return tag


def plan_loads_with_weights(weights_sha256: str, member: str = "model"):
    """A cache ``validate`` for plan files: msdda's header names ``weights_sha256`` and the plan deserializes."""
    def validate(path: Path) -> None:
        meta, plan = read_plan(path)
        check_weights_tag(meta, weights_sha256, member=member, source=path)
        deserialize(plan)

    return validate


def engine_for_onnx(onnx_path, *, cache=None, profile: ShapeProfile, precision: str = "fp16", refit: str = "none",
                    timing_cache=None, weights_sha256: str | None = None, member: str = "model",
                    **build_options) -> Path:
    """The path of a cached plan file for ``onnx_path``; built (with the persisted timing cache) when absent, or
    when the cached file fails its hash, names other weights in its header, or does not deserialize."""
    require_tensorrt()
    if not isinstance(cache, ArtifactCache):
        cache = ArtifactCache(cache)
    tag = _graph_weights(onnx_path, weights_sha256)
    key = tensorrt_cache_key(onnx_path, profile=profile, precision=precision, refit=refit,
                             strip_weights=bool(build_options.get("strip_weights")),
                             compute_capability=compute_capability(), options={
                                 k: v for k, v in build_options.items() if k != "strip_weights"})
    tc = timing_cache if timing_cache is not None else default_timing_cache(cache)

    def build(target: Path) -> None:
        t0 = time.perf_counter()
        plan = build_engine(onnx_path, profile=profile, precision=precision, timing_cache=tc, refit=refit,
                            **build_options)
        target.write_bytes(pack_plan(plan, {WEIGHTS_KEY: tag, "msdda.onnx_sha256": key.weights,
                                            EXPORTER_KEY: exporter_id(), "msdda.precision": precision,
                                            "msdda.refit": refit}))
        target.with_name("build.json").write_text(f'{{"build_seconds": {time.perf_counter() - t0:.3f}}}\n')

    return cache.get_or_build(key, build, validate=plan_loads_with_weights(tag, member))


def refitted_engine_for(plan_path, onnx_path, *, cache=None, weights_sha256: str | None = None,
                        member: str = "model") -> Path:
    """The path of a cached plan file: the refittable engine at ``plan_path`` (an msdda plan file built with
    refit="refit") carrying ``onnx_path``'s weights instead (same architecture; one refit, no build)."""
    require_tensorrt()
    if not isinstance(cache, ArtifactCache):
        cache = ArtifactCache(cache)
    base_meta, _ = read_plan(plan_path)
    if base_meta.get("msdda.refit") != "refit":
        raise ExportError(f"{plan_path}: the engine was not built refittable (refit='refit')")
    tag = _graph_weights(onnx_path, weights_sha256)
    base_sha = file_sha256(plan_path)
    versions = runtime_versions("tensorrt")
    key = CacheKey(kind="tensorrt", weights=onnx_files_sha256(onnx_path),
                   precision=base_meta.get("msdda.precision", ""), profile={"refit_of": base_sha},
                   versions=versions, device=compute_capability(), filename="unet.plan")

    def build(target: Path) -> None:
        t0 = time.perf_counter()
        _, plan = read_plan(plan_path)
        refitted = refit_engine(plan, onnx_path)
        target.write_bytes(pack_plan(refitted, {**base_meta, WEIGHTS_KEY: tag, "msdda.onnx_sha256": key.weights,
                                                "msdda.refit_of": base_sha}))
        target.with_name("build.json").write_text(f'{{"refit_seconds": {time.perf_counter() - t0:.3f}}}\n')

    return cache.get_or_build(key, build, validate=plan_loads_with_weights(tag, member))


# ---------------------------------------------------------------------------------------------- refit (TensorRT)
def _weights_source(onnx_path_or_state) -> Mapping[str, Any]:
    if isinstance(onnx_path_or_state, (str, os.PathLike)):
        from .onnx import onnx_initializers

        return onnx_initializers(onnx_path_or_state)
    if isinstance(onnx_path_or_state, Mapping):
        return onnx_path_or_state
    raise TypeError("refit source must be an ONNX path or a {name: array/tensor} mapping")


_TRT_TO_TORCH = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                 "INT8": "int8", "BOOL": "bool", "UINT8": "uint8"}


def refit_cuda_engine(engine, weights: Mapping[str, Any], *, logger=None, strict: bool = True) -> int:
    """Refit a deserialized refittable ICudaEngine in place from {name: array/tensor} (ONNX initializer names,
    or a state dict whose names match after ``normalize_weight_name``). Returns how many weights were set."""
    import torch

    trt = require_tensorrt()
    refitter = trt.Refitter(engine, _logger(trt, logger))
    names = list(refitter.get_all_weights())
    shapes = {}
    for n in names:
        with contextlib.suppress(Exception):
            shapes[n] = int(refitter.get_weights_prototype(n).size)     # element count
    mapping = match_refit_weights(weights, names, strict=strict, shapes=shapes or None)
    keep = []                                      # host copies must live until refit_cuda_engine returns
    for refit_name, src in mapping.items():
        value = weights[src]
        tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
        dtype = tensor.dtype
        with contextlib.suppress(Exception):
            proto = refitter.get_weights_prototype(refit_name)
            dtype = getattr(torch, _TRT_TO_TORCH.get(proto.dtype.name, str(tensor.dtype).removeprefix("torch.")))
        tensor = tensor.detach().to(dtype=dtype).contiguous()
        keep.append(tensor)
        trt_dtype = {torch.float32: trt.float32, torch.float16: trt.float16, torch.bfloat16: trt.bfloat16,
                     torch.int32: trt.int32, torch.int64: trt.int64, torch.int8: trt.int8,
                     torch.bool: trt.bool, torch.uint8: trt.uint8}[tensor.dtype]
        location = trt.TensorLocation.DEVICE if tensor.is_cuda else trt.TensorLocation.HOST
        w = trt.Weights(trt_dtype, tensor.data_ptr(), tensor.numel())
        try:
            ok = refitter.set_named_weights(refit_name, w, location)
        except TypeError:                          # a binding without the location overload: host only
            tensor = tensor.cpu()
            keep.append(tensor)
            ok = refitter.set_named_weights(refit_name, trt.Weights(trt_dtype, tensor.data_ptr(), tensor.numel()))
        if not ok:
            raise ExportError(f"TensorRT refused weights {refit_name!r} (shape {tuple(tensor.shape)})")
    missing = list(refitter.get_missing_weights())
    if missing:
        raise ExportError(f"cannot refit: {len(missing)} engine weights still missing ({', '.join(missing[:4])})")
    if not refitter.refit_cuda_engine():
        raise ExportError("TensorRT refit failed (see the TensorRT log above)")
    del keep
    return len(mapping)


def refit_engine(engine_bytes: bytes, onnx_path_or_state, *, logger=None) -> bytes:
    """A copy of a refittable plan carrying other weights of the same architecture (another expert's ONNX
    graph, or {initializer name: array}). Returns the refitted plan's bytes."""
    engine = deserialize(engine_bytes, logger)
    refit_cuda_engine(engine, _weights_source(onnx_path_or_state), logger=logger)
    return bytes(memoryview(engine.serialize()))


# ---------------------------------------------------------------------------------------------- what the backend loads
def same_architecture(paths: Sequence) -> bool:
    """Whether every graph has the same initializer (and Constant) names and shapes, so one refittable engine
    serves all. Reads the shapes only, never external weights."""
    import onnx

    def shapes(path) -> dict:
        graph = onnx.load(os.fspath(path), load_external_data=False).graph
        out = {t.name: tuple(t.dims) for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                out.update({node.output[0]: tuple(a.t.dims) for a in node.attribute if a.name == "value"})
        return out

    first = shapes(paths[0])
    return all(shapes(p) == first for p in paths[1:])


@dataclass(frozen=True)
class EnginePlans:
    """Where the TensorRT backend's engines come from: the members' verified ONNX graphs and the build settings.

    ``plans(batch)`` -> (profile, one plan file per member), built through the cache on first use: with
    ``refit="refit"`` one refittable engine from the first member's graph (or ``refit_source``'s) and a refitted
    copy per other member; with ``"none"`` one build each. ``"auto"`` (default) is "refit" for several graphs of
    one architecture, else "none". ``dynamic``: one profile spanning batches 1..max_batch (default max(batch, 8))
    instead of one static profile per batch size. ``soup(coeffs)``: the same for the soup of some members (its
    graph from ``OnnxSet.soup``, its engine a refit of the first member's refittable engine). Immutable."""
    onnx: OnnxSet
    precision: str = "fp16"
    refit: str = "auto"
    dynamic: bool = False
    max_batch: int | None = None
    timing_cache: Path | None = None
    build_options: Mapping = field(default_factory=dict)
    refit_source: Path | None = None
    io: Mapping = field(init=False, repr=False)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ExportError(f"TensorRT precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.refit not in ("auto", *REFIT_MODES):
            raise ExportError(f"refit must be 'auto' or one of {', '.join(REFIT_MODES)}, not {self.refit!r}")
        if self.max_batch is not None and (not isinstance(self.max_batch, int) or self.max_batch < 1):
            raise ExportError(f"max_batch must be a positive integer, not {self.max_batch!r}")
        refit = self.refit
        graphs = [self.onnx.paths[n] for n in self.members]
        if refit == "auto":
            refit = "refit" if len(graphs) > 1 and same_architecture(graphs) else "none"
        if self.refit_source is not None:
            refit = "refit"
        object.__setattr__(self, "refit", refit)
        object.__setattr__(self, "build_options", dict(self.build_options))
        object.__setattr__(self, "io", onnx_io(graphs[0])[0])

    @property
    def members(self) -> tuple[str, ...]:
        return self.onnx.members

    @property
    def weights_sha256(self) -> Mapping[str, str]:
        return self.onnx.weights_sha256

    def profile(self, batch: int) -> ShapeProfile:
        if self.dynamic:
            return derive_profile(self.io, batch=batch, dynamic=True, batch_range=(1, self.max_batch or max(batch, 8)))
        return derive_profile(self.io, batch=batch)

    def plans(self, batch: int) -> tuple[ShapeProfile, tuple[Path, ...]]:
        profile = self.profile(batch)
        opts = dict(cache=self.onnx.cache, profile=profile, precision=self.precision, timing_cache=self.timing_cache,
                    **self.build_options)
        paths = self.onnx.paths
        if self.refit != "refit":
            return profile, tuple(engine_for_onnx(paths[n], refit=self.refit, weights_sha256=self.weights_sha256[n],
                                                  member=n, **opts) for n in self.members)
        source = Path(self.refit_source or paths[self.members[0]])
        base = engine_for_onnx(source, refit="refit", **opts)
        return profile, tuple(base if Path(paths[n]) == source else refitted_engine_for(
            base, paths[n], cache=self.onnx.cache, weights_sha256=self.weights_sha256[n], member=n)
            for n in self.members)

    def soup(self, coeffs: Mapping[str, float]) -> "EnginePlans":
        return EnginePlans(self.onnx.soup(coeffs), precision=self.precision, refit="refit", dynamic=self.dynamic,
                           max_batch=self.max_batch, timing_cache=self.timing_cache, build_options=self.build_options,
                           refit_source=Path(self.refit_source or self.onnx.paths[self.members[0]]))
