"""Inference with ONNX Runtime: :class:`OnnxPredictor` runs a model's ONNX export, importing no torch.

``bigl export MODEL.safetensors`` (:mod:`bigl.export`) writes two files beside the bundle:

* ``MODEL.onnx``: the segmenter, input ``image`` float32 ``[batch, 1, P, P]`` (P: the bundle's
  slice size rounded up to the network's stride), outputs ``logits`` ``[batch, K, P, P]``,
  ``features`` (bottleneck after attention), ``position_attention`` ``[batch, N, N]`` and
  ``channel_attention`` ``[batch, C, C]``;
* ``MODEL.translator.onnx``: the target->source translator (BiGL bundles only), input ``image``,
  output ``translated``, both ``[batch, 1, P', P']``.

Each file carries the bundle's JSON description in its ONNX ``metadata_props`` under ``"bigl"``
(the same document as the bundle's header) and a description of the graph under ``"bigl_onnx"``:
the format and its version, which network it holds, the input and output names, P, the opset, and
the SHA-256 of the tensor data of the bundle it was exported from (``source_data_sha256``, see
:func:`bigl.tensorfile.data_digest`): a bundle retrained since is noticed, while one whose metadata
only was changed (:func:`bigl.bundle.annotate_bundle`) keeps its export; run through the bundle,
the engine then uses the bundle's current metadata (e.g. its inference defaults). Preprocessing, slice batches, restoring onto the grid, attention summaries and
progress are :mod:`bigl.prediction`'s, shared with the PyTorch engine.

Every way an ONNX model can be unusable (not an ONNX file, not a BiGL export, graph inputs that do
not match its metadata, an opset this onnxruntime cannot run, onnxruntime not installed) is a
:class:`~bigl.errors.BundleError` or :class:`~bigl.errors.ConfigError` with the fix. The file
header is read with a small protobuf reader of the standard library, so those checks need neither
the ``onnx`` package nor onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bigl import __version__
from bigl.errors import BundleError, ConfigError
from bigl.prediction import _OUT_OF_MEMORY, Predictor, check_num_threads, module_installed, padded_size

ONNX_SUFFIX = ".onnx"
TRANSLATOR_SUFFIX = ".translator.onnx"
#: metadata_props keys: the bundle's JSON description, and the description of the graph.
BUNDLE_KEY = "bigl"
EXPORT_KEY = "bigl_onnx"
EXPORT_FORMAT = "bigl-onnx"
#: Newest export format this BiGL reads and the one it writes.
EXPORT_FORMAT_VERSION = 1
#: The graphs an export holds, and their outputs.
SEGMENTER_OUTPUTS = ("logits", "features", "position_attention", "channel_attention")
TRANSLATOR_OUTPUTS = ("translated",)
INPUT_NAME = "image"
_REEXPORT_HINT = "re-create it with `bigl export MODEL.safetensors` (needs PyTorch: pip install 'bigl[train]')"
#: The export description's key for the digest of the source bundle's tensor data.
SOURCE_DIGEST_KEY = "source_data_sha256"


def is_onnx_path(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(ONNX_SUFFIX)


def export_path(bundle_path: str | os.PathLike) -> Path:
    """``MODEL.safetensors`` -> ``MODEL.onnx`` (the segmenter's export)."""
    path = Path(bundle_path)
    return path.with_name(path.stem + ONNX_SUFFIX) if path.suffix else path.with_name(path.name + ONNX_SUFFIX)


def translator_path(onnx_path: str | os.PathLike) -> Path:
    """``MODEL.onnx`` -> ``MODEL.translator.onnx``."""
    path = Path(onnx_path)
    stem = path.name[: -len(ONNX_SUFFIX)] if is_onnx_path(path) else path.name
    return path.with_name(stem + TRANSLATOR_SUFFIX)


def related_model_files(path: Path) -> list[Path]:
    """A model file and the files that belong to it (bundle, segmenter and translator exports)."""
    if is_onnx_path(path):
        return [path, translator_path(path)]
    export = export_path(path)
    return [path, export, translator_path(export)]


def file_digest(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a whole file."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# onnxruntime


def onnxruntime_available() -> bool:
    return module_installed("onnxruntime")


def has_cuda_provider() -> bool:
    """Whether the installed onnxruntime (onnxruntime-gpu) offers the CUDA execution provider."""
    if not onnxruntime_available():
        return False
    return "CUDAExecutionProvider" in require_onnxruntime().get_available_providers()


def require_onnxruntime():
    """The onnxruntime module, or a ConfigError saying how to install it."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ConfigError(
            f"ONNX Runtime is not installed, and the onnx engine needs it ({exc})",
            "pip install onnxruntime (or onnxruntime-gpu for an NVIDIA GPU), or use --engine torch "
            "with PyTorch installed (pip install 'bigl[train]')",
        ) from None
    return onnxruntime


# --------------------------------------------------------------------------------------------
# the file: a minimal protobuf reader for the ModelProto's top-level fields


@dataclass
class OnnxHeader:
    ir_version: int
    opsets: dict[str, int]  # domain ("" = the default ai.onnx) -> version
    metadata: dict[str, str]  # metadata_props


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or invalid varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(data: memoryview):
    """(field number, wire type, value) of one protobuf message; ValueError when it is malformed."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > end:
            raise ValueError("truncated message")
        yield number, wire, value


def _strings(message: memoryview) -> dict[int, str]:
    return {number: bytes(value).decode("utf-8") for number, wire, value in _fields(message) if wire == 2}


def parse_header(data: bytes | memoryview) -> OnnxHeader:
    """ir_version, opset imports and metadata_props of a serialised ONNX ModelProto (ValueError if it is none)."""
    data = memoryview(data)
    ir_version, has_graph, opsets, metadata = None, False, {}, {}
    for number, wire, value in _fields(data):
        if number == 1 and wire == 0:
            ir_version = value
        elif number == 7 and wire == 2:
            has_graph = True
        elif number == 8 and wire == 2:
            domain, version = "", None
            for inner, inner_wire, inner_value in _fields(value):
                if inner == 1 and inner_wire == 2:
                    domain = bytes(inner_value).decode("utf-8")
                elif inner == 2 and inner_wire == 0:
                    version = inner_value
            if version is not None:
                opsets["" if domain == "ai.onnx" else domain] = version
        elif number == 14 and wire == 2:
            entry = _strings(value)
            metadata[entry.get(1, "")] = entry.get(2, "")
    if ir_version is None or not has_graph or "" not in opsets:
        raise ValueError("no ONNX model (ir_version, graph and opset) in it")
    return OnnxHeader(ir_version=ir_version, opsets=opsets, metadata=metadata)


def _read_file(path: Path) -> bytes:
    if not path.exists():
        raise BundleError(f"ONNX model file not found: {path}",
                          f"check the path; `bigl export MODEL.safetensors` writes MODEL{ONNX_SUFFIX}")
    if path.is_dir():
        raise BundleError(f"{path} is a folder, not an ONNX model file", f"give the {ONNX_SUFFIX} file inside it")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path} cannot be read ({exc.strerror or exc})", "check the file's permissions") from None


def read_export(path: str | os.PathLike, graph: str = "segmenter", *, data: bytes | None = None) -> tuple[dict, dict, OnnxHeader]:
    """(bundle metadata, export description, header) of a BiGL ONNX export, validated; BundleError
    for a file that is not ONNX, not a BiGL export, of a newer format or holding the other graph."""
    from bigl.bundle import _check_metadata

    path = Path(path).expanduser()
    data = _read_file(path) if data is None else data
    try:
        header = parse_header(data)
    except ValueError as exc:
        hint = "give the .onnx file written by `bigl export`; if it was copied or downloaded, copy it again"
        if data[:1] == b"\x80" or data[:4] == b"PK\x03\x04":
            reason = "it looks like a PyTorch pickle checkpoint, which BiGL never loads"
        elif len(data) >= 9 and data[8:9] == b"{":
            reason = "it looks like a safetensors bundle; give it as a .safetensors file (or its .onnx export)"
        elif not data:
            reason = "the file is empty"
        else:
            reason = f"not a valid ONNX model, or truncated ({exc})"
        raise BundleError(f"{path} is not a readable ONNX model: {reason}", hint) from None
    if EXPORT_KEY not in header.metadata or BUNDLE_KEY not in header.metadata:
        raise BundleError(
            f"{path} is an ONNX model but not a BiGL export (no '{EXPORT_KEY}' metadata; it was made by another tool)",
            "use the .onnx file `bigl export MODEL.safetensors` writes, or the .safetensors bundle itself",
        )
    try:
        info = json.loads(header.metadata[EXPORT_KEY])
        metadata = json.loads(header.metadata[BUNDLE_KEY])
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: the BiGL metadata of the ONNX model is not valid JSON ({exc})", _REEXPORT_HINT) from None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
        raise BundleError(f"{path}: the '{EXPORT_KEY}' metadata is not a BiGL export description", _REEXPORT_HINT)
    version = info.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(f"{path}: the export has an invalid format_version {version!r}", _REEXPORT_HINT)
    if version > EXPORT_FORMAT_VERSION:
        raise BundleError(
            f"{path} was exported by a newer BiGL ({info.get('bigl_version', '?')}, export format {version}); "
            f"this BiGL {__version__} reads export format {EXPORT_FORMAT_VERSION} and older",
            "upgrade BiGL (pip install -U bigl, or update the Slicer extension) to use this model",
        )
    if info.get("graph") != graph:
        if info.get("graph") == "translator_t2s":
            fix = f"give the segmenter's export ({path.name.replace(TRANSLATOR_SUFFIX, ONNX_SUFFIX)}); the translator file is found beside it"
        else:
            fix = f"give the {graph} export"
        raise BundleError(f"{path} holds the {info.get('graph')!r} network, not the {graph}", fix)
    return _check_metadata(metadata, path), info, header


def source_digest(bundle: str | os.PathLike) -> str:
    """The digest an export records of its bundle: that of the tensor data (:func:`bigl.tensorfile.data_digest`)."""
    from bigl import tensorfile

    return tensorfile.data_digest(bundle)


def export_problem(export: Path, bundle: Path, *, translated: bool = True) -> str | None:
    """Why ``export`` cannot stand in for ``bundle`` (missing, unreadable, exported from another
    file or from other weights), or None when it can. ``translated``: the translator's file, when
    the export has one, must be there and belong to it too."""
    if not export.is_file():
        return f"there is no ONNX export of {bundle.name} beside it ({export.name})"
    try:
        _, info, _ = read_export(export)
    except BundleError as exc:
        return exc.message
    try:
        current = source_digest(bundle)
    except (OSError, ValueError) as exc:
        return f"{bundle} cannot be read ({getattr(exc, 'strerror', None) or exc})"
    recorded = info.get(SOURCE_DIGEST_KEY)
    if recorded is None:
        return f"{export.name} was written by an earlier BiGL that did not record the weights it holds"
    if recorded != current:
        return f"{export.name} was exported from another version of {bundle.name} (its weights changed since)"
    return translator_problem(export, info) if translated else None


def translator_problem(export: Path, info: dict) -> str | None:
    """Why the translator file an export names is unusable (missing, unreadable, from another
    bundle), or None when it is fine or the export has no translator."""
    if not info.get("translator"):
        return None
    candidate = translator_path(export)  # by the export's own name: a renamed copy keeps its pair
    if not candidate.is_file():
        return (f"the translator's ONNX file {candidate.name} is missing beside {export.name} "
                "(it is needed for the translated image)")
    try:
        _, translator_info, _ = read_export(candidate, "translator_t2s")
    except BundleError as exc:
        return exc.message
    if translator_info.get(SOURCE_DIGEST_KEY) != info.get(SOURCE_DIGEST_KEY):
        return f"{candidate.name} and {export.name} were exported from different bundles"
    return None


def export_is_current(export: Path, bundle: Path, *, translated: bool = True) -> bool:
    return export_problem(export, bundle, translated=translated) is None


def export_hint(bundle: Path | str) -> str:
    """How to get a usable export of ``bundle``: with PyTorch here, export it or use the torch
    engine; without, export it elsewhere or install PyTorch."""
    from bigl.prediction import _torch_available

    if _torch_available():
        return f"run `bigl export {bundle}`, or use --engine torch"
    return (f"run `bigl export {bundle}` on a machine with PyTorch and copy the .onnx file(s) it writes beside "
            "the bundle; or install PyTorch here (pip install 'bigl[train]'; in 3D Slicer, BiGL Training "
            "installs it) to export it or segment with it")


def check_export_matches(export: Path, bundle: Path, *, translated: bool = True) -> None:
    """BundleError with the fix unless ``export`` is the ONNX export of ``bundle`` as it is now
    (with its translator file, when ``translated`` output is wanted)."""
    problem = export_problem(export, bundle, translated=translated)
    if problem is not None:
        raise BundleError(problem, export_hint(bundle))


# --------------------------------------------------------------------------------------------
# sessions


def execution_providers(device: str = "auto") -> list[str]:
    """ONNX Runtime execution providers for ``device`` ("auto": CUDA when onnxruntime-gpu finds it)."""
    ort = require_onnxruntime()
    name = str(device).strip().lower()
    available = ort.get_available_providers()
    if name == "auto":
        return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]
    if name == "cpu":
        return ["CPUExecutionProvider"]
    if name.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise ConfigError(
                f"CUDA was requested, but this ONNX Runtime {ort.__version__} has no CUDA support "
                f"(providers: {', '.join(available)})",
                "use --device cpu (or auto), or install onnxruntime-gpu on a machine with an NVIDIA GPU "
                "(pip uninstall onnxruntime; pip install onnxruntime-gpu)",
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ConfigError(f"unknown device {device!r}", "use --device auto, cpu or cuda")


_SUPPORTED_OPSET = re.compile(r"support for domain ai\.onnx is till opset (\d+)")


def create_session(path: Path, data: bytes, header: OnnxHeader, *, providers: list[str], num_threads: int | None):
    """An onnxruntime InferenceSession, or a BundleError/ConfigError instead of onnxruntime's traceback."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no warnings about unused initialisers on the console
    options.inter_op_num_threads = 1
    if num_threads is not None:
        options.intra_op_num_threads = num_threads
    try:
        return ort.InferenceSession(data, sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime's own exception types are not Python's
        text = str(exc)
        opset = header.opsets.get("")
        supported = _SUPPORTED_OPSET.search(text)
        if supported or "opset" in text.lower():
            till = f" (it runs opset {supported.group(1)} and older)" if supported else ""
            raise BundleError(
                f"{path.name} uses ONNX opset {opset}, which this ONNX Runtime {ort.__version__} cannot run{till}",
                "upgrade ONNX Runtime (pip install -U onnxruntime), or export again with an older opset "
                "(`bigl export MODEL.safetensors --opset 17`)",
            ) from None
        reason = _first_line(text)
        raise BundleError(f"ONNX Runtime {ort.__version__} cannot load {path.name}: {reason}", _REEXPORT_HINT) from None


def _first_line(text: str) -> str:
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text.strip())
    return (text.splitlines() or ["unknown error"])[0][:300]


def check_graph(session, info: dict, expected_size: int, outputs: tuple[str, ...], path: Path, channels: int = 1) -> None:
    """BundleError unless the graph has the one input and the outputs its metadata describes."""
    inputs = session.get_inputs()
    problems = []
    if len(inputs) != 1:
        problems.append(f"{len(inputs)} inputs ({', '.join(i.name for i in inputs)}) where it should have one")
    else:
        given = inputs[0]
        shape = list(given.shape)
        if given.name != info.get("input", INPUT_NAME):
            problems.append(f"input {given.name!r} where the metadata names {info.get('input')!r}")
        if given.type != "tensor(float)":
            problems.append(f"input type {given.type} where float32 slices are fed")
        if len(shape) != 4 or shape[1] != channels or shape[2:] != [expected_size, expected_size]:
            problems.append(f"input shape {shape} where the metadata's preprocessing needs "
                            f"[batch, {channels}, {expected_size}, {expected_size}]")
        elif isinstance(shape[0], int) and shape[0] != 1:
            problems.append(f"a fixed batch of {shape[0]} slices (exports have a dynamic batch)")
    names = {output.name for output in session.get_outputs()}
    missing = [name for name in outputs if name not in names]
    if missing:
        problems.append(f"no output {', '.join(missing)}")
    if info.get("size") not in (None, expected_size):
        problems.append(f"slice size {info.get('size')} recorded where the metadata gives {expected_size}")
    if problems:
        raise BundleError(f"{path.name}: the ONNX graph does not match its BiGL metadata ({'; '.join(problems)})",
                          f"the file was changed after export; {_REEXPORT_HINT}")


def _run(session, names: list[str], batch: np.ndarray) -> list[np.ndarray]:
    try:
        return session.run(names, {INPUT_NAME: batch})
    except Exception as exc:
        text = str(exc)
        if _OUT_OF_MEMORY.search(text):
            raise MemoryError(_first_line(text)) from None  # worded by bigl.prediction.out_of_memory_error
        raise BundleError(f"ONNX Runtime failed while running the model: {_first_line(text)}", _REEXPORT_HINT) from None


# --------------------------------------------------------------------------------------------
# the engine


class _Graph:
    """One exported network: its session, opened on first use."""

    def __init__(self, path: Path, graph: str, outputs: tuple[str, ...], size: int, *, providers, num_threads,
                 data: bytes | None = None, channels: int = 1):
        self.path, self.graph, self.outputs, self.size, self.channels = path, graph, outputs, size, channels
        self.providers, self.num_threads = providers, num_threads
        self.metadata, self.info, self.header = read_export(path, graph, data=data)
        self._data = data
        self._session = None

    @property
    def session(self):
        if self._session is None:
            data = self._data if self._data is not None else _read_file(self.path)
            session = create_session(self.path, data, self.header, providers=self.providers,
                                     num_threads=self.num_threads)
            check_graph(session, self.info, self.size, self.outputs, self.path, self.channels)
            self._session, self._data = session, None
        return self._session


class OnnxPredictor(Predictor):
    """Runs a BiGL ONNX export on whole volumes with ONNX Runtime (no PyTorch).

    ``path``: the segmenter's ``.onnx`` file (the translator's ``.translator.onnx`` is found beside
    it). ``device``: "auto" (the CUDA execution provider when onnxruntime-gpu has it), "cpu" or
    "cuda"; ``device`` afterwards says where the session really runs (ONNX Runtime falls back to
    the CPU when CUDA cannot start). ``num_threads``: ONNX Runtime's intra-op threads (this
    predictor only). ``flip``, ``postprocess``, ``invert_view``, ``refine_edges`` and ``contrast_search`` left at None take the model's ``inference``
    metadata, as with PyTorch. ``bundle``: the bundle the file is the export of; its current
    metadata (e.g. inference defaults annotated after the export) is used instead of the copy in
    the export, as long as the networks it describes are the same.
    """

    engine = "onnx"

    def __init__(self, path: str | os.PathLike, device: str = "auto", batch_size: int = 16,
                 num_threads: int | None = None, *, flip: bool | None = None, postprocess: bool | None = None,
                 bundle: str | os.PathLike | None = None, invert_view: bool | None = None,
                 refine_edges: bool | None = None, contrast_search: bool | None = None):
        path = Path(path).expanduser()
        self.providers = execution_providers(device)
        check_num_threads(num_threads)
        data = _read_file(path)
        metadata, info, _ = read_export(path, "segmenter", data=data)
        if bundle is not None:
            metadata = _current_metadata(metadata, Path(bundle).expanduser())
        self._setup(metadata, path, batch_size, flip, postprocess, invert_view, refine_edges, contrast_search)
        self.export_info = info
        size = self.preprocessing.image_size
        self.segmenter = _Graph(path, "segmenter", SEGMENTER_OUTPUTS,
                                padded_size(size, self.segmenter_config.size_multiple),
                                providers=self.providers, num_threads=num_threads, data=data,
                                channels=self.segmenter_config.in_channels)
        session = self.segmenter.session  # open it now: errors belong to loading, not to the first scan
        self.device = "cuda" if "CUDAExecutionProvider" in session.get_providers() else "cpu"
        self.translator = None
        #: Why the translator cannot be used (its file missing or not this export's), when the model has one.
        self.translator_problem = None
        if self.translator_config is not None and info.get("translator"):
            self.translator_problem = translator_problem(path, info)
            if self.translator_problem is None:
                self.translator = _Graph(translator_path(path), "translator_t2s", TRANSLATOR_OUTPUTS,
                                         padded_size(size, self.translator_config.size_multiple),
                                         providers=self.providers, num_threads=num_threads)

    @classmethod
    def from_path(cls, path: str | os.PathLike, device: str = "auto", batch_size: int = 16,
                  num_threads: int | None = None, *, flip: bool | None = None,
                  postprocess: bool | None = None, bundle: str | os.PathLike | None = None,
                  invert_view: bool | None = None, refine_edges: bool | None = None,
                  contrast_search: bool | None = None) -> OnnxPredictor:
        return cls(path, device=device, batch_size=batch_size, num_threads=num_threads, flip=flip,
                   postprocess=postprocess, bundle=bundle, invert_view=invert_view, refine_edges=refine_edges,
                   contrast_search=contrast_search)

    @property
    def has_translator(self) -> bool:
        return self.translator is not None

    def no_translator_error(self) -> BundleError:
        if self.translator_problem is None:
            return super().no_translator_error()
        source = self.export_info.get("source") or "MODEL.safetensors"
        return BundleError(self.translator_problem,
                           f"export the model again (`bigl export {source}`) and keep {translator_path(self.model_path).name} "
                           f"beside {self.model_path.name}, or leave out the translated output")

    # ----------------------------------------------------------------------------------------

    def _run_segmenter(self, batch: np.ndarray, attention: bool) -> dict[str, np.ndarray]:
        names = list(SEGMENTER_OUTPUTS) if attention else ["logits"]
        return dict(zip(names, _run(self.segmenter.session, names, batch)))

    def _run_translator(self, batch: np.ndarray) -> np.ndarray:
        return _run(self.translator.session, ["translated"], batch)[0]


#: The parts of the metadata that describe the networks and their input: an export is only run
#: with a bundle's metadata when these are the export's own.
_NETWORK_KEYS = ("segmenter", "translator", "preprocessing", "modality")


def _current_metadata(exported: dict, bundle: Path) -> dict:
    """The bundle's metadata when it describes the exported networks, else the export's copy."""
    from bigl.bundle import read_metadata

    try:
        current = read_metadata(bundle)
    except BundleError:
        return exported
    if all(current.get(key) == exported.get(key) for key in _NETWORK_KEYS):
        return current
    return exported
