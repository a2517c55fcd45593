"""Hugging Face `transformers` image classifiers and headless vision models (`ViTModel`,
`Dinov2Model`, `CLIPVisionModel`, ...), from a `save_pretrained` folder or its zip.

A folder holds `config.json`, the weights (`model.safetensors`, or the shards its
`model.safetensors.index.json` names) and often `preprocessor_config.json`. The network is
built by transformers' own class for the config's `model_type` and `architectures`, taken from
an allow-list (`FAMILIES`): nothing the folder holds is run. A config with `auto_map` (custom
code), a folder or zip with Python files, a quantized config and pickled weights
(`pytorch_model.bin`) are refused; the safetensors go through the same checks as every other
checkpoint (`read_weights`: dense real tensors, a memory budget, no NaN or Inf).

Weights saved by transformers use its legacy key names (`encoder.layer.0.attention.attention.
query`); the library's own conversion renames them: `from_pretrained(None, config=...,
state_dict=...)` is given the tensors already read, so it opens no file and asks the Hub
nothing (`HF_HUB_OFFLINE` is set too, unless the user set it). Before that, the network the
config describes is built on the meta device and refused when it needs more weights than the
file holds (a config whose sizes disagree with the weights, before anything is allocated).

The model keeps its fast attention (`attn_implementation="sdpa"`); the tracer reads the
probabilities from its q and k projections (`models.probes.selfattention.HuggingFaceAttentionReader`).
`HuggingFaceClassifier` wraps it so that `model(x)` is the logits tensor (N, K), the
transformers model kept as the submodule `hf`; `HuggingFaceEmbedder` wraps a headless model so
that `model(x)` is its embedding (N, D), with no classes (`analyze` then needs a target). Preprocessing comes from
`preprocessor_config.json` (short-side resize, centre crop, mean and std; a processor that
squashes to height x width becomes resize = crop = height), else from the family's defaults.

Cost: importing transformers' model code takes about 2 s the first time; a ViT-S/16 folder
(88 MB) then loads in about 0.4 s on one CPU thread (one meta build, the weights read once).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from models.checkpoints.architectures import ForeignArch, attention_kind, meta_build
from models.checkpoints.cost import RunCost, check_cost, estimate_cost
from models.errors import CheckpointError, first_keys, one_line
from models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

__all__ = [
    "FAMILIES",
    "Family",
    "HuggingFaceClassifier",
    "HuggingFaceEmbedder",
    "Pretrained",
    "is_pretrained_folder",
    "is_pretrained_zip",
    "load_pretrained",
]

_HALF = (0.5, 0.5, 0.5)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_CONFIG_BYTES = 1 << 20  # config.json, preprocessor_config.json
_INDEX_BYTES = 16 << 20  # model.safetensors.index.json


@dataclass(frozen=True)
class Family:
    """One `model_type` Attention Lens builds.

    Attributes:
        config: transformers' config class.
        classes: the image-classification classes allowed (the first when `architectures`
            names none).
        mean, std: normalisation without a preprocessor_config.json.
        resize_ratio: resize = crop x this without one (256/224: ImageNet evaluation).
        fixed_size: the model takes only `image_size` inputs (no position interpolation), so
            the crop is the config's image size whatever the processor says.
        crop: the crop without a processor, when not `image_size` (DINOv2's 518 px position
            table is evaluated at 224).
        vision: the sizes are in the config's `vision_config` (CLIP, SigLIP).
        backbone: the headless class (no classifier: `ViTModel`, `Dinov2Model`, ...), opened
            as an embedding network (`HuggingFaceEmbedder`), or None.
    """

    config: str
    classes: tuple[str, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_ratio: float = 1.0
    fixed_size: bool = True
    crop: int | None = None
    vision: bool = False
    backbone: str | None = None


FAMILIES: dict[str, Family] = {
    "vit": Family("ViTConfig", ("ViTForImageClassification",), _HALF, _HALF, backbone="ViTModel"),
    "deit": Family(
        "DeiTConfig",
        ("DeiTForImageClassificationWithTeacher", "DeiTForImageClassification"),
        resize_ratio=256 / 224,
        backbone="DeiTModel",
    ),
    "beit": Family(
        "BeitConfig", ("BeitForImageClassification",), _HALF, _HALF, backbone="BeitModel"
    ),
    "dinov2": Family(
        "Dinov2Config",
        ("Dinov2ForImageClassification",),
        resize_ratio=256 / 224,
        fixed_size=False,
        crop=224,
        backbone="Dinov2Model",
    ),
    "dinov2_with_registers": Family(
        "Dinov2WithRegistersConfig",
        ("Dinov2WithRegistersForImageClassification",),
        resize_ratio=256 / 224,
        fixed_size=False,
        crop=224,
        backbone="Dinov2WithRegistersModel",
    ),
    "clip": Family(
        "CLIPConfig", ("CLIPForImageClassification",), _CLIP_MEAN, _CLIP_STD, vision=True
    ),
    "clip_vision_model": Family(
        "CLIPVisionConfig", (), _CLIP_MEAN, _CLIP_STD, backbone="CLIPVisionModel"
    ),
    "siglip": Family("SiglipConfig", ("SiglipForImageClassification",), _HALF, _HALF, vision=True),
    "siglip_vision_model": Family(
        "SiglipVisionConfig", (), _HALF, _HALF, backbone="SiglipVisionModel"
    ),
    "swin": Family(
        "SwinConfig", ("SwinForImageClassification",), fixed_size=False, backbone="SwinModel"
    ),
    "swinv2": Family(
        "Swinv2Config", ("Swinv2ForImageClassification",), fixed_size=False, backbone="Swinv2Model"
    ),
}
"""model_type -> what is built for it. Nothing else is: no custom code, no other task."""

# integer sizes a config may give, with the largest accepted (checked before anything is built)
_SIZE_LIMITS = {
    "hidden_size": 16384,
    "intermediate_size": 131072,
    "num_hidden_layers": 256,
    "num_attention_heads": 512,
    "image_size": 8192,
    "patch_size": 1024,
    "num_register_tokens": 256,
    "num_channels": 16,
    "embed_dim": 16384,
    "window_size": 1024,
    "depths": 256,  # Swin: per stage
    "num_heads": 512,
}


@dataclass(frozen=True)
class Pretrained:
    """A loaded transformers classifier and what is known about it."""

    model: nn.Module
    arch: ForeignArch
    class_names: list[str] | None  # None: the config has none (transformers' LABEL_i)
    preprocess: Preprocess
    sha256: str
    metadata: dict = field(default_factory=dict)
    cost: RunCost | None = None


class HuggingFaceClassifier(nn.Module):
    """A transformers image classifier whose `forward` returns the logits tensor.

    Attributes:
        hf: the transformers model (its own forward gives a `ModelOutput`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) pixels, normalised -> (N, K) logits."""
        return self.hf(pixel_values=x).logits


class HuggingFaceEmbedder(nn.Module):
    """A headless transformers vision model (`Dinov2Model`, `CLIPVisionModel`, ...) whose
    `forward` returns one embedding per image: the model's pooled output where it has one
    (DINOv2's and CLIP's normalised class token, Swin's mean), else the class token.

    Attributes:
        hf: the transformers model.
        num_classes: 0 (no classifier: `analyze` asks for a target, `viz.targets`).
    """

    num_classes = 0

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) pixels, normalised -> (N, D) embeddings."""
        out = self.hf(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]


# --- the files of a folder or a zip -------------------------------------------------------------


class _Files:
    """The top-level files of a save_pretrained folder (or the folder inside a zip)."""

    def __init__(self, sizes: dict[str, int], read: Callable[[str], bytes]) -> None:
        self.sizes, self._read = sizes, read
        self.digest = hashlib.sha256()  # of every file read, name and bytes, in reading order

    def read(self, name: str, limit: int) -> bytes:
        if name not in self.sizes:
            raise CheckpointError(f"the folder has no {name}")
        if self.sizes[name] > limit:
            raise CheckpointError(f"{name} is over the {_mib(limit)} limit")
        try:
            data = self._read(name)
        except OSError as exc:
            raise CheckpointError(f"cannot read {name} ({one_line(exc)})") from None
        self.digest.update(name.encode() + b"\0" + data)
        return data


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


def is_pretrained_folder(source: object) -> bool:
    """`source` is a path to a folder (the caller then reads it as a save_pretrained folder)."""
    return isinstance(source, (str, os.PathLike)) and Path(source).is_dir()


def _folder(path: Path) -> _Files:
    try:
        entries = {p.name: p for p in path.iterdir()}
        sizes = {name: p.stat().st_size for name, p in entries.items() if p.is_file()}
    except OSError as exc:
        raise CheckpointError(f"cannot read the folder ({one_line(exc)})") from None
    if "config.json" in sizes:
        _refuse_code(entries)
    return _Files(sizes, lambda name: entries[name].read_bytes())


def _refuse_code(names) -> None:
    code = sorted(n for n in names if n.endswith((".py", ".pyc")))
    if code:
        raise CheckpointError(
            f"the folder holds Python code ({first_keys(code)}); custom code is never run: refused"
        )


def _zip_root(infos: list[zipfile.ZipInfo]) -> str:
    """The folder inside the zip that holds config.json ("" at the top)."""
    names = [i.filename for i in infos if not i.is_dir() and not _junk(i.filename)]
    configs = [n for n in names if n.rsplit("/", 1)[-1] == "config.json"]
    if not configs:
        raise CheckpointError("zip file holds no config.json: not a save_pretrained folder")
    depth = min(n.count("/") for n in configs)
    top = [n for n in configs if n.count("/") == depth]
    if len(top) > 1:
        raise CheckpointError("zip file holds several config.json: zip one model folder")
    return top[0][: -len("config.json")]


def _junk(name: str) -> bool:
    return name.startswith("__MACOSX/") or name.rsplit("/", 1)[-1].startswith("._")


def is_pretrained_zip(data: bytes) -> bool:
    """`data` is a zip holding a config.json and no PyTorch archive (data.pkl)."""
    if data[:4] != b"PK\x03\x04":
        return False
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = [n for n in zf.namelist() if not _junk(n)]
    except Exception:  # noqa: BLE001 - damaged: left to the PyTorch reader's messages
        return False
    return any(n.rsplit("/", 1)[-1] == "config.json" for n in names) and not any(
        n.endswith("data.pkl") for n in names
    )


@contextmanager
def _zip(data: bytes, limit: int) -> Iterator[_Files]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            root = _zip_root(infos)
            _refuse_code(i.filename for i in infos if not _junk(i.filename))
            inside = {
                i.filename[len(root) :]: i
                for i in infos
                if i.filename.startswith(root) and "/" not in i.filename[len(root) :]
                and not i.is_dir()
            }  # fmt: skip
            for info in inside.values():
                _check_member(info, limit)
            sizes = {name: info.file_size for name, info in inside.items()}
            yield _Files(sizes, lambda name: zf.read(inside[name]))
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, ValueError, RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"zip file is damaged or truncated ({one_line(exc)})") from None


def _check_member(info: zipfile.ZipInfo, limit: int) -> None:
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise CheckpointError(f"zip file: {info.filename} uses a compression this loader refuses")
    bomb = info.file_size > 64 * info.compress_size + 2**20
    if info.file_size > limit or (info.compress_type != zipfile.ZIP_STORED and bomb):
        raise CheckpointError("zip file expands far beyond its size (zip bomb?); refused")


# --- config.json ----------------------------------------------------------------------------


def _json(files: _Files, name: str, limit: int = _CONFIG_BYTES) -> dict:
    if name == "config.json" and name not in files.sizes:
        raise CheckpointError("the folder has no config.json (not a save_pretrained folder)")
    data = files.read(name, limit)
    try:
        found = json.loads(data)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{name} is not valid JSON") from None
    if not isinstance(found, dict):
        raise CheckpointError(f"{name} is not a JSON object")
    return found


def _family(raw: dict) -> tuple[str, Family, str]:
    """(model_type, family, class name) the config names, from the allow-list only."""
    if "auto_map" in raw:
        raise CheckpointError(
            "config.json asks for custom code (auto_map); custom code is never run: refused"
        )
    if "quantization_config" in raw:
        raise CheckpointError(
            "config.json describes a quantized model; only float weights are read"
        )
    model_type = raw.get("model_type")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise CheckpointError(
            f"config.json names model_type {one_line(model_type, 40)!r}; Attention Lens reads "
            f"{', '.join(FAMILIES)}"
        )
    allowed = family.classes + ((family.backbone,) if family.backbone else ())
    named = raw.get("architectures") or [allowed[0]]
    if not isinstance(named, list) or len(named) != 1 or named[0] not in allowed:
        raise CheckpointError(
            f"config.json names {one_line(named, 60)}; for {model_type} Attention Lens reads "
            f"{', '.join(allowed)}"
        )
    return model_type, family, named[0]


def _sizes(raw: dict, family: Family) -> dict:
    """The config's size numbers (its vision_config's for CLIP / SigLIP), each bounded; a
    square (h, w) image or patch size as one number."""
    sizes = raw.get("vision_config") if family.vision else raw
    if not isinstance(sizes, dict):
        raise CheckpointError("config.json has no vision_config")
    for key, limit in _SIZE_LIMITS.items():
        value = sizes.get(key)
        values = value if isinstance(value, list) and 0 < len(value) <= 16 else [value]
        if value is None:
            continue
        if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= limit
                   for v in values):  # fmt: skip
            raise CheckpointError(
                f"config.json: {key} {one_line(value, 40)} is not a size between 1 and {limit}"
            )
    for key in ("image_size", "patch_size"):  # (h, w) pairs: square ones only
        value = sizes.get(key)
        if isinstance(value, list):
            if len(value) != 2 or value[0] != value[1]:
                raise CheckpointError(f"config.json: {key} {one_line(value, 40)} is not square")
            sizes = {**sizes, key: value[0]}
    image, patch = sizes.get("image_size", 224), sizes.get("patch_size", 16)
    if patch > image:
        raise CheckpointError(f"config.json: patch_size {patch} is over image_size {image}")
    return sizes


# --- weights --------------------------------------------------------------------------------


def _weights(
    files: _Files, limit: int, read_weights: Callable[[bytes], dict[str, Tensor]]
) -> dict[str, Tensor]:
    """The state dict, from one file or the shards its index names."""
    if "model.safetensors.index.json" in files.sizes:
        index = _json(files, "model.safetensors.index.json", _INDEX_BYTES)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise CheckpointError("model.safetensors.index.json has no weight_map of file names")
        shards = sorted(set(weight_map.values()))
    elif "model.safetensors" in files.sizes:
        weight_map, shards = None, ["model.safetensors"]
    else:
        pickled = [n for n in files.sizes if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        found = f" (found {first_keys(pickled)}: save with safe_serialization)" if pickled else ""
        raise CheckpointError(f"the folder has no model.safetensors{found}")
    bad = [s for s in shards if s not in files.sizes or not s.endswith(".safetensors")]
    if bad:
        raise CheckpointError(f"the weight index names shards the folder lacks: {first_keys(bad)}")
    if sum(files.sizes[s] for s in shards) > limit:
        raise CheckpointError(f"the weights are over the {_mib(limit)} limit")
    state: dict[str, Tensor] = {}
    for shard in shards:
        tensors = read_weights(files.read(shard, limit))
        if weight_map is not None and any(weight_map.get(k) != shard for k in tensors):
            raise CheckpointError(f"{shard} holds tensors its index places elsewhere")
        state.update(tensors)
    if weight_map is not None and set(weight_map) != set(state):
        missing = sorted(set(weight_map) - set(state))
        raise CheckpointError(f"the shards lack tensors their index names: {first_keys(missing)}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(
        v.sum(dtype=torch.float64))]  # fmt: skip
    if bad:
        raise CheckpointError(f"weights contain NaN or Inf: {first_keys(bad)}")
    return state


# --- building -------------------------------------------------------------------------------


def _transformers():
    """The transformers package, imported with the Hub switched off unless the user chose."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import transformers

    return transformers


_quiet_lock = threading.Lock()  # transformers' logging settings are global: one load at a time


@contextmanager
def _quiet(tf) -> Iterator[None]:
    """transformers' load report, progress bars and warnings off (restored after)."""
    logging = tf.utils.logging
    with _quiet_lock:
        verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
        logging.set_verbosity_error()
        logging.disable_progress_bar()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            logging.set_verbosity(verbosity)
            if bars:
                logging.enable_progress_bar()


def _build(tf, class_name: str, config, state: dict[str, Tensor]) -> nn.Module:
    """transformers' class `class_name` with `state` loaded (legacy key names renamed)."""
    cls = getattr(tf, class_name)
    impl = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    with _quiet(tf):
        try:
            with meta_build():
                shell = cls._from_config(config, attn_implementation=impl)
        except Exception as exc:  # noqa: BLE001 - a config transformers refuses
            raise CheckpointError(
                f"config.json cannot build {class_name} ({one_line(exc)})"
            ) from None
        wanted = sum(p.numel() for p in shell.parameters())
        held = sum(t.numel() for t in state.values())
        if wanted > held:
            raise CheckpointError(
                f"config.json describes {class_name} with {wanted:,} weights but the file holds "
                f"{held:,}: the config's sizes do not fit the weights; refused"
            )
        try:
            model, info = cls.from_pretrained(
                None, config=config, state_dict=state, output_loading_info=True,
                attn_implementation=impl, dtype=torch.float32, ignore_mismatched_sizes=True,
                local_files_only=True,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - transformers' loader raises many types
            raise CheckpointError(
                f"transformers cannot load {class_name} ({one_line(exc)})"
            ) from None
    _check_loaded(info)
    return model.eval()


def _check_loaded(info: dict) -> None:
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        key, in_file, in_model = mismatched[0]
        raise CheckpointError(
            f"config.json's sizes do not fit the weights: {key} is {list(in_file)} in the file, "
            f"{list(in_model)} by the config ({len(mismatched)} such); refused"
        )
    missing, unexpected = (
        sorted(info.get("missing_keys") or ()),
        sorted(info.get("unexpected_keys") or ()),
    )
    if missing:
        raise CheckpointError(f"weights missing for this config: {first_keys(missing)}")
    if unexpected:
        raise CheckpointError(
            f"the file holds weights this config has no place for: {first_keys(unexpected)}"
        )
    if info.get("error_msgs"):
        raise CheckpointError(f"weights do not load: {one_line(info['error_msgs'][0])}")


# --- labels, preprocessing, cost ------------------------------------------------------------


def _class_names(raw: dict, count: int) -> list[str] | None:
    """Names from id2label, in class order (None: absent, incomplete or transformers' LABEL_i)."""
    labels = raw.get("id2label")
    if not isinstance(labels, dict) or len(labels) != count:
        return None
    names = [labels.get(str(i)) for i in range(count)]
    if not all(isinstance(n, str) for n in names) or names == [f"LABEL_{i}" for i in range(count)]:
        return None
    return [one_line(n, 200) or f"class {i}" for i, n in enumerate(names)]


def _side(value: object) -> int | None:
    """A processor size: an int, {"shortest_edge": s} or {"height": h, "width": w} -> one side."""
    if isinstance(value, dict):
        value = value.get("shortest_edge", value.get("height"))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _triple(value: object, default: tuple) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    if isinstance(value, list) and len(value) == 3:
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return tuple(float(v) for v in value)
    return default


def _preprocess(processor: dict | None, family: Family, image_size: int) -> Preprocess:
    """The processor's resize, crop, mean and std as a `Preprocess` (family defaults without)."""
    crop = min(family.crop or image_size, image_size)
    resize = round(crop * family.resize_ratio)
    mean, std = family.mean, family.std
    if processor is not None:
        size, crop_size = _side(processor.get("size")), _side(processor.get("crop_size"))
        if processor.get("do_center_crop") and crop_size:
            crop, resize = crop_size, size or crop_size
        elif size:
            crop = resize = size
        if processor.get("do_normalize", True) is False:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        else:
            mean = _triple(processor.get("image_mean"), mean)
            std = _triple(processor.get("image_std"), std)
    if family.fixed_size and crop != image_size:  # the model takes image_size inputs only
        resize, crop = round(resize * image_size / crop), image_size
    try:
        return Preprocess.from_dict({"resize": resize, "crop": crop, "mean": mean, "std": std})
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"preprocessor_config.json: {one_line(exc)}") from None


def _config_cost(sizes: dict, crop: int, prefix: int) -> RunCost:
    """A ViT's cost from its sizes, for a network the meta-device run cannot estimate."""
    tokens = (crop // sizes.get("patch_size", 16)) ** 2 + prefix
    width, layers = sizes.get("hidden_size", 768), sizes.get("num_hidden_layers", 12)
    heads = sizes.get("num_attention_heads", 12)
    flops = layers * (24 * tokens * width**2 + 4 * tokens**2 * width)
    memory = layers * (heads * tokens**2 + 16 * tokens * width) * 4
    return RunCost(float(flops), float(memory), tokens)


# --- the front door ---------------------------------------------------------------------------


def load_pretrained(
    source: str | os.PathLike | bytes,
    *,
    max_bytes: int,
    allow_costly: bool | None,
    read_weights: Callable[[bytes], dict[str, Tensor]],
) -> Pretrained:
    """A save_pretrained folder (a path) or its zip (the bytes) -> the classifier, wrapped.

    Args:
        source: the folder's path, or the zip's bytes.
        max_bytes: refuse weights (all shards together) larger than this.
        allow_costly: as `models.checkpoints.cost.check_cost`.
        read_weights: safetensors bytes -> checked tensors (the checkpoint loader's reader).

    Raises:
        CheckpointError: one line saying why the folder cannot be used; nothing has run.
    """
    if isinstance(source, (bytes, bytearray)):
        with _zip(bytes(source), max_bytes) as files:
            found = _load(files, max_bytes, allow_costly, read_weights)
        return dataclasses.replace(found, sha256=hashlib.sha256(source).hexdigest())
    return _load(_folder(Path(source)), max_bytes, allow_costly, read_weights)


def _load(files: _Files, max_bytes: int, allow_costly, read_weights) -> Pretrained:
    raw = _json(files, "config.json")
    model_type, family, class_name = _family(raw)
    sizes = _sizes(raw, family)
    processor = (
        _json(files, "preprocessor_config.json") if "preprocessor_config.json" in files.sizes
        else None
    )  # fmt: skip
    state = _weights(files, max_bytes, read_weights)
    tf = _transformers()
    try:
        with _quiet(tf):
            config = getattr(tf, family.config).from_dict(raw)
    except Exception as exc:  # noqa: BLE001 - transformers validates its configs its own way
        raise CheckpointError(
            f"config.json is not a valid {family.config} ({one_line(exc)})"
        ) from None
    headless = class_name == family.backbone
    wrap = HuggingFaceEmbedder if headless else HuggingFaceClassifier
    model = wrap(_build(tf, class_name, config, state)).eval()
    count = 0 if headless else int(getattr(model.hf.config, "num_labels", 0) or 0)
    if count < 1 and not headless:
        raise CheckpointError(f"{class_name} has no classification head (num_labels 0)")
    preprocess = _preprocess(processor, family, sizes.get("image_size", 224))
    cost = estimate_cost(model, (1, 3, preprocess.crop, preprocess.crop)) or _config_cost(
        sizes, preprocess.crop, 1 + sizes.get("num_register_tokens", 0) + (model_type == "deit")
    )
    arch = ForeignArch(class_name, "transformers", count, attention_kind(model))
    refusal = check_cost(cost, allow_costly)
    if refusal is not None:
        raise CheckpointError(f"{arch.label}: {refusal}")
    version = raw.get("transformers_version")
    metadata = {
        "transformers": {
            "model_type": model_type,
            "architecture": class_name,
            "attn_implementation": model.hf.config._attn_implementation,
            "saved_with": one_line(version, 40) if isinstance(version, str) else None,
        }
    }
    names = _class_names(raw, count) if count else []
    return Pretrained(model, arch, names, preprocess, files.digest.hexdigest(), metadata, cost)
