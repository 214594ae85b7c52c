"""Running calls on threads at once, for the tests that check a shared object has no hidden mutable state."""
from __future__ import annotations

import threading


def run_at_once(call, jobs, *, repeats: int = 1) -> list:
    """``call(*job)`` for every job, each on its own thread, all released together by a barrier, ``repeats``
    times per thread; the results of the last round in job order. The first exception a thread raised is raised
    here."""
    results, errors = [None] * len(jobs), []
    barrier = threading.Barrier(len(jobs))

    def work(i):
        barrier.wait()
        try:
            for _ in range(repeats):
                results[i] = call(*jobs[i])
        except BaseException as exc:  # noqa: BLE001 -- surfaced below, with its message
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
