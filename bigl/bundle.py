"""Model bundles: one ``.safetensors`` file holding the weights and a JSON description.

A bundle holds the segmenter (tensors prefixed ``segmenter.``) and, for BiGL models, the two image
translators (``translator_s2t.``, ``translator_t2s.``). The safetensors header carries one metadata
key, ``"bigl"``: a JSON document with the format version, the architecture configs, the modality the
model segments and the one it was adapted from, the preprocessing parameters, the label convention,
the training method and, when known, the training config and measured metrics.

Loading reads the header and raw tensors with :mod:`safetensors` only; nothing is ever unpickled, so
a bundle from an untrusted source cannot run code. Every way a file can be wrong (missing, not a
safetensors file, truncated, made by another tool, made by a newer BiGL, weights that do not fit the
architecture it declares, weights damaged since they were written or NaN) raises
:class:`~bigl.errors.BundleError` with a fix. Bundles are written with the SHA-256 of their tensor
data in the header (:mod:`bigl.tensorfile`), which loading verifies.

The header-only functions (:func:`read_metadata`, :func:`parameter_counts`, :func:`list_bundles`)
need neither PyTorch nor :mod:`safetensors`: they read the header (an 8-byte little-endian length,
then JSON) with the standard library, so a GUI can list models before PyTorch is installed.
PyTorch is imported only where networks are built, loaded or saved.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bigl import __version__, tensorfile
from bigl.errors import BundleError, ConfigError
from bigl.files import atomic_write_bytes
from bigl.labels import CLASS_NAMES, LABELS
from bigl.runfolder import METHODS

FORMAT = "bigl-bundle"
#: Newest bundle format this BiGL reads and the one it writes.
FORMAT_VERSION = 1
METADATA_KEY = "bigl"
#: Stage 1's translator file (translator.safetensors in a run folder, or adapt.translator_bundle):
#: both generators and their image discriminators, JSON under the same header key as a bundle.
#: Not a model bundle: ``load_bundle`` refuses it, and ``read_translator_file`` reads it.
TRANSLATOR_FORMAT = "bigl-translator"
TRANSLATOR_FORMAT_VERSION = 1
#: Tensor-name prefixes of the networks a bundle can hold.
PARTS = ("segmenter", "translator_s2t", "translator_t2s")
#: What a bundle's ``inference`` metadata may turn on by default (true/false each; every predictor
#: takes them too, None meaning the metadata's choice): test-time flips, the inverted view, the
#: edge refinement, the label clean-up and the contrast search (bigl.prediction, bigl.postprocess).
INFERENCE_OPTIONS = ("flip", "invert_view", "refine_edges", "postprocess", "contrast_search")
#: Where the shipped reference model lives (inside the installed package).
DEFAULT_BUNDLE_PATH = Path(__file__).resolve().parent / "resources" / "default_model.safetensors"
#: Tensors that are state but not trainable parameters (excluded from parameter counts).
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
_REQUIRED_KEYS = ("format", "format_version", "method", "modality", "segmenter", "preprocessing")
_REBUILD_HINT = "the file does not fit its own description; re-create it with `bigl train` or use another bundle"
_DAMAGED_HINT = ("the file changed after BiGL wrote it (a bad copy, download or disk): copy it again from "
                 "where it came from, or re-create it with `bigl train`")

if TYPE_CHECKING:
    import torch


class ModelDescription:
    """What a model's JSON description (the bundle metadata) says, for anything that carries one:
    a loaded :class:`Bundle` and the inference engines' predictors. Needs no PyTorch.

    Users set ``metadata``; ``_description_path`` (the file, for messages) defaults to ``path``.
    """

    metadata: dict

    @property
    def _description_path(self) -> Path | None:
        return getattr(self, "path", None)

    @property
    def modality(self) -> str:
        """The modality the segmenter expects as input (the target modality for adapted models)."""
        return self.metadata["modality"]

    @property
    def source_modality(self) -> str | None:
        return self.metadata.get("source_modality")

    @property
    def method(self) -> str:
        return self.metadata["method"]

    @property
    def segmenter_config(self):
        from bigl.modelconfig import SegmenterConfig

        return _build_config(SegmenterConfig, self.metadata["segmenter"], "segmenter", self._description_path)

    @property
    def translator_config(self):
        from bigl.modelconfig import TranslatorConfig

        if self.metadata.get("translator") is None:
            return None
        return _build_config(TranslatorConfig, self.metadata["translator"], "translator", self._description_path)

    @property
    def preprocessing(self):
        from bigl.data.preprocess import PreprocessConfig

        return _build_config(PreprocessConfig, self.metadata["preprocessing"], "preprocessing", self._description_path)


@dataclass
class Bundle(ModelDescription):
    """A loaded bundle: metadata plus networks in eval mode, on one device."""

    metadata: dict
    segmenter: torch.nn.Module
    translator_s2t: torch.nn.Module | None = None
    translator_t2s: torch.nn.Module | None = None
    path: Path | None = None

    @property
    def device(self) -> torch.device:
        return next(self.segmenter.parameters()).device

    def networks(self) -> dict[str, torch.nn.Module]:
        """The networks present, by tensor prefix."""
        found = {name: getattr(self, name) for name in PARTS}
        return {name: net for name, net in found.items() if net is not None}

    def to(self, device: str | torch.device) -> Bundle:
        """Move every network to ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``...); returns self."""
        target = resolve_device(device)
        for net in self.networks().values():
            net.to(target)
        return self


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; a CUDA request without CUDA is a ConfigError."""
    import torch

    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {device!r}", "use --device auto, cpu or cuda") from None
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "CUDA was requested but no CUDA GPU is usable here "
                f"(this PyTorch {torch.__version__} {'has no CUDA support' if torch.version.cuda is None else 'finds no GPU'})",
                "use --device cpu (or --device auto), or install a CUDA build of PyTorch on a machine with an NVIDIA GPU",
            )
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise ConfigError(
                f"GPU {target.index} does not exist (this machine has {torch.cuda.device_count()})",
                "use --device cuda for the first GPU",
            )
    elif target.type != "cpu":
        raise ConfigError(f"unsupported device {device!r}", "use --device auto, cpu or cuda")
    return target


# --------------------------------------------------------------------------------------------
# metadata


def _config_dict(cls, config: Any) -> dict:
    """A config as a validated JSON dict (ConfigError for a dict the config class refuses)."""
    if isinstance(config, dict):
        config = cls.from_dict(config) if hasattr(cls, "from_dict") else cls(**config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    raise TypeError(f"expected a config dataclass or dict, got {type(config).__name__}")


def _build_config(cls, values: Any, name: str, path: Path | None):
    """Build a config dataclass from a metadata dict, refusing keys the class does not know."""
    where = f"{path}: " if path else ""
    if not isinstance(values, dict):
        raise BundleError(f"{where}the {name!r} entry of the bundle metadata is not a JSON object", _REBUILD_HINT)
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise BundleError(
            f"{where}the {name} config in the bundle has settings this BiGL does not know: {', '.join(unknown)}",
            "the bundle was probably made by a different BiGL version; upgrade BiGL (pip install -U bigl) "
            "or re-create the bundle with this version",
        )
    try:
        if hasattr(cls, "from_dict"):
            return cls.from_dict(values)
        return cls(**values)
    except (TypeError, ValueError, ConfigError) as exc:
        reason = exc.message if isinstance(exc, ConfigError) else str(exc)
        raise BundleError(f"{where}the {name} config in the bundle is invalid: {reason}", _REBUILD_HINT) from None


def make_metadata(
    *,
    method: str,
    modality: str,
    source_modality: str | None,
    segmenter_config,
    translator_config=None,
    preprocessing,
    training: dict | None = None,
    metrics: dict | None = None,
    description: str = "",
) -> dict:
    """The JSON metadata of a bundle (configs may be dataclasses or dicts)."""
    from bigl.data.brats import normalise_modality
    from bigl.data.preprocess import PreprocessConfig
    from bigl.modelconfig import SegmenterConfig, TranslatorConfig

    if method not in METHODS:
        raise ConfigError(f"unknown training method {method!r}", f"use one of {', '.join(METHODS)}")
    segmenter = _config_dict(SegmenterConfig, segmenter_config)
    translator = None if translator_config is None else _config_dict(TranslatorConfig, translator_config)
    prep = _config_dict(PreprocessConfig, preprocessing)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bigl_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": method,
        "modality": normalise_modality(modality),
        "source_modality": normalise_modality(source_modality) if source_modality else None,
        "segmenter": segmenter,
        "translator": translator,
        "preprocessing": prep,
        "labels": list(LABELS),
        "class_names": list(CLASS_NAMES),
        "training": training,
        "metrics": metrics,
        "description": description,
    }


def _check_metadata(metadata: Any, path: Path | None) -> dict:
    """Validate the parts of the metadata every reader relies on; returns it."""
    where = f"{path}: " if path else ""
    if isinstance(metadata, dict) and metadata.get("format") == TRANSLATOR_FORMAT:
        raise BundleError(
            f"{where}this is a translator file from the first training stage, not a segmentation model",
            "use model.safetensors from the same run folder (written when training finishes)",
        )
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise BundleError(
            f"{where}the file's 'bigl' metadata is not a BiGL bundle description",
            "use a bundle written by `bigl train` (model.safetensors in the run folder)",
        )
    _check_format_version(metadata, FORMAT_VERSION, f"{where}the bundle", "bundle format", BundleError)
    missing = [key for key in _REQUIRED_KEYS if key not in metadata]
    if missing:
        raise BundleError(f"{where}the bundle metadata lacks {', '.join(missing)}", _REBUILD_HINT)
    if metadata["method"] not in METHODS:
        raise BundleError(f"{where}the bundle names an unknown training method {metadata['method']!r}", _REBUILD_HINT)
    segmenter = metadata["segmenter"]
    channels = segmenter.get("in_channels", 1) if isinstance(segmenter, dict) else 1
    if isinstance(segmenter, dict) and (segmenter.get("num_classes", len(LABELS)) != len(LABELS)
                                        or not isinstance(channels, int) or channels < 1 or channels % 2 == 0):
        raise BundleError(
            f"{where}the segmenter in the bundle takes {channels} input channel(s) and predicts "
            f"{segmenter.get('num_classes')} classes; BiGL models take an odd number of adjacent slices of one scan "
            f"and predict {len(LABELS)} classes",
            "use a bundle trained with BiGL's label convention",
        )
    floor = metadata.get("confidence_floor")
    if floor is not None and (isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0.0 < floor < 1.0):
        raise BundleError(f"{where}the bundle's confidence_floor must be a number between 0 and 1, got {floor!r}",
                          _REBUILD_HINT)
    labels = metadata.get("labels", list(LABELS))
    if list(labels) != list(LABELS):
        raise BundleError(
            f"{where}the bundle uses labels {labels}, not the BraTS convention {list(LABELS)} BiGL writes",
            "use a bundle trained with BiGL's label convention",
        )
    return metadata


def _check_format_version(metadata: dict, readable: int, what: str, name: str, error: type) -> None:
    """``error`` unless the file's ``format_version`` is one this BiGL reads (1..``readable``)."""
    version = metadata.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise error(f"{what} has an invalid format_version {version!r}", _REBUILD_HINT)
    if version > readable:
        made_by = metadata.get("bigl_version", "a newer version")
        raise error(
            f"{what} was made by a newer BiGL ({made_by}, {name} {version}); "
            f"this BiGL {__version__} reads {name} {readable} and older",
            "upgrade BiGL (pip install -U bigl, or update the Slicer extension) to use this file",
        )


def write_translator_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
    """Write a translator file atomically: ``tensors`` and ``metadata`` with the format, its version
    and the BiGL version added."""
    metadata = {"format": TRANSLATOR_FORMAT, "format_version": TRANSLATOR_FORMAT_VERSION, "bigl_version": __version__, **metadata}
    path = Path(path)
    atomic_write_bytes(path, tensorfile.encode(tensors, _metadata_header(metadata)))
    return path


def read_translator_file(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, verified tensors) of a translator file. ConfigError (it is an input of training)
    when it is missing, damaged, not a translator file or from a newer BiGL."""
    path = Path(path).expanduser()
    retrain = "train the translator again (bigl train --stage translator)"
    if not path.is_file():
        raise ConfigError(
            f"translator file not found: {path}",
            "train it first (bigl train --stage translator, or --stage all), or set adapt.translator_bundle",
        )
    try:
        raw, tensors = tensorfile.read_tensors(path)
        metadata = json.loads(raw.get(METADATA_KEY, "null"))
    except tensorfile.DamagedFile as exc:
        raise ConfigError(f"the translator file {path} is damaged: {exc}", retrain) from None
    except Exception as exc:
        raise ConfigError(f"{path} cannot be read as a translator file ({exc})", retrain) from None
    if not isinstance(metadata, dict) or metadata.get("format") != TRANSLATOR_FORMAT:
        hint = ("give the translator.safetensors of its run folder, not the model" if isinstance(metadata, dict)
                and metadata.get("format") == FORMAT else "give the translator.safetensors written by stage 1")
        raise ConfigError(f"{path} is not a BiGL translator file", hint)
    _check_format_version(metadata, TRANSLATOR_FORMAT_VERSION, f"the translator file {path}", "translator format", ConfigError)
    return metadata, tensors


def _read_header(path: str | os.PathLike) -> tuple[Path, dict, dict[str, tuple[int, ...]]]:
    """Read and validate the header: (path, metadata, tensor shapes). Loads no tensor data."""
    path = Path(path).expanduser()
    if not path.exists():
        raise BundleError(
            f"model file not found: {path}",
            "check the path; `bigl train` writes model.safetensors in its run folder",
        )
    if path.is_dir():
        raise BundleError(f"{path} is a folder, not a model file", "give the .safetensors bundle file inside it")
    try:
        raw, shapes = tensorfile.read_header(path)
    except tensorfile.DamagedFile as exc:
        raise BundleError(f"{path} is damaged: {exc}", _DAMAGED_HINT) from None
    except (OSError, ValueError) as exc:
        reason, hint = _describe_bad_file(path, exc)
        raise BundleError(f"{path} is not a readable model bundle: {reason}", hint) from None
    if METADATA_KEY not in raw:
        raise BundleError(
            f"{path} is a safetensors file but not a BiGL bundle (no 'bigl' metadata; it was made by another tool)",
            "use a bundle written by `bigl train` (model.safetensors in the run folder)",
        )
    try:
        metadata = json.loads(raw[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: the bundle's 'bigl' metadata is not valid JSON ({exc})", _REBUILD_HINT) from None
    return path, _check_metadata(metadata, path), shapes


def _describe_bad_file(path: Path, exc: Exception) -> tuple[str, str]:
    """(what is wrong, how to fix it) for a file that is not a readable safetensors file."""
    recopy = ("give the .safetensors file written by `bigl train`; if it was copied or downloaded, "
              "copy it again (it may be incomplete)")
    try:
        with open(path, "rb") as stream:
            head = stream.read(4)
    except OSError as os_error:
        return f"it cannot be read ({os_error.strerror})", "check the file's permissions"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return ("it looks like a PyTorch pickle checkpoint (.pt/.pth), which BiGL never loads because "
                "unpickling can run code", "use the model.safetensors bundle that `bigl train` writes")
    if not head:
        return "the file is empty", recopy
    return f"not a valid safetensors file, or truncated ({exc})", recopy


def verify_checksum(path: str | os.PathLike) -> bool:
    """True when the bundle's weights match the checksum recorded in its header, False when it has
    none (written by an older BiGL); BundleError when they do not match. Standard library only."""
    path, _, _ = _read_header(path)
    try:
        return tensorfile.verify_digest(path)
    except tensorfile.DamagedFile as exc:
        raise BundleError(f"{path} is damaged: {exc}", _DAMAGED_HINT) from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: the weights cannot be read ({exc})", _DAMAGED_HINT) from None


def read_metadata(path: str | os.PathLike) -> dict:
    """The bundle's metadata, validated, reading only the file header (cheap)."""
    return _read_header(path)[1]


def parameter_counts(path: str | os.PathLike) -> dict[str, int]:
    """Number of trainable parameters per network in a bundle, from the header only."""
    _, _, shapes = _read_header(path)
    counts: dict[str, int] = {}
    for name, shape in shapes.items():
        part = name.split(".", 1)[0]
        if name.endswith(_BUFFER_SUFFIXES):
            continue
        counts[part] = counts.get(part, 0) + math.prod(shape)
    return counts


def list_bundles(folder: str | os.PathLike) -> list[tuple[Path, dict]]:
    """Valid bundles directly in ``folder`` as (path, metadata), sorted by name; invalid files skipped."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            found.append((path, read_metadata(path)))
        except BundleError:
            continue
    return found


def describe_adaptation(metadata: dict) -> str:
    """``"segments T2, adapted from T1 (BiGL)"``-style summary of a bundle's metadata."""
    modality = str(metadata.get("modality", "?")).upper()
    source = metadata.get("source_modality")
    method = str(metadata.get("method", "?"))
    if method == "bigl" and source:
        return f"segments {modality}, adapted from {str(source).upper()} (BiGL)"
    if method == "source-only" and source:
        return f"segments {modality}, trained on {str(source).upper()} only (no adaptation)"
    if method == "target-only":
        return f"segments {modality}, trained with {modality} labels"
    return f"segments {modality} ({method})"


def default_bundle_path() -> Path:
    """The shipped reference model; BundleError when the file is missing."""
    if not DEFAULT_BUNDLE_PATH.is_file():
        raise BundleError(
            f"no default model is shipped with this BiGL yet (expected {DEFAULT_BUNDLE_PATH})",
            "train one with `bigl train --config ...` and pass its model.safetensors with --model, "
            f"or copy a bundle to {DEFAULT_BUNDLE_PATH}",
        )
    return DEFAULT_BUNDLE_PATH


# --------------------------------------------------------------------------------------------
# weights


def _fresh_networks(metadata: dict, path: Path | None, parts: list[str]) -> dict[str, torch.nn.Module]:
    """Untrained networks of the architectures the metadata describes."""
    from bigl.modelconfig import SegmenterConfig, TranslatorConfig
    from bigl.models import DualAttentionUNet, ResnetGenerator

    where = f"{path}: " if path else ""
    networks = {}
    for part in parts:
        if part == "segmenter":
            config = _build_config(SegmenterConfig, metadata["segmenter"], "segmenter", path)
            builder = DualAttentionUNet
        else:
            if metadata.get("translator") is None:
                raise BundleError(
                    f"{where}the bundle holds {part} weights but its metadata has no translator config",
                    _REBUILD_HINT,
                )
            config = _build_config(TranslatorConfig, metadata["translator"], "translator", path)
            builder = ResnetGenerator
        try:
            networks[part] = builder(config)
        except (TypeError, ValueError, ConfigError) as exc:
            reason = exc.message if isinstance(exc, ConfigError) else str(exc)
            raise BundleError(f"{where}the {part} architecture in the bundle cannot be built: {reason}", _REBUILD_HINT) from None
    return networks


def _check_weights(part: str, network: torch.nn.Module, shapes: dict[str, tuple[int, ...]], path: Path | None) -> None:
    """BundleError naming the tensors that are missing, extra or of the wrong shape."""
    expected = {name: tuple(tensor.shape) for name, tensor in network.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    wrong = sorted(name for name in set(expected) & set(shapes) if expected[name] != shapes[name])
    if not (missing or extra or wrong):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s), e.g. {part}.{missing[0]}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s), e.g. {part}.{extra[0]}")
    if wrong:
        name = wrong[0]
        problems.append(
            f"{len(wrong)} tensor(s) of the wrong shape, e.g. {part}.{name} is {list(shapes[name])} "
            f"where the declared architecture needs {list(expected[name])}"
        )
    where = f"{path}: " if path else ""
    raise BundleError(
        f"{where}the {part} weights do not match the architecture in the bundle metadata ({'; '.join(problems)})",
        _REBUILD_HINT,
    )


def _split_parts(names, path: Path | None) -> dict[str, dict[str, str]]:
    """Tensor names grouped by network: {part: {name inside the network: full name}}."""
    grouped: dict[str, dict[str, str]] = {}
    for full in names:
        part, _, inner = full.partition(".")
        if part not in PARTS or not inner:
            where = f"{path}: " if path else ""
            raise BundleError(f"{where}unexpected tensor {full!r} in the bundle (not part of a BiGL network)", _REBUILD_HINT)
        grouped.setdefault(part, {})[inner] = full
    return grouped


def save_bundle(
    path: str | os.PathLike,
    *,
    segmenter: torch.nn.Module,
    metadata: dict,
    translator_s2t: torch.nn.Module | None = None,
    translator_t2s: torch.nn.Module | None = None,
) -> Path:
    """Write a bundle atomically (temporary file in the same folder, fsync, rename).

    The networks are checked against the architectures in ``metadata`` first, so a bundle that
    saves also loads.
    """
    path = Path(path).expanduser()
    metadata = _check_metadata(dict(metadata), None)
    given = {"segmenter": segmenter, "translator_s2t": translator_s2t, "translator_t2s": translator_t2s}
    tensors: dict[str, torch.Tensor] = {}
    fresh = _fresh_networks(metadata, None, [part for part, net in given.items() if net is not None])
    for part, network in given.items():
        if network is None:
            continue
        state = network.state_dict()
        _check_weights(part, fresh[part], {name: tuple(t.shape) for name, t in state.items()}, None)
        for name, tensor in state.items():
            tensors[f"{part}.{name}"] = tensor.detach().to("cpu").contiguous().clone()
    atomic_write_bytes(path, tensorfile.encode(tensors, _metadata_header(metadata)))
    return path


def _metadata_header(metadata: dict) -> dict[str, str]:
    try:
        return {METADATA_KEY: json.dumps(metadata, allow_nan=False)}
    except (TypeError, ValueError) as exc:
        raise BundleError(f"the bundle metadata cannot be written as JSON: {exc}", "keep metadata to plain numbers, strings, lists and dicts") from None


def annotate_bundle(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    metrics: dict | None = None,
    training: dict | None = None,
    description: str | None = None,
    inference: dict | None = None,
    confidence_floor: float | None = None,
) -> Path:
    """Copy a bundle with its ``metrics`` replaced, ``training`` merged into its training record and
    (when given) a new description, ``inference`` defaults (``{"flip": bool, "postprocess": bool, ...}``,
    the names of ``INFERENCE_OPTIONS``, each optional,
    what :class:`bigl.inference.BiGLPredictor` does unless told otherwise) and ``confidence_floor``
    (the tumour confidence below which predictions warn that the model is unsure,
    :func:`bigl.plausibility.confidence_warning`; set for a model from its development scans). The
    weights are copied byte for byte. Used to record what was measured on a model after training
    (e.g. the shipped reference model's report table) and how it is best run."""
    path, metadata, _ = _read_header(source)
    tensors = _read_tensors(path)
    metadata = dict(metadata)
    if metrics is not None:
        metadata["metrics"] = metrics
    if training is not None:
        metadata["training"] = {**(metadata.get("training") or {}), **training}
    if description is not None:
        metadata["description"] = description
    if inference is not None:
        unknown = sorted(set(inference) - set(INFERENCE_OPTIONS))
        if unknown or not all(isinstance(value, bool) for value in inference.values()):
            raise ConfigError(f"inference defaults take {', '.join(INFERENCE_OPTIONS)} (true/false), got {inference}",
                              'e.g. {"flip": true, "postprocess": true}')
        metadata["inference"] = dict(inference)
    if confidence_floor is not None:
        metadata["confidence_floor"] = confidence_floor
    metadata = _check_metadata(metadata, None)
    destination = Path(destination).expanduser()
    atomic_write_bytes(destination, tensorfile.encode(tensors, _metadata_header(metadata)))
    return destination


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a bundle, verified (digest, finite values); BundleError saying it is damaged."""
    try:
        return tensorfile.read_tensors(path)[1]
    except tensorfile.DamagedFile as exc:
        raise BundleError(f"{path} is damaged: {exc}", _DAMAGED_HINT) from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: the weights cannot be read ({exc})", _DAMAGED_HINT) from None


def load_bundle(path: str | os.PathLike, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle (never unpickles) onto ``device``; networks in eval mode without gradients.

    The weights are verified first: against the digest in the header when the file has one, and
    for NaN or infinite values always (:mod:`bigl.tensorfile`)."""
    path, metadata, shapes = _read_header(path)
    target = resolve_device(device)
    grouped = _split_parts(shapes, path)
    if "segmenter" not in grouped:
        raise BundleError(f"{path}: the bundle holds no segmenter weights", _REBUILD_HINT)
    networks = _fresh_networks(metadata, path, [part for part in PARTS if part in grouped])
    for part, network in networks.items():
        _check_weights(part, network, {inner: shapes[full] for inner, full in grouped[part].items()}, path)
    tensors = _read_tensors(path)
    for part, network in networks.items():
        network.load_state_dict({inner: tensors[full] for inner, full in grouped[part].items()}, strict=True)
        network.eval()
        network.requires_grad_(False)
        network.to(target)
    return Bundle(
        metadata=metadata,
        segmenter=networks["segmenter"],
        translator_s2t=networks.get("translator_s2t"),
        translator_t2s=networks.get("translator_t2s"),
        path=path,
    )
