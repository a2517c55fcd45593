"""The gradient and activation CAM methods' weights, each `(activations, gradients) -> map`.

Every CAM method is a weight function `(activations, gradients) -> map`, both (N, C, h, w), in
the `CAM_METHODS` registry (`viz.engine.cam.registry`); a new method is one function and one
`register_cam_method` call:

- "gradcam": Selvaraju et al., ICCV 2017 (https://arxiv.org/abs/1610.02391)
- "gradcam++": Chattopadhyay et al., WACV 2018 (https://arxiv.org/abs/1710.11063)
- "hirescam": Draelos & Carin, 2020 (https://arxiv.org/abs/2011.08891)
- "xgradcam": Fu et al., BMVC 2020 (https://arxiv.org/abs/2008.02312)
- "layercam": Jiang et al., IEEE TIP 2021 (https://doi.org/10.1109/TIP.2021.3089943)
- "gradcamelementwise": pytorch-grad-cam's variant, sum over channels of relu(dY/dA * A)
- "eigencam": Muhammad & Yeasin, IJCNN 2020 (https://arxiv.org/abs/2008.00299): the first
  principal component of the centred activations, no gradient; its sign is chosen so that it
  correlates positively with the activations' channel mean (pytorch-grad-cam leaves the sign
  to the SVD routine, so its maps can come out inverted)
- "eigengradcam": pytorch-grad-cam's variant, the same on dY/dA * A
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "gradcam",
    "gradcam_pp",
    "hirescam",
    "xgradcam",
    "layercam",
    "gradcam_elementwise",
    "first_component",
    "activations_only",
    "grads_times_acts",
]


def gradcam(acts: Tensor, grads: Tensor) -> Tensor:
    return grads.mean((2, 3), keepdim=True) * acts


def gradcam_pp(acts: Tensor, grads: Tensor) -> Tensor:
    g2 = grads.pow(2)
    g3 = g2 * grads
    denom = 2 * g2 + acts.sum((2, 3), keepdim=True) * g3
    alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom))
    weights = (alpha * torch.relu(grads)).sum((2, 3), keepdim=True)
    return weights * acts


def hirescam(acts: Tensor, grads: Tensor) -> Tensor:
    # element-wise gradient x activation: no spatial averaging of the gradients
    return grads * acts


def xgradcam(acts: Tensor, grads: Tensor) -> Tensor:
    # axiom-derived weights: sum(A * dY/dA) / sum(A), per channel
    weights = (grads * acts).sum((2, 3), keepdim=True) / (acts.sum((2, 3), keepdim=True) + 1e-7)
    return weights * acts


def layercam(acts: Tensor, grads: Tensor) -> Tensor:
    # positive gradients weigh each location separately
    return torch.relu(grads) * acts


def gradcam_elementwise(acts: Tensor, grads: Tensor) -> Tensor:
    # HiResCAM with the ReLU inside the channel sum: only positive contributions add up
    return torch.relu(grads * acts)


def first_component(values: Tensor) -> Tensor:
    """(N, C, h, w) -> (N, h, w): the locations projected on the first principal component of
    their centred channel vectors, signed to correlate positively with the channel mean."""
    n, c, h, w = values.shape
    rows = values.detach().double().flatten(2).transpose(1, 2)  # (N, hw, C)
    centred = rows - rows.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    projection = (centred @ vh[:, 0, :, None])[..., 0]  # (N, hw)
    # the SVD leaves the sign free; pytorch-grad-cam keeps whatever the routine returns
    mean = rows.mean(2)
    agree = (
        (projection - projection.mean(1, keepdim=True)) * (mean - mean.mean(1, keepdim=True))
    ).sum(1)
    sign = torch.where(agree < 0, -1.0, 1.0).to(projection)
    return (projection * sign[:, None]).view(n, h, w).to(values.dtype)


def activations_only(acts: Tensor, grads: Tensor | None) -> Tensor:
    return acts  # Eigen-CAM: no class, no gradient


def grads_times_acts(acts: Tensor, grads: Tensor) -> Tensor:
    return grads * acts
