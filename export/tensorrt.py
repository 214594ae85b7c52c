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
- ``engine_for_onnx(onnx_path, cache=, ...)`` -> Path of a cached, verified plan.
- ``refit_engine(engine_bytes, onnx_path_or_state)`` -> refitted plan bytes; ``refit_cuda_engine`` in place.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .cache import (ArtifactCache, CacheKey, ExportError, atomic_write_bytes, file_lock, file_sha256, one_line,
                    runtime_versions)

__all__ = ["TensorSpec", "ShapeProfile", "onnx_io", "derive_profile", "tensorrt_cache_key", "match_refit_weights",
           "normalize_weight_name", "build_engine", "engine_for_onnx", "refit_engine", "refit_cuda_engine",
           "require_tensorrt", "TensorRTUnavailable", "compute_capability", "onnx_files_sha256", "PRECISIONS",
           "REFIT_MODES"]

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


def engine_for_onnx(onnx_path, *, cache=None, profile: ShapeProfile, precision: str = "fp16", refit: str = "none",
                    timing_cache=None, **build_options) -> Path:
    """The path of a cached plan for ``onnx_path``; built (with the persisted timing cache) when absent or
    when the cached file fails its hash or does not deserialize."""
    require_tensorrt()
    if not isinstance(cache, ArtifactCache):
        cache = ArtifactCache(cache)
    key = tensorrt_cache_key(onnx_path, profile=profile, precision=precision, refit=refit,
                             strip_weights=bool(build_options.get("strip_weights")),
                             compute_capability=compute_capability(), options={
                                 k: v for k, v in build_options.items() if k != "strip_weights"})
    tc = timing_cache if timing_cache is not None else default_timing_cache(cache)

    def build(target: Path) -> None:
        t0 = time.perf_counter()
        plan = build_engine(onnx_path, profile=profile, precision=precision, timing_cache=tc, refit=refit,
                            **build_options)
        target.write_bytes(plan)
        target.with_name("build.json").write_text(f'{{"build_seconds": {time.perf_counter() - t0:.3f}}}\n')

    def validate(target: Path) -> None:
        deserialize(target.read_bytes())

    return cache.get_or_build(key, build, validate=validate)


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
