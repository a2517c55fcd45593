"""Taps (`viz.engine.taps`) and hooks kept for many traces (`viz.engine.trace.attention_hooks`)."""

import pytest
import torch
from torch import nn

from tests.conftest import leftovers
from viz.engine.cam import analyze
from viz.engine.taps import tap
from viz.engine.trace import attention_hooks, record_attention


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.factor = nn.Parameter(torch.tensor(2.0))

    def forward(self, x, shift=0.0):
        return x * self.factor + shift


def test_a_tap_sees_each_call_and_changes_nothing():
    module = Scale()
    calls = []
    before = tap(module, before=lambda m, args, kwargs: calls.append(("before", args, kwargs)))
    after = tap(module, after=lambda m, args, out: calls.append(("after", args, out.clone())))
    x = torch.ones(2)
    out = module(x, shift=1.0)
    torch.testing.assert_close(out, torch.full((2,), 3.0))
    assert [c[0] for c in calls] == ["before", "after"]
    assert calls[0][1][0] is x and calls[0][2] == {"shift": 1.0}
    torch.testing.assert_close(calls[1][2], out)
    assert isinstance(module, Scale) and type(module).__name__ == "Scale"
    assert leftovers(module) == 2  # the tapped class and its taps
    before.remove()
    module(x)
    assert [c[0] for c in calls] == ["before", "after", "after"]
    after.remove()
    after.remove()  # idempotent
    assert type(module) is Scale and leftovers(module) == 0
    assert "factor" in dict(module.named_parameters())


def test_taps_of_two_instances_are_their_own():
    a, b = Scale(), Scale()
    seen = []
    handle = tap(a, after=lambda m, args, out: seen.append(m))
    a(torch.ones(1))
    b(torch.ones(1))
    assert seen == [a] and type(b) is Scale
    handle.remove()
    assert type(a) is Scale


def test_an_error_in_a_tap_reaches_the_caller_and_remove_still_works():
    module = Scale()

    def fail(m, args, out):
        raise ValueError("bad gate")

    handle = tap(module, after=fail)
    with pytest.raises(ValueError, match="bad gate"):
        module(torch.ones(1))
    handle.remove()
    assert leftovers(module) == 0


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_modules_that_cannot_be_subclassed_get_hooks_instead():
    scripted = torch.jit.script(nn.Sequential(nn.ReLU()))[0]  # a TorchScript submodule
    own_forward = Scale()
    own_forward.forward = lambda x: x + 1  # a forward set on the instance
    for module in (scripted, own_forward):
        seen: list = []
        handle = tap(module, after=lambda m, args, out, seen=seen: seen.append(out))
        module(torch.ones(1))
        assert len(seen) == 1
        handle.remove()
        module(torch.ones(1))
        assert len(seen) == 1 and "_attention_lens_taps" not in module.__dict__


def _records(trace):
    return [(r.name, r.stage, r.block, r.channel, r.spatial, r.gate) for r in trace]


def test_kept_hooks_give_the_same_traces_and_leave_nothing(tiny_model, image_batch):
    with record_attention(tiny_model) as fresh:
        tiny_model(image_batch)
    with attention_hooks(tiny_model):
        with record_attention(tiny_model) as first:
            tiny_model(image_batch)
        tiny_model(image_batch)  # between traces the kept hooks record nothing
        with record_attention(tiny_model) as second:
            tiny_model(image_batch[:1])
        with record_attention(tiny_model, feature_means=True) as means:
            tiny_model(image_batch)  # the block has no module hooks: this trace makes its own
        result = analyze(tiny_model, image_batch)
    assert leftovers(tiny_model) == 0
    assert len(first) == len(fresh) and len(second) == len(fresh)
    for a, b in zip(_records(fresh), _records(first)):
        assert a[:3] == b[:3]
        for x, y in zip(a[3:], b[3:]):
            assert (x is None and y is None) or torch.equal(x, y)
    assert all(r.channel is None or r.channel.shape[0] == 1 for r in second)
    assert all(r.feature_in is not None for r in means)
    assert len(result.trace) == len(fresh)


def test_kept_hooks_serve_analyze_with_feature_means(tiny_model, image_batch):
    expected = analyze(tiny_model, image_batch)
    with attention_hooks(tiny_model, feature_means=True):
        got = analyze(tiny_model, image_batch)
        with record_attention(tiny_model) as nested_outer:
            with record_attention(tiny_model) as nested_inner:  # both see the forward
                tiny_model(image_batch)
    assert leftovers(tiny_model) == 0
    for name in expected.cams:
        torch.testing.assert_close(got.cams[name], expected.cams[name])
    for a, b in zip(expected.trace, got.trace):
        torch.testing.assert_close(a.feature_in, b.feature_in)
        torch.testing.assert_close(a.gate, b.gate)
    assert len(nested_outer) == len(nested_inner) == len(expected.trace)


def test_kept_hooks_are_removed_after_an_exception(tiny_model, image_batch):
    tiny_model.train()
    with pytest.raises(RuntimeError, match="stop"):
        with attention_hooks(tiny_model):
            with record_attention(tiny_model):
                tiny_model(image_batch)
                raise RuntimeError("stop")
    assert leftovers(tiny_model) == 0 and all(m.training for m in tiny_model.modules())


def test_kept_hooks_trace_in_eval_mode_after_model_train(tiny_model, image_batch):
    with record_attention(tiny_model) as expected:
        tiny_model(image_batch)
    with attention_hooks(tiny_model):
        tiny_model.train()
        with record_attention(tiny_model) as got:
            assert not any(m.training for m in tiny_model.modules())
            tiny_model(image_batch)
        assert all(m.training for m in tiny_model.modules())
    for a, b in zip(expected, got):
        torch.testing.assert_close(a.gate, b.gate)


def test_the_fast_walk_finds_every_module_once():
    from viz.engine.model_state import submodules

    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.Sequential(shared, nn.ReLU()), nn.Identity())
    model.add_module("back", model[1])  # registered under two parents
    found = submodules(model)
    assert len(found) == len({id(m) for m in found}) == len(list(model.modules()))
    assert {id(m) for m in found} == {id(m) for m in model.modules()}
