"""How fast can one expert's UNet run here? The network-execution options for the CPU target, measured.

msdda's end-to-end time is almost all network time, so its speed-up over the diffusers loop is bounded by how
much faster a UNet call can be made than eager torch. For each model (the tiny SD-architecture UNet and the
zoo's digits UNet) at the rows one expert sees at K=2, batch 8 with CFG (16), this times one forward under:

- ``torch eager`` (what the diffusers loop runs) and ``torch.compile`` (inductor, compiled once, not timed);
- ``ort fp32``: the graph msdda exports, ONNX Runtime with all graph optimisations (msdda's onnxruntime
  backend), on 1 and 2 threads (the backend runs K sessions at once on threads / K cores each);
- ``ort fused attention``: the same graph after onnxruntime.transformers' UNet fusions that have CPU kernels
  (Attention/MultiHeadAttention, SkipLayerNorm);
- ``ort int8 dynamic`` / ``ort int8 static``: onnxruntime.quantization's dynamic (weights int8, activations
  quantised at run time) and static QDQ (per-channel weights, uint8 activations calibrated on 6 timesteps).

Quality is the output's relative RMS error against torch fp32 on the same input. Every time is a median from
this run; compare rows of one run only. Run: ``.venv/bin/python bench/run.py --skip-compose --skip-e2e``
(section "networks"), or this file alone.
"""
from __future__ import annotations

import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import make_tiny_sd_pipeline  # noqa: E402

CALIBRATION_TIMESTEPS = (999, 800, 600, 400, 200, 50)


def _inputs(unet, rows: int, t: float, seed: int) -> dict[str, np.ndarray]:
    """ONNX feeds of the exported graph's names for ``rows`` random rows at timestep t."""
    g = np.random.default_rng(seed)
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    feeds = {"sample": g.standard_normal((rows, cfg.in_channels, size, size)).astype(np.float32),
             "timestep": np.full((rows,), t, np.float32)}
    if getattr(cfg, "cross_attention_dim", None):
        feeds["encoder_hidden_states"] = g.standard_normal((rows, 77, cfg.cross_attention_dim)).astype(np.float32)
    if getattr(cfg, "num_class_embeds", None):
        feeds["class_labels"] = (np.arange(rows) % cfg.num_class_embeds).astype(np.int64)
    return feeds


def _torch_call(net, feeds):
    kwargs = {"return_dict": False}
    if "encoder_hidden_states" in feeds:
        kwargs["encoder_hidden_states"] = torch.from_numpy(feeds["encoder_hidden_states"])
    if "class_labels" in feeds:
        kwargs["class_labels"] = torch.from_numpy(feeds["class_labels"])
    x, t = torch.from_numpy(feeds["sample"]), torch.from_numpy(feeds["timestep"])
    return lambda: net(x, t, **kwargs)[0]


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def fuse_attention_for_cpu(src: Path, dst: Path) -> dict:
    """onnxruntime.transformers' UNet fusions restricted to ops with CPU kernels. Returns the fused-op counts.

    ORT 1.31's fusion reads num_heads with ``int(array of shape [1])``, which numpy 2 refuses; the fusion is
    called with a numpy-2-safe reader of the same constant for the duration of the call."""
    import onnxruntime.transformers  # noqa: F401  (puts the transformers tools' folder on sys.path)
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    fusion_modules = [m for n, m in sys.modules.items() if n.endswith("fusion_attention_unet")]
    originals = [m.FusionAttentionUnet.get_num_heads for m in fusion_modules]

    def get_num_heads(self, reshape_q, is_torch2=False):
        parent = self.model.get_parent(reshape_q, 1) if is_torch2 else None
        if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
            value = self.model.get_constant_value(parent.input[2])
            if isinstance(value, np.ndarray) and value.size == 1 and int(value.reshape(())) > 0:
                return int(value.reshape(()))
            return 0
        return originals[0](self, reshape_q, is_torch2)

    options = FusionOptions("unet")
    for gpu_only in ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                     "enable_bias_add", "enable_packed_qkv", "enable_packed_kv"):
        setattr(options, gpu_only, False)
    try:
        for m in fusion_modules:
            m.FusionAttentionUnet.get_num_heads = get_num_heads
        model = optimize_model(str(src), model_type="unet", use_gpu=False, opt_level=0,
                               optimization_options=options)
    finally:
        for m, f in zip(fusion_modules, originals):
            m.FusionAttentionUnet.get_num_heads = f
    model.save_model_to_file(str(dst))
    return {k: v for k, v in model.get_fused_operator_statistics().items() if v}


def quantize(src: Path, tmp: Path, unet, rows: int) -> dict[str, Path]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp / "pre.onnx"
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)   # symbolic inference fails on dynamic N

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self._feeds = iter([_inputs(unet, rows, float(t), seed=i) for i, t in enumerate(CALIBRATION_TIMESTEPS)])

        def get_next(self):
            return next(self._feeds, None)

    out = {"ort int8 dynamic": tmp / "dyn.onnx", "ort int8 static": tmp / "qdq.onnx"}
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)           # one warning per 1-D constant it declines to quantise per channel
    try:
        quantize_dynamic(str(pre), str(out["ort int8 dynamic"]), weight_type=QuantType.QInt8)
        quantize_static(str(pre), str(out["ort int8 static"]), Calibration(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return out


def _session(path: Path, threads: int):
    import onnxruntime as ort

    from msdda.backends.onnxruntime_backend import session_options

    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def models(tmp: Path) -> dict:
    from diffusers import UNet2DConditionModel, UNet2DModel

    from msdda.zoo import zoo_paths

    sd = make_tiny_sd_pipeline(tmp / "tiny-sd")
    return {"tiny-sd-0.8M": UNet2DConditionModel.from_pretrained(sd / "unet"),
            "zoo-digits-0.65M": UNet2DModel.from_pretrained(zoo_paths()["base"] / "unet")}


def run(rows: int = 16, repeats: int = 30, threads=(1, 2), compile: bool = True, log=print) -> list[dict]:
    from msdda.export import onnx_for_unet

    results = []
    saved_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, unet in models(tmp).items():
            unet = unet.eval().requires_grad_(False)
            work = tmp / name
            work.mkdir()
            cfg = unet.config
            size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
            cond = "text" if getattr(cfg, "cross_attention_dim", None) else (
                "class" if getattr(cfg, "num_class_embeds", None) else "none")
            fp32 = Path(onnx_for_unet(unet, sample_shape=(cfg.in_channels, size, size), cond=cond,
                                      text_shape=(77, cfg.cross_attention_dim) if cond == "text" else None,
                                      cache=work / "cache"))
            graphs = {"ort fp32": fp32}
            fused_ops = None
            try:
                fused_ops = fuse_attention_for_cpu(fp32, work / "fused.onnx")
                if any(k in fused_ops for k in ("Attention", "MultiHeadAttention")):
                    graphs["ort fused attention"] = work / "fused.onnx"
            except Exception as exc:          # an optimizer change: reported, not fatal
                fused_ops = {"error": " ".join(str(exc).split())[:200]}
            graphs.update(quantize(fp32, work, unet, rows))
            feeds = _inputs(unet, rows, 500.0, seed=100)
            for n_threads in threads:
                torch.set_num_threads(n_threads)
                with torch.inference_mode():
                    ref = _torch_call(unet, feeds)().numpy()
                    variants = {"torch eager": _torch_call(unet, feeds)}
                    if compile:
                        compiled = torch.compile(unet)
                        variants["torch.compile"] = _torch_call(compiled, feeds)
                    for label, path in graphs.items():
                        sess = _session(path, n_threads)
                        variants[label] = (lambda s=sess: torch.from_numpy(s.run(["out"], feeds)[0]))
                    for label, fn in variants.items():
                        out = fn().numpy()
                        ms = _median_ms(fn, repeats)
                        err = float(np.sqrt(((out - ref) ** 2).mean() / (ref ** 2).mean()))
                        row = dict(model=name, variant=label, threads=n_threads, rows=rows, median_ms=ms,
                                   rel_rms_error=err)
                        if label == "ort fused attention":
                            row["fused_ops"] = fused_ops
                        results.append(row)
                        log(f"{name:16s} threads {n_threads} {label:20s} {ms:8.2f} ms  rel RMS err {err:.2e}")
            eager = {r["threads"]: r["median_ms"] for r in results if r["model"] == name and r["variant"] == "torch eager"}
            for r in results:
                if r["model"] == name:
                    r["speedup_vs_eager"] = eager[r["threads"]] / r["median_ms"]
            if "ort fused attention" not in graphs:
                results.append(dict(model=name, variant="ort fused attention",
                                    note=f"no attention pattern fused ({fused_ops or 'nothing fused'})"))
    torch.set_num_threads(saved_threads)
    return results


def table(rows) -> str:
    lines = ["| model | variant | threads | ms per forward (16 rows) | vs torch eager | rel. RMS error vs torch fp32 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "median_ms" not in r:
            lines.append(f"| {r['model']} | {r['variant']} | | not applicable: {r.get('note', '')} | | |")
            continue
        lines.append(f"| {r['model']} | {r['variant']} | {r['threads']} | {r['median_ms']:.1f} | "
                     f"{r['speedup_vs_eager']:.2f}x | {r['rel_rms_error']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run()))
