"""Preprocess: the official resize + centre crop, also for slivers, without huge intermediates."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from models import Preprocess


@pytest.mark.parametrize("size", [(4000, 8), (8, 4000), (1000, 100), (300, 200), (224, 224)])
def test_preprocess_equals_resize_then_center_crop(size):
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8"))
    pre = Preprocess()
    reference = pre.normalize(TF.pil_to_tensor(TF.center_crop(TF.resize(image, 256), 224)))[None]
    out = pre(image)
    assert out.shape == (1, 3, 224, 224)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)


def test_preprocess_round_trips_through_dict():
    pre = Preprocess(resize=160, crop=160)
    assert Preprocess.from_dict(pre.to_dict()) == pre
    with pytest.raises(ValueError):
        Preprocess.from_dict({"resize": 10**9, "crop": 224})


def test_display_crop_is_the_network_view_at_the_original_resolution():
    import numpy as np
    from PIL import Image

    from models import Preprocess

    rng = np.random.default_rng(0)
    base = rng.random((12, 18, 3))  # a smooth scene: blocks of colour
    big = Image.fromarray((np.kron(base, np.ones((100, 100, 1))) * 255).astype(np.uint8))
    pre = Preprocess()  # resize 256, crop 224
    sharp = pre.display_crop(big)
    assert sharp.size == (512, 512)  # 1200 px short side: the crop spans 1050 px, capped at 512
    # the same scene as the network input, once brought to the same size
    small = np.asarray(pre.crop_image(big), dtype=np.float32)
    again = np.asarray(sharp.resize((224, 224), Image.Resampling.BILINEAR), dtype=np.float32)
    assert np.abs(small - again).mean() < 6
    tiny = Image.new("RGB", (200, 150))
    assert pre.display_crop(tiny).size == (224, 224)  # no more pixels: the network input


@pytest.mark.parametrize("resize, crop", [(256, 224), (224, 224), (146, 128), (200, 224)])
def test_preprocessing_equals_torchvision_pixel_for_pixel(resize, crop):
    # the library resizes and crops with PIL itself (no torchvision import at start-up)
    rng = np.random.default_rng(resize + crop)
    sizes = [(w, h) for w, h in rng.integers(1, 700, size=(40, 2))]
    sizes += [(224, 224), (256, 256), (301, 224), (224, 301), (crop - 1, crop + 7), (1, 3)]
    pre = Preprocess(resize=resize, crop=crop)
    for w, h in sizes:
        image = Image.fromarray(rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8))
        if max(w, h) > 4 * min(w, h):
            continue  # slivers are cut first (their own test)
        expected = TF.center_crop(
            TF.resize(image, resize, interpolation=TF.InterpolationMode.BILINEAR), crop
        )
        got = pre.crop_image(image)
        assert got.size == expected.size, (w, h)
        assert np.array_equal(np.asarray(got), np.asarray(expected)), (w, h)
        assert torch.equal(pre(image)[0], pre.normalize(TF.pil_to_tensor(expected))), (w, h)
