"""msdda.export: offline artifacts for the runtime's backends.

- ``export_unet_onnx`` / ``onnx_for_unet`` (msdda.export.onnx): verified ONNX graphs with the I/O contract
  ``sample, timestep[, class_labels | encoder_hidden_states] -> out``, tagged with their weights' sha256.
- ``OnnxSet`` / ``onnx_set`` / ``onnx_set_for`` / ``onnx_soup`` (msdda.export.onnx_set): one verified graph per
  member network, and soups of them, as the ONNX Runtime and TensorRT backends load them.
- ``ArtifactCache`` / ``CacheKey`` / ``weights_hash`` (msdda.export.cache): content-addressed, verified,
  process-safe storage of ONNX graphs and TensorRT engines.
- ``msdda.export.artifacts``: what an artifact says about itself (the weights tag in ONNX metadata and in plan
  headers, export folders) and the check a loader runs; the only part the backends import.
- ``msdda.export.tensorrt``: TensorRT 10 engine builds, profiles, refit, ``EnginePlans`` (imports tensorrt lazily).

Loading model folders and exporting them (``msdda export``) is one layer up, in ``msdda.exporting``: this
package imports neither the loader nor the Engine nor the zoo.

Every user-fixable failure raises ``ExportError`` (a ValueError) with a one-line message; an artifact made from
other weights than the model it is loaded for raises ``ArtifactMismatch`` (an ExportError).
"""
from .artifacts import WEIGHTS_KEY, ArtifactMismatch, read_export_folder, soup_weights_tag
from .cache import ArtifactCache, CacheKey, ExportError, config_hash, default_cache_root, runtime_versions, weights_hash
from .onnx import (DEFAULT_TOLERANCE, INPUT_NAMES, MIN_OPSET, OUTPUT_NAME, ExportRecord, check_export_options,
                   export_unet_onnx, onnx_cache_key, onnx_for_unet, onnx_initializers, unet_export_spec)
from .onnx_set import OnnxSet, onnx_set, onnx_set_for, onnx_soup

__all__ = ["ArtifactCache", "CacheKey", "ExportError", "ArtifactMismatch", "ExportRecord", "OnnxSet", "config_hash",
           "default_cache_root", "runtime_versions", "weights_hash", "export_unet_onnx", "onnx_for_unet",
           "onnx_cache_key", "onnx_initializers", "unet_export_spec", "check_export_options", "onnx_set",
           "onnx_set_for", "onnx_soup", "soup_weights_tag", "read_export_folder", "WEIGHTS_KEY", "INPUT_NAMES",
           "OUTPUT_NAME", "MIN_OPSET", "DEFAULT_TOLERANCE"]
