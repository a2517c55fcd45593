"""The networks: ResNet with SE, BAM or CBAM, the hybrid CNN + ViT, and timm students."""
