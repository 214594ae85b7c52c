"""Eager PyTorch backend: the K networks' parameters stacked once, evaluated as one group per call."""
from __future__ import annotations

import copy

import torch
from torch.func import functional_call, stack_module_state, vmap

from . import Conditioning
from .lora import forward_members, lora_group_network


def unet_kwargs(cond: Conditioning) -> dict:
    kwargs = {"return_dict": False}
    if cond.encoder_hidden_states is not None:
        kwargs["encoder_hidden_states"] = cond.encoder_hidden_states
    if cond.class_labels is not None:
        kwargs["class_labels"] = cond.class_labels
    return kwargs


def _moved(net: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """net on device/dtype; a no-op (and no diffusers dtype warning) when it is already there."""
    p = next(net.parameters())
    if p.device != device or p.dtype != dtype:
        net = net.to(device, dtype)
    return net


class TorchBackend:
    """Runs same-architecture diffusers UNets with torch.

    group="loop" calls the selected networks one after another; group="vmap" evaluates them as one vmapped
    functional call over stacked parameters (torch.func); group="lora" (every expert a LoRA adapter of the
    base, the first network) runs the selected members as one forward of the base weights on the stacked
    batches plus batched low-rank deltas (msdda.backends.lora). Chosen once here. ``compile=True`` wraps each
    network with torch.compile.
    """

    def __init__(self, networks: dict, *, device="cpu", dtype=None, group: str = "loop", compile: bool = False):
        if group not in ("loop", "vmap", "lora"):
            raise ValueError(f"group must be 'loop', 'vmap' or 'lora', not {group!r}")
        self.members = tuple(networks)
        self.device = torch.device(device)
        self.dtype = dtype or next(iter(networks.values())).dtype
        self._nets = tuple(_moved(n, self.device, self.dtype).eval().requires_grad_(False) for n in networks.values())
        self._params, self._buffers = stack_module_state(list(self._nets))
        self._skeleton = copy.deepcopy(self._nets[0]).to("meta")
        self._calls = tuple(torch.compile(n) if compile else n for n in self._nets)
        self._forward_group = {"loop": self._forward_loop, "vmap": self._forward_vmap,
                               "lora": self._forward_lora}[group]
        if group == "lora":
            try:
                net = lora_group_network(self._nets[0], list(self._nets))
            except ValueError as exc:
                raise ValueError(f"group='lora': {exc}") from None
            self._lora_net = torch.compile(net) if compile else net

    def forward(self, x: torch.Tensor, t: int, cond: Conditioning, members: tuple[int, ...]) -> torch.Tensor:
        """x [N, C, H, W], t a timestep -> [len(members), N, C_out, H, W]."""
        timestep = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
        kwargs = unet_kwargs(cond)
        if len(members) == 1:
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
        params = {k: sum(c * v[m] for m, c in coeffs.items()) for k, v in self._params.items()}
        first = next(iter(coeffs))
        buffers = {k: v[first] for k, v in self._buffers.items()}
        skeleton = self._skeleton

        def forward(x, t, cond: Conditioning):
            timestep = torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)
            out = functional_call(skeleton, (params, buffers), (x, timestep), unet_kwargs(cond))[0]
            return out.unsqueeze(0)

        return forward
