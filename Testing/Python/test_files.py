"""``bigl.files``: the output rule, atomic writes with the user's umask, write failures as messages."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bigl.data.io import is_bigl_output, save_volume
from bigl.errors import InputError
from bigl.files import atomic_write_bytes, check_outputs, check_writable_folder, make_folder, same_file, write_error


@pytest.fixture()
def umask():
    """Set the process umask for one test (restored afterwards)."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_nifti(path: Path, *, output: bool = False) -> Path:
    save_volume(path, np.arange(27, dtype=np.uint8).reshape(3, 3, 3) % 3, np.eye(4), output=output)
    return path


# ------------------------------------------------------------------------------ the output rule


def test_an_output_may_not_be_an_input(tmp_path):
    scan = write_nifti(tmp_path / "P.nii.gz")
    with pytest.raises(InputError, match="never overwrites its inputs"):
        check_outputs({"label map": scan}, [scan])


def test_an_output_may_not_lead_to_an_input_through_a_link(tmp_path):
    scan = write_nifti(tmp_path / "in" / "P.nii.gz")
    (tmp_path / "out").mkdir()
    symlink = tmp_path / "out" / "seg.nii.gz"
    symlink.symlink_to(scan)
    hardlink = tmp_path / "out" / "hard.nii.gz"
    os.link(scan, hardlink)
    linked_folder = tmp_path / "in-again"
    linked_folder.symlink_to(scan.parent, target_is_directory=True)
    for output in (symlink, hardlink, linked_folder / "P.nii.gz"):
        with pytest.raises(InputError, match="which this command reads"):
            check_outputs({"label map": output}, [scan])


def test_an_input_folder_stands_for_its_files(tmp_path):
    ref = write_nifti(tmp_path / "refs" / "A_seg.nii.gz")
    with pytest.raises(InputError, match="reads"):
        check_outputs({"table": ref}, [tmp_path / "refs"])


def test_two_outputs_may_not_be_one_file(tmp_path):
    with pytest.raises(InputError, match="would both be written"):
        check_outputs({"label map": tmp_path / "a.nii.gz", "probabilities": tmp_path / "x" / ".." / "a.nii.gz"})


def test_an_output_may_not_be_a_folder(tmp_path):
    with pytest.raises(InputError, match="it is a folder"):
        check_outputs({"table": tmp_path})


def test_beside_the_scans_only_bigl_outputs_are_replaced(tmp_path):
    scan = write_nifti(tmp_path / "P.nii.gz")
    labels = write_nifti(tmp_path / "P_seg.nii.gz")  # the user's label map: no BiGL mark
    earlier = write_nifti(tmp_path / "P_translated.nii.gz", output=True)  # an earlier BiGL result
    assert not is_bigl_output(labels) and is_bigl_output(earlier)
    with pytest.raises(InputError, match="BiGL did not write it"):
        check_outputs({"label map": labels}, [scan], case_folders=[tmp_path])
    check_outputs({"translated image": earlier, "new": tmp_path / "P_new.nii.gz"}, [scan], case_folders=[tmp_path])
    # the same existing file outside the input's folder is an output of an earlier run like any other
    check_outputs({"label map": labels}, [tmp_path / "elsewhere" / "P.nii.gz"], case_folders=[tmp_path / "elsewhere"])


def test_same_file(tmp_path):
    first = tmp_path / "a.txt"
    first.write_text("x")
    (tmp_path / "b.txt").symlink_to(first)
    assert same_file(first, tmp_path / "b.txt") and same_file(first, tmp_path / "." / "a.txt")
    assert not same_file(first, tmp_path / "c.txt") and not same_file(first, None)


# ------------------------------------------------------------------------------ atomic writes


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_files_get_the_umask_permissions(tmp_path, umask, mask, expected):
    umask(mask)
    written = [atomic_write_bytes(tmp_path / "a.bin", b"data"), write_nifti(tmp_path / "v.nii.gz", output=True)]
    for path in written:
        assert mode(path) == expected, f"{path.name}: {oct(mode(path))}"


def test_an_existing_file_is_replaced_whole_and_a_link_is_not_written_through(tmp_path):
    kept = tmp_path / "kept.txt"
    kept.write_bytes(b"user data")
    link = tmp_path / "link.txt"
    link.symlink_to(kept)
    atomic_write_bytes(link, b"new")
    assert kept.read_bytes() == b"user data" and not link.is_symlink() and link.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt", "link.txt"]  # no temporary file left


# ------------------------------------------------------------------------------ write failures


def test_a_file_where_a_folder_is_needed(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    for target in (blocker, blocker / "deeper" / "still"):
        with pytest.raises(InputError, match=f"{blocker} is a file, not a folder"):
            make_folder(target)
    with pytest.raises(InputError, match="not a folder"):
        atomic_write_bytes(blocker / "model.safetensors", b"x")
    assert blocker.read_text() == "not a folder"


def test_a_folder_where_a_file_is_needed(tmp_path):
    with pytest.raises(InputError, match="it is a folder"):
        atomic_write_bytes(tmp_path, b"x")


@pytest.mark.parametrize(
    ("code", "fragment"),
    [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied"), (errno.ENOSPC, "disk is full"),
     (errno.EDQUOT, "quota"), (errno.ENOTDIR, "not a folder")],
)
def test_each_write_failure_has_its_own_message(tmp_path, monkeypatch, code, fragment):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(InputError, match=fragment) as caught:
        atomic_write_bytes(tmp_path / "out.bin", b"x")
    assert str(tmp_path / "out.bin") in caught.value.message and caught.value.hint
    with pytest.raises(InputError, match=fragment):
        check_writable_folder(tmp_path)


def test_write_error_of_an_unknown_operation_says_access_unless_only_writing_fails():
    assert write_error(OSError(errno.EACCES, "Permission denied", "/x"), known_write=False).message.startswith("cannot access /x")
    assert write_error(OSError(errno.ENOSPC, "No space left on device", "/x"), known_write=False).message.startswith("cannot write /x")


def test_a_read_only_folder_is_found_before_anything_is_written(read_only_folder):
    with pytest.raises(InputError, match="read-only|permission denied"):
        check_writable_folder(read_only_folder)
    with pytest.raises(InputError, match="read-only|permission denied"):
        save_volume(read_only_folder / "seg.nii.gz", np.zeros((3, 3, 3), np.uint8), np.eye(4))


def test_a_full_disk_leaves_no_partial_file(full_disk):
    before = sorted(full_disk.iterdir())
    with pytest.raises(InputError, match="disk is full"):
        atomic_write_bytes(full_disk / "big.bin", os.urandom(1 << 20))
    assert sorted(full_disk.iterdir()) == before


def test_bigl_outputs_are_marked_in_their_header(tmp_path):
    marked = write_nifti(tmp_path / "a.nii.gz", output=True)
    plain = write_nifti(tmp_path / "b.nii.gz")
    assert nib.load(str(marked)).header["descrip"].tobytes().startswith(b"BiGL output")
    assert is_bigl_output(marked) and not is_bigl_output(plain) and not is_bigl_output(tmp_path / "missing.nii.gz")
