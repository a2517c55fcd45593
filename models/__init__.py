"""Attention Lens networks and checkpoints: ResNet with SE, BAM or CBAM, their loaders, the
attention probe registry and the allow-listed image decoder (`viz` builds on all of these)."""

from models.checkpoints.architectures import ForeignArch, register_architecture
from models.checkpoints.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from models.checkpoints.plugins import load_plugins, plugins_from_env
from models.checkpoints.zoo import checkpoint_dir, default_checkpoint, embedded_checkpoints
from models.images import ImageError, load_image
from models.networks.resnet import Arch, ResNet, build_model
from models.preprocess import Preprocess
from models.probes import register_attention

__all__ = [
    "Arch",
    "checkpoint_dir",
    "default_checkpoint",
    "embedded_checkpoints",
    "load_plugins",
    "plugins_from_env",
    "Checkpoint",
    "ForeignArch",
    "CheckpointError",
    "ImageError",
    "Preprocess",
    "ResNet",
    "build_model",
    "load_checkpoint",
    "load_image",
    "register_architecture",
    "register_attention",
    "save_checkpoint",
]
