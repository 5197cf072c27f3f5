"""The extension's CMake files, configured against a stand-in for a Slicer build.

The stand-in defines the Slicer macros the extension calls and records their arguments, so the test
checks what a real build would copy and install: every module file exists, and the whole ``bigl``
package (every .py file, the configs, the resources) goes into the Python folder of the extension.
Skipped where CMake or a C++ compiler is missing (``project()`` checks for one).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

STAND_IN_USE_FILE = r"""
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.12/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR ${Slicer_QTSCRIPTEDMODULES_LIB_DIR})
set(BUILD_TESTING ON)
function(_record_files kind name source_dir)
  foreach(item ${ARGN})
    if(NOT EXISTS ${source_dir}/${item})
      message(FATAL_ERROR "${name} lists a missing file: ${source_dir}/${item}")
    endif()
    file(APPEND ${CMAKE_BINARY_DIR}/recorded.txt "${kind} ${name} ${item}\n")
  endforeach()
endfunction()
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  _record_files(module ${MY_NAME} ${CMAKE_CURRENT_SOURCE_DIR} ${MY_SCRIPTS} ${MY_RESOURCES})
endmacro()
macro(ctkMacroCompilePythonScript)
  cmake_parse_arguments(MY "NO_INSTALL_SUBDIR" "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR"
                        "SCRIPTS;RESOURCES" ${ARGN})
  _record_files(python ${MY_TARGET_NAME} ${MY_SOURCE_DIR} ${MY_SCRIPTS} ${MY_RESOURCES})
  file(APPEND ${CMAKE_BINARY_DIR}/recorded.txt "install ${MY_TARGET_NAME} ${MY_INSTALL_DIR}\n")
endmacro()
macro(slicer_add_python_unittest)
  file(APPEND ${CMAKE_BINARY_DIR}/recorded.txt "unittest ${ARGN}\n")
endmacro()
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.skipif(not any(shutil.which(name) for name in ("c++", "g++", "clang++")), reason="no C++ compiler")
def test_extension_configures_and_ships_the_whole_core_library(tmp_path):
    stand_in = tmp_path / "slicer"
    stand_in.mkdir()
    (stand_in / "SlicerConfig.cmake").write_text(
        "set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)\n"
        "set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/Nothing.cmake)\n"
        "set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/Nothing.cmake)\n"
    )
    (stand_in / "UseSlicer.cmake").write_text(STAND_IN_USE_FILE)
    (stand_in / "Nothing.cmake").write_text("")
    build = tmp_path / "build"
    build.mkdir()
    result = subprocess.run(["cmake", f"-DSlicer_DIR={stand_in}", str(REPO)], cwd=build,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    recorded = [line.split(" ", 2) for line in (build / "recorded.txt").read_text().splitlines()]
    files = [line for line in recorded if len(line) == 3]
    core = {item for kind, target, item in files if kind == "python"}
    package = REPO / "bigl"
    expected = {path.relative_to(REPO).as_posix() for path in package.rglob("*.py") if "__pycache__" not in path.parts}
    expected |= {path.relative_to(REPO).as_posix() for path in (package / "configs").glob("*.json")}
    expected |= {path.relative_to(REPO).as_posix() for path in (package / "resources").rglob("*") if path.is_file()}
    assert "bigl/inference.py" in expected and "bigl/cli/segment.py" in expected
    assert core == expected
    assert ["install", "BiGLCoreLibrary", "lib/Slicer-5.12/qt-scripted-modules"] in recorded
    module_files = {item for kind, target, item in files if kind == "module" and target == "BiGLSegmentation"}
    assert {"BiGLSegmentation.py", "BiGLSegmentationLib/processtree.py", "Resources/UI/BiGLSegmentation.ui",
            "Resources/requirements.txt"} <= module_files
    assert ["unittest", "SCRIPT;BiGLSegmentation.py"] in recorded
    training_files = {item for kind, target, item in files if kind == "module" and target == "BiGLTraining"}
    assert {"BiGLTraining.py", "BiGLTrainingLib/logic.py", "Resources/UI/BiGLTraining.ui"} <= training_files
    assert ["unittest", "SCRIPT;BiGLTraining.py"] in recorded
