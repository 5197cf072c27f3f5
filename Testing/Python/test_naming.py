"""bigl.data.naming: case names, modalities stated by file names, the files `bigl segment` writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bigl.data import naming
from bigl.data.naming import (
    MODALITIES,
    MODALITY_ALIASES,
    attention_paths,
    case_name,
    is_nifti_path,
    is_output_name,
    modality_from_name,
    normalise_modality,
    output_path,
)
from bigl.errors import InputError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name, case", [
    ("Brats18_X_1_t2.nii.gz", "Brats18_X_1_t2"),
    ("/data/scan.NII.GZ", "scan"),
    ("scan.nii", "scan"),
    ("scan.tar.gz", "scan.tar.gz"),
    ("my.scan.v2.nii.gz", "my.scan.v2"),
])
def test_case_name_strips_only_nifti_suffixes(name, case):
    assert case_name(name) == case


def test_nifti_paths():
    assert is_nifti_path("a.nii") and is_nifti_path(Path("b.NII.gz"))
    assert not is_nifti_path("a.nii.zip") and not is_nifti_path("a.mha")


def test_modality_from_file_name():
    assert modality_from_name("Brats18_X_1_t2.nii.gz") == "t2"
    assert modality_from_name("BraTS-GLI-00001-000-t1c.nii.gz") == "t1ce"
    assert modality_from_name("case_FLAIR.nii") == "flair"
    assert modality_from_name("patient7.nii.gz") is None
    assert modality_from_name("scan_2.nii.gz") is None
    assert modality_from_name("case_seg.nii.gz") is None


def test_every_alias_is_understood_in_names_and_file_names():
    assert set(MODALITY_ALIASES.values()) == set(MODALITIES)
    for alias, canonical in MODALITY_ALIASES.items():
        assert normalise_modality(alias.upper()) == canonical
        assert modality_from_name(f"Case_007_{alias.upper()}.nii.gz") == canonical
        assert modality_from_name(f"BraTS-GLI-00007-000-{alias}.nii") == canonical
    assert normalise_modality(" T1-ce ") == "t1ce"
    with pytest.raises(InputError, match="unknown modality 'pd'") as error:
        normalise_modality("pd")
    assert "t1, t1ce, t2, flair" in error.value.hint


def test_brats_and_the_package_reexport_the_naming_helpers():
    """Callers of bigl.data.brats keep working; bigl.data exports the helpers lazily."""
    import bigl.data
    from bigl.data import brats

    assert brats.normalise_modality is normalise_modality and brats.MODALITIES is MODALITIES
    for name in ("MODALITIES", "normalise_modality", "modality_from_name", "case_name", "is_nifti_path",
                 "output_path", "attention_paths", "is_output_name"):
        assert getattr(bigl.data, name) is getattr(naming, name)
        assert name in bigl.data.__all__


def test_output_names_round_trip(tmp_path):
    paths = {
        "labels": output_path(tmp_path, "c1", "labels"),
        "translated": output_path(tmp_path, "c1", "translated"),
        **{f"attention_{k}": p for k, p in attention_paths(tmp_path, "c1").items()},
    }
    assert paths["labels"] == tmp_path / "c1_seg.nii.gz"
    assert paths["attention_position"] == tmp_path / "c1_attention_position.nii.gz"
    assert all(is_output_name(p) and case_name(p).startswith("c1_") for p in paths.values())
    assert not is_output_name(tmp_path / "c1_t2.nii.gz") and not is_output_name(tmp_path / "segment.nii.gz")
    with pytest.raises(ValueError, match="unknown output"):
        output_path(tmp_path, "c1", "logits")


def test_imports_only_the_standard_library():
    code = ("import sys\n"
            "for name in ('numpy', 'nibabel', 'torch'):\n"
            "    sys.modules[name] = None\n"
            "from bigl.data.naming import case_name, attention_paths, is_output_name, normalise_modality\n"
            "from bigl.data import modality_from_name\n"
            "print(case_name('x_t1.nii.gz'), sorted(attention_paths('.', 'x')), modality_from_name('x-t2w.nii.gz'),\n"
            "      normalise_modality('T1c'))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["x_t1", "['channel',", "'position']", "t2", "t1ce"]
