"""The logic without Slicer: the command line, the child's environment, failures turned into messages."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from BiGLSegmentationLib import logic
from BiGLSegmentationLib.logic import (
    SegmentationError,
    attention_files,
    child_environment,
    describe_failure,
    modality_warning,
    segment_command,
)


def test_segment_command_is_an_argument_list_with_only_the_requested_outputs(tmp_path):
    scan = tmp_path / "my scan; rm -rf x.nii.gz"
    command = segment_command("/opt/Slicer/bin/PythonSlicer", scan, tmp_path / "labels.nii.gz",
                              model_path=tmp_path / "m.safetensors", device="cpu")
    assert command[:4] == ["/opt/Slicer/bin/PythonSlicer", "-m", "bigl", "segment"]
    assert command[command.index("--input") + 1] == str(scan)  # one argument, never split or quoted
    assert command[command.index("--progress") + 1] == "json"
    assert command[command.index("--device") + 1] == "cpu"
    assert command[command.index("--engine") + 1] == "auto"  # ONNX Runtime when the model has an export
    assert command[command.index("--model") + 1] == str(tmp_path / "m.safetensors")
    assert not {"--attention-out", "--translated-out", "--probabilities-out", "--threads"} & set(command)

    full = segment_command("python", scan, tmp_path / "l.nii.gz", model_path=None, device="cuda",
                           attention_dir=tmp_path / "att", translated_path=tmp_path / "t.nii.gz",
                           probabilities_path=tmp_path / "p.nii.gz", threads=2)
    assert "--model" not in full
    for flag, value in (("--attention-out", tmp_path / "att"), ("--translated-out", tmp_path / "t.nii.gz"),
                        ("--probabilities-out", tmp_path / "p.nii.gz"), ("--threads", "2")):
        assert full[full.index(flag) + 1] == str(value)
    with pytest.raises(ValueError):
        segment_command("python", scan, scan, model_path=None, device="gpu")


def test_the_command_line_accepts_the_command(tmp_path):
    """Every option the logic passes exists in `bigl segment` (parsed, not run)."""
    from bigl.cli import build_parser

    command = segment_command(sys.executable, tmp_path / "in.nii.gz", tmp_path / "out.nii.gz",
                              model_path=tmp_path / "m.safetensors", device="cpu", attention_dir=tmp_path / "a",
                              translated_path=tmp_path / "t.nii.gz", probabilities_path=tmp_path / "p.nii.gz",
                              threads=1)
    arguments = build_parser().parse_args(command[3:])
    assert arguments.command == "segment" and arguments.progress == "json" and arguments.threads == 1


def test_child_environment_makes_bigl_importable_and_keeps_other_paths():
    import bigl

    env = child_environment({"PYTHONPATH": os.pathsep.join(["/somewhere", "/else"]), "HOME": "/home/x"})
    paths = env["PYTHONPATH"].split(os.pathsep)
    assert paths[0] == str(Path(bigl.__file__).resolve().parent.parent)
    assert paths[1:] == ["/somewhere", "/else"]
    assert env["HOME"] == "/home/x" and env["PYTHONUNBUFFERED"] == "1"
    assert child_environment({})["PYTHONPATH"] == paths[0]


def test_python_executable_prefers_python_slicer(monkeypatch, tmp_path):
    monkeypatch.setattr(logic.shutil, "which", lambda name: "/Slicer/bin/PythonSlicer" if name == "PythonSlicer" else None)
    assert logic.python_executable() == "/Slicer/bin/PythonSlicer"
    monkeypatch.setattr(logic.shutil, "which", lambda name: None)
    assert logic.python_executable() == sys.executable


def test_error_event_becomes_the_message_and_fix():
    events = [{"event": "progress", "done": 1, "total": 9},
              {"event": "error", "message": "model expects T2, got T1", "hint": "give a T2 scan"}]
    error = describe_failure(events, 2, "some log")
    assert error.message == "model expects T2, got T1"
    assert error.hint == "Fix: give a T2 scan"
    assert error.details == "some log"


@pytest.mark.parametrize(
    "log, device, where",
    [
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "auto", "GPU"),
        ("RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED", "cuda", "GPU"),
        ("numpy._core._exceptions._ArrayMemoryError: Unable to allocate 3 GiB\nMemoryError", "cpu", "computer"),
    ],
)
def test_out_of_memory_suggests_the_cpu_only_for_gpu_runs(log, device, where):
    error = describe_failure([], 1, f"Traceback (most recent call last):\n{log}", device=device)
    assert where in error.message and "out of memory" in error.message
    assert ("CPU" in error.hint) == (where == "GPU")


def test_crash_without_an_event_reports_the_exit_status_and_last_line():
    error = describe_failure([], -9, "loading\nKilled")
    assert "exit status -9" in error.message and "Killed" in error.hint
    missing = describe_failure([], 1, "ModuleNotFoundError: No module named 'nibabel'")
    assert "nibabel" in missing.message
    assert "without producing results" in describe_failure([], 0, "").message
    assert isinstance(error, SegmentationError) and str(error).startswith(error.message)


def test_modality_warning_only_when_the_name_states_another_modality():
    t2_model = {"modality": "t2"}
    assert "T1" in modality_warning("BraTS19_2013_10_1_t1", t2_model)
    assert modality_warning("BraTS-GLI-00001-000-t2w", t2_model) is None
    assert modality_warning("Phantom_001_t2", t2_model) is None
    assert modality_warning("MRBrainTumor1", t2_model) is None  # states nothing
    assert modality_warning("case_seg", t2_model) is None


def test_attention_files_finds_both_maps_or_says_what_is_missing(tmp_path):
    for kind in ("position", "channel"):
        (tmp_path / f"scan_attention_{kind}.nii.gz").write_bytes(b"")
    assert attention_files(tmp_path) == {kind: tmp_path / f"scan_attention_{kind}.nii.gz"
                                         for kind in ("position", "channel")}
    (tmp_path / "scan_attention_channel.nii.gz").unlink()
    with pytest.raises(SegmentationError, match="channel"):
        attention_files(tmp_path)


def test_the_command_states_the_modality(tmp_path):
    from BiGLSegmentationLib.logic import model_modality, segment_command

    command = segment_command("python", tmp_path / "scan.nii.gz", tmp_path / "labels.nii.gz", model_path=None,
                              modality="t2")
    assert command[command.index("--modality") + 1] == "t2"
    assert "--modality" not in segment_command("python", tmp_path / "s.nii.gz", tmp_path / "l.nii.gz", model_path=None)
    assert model_modality(tmp_path / "missing.safetensors") is None


def test_the_model_modality_is_read_from_bundles_and_exports(tiny_bundle):
    from BiGLSegmentationLib.logic import model_modality

    from bigl.bundle import read_metadata

    assert model_modality(tiny_bundle) == read_metadata(tiny_bundle)["modality"]
