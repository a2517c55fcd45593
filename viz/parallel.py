"""One function over many items on every core, outcomes in input order (`export --jobs`).

This process works on items from the first moment; `jobs - 1` spawned workers join as soon as
their `initializer` has run (they import torch and read the checkpoints again: seconds). Every
process takes the next untaken item from a shared counter only when it is free, so no item
waits in a busy worker's queue while another process idles, as the last items of a
`ProcessPoolExecutor` run do. A worker that dies is noticed: the item it held gets
`on_crash(item, exit_code)` as its outcome, and items no live worker can finish are done here.

Outcomes cross the process boundary as plain pickled bytes (`pickle.dumps`, torch tensors by
value): the queue's own pickler would send tensors through torch's file-descriptor sharing,
whose storage is gone once the worker exits, before the parent has read it.
"""

from __future__ import annotations

import multiprocessing
import pickle
import queue
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["ordered_map"]

_POLL = 0.2  # seconds between checks that the workers are alive, while waiting for them


def _take(counter, total: int) -> int | None:
    with counter.get_lock():
        index = counter.value
        if index >= total:
            return None
        counter.value = index + 1
        return index


def _worker(initializer, initargs, items, counter, emitted, window, held, slot, results) -> None:
    try:
        fn = initializer(*initargs)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which goes on alone
        text = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        results.put((None, text))
        return
    total = len(items)
    while True:
        # stay at most `window` items ahead of what the parent has written
        while counter.value < total and counter.value >= emitted.value + window:
            time.sleep(0.02)
        index = _take(counter, total)
        if index is None:
            break
        held[slot] = index
        results.put((index, pickle.dumps(fn(items[index]), protocol=pickle.HIGHEST_PROTOCOL)))
        held[slot] = -1
    results.close()
    results.join_thread()


def ordered_map(
    fn: Callable[[Any], Any],
    items: Sequence,
    jobs: int,
    *,
    initializer: Callable[..., Callable[[Any], Any]],
    initargs: tuple = (),
    on_crash: Callable[[Any, int | None], Any],
) -> Iterator[Any]:
    """Yield `fn(item)` for every item, in order, computed here and in `jobs - 1` workers.

    Args:
        fn: what this process runs on an item.
        items: picklable items (sent to each worker once).
        jobs: processes in all, this one included.
        initializer: run once in each spawned worker with `initargs`; returns the function the
            worker runs on an item (its outcomes must equal `fn`'s for the output to be the
            same whatever `jobs`). If it raises, that worker stops and the others go on.
        on_crash: the outcome of an item whose worker died while on it (exit code or None).
    """
    total = len(items)
    workers = min(jobs, total) - 1
    if workers <= 0:
        yield from map(fn, items)
        return
    ctx = multiprocessing.get_context("spawn")  # forking after torch's thread pool can hang
    counter = ctx.Value("q", 0)
    emitted = ctx.Value("q", 0, lock=False)  # written here only
    held = ctx.Array("q", [-1] * workers)  # the item each worker is on, -1 for none
    results = ctx.Queue()
    window = 4 * jobs
    procs = [
        ctx.Process(
            target=_worker,
            daemon=True,
            args=(initializer, initargs, items, counter, emitted, window, held, slot, results),
        )  # fmt: skip
        for slot in range(workers)
    ]
    for p in procs:
        p.start()
    done: dict[int, Any] = {}
    settled: set[int] = set()  # workers known to be gone, their item settled

    def receive(block: bool) -> bool:
        try:
            index, outcome = results.get(block, _POLL) if block else results.get_nowait()
        except queue.Empty:
            return False
        if index is None:
            print(f"warning: a worker could not start ({outcome}); going on without it",
                  file=sys.stderr)  # fmt: skip
        else:
            done[index] = pickle.loads(outcome)  # bytes from our own worker
        return True

    try:
        following = 0
        while following < total:
            while receive(block=False):
                pass
            if following in done:
                yield done.pop(following)
                following += 1
                emitted.value = following
                continue
            index = _take(counter, total)
            if index is not None:
                done[index] = fn(items[index])
                continue
            if receive(block=True):
                continue
            for slot, p in enumerate(procs):  # nothing came: has a worker died on its item?
                if slot not in settled and not p.is_alive():
                    settled.add(slot)
                    index = held[slot]
                    if index >= 0 and index not in done:
                        done[index] = on_crash(items[index], p.exitcode)
            if len(settled) == workers:  # no worker left: finish what they took here
                while receive(block=False):
                    pass
                for index in range(following, total):
                    if index not in done:
                        done[index] = fn(items[index])
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join()
        results.close()
        results.cancel_join_thread()
