"""`viz.commands.parallel.ordered_map`: outcomes in order whoever computes them; dead or failed workers."""

import os
import time
from pathlib import Path

from viz.commands.parallel import ordered_map


def _square(item):
    return item[1] * item[1]


def _slow_square(item):
    time.sleep(0.05)
    return _square(item)


def _start(flag: str):
    Path(flag).touch()  # tells the test's main process that the worker is running
    return _worker_square


def _worker_square(item):
    if item[1] == 1:
        os._exit(3)  # a worker that dies on item 1
    return _slow_square(item)


def _cannot_start(flag: str):
    Path(flag).touch()
    raise RuntimeError("no GPU here")


def _crashed(item, code):
    return ("crashed", item[1], code)


def _parent(flag: str):
    def fn(item):
        if item[1] == 0:  # keep this process busy until the worker runs, so it takes item 1
            deadline = time.time() + 60
            while not Path(flag).exists() and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
        return _slow_square(item)

    return fn


def test_outcomes_come_in_input_order_whoever_computes_them(tmp_path):
    items = [(str(tmp_path), i) for i in range(30)]
    flag = str(tmp_path / "started")
    got = list(ordered_map(_slow_square, items, 2, initializer=_start, initargs=(flag,),
                           on_crash=_crashed))  # fmt: skip
    # the worker dies on item 1 if it takes it; otherwise this process squared it
    assert got[0] == 0 and got[2:] == [i * i for i in range(2, 30)]
    assert got[1] in (1, ("crashed", 1, 3))


def test_a_worker_that_dies_gives_its_item_a_crash_outcome_and_the_rest_go_on(tmp_path):
    flag = str(tmp_path / "started")
    items = [(flag, i) for i in range(12)]
    got = list(ordered_map(_parent(flag), items, 2, initializer=_start, initargs=(flag,),
                           on_crash=_crashed))  # fmt: skip
    assert got[1] == ("crashed", 1, 3)
    assert got[:1] + got[2:] == [i * i for i in range(12) if i != 1]


def test_a_worker_that_cannot_start_leaves_the_work_to_this_process(tmp_path, capsys):
    flag = str(tmp_path / "started")
    items = [(flag, i) for i in range(5)]
    got = list(ordered_map(_parent(flag), items, 2, initializer=_cannot_start, initargs=(flag,),
                           on_crash=_crashed))  # fmt: skip
    assert got == [i * i for i in range(5)]
    assert "worker could not start (RuntimeError: no GPU here)" in capsys.readouterr().err


def test_one_job_runs_here():
    assert list(ordered_map(_square, [("", 2), ("", 3)], 1, initializer=_start,
                            on_crash=_crashed)) == [4, 9]  # fmt: skip


def _start_tensors(flag: str):
    Path(flag).touch()
    return _tensor_of


def _tensor_of(item):
    import torch

    return {"map": torch.full((64, 64), float(item[1])), "index": item[1]}


def test_tensors_from_a_worker_that_has_exited_arrive_intact(tmp_path):
    # the worker takes items 1..5 while this process is held on item 0, and exits before this
    # process reads its tensors: they must not depend on the worker's shared memory
    flag = str(tmp_path / "started")
    items = [(flag, i) for i in range(6)]

    def here(item):
        _parent(flag)(item)
        time.sleep(1.0)  # the worker has finished and exited by now
        return _tensor_of(item)

    got = list(ordered_map(here, items, 2, initializer=_start_tensors, initargs=(flag,),
                           on_crash=_crashed))  # fmt: skip
    assert [g["index"] for g in got] == list(range(6))
    assert all(float(g["map"].mean()) == i for i, g in enumerate(got))


def _halfway_then_square(item):
    from viz.commands.parallel import report_fraction

    report_fraction(0.5)
    time.sleep(0.6)  # long enough for the parent's poll to see the worker half-way
    return _square(item)


def _start_halfway(flag: str):
    Path(flag).touch()
    return _halfway_then_square


def test_progress_counts_each_process_inside_its_item(tmp_path):
    """A slow item moves the bar before it ends, whichever process runs it; never backwards."""
    flag = str(tmp_path / "started")
    items = [("", k) for k in range(4)]
    seen: list[float] = []
    # this process reports nothing of its own items: any fraction seen is the worker's
    got = list(ordered_map(_parent(flag), items, 2, initializer=_start_halfway,
                           initargs=(flag,), on_crash=_crashed, on_progress=seen.append))  # fmt: skip
    assert got == [0, 1, 4, 9]
    assert seen == sorted(seen) and seen[-1] == 4
    assert any(v % 1 for v in seen)  # the worker's item under way was counted
