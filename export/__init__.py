"""msdda.export: offline artifacts for the runtime's backends.

- ``export_unet_onnx`` / ``onnx_for_unet`` / ``export_pipeline`` / ``export_models`` (msdda.export.onnx):
  verified ONNX graphs with the I/O contract ``sample, timestep[, class_labels | encoder_hidden_states] -> out``.
- ``ArtifactCache`` / ``CacheKey`` / ``weights_hash`` (msdda.export.cache): content-addressed, verified,
  process-safe storage of ONNX graphs and TensorRT engines.
- ``msdda.export.tensorrt``: TensorRT 10 engine builds, profiles, refit (imports tensorrt lazily).

Every user-fixable failure raises ``ExportError`` (a ValueError) with a one-line message.
"""
from .cache import ArtifactCache, CacheKey, ExportError, config_hash, default_cache_root, runtime_versions, weights_hash
from .onnx import (DEFAULT_TOLERANCE, INPUT_NAMES, MIN_OPSET, OUTPUT_NAME, ExportRecord, export_models,
                   export_pipeline, export_unet_onnx, onnx_cache_key, onnx_for_unet, onnx_initializers,
                   unet_export_spec)

__all__ = ["ArtifactCache", "CacheKey", "ExportError", "ExportRecord", "config_hash", "default_cache_root",
           "runtime_versions", "weights_hash", "export_unet_onnx", "onnx_for_unet", "onnx_cache_key",
           "export_pipeline", "export_models", "onnx_initializers", "unet_export_spec", "INPUT_NAMES",
           "OUTPUT_NAME", "MIN_OPSET", "DEFAULT_TOLERANCE"]
