"""Read every attention module's maps from the forward pass the user runs, in any network.

    with record_attention(model) as trace:
        logits = model(x)
    for rec in trace:            # forward order
        rec.name, rec.kind, rec.stage, rec.channel, rec.spatial

Which modules are attention modules, and which of their submodules output the maps, is the
probe registry's business (`models.probes`: ours, timm's, torchvision's, and yours with
`register_attention`). Taps (`viz.engine.taps`, cheaper than forward hooks) sit on those gate
submodules, so nothing is computed twice. A record's stage is the resolution level its map
lives at (`viz.engine.levels`), not a name pattern.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.probes import AttentionProbe, find_probe, kind_style, registry_generation
from models.probes.selfattention import SelfAttentionReader, Tap, received_on_grid
from viz.engine.levels import STAGES, NetworkLevels, fallback_stage, network_levels, stride_of
from viz.engine.model_state import model_lock, preserve_model_state, submodules
from viz.engine.taps import TapHandle, tap
from viz.engine.tokens import TokenLayout, guessed_grid, stage_of_block, token_layout

__all__ = [
    "AttentionRecord",
    "AttentionTrace",
    "record_attention",
    "attention_hooks",
    "model_lock",
    "attention_modules",
]


class LazyTensor:
    """A tensor computed once, on first use: a block's (N, heads, T, T) probabilities when
    only the class token's row was needed for its maps (softmax(q kᵀ) is most of a record's
    cost, and only rollout, GAE and LeGrad read all of it)."""

    def __init__(self, make: Callable[[], Tensor]) -> None:
        self._make: Callable[[], Tensor] | None = make
        self._value: Tensor | None = None

    def value(self) -> Tensor:
        if self._make is not None:
            self._value, self._make = self._make(), None
        return self._value

    def __reduce__(self):  # pickled (export workers, Streamlit's caches) as the tensor itself
        return _ready, (self.value(),)


def _ready(value: Tensor) -> LazyTensor:
    lazy = LazyTensor(lambda: value)
    lazy.value()
    return lazy


def _lazy_part(source: Tensor | LazyTensor | None, pick: slice) -> Tensor | LazyTensor | None:
    if isinstance(source, LazyTensor):
        return LazyTensor(lambda: source.value()[pick])
    return None if source is None else source[pick]


@dataclass(frozen=True)
class AttentionRecord:
    """What one attention module did to one batch.

    Attributes:
        name: dotted module name, e.g. `layer1.0.cbam`, `bam2`, `features.3.0.block.2`.
        kind: attention type from the probe registry: "se", "bam", "cbam", "eca", ...
        stage: resolution level of the module's input (stride 4, 8, 16, 32 -> 1..4 in a
            ResNet; see `viz.engine.levels`).
        block: order of the module among the trace's modules at its stage (0, 1, ...).
        channel: (N, C) channel gate: CBAM/SE/ECA sigmoid weights; BAM: M_c(F) (a logit).
            None for a spatial-only module.
        spatial: (N, H, W) spatial gate: CBAM sigmoid map on the channel-refined feature;
            BAM: M_s(F) (a logit). None for channel-only modules (SE, ECA).
        gate: (N, H, W) channel-mean of the full 3-D gate that multiplies F.
        feature_in: (N, H, W) channel-mean |F| entering the module, or None when the trace was
            recorded without `feature_means` (`analyze` always records them).
        feature_out: (N, H, W) channel-mean |F'| leaving it, or None likewise.
        logits: `channel` and `spatial` are logits (BAM's branches); figures show sigmoid.
        stride: input size / map size at the module (4, 8, ...).
        attention: self-attention with global attention (ViT, DeiT): the post-softmax
            probabilities (N, heads, T, T), prefix tokens first; None otherwise (and for
            window attention). Computed on first use where the maps needed only the class
            token's row (rollout, GAE and LeGrad read it; the maps do not).
        heads: self-attention: (N, heads, h, w) each head's map on the patch grid (the class
            token's attention to the patches; without a class token, or in Swin's windows,
            the mean attention each patch receives); `spatial` is their mean.
        layer: self-attention in a ViT: the block's index in the network (0 = first).
        class_token: self-attention in a ViT: its maps are the class token's row (the model
            has a class token), not the mean over the patch rows.
        token_norms: self-attention with global attention: (N, T) the L2 norm of each token
            the enclosing block outputs (prefix tokens first), for the high-norm outliers of
            Darcet et al. 2024; None where the block's output is not those T tokens.
    """

    name: str
    kind: str
    stage: int
    block: int | None
    channel: Tensor | None
    spatial: Tensor | None
    gate: Tensor
    feature_in: Tensor | None
    feature_out: Tensor | None
    logits: bool = False
    stride: int = 0
    attention_source: Tensor | LazyTensor | None = dataclasses.field(
        default=None, repr=False, compare=False
    )
    heads: Tensor | None = None
    layer: int | None = None
    class_token: bool = False
    token_norms: Tensor | None = None

    def select(self, index: int | slice) -> AttentionRecord:
        """The same record for image `index` (or a slice) of the batch, batch dimension kept."""
        pick = index if isinstance(index, slice) else slice(index, index + 1)

        def part(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[pick]

        return dataclasses.replace(
            self,
            channel=part(self.channel),
            spatial=part(self.spatial),
            gate=self.gate[pick],
            feature_in=part(self.feature_in),
            feature_out=part(self.feature_out),
            attention_source=_lazy_part(self.attention_source, pick),
            heads=part(self.heads),
            token_norms=part(self.token_norms),
        )

    @property
    def attention(self) -> Tensor | None:
        source = self.attention_source
        return source.value() if isinstance(source, LazyTensor) else source

    @property
    def label(self) -> str:
        """The record's name in figures: "stage 2 · block 1", "BAM 2 (after stage 2)"."""
        style = kind_style(self.kind)
        if self.layer is not None:
            return f"block {self.layer}"
        if style.own_level:
            return f"{style.label} {self.stage} (after stage {self.stage})"
        return f"stage {self.stage} · block {self.block}"

    @property
    def channel_weights(self) -> Tensor | None:
        """(N, C) channel weights in [0, 1] (the sigmoid of logits), or None."""
        if self.channel is None:
            return None
        return torch.sigmoid(self.channel) if self.logits else self.channel

    @property
    def spatial_weights(self) -> Tensor | None:
        """(N, H, W) spatial map in [0, 1] (the sigmoid of logits), or None."""
        if self.spatial is None:
            return None
        return torch.sigmoid(self.spatial) if self.logits else self.spatial


class AttentionTrace:
    """Records in forward order; index by position or by module name."""

    def __init__(self, records: list[AttentionRecord] | None = None) -> None:
        self._built: list[AttentionRecord] = list(records or [])
        # what the taps collected, turned into records on access: a traced forward then
        # costs little more than the taps themselves
        self._source: _TraceState | None = None

    @property
    def _records(self) -> list[AttentionRecord]:
        if self._source is not None:
            self._built.extend(self._source.take())
        return self._built

    def __getstate__(self) -> dict:
        # pickling (the app's cache) and copying see built records only
        return {"_built": list(self._records), "_source": None}

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
    def kinds(self) -> set[str]:
        return {r.kind for r in self._records}

    @property
    def channel_records(self) -> list[AttentionRecord]:
        """Records that have channel weights (SE, ECA, CBAM, BAM)."""
        return [r for r in self._records if r.channel is not None]

    @property
    def spatial_records(self) -> list[AttentionRecord]:
        """Records that have a spatial map (CBAM, BAM)."""
        return [r for r in self._records if r.spatial is not None]

    def by_stage(self) -> dict[int, list[AttentionRecord]]:
        stages: dict[int, list[AttentionRecord]] = {}
        for rec in self._records:
            stages.setdefault(rec.stage, []).append(rec)
        return stages

    def attention_calls(self) -> list[tuple]:
        """(watch, kept tensors, record) of each self-attention call, forward order (for the
        gradient methods of `viz.engine.transformer`; empty for a built or copied trace)."""
        records = self._records  # builds what is pending
        return list(self._source.attention_calls) if self._source is not None and records else []

    def select(self, index: int | slice) -> AttentionTrace:
        """The trace of image `index` (or a slice) of the batch."""
        return AttentionTrace([r.select(index) for r in self._records])


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every registered attention module, in registration order.

    A module inside another attention module is part of it (timm's `CbamModule.channel`),
    not a module of its own.
    """
    return [(name, module) for name, module, _, _ in _plan(model)]


# --- per-model plan: which modules to tap and where (cached) ---------------------------------

_Plan = list[tuple[str, nn.Module, AttentionProbe, dict[str, nn.Module] | list[Tap]]]
_plans: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, _Plan]] = weakref.WeakKeyDictionary()
_plans_guard = threading.Lock()


def _plan(model: nn.Module, count: int | None = None) -> _Plan:
    """(name, module, probe, {part: tapped submodule}) of each attention module (cached).

    The cache is checked against the model's module count (`count`, when the caller has
    walked the model already) and the registry's generation.
    """
    if count is None:
        count = len(submodules(model))
    key = (count, registry_generation())
    with _plans_guard:
        hit = _plans.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    modules = list(model.named_modules())
    plan: _Plan = []
    inside: str | None = None
    for name, module in modules:
        if inside is not None and name.startswith(inside):
            continue  # part of an attention module already planned
        probe = find_probe(module)
        if probe is None:
            continue
        if probe.reader is not None:  # self-attention: the reader knows what to tap
            try:
                plan.append((name, module, probe, probe.reader.taps(name, module, model)))
            except (AttributeError, ValueError) as exc:
                raise _probe_error(name, probe, str(exc)) from exc
            inside = name + "." if name else ""
            continue
        taps = {}
        for part, path in probe.taps().items():
            try:
                taps[part] = module.get_submodule(path) if path else module
            except AttributeError as exc:
                if probe.optional:
                    continue
                children = ", ".join(n for n, _ in module.named_modules() if n)[:200]
                raise _probe_error(
                    name, probe, f"it has no submodule {path!r} (it has: {children})"
                ) from exc
        if "channel" not in taps and "spatial" not in taps:
            continue  # e.g. timm's GlobalContext without a scale gate: nothing to read
        plan.append((name, module, probe, taps))
        inside = name + "." if name else ""
    with _plans_guard:
        _plans[model] = (key, plan)
    return plan


# --- building records ------------------------------------------------------------------------


def _feature_mean(t: Tensor) -> Tensor:
    return t.detach().abs().mean(1)


def _feature_means_gated(f_in: Tensor, channel: Tensor | None, spatial: Tensor | None):
    """Channel-mean |F| and |F * M_c (x) M_s| (N, H, W) in one pass over |F|.

    For gates that multiply F (positive and separable), mean_c |F M_c M_s| = M_s mean_c(|F| M_c):
    one matrix product gives both means, half the memory traffic of reducing F and F' apart.
    """
    n, c, h, w = f_in.shape
    if channel is None:
        channel = torch.ones(n, c, dtype=f_in.dtype, device=f_in.device)
    weights = torch.stack((torch.ones_like(channel), channel), 1) / c  # (N, 2, C)
    means = torch.bmm(weights.to(f_in.dtype), f_in.detach().abs().flatten(2)).view(n, 2, h, w)
    f_out = means[:, 1] if spatial is None else means[:, 1] * spatial
    return means[:, 0], f_out


class _TraceState:
    """One `record_attention` block: the taps append events, records are built on access.

    An event is (watch, part, tensor) for a gate output, (watch, "module", (input, output))
    for an attention module's own call, or (None, "call", (H, W)) for a forward of the model.
    """

    def __init__(
        self, trace: AttentionTrace, levels: NetworkLevels | None, feature_means: bool,
        keep_graph: bool = False, layout: TokenLayout | None = None,
    ) -> None:  # fmt: skip
        self.levels = levels
        self.feature_means = feature_means
        self.keep_graph = keep_graph  # self-attention taps keep tensors in the autograd graph
        self.layout = layout
        self.attention_calls: list[tuple[_SelfAttentionWatch, dict, AttentionRecord]] = []
        self.events: list[tuple] = []
        self.used = 0  # events already turned into records
        self.call, self.input_hw = 0, (0, 0)
        self.open: dict[_ModuleWatch, dict] = {}  # each module's latest call
        self.blocks: dict[tuple[int, int], int] = {}
        trace._source = self

    def take(self) -> list[AttentionRecord]:
        """Records of the events since the last take, in forward order."""
        events, self.used = self.events[self.used :], len(self.events)
        calls: list[tuple[_ModuleWatch, dict, int, tuple[int, int]]] = []
        for watch, part, value in events:
            if watch is None:  # a new forward of the model
                self.call, self.input_hw = self.call + 1, value
                continue
            parts = self.open.get(watch)
            if parts is None or part in parts:  # a new call of the module
                parts = self.open[watch] = {}
                calls.append((watch, parts, self.call, self.input_hw))
            parts[part] = value
        records = []
        for watch, parts, call, hw in calls:
            rec = watch.record(self, parts, call, hw)
            if rec is None:  # e.g. a cross-attention call of nn.MultiheadAttention
                continue
            if isinstance(watch, _SelfAttentionWatch):
                self.attention_calls.append((watch, parts, rec))
            records.append(rec)
        return records

    def stage(self, stride: int) -> int:
        if self.levels is None:
            return fallback_stage(stride)
        return self.levels.stage_of(stride)

    def next_block(self, call: int, stage: int) -> int:
        block = self.blocks.get((call, stage), 0)
        self.blocks[(call, stage)] = block + 1
        return block


def _probe_error(name: str, probe: AttentionProbe, what: str) -> ValueError:
    return ValueError(
        f"attention probe for {probe.module_type.__name__} ({name!r}): {what}; "
        "check the submodule names given to register_attention"
    )


class _ModuleWatch:
    """One attention module: what its taps record, and how its record is built.

    Its gate submodules are tapped ("channel", "spatial", "gate"); the module itself only when
    a trace needs its input: for feature means, or when the shape probe did not see the module
    (`known`: the (stride, channels) of its input from `viz.engine.levels`). Shapes are checked when
    the record is built, so a tap does no more than keep the tensor.
    """

    def __init__(self, name: str, probe: AttentionProbe, known: tuple[int, int] | None) -> None:
        self.name, self.probe = name, probe
        self.stride, self.channels = known if known is not None else (0, 0)

    def gate_tap(self, taps: _TapSet, part: str) -> Callable:
        """What the tap on the submodule whose output is map `part` calls."""
        if part == "gate":

            def keep_gate(_m, _a, out):  # reduce the (N, C, H, W) gate right away
                state = taps.state
                if state is not None:
                    state.events.append((self, "gate", out.detach().mean(1)))

            return keep_gate

        def keep(_m, _a, out):
            state = taps.state
            if state is not None:  # detach only when needed: a new tensor costs more than the test
                state.events.append((self, part, out.detach() if out.requires_grad else out))

        return keep

    def module_tap(self, taps: _TapSet) -> Callable:
        def keep_module(_m, args, output):
            state = taps.state
            if state is not None:
                f_in = args[0] if args and isinstance(args[0], Tensor) else None
                if f_in is None or f_in.ndim != 4:
                    raise _probe_error(
                        self.name, self.probe, "its input is not an (N, C, H, W) tensor"
                    )
                keep_out = output.detach() if isinstance(output, Tensor) else None
                state.events.append((self, "module", (f_in.detach(), keep_out)))

        return keep_module

    def _part_error(self, part: str, out: Tensor, what: str) -> ValueError:
        path = self.probe.taps()[part] or "the module itself"
        return _probe_error(
            self.name, self.probe, f"{part} output {tuple(out.shape)} of {path!r} {what}"
        )

    def record(
        self, state: _TraceState, parts: dict, call: int, input_hw: tuple[int, int]
    ) -> AttentionRecord:
        activations = self.probe.activations
        channel, spatial, gate = parts.get("channel"), parts.get("spatial"), parts.get("gate")
        f_in, output = parts.get("module", (None, None))
        if f_in is not None:
            n, c, h, w = f_in.shape
            stride = self.stride or stride_of(input_hw[0], h)
        else:  # the shape probe gave the stride; the map's size follows from the input's
            n = next(t for t in (channel, spatial, gate) if t is not None).shape[0]
            c, stride = self.channels, self.stride
            h, w = -(-input_hw[0] // stride), -(-input_hw[1] // stride)
        if channel is not None:
            if channel.numel() != n * c:
                raise self._part_error("channel", channel, f"has no N x C = {n} x {c}")
            channel = channel.reshape(n, c)
            if "channel" in activations:
                channel = activations["channel"](channel)
        if spatial is not None:
            if spatial.ndim < 3 or spatial.numel() != n * spatial.shape[-2] * spatial.shape[-1]:
                raise self._part_error("spatial", spatial, "is not N x H x W")
            spatial = spatial.reshape(n, spatial.shape[-2], spatial.shape[-1])
            if "spatial" in activations:
                spatial = activations["spatial"](spatial)
            h, w = spatial.shape[-2:]
        if gate is None:
            if spatial is None:
                gate = channel.mean(1).view(n, 1, 1).expand(n, h, w)
            elif channel is None:
                gate = spatial
            else:  # the 3-D gate is M_c (x) M_s, so its channel mean factorises
                gate = channel.mean(1).view(n, 1, 1) * spatial
        mean_in = mean_out = None
        if f_in is not None and state.feature_means:
            if self.probe.multiplies and (spatial is None or spatial.shape[-2:] == f_in.shape[-2:]):
                mean_in, mean_out = _feature_means_gated(f_in, channel, spatial)
            elif output is not None and output.shape == f_in.shape:
                mean_in, mean_out = _feature_mean(f_in), _feature_mean(output)
        stage = state.stage(stride)
        return AttentionRecord(
            name=self.name,
            kind=self.probe.kind,
            stage=stage,
            block=state.next_block(call, stage),
            channel=channel,
            spatial=spatial,
            gate=gate,
            feature_in=mean_in,
            feature_out=mean_out,
            logits=self.probe.logits,
            stride=stride,
        )


def _detached(value):
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    return value


class _SelfAttentionWatch:
    """One self-attention module: its reader's taps keep q, k (or the probabilities) during
    the forward; the probabilities and maps are computed when the record is built."""

    def __init__(self, name: str, module: nn.Module, probe: AttentionProbe, index: int,
                 count: int) -> None:  # fmt: skip
        self.name, self.module, self.probe = name, module, probe
        self.reader: SelfAttentionReader = probe.reader
        self.index, self.count = index, count  # order among the model's self-attention modules

    def tap_function(self, taps: _TapSet, spec: Tap) -> Callable:
        keep = spec.keep

        def kept(_m, args, other):
            state = taps.state
            if state is not None:
                value = keep(args, other)
                state.events.append(
                    (self, spec.part, value if state.keep_graph else _detached(value))
                )

        return kept

    def record(self, state: _TraceState, parts: dict, call: int, input_hw: tuple[int, int]):
        layout = state.layout
        if self.reader.vit_only and (layout is None or layout.family != "vit"):
            return None
        row = None if self.reader.windowed else self._class_row(parts, layout, input_hw)
        probs = None if row is not None else self.reader.probabilities(self.module, parts)
        if probs is None and row is None:
            return None
        if self.reader.windowed:
            probs = probs.detach()
            geo = self.reader.geometry(self.module, parts)
            windows = (-(-geo.height // geo.window[0])) * (-(-geo.width // geo.window[1]))
            heads = received_on_grid(probs, geo, probs.shape[0] // windows)
            stride = max(1, input_hw[0] // geo.height) if input_hw[0] else 0
            stage, layer, attention, tokens, cls = fallback_stage(stride), None, None, 0, False
        else:
            if row is not None:  # the full matrix only when rollout, GAE or LeGrad reads it
                reader, module = self.reader, self.module
                needed = {k: _detached(parts[k]) for k in reader.row_parts if k in parts}
                attention = LazyTensor(lambda: reader.probabilities(module, needed))
            else:
                attention = probs = probs.detach()
            tokens = (row if row is not None else probs).shape[-1]
            heads, stride, cls = self._patch_maps(probs, layout, input_hw, row)
            # a hybrid's blocks all live on its last level; a ViT's are grouped by depth
            stage = (
                STAGES
                if layout is not None and layout.trunk
                else stage_of_block(self.index, self.count)
            )
            layer = self.index
        norms = parts.get("token_norms")
        if attention is None or norms is None or norms.shape != (len(heads), tokens):
            norms = None  # windows, or a block that outputs other tokens (CaiT's class token)
        spatial = heads.mean(1)
        return AttentionRecord(
            name=self.name, kind=self.probe.kind, stage=stage,
            block=state.next_block(call, stage), channel=None, spatial=spatial, gate=spatial,
            feature_in=None, feature_out=None, stride=stride, attention_source=attention,
            heads=heads, layer=layer, class_token=cls, token_norms=norms,
        )  # fmt: skip

    def _class_row(self, parts: dict, layout: TokenLayout | None, input_hw) -> Tensor | None:
        """(N, heads, 1, T) the class token's row of the probabilities, where that is all the
        maps need (a known ViT with a class token, on an image) and the reader can compute it
        alone."""
        if self.reader.patches_only or layout is None or layout.family != "vit":
            return None
        if not layout.class_token or not input_hw[0]:
            return None
        row = self.reader.class_row(self.module, parts)
        return None if row is None else row.detach()

    def _patch_maps(self, probs: Tensor | None, layout: TokenLayout | None, input_hw,
                    row: Tensor | None = None) -> tuple:  # fmt: skip
        tokens = (row if row is not None else probs).shape[-1]
        if layout is not None and layout.family == "vit" and input_hw[0]:
            (h, w), prefix, cls = layout.grid(input_hw), layout.prefix, layout.class_token
        else:  # a user's module outside a known transformer: a square grid, maybe + 1 token
            grid = guessed_grid(tokens) or guessed_grid(tokens - 1)
            if grid is None:
                raise _probe_error(self.name, self.probe, f"{tokens} tokens are no square grid")
            (h, w), prefix = grid, tokens - grid[0] * grid[1]
            cls = prefix == 1
        if tokens != prefix + h * w:
            raise _probe_error(self.name, self.probe,
                               f"{tokens} tokens, not {prefix} prefix + {h}x{w} patches")  # fmt: skip
        n, heads = (row if row is not None else probs).shape[:2]
        if row is not None:
            maps = row[:, :, 0, prefix:]
        elif self.reader.patches_only:  # its padded class token was not there: the patches' mean
            maps = probs[:, :, prefix:, prefix:].mean(2)
        elif cls:
            maps = probs[:, :, 0, prefix:]
        else:
            maps = probs[:, :, :, prefix:].mean(2)
        stride = input_hw[0] // h if input_hw[0] else 0
        return maps.reshape(n, heads, h, w), stride, cls


def _enclosing_block(model: nn.Module, name: str) -> nn.Module | None:
    """The numbered block holding attention module `name` (`blocks.3` for `blocks.3.attn`,
    `encoder.layer.3` for `encoder.layer.3.attention.attention`), or None."""
    parts = name.split(".")[:-1]
    while parts and not parts[-1][-1:].isdigit():
        parts.pop()
    return model.get_submodule(".".join(parts)) if parts else None


def _token_norms(_args: tuple, out: object) -> Tensor | None:
    tokens = out[0] if isinstance(out, (tuple, list)) and out else out
    if not isinstance(tokens, Tensor) or tokens.ndim != 3:
        return None
    return tokens.detach().float().norm(dim=-1)


def _first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    if args and isinstance(args[0], Tensor):
        return args[0]
    return next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)), None)


class _TapSet:
    """The taps on one model's gates, switched on for one trace at a time.

    `record_attention` makes one per trace and removes it on exit; `attention_hooks` keeps
    one on the model for a block of many traces, so that each trace only switches it on.
    """

    def __init__(self, model: nn.Module, modules: list[nn.Module], module_taps: bool) -> None:
        self.modules = modules
        self.plan = _plan(model, len(modules))
        self.levels = None
        if self.plan:
            try:
                self.levels = network_levels(model, len(modules))
            except ValueError:  # the shape probe cannot run it: stages from the stride alone
                self.levels = None
        self.module_taps = module_taps  # feature means need each module's input and output
        self.state: _TraceState | None = None
        known = self.levels.attention_inputs if self.levels is not None else {}
        self.layout = token_layout(model) if self.plan else None
        count = sum(1 for *_, probe, _ in self.plan if probe.reader is not None)
        self.watches = []
        for name, module, probe, _ in self.plan:
            if probe.reader is not None:
                index = sum(isinstance(w, _SelfAttentionWatch) for w in self.watches)
                self.watches.append(_SelfAttentionWatch(name, module, probe, index, count))
            else:
                self.watches.append(_ModuleWatch(name, probe, known.get(name)))
        self.handles: list[TapHandle] = []
        try:
            if self.plan:
                self.handles.append(tap(model, before=self._note_input))
            for watch, (_, module, _, taps) in zip(self.watches, self.plan):
                if isinstance(watch, _SelfAttentionWatch):
                    block = None if watch.reader.windowed else _enclosing_block(model, watch.name)
                    if block is not None:  # its output tokens' norms (Darcet et al. 2024)
                        taps = [*taps, Tap(block, "after", "token_norms", _token_norms)]
                    for spec in taps:
                        fn = watch.tap_function(self, spec)
                        self.handles.append(
                            tap(spec.module, after=fn) if spec.when == "after"
                            else tap(spec.module, before=fn)
                        )  # fmt: skip
                    continue
                for part, sub in taps.items():
                    self.handles.append(tap(sub, after=watch.gate_tap(self, part)))
                if module_taps or not watch.stride:
                    self.handles.append(tap(module, after=watch.module_tap(self)))
        except BaseException:
            self.remove()
            raise

    def _note_input(self, _m, args, kwargs) -> None:
        state = self.state
        if state is not None:
            x = _first_tensor(args, kwargs)
            hw = (x.shape[-2], x.shape[-1]) if x is not None and x.ndim == 4 else (0, 0)
            state.events.append((None, "call", hw))

    def remove(self) -> None:
        self.state = None
        for handle in self.handles:
            handle.remove()
        self.handles = []


_kept: weakref.WeakKeyDictionary[nn.Module, _TapSet] = weakref.WeakKeyDictionary()


def model_modules(model: nn.Module) -> list[nn.Module]:
    """`submodules(model)`, from the taps kept by `attention_hooks` when there are some."""
    kept = _kept.get(model)
    return kept.modules if kept is not None else submodules(model)


@contextmanager
def attention_hooks(model: nn.Module, *, feature_means: bool = False) -> Iterator[nn.Module]:
    """Keep the tracing taps on `model` for a block of many traces (a loop over images).

        with attention_hooks(model):
            for x in batches:
                result = analyze(model, x)   # each trace now only switches the taps on

    Every `record_attention` (and `analyze`, `agreement`, ...) on `model` inside the block
    uses these taps instead of putting on and taking off its own; on exit, also after an
    exception, they are removed. Traces with `feature_means=True` (as `analyze` makes) use
    them only when the block was opened with `feature_means=True`.

    Inside the block a plain forward of `model` runs through the idle taps (a few
    microseconds each), modules added to the model are not seen, and a trace checks only the
    model's own `training` flag: after `model.eval()` it takes every module to be in eval mode
    (after `model.train()` it puts them all in eval for the trace, as outside the block).
    The model's lock is held for the whole block.
    """
    with model_lock(model):
        if model in _kept:  # nested: the outer block's taps serve
            yield model
            return
        taps = _TapSet(model, submodules(model), module_taps=feature_means)
        _kept[model] = taps
        try:
            yield model
        finally:
            _kept.pop(model, None)
            taps.remove()


@contextmanager
def record_attention(
    model: nn.Module,
    *,
    eval_mode: bool = True,
    feature_means: bool = False,
    modules: list[nn.Module] | None = None,
    keep_graph: bool = False,
) -> Iterator[AttentionTrace]:
    """Tap every registered attention module of `model` and yield the trace they fill.

    Args:
        model: any `nn.Module`; modules are found through the probe registry (`models.probes`),
            none is fine (empty trace).
        eval_mode: put the model in eval mode inside the block (BatchNorm running statistics);
            every module's `training` flag is restored on exit.
        feature_means: also record each record's `feature_in` / `feature_out` (channel-mean |F|
            before and after the module, for the BAM hierarchy figure). They cost a pass over
            every attended feature map, so a plain trace leaves them None.
        modules: `viz.engine.model_state.submodules(model)` when the caller has it already (saves a walk).
        keep_graph: self-attention taps keep their tensors in the autograd graph (for the
            gradient methods of `viz.engine.transformer`); the records are detached anyway.

    Yields:
        An `AttentionTrace`, filled in forward order by each forward pass inside the block.

    The first trace of a model runs a shape probe (`viz.engine.levels`) to learn its resolution
    levels; a network the probe cannot run gets stages from the stride alone. On exit, also
    after an exception or KeyboardInterrupt, every tap is removed and the training flags are
    restored. A per-model lock is held inside the block.

    Cost: one tap per gate submodule (none on the modules themselves unless `feature_means`
    or the probe could not run); records are built when the trace is first read. Installing
    and removing the taps costs about as much again as running them: a loop of many traces
    saves it with `attention_hooks`.
    """
    with model_lock(model):
        kept = _kept.get(model)
        if kept is not None and kept.state is None and (kept.module_taps or not feature_means):
            taps, own = kept, False
        else:  # not kept, already tracing (nested), or without the module taps we need
            modules = submodules(model) if modules is None else modules
            taps, own = _TapSet(model, modules, module_taps=feature_means), True
        trace = AttentionTrace()
        state = _TraceState(trace, taps.levels, feature_means, keep_graph, taps.layout)
        # with kept taps, a model whose own flag says eval is taken to be all in eval: reading
        # every module's flag costs more than the trace itself in a loop of small batches
        trusted = not own and not model.training
        flags = (
            nullcontext()
            if trusted
            else preserve_model_state(model, eval_mode=eval_mode, modules=taps.modules)
        )
        with flags:
            taps.state = state
            try:
                yield trace
            finally:
                if own:
                    taps.remove()
                else:
                    taps.state = None
