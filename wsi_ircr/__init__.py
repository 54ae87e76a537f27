"""wsi-ircr: nuclei instance segmentation on whole-slide images with IRCR-Net."""

__version__ = "0.1.0"
