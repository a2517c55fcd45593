"""The hybrid CNN + ViT (issue 38) with random weights: recognised by its keys, traced CBAM
gates then self-attention, its stages those of the ResNet it was cut from plus the transformer."""

from __future__ import annotations

import pytest
import torch

from models import CheckpointError, ForeignArch, load_checkpoint, save_checkpoint
from models.networks.hybrid import HYBRID_NAME, build_hybrid, hybrid_options
from viz import analyze, record_attention, stage_layers


@pytest.fixture(scope="module")
def hybrid():
    torch.manual_seed(0)
    return build_hybrid(10).eval()


def test_hybrid_file_is_recognised_by_its_keys_and_gives_the_same_logits(hybrid, tmp_path):
    path = tmp_path / "h.safetensors"
    arch = ForeignArch(HYBRID_NAME, "attention-lens", 10, "cbam+self-attention")
    save_checkpoint(path, hybrid, arch=arch)
    ckpt = load_checkpoint(path)
    assert ckpt.arch.name == HYBRID_NAME and ckpt.arch.attention == "cbam+self-attention"
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ckpt.model(x), hybrid(x), atol=1e-5)
    # its keys alone (no metadata: a plain state dict) are enough
    torch.save(hybrid.state_dict(), tmp_path / "h.pth")
    assert load_checkpoint(tmp_path / "h.pth").arch.name == HYBRID_NAME


def test_a_hybrid_of_another_depth_loads_by_its_metadata_and_a_false_depth_is_refused(tmp_path):
    """`train_hybrid --depth 2` names its depth in the file; the depth is checked, and the
    weights must have exactly that many blocks."""
    torch.manual_seed(0)
    two = build_hybrid(3, depth=2).eval()
    path = tmp_path / "d2.safetensors"
    arch = ForeignArch(HYBRID_NAME, "attention-lens", 3, "cbam+self-attention", hybrid_options(2))
    save_checkpoint(path, two, arch=arch)
    ckpt = load_checkpoint(path)
    assert len(ckpt.model.blocks) == 2 and ckpt.arch.options == {"depth": 2}
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ckpt.model(x), two(x), atol=1e-5)
    for options, phrase in (
        ({"depth": 3}, "metadata says attention-lens resnet18_cbam_vit_hybrid but the weights"),
        ({"depth": 30}, "invalid checkpoint metadata: the hybrid's depth must be"),
        ({"depth": 2, "embed_dim": 8}, "invalid checkpoint metadata: .* takes one option"),
    ):
        lie = ForeignArch(HYBRID_NAME, "attention-lens", 3, None, options)
        save_checkpoint(path, two, arch=lie)
        with pytest.raises(CheckpointError, match=phrase) as info:
            load_checkpoint(path)
        assert "\n" not in str(info.value)


def test_hybrid_stages_are_the_trunks_then_the_transformer(hybrid):
    trunk = "patch_embed.backbone"
    assert stage_layers(hybrid) == [f"{trunk}.layer1", f"{trunk}.layer2", f"{trunk}.layer3",
                                    "blocks.5.norm1"]  # fmt: skip
    with torch.no_grad(), record_attention(hybrid) as trace:
        hybrid(torch.randn(1, 3, 224, 224))
    got = [(r.kind, r.stage, tuple(r.spatial.shape[-2:])) for r in trace]
    trunk_records = [("cbam", s, (56 // 2 ** (s - 1),) * 2) for s in (1, 1, 2, 2, 3, 3)]
    assert got == trunk_records + [("self-attention", 4, (14, 14))] * 6


def test_every_cam_of_the_hybrid_is_a_map(hybrid):
    x = torch.randn(1, 3, 224, 224)
    an = analyze(hybrid, x)
    cams = an.cams
    # the transformer's CAM is at stage 4, where its attention is drawn (was: stage 3, its
    # stride's, so the CAM view and Compare disagreed with the overview)
    assert an.cam_stages == {name: stage for stage, name in enumerate(stage_layers(hybrid), 1)}
    assert analyze(hybrid, x, cam_layers=["blocks.2.norm1"]).cam_stages == {"blocks.2.norm1": 4}
    assert [tuple(c.shape) for c in cams.values()] == [(1, 56, 56), (1, 28, 28), (1, 14, 14),
                                                       (1, 14, 14)]  # fmt: skip
    for method in ("rollout", "gae", "legrad"):
        assert analyze(hybrid, x, method=method).cams[method].shape == (1, 14, 14)
