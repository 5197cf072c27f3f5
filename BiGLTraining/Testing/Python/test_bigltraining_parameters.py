"""The training form in the scene's parameter node (real MRML scenes from slicer-core)."""

from __future__ import annotations

from BiGLTrainingLib.command import TrainingSettings
from BiGLTrainingLib.logic import TrainingLogic
from BiGLTrainingLib.parameters import (
    MODULE_NAME,
    NODE_CLASS,
    form_from_values,
    parameter_node,
    store_form,
    stored_form,
)


def _settings(**changes) -> TrainingSettings:
    values = dict(
        output_dir="/runs/t2", preset="reference", source_dir=["/data/brats18", "/data/brats21"],
        source_modality="t1", target_dir="/data/brats18", target_modality="t2", exclude=["Brats18_2013_2_1"],
        image_size=96, translator_lr=2e-4, adapt_iterations=1500, lambda_gtl=0.1, attention_alignment=False,
        device="cpu", seed=3, gpus=2, evaluation_dir="/data/eval", extra_overrides=["data.augment_invert=0.5"],
    )
    return TrainingSettings(**{**values, **changes})


def _nodes(scene) -> int:
    return scene.GetNodesByClass(NODE_CLASS).GetNumberOfItems()


def test_form_round_trip_through_the_parameter_node(headless_slicer):
    scene = headless_slicer.scene
    assert stored_form(scene) is None
    settings = _settings()
    node = store_form(scene, settings, "/data/eval")
    assert node.GetSingletonTag() == MODULE_NAME and node.GetAttribute("ModuleName") == MODULE_NAME
    assert node.GetParameter("adapt_iterations") == "1500"
    restored, evaluation = stored_form(scene)
    assert restored == settings
    assert evaluation == "/data/eval"


def test_one_node_per_scene_and_the_last_form_wins(headless_slicer):
    scene = headless_slicer.scene
    store_form(scene, _settings())
    store_form(scene, _settings(adapt_iterations=None, source_dir="/other", extra_overrides=[]))
    assert _nodes(scene) == 1
    restored, _ = stored_form(scene)
    assert restored.adapt_iterations is None  # a field cleared in the form is cleared in the node
    assert restored.source_dir == "/other" and restored.extra_overrides == []


def test_a_saved_scene_brings_the_form_back(headless_slicer, tmp_path):
    import slicer

    settings = _settings()
    store_form(headless_slicer.scene, settings, "/data/eval")
    path = tmp_path / "scene.mrml"
    headless_slicer.scene.SetURL(str(path))
    assert headless_slicer.scene.Commit()
    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(path))
    loaded.Import()
    assert stored_form(loaded) == (settings, "/data/eval")
    assert _nodes(loaded) == 1
    parameter_node(loaded)  # found again, not created twice
    assert _nodes(loaded) == 1


def test_damaged_parameters_fall_back_to_the_field_defaults(headless_slicer):
    scene = headless_slicer.scene
    node = store_form(scene, _settings())
    node.SetParameter("adapt_iterations", "fifteen hundred")  # not JSON
    node.SetParameter("gpus", '"two"')  # JSON of the wrong kind
    node.SetParameter("extra_overrides", '{"a": 1}')
    restored, _ = stored_form(scene)
    assert restored.adapt_iterations is None and restored.gpus == 1 and restored.extra_overrides == []
    assert restored.source_dir == ["/data/brats18", "/data/brats21"] and restored.seed == 3


def test_values_of_the_wrong_type_for_optional_fields_fall_back_too(headless_slicer):
    scene = headless_slicer.scene
    node = store_form(scene, _settings())
    wrong = {
        "image_size": '"big"',  # text for a number
        "translator_iterations": "2.5",  # a fraction for a whole number
        "lambda_out": "true",  # true/false for a number
        "exclude": "[1, 2]",  # a list of numbers for a list of case names
        "target_dir": '{"path": "/data"}',  # an object for a folder
        "output_alignment": "1",  # a number for true/false
    }
    for name, text in wrong.items():
        node.SetParameter(name, text)
    node.SetParameter("lr", "1")  # a whole number is a fine learning rate
    node.SetParameter("target_exclude", '["Brats18_2013_2_1"]')
    node.SetParameter("source_dir", '"/data/brats18"')  # one folder or a list: both fit
    restored, _ = stored_form(scene)
    default = TrainingSettings()
    for name in wrong:
        assert getattr(restored, name) == getattr(default, name), name
    assert restored.lr == 1 and restored.target_exclude == ["Brats18_2013_2_1"]
    assert restored.source_dir == "/data/brats18" and restored.seed == 3


def test_a_node_without_form_fields_is_no_form(headless_slicer):
    node = parameter_node(headless_slicer.scene)
    node.SetParameter("unrelated", "1")
    assert stored_form(headless_slicer.scene) is None


def test_the_logic_keeps_the_form_in_its_scene(headless_slicer):
    logic = TrainingLogic(headless_slicer.scene)
    assert logic.saved_form() is None
    logic.save_form(_settings(), "/data/eval")
    assert logic.saved_form() == (_settings(), "/data/eval")
    sceneless = TrainingLogic(None)
    sceneless.save_form(_settings())
    assert sceneless.saved_form() is None


def test_the_form_from_qsettings_values_is_checked_the_same_way():
    values = {**_settings().to_dict(), "evaluation_data": "/data/eval", "image_size": "96", "unknown_key": 1}
    settings, evaluation_data = form_from_values(values)
    assert settings == _settings(image_size=None) and evaluation_data == "/data/eval"
    assert form_from_values(["not", "an", "object"]) == (TrainingSettings(), "")
    assert form_from_values({"evaluation_data": 3}) == (TrainingSettings(), "")
