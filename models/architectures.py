"""Other networks' checkpoints: recognise a state dict by keys and shapes, rebuild its network.

Attention Lens's own ResNets (and torchvision's plain ResNets, timm's SE-ResNets, which share
their keys) are read by `models.checkpoint.infer_arch`. Everything else is matched here against
candidate architectures, each built once on the meta device (no weights allocated) to learn its
keys and shapes; the classifier is the pair of tensors whose first dimension follows the number
of classes, so that number is read off the file too.

Built in: timm `ecaresnet*` and `resnet18/34/50` with CBAM, light CBAM or ECA in their blocks;
torchvision `efficientnet_b0`...`b7`, `mobilenet_v3_small/large`, `regnet_y_*`. Researchers add
their own with `register_architecture` (usually from a plugin: `models.plugins`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

__all__ = [
    "Architecture",
    "ForeignArch",
    "forget_signatures",
    "match_architecture",
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
        attention: attention kinds found in the network ("cbam", "se", "eca", ...), or None.
    """

    name: str
    source: str
    num_classes: int
    attention: str | None = None

    @property
    def label(self) -> str:
        """Short human name, e.g. "timm ecaresnet26t"."""
        return f"{self.source} {self.name}"

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "name": self.name,
            "num_classes": self.num_classes,
            "attention": self.attention,
        }


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
    """

    name: str
    source: str
    build: Callable[[int], nn.Module]
    hint: Callable[[set[str]], bool]
    preprocess: Callable[[], Preprocess] | None = None
    class_names: list[str] | None = None


_lock = threading.Lock()
_registry: dict[str, Architecture] = {}
_signatures: dict[
    str, tuple[Shapes, set[str]]
] = {}  # name -> (shapes at 1000 classes, classifier keys)


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


def _signature(arch: Architecture) -> tuple[Shapes, set[str]]:
    """Keys and shapes at 1000 classes, and which keys follow the class count (cached)."""
    with _lock:
        hit = _signatures.get(arch.name)
    if hit is not None:
        return hit
    with torch.device("meta"):
        a, b = _shapes(arch.build(1000)), _shapes(arch.build(7))
    classifier = {k for k in a if k in b and a[k] != b[k]}
    with _lock:
        _signatures[arch.name] = (a, classifier)
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
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:2])}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:2])}")
        return _Verdict(arch, None, score, "; ".join(parts))
    classes = {state[k].shape[0] for k in classifier if state[k].ndim >= 1}
    if len(classes) > 1:
        return _Verdict(arch, None, score, "classifier shapes disagree")
    num_classes = classes.pop() if classes else 1000
    for key in sorted(common):
        expected = shapes[key]
        if key in classifier:
            expected = (num_classes, *expected[1:])
        if tuple(state[key].shape) != expected:
            got = list(state[key].shape)
            return _Verdict(arch, None, score - 0.01, f"{key} is {got}, expected {list(expected)}")
    return _Verdict(arch, num_classes, 1.0, "")


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
        verdict = _compare(arch, state)
        if verdict.num_classes is not None:
            return arch, verdict.num_classes
        verdicts.append(verdict)
    best = max(verdicts, key=lambda v: v.score)
    return f"closest known architecture is {best.arch.source} {best.arch.name}: {best.problem}"


def _hint(arch: Architecture, keys: set[str]) -> bool:
    try:
        return bool(arch.hint(keys))
    except Exception:
        return False


def attention_kind(model: nn.Module) -> str | None:
    """The attention kinds the probe registry finds in `model`, joined ("cbam", "se+eca")."""
    from .probes import find_probe

    kinds: list[str] = []
    for m in model.modules():
        probe = find_probe(m)
        if probe is not None and probe.kind not in kinds:
            kinds.append(probe.kind)
    return "+".join(kinds) or None


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


_register_builtins()
