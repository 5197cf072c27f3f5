"""Regenerate the extension's static resources from a synthetic phantom made by bigl.

* ``BiGLSegmentation/Resources/SampleData/BiGLPhantom_t2.nii.gz``: the sample scan (a T2
  brain-tumour phantom on an anisotropic 1.2 x 1.2 x 2.0 mm grid with a BraTS-like LPS affine, so
  the sample also shows that geometry survives the trip through the module);
* ``BiGLSegmentation/Resources/Icons/BiGLPhantom_t2.png``: its Sample Data thumbnail;
* ``BiGLSegmentation/Resources/Icons/BiGLSegmentation.png``: the module icon, and
  ``Resources/BiGL.png``: the 128 x 128 extension icon (the phantom's tumour sub-regions over the
  scan, in the segment colours).

Run from the repository root: ``python BiGLSegmentation/Testing/make_resources.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

MODULE_DIR = Path(__file__).resolve().parents[1]
REPO = MODULE_DIR.parent
SAMPLE_PATH = MODULE_DIR / "Resources" / "SampleData" / "BiGLPhantom_t2.nii.gz"
THUMBNAIL_PATH = MODULE_DIR / "Resources" / "Icons" / "BiGLPhantom_t2.png"
MODULE_ICON_PATH = MODULE_DIR / "Resources" / "Icons" / "BiGLSegmentation.png"
EXTENSION_ICON_PATH = REPO / "Resources" / "BiGL.png"
SIZE = 96
SPACING = (1.2, 1.2, 2.0)
SEED = 2  # a phantom with all three tumour parts clearly visible


def make_sample(path: Path = SAMPLE_PATH) -> tuple[Path, np.ndarray, np.ndarray]:
    """Write the scan; returns its path, image and (unshipped) label map."""
    from bigl.data.io import save_volume
    from bigl.data.phantoms import make_phantom, phantom_affine

    images, labels = make_phantom(SIZE, np.random.default_rng(SEED), ("t2",), spacing=SPACING)
    saved = save_volume(path, images["t2"], phantom_affine(labels.shape, SPACING), dtype=np.int16)
    return saved, images["t2"], labels


def axial_view(volume: np.ndarray, index: int) -> np.ndarray:
    """An axial slice as radiologists view it.

    Array axes 0 and 1 run right-to-left and anterior-to-posterior (LPS-like affine), so the
    transpose puts anterior at the top and the patient's right on the left of the picture.
    """
    return volume[:, :, index].T


def _save_picture(image: np.ndarray, labels: np.ndarray | None, path: Path, pixels: int, text: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bigl.labels import LABEL_COLORS

    figure = plt.figure(figsize=(1, 1), dpi=pixels)
    axes = figure.add_axes([0, 0, 1, 1])
    axes.imshow(image, cmap="gray", interpolation="bilinear")
    if labels is not None:
        overlay = np.zeros((*labels.shape, 4))
        for label, colour in LABEL_COLORS.items():
            overlay[labels == label] = (*colour, 0.85)
        axes.imshow(overlay, interpolation="nearest")
    if text:
        axes.text(0.04, 0.04, text, color="white", transform=axes.transAxes, fontsize=pixels / 22)
    axes.set_axis_off()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, facecolor="black")
    plt.close(figure)
    return path


def make_pictures(image: np.ndarray, labels: np.ndarray) -> list[Path]:
    axial = int(np.argmax((labels > 0).sum(axis=(0, 1))))
    scan = axial_view(image, axial).astype(np.float32)
    tumour = axial_view(labels, axial)
    return [
        _save_picture(scan, None, THUMBNAIL_PATH, 260, "T2 phantom"),
        _save_picture(scan, tumour, MODULE_ICON_PATH, 128),
        _save_picture(scan, tumour, EXTENSION_ICON_PATH, 128, "BiGL"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    sample, image, labels = make_sample()
    print(f"wrote {sample} ({sample.stat().st_size // 1024} KB)")
    for path in make_pictures(image, labels):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
