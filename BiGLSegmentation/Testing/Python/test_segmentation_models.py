"""Models: the default bundle, the user's model folder, importing a bundle from a file."""

from __future__ import annotations

import pickle
import shutil

import pytest
from safetensors.numpy import save_file

import bigl.bundle
from bigl.errors import BundleError
from BiGLSegmentationLib import models
from BiGLSegmentationLib.models import available_models, find_model, import_model


@pytest.fixture
def no_default_model(monkeypatch, tmp_path):
    monkeypatch.setattr(bigl.bundle, "DEFAULT_BUNDLE_PATH", tmp_path / "absent" / "default_model.safetensors")


def test_folder_models_are_listed_by_name_and_invalid_files_skipped(tmp_path, tiny_bundle, no_default_model):
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(tiny_bundle, folder / "b_model.safetensors")
    shutil.copy(tiny_bundle, folder / "a_model.safetensors")
    (folder / "broken.safetensors").write_bytes(b"not a bundle")
    (folder / "notes.txt").write_text("hello")
    choices = available_models(folder)
    assert [choice.name for choice in choices] == ["a_model", "b_model"]
    assert all(choice.modality == "t2" and not choice.is_default for choice in choices)
    assert "segments T2, adapted from T1" in choices[0].label


def test_default_model_comes_first_when_shipped(tmp_path, tiny_bundle, monkeypatch):
    default = tmp_path / "resources" / "default_model.safetensors"
    default.parent.mkdir()
    shutil.copy(tiny_bundle, default)
    monkeypatch.setattr(bigl.bundle, "DEFAULT_BUNDLE_PATH", default)
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(tiny_bundle, folder / "mine.safetensors")
    choices = available_models(folder)
    assert [choice.is_default for choice in choices] == [True, False]
    assert choices[0].name == "Default model"
    assert find_model(choices, "") is choices[0]
    assert find_model(choices, folder / "mine.safetensors") is choices[1]
    assert find_model(choices, tmp_path / "gone.safetensors") is None


def test_missing_folder_and_no_default_give_an_empty_list(tmp_path, no_default_model):
    assert available_models(tmp_path / "does-not-exist") == []
    assert models.default_model() is None


def test_import_copies_a_valid_bundle_once(tmp_path, tiny_bundle, no_default_model):
    source = tmp_path / "download" / "My Model (v2).safetensors"
    source.parent.mkdir()
    shutil.copy(tiny_bundle, source)
    folder = tmp_path / "models"
    imported = import_model(source, folder)
    assert imported.path.parent == folder
    assert imported.path.name == "My_Model_v2.safetensors"
    assert imported.path.read_bytes() == source.read_bytes()
    assert imported.metadata["modality"] == "t2"
    again = import_model(source, folder)  # same file: no second copy
    assert again.path == imported.path
    assert [choice.path for choice in available_models(folder)] == [imported.path]


def test_import_under_a_given_name(tmp_path, tiny_bundle, no_default_model):
    """What BiGL Training does with a finished run: <run>/model.safetensors listed under the run's name."""
    folder = tmp_path / "models"
    run = tmp_path / "runs" / "t1 to t2 & more"
    run.mkdir(parents=True)
    bundle = run / "model.safetensors"
    shutil.copy(tiny_bundle, bundle)
    imported = import_model(bundle, folder, name=run.name)
    assert imported.path == folder / "t1_to_t2_more.safetensors"
    assert imported.path.read_bytes() == bundle.read_bytes()
    assert import_model(bundle, folder, name=run.name).path == imported.path  # no second copy
    assert import_model(bundle, folder).path == folder / "model.safetensors"  # without a name: the file's own
    renamed = import_model(imported.path, folder, name="renamed")  # from the models folder itself
    assert renamed.path == folder / "renamed.safetensors" and imported.path.is_file()
    assert import_model(renamed.path, folder).path == renamed.path  # already listed: left as it is
    assert len(available_models(folder)) == 3


def test_import_keeps_a_different_model_of_the_same_name(tmp_path, tiny_bundle, no_default_model):
    folder = tmp_path / "models"
    first = import_model(tiny_bundle, folder)
    other = tmp_path / "other" / tiny_bundle.name
    other.parent.mkdir()
    metadata = bigl.bundle.read_metadata(tiny_bundle)
    loaded = bigl.bundle.load_bundle(tiny_bundle)
    bigl.bundle.save_bundle(other, segmenter=loaded.segmenter, metadata=dict(metadata, description="another"))
    second = import_model(other, folder)
    assert second.path != first.path and second.path.name.endswith("-2.safetensors")
    assert len(available_models(folder)) == 2


def test_import_refuses_files_that_are_not_bigl_bundles(tmp_path, no_default_model):
    folder = tmp_path / "models"
    foreign = tmp_path / "foreign.safetensors"
    import numpy as np

    save_file({"weight": np.zeros(3, np.float32)}, str(foreign))  # safetensors, but not from BiGL
    pickled = tmp_path / "checkpoint.pth"
    pickled.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    for bad in (foreign, pickled, tmp_path / "missing.safetensors"):
        with pytest.raises(BundleError) as error:
            import_model(bad, folder)
        assert error.value.hint
    assert not folder.exists() or not any(folder.iterdir())


def test_import_copies_the_onnx_export_under_the_new_name(tmp_path, tiny_bundle, no_default_model):
    pytest.importorskip("onnx")
    from bigl import onnxengine
    from bigl.export import export_bundle

    source = tmp_path / "download" / "mine.safetensors"
    source.parent.mkdir()
    source.write_bytes(tiny_bundle.read_bytes())
    export_bundle(source)
    choice = import_model(source, tmp_path / "models", name="Renamed")
    assert choice.path.name == "Renamed.safetensors"
    export = onnxengine.export_path(choice.path)
    assert onnxengine.export_is_current(export, choice.path)
    assert onnxengine.translator_path(export).is_file()
    predictor = onnxengine.OnnxPredictor(export, device="cpu")
    assert predictor.has_translator  # found by its own name, not the one recorded at export


def test_importing_again_after_exporting_copies_the_export(tmp_path, tiny_bundle, no_default_model):
    """docs/slicer.md: a model imported before it had an export gets it by importing it again."""
    pytest.importorskip("onnx")
    from bigl import onnxengine
    from bigl.export import export_bundle

    source = tmp_path / "download" / "mine.safetensors"
    source.parent.mkdir()
    source.write_bytes(tiny_bundle.read_bytes())
    first = import_model(source, tmp_path / "models")
    export = onnxengine.export_path(first.path)
    assert not export.exists()
    export_bundle(source)
    again = import_model(source, tmp_path / "models")
    assert again.path == first.path  # the same copy, not a second one
    assert onnxengine.export_is_current(export, again.path)
    assert onnxengine.translator_path(export).is_file()
