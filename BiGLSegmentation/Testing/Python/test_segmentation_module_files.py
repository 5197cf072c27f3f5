"""The module's files: listed in CMake, valid Python 3.10-3.12, widget names present in the .ui file.

The module file itself needs the Slicer application (qt, slicer.ScriptedLoadableModule), so it is
checked statically here; its behaviour is covered by its self-test inside Slicer (README.md).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

import module_checks  # Testing/, on sys.path through conftest.py

MODULE_DIR = Path(__file__).resolve().parents[2]
REPO = MODULE_DIR.parent
MODULE_NAME = MODULE_DIR.name
MODULE_FILE = MODULE_DIR / f"{MODULE_NAME}.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / f"{MODULE_NAME}.ui"


def test_every_module_file_is_listed_in_cmake():
    lists = module_checks.check_cmake_lists(MODULE_DIR)
    assert {"Resources/UI/BiGLSegmentation.ui", "Resources/requirements.txt", "Resources/Icons/BiGLSegmentation.png",
            "Resources/SampleData/BiGLPhantom_t2.nii.gz"} <= set(lists["MODULE_PYTHON_RESOURCES"])
    # the core library is copied into the extension's Python folder
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "../bigl/*.py" in text and "Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR" in text


def test_the_file_list_check_notices_a_forgotten_file(tmp_path):
    lists = module_checks.cmake_lists("set(MODULE_NAME Foo)\nset(MODULE_PYTHON_SCRIPTS\n  ${MODULE_NAME}.py\n"
                                      "  # ${MODULE_NAME}Lib/old.py\n  )\n")
    assert lists == {"MODULE_NAME": ["Foo"], "MODULE_PYTHON_SCRIPTS": ["Foo.py"]}
    module = tmp_path / "Foo"
    (module / "FooLib").mkdir(parents=True)
    for name in ("Foo.py", "FooLib/__init__.py", "FooLib/old.py"):
        (module / name).write_text("")
    (module / "CMakeLists.txt").write_text("set(MODULE_NAME Foo)\nset(MODULE_PYTHON_SCRIPTS\n  ${MODULE_NAME}.py\n"
                                           "  ${MODULE_NAME}Lib/__init__.py\n  # ${MODULE_NAME}Lib/old.py\n  )\n")
    with pytest.raises(AssertionError, match="FooLib/old.py"):
        module_checks.check_cmake_lists(module)


@pytest.mark.parametrize("path", module_checks.python_files(MODULE_DIR), ids=lambda path: path.relative_to(MODULE_DIR).as_posix())
def test_module_python_parses_as_python_3_10(path):
    module_checks.check_python_3_10(path)


def test_the_python_check_notices_3_11_syntax_and_missing_future_import(tmp_path):
    newer = tmp_path / "newer.py"
    newer.write_text("from __future__ import annotations\ntry:\n    pass\nexcept* ValueError:\n    pass\n")
    with pytest.raises(SyntaxError):
        module_checks.check_python_3_10(newer)
    hinted = tmp_path / "hinted.py"
    hinted.write_text("def f(x: int | None) -> None:\n    pass\n")
    with pytest.raises(AssertionError, match="__future__"):
        module_checks.check_python_3_10(hinted)


@pytest.mark.parametrize("path", sorted((MODULE_DIR / f"{MODULE_NAME}Lib").glob("*.py")), ids=lambda path: path.name)
def test_library_needs_neither_qt_nor_the_slicer_application(path):
    module_checks.check_library_needs_no_application(path)


def test_the_ui_form_has_every_widget_the_code_uses_and_no_unused_control():
    module_checks.check_ui_form(MODULE_DIR)


def test_the_ui_check_notices_a_missing_and_an_unused_widget(tmp_path):
    module = tmp_path / "Foo"
    (module / "Resources" / "UI").mkdir(parents=True)
    form = ('<ui version="4.0"><class>Foo</class><widget class="qMRMLWidget" name="Foo">'
            '<widget class="QPushButton" name="applyButton"/>{}</widget><customwidgets><customwidget>'
            '<class>qMRMLWidget</class></customwidget></customwidgets></ui>')
    (module / "Resources" / "UI" / "Foo.ui").write_text(form.format(""))
    (module / "Foo.py").write_text("self.ui.applyButton.enabled = True\nself.ui.cancelButton.enabled = False\n")
    with pytest.raises(AssertionError, match="cancelButton"):
        module_checks.check_ui_form(module)
    (module / "Resources" / "UI" / "Foo.ui").write_text(
        form.format('<widget class="QPushButton" name="cancelButton"/><widget class="QCheckBox" name="forgotten"/>'))
    with pytest.raises(AssertionError, match="forgotten"):
        module_checks.check_ui_form(module)


def test_ui_parameter_names_match_the_parameter_node():
    tree = ast.parse(MODULE_FILE.read_text())
    fields = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name.endswith("ParameterNode"):
            fields |= {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    assert {"inputVolume", "device", "modelPath"} <= fields
    bound = module_checks.parameter_bindings(module_checks.ui_widgets(UI_FILE))
    assert bound, "no widget is bound to the parameter node"
    assert set(bound.values()) <= fields, f"unknown parameter names in the .ui file: {set(bound.values()) - fields}"
    assert len(set(bound.values())) == len(bound), "two widgets bound to one parameter"


def test_icons_exist_with_the_sizes_slicer_expects():
    assert module_checks.png_size(REPO / "Resources" / "BiGL.png") == (128, 128)
    assert module_checks.png_size(MODULE_DIR / "Resources" / "Icons" / f"{MODULE_NAME}.png") == (128, 128)


def test_extension_metadata_is_consistent():
    cmake = (REPO / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({key}\s", cmake), f"top-level CMakeLists.txt lacks {key}"
    # segmentation runs with ONNX Runtime: no dependency on the PyTorch extension (BiGL Training offers it)
    assert re.search(r'set\(EXTENSION_DEPENDS\s+"NA"\)', cmake)
    assert "add_subdirectory(BiGLSegmentation)\nadd_subdirectory(BiGLTraining)" in cmake  # Training depends on it
    for include in ("${Slicer_USE_FILE}", "${Slicer_EXTENSION_GENERATE_CONFIG}", "${Slicer_EXTENSION_CPACK}"):
        assert f"include({include})" in cmake
    entry = json.loads((REPO / "Resources" / "ExtensionIndex" / "BiGL.json").read_text())
    assert set(entry) <= {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision",
                          "scm_type", "scm_url", "tier"}
    assert entry["category"] == re.search(r'set\(EXTENSION_CATEGORY\s+"([^"]+)"\)', cmake).group(1)
    assert entry["build_dependencies"] == []
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


def test_the_shipped_sample_scan_is_the_generated_phantom(tmp_path):
    """The only image file in the repository is a phantom bigl generates (no real scan, nothing cut
    from one): BiGLSegmentation/Testing/make_resources.py writes it again, voxel for voxel."""
    import nibabel as nib
    import numpy as np

    from bigl.testing import load_script

    make_resources = load_script(MODULE_DIR / "Testing" / "make_resources.py")
    regenerated, _, _ = make_resources.make_sample(tmp_path / "BiGLPhantom_t2.nii.gz")
    shipped, made = nib.load(MODULE_DIR / "Resources" / "SampleData" / "BiGLPhantom_t2.nii.gz"), nib.load(regenerated)
    np.testing.assert_array_equal(np.asarray(shipped.dataobj), np.asarray(made.dataobj))
    np.testing.assert_allclose(shipped.affine, made.affine)
