"""ONNX Runtime backend: one InferenceSession per network, from ONNX files that msdda.export writes.

It only loads: the Engine hands it an ``msdda.export.OnnxSet`` (one verified file per member and the weights
sha256 each must carry). Each session's own metadata (``msdda.weights_sha256``) is compared with that sha256
when it is created, so a file made from other weights is refused whatever its path. Soups come from the set
(``OnnxSet.soup``: built through the export cache) and are loaded per call, never kept here.

Sessions are created once, here. ``InferenceSession.run`` is thread-safe, so one backend serves concurrent
calls. The execution provider is CUDA where onnxruntime-gpu sees a GPU, else CPU.

On CPU with several networks per step, ``parallel=True`` (the default there) runs the members' sessions at the
same time, each on threads / K cores, instead of one after another on all cores: small UNets leave cores idle
inside one call, so this measured 1.6x faster for K=2 at batch 8 (bench/bench_e2e.py). A second set of
sessions on all cores serves the single-network calls (base, expert:NAME, soup).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from msdda.export.artifacts import ArtifactMismatch, check_weights_tag

from .conditioning import Conditioning


def session_options(threads: int | None, spin: bool = True):
    """The ONNX Runtime session options the backend runs with (public: bench/ builds sessions the same way).

    spin=False: intra-op threads sleep when idle instead of spin-waiting. With several sessions taking turns
    on few cores, one session's spinning threads steal the cores the next session needs (measured below)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return opts


def _providers(device: torch.device):
    import onnxruntime as ort

    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntimeBackend:
    """Runs each network's exported ONNX graph in ONNX Runtime; outputs come back as torch tensors."""

    def __init__(self, onnx, *, device="cpu", dtype=None, threads: int | None = None, parallel: bool | None = None):
        """onnx: an ``msdda.export.OnnxSet`` (``paths``, ``weights_sha256``, ``soup``), built by the Engine."""
        self.members = tuple(onnx.members)
        self.device = torch.device(device)
        self.dtype = torch.float32
        self._onnx = onnx
        # several sessions take turns here; spin-waiting threads slow the next one (no spinning: zoo K=2 batch 8
        # 0.227 -> 0.189 s, tiny SD 0.608 -> 0.569 s; with sequential sessions 0.338 -> 0.197 s, on 2 cores)
        spin = len(self.members) == 1
        self._options = session_options(threads, spin)
        self._providers = _providers(self.device)
        self.onnx_paths = dict(onnx.paths)
        threads = threads or torch.get_num_threads()
        self._sessions = tuple(self._load(n, onnx.paths[n], onnx.weights_sha256[n], self._options)
                               for n in self.members)
        if parallel is None:
            parallel = self.device.type == "cpu" and len(self.members) > 1 and threads > 1
        self._pool = self._group_sessions = None
        if parallel:
            workers = min(len(self.members), threads)
            opts = session_options(max(1, threads // workers), spin)
            self._group_sessions = tuple(self._load(n, onnx.paths[n], onnx.weights_sha256[n], opts)
                                         for n in self.members)
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="msdda-ort")

    def _load(self, member: str, path, weights_sha256: str, options):
        """A session for ``path``, refused (ArtifactMismatch) unless the graph says it was made from
        ``weights_sha256``: the check reads the loaded session's own metadata, so nothing can change between
        the check and the load."""
        import onnxruntime as ort

        session = ort.InferenceSession(os.fspath(path), options, providers=self._providers)
        check_weights_tag(session.get_modelmeta().custom_metadata_map, weights_sha256, member=member, source=path)
        sample = next((i.type for i in session.get_inputs() if i.name == "sample"), None)
        if sample != "tensor(float)":              # the feeds are float32 (an fp16 export is for TensorRT)
            raise ArtifactMismatch(f"{path}: the graph for {member!r} takes {sample} samples; the ONNX Runtime "
                                   "backend runs float32 graphs (export with --precision fp32)")
        return session

    @staticmethod
    def _feeds(x: torch.Tensor, t: int, cond: Conditioning) -> dict:
        n = x.shape[0]
        per_row = isinstance(t, torch.Tensor) and t.numel() == n and n > 1     # a step scheduler's timesteps
        timestep = t.detach().float().cpu().numpy().reshape(n) if per_row else np.full((n,), float(t), np.float32)
        feeds = {"sample": x.detach().float().cpu().numpy(), "timestep": timestep}
        if cond.encoder_hidden_states is not None:
            feeds["encoder_hidden_states"] = cond.encoder_hidden_states.detach().float().cpu().numpy()
        if cond.class_labels is not None:
            feeds["class_labels"] = cond.class_labels.detach().cpu().numpy().astype(np.int64)
        for name in ("text_embeds", "time_ids"):                 # SDXL's added conditioning
            value = getattr(cond, name)
            if value is not None:
                feeds[name] = value.detach().float().cpu().numpy()
        return feeds

    def _run(self, session, feeds) -> torch.Tensor:
        return torch.from_numpy(session.run(["out"], feeds)[0])

    def forward(self, x: torch.Tensor, t: int, cond: Conditioning, members: tuple[int, ...]) -> torch.Tensor:
        """x [N, C, H, W] -> [len(members), N, C_out, H, W] (float32, on x's device)."""
        feeds = self._feeds(x, t, cond)
        if len(members) > 1 and self._pool is not None:
            outs = list(self._pool.map(lambda m: self._run(self._group_sessions[m], feeds), members))
        else:
            outs = [self._run(self._sessions[m], feeds) for m in members]
        out = torch.stack(outs)
        return out.to(x.device, x.dtype)

    def soup(self, coeffs: dict[int, float]):
        """One network with parameters sum_k c_k theta_k: its graph comes from the OnnxSet (the export cache
        builds it once per weight vector); its session belongs to the returned callable, not to the backend."""
        soup = self._onnx.soup({self.members[m]: float(c) for m, c in coeffs.items()})
        (name,) = soup.members
        session = self._load(name, soup.paths[name], soup.weights_sha256[name], self._options)

        def forward(x, t, cond: Conditioning):
            return self._run(session, self._feeds(x, t, cond)).unsqueeze(0).to(x.device, x.dtype)

        return forward
