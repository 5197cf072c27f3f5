"""BiGL: cross-modality brain tumour segmentation by Bidirectional Global-to-Local domain adaptation.

Pure-Python core (no Slicer import anywhere in this package): data loading and preprocessing,
models, losses, metrics, model bundles, inference and training. The 3D Slicer modules and the
``bigl`` command line are thin layers over it.
"""

__version__ = "0.1.0"
