"""What the module asks for and the ``bigl train`` / ``bigl evaluate`` command lines it becomes.

:class:`TrainingSettings` holds the user's choices. A preset names a ready config (``cpu`` for a
quick try on the CPU, ``paper`` for the paper-scale run on a GPU) or a JSON file (custom); every
field left at ``None`` keeps the preset's value, the others become ``section.key=value``
overrides. Values are written as JSON (strings quoted), so a path is never read as a number or a
boolean and may hold spaces, quotes, ``&``, ``$`` or any Unicode: each override is one element of
the argument list, which is run without a shell.

The data folders (``source_dir``, ``target_dir``) are one folder or a list of folders read as one
data set: one folder is passed as a string (``data.source_dir="/a"``), several as a JSON list
(``data.source_dir=["/a", "/b"]``).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

from bigl.data.naming import MODALITIES
from bigl.runfolder import CONFIG_FILE, DEVICE_CHOICES, TRANSLATOR_MODES
from bigl.runplan import config_value

# bigl.data.naming and bigl.runfolder need the standard library only, so the form is built before
# BiGL's heavier packages are installed.
#: Modalities offered in the form: BiGL's canonical names.
MODALITY_CHOICES = MODALITIES
TRANSLATOR_MODE_CHOICES = TRANSLATOR_MODES
#: Preset id -> (ready config name, label shown in the module). "custom" takes a JSON file.
PRESETS: dict[str, tuple[str | None, str]] = {
    "cpu": ("cpu", "CPU quick try"),
    "reference": ("reference", "Reference model (CPU, about 1 hour)"),
    "paper": ("paper", "Paper scale (GPU)"),
    "custom": (None, "Custom config file"),
}
#: How the form shows a field: a spin box's ``value``, a check box's ``checked``, a combo box's item data.
NUMBER, SWITCH, CHOICE = "number", "switch", "choice"


@dataclass(frozen=True)
class FormField:
    """A settings field: the config key it overrides and, for the form's Parameters section, its
    widget (object name in Resources/UI/BiGLTraining.ui) and how that widget shows it."""

    config_key: str
    widget: str | None = None
    kind: str | None = None


#: Settings field -> config key and widget: the one table that the command line, the preset's
#: values and the module's form (fillForm / formSettings) read.
FIELDS: dict[str, FormField] = {
    "source_dir": FormField("data.source_dir"),
    "source_modality": FormField("data.source_modality"),
    "target_dir": FormField("data.target_dir"),
    "target_modality": FormField("data.target_modality"),
    "exclude": FormField("data.exclude"),
    "target_exclude": FormField("data.target_exclude"),
    "image_size": FormField("preprocessing.image_size", "imageSizeSpinBox", NUMBER),
    "translator_mode": FormField("translator_training.mode", "translatorModeComboBox", CHOICE),
    "translator_iterations": FormField("translator_training.iterations", "translatorIterationsSpinBox", NUMBER),
    "translator_batch_size": FormField("translator_training.batch_size", "translatorBatchSizeSpinBox", NUMBER),
    "translator_lr": FormField("translator_training.lr", "translatorLrSpinBox", NUMBER),
    "method": FormField("adapt.method"),
    "adapt_iterations": FormField("adapt.iterations", "adaptIterationsSpinBox", NUMBER),
    "adapt_batch_size": FormField("adapt.batch_size", "adaptBatchSizeSpinBox", NUMBER),
    "lr": FormField("adapt.lr", "lrSpinBox", NUMBER),
    "discriminator_lr": FormField("adapt.discriminator_lr", "discriminatorLrSpinBox", NUMBER),
    "lambda_out": FormField("adapt.lambda_out", "lambdaOutSpinBox", NUMBER),
    "lambda_gtl": FormField("adapt.lambda_gtl", "lambdaGtlSpinBox", NUMBER),
    "lambda_syn": FormField("adapt.lambda_syn", "lambdaSynSpinBox", NUMBER),
    "output_alignment": FormField("adapt.output", "outputAlignmentCheckBox", SWITCH),
    "feature_alignment": FormField("adapt.feature", "featureAlignmentCheckBox", SWITCH),
    "attention_alignment": FormField("adapt.attention", "attentionAlignmentCheckBox", SWITCH),
    "finetune_translator": FormField("adapt.finetune_translator", "finetuneTranslatorCheckBox", SWITCH),
    "device": FormField("run.device"),
    "seed": FormField("run.seed"),
}
#: Settings field -> the config key it overrides.
CONFIG_KEYS: dict[str, str] = {name: spec.config_key for name, spec in FIELDS.items()}
#: Settings fields shown in the form's Parameters section.
HYPER_PARAMETERS: tuple[str, ...] = tuple(name for name, spec in FIELDS.items() if spec.widget)
#: Settings fields holding data folders: one folder (a string) or a list of folders (one data set).
FOLDER_FIELDS = ("source_dir", "target_dir")
#: An iteration count given here replaces an epoch count the preset may use for that stage.
EPOCH_KEYS = {"translator_iterations": "translator_training.epochs", "adapt_iterations": "adapt.epochs"}
#: Always passed: the module follows the event log, so the console needs no progress bars.
GUI_OVERRIDES = ("run.progress=false",)


@dataclass
class TrainingSettings:
    """The user's choices; ``None`` keeps the preset's value."""

    output_dir: str = ""
    preset: str = "cpu"
    custom_config: str = ""
    #: One folder, or a list of folders read as one data set (see :func:`folder_value`).
    source_dir: str | list[str] | None = None
    source_modality: str | None = None
    target_dir: str | list[str] | None = None
    target_modality: str | None = None
    exclude: list[str] | None = None
    target_exclude: list[str] | None = None
    image_size: int | None = None
    translator_mode: str | None = None
    translator_iterations: int | None = None
    translator_batch_size: int | None = None
    translator_lr: float | None = None
    method: str | None = None
    adapt_iterations: int | None = None
    adapt_batch_size: int | None = None
    lr: float | None = None
    discriminator_lr: float | None = None
    lambda_out: float | None = None
    lambda_gtl: float | None = None
    lambda_syn: float | None = None
    output_alignment: bool | None = None
    feature_alignment: bool | None = None
    attention_alignment: bool | None = None
    finetune_translator: bool | None = None
    device: str | None = None
    seed: int | None = None
    gpus: int = 1
    #: A labelled folder to evaluate the trained model on when training ends (None: no evaluation).
    evaluation_dir: str | None = None
    #: Modality evaluated there (None: the target modality).
    evaluation_modality: str | None = None
    #: More ``section.key=value`` overrides, for keys the module has no field for.
    extra_overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in FOLDER_FIELDS:
            setattr(self, name, folder_value(folder_list(getattr(self, name))))

    # -- conversions -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainingSettings":
        """Settings from a dict (unknown keys ignored: the dict may come from an older version, where
        a data folder was always one string)."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **base: Any) -> "TrainingSettings":
        """Settings whose fields show the values of a resolved config (to fill the form from a preset)."""
        values = {name: config_value(config, key) for name, key in CONFIG_KEYS.items()}
        return cls(**{**base, **values})

    # -- config ----------------------------------------------------------------------------
    @property
    def config_source(self) -> str:
        """What ``bigl train --config`` gets: a ready config name or the custom file."""
        if self.preset == "custom":
            if not str(self.custom_config or "").strip():
                from bigl.errors import ConfigError

                raise ConfigError("no config file chosen for the custom preset", "choose a JSON training config file")
            return self.custom_config
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r} (use one of {', '.join(PRESETS)})")
        return PRESETS[self.preset][0]

    def overrides(self, preset_config: Mapping[str, Any] | None = None) -> list[str]:
        """``key=value`` overrides for the fields that are set.

        With ``preset_config`` (the preset's resolved config), fields equal to the preset's value
        are left out, so that the command line lists only what the user changed.
        """
        result = []
        for name, key in CONFIG_KEYS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if preset_config is not None and config_value(preset_config, key, _MISSING) == value:
                continue
            if isinstance(value, tuple):
                value = list(value)
            result.append(format_override(key, value))
            epochs_key = EPOCH_KEYS.get(name)
            if epochs_key and config_value(preset_config or {}, epochs_key, None) is not None:
                result.append(format_override(epochs_key, None))
        return result + [text.strip() for text in self.extra_overrides if text.strip()]

    def resolve_config(self) -> dict[str, Any]:
        """The config the run will use (``bigl.training.load_config``; ConfigError when invalid)."""
        from bigl.training.config import load_config

        preset = load_config(self.config_source)
        return load_config(self.config_source, self.overrides(preset) + list(GUI_OVERRIDES))


_MISSING = object()


def folder_list(value: str | os.PathLike | Iterable[str | os.PathLike] | None) -> list[str]:
    """A data-folder setting as a list: None -> [], "/a" -> ["/a"], ["/a", "/b"] -> ["/a", "/b"]
    (blank entries dropped, order kept)."""
    if value is None or isinstance(value, (str, os.PathLike)):
        value = [value]
    return [os.fspath(entry) for entry in value if entry is not None and os.fspath(entry).strip()]


def folder_value(folders: str | os.PathLike | Iterable[str | os.PathLike] | None) -> str | list[str] | None:
    """The setting for some folders: None for none, the folder itself (a string, as config files
    have it) for one, the list for several (a folder given twice is kept once)."""
    unique = list(dict.fromkeys(folder_list(folders)))
    if not unique:
        return None
    return unique[0] if len(unique) == 1 else unique


def format_override(key: str, value: Any) -> str:
    """``section.key=<JSON value>``: strings are quoted, so ``"123"`` and ``"true"`` stay strings."""
    return f"{key}={json.dumps(value, ensure_ascii=False)}"


def python_module_command(python: str, module_args: list[str], *, gpus: int = 1) -> list[str]:
    """``python -m <module_args>``, or under ``torch.distributed.run`` with one process per GPU."""
    if gpus > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "-m", *module_args]
    return [python, "-m", *module_args]


def train_command(
    settings: TrainingSettings,
    *,
    python: str | None = None,
    preset_config: Mapping[str, Any] | None = None,
    resume: bool = False,
    stage: str = "all",
) -> list[str]:
    """The argument list that runs (or resumes) the two-stage training into ``settings.output_dir``.

    A resume reads the run's own ``config.json``, so it continues exactly the run that was
    stopped, whatever the form shows now; only the device (a run-control key) follows the form.
    """
    if not settings.output_dir:
        raise ValueError("no output folder")
    out = Path(settings.output_dir).expanduser()
    python = python or sys.executable
    args = ["bigl", "train"]
    if resume:
        args += ["--config", str(out / CONFIG_FILE), "--out", str(out), "--stage", stage, "--resume"]
        if settings.device is not None:
            args.append(format_override("run.device", settings.device))
    else:
        args += ["--config", settings.config_source, "--out", str(out), "--stage", stage]
        args += settings.overrides(preset_config)
    args += list(GUI_OVERRIDES)
    return python_module_command(python, args, gpus=max(1, int(settings.gpus)))


def evaluate_command(
    bundle: str | os.PathLike,
    data_dir: str | os.PathLike,
    modality: str,
    out_dir: str | os.PathLike,
    *,
    python: str | None = None,
    device: str | None = None,
) -> list[str]:
    """``bigl evaluate`` on a labelled folder; the summary lands in ``out_dir/summary.json``."""
    args = ["bigl", "evaluate", "--model", os.fspath(bundle), "--data", os.fspath(data_dir),
            "--modality", modality, "--out", os.fspath(out_dir), "--json"]  # fmt: skip
    if device in DEVICE_CHOICES:
        args += ["--device", device]
    return python_module_command(python or sys.executable, args)
