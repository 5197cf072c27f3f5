"""The dataset check shown before a run: cases per modality, labels, grid problems, run estimate."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bigl.runplan import estimate_run, seconds_per_sample
from BiGLTrainingLib.datasetcheck import check_datasets
from bigl.training.config import load_config


@pytest.fixture
def cases(phantom_cases, tmp_path):
    """A private copy of the phantom cohort that a test may damage."""
    return shutil.copytree(phantom_cases, tmp_path / "cases")


def test_clean_cohort_is_ready(cases):
    config = load_config("cpu")
    report = check_datasets(cases, "T1", cases, "t2w", config=config, device="cpu")
    assert report.ok and not report.problems
    assert report.source.cases_found == 3 and report.source.labelled == 3
    assert report.source.cases_by_modality == {"t1": 3, "t1ce": 0, "t2": 3, "flair": 0}
    assert report.source.usable == report.target.usable == ["Phantom_001", "Phantom_002", "Phantom_003"]
    assert report.source.slices == 3 * 48  # header shape along the slice axis
    assert report.paired_cases == 3
    estimate = report.estimate
    assert estimate.translator_steps == config["translator_training"]["iterations"]
    assert estimate.adapt_steps == config["adapt"]["iterations"]
    assert estimate.device_kind == "cpu" and estimate.seconds > 0
    text = report.as_text()
    assert "3 usable" in text and "ready to train" in text and "rough time on CPU" in text


def test_unlabelled_source_case_is_left_out_of_the_source_only(cases):
    (cases / "Phantom_002" / "Phantom_002_seg.nii.gz").unlink()
    report = check_datasets(cases, "t1", cases, "t2")
    assert report.ok
    assert report.source.usable == ["Phantom_001", "Phantom_003"]
    assert "no label map" in report.source.excluded["Phantom_002"]
    assert report.target.usable == ["Phantom_001", "Phantom_002", "Phantom_003"]  # the target needs no labels
    assert [p.level for p in report.problems] == ["warning"]
    assert "data.exclude" in report.problems[0].hint
    assert report.excluded_cases == ["Phantom_002"]


def test_case_whose_files_are_not_on_one_grid_is_left_out(cases):
    path = cases / "Phantom_003" / "Phantom_003_t2.nii.gz"
    image = nib.load(str(path))
    shifted = image.affine.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), shifted), str(path))
    report = check_datasets(cases, "t1", cases, "t2")
    assert report.ok  # two good cases remain
    assert "Phantom_003" in report.source.excluded and "Phantom_003" in report.target.excluded
    assert "affine" in report.source.excluded["Phantom_003"] or "position" in report.source.excluded["Phantom_003"]
    assert report.paired_cases == 2
    assert "left out (source) Phantom_003" in report.as_text()


def test_unreadable_file_is_a_problem_not_a_crash(cases):
    (cases / "Phantom_001" / "Phantom_001_t2.nii.gz").write_bytes(b"not a nifti file")
    report = check_datasets(cases, "t1", cases, "t2")
    assert "Phantom_001" in report.target.excluded
    assert report.ok


@pytest.mark.parametrize(
    "source, modality, expected",
    [
        ("missing", "t1", "data folder not found"),
        ("cases", "flair", "none of the 3 case(s)"),
        ("cases", "t9", "unknown modality"),
    ],
)
def test_errors_block_the_start(cases, tmp_path, source, modality, expected):
    folder = tmp_path / source if source == "missing" else cases
    report = check_datasets(folder, modality, cases, "t2", config=load_config("cpu"))
    assert not report.ok and report.estimate is None
    assert any(expected in p.message for p in report.errors), report.as_text()
    assert "NOT ready" in report.as_text()


def test_same_modality_from_the_same_folder_is_nothing_to_adapt(cases):
    report = check_datasets(cases, "t2", cases, "t2")
    assert not report.ok and "no domain gap" in report.errors[0].message
    spelled_otherwise = cases.parent / "." / cases.name
    assert not check_datasets(cases, "t2", [spelled_otherwise], "t2").ok


def test_same_modality_from_other_folders_is_a_scanner_to_scanner_run(cases, tmp_path):
    """As in bigl train: one modality from separate folders (two scanners) is a real adaptation,
    and data.allow_same_modality permits even the same folder."""
    other = Path(shutil.copytree(cases, tmp_path / "scanner_b"))
    report = check_datasets(cases, "t2", other, "t2", config=load_config("cpu"))
    assert not any("domain gap" in p.message for p in report.errors), report.as_text()
    allowed = load_config("cpu", ["data.allow_same_modality=true"])
    assert not any("domain gap" in p.message for p in check_datasets(cases, "t2", cases, "t2", config=allowed).errors)


def test_no_folder_chosen(cases):
    report = check_datasets(None, "t1", cases, "t2")
    assert not report.ok and "no source data folder" in report.errors[0].message


def test_paired_translator_needs_cases_with_both_modalities(cases, tmp_path):
    from bigl.data.phantoms import write_cohort

    other = tmp_path / "other"
    write_cohort(other, cases=2, size=32, seed=5, modalities=("t2",), prefix="Other")
    paired = load_config("cpu", ["translator_training.mode=paired"])
    report = check_datasets(cases, "t1", other, "t2", config=paired)
    assert report.paired_cases == 0 and not report.ok
    assert "paired translator" in report.errors[0].message
    assert check_datasets(cases, "t1", other, "t2", config=load_config("cpu", ["translator_training.mode=unpaired"])).ok
    assert check_datasets(cases, "t1", other, "t2", config=load_config("cpu")).ok  # auto falls back to unpaired


def test_user_exclusions_apply_per_role(cases):
    report = check_datasets(cases, "t1", cases, "t2", exclude=["Phantom_001"], target_exclude=["Phantom_002"])
    assert report.source.usable == ["Phantom_002", "Phantom_003"]
    assert report.target.usable == ["Phantom_003"]
    assert report.ok and not report.source.excluded  # the user's own exclusions are not problems


def test_target_only_needs_target_labels_and_no_source(cases):
    config = load_config("cpu", ["adapt.method=target-only", "data.target_labels=true"])
    (cases / "Phantom_001" / "Phantom_001_seg.nii.gz").unlink()
    report = check_datasets(None, "t1", cases, "t2", config=config)
    assert report.ok, report.as_text()
    assert not report.source.used and "source" not in report.as_text().split("\n")[0]
    assert report.target.usable == ["Phantom_002", "Phantom_003"]
    assert report.estimate.translator_steps == 0  # no translator for a baseline


def test_estimate_scales_with_steps_devices_and_epochs():
    cpu = load_config("cpu")
    base = estimate_run(cpu, 1000, 1000, device="cpu")
    twice = 2 * cpu["adapt"]["iterations"]
    longer = estimate_run(load_config("cpu", [f"adapt.iterations={twice}"]), 1000, 1000, device="cpu")
    assert math.isclose(longer.adapt_seconds, 2 * base.adapt_seconds)
    assert math.isclose(longer.translator_seconds, base.translator_seconds)
    gpu = estimate_run(cpu, 1000, 1000, device="cuda")
    two_gpus = estimate_run(cpu, 1000, 1000, device="cuda", gpus=2)
    assert gpu.device_kind == "gpu" and gpu.seconds < base.seconds
    assert math.isclose(two_gpus.seconds, gpu.seconds / 2)

    paper = load_config("paper")
    estimate = estimate_run(paper, 20000, 20000, device="cuda")
    epochs, batch = paper["adapt"]["epochs"], paper["adapt"]["batch_size"]
    assert estimate.adapt_steps == math.ceil(epochs * 20000 / batch)
    assert math.isclose(estimate.source_epochs, epochs, rel_tol=1e-3)
    # bigger slices and wider networks cost more per sample
    assert seconds_per_sample(paper, "adapt") > seconds_per_sample(cpu, "adapt") * 16


def test_batch_must_split_over_the_gpus(cases):
    config = load_config("cpu", ["adapt.batch_size=6", "translator_training.batch_size=4"])
    assert check_datasets(cases, "t1", cases, "t2", config=config, gpus=2).ok
    report = check_datasets(cases, "t1", cases, "t2", config=config, gpus=4)
    assert [p.message.split()[0] for p in report.errors] == ["adapt.batch_size"]


# ----------------------------------------------------------------------- several folders


@pytest.fixture
def two_folders(phantom_cases, tmp_path):
    """Two data folders of one data set: the 3 phantom cases, and 2 more cases named More_*."""
    from bigl.data.phantoms import write_cohort

    first = shutil.copytree(phantom_cases, tmp_path / "first")
    second = tmp_path / "second folder"
    write_cohort(second, cases=2, size=48, seed=1, modalities=("t1", "t2"), prefix="More")
    return first, second


def test_two_folders_are_checked_as_one_data_set(two_folders):
    first, second = two_folders
    config = load_config("cpu")
    report = check_datasets([first, str(second)], "t1", [str(first), second], "t2", config=config, device="cpu")
    assert report.ok and not report.problems, report.as_text()
    assert report.source.roots == report.target.roots == [first, second]
    assert [f.cases_found for f in report.source.folders] == [3, 2]
    assert report.source.cases_found == 5 and report.source.labelled == 5
    assert report.source.cases_by_modality == {"t1": 5, "t1ce": 0, "t2": 5, "flair": 0}
    assert report.source.usable == ["More_001", "More_002", "Phantom_001", "Phantom_002", "Phantom_003"]
    assert report.source.slices == 5 * 48 and report.estimate.source_slices == 5 * 48
    assert report.paired_cases == 5  # pairs are found across the folders of both roles
    lines = report.as_text().splitlines()
    assert any(line.startswith(f"source (t1) in {first}: 3 case(s) found") for line in lines)
    assert any(line.startswith(f"source (t1) in {second}: 2 case(s) found") for line in lines)
    assert any(line.startswith("source (t1) in all 2 folders: 5 case(s) found") and "5 usable" in line for line in lines)
    # one folder given as a string or as a one-element list: the same report
    assert check_datasets([first], "t1", first, "t2").as_text() == check_datasets(first, "t1", [first], "t2").as_text()


def test_cases_left_out_name_their_folder(two_folders):
    first, second = two_folders
    (second / "More_002" / "More_002_seg.nii.gz").unlink()
    report = check_datasets([first, second], "t1", [first, second], "t2")
    assert report.ok and [p.level for p in report.problems] == ["warning"]
    assert report.source.excluded == {"More_002": "no label map (the source must be labelled)"}
    assert report.source.folders[1].excluded == report.source.excluded and not report.source.folders[0].excluded
    assert f"left out (source) More_002 in {second}: no label map" in report.as_text()
    assert report.excluded_cases == ["More_002"]


def test_case_name_in_two_folders_is_an_error_naming_both(phantom_cases, tmp_path):
    first = shutil.copytree(phantom_cases, tmp_path / "first")
    second = shutil.copytree(phantom_cases / "Phantom_002", tmp_path / "second" / "Phantom_002")
    report = check_datasets([first, tmp_path / "second"], "t1", first, "t2", config=load_config("cpu"))
    assert not report.ok and report.estimate is None
    [error] = report.errors
    assert error.message.startswith("source data: 1 case name(s) found in more than one source folder")
    assert f"Phantom_002 in {first} and {tmp_path / 'second'}" in error.message
    assert "unique" in error.hint
    assert second.is_dir() and "NOT ready" in report.as_text()


def test_nested_folders_in_the_list_are_duplicates(phantom_cases, tmp_path):
    outer = shutil.copytree(phantom_cases, tmp_path / "outer" / "HGG").parent
    report = check_datasets([outer, outer / "HGG"], "t1", outer, "t2")
    assert not report.ok
    assert "3 case name(s) found in more than one source folder" in report.errors[0].message
    assert str(outer / "HGG") in report.errors[0].message


def test_missing_or_empty_folder_in_the_list_is_an_error_naming_it(two_folders, tmp_path):
    first, second = two_folders
    missing, empty = tmp_path / "not there", tmp_path / "empty"
    empty.mkdir()
    report = check_datasets([first, missing], "t1", [first, second, empty], "t2")
    assert not report.ok
    messages = [p.message for p in report.errors]
    assert messages == [f"source data: data folder not found: {missing}", f"target data: no BraTS-style cases found in {empty}"]
    # the folders that can be read are still reported
    assert report.source.usable == ["Phantom_001", "Phantom_002", "Phantom_003"]
    assert report.target.cases_found == 5 and not report.target.folders[2].scanned
    # every folder missing: the folders' own errors, no extra "none usable" error
    report = check_datasets([missing, tmp_path / "gone"], "t1", first, "t2")
    assert [p.message for p in report.errors] == [
        f"source data: data folder not found: {missing}", f"source data: data folder not found: {tmp_path / 'gone'}"
    ]


def test_a_folder_without_the_modality_is_a_warning_when_others_have_it(two_folders, tmp_path):
    from bigl.data.phantoms import write_cohort

    first, _ = two_folders
    flair = tmp_path / "flair only"
    write_cohort(flair, cases=1, size=32, seed=2, modalities=("flair",), prefix="Flair")
    report = check_datasets([first, flair], "t1", first, "t2")
    assert report.ok and [p.level for p in report.problems] == ["warning"]
    assert f"none of the 1 case(s) in {flair} has a t1 image and a label map" in report.problems[0].message
    report = check_datasets([first, flair], "t1ce", first, "t2")  # in none of the folders
    assert not report.ok and len(report.errors) == 1
    assert f"none of the 4 case(s) in the 2 source folders ({first}, {flair}) has a t1ce image" in report.errors[0].message
    assert "(t1, t2, flair)" in report.errors[0].hint  # what the folders have together


def test_folder_lists_blank_or_repeated(two_folders):
    first, second = two_folders
    report = check_datasets(["", "  "], "t1", [], "t2")
    assert [p.message for p in report.errors] == ["no source data folder chosen", "no target data folder chosen"]
    report = check_datasets([first, str(first) + "/", second], "t1", first, "t2")
    assert [p.message for p in report.errors] == [f"source data: the folder {first} is listed twice"]
    assert report.source.roots == [first, second]  # scanned once, no duplicate-case error on top
    report = check_datasets([first, 3], "t1", first, "t2")
    assert report.errors[0].message == "source data: 3 is not a folder path"
