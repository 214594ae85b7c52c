"""Eager PyTorch backend: the K networks' own parameters, stored once, evaluated as one group per call."""
from __future__ import annotations

import contextlib
import copy
import threading
from contextvars import ContextVar

import torch
from torch.func import functional_call, stack_module_state, vmap

from msdda.lora import (LoraAdapter, forward_members, lora_group_network, member_selection, merged_network,
                        soup_parameters)

from .conditioning import Conditioning


# Whether this thread (or task) is inside ``concurrent_members()``.
_CONCURRENT: ContextVar[bool] = ContextVar("msdda_concurrent_members", default=False)


@contextlib.contextmanager
def concurrent_members():
    """Within the block (this thread or task only), a TorchBackend with ``streams=True`` on CUDA runs the K
    full-weight networks of one call on K CUDA streams, forked from the current stream and joined back to it.
    ``msdda.graphs.capture_cuda_graph`` wraps a step's warm-up (which sets up the streams' cuBLAS and cuDNN
    state outside the capture) and its capture (whose graph then holds K independent branches) in it. Outside
    the block the networks run one after another on the current stream, as the host issues them anyway."""
    token = _CONCURRENT.set(True)
    try:
        yield
    finally:
        _CONCURRENT.reset(token)


def unet_kwargs(cond: Conditioning) -> dict:
    """A diffusers UNet's keyword arguments for ``cond`` (SDXL's pooled text and time ids go in
    ``added_cond_kwargs``, as StableDiffusionXLPipeline passes them)."""
    kwargs = {"return_dict": False}
    if cond.encoder_hidden_states is not None:
        kwargs["encoder_hidden_states"] = cond.encoder_hidden_states
    if cond.class_labels is not None:
        kwargs["class_labels"] = cond.class_labels
    if cond.text_embeds is not None or cond.time_ids is not None:
        kwargs["added_cond_kwargs"] = {"text_embeds": cond.text_embeds, "time_ids": cond.time_ids}
    return kwargs


def _moved(net: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """net on device/dtype; a no-op (and no diffusers dtype warning) when it is already there ("cuda" is the
    current CUDA device)."""
    p = next(net.parameters())
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if p.device != device or p.dtype != dtype:
        net = net.to(device, dtype)
    return net


def timestep_batch(t, n: int, device) -> torch.Tensor:
    """The timestep the UNets see, float32 [n]: ``t`` a python number (the eager loop), or a float32 tensor of
    one element on the device (a CUDA graph reads it from a device table, so a replay needs no host value).
    float32 whatever the networks' dtype: diffusers' time projection computes in float32 (a bfloat16 timestep
    would round 999 to 1000). A float32 tensor of n elements is one timestep per row (a step scheduler's)."""
    if isinstance(t, torch.Tensor):
        return t.reshape(n) if t.numel() == n and n > 1 else t.reshape(1).expand(n)
    return torch.full((n,), float(t), device=device, dtype=torch.float32)


def meta_skeleton(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``net``'s structure whose parameters and buffers live on the meta device: a module to
    ``functional_call`` with other tensors. No parameter is ever copied (deepcopy's memo maps each to a meta
    tensor first), so building it needs no memory beyond the module objects."""
    memo = {}
    for t in list(net.parameters()) + list(net.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(meta, requires_grad=False) if isinstance(t, torch.nn.Parameter) else meta
    return copy.deepcopy(net, memo)


class TorchBackend:
    """Runs same-architecture diffusers UNets with torch.

    ``networks``: {member name: module or LoraAdapter}; the first is the base, a module, and every adapter is a
    LoRA of it. group="loop" calls the selected networks one after another; group="vmap" evaluates them as one
    vmapped functional call over stacked parameters (torch.func); under both, LoRA adapters are merged into full
    networks here (sharing the base's unadapted tensors). group="lora" (every expert a LoRA adapter) runs the
    selected members as one forward of the base weights on the stacked batches plus batched low-rank deltas
    (msdda.backends.lora): the base's parameters are held once and no expert is merged, except per call for a
    soup. Chosen once here. ``compile=True`` wraps each network with torch.compile.

    Weights are stored once: the backend holds the networks themselves (moved to ``device``/``dtype`` when they
    are not there already, which is then the only copy). Nothing is stacked unless a call needs it: group="vmap"
    stacks the parameters at its first call (``release_stack`` frees them), and ``soup`` builds the averaged
    parameters per call from the networks' own.

    ``streams=True`` (group="loop" on CUDA): inside ``concurrent_members()`` (a CUDA graph's warm-up and
    capture) the K networks of one call run on K CUDA streams, forked from the current stream and joined back
    with events, so the captured graph holds K independent branches the GPU can run at once. Default on: the
    one GPU measurement (issue 10, H200, SD1.5-size UNets, fp16, one whole msdda K=2 step with CFG captured in
    one graph) took 23.7 ms with the two UNets in sequence and 19.8 ms on two streams at batch 1, and 99.8 vs
    100.3 ms at batch 8, where the GPU is already full. Elsewhere the networks run in sequence on the current
    stream. bench/gpu_check.py's e2e section measures both settings.
    """

    def __init__(self, networks: dict, *, device="cpu", dtype=None, group: str = "loop", compile: bool = False,
                 streams: bool = True):
        if group not in ("loop", "vmap", "lora"):
            raise ValueError(f"group must be 'loop', 'vmap' or 'lora', not {group!r}")
        self.members = tuple(networks)
        self.group = group
        self.device = torch.device(device)
        nets = list(networks.values())
        if isinstance(nets[0], LoraAdapter):
            raise ValueError("the first network (the base) must be a module, not a LoRA adapter")
        self.dtype = dtype or nets[0].dtype
        self.streams = bool(streams) and group == "loop"
        base = _moved(nets[0], self.device, self.dtype).eval().requires_grad_(False)
        self._lock = threading.Lock()
        self._skeleton = None   # a meta-device copy of the structure, built when vmap or soup first needs it
        self._stack = None      # (params, buffers) stacked over members: group="vmap" only, at its first call
        self._selections = {}   # members -> their LoRA factor selection on the device (group="lora")
        self._local = threading.local()   # per-thread side streams for captures (streams=True)
        self._forward_group = {"loop": self._forward_loop, "vmap": self._forward_vmap,
                               "lora": self._forward_lora}[group]
        self.lora_network = None
        if group == "lora":
            adapters = [None]
            for i, net in enumerate(nets[1:], 1):
                if not isinstance(net, LoraAdapter):
                    raise ValueError(f"group='lora': member {i} is a full network, not a LoRA adapter of the base")
                adapters.append(net)
            try:
                self.lora_network = lora_group_network(base, adapters)
            except ValueError as exc:
                raise ValueError(f"group='lora': {exc}") from None
            self._lora_call = torch.compile(self.lora_network) if compile else self.lora_network
            self._nets = (base,)
            # the base alone runs as itself; an expert alone (expert:NAME) runs through the group network
            self._calls = (torch.compile(base) if compile else base,) + (None,) * (len(nets) - 1)
        else:
            full = [base] + [merged_network(base, n) if isinstance(n, LoraAdapter) else n for n in nets[1:]]
            self._nets = tuple(_moved(n, self.device, self.dtype).eval().requires_grad_(False) for n in full)
            self._calls = tuple(torch.compile(n) if compile else n for n in self._nets)

    @property
    def networks(self) -> tuple[torch.nn.Module, ...]:
        """The full member networks, in member order (the backend's only copy of their weights); with
        group="lora" only the base (the experts live as factors in ``lora_network``)."""
        return self._nets

    def forward(self, x: torch.Tensor, t, cond: Conditioning, members: tuple[int, ...]) -> torch.Tensor:
        """x [N, C, H, W], t a timestep (a number, or a float32 one-element tensor on x's device) ->
        [len(members), N, C_out, H, W]."""
        timestep = timestep_batch(t, x.shape[0], x.device)
        kwargs = unet_kwargs(cond)
        if len(members) == 1 and self._calls[members[0]] is not None:
            return self._calls[members[0]](x, timestep, **kwargs)[0].unsqueeze(0)
        return self._forward_group(x, timestep, kwargs, members)

    def _forward_loop(self, x, timestep, kwargs, members):
        if self.streams and x.is_cuda and _CONCURRENT.get():
            return forward_on_streams([lambda m=m: self._calls[m](x, timestep, **kwargs)[0] for m in members],
                                      self._side_streams(len(members) - 1, x.device))
        return torch.stack([self._calls[m](x, timestep, **kwargs)[0] for m in members])

    def _side_streams(self, n: int, device) -> list:
        """n CUDA streams of this thread, kept for its later calls (so a warm-up prepares the streams its capture
        uses), from torch's high-priority pool (never the normal-priority pool a capture stream comes from)."""
        streams = getattr(self._local, "streams", None)
        if streams is None or len(streams) < n:
            streams = [torch.cuda.Stream(device, priority=-1) for _ in range(n)]
            self._local.streams = streams
        return streams[:n]

    def _forward_lora(self, x, timestep, kwargs, members):
        return forward_members(self._lora_call, x, timestep, kwargs, members, self.member_index(members, x.device))

    def member_index(self, members: tuple[int, ...], device) -> tuple:
        """``members``' LoRA factor selection on ``device`` (``msdda.lora.member_selection``), made once per member
        tuple: made inside a CUDA graph capture it would be a host-to-device copy, which a capture cannot hold."""
        sel = self._selections.get(members)
        if sel is None:
            with self._lock:
                sel = self._selections.setdefault(members, member_selection(members, device))
        return sel

    # ------------------------------------------------------------------ stacked parameters (vmap), soups
    def skeleton(self) -> torch.nn.Module:
        """The networks' structure on the meta device (``meta_skeleton``), built once, on first use."""
        if self._skeleton is None:
            with self._lock:
                if self._skeleton is None:
                    self._skeleton = meta_skeleton(self._nets[0])
        return self._skeleton

    def stack(self) -> tuple[dict, dict]:
        """(params, buffers) stacked over all members (torch.func.stack_module_state): a second copy of every
        weight, built at group="vmap"'s first call and kept until ``release_stack``."""
        stack = self._stack
        if stack is None:
            with self._lock:
                if self._stack is None:
                    self._stack = stack_module_state(list(self._nets))
                stack = self._stack
        return stack

    def release_stack(self) -> None:
        """Free the vmap stack (calls in flight keep theirs; the next vmap call stacks again)."""
        with self._lock:
            self._stack = None

    def _forward_vmap(self, x, timestep, kwargs, members):
        params, buffers = self.stack()
        pick = stack_index(members)
        params = {k: v[pick] for k, v in params.items()}
        buffers = {k: v[pick] for k, v in buffers.items()}
        skeleton = self.skeleton()

        def one(p, b):
            return functional_call(skeleton, (p, b), (x, timestep), kwargs)[0]

        return vmap(one)(params, buffers)

    def soup(self, coeffs: dict[int, float]):
        """One network whose parameters are sum_k c_k theta_k (rewarded soups), built from the networks' own
        parameters for this call and freed with the returned function; buffers are the first member's."""
        if self.lora_network is not None:          # LoRA members: base weights + their deltas
            params = soup_parameters(self.lora_network, self._nets[0], coeffs)
            buffers = dict(self._nets[0].named_buffers())
        else:
            named = [dict(self._nets[m].named_parameters()) for m in coeffs]
            params = {k: sum(c * p[k] for p, c in zip(named, coeffs.values())) for k in named[0]}
            buffers = dict(self._nets[next(iter(coeffs))].named_buffers())
        skeleton = self.skeleton()

        def forward(x, t, cond: Conditioning):
            timestep = timestep_batch(t, x.shape[0], x.device)
            out = functional_call(skeleton, (params, buffers), (x, timestep), unet_kwargs(cond))[0]
            return out.unsqueeze(0)

        return forward

    def resident_bytes(self) -> int:
        """Bytes of the distinct tensor storages the backend holds (networks, LoRA group network, vmap stack,
        index tensors), each storage counted once; meta tensors count nothing."""
        tensors = []
        for net in self._nets + ((self.lora_network,) if self.lora_network is not None else ()):
            tensors += list(net.parameters()) + list(net.buffers())
        if self._stack is not None:
            tensors += list(self._stack[0].values()) + list(self._stack[1].values())
        tensors += [t for sel in self._selections.values() for t in sel if t is not None]
        return storage_bytes(tensors)


def storage_bytes(tensors) -> int:
    """Total bytes of the distinct storages behind ``tensors`` (views of one storage count once; meta: 0)."""
    seen, total = set(), 0
    for t in tensors:
        if t.device.type == "meta":
            continue
        s = t.untyped_storage()
        key = (t.device, s.data_ptr())
        if key not in seen:
            seen.add(key)
            total += s.nbytes()
    return total


def stack_index(members: tuple[int, ...]):
    """An index that picks ``members`` along the stacked axis: a slice (a view) when they are an ascending run
    of indices, else the list (a copy)."""
    first = members[0]
    if members == tuple(range(first, first + len(members))):
        return slice(first, first + len(members))
    return list(members)


def forward_on_streams(calls, streams) -> torch.Tensor:
    """Run ``calls`` (each -> [N, C_out, H, W]) concurrently: the first on the current stream, the others on
    ``streams`` (len(calls) - 1 CUDA streams; None entries run on the current stream, as on the CPU), each forked
    from the current stream before any call is issued and joined back to it before the results are stacked.
    Inside a CUDA graph capture this makes one independent branch per call."""
    main = torch.cuda.current_stream() if any(s is not None for s in streams) else None
    for stream in streams:
        if stream is not None:
            stream.wait_stream(main)
    outs = [None] * len(calls)
    for i, (call, stream) in enumerate(zip(calls[1:], streams), start=1):
        with (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
            outs[i] = call()
    outs[0] = calls[0]()
    for stream in streams:
        if stream is not None:
            main.wait_stream(stream)
    return torch.stack(outs)
