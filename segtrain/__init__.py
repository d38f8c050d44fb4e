"""segtrain: config-driven semantic segmentation training in PyTorch."""

__version__ = "0.1.0"
