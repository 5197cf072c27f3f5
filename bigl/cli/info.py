"""``bigl info``: describe a model bundle (reads its header, and checks the weights' checksum)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_METHODS = {
    "bigl": "BiGL (bidirectional global-to-local unsupervised domain adaptation)",
    "source-only": "source only (trained on labelled source scans, no adaptation)",
    "target-only": "target only (trained on labelled target scans; upper bound)",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "info",
        help="show what a model bundle is: method, modalities, architecture, metrics",
        description="Print the description stored in a BiGL model bundle (.safetensors) without loading its "
                    "weights, and check them against the checksum recorded when the bundle was written.",
    )
    parser.add_argument("bundle", type=Path, metavar="BUNDLE", help="model bundle (.safetensors)")
    parser.add_argument("--json", action="store_true", help="print the metadata as JSON (with parameter counts)")
    parser.set_defaults(func=run)


def describe(path: Path) -> dict:
    """The bundle's metadata plus its path, file size, parameter count per network and whether its
    checksum verified (``"checksum": "verified"`` or ``"none"`` for bundles written without one)."""
    from bigl.bundle import parameter_counts, read_metadata, verify_checksum

    metadata = read_metadata(path)
    return {**metadata, "path": str(path), "file_size_bytes": path.stat().st_size,
            "parameters": parameter_counts(path), "checksum": "verified" if verify_checksum(path) else "none"}


def run(args: argparse.Namespace) -> int:
    info = describe(args.bundle.expanduser())
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_info(info))
    return 0


def _preprocessing(prep: dict) -> str:
    """Slices and intensity settings; only the settings of the bundle's own intensity normalisation
    (bundles written before ``intensity`` existed use the percentiles)."""
    from bigl.data.preprocess import INTENSITY_SETTINGS

    intensity = prep.get("intensity", "percentile")
    unused = {key for name, keys in INTENSITY_SETTINGS.items() if name != intensity for key in keys}
    shown = {k: v for k, v in prep.items() if k not in ("image_size", "slice_axis", *unused)}
    return f"{prep.get('image_size')}x{prep.get('image_size')} slices along axis {prep.get('slice_axis')}, {_settings(shown)}"


def format_info(info: dict) -> str:
    """Readable multi-line description of :func:`describe`'s result."""
    params = info.get("parameters", {})
    modality = (info.get("modality") or "?").upper()
    source = info.get("source_modality")
    lines = [f"BiGL model bundle {info['path']} ({info['file_size_bytes'] / 1e6:.1f} MB)"]
    row = lambda key, value: lines.append(f"  {key + ':':<15}{value}")  # noqa: E731
    row("method", _METHODS.get(info["method"], info["method"]))
    if info["method"] == "bigl" and source:
        row("segments", f"{modality} scans (adapted from labelled {source.upper()} scans, without {modality} labels)")
    elif info["method"] == "source-only" and source:
        row("segments", f"{modality} scans (trained on labelled {source.upper()} scans only, no adaptation)")
    else:
        row("segments", f"{modality} scans")
    row("segmenter", f"DualAttentionUNet {_settings(info['segmenter'])} ({_count(params.get('segmenter', 0))} parameters)")
    translators = [name for name in ("translator_s2t", "translator_t2s") if name in params]
    if info.get("translator") and translators:
        per = ", ".join(f"{name.split('_')[1]} {_count(params[name])}" for name in translators)
        row("translators", f"ResnetGenerator {_settings(info['translator'])} ({per} parameters)")
    else:
        row("translators", "none")
    row("preprocessing", _preprocessing(info["preprocessing"]))
    names = info.get("class_names") or []
    row("labels", ", ".join(f"{label} {name}" for label, name in zip(info.get("labels", []), names)))
    defaults = [name for name, on in (info.get("inference") or {}).items() if on]
    row("inference", ("on by default: " + ", ".join(defaults)) if defaults else "no options on by default")
    floor = info.get("confidence_floor")
    row("unsure below", f"a tumour confidence of {floor:g} (it warns then)" if floor is not None
        else "no confidence floor (it reports its confidence without warning)")
    if info.get("metrics"):
        lines.append("  metrics:")
        lines.extend(f"    {key}: {value}" for key, value in _flatten(info["metrics"]))
    else:
        row("metrics", "not measured")
    if info.get("training"):
        lines.append("  training:")
        lines.extend(f"    {key}: {value}" for key, value in _flatten(info["training"]))
    row("created", f"{info.get('created', '?')} with bigl {info.get('bigl_version', '?')} "
                   f"(bundle format {info.get('format_version')})")
    row("checksum", "verified: the weights are as written" if info.get("checksum") == "verified"
        else "none recorded (written by an older BiGL); loading still refuses NaN weights")
    if info.get("description"):
        row("description", info["description"])
    return "\n".join(lines)


def _settings(values: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in values.items())


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


def _flatten(values, prefix: str = ""):
    """(dotted key, formatted value) pairs of a nested dict."""
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + ".")
        elif isinstance(value, float):
            yield name, f"{value:.4g}"
        else:
            yield name, value
