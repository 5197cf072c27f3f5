"""The files of tensors BiGL writes and reads back: model bundles, translator files, checkpoints.

All three are safetensors files (an 8-byte little-endian header length, a JSON header, then the
raw tensor data). :func:`encode` adds two entries to the header's string metadata:
``"bigl_sha256"``, the SHA-256 of the tensor data (every byte after the header), and
``"bigl_header_sha256"``, that of the header itself without these two entries (the metadata, such
as a checkpoint's step, random states and settings, and the tensor names, types and shapes).
:func:`read_header` checks the second and :func:`read_tensors` both, so a file damaged after BiGL
wrote it (bit flips, bytes overwritten, a bad copy or download) is refused instead of giving a
slightly different or an empty result; and weights that are NaN or infinite are refused whether
the file has digests or not (files written before digests existed have none, or only the first,
and still load).

:func:`read_header` and :func:`verify_digest` use the standard library only (a GUI can list and
check models before PyTorch is installed); the rest imports :mod:`safetensors` and torch when
called.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    import torch

PathLike = Union[str, os.PathLike]

#: Header metadata key holding the hex SHA-256 of the tensor data.
DIGEST_KEY = "bigl_sha256"
#: Header metadata key holding the hex SHA-256 of the rest of the header (:func:`_header_digest`).
HEADER_DIGEST_KEY = "bigl_header_sha256"
#: Bytes per element of the safetensors dtypes BiGL reads (all but the sub-byte ones).
_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
#: The largest header safetensors itself accepts.
_MAX_HEADER_BYTES = 100_000_000
_CHUNK = 1 << 22


class DamagedFile(ValueError):
    """The file is a well-formed safetensors file whose content is not what BiGL wrote."""


def _header_length(prefix: bytes, file_size: int) -> int:
    if len(prefix) < 8:
        raise ValueError("shorter than a safetensors header")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > _MAX_HEADER_BYTES or file_size - 8 - length < 0:
        raise ValueError(f"the header length {length} does not fit the file")
    return length


def _decode_header(raw: bytes, data_bytes: int) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(metadata strings, tensor shapes), checked as safetensors checks them; ValueError otherwise."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.get("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("the header metadata is not a map of strings")
    header.pop("__metadata__", None)
    shapes: dict[str, tuple[int, ...]] = {}
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (start, stop) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            valid = (dtype in _DTYPE_SIZES and all(isinstance(n, int) and n >= 0 for n in shape)
                     and isinstance(start, int) and isinstance(stop, int)
                     and stop - start == math.prod(shape) * _DTYPE_SIZES[dtype])
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise ValueError(f"the entry of tensor {name!r} is invalid")
        shapes[name] = shape
        spans.append((start, stop))
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            raise ValueError("the tensor data offsets overlap or leave gaps")
        end = stop
    if end != data_bytes:
        raise ValueError(f"the tensors need {end} bytes of data but the file holds {data_bytes}")
    if HEADER_DIGEST_KEY in metadata and metadata[HEADER_DIGEST_KEY] != _header_digest({**header, "__metadata__": metadata}):
        raise DamagedFile("its header (settings, tensor names or shapes) does not match the checksum recorded "
                          "when BiGL wrote it (some bytes changed since)")
    return metadata, shapes


def read_header(path: PathLike) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(metadata strings, tensor shapes) of a safetensors file, reading the header only.

    ValueError (with the reason) for a malformed or truncated file, OSError when it cannot be read.
    """
    path = Path(path)
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        length = _header_length(stream.read(8), size)
        raw = stream.read(length)
    return _decode_header(raw, size - 8 - length)


def verify_digest(path: PathLike) -> bool:
    """True when the file's digest matches its tensor data, False when it has no digest (written
    before BiGL recorded one); :class:`DamagedFile` when it does not match. Reads in chunks."""
    path = Path(path)
    metadata, _ = read_header(path)
    expected = metadata.get(DIGEST_KEY)
    if expected is None:
        return False
    _compare(expected, _hash_data(path))
    return True


def data_digest(path: PathLike) -> str:
    """The hex SHA-256 of the file's tensor data (every byte after the header): the one recorded in
    the header (``bigl_sha256``) when BiGL wrote the file, else computed the same way. It changes
    with the weights only, not with the metadata (e.g. :func:`bigl.bundle.annotate_bundle`).
    Standard library only; ValueError for a malformed file, OSError when it cannot be read."""
    metadata, _ = read_header(path)
    recorded = metadata.get(DIGEST_KEY)
    return recorded if isinstance(recorded, str) and recorded else _hash_data(Path(path))


def _hash_data(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        stream.seek(8 + _header_length(stream.read(8), size))
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _header_digest(header: dict) -> str:
    """SHA-256 of a parsed header without the two digest entries, in a canonical JSON form."""
    metadata = {k: v for k, v in (header.get("__metadata__") or {}).items() if k not in (DIGEST_KEY, HEADER_DIGEST_KEY)}
    canonical = {**{k: v for k, v in header.items() if k != "__metadata__"}, "__metadata__": metadata}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _compare(expected: str, actual: str) -> None:
    if expected != actual:
        raise DamagedFile("its tensor data does not match the checksum recorded when BiGL wrote it "
                          "(some bytes changed since)")


def encode(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors bytes of ``tensors`` with ``metadata`` and the digest of the tensor data."""
    from safetensors.torch import save

    payload = save(tensors, metadata={key: value for key, value in metadata.items() if key not in (DIGEST_KEY, HEADER_DIGEST_KEY)})
    length = _header_length(payload[:8], len(payload))
    header = json.loads(payload[8:8 + length])
    data = memoryview(payload)[8 + length:]
    header["__metadata__"] = {**(header.get("__metadata__") or {}), DIGEST_KEY: hashlib.sha256(data).hexdigest(),
                              HEADER_DIGEST_KEY: _header_digest(header)}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the tensor data 8-byte aligned, as safetensors does
    return b"".join((struct.pack("<Q", len(raw)), raw, data))


def read_tensors(path: PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata strings, tensors on the CPU) of a tensor file, verified.

    ValueError for a malformed or truncated file, :class:`DamagedFile` for data that does not
    match the digest or for NaN / infinite floating-point values, OSError when it cannot be read.
    """
    from safetensors.torch import load

    raw = Path(path).read_bytes()
    length = _header_length(raw[:8], len(raw))
    metadata, _ = _decode_header(raw[8:8 + length], len(raw) - 8 - length)
    if DIGEST_KEY in metadata:
        _compare(metadata[DIGEST_KEY], hashlib.sha256(memoryview(raw)[8 + length:]).hexdigest())
    tensors = load(raw)
    del raw
    check_finite(tensors)
    return metadata, tensors


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """:class:`DamagedFile` naming the first floating-point tensor with NaN or infinite values."""
    import torch

    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise DamagedFile(f"tensor {name} holds {bad} NaN or infinite value(s)")
