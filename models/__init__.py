"""Attention Lens networks and checkpoints: ResNet with SE, BAM or CBAM, and their loaders."""

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .preprocess import Preprocess
from .resnet import Arch, ResNet, build_model

__all__ = [
    "Arch",
    "Checkpoint",
    "CheckpointError",
    "Preprocess",
    "ResNet",
    "build_model",
    "load_checkpoint",
    "save_checkpoint",
]
