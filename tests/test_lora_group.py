"""LoRA experts as the base plus batched low-rank deltas (msdda.backends.lora, TorchBackend group="lora"):
the same outputs as K forwards of the merged experts, for any member subset, from concurrent threads.

W x + up (down x) and (W + up down) x are equal in exact arithmetic only; in float32 they round differently. The
bound for lora vs loop is the loop path's own float32 error, measured against its float64 twin (the same
networks loaded in float64), x TWIN_MULTIPLE (tests/tolerance.py)."""
from __future__ import annotations


import pytest
import torch

import msdda
from msdda.backends import Conditioning
from tiny_models import make_tiny_unet2d, perturbed_copy, write_lora_adapter
from threads import run_at_once
from tolerance import assert_differ, assert_within, generate_float64, twin_bound

SUBSETS = [(0, 1, 2), (1, 2), (2,), (0, 2), (2, 1)]


@pytest.fixture(scope="module")
def sd_lora(tmp_path_factory, tiny_sd_models):
    root = tmp_path_factory.mktemp("sdlora")
    base = tiny_sd_models[0]
    experts = {"a": write_lora_adapter(base, root / "a", seed=1, rank=2),
               "b": write_lora_adapter(base, root / "b", seed=2, rank=4)}
    return base, experts


def _engines(base, experts, **kw):
    loop = msdda.Engine.from_pretrained(base, experts, **kw)
    lora = msdda.Engine.from_pretrained(base, experts, group="lora", **kw)
    return loop, lora


def _inputs(engine, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *engine.sample_shape, generator=g)
    emb = engine.encode_prompt(["a cat", "", "two dogs"][:n] + [""] * max(0, n - 3))
    return x, Conditioning(encoder_hidden_states=emb)


def _float64(x, cond):
    """The same inputs in float64 (exact: float32 values are float64 values)."""
    return x.double(), Conditioning(**{k: (v.double() if v is not None and v.is_floating_point() else v)
                                       for k, v in vars(cond).items()})


def test_forward_matches_merged_experts_for_every_member_subset(sd_lora):
    base, experts = sd_lora
    loop, lora = _engines(base, experts)
    loop64 = msdda.Engine.from_pretrained(base, experts, dtype=torch.float64)
    x, cond = _inputs(loop)
    x64, cond64 = _float64(x, cond)
    with torch.inference_mode():
        for members in SUBSETS:
            ref = loop.backend.forward(x, 700, cond, members)
            out = lora.backend.forward(x, 700, cond, members)
            assert out.shape == ref.shape == (len(members), *ref.shape[1:])
            tol = twin_bound(ref, loop64.backend.forward(x64, 700, cond64, members))
            assert_within(out, ref, tol, f"members {members}")
        # the experts differ from the base and from each other by far more than the tolerance, so a missing
        # or misrouted delta (lora giving the base's or the other expert's output) fails the check above
        full = loop.backend.forward(x, 700, cond, (0, 1, 2))
        tol = twin_bound(full, loop64.backend.forward(x64, 700, cond64, (0, 1, 2)))
        assert_differ(full[1], full[0], tol, "expert a vs base")
        assert_differ(full[2], full[1], tol, "expert b vs expert a")


def test_generate_matches_loop(sd_lora):
    base, experts = sd_lora
    loop, lora = _engines(base, experts)
    loop64 = msdda.Engine.from_pretrained(base, experts, dtype=torch.float64)
    kw = dict(prompt=["a cat", "a dog"], weights={"a": 0.3, "b": 0.7}, steps=3, seed=[1, 2], output_type="latent")
    ref = loop.generate(**kw).latents
    tol = twin_bound(ref, generate_float64(loop64, **kw).latents)
    assert_within(lora.generate(**kw).latents, ref, tol, "lora vs loop, 3 steps")


def test_concurrent_calls_keep_their_own_members(sd_lora):
    """The member selection is per thread: threads with different subsets, interleaved, give exactly what the
    same lora forward gives when called alone (the same operations on the same inputs in one process: equal
    bitwise; the subsets' outputs differ, so a selection leaking between threads cannot pass)."""
    base, experts = sd_lora
    lora = msdda.Engine.from_pretrained(base, experts, group="lora")
    x, cond = _inputs(lora)
    with torch.inference_mode():
        refs = {m: lora.backend.forward(x, 500, cond, m) for m in SUBSETS}
    assert not torch.equal(refs[(1, 2)], refs[(2, 1)]) and not torch.equal(refs[(1, 2)], refs[(0, 2)])

    def forward(members):
        with torch.inference_mode():
            return [lora.backend.forward(x, 500, cond, members) for _ in range(4)]

    for members, outs in zip(SUBSETS, run_at_once(forward, [(m,) for m in SUBSETS])):
        assert all(torch.equal(out, refs[members]) for out in outs), members


def test_conv_only_adapter_on_a_pixel_unet(tmp_path):
    """Conv2d adapters (grouped-convolution path) on a class-conditional UNet2DModel."""
    base = make_tiny_unet2d(tmp_path / "base", num_class_embeds=11, sample_size=8)
    experts = {"c": write_lora_adapter(base, tmp_path / "c", seed=3, rank=3, suffixes=("conv1", "conv2"))}
    loop, lora = _engines(base, experts)
    loop64 = msdda.Engine.from_pretrained(base, experts, dtype=torch.float64)
    x = torch.randn(4, *loop.sample_shape, generator=torch.Generator().manual_seed(0))
    cond = Conditioning(class_labels=torch.tensor([0, 3, 10, 7]))
    with torch.inference_mode():
        ref = loop.backend.forward(x, 300, cond, (0, 1))
        tol = twin_bound(ref, loop64.backend.forward(x.double(), 300, cond, (0, 1)))
        assert_within(lora.backend.forward(x, 300, cond, (0, 1)), ref, tol, "conv-only lora vs loop")
        assert_differ(ref[1], ref[0], tol, "conv expert vs base")


def test_full_network_expert_is_refused(tmp_path):
    base = make_tiny_unet2d(tmp_path / "base")
    full = perturbed_copy(base, tmp_path / "full", seed=1)
    with pytest.raises(ValueError, match="group='lora': member 1 is a full network"):
        msdda.Engine.from_pretrained(base, {"f": full}, group="lora")


def _adapter(path, tensors):
    from safetensors.torch import save_file

    path.mkdir()
    save_file(tensors, path / "pytorch_lora_weights.safetensors")
    return path


@pytest.mark.parametrize("case, message", [
    ("shape", "LoRA for down_blocks.0.resnets.0.conv1 has shape"),
    ("incomplete", "incomplete LoRA pair for down_blocks.0.resnets.0.conv1"),
    ("target", "LoRA targets 'down_blocks.0.resnets.0.nope'"),
    ("corrupt", "unreadable LoRA weights"),
])
def test_bad_lora_adapters_are_one_line_errors(tmp_path, case, message):
    from msdda.loading import LoadError

    base = make_tiny_unet2d(tmp_path / "base")
    conv = "unet.down_blocks.0.resnets.0.conv1"       # weight [16, 16, 3, 3]
    good_down, good_up = torch.randn(2, 16, 3, 3), torch.randn(16, 2, 1, 1)
    if case == "corrupt":
        (tmp_path / "x").mkdir()
        (tmp_path / "x" / "pytorch_lora_weights.safetensors").write_bytes(b"\x00garbage")
        folder = tmp_path / "x"
    else:
        tensors = {"shape": {f"{conv}.lora.down.weight": torch.randn(2, 15, 3, 3), f"{conv}.lora.up.weight": good_up},
                   "incomplete": {f"{conv}.lora.down.weight": good_down},
                   "target": {"unet.down_blocks.0.resnets.0.nope.lora.down.weight": good_down,
                              "unet.down_blocks.0.resnets.0.nope.lora.up.weight": good_up}}[case]
        folder = _adapter(tmp_path / "x", tensors)
    with pytest.raises(LoadError, match=message) as info:
        msdda.Engine.from_pretrained(base, {"x": folder})
    assert "\n" not in str(info.value)


def test_lora_on_a_layer_that_is_not_linear_or_conv_is_refused(tmp_path):
    """An adapter on the class embedding (an Embedding) is a one-line LoadError naming the layer, at load."""
    from msdda.loading import LoadError

    base = make_tiny_unet2d(tmp_path / "base", num_class_embeds=11)
    folder = _adapter(tmp_path / "emb", {"unet.class_embedding.lora.down.weight": torch.randn(2, 64),
                                         "unet.class_embedding.lora.up.weight": torch.randn(11, 2)})
    for group in ("loop", "lora"):
        with pytest.raises(LoadError, match=r"LoRA on class_embedding \(Embedding\) is not supported"):
            msdda.Engine.from_pretrained(base, {"e": folder}, group=group)
