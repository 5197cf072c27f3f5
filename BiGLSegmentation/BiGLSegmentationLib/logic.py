"""The BiGL Segmentation logic, free of Qt: one run = export, ``bigl segment`` subprocess, import.

The subprocess segments with ONNX Runtime (the model's ONNX export; no PyTorch needed) and falls
back to PyTorch only for a model without an up-to-date export when PyTorch is installed.

:class:`SegmentationRun` writes the input volume node to a temporary NIfTI file, starts
``python -m bigl segment ... --progress json`` with Slicer's Python (``PythonSlicer``; the
interpreter running the tests elsewhere) through :class:`~BiGLSegmentationLib.process.JsonLineProcess`,
reports progress when polled, and on success puts the results into the scene
(:func:`~BiGLSegmentationLib.scene.import_results`). The widget polls a run from a QTimer, so
Slicer never freezes; scripts and tests call :meth:`SegmentationLogic.segment`, which waits.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .process import JsonLineProcess

#: Name of the exported scan. It states no modality, so ``bigl segment`` does not guess one from
#: it: the run passes ``--modality`` (the model's, once the user chose the model for this scan and
#: saw :func:`modality_warning`, which compares the node's name with the model).
INPUT_FILE = "scan.nii.gz"


@dataclass
class OutputOptions:
    """Which optional outputs to compute and show."""

    attention: bool = False
    translated: bool = False
    probabilities: bool = False
    surface: bool = False


class SegmentationError(Exception):
    """A run that failed, with what went wrong and how to fix it (for a message box)."""

    def __init__(self, message: str, hint: str | None = None, details: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details

    def __str__(self) -> str:
        return f"{self.message}\n{self.hint}" if self.hint else self.message


@dataclass
class RunStatus:
    """What a poll of a run tells the GUI."""

    done: int = 0
    total: int = 0
    running: bool = True
    message: str = "Starting..."

    @property
    def fraction(self) -> float | None:
        """Share done in [0, 1], or None while unknown."""
        return min(1.0, self.done / self.total) if self.total else None


# -----------------------------------------------------------------------------------------------
# the command


def python_executable() -> str:
    """Slicer's ``PythonSlicer`` when it is on the PATH (inside Slicer), else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


def bigl_package_root() -> Path:
    """The folder holding the ``bigl`` package this process uses (the extension ships one)."""
    import bigl

    return Path(bigl.__file__).resolve().parent.parent


def child_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the inference process: ``bigl`` importable, output unbuffered."""
    env = dict(os.environ if base is None else base)
    root = str(bigl_package_root())
    paths = [path for path in env.get("PYTHONPATH", "").split(os.pathsep) if path and path != root]
    env["PYTHONPATH"] = os.pathsep.join([root, *paths])
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def segment_command(
    python: str,
    input_path: Path,
    output_path: Path,
    *,
    model_path: Path | None,
    device: str = "auto",
    attention_dir: Path | None = None,
    translated_path: Path | None = None,
    probabilities_path: Path | None = None,
    threads: int | None = None,
    engine: str = "auto",
    modality: str | None = None,
) -> list[str]:
    """The argument list of one ``bigl segment`` run (never a shell string).

    ``modality``: the scan's modality (``--modality``; None leaves it unchecked, with a warning).

    ``engine``: "auto" (ONNX Runtime when the model has an up-to-date ONNX export, which the
    shipped and trained models have; PyTorch otherwise, when installed), "onnx" or "torch"."""
    from bigl.runfolder import DEVICE_CHOICES, ENGINE_CHOICES

    if device not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)}, not {device!r}")
    if engine not in ENGINE_CHOICES:
        raise ValueError(f"engine must be one of {', '.join(ENGINE_CHOICES)}, not {engine!r}")
    command = [python, "-m", "bigl", "segment", "--input", str(input_path), "--output", str(output_path),
               "--device", device, "--engine", engine, "--progress", "json"]
    if model_path is not None:
        command += ["--model", str(model_path)]
    if attention_dir is not None:
        command += ["--attention-out", str(attention_dir)]
    if translated_path is not None:
        command += ["--translated-out", str(translated_path)]
    if probabilities_path is not None:
        command += ["--probabilities-out", str(probabilities_path)]
    if threads is not None:
        command += ["--threads", str(int(threads))]
    if modality:
        command += ["--modality", str(modality)]
    return command


# -----------------------------------------------------------------------------------------------
# understanding a failure

_OUT_OF_MEMORY = re.compile(r"out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|MemoryError", re.I)
_MISSING_MODULE = re.compile(r"No module named '([\w.]+)'")


def describe_failure(events: list[dict], returncode: int | None, log: str, *, device: str = "auto") -> SegmentationError:
    """Turn what a failed run left (error event, exit status, log) into a message with a fix."""
    error = next((event for event in reversed(events) if event.get("event") == "error"), None)
    message = str(error.get("message") or "") if error else ""
    hint = (error.get("hint") or None) if error else None
    text = f"{message}\n{log}"
    if _OUT_OF_MEMORY.search(text):
        where = "GPU" if device != "cpu" and re.search(r"cuda|gpu|cublas", text, re.I) else "computer"
        advice = ("choose CPU as the device (slower, but uses the main memory)" if where == "GPU"
                  else "close other programs, or crop the volume to the head before segmenting")
        return SegmentationError(f"The {where} ran out of memory while segmenting.", f"Fix: {advice}.", log)
    if error is not None:
        return SegmentationError(message or "Segmentation failed.", f"Fix: {hint}" if hint else None, log)
    missing = _MISSING_MODULE.search(log)
    if missing:
        return SegmentationError(
            f"Python package '{missing.group(1)}' is missing in Slicer's Python.",
            "Fix: press Segment again to install the missing packages (then restart Slicer if asked).",
            log,
        )
    if returncode == 0:
        return SegmentationError("The segmentation process finished without producing results.", None, log)
    last = log.strip().splitlines()[-1] if log.strip() else ""
    return SegmentationError(
        f"The segmentation process stopped unexpectedly (exit status {returncode}).",
        f"Details: {last}" if last else "See the Python console for details.",
        log,
    )


def modality_warning(volume_name: str, model_metadata: dict) -> str | None:
    """A warning when a volume's name states a modality other than the one the model segments.

    Names like ``BraTS19_2013_10_1_t1`` or ``case-t2w`` state one (BraTS naming); others do not.
    The rule is the one ``bigl segment`` applies to file names (standard library only: it works
    before BiGL's packages are installed).
    """
    from bigl.data.naming import modality_from_name

    stated = modality_from_name(f"{volume_name}.nii.gz")
    expected = model_metadata.get("modality")
    if stated is None or expected is None or stated == expected:
        return None
    return (f"The volume name '{volume_name}' suggests a {stated.upper()} scan, but this model segments "
            f"{str(expected).upper()} scans. Results on another modality are unreliable.")


def model_modality(model_path: str | os.PathLike) -> str | None:
    """The modality a model file (bundle or ONNX export) segments, from its header; None when it
    cannot be read (``bigl segment`` then says what is wrong with the file)."""
    try:
        from bigl import onnxengine
        from bigl.bundle import read_metadata

        path = Path(model_path)
        metadata = onnxengine.read_export(path)[0] if onnxengine.is_onnx_path(path) else read_metadata(path)
    except Exception:  # noqa: BLE001 - any unreadable model: the run reports it
        return None
    modality = metadata.get("modality")
    return str(modality) if modality else None


def attention_files(folder: Path) -> dict[str, Path]:
    """The attention maps ``bigl segment --attention-out`` wrote for the exported scan."""
    from bigl.data.naming import attention_paths, case_name

    found = attention_paths(folder, case_name(INPUT_FILE))
    for kind, path in found.items():
        if not path.is_file():
            raise SegmentationError(f"the {kind} attention map {path.name} is missing in {folder}")
    return found


# -----------------------------------------------------------------------------------------------
# one run


@dataclass
class _RunFiles:
    folder: Path
    input: Path = field(init=False)
    labels: Path = field(init=False)
    attention: Path = field(init=False)
    translated: Path = field(init=False)
    probabilities: Path = field(init=False)

    def __post_init__(self):
        self.input = self.folder / INPUT_FILE
        self.labels = self.folder / "labels.nii.gz"
        self.attention = self.folder / "attention"
        self.translated = self.folder / "translated.nii.gz"
        self.probabilities = self.folder / "probabilities.nii.gz"


class SegmentationRun:
    """Segment one volume node with one model in a subprocess; poll, cancel or finish it.

    ``modality``: the scan's modality, passed to ``bigl segment``; default: the one the model
    segments (the user chose the model for this scan). ``warnings``: what the run warned about
    (``warning`` events: e.g. an implausible scan or tumour size), also on the outputs of ``finish``.
    """

    def __init__(
        self,
        input_node,
        model_path: str | os.PathLike,
        *,
        device: str = "auto",
        options: OutputOptions | None = None,
        work_dir: str | os.PathLike | None = None,
        python: str | None = None,
        threads: int | None = None,
        engine: str = "auto",
        modality: str | None = None,
    ):
        if input_node is None:
            raise SegmentationError("No input volume selected.", "Fix: select the scan to segment.")
        if input_node.GetImageData() is None:
            raise SegmentationError(f"{input_node.GetName()} has no image data.", "Fix: load the scan again.")
        self.input_node = input_node
        self.model_path = Path(model_path).expanduser().absolute()  # the process starts elsewhere
        self.device = device
        self.options = options or OutputOptions()
        self.python = python or python_executable()
        self.threads = threads
        self.engine = engine
        self.modality = modality if modality is not None else model_modality(self.model_path)
        self.warnings: list[str] = []
        self._work_dir = Path(work_dir) if work_dir is not None else None
        self.files: _RunFiles | None = None
        self.process: JsonLineProcess | None = None
        self.events: list[dict] = []
        self.status = RunStatus()
        self.started_at: float | None = None

    def command(self) -> list[str]:
        files = self.files
        return segment_command(
            self.python, files.input, files.labels, model_path=self.model_path, device=self.device,
            attention_dir=files.attention if self.options.attention else None,
            translated_path=files.translated if self.options.translated else None,
            probabilities_path=files.probabilities if self.options.probabilities else None,
            threads=self.threads, engine=self.engine, modality=self.modality,
        )

    def start(self) -> None:
        """Export the input and start the inference process (returns at once)."""
        from .scene import export_volume_to_nifti

        folder = Path(tempfile.mkdtemp(prefix="BiGL-", dir=self._work_dir)).resolve()
        self.files = _RunFiles(folder)
        try:
            export_volume_to_nifti(self.input_node, self.files.input)
        except (ValueError, OSError) as exc:
            self.cleanup()
            raise SegmentationError(f"Cannot export {self.input_node.GetName()}: {exc}",
                                    "Fix: select a single-channel scalar volume (the MR scan).") from None
        # every path is absolute; starting in the package root also makes `-m bigl` importable
        # when a launcher (PythonSlicer) rewrites PYTHONPATH
        self.process = JsonLineProcess(self.command(), env=child_environment(), cwd=bigl_package_root())
        try:
            self.process.start()
        except OSError as exc:
            self.cleanup()
            raise SegmentationError(f"Cannot start Python ({self.python}): {exc}",
                                    "Fix: check the Slicer installation.") from None
        self.started_at = time.monotonic()
        self.status = RunStatus(message="Loading the model...")

    def poll(self) -> RunStatus:
        """Read new events; returns the current status (``running`` False once the process ended)."""
        if self.process is None:
            return self.status
        for event in self.process.poll():
            self.events.append(event)
            kind = event.get("event")
            if kind == "progress":
                self.status.done = int(event.get("done", 0))
                self.status.total = int(event.get("total", 0))
                self.status.message = f"Segmenting: {self.status.done} of {self.status.total} slices"
            elif kind == "warning":
                message = str(event.get("message") or "").strip()
                if message and message not in self.warnings:
                    self.warnings.append(message)
            elif kind == "done":
                self.status.message = "Loading the results..."
            elif kind == "error":
                self.status.message = "Failed"
        if self.process.finished:
            self.status.running = False
        return self.status

    def wait(self, timeout: float | None = None) -> RunStatus:
        """Block until the process ends (:class:`subprocess.TimeoutExpired` after ``timeout`` s)."""
        if self.process is not None:
            self.process.wait(timeout=timeout)
        return self.poll()

    def cancel(self) -> None:
        """Stop the inference (the whole process tree) and remove the temporary files."""
        if self.process is not None:
            self.process.cancel()
        self.status.running = False
        self.status.message = "Cancelled"
        self.cleanup()

    @property
    def cancelled(self) -> bool:
        return self.process is not None and self.process.cancelled

    def finish(self, model_name: str = ""):
        """Import the results into the scene; :class:`SegmentationError` if the run failed."""
        from .scene import import_results

        if self.process is None or self.files is None:
            raise SegmentationError("The segmentation was not started.")
        if self.cancelled:
            raise SegmentationError("The segmentation was cancelled.")
        status = self.wait()
        try:
            succeeded = self.process.returncode == 0 and any(e.get("event") == "done" for e in self.events)
            if not succeeded or not self.files.labels.is_file():
                raise describe_failure(self.events, self.process.returncode, self.process.log_tail(40),
                                       device=self.device)
            outputs = import_results(
                self.input_node,
                self.files.labels,
                attention_paths=attention_files(self.files.attention) if self.options.attention else None,
                translated_path=self.files.translated if self.options.translated else None,
                probabilities_path=self.files.probabilities if self.options.probabilities else None,
                surface=self.options.surface,
                model_name=model_name or self.model_path.name,
            )
            outputs.warnings = list(self.warnings)
            done = next(event for event in reversed(self.events) if event.get("event") == "done")
            confidence = done.get("confidence")
            outputs.confidence = float(confidence) if isinstance(confidence, (int, float)) else None
            gamma = done.get("contrast_gamma")
            outputs.contrast_gamma = float(gamma) if isinstance(gamma, (int, float)) else None
            return outputs
        finally:
            status.running = False
            self.cleanup()

    def cleanup(self) -> None:
        """Remove the run's temporary folder."""
        if self.files is not None:
            shutil.rmtree(self.files.folder, ignore_errors=True)

    @property
    def elapsed_seconds(self) -> float:
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at


# -----------------------------------------------------------------------------------------------
# the logic


class SegmentationLogic:
    """What the module does, usable from scripts: list/import models and segment volume nodes.

    ``models_folder``: where the user's models live (see :mod:`BiGLSegmentationLib.models`).
    """

    def __init__(self, models_folder: str | os.PathLike | None = None):
        self.models_folder = Path(models_folder).expanduser() if models_folder else None

    def models(self):
        from .models import available_models

        return available_models(self.models_folder)

    def import_model(self, path: str | os.PathLike):
        from .models import import_model

        if self.models_folder is None:
            raise ValueError("no model folder is set")
        return import_model(path, self.models_folder)

    def default_model_path(self) -> Path:
        """The first available model (the shipped default when there is one)."""
        choices = self.models()
        if not choices:
            from bigl.bundle import default_bundle_path

            return default_bundle_path()  # raises BundleError naming the fix
        return choices[0].path

    def start_segmentation(self, input_node, model_path=None, **run_options) -> SegmentationRun:
        """Start a run and return it at once (poll it, then call ``finish``)."""
        run = SegmentationRun(input_node, model_path or self.default_model_path(), **run_options)
        run.start()
        return run

    def segment(self, input_node, model_path=None, *, timeout: float | None = None, **run_options):
        """Segment and wait; returns the :class:`~BiGLSegmentationLib.scene.SegmentationOutputs`."""
        run = self.start_segmentation(input_node, model_path, **run_options)
        try:
            run.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            run.cancel()
            raise SegmentationError(f"The segmentation took longer than {timeout:.0f} s and was stopped.") from None
        return run.finish()
