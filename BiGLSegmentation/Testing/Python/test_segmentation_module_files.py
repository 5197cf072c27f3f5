"""The module's files: listed in CMake, valid Python 3.10-3.12, widget names present in the .ui file.

The module file itself needs the Slicer application (qt, slicer.ScriptedLoadableModule), so it is
checked statically here; its behaviour is covered by its self-test inside Slicer (README.md).
"""

from __future__ import annotations

import ast
import json
import re
import struct
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2]
REPO = MODULE_DIR.parent
MODULE_NAME = MODULE_DIR.name
MODULE_FILE = MODULE_DIR / f"{MODULE_NAME}.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / f"{MODULE_NAME}.ui"
CHECKED_SUFFIXES = (".py", ".ui", ".png", ".txt", ".json", ".nii.gz", ".md")


def cmake_listed_files(cmake_file: Path) -> set[str]:
    """Paths named in the set(...) lists of a module CMakeLists.txt, variables expanded."""
    text = re.sub(r"#[^\n]*", "", cmake_file.read_text())
    variables = {name: value for name, value in re.findall(r"set\(\s*(\w+)\s+([^\s)]+)\s*\)", text)}
    listed = set()
    for name, body in re.findall(r"set\(\s*(\w+)\s+((?:[^()]|\n)*?)\)", text):
        for item in body.split():
            item = re.sub(r"\$\{(\w+)\}", lambda match: variables.get(match.group(1), match.group(0)), item)
            if not item.startswith("$"):
                listed.add(item)
    return listed


def module_files() -> set[str]:
    found = set()
    for path in MODULE_DIR.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.name != "CMakeLists.txt":
            if str(path).endswith(CHECKED_SUFFIXES):
                found.add(path.relative_to(MODULE_DIR).as_posix())
    return found


def test_every_module_file_is_listed_in_cmake():
    listed = cmake_listed_files(MODULE_DIR / "CMakeLists.txt")
    missing = sorted(module_files() - listed)
    assert not missing, f"add these files to {MODULE_NAME}/CMakeLists.txt: {missing}"
    stale = sorted(item for item in listed if item.endswith(CHECKED_SUFFIXES) and not (MODULE_DIR / item).is_file())
    assert not stale, f"CMakeLists.txt lists files that do not exist: {stale}"


def test_the_file_list_check_notices_a_forgotten_file(tmp_path):
    cmake = tmp_path / "CMakeLists.txt"
    cmake.write_text("set(MODULE_NAME Foo)\nset(MODULE_PYTHON_SCRIPTS\n  ${MODULE_NAME}.py\n  # Lib/old.py\n  )\n")
    assert cmake_listed_files(cmake) == {"Foo", "Foo.py"}


def test_scripts_and_resources_lists_hold_what_slicer_must_install():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", text, re.S).group(1).split()
    resources = re.search(r"set\(MODULE_PYTHON_RESOURCES(.*?)\)", text, re.S).group(1).split()
    lib = {f"${{MODULE_NAME}}Lib/{path.name}" for path in (MODULE_DIR / f"{MODULE_NAME}Lib").glob("*.py")}
    assert "${MODULE_NAME}.py" in scripts and lib <= set(scripts)
    assert {"Resources/UI/${MODULE_NAME}.ui", "Resources/requirements.txt",
            "Resources/Icons/${MODULE_NAME}.png", "Resources/SampleData/BiGLPhantom_t2.nii.gz"} <= set(resources)
    assert "slicerMacroBuildScriptedModule" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    # the core library is copied into the extension's Python folder
    assert "../bigl/*.py" in text and "Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR" in text


def python_files() -> list[Path]:
    return sorted(path for path in MODULE_DIR.rglob("*.py") if "__pycache__" not in path.parts)


@pytest.mark.parametrize("path", python_files(), ids=lambda path: path.relative_to(MODULE_DIR).as_posix())
def test_module_python_parses_as_python_3_10(path):
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path), feature_version=(3, 10))
    compile(tree, str(path), "exec")
    annotated = any(isinstance(node, (ast.AnnAssign, ast.arg)) and node.annotation is not None
                    or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None
                    for node in ast.walk(tree))
    if not annotated:
        return
    future = [node for node in tree.body if isinstance(node, ast.ImportFrom) and node.module == "__future__"]
    assert any(alias.name == "annotations" for node in future for alias in node.names), \
        f"{path.name}: add 'from __future__ import annotations' (type hints must work on Python 3.10)"


def ui_widgets() -> dict[str, ElementTree.Element]:
    root = ElementTree.parse(UI_FILE).getroot()
    return {widget.get("name"): widget for widget in root.iter("widget")}


def used_ui_names() -> set[str]:
    return set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text())) | set(
        re.findall(r"widget\.ui\.(\w+)", MODULE_FILE.read_text())
    )


def test_every_widget_the_code_uses_exists_in_the_ui_file():
    widgets = ui_widgets()
    used = used_ui_names()
    assert used, "the module file uses no self.ui widgets?"
    missing = sorted(used - set(widgets))
    assert not missing, f"{UI_FILE.name} lacks widgets the code uses: {missing}"


def test_ui_parameter_names_match_the_parameter_node():
    tree = ast.parse(MODULE_FILE.read_text())
    fields = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name.endswith("ParameterNode"):
            fields |= {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    assert {"inputVolume", "device", "modelPath"} <= fields
    bound = {}
    for name, widget in ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = prop.find("string").text
    assert bound, "no widget is bound to the parameter node"
    assert set(bound.values()) <= fields, f"unknown parameter names in the .ui file: {set(bound.values()) - fields}"
    assert len(set(bound.values())) == len(bound), "two widgets bound to one parameter"


def test_ui_file_is_a_qt_designer_form_with_declared_custom_widgets():
    root = ElementTree.parse(UI_FILE).getroot()
    assert root.tag == "ui" and root.find("class").text == MODULE_NAME
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == MODULE_NAME
    declared = {custom.find("class").text for custom in root.iter("customwidget")}
    used_classes = {widget.get("class") for widget in root.iter("widget")}
    custom = {name for name in used_classes if name.startswith(("ctk", "qMRML", "qSlicer"))}
    assert custom <= declared, f"declare these custom widgets: {custom - declared}"


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def test_icons_exist_with_the_sizes_slicer_expects():
    assert _png_size(REPO / "Resources" / "BiGL.png") == (128, 128)
    assert _png_size(MODULE_DIR / "Resources" / "Icons" / f"{MODULE_NAME}.png") == (128, 128)


def test_extension_metadata_is_consistent():
    cmake = (REPO / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({key}\s", cmake), f"top-level CMakeLists.txt lacks {key}"
    assert re.search(r'set\(EXTENSION_DEPENDS\s+"PyTorch"\)', cmake)
    assert "add_subdirectory(BiGLSegmentation)" in cmake
    assert "if(EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/BiGLTraining/CMakeLists.txt)" in cmake
    for include in ("${Slicer_USE_FILE}", "${Slicer_EXTENSION_GENERATE_CONFIG}", "${Slicer_EXTENSION_CPACK}"):
        assert f"include({include})" in cmake
    entry = json.loads((REPO / "Resources" / "ExtensionIndex" / "BiGL.json").read_text())
    assert set(entry) <= {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision",
                          "scm_type", "scm_url", "tier"}
    assert entry["category"] == re.search(r'set\(EXTENSION_CATEGORY\s+"([^"]+)"\)', cmake).group(1)
    assert entry["build_dependencies"] == ["PyTorch"]
    repository = re.search(r'set\(BIGL_REPOSITORY_URL\s+"([^"]+)"\)', cmake).group(1)
    assert entry["scm_url"].removesuffix(".git") == repository
    for url_key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        relative = re.search(rf'set\({url_key}\s+"\$\{{BIGL_RAW_URL\}}/([^"]+)"\)', cmake).group(1)
        assert (REPO / relative).is_file(), f"{url_key} points to a file that is not in the repository: {relative}"


@pytest.fixture
def module_with_stubbed_qt(monkeypatch):
    """The module file imported with stand-ins for qt and ScriptedLoadableModule (absent without the app)."""
    import importlib
    import sys
    import types

    import slicer_support

    if slicer_support.SKIP_REASON is not None:
        pytest.skip(slicer_support.SKIP_REASON)
    import slicer

    class Settings:
        values: dict = {}

        def value(self, key):
            return self.values.get(key)

        def setValue(self, key, value):
            self.values[key] = value

    qt = types.ModuleType("qt")
    qt.QSettings = Settings
    qt.QTimer = type("QTimer", (), {})
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (), {"__init__": lambda self, *args: None}))

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.parameterNode = slicer.vtkMRMLScriptedModuleNode()

        def getParameterNode(self):
            return self.parameterNode

    scripted.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", scripted)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(slicerUserSettingsFilePath="/home/u/.config/slicer.org/Slicer.ini"),
                        raising=False)
    monkeypatch.syspath_prepend(str(MODULE_DIR))
    sys.modules.pop(MODULE_NAME, None)
    module = importlib.import_module(MODULE_NAME)
    yield module
    sys.modules.pop(MODULE_NAME, None)


def test_module_file_imports_and_its_logic_works_without_the_widget(module_with_stubbed_qt, tmp_path, tiny_bundle):
    import shutil

    module = module_with_stubbed_qt
    assert module.modelsFolder() == Path("/home/u/.config/slicer.org/BiGL/models")
    module.qt.QSettings().setValue(module.MODELS_FOLDER_SETTING, str(tmp_path / "mine"))
    try:
        assert module.modelsFolder() == tmp_path / "mine"
    finally:
        module.qt.QSettings.values.clear()
    shutil.copy(tiny_bundle, tmp_path / "my_model.safetensors")
    logic = module.BiGLSegmentationLogic(models_folder=tmp_path)
    assert logic.models_folder == tmp_path
    assert any(choice.path == tmp_path / "my_model.safetensors" for choice in logic.models())
    assert logic.getParameterNode() is not None


def test_sample_data_points_at_the_shipped_phantom_with_its_checksum(module_with_stubbed_qt, monkeypatch):
    import hashlib
    import sys
    import types
    from urllib.parse import unquote, urlparse
    from urllib.request import url2pathname

    registered = []
    sample_data = types.ModuleType("SampleData")
    sample_data.SampleDataLogic = types.SimpleNamespace(
        registerCustomSampleDataSource=lambda **source: registered.append(source))
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)
    module_with_stubbed_qt.registerSampleData()
    (source,) = registered
    path = Path(url2pathname(unquote(urlparse(source["uris"]).path)))
    assert path == module_with_stubbed_qt.SAMPLE_PATH and path.is_file()
    assert path.stat().st_size < 300 * 1024
    assert source["checksums"] == "SHA256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert source["nodeNames"] == "BiGLPhantom_t2" and source["fileNames"].endswith(".nii.gz")
    assert Path(source["thumbnailFileName"]).is_file()
