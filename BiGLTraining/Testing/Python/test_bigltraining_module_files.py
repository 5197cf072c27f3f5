"""Static checks of the module: CMake file lists, Python 3.10 syntax, a Qt-free library, .ui names.

``BiGLTraining.py`` needs the Slicer application (qt, ScriptedLoadableModule) and cannot be
imported here; its widget is checked against the .ui file, and its behaviour inside Slicer by its
self-test (README.md, docs/slicer-training.md). The checks themselves are shared with BiGL
Segmentation (``Testing/module_checks.py``).
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

import module_checks  # Testing/, on sys.path through conftest.py
from BiGLTrainingLib.command import CHOICE, CONFIG_KEYS, FIELDS, HYPER_PARAMETERS, NUMBER, SWITCH, TrainingSettings

MODULE_DIR = Path(__file__).resolve().parents[2]
MODULE_FILE = MODULE_DIR / "BiGLTraining.py"
LIB_DIR = MODULE_DIR / "BiGLTrainingLib"


def test_cmake_lists_every_file_and_nothing_else():
    lists = module_checks.check_cmake_lists(MODULE_DIR)
    # the packages to install are BiGL Segmentation's single requirements list
    assert set(lists["MODULE_PYTHON_RESOURCES"]) == {"Resources/Icons/BiGLTraining.png", "Resources/UI/BiGLTraining.ui"}


@pytest.mark.parametrize("path", module_checks.python_files(MODULE_DIR), ids=lambda p: p.relative_to(MODULE_DIR).as_posix())
def test_python_3_10_syntax(path):
    module_checks.check_python_3_10(path)


@pytest.mark.parametrize("path", sorted(LIB_DIR.glob("*.py")), ids=lambda p: p.name)
def test_library_needs_neither_qt_nor_the_slicer_application(path):
    # stricter than BiGL Segmentation's library: no slicer import at all (MRML nodes come through the scene)
    module_checks.check_library_needs_no_application(path, frozenset({"slicer", "slicer.util"}))


def test_every_ui_name_the_module_uses_exists_and_every_control_is_used():
    widgets = module_checks.check_ui_form(MODULE_DIR, [spec.widget for spec in FIELDS.values() if spec.widget])
    assert not module_checks.parameter_bindings(widgets)  # the form is filled from TrainingSettings by the code
    assert len(module_checks.used_ui_names(MODULE_FILE)) > 30


def test_the_field_table_names_a_widget_of_the_right_kind_for_every_parameter():
    """FIELDS drives fillForm / formSettings: each Parameters field's widget exists in the .ui file,
    is a control of its kind (a whole-number field a QSpinBox, a real one a QDoubleSpinBox), and no
    widget serves two fields."""
    widgets = module_checks.ui_widgets(MODULE_DIR / "Resources" / "UI" / "BiGLTraining.ui")
    types = {f.name: str(f.type) for f in dataclasses.fields(TrainingSettings)}
    shown = {name: spec for name, spec in FIELDS.items() if spec.widget}
    assert tuple(shown) == HYPER_PARAMETERS and len(shown) >= 16
    assert len({spec.widget for spec in shown.values()}) == len(shown)
    for name, spec in shown.items():
        kind = widgets[spec.widget].get("class")
        if spec.kind == NUMBER:
            assert kind == ("QSpinBox" if types[name].startswith("int") else "QDoubleSpinBox"), name
        else:
            assert kind == {SWITCH: "QCheckBox", CHOICE: "QComboBox"}[spec.kind], name
    assert set(FIELDS) <= set(types) and CONFIG_KEYS == {name: spec.config_key for name, spec in FIELDS.items()}


def test_module_file_defines_what_slicer_looks_for():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {"BiGLTraining", "BiGLTrainingWidget", "BiGLTrainingLogic", "BiGLTrainingTest"} <= set(classes)
    # the scripted-module template: the logic is the library's, and the widget and the self-test build it
    assert {base.id for base in classes["BiGLTrainingLogic"].bases} == {"ScriptedLoadableModuleLogic", "TrainingLogic"}
    for owner in ("BiGLTrainingWidget", "BiGLTrainingTest"):
        built = {node.func.id for node in ast.walk(classes[owner]) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
        assert "BiGLTrainingLogic" in built and "TrainingLogic" not in built, owner
    test_methods = {n.name for n in classes["BiGLTrainingTest"].body if isinstance(n, ast.FunctionDef)}
    assert {"setUp", "runTest"} <= test_methods and any(name.startswith("test_") for name in test_methods)
    widget_methods = {n.name for n in classes["BiGLTrainingWidget"].body if isinstance(n, ast.FunctionDef)}
    # closing Slicer or the scene while training runs is handled
    assert {"setup", "cleanup", "onAboutToQuit", "onSceneStartClose", "onSceneEndClose", "confirmStopForQuit"} <= widget_methods


def test_icon_is_a_128_px_png():
    assert module_checks.png_size(MODULE_DIR / "Resources" / "Icons" / "BiGLTraining.png") == (128, 128)


def test_the_models_folder_changes_through_bigl_segmentations_logic():
    """BiGL Training sets the shared models folder with BiGL Segmentation's logic, never through the
    other module's widgets; that logic is the one place that writes the setting."""
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert "BiGLSegmentationLogic().setModelsFolder(path)" in source
    assert not re.search(r"[sS]egmentationWidget(\(\))?\.ui\.", source)
    segmentation = MODULE_DIR.parent / "BiGLSegmentation" / "BiGLSegmentation.py"
    classes = {node.name: node for node in ast.parse(segmentation.read_text(encoding="utf-8")).body if isinstance(node, ast.ClassDef)}
    assert "setModelsFolder" in {node.name for node in classes["BiGLSegmentationLogic"].body if isinstance(node, ast.FunctionDef)}
    for owner in ("BiGLSegmentationWidget", "BiGLTrainingWidget"):
        tree = classes.get(owner) or next(node for node in ast.parse(source).body if getattr(node, "name", "") == owner)
        assert "MODELS_FOLDER_SETTING" not in ast.unparse(tree), owner
