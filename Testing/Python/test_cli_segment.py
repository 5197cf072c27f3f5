"""``bigl segment`` and ``bigl info`` end to end on small synthetic NIfTI files (run in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bigl import bundle as bundle_module
from bigl import inference as inference_module
from bigl.data import io as io_module
from bigl.bundle import parameter_counts, read_metadata
from bigl.cli import main
from synthetic import synthetic_scan

SHAPE = (40, 44, 30)


def oblique_affine() -> np.ndarray:
    """Anisotropic voxels (0.9 x 1.3 x 2.5 mm), rotated about two axes, LPS-like flips, offset."""
    a, b = np.deg2rad(17), np.deg2rad(-9)
    rot_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1, -1, 1]) @ rot_z @ rot_x @ np.diag([0.9, 1.3, 2.5])
    affine[:3, 3] = [91.5, 120.25, -62.0]
    return affine


def write_scan(path: Path, data=None, affine=None, dtype=np.float32) -> Path:
    data = synthetic_scan(SHAPE) if data is None else data
    image = nib.Nifti1Image(np.asarray(data).astype(dtype), oblique_affine() if affine is None else affine)
    image.header.set_qform(image.affine, code=1)
    image.header.set_sform(image.affine, code=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def segment(capsys, *args) -> tuple[int, str, str]:
    code = main(["segment", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture()
def scan(tmp_path) -> Path:
    return write_scan(tmp_path / "in" / "case_t2.nii.gz", dtype=np.int16)


def _assert_on_input_grid(output: Path, source: Path, *, shape=SHAPE):
    written, original = nib.load(str(output)), nib.load(str(source))
    assert written.shape == shape
    assert np.allclose(written.affine, original.affine, atol=1e-6)
    assert np.allclose(written.header.get_qform(), original.header.get_qform(), atol=1e-6)
    assert int(written.header["qform_code"]) == int(original.header["qform_code"])
    assert int(written.header["sform_code"]) == int(original.header["sform_code"])
    return written


def test_label_map_on_an_oblique_anisotropic_grid(capsys, tmp_path, scan, tiny_bundle):
    out = tmp_path / "out" / "deep" / "case_seg.nii.gz"
    code, stdout, _ = segment(capsys, "--input", scan, "--output", out, "--model", tiny_bundle, "--progress", "none")
    assert code == 0
    written = _assert_on_input_grid(out, scan)
    assert written.get_data_dtype() == np.uint8
    labels = np.asarray(written.dataobj)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 4}
    assert "case_t2.nii.gz" in stdout and "ml" in stdout
    # the CLI writes exactly what the library predicts
    from bigl.inference import BiGLPredictor

    expected = BiGLPredictor.from_path(tiny_bundle, device="cpu").predict(
        np.asarray(nib.load(str(scan)).dataobj), oblique_affine())
    assert np.array_equal(labels, expected.labels)


def test_all_outputs(capsys, tmp_path, scan, tiny_bundle):
    out = tmp_path / "out"
    code, _, _ = segment(capsys, "-i", scan, "-o", out / "seg.nii.gz", "-m", tiny_bundle, "--progress", "none",
                         "--attention-out", out / "attention", "--translated-out", out / "translated.nii",
                         "--probabilities-out", out / "probs.nii.gz", "--threads", "1", "--batch-size", "4")
    assert code == 0
    for kind in ("position", "channel"):
        attention = _assert_on_input_grid(out / "attention" / f"case_t2_attention_{kind}.nii.gz", scan)
        values = np.asarray(attention.dataobj)
        assert attention.get_data_dtype() == np.float32 and 0 <= values.min() and values.max() <= 1
    translated = _assert_on_input_grid(out / "translated.nii", scan)
    assert -1 <= np.asarray(translated.dataobj).min() and np.asarray(translated.dataobj).max() <= 1
    probs = _assert_on_input_grid(out / "probs.nii.gz", scan, shape=SHAPE + (4,))
    probs = np.asarray(probs.dataobj)
    assert probs.dtype == np.float32 and np.allclose(probs.sum(axis=-1), 1.0, atol=1e-5)
    labels = np.asarray(nib.load(str(out / "seg.nii.gz")).dataobj)
    assert np.array_equal(labels, np.array([0, 1, 2, 4], np.uint8)[probs.argmax(axis=-1)])
    leftovers = [p.name for p in out.rglob("*") if ".tmp" in p.name]
    assert leftovers == []


def test_two_runs_give_identical_files(capsys, tmp_path, scan, tiny_bundle):
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / f"{run}.nii.gz"
        assert segment(capsys, "-i", scan, "-o", out, "-m", tiny_bundle, "--progress", "none")[0] == 0
        outputs.append(np.asarray(nib.load(str(out)).dataobj))
    assert np.array_equal(*outputs)


def test_folder_mode_continues_after_a_failure(capsys, tmp_path, tiny_bundle):
    folder = tmp_path / "scans"
    write_scan(folder / "a_t2.nii.gz")
    write_scan(folder / "b.nii")
    write_scan(folder / "a_seg.nii.gz", data=np.zeros(SHAPE), dtype=np.uint8)  # a label map: skipped
    write_scan(folder / "broken.nii.gz", data=np.zeros(SHAPE))  # all zero: fails, the rest goes on
    (folder / "notes.txt").write_text("not a scan")
    out = tmp_path / "segs"
    code, stdout, _ = segment(capsys, "-i", folder, "-o", out, "-m", tiny_bundle, "--progress", "none")
    assert code == 2
    assert sorted(p.name for p in out.iterdir()) == ["a_t2_seg.nii.gz", "b_seg.nii.gz"]
    assert "broken.nii.gz: FAILED" in stdout and "constant" in stdout
    assert "segmented 2 of 3" in stdout
    _assert_on_input_grid(out / "b_seg.nii.gz", folder / "b.nii")

    (folder / "broken.nii.gz").unlink()
    code, _, _ = segment(capsys, "-i", folder, "-o", folder, "-m", tiny_bundle, "--progress", "none")
    assert code == 0  # writing next to the inputs; outputs are not taken as inputs on the next run
    code, stdout, _ = segment(capsys, "-i", folder, "-o", folder, "-m", tiny_bundle, "--progress", "none")
    assert code == 0 and "segmented 2 of 2" in stdout


def test_folder_mode_needs_an_output_folder(capsys, tmp_path, tiny_bundle):
    write_scan(tmp_path / "scans" / "a_t2.nii.gz")
    code, _, err = segment(capsys, "-i", tmp_path / "scans", "-o", tmp_path / "x.nii.gz", "-m", tiny_bundle)
    assert code == 2 and "folder" in err
    (tmp_path / "empty").mkdir()
    code, _, err = segment(capsys, "-i", tmp_path / "empty", "-o", tmp_path / "o", "-m", tiny_bundle)
    assert code == 2 and "no scans" in err


def test_json_progress(capsys, tmp_path, scan, tiny_bundle):
    out = tmp_path / "seg.nii.gz"
    code, stdout, _ = segment(capsys, "-i", scan, "-o", out, "-m", tiny_bundle, "--progress", "json")
    assert code == 0
    events = [json.loads(line) for line in stdout.splitlines()]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"]
    assert all(e["done"] <= e["total"] for e in progress)
    # the untrained bundle finds no tumour in this scan, so it has no confidence to report
    assert events[-1] == {"event": "done", "output": str(out), "confidence": None, "contrast_gamma": None}


def test_json_error_event(capsys, tmp_path, tiny_bundle):
    code, stdout, err = segment(capsys, "-i", tmp_path / "absent.nii.gz", "-o", tmp_path / "o.nii.gz",
                                "-m", tiny_bundle, "--progress", "json")
    assert code == 2
    event = json.loads(stdout.strip().splitlines()[-1])
    assert event["event"] == "error" and "absent.nii.gz" in event["message"] and event["hint"]


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    text = tmp_path / "scan.txt"
    text.write_text("hello")
    fake = tmp_path / "fake.nii.gz"
    fake.write_bytes(b"\x00garbage" * 50)
    labels = np.zeros(SHAPE, np.uint8)
    labels[10:20, 10:20, 10:20] = 2
    labels[12:16, 12:16, 12:16] = 4
    return {
        "2d": (write_scan(tmp_path / "flat.nii.gz", data=np.ones((32, 32)) * np.arange(32)), "2D"),
        "4d": (write_scan(tmp_path / "series.nii.gz", data=np.random.default_rng(0).random((16, 16, 16, 3))), "4D"),
        "not-nifti": (text, "not a NIfTI"),
        "fake-nifti": (fake, "cannot read"),
        "nan": (write_scan(tmp_path / "nan.nii.gz", data=np.full(SHAPE, np.nan)), "NaN"),
        "all-zero": (write_scan(tmp_path / "zero.nii.gz", data=np.zeros(SHAPE)), "constant"),
        "label-map": (write_scan(tmp_path / "labels.nii.gz", data=labels, dtype=np.uint8), "label map"),
        "missing": (tmp_path / "missing.nii.gz", "not found"),
    }


@pytest.mark.parametrize("case", ["2d", "4d", "not-nifti", "fake-nifti", "nan", "all-zero", "label-map", "missing"])
def test_bad_inputs_exit_2_with_a_clear_message(capsys, tmp_path, tiny_bundle, case):
    source, fragment = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out" / "seg.nii.gz"
    code, _, err = segment(capsys, "-i", source, "-o", out, "-m", tiny_bundle, "--progress", "none")
    assert code == 2
    assert fragment in err and "fix:" in err and "Traceback" not in err
    assert not out.exists()


def test_truncated_bundle(capsys, tmp_path, scan, tiny_bundle):
    data = tiny_bundle.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    code, _, err = segment(capsys, "-i", scan, "-o", tmp_path / "o.nii.gz", "-m", cut)
    assert code == 2 and "cut.safetensors" in err and "truncated" in err


def test_no_default_model_yet(capsys, tmp_path, scan, monkeypatch):
    monkeypatch.setattr(bundle_module, "DEFAULT_BUNDLE_PATH", tmp_path / "default_model.safetensors")
    code, _, err = segment(capsys, "-i", scan, "-o", tmp_path / "o.nii.gz")
    assert code == 2 and "no default model" in err and "--model" in err


def test_default_model_is_used_when_shipped(capsys, tmp_path, scan, tiny_bundle, monkeypatch):
    shipped = tmp_path / "default_model.safetensors"
    shipped.write_bytes(tiny_bundle.read_bytes())
    monkeypatch.setattr(bundle_module, "DEFAULT_BUNDLE_PATH", shipped)
    assert segment(capsys, "-i", scan, "-o", tmp_path / "o.nii.gz", "--progress", "none")[0] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_on_a_machine_without_cuda(capsys, tmp_path, scan, tiny_bundle):
    code, _, err = segment(capsys, "-i", scan, "-o", tmp_path / "o.nii.gz", "-m", tiny_bundle, "--device", "cuda")
    assert code == 2 and "--device cpu" in err


def test_never_overwrites_the_input(capsys, scan, tiny_bundle):
    before = scan.read_bytes()
    code, _, err = segment(capsys, "-i", scan, "-o", scan, "-m", tiny_bundle)
    assert code == 2 and "overwrite" in err
    assert scan.read_bytes() == before


def test_modality_checked_from_file_name_and_flag(capsys, tmp_path, tiny_bundle):
    t1 = write_scan(tmp_path / "case_t1.nii.gz")
    code, _, err = segment(capsys, "-i", t1, "-o", tmp_path / "o.nii.gz", "-m", tiny_bundle)
    assert code == 2 and "expects T2, got T1" in err and "--modality" in err
    assert segment(capsys, "-i", t1, "-o", tmp_path / "o.nii.gz", "-m", tiny_bundle, "--modality", "t2",
                   "--progress", "none")[0] == 0
    plain = write_scan(tmp_path / "plain.nii.gz")
    code, _, err = segment(capsys, "-i", plain, "-o", tmp_path / "p.nii.gz", "-m", tiny_bundle, "--modality", "flair")
    assert code == 2 and "expects T2, got FLAIR" in err


def test_failed_write_leaves_no_partial_output(capsys, tmp_path, scan, tiny_bundle, monkeypatch):
    real_save = io_module.nib.save
    calls = []

    def flaky_save(image, filename):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(image, filename)

    monkeypatch.setattr(io_module.nib, "save", flaky_save)
    out = tmp_path / "out"
    code, _, err = segment(capsys, "-i", scan, "-o", out / "seg.nii.gz", "-m", tiny_bundle, "--progress", "none",
                           "--attention-out", out)
    assert code == 2 and "No space left" in err
    assert len(calls) == 2 and list(out.iterdir()) == []


# ------------------------------------------------------------------------------------ out of memory

OUT_OF_MEMORY = {
    "cuda": (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB"), "GPU", "--device cpu"),
    "cpu": (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9663676416 bytes"),
            "RAM", "--batch-size (e.g. 4)"),
    "numpy": (MemoryError("Unable to allocate 3.2 GiB for an array"), "RAM", "--batch-size (e.g. 4)"),
}


def _exhaust_memory(monkeypatch, failure):
    def exhausted(self, *args, **kwargs):
        raise failure

    monkeypatch.setattr(inference_module.BiGLPredictor, "predict", exhausted)


@pytest.mark.parametrize("mode, kind", [("json", "cuda"), ("json", "cpu"), ("none", "cuda"), ("bar", "numpy")])
def test_out_of_memory_is_an_error_with_a_fix(capsys, tmp_path, scan, tiny_bundle, monkeypatch, mode, kind):
    failure, memory, fix = OUT_OF_MEMORY[kind]
    _exhaust_memory(monkeypatch, failure)
    out = tmp_path / "seg.nii.gz"
    code, stdout, err = segment(capsys, "-i", scan, "-o", out, "-m", tiny_bundle, "--progress", mode)
    assert code == 2 and not out.exists()
    assert "out of memory" in err and memory in err and fix in err and "Traceback" not in err
    if kind == "cuda":
        assert "--batch-size (e.g. 4)" in err  # the default batch of 16, a quarter of it
    if mode == "json":
        events = [json.loads(line) for line in stdout.splitlines()]
        assert [e["event"] for e in events] == ["error"]
        assert "out of memory" in events[0]["message"] and memory in events[0]["message"]
        assert fix in events[0]["hint"]
        assert "unexpected" not in events[0]["message"]


def test_out_of_memory_in_folder_mode_fails_that_file_only(capsys, tmp_path, tiny_bundle, monkeypatch):
    folder = tmp_path / "scans"
    write_scan(folder / "a_t2.nii.gz")
    write_scan(folder / "b_t2.nii.gz")
    real_predict = inference_module.BiGLPredictor.predict

    def exhausted_on_b(self, volume, *args, name=None, **kwargs):
        if name == "b_t2.nii.gz":
            raise OUT_OF_MEMORY["cuda"][0]
        return real_predict(self, volume, *args, name=name, **kwargs)

    monkeypatch.setattr(inference_module.BiGLPredictor, "predict", exhausted_on_b)
    out = tmp_path / "segs"
    code, stdout, _ = segment(capsys, "-i", folder, "-o", out, "-m", tiny_bundle, "--progress", "json",
                              "--batch-size", "8")
    assert code == 2
    assert [p.name for p in out.iterdir()] == ["a_t2_seg.nii.gz"]
    events = [json.loads(line) for line in stdout.splitlines()]
    file_errors = [e for e in events if e["event"] == "file_error"]
    assert len(file_errors) == 1 and file_errors[0]["input"].endswith("b_t2.nii.gz")
    assert "out of memory" in file_errors[0]["message"] and "--batch-size (e.g. 2)" in file_errors[0]["hint"]
    assert events[-1]["event"] == "error"


# ------------------------------------------------------------------------------------ bigl info


def test_info_text(capsys, tiny_bundle):
    assert main(["info", str(tiny_bundle)]) == 0
    text = capsys.readouterr().out
    assert "BiGL (bidirectional" in text
    assert "T2 scans (adapted from labelled T1 scans" in text
    assert "DualAttentionUNet" in text and "ResnetGenerator" in text
    assert f"{parameter_counts(tiny_bundle)['segmenter']:,}" in text
    assert "untrained test bundle" in text and "not measured" in text


def test_info_shows_the_settings_of_the_bundles_own_intensity_normalisation(capsys, tiny_bundle, tmp_path):
    from bigl.testing import make_test_bundle

    assert main(["info", str(tiny_bundle)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "preprocessing:" in line)
    assert "intensity=percentile" in row and "upper_percentile=99.5" in row and "zscore" not in row.replace("intensity=", "")
    zscore = make_test_bundle(tmp_path / "zscore.safetensors", intensity="zscore")
    assert main(["info", str(zscore)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "preprocessing:" in line)
    assert "intensity=zscore" in row and "zscore_low=-4.0" in row and "zscore_high=5.0" in row
    assert "percentile" not in row


def test_info_names_the_inference_options_a_bundle_turns_on(capsys, tiny_bundle, tmp_path):
    from bigl.bundle import annotate_bundle

    assert main(["info", str(tiny_bundle)]) == 0
    assert "inference:     no options on by default" in capsys.readouterr().out
    annotated = annotate_bundle(tiny_bundle, tmp_path / "m.safetensors", inference={"refine_edges": True, "flip": False})
    assert main(["info", str(annotated)]) == 0
    assert "inference:     on by default: refine_edges\n" in capsys.readouterr().out


def test_info_json(capsys, tiny_bundle):
    assert main(["info", str(tiny_bundle), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == parameter_counts(tiny_bundle)
    assert info["modality"] == read_metadata(tiny_bundle)["modality"] == "t2"


def test_info_on_a_bad_file(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_text("nope")
    assert main(["info", str(bad)]) == 2
    assert "bad.safetensors" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ BraTS-style folders


def test_phantom_case_folder(capsys, tmp_path, phantom_cohort, tiny_bundle):
    """In a BraTS case folder only the scan of the model's modality is segmented; the others are
    refused by their file names and the label map is skipped."""
    case = sorted(p for p in phantom_cohort.iterdir() if p.is_dir())[0]
    out = tmp_path / "segs"
    code, stdout, _ = segment(capsys, "-i", case, "-o", out, "-m", tiny_bundle, "--progress", "none")
    assert code == 2
    assert [p.name for p in out.iterdir()] == [f"{case.name}_t2_seg.nii.gz"]
    assert "segmented 1 of 4" in stdout and stdout.count("expects T2") == 3
    reference = nib.load(str(case / f"{case.name}_seg.nii.gz"))
    written = nib.load(str(out / f"{case.name}_t2_seg.nii.gz"))
    assert written.shape == reference.shape and np.allclose(written.affine, reference.affine)


@pytest.mark.slow
def test_real_brats_scan(capsys, tmp_path, brats_dir, tiny_bundle):
    """Optional: a real BraTS T2 volume (240 x 240 x 155) keeps its grid."""
    scan = sorted(brats_dir.glob("*/*_t2.nii.gz"))[0]
    out = tmp_path / "seg.nii.gz"
    assert segment(capsys, "-i", scan, "-o", out, "-m", tiny_bundle, "--progress", "none", "--threads", "2")[0] == 0
    written, original = nib.load(str(out)), nib.load(str(scan))
    assert written.shape == original.shape and np.allclose(written.affine, original.affine)
