"""LoRA experts as one network: the base weights once, plus a batched low-rank delta per member.

When every expert is a LoRA adapter of the base, the K networks differ only by W_k = W + up_k @ down_k on the
adapted layers. So instead of K forwards with K merged weight sets, one forward runs the base UNet on the K
member batches stacked ([G*N, ...] for G selected members), and each adapted layer adds its members' deltas:

    y[g] = W x[g] + up_g (down_g x[g])        (Linear: two batched matmuls; Conv2d: two grouped convolutions)

The members of a call travel in a ContextVar set around that one forward: it is per thread (and per asyncio
task), so concurrent calls with different members never see each other's selection. Ranks may differ between
adapters (zero-padded to the largest, which adds exact zeros), and a member with no adapter on a layer (the
base itself) has a zero delta there.
"""
from __future__ import annotations

import copy
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from msdda.loading import LORA_FACTORS_ATTR

# Member indices [G] of the forward in progress, in stacking order.
_SELECTED: ContextVar[torch.Tensor] = ContextVar("msdda_lora_selected")


def lora_factors(net: torch.nn.Module) -> dict | None:
    """The LoRA factors a merged expert carries (msdda.loading.merge_lora), or None for a full network."""
    return getattr(net, LORA_FACTORS_ATTR, None)


class _BatchedLora(torch.nn.Module):
    """A base layer plus every member's factors: down [M, r, in, *k], up [M, out, r] (zeros where a member has
    no adapter on this layer)."""

    def __init__(self, base: torch.nn.Module, down: torch.Tensor, up: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)


class BatchedLoraLinear(_BatchedLora):
    """A Linear whose input rows are G member groups; adds each group's low-rank delta (down [M, r, in])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sel = _SELECTED.get()
        y = self.base(x)
        g = sel.numel()
        xg = x.reshape(g, -1, x.shape[-1])                                   # [G, rows, in]
        h = torch.bmm(xg, self.down[sel].transpose(1, 2))                    # [G, rows, r]
        return y + torch.bmm(h, self.up[sel].transpose(1, 2)).reshape(y.shape)


class BatchedLoraConv2d(_BatchedLora):
    """A Conv2d (groups=1) whose batch is G member groups; adds each group's low-rank delta as two grouped
    convolutions over the groups laid side by side in channels (down [M, r, in, kh, kw], run with the layer's
    stride, padding and dilation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sel = _SELECTED.get()
        y = self.base(x)
        g = sel.numel()
        n, c, h, w = x.shape
        xg = x.reshape(g, n // g, c, h, w).transpose(0, 1).reshape(n // g, g * c, h, w)
        down = self.down[sel]                                                 # [G, r, in, kh, kw]
        r = down.shape[1]
        b = self.base
        mid = F.conv2d(xg, down.reshape(g * r, *down.shape[2:]), None, b.stride, b.padding, b.dilation, groups=g)
        up = self.up[sel]                                                     # [G, out, r]
        delta = F.conv2d(mid, up.reshape(g * up.shape[1], r, 1, 1), None, groups=g)   # [n/g, G*out, h', w']
        delta = delta.reshape(n // g, g, up.shape[1], *delta.shape[2:]).transpose(0, 1).reshape(y.shape)
        return y + delta


def _stack(factors: list[dict | None], name: str, layer: torch.nn.Module, device, dtype):
    """(down [M, r_max, ...], up [M, out, r_max]) of one layer over all members, zero-padded."""
    present = [f[name] for f in factors if f and name in f]
    r_max = max(p.down.shape[0] for p in present)
    down = torch.zeros(len(factors), r_max, *layer.weight.shape[1:], device=device, dtype=dtype)
    up = torch.zeros(len(factors), layer.weight.shape[0], r_max, device=device, dtype=dtype)
    for m, f in enumerate(factors):
        if f and name in f:
            r = f[name].down.shape[0]
            down[m, :r] = f[name].down.to(device, dtype)
            up[m, :, :r] = f[name].up.to(device, dtype)
    return down, up


def lora_group_network(base: torch.nn.Module, members: list[torch.nn.Module]) -> torch.nn.Module:
    """A copy of ``base`` whose adapted layers add the selected members' deltas (see the module docstring).

    members: the backend's networks in member order; each is the base itself or a merged LoRA expert of it.
    Raises ValueError when a member is neither, or an adapted layer is not a Linear or a groups=1 Conv2d."""
    factors = []
    for i, net in enumerate(members):
        f = lora_factors(net)
        if f is None and net is not base:
            raise ValueError(f"member {i} is a full network, not a LoRA adapter of the base")
        factors.append(f)
    p = next(base.parameters())
    net = copy.deepcopy(base)
    modules = dict(net.named_modules())
    for name in sorted({n for f in factors if f for n in f}):
        layer = modules[name]
        down, up = _stack(factors, name, layer, p.device, p.dtype)
        if isinstance(layer, torch.nn.Linear):
            wrapped = BatchedLoraLinear(layer, down, up)
        elif isinstance(layer, torch.nn.Conv2d) and layer.groups == 1:
            wrapped = BatchedLoraConv2d(layer, down, up)
        else:
            raise ValueError(f"LoRA on {name} ({type(layer).__name__}) cannot be batched; use group='loop'")
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else net, child, wrapped)
    return net.eval().requires_grad_(False)


def forward_members(net: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor, kwargs: dict,
                    members: tuple[int, ...], selected: torch.Tensor | None = None) -> torch.Tensor:
    """One forward of the group network for ``members``: x [N, C, H, W] -> [len(members), N, C_out, H, W].
    selected: ``members`` as an int64 tensor on x's device, if the caller keeps one (a CUDA graph capture cannot
    hold the host-to-device copy that makes it)."""
    g = len(members)
    stacked = {k: (v.repeat(g, *([1] * (v.dim() - 1))) if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    if selected is None:
        selected = torch.tensor(members, device=x.device)
    token = _SELECTED.set(selected)
    try:
        out = net(x.repeat(g, 1, 1, 1), timestep.repeat(g), **stacked)[0]
    finally:
        _SELECTED.reset(token)
    return out.reshape(g, x.shape[0], *out.shape[1:])
