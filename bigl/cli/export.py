"""``bigl export``: write a model bundle's networks to ONNX, for segmentation without PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model bundle to ONNX (segmentation with ONNX Runtime, no PyTorch needed)",
        description=(
            "Write the segmenter of a model bundle to MODEL.onnx (outputs: logits and both attention maps) and, "
            "for BiGL bundles, the target-to-source translator to MODEL.translator.onnx, each carrying the "
            "bundle's metadata, with a dynamic batch size. ONNX Runtime and PyTorch are then compared on a "
            "synthetic batch; nothing is written when they disagree. `bigl segment` uses the export "
            "(--engine auto or onnx) where PyTorch is not installed. Needs PyTorch and onnx."
        ),
        epilog="Example: bigl export runs/t1-t2/model.safetensors   (writes runs/t1-t2/model.onnx)",
    )
    parser.add_argument("model", type=Path, metavar="MODEL.safetensors", help="the model bundle to export")
    parser.add_argument("--out", "-o", type=Path, metavar="MODEL.onnx",
                        help="the segmenter's ONNX file (default: beside the bundle, same name, .onnx); "
                             "the translator goes beside it as <name>.translator.onnx")
    parser.add_argument("--opset", type=int, default=None, metavar="N",
                        help="ONNX opset to export with (default 17, which ONNX Runtime 1.12 and newer run)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bigl.export import DEFAULT_OPSET, export_bundle

    files = export_bundle(args.model, args.out, opset=DEFAULT_OPSET if args.opset is None else args.opset)
    for path in files:
        print(f"bigl export: wrote {path}")
    print("bigl export: ONNX Runtime reproduces PyTorch on a synthetic batch")
    return 0
