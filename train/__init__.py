"""Streaming contrastive training: backbones, batch augmentation, losses, methods and the training loop.

Submodules are imported on demand (``from train.methods import build_method``): importing the package stays cheap.
"""
