"""load_checkpoint: every supported layout round-trips; every bad or hostile file gets a one-line
CheckpointError and runs nothing."""

from __future__ import annotations

import builtins
import collections
import io
import json
import os
import pickle
import random
import re
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save as save_safetensors
from torch import nn

from models import Preprocess, build_model, load_checkpoint, save_checkpoint
from tests.conftest import assert_same_logits, new_model, randomize_bn, refused, torch_bytes

# --- helpers --------------------------------------------------------------------------------


def official_dict(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """The dict the official BAM/CBAM training script saves (`module.` from nn.DataParallel)."""
    saved = {
        "epoch": 90,
        "arch": "resnet",
        "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
        "best_prec1": torch.tensor(77.622),
    }
    if optimizer is not None:
        saved["optimizer"] = optimizer.state_dict()
    return saved


def as_source(data: bytes, kind: str, tmp_path: Path):
    """The same checkpoint as a path, as bytes, or as an open binary file object."""
    if kind == "bytes":
        return data
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(data)
    return path if kind == "path" else io.BytesIO(path.read_bytes())


@pytest.fixture(scope="module")
def small() -> nn.Module:
    """ResNet-18 + CBAM, 10 classes: the smallest checkpoint the loader accepts."""
    return new_model(18, "cbam")


# --- the official training dict ---------------------------------------------------------------


def trained_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """SGD after one step, so its state holds a momentum buffer per parameter (as in the file)."""
    copy = build_model(18, "cbam", 10)
    copy.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(copy.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    copy(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
@pytest.mark.parametrize("with_optimizer", [True, False], ids=["optimizer", "no-optimizer"])
def test_official_training_dict(small, legacy, with_optimizer):
    optimizer = trained_optimizer(small) if with_optimizer else None
    ckpt = load_checkpoint(torch_bytes(official_dict(small, optimizer), legacy=legacy))
    assert ckpt.format == "official"
    assert (ckpt.arch.depth, ckpt.arch.attention, ckpt.arch.num_classes) == (18, "cbam", 10)
    training = ckpt.metadata["training"]
    assert (training["epoch"], training["arch"]) == (90, "resnet")
    assert training["best_prec1"] == pytest.approx(77.622)  # a tensor in the file, a float here
    assert all(
        p.dtype == torch.float32 for p in ckpt.model.state_dict().values() if p.is_floating_point()
    )
    assert not ckpt.model.training
    assert_same_logits(ckpt.model, small)


@pytest.mark.parametrize("kind", ["path", "bytes", "file"])
def test_source_as_path_bytes_or_file(small, tmp_path, kind):
    data = torch_bytes(official_dict(small), legacy=True)
    ckpt = load_checkpoint(as_source(data, kind, tmp_path))
    assert_same_logits(ckpt.model, small)


def test_tensors_saved_on_a_gpu_load_on_the_cpu(small):
    # Limit: no CUDA tensor can be made without a GPU, so the legacy file is written from CPU
    # tensors and then marked the way PyTorch 0.4 marks CUDA ones: storage classes
    # torch.cuda.*Storage and location "cuda:0" (pickle GLOBAL and BINUNICODE opcodes).
    data = torch_bytes(official_dict(small), legacy=True)
    data, classes = re.subn(rb"ctorch\n(\w+Storage)\n", rb"ctorch.cuda\n\1\n", data)
    data, locations = re.subn(rb"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0", data)
    assert classes >= 2 and locations >= 1  # float and int64 storages; the location is memoized
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # the marks are real: torch wants a GPU
            torch.load(io.BytesIO(data), weights_only=True)
    ckpt = load_checkpoint(data)  # map_location="cpu" inside
    assert ckpt.metadata["training"]["best_prec1"] == pytest.approx(77.622)
    assert_same_logits(ckpt.model, small)


# --- other state dicts ----------------------------------------------------------------------


def test_bare_state_dict(small):
    ckpt = load_checkpoint(torch_bytes(small.state_dict()))
    assert ckpt.format == "state-dict"
    assert_same_logits(ckpt.model, small)


def test_state_dict_from_pytorch_0_4_0_without_num_batches_tracked(small):
    state = {k: v for k, v in small.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) < len(small.state_dict())
    ckpt = load_checkpoint(torch_bytes(state, legacy=True))
    assert_same_logits(ckpt.model, small)


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_resnet_loads_as_plain(depth):
    torch.manual_seed(0)
    reference = randomize_bn(getattr(torchvision.models, f"resnet{depth}")(weights=None)).eval()
    ckpt = load_checkpoint(torch_bytes(reference.state_dict()))
    assert (ckpt.arch.depth, ckpt.arch.attention, ckpt.arch.stem) == (depth, None, "imagenet")
    assert len(ckpt.class_names) == 1000 and ckpt.class_names[0] == "tench"  # ImageNet names
    assert (ckpt.preprocess.resize, ckpt.preprocess.crop) == (256, 224)  # official validation
    assert_same_logits(ckpt.model, reference)


def test_timm_style_se_state_dict():
    model = new_model(18, "se")
    state = model.state_dict()
    # timm's seresnet18 block: SE as two 1x1 convs with bias, rounded to a multiple of 8
    assert [k for k in state if k.startswith("layer1.0.se.")] == [
        "layer1.0.se.fc1.weight",
        "layer1.0.se.fc1.bias",
        "layer1.0.se.fc2.weight",
        "layer1.0.se.fc2.bias",
    ]
    ckpt = load_checkpoint(torch_bytes(state))
    assert ckpt.arch.attention == "se"
    assert_same_logits(ckpt.model, model)


# --- our own format -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_own_format_keeps_metadata(tmp_path, dtype):
    model = new_model(18, "bam", num_classes=3, bam_fusion="sum")
    path = tmp_path / "tiny.safetensors"
    names = ["cat", "dog", "fish"]
    preprocess = Preprocess(resize=160, crop=128)
    sha = save_checkpoint(
        path,
        model,
        class_names=names,
        preprocess=preprocess,
        metadata={"name": "tiny test", "dataset": "unit", "top1": 12.5},
        dtype=dtype,
    )
    ckpt = load_checkpoint(path)
    assert (ckpt.format, ckpt.sha256) == ("attention-lens", sha)
    assert ckpt.arch.bam_fusion == "sum" and ckpt.model.bam1.fusion == "sum"
    assert ckpt.class_names == names
    assert ckpt.preprocess == preprocess
    assert (ckpt.label, ckpt.metadata["dataset"], ckpt.metadata["top1"]) == (
        "tiny test",
        "unit",
        12.5,
    )
    loaded = ckpt.model.state_dict()
    for key, value in model.state_dict().items():
        assert loaded[key].dtype == value.dtype  # float16 on disk, float32 once loaded
        if value.is_floating_point():
            torch.testing.assert_close(loaded[key], value.to(dtype).float(), atol=0, rtol=0)
    if dtype == torch.float32:
        assert_same_logits(ckpt.model, model)


def test_class_names_fall_back_to_numbers(small):
    assert load_checkpoint(torch_bytes(small.state_dict())).class_names == [
        f"class {i}" for i in range(10)
    ]


# --- logits of each official architecture, in each format and source kind ----------------------

ARCHS = {
    "resnet50-cbam": dict(depth=50, attention="cbam", num_classes=1000),
    "resnet50-bam": dict(depth=50, attention="bam", num_classes=1000),
    "resnet18-cbam": dict(depth=18, attention="cbam", num_classes=1000),
    "resnet18-bam-cifar10": dict(depth=18, attention="bam", num_classes=10, stem="cifar"),
    "resnet50-plain": dict(depth=50, attention=None, num_classes=1000),
}
SOURCES = ["path", "bytes", "file"]
CASES = [  # each architecture once or twice, each format and source kind several times
    ("resnet50-cbam", "official-legacy", "path"),
    ("resnet50-bam", "attention-lens", "bytes"),
    ("resnet50-plain", "official-legacy", "file"),
    ("resnet18-cbam", "official-legacy", "bytes"),
    ("resnet18-cbam", "attention-lens", "file"),
    ("resnet18-bam-cifar10", "official-legacy", "file"),
    ("resnet18-bam-cifar10", "attention-lens", "path"),
]


@pytest.mark.parametrize("arch,fmt,kind", CASES)
def test_logits_equal_the_original(tmp_path, arch, fmt, kind):
    options = ARCHS[arch]
    model = new_model(**options)
    if fmt == "official-legacy":
        data = torch_bytes(official_dict(model), legacy=True)
    else:
        save_checkpoint(tmp_path / "model.safetensors", model)
        data = (tmp_path / "model.safetensors").read_bytes()
    ckpt = load_checkpoint(as_source(data, kind, tmp_path))
    assert ckpt.arch == model.arch
    assert ckpt.format == ("official" if fmt == "official-legacy" else fmt)
    assert_same_logits(ckpt.model, model, options.get("stem", "imagenet"))


# --- hostile pickles ------------------------------------------------------------------------


class Hostile:
    """Pickles as a call of `func(*args)`: what a malicious checkpoint would run when loaded."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def hostile_payloads(marker: Path) -> dict[str, Hostile]:
    create = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": Hostile(os.system, f"touch {marker}"),
        "eval": Hostile(eval, create),
        "subprocess.Popen": Hostile(subprocess.Popen, ["touch", str(marker)]),
        "builtins.exec": Hostile(builtins.exec, create),
    }


@pytest.mark.parametrize("payload", ["os.system", "eval", "subprocess.Popen", "builtins.exec"])
@pytest.mark.parametrize("container", ["raw-pickle", "torch-zip", "torch-legacy"])
def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path, payload, container):
    marker = tmp_path / "pwned"
    hostile = hostile_payloads(marker)[payload]
    if container == "raw-pickle":
        data = pickle.dumps(hostile, protocol=2)
    else:  # inside a realistic training dict, next to real tensors
        saved = {"epoch": 1, "state_dict": {"conv1.weight": torch.zeros(1), "fc.weight": hostile}}
        data = torch_bytes(saved, legacy=container == "torch-legacy")
    # pickle protocol 2 may rename the module (subprocess -> commands), so check the name only
    name = payload.split(".")[-1]
    assert refused(data, "refused", name, "nothing was run")
    assert not marker.exists()


# --- damaged and foreign files ----------------------------------------------------------------


def test_empty_file(tmp_path):
    refused(b"", "empty")
    (tmp_path / "empty.pth").write_bytes(b"")
    refused(tmp_path / "empty.pth", "empty")


@pytest.mark.parametrize("fmt", ["zip", "legacy", "attention-lens"])
def test_truncated_file(small, tmp_path, fmt):
    if fmt == "attention-lens":
        save_checkpoint(tmp_path / "m.safetensors", small)
        data = (tmp_path / "m.safetensors").read_bytes()
    else:
        data = torch_bytes(official_dict(small), legacy=fmt == "legacy")
    message = refused(data[: len(data) // 2])
    assert "damaged" in message or "truncated" in message


@pytest.mark.parametrize(
    "prefix", [b"", b"\x80\x02", b"PK\x03\x04"], ids=["plain", "pickle", "zip"]
)
def test_random_bytes(prefix):
    noise = random.Random(0).randbytes(4096)
    refused(prefix + noise)


def test_json_text():
    refused(json.dumps({"state_dict": {"conv1.weight": [1, 2, 3]}}).encode(), "not a checkpoint")


def test_pickled_list():
    refused(pickle.dumps([1, 2, 3], protocol=2), "not a PyTorch checkpoint")
    refused(torch_bytes([torch.zeros(3)]), "holds a list")


def test_state_dict_of_another_network():
    refused(torch_bytes(nn.Linear(4, 2).state_dict()), "not a ResNet state dict")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_refused(small, bad):
    # Our decision: a checkpoint with NaN/Inf weights is broken (its every prediction would be
    # garbage), so it is refused, naming the tensor, rather than loaded with a warning.
    state = {k: v.clone() for k, v in small.state_dict().items()}
    state["layer2.1.conv2.weight"][0, 0, 0, 0] = bad
    refused(torch_bytes(state), "NaN or Inf", "layer2.1.conv2.weight")


def test_wrong_shape(small):
    state = dict(small.state_dict())
    state["layer3.0.conv1.weight"] = torch.zeros(256, 128, 1, 1)
    refused(torch_bytes(state), "wrong shapes", "layer3.0.conv1.weight")


def test_missing_keys(small):
    state = {k: v for k, v in small.state_dict().items() if k != "layer1.1.bn2.running_var"}
    refused(torch_bytes(state), "missing keys", "layer1.1.bn2.running_var")


def test_unknown_attention_keys(small):
    state = dict(small.state_dict())
    state["layer1.0.eca.conv.weight"] = torch.zeros(1, 1, 3)
    refused(torch_bytes(state), "unknown keys", "layer1.0.eca.conv.weight")


def test_zip_bomb():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", bytes(64 * 2**20))  # 64 MiB of zeros, ~64 KiB packed
    assert len(buffer.getvalue()) < 2**20
    refused(buffer.getvalue(), "zip bomb")


def test_file_over_max_bytes(small, tmp_path):
    data = torch_bytes(small.state_dict())
    for kind in SOURCES:
        refused(as_source(data, kind, tmp_path), "limit", max_bytes=4096)


def test_unreadable_sources(tmp_path):
    refused(tmp_path / "nowhere.pth", "no checkpoint file")
    (tmp_path / "t.pth").write_bytes(b"\x80\x02abc")
    with open(tmp_path / "t.pth") as text_file:
        refused(text_file, "binary mode")
    closed = io.BytesIO(b"\x80\x02abc")
    closed.close()
    refused(closed, "cannot read")
    refused(12345, "cannot read")


# --- storages declaring enormous sizes ---------------------------------------------------------


class _StorageRef:
    def __init__(self, numel: int) -> None:
        self.numel = numel


class _FakeTensor:
    """Pickles like a float tensor of `size` over a storage of `numel` elements."""

    def __init__(self, numel: int, size: int) -> None:
        self.storage, self.size = _StorageRef(numel), size

    def __reduce__(self):
        rebuild = torch._utils._rebuild_tensor_v2
        return rebuild, (self.storage, 0, (self.size,), (1,), False, collections.OrderedDict())


def _crafted_pickle(numel: int, size: int, legacy: bool) -> bytes:
    """A state dict pickled as torch does, whose one storage declares `numel` floats."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _StorageRef):
                ident = ("storage", torch.FloatStorage, "0", "cpu", obj.numel)
                return ident + (None,) if legacy else ident  # legacy adds view metadata
            return None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump({"conv1.weight": _FakeTensor(numel, size)})
    return buffer.getvalue()


def crafted_zip(numel: int, size: int) -> bytes:
    """torch's zip format, but data.pkl claims a storage of `numel` floats over 16 bytes of data."""
    real = zipfile.ZipFile(io.BytesIO(torch_bytes({"conv1.weight": torch.zeros(4)})))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for info in real.infolist():
            pkl = info.filename.endswith("/data.pkl")
            zf.writestr(
                info.filename, _crafted_pickle(numel, size, False) if pkl else real.read(info)
            )
    return out.getvalue()


def crafted_legacy(numel: int, size: int) -> bytes:
    """torch's legacy format (magic, version, sys info, data, storage keys, storages)."""
    out = io.BytesIO()
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}
    for header in (0x1950A86A20F9469CFC6C, 1001, sys_info):
        pickle.dump(header, out, protocol=2)
    out.write(_crafted_pickle(numel, size, True))
    pickle.dump(["0"], out, protocol=2)
    out.write(struct.pack("<q", 4) + bytes(16))  # the storage really holds 4 floats
    return out.getvalue()


def test_crafted_files_load_when_honest():
    for data in (crafted_zip(4, 4), crafted_legacy(4, 4)):  # the crafting itself is sound
        assert torch.load(io.BytesIO(data), weights_only=True)["conv1.weight"].shape == (4,)


HUGE = 2**40  # 4 TiB of float32


@pytest.mark.parametrize(
    "craft,numel,size,phrase",
    [
        (crafted_zip, HUGE, HUGE, "size"),  # storage larger than its record
        (crafted_zip, 4, HUGE, "size"),  # tensor larger than its storage
        (crafted_zip, 2**62, 2**62, "size"),  # beyond int64 bytes
        (crafted_legacy, HUGE, HUGE, ""),  # legacy allocates first: refused by the OS (or later)
        (crafted_legacy, 4, HUGE, ""),  # legacy grows the storage to the view: the same
        (crafted_legacy, 2**62, 2**62, "size"),
    ],
    ids=["zip-storage", "zip-view", "zip-overflow", "legacy-storage", "legacy-view", "legacy-big"],
)
def test_enormous_declared_sizes(craft, numel, size, phrase):
    # Where the OS overcommits memory, the legacy 4 TiB allocation may succeed (untouched) and the
    # file is refused a step later for another reason; either way a one-line CheckpointError.
    refused(craft(numel, size), phrase)


# --- our format with broken metadata ---------------------------------------------------------


@pytest.mark.parametrize(
    "meta,phrase",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"preprocess": {"mean": 5}}', "invalid checkpoint"),
        ('{"preprocess": {"crop": 100000}}', "out of range"),
        ('{"arch": {"bam_fusion": "max"}}', "bam_fusion"),
    ],
)
def test_broken_metadata(small, meta, phrase):
    data = save_safetensors(small.state_dict(), metadata={"attention_lens": meta})
    refused(data, phrase)
