"""Load and save checkpoints safely: detect the format and the architecture, never run pickled code.

Readable layouts (`Checkpoint.format`):

- `attention-lens`: our safetensors file with JSON metadata (written by `save_checkpoint`).
- `safetensors`: a bare safetensors state dict.
- `official`: the official BAM/CBAM training dict `{"epoch", "arch", "state_dict", "best_prec1",
  "optimizer"}`, `module.` prefixes, PyTorch 0.4 legacy serialization, tensors saved on a GPU.
- `state-dict`: a bare state dict in torchvision / official / timm key names (also wrapped
  in `{"state_dict": ...}` or `{"model": ...}`), saved by `torch.save` (zip or legacy).
- `pytorchcv`: imgclsmob's `cbam_resnet*` / `bam_resnet*` / `resnet18/34` key names, renamed to
  ours (their plain ResNet-50/101/152 are refused: see `models/pytorchcv.py`).
- `transformers`: a Hugging Face `save_pretrained` folder of an image classifier, or its zip
  (`models/huggingface.py`: built from an allow-list, its safetensors read by this loader).

Other networks (timm's and torchvision's CNNs with attention gates, vision transformers, plugins)
are recognised by keys and shapes (`models.checkpoints.architectures`, `models.checkpoints.vit_recognition`); an Attention
Lens file of one of them names it in its metadata, which the weights must then fit exactly.

Every pickle goes through `torch.load(weights_only=True)`, whose unpickler only builds tensors and
plain containers; anything else is refused before it runs. Before that, `_pickle_guard` walks the
pickle's opcodes and refuses calls that would build far more than the file holds (memory bombs).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import struct
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor, nn

import models.networks.hybrid as _hybrid  # noqa: F401  (registers the hybrid CNN + ViT)
from models.checkpoints._pickle_guard import DAMAGED, check_pickles, refused_call
from models.checkpoints.architectures import (
    Architecture,
    ForeignArch,
    attention_kind,
    fit_architecture,
    match_architecture,
    meta_build,
    skip_init,
)
from models.checkpoints.cost import RunCost, check_cost, estimate_cost
from models.checkpoints.huggingface import is_pretrained_folder, is_pretrained_zip, load_pretrained
from models.checkpoints.pytorchcv import is_pytorchcv_layout, rename_pytorchcv
from models.checkpoints.shipped import embedded_path
from models.checkpoints.vit_recognition import described
from models.errors import CheckpointError, first_keys, one_line
from models.networks.attention import attention_from_keys
from models.networks.resnet import DEPTHS, Arch, ResNet
from models.preprocess import Preprocess

__all__ = [
    "parse_class_names",
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "save_checkpoint",
    "infer_arch",
    "imagenet_class_names",
    "MAX_CHECKPOINT_BYTES",
]

MAX_CHECKPOINT_BYTES = 1 << 30  # 1 GiB: ResNet-152 in float32 is ~240 MB
METADATA_KEY = "attention_lens"
FORMAT_VERSION = 1
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
_STRIP_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class Checkpoint:
    """A loaded network and everything known about it."""

    model: nn.Module
    arch: Arch | ForeignArch
    class_names: list[str]
    preprocess: Preprocess
    format: str
    sha256: str
    metadata: dict = field(default_factory=dict)
    cost: RunCost | None = None  # one image at the preprocessing's size (None: not estimated)

    @property
    def label(self) -> str:
        return self.metadata.get("name") or self.arch.label


# --- reading bytes ----------------------------------------------------------------------------


def _read_source(source: str | os.PathLike | bytes | BinaryIO, limit: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise CheckpointError(f"no checkpoint file at {str(path)!r}")
        size = path.stat().st_size
        if size == 0:  # also /proc files, which report 0 and may block when read
            raise CheckpointError("checkpoint is empty (0 bytes)")
        if size > limit:
            raise CheckpointError(f"checkpoint is {_size(size)}, over the {_size(limit)} limit")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"cannot read {str(path)!r} ({_short(exc)})") from None
    elif isinstance(source, io.TextIOBase):
        raise CheckpointError("checkpoint file object must be opened in binary mode")
    elif hasattr(source, "read"):
        try:
            data = source.read(limit + 1)
        except (OSError, ValueError) as exc:  # closed or unreadable stream
            raise CheckpointError(
                f"cannot read the checkpoint file object ({_short(exc)})"
            ) from None
        if not isinstance(data, (bytes, bytearray)):
            raise CheckpointError("checkpoint file object must be opened in binary mode")
        data = bytes(data)
    else:
        raise CheckpointError(f"cannot read a checkpoint from a {type(source).__name__}")
    if len(data) > limit:
        raise CheckpointError(f"checkpoint is over the {_size(limit)} limit")
    if not data:
        raise CheckpointError("checkpoint is empty (0 bytes)")
    return data


def _size(n: int) -> str:
    return f"{n} bytes" if n < 2**20 else f"{n / 2**20:.1f} MiB"


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    (header_len,) = struct.unpack("<Q", data[:8])
    return 2 <= header_len <= len(data) - 8 and data[8:9] == b"{"


def _read_safetensors(data: bytes) -> tuple[dict[str, Tensor], dict]:
    from safetensors.torch import load as load_safetensors

    (header_len,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + header_len])
        tensors = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"safetensors file is damaged or truncated ({_short(exc)})") from None
    if not isinstance(header, dict):
        raise CheckpointError("safetensors header is not a JSON object")
    extra = header.get("__metadata__") or {}
    raw_meta = extra.get(METADATA_KEY) if isinstance(extra, dict) else None
    meta = {}
    if raw_meta:
        if not isinstance(raw_meta, str) or len(raw_meta) > 1_000_000:
            raise CheckpointError("checkpoint metadata must be a JSON text under 1 MB")
        try:
            meta = json.loads(raw_meta)
        except (ValueError, RecursionError):  # ValueError: also an int of over 4300 digits
            raise CheckpointError(
                "checkpoint metadata is not valid JSON (or nested too deep, or a number too long)"
            ) from None
        if not isinstance(meta, dict):
            raise CheckpointError("checkpoint metadata must be a JSON object")
    return tensors, meta


# what zipfile raises on damaged archives: UnicodeDecodeError (a ValueError) for a name marked
# UTF-8 that is not, NotImplementedError (a RuntimeError) for an unknown zip version or method,
# OverflowError for a record offset far outside the file
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    ValueError,
    RuntimeError,
    EOFError,
    OSError,
    OverflowError,
    struct.error,
    zlib.error,
)


def _zip_pickles(data: bytes, limit: int) -> list[bytes]:
    """The archive's data.pkl records, after refusing zip bombs and archives zipfile cannot read."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            _check_zip(infos, limit)
            # every data.pkl: torch reads the one under the first record's folder
            return [zf.read(i) for i in infos if i.filename.endswith("data.pkl")]
    except CheckpointError:
        raise
    except UnicodeDecodeError:
        raise CheckpointError(
            "checkpoint zip archive has a record name that is not UTF-8 text (damaged?)"
        ) from None
    except NotImplementedError as exc:  # "zip file version 9.9", an unknown compression
        raise CheckpointError(
            f"checkpoint zip archive needs a zip feature this loader cannot read ({_short(exc)})"
        ) from None
    except _ZIP_ERRORS as exc:
        raise CheckpointError(
            f"checkpoint zip archive is damaged or truncated ({_short(exc)})"
        ) from None


def _check_zip(infos: list[zipfile.ZipInfo], limit: int) -> None:
    """Refuse zip bombs and compressions torch cannot read, before anything is decompressed."""
    total = sum(i.file_size for i in infos)
    if total > limit or any(
        i.compress_type != zipfile.ZIP_STORED and i.file_size > 64 * i.compress_size + 2**20
        for i in infos
    ):
        raise CheckpointError("checkpoint archive expands far beyond its size (zip bomb?); refused")
    if any(i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) for i in infos):
        raise CheckpointError("checkpoint zip archive uses a compression PyTorch cannot read")
    if not any(i.filename.endswith("data.pkl") for i in infos):
        raise CheckpointError("zip file is not a PyTorch checkpoint (no data.pkl inside)")


# what torch.load raises on damaged files, besides pickle.UnpicklingError (others: not readable)
_LOAD_ERRORS = (EOFError, OSError, RuntimeError, ValueError, TypeError, LookupError, struct.error)


def _torch_load(data: bytes, limit: int) -> object:
    """torch.load(weights_only=True) of untrusted bytes: bounded first, every failure one line."""
    if data[:4] == b"PK\x03\x04":
        for pickled in _zip_pickles(data, limit):
            check_pickles(pickled)
    elif data[:1] == b"\x80":
        # legacy: magic number, protocol, system info, the data, storage keys; then raw storages
        check_pickles(data, count=5, storage_bytes=len(data))
    else:
        raise CheckpointError(
            "not a checkpoint: expected a PyTorch (.pth/.pt/.tar) or safetensors file"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        name = found.group(1) if found else ""
        if name and not name.endswith("."):  # a cut file can end inside a GLOBAL's name
            raise CheckpointError(refused_call(name)) from None
        raise CheckpointError(DAMAGED) from None
    except MemoryError:
        raise CheckpointError(_TOO_LARGE) from None
    except Exception as exc:  # torch's loaders trust the file: AttributeError, AssertionError...
        raise CheckpointError(_explain_torch_error(exc)) from None


_TOO_LARGE = "checkpoint declares tensors too large to allocate; refused"
_BAD_SIZE = "checkpoint is damaged: a tensor's declared size does not fit its stored data"
_TORCH_ERRORS = (  # a phrase in torch's error (lower case) -> what it means for the user
    ("allocate", _TOO_LARGE),
    ("file with version", "checkpoint's archive version is not one this PyTorch reads (damaged?)"),
    ("storage key", "checkpoint is damaged: its list of storages names one its data does not have"),
    ("can't decode", "checkpoint is damaged: a name or text in it is not UTF-8"),
    ("failed locating file", "checkpoint is damaged: a tensor's data record is missing from it"),
    ("magic number", "not a PyTorch checkpoint (a plain pickle, or a damaged file)"),
    ("size", _BAD_SIZE),
    ("overflow", _BAD_SIZE),
    ("incompatible function arguments", _BAD_SIZE),  # a size beyond int64
)


def _explain_torch_error(exc: BaseException) -> str:
    text = str(exc).lower()
    for phrase, message in _TORCH_ERRORS:
        if phrase in text:
            return message
    if isinstance(exc, _LOAD_ERRORS):
        return f"checkpoint is damaged or truncated ({_short(exc)})"
    return f"not a readable PyTorch checkpoint ({type(exc).__name__}: {_short(exc)})"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line[:160]


# --- state dict shape -------------------------------------------------------------------------


def _unwrap(obj: object) -> tuple[dict, str, dict]:
    """Return (state dict, format, training info) from whatever torch.load gave."""
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"not a checkpoint: the file holds a {type(obj).__name__}, not a state dict"
        )
    info: dict = {}
    fmt = "state-dict"
    for key in _WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], dict):
            official = {"epoch", "arch", "state_dict"} <= set(obj)
            fmt = "official" if official else "state-dict"
            for k in ("epoch", "arch", "best_prec1"):
                if k in obj:
                    info[k] = _plain(obj[k])
            obj = obj[key]
            break
    if not obj:
        raise CheckpointError("not a checkpoint: the state dict is empty")
    return obj, fmt, info


def _plain(value: object) -> object:
    """A training value (epoch, best_prec1, ...) as JSON-able data; a tensor only when small and
    plain (a stride-0 view of 10^9 elements would be 10^9 floats; a meta tensor has no value)."""
    if isinstance(value, Tensor):
        plain = value.layout == torch.strided and value.device.type == "cpu"
        if plain and not value.is_quantized and value.numel() <= 64:
            return value.item() if value.numel() == 1 else value.tolist()
        return f"tensor of shape {list(value.shape)} ({value.device.type}, {value.layout})"
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
MEMORY_BUDGET_BYTES = 3 << 30
"""Refuse a checkpoint whose tensors, as float32, would take more memory than this."""


def _check_tensor(key: str, value: Tensor) -> int:
    """Refuse tensors that are not plain dense real numbers stored in full; return their bytes.

    A view with stride 0 (or overlapping strides) declares far more elements than the file
    holds: a few bytes that would expand to gigabytes when converted. Such views are refused
    before anything is materialised.
    """
    name = _short_key(key)
    if value.layout != torch.strided or value.is_sparse or value.is_quantized:
        raise CheckpointError(f"{name}: only dense tensors are supported ({value.layout})")
    if value.device.type != "cpu":
        raise CheckpointError(f"{name}: a tensor on the {value.device.type} device has no data")
    if value.dtype not in _FLOAT_DTYPES + _INT_DTYPES:
        raise CheckpointError(f"{name}: tensors of type {value.dtype} are not supported")
    numel = value.numel()
    if numel:
        span = 1 + sum((n - 1) * abs(st) for n, st in zip(value.shape, value.stride()))
        if span < numel:
            raise CheckpointError(
                f"{name}: a broadcast or overlapping view ({numel} elements over {span} stored); refused"
            )
        stored = value.untyped_storage().nbytes() // value.element_size()
        if value.storage_offset() + span > stored:
            raise CheckpointError(f"{name}: declares more data than it stores; refused")
    return numel * 4


def _short_key(key: str) -> str:
    text = " ".join(key.split())
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _clean_keys(state: dict) -> dict[str, Tensor]:
    cleaned: dict[str, Tensor] = {}
    budget = 0
    if len(state) > 100_000:
        raise CheckpointError(f"not a state dict: {len(state)} entries")
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(
                f"not a state dict: a key is a {type(key).__name__}, not a string"
            )
        if not isinstance(value, Tensor):
            raise CheckpointError(
                f"not a state dict: {_short_key(key)} holds a {type(value).__name__}, not a tensor"
            )
        budget += _check_tensor(key, value)
        if budget > MEMORY_BUDGET_BYTES:
            raise CheckpointError(
                f"checkpoint would take over {_size(MEMORY_BUDGET_BYTES)} in memory; refused"
            )
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        cleaned[key] = value
    return cleaned


def infer_arch(state: dict[str, Tensor], bam_fusion: str = "product") -> Arch:
    """Read depth, attention, stem and number of classes off key names and shapes."""
    if "conv1.weight" not in state or "fc.weight" not in state:
        raise CheckpointError(
            f"not a ResNet state dict (no conv1.weight / fc.weight); first keys: {first_keys(state)}"
        )
    conv1 = state["conv1.weight"]
    if conv1.ndim != 4 or conv1.shape[1] != 3:
        raise CheckpointError(f"conv1.weight has shape {list(conv1.shape)}; expected (64, 3, k, k)")
    stem = {7: "imagenet", 3: "cifar"}.get(conv1.shape[-1])
    if stem is None:
        raise CheckpointError(f"unknown stem: conv1 kernel {conv1.shape[-1]}x{conv1.shape[-1]}")
    kind = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    counts = []
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        counts.append(max(idx) + 1 if idx else 0)
    depth = next((d for d, (k, c) in DEPTHS.items() if k == kind and tuple(counts) == c), None)
    if depth is None:
        raise CheckpointError(f"not a supported ResNet: {kind} blocks per stage {tuple(counts)}")
    attention = attention_from_keys(state)
    fc = state["fc.weight"]
    if fc.ndim != 2:
        raise CheckpointError(f"fc.weight has shape {list(fc.shape)}; expected (classes, features)")
    return Arch(depth, attention, int(fc.shape[0]), stem, bam_fusion)


def _load_into(model: nn.Module, state: dict[str, Tensor]) -> None:
    expected = model.state_dict()
    # PyTorch 0.4.0 checkpoints predate BatchNorm's num_batches_tracked
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"unknown keys for this architecture: {first_keys(unexpected)}")
    if missing:
        raise CheckpointError(f"missing keys: {first_keys(missing)}")
    wrong = [
        f"{k} {list(state[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if wrong:
        raise CheckpointError(f"wrong shapes (file vs model): {first_keys(wrong, 2)}")
    # one float64 sum per tensor: NaN or Inf anywhere makes it non-finite (no overflow in float64)
    bad = [
        k
        for k, v in state.items()
        if v.is_floating_point() and not torch.isfinite(v.sum(dtype=torch.float64))
    ]
    if bad:
        raise CheckpointError(f"weights contain NaN or Inf: {first_keys(bad)}")
    converted = {
        k: (v.float() if v.is_floating_point() else v.to(expected[k].dtype))
        for k, v in state.items()
    }
    for key, value in expected.items():  # buffers the file predates keep their defaults
        if key not in converted:
            converted[key] = torch.zeros_like(value, device="cpu")
    model.load_state_dict(converted, strict=False, assign=True)


def _build_loaded(build: Callable[[], nn.Module], state: dict[str, Tensor]) -> nn.Module:
    """`build()` with `state` loaded: built on the meta device (no random initialisation of
    weights about to be replaced), the file's tensors assigned; rebuilt for real only when the
    network holds tensors a state dict does not carry (non-persistent buffers)."""
    with meta_build():
        model = build()
    _load_into(model, state)
    if _holds_meta(model):
        with skip_init():  # the parameters are replaced by the file's
            model = build()
        _load_into(model, state)
    return model


def _holds_meta(model: nn.Module) -> bool:
    """Tensors still without data: non-persistent buffers, and plain tensor attributes (a
    detector's anchors) that no state dict carries."""
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return True
    for module in model.modules():
        for value in vars(module).values():
            items = value if isinstance(value, (list, tuple)) else (value,)
            if any(isinstance(t, Tensor) and t.is_meta for t in items):
                return True
    return False


# --- class names ------------------------------------------------------------------------------


def parse_class_names(text: str, count: int, source: str = "class names") -> list[str]:
    """Class names given by a user, one per line (a `.txt` file or a typed list) -> names.

    Raises:
        ValueError: not exactly `count` non-empty lines, a name repeated or over 200 characters.
    """
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != count:
        raise ValueError(f"{source}: {len(names)} names for a model of {count} classes")
    long = next((n for n in names if len(n) > 200), None)
    if long is not None:
        raise ValueError(f"{source}: a name of {len(long)} characters (200 at most)")
    repeated = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if repeated is not None:
        raise ValueError(f"{source}: {repeated!r} is given twice")
    return names


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names, from torchvision's bundled weight metadata (no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def _class_names(meta: dict, num_classes: int) -> list[str]:
    names = meta.get("class_names")
    if (
        isinstance(names, list)
        and len(names) == num_classes
        and all(isinstance(n, str) for n in names)
    ):
        return list(names)
    if num_classes == 1000:
        return imagenet_class_names()
    return [f"class {i}" for i in range(num_classes)]


# --- public API -------------------------------------------------------------------------------


def load_checkpoint(
    source: str | os.PathLike | bytes | BinaryIO,
    *,
    max_bytes: int = MAX_CHECKPOINT_BYTES,
    allow_costly: bool | None = None,
) -> Checkpoint:
    """Load a ResNet checkpoint of any supported layout (see module docstring).

    Args:
        source: a path, the name of an embedded checkpoint ("resnet18_cbam_imagenette"), the
            file's bytes, or a binary file object; or a transformers `save_pretrained` folder
            (its path) or that folder zipped (the zip's path or bytes).
        max_bytes: refuse larger files.
        allow_costly: run networks whose one-image cost is over the budget (`models.checkpoints.cost`);
            None: as `ATTENTION_LENS_ALLOW_COSTLY` says. Never on a lab server.

    Returns:
        A `Checkpoint` whose model is in eval mode on the CPU, float32.

    Raises:
        CheckpointError: one line saying why the file cannot be used.
    """
    if isinstance(source, str) and not Path(source).exists():
        source = embedded_path(source) or source  # a name given from any folder
    if is_pretrained_folder(source):
        return _load_pretrained(source, max_bytes, allow_costly)
    data = _read_source(source, max_bytes)
    if is_pretrained_zip(data):
        return _load_pretrained(data, max_bytes, allow_costly)
    sha256 = hashlib.sha256(data).hexdigest()
    meta: dict = {}
    if _is_safetensors(data):
        state, meta = _read_safetensors(data)
        fmt = "attention-lens" if meta else "safetensors"
        info: dict = {}
    else:
        state, fmt, info = _unwrap(_torch_load(data, max_bytes))
    state = _clean_keys(state)
    if is_pytorchcv_layout(state):
        state, fmt = rename_pytorchcv(state), "pytorchcv"
    arch_meta = meta.get("arch") if isinstance(meta.get("arch"), dict) else {}
    try:
        arch = infer_arch(state, bam_fusion=arch_meta.get("bam_fusion", "product"))
        model: nn.Module = _build_loaded(lambda: ResNet(arch), state)
        default_preprocess = _default_preprocess(arch)
        class_names = _class_names(meta, arch.num_classes)
    except CheckpointError as ours:
        # not one of our ResNets: another library's network, or a plugin's
        arch, model, default_preprocess, fixed_names = _load_foreign(state, ours, arch_meta)
        class_names = fixed_names or _class_names(meta, arch.num_classes)
    except (ValueError, TypeError) as exc:  # Arch refusing a value
        raise CheckpointError(f"invalid checkpoint: {_short(exc)}") from None
    _check_metadata_agrees(arch_meta, arch)
    if "name" in meta:  # shown as a label: text, one line, bounded
        meta["name"] = one_line(meta["name"]) or arch.label
    try:
        preprocess = (
            Preprocess.from_dict(meta["preprocess"])
            if isinstance(meta.get("preprocess"), dict)
            else default_preprocess
        )
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"invalid checkpoint: {_short(exc)}") from None
    model.eval()
    cost = estimate_cost(model, (1, 3, preprocess.crop, preprocess.crop))
    refusal = check_cost(cost, allow_costly)
    if refusal is not None:
        raise CheckpointError(f"{arch.label}: {refusal}")
    metadata = dict(meta)
    if info:
        metadata.setdefault("training", {}).update(info)
    return Checkpoint(model, arch, class_names, preprocess, fmt, sha256, metadata, cost)


def _load_pretrained(
    source: str | os.PathLike | bytes, max_bytes: int, allow_costly: bool | None
) -> Checkpoint:
    """A transformers save_pretrained folder or its zip, its safetensors read as ours are."""
    found = load_pretrained(
        source, max_bytes=max_bytes, allow_costly=allow_costly,
        read_weights=lambda data: _clean_keys(_read_safetensors(data)[0]),
    )  # fmt: skip
    names = found.class_names or _class_names({}, found.arch.num_classes)
    return Checkpoint(found.model, found.arch, names, found.preprocess, "transformers",
                      found.sha256, found.metadata, found.cost)  # fmt: skip


def _check_metadata_agrees(arch_meta: dict, arch: Arch | ForeignArch) -> None:
    """A metadata label that contradicts the weights is a damaged or doctored file."""
    found = arch.to_dict()
    for key in ("depth", "attention", "num_classes", "stem"):
        if key in arch_meta and key in found and arch_meta[key] != found[key]:
            raise CheckpointError(
                f"metadata says {key} {str(arch_meta[key])[:40]!r} but the weights are "
                f"{key} {found[key]!r}; refused"
            )


def _load_foreign(
    state: dict[str, Tensor], ours: CheckpointError, arch_meta: dict
) -> tuple[ForeignArch, nn.Module, Preprocess, list[str] | None]:
    """Match `state` against the registered architectures and load it (see `architectures`);
    when the metadata names the network, the weights must fit that one."""
    spec, num_classes = _named_in_metadata(state, arch_meta) or _matched(state, ours)
    try:
        model = _build_loaded(lambda: spec.build(num_classes), state)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"{spec.source} {spec.name} cannot be built ({type(exc).__name__}: {_short(exc)})"
        ) from None
    arch = ForeignArch(spec.name, spec.source, num_classes, attention_kind(model), spec.options)
    preprocess = spec.preprocess() if spec.preprocess is not None else Preprocess()
    names = spec.class_names if spec.class_names and len(spec.class_names) == num_classes else None
    if names is None and spec.names_for is not None:
        names = spec.names_for(num_classes)
    return arch, model, preprocess, names


def _matched(state: dict[str, Tensor], ours: CheckpointError) -> tuple[Architecture, int]:
    found = match_architecture(state)
    if isinstance(found, str):
        if found.startswith("no known"):
            raise CheckpointError(
                f"not a network Attention Lens knows: {ours}; no other registered architecture "
                "has these keys (a plugin can register yours)"
            )
        raise CheckpointError(f"not a network Attention Lens knows: {found}")
    return found


def _named_in_metadata(
    state: dict[str, Tensor], arch_meta: dict
) -> tuple[Architecture, int] | None:
    """The network the file's metadata names, with its class count (None: it names none)."""
    try:
        spec = described(arch_meta)
    except ValueError as exc:
        raise CheckpointError(f"invalid checkpoint metadata: {_short(exc)}") from None
    if spec is None:
        return None
    fit = fit_architecture(spec, state)
    if isinstance(fit, str):
        raise CheckpointError(
            f"metadata says {spec.source} {spec.name} but the weights do not fit it ({fit}); refused"
        )
    return spec, fit


def _default_preprocess(arch: Arch) -> Preprocess:
    if arch.stem == "cifar":
        return Preprocess(resize=32, crop=32)
    return Preprocess()


def save_checkpoint(
    path: str | os.PathLike,
    model: ResNet | nn.Module,
    *,
    class_names: list[str] | None = None,
    preprocess: Preprocess | None = None,
    metadata: dict | None = None,
    dtype: torch.dtype = torch.float32,
    arch: Arch | ForeignArch | None = None,
) -> str:
    """Write `model` as an Attention Lens safetensors checkpoint, atomically.

    Args:
        path: destination file (`.safetensors`).
        model: a `ResNet` from `build_model` (its `arch` is recorded, `bam_fusion` included),
            or another network with `arch` saying what it is.
        class_names: one name per class.
        preprocess: how images are prepared for this model (default: the official ImageNet
            evaluation for ours, the library's own preprocessing for another library's network).
        metadata: anything else to record (training recipe, dataset, accuracy, ...); JSON-able.
        dtype: float dtype for the stored weights (float16 halves the file; loading gives float32).
        arch: what the network is, when it is not one of ours (a `ForeignArch` whose name and
            options rebuild it: `load_checkpoint` checks the weights against them).

    Returns:
        The sha256 of the written file.
    """
    from safetensors.torch import save as save_safetensors

    arch = arch if arch is not None else model.arch
    names = class_names or [f"class {i}" for i in range(arch.num_classes)]
    if len(names) != arch.num_classes:
        raise ValueError(f"{len(names)} class names for {arch.num_classes} classes")
    meta = dict(metadata or {})
    meta.update(format_version=FORMAT_VERSION, arch=arch.to_dict(), class_names=list(names))
    if preprocess is not None or not isinstance(arch, ForeignArch):
        # another library's network without one: the loader gives it that library's own
        meta["preprocess"] = (preprocess or Preprocess()).to_dict()
    tensors = {
        k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
        for k, v in model.state_dict().items()
    }
    blob = save_safetensors(tensors, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    atomic_write_bytes(Path(path), blob)
    return hashlib.sha256(blob).hexdigest()


# read once at import (single-threaded): os.umask can only be read by setting it
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename, so no half file is ever seen.

    The file gets the permissions a plain `open(path, "w")` would give (mkstemp's are 0600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
