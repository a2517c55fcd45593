"""Hook hygiene, memory and thread safety of the engine (issue: hardening)."""

from __future__ import annotations

import gc
import threading
import warnings

import pytest
import torch

from models import build_model
from tests.conftest import leftovers, randomize_bn
from viz.engine.cam import analyze
from viz.engine.trace import record_attention


def _state(model):
    return (
        {n: m.training for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


@pytest.fixture
def cbam18():
    torch.manual_seed(0)
    return randomize_bn(build_model(18, "cbam", num_classes=5)).eval()


class _Interrupt(torch.nn.Module):
    def forward(self, x):
        raise KeyboardInterrupt


def test_keyboard_interrupt_in_forward_leaves_no_hooks(cbam18):
    cbam18.train()
    before = _state(cbam18)
    cbam18.layer3.add_module("stop", _Interrupt())  # the forward of layer3 ends here
    with pytest.raises(KeyboardInterrupt):
        analyze(cbam18, torch.randn(1, 3, 32, 32))
    with pytest.raises(KeyboardInterrupt):
        with record_attention(cbam18):
            cbam18(torch.randn(1, 3, 32, 32))
    del cbam18.layer3.stop
    assert leftovers(cbam18) == 0
    assert _state(cbam18)[1] == before[1]
    modes = _state(cbam18)[0]
    assert all(modes[n] == before[0][n] for n in before[0])


def test_memory_does_not_grow_over_200_analyses(cbam18):
    x = torch.randn(1, 3, 32, 32)

    def live_tensors() -> int:
        gc.collect()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # isinstance on some torch module proxies warns
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    for _ in range(5):  # warm-up: caches, lazily created state
        analyze(cbam18, x)
    start = live_tensors()
    for _ in range(200):
        result = analyze(cbam18, x)
    del result
    assert live_tensors() - start <= 5
    assert leftovers(cbam18) == 0


def test_two_threads_give_the_same_results_as_one_at_a_time(cbam18):
    inputs = [
        torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(i)) for i in range(6)
    ]
    serial = [analyze(cbam18, x) for x in inputs]
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def work(indices):
        try:
            for i in indices:
                results[i] = analyze(cbam18, inputs[i])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(range(k, 6, 2),)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for i, expected in enumerate(serial):
        got = results[i]
        torch.testing.assert_close(got.logits, expected.logits)
        for name in expected.cams:
            torch.testing.assert_close(got.cams[name], expected.cams[name])
        assert got.trace.names == expected.trace.names
        for a, b in zip(got.trace, expected.trace):
            torch.testing.assert_close(a.spatial, b.spatial)
    assert leftovers(cbam18) == 0
