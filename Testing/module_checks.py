"""Checks and helpers shared by the test suites of the BiGL Slicer modules (BiGLSegmentation, BiGLTraining).

* Static checks of a scripted module folder (``<Module>.py``, ``<Module>Lib/``,
  ``Resources/UI/<Module>.ui``, ``CMakeLists.txt``): every file listed in CMake, Python 3.10
  syntax, a library free of Qt, a Qt Designer form holding every widget name the module file uses.
  The module file needs the Slicer application, so these read the files rather than import them.
* A stand-in process tree, like the one ``torch.distributed.run`` starts, for the tests of process
  termination (``BiGLSegmentationLib.processtree``).

Each ``check_*`` function raises AssertionError naming the problem and the fix. The tests'
``conftest.py`` puts this folder on ``sys.path``.
"""

from __future__ import annotations

import ast
import json
import re
import struct
import sys
import textwrap
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Iterable

#: Files of these kinds in a module folder must be listed in its CMakeLists.txt.
LISTED_SUFFIXES = (".py", ".ui", ".png", ".txt", ".json", ".nii.gz", ".md")
#: What a module's library must not import: it runs on a bare MRML scene, without the application.
APPLICATION_IMPORTS = frozenset({"qt", "ctk", "slicer.ScriptedLoadableModule"})
#: Widget classes that only show or group things: the code need not touch them.
PASSIVE_WIDGETS = frozenset({"QLabel", "ctkCollapsibleButton", "ctkCollapsibleGroupBox", "qMRMLWidget"})


# ------------------------------------------------------------------------------ CMake lists


def cmake_lists(text: str) -> dict[str, list[str]]:
    """The ``set(NAME item item ...)`` lists of a CMake file, comments dropped, ``${VAR}`` of one-value sets expanded."""
    text = re.sub(r"#[^\n]*", "", text)
    lists = {name: body.split() for name, body in re.findall(r"set\(\s*(\w+)\s+([^)]*)\)", text)}
    variables = {name: items[0] for name, items in lists.items() if len(items) == 1}
    expand = lambda item: re.sub(r"\$\{(\w+)\}", lambda match: variables.get(match[1], match[0]), item)  # noqa: E731
    return {name: [expand(item) for item in items] for name, items in lists.items()}


def module_files(module_dir: Path) -> set[str]:
    """The files of a module folder that CMake must list, relative to it."""
    return {
        path.relative_to(module_dir).as_posix()
        for path in module_dir.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.name != "CMakeLists.txt"
        and path.name.endswith(LISTED_SUFFIXES)
    }


def check_cmake_lists(module_dir: Path) -> dict[str, list[str]]:
    """CMakeLists.txt lists every module file and no missing one; the scripts are the module file
    and its library; the module is built and its self-test registered. Returns the lists."""
    name = module_dir.name
    cmake_file = module_dir / "CMakeLists.txt"
    text = cmake_file.read_text()
    lists = cmake_lists(text)
    listed = {item for list_name, items in lists.items() if list_name != "MODULE_NAME" for item in items
              if item.endswith(LISTED_SUFFIXES)}
    files = module_files(module_dir)
    assert not files - listed, f"add these files to {cmake_file}: {sorted(files - listed)}"
    assert not listed - files, f"{cmake_file} lists files that do not exist: {sorted(listed - files)}"
    library = {f"{name}Lib/{path.name}" for path in (module_dir / f"{name}Lib").glob("*.py")}
    assert set(lists["MODULE_PYTHON_SCRIPTS"]) == {f"{name}.py"} | library, \
        f"MODULE_PYTHON_SCRIPTS of {cmake_file} must hold {name}.py and every {name}Lib/*.py file, and nothing else"
    assert "slicerMacroBuildScriptedModule(" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text, f"{cmake_file} does not register the self-test"
    return lists


# ------------------------------------------------------------------------------------ Python


def python_files(module_dir: Path) -> list[Path]:
    return sorted(path for path in module_dir.rglob("*.py") if "__pycache__" not in path.parts)


def _imported_modules(tree: ast.AST) -> set[str]:
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def check_python_3_10(path: Path) -> None:
    """The file parses and compiles as Python 3.10, uses no 3.11+ module, and a file with code
    has ``from __future__ import annotations`` (type hints like ``str | None`` need it on 3.10)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 10))
    compile(tree, str(path), "exec")
    assert "tomllib" not in {name.split(".")[0] for name in _imported_modules(tree)}, \
        f"{path.name}: tomllib is Python 3.11+ only"
    code = [node for node in tree.body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    if not code:  # a docstring-only package file
        return
    future = [node for node in tree.body if isinstance(node, ast.ImportFrom) and node.module == "__future__"]
    assert any(alias.name == "annotations" for node in future for alias in node.names), \
        f"{path.name}: add 'from __future__ import annotations' (type hints must work on Python 3.10)"


def check_library_needs_no_application(path: Path, also_forbidden: frozenset[str] = frozenset()) -> None:
    """A library file imports neither Qt nor the scripted-module classes, and never touches ``slicer.app``."""
    source = path.read_text(encoding="utf-8")
    imported = _imported_modules(ast.parse(source))
    forbidden = sorted((APPLICATION_IMPORTS | also_forbidden) & imported)
    assert not forbidden, f"{path.name} imports {forbidden}: keep that in the module file, the library must run without the application"
    assert "slicer.app" not in source, f"{path.name} uses slicer.app: pass what it needs from the module file instead"


# ------------------------------------------------------------------------------- .ui forms


def ui_widgets(ui_file: Path) -> dict[str, ElementTree.Element]:
    """The widgets of a Qt Designer form by name."""
    return {widget.get("name"): widget for widget in ElementTree.parse(ui_file).getroot().iter("widget")}


def used_ui_names(module_file: Path) -> set[str]:
    """The form widgets the module file uses (``self.ui.name``, ``widget.ui.name``, ``ui.name``)."""
    return set(re.findall(r"\bui\.(\w+)", module_file.read_text(encoding="utf-8")))


def parameter_bindings(widgets: dict[str, ElementTree.Element]) -> dict[str, str]:
    """Widget name -> the parameter-node field it is bound to (``SlicerParameterName`` property)."""
    return {
        name: prop.find("string").text
        for name, widget in widgets.items()
        for prop in widget.findall("property")
        if prop.get("name") == "SlicerParameterName"
    }


def check_ui_form(module_dir: Path, table_names: Iterable[str] = ()) -> dict[str, ElementTree.Element]:
    """``Resources/UI/<Module>.ui`` is a Designer form whose top widget is a qMRMLWidget named after
    the module, with its custom widgets declared and unique names; it holds every name the module
    file uses, and every control is used by the code (by name, or through a table of widget names
    the module reads: ``table_names``) or bound to the parameter node. Returns the widgets."""
    name = module_dir.name
    ui_file = module_dir / "Resources" / "UI" / f"{name}.ui"
    root = ElementTree.parse(ui_file).getroot()
    assert root.tag == "ui" and root.find("class").text == name
    top = root.find("widget")
    assert (top.get("class"), top.get("name")) == ("qMRMLWidget", name)
    declared = {custom.find("class").text for custom in root.iter("customwidget")}
    custom = {widget.get("class") for widget in root.iter("widget") if widget.get("class").startswith(("ctk", "qMRML", "qSlicer"))}
    assert custom <= declared, f"declare these custom widgets in {ui_file.name}: {sorted(custom - declared)}"
    names = [widget.get("name") for widget in root.iter("widget")]
    assert len(names) == len(set(names)), f"{ui_file.name} has duplicate widget names"
    widgets = ui_widgets(ui_file)
    used = used_ui_names(module_dir / f"{name}.py")
    assert used, f"{name}.py uses no widget of its form?"
    used |= set(table_names)
    assert used <= set(widgets), f"{ui_file.name} lacks widgets {name}.py uses: {sorted(used - set(widgets))}"
    controls = {widget_name for widget_name, widget in widgets.items() if widget.get("class") not in PASSIVE_WIDGETS}
    unused = controls - used - set(parameter_bindings(widgets))
    assert not unused, f"widgets in {ui_file.name} that {name}.py never uses: {sorted(unused)}"
    return widgets


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG file, from its header."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


# ----------------------------------------------------------------------- a process tree

#: A stand-in for ``torch.distributed.run``: a parent that starts a worker in a session of its own
#: (as torch's launcher does) and a helper in its own group, then sleeps. Arguments: a file the pids
#: are written to (parent, worker, helper) once both children are ready, and a mode: "obey" (all
#: exit on SIGTERM), "ignore" (none does), "workers" (the parent exits, its children ignore SIGTERM).
TREE_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, time
    pid_file, mode = sys.argv[1], sys.argv[2]
    if mode == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stubborn = mode in ("ignore", "workers")
    sleeper = ("import signal, time\\n"
               + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n" if stubborn else "")
               + "print('ready', flush=True)\\ntime.sleep(120)")
    worker = subprocess.Popen([sys.executable, "-c", sleeper], start_new_session=True, stdout=subprocess.PIPE)
    helper = subprocess.Popen([sys.executable, "-c", sleeper], stdout=subprocess.PIPE)
    for child in (worker, helper):
        child.stdout.readline()  # its signal handling is in place
    with open(pid_file + ".tmp", "w") as f:
        json.dump([os.getpid(), worker.pid, helper.pid], f)
    os.replace(pid_file + ".tmp", pid_file)
    print("tree started", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    time.sleep(120)
    """
)


def tree_command(pid_file: Path, mode: str) -> list[str]:
    """The command line that starts the stand-in tree (see :data:`TREE_SCRIPT`)."""
    return [sys.executable, "-c", TREE_SCRIPT, str(pid_file), mode]


def tree_pids(pid_file: Path, timeout: float = 30.0) -> list[int]:
    """The pids of the stand-in tree (parent, worker, helper), once it has started."""
    deadline = time.monotonic() + timeout
    while not pid_file.exists():
        assert time.monotonic() < deadline, "the process tree did not start"
        time.sleep(0.05)
    return json.loads(pid_file.read_text())


def wait_dead(pids: list[int], seconds: float = 5.0) -> list[int]:
    """The pids still running after up to ``seconds`` (empty once all have ended)."""
    from BiGLSegmentationLib.processtree import pid_alive

    deadline = time.monotonic() + seconds
    while True:
        alive = [pid for pid in pids if pid_alive(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)
