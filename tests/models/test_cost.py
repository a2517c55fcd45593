"""A network's one-image cost is estimated before it runs, and files asking for too much are
refused (issue 36, item 4)."""

from __future__ import annotations

import pytest
import torch

from models import CheckpointError, ForeignArch, build_model, load_checkpoint, save_checkpoint
from models.checkpoints.cost import ALLOW_COSTLY_ENV, check_cost, estimate_cost


def _long_sequence_vit(tmp_path):
    """A few hundred KB on disk, 65,537 tokens to run: 1024-px images in 4-px patches."""
    import timm

    options = {"img_size": 1024, "patch_size": 4, "embed_dim": 4, "depth": 1, "num_heads": 1}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2, **options)
    path = tmp_path / "long.safetensors"
    arch = ForeignArch("vit_tiny_patch16_224", "timm", 2, "self-attention", options)
    save_checkpoint(path, model, arch=arch, dtype=torch.float16)
    return path


def test_resnet18_cost_is_its_known_flops():
    cost = estimate_cost(build_model(18, "cbam", 10).eval(), (1, 3, 224, 224))
    assert 3.4e9 < cost.flops < 3.9e9  # 1.8 GMACs
    assert cost.tokens == 0


def test_vit_cost_counts_its_tokens_and_attention():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2).eval()
    cost = estimate_cost(vit, (1, 3, 224, 224))
    assert cost.tokens == 197
    assert cost.activation_bytes > 2 * 3 * 197 * 197 * 4  # both blocks' attention matrices


def test_small_file_asking_for_a_huge_network_is_refused_before_running(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_COSTLY_ENV, raising=False)
    path = _long_sequence_vit(tmp_path)
    assert path.stat().st_size < 1_000_000
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message
    assert "65,537 tokens" in message and "GiB" in message and "limit" in message
    assert ALLOW_COSTLY_ENV in message


def test_costly_network_allowed_locally_never_on_a_lab_server(tmp_path, monkeypatch):
    path = _long_sequence_vit(tmp_path)
    ckpt = load_checkpoint(path, allow_costly=True)
    assert ckpt.cost.tokens == 65_537
    monkeypatch.setenv(ALLOW_COSTLY_ENV, "1")
    assert load_checkpoint(path).cost.activation_bytes > 8 * 2**30
    monkeypatch.setenv("ATTENTION_LENS_SERVE", "shared")
    with pytest.raises(CheckpointError, match="refused before running"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refused before running"):
        load_checkpoint(path, allow_costly=True)


def test_within_budget_is_not_refused():
    cost = estimate_cost(build_model(50).eval(), (1, 3, 224, 224))
    assert check_cost(cost, allow=False) is None
    assert torch.get_default_device().type == "cpu"  # the meta run left nothing behind
