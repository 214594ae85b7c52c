"""Batch invariance (``Engine(row_block=Q)``): a sample's bits do not depend on the other samples of its call.

This is what lets ``msdda serve`` and ``msdda batch`` put requests from different users into one engine call and
still answer each with exactly what a call of its own gives. Checked on the digits zoo (a real UNet whose rows
differ in the last bits between row counts on this project's CPUs) and on a tiny text pipeline (text encoder and
VAE too), for the strategies that run the experts (msdda, mpa) and the one that averages weights (soup).
"""
from __future__ import annotations

import pytest
import torch

import msdda
from msdda import zoo
from msdda.backends import Conditioning
from msdda.engine import in_row_blocks

# Three requests as a server would see them: different sizes, labels, weights and seeds.
REQUESTS = [
    dict(class_labels=[3], weights=[{"legible": 0.7, "bold": 0.3}], seed=[5]),
    dict(class_labels=[1, 2, 7], weights=[{"bold": 1.0}] * 3, seed=[10, 11, 12]),
    dict(class_labels=[0, 9], weights=[{"legible": 0.2, "bold": 0.8}, {"legible": 0.5, "bold": 0.5}], seed=[3, 4]),
]


@pytest.fixture(scope="module")
def zoo_engine():
    paths = zoo.zoo_paths()
    return msdda.Engine.from_pretrained(paths["base"], {n: paths[n] for n in ("legible", "bold")}, row_block=4)


def _merged(requests):
    return {k: [v for r in requests for v in r[k]] for k in requests[0]}


@pytest.mark.parametrize("strategy", ["msdda", "mpa", "soup"])
def test_a_request_gets_the_same_bits_alone_or_merged(zoo_engine, strategy):
    kw = dict(steps=3, guidance_scale=zoo.DEFAULT_GUIDANCE_SCALE, strategy=strategy, output_type="latent")
    merged = zoo_engine.generate(**_merged(REQUESTS), num_images=6, **kw).latents
    start = 0
    for req in REQUESTS:
        n = len(req["seed"])
        alone = zoo_engine.generate(**req, num_images=n, **kw).latents
        assert torch.equal(merged[start:start + n], alone), (strategy, req)
        start += n
    # and in another order, where every sample sits at another row of another block
    reordered = zoo_engine.generate(**_merged(REQUESTS[::-1]), num_images=6, **kw).latents
    assert torch.equal(reordered[:2], merged[4:]) and torch.equal(reordered[2:5], merged[1:4])


def test_text_prompts_and_decoding_are_batch_invariant(tiny_sd_models):
    base, experts = tiny_sd_models
    eng = msdda.Engine.from_pretrained(base, experts, row_block=2)
    kw = dict(steps=2, guidance_scale=3.0, negative_prompt="blurry", output_type="np")
    prompts, seeds = ["a cat", "a red cube", "a dog"], [7, 8, 9]
    weights = [{"a": 0.3, "b": 0.7}, {"a": 1.0}, {"b": 1.0}]
    merged = eng.generate(prompt=prompts, weights=weights, seed=seeds, **kw).images
    for i in range(3):
        alone = eng.generate(prompt=[prompts[i]], weights=[weights[i]], seed=[seeds[i]], **kw).images
        assert (merged[i] == alone[0]).all(), prompts[i]


def test_row_blocks_cut_and_pad_every_conditioning_tensor():
    seen = []

    def call(x, t, cond):
        seen.append((x.shape[0], cond.class_labels.tolist()))
        return (x * 2 + cond.class_labels[:, None]).unsqueeze(0)

    x = torch.arange(5.0)[:, None]
    out = in_row_blocks(call, 2)(x, 10, Conditioning(class_labels=torch.arange(5)))
    assert seen == [(2, [0, 1]), (2, [2, 3]), (2, [4, 4])]       # the last block padded with its last row
    assert torch.equal(out, (x * 3).unsqueeze(0))


def test_row_block_is_checked():
    paths = zoo.zoo_paths()
    with pytest.raises(ValueError, match="row_block"):
        msdda.Engine.from_pretrained(paths["base"], row_block=0)
