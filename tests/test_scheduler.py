"""``msdda.scheduler.StepScheduler``: step-level continuous batching, driven iteration by iteration (no Ray).

Requests join mid-way with different step counts, weights, strategies, guidance scales, seeds and labels; a
large one is admitted in slices. On a batch-invariant Engine (row_block, as ``msdda serve`` builds its replica's)
every result must be bit-identical to ``Engine.generate`` of that request alone; on a plain Engine equal to
float32 rounding (the twin bound, tests/tolerance.py).
"""
from __future__ import annotations

import pytest
import torch

import msdda
from msdda.scheduler import Cancelled, DeadlineExceeded, StepScheduler, default_max_rows
from msdda.zoo import OBJECTIVES, zoo_paths
from tolerance import assert_within, generate_float64, twin_bound

ROW_BLOCK = 4        # small, so that a few samples already span several row blocks


def _zoo(**kwargs):
    paths = zoo_paths()
    return msdda.Engine.from_pretrained(str(paths["base"]), {n: str(paths[n]) for n in OBJECTIVES}, **kwargs)


@pytest.fixture(scope="module")
def exact_engine():
    return _zoo(row_block=ROW_BLOCK)


# joined at iterations 0, 0, 1, 2, 2, 3: (iteration, call)
STREAM = [
    (0, {"class_labels": 3, "weights": {"legible": 0.6, "bold": 0.4}, "seed": 5, "steps": 2, "guidance_scale": 2.0}),
    (0, {"class_labels": [7, 1, 9], "weights": {"legible": 0.6, "bold": 0.4}, "seed": 11,
         "num_images": 3, "steps": 3, "guidance_scale": 2.0}),
    (1, {"class_labels": 2, "weights": {"legible": 0.5, "bold": 0.5}, "seed": 1, "steps": 2, "strategy": "mpa",
         "guidance_scale": 3.0}),
    (2, {"class_labels": [4, 4], "weights": [{"legible": 0.1, "bold": 0.9}, {"legible": 0.9, "bold": 0.1}],
         "seed": [40, 2], "num_images": 2, "steps": 2, "guidance_scale": 1.0, "eta": 0.5}),
    (2, {"class_labels": 6, "weights": {"bold": 0.5, "compressible": 0.5}, "seed": 8, "steps": 2, "strategy": "soup",
         "guidance_scale": 2.0}),
    (3, {"class_labels": 5, "weights": {"legible": 0.3, "bold": 0.7}, "seed": 3, "steps": 2,
         "guidance_scale": 2.5, "output_type": "latent"}),
]


def _drive(engine, stream, **kwargs):
    """Submit each call at its iteration, iterate until all are answered; returns (tickets, iteration infos)."""
    sched = StepScheduler(engine, **kwargs)
    tickets, infos, it = [None] * len(stream), [], 0
    while it < 100 and (sched.has_work() or any(t is None for t in tickets)):
        for k, (at, call) in enumerate(stream):
            if at == it:
                tickets[k] = sched.submit(engine.check_request(**call))
        infos.append(sched.iteration())
        it += 1
    assert all(t.done.is_set() for t in tickets)
    return tickets, infos


def test_join_midway_stream_is_bit_identical_to_generate_alone(exact_engine):
    # budget 4, at most 2 per request: the 3-image request is admitted in slices beside the others
    tickets, infos = _drive(exact_engine, STREAM, max_rows=4, max_rows_per_request=2)
    assert max(i["rows"] for i in infos) == 4 and all(i["rows"] <= 4 for i in infos)
    assert any(i["network_calls"] > 1 for i in infos)            # mpa, soup-free product groups: one call each
    for (_, call), ticket in zip(STREAM, tickets):
        assert ticket.error is None, (call, ticket.error)
        direct = exact_engine.generate(**call)
        assert torch.equal(ticket.result.latents, direct.latents), call
        assert ticket.result.seeds == direct.seeds and ticket.result.weights == direct.weights
        if call.get("output_type") != "latent":
            assert [im.tobytes() for im in ticket.result.images] == [im.tobytes() for im in direct.images]
    # requests with the same networks shared calls (several steps, guidance scales and seeds in one call)
    assert tickets[0].batch_size > 1 and tickets[5].batch_size > 1


def test_bad_requests_fail_alone(exact_engine):
    stream = [
        (0, {"class_labels": 1, "weights": {"legible": 0.5, "bold": 0.5}, "seed": 1, "steps": 3,
             "guidance_scale": 2.0}),
        (1, {"class_labels": 0, "weights": {"legible": 0.5, "bold": 0.5}, "steps": 2, "guidance_scale": 2.0,
             "expert_betas": {"legible": 50, "bold": 50, "compressible": 50}}),             # infeasible
    ]
    tickets, _ = _drive(exact_engine, stream, max_rows=8)
    assert "infeasible composition" in str(tickets[1].error)
    with pytest.raises(ValueError) as direct_error:
        exact_engine.generate(**stream[1][1])
    assert str(tickets[1].error) == str(direct_error.value)
    assert torch.equal(tickets[0].result.latents, exact_engine.generate(**stream[0][1]).latents)
    # bad arguments never reach the scheduler: the one check refuses them, and submit takes only checked requests
    with pytest.raises(ValueError, match="unknown expert 'typo'"):
        exact_engine.check_request(class_labels=0, weights={"typo": 1.0}, steps=2)
    sched = StepScheduler(exact_engine, max_rows=8)
    with pytest.raises(ValueError, match="submit takes a msdda.Request"):
        sched.submit({"class_labels": 0, "steps": 2})
    with pytest.raises(ValueError, match="submit takes a msdda.Request"):
        sched.submit(_zoo().check_request(class_labels=0, steps=2))        # another Engine's


def test_cancel_and_deadline_leave_at_the_next_iteration(exact_engine):
    sched = StepScheduler(exact_engine, max_rows=8)
    check = exact_engine.check_request
    big = sched.submit(check(class_labels=1, num_images=3, steps=50, guidance_scale=2.0))
    late = sched.submit(check(class_labels=2, steps=50, guidance_scale=2.0), timeout_s=0.0)
    small = sched.submit(check(class_labels=3, steps=2, guidance_scale=2.0, strategy="base"))
    info = sched.iteration()
    assert isinstance(late.error, DeadlineExceeded) and info["rows"] == 4        # big 3 + small 1
    big.cancel()
    info = sched.iteration()
    assert isinstance(big.error, Cancelled) and info["rows"] == 1 and info["running_samples"] == 0
    assert small.done.is_set() and small.error is None
    assert not sched.has_work()


def test_plain_engine_equals_generate_to_float32_rounding():
    """Without row blocks a row's last bits depend on the call's row count: equal to the float32 rounding of
    this computation, measured against its float64 twin."""
    engine, twin = _zoo(), _zoo(dtype=torch.float64)
    stream = [(0, {**STREAM[1][1], "steps": 2, "num_images": 2, "class_labels": [7, 1]}), (1, STREAM[0][1])]
    tickets, _ = _drive(engine, stream, max_rows=8)
    for (_, call), ticket in zip(stream, tickets):
        direct = engine.generate(**call, output_type="latent").latents
        direct64 = generate_float64(twin, **call, output_type="latent").latents
        assert_within(ticket.result.latents, direct, twin_bound(direct, direct64), what=f"scheduled {call}")


def test_default_budget_is_whole_row_blocks_with_room_beside_a_full_request():
    assert default_max_rows(16, 16) == 32 and default_max_rows(16, 4) == 32 and default_max_rows(None, 40) == 80
    assert default_max_rows(6, 16) % 6 == 0 and default_max_rows(6, 16) >= 32


def test_the_reserve_keeps_room_for_a_small_request_beside_large_ones(exact_engine):
    """Two large requests would fill the budget with their shares (2 + 2 of 4); the reserve (1 place) keeps the
    second to 1, so a 1-image request that arrives next starts at the next iteration and is answered after its
    own 2 steps, while the large ones still run. With no reserve it waits for a slice to finish."""
    large = {"class_labels": 1, "weights": {"legible": 0.5, "bold": 0.5}, "num_images": 3, "steps": 6,
             "guidance_scale": 2.0, "output_type": "latent"}
    small = {"class_labels": 2, "weights": {"legible": 0.5, "bold": 0.5}, "steps": 2, "seed": 20,
             "guidance_scale": 2.0, "output_type": "latent"}
    for reserved, small_answered in ((1, True), (0, False)):
        sched = StepScheduler(exact_engine, max_rows=4, max_rows_per_request=2, reserved_rows=reserved)
        bigs = [sched.submit(exact_engine.check_request(**large, seed=seed)) for seed in (10, 30)]
        sched.iteration()
        assert sched.counts()["running_samples"] == 4 - reserved          # large ones hold the rest
        ticket = sched.submit(exact_engine.check_request(**small))
        for _ in range(2):
            sched.iteration()
        assert ticket.done.is_set() is small_answered, reserved
        assert not any(t.done.is_set() for t in bigs)
        while sched.has_work():
            sched.iteration()
        assert ticket.error is None and all(t.error is None for t in bigs)
        direct = exact_engine.generate(**small)
        assert torch.equal(ticket.result.latents, direct.latents)          # exact whatever ran beside it
    with pytest.raises(ValueError, match="reserved_rows"):
        StepScheduler(exact_engine, max_rows=4, reserved_rows=4)
