"""Training configuration: defaults, ready configs, overrides and validation.

A config is a plain JSON-compatible dict with the sections ``data``, ``preprocessing``,
``segmenter``, ``translator``, ``translator_training``, ``adapt`` and ``run`` (docs/training.md
describes every key). :func:`load_config` merges a ready config (``smoke``, ``cpu``, ``paper``) or a
JSON file over :func:`default_config`, applies ``key=value`` overrides and validates the result, so
that a mistake stops the run before any data is read: unknown keys (with the closest known key as
hint), wrong types, values out of range, image sizes the networks cannot take. Types and ranges of
the keys are declared with their defaults in :mod:`bigl.training.sections`; this module checks them and
the rules that tie several keys together.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
from pathlib import Path
from typing import Any, Iterable

from bigl.errors import BiGLError, ConfigError
from bigl.runfolder import is_device
from bigl.runplan import self_training_steps

#: Folder of the ready configs shipped with the package.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
READY_CONFIGS = ("smoke", "cpu", "reference", "paper")
SECTIONS = ("data", "preprocessing", "segmenter", "translator", "translator_training", "adapt", "run")

#: Keys that may differ between a run and its resume: they change how a run is driven and
#: logged, not what it computes.
RUN_CONTROL_KEYS = frozenset(
    {
        "run.device",
        "run.amp",
        "run.cpu_bf16",
        "run.log_every",
        "run.checkpoint_every",
        "run.sample_every",
        "run.keep_checkpoints",
        "run.threads",
        "run.progress",
        "data.workers",
        "data.allow_same_modality",  # a permission, not a setting (and absent from older runs)
    }
)


def _nullable_keys() -> dict[str, tuple[type, ...]]:
    """Keys of the training sections that may be null, with the types they take when set: read from
    the sections' annotations (``int | None`` and the like; a real number also takes a whole one)."""
    import dataclasses
    import typing

    from bigl.training.sections import AdaptSection, DataSection, RunSection, TranslatorTrainingSection

    nullable: dict[str, tuple[type, ...]] = {}
    for section, cls in (("data", DataSection), ("translator_training", TranslatorTrainingSection),
                         ("adapt", AdaptSection), ("run", RunSection)):
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            options = typing.get_args(hints[item.name])
            if type(None) in options:
                types = tuple(typing.get_origin(option) or option for option in options if option is not type(None))
                nullable[f"{section}.{item.name}"] = (int, *types) if float in types else types
    return nullable


#: Keys whose default is null, with the types they accept when set.
_NULLABLE: dict[str, tuple[type, ...]] = _nullable_keys()


def default_config() -> dict[str, Any]:
    """Every key with its default value (the paper's settings where the paper gives them): the
    field defaults of the typed sections (:mod:`bigl.training.sections`)."""
    from bigl.training.sections import default_sections

    return default_sections()


# --------------------------------------------------------------------------------------------
# loading and merging


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror}", "check the path") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
            "fix the syntax (a trailing comma or a missing quote is the usual cause)",
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object with config sections", f"sections: {', '.join(SECTIONS)}")
    return data


def config_path(path_or_name: str | Path) -> Path:
    """The JSON file behind a ready config name or a path."""
    text = str(path_or_name)
    if text in READY_CONFIGS:
        return CONFIG_DIR / f"{text}.json"
    path = Path(text).expanduser()
    if not path.exists():
        raise ConfigError(
            f"config not found: {text}",
            f"give a JSON file or one of the ready configs: {', '.join(READY_CONFIGS)}",
        )
    return path


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; level_weights stays nested below its key."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and (not prefix or name == "adapt.level_weights"):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _unknown_key_error(unknown: list[str], known: Iterable[str], where: str) -> ConfigError:
    known = sorted(known)
    suggestions = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        if close:
            suggestions.append(f"{key} -> {close[0]}?")
    hint = ("did you mean: " + "; ".join(suggestions) + "  ") if suggestions else ""
    hint += "docs/training.md lists every key"
    return ConfigError(f"unknown config key(s) {where}: {', '.join(unknown)}", hint)


def merge_config(base: dict[str, Any], update: dict[str, Any], where: str) -> dict[str, Any]:
    """``update`` merged into a copy of ``base``; keys absent from ``base`` are a ConfigError."""
    merged = copy.deepcopy(base)
    known = _flatten(base)
    unknown = []
    for section, values in update.items():
        if section not in base:
            unknown.append(section)
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} {where} must be a JSON object", f"write \"{section}\": {{...}}")
        for key, value in values.items():
            name = f"{section}.{key}"
            if name == "adapt.level_weights" and isinstance(value, dict):
                for level, weight in value.items():
                    if f"{name}.{level}" not in known:
                        unknown.append(f"{name}.{level}")
                    else:
                        merged[section][key][level] = weight
            elif name not in known:
                unknown.append(name)
            else:
                merged[section][key] = value
    if unknown:
        raise _unknown_key_error(unknown, known, where)
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    """``"adapt.iterations=50"`` -> ``("adapt.iterations", 50)``; values are JSON when they parse
    as JSON (numbers, true/false/null, lists), otherwise strings (paths)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"cannot read the override {text!r}", "write overrides as section.key=value, e.g. adapt.iterations=500")
    raw = raw.strip()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def apply_overrides(config: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    config = copy.deepcopy(config)
    known = _flatten(config)
    unknown = []
    for text in overrides:
        key, value = parse_override(text)
        if key not in known:
            unknown.append(key)
            continue
        parts = key.split(".")
        node = config
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    if unknown:
        raise _unknown_key_error(unknown, known, "in the overrides")
    return config


def load_config(path_or_name: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """A ready config (``"smoke"``, ``"cpu"``, ``"paper"``) or JSON file, over the defaults,
    with ``key=value`` overrides applied; validated (ConfigError naming what is wrong)."""
    path = config_path(path_or_name)
    config = merge_config(default_config(), _read_json(path), f"in {path}")
    config = apply_overrides(config, overrides)
    return validate_config(config)


# --------------------------------------------------------------------------------------------
# validation


def _fail(key: str, problem: str, hint: str) -> ConfigError:
    return ConfigError(f"config {key}: {problem}", hint)


def _check_type(key: str, value: Any, default: Any) -> Any:
    """The value, converted where harmless (an integral float for an int); ConfigError otherwise."""
    if value is None:
        if key in _NULLABLE:
            return None
        raise _fail(key, "must not be null", f"give a value like the default {json.dumps(default)}")
    expected: tuple[type, ...]
    if key in _NULLABLE:
        expected = _NULLABLE[key]
    elif isinstance(default, bool):
        expected = (bool,)
    elif isinstance(default, int):
        expected = (int,)
    elif isinstance(default, float):
        expected = (int, float)
    else:
        expected = (type(default),)
    if bool not in expected and isinstance(value, bool):
        raise _fail(key, f"must be a number, got {json.dumps(value)}", "use a number")
    if expected == (int,) and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, expected):
        names = "a number" if float in expected else " or ".join(_TYPE_NAMES[t] for t in expected)
        raise _fail(key, f"must be {names}, got {json.dumps(value)}", f"the default is {json.dumps(default)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(key, f"must be finite, got {value}", "use a finite number")
    return value


_TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", list: "a list", dict: "an object"}


def _check_rules(config: dict[str, Any]) -> None:
    """The value rule of every key that declares one (:mod:`bigl.training.sections`); null passes
    (the type check has already refused null where a key may not take it)."""
    from bigl.training.sections import RULE, SECTION_TYPES

    for section, cls in SECTION_TYPES.items():
        for item in dataclasses.fields(cls):
            rule = item.metadata.get(RULE)
            value = config[section][item.name]
            if rule is None or value is None:
                continue
            problem = rule.problem(value)
            if problem:
                raise _fail(f"{section}.{item.name}", problem, rule.hint)


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check types and values of every key; returns a normalised copy (modalities canonical)."""
    defaults = default_config()
    unknown = sorted(set(_flatten(config)) - set(_flatten(defaults)))
    missing = sorted(set(_flatten(defaults)) - set(_flatten(config)))
    if unknown:
        raise _unknown_key_error(unknown, _flatten(defaults), "in the config")
    if missing:
        raise ConfigError(f"config lacks key(s): {', '.join(missing)}", "load configs with bigl.training.load_config, which fills in the defaults")
    config = copy.deepcopy(config)
    for key, default in _flatten(defaults).items():
        parts = key.split(".")
        node = config
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = _check_type(key, node[parts[-1]], default)

    _validate_data(config)
    _check_rules(config)
    _validate_models(config)
    _validate_training(config)
    _validate_domains(config)
    return config


def _validate_data(config: dict[str, Any]) -> None:
    from bigl.data.brats import normalise_modality

    data = config["data"]
    for key in ("source_modality", "target_modality"):
        try:
            data[key] = normalise_modality(data[key])
        except BiGLError as exc:
            raise _fail(f"data.{key}", exc.message, exc.hint or "") from None
    for key in ("source_dir", "target_dir"):
        folders = data[key]
        if isinstance(folders, list) and (not folders or not all(isinstance(f, str) and f for f in folders)):
            raise _fail(f"data.{key}", "must be a folder or a non-empty list of folders (strings)", 'e.g. ["/data/brats18", "/data/brats21"]')
    for key in ("cases", "exclude", "target_cases", "target_exclude"):
        values = data[key]
        if values is not None and not all(isinstance(v, str) for v in values):
            raise _fail(f"data.{key}", "must be a list of case names (strings)", 'e.g. ["Brats18_2013_2_1", "Brats18_CBICA_ABM_1"]')


def _validate_models(config: dict[str, Any]) -> None:
    from bigl.data.preprocess import PreprocessConfig
    from bigl.models import SegmenterConfig, TranslatorConfig

    built = {}
    for section, cls in (("preprocessing", PreprocessConfig), ("segmenter", SegmenterConfig), ("translator", TranslatorConfig)):
        try:
            built[section] = cls(**config[section])
        except BiGLError as exc:
            raise ConfigError(f"config {section}: {exc.message}", exc.hint) from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"config {section}: {exc}", "check the values against docs/training.md") from None
    size = config["preprocessing"]["image_size"]
    if not isinstance(size, int) or size < 8:
        raise _fail("preprocessing.image_size", f"must be a whole number >= 8, got {size}", "use e.g. 128 or 256")
    segmenter_multiple = 2 ** config["segmenter"]["depth"]
    if size % segmenter_multiple:
        raise _fail(
            "preprocessing.image_size",
            f"{size} is not divisible by 2**segmenter.depth = {segmenter_multiple}",
            f"use a multiple of {segmenter_multiple} (e.g. {max(segmenter_multiple, round(size / segmenter_multiple) * segmenter_multiple)}) or a smaller depth",
        )
    translator_multiple = 2 ** config["translator"]["n_downsample"]
    if size % translator_multiple:
        raise _fail(
            "preprocessing.image_size",
            f"{size} is not divisible by 2**translator.n_downsample = {translator_multiple}",
            f"use a multiple of {translator_multiple}",
        )
    if size // segmenter_multiple < 2:
        raise _fail(
            "preprocessing.image_size",
            f"{size} px leaves a 1x1 bottleneck after {config['segmenter']['depth']} poolings (attention needs at least 2x2)",
            f"use at least {2 * segmenter_multiple} px or a smaller segmenter.depth",
        )
    channels = config["segmenter"]["in_channels"]
    if channels % 2 == 0:
        raise _fail("segmenter.in_channels", f"{channels} adjacent slices have no middle one to segment",
                    "use 1 (single slices) or an odd number such as 3 (the slice and one neighbour on each side)")
    if config["translator"]["channels"] != 1:
        raise ConfigError("the translators work on single slices", "set translator.channels=1")


def _validate_stage_length(config: dict[str, Any], section: str) -> None:
    values = config[section]
    if values["epochs"] is not None:
        if values["epochs"] <= 0:
            raise _fail(f"{section}.epochs", f"must be > 0, got {values['epochs']}", "or set it to null and give iterations")
    elif values["iterations"] <= 0:
        raise _fail(f"{section}.iterations", f"must be > 0, got {values['iterations']}", "give the number of optimisation steps, e.g. 2000")


def _validate_training(config: dict[str, Any]) -> None:
    for section in ("translator_training", "adapt"):
        _validate_stage_length(config, section)
    adapt = config["adapt"]
    betas = adapt["discriminator_betas"]
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas):
        raise _fail("adapt.discriminator_betas", f"must be two numbers in [0, 1), got {json.dumps(betas)}", "e.g. [0.9, 0.99]")
    for level, weight in adapt["level_weights"].items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise _fail(f"adapt.level_weights.{level}", f"must be a number >= 0, got {json.dumps(weight)}", "1.0 keeps the paper's weighting")
    if adapt["method"] == "target-only" and not config["data"]["target_labels"]:
        raise _fail(
            "data.target_labels",
            "method target-only trains on the target labels, but data.target_labels is false",
            "set data.target_labels=true to allow reading the target label maps (no other method reads them)",
        )
    if self_training_steps(adapt):
        if adapt["finetune_translator"]:
            raise _fail("adapt.self_training_iterations", "self-training keeps the translator frozen, but adapt.finetune_translator is true "
                        "(its image losses are not part of the self-training steps)", "set adapt.finetune_translator=false or self_training_iterations=0")
        if adapt["self_training_rounds"] > adapt["self_training_iterations"]:
            raise _fail("adapt.self_training_rounds", f"{adapt['self_training_rounds']} rounds need at least as many iterations "
                        f"(adapt.self_training_iterations is {adapt['self_training_iterations']})", "use fewer rounds or more iterations")
    if adapt["finetune_translator"] and adapt["method"] != "bigl":
        raise _fail("adapt.finetune_translator", f"needs method bigl (method is {adapt['method']})", "set adapt.finetune_translator=false")

    run = config["run"]
    device = str(run["device"]).lower()
    if not is_device(device):
        raise _fail("run.device", f"unknown device {json.dumps(run['device'])}", "use auto, cpu, cuda or cuda:N")
    run["device"] = device


def _validate_domains(config: dict[str, Any]) -> None:
    """BiGL adapts across a domain gap: the same modality from the same scans has none."""
    data = config["data"]
    if config["adapt"]["method"] != "bigl" or data["allow_same_modality"]:
        return
    if data["source_modality"] != data["target_modality"]:
        return
    from bigl.data.brats import data_folders, same_folders

    if not same_folders(data["source_dir"], data["target_dir"]):
        return  # separate folders: e.g. one scanner to another, a real adaptation
    modality = data["source_modality"].upper()
    source = data_folders(data["source_dir"])
    raise ConfigError(
        f"config data: source and target are both {modality} from the same folder(s) "
        f"({', '.join(sorted(map(str, source)))}): there is no domain gap to adapt across, "
        f"the translator would learn {modality} -> {modality}",
        "set data.target_modality (--target-modality) to the modality to segment, e.g. t2 with a t1 source; "
        "to adapt between scanners of one modality, give separate source and target folders; "
        "if this is meant, set data.allow_same_modality=true",
    )


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two configs (flattened names), run-control keys excluded.

    A key that one config lacks counts as its default, so a run folder or file written before a key
    existed matches a config that leaves the new key at its default."""
    defaults = _flatten(default_config())
    flat_old, flat_new = {**defaults, **_flatten(old)}, {**defaults, **_flatten(new)}
    keys = sorted(set(flat_old) | set(flat_new))
    return [key for key in keys if key not in RUN_CONTROL_KEYS and flat_old.get(key) != flat_new.get(key)]
