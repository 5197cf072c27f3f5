"""Settings -> ``bigl train`` / ``bigl evaluate`` argument lists, checked against the real config loader."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from BiGLTrainingLib.command import (
    CONFIG_KEYS,
    DEVICE_CHOICES,
    GUI_OVERRIDES,
    MODALITY_CHOICES,
    TRANSLATOR_MODE_CHOICES,
    TrainingSettings,
    evaluate_command,
    format_override,
    train_command,
)
from bigl.errors import ConfigError
from bigl.runfolder import TRANSLATOR_MODES
from bigl.training.config import load_config, parse_override

ODD = "out dir/\u00fc & $x 'q' \"d\" ;|*`true`"


def overrides_of(command: list[str]) -> list[str]:
    return [arg for arg in command if "=" in arg and not arg.startswith("--")]


def test_form_choices_match_the_core():
    from bigl.data.brats import MODALITIES

    assert MODALITY_CHOICES == MODALITIES == ("t1", "t1ce", "t2", "flair")
    assert TRANSLATOR_MODE_CHOICES == TRANSLATOR_MODES
    assert DEVICE_CHOICES == ("auto", "cpu", "cuda")


def test_every_settings_field_maps_to_a_real_config_key():
    config = load_config("cpu")
    for name, key in CONFIG_KEYS.items():
        section, _, leaf = key.partition(".")
        assert leaf in config[section], f"{name} -> {key} is not a config key"


@pytest.mark.parametrize("value", [ODD, "123", "true", "null", "[1, 2]", "-x", "C:\\Users\\A B\\data"])
def test_string_values_stay_strings(value):
    key, parsed = parse_override(format_override("data.source_dir", value))
    assert (key, parsed) == ("data.source_dir", value)


def test_overrides_reach_the_resolved_config(tmp_path):
    settings = TrainingSettings(
        output_dir=str(tmp_path / ODD), preset="cpu", source_dir=str(tmp_path / ODD / "src"), source_modality="t1",
        target_dir=str(tmp_path / "tgt 2"), target_modality="flair", adapt_iterations=7, lr=0.01, lambda_gtl=0.3,
        attention_alignment=False, translator_mode="unpaired", exclude=["Case 1", "Case_2"], device="cpu",
    )  # fmt: skip
    config = settings.resolve_config()
    assert config["data"]["source_dir"] == str(tmp_path / ODD / "src")
    assert config["data"]["target_dir"] == str(tmp_path / "tgt 2")
    assert config["data"]["target_modality"] == "flair"
    assert config["data"]["exclude"] == ["Case 1", "Case_2"]
    assert config["adapt"]["iterations"] == 7 and config["adapt"]["lr"] == 0.01
    assert config["adapt"]["lambda_gtl"] == 0.3 and config["adapt"]["attention"] is False
    assert config["translator_training"]["mode"] == "unpaired"
    assert config["run"]["progress"] is False  # the module follows the event log instead


def test_only_changed_values_are_passed_when_the_preset_is_known():
    preset = load_config("cpu")
    shown = TrainingSettings.from_config(preset, output_dir="/runs/a")  # the form filled from the preset
    assert shown.overrides(preset) == []
    shown.adapt_iterations = preset["adapt"]["iterations"] + 1
    shown.lambda_out = 0.5
    assert shown.overrides(preset) == [f"adapt.iterations={preset['adapt']['iterations'] + 1}", "adapt.lambda_out=0.5"]
    assert len(shown.overrides()) > 10  # without the preset, every set field is passed


def test_iterations_replace_the_epochs_of_a_preset():
    paper = load_config("paper")
    assert paper["adapt"]["epochs"] is not None  # the paper preset counts epochs
    settings = TrainingSettings.from_config(paper, output_dir="/runs/a")
    settings.adapt_iterations = 500
    overrides = settings.overrides(paper)
    assert overrides == ["adapt.iterations=500", "adapt.epochs=null"]
    config = load_config("paper", overrides)
    assert config["adapt"]["epochs"] is None and config["adapt"]["iterations"] == 500


def test_unknown_extra_override_is_a_config_error():
    settings = TrainingSettings(output_dir="/x", preset="cpu", extra_overrides=["adapt.lamda_gtl=1"])
    with pytest.raises(ConfigError) as info:
        settings.resolve_config()
    assert "adapt.lambda_gtl" in info.value.hint  # the loader suggests the right key


def test_train_command_single_and_multi_gpu(tmp_path):
    settings = TrainingSettings(output_dir=str(tmp_path / ODD), preset="paper", adapt_batch_size=16, gpus=1)
    command = train_command(settings, python="/opt/py")
    assert command[:4] == ["/opt/py", "-m", "bigl", "train"]
    assert command[command.index("--config") + 1] == "paper"
    assert command[command.index("--out") + 1] == str(tmp_path / ODD)
    assert "--resume" not in command
    assert "adapt.batch_size=16" in command and list(GUI_OVERRIDES)[0] in command

    settings.gpus = 4
    multi = train_command(settings, python="/opt/py")
    assert multi[:6] == ["/opt/py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m"]
    assert multi[6:] == command[2:]  # the same bigl arguments under torchrun


def test_custom_preset_uses_the_config_file(tmp_path):
    config_file = tmp_path / "my config.json"
    config_file.write_text(json.dumps({"adapt": {"iterations": 3}}))
    settings = TrainingSettings(output_dir=str(tmp_path / "run"), preset="custom", custom_config=str(config_file))
    command = train_command(settings, python="py")
    assert command[command.index("--config") + 1] == str(config_file)
    assert settings.resolve_config()["adapt"]["iterations"] == 3
    with pytest.raises(ValueError):
        TrainingSettings(output_dir="x", preset="fast").config_source
    with pytest.raises(ConfigError, match="no config file"):
        TrainingSettings(output_dir="x", preset="custom").resolve_config()


def test_resume_command_reads_the_runs_own_config(tmp_path):
    settings = TrainingSettings(output_dir=str(tmp_path / "run"), preset="cpu", lr=0.5, device="cuda")
    command = train_command(settings, python="py", resume=True)
    assert command[command.index("--config") + 1] == str(tmp_path / "run" / "config.json")
    assert "--resume" in command
    assert overrides_of(command) == ['run.device="cuda"', *GUI_OVERRIDES]  # the form's lr is not applied


def test_evaluate_command(tmp_path):
    command = evaluate_command(tmp_path / "m.safetensors", tmp_path / ODD, "t2", tmp_path / "eval", python="py", device="cpu")
    assert command[:4] == ["py", "-m", "bigl", "evaluate"]
    def value(flag):
        return command[command.index(flag) + 1]

    assert value("--data") == str(tmp_path / ODD) and value("--modality") == "t2" and value("--device") == "cpu"
    assert value("--out") == str(tmp_path / "eval") and "--json" in command


def test_the_child_receives_each_argument_verbatim(tmp_path):
    """No shell anywhere: spaces, quotes, $, &, ; and Unicode arrive as given."""
    settings = TrainingSettings(output_dir=str(tmp_path / ODD), preset="cpu", source_dir=ODD, extra_overrides=["run.seed=3"])
    command = train_command(settings, python=sys.executable)
    echo = [sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))"]
    result = subprocess.run(echo + command[1:], capture_output=True, check=True, env={"PYTHONIOENCODING": "utf-8"})
    assert json.loads(result.stdout.decode("utf-8")) == command[1:]


def test_settings_round_trip_through_a_dict():
    settings = TrainingSettings(output_dir="o", preset="paper", lr=0.1, exclude=["a"], extra_overrides=["x.y=1"])
    values = settings.to_dict()
    values["field_from_a_newer_version"] = 1
    assert TrainingSettings.from_dict(json.loads(json.dumps(values))) == settings


# ----------------------------------------------------------------------- several folders


def test_several_folders_become_one_json_list_override(tmp_path):
    from bigl.cli import build_parser
    from bigl.cli.train import _overrides

    source = [str(tmp_path / "brats 18"), str(tmp_path / ODD)]
    settings = TrainingSettings(output_dir=str(tmp_path / "run"), preset="cpu", source_dir=source,
                                target_dir=str(tmp_path / "t2 only"), source_modality="t1", target_modality="t2")  # fmt: skip
    command = train_command(settings, python="py")
    assert f"data.source_dir={json.dumps(source, ensure_ascii=False)}" in command  # one argument, a JSON list
    assert f'data.target_dir="{tmp_path / "t2 only"}"' in command  # one folder stays a plain string
    # what `bigl train` makes of that command line: its own parser, then the config loader
    args = build_parser().parse_args(command[3:])
    config = load_config(args.config, _overrides(args))
    assert config["data"]["source_dir"] == source
    assert config["data"]["target_dir"] == str(tmp_path / "t2 only")
    assert settings.resolve_config()["data"]["source_dir"] == source


@pytest.mark.parametrize(
    "given, kept",
    [
        (["/a", "/b"], ["/a", "/b"]),
        (("/a", "/b"), ["/a", "/b"]),
        (["/a"], "/a"),  # one folder is a plain string, as config files have it
        (["/a", "", "/a", "/b"], ["/a", "/b"]),  # blanks dropped, a folder given twice kept once
        ([], None),
        ("", None),
        ("/a", "/a"),
    ],
)
def test_folder_settings_are_normalised(given, kept):
    settings = TrainingSettings(source_dir=given, target_dir=given)
    assert settings.source_dir == settings.target_dir == kept


def test_folder_lists_round_trip_through_dict_and_config():
    settings = TrainingSettings(output_dir="o", source_dir=["/a b", "/\u00fc"], target_dir="/t")
    saved = json.loads(json.dumps(settings.to_dict()))
    assert saved["source_dir"] == ["/a b", "/\u00fc"]
    assert TrainingSettings.from_dict(saved) == settings
    # settings saved by an earlier version: a plain string per folder
    old = {"output_dir": "o", "preset": "cpu", "source_dir": "/data/brats", "target_dir": "/data/brats"}
    assert TrainingSettings.from_dict(old).source_dir == "/data/brats"

    preset = load_config("cpu", ['data.source_dir=["/a", "/b"]', "data.target_dir=/t"])
    shown = TrainingSettings.from_config(preset, output_dir="o")
    assert (shown.source_dir, shown.target_dir) == (["/a", "/b"], "/t")
    assert shown.overrides(preset) == []  # the same folders as the preset: nothing to pass
    shown.source_dir = ["/a", "/b", "/c"]
    assert shown.overrides(preset) == ['data.source_dir=["/a", "/b", "/c"]']


def test_empty_folder_list_is_refused_by_the_loader_not_sent():
    # the module never sends an empty list (no folder -> no override); the loader refuses one
    assert TrainingSettings(output_dir="o", source_dir=[]).overrides() == []
    with pytest.raises(ConfigError, match="data.source_dir"):
        load_config("cpu", ["data.source_dir=[]"])
