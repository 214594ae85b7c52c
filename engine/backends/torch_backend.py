"""Eager PyTorch backend: the K networks evaluated as one group per call (a loop, a vmap over stacked parameters,
or, for LoRA experts, one forward of the base weights with batched low-rank deltas)."""
from __future__ import annotations

import copy

import torch
from torch.func import functional_call, stack_module_state, vmap

from msdda.loading import LoraAdapter, merged_network

from . import Conditioning
from .lora import forward_members, lora_group_network, soup_parameters


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


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared parameters counted once; meta
    tensors hold none)."""
    seen, total = set(), 0
    for t in tensors:
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def _moved(net: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """net on device/dtype; a no-op (and no diffusers dtype warning) when it is already there."""
    p = next(net.parameters())
    if p.device != device or p.dtype != dtype:
        net = net.to(device, dtype)
    return net


class TorchBackend:
    """Runs same-architecture diffusers UNets with torch.

    ``networks``: {member name: module or LoraAdapter}; the first is the base, a module, and every adapter is a
    LoRA of it. group="loop" calls the selected networks one after another; group="vmap" evaluates them as one
    vmapped functional call over stacked parameters (torch.func); under both, LoRA adapters are merged into full
    networks here (sharing the base's unadapted tensors). group="lora" (every expert a LoRA adapter) runs the
    selected members as one forward of the base weights on the stacked batches plus batched low-rank deltas
    (msdda.backends.lora): the base's parameters are held once and no expert is merged, except per call for a
    soup. Chosen once here. ``compile=True`` wraps each network with torch.compile.
    """

    def __init__(self, networks: dict, *, device="cpu", dtype=None, group: str = "loop", compile: bool = False):
        if group not in ("loop", "vmap", "lora"):
            raise ValueError(f"group must be 'loop', 'vmap' or 'lora', not {group!r}")
        self.members = tuple(networks)
        self.device = torch.device(device)
        nets = list(networks.values())
        if isinstance(nets[0], LoraAdapter):
            raise ValueError("the first network (the base) must be a module, not a LoRA adapter")
        self.dtype = dtype or nets[0].dtype
        base = _moved(nets[0], self.device, self.dtype).eval().requires_grad_(False)
        self._params = self._buffers = None
        if group == "lora":
            adapters = [None]
            for i, net in enumerate(nets[1:], 1):
                if not isinstance(net, LoraAdapter):
                    raise ValueError(f"group='lora': member {i} is a full network, not a LoRA adapter of the base")
                adapters.append(net)
            try:
                group_net = lora_group_network(base, adapters)
            except ValueError as exc:
                raise ValueError(f"group='lora': {exc}") from None
            self._nets = (base,)
            self._lora_net = torch.compile(group_net) if compile else group_net
            self._lora_group = group_net
            # the base alone runs as itself; an expert alone (expert:NAME) runs through the group network
            base_call = torch.compile(base) if compile else base
            self._calls = (base_call,) + (None,) * len(adapters[1:])
        else:
            full = [base] + [merged_network(base, n) if isinstance(n, LoraAdapter) else n for n in nets[1:]]
            self._nets = tuple(_moved(n, self.device, self.dtype).eval().requires_grad_(False) for n in full)
            if group == "vmap":      # the stacked copy only where a strategy runs on it
                self._params, self._buffers = stack_module_state(list(self._nets))
            self._calls = tuple(torch.compile(n) if compile else n for n in self._nets)
        self._skeleton = copy.deepcopy(self._nets[0]).to("meta")
        self._forward_group = {"loop": self._forward_loop, "vmap": self._forward_vmap,
                               "lora": self._forward_lora}[group]

    def resident_bytes(self) -> int:
        """Bytes of every parameter and buffer this backend keeps (each storage once)."""
        tensors = [t for n in (*self._nets, getattr(self, "_lora_group", None)) if n is not None
                   for t in (*n.parameters(), *n.buffers())]
        for stacked in (self._params, self._buffers):
            tensors.extend((stacked or {}).values())
        return tensor_bytes(tensors)

    def forward(self, x: torch.Tensor, t: int, cond: Conditioning, members: tuple[int, ...]) -> torch.Tensor:
        """x [N, C, H, W], t a timestep -> [len(members), N, C_out, H, W]."""
        timestep = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
        kwargs = unet_kwargs(cond)
        if len(members) == 1 and self._calls[members[0]] is not None:
            return self._calls[members[0]](x, timestep, **kwargs)[0].unsqueeze(0)
        return self._forward_group(x, timestep, kwargs, members)

    def _forward_loop(self, x, timestep, kwargs, members):
        return torch.stack([self._calls[m](x, timestep, **kwargs)[0] for m in members])

    def _forward_lora(self, x, timestep, kwargs, members):
        return forward_members(self._lora_net, x, timestep, kwargs, members)

    def _forward_vmap(self, x, timestep, kwargs, members):
        index = list(members)
        params = {k: v[index] for k, v in self._params.items()}
        buffers = {k: v[index] for k, v in self._buffers.items()}

        def one(p, b):
            return functional_call(self._skeleton, (p, b), (x, timestep), kwargs)[0]

        return vmap(one)(params, buffers)

    def soup(self, coeffs: dict[int, float]):
        """One network whose parameters are sum_k c_k theta_k (rewarded soups). Built per call, never stored."""
        if hasattr(self, "_lora_group"):                # LoRA members: base weights + their deltas
            params = soup_parameters(self._lora_group, self._nets[0], coeffs)
            buffers = dict(self._nets[0].named_buffers())
        else:
            named = {m: dict(self._nets[m].named_parameters()) for m in coeffs}
            params = {k: sum(c * named[m][k] for m, c in coeffs.items()) for k in named[next(iter(coeffs))]}
            buffers = dict(self._nets[next(iter(coeffs))].named_buffers())
        skeleton = self._skeleton

        def forward(x, t, cond: Conditioning):
            timestep = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
            out = functional_call(skeleton, (params, buffers), (x, timestep), unet_kwargs(cond))[0]
            return out.unsqueeze(0)

        return forward
