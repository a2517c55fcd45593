"""Attention Lens networks and checkpoints: ResNet with SE, BAM or CBAM, and their loaders."""

from .architectures import ForeignArch, register_architecture
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .preprocess import Preprocess
from .resnet import Arch, ResNet, build_model

__all__ = [
    "Arch",
    "Checkpoint",
    "ForeignArch",
    "CheckpointError",
    "Preprocess",
    "ResNet",
    "build_model",
    "load_checkpoint",
    "register_architecture",
    "save_checkpoint",
]
