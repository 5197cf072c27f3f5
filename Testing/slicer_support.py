"""A headless 3D Slicer scene for testing module logic without the Slicer application.

The ``slicer-core`` wheel provides Slicer's MRML library and module logics without Qt. This
helper builds what the application would: a scene, a ``vtkSlicerApplicationLogic`` with the
default colour nodes, and the Colors, Volumes, Segmentations, SubjectHierarchy, Tables and Plots
logics registered under the names Slicer uses (``appLogic.GetModuleLogic("Volumes")``...).
Nothing here needs ``qt``, ``ctk``, ``slicer.app`` or ``slicer.ScriptedLoadableModule``.

Usage in a test module::

    import slicer_support            # Testing/ is put on sys.path by the tests' conftest.py
    pytestmark = pytest.mark.skipif(slicer_support.SKIP_REASON is not None,
                                     reason=slicer_support.SKIP_REASON or "")

    def test_something():
        app = slicer_support.create_headless_slicer()
        volume = app.load_volume("scan.nii.gz")
        ...

or as a fixture (what the modules' conftest.py files do)::

    @pytest.fixture
    def headless_slicer():
        yield from slicer_support.headless_slicer_or_skip()
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

#: Module logics registered by :func:`create_headless_slicer`: Slicer module name -> class name.
#: Optional ones (absent from some slicer-core builds) are skipped when missing.
#: The Colors logic is the application logic's own colour logic (see create_headless_slicer).
MODULE_LOGICS: dict[str, str] = {
    "Volumes": "vtkSlicerVolumesLogic",
    "Segmentations": "vtkSlicerSegmentationsModuleLogic",
    "SubjectHierarchy": "vtkSlicerSubjectHierarchyModuleLogic",
    "Tables": "vtkSlicerTablesLogic",
    "Plots": "vtkSlicerPlotsLogic",
}
REQUIRED_LOGICS = ("Volumes", "Segmentations", "SubjectHierarchy")


def _skip_reason() -> str | None:
    try:
        slicer = importlib.import_module("slicer")
    except ImportError as exc:
        return f"slicer-core is not installed ({exc}); pip install slicer-core to run the Slicer logic tests"
    missing = [
        MODULE_LOGICS[name] for name in REQUIRED_LOGICS if not hasattr(slicer, MODULE_LOGICS[name])
    ] + [name for name in ("vtkMRMLScene", "vtkSlicerApplicationLogic") if not hasattr(slicer, name)]
    if missing:
        return f"the installed 'slicer' package lacks {', '.join(missing)} (not the slicer-core wheel?)"
    try:
        importlib.import_module("slicer.util")
    except ImportError as exc:
        return f"slicer.util cannot be imported ({exc})"
    return None


#: Why Slicer tests cannot run here, or None when slicer-core is usable.
SKIP_REASON: str | None = _skip_reason()


@dataclass
class HeadlessSlicer:
    """A scene with the application logic and the module logics, like a Slicer session."""

    scene: Any
    app_logic: Any
    logics: dict[str, Any] = field(default_factory=dict)

    def logic(self, module_name: str) -> Any:
        """A registered module logic by Slicer module name ("Volumes", "Segmentations"...)."""
        try:
            return self.logics[module_name]
        except KeyError:
            raise KeyError(f"no {module_name} logic in this headless scene (have {sorted(self.logics)})") from None

    def load_volume(self, path: str | Path, name: str | None = None, *, labelmap: bool = False) -> Any:
        """Load an image file through the Volumes logic (as File > Add Data does)."""
        path = Path(path)
        if name is None:
            name = path.name.split(".")[0]
        node = self.logic("Volumes").AddArchetypeVolume(str(path), name, 1 if labelmap else 0)
        if node is None:
            raise OSError(f"Slicer's Volumes logic could not load {path}")
        return node

    def make_global(self) -> None:
        """Set ``slicer.mrmlScene`` to this scene, for ``slicer.util`` helpers that use the global scene."""
        import slicer

        slicer.mrmlScene = self.scene

    def close(self) -> None:
        """Clear the scene (nodes and references), as closing the scene in Slicer does."""
        self.scene.Clear(1)


def create_headless_slicer(*, make_global: bool = False) -> HeadlessSlicer:
    """A fresh scene with the application logic and the module logics registered.

    ``make_global``: also set ``slicer.mrmlScene`` (some ``slicer.util`` functions read it);
    module logic under test should rather use ``node.GetScene()``.
    """
    if SKIP_REASON is not None:
        raise RuntimeError(SKIP_REASON)
    import slicer

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    headless = HeadlessSlicer(scene=scene, app_logic=app_logic)
    # The application's colour logic holds the default colour tables; registering it as the Colors
    # module logic lets the Volumes logic assign colours. (vtkSlicerColorLogic would look for colour
    # files in a Slicer installation, which the wheel does not have.)
    app_logic.SetModuleLogic("Colors", app_logic.GetColorLogic())
    headless.logics["Colors"] = app_logic.GetColorLogic()
    for module_name, class_name in MODULE_LOGICS.items():
        logic_class = getattr(slicer, class_name, None)
        if logic_class is None:
            continue
        logic = logic_class()
        logic.SetMRMLApplicationLogic(app_logic)  # before the scene: some logics look for it then
        logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic(module_name, logic)
        headless.logics[module_name] = logic
    if make_global:
        headless.make_global()
    return headless


def headless_slicer_or_skip() -> Iterator[HeadlessSlicer]:
    """For a pytest fixture: a fresh headless scene, cleared after the test; skips the test with
    :data:`SKIP_REASON` where slicer-core cannot be used."""
    import pytest

    if SKIP_REASON is not None:
        pytest.skip(SKIP_REASON)
    app = create_headless_slicer()
    try:
        yield app
    finally:
        app.close()


def matrix_to_numpy(matrix: Any) -> np.ndarray:
    """A ``vtkMatrix4x4`` as a 4x4 numpy array."""
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def ijk_to_ras(volume_node: Any) -> np.ndarray:
    """The IJK-to-RAS matrix of a volume node as a 4x4 numpy array."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix_to_numpy(matrix)
