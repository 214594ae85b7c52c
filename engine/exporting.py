"""What ``msdda export`` runs: load a base and its experts from model folders, export each UNet to a verified,
weights-tagged ONNX file, and write the folder's manifest.json.

It sits above both the loader (msdda.loading) and the exporter (msdda.export), so that msdda.export needs
neither the loader nor the zoo. The folder it writes is read back by ``msdda.export.read_export_folder``
(``Engine.from_pretrained(..., onnx_dir=DIR)``), which checks every file against the model it is loaded for.
"""
from __future__ import annotations

import json
import re
from typing import Mapping

from msdda.atomic import atomic_write_text
from msdda.errors import one_line
from msdda.export import (OUTPUT_NAME, ExportError, check_export_options, export_unet_onnx, runtime_versions,
                          unet_export_spec)
from msdda.export.artifacts import EXPORT_KIND, exporter_id
from msdda.export.onnx import SDXL_TIME_IDS, TEXT_CONDS, cleanup_tool, pooled_text_width
from msdda.loading import LoadError, load_base
from msdda.lora import load_expert
from msdda.runfolder import MANIFEST, RunFolder, RunFolderError, check_target
from msdda.validation import check_expert_name

__all__ = ["export_models", "owns_export_file"]

#: what an export folder's manifest says it is (msdda.runfolder recognises a folder as ours by it)
EXPORT_PARAMS = {"command": "export"}


def owns_export_file(name: str) -> bool:
    """The files an export folder holds: <member>.onnx, its <member>.onnx.data, manifest.json."""
    return name == MANIFEST or re.fullmatch(r"[^/]+\.onnx(\.data)?", name) is not None


def _load_models(base, experts: Mapping):
    try:
        base_model = load_base(base)
        nets = {"base": (base_model.unet, str(base), base_model.weights_sha256)}
        for name, p in experts.items():
            unet, sha = load_expert(name, p, base_model)
            nets[name] = (unet, str(p), sha)
    except LoadError as exc:
        raise ExportError(one_line(exc)) from None
    text_len = None
    if base_model.tokenizer is not None:
        text_len = int(base_model.tokenizer.model_max_length)
    return base_model, nets, text_len


def export_models(base, experts: Mapping[str, str] | None, out_dir, *, opset: int = 17, precision: str = "fp32",
                  dynamic_batch: bool = True, dynamic_hw: bool = False, verify: bool = True,
                  text_len: int | None = None) -> dict:
    """Export the base's UNet and every expert's to ``out_dir/<name>.onnx`` (the base as ``base.onnx``) and
    write ``out_dir/manifest.json``. Experts are loaded and checked by msdda.loading (UNet folders or LoRA
    adapters merged onto the base); names follow ``msdda.validation.check_expert_name``. Every file carries its
    weights' sha256 in its metadata. Returns the manifest. Raises ExportError (one line) for user errors,
    before ``out_dir`` exists where it can."""
    check_export_options(opset, precision)          # before loading models or creating out_dir
    experts = dict(experts or {})
    try:
        for name in experts:
            check_expert_name(name)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if base is None:
        raise ExportError("exporting needs a base model folder")
    try:
        check_target(out_dir)                   # refuse a foreign folder before loading any model
    except RunFolderError as exc:
        raise ExportError(str(exc)) from None
    base_model, nets, tok_len = _load_models(base, experts)
    spec = unet_export_spec(base_model.unet, text_len=text_len or tok_len)
    try:
        with RunFolder(out_dir, EXPORT_PARAMS, owns_export_file) as run:
            return _export_into(run, base_model, nets, spec, opset=opset, precision=precision,
                                dynamic_batch=dynamic_batch, dynamic_hw=dynamic_hw, verify=verify)
    except RunFolderError as exc:   # a foreign or locked folder: the export's own one-line error
        raise ExportError(str(exc)) from None


def _export_into(run: RunFolder, base_model, nets: dict, spec: dict, *, opset, precision, dynamic_batch, dynamic_hw,
                 verify) -> dict:
    """Export every UNet into the locked run folder ``run`` and write its manifest."""
    out_dir = run.path
    models = {}
    for name, (unet, src, sha) in nets.items():
        rec = export_unet_onnx(unet, out_dir / f"{name}.onnx", opset=opset, precision=precision,
                               dynamic_batch=dynamic_batch, dynamic_hw=dynamic_hw, verify=verify, **spec)
        models[name] = {"file": rec.path.name, "sha256": rec.file_sha256, "size": rec.size_bytes,
                        "external_data": rec.external_data, "source": src, "source_sha256": sha,
                        "weights_sha256": rec.weights_sha256, "max_abs_err": rec.max_abs_err, "rtol": rec.rtol,
                        "atol": rec.atol, "export_seconds": rec.export_seconds,
                        "verify_seconds": rec.verify_seconds}
        run.note_finished(rec.path.name)
    inputs = {"sample": ["N", spec["sample_shape"][0], *(("H", "W") if dynamic_hw else spec["sample_shape"][1:])],
              "timestep": ["N"]}
    if spec["cond"] == "class":
        inputs["class_labels"] = ["N"]
    elif spec["cond"] in TEXT_CONDS:
        inputs["encoder_hidden_states"] = ["N", *spec["text_shape"]]
    if spec["cond"] == "text_time":                 # SDXL's added conditioning
        inputs["text_embeds"] = ["N", pooled_text_width(base_model.unet)]
        inputs["time_ids"] = ["N", SDXL_TIME_IDS]
    manifest = {
        **EXPORT_PARAMS, "complete": True, "format": 1, "kind": EXPORT_KIND, "exporter": exporter_id(), "opset": opset, "precision": precision,
        "cond": spec["cond"], "sample_shape": list(spec["sample_shape"]),
        "text_shape": list(spec["text_shape"]) if spec["text_shape"] else None,
        "dynamic_batch": dynamic_batch, "dynamic_hw": dynamic_hw, "inputs": inputs, "outputs": {OUTPUT_NAME: ["N",
        rec.out_channels, *(("H", "W") if dynamic_hw else spec["sample_shape"][1:])]},
        "members": list(nets), "models": models, "cleanup": cleanup_tool(), "versions": runtime_versions("onnx"),
        "base_config": base_model.unet_config, "scheduler_config": base_model.scheduler_config,
    }
    try:
        atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1, default=str))
    except OSError as exc:
        raise ExportError(f"cannot write {out_dir / 'manifest.json'} ({one_line(exc, 200)})") from None
    return manifest
