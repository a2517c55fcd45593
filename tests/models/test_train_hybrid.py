"""python -m models.train_hybrid (issue 38) on a tiny generated ImageFolder: the one-stage recipe
leaves the trunk as the CBAM checkpoint's; --tune-layer3-epochs adds a second stage that tunes
layer3 and the transformer, chosen on the hold-out over both stages, and says so in the card."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import build_model, load_checkpoint, save_checkpoint
from models.networks.hybrid import HYBRID_NAME
from models.training import hybrid
from models.training.card import model_card
from models.training.data import load_split
from tests.conftest import red_blue_folder

ROOT = Path(__file__).resolve().parents[2]
CBAM = ROOT / "checkpoints" / "resnet18_cbam_imagenette.safetensors"
LAYER3 = "patch_embed.backbone.layer3."


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return red_blue_folder(tmp_path_factory.mktemp("redblue"), ".png")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet18.safetensors"
    save_checkpoint(path, build_model(18, "cbam", 2).eval(), class_names=["blue", "red"])
    return path


@pytest.fixture(scope="module")
def cbam_layer3() -> dict:
    state = load_checkpoint(CBAM).model.state_dict()
    return {k: v for k, v in state.items() if k.startswith("layer3.")}


def _train(data, teacher, out, *extra) -> dict:
    argv = [
        "--data", str(data), "--out", str(out), "--trunk", str(CBAM), "--teacher", str(teacher),
        "--epochs", "2", "--batch-size", "8", "--class-names", "blue,red",
        "--dataset-name", "redblue", *extra,
    ]  # fmt: skip
    assert hybrid.main(argv) == 0
    return load_checkpoint(out)


def _layer3_of(model) -> dict:
    return {k[len("patch_embed.backbone.") :]: v for k, v in model.state_dict().items()
            if k.startswith(LAYER3)}  # fmt: skip


def _same(a: dict, b: dict) -> bool:
    # the file stores float16: compare with the CBAM weights as they would be stored
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].half().float()) for k in a)


def _holdout_by_epoch(monkeypatch, curve: list[float]) -> None:
    """The hold-out top-1 of each evaluated epoch, in order (a tiny hold-out ties otherwise)."""
    scores = iter(curve)
    monkeypatch.setattr(hybrid, "holdout_top1", lambda *a: next(scores))


def test_default_recipe_keeps_layer3_the_cbam_checkpoints(data, teacher, cbam_layer3, tmp_path):
    ckpt = _train(data, teacher, tmp_path / "h.safetensors")
    assert ckpt.arch.name == HYBRID_NAME
    assert _same(_layer3_of(ckpt.model), cbam_layer3)
    training = ckpt.metadata["training"]
    assert "tune_layer3" not in training["recipe"] and "layer3_tuned" not in training["selection"]
    assert "stages 1-3 (frozen" in training["recipe"]["network"]
    assert [r["epoch"] for r in training["history"]] == [1, 2]
    card = _card(tmp_path)
    assert "weights up to layer3, frozen (the file holds its own copy" in card
    assert "tune-layer3" not in card and "second stage" not in card


def _card(folder: Path) -> str:
    return " ".join(model_card(folder).split())


def test_tuning_stage_changes_layer3_and_is_chosen_over_both_stages(
    data, teacher, cbam_layer3, tmp_path, monkeypatch
):
    _holdout_by_epoch(monkeypatch, [50.0, 60.0, 70.0, 80.0])  # the last tuning epoch is best
    out = tmp_path / "tuned.safetensors"
    tune = ["--tune-layer3-epochs", "2", "--tune-lr", "1e-3", "--tune-layer3-lr", "1e-2"]
    ckpt = _train(data, teacher, out, *tune)
    assert ckpt.arch.name == HYBRID_NAME and ckpt.arch.attention == "cbam+self-attention"
    assert not _same(_layer3_of(ckpt.model), cbam_layer3)
    # the rest of the trunk is untouched
    state = ckpt.model.state_dict()
    cbam = load_checkpoint(CBAM).model.state_dict()
    for k in ("conv1.weight", "layer2.1.conv2.weight", "layer1.0.bn1.running_mean"):
        assert torch.equal(state[f"patch_embed.backbone.{k}"], cbam[k].half().float())
    # layer3's batch norms kept their running statistics (eval mode while tuned)
    for k, v in _layer3_of(ckpt.model).items():
        if k.endswith(("running_mean", "running_var")):
            assert torch.equal(v, cbam_layer3[k].half().float()), k
    training = ckpt.metadata["training"]
    assert [(r["epoch"], r.get("stage", 1)) for r in training["history"]] == [
        (1, 1), (2, 1), (3, 2), (4, 2)]  # fmt: skip
    assert training["selection"]["epoch"] == 4 and training["selection"]["layer3_tuned"]
    tuned = training["recipe"]["tune_layer3"]
    assert (tuned["epochs"], tuned["lr"], tuned["layer3_lr"]) == (2, 1e-3, 1e-2)
    assert "fine-tuned" in training["recipe"]["network"]
    card = _card(tmp_path)
    assert "then its layer3 was fine-tuned with the transformer for 2 epochs" in card
    assert "the epoch shipped is one of the second stage, so its layer3 differs" in card
    assert "peak lr 0.01 for layer3, 0.001 for the transformer" in card
    assert "peak lr 0.001 for the transformer and 0.01 for layer3" in card  # the recipe line
    assert "batch norms in eval mode" in card and "over both stages" in card
    assert (
        "--tune-layer3-epochs 2 --tune-lr 0.001 --tune-layer3-lr 0.01 --dataset-name redblue"
        in card
    )
    assert "| 2 + 2 |" in card  # the summary's epochs, by stage
    assert "up to layer3, frozen (the file" not in card
    with torch.no_grad():  # it classifies: two classes, finite logits
        logits = ckpt.model.eval()(torch.randn(2, 3, 224, 224))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_a_first_stage_epoch_chosen_ships_the_cbam_layer3(
    data, teacher, cbam_layer3, tmp_path, monkeypatch
):
    _holdout_by_epoch(monkeypatch, [50.0, 90.0, 70.0, 80.0])  # the tuning did not help
    tune = ["--tune-layer3-epochs", "2", "--tune-layer3-lr", "1e-2"]
    ckpt = _train(data, teacher, tmp_path / "h.safetensors", *tune)
    assert _same(_layer3_of(ckpt.model), cbam_layer3)
    selection = ckpt.metadata["training"]["selection"]
    assert selection["epoch"] == 2 and selection["layer3_tuned"] is False
    assert "the epoch shipped is one of the first stage, so its trunk is still" in _card(tmp_path)


def test_the_second_stage_decodes_the_images_as_the_first_did(data):
    images, _, _, paths = load_split(data / "train", 224, "train", quiet=True)
    assert torch.equal(hybrid._decode(paths[:5]), images[:5])


def test_the_view_teacher_on_a_whole_224_px_grid_is_the_resnet_on_the_image():
    """Consistent teaching: at 224 px the one window is the whole layer3 grid, so the trunk's
    ResNet (layer4 and head on that window) must give what it gives on the image itself."""
    from argparse import Namespace

    images = hybrid._decode([str(p) for p in sorted((ROOT / "samples").glob("*.jpg"))[:3]])
    trunk = hybrid._hybrid(Namespace(trunk=CBAM, depth=1, drop_path=0.0), 10).patch_embed.backbone
    grid = hybrid.trunk_features(trunk, images, 224)  # (3, 2 views, 256, 14, 14)
    (probs,) = hybrid.view_teacher_probs(load_checkpoint(CBAM).model, [grid])
    assert probs.shape == (3, 2, 1, 1, 10)
    resnet = load_checkpoint(CBAM).model.eval()
    with torch.no_grad():
        x = hybrid.normalize(images)
        for view, seen in ((0, x), (1, x.flip(-1))):
            expected = resnet(seen).softmax(1)
            assert (probs[:, view, 0, 0] - expected).abs().max() < 0.05  # bfloat16
            assert torch.equal(probs[:, view, 0, 0].argmax(1), expected.argmax(1))


def test_the_soft_target_mixes_the_view_teachers_label_of_the_window_drawn():
    gen = torch.Generator().manual_seed(0)
    grid = torch.randn(5, 2, 4, 16, 16)  # 5 images, 3 x 3 windows of 14 cells
    for channel, edge in enumerate(
        [(..., 0), (..., 0, slice(None)), (..., 15), (..., 15, slice(None))]
    ):
        grid[:, :, channel][edge] += 50  # each window sees another set of edges: means differ
    grids = [grid]
    idx = torch.tensor([4, 0, 2, 1, 3, 4, 0, 2])
    windows, places = hybrid.random_windows(grids, idx, gen)
    for k, i in enumerate(idx.tolist()):  # each window is where its place says
        f, y, x = places.flip[k], places.y[k], places.x[k]
        assert torch.equal(windows[k], grids[0][i, f, :, y : y + 14, x : x + 14])
    assert len({(int(y), int(x)) for y, x in zip(places.y, places.x)}) > 1
    # a teacher whose "layer4" keeps the window: its label is the head on the window's mean
    teacher = torch.nn.Module()
    teacher.layer4, teacher.avgpool = torch.nn.Identity(), torch.nn.AdaptiveAvgPool2d(1)
    teacher.fc = torch.nn.Linear(4, 3)
    (on_view,) = hybrid.view_teacher_probs(teacher, grids)
    assert on_view.shape == (5, 2, 3, 3, 3)
    whole = torch.rand(5, 3).softmax(1)
    target = hybrid.soft_target_of(whole, [on_view], 0.25)(idx, places)
    with torch.no_grad():
        on_window = teacher.fc(windows.float().mean((2, 3))).softmax(1)
    for k, i in enumerate(idx.tolist()):
        assert torch.allclose(target[k], 0.75 * whole[i] + 0.25 * on_window[k], atol=0.02)  # bf16
    assert torch.equal(hybrid.soft_target_of(whole, None, 0.0)(idx[:1], places), whole[4:5])
    # two scales (3 and 5 windows per side): each image's label comes from its own scale's table
    tables = [torch.rand(5, 2, 3, 3, 3), torch.rand(5, 2, 5, 5, 3)]
    places = hybrid.WindowPlaces(*(torch.tensor(v) for v in ([0, 1], [1, 0], [2, 4], [0, 3])))
    mixed = hybrid.soft_target_of(whole, tables, 1.0)(torch.tensor([3, 1]), places)
    assert torch.equal(mixed, torch.stack([tables[0][3, 1, 2, 0], tables[1][1, 0, 4, 3]]))


def test_the_tuning_stage_takes_its_windows_from_layer3_where_it_says():
    gen = torch.Generator().manual_seed(0)
    grids = [torch.randn(3, 2, 4, 32, 32), torch.randn(3, 2, 4, 36, 36)]  # layer2 at 256, 288 px
    layer3 = torch.nn.AvgPool2d(2)  # stride 2, as layer3
    idx = torch.tensor([2, 0, 1, 2, 0, 1, 2, 0])
    windows, places = hybrid.tuned_windows(layer3, grids, idx, gen)
    assert set(places.scale.tolist()) == {0, 1}
    for k, i in enumerate(idx.tolist()):
        s, f, y, x = (int(t[k]) for t in places)
        assert 0 <= y <= (2, 4)[s] and 0 <= x <= (2, 4)[s]  # 3 or 5 windows per side
        assert torch.equal(windows[k], layer3(grids[s][i, f])[:, y : y + 14, x : x + 14])


def test_view_teacher_recipe_reaches_the_card_and_other_classes_are_refused(
    data, teacher, tmp_path
):
    with pytest.raises(SystemExit, match="trained on other classes"):  # the 10-class CBAM trunk
        _train(data, teacher, tmp_path / "x.safetensors", "--view-teacher-weight", "0.5")
    with pytest.raises(SystemExit):  # argparse's usage error
        hybrid.parse_args(["--data", "d", "--out", "o", "--view-teacher-weight", "2"])
    ckpt = _train(
        data, teacher, tmp_path / "v.safetensors", "--view-teacher-weight", "0.5",
        "--trunk", str(teacher), "--epochs", "1",
    )  # fmt: skip
    recipe = ckpt.metadata["training"]["recipe"]
    assert recipe["view_teacher_weight"] == 0.5
    assert "0.5 x the trunk's ResNet's softmax on the window the student sees" in recipe[
        "distillation"]  # fmt: skip
    assert f"--trunk checkpoints/{teacher.name}" in _card(tmp_path)
    assert "--view-teacher-weight 0.5" in _card(tmp_path)


def test_a_hybrid_trained_at_another_depth_loads_as_trained(data, teacher, tmp_path):
    with pytest.raises(SystemExit):  # argparse's usage error, before any image is read
        hybrid.parse_args(["--data", "d", "--out", "o", "--depth", "0"])
    ckpt = _train(data, teacher, tmp_path / "d2.safetensors", "--depth", "2", "--epochs", "1")
    assert len(ckpt.model.blocks) == 2 and ckpt.arch.options == {"depth": 2}
    assert ckpt.metadata["training"]["recipe"]["depth"] == 2


def test_mixing_blends_or_pastes_windows_and_their_targets_by_the_same_share():
    gen = torch.Generator().manual_seed(0)
    windows = torch.randn(6, 4, 14, 14)
    probs = torch.eye(6)[:, :3].contiguous() + 0.1
    kinds = set()
    for _ in range(40):
        mixing = hybrid.draw_mixing(6, gen)
        mixed, other = mixing.windows(windows), windows[mixing.partner]
        assert 0 <= mixing.lam <= 1 and sorted(mixing.partner.tolist()) == list(range(6))
        if mixing.box is None:  # Mixup: every cell is the same blend
            kinds.add("mixup")
            assert torch.allclose(mixed, mixing.lam * windows + (1 - mixing.lam) * other)
        else:  # CutMix: the rectangle is the partner's, lambda the share of cells left
            kinds.add("cutmix")
            y0, y1, x0, x1 = mixing.box
            from_partner = torch.zeros(14, 14, dtype=torch.bool)
            from_partner[y0:y1, x0:x1] = True
            assert torch.equal(mixed[..., from_partner], other[..., from_partner])
            assert torch.equal(mixed[..., ~from_partner], windows[..., ~from_partner])
            assert mixing.lam == pytest.approx(1 - from_partner.sum().item() / 196)
        expected = mixing.lam * probs + (1 - mixing.lam) * probs[mixing.partner]
        assert torch.allclose(mixing.targets(probs), expected)
    assert kinds == {"mixup", "cutmix"}


def test_function_matching_labels_the_mixed_window_with_the_resnet():
    teacher = torch.nn.Module()  # "layer4" keeps the window: its label is the head on its mean
    teacher.layer4, teacher.avgpool = torch.nn.Identity(), torch.nn.AdaptiveAvgPool2d(1)
    teacher.fc = torch.nn.Linear(4, 3)
    whole = torch.rand(5, 3).softmax(1)
    mixing = hybrid.draw_mixing(5, torch.Generator().manual_seed(1))
    mixed = mixing.windows(torch.randn(5, 4, 14, 14))
    idx = torch.arange(5)
    matching = hybrid.FunctionMatching(1.0, whole, teacher, 0.5)
    with torch.no_grad():
        on_mixed = teacher.fc(mixed.mean((2, 3))).softmax(1)
    expected = 0.5 * mixing.targets(whole) + 0.5 * on_mixed
    assert torch.allclose(matching.target(idx, mixing, mixed), expected, atol=1e-6)
    no_teacher = hybrid.FunctionMatching(1.0, whole, None, 0.0)
    assert torch.equal(no_teacher.target(idx, mixing, mixed), mixing.targets(whole))


def test_mixed_labels_are_the_label_smoothed_cross_entropy_when_unmixed():
    logits, labels = torch.randn(16, 10), torch.randint(0, 10, (16,))
    smoothed = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    as_probs = torch.nn.functional.cross_entropy(logits, hybrid.smoothed_labels(labels, 10))
    assert torch.allclose(smoothed, as_probs, atol=1e-6)


def test_mix_recipe_mixes_and_reaches_the_card(data, teacher, tmp_path, monkeypatch):
    with pytest.raises(SystemExit):  # argparse's usage error
        hybrid.parse_args(["--data", "d", "--out", "o", "--mix", "1.5"])
    drawn, real_draw = [], hybrid.draw_mixing
    labelled, real_probs = [], hybrid.resnet_head_probs
    monkeypatch.setattr(hybrid, "draw_mixing", lambda *a: drawn.append(1) or real_draw(*a))
    monkeypatch.setattr(
        hybrid, "resnet_head_probs", lambda t, w: labelled.append(len(w)) or real_probs(t, w)
    )
    ckpt = _train(
        data, teacher, tmp_path / "m.safetensors", "--mix", "1", "--view-teacher-weight", "0.5",
        "--trunk", str(teacher), "--epochs", "1",
    )  # fmt: skip
    assert drawn and len(labelled) == len(drawn)  # every batch mixed, its windows labelled
    mix = ckpt.metadata["training"]["recipe"]["mix"]
    assert mix["chance"] == 1.0 and "function matching" in mix["targets"]
    assert "--mix 1.0" in _card(tmp_path)
    card = _card(tmp_path)
    assert "The first stage mixed each batch (chance 1.0) in feature space" in card
    assert "Mixup or CutMix" in card and "function matching" in card
