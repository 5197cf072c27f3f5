"""Tests of bigl.data.io: NIfTI round trips, the checks on bad files, grid checks and check_scan."""

from __future__ import annotations

import gzip
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from bigl.data.io import Volume, check_same_grid, check_scan, load_volume, read_grid, save_volume
from bigl.errors import InputError

LPS = np.array([[-1.0, 0, 0, 7], [0, -1.0, 0, 7], [0, 0, 1.0, 0], [0, 0, 0, 1]])


def _write_raw(path, data, affine=LPS):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_save_load_round_trip_keeps_data_dtype_and_affine(tmp_path, suffix):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 3000, size=(8, 9, 7)).astype(np.int16)
    affine = np.array([[-0.9, 0, 0, 10.0], [0, -0.9, 0, 12.0], [0, 0, 2.5, -4.0], [0, 0, 0, 1]])
    path = save_volume(tmp_path / "sub" / f"scan{suffix}", data, affine)
    assert path.exists() and path.parent.name == "sub"
    volume = load_volume(path)
    assert volume.data.dtype == np.int16
    np.testing.assert_array_equal(volume.data, data)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-6)
    assert volume.spacing == pytest.approx((0.9, 0.9, 2.5), abs=1e-6)
    assert volume.path == path
    header = nib.load(str(path)).header
    assert int(header["sform_code"]) == 1 and int(header["qform_code"]) == 1


def test_save_volume_default_dtypes(tmp_path):
    mask = np.zeros((4, 4, 4), dtype=bool)
    mask[1, 2, 3] = True
    assert nib.load(str(save_volume(tmp_path / "m.nii.gz", mask, LPS))).get_data_dtype() == np.uint8
    values = np.linspace(0, 1, 64, dtype=np.float64).reshape(4, 4, 4)
    loaded = load_volume(save_volume(tmp_path / "f.nii.gz", values, LPS))
    assert loaded.data.dtype == np.float32
    np.testing.assert_allclose(loaded.data, values, atol=1e-6)
    as_int16 = save_volume(tmp_path / "i.nii.gz", values * 100, LPS, dtype=np.int16)
    assert load_volume(as_int16).data.dtype == np.int16


def _oblique_reference(path, image_class=nib.Nifti1Image, codes=(1, 2)):
    """An int16 scan with an oblique affine, given qform/sform codes, intensity scaling and a description."""
    angle = np.deg2rad(13)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine[:3, :3] = np.diag([-1, -1, 1]) @ affine[:3, :3] @ np.diag([0.9, 1.3, 2.5])
    affine[:3, 3] = [91.5, 120.25, -62.0]
    image = image_class(np.arange(6 * 7 * 5, dtype=np.int16).reshape(6, 7, 5), affine)
    image.set_qform(affine, code=codes[0])
    image.set_sform(affine, code=codes[1])
    image.header.set_slope_inter(2.0, 10.0)
    image.header["descrip"] = b"scanner T2"
    image.header.set_xyzt_units("mm", "msec")
    nib.save(image, str(path))
    return path


def test_save_volume_like_a_reference_keeps_its_grid_exactly(tmp_path):
    reference = _oblique_reference(tmp_path / "ref.nii.gz")
    source = nib.load(str(reference))
    labels = np.zeros((6, 7, 5), np.uint8)
    labels[2:4, 3:5, 1:3] = 4
    out = save_volume(tmp_path / "labels.nii.gz", labels, source.affine, like=reference)
    written = nib.load(str(out))
    for field in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x",
                  "srow_x", "srow_y", "srow_z", "pixdim", "xyzt_units"):
        np.testing.assert_array_equal(written.header[field], source.header[field], err_msg=field)
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels)  # the scan's scaling is not applied
    assert bytes(written.header["descrip"]).strip(b"\0") == b""
    # the probabilities of a scan: 4D on a 3D reference
    probabilities = np.random.default_rng(0).random((6, 7, 5, 4)).astype(np.float32)
    written = nib.load(str(save_volume(tmp_path / "p.nii", probabilities, source.affine, like=reference)))
    assert written.shape == (6, 7, 5, 4) and np.allclose(written.affine, source.affine)
    np.testing.assert_array_equal(written.get_fdata(dtype=np.float32), probabilities)


def test_save_volume_like_a_reference_with_another_affine(tmp_path):
    reference = _oblique_reference(tmp_path / "ref.nii.gz", codes=(1, 2))
    moved = nib.load(str(reference)).affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    written = nib.load(str(save_volume(tmp_path / "half.nii.gz", np.ones((3, 3, 3)), moved, like=reference)))
    np.testing.assert_allclose(written.header.get_sform(), moved, atol=1e-6)
    np.testing.assert_allclose(written.header.get_qform(), moved, atol=1e-5)
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (1, 2)
    uncoded = _oblique_reference(tmp_path / "uncoded.nii", codes=(0, 0))
    written = nib.load(str(save_volume(tmp_path / "u.nii.gz", np.ones((3, 3, 3)), moved, like=uncoded)))
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (1, 1)
    np.testing.assert_allclose(written.affine, moved, atol=1e-6)


def test_save_volume_like_a_nifti2_reference(tmp_path):
    reference = _oblique_reference(tmp_path / "ref2.nii.gz", image_class=nib.Nifti2Image)
    source = nib.load(str(reference))
    written = nib.load(str(save_volume(tmp_path / "o.nii.gz", np.ones((6, 7, 5)), source.affine, like=reference)))
    assert isinstance(written, nib.Nifti2Image)
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-9)


def test_save_volume_like_a_missing_reference(tmp_path):
    with pytest.raises(InputError, match="not found"):
        save_volume(tmp_path / "o.nii.gz", np.ones((3, 3, 3)), LPS, like=tmp_path / "absent.nii.gz")
    assert not (tmp_path / "o.nii.gz").exists()


def test_save_volume_refuses_non_nifti_name(tmp_path):
    with pytest.raises(InputError, match=r"\.nii"):
        save_volume(tmp_path / "out.png", np.zeros((4, 4, 4)), LPS)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(InputError, match="not found") as info:
        load_volume(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(info.value) and info.value.hint


def test_folder_is_refused(tmp_path):
    with pytest.raises(InputError, match="folder"):
        load_volume(tmp_path)


def test_other_formats_are_refused_with_a_conversion_hint(tmp_path):
    png = tmp_path / "slice.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(InputError, match="not a NIfTI") as info:
        load_volume(png)
    assert "slice.png" in str(info.value) and "convert" in info.value.hint.lower()


@pytest.mark.parametrize(
    "name, content",
    [
        ("text.nii.gz", b"hello, I am a text file\n"),
        ("png.nii.gz", b"\x89PNG\r\n\x1a\n" + b"\0" * 400),
        ("png.nii", b"\x89PNG\r\n\x1a\n" + b"\0" * 400),
        ("gzipped_text.nii.gz", gzip.compress(b"not a header " * 40)),
    ],
)
def test_files_renamed_to_nifti_are_refused(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match="cannot read") as info:
        load_volume(path)
    assert name in str(info.value) and "NIfTI" in info.value.hint


def test_truncated_file_is_refused(tmp_path):
    good = save_volume(tmp_path / "good.nii", np.ones((16, 16, 16), np.float32), LPS)
    broken = tmp_path / "broken.nii"
    broken.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(InputError, match="broken.nii"):
        load_volume(broken)


@pytest.mark.parametrize("shape", [(16, 16), (16, 16, 1)])
def test_2d_images_are_refused(tmp_path, shape):
    path = _write_raw(tmp_path / "slice.nii.gz", np.ones(shape, np.int16))
    with pytest.raises(InputError, match="2D") as info:
        load_volume(path)
    assert "slice.nii.gz" in str(info.value)
    with pytest.raises(InputError, match="2D"):
        read_grid(path)


def test_4d_with_singleton_fourth_axis_is_squeezed(tmp_path):
    data = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4, 1)
    volume = load_volume(_write_raw(tmp_path / "one.nii.gz", data))
    assert volume.data.shape == (6, 5, 4)
    np.testing.assert_array_equal(volume.data, data[..., 0])
    assert read_grid(tmp_path / "one.nii.gz")[0] == (6, 5, 4)


def test_4d_series_is_refused(tmp_path):
    path = _write_raw(tmp_path / "series.nii.gz", np.ones((6, 5, 4, 3), np.int16))
    with pytest.raises(InputError, match="4D") as info:
        load_volume(path)
    assert "3 volumes" in str(info.value) and "split" in info.value.hint


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(tmp_path, bad):
    data = np.ones((6, 6, 6), np.float32)
    data[1, 2, 3] = bad
    data[4, 4, 4] = bad
    with pytest.raises(InputError, match="2 NaN or infinite") as info:
        load_volume(_write_raw(tmp_path / "nan.nii.gz", data))
    assert "nan.nii.gz" in str(info.value)


def test_labels_are_checked_and_returned_as_uint8(tmp_path):
    labels = np.zeros((6, 6, 6), np.float32)
    labels[2:4, 2:4, 2:4] = 4
    labels[3, 3, 3] = 1
    volume = load_volume(_write_raw(tmp_path / "seg.nii.gz", labels), kind="labels")
    assert volume.data.dtype == np.uint8
    np.testing.assert_array_equal(volume.data, labels.astype(np.uint8))

    image_like = labels + 0.5
    with pytest.raises(InputError, match="non-integer"):
        load_volume(_write_raw(tmp_path / "img.nii.gz", image_like), kind="labels")
    negative = labels.astype(np.int16)
    negative[0, 0, 0] = -1
    with pytest.raises(InputError, match="not label values"):
        load_volume(_write_raw(tmp_path / "neg.nii.gz", negative), kind="labels")


def _volume(shape=(6, 7, 8), affine=LPS, name="a.nii.gz"):
    from pathlib import Path

    return Volume(np.zeros(shape, np.int16), np.asarray(affine, float), Path("/data") / name)


def test_check_same_grid_accepts_matching_grids_within_tolerance():
    nudged = LPS.copy()
    nudged[0, 3] += 1e-5
    check_same_grid({"t1": _volume(), "t2": _volume(affine=nudged, name="b.nii.gz")})


def test_check_same_grid_names_the_file_with_another_shape():
    with pytest.raises(InputError, match="shape") as info:
        check_same_grid({"t1": _volume(), "t2": _volume((6, 7, 9), name="t2.nii.gz"), "seg": _volume()})
    assert str(info.value).startswith("t2 (t2.nii.gz) has shape (6, 7, 9)")
    assert "resample" in info.value.hint.lower()


def test_check_same_grid_names_the_file_with_another_affine():
    moved = LPS.copy()
    moved[2, 3] += 2.0
    with pytest.raises(InputError, match="position/orientation") as info:
        check_same_grid({"t1": _volume(), "flair": _volume(affine=moved, name="f.nii.gz")})
    assert "flair" in str(info.value) and "2 mm" in str(info.value)


def test_check_scan_accepts_an_mr_image():
    rng = np.random.default_rng(1)
    scan = np.zeros((20, 20, 20), np.int16)
    scan[4:16, 4:16, 4:16] = rng.integers(100, 900, size=(12, 12, 12))
    check_scan(scan)
    check_scan(np.linspace(0, 4, 1000).reshape(10, 10, 10))  # low values but not integers


@pytest.mark.parametrize("value", [0, 7])
def test_check_scan_refuses_constant_volumes(value):
    with pytest.raises(InputError, match="constant") as info:
        check_scan(Volume(np.full((8, 8, 8), value, np.int16), LPS, None), name="scan.nii.gz")
    assert "scan.nii.gz" in str(info.value)


@pytest.mark.parametrize("values", [(0, 1), (0, 1, 2, 4), (0, 2, 3)])
def test_check_scan_refuses_label_maps(values):
    labels = np.zeros((8, 8, 8), np.uint8)
    for i, value in enumerate(values):
        labels[i, :, :] = value
    with pytest.raises(InputError, match="label map") as info:
        check_scan(labels)
    assert "MR scan" in info.value.hint


def test_importing_bigl_data_does_not_import_torch():
    code = "import sys, bigl.data, bigl.data.io, bigl.data.brats; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
