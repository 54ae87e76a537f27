"""IRCR-Net network, post-processing, checkpoints and batched inference (no training code)."""
