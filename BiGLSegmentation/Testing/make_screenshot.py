"""Render the extension's screenshot from the module's own outputs, headless.

Runs the BiGL Segmentation logic exactly as the module does (sample phantom -> volume node ->
``bigl segment`` subprocess -> segmentation, volume table and attention nodes) on a headless MRML
scene from the slicer-core wheel, then draws an axial slice with matplotlib: the scan, the
segments (with the volumes from the table) and the position attention. It is a rendering of the
module's outputs, not a screenshot of the Slicer window. Run from the repository root::

    python BiGLSegmentation/Testing/make_screenshot.py [--model BUNDLE] [--out PNG]

Without ``--model`` the first available model (the shipped default) is used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

MODULE_DIR = Path(__file__).resolve().parents[1]
REPO = MODULE_DIR.parent
for path in (REPO, REPO / "Testing", MODULE_DIR):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

SAMPLE = MODULE_DIR / "Resources" / "SampleData" / "BiGLPhantom_t2.nii.gz"
DEFAULT_OUT = REPO / "Resources" / "Screenshots" / "segmentation.png"


def run_module(model: Path | None, threads: int | None = None):
    """Segment the sample scan through the module logic; returns (scene holder, volume node, outputs, model).

    The caller keeps the returned headless application alive while it uses the nodes.
    """
    import slicer_support
    from BiGLSegmentationLib.logic import OutputOptions, SegmentationLogic

    app = slicer_support.create_headless_slicer()
    volume = app.load_volume(SAMPLE, "BiGLPhantom_t2")
    logic = SegmentationLogic()
    model = Path(model) if model else logic.default_model_path()
    outputs = logic.segment(volume, model, device="cpu", threads=threads, timeout=1800,
                            options=OutputOptions(attention=True))
    return app, volume, outputs, model


def render(volume, outputs, model: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from bigl.bundle import read_metadata
    from bigl.labels import LABEL_COLORS
    from BiGLSegmentationLib import scene
    from bigl.bundle import describe_adaptation

    scan = scene.volume_to_array(volume).astype(np.float32)
    labels = scene.segmentation_to_labels(outputs.segmentation, volume)
    attention = scene.volume_to_array(outputs.attention["position"])
    axial = int(np.argmax((labels > 0).sum(axis=(0, 1)))) if labels.any() else scan.shape[2] // 2
    spacing = scene.voxel_spacing(volume)

    def view(array):  # LPS-like grid: transposed, anterior up and patient's right on the left
        return array[:, :, axial].T

    rows = {row["Region"]: row for row in scene.table_rows(outputs.volumes_table)}
    segment_overlay = np.zeros((*view(labels).shape, 4))
    for label, colour in LABEL_COLORS.items():
        segment_overlay[view(labels) == label] = (*colour, 0.6)

    figure, axes = plt.subplots(1, 3, figsize=(11, 4.2), dpi=100)
    aspect = spacing[1] / spacing[0]
    for ax, title in zip(axes, ("T2 scan (input)", "Segments", "Position attention")):
        ax.imshow(view(scan), cmap="gray", aspect=aspect, interpolation="bilinear")
        ax.set_title(title, fontsize=11)
        ax.set_axis_off()
    axes[1].imshow(segment_overlay, aspect=aspect, interpolation="nearest")
    # as in the slice views: inferno colours, values below the display threshold transparent;
    # here the opacity also grows with the value so the scan stays readable
    values = view(attention)
    colours = plt.get_cmap("inferno")(values)
    colours[..., 3] = np.where(values < scene.ATTENTION_THRESHOLD, 0.0, 0.25 + 0.6 * values)
    axes[2].imshow(colours, aspect=aspect, interpolation="bilinear")
    scale = plt.cm.ScalarMappable(cmap="inferno", norm=plt.Normalize(0.0, 1.0))
    figure.colorbar(scale, ax=axes[2], fraction=0.046, pad=0.02)
    names = {1: ("NCR/NET", "necrotic / non-enhancing core"), 2: ("ED", "oedema"), 4: ("ET", "enhancing tumour")}
    axes[1].legend(
        handles=[Patch(color=LABEL_COLORS[label], label=f"{text}: {rows[key]['Volume']:.1f} mL")
                 for label, (key, text) in names.items()],
        loc="lower center", bbox_to_anchor=(0.5, -0.22), fontsize=8, ncol=1, frameon=False,
    )
    metadata = read_metadata(model)
    figure.suptitle(
        f"BiGL Segmentation outputs on the sample T2 phantom (model: {model.name}, "
        f"{describe_adaptation(metadata)}; WT {rows['WT']['Volume']:.1f} mL)",
        fontsize=10,
    )
    figure.text(0.5, 0.01, "matplotlib rendering of the module's output nodes (headless scene), not a Slicer window",
                ha="center", fontsize=8, color="dimgray")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, bbox_inches="tight")
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model bundle (default: the first available model)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default {DEFAULT_OUT})")
    parser.add_argument("--threads", type=int, help="CPU threads for the inference process")
    args = parser.parse_args(argv)
    _app, volume, outputs, model = run_module(args.model, args.threads)
    print(f"wrote {render(volume, outputs, model, args.out)}")


if __name__ == "__main__":
    main()
