"""Static checks of the module: CMake file lists, Python 3.10 syntax, a Qt-free library, .ui names.

``BiGLTraining.py`` needs the Slicer application (qt, ScriptedLoadableModule) and cannot be
imported here; its widget is checked against the .ui file, and its behaviour inside Slicer by its
self-test (README.md, docs/slicer-training.md).
"""

from __future__ import annotations

import ast
import re
import struct
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2]
MODULE_FILE = MODULE_DIR / "BiGLTraining.py"
LIB_DIR = MODULE_DIR / "BiGLTrainingLib"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "BiGLTraining.ui"
CMAKE_FILE = MODULE_DIR / "CMakeLists.txt"
#: Widget classes that only show or group things: the code need not touch them.
PASSIVE_WIDGETS = {"QLabel", "ctkCollapsibleButton", "ctkCollapsibleGroupBox", "qMRMLWidget"}


def cmake_lists(text: str) -> dict[str, list[str]]:
    """The set(NAME item item ...) lists of a CMake file, ${MODULE_NAME} expanded, comments dropped."""
    text = re.sub(r"#[^\n]*", "", text)
    module_name = re.search(r"set\(MODULE_NAME\s+(\w+)\s*\)", text).group(1)
    return {
        name: [item.replace("${MODULE_NAME}", module_name) for item in body.split()]
        for name, body in re.findall(r"set\(\s*(\w+)\s+([^)]*)\)", text)
    }


def module_files() -> set[str]:
    return {
        path.relative_to(MODULE_DIR).as_posix()
        for path in MODULE_DIR.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".ui", ".png", ".md", ".json", ".txt")
        and path.name != "CMakeLists.txt"
    }


def test_cmake_lists_every_file_and_nothing_else():
    lists = cmake_lists(CMAKE_FILE.read_text())
    listed = {item for name, items in lists.items() if name != "MODULE_NAME" for item in items}
    assert not module_files() - listed, f"add to {CMAKE_FILE}: {sorted(module_files() - listed)}"
    assert not listed - module_files(), f"{CMAKE_FILE} lists missing files: {sorted(listed - module_files())}"
    scripts = set(lists["MODULE_PYTHON_SCRIPTS"])
    assert scripts == {"BiGLTraining.py"} | {f"BiGLTrainingLib/{p.name}" for p in LIB_DIR.glob("*.py")}
    assert set(lists["MODULE_PYTHON_RESOURCES"]) == {
        "Resources/Icons/BiGLTraining.png", "Resources/UI/BiGLTraining.ui", "Resources/requirements.txt"
    }
    text = CMAKE_FILE.read_text()
    assert "slicerMacroBuildScriptedModule(" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_the_list_parser_sees_a_missing_file():
    lists = cmake_lists("set(MODULE_NAME M)\nset(MODULE_PYTHON_SCRIPTS\n  ${MODULE_NAME}.py\n  # ${MODULE_NAME}Lib/a.py\n  )\n")
    assert lists["MODULE_PYTHON_SCRIPTS"] == ["M.py"]


def python_files() -> list[Path]:
    return sorted(p for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", python_files(), ids=lambda p: p.relative_to(MODULE_DIR).as_posix())
def test_python_3_10_syntax(path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 10))
    compile(tree, str(path), "exec")
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert "tomllib" not in imported  # Python 3.11+ only
    code = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    if not code:  # a docstring-only package file
        return
    future = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
    assert any(a.name == "annotations" for n in future for a in n.names), f"{path.name}: add from __future__ import annotations"


@pytest.mark.parametrize("path", sorted(LIB_DIR.glob("*.py")), ids=lambda p: p.name)
def test_library_needs_neither_qt_nor_the_slicer_application(path):
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {"qt", "ctk", "slicer", "slicer.util", "slicer.ScriptedLoadableModule"} & imported
    assert "slicer.app" not in source


def ui_widgets() -> dict[str, str]:
    root = ElementTree.parse(UI_FILE).getroot()
    return {widget.get("name"): widget.get("class") for widget in root.iter("widget")}


def test_every_ui_name_the_module_uses_exists_and_every_control_is_used():
    source = MODULE_FILE.read_text(encoding="utf-8")
    used = set(re.findall(r"\bui\.(\w+)", source))
    widgets = ui_widgets()
    assert len(used) > 30
    assert not used - set(widgets), f"{UI_FILE.name} lacks: {sorted(used - set(widgets))}"
    controls = {name for name, cls in widgets.items() if cls not in PASSIVE_WIDGETS}
    assert not controls - used, f"widgets in the .ui file the module never uses: {sorted(controls - used)}"


def test_ui_is_a_designer_form_with_declared_custom_widgets():
    root = ElementTree.parse(UI_FILE).getroot()
    assert root.tag == "ui" and root.find("class").text == "BiGLTraining"
    top = root.find("widget")
    assert (top.get("class"), top.get("name")) == ("qMRMLWidget", "BiGLTraining")
    declared = {c.find("class").text for c in root.iter("customwidget")}
    custom = {cls for cls in ui_widgets().values() if cls.startswith(("ctk", "qMRML", "qSlicer"))}
    assert custom <= declared, f"declare: {custom - declared}"
    names = [widget.get("name") for widget in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"


def test_module_file_defines_what_slicer_looks_for():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {"BiGLTraining", "BiGLTrainingWidget", "BiGLTrainingTest"} <= set(classes)
    test_methods = {n.name for n in classes["BiGLTrainingTest"].body if isinstance(n, ast.FunctionDef)}
    assert {"setUp", "runTest"} <= test_methods and any(name.startswith("test_") for name in test_methods)
    widget_methods = {n.name for n in classes["BiGLTrainingWidget"].body if isinstance(n, ast.FunctionDef)}
    # closing Slicer or the scene while training runs is handled
    assert {"setup", "cleanup", "onAboutToQuit", "onSceneStartClose", "onSceneEndClose", "confirmStopForQuit"} <= widget_methods


def test_training_requirements_parse_and_add_matplotlib():
    """The trainer and `bigl evaluate` draw figures: matplotlib, which Slicer does not ship."""
    from BiGLSegmentationLib.dependencies import read_requirements

    names = {requirement.name for requirement in read_requirements(MODULE_DIR / "Resources" / "requirements.txt")}
    assert names == {"matplotlib"}


def test_icon_is_a_128_px_png():
    header = (MODULE_DIR / "Resources" / "Icons" / "BiGLTraining.png").read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (128, 128)
