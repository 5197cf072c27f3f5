"""Python packages BiGL needs inside Slicer, installed only after asking.

* Segmentation (BiGL Segmentation) needs no PyTorch: it runs the model's ONNX export with ONNX
  Runtime. Its packages are listed in ``Resources/requirements.txt`` (nibabel, scikit-image,
  tqdm, onnxruntime).
* Training (BiGL Training) adds ``Resources/requirements-training.txt`` (safetensors, matplotlib,
  onnx) and PyTorch, which comes from the PyTorch extension (``PyTorchUtils``: a CUDA build when an
  NVIDIA driver is present, a CPU build otherwise; it asks the user first). When the PyTorch
  extension itself is missing, BiGL Training offers to install it from the Extensions Manager
  (the BiGL extension does not depend on it, so segmenting never pulls PyTorch in).
* The other packages are installed with ``slicer.packaging.pip_ensure`` on Slicer 5.12+ (it asks,
  installs and offers a restart when an already imported package changed), else with
  ``slicer.util.pip_install`` after our own question.
* Packages Slicer itself provides (SimpleITK, numpy, VTK...) are never installed or replaced, even
  if a requirements line names them.
* Nothing is installed in testing mode.

The parts that decide (parsing requirements, finding what is missing, whether a restart is
needed) do not import Slicer, so they are tested without it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # Slicer versions without the packaging distribution: pip's vendored copy
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.utils import canonicalize_name

#: The requirements file shipped with the module: what segmentation needs (no PyTorch).
REQUIREMENTS_PATH = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
#: What training needs on top of it (PyTorch itself comes from the PyTorch extension).
TRAINING_REQUIREMENTS_PATH = REQUIREMENTS_PATH.with_name("requirements-training.txt")
#: Distributions Slicer ships or manages itself: never installed or upgraded from here.
PROVIDED_BY_SLICER = frozenset(
    canonicalize_name(name) for name in ("SimpleITK", "numpy", "vtk", "torch", "scipy", "packaging", "pip")
)
#: Import names of distributions whose import name differs from the distribution name.
IMPORT_NAMES = {"scikit-image": "skimage", "pillow": "PIL", "pyyaml": "yaml"}
#: Distributions that provide the same module as a requirement: an installed onnxruntime-gpu (or
#: another ONNX Runtime build) satisfies ``onnxruntime``, and the CPU wheel is never installed over it.
ALTERNATIVES = {"onnxruntime": ("onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino")}


def parse_requirements(text: str, *, source: str = "requirements") -> list[Requirement]:
    """Requirements from requirements.txt text (comments, blank lines and pip options skipped).

    Lines naming packages Slicer provides (see :data:`PROVIDED_BY_SLICER`) are dropped, so a
    careless edit of the file cannot make the module replace Slicer's SimpleITK.
    """
    requirements = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        try:
            requirement = Requirement(line)
        except InvalidRequirement as exc:
            raise ValueError(f"{source}, line {number}: {line!r} is not a valid requirement ({exc})") from None
        if canonicalize_name(requirement.name) in PROVIDED_BY_SLICER:
            continue
        requirements.append(requirement)
    return requirements


def read_requirements(path: str | Path = REQUIREMENTS_PATH) -> list[Requirement]:
    path = Path(path)
    return parse_requirements(path.read_text(encoding="utf-8"), source=str(path))


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` or of one that stands in for it (:data:`ALTERNATIVES`)."""
    for name in (distribution, *ALTERNATIVES.get(canonicalize_name(distribution), ())):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def missing_requirements(
    requirements: Iterable[Requirement],
    version_of: Callable[[str], str | None] = installed_version,
) -> list[Requirement]:
    """The requirements not satisfied by what is installed (markers for other platforms ignored)."""
    missing = []
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        version = version_of(requirement.name)
        if version is None or (requirement.specifier and not requirement.specifier.contains(version, prereleases=True)):
            missing.append(requirement)
    return missing


def import_name(requirement: Requirement) -> str:
    name = canonicalize_name(requirement.name)
    return IMPORT_NAMES.get(name, name.replace("-", "_"))


def restart_needed(installed: Iterable[Requirement], loaded_modules: Iterable[str] | None = None) -> list[str]:
    """Packages just installed or upgraded that this Python session had already imported.

    Their old version stays in memory until Slicer restarts, so a restart should be offered.
    """
    loaded = set(sys.modules if loaded_modules is None else loaded_modules)
    return [requirement.name for requirement in installed if import_name(requirement) in loaded]


def torch_installed() -> bool:
    """Whether PyTorch can be imported (without importing it)."""
    return importlib.util.find_spec("torch") is not None


@dataclass(frozen=True)
class GpuStatus:
    available: bool
    reason: str  # why not, or which GPU


def gpu_status() -> GpuStatus:
    """Whether segmentation can use a CUDA GPU here, and why not.

    ONNX Runtime's CUDA execution provider (onnxruntime-gpu) first; else PyTorch with CUDA when
    PyTorch happens to be installed (``bigl segment`` then runs the torch engine on the GPU).
    Imports onnxruntime, and torch only when it is installed.
    """
    onnx_reason = "ONNX Runtime is not installed yet (it is installed on the first run)"
    if importlib.util.find_spec("onnxruntime") is not None:
        try:
            import onnxruntime
        except Exception as exc:  # a broken install must not break the module panel
            onnx_reason = f"ONNX Runtime cannot be imported ({exc})"
        else:
            if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                return GpuStatus(True, "NVIDIA GPU through ONNX Runtime (CUDA)")
            onnx_reason = (f"the installed ONNX Runtime {onnxruntime.__version__} runs on the CPU only "
                           "(onnxruntime-gpu uses an NVIDIA GPU)")
    if not torch_installed():
        return GpuStatus(False, onnx_reason)
    try:
        import torch
    except Exception:
        return GpuStatus(False, onnx_reason)
    if torch.version.cuda is None or not torch.cuda.is_available():
        return GpuStatus(False, onnx_reason + (f"; PyTorch {torch.__version__} finds no usable NVIDIA GPU either"))
    return GpuStatus(True, torch.cuda.get_device_name(0))


# -----------------------------------------------------------------------------------------------
# Installing: needs the Slicer application.


@dataclass
class DependencyReport:
    """What :func:`ensure_dependencies` did."""

    installed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # still missing (declined, or testing mode)
    restart_recommended: bool = False

    @property
    def ready(self) -> bool:
        return not self.missing


def ensure_dependencies(
    *,
    confirm: Callable[[str], bool],
    computation_backend: str | None = None,
    requirements_path: str | Path = REQUIREMENTS_PATH,
    requester: str = "BiGL",
    testing: bool = False,
    training: bool = False,
    extensions_manager=None,
) -> DependencyReport:
    """Install the requirements when missing, after asking ``confirm(question)``; with
    ``training`` also PyTorch and the training requirements.

    Segmentation (``training=False``) never asks for PyTorch. ``computation_backend``: passed to
    PyTorchUtils (``"cpu"`` for a CPU build, None to let it detect the GPU). ``requester``: the
    module named in the questions. In ``testing`` mode nothing is installed; what is missing is
    reported. ``extensions_manager``: Slicer's extensions manager model, used to offer the PyTorch
    extension when training needs PyTorch and the extension is missing.
    """
    report = DependencyReport()
    if training and not torch_installed():
        if testing:
            report.missing.append("torch")
        elif _install_torch(computation_backend, confirm=confirm, requester=requester,
                            extensions_manager=extensions_manager):
            report.installed.append("torch")
        else:
            report.missing.append("torch")
    requirements = read_requirements(requirements_path)
    if training:
        requirements += read_requirements(TRAINING_REQUIREMENTS_PATH)
    missing = missing_requirements(requirements)
    if not missing:
        return report
    names = [str(requirement) for requirement in missing]
    if testing:
        report.missing.extend(names)
        return report
    import slicer

    packaging_api = getattr(slicer, "packaging", None)
    if packaging_api is None:
        try:
            import slicer.packaging as packaging_api  # Slicer 5.12+
        except ImportError:
            packaging_api = None
    if packaging_api is not None and hasattr(packaging_api, "pip_ensure"):
        try:
            packaging_api.pip_ensure(
                missing, requester=requester, prompt_install=True, prompt_restart=True
            )
        except RuntimeError:  # the user declined
            report.missing.extend(names)
            return report
        report.installed.extend(names)
        return report
    question = (
        f"{requester} needs these Python packages, which are not installed in Slicer yet:\n\n  "
        + "\n  ".join(names)
        + "\n\nDownload and install them now? (Slicer's own packages are not changed.)"
    )
    if not confirm(question):
        report.missing.extend(names)
        return report
    slicer.util.pip_install(names)
    report.installed.extend(names)
    report.restart_recommended = bool(restart_needed(missing))
    return report


def _install_torch(computation_backend: str | None, *, confirm: Callable[[str], bool] = lambda question: False,
                   requester: str = "BiGL Training", extensions_manager=None) -> bool:
    """Install PyTorch through the PyTorch extension; False when the user declined.

    Without the PyTorch extension, offers to install it from the Extensions Manager (Slicer must
    restart before it can be used) and raises RuntimeError saying what to do next.
    """
    try:
        import PyTorchUtils
    except ImportError:
        _offer_pytorch_extension(confirm, requester, extensions_manager)
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=True, forceComputationBackend=computation_backend
    )
    return torch is not None


def _offer_pytorch_extension(confirm: Callable[[str], bool], requester: str, manager) -> None:
    manual = ("Install 'PyTorch' from the Extensions Manager, restart Slicer, and try again. "
              "(BiGL Segmentation does not need it.)")
    install = getattr(manager, "downloadAndInstallExtensionByName", None)
    if install is None or not confirm(
        f"{requester} trains with PyTorch, which the PyTorch extension installs. Install the PyTorch "
        "extension now? (Slicer restarts afterwards; segmenting with BiGL Segmentation does not need it.)"
    ):
        raise RuntimeError(f"{requester} needs the PyTorch extension to install PyTorch. {manual}")
    if not install("PyTorch", True, True):
        raise RuntimeError(f"The PyTorch extension could not be installed. {manual}")
    raise RuntimeError("The PyTorch extension was installed. Restart Slicer, then try again to install PyTorch.")
