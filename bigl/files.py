"""Writing files safely: the one place every BiGL command writes through.

Three promises, kept here so that every command keeps them the same way:

* **Nothing a user owns is overwritten.** :func:`check_outputs` is the rule for every output a
  command writes: it may not be, or resolve to (symbolic or hard links included), a file the
  command reads; two outputs may not be one file; and in a folder that holds the command's input
  scans (a case folder, or the input folder of ``bigl segment -i DIR``) an existing image or label
  map is replaced only when BiGL wrote it itself (:func:`bigl.data.io.is_bigl_output`), so a
  case's ground-truth label map beside its scan always survives.
* **Readers never see half a file.** :func:`atomic_output` and :func:`atomic_outputs` write to a
  temporary file beside the target, flush it to disk and rename it over the target, so an output
  of an earlier run is replaced whole or not at all, and a link at the target is replaced rather
  than written through. The file gets the permissions the user's umask gives new files (not the
  0600 of a temporary file).
* **A failed write is a message, not a traceback.** :func:`write_error` turns an ``OSError``
  (read-only location, a file where a folder is needed, a folder where a file is needed, no
  permission, disk full) into an :class:`~bigl.errors.InputError` naming the path and the fix; the
  helpers here raise it, and the command line uses it for any ``OSError`` that still escapes.

Standard library only (``nibabel`` is imported only to check an existing NIfTI file).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence, Union

from bigl.errors import InputError

PathLike = Union[str, os.PathLike]

#: errno -> (what happened, how to fix it), for the write failures a user can cause.
_WRITE_PROBLEMS: dict[int, tuple[str, str]] = {
    errno.EROFS: ("the location is on a read-only file system",
                  "choose an output location on a writable disk"),
    errno.EACCES: ("permission denied",
                   "choose a folder you may write to, or change the folder's permissions"),
    errno.EPERM: ("the operation is not permitted there",
                  "choose a folder you may write to, or change the folder's permissions"),
    errno.ENOSPC: ("the disk is full",
                   "free some space, or choose an output location on another disk"),
    errno.EDQUOT: ("the disk quota is used up",
                   "free some space, or choose an output location on another disk"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder",
                    "choose an output path whose folders are folders (or remove the file in the way)"),
    errno.EEXIST: ("a file is in the way where a folder is needed",
                   "choose another output path, or remove the file in the way"),
    errno.EISDIR: ("it is a folder, not a file",
                   "give a file name (inside that folder, for instance)"),
    errno.ENAMETOOLONG: ("the file name is too long", "choose a shorter output path"),
    errno.EFBIG: ("the file is too large for this file system", "choose an output location on another disk"),
}


#: Failures that only writing causes (any other may come from reading too).
_WRITE_ONLY = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def write_error(exc: OSError, path: PathLike | None = None, *, known_write: bool = True) -> InputError:
    """The :class:`InputError` for a failed write of ``path`` (default: the path the error names).

    ``known_write=False`` (an ``OSError`` from somewhere unknown) says "cannot access" unless the
    failure is one only writing causes."""
    target = path if path is not None else exc.filename
    verb = "write" if known_write or exc.errno in _WRITE_ONLY else "access"
    reason = exc.strerror or str(exc) or type(exc).__name__
    problem, hint = _WRITE_PROBLEMS.get(exc.errno, (None, "check that the output location exists and is writable"))
    where = f" {target}" if target is not None else ""
    detail = reason if problem is None else problem if reason.lower() in problem else f"{problem} ({reason})"
    return InputError(f"cannot {verb}{where}: {detail}", hint)


@contextlib.contextmanager
def write_errors(path: PathLike | None = None) -> Iterator[None]:
    """Turn an ``OSError`` raised in the block into :func:`write_error` of ``path``."""
    try:
        yield
    except OSError as exc:
        raise write_error(exc, path) from None


def _umask() -> int:
    """The process umask (read without changing it where the platform tells it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """Permissions of a new regular file under the current umask (e.g. 0644 for umask 022)."""
    return 0o666 & ~_umask()


def _extension(path: Path) -> str:
    """The suffix a temporary file must keep for the writer to pick the format (``.nii.gz``, ``.png``)."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix


def make_folder(path: PathLike) -> Path:
    """Create a folder and its parents (if missing); :func:`write_error` when that is impossible."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # the path, or a folder on it, is a file
        raise InputError(f"cannot write to {path}: {_blocking_file(path)} is a file, not a folder",
                         "choose another output folder, or remove or rename that file") from None
    except OSError as exc:
        raise write_error(exc, path) from None
    return path


def _blocking_file(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return path


def check_writable_folder(path: PathLike) -> Path:
    """Create the folder if needed and prove it takes a file (a read-only mount passes ``mkdir``
    checks of folders that exist, and ``os.access`` misleads root); InputError otherwise."""
    folder = make_folder(path)
    try:
        fd, probe = tempfile.mkstemp(prefix=".bigl-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise write_error(exc, folder) from None
    return folder


def _fsync(path: Path, *, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return  # not every platform can open folders
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_outputs(paths: Sequence[PathLike]) -> Iterator[list[Path]]:
    """Temporary files beside each of ``paths``, renamed over them when the block succeeds.

    The block writes the temporary files (their names keep the targets' extensions, so writers
    that go by the name still work); then each is flushed to disk, given the umask's permissions
    and renamed into place. If anything fails, every temporary file is removed and no target is
    touched; an ``OSError`` becomes :func:`write_error` naming the output it concerns.
    """
    targets = [Path(p).expanduser() for p in paths]
    temporaries: list[Path] = []
    current = targets[0] if targets else None
    try:
        for target in targets:
            current = target
            make_folder(target.parent)
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{_extension(target)}",
                                        dir=target.parent)
            os.close(fd)
            temporaries.append(Path(name))
        try:
            yield list(temporaries)
        except OSError as exc:
            by_temporary = {str(tmp): target for tmp, target in zip(temporaries, targets)}
            current = by_temporary.get(str(exc.filename), targets[0] if targets else None)
            raise
        mode = new_file_mode()
        for tmp, target in zip(temporaries, targets):
            current = target
            _fsync(tmp)
            os.chmod(tmp, mode)
        for tmp, target in zip(temporaries, targets):
            current = target
            os.replace(tmp, target)
        for folder in dict.fromkeys(target.parent for target in targets):
            _fsync(folder, directory=True)  # make the renames themselves durable
    except OSError as exc:
        _remove(temporaries)
        raise write_error(exc, current) from None
    except BaseException:
        _remove(temporaries)
        raise


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """:func:`atomic_outputs` for one file: ``with atomic_output(p) as tmp: write(tmp)``."""
    with atomic_outputs([path]) as (temporary,):
        yield temporary


def atomic_write_bytes(path: PathLike, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` atomically (see :func:`atomic_outputs`); returns the path."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as stream:
            stream.write(payload)
    return Path(path).expanduser()


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _remove(paths: Iterable[Path]) -> None:
    for path in paths:
        try:
            Path(path).unlink(missing_ok=True)
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# the rule for outputs


def _identity(path: Path) -> tuple[Path, tuple[int, int] | None]:
    """(where the path leads, following links; (device, inode) when it exists)."""
    resolved = path.resolve()
    try:
        stat = os.stat(path)
    except OSError:
        return resolved, None
    return resolved, (stat.st_dev, stat.st_ino)


def same_file(a: PathLike | None, b: PathLike | None) -> bool:
    """True when both paths lead to one file (the same path, or a link to it)."""
    if a is None or b is None:
        return False
    first, second = _identity(Path(a).expanduser()), _identity(Path(b).expanduser())
    return first[0] == second[0] or (first[1] is not None and first[1] == second[1])


def check_outputs(
    outputs: Mapping[str, PathLike],
    inputs: Iterable[PathLike] = (),
    *,
    case_folders: Iterable[PathLike] = (),
    hint: str = "choose another output name or folder",
) -> None:
    """The rule for the outputs of one command (``{what: path}``); InputError at the first breach.

    * an output may not be, or resolve to (symbolic or hard links included), any of ``inputs``
      (files the command reads; a folder among them stands for the files directly inside it);
    * two outputs may not be the same file, and an output may not be an existing folder;
    * in ``case_folders`` (folders that hold the command's input scans), an existing NIfTI file
      at an output path is replaced only if BiGL wrote it as an output: an image or label map
      of the case (e.g. ``P_seg.nii.gz`` beside ``P.nii.gz``) is never replaced.
    """
    read: dict[Path | tuple[int, int], Path] = {}
    for given in inputs:
        if given is None:
            continue
        given = Path(given).expanduser()
        members = [p for p in given.iterdir() if p.is_file()] if given.is_dir() else [given]
        for member in members:
            resolved, inode = _identity(member)
            read.setdefault(resolved, member)
            if inode is not None:
                read.setdefault(inode, member)
    folders = {Path(folder).expanduser().resolve() for folder in case_folders if folder is not None}
    written: dict[Path, str] = {}
    for what, given in outputs.items():
        path = Path(given).expanduser()
        if path.is_dir():
            raise InputError(f"cannot write the {what} to {path}: it is a folder", "give a file name")
        place = path.parent.resolve() / path.name  # where the rename puts the file
        resolved, inode = _identity(path)
        source = read.get(resolved) or read.get(place) or (read.get(inode) if inode is not None else None)
        if source is not None:
            how = "is" if place == source.resolve() else "leads (through a link) to"
            raise InputError(
                f"cannot write the {what} to {path}: it {how} {source}, which this command reads "
                "(BiGL never overwrites its inputs)",
                hint,
            )
        for key in {place, resolved}:
            if key in written:
                raise InputError(f"the {written[key]} and the {what} would both be written to {path}",
                                 "give each output its own file name")
            written[key] = what
        if place.parent in folders and os.path.lexists(path) and _is_foreign_image(path):
            raise InputError(
                f"cannot write the {what} to {path}: that file is beside the input scans and BiGL did not write it "
                "(it may be a label map or an image of the case), so BiGL leaves it as it is",
                f"{hint}; or move the file away first if it really should be replaced",
            )


def _is_foreign_image(path: Path) -> bool:
    """True for an existing NIfTI file that is not an output BiGL wrote."""
    from bigl.data.naming import is_nifti_path

    if not is_nifti_path(path):
        return False
    from bigl.data.io import is_bigl_output

    return not is_bigl_output(path)
