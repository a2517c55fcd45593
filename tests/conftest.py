"""Shared fixtures: tiny random-weight models and paths to the reference data copied from the release."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import build_model

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parent / "reference"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny test inputs gain nothing from intra-op threads, and lose much when the cores are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def manifests() -> dict:
    return json.loads((REFERENCE / "official_resnet_manifests.json").read_text())


@pytest.fixture(scope="session")
def module_vectors() -> dict:
    with np.load(REFERENCE / "official_module_vectors.npz") as data:
        return {k: data[k] for k in data.files}


def leftovers(model: torch.nn.Module) -> int:
    """Hooks and taps (`viz.engine.taps`) still on `model`: 0 after any trace, also a failed one."""
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + ("_attention_lens_taps" in m.__dict__)
        + (type(m).forward.__name__ == "tapped_forward")
        for m in model.modules()
    )


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics so eval-mode tests are not degenerate."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=gen)
            m.bias.data = 0.1 * torch.randn(n, generator=gen)
            m.running_mean = 0.1 * torch.randn(n, generator=gen)
            m.running_var = 0.5 + torch.rand(n, generator=gen)
    return model


@pytest.fixture(params=[None, "se", "bam", "cbam"], ids=lambda a: a or "plain")
def tiny_model(request) -> torch.nn.Module:
    """ResNet-18 of each attention type, random weights, eval mode."""
    torch.manual_seed(0)
    return randomize_bn(build_model(18, request.param, num_classes=7)).eval()


@pytest.fixture
def image_batch() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def plain(markdown: str) -> str:
    """The text a Markdown source shows: backslash escapes removed (the app escapes file text)."""
    import re

    return re.sub(r"\\(.)", r"\1", markdown)
