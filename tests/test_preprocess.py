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
