"""Export diffusers UNets to ONNX, verified against torch in ONNX Runtime.

The graph's I/O names are a contract the runtime relies on::

    inputs   sample                 float [N, C, H, W]   (float16 for precision="fp16")
             timestep               float32 [N]
             class_labels           int64 [N]            (cond="class")
             encoder_hidden_states  float [N, L, D]      (cond="text" or "text_time")
             text_embeds            float [N, P]         (cond="text_time": SDXL's pooled text projection)
             time_ids               float32 [N, 6]       (cond="text_time": SDXL's size and crop conditioning)
    output   out                    float [N, C_out, H, W]

N is a dynamic axis by default (H and W on request). Export uses torch's TorchScript-based exporter
(``dynamo=False``, ``dynamic_axes``): about 0.3 s for a tiny UNet. Initializers are kept one per parameter
(torch's by-value de-duplication is turned off), so every expert of one architecture exports to the same graph
with the same initializer names: that is what lets a TensorRT engine built from one expert be refitted with
another's weights (``msdda.export.tensorrt.match_refit_weights``). The graph is then cleaned with
onnx-graphsurgeon (fold_constants, cleanup, toposort) when it is installed, else with ONNX's shape inference
only. Graphs over 2 GB store their weights in one external ``<name>.data`` file beside the ``.onnx``.

Every export is run in ONNX Runtime on seeded random inputs and compared with the torch module (float32) using
``|ort - torch| <= atol + rtol * |torch|`` elementwise; defaults rtol = atol = 1e-3 for fp32 and 2e-2 for fp16.
A graph that fails is deleted and ExportError raised. Files appear atomically: everything is written in a
private folder beside the target and moved into place with os.replace only after verification.

Every graph carries in its ``metadata_props`` the sha256 of the weights it was made from
(``msdda.weights_sha256``, ``weights_hash`` of the module), the exporter (``msdda.exporter``) and its I/O spec
(``msdda.cond``, ``msdda.sample_shape``, ``msdda.text_shape``, ``msdda.precision``, ``msdda.opset``,
``msdda.dynamic_batch``, ``msdda.dynamic_hw``); loaders compare the first with the model they load
(msdda.export.artifacts).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import shutil
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .artifacts import EXPORTER_KEY, WEIGHTS_KEY, check_weights_tag, exporter_id
from .cache import (ArtifactCache, CacheKey, ExportError, config_hash, file_sha256, one_line, runtime_versions,
                    weights_hash)

__all__ = ["ExportRecord", "export_unet_onnx", "onnx_for_unet", "onnx_cache_key", "unet_export_spec",
           "onnx_initializers", "save_onnx", "INPUT_NAMES", "OUTPUT_NAME", "MIN_OPSET", "DEFAULT_TOLERANCE",
           "EXTERNAL_DATA_THRESHOLD", "cleanup_tool", "check_export_options", "onnx_loads_with_weights"]

MIN_OPSET = 17
MAX_OPSET = 20                    # the TorchScript exporter's newest
OUTPUT_NAME = "out"
INPUT_NAMES = {"none": ("sample", "timestep"), "class": ("sample", "timestep", "class_labels"),
               "text": ("sample", "timestep", "encoder_hidden_states"),
               "text_time": ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")}
TEXT_CONDS = ("text", "text_time")
SDXL_TIME_IDS = 6
DEFAULT_TOLERANCE = {"fp32": (1e-3, 1e-3), "fp16": (2e-2, 2e-2)}     # (rtol, atol)
EXTERNAL_DATA_THRESHOLD = 1_800_000_000                              # bytes of weights; protobuf's hard cap is 2 GiB
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass(frozen=True)
class ExportRecord:
    """What one export wrote and how it verified."""
    path: Path
    cond: str
    sample_shape: tuple
    text_shape: tuple | None
    out_channels: int
    opset: int
    precision: str
    dynamic_batch: bool
    dynamic_hw: bool
    input_names: tuple
    output_names: tuple
    external_data: bool
    cleanup: str
    weights_sha256: str
    file_sha256: str
    size_bytes: int
    export_seconds: float
    verified: bool
    verify_seconds: float = 0.0
    max_abs_err: float | None = None
    rtol: float | None = None
    atol: float | None = None
    verify_cases: tuple = field(default_factory=tuple)   # ((N, H, W), ...) the shapes run in ONNX Runtime

    def as_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def cleanup_tool() -> str:
    """Which graph clean-up runs: onnx-graphsurgeon when importable, else ONNX shape inference only."""
    try:
        import onnx_graphsurgeon as gs

        return f"onnx-graphsurgeon {gs.__version__} (fold_constants, cleanup, toposort)"
    except Exception:
        return "onnx shape inference (onnx-graphsurgeon not installed)"


# ---------------------------------------------------------------------------------------------- the module
class _UNetForExport(torch.nn.Module):
    """Adapts a diffusers UNet (or any module taking (sample, timestep[, cond])) to positional tensors in,
    one tensor out. Named ``unet`` so initializers are ``unet.<parameter name>``."""

    def __init__(self, unet: torch.nn.Module, cond: str):
        super().__init__()
        self.unet = unet
        self.cond = cond
        try:
            params = inspect.signature(unet.forward).parameters
        except (TypeError, ValueError):
            params = {}
        self._return_dict = "return_dict" in params

    def forward(self, sample, timestep, cond=None, text_embeds=None, time_ids=None):
        kwargs = {"return_dict": False} if self._return_dict else {}
        if self.cond == "class":
            kwargs["class_labels"] = cond
        elif self.cond in TEXT_CONDS:
            kwargs["encoder_hidden_states"] = cond
        if self.cond == "text_time":
            kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        out = self.unet(sample, timestep, **kwargs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if hasattr(out, "sample"):
            out = out.sample
        return out


def _config(unet) -> dict:
    return dict(getattr(unet, "config", None) or {})


def unet_export_spec(unet, *, text_len: int | None = None) -> dict:
    """sample_shape, cond and text_shape for a diffusers UNet, from its config."""
    cfg = _config(unet)
    if "in_channels" not in cfg or "sample_size" not in cfg:
        raise ExportError(f"{type(unet).__name__} has no diffusers config: pass sample_shape and cond explicitly")
    size = cfg["sample_size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    is_text = type(unet).__name__ == "UNet2DConditionModel" or cfg.get("_class_name") == "UNet2DConditionModel"
    if is_text:
        cross = cfg.get("cross_attention_dim")
        if isinstance(cross, (list, tuple)):
            cross = cross[0]
        cond = "text_time" if cfg.get("addition_embed_type") == "text_time" else "text"
        return dict(sample_shape=(cfg["in_channels"], h, w), cond=cond, text_shape=(text_len or 77, int(cross)))
    cond = "class" if cfg.get("num_class_embeds") else "none"
    return dict(sample_shape=(cfg["in_channels"], h, w), cond=cond, text_shape=None)


def check_export_options(opset, precision) -> None:
    """The opset and precision an export accepts; checked before any model is loaded or folder created."""
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < MIN_OPSET:
        raise ExportError(f"opset must be an integer >= {MIN_OPSET} (got {opset!r}): GroupNorm/LayerNorm/attention "
                          "export and TensorRT 10 need opset 17 or newer")
    if opset > MAX_OPSET:
        raise ExportError(f"opset {opset} is newer than the exporter supports (<= {MAX_OPSET})")
    if precision not in _DTYPES:
        raise ExportError(f"precision must be 'fp32' or 'fp16', not {precision!r}")


def _check_args(sample_shape, cond, text_shape, opset, precision):
    check_export_options(opset, precision)
    if cond not in INPUT_NAMES:
        raise ExportError(f"cond must be one of {', '.join(map(repr, INPUT_NAMES))}, not {cond!r}")
    try:
        shape = tuple(int(s) for s in sample_shape)
    except (TypeError, ValueError):
        raise ExportError(f"sample_shape must be (C, H, W), not {sample_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ExportError(f"sample_shape must be three positive sizes (C, H, W), not {sample_shape!r}")
    text = None
    if cond in TEXT_CONDS:
        try:
            text = tuple(int(s) for s in text_shape)
        except (TypeError, ValueError):
            raise ExportError(f"cond={cond!r} needs text_shape=(L, D), not {text_shape!r}") from None
        if len(text) != 2 or min(text) < 1:
            raise ExportError(f"text_shape must be (L, D), not {text_shape!r}")
    elif text_shape is not None:
        raise ExportError(f"text_shape is only for cond='text' or 'text_time' (cond={cond!r})")
    return shape, text


def _downsample_factor(unet) -> int:
    blocks = _config(unet).get("block_out_channels")
    return 2 ** (len(blocks) - 1) if blocks else 8


def pooled_text_width(unet) -> int:
    """The width of an SDXL UNet's ``text_embeds``: its added embedding's inputs less the six time ids'."""
    cfg = _config(unet)
    return int(cfg["projection_class_embeddings_input_dim"]) - SDXL_TIME_IDS * int(cfg["addition_time_embed_dim"])


def _example_inputs(unet, cond, batch, sample_shape, text_shape, dtype, device, seed, num_classes):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn((batch, *sample_shape), generator=gen).to(device, dtype)
    timestep = (torch.rand(batch, generator=gen) * 999).round().to(device, torch.float32)
    args = [sample, timestep]
    if cond == "class":
        args.append(torch.randint(0, num_classes, (batch,), generator=gen).to(device))
    elif cond in TEXT_CONDS:
        args.append(torch.randn((batch, *text_shape), generator=gen).to(device, dtype))
    if cond == "text_time":
        args.append(torch.randn((batch, pooled_text_width(unet)), generator=gen).to(device, dtype))
        # sizes and crops in pixels, as StableDiffusionXLPipeline passes them
        args.append((torch.rand((batch, SDXL_TIME_IDS), generator=gen) * 1024).round().to(device, torch.float32))
    return args


def _params_device(module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _params_dtype(module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes.items():
            m.training = mode


def _as(module, dtype):
    """``module`` itself if it already has ``dtype``, else a converted deep copy (the caller's is untouched)."""
    return module if _params_dtype(module) == dtype else copy.deepcopy(module).to(dtype)


# ---------------------------------------------------------------------------------------------- graph work
def _tensor_nbytes(t) -> int:
    import onnx

    itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize if t.dims else itemsize


def _clean_graph(model):
    """Strip initializers from the graph inputs, then fold constants / remove dead nodes / sort."""
    inits = {i.name for i in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    try:
        import onnx_graphsurgeon as gs
    except Exception:
        return model, cleanup_tool()
    ir_version, opsets = model.ir_version, list(model.opset_import)
    graph = gs.import_onnx(model)
    with contextlib.redirect_stdout(None), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            graph.fold_constants()
        except Exception:                       # a fold that ORT cannot evaluate: keep the graph unfolded
            pass
        graph.cleanup().toposort()
    cleaned = gs.export_onnx(graph)
    cleaned.ir_version = ir_version
    del cleaned.opset_import[:]
    cleaned.opset_import.extend(opsets)
    cleaned.producer_name, cleaned.producer_version = model.producer_name, model.producer_version
    return cleaned, cleanup_tool()


def onnx_initializers(path, *, include_constants: bool = True) -> dict[str, np.ndarray]:
    """{name: array} of a graph's initializers (and Constant nodes' values), external data included."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(os.fspath(path), load_external_data=True)
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    if include_constants:
        for node in model.graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def save_onnx(model, path: Path, external: bool) -> None:
    """Write ``model`` to ``path``; with ``external``, every weight goes to one ``<name>.data`` file beside it."""
    import onnx

    if external:
        onnx.save_model(model, os.fspath(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, os.fspath(path))


def _providers_for(device: torch.device) -> list:
    import onnxruntime as ort

    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _verify(path: Path, ref_module, names, cases, make_inputs, rtol, atol, device) -> float:
    """Run the graph in ONNX Runtime on each case's inputs, compare with ``ref_module``; max |error|."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(os.fspath(path), opts, providers=_providers_for(device))
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot load the exported graph ({one_line(exc, 200)})") from None
    in_dtype = {i.name: i.type for i in sess.get_inputs()}
    worst = 0.0
    for case in cases:
        args = make_inputs(*case)
        feeds = {}
        for name, a in zip(names, args):
            arr = a.detach().cpu().numpy()
            if a.is_floating_point():
                arr = arr.astype(np.float16 if in_dtype[name] == "tensor(float16)" else np.float32)
            feeds[name] = arr
        try:
            got = sess.run([OUTPUT_NAME], feeds)[0].astype(np.float64)
        except Exception as exc:
            raise ExportError(f"ONNX Runtime failed to run the exported graph at N,H,W={case} "
                              f"({one_line(exc, 200)})") from None
        ref_args = [a.float() if a.is_floating_point() else a for a in args]
        with torch.no_grad():
            ref = ref_module(*ref_args).detach().double().cpu().numpy()
        if got.shape != ref.shape:
            raise ExportError(f"exported graph's output has shape {got.shape}, torch gives {ref.shape}")
        err = np.abs(got - ref)
        bad = ~(err <= atol + rtol * np.abs(ref))
        worst = max(worst, float(np.nanmax(err)) if err.size else 0.0)
        if bad.any() or not np.isfinite(got).all():
            raise ExportError(f"ONNX Runtime output differs from torch at N,H,W={case}: {int(bad.sum())} of "
                              f"{bad.size} elements outside rtol={rtol:g}, atol={atol:g} (max |err| "
                              f"{float(np.nanmax(err)):.3g}); the graph was not kept")
    return worst


# ---------------------------------------------------------------------------------------------- export
def export_unet_onnx(unet: torch.nn.Module, path, *, sample_shape, cond: str = "none", text_shape=None,
                     opset: int = 17, precision: str = "fp32", dynamic_batch: bool = True, dynamic_hw: bool = False,
                     verify: bool = True, rtol: float | None = None, atol: float | None = None, batch: int = 2,
                     external_data: bool | None = None, num_classes: int | None = None, seed: int = 0,
                     metadata: Mapping[str, str] | None = None, weights_sha256: str | None = None) -> ExportRecord:
    """Export ``unet`` to an ONNX file at ``path`` and verify it in ONNX Runtime (see the module docstring).

    sample_shape: (C, H, W). cond: "none" | "class" | "text"; text_shape (L, D) for "text". precision:
    "fp32" or "fp16" (weights, sample, encoder_hidden_states and out in that type; timestep stays float32).
    batch: the traced batch size (the static one when dynamic_batch=False). external_data: None = only when
    the weights exceed ~1.8 GB. rtol/atol: None = DEFAULT_TOLERANCE[precision]. The caller's module is not
    modified. Raises ExportError (one line) on bad arguments, an export failure or a failed verification.
    """
    shape, text = _check_args(sample_shape, cond, text_shape, opset, precision)
    if not isinstance(unet, torch.nn.Module):
        raise ExportError(f"expected a torch module, not {type(unet).__name__}")
    cfg = _config(unet)
    kind = type(unet).__name__
    if kind == "UNet2DModel" and cond in TEXT_CONDS:
        raise ExportError(f"cond={cond!r} needs a text-conditioned UNet2DConditionModel; this is a UNet2DModel")
    if kind == "UNet2DConditionModel":
        wanted = "text_time" if cfg.get("addition_embed_type") == "text_time" else "text"
        if cond != wanted:
            raise ExportError(f"this UNet2DConditionModel takes cond={wanted!r}, not {cond!r}")
    if cond in TEXT_CONDS and cfg.get("cross_attention_dim") not in (None, text[1]) \
            and not isinstance(cfg.get("cross_attention_dim"), (list, tuple)):
        raise ExportError(f"text_shape D={text[1]} differs from the UNet's cross_attention_dim="
                          f"{cfg['cross_attention_dim']}")
    if cfg.get("in_channels") not in (None, shape[0]):
        raise ExportError(f"sample_shape C={shape[0]} differs from the UNet's in_channels={cfg['in_channels']}")
    if cond == "class":
        num_classes = num_classes or cfg.get("num_class_embeds")
        if not num_classes:
            raise ExportError("cond='class' needs a UNet with num_class_embeds (or num_classes=)")
    if not isinstance(batch, int) or batch < 1:
        raise ExportError(f"batch must be a positive integer, not {batch!r}")
    rtol0, atol0 = DEFAULT_TOLERANCE[precision]
    rtol = rtol0 if rtol is None else float(rtol)
    atol = atol0 if atol is None else float(atol)

    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path} is a folder; give the .onnx file's path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        work = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        (work / "raw").mkdir(parents=True)
    except OSError as exc:
        raise ExportError(f"cannot write to {path.parent} ({os.strerror(exc.errno) if exc.errno else exc})") from None

    names = INPUT_NAMES[cond]
    dtype = _DTYPES[precision]
    device = _params_device(unet)
    try:
        with _eval_mode(unet):
            t0 = time.perf_counter()
            net = _UNetForExport(_as(unet, dtype), cond).eval()
            make_inputs = lambda n, h, w: _example_inputs(  # noqa: E731
                unet, cond, n, (shape[0], h, w), text, dtype, device, seed + 1000 * n + h, num_classes)
            args = make_inputs(batch, shape[1], shape[2])
            axes = {}
            if dynamic_batch:
                for n in (*names, OUTPUT_NAME):
                    axes[n] = {0: "N"}
            if dynamic_hw:
                for n in ("sample", OUTPUT_NAME):
                    axes.setdefault(n, {}).update({2: "H", 3: "W"})
            raw_path = work / "raw" / "model.onnx"
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                try:
                    torch.onnx.export(net, tuple(args), os.fspath(raw_path), input_names=list(names),
                                      output_names=[OUTPUT_NAME], dynamic_axes=axes or None, opset_version=opset,
                                      do_constant_folding=True, keep_initializers_as_inputs=True, dynamo=False)
                except Exception as exc:
                    raise ExportError(f"torch.onnx.export failed ({type(exc).__name__}: {one_line(exc, 200)})") from None
            import onnx

            model = onnx.load(os.fspath(raw_path), load_external_data=True)
            model, tool = _clean_graph(model)
            wsha = weights_sha256 or weights_hash(unet)
            meta = {"msdda.format": "1", EXPORTER_KEY: exporter_id(), "msdda.cond": cond,
                    "msdda.precision": precision, "msdda.sample_shape": json.dumps(list(shape)),
                    "msdda.text_shape": json.dumps(text), "msdda.opset": str(opset),
                    "msdda.dynamic_batch": json.dumps(bool(dynamic_batch)),
                    "msdda.dynamic_hw": json.dumps(bool(dynamic_hw)), WEIGHTS_KEY: wsha,
                    **{str(k): str(v) for k, v in (metadata or {}).items() if k != WEIGHTS_KEY}}
            del model.metadata_props[:]
            for k, v in meta.items():
                model.metadata_props.add(key=k, value=v)
            out_ch = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value or None
            weight_bytes = sum(_tensor_nbytes(t) for t in model.graph.initializer)
            external = weight_bytes > EXTERNAL_DATA_THRESHOLD if external_data is None else bool(external_data)
            staged = work / path.name
            save_onnx(model, staged, external)
            del model
            shutil.rmtree(work / "raw", ignore_errors=True)
            try:
                onnx.checker.check_model(os.fspath(staged))
            except Exception as exc:
                raise ExportError(f"exported graph fails the ONNX checker ({one_line(exc, 200)})") from None
            export_s = time.perf_counter() - t0

            max_err, verify_s, cases = None, 0.0, ()
            if verify:
                t1 = time.perf_counter()
                cases = [(batch + 1 if dynamic_batch else batch, shape[1], shape[2])]
                if dynamic_hw:
                    f = _downsample_factor(unet)
                    cases.append((cases[0][0], shape[1] + f, shape[2] + 2 * f))
                ref = net if precision == "fp32" else _UNetForExport(_as(unet, torch.float32), cond).eval()
                max_err = _verify(staged, ref, names, cases, make_inputs, rtol, atol, device)
                verify_s = time.perf_counter() - t1
                del ref
            del net

        data = staged.with_name(staged.name + ".data")
        final_data = path.with_name(path.name + ".data")
        if data.exists():
            os.replace(data, final_data)
        sha, size = file_sha256(staged), staged.stat().st_size
        os.replace(staged, path)
        if not external and final_data.exists():
            final_data.unlink()                 # a stale weights file from an earlier, larger export
    except OSError as exc:
        raise ExportError(f"cannot write {path} ({os.strerror(exc.errno) if exc.errno else one_line(exc)})") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ExportRecord(path=path, cond=cond, sample_shape=shape, text_shape=text,
                        out_channels=int(out_ch) if out_ch else -1, opset=opset, precision=precision,
                        dynamic_batch=dynamic_batch, dynamic_hw=dynamic_hw, input_names=names,
                        output_names=(OUTPUT_NAME,), external_data=external, cleanup=tool, weights_sha256=wsha,
                        file_sha256=sha, size_bytes=size, export_seconds=round(export_s, 4), verified=verify,
                        verify_seconds=round(verify_s, 4), max_abs_err=max_err, rtol=rtol if verify else None,
                        atol=atol if verify else None, verify_cases=tuple(tuple(c) for c in cases))


# ---------------------------------------------------------------------------------------------- cache
def onnx_cache_key(unet, *, sample_shape, cond, text_shape=None, precision="fp32", opset=17, dynamic_batch=True,
                   dynamic_hw=False, weights: str | None = None) -> CacheKey:
    shape, text = _check_args(sample_shape, cond, text_shape, opset, precision)
    profile = {"sample_shape": list(shape), "cond": cond, "text_shape": list(text) if text else None,
               "opset": opset, "dynamic_batch": dynamic_batch, "dynamic_hw": dynamic_hw,
               "io": [*INPUT_NAMES[cond], OUTPUT_NAME], "cleanup": cleanup_tool()}
    return CacheKey(kind="onnx", weights=weights or weights_hash(unet), precision=precision, profile=profile,
                    architecture=config_hash(unet), versions=runtime_versions("onnx"), filename="unet.onnx")


def onnx_loads_with_weights(weights_sha256: str, member: str = "model"):
    """A cache ``validate`` for ONNX artifacts: the file passes the ONNX checker and carries ``weights_sha256``
    in its own metadata (a file swapped for another model's, even with the manifest edited to match, fails and
    is rebuilt)."""
    def validate(path: Path) -> None:
        import onnx

        onnx.checker.check_model(os.fspath(path))
        meta = {p.key: p.value for p in onnx.load(os.fspath(path), load_external_data=False).metadata_props}
        check_weights_tag(meta, weights_sha256, member=member, source=path)

    return validate


def onnx_for_unet(unet: torch.nn.Module, *, cache=None, sample_shape, cond, text_shape=None,
                  precision: str = "fp32", opset: int = 17, dynamic_batch: bool = True,
                  dynamic_hw: bool = False, weights_sha256: str | None = None, member: str = "model") -> Path:
    """The path of a verified ONNX export of ``unet``: reused from the cache when one with the same weights,
    architecture, shapes, precision and tool versions exists, is intact and carries those weights' sha256 in its
    own metadata, else exported now.

    cache: an ArtifactCache, a folder, or None for the default ($MSDDA_CACHE or ~/.cache/msdda).
    weights_sha256: ``weights_hash(unet)`` when the caller has it already. member: the name used in messages.
    """
    if not isinstance(cache, ArtifactCache):
        cache = ArtifactCache(cache)
    key = onnx_cache_key(unet, sample_shape=sample_shape, cond=cond, text_shape=text_shape, precision=precision,
                         opset=opset, dynamic_batch=dynamic_batch, dynamic_hw=dynamic_hw, weights=weights_sha256)

    def build(target: Path) -> None:
        export_unet_onnx(unet, target, sample_shape=sample_shape, cond=cond, text_shape=text_shape, opset=opset,
                         precision=precision, dynamic_batch=dynamic_batch, dynamic_hw=dynamic_hw, verify=True,
                         weights_sha256=key.weights)

    return cache.get_or_build(key, build, validate=onnx_loads_with_weights(key.weights, member))
