"""Read every SE, BAM and CBAM module's maps from the forward pass the user runs.

    with record_attention(model) as trace:
        logits = model(x)
    for rec in trace:            # forward order
        rec.name, rec.channel, rec.spatial

Hooks sit on the modules' own gate submodules (see `models.attention`), so nothing is computed
twice. A per-model lock makes a model shared between threads (the app's cached model) safe:
one trace at a time attaches hooks to it.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.attention import BAM, CBAM, SqueezeExcite

__all__ = [
    "AttentionRecord",
    "AttentionTrace",
    "record_attention",
    "model_lock",
    "attention_modules",
]

_KINDS: dict[type[nn.Module], str] = {SqueezeExcite: "se", BAM: "bam", CBAM: "cbam"}
_locks: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock held while hooks are attached to `model` (re-entrant, one per model)."""
    with _locks_guard:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = threading.RLock()
        return lock


@dataclass(frozen=True)
class AttentionRecord:
    """What one attention module did to one batch.

    Attributes:
        name: dotted module name, e.g. `layer1.0.cbam`, `bam2`, `layer3.4.se`.
        kind: "se", "bam" or "cbam".
        stage: ResNet stage 1-4 the module refines.
        block: block index within the stage (None for BAM, which follows a whole stage).
        channel: (N, C). CBAM/SE: sigmoid channel weights. BAM: M_c(F), before the sigmoid.
        spatial: (N, H, W). CBAM: sigmoid spatial map on the channel-refined feature.
            BAM: M_s(F), before the sigmoid. SE: None.
        gate: (N, H, W) channel-mean of the full 3-D gate that multiplies F.
        feature_in: (N, H, W) channel-mean |F| entering the module, or None when the trace was
            recorded without `feature_means` (`analyze` always records them).
        feature_out: (N, H, W) channel-mean |F'| leaving it, or None likewise.
    """

    name: str
    kind: str
    stage: int
    block: int | None
    channel: Tensor
    spatial: Tensor | None
    gate: Tensor
    feature_in: Tensor | None
    feature_out: Tensor | None

    def select(self, index: int) -> AttentionRecord:
        """The same record for image `index` of the batch (batch dimension kept, size 1)."""
        pick = slice(index, index + 1)

        def part(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[pick]

        return AttentionRecord(
            self.name, self.kind, self.stage, self.block, self.channel[pick],
            part(self.spatial), self.gate[pick], part(self.feature_in), part(self.feature_out),
        )  # fmt: skip


class AttentionTrace:
    """Records in forward order; index by position or by module name."""

    def __init__(self, records: list[AttentionRecord] | None = None) -> None:
        self._records: list[AttentionRecord] = list(records or [])

    def __iter__(self) -> Iterator[AttentionRecord]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, key: int | str) -> AttentionRecord:
        if isinstance(key, str):
            for rec in self._records:
                if rec.name == key:
                    return rec
            raise KeyError(f"no attention module named {key!r}; traced: {', '.join(self.names)}")
        return self._records[key]

    def __repr__(self) -> str:
        return f"AttentionTrace({len(self)} records: {', '.join(self.names[:4])}{', …' if len(self) > 4 else ''})"

    @property
    def names(self) -> list[str]:
        return [r.name for r in self._records]

    @property
    def spatial_records(self) -> list[AttentionRecord]:
        """Records that have a spatial map (CBAM, BAM)."""
        return [r for r in self._records if r.spatial is not None]

    def by_stage(self) -> dict[int, list[AttentionRecord]]:
        stages: dict[int, list[AttentionRecord]] = {}
        for rec in self._records:
            stages.setdefault(rec.stage, []).append(rec)
        return stages

    def select(self, index: int) -> AttentionTrace:
        """The trace of image `index` of the batch."""
        return AttentionTrace([r.select(index) for r in self._records])

    def _append(self, record: AttentionRecord) -> None:
        self._records.append(record)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every SE, BAM and CBAM module, in registration order."""
    return [(n, m) for n, m in model.named_modules() if type(m) in _KINDS]


def _stage_and_block(name: str) -> tuple[int, int | None]:
    if m := re.match(r"(?:.*\.)?layer(\d)\.(\d+)\.", name):
        return int(m.group(1)), int(m.group(2))
    if m := re.match(r"(?:.*\.)?bam(\d)$", name):
        return int(m.group(1)), None
    return 0, None


def _feature_mean(t: Tensor) -> Tensor:
    return t.detach().abs().mean(1)


def _feature_means_gated(f_in: Tensor, channel: Tensor, spatial: Tensor | None):
    """Channel-mean |F| and |F * M_c (x) M_s| (N, H, W) in one pass over |F|.

    SE and CBAM gates are positive and separable, so mean_c |F M_c M_s| = M_s mean_c(|F| M_c):
    one matrix product gives both means, half the memory traffic of reducing F and F' apart.
    """
    n, c, h, w = f_in.shape
    weights = torch.stack((torch.ones_like(channel), channel), 1) / c  # (N, 2, C)
    means = torch.bmm(weights, f_in.detach().abs().flatten(2)).view(n, 2, h, w)
    f_out = means[:, 1] if spatial is None else means[:, 1] * spatial
    return means[:, 0], f_out


class _ModuleProbe:
    """Collects one module's gate outputs, then builds its record when the module returns."""

    def __init__(self, name: str, kind: str, trace: AttentionTrace, feature_means: bool) -> None:
        self.name, self.kind, self.trace = name, kind, trace
        self.feature_means = feature_means
        self.stage, self.block = _stage_and_block(name)
        self.parts: dict[str, Tensor] = {}

    def keep(self, part: str):
        def hook(_module, _inputs, output):
            self.parts[part] = output.detach()

        return hook

    def finish(self, _module, inputs, output) -> None:
        f_in = inputs[0]
        channel, spatial, gate = self._maps(f_in)
        if not self.feature_means:
            mean_in = mean_out = None
        elif self.kind == "bam":  # BAM's 3-D gate does not factorise
            mean_in, mean_out = _feature_mean(f_in), _feature_mean(output)
        else:
            mean_in, mean_out = _feature_means_gated(f_in, channel, spatial)
        self.trace._append(
            AttentionRecord(
                self.name,
                self.kind,
                self.stage,
                self.block,
                channel,
                spatial,
                gate,
                mean_in,
                mean_out,
            )  # fmt: skip
        )
        self.parts = {}

    def _maps(self, f_in: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        p = self.parts
        n, _, h, w = f_in.shape
        if self.kind == "se":
            channel = p["channel"].flatten(1)
            gate = channel.mean(1).view(n, 1, 1).expand(n, h, w)
            return channel, None, gate
        if self.kind == "cbam":
            channel, spatial = p["channel"], p["spatial"][:, 0]
            # the 3-D gate is M_c (x) M_s, so its channel mean factorises
            return channel, spatial, channel.mean(1).view(n, 1, 1) * spatial
        return p["channel"], p["spatial"][:, 0], p["gate"]


def _attach(name: str, module: nn.Module, trace: AttentionTrace, feature_means: bool) -> list:
    kind = _KINDS[type(module)]
    probe = _ModuleProbe(name, kind, trace, feature_means)
    taps: list[tuple[nn.Module, str]]
    if kind == "se":
        taps = [(module.gate, "channel")]
    elif kind == "cbam":
        taps = [(module.ChannelGate.gate, "channel"), (module.SpatialGate.gate, "spatial")]
    else:
        taps = [(module.channel_att.gate_c, "channel"), (module.spatial_att.gate_s, "spatial")]
    handles = [sub.register_forward_hook(probe.keep(part)) for sub, part in taps]
    if kind == "bam":
        # reduce the (N, C, H, W) gate right away instead of keeping it
        def keep_gate(_m, _i, out):
            probe.parts["gate"] = out.detach().mean(1)

        handles.append(module.gate.register_forward_hook(keep_gate))
    handles.append(module.register_forward_hook(probe.finish))
    return handles


@contextmanager
def record_attention(
    model: nn.Module, *, eval_mode: bool = True, feature_means: bool = False
) -> Iterator[AttentionTrace]:
    """Hook every SE, BAM and CBAM module of `model` and yield the trace they fill.

    Args:
        model: any network containing `models.attention` modules (none is fine: empty trace).
        eval_mode: put the model in eval mode inside the block (BatchNorm running statistics);
            every module's `training` flag is restored on exit.
        feature_means: also record each record's `feature_in` / `feature_out` (channel-mean |F|
            before and after the module, for the BAM hierarchy figure). They cost a pass over
            every attended feature map, about as much as everything else the trace does, so a
            plain trace leaves them None.

    Yields:
        An `AttentionTrace`, filled in forward order by each forward pass inside the block.

    On exit, also after an exception or KeyboardInterrupt, every hook is removed and the
    training flags are restored. A per-model lock is held inside the block.
    """
    lock = model_lock(model)
    with lock:
        # one walk over the modules; flags are only written where they change, since
        # nn.Module.__setattr__ is slow enough to show in the cost of a ResNet-18 forward
        named = list(model.named_modules())
        flags = [(m, m.training) for _, m in named]
        handles: list = []
        try:
            if eval_mode and any(flag for _, flag in flags):
                model.eval()
            trace = AttentionTrace()
            for name, module in named:
                if type(module) in _KINDS:
                    handles += _attach(name, module, trace, feature_means)
            yield trace
        finally:
            for handle in handles:
                handle.remove()
            for module, flag in flags:
                if module.training != flag:
                    module.training = flag
