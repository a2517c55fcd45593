"""Other networks' checkpoints: recognise a state dict by keys and shapes, rebuild its network.

Attention Lens's own ResNets (and torchvision's plain ResNets, timm's SE-ResNets, which share
their keys) are read by `models.checkpoints.checkpoint.infer_arch`. Everything else is matched here against
candidate architectures, each built once on the meta device (no weights allocated) to learn its
keys and shapes; the classifier is the pair of tensors whose first dimension follows the number
of classes, so that number is read off the file too.

Built in: timm `ecaresnet*` and `resnet18/34/50` with CBAM, light CBAM or ECA in their blocks;
torchvision `efficientnet_b0`...`b7`, `mobilenet_v3_small/large`, `regnet_y_*`; vision
transformers (timm ViT, DeiT, register-token ViTs, Swin; torchvision ViT and Swin) from
`models.checkpoints.vit_recognition`. Researchers add their own with `register_architecture` (usually from a
plugin: `models.checkpoints.plugins`).

Cost: a candidate is built on the meta device the first time a file passes its cheap tests
(key hint, then a few key shapes), with weight initialisation skipped (meta tensors hold no
values; timm's truncated-normal init alone is 80% of a ViT's meta build), about 30 ms for a
ViT-B; its keys and shapes are cached for the process.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

__all__ = [
    "Architecture",
    "ForeignArch",
    "fit_architecture",
    "forget_signatures",
    "match_architecture",
    "meta_build",
    "skip_init",
    "register_architecture",
    "registered_architectures",
    "unregister_architecture",
]

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class ForeignArch:
    """What a network built by another library (or a plugin) is: enough to rebuild it.

    Attributes:
        name: the architecture's registered name, e.g. "seresnet50", "efficientnet_b0".
        source: "timm", "torchvision" or "plugin".
        num_classes: read off the classifier's shape.
        attention: attention kinds found in the network ("cbam", "se", "eca",
            "self-attention", ...), or None.
        options: keyword arguments the network was built with besides its name (a timm model
            trained with `--arch-kwargs`); empty for the built-in candidates.
    """

    name: str
    source: str
    num_classes: int
    attention: str | None = None
    options: dict = field(default_factory=dict, hash=False)
    names_for: Callable[[int], list[str] | None] | None = None

    @property
    def label(self) -> str:
        """Short human name, e.g. "timm ecaresnet26t"."""
        return f"{self.source} {self.name}"

    def to_dict(self) -> dict:
        found = {
            "source": self.source,
            "name": self.name,
            "num_classes": self.num_classes,
            "attention": self.attention,
        }
        return found | ({"options": dict(self.options)} if self.options else {})


@dataclass(frozen=True)
class Architecture:
    """A candidate for state-dict recognition.

    Attributes:
        name: unique name, e.g. "ecaresnet26t".
        source: "timm", "torchvision" or "plugin".
        build: num_classes -> a new network with that many classes.
        hint: cheap test on the file's key names; candidates it rejects are never built.
        preprocess: the architecture's standard preprocessing (None: resize 256, crop 224).
        class_names: names of its classes when they are fixed (None: from the file, ImageNet
            for 1000 classes, else numbered).
        shapes: (key, shape) pairs the file must have, checked after the hint and before the
            candidate is built (built-ins: a transformer's patch embedding and its last block,
            i.e. width, patch size and depth).
        classifier: the classifier's module names, when known: its keys are those under them
            (saves the second meta build that otherwise finds which keys follow the class count).
        options: build keyword arguments (besides the class count) this candidate stands for.
        names_for: class count -> the names of its classes when that count has known names
            (torchvision's VOC and COCO categories), else None; looked up only once matched.
    """

    name: str
    source: str
    build: Callable[[int], nn.Module]
    hint: Callable[[set[str]], bool]
    preprocess: Callable[[], Preprocess] | None = None
    class_names: list[str] | None = None
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    classifier: tuple[str, ...] | None = None
    options: dict = field(default_factory=dict, hash=False)
    names_for: Callable[[int], list[str] | None] | None = None


_lock = threading.Lock()
_registry: dict[str, Architecture] = {}
_signatures: dict[
    str, tuple[Shapes, dict[str, int]]
] = {}  # name -> (shapes at 1000 classes, classifier keys and their values per class)


def register_architecture(
    name: str,
    build: Callable[[int], nn.Module],
    preprocess: Preprocess | None = None,
    class_names: list[str] | None = None,
    *,
    source: str = "plugin",
    hint: Callable[[set[str]], bool] | None = None,
) -> Architecture:
    """Let `load_checkpoint` recognise state dicts of your own network.

    Args:
        name: the architecture's name, shown in the app and manifests.
        build: `num_classes -> nn.Module`; called on the meta device to learn keys and shapes,
            then for real to load the weights.
        preprocess: how images are prepared for it (default resize 256, crop 224, ImageNet
            mean/std).
        class_names: its class names, if fixed.
        source: shown with the name ("plugin" unless you say otherwise).
        hint: optional quick test on the file's key names, to skip building it for files that
            cannot match.

    Returns:
        The registered `Architecture` (registering a name again replaces it).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError("register_architecture needs a non-empty name")
    if not callable(build):
        raise TypeError("register_architecture needs build=<num_classes -> nn.Module>")
    if preprocess is not None and not isinstance(preprocess, Preprocess):
        raise TypeError("preprocess must be a models.Preprocess or None")
    arch = Architecture(
        name,
        source,
        build,
        hint or (lambda keys: True),
        (lambda: preprocess) if preprocess is not None else None,
        list(class_names) if class_names is not None else None,
    )
    with _lock:
        _registry[name] = arch
        _signatures.pop(name, None)
    return arch


def unregister_architecture(name: str) -> None:
    """Forget a registered architecture (no error when there is none)."""
    with _lock:
        _registry.pop(name, None)
        _signatures.pop(name, None)


def forget_signatures() -> None:
    """Drop the cached keys and shapes of every candidate (the benchmark's cold start)."""
    with _lock:
        _signatures.clear()


def registered_architectures() -> dict[str, Architecture]:
    with _lock:
        return dict(_registry)


def _shapes(model: nn.Module) -> Shapes:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# in-place ops that only set values: on a meta tensor (no values) they can be skipped
_VALUE_OPS = frozenset(
    "uniform_ normal_ trunc_normal_ erfinv_ clamp_ clamp_min_ clamp_max_ mul_ add_ sub_ div_ "
    "fill_ zero_ copy_ exp_ log_ sqrt_ bernoulli_ random_ constant_ ones_ zeros_ kaiming_uniform_ "
    "kaiming_normal_ xavier_uniform_ xavier_normal_".split()
)


class _SkipValues(TorchFunctionMode):
    """Skip value-only in-place ops (weight initialisation) on meta tensors and parameters."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (
            getattr(func, "__name__", "") in _VALUE_OPS
            and args
            and isinstance(args[0], Tensor)
            and (args[0].is_meta or isinstance(args[0], nn.Parameter))
        ):
            return args[0]
        return func(*args, **(kwargs or {}))


@contextmanager
def skip_init() -> Iterator[None]:
    """Build a network whose parameters are about to be replaced: their initialisation is
    skipped (they hold whatever memory held); buffers are computed as usual."""
    with _SkipValues():
        yield


@contextmanager
def meta_build() -> Iterator[None]:
    """Build networks on the meta device without running their weight initialisation.

    Shapes are what the constructors make them; no memory is allocated and no random numbers
    are drawn (the global RNG is left as it was).
    """
    with torch.device("meta"), _SkipValues():
        yield


def _cache_key(arch: Architecture) -> str | None:
    """Registered candidates are cached by name; one-off ones (options from a file) are not."""
    return None if arch.options else arch.name


def _signature(arch: Architecture) -> tuple[Shapes, dict[str, int]]:
    """Keys and shapes at 1000 classes, and which keys follow the class count (cached): key ->
    values per class of its first dimension (1 for a classifier; 4 for a detector's box
    regression, the anchors per cell for a dense detection head)."""
    key = _cache_key(arch)
    with _lock:
        hit = _signatures.get(key) if key is not None else None
    if hit is not None:
        return hit
    with meta_build():
        a = _shapes(arch.build(1000))
        if arch.classifier is None:
            b = _shapes(arch.build(7))
            classifier = {
                k: a[k][0] // 1000 if a[k] and a[k][0] % 1000 == 0 else 1
                for k in a
                if k in b and a[k] != b[k]
            }
        else:
            heads = tuple(f"{name}." for name in arch.classifier)
            classifier = {k: 1 for k in a if k.startswith(heads) and a[k][:1] == (1000,)}
    if key is not None:
        with _lock:
            _signatures[key] = (a, classifier)
    return a, classifier


def _skippable(key: str) -> bool:
    return key.endswith("num_batches_tracked")


@dataclass(frozen=True)
class _Verdict:
    arch: Architecture
    num_classes: int | None
    score: float
    problem: str


def _compare(arch: Architecture, state: dict[str, Tensor]) -> _Verdict:
    try:
        shapes, classifier = _signature(arch)
    except Exception as exc:  # a plugin's build that fails on the meta device
        return _Verdict(arch, None, -1.0, f"cannot be built ({type(exc).__name__}: {exc})")
    want = {k for k in shapes if not _skippable(k)}
    have = {k for k in state if not _skippable(k)}
    missing, extra = sorted(want - have), sorted(have - want)
    common = want & have
    score = len(common) / max(1, len(want | have))
    # a timm network saved without its classifier (num_classes=0: an embedding network)
    headless = arch.source == "timm" and bool(classifier) and set(missing) == set(classifier)
    if (missing or extra) and not (headless and not extra):
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:2])}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:2])}")
        return _Verdict(arch, None, score, "; ".join(parts))
    classes = {
        state[k].shape[0] / per_class
        for k, per_class in classifier.items()
        if k in state and state[k].ndim >= 1
    }
    if len(classes) > 1 or any(c != int(c) or c < 1 for c in classes):
        return _Verdict(arch, None, score, "classifier shapes disagree")
    num_classes = 0 if headless else int(classes.pop()) if classes else 1000
    for key in sorted(common):
        expected = shapes[key]
        if key in classifier:
            expected = (num_classes * classifier[key], *expected[1:])
        if tuple(state[key].shape) != expected:
            got = list(state[key].shape)
            return _Verdict(arch, None, score - 0.01, f"{key} is {got}, expected {list(expected)}")
    return _Verdict(arch, num_classes, 1.0, "")


def fit_architecture(arch: Architecture, state: dict[str, Tensor]) -> int | str:
    """`state`'s class count if it has `arch`'s keys and shapes, else a one-line reason."""
    verdict = _compare(arch, state)
    return verdict.num_classes if verdict.num_classes is not None else verdict.problem


def match_architecture(state: dict[str, Tensor]) -> tuple[Architecture, int] | str:
    """The registered architecture whose keys and shapes `state` has, and its class count.

    Returns:
        (architecture, num_classes), or a one-line reason naming the closest candidate.
    """
    keys = set(state)
    candidates = [a for a in registered_architectures().values() if _hint(a, keys)]
    if not candidates:
        return "no known architecture has these keys"
    verdicts = []
    for arch in candidates:  # stop at the first match: later candidates are never built
        if _facts_met(arch, state) < len(arch.shapes):
            continue
        verdict = _compare(arch, state)
        if verdict.num_classes is not None:
            return arch, verdict.num_classes
        verdicts.append(verdict)
    if not verdicts:  # none has these shapes: name the difference from the closest one
        verdicts.append(_compare(max(candidates, key=lambda a: _facts_met(a, state)), state))
    best = max(verdicts, key=lambda v: v.score)
    return f"closest known architecture is {best.arch.source} {best.arch.name}: {best.problem}"


def _hint(arch: Architecture, keys: set[str]) -> bool:
    try:
        return bool(arch.hint(keys))
    except Exception:
        return False


def _facts_met(arch: Architecture, state: dict[str, Tensor]) -> int:
    """How many of `arch.shapes` the file has (all of them, or the candidate is not built)."""
    return sum(k in state and tuple(state[k].shape) == shape for k, shape in arch.shapes)


def attention_kind(model: nn.Module) -> str | None:
    """The attention kinds in `model`, joined ("cbam", "se+eca", "self-attention").

    Gates are those the probe registry knows; self-attention is recognised by class (timm's
    `Attention` and `WindowAttention`, torchvision's `EncoderBlock` and
    `ShiftedWindowAttention`): it has no probe, so traces do not read it.
    """
    from models.probes.registry import find_probe

    transformer = _self_attention_types()
    kinds: list[str] = []
    for m in model.modules():
        probe = find_probe(m)
        kind = probe.kind if probe is not None else None
        if kind is None and transformer and isinstance(m, transformer):
            kind = "self-attention"
        if kind is not None and kind not in kinds:
            kinds.append(kind)
    return "+".join(kinds) or None


def _self_attention_types() -> tuple[type, ...]:
    """Self-attention module types of the libraries already imported (none is imported here)."""
    found: list[type] = []
    if "timm" in sys.modules:
        try:
            from timm.models.swin_transformer import WindowAttention
            from timm.models.vision_transformer import Attention
        except ImportError:
            pass
        else:
            found += [Attention, WindowAttention]
    if "torchvision" in sys.modules:
        from torchvision.models.swin_transformer import ShiftedWindowAttention
        from torchvision.models.vision_transformer import EncoderBlock

        found += [EncoderBlock, ShiftedWindowAttention]
    return tuple(found)


# --- built-in candidates ----------------------------------------------------------------------


def _timm_build(name: str, **kwargs) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)

    return build


def _timm_preprocess(cfg_name: str) -> Callable[[], Preprocess]:
    def make() -> Preprocess:
        import timm

        cfg = timm.models.get_pretrained_cfg(cfg_name)
        crop = int(cfg.input_size[-1])
        return Preprocess(
            resize=int(round(crop / cfg.crop_pct)),
            crop=crop,
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
        )

    return make


def _torchvision_build(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)

    return build


def _torchvision_preprocess(name: str) -> Callable[[], Preprocess]:
    def make() -> Preprocess:
        import torchvision

        weights = torchvision.models.get_model_weights(name).DEFAULT
        kw = getattr(weights.transforms, "keywords", {})
        return Preprocess(
            resize=int(kw.get("resize_size", 256)),
            crop=int(kw.get("crop_size", 224)),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )

    return make


def _has_prefix(*prefixes: str) -> Callable[[set[str]], bool]:
    return lambda keys: any(k.startswith(prefixes) for k in keys)


def _register_builtins() -> None:
    timm_attn = _has_prefix("layer1.0.se.")
    for depth in (18, 34, 50):
        for attn in ("cbam", "lcbam", "eca"):
            name = f"resnet{depth}"
            _registry[f"{name}+{attn}"] = Architecture(
                f"{name}+{attn}",
                "timm",
                _timm_build(name, block_args={"attn_layer": attn}),
                timm_attn,
                _timm_preprocess(name),
            )
    for name in ("ecaresnet26t", "ecaresnet50t", "ecaresnet50d", "ecaresnet101d", "ecaresnetlight"):
        _registry[name] = Architecture(
            name, "timm", _timm_build(name), timm_attn, _timm_preprocess(name)
        )
    effnet = lambda keys: "features.0.0.weight" in keys and "classifier.1.weight" in keys  # noqa: E731
    for i in range(8):
        name = f"efficientnet_b{i}"
        _registry[name] = Architecture(
            name, "torchvision", _torchvision_build(name), effnet, _torchvision_preprocess(name)
        )
    mobile = lambda keys: "features.0.0.weight" in keys and "classifier.3.weight" in keys  # noqa: E731
    for name in ("mobilenet_v3_small", "mobilenet_v3_large"):
        _registry[name] = Architecture(
            name, "torchvision", _torchvision_build(name), mobile, _torchvision_preprocess(name)
        )
    regnet = _has_prefix("trunk_output.")
    for size in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf", "128gf"):
        name = f"regnet_y_{size}"
        _registry[name] = Architecture(
            name, "torchvision", _torchvision_build(name), regnet, _torchvision_preprocess(name)
        )

    _register_dense_builtins()


SEGMENTERS = {  # torchvision segmentation: name -> hint (with and without the auxiliary head)
    "fcn_resnet50": "classifier.4.weight",
    "fcn_resnet101": "classifier.4.weight",
    "deeplabv3_resnet50": "classifier.0.convs.0.0.weight",
    "deeplabv3_resnet101": "classifier.0.convs.0.0.weight",
    "deeplabv3_mobilenet_v3_large": "classifier.0.convs.0.0.weight",
    "lraspp_mobilenet_v3_large": "classifier.cbr.0.weight",
}
DETECTORS = {  # torchvision detection: name -> hint; same keys: the first listed is chosen
    "fasterrcnn_resnet50_fpn": "roi_heads.box_predictor.cls_score.weight",
    "fasterrcnn_resnet50_fpn_v2": "roi_heads.box_predictor.cls_score.weight",
    "fasterrcnn_mobilenet_v3_large_fpn": "roi_heads.box_predictor.cls_score.weight",
    "maskrcnn_resnet50_fpn": "roi_heads.mask_predictor.mask_fcn_logits.weight",
    "maskrcnn_resnet50_fpn_v2": "roi_heads.mask_predictor.mask_fcn_logits.weight",
    "retinanet_resnet50_fpn": "head.classification_head.cls_logits.weight",
    "retinanet_resnet50_fpn_v2": "head.classification_head.cls_logits.weight",
    "fcos_resnet50_fpn": "head.regression_head.bbox_ctrness.weight",
    "ssd300_vgg16": "backbone.scale_weight",
    "ssdlite320_mobilenet_v3_large": "head.classification_head.module_list.0.1.weight",
}
"""Segmentation and detection networks `load_checkpoint` recognises by keys and shapes. Their
output is not class logits: `analyze` needs a target for them (`viz.targets`)."""


def _torchvision_dense_build(name: str, **options) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import torchvision

        return torchvision.models.get_model(
            name, weights=None, weights_backbone=None, num_classes=num_classes, **options
        )

    return build


def _torchvision_categories(name: str) -> Callable[[int], list[str] | None]:
    """The categories of torchvision's weights for `name` (VOC's 21, COCO's 91) when the class
    count is theirs; COCO's repeated "N/A" placeholders get their index, so names stay unique."""

    def names(count: int) -> list[str] | None:
        import torchvision

        found = list(torchvision.models.get_model_weights(name).DEFAULT.meta["categories"])
        if len(found) != count:
            return None
        return [c if found.count(c) == 1 else f"{c} ({i})" for i, c in enumerate(found)]

    return names


def _register_dense_builtins() -> None:
    # segmenters see the image at torchvision's evaluation size; detectors normalise and
    # resize inside (their transform), so they take the pixels in [0, 1] as they are
    segmenter_input = lambda: Preprocess(resize=520, crop=520)  # noqa: E731
    detector_input = lambda: Preprocess(resize=512, crop=512, mean=(0.0,) * 3, std=(1.0,) * 3)  # noqa: E731
    for name, key in SEGMENTERS.items():
        has_head = lambda keys, key=key: key in keys  # noqa: E731
        has_aux = lambda keys, key=key: key in keys and "aux_classifier.0.weight" in keys  # noqa: E731
        names = _torchvision_categories(name)
        if not name.startswith("lraspp"):
            _registry[f"{name}+aux"] = Architecture(
                f"{name}+aux", "torchvision", _torchvision_dense_build(name, aux_loss=True),
                has_aux, segmenter_input, names_for=names,
            )  # fmt: skip
        _registry[name] = Architecture(
            name, "torchvision", _torchvision_dense_build(name), has_head, segmenter_input,
            names_for=names,
        )  # fmt: skip
    for name, key in DETECTORS.items():
        _registry[name] = Architecture(
            name, "torchvision", _torchvision_dense_build(name),
            lambda keys, key=key: key in keys, detector_input,
            names_for=_torchvision_categories(name),
        )  # fmt: skip


_register_builtins()
