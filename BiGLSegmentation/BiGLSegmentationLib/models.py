"""The models the module offers: the default bundle shipped with BiGL and the user's model folder.

A model is one BiGL bundle (``.safetensors``, see :mod:`bigl.bundle`). The user's models live in
one folder (by default ``<Slicer user settings folder>/BiGL/models``, chosen by the widget; every
function here takes the folder as a parameter). "Import model from file..." validates a bundle
(:func:`bigl.bundle.read_metadata`, which reads the header only and never unpickles) and copies it
into that folder, so weights can come from a USB stick or a download made elsewhere.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

#: File name suffix of model bundles.
BUNDLE_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class ModelChoice:
    """One model the user can pick."""

    path: Path
    metadata: dict
    is_default: bool = False

    @property
    def name(self) -> str:
        return "Default model" if self.is_default else self.path.stem

    @property
    def modality(self) -> str:
        """The modality the model segments (``"t2"``...)."""
        return str(self.metadata.get("modality", "?"))

    @property
    def label(self) -> str:
        """What the model list shows: name and the scans it segments."""
        from bigl.bundle import describe_adaptation

        return f"{self.name} ({describe_adaptation(self.metadata)})"

    @property
    def tooltip(self) -> str:
        from bigl.bundle import describe_adaptation

        lines = [describe_adaptation(self.metadata), str(self.path)]
        description = str(self.metadata.get("description") or "").strip()
        if description:
            lines.insert(1, description)
        metrics = self.metadata.get("metrics")
        if isinstance(metrics, dict) and metrics:
            shown = ", ".join(f"{key} {value:.3g}" for key, value in metrics.items() if isinstance(value, (int, float)))
            if shown:
                lines.insert(1, f"reported metrics: {shown}")
        return "\n".join(lines)


def default_model() -> ModelChoice | None:
    """The bundle shipped with BiGL, or None when its file is missing."""
    from bigl.bundle import default_bundle_path, read_metadata
    from bigl.errors import BundleError

    try:
        path = default_bundle_path()
        return ModelChoice(path=path, metadata=read_metadata(path), is_default=True)
    except BundleError:
        return None


def available_models(models_folder: str | os.PathLike | None) -> list[ModelChoice]:
    """The default model (when shipped) first, then the valid bundles in the models folder by name."""
    from bigl.bundle import list_bundles

    choices = []
    default = default_model()
    if default is not None:
        choices.append(default)
    if models_folder is not None:
        choices.extend(ModelChoice(path=path, metadata=metadata) for path, metadata in list_bundles(models_folder))
    return choices


def find_model(choices: list[ModelChoice], path: str | os.PathLike | None) -> ModelChoice | None:
    """The choice for a remembered path (None or "" -> the first choice)."""
    if not choices:
        return None
    if not path:
        return choices[0]
    wanted = _resolved(path)
    for choice in choices:
        if _resolved(choice.path) == wanted:
            return choice
    return None


def import_model(
    source: str | os.PathLike, models_folder: str | os.PathLike, name: str | None = None
) -> ModelChoice:
    """Validate a bundle and copy it into the models folder; returns the copy.

    The copy is named ``<name>.safetensors`` (default: the file's own name), made safe for file
    systems, with a number added when a different model already has that name; importing the same
    file twice returns the existing copy. Raises :class:`bigl.errors.BundleError` for anything
    that is not a readable BiGL bundle.
    """
    from bigl.bundle import read_metadata
    from bigl.errors import BundleError
    from bigl.onnxengine import file_digest

    source = Path(source).expanduser()
    metadata = read_metadata(source)  # BundleError with a fix for missing, foreign, corrupt or newer files
    folder = Path(models_folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(
            f"cannot create the model folder {folder}: {exc.strerror or exc}",
            "choose a writable model folder in the module's Advanced section",
        ) from None
    stem = _safe_stem(f"{name}{BUNDLE_SUFFIX}" if name else source.name)
    if source.parent.resolve() == folder.resolve() and (name is None or source.name == f"{stem}{BUNDLE_SUFFIX}"):
        return ModelChoice(path=source, metadata=metadata)  # listed already
    digest = file_digest(source)
    for number in range(1, 1000):
        target = folder / (f"{stem}{BUNDLE_SUFFIX}" if number == 1 else f"{stem}-{number}{BUNDLE_SUFFIX}")
        if not target.exists():
            break
        if file_digest(target) == digest:
            _copy_exports(source, target)  # an export made since the first import comes along now
            return ModelChoice(path=target, metadata=read_metadata(target))
    else:
        raise BundleError(f"too many models named {stem} in {folder}", "rename the file before importing it")
    _copy_atomically(source, target)
    _copy_exports(source, target)
    return ModelChoice(path=target, metadata=read_metadata(target))


def _copy_exports(source: Path, target: Path) -> None:
    """The bundle's ONNX export (``.onnx``, ``.translator.onnx``), copied beside the copy under
    its new name when it is the export of this very bundle: what segments without PyTorch."""
    from bigl import onnxengine

    export = onnxengine.export_path(source)
    if not onnxengine.export_is_current(export, source, translated=False):
        return
    copied = onnxengine.export_path(target)
    if onnxengine.export_is_current(copied, target):
        return  # copied before, with its translator
    _copy_atomically(export, copied)
    translator = onnxengine.translator_path(export)
    if translator.is_file():
        _copy_atomically(translator, onnxengine.translator_path(copied))


def _safe_stem(file_name: str) -> str:
    stem = file_name[: -len(BUNDLE_SUFFIX)] if file_name.lower().endswith(BUNDLE_SUFFIX) else Path(file_name).stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "model"
    return stem[:80]


def _copy_atomically(source: Path, target: Path) -> None:
    """Copy to a temporary name beside the target, then rename: the folder never lists a partial file."""
    from bigl.errors import BundleError

    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise BundleError(
            f"cannot copy {source.name} into {target.parent}: {exc.strerror or exc}",
            "check that the model folder is writable and the disk is not full",
        ) from None


def _resolved(path: str | os.PathLike) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except OSError:
        return Path(path).expanduser().absolute()
