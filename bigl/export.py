"""Export a model bundle's networks to ONNX, for inference without PyTorch (:mod:`bigl.onnxengine`).

:func:`export_bundle` writes ``MODEL.onnx`` (the segmenter, with its logits and both attention
maps as graph outputs) and, for BiGL bundles, ``MODEL.translator.onnx`` (the target->source
translator), each with the bundle's JSON description in its ``metadata_props`` and a dynamic batch
size. Right after writing, both files are run with ONNX Runtime on a synthetic batch (a size the
trace did not see, an all-background slice included) and compared with PyTorch: softmax
probabilities within 1e-4, attention maps within 1e-3, bottleneck features within 1e-3 of their
largest magnitude, translations within 1e-3; a mismatch is a BundleError and no file is left
behind, and so is a failure of the exporter or of the ONNX checker.

Needs PyTorch, the ``onnx`` package (the exporter uses it) and onnxruntime (for the check).
"""

from __future__ import annotations

import inspect
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np

from bigl import __version__
from bigl.errors import BundleError, ConfigError
from bigl.onnxengine import (
    BUNDLE_KEY,
    EXPORT_FORMAT,
    EXPORT_FORMAT_VERSION,
    EXPORT_KEY,
    INPUT_NAME,
    SEGMENTER_OUTPUTS,
    SOURCE_DIGEST_KEY,
    TRANSLATOR_OUTPUTS,
    export_path,
    source_digest,
    translator_path,
)
from bigl.prediction import padded_size

#: The opset exports use unless told otherwise: old enough for the ONNX Runtime of older Slicer releases.
DEFAULT_OPSET = 17
#: Agreement required between ONNX Runtime and PyTorch on the check batch.
PROBABILITY_TOLERANCE = 1e-4
ATTENTION_TOLERANCE = 1e-3
FEATURE_TOLERANCE = 1e-3  # relative to the largest feature magnitude
TRANSLATION_TOLERANCE = 1e-3
#: Slices in the check batch (not the traced batch size, so the dynamic batch is checked too).
_CHECK_BATCH = 3
_TRACE_BATCH = 2


def _require_export_tools():
    try:
        import torch
    except ImportError:
        raise ConfigError("exporting to ONNX needs PyTorch, which is not installed",
                          "pip install 'bigl[train]' (PyTorch, onnx), then run bigl export again") from None
    try:
        import onnx
    except ImportError:
        raise ConfigError("exporting to ONNX needs the onnx package, which is not installed",
                          "pip install onnx (it comes with pip install 'bigl[train]')") from None
    return torch, onnx


def export_bundle(bundle_path: str | os.PathLike, out: str | os.PathLike | None = None, *,
                  opset: int = DEFAULT_OPSET, check: bool = True) -> list[Path]:
    """Write the ONNX export(s) of a bundle; returns the files written (segmenter first).

    ``out``: the segmenter's file (default: beside the bundle, ``MODEL.onnx``); the translator goes
    to ``<out stem>.translator.onnx``. ``check``: compare ONNX Runtime with PyTorch right after.
    """
    from bigl.bundle import load_bundle
    from bigl.files import atomic_outputs

    torch, onnx = _require_export_tools()
    if isinstance(opset, bool) or not isinstance(opset, int) or not 13 <= opset <= onnx.defs.onnx_opset_version():
        raise ConfigError(f"opset must be a whole number from 13 to {onnx.defs.onnx_opset_version()}, got {opset!r}",
                          f"use e.g. --opset {DEFAULT_OPSET}")
    source = Path(bundle_path).expanduser()
    bundle = load_bundle(source, device="cpu")
    target = Path(out).expanduser() if out is not None else export_path(source)
    if not target.name.lower().endswith(".onnx"):
        raise ConfigError(f"the export's name must end in .onnx, got {target.name}", "e.g. --out model.onnx")
    if target.resolve() == source.resolve():
        raise ConfigError("the export would replace the bundle itself", "choose another --out")
    size = bundle.preprocessing.image_size
    digest = source_digest(source)
    seg_config = bundle.segmenter_config
    segmenter_size = padded_size(size, seg_config.size_multiple)
    translator = bundle.translator_t2s
    files = {target: None}
    if translator is not None:
        translator_size = padded_size(size, bundle.translator_config.size_multiple)
        files[translator_path(target)] = None

    def description(graph: str, outputs, graph_size: int) -> dict[str, str]:
        info = {
            "format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "graph": graph, "input": INPUT_NAME,
            "outputs": list(outputs), "size": graph_size, "opset": opset, "bigl_version": __version__,
            "source": source.name, SOURCE_DIGEST_KEY: digest,
            "translator": translator_path(target).name if translator is not None else None,
        }
        return {BUNDLE_KEY: json.dumps(bundle.metadata, allow_nan=False), EXPORT_KEY: json.dumps(info)}

    segmenter_bytes = _export(torch, onnx, _segmenter_graph(torch, bundle.segmenter), SEGMENTER_OUTPUTS, segmenter_size,
                              opset, description("segmenter", SEGMENTER_OUTPUTS, segmenter_size),
                              channels=bundle.segmenter_config.in_channels)
    files[target] = segmenter_bytes
    if translator is not None:
        files[translator_path(target)] = _export(
            torch, onnx, translator, TRANSLATOR_OUTPUTS, translator_size, opset,
            description("translator_t2s", TRANSLATOR_OUTPUTS, translator_size))
    if check:
        check_export(bundle, segmenter_bytes, files.get(translator_path(target)), target)
    with atomic_outputs(list(files)) as temporaries:
        for temporary, data in zip(temporaries, files.values()):
            Path(temporary).write_bytes(data)
    return list(files)


def _segmenter_graph(torch, segmenter):
    """The segmenter wrapped so that the traced graph returns all four outputs as a tuple."""

    class SegmenterGraph(torch.nn.Module):
        def __init__(self, network):
            super().__init__()
            self.network = network

        def forward(self, image):
            result = self.network(image, return_aux=True)
            return result.logits, result.features, result.position_attention, result.channel_attention

    return SegmenterGraph(segmenter).eval()


def _export(torch, onnx, module, outputs, size: int, opset: int, metadata: dict[str, str], channels: int = 1) -> bytes:
    """The ONNX bytes of ``module`` traced on [2, channels, size, size], batch axis dynamic, with ``metadata``."""
    module.eval()  # the exporter restores the wrapper's mode afterwards, recursively: keep it eval
    example = torch.zeros(_TRACE_BATCH, channels, size, size)
    example[:, :, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 0.5
    buffer = io.BytesIO()
    names = [INPUT_NAME, *outputs]
    options = dict(opset_version=opset, input_names=[INPUT_NAME], output_names=list(outputs),
                   dynamic_axes={name: {0: "batch"} for name in names}, do_constant_folding=True)
    if _accepts(torch.onnx.export, "dynamo"):
        options["dynamo"] = False  # the TorchScript exporter (newer torch defaults to the dynamo one)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes about shape checks and the legacy exporter
            torch.onnx.export(module, (example,), buffer, **options)
        module.eval()
        model = onnx.load_from_string(buffer.getvalue())
        model.producer_name, model.producer_version = "bigl", __version__
        model.doc_string = "BiGL brain tumour segmentation; see the 'bigl' and 'bigl_onnx' metadata"
        del model.metadata_props[:]
        for key, value in metadata.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(model)
        return model.SerializeToString()
    except Exception as exc:  # the exporter's and the checker's errors have many types
        module.eval()
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise BundleError(
            f"exporting the {type(module).__name__} network to ONNX (opset {opset}) failed: {type(exc).__name__}: {reason}",
            f"try another --opset (e.g. {DEFAULT_OPSET}), or another PyTorch/onnx version (pip install -U torch onnx); "
            "the bundle itself is fine and segments with --engine torch",
        ) from exc


def _accepts(function, name: str) -> bool:
    """Whether ``function`` takes a keyword argument ``name`` (False when it cannot be told)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters


def _check_slices(size: int, count: int = _CHECK_BATCH, channels: int = 1) -> np.ndarray:
    """A synthetic batch [count, channels, size, size] in [-1, 1]: smooth blobs on background, and
    one all-background input."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / max(1, size - 1)
    batch = np.full((count, channels, size, size), -1.0, dtype=np.float32)
    for index in range(count - 1):
        for channel in range(channels):
            cy, cx = rng.uniform(0.3, 0.7, 2)
            blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 0.05)
            batch[index, channel] = np.clip(2 * blob - 1 + 0.1 * rng.standard_normal((size, size)), -1, 1)
    return batch


def check_export(bundle, segmenter_bytes: bytes, translator_bytes: bytes | None, target: Path) -> None:
    """BundleError unless ONNX Runtime reproduces PyTorch on a synthetic batch (see the module docstring)."""
    import torch

    from bigl.onnxengine import create_session, parse_header
    from bigl.prediction import softmax

    def session(data: bytes):
        return create_session(target, data, parse_header(data), providers=["CPUExecutionProvider"], num_threads=None)

    size = bundle.preprocessing.image_size
    batch = _check_slices(padded_size(size, bundle.segmenter_config.size_multiple),
                          channels=bundle.segmenter_config.in_channels)
    with torch.inference_mode():
        expected = bundle.segmenter(torch.from_numpy(batch), return_aux=True)
    got = dict(zip(SEGMENTER_OUTPUTS, session(segmenter_bytes).run(None, {INPUT_NAME: batch})))
    differences = {
        "probabilities": (np.abs(softmax(got["logits"]) - torch.softmax(expected.logits, 1).numpy()).max(),
                          PROBABILITY_TOLERANCE),
        "position attention": (np.abs(got["position_attention"] - expected.position_attention.numpy()).max(),
                               ATTENTION_TOLERANCE),
        "channel attention": (np.abs(got["channel_attention"] - expected.channel_attention.numpy()).max(),
                              ATTENTION_TOLERANCE),
        "features": (np.abs(got["features"] - expected.features.numpy()).max()
                     / max(1.0, float(np.abs(expected.features.numpy()).max())), FEATURE_TOLERANCE),
    }
    if translator_bytes is not None:
        batch = _check_slices(padded_size(size, bundle.translator_config.size_multiple))
        with torch.inference_mode():
            translated = bundle.translator_t2s(torch.from_numpy(batch)).numpy()
        got_translated = session(translator_bytes).run(None, {INPUT_NAME: batch})[0]
        differences["translation"] = (np.abs(got_translated - translated).max(), TRANSLATION_TOLERANCE)
    wrong = {name: value for name, (value, tolerance) in differences.items() if not value <= tolerance}
    if wrong:
        shown = ", ".join(f"{name} differ by up to {value:.2g} (allowed {differences[name][1]:g})"
                          for name, value in wrong.items())
        raise BundleError(f"the ONNX export of {bundle.path.name if bundle.path else 'the bundle'} does not reproduce "
                          f"PyTorch: {shown}; nothing was written",
                          "try another --opset, or report this with the bundle (use --engine torch meanwhile)")
