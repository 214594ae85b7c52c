"""The torch backend stores the weights once (issue 10 item 4): the parameter bytes reachable from the backend
are at most 1.05x the networks' own, for group="loop", for group="vmap" until its first call and after
``release_stack``, and around soups (built per call from the networks' own parameters). Also: the same outputs
as before for every group and for soups, timesteps given as device tensors (what a CUDA graph passes), and the
per-stream forward that a capture uses."""
from __future__ import annotations

import threading

import pytest
import torch

from msdda.backends import Conditioning
from msdda.backends.torch_backend import TorchBackend, forward_on_streams, meta_skeleton, storage_bytes
from tiny_models import tiny_unet2d_config


def _nets(n=3, seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return {name: UNet2DModel(**tiny_unet2d_config(num_class_embeds=11)).eval() for name in ["base", "a", "b"][:n]}


def reachable_tensors(root) -> list[torch.Tensor]:
    """Every tensor reachable from ``root`` through attributes, modules, dicts, lists, tuples and sets (a walk
    independent of the backend's own accounting: a hidden second copy anywhere would show up)."""
    seen, out, todo = set(), [], [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            out.append(obj)
        elif isinstance(obj, dict):
            todo += list(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo += list(obj)
        elif hasattr(obj, "__dict__") and not callable(obj) or isinstance(obj, torch.nn.Module):
            todo += list(vars(obj).values())
    return out


def own_bytes(nets) -> int:
    return storage_bytes([t for n in nets.values() for t in list(n.parameters()) + list(n.buffers())])


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 1, 8, 8, generator=g), Conditioning(class_labels=torch.tensor([0, 3, 10, 7]))


def test_loop_backend_holds_the_networks_once():
    nets = _nets()
    be = TorchBackend(nets)
    own = own_bytes(nets)
    reach = storage_bytes(reachable_tensors(be))
    assert own <= reach <= 1.05 * own, (reach, own)
    assert be.resident_bytes() == reach
    # the walk finds a copy when there is one: the old construction stacked every parameter a second time
    from torch.func import stack_module_state

    be.hidden = stack_module_state(list(nets.values()))
    assert storage_bytes(reachable_tensors(be)) >= 1.9 * own


class TimeConv(torch.nn.Module):
    """A small network with the UNets' call signature that torch.func.vmap can run (diffusers' UNets cannot be
    vmapped on torch 2.13: group_norm asks is_contiguous inside vmap, 'NYI')."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.emb = torch.nn.Embedding(11, 2)
        self.register_buffer("scale", torch.tensor(1e-3))
        self.dtype = torch.float32       # diffusers' ModelMixin.dtype, which the backend reads

    def forward(self, x, timestep, class_labels=None, return_dict=False):
        h = self.conv(x) * (timestep * self.scale)[:, None, None, None]
        return (h + self.emb(class_labels)[:, :, None, None],)


def test_vmap_stacks_lazily_and_frees(inputs):
    torch.manual_seed(0)
    nets = {n: TimeConv().eval() for n in ("base", "a", "b")}
    be = TorchBackend(nets, group="vmap")
    own = own_bytes(nets)
    assert storage_bytes(reachable_tensors(be)) <= 1.05 * own          # nothing stacked before the first call
    x, cond = inputs
    with torch.inference_mode():
        loop = TorchBackend(nets).forward(x, 500, cond, (0, 1, 2))
        out = be.forward(x, 500, cond, (0, 1, 2))
        sub = be.forward(x, 500, cond, (2, 0))                          # not a run of indices: an index copy
        run = be.forward(x, 500, cond, (1, 2))                          # a run: a view of the stack
    torch.testing.assert_close(out, loop, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sub, loop[[2, 0]], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(run, loop[1:], rtol=1e-6, atol=1e-6)
    assert storage_bytes(reachable_tensors(be)) >= 1.9 * own            # the stack: a second copy, while kept
    be.release_stack()
    assert storage_bytes(reachable_tensors(be)) <= 1.05 * own


def test_soup_is_built_per_call_from_the_networks_own_parameters(inputs):
    nets = _nets()
    be = TorchBackend(nets)
    own = own_bytes(nets)
    x, cond = inputs
    coeffs = {1: 0.25, 2: 0.75}
    soup = be.soup(coeffs)
    with torch.inference_mode():
        got = soup(x, 300, cond)
    # the definition: a network whose parameters are sum_k c_k theta_k, built by hand
    from diffusers import UNet2DModel

    ref_net = UNet2DModel(**tiny_unet2d_config(num_class_embeds=11)).eval()
    state = {k: 0.25 * nets["a"].state_dict()[k] + 0.75 * nets["b"].state_dict()[k]
             if nets["a"].state_dict()[k].is_floating_point() else nets["a"].state_dict()[k]
             for k in nets["a"].state_dict()}
    ref_net.load_state_dict(state)
    with torch.inference_mode():
        ref = ref_net(x, torch.full((4,), 300.0), class_labels=cond.class_labels).sample
    torch.testing.assert_close(got[0], ref, rtol=1e-5, atol=1e-5)
    del soup
    assert storage_bytes(reachable_tensors(be)) <= 1.05 * own           # the averaged weights went with the call


def test_skeleton_copies_no_weights():
    net = _nets(1)["base"]
    sk = meta_skeleton(net)
    assert all(p.device.type == "meta" for p in list(sk.parameters()) + list(sk.buffers()))
    assert [n for n, _ in sk.named_parameters()] == [n for n, _ in net.named_parameters()]
    assert all(p.device.type == "cpu" for p in net.parameters())        # the original is untouched


def test_device_timestep_gives_the_same_bits(inputs):
    """What a CUDA graph passes (a float32 one-element tensor, read from the device timestep table) gives the
    bits the eager loop's python timestep gives."""
    be = TorchBackend(_nets())
    x, cond = inputs
    table = torch.tensor([999.0, 500.0, 1.0])
    with torch.inference_mode():
        for i, t in enumerate((999, 500, 1)):
            a = be.forward(x, t, cond, (0, 2))
            b = be.forward(x, table.index_select(0, torch.tensor([i])), cond, (0, 2))
            assert torch.equal(a, b)
            assert torch.equal(be.forward(x, t, cond, (1,)), be.forward(x, table[i:i + 1], cond, (1,)))


def test_forward_on_streams_without_streams_is_the_stack(inputs):
    """The per-stream forward (used while a capture runs) with no streams (the CPU): the loop's stack, bit for
    bit, in member order."""
    nets = _nets()
    be = TorchBackend(nets)
    x, cond = inputs
    ts = torch.full((4,), 700.0)
    with torch.inference_mode():
        calls = [lambda n=n: n(x, ts, class_labels=cond.class_labels, return_dict=False)[0] for n in nets.values()]
        assert torch.equal(forward_on_streams(calls, [None, None]), be.forward(x, 700, cond, (0, 1, 2)))
    assert be.streams and not TorchBackend(nets, streams=False).streams and not TorchBackend(nets, group="vmap").streams


def test_lora_selection_is_made_once_per_member_tuple(tmp_path):
    """group='lora' keeps each member tuple's index tensor (a capture cannot hold the copy that makes it)."""
    import msdda
    from tiny_models import make_tiny_unet2d, write_lora_adapter

    base = make_tiny_unet2d(tmp_path / "base", num_class_embeds=11)
    eng = msdda.Engine.from_pretrained(base, {"c": write_lora_adapter(base, tmp_path / "c", seed=3, rank=2,
                                                                      suffixes=("conv1",))}, group="lora")
    be = eng.backend
    x = torch.randn(2, 1, 8, 8)
    cond = Conditioning(class_labels=torch.tensor([1, 2]))
    with torch.inference_mode():
        first = be.forward(x, 10, cond, (0, 1))
        sel = be.member_index((0, 1), x.device)
        assert torch.equal(be.forward(x, 10, cond, (0, 1)), first) and be.member_index((0, 1), x.device) is sel
    rows, keep = sel                                     # the base borrows row 0 and keeps none of its delta
    assert rows.tolist() == [0, 0] and keep.tolist() == [0.0, 1.0]
    rows, keep = be.member_index((1,), x.device)
    assert rows.tolist() == [0] and keep is None


def test_concurrent_vmap_calls_share_one_stack(inputs):
    nets = {n: TimeConv() for n in ("base", "a")}
    be = TorchBackend(nets, group="vmap")
    x, cond = inputs
    stacks, barrier = [], threading.Barrier(4)

    def worker():
        barrier.wait()
        stacks.append(id(be.stack()))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(stacks)) == 1
