"""segtrain: config-driven semantic segmentation training in PyTorch.

``from segtrain import Predictor`` runs a trained checkpoint on images (see :mod:`segtrain.predict`);
it is imported on first use, so ``import segtrain`` stays cheap.
"""

from segtrain.version import __version__

__all__ = ["Predictor", "__version__"]


def __getattr__(name: str):
    if name == "Predictor":
        from segtrain.predict import Predictor  # torch loads on first use: `import segtrain` stays cheap

        return Predictor
    raise AttributeError(f"module 'segtrain' has no attribute {name!r}")
