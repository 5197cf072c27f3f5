"""``bigl segment``: segment a scan, or every scan in a folder, with a model bundle."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bigl.cli import add_inference_options
from bigl.data.naming import case_name, is_nifti_path, is_output_name, output_path
from bigl.runfolder import DEVICE_CHOICES, ENGINE_CHOICES

#: Short names of the tumour labels in the one-line summaries.
_SHORT_NAMES = {1: "NCR/NET", 2: "oedema", 4: "enhancing"}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment a brain MR scan (or a folder of scans) into tumour sub-regions",
        description=(
            "Segment a 3D NIfTI scan into BraTS labels (0 background, 1 necrotic/non-enhancing core, "
            "2 oedema, 4 enhancing tumour) with a BiGL model bundle. The label map is written on the "
            "input's exact voxel grid. With a folder as --input, every .nii/.nii.gz scan in it is "
            "segmented (files ending in _seg and BiGL outputs are skipped) and --output is a folder."
        ),
    )
    parser.add_argument("--input", "-i", required=True, type=Path, metavar="SCAN",
                        help="NIfTI scan (.nii/.nii.gz) of the modality the model segments, or a folder of them")
    parser.add_argument("--output", "-o", required=True, type=Path, metavar="SEG",
                        help="label map to write (.nii.gz), or a folder in folder mode (<case>_seg.nii.gz)")
    parser.add_argument("--model", "-m", type=Path, metavar="MODEL", action="append",
                        help="model bundle (.safetensors) or its ONNX export (.onnx); default: the model shipped with BiGL; "
                             "repeat it for an ensemble (the labels of the models' averaged class probabilities)")
    parser.add_argument("--engine", choices=ENGINE_CHOICES, default="auto",
                        help="what runs the networks: onnx (ONNX Runtime, no PyTorch needed), torch (PyTorch), or auto "
                             "(default: ONNX Runtime when the model has an up-to-date .onnx export and onnxruntime is "
                             "installed, else PyTorch; PyTorch also when only PyTorch can use the GPU --device asks for "
                             "or allows)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                        help="where to run the networks (default: auto, the GPU when there is one)")
    parser.add_argument("--attention-out", type=Path, metavar="DIR",
                        help="also write <case>_attention_position/_channel.nii.gz attention maps (0-1) here")
    parser.add_argument("--translated-out", type=Path, metavar="FILE",
                        help="also write the scan translated to the source modality (a folder in folder mode)")
    parser.add_argument("--probabilities-out", type=Path, metavar="FILE",
                        help="also write the 4D class probabilities (float32; a folder in folder mode)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="slices per forward pass (default 16)")
    add_inference_options(parser)
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for PyTorch or ONNX Runtime (default: the engine's choice)")
    parser.add_argument("--modality", metavar="NAME",
                        help="modality of the scans (t1, t1ce, t2, flair); checked against the model "
                             "(default: taken from BraTS-style file names like *_t2.nii.gz)")
    parser.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                        help="progress display: a terminal bar, JSON lines on stdout for GUIs, or nothing")
    parser.set_defaults(func=run)


class Reporter:
    """Progress and results, as human-readable lines or as JSON events on stdout."""

    def __init__(self, mode: str):
        self.mode = mode

    def emit(self, event: str, **fields) -> None:
        print(json.dumps({"event": event, **fields}), flush=True)

    def progress_callback(self, **context):
        if self.mode == "json":
            return lambda done, total: self.emit("progress", done=done, total=total, **context)
        if self.mode == "none":
            return lambda done, total: None
        return None  # bigl.inference shows a terminal bar

    def say(self, text: str) -> None:
        # JSON mode keeps stdout for events only
        print(text, file=sys.stderr if self.mode == "json" else sys.stdout, flush=True)

    def warn(self, message: str, **context) -> None:
        """A plausibility warning: on stderr, and as a ``warning`` event in JSON mode."""
        print(f"bigl segment: warning: {message}", file=sys.stderr, flush=True)
        if self.mode == "json":
            self.emit("warning", message=message, **context)

    def error(self, exc, event: str = "error", **context) -> None:
        if self.mode == "json":
            self.emit(event, message=getattr(exc, "message", str(exc)), hint=getattr(exc, "hint", None), **context)

    def emit_unexpected(self, exc: Exception, event: str = "error", **context) -> None:
        if self.mode == "json":
            self.emit(event, message=f"unexpected {type(exc).__name__}: {exc}",
                      hint="see the log for details; please report this if it persists", **context)


def run(args: argparse.Namespace) -> int:
    reporter = Reporter(args.progress)
    try:
        return _run(args, reporter)
    except Exception as exc:
        error = _user_error(exc, args)
        if error is None:  # a bug or a system problem: GUIs still get an error event
            reporter.emit_unexpected(exc)
            raise
        reporter.error(error)
        if error is exc:
            raise
        raise error from None


def _user_error(exc: Exception, args: argparse.Namespace):
    """``exc`` as a BiGLError the user can act on (itself, a failed write, running out of memory), else None."""
    from bigl.errors import BiGLError

    if isinstance(exc, BiGLError):
        return exc
    if isinstance(exc, OSError):
        from bigl.files import write_error

        return write_error(exc, known_write=False)
    if isinstance(exc, (MemoryError, RuntimeError)):
        from bigl.prediction import out_of_memory_error

        return out_of_memory_error(exc, batch_size=args.batch_size)
    return None


def _run(args: argparse.Namespace, reporter: Reporter) -> int:
    from bigl.errors import InputError
    from bigl.prediction import open_predictor

    source = args.input.expanduser()
    if not source.exists():
        raise InputError(f"input not found: {source}", "give a .nii/.nii.gz scan or a folder of scans")
    if source.is_dir():
        scans = sorted(p for p in source.iterdir() if p.is_file() and is_nifti_path(p) and not is_output_name(p))
        if not scans:
            raise InputError(f"no scans (.nii/.nii.gz files, other than *_seg label maps) in {source}",
                             "give a folder holding the NIfTI scans to segment, or one scan file")
        if is_nifti_path(args.output):
            raise InputError(f"--output {args.output} is a file name, but --input is a folder",
                             "give an output folder; each scan's labels go to <folder>/<case>_seg.nii.gz")
        if args.output.expanduser().exists() and not args.output.expanduser().is_dir():
            raise InputError(f"--output {args.output} is a file, but --input is a folder",
                             "give an output folder (new or existing); each scan's labels go to <folder>/<case>_seg.nii.gz")
    _check_outputs(args, scans if source.is_dir() else [source], folder_mode=source.is_dir())
    predictor = open_predictor(args.model, engine=args.engine, device=args.device, batch_size=args.batch_size,
                               num_threads=args.threads, flip=args.flip, postprocess=args.postprocess,
                               invert_view=args.invert_view, refine_edges=args.refine_edges,
                               contrast_search=args.contrast_search, translated=args.translated_out is not None)
    reporter.say(_model_line(predictor, shipped=args.model is None))
    if source.is_dir():
        return _segment_folder(args, scans, predictor, reporter)
    prediction = _segment_one(args, source, predictor, reporter, folder_mode=False)
    reporter.say(_summary(source, args.output, prediction))
    if reporter.mode == "json":
        reporter.emit("done", output=str(args.output), confidence=prediction.confidence,
                      contrast_gamma=prediction.contrast_gamma)
    return 0


def _file_outputs(args, scan: Path, *, folder_mode: bool) -> dict[str, Path | None]:
    """``output``, ``translated_out`` and ``probabilities_out`` of one scan, as segment_file takes them."""
    if not folder_mode:
        return {"output": args.output, "translated_out": args.translated_out, "probabilities_out": args.probabilities_out}
    case = case_name(scan)
    return {
        "output": output_path(args.output, case, "labels"),
        "translated_out": None if args.translated_out is None else output_path(args.translated_out, case, "translated"),
        "probabilities_out": None if args.probabilities_out is None else output_path(args.probabilities_out, case, "probabilities"),
    }


def _check_outputs(args, scans: list[Path], *, folder_mode: bool) -> None:
    """Every output of the run checked before anything is computed (:func:`bigl.files.check_outputs`):
    no input scan, model or file BiGL did not write beside the scans is replaced, and no two scans
    write one file (``P.nii`` and ``P.nii.gz``)."""
    from bigl.files import check_outputs
    from bigl.prediction import check_targets, model_paths, output_targets

    models = model_paths(args.model)
    everything = {}
    for scan in scans:
        outputs = _file_outputs(args, scan, folder_mode=folder_mode)
        targets = output_targets(scan, outputs.pop("output"), attention_out=args.attention_out, **outputs)
        check_targets(scan, targets, inputs=models)
        everything.update({f"{key} output of {scan.name}": path for key, path in targets.items()})
    check_outputs(everything, scans)


def _segment_one(args, source: Path, predictor, reporter: Reporter, context=None, *, folder_mode: bool):
    from bigl.prediction import segment_file

    outputs = _file_outputs(args, source, folder_mode=folder_mode)
    prediction = segment_file(
        source, outputs.pop("output"), model=predictor, attention_out=args.attention_out, modality=args.modality,
        progress=reporter.progress_callback(**(context or {})), **outputs,
    )
    for warning in prediction.warnings:
        reporter.warn(warning, input=str(source))
    return prediction


def _segment_folder(args, scans: list[Path], predictor, reporter: Reporter) -> int:
    out_dir = args.output.expanduser()
    failed = []
    for index, scan in enumerate(scans, start=1):
        output = output_path(out_dir, case_name(scan), "labels")
        try:
            context = {"file": scan.name, "index": index, "files": len(scans)}
            prediction = _segment_one(args, scan, predictor, reporter, context, folder_mode=True)
        except Exception as exc:  # one broken file must not stop the others
            failed.append(scan)
            error = _user_error(exc, args)
            if error is None:
                reporter.say(f"[{index}/{len(scans)}] {scan.name}: FAILED (unexpected {type(exc).__name__}): {exc}")
                reporter.emit_unexpected(exc, "file_error", input=str(scan))
            else:
                reporter.say(f"[{index}/{len(scans)}] {scan.name}: FAILED: {error}")
                reporter.error(error, "file_error", input=str(scan))
            continue
        reporter.say(f"[{index}/{len(scans)}] {_summary(scan, output, prediction)}")
        if reporter.mode == "json":
            reporter.emit("file_done", input=str(scan), output=str(output), confidence=prediction.confidence,
                          contrast_gamma=prediction.contrast_gamma)
    done = len(scans) - len(failed)
    reporter.say(f"segmented {done} of {len(scans)} scans into {out_dir}"
                 + (f"; failed: {', '.join(p.name for p in failed)}" if failed else ""))
    if failed:
        if reporter.mode == "json":
            reporter.emit("error", message=f"{len(failed)} of {len(scans)} scans failed",
                          hint="see the file_error event of each failed scan", failed=[str(p) for p in failed])
        return 2
    if reporter.mode == "json":
        reporter.emit("done", output=str(out_dir))
    return 0


def _model_line(predictor, *, shipped: bool) -> str:
    """Which model segments, and on which engine: the user should never have to guess."""
    from bigl.bundle import describe_adaptation

    members = getattr(predictor, "members", None)
    if members:
        return f"model: ensemble of {len(members)} models\n" + "\n".join(
            "  " + _model_line(member, shipped=False) for member in members)
    path = predictor.model_path
    origin = f"the shipped reference model; model card: {path.parent / 'MODEL_CARD.md'}" if shipped else str(path)
    engine = "ONNX Runtime" if predictor.engine == "onnx" else "PyTorch"
    return f"model: {describe_adaptation(predictor.metadata)} ({origin}; {engine} on {predictor.device})"


def _summary(source: Path, output: Path, prediction) -> str:
    """One line: where the labels went, the tumour volume per label in millilitres and the model's
    confidence in that tumour (bigl.prediction.tumour_confidence), and the contrast the search chose."""
    import numpy as np

    from bigl.data.io import affine_spacing
    from bigl.volumes import voxel_volume_ml

    voxel_ml = voxel_volume_ml(affine_spacing(prediction.affine))
    counts = np.bincount(prediction.labels.ravel(), minlength=5)
    parts = [f"{name} {counts[label] * voxel_ml:.1f} ml" for label, name in _SHORT_NAMES.items()]
    tumour = sum(counts[label] for label in _SHORT_NAMES) * voxel_ml
    sure = "" if prediction.confidence is None else f", confidence {prediction.confidence:.2f}"
    if prediction.contrast_gamma not in (None, 1.0):
        sure += f" at contrast gamma {prediction.contrast_gamma:g}"
    return f"{source.name} -> {output}: tumour {tumour:.1f} ml ({', '.join(parts)}){sure}"
