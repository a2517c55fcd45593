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

__all__ = ["ordered_map", "report_fraction"]

_POLL = 0.2  # seconds between checks that the workers are alive, while waiting for them


class _Share:
    """Where this process's `report_fraction` goes: its slot of the shared fractions, and, in
    the parent, the tick that redraws the progress."""

    fractions = None
    slot = 0
    tick: Callable[[], None] | None = None


def report_fraction(fraction: float) -> None:
    """Called by the mapped function, in any process, with how far it is into its item (0..1):
    `ordered_map`'s `on_progress` counts it (a slow item moves the bar before it ends)."""
    if _Share.fractions is not None:
        _Share.fractions[_Share.slot] = min(1.0, max(0.0, fraction))
    if _Share.tick is not None:
        _Share.tick()


def _take(counter, total: int) -> int | None:
    with counter.get_lock():
        index = counter.value
        if index >= total:
            return None
        counter.value = index + 1
        return index


def _worker(initializer, initargs, items, counter, emitted, window, held, fractions, slot,
            results) -> None:  # fmt: skip
    _Share.fractions, _Share.slot = fractions, slot
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
        outcome = pickle.dumps(fn(items[index]), protocol=pickle.HIGHEST_PROTOCOL)
        fractions[slot] = 0.0  # before the outcome is sent: an item never counts twice
        results.put((index, outcome))
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
    on_progress: Callable[[float], None] | None = None,
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
        on_progress: called here with the items done so far, fractional: finished items plus
            what each process's `report_fraction` says of the item it is on (never less than
            the value before).
    """
    workers = min(jobs, len(items)) - 1
    if workers <= 0:
        yield from map(fn, items)
        return
    pool = _Pool(items, jobs, workers, initializer, initargs)
    following, shown = 0, [0.0]  # items yielded; the progress shown last

    def tick() -> None:
        if on_progress is not None:
            value = following + len(pool.done) + sum(pool.fractions)
            shown[0] = max(shown[0], min(value, len(items)))
            on_progress(shown[0])

    _Share.fractions, _Share.slot, _Share.tick = pool.fractions, workers, tick
    try:
        while following < len(items):
            pool.drain()
            tick()
            if following in pool.done:
                yield pool.done.pop(following)
                following += 1
                pool.emitted.value = following
                continue
            index = _take(pool.counter, len(items))
            if index is not None:  # this process works too
                outcome = fn(items[index])
                pool.fractions[workers] = 0.0
                pool.done[index] = outcome
            elif not pool.receive(block=True):  # nothing came: has a worker died on its item?
                pool.settle_dead(on_crash)
                if pool.all_gone():  # finish what they took here
                    pool.drain()
                    for index in range(following, len(items)):
                        if index not in pool.done:
                            pool.done[index] = fn(items[index])
    finally:
        _Share.fractions, _Share.tick = None, None
        pool.close()


class _Pool:
    """The spawned workers, the shared counter and the outcomes received so far."""

    def __init__(self, items, jobs: int, workers: int, initializer, initargs) -> None:
        ctx = multiprocessing.get_context("spawn")  # forking after torch's thread pool can hang
        self.items = items
        self.counter = ctx.Value("q", 0)
        self.emitted = ctx.Value("q", 0, lock=False)  # written here only
        self.held = ctx.Array("q", [-1] * workers)  # the item each worker is on, -1 for none
        # how far each worker (and, last, this process) is into its item; read without a lock
        self.fractions = ctx.Array("d", [0.0] * (workers + 1), lock=False)
        self.results = ctx.Queue()
        self.done: dict[int, Any] = {}
        self.settled: set[int] = set()  # workers known to be gone, their item settled
        args = (initializer, initargs, items, self.counter, self.emitted, 4 * jobs, self.held,
                self.fractions)  # fmt: skip
        self.procs = [
            ctx.Process(target=_worker, daemon=True, args=(*args, slot, self.results))
            for slot in range(workers)
        ]
        for proc in self.procs:
            proc.start()

    def receive(self, block: bool) -> bool:
        """Take one outcome from the queue (waiting up to `_POLL` s if `block`)."""
        try:
            index, outcome = self.results.get(block, _POLL) if block else self.results.get_nowait()
        except queue.Empty:
            return False
        if index is None:
            print(f"warning: a worker could not start ({outcome}); going on without it",
                  file=sys.stderr)  # fmt: skip
        else:
            self.done[index] = pickle.loads(outcome)  # bytes from our own worker
        return True

    def drain(self) -> None:
        while self.receive(block=False):
            pass

    def settle_dead(self, on_crash) -> None:
        """A worker that died on an item gives that item `on_crash`'s outcome."""
        for slot, proc in enumerate(self.procs):
            if slot not in self.settled and not proc.is_alive():
                self.settled.add(slot)
                self.fractions[slot] = 0.0
                index = self.held[slot]
                if index >= 0 and index not in self.done:
                    self.done[index] = on_crash(self.items[index], proc.exitcode)

    def all_gone(self) -> bool:
        return len(self.settled) == len(self.procs)

    def close(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join()
        self.results.close()
        self.results.cancel_join_thread()
