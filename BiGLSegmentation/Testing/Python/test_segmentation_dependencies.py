"""Dependencies: which packages are missing, never touching Slicer's own, nothing installed in testing."""

from __future__ import annotations

import sys
import types

import pytest
from packaging.requirements import Requirement

from BiGLSegmentationLib import dependencies
from BiGLSegmentationLib.dependencies import (
    REQUIREMENTS_PATH,
    missing_requirements,
    parse_requirements,
    read_requirements,
    restart_needed,
)


def test_shipped_requirements_list_the_core_packages_and_nothing_slicer_provides():
    names = {requirement.name.lower() for requirement in read_requirements(REQUIREMENTS_PATH)}
    # segmentation: ONNX Runtime, no PyTorch and nothing only training needs
    assert names == {"nibabel", "scikit-image", "tqdm", "onnxruntime"}
    training = {requirement.name.lower() for requirement in read_requirements(dependencies.TRAINING_REQUIREMENTS_PATH)}
    assert training == {"safetensors", "matplotlib", "onnx"}
    for path in (REQUIREMENTS_PATH, dependencies.TRAINING_REQUIREMENTS_PATH):
        text = path.read_text().lower()
        lines = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
        assert "simpleitk" not in lines and "torch" not in lines


def test_parse_skips_comments_options_and_packages_slicer_provides():
    requirements = parse_requirements(
        """
        # a comment
        nibabel>=5.0  # trailing comment
        --index-url https://example.org/simple
        -r other.txt
        SimpleITK>=2.0
        torch
        numpy<3
        tqdm
        """.replace("        ", "")
    )
    assert [str(requirement) for requirement in requirements] == ["nibabel>=5.0", "tqdm"]


def test_parse_names_the_bad_line():
    with pytest.raises(ValueError, match="line 2"):
        parse_requirements("nibabel\nthis is not a requirement!\n", source="requirements.txt")


def test_missing_requirements_compare_installed_versions():
    installed = {"nibabel": "5.2.0", "tqdm": "4.40.0", "safetensors": None}
    requirements = [Requirement(text) for text in ("nibabel>=5.0", "tqdm>=4.60", "safetensors>=0.4", "scikit-image")]
    missing = missing_requirements(requirements, version_of=lambda name: installed.get(name))
    assert [requirement.name for requirement in missing] == ["tqdm", "safetensors", "scikit-image"]


def test_requirements_for_other_platforms_are_not_missing():
    other = "win32" if sys.platform != "win32" else "linux"
    requirements = [Requirement(f"pywin-thing; sys_platform == '{other}'")]
    assert missing_requirements(requirements, version_of=lambda name: None) == []


def test_the_installed_environment_satisfies_the_requirements():
    assert missing_requirements(read_requirements()) == []
    assert missing_requirements(read_requirements(dependencies.TRAINING_REQUIREMENTS_PATH)) == []


def test_restart_is_needed_only_for_packages_already_imported():
    installed = [Requirement("scikit-image>=0.21"), Requirement("tqdm"), Requirement("nibabel")]
    assert restart_needed(installed, loaded_modules={"skimage", "os"}) == ["scikit-image"]
    assert restart_needed(installed, loaded_modules={"json"}) == []


@pytest.fixture
def requirements(tmp_path):
    """A requirements file with one installed package and one that is not."""
    path = tmp_path / "requirements.txt"
    path.write_text("nibabel\nsurely-not-installed-bigl-package>=1\n")
    return path


def test_testing_mode_installs_nothing_and_reports_what_is_missing(requirements, monkeypatch):
    monkeypatch.setattr(dependencies, "torch_installed", lambda: False)
    monkeypatch.setattr(dependencies, "_install_torch", lambda backend: pytest.fail("tried to install torch"))
    asked = []
    report = dependencies.ensure_dependencies(
        confirm=lambda question: asked.append(question) or True, requirements_path=requirements, testing=True,
        training=True,
    )
    assert not report.ready
    assert report.missing == ["torch", "surely-not-installed-bigl-package>=1"]
    assert report.installed == [] and asked == []


def test_segmentation_never_asks_for_torch(requirements, monkeypatch):
    """Not in testing mode, where the installers would really run: torch is never installed nor
    asked for, the other packages are."""
    installed = []
    fake_slicer = types.ModuleType("slicer")
    fake_slicer.util = types.SimpleNamespace(pip_install=lambda names: installed.extend(names))
    monkeypatch.setitem(sys.modules, "slicer", fake_slicer)
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # "import slicer.packaging" fails
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)
    monkeypatch.setattr(dependencies, "torch_installed", lambda: False)
    monkeypatch.setattr(dependencies, "_install_torch", lambda *args, **kwargs: pytest.fail("tried to install torch"))
    questions = []
    report = dependencies.ensure_dependencies(confirm=lambda question: questions.append(question) or True,
                                              requirements_path=requirements, testing=False)
    assert installed == ["surely-not-installed-bigl-package>=1"] and report.ready
    assert len(questions) == 1 and "torch" not in questions[0].lower()


def test_onnxruntime_gpu_satisfies_onnxruntime(monkeypatch):
    """An installed onnxruntime-gpu is never replaced by the CPU wheel."""
    versions = {"onnxruntime-gpu": "1.20.1", "nibabel": "5.2.0"}

    def version(name):
        if name not in versions:
            raise dependencies.importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(dependencies.importlib.metadata, "version", version)
    assert dependencies.installed_version("onnxruntime") == "1.20.1"
    assert missing_requirements([Requirement("onnxruntime>=1.16"), Requirement("nibabel>=5")]) == []
    assert [str(r) for r in missing_requirements([Requirement("onnxruntime>=1.21")])] == ["onnxruntime>=1.21"]
    versions.pop("onnxruntime-gpu")
    assert dependencies.installed_version("onnxruntime") is None


def test_training_offers_the_pytorch_extension_when_it_is_missing(monkeypatch):
    installs, questions = [], []
    manager = types.SimpleNamespace(downloadAndInstallExtensionByName=lambda *args: installs.append(args) or True)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # "import PyTorchUtils" fails
    with pytest.raises(RuntimeError, match="Restart Slicer"):
        dependencies._install_torch(None, confirm=lambda question: questions.append(question) or True,
                                    extensions_manager=manager)
    assert installs == [("PyTorch", True, True)] and "does not need it" in questions[0]
    with pytest.raises(RuntimeError, match="Extensions Manager"):
        dependencies._install_torch(None, confirm=lambda question: False, extensions_manager=manager)
    with pytest.raises(RuntimeError, match="Extensions Manager"):
        dependencies._install_torch(None, confirm=lambda question: True)  # no manager: say what to do
    assert len(installs) == 1


def test_older_slicer_asks_then_installs_with_pip_install(requirements, monkeypatch):
    """Without slicer.packaging: our question, then slicer.util.pip_install with the missing ones only."""
    installed = []
    fake_slicer = types.ModuleType("slicer")
    fake_slicer.util = types.SimpleNamespace(pip_install=lambda names: installed.extend(names))
    monkeypatch.setitem(sys.modules, "slicer", fake_slicer)
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # "import slicer.packaging" fails
    monkeypatch.setattr(dependencies, "torch_installed", lambda: True)

    declined = dependencies.ensure_dependencies(confirm=lambda question: False, requirements_path=requirements)
    assert installed == [] and declined.missing == ["surely-not-installed-bigl-package>=1"]

    questions = []
    report = dependencies.ensure_dependencies(
        confirm=lambda question: questions.append(question) or True, requirements_path=requirements,
        requester="BiGL Training",
    )
    assert installed == ["surely-not-installed-bigl-package>=1"]
    assert report.ready and report.installed == installed
    assert questions[0].startswith("BiGL Training needs") and "surely-not-installed-bigl-package" in questions[0]


def test_slicer_512_uses_pip_ensure(requirements, monkeypatch):
    calls = []
    fake_slicer = types.ModuleType("slicer")
    fake_slicer.packaging = types.SimpleNamespace(pip_ensure=lambda reqs, **options: calls.append((reqs, options)))
    fake_slicer.util = types.SimpleNamespace(pip_install=lambda names: pytest.fail("pip_install used on 5.12+"))
    monkeypatch.setitem(sys.modules, "slicer", fake_slicer)
    monkeypatch.setattr(dependencies, "torch_installed", lambda: True)
    report = dependencies.ensure_dependencies(confirm=lambda question: pytest.fail("asked twice"),
                                              requirements_path=requirements, requester="BiGL Segmentation")
    (reqs, options), = calls
    assert [str(r) for r in reqs] == ["surely-not-installed-bigl-package>=1"]
    assert options["prompt_install"] and options["prompt_restart"]
    assert options["requester"] == "BiGL Segmentation"
    assert report.ready


def test_gpu_status_explains_a_cpu_only_onnx_runtime():
    status = dependencies.gpu_status()
    import onnxruntime
    import torch

    assert status.available == ("CUDAExecutionProvider" in onnxruntime.get_available_providers()
                                or torch.cuda.is_available())
    if not status.available:
        assert "ONNX Runtime" in status.reason and "onnxruntime-gpu" in status.reason
