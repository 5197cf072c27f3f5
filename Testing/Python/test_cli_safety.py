"""Nothing a user owns is overwritten, and every write failure is a message with exit status 2,
for every command that writes (run in-process: a traceback would fail the test)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from bigl.cli import main
from bigl.data.io import is_bigl_output
from bigl.errors import ConfigError
from bigl.training import load_config

from test_cli_segment import write_scan


def run(capsys, *args) -> tuple[int, str, str]:
    status = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture()
def case_folder(tmp_path) -> Path:
    """A folder with a scan P.nii.gz and its ground-truth label map P_seg.nii.gz."""
    folder = tmp_path / "case"
    write_scan(folder / "P.nii.gz")
    write_scan(folder / "P_seg.nii.gz", data=np.indices((40, 44, 30)).sum(0) % 3, dtype=np.uint8)
    return folder


# ------------------------------------------------------------------------------------ bigl segment


def test_folder_mode_into_the_input_folder_keeps_the_label_map(capsys, case_folder, tiny_bundle):
    labels = case_folder / "P_seg.nii.gz"
    before = labels.read_bytes()
    status, _, err = run(capsys, "segment", "-i", case_folder, "-o", case_folder, "-m", tiny_bundle, "--modality", "t2")
    assert status == 2 and "BiGL did not write it" in err and "P_seg.nii.gz" in err
    assert labels.read_bytes() == before
    assert sorted(p.name for p in case_folder.iterdir()) == ["P.nii.gz", "P_seg.nii.gz"]


def test_one_scan_into_its_label_map_is_refused(capsys, case_folder, tiny_bundle):
    labels = case_folder / "P_seg.nii.gz"
    before = labels.read_bytes()
    for output in (labels, case_folder / "link_seg.nii.gz"):
        if output.name.startswith("link"):
            output.symlink_to(labels)
        status, _, err = run(capsys, "segment", "-i", case_folder / "P.nii.gz", "-o", output, "-m", tiny_bundle,
                             "--modality", "t2")
        assert status == 2 and "leaves it as it is" in err
    assert labels.read_bytes() == before


def test_outputs_of_an_earlier_run_are_replaced(capsys, case_folder, tiny_bundle):
    (case_folder / "P_seg.nii.gz").unlink()
    for _ in range(2):
        status, _, _ = run(capsys, "segment", "-i", case_folder, "-o", case_folder, "-m", tiny_bundle,
                           "--modality", "t2", "--attention-out", case_folder, "--progress", "none")
        assert status == 0
    assert is_bigl_output(case_folder / "P_seg.nii.gz") and is_bigl_output(case_folder / "P_attention_channel.nii.gz")


def test_an_output_that_links_to_the_input_or_the_model_is_refused(capsys, tmp_path, tiny_bundle):
    scan = write_scan(tmp_path / "in" / "case_t2.nii.gz")
    before = scan.read_bytes()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "seg.nii.gz").symlink_to(scan)
    (tmp_path / "out" / "model.nii.gz").symlink_to(tiny_bundle)
    for output in ("seg.nii.gz", "model.nii.gz"):
        status, _, err = run(capsys, "segment", "-i", scan, "-o", tmp_path / "out" / output, "-m", tiny_bundle)
        assert status == 2 and "leads (through a link) to" in err
    assert scan.read_bytes() == before


def test_two_scans_of_one_case_name_are_refused_before_any_work(capsys, tmp_path, tiny_bundle):
    folder = tmp_path / "scans"
    write_scan(folder / "P.nii")
    write_scan(folder / "P.nii.gz")
    status, _, err = run(capsys, "segment", "-i", folder, "-o", tmp_path / "out", "-m", tiny_bundle)
    assert status == 2 and "would both be written" in err and not (tmp_path / "out").exists()


def test_segment_write_failures(capsys, tmp_path, tiny_bundle, read_only_folder):
    scan = write_scan(tmp_path / "case_t2.nii.gz")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for output, fragment in ((blocker / "seg.nii.gz", "is a file, not a folder"),
                             (read_only_folder / "seg.nii.gz", "read-only|permission denied")):
        status, _, err = run(capsys, "segment", "-i", scan, "-o", output, "-m", tiny_bundle, "--progress", "none")
        assert status == 2 and any(part in err for part in fragment.split("|")), err
    status, _, err = run(capsys, "segment", "-i", tmp_path, "-o", blocker, "-m", tiny_bundle)
    assert status == 2 and "is a file" in err


def test_outputs_have_the_umask_permissions(capsys, tmp_path, tiny_bundle):
    scan = write_scan(tmp_path / "case_t2.nii.gz")
    previous = os.umask(0o022)
    try:
        assert run(capsys, "segment", "-i", scan, "-o", tmp_path / "seg.nii.gz", "-m", tiny_bundle,
                   "--probabilities-out", tmp_path / "p.nii.gz", "--progress", "none")[0] == 0
    finally:
        os.umask(previous)
    for name in ("seg.nii.gz", "p.nii.gz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


# ------------------------------------------------------------------------------------ bigl score


def test_score_never_writes_its_table_over_a_label_map(capsys, case_folder):
    labels = case_folder / "P_seg.nii.gz"
    prediction = Path(shutil.copy(labels, case_folder.parent / "pred.nii.gz"))
    before = {path: path.read_bytes() for path in (labels, prediction)}
    link = case_folder.parent / "link.csv"
    link.symlink_to(labels)
    for csv in (labels, prediction, link):
        status, _, err = run(capsys, "score", "--pred", prediction, "--ref", labels, "--csv", csv)
        assert status == 2, csv
        assert "NIfTI name" in err or "which this command reads" in err
    assert all(path.read_bytes() == content for path, content in before.items())
    status, _, _ = run(capsys, "score", "--pred", prediction, "--ref", labels, "--csv", case_folder.parent / "scores.csv")
    assert status == 0 and (case_folder.parent / "scores.csv").read_text().startswith("case,")


def test_score_table_in_an_unusable_place(capsys, case_folder, read_only_folder):
    labels = case_folder / "P_seg.nii.gz"
    for csv in (read_only_folder / "s.csv", labels / "s.csv", case_folder):
        status, _, err = run(capsys, "score", "--pred", labels, "--ref", labels, "--csv", csv)
        assert status == 2 and "cannot write" in err


# ------------------------------------------------------------------------------------ bigl evaluate


def evaluate(capsys, data: Path, bundle: Path, *extra) -> tuple[int, str, str]:
    return run(capsys, "evaluate", "--model", bundle, "--data", data, "--device", "cpu", "--figure-cases", "0", *extra)


def test_evaluate_refuses_a_modality_the_model_does_not_segment(capsys, phantom_cohort, tiny_bundle):
    status, _, err = evaluate(capsys, phantom_cohort, tiny_bundle, "--modality", "t1")
    assert status == 2 and "expects T2, got T1" in err


def test_evaluate_out_that_cannot_take_files(capsys, phantom_cohort, tiny_bundle, tmp_path, read_only_folder):
    blocker = tmp_path / "summary.txt"
    blocker.write_text("keep me")
    for out, fragment in ((blocker, "is a file, not a folder"), (blocker / "sub", "is a file, not a folder"),
                          (read_only_folder, "read-only|permission denied")):
        status, _, err = evaluate(capsys, phantom_cohort, tiny_bundle, "--out", out)
        assert status == 2 and any(part in err for part in fragment.split("|")), err
    assert blocker.read_text() == "keep me"


def test_evaluate_never_writes_into_the_data_it_reads(capsys, phantom_cohort, tiny_bundle, tmp_path):
    data = Path(shutil.copytree(phantom_cohort, tmp_path / "data"))
    case = sorted(p for p in data.iterdir() if p.is_dir())[0]
    # an output folder whose predictions/ is a case folder of the data: its label map is a file the run reads
    predictions = data / "predictions"
    shutil.copytree(case, predictions)
    for path in predictions.iterdir():
        path.rename(predictions / path.name.replace(case.name, "predictions"))
    before = (predictions / "predictions_seg.nii.gz").read_bytes()
    status, _, err = evaluate(capsys, data, tiny_bundle, "--out", data)
    assert status == 2 and "which this command reads" in err
    assert (predictions / "predictions_seg.nii.gz").read_bytes() == before


# ------------------------------------------------------------------------------------ bigl phantoms, demo


def test_phantoms_size_limit_and_out_file(capsys, tmp_path):
    status, _, err = run(capsys, "phantoms", "--out", tmp_path / "p", "--size", "5000")
    assert status == 2 and "the limit is 256 voxels per side" in err and not (tmp_path / "p").exists()
    blocker = tmp_path / "cohort"
    blocker.write_text("x")
    status, _, err = run(capsys, "phantoms", "--out", blocker, "--cases", "1", "--size", "16")
    assert status == 2 and "is a file, not a folder" in err and blocker.read_text() == "x"


def test_demo_never_replaces_a_data_folder_it_did_not_write(capsys, tmp_path):
    mine = tmp_path / "project" / "data" / "train"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my data")
    status, _, err = run(capsys, "demo", "--out", tmp_path / "project", "--quick")
    assert status == 2 and "did not write" in err
    assert (mine / "notes.txt").read_text() == "my data"


# ------------------------------------------------------------------------------------ bigl train


def train(capsys, data: Path, out: Path, *extra) -> tuple[int, str, str]:
    return run(capsys, "train", "--config", "smoke", "--data", data, "--out", out, "--no-progress",
               "adapt.method=source-only", "adapt.iterations=2", "run.threads=1", *extra)


def test_train_into_a_small_read_only_folder_says_read_only(capsys, phantom_cohort, read_only_folder):
    status, _, err = train(capsys, phantom_cohort, read_only_folder / "run")
    assert status == 2 and ("read-only" in err or "permission denied" in err)
    assert "disk space" not in err


def test_train_out_that_is_a_file(capsys, phantom_cohort, tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("x")
    status, _, err = train(capsys, phantom_cohort, blocker)
    assert status == 2 and "is a file, not a folder" in err and blocker.read_text() == "x"


def test_checkpoints_and_bundles_have_the_umask_permissions(capsys, phantom_cohort, tmp_path):
    previous = os.umask(0o027)
    try:
        assert train(capsys, phantom_cohort, tmp_path / "run")[0] == 0
    finally:
        os.umask(previous)
    files = [tmp_path / "run" / "model.safetensors", *(tmp_path / "run" / "checkpoints").iterdir()]
    assert len(files) > 1 and all(stat.S_IMODE(path.stat().st_mode) == 0o640 for path in files)


def test_ctrl_c_tells_how_to_continue(capsys, phantom_cohort, tmp_path, monkeypatch):
    from bigl.training.adapt_stage import AdaptTrainer

    def interrupted(self, step):
        raise KeyboardInterrupt

    monkeypatch.setattr(AdaptTrainer, "train_step", interrupted)
    status, _, err = train(capsys, phantom_cohort, tmp_path / "run")
    assert status == 130 and "run the same command with --resume" in err
    monkeypatch.chdir(tmp_path)
    status, _, err = run(capsys, "train", "--config", "smoke", "--data", phantom_cohort, "--no-progress",
                         "adapt.method=source-only", "adapt.iterations=2")
    assert status == 130 and "--resume --out runs/smoke-" in err  # the generated folder, spelled out


def smoke(source: Path, target: Path, source_modality: str, target_modality: str, *extra) -> list[str]:
    return [f"data.source_dir={source}", f"data.target_dir={target}", f"data.source_modality={source_modality}",
            f"data.target_modality={target_modality}", *extra]


def test_same_modality_from_the_same_folder_is_refused_unless_meant(phantom_cohort, tmp_path, capsys):
    with pytest.raises(ConfigError, match="both T2 from the same folder") as caught:
        load_config("smoke", smoke(phantom_cohort, phantom_cohort, "t2", "T2"))
    assert "data.allow_same_modality=true" in caught.value.hint
    # the same folder spelled differently is the same folder
    with pytest.raises(ConfigError, match="same folder"):
        load_config("smoke", smoke(phantom_cohort, Path(f"{phantom_cohort}/../{phantom_cohort.name}/"), "t2w", "t2"))
    load_config("smoke", smoke(phantom_cohort, phantom_cohort, "t2", "t2", "data.allow_same_modality=true"))
    load_config("smoke", smoke(phantom_cohort, tmp_path / "other-scanner", "t2", "t2"))  # scanner to scanner
    load_config("smoke", smoke(phantom_cohort, phantom_cohort, "t2", "t2", "adapt.method=source-only"))
    status, _, err = run(capsys, "train", "--config", "smoke", "--data", phantom_cohort, "--out", tmp_path / "run",
                         "--source-modality", "t2", "--target-modality", "t2")
    assert status == 2 and "no domain gap" in err


def test_same_modality_check_compares_folder_sets(phantom_cohort, tmp_path):
    from bigl.training.config import _validate_domains

    config = load_config("smoke", smoke(phantom_cohort, phantom_cohort, "t1", "t2"))
    other = tmp_path / "other"
    for source, target, refused in (([str(phantom_cohort), str(other)], [str(other), f"{phantom_cohort}/."], True),
                                    ([str(phantom_cohort)], str(phantom_cohort), True),
                                    ([str(phantom_cohort), str(other)], [str(other)], False)):
        config["data"].update(source_dir=source, target_dir=target, source_modality="flair", target_modality="flair")
        if refused:
            with pytest.raises(ConfigError, match="same folder"):
                _validate_domains(config)
        else:
            _validate_domains(config)
