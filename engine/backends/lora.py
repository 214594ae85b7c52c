"""LoRA experts as one network: the base weights once, plus a batched low-rank delta per member.

When every expert is a LoRA adapter of the base, the K networks differ only by W_k = W + up_k @ down_k on the
adapted layers. So instead of K forwards with K merged weight sets, one forward runs the base UNet on the K
member batches stacked ([G*N, ...] for G selected members), and each adapted layer adds its members' deltas:

    y[g] = W x[g] + up_g (down_g x[g])        (Linear: two batched matmuls; Conv2d: two grouped convolutions)

The members of a call travel in a ContextVar set around that one forward: it is per thread (and per asyncio
task), so concurrent calls with different members never see each other's selection. Ranks may differ between
adapters (zero-padded to the largest, which adds exact zeros), and a member with no adapter on a layer (the
base itself) has a zero delta there.

The group network is a structural copy of the base whose layers hold the base's own parameter tensors
(``msdda.loading.shared_copy``): the base's weights are stored once, whatever K, and the adapters' factors
stacked once per adapted layer. No expert is ever merged into a full copy here.
"""
from __future__ import annotations

from contextvars import ContextVar

import torch
import torch.nn.functional as F

from msdda.loading import LoraAdapter, shared_copy

# The forward in progress: (factor rows [G], keep [G] or None) for its G member groups in stacking order. Rows
# index the adapters' stacked factors (member m >= 1 is row m - 1); the base member (0) has no row of its own:
# it borrows row 0 and its delta is multiplied by keep = 0, so no zero factors are stored for it.
_SELECTED: ContextVar[tuple] = ContextVar("msdda_lora_selected")


def member_selection(members, device) -> tuple:
    """What a forward of ``members`` selects: (factor rows [G] int64, keep [G] float or None) on ``device``."""
    rows = torch.tensor([max(m - 1, 0) for m in members], device=device)
    keep = None if 0 not in members else torch.tensor([float(m != 0) for m in members], device=device)
    return rows, keep


class _BatchedLora(torch.nn.Module):
    """A base layer plus every adapter's factors: down [K, r, in, *k], up [K, out, r] (zeros where an adapter
    does not touch this layer)."""

    def __init__(self, base: torch.nn.Module, down: torch.Tensor, up: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)


class BatchedLoraLinear(_BatchedLora):
    """A Linear whose input rows are G member groups; adds each group's low-rank delta (down [M, r, in])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sel, keep = _SELECTED.get()
        y = self.base(x)
        g = sel.numel()
        xg = x.reshape(g, -1, x.shape[-1])                                   # [G, rows, in]
        h = torch.bmm(xg, self.down[sel].transpose(1, 2))                    # [G, rows, r]
        delta = torch.bmm(h, self.up[sel].transpose(1, 2))                   # [G, rows, out]
        if keep is not None:
            delta = delta * keep.to(delta.dtype).view(g, 1, 1)
        return y + delta.reshape(y.shape)


class BatchedLoraConv2d(_BatchedLora):
    """A Conv2d (groups=1) whose batch is G member groups; adds each group's low-rank delta as two grouped
    convolutions over the groups laid side by side in channels (down [M, r, in, kh, kw], run with the layer's
    stride, padding and dilation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sel, keep = _SELECTED.get()
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
        delta = delta.reshape(n // g, g, up.shape[1], *delta.shape[2:]).transpose(0, 1)
        if keep is not None:
            delta = delta * keep.to(delta.dtype).view(g, 1, 1, 1, 1)
        return y + delta.reshape(y.shape)


def _stack(factors: list[dict | None], name: str, layer: torch.nn.Module, device, dtype):
    """(down [K, r_max, ...], up [K, out, r_max]) of one layer over the adapters, zero-padded."""
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


def lora_group_network(base: torch.nn.Module, adapters: list[LoraAdapter | None]) -> torch.nn.Module:
    """A copy of ``base`` sharing its parameters, whose adapted layers add the selected members' deltas (see the
    module docstring).

    adapters: one per member, in member order: None for the base itself, else a LoRA adapter of it. Raises
    ValueError when an adapted layer is not a Linear or a groups=1 Conv2d."""
    if adapters[0] is not None or any(a is None for a in adapters[1:]):
        raise ValueError("member 0 must be the base and every other member a LoRA adapter of it")
    factors = [a.factors for a in adapters[1:]]
    p = next(base.parameters())
    net = shared_copy(base)
    modules = dict(net.named_modules())
    for name in sorted({n for f in factors if f for n in f}):
        layer = modules.get(name)
        if layer is None:
            raise ValueError(f"LoRA targets {name!r}, which the base does not have")
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


def soup_parameters(net: torch.nn.Module, base: torch.nn.Module, coeffs: dict[int, float]) -> dict[str, torch.Tensor]:
    """The parameters of sum_m c_m theta_m over LoRA members of a group network ``net`` built on ``base``:
    (sum c) W everywhere, plus sum_m c_m up_m @ down_m on the adapted layers. Built per call (a soup needs one
    full network), never stored."""
    total = sum(coeffs.values())
    params = {k: total * v for k, v in base.named_parameters()}
    for name, layer in net.named_modules():
        if isinstance(layer, _BatchedLora):
            key = f"{name}.weight"
            w = params[key]
            for m, c in coeffs.items():
                if m:                                       # member m >= 1 is adapter row m - 1
                    w = w + c * (layer.up[m - 1] @ layer.down[m - 1].flatten(1)).reshape(w.shape)
            params[key] = w
    return params


def _repeat(value, g: int):
    """A conditioning tensor (or a dict of them: SDXL's added_cond_kwargs) stacked for g member groups."""
    if torch.is_tensor(value):
        return value.repeat(g, *([1] * (value.dim() - 1)))
    if isinstance(value, dict):
        return {k: _repeat(v, g) for k, v in value.items()}
    return value


def forward_members(net: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor, kwargs: dict,
                    members: tuple[int, ...], selected: torch.Tensor | None = None) -> torch.Tensor:
    """One forward of the group network for ``members``: x [N, C, H, W] -> [len(members), N, C_out, H, W].
    selected: ``member_selection(members, x.device)``, if the caller keeps one (a CUDA graph capture cannot hold
    the host-to-device copies that make it)."""
    g = len(members)
    stacked = {k: _repeat(v, g) for k, v in kwargs.items()}
    token = _SELECTED.set(selected if selected is not None else member_selection(members, x.device))
    try:
        out = net(x.repeat(g, 1, 1, 1), timestep.repeat(g), **stacked)[0]
    finally:
        _SELECTED.reset(token)
    return out.reshape(g, x.shape[0], *out.shape[1:])
