"""The whole flow on a headless scene: volume node -> `bigl segment` subprocess -> nodes, checked
against the core library run directly on the same file."""

from __future__ import annotations

import time

import numpy as np
import pytest
import slicer_support

pytestmark = [
    pytest.mark.skipif(slicer_support.SKIP_REASON is not None, reason=slicer_support.SKIP_REASON or ""),
    pytest.mark.slicer,
]

ALL_OUTPUTS = dict(attention=True, probabilities=True, translated=True)


def _direct_prediction(path, bundle):
    """What the core library predicts for the file, without Slicer or a subprocess."""
    from bigl.data.io import load_volume
    from bigl.inference import BiGLPredictor

    scan = load_volume(path)
    predictor = BiGLPredictor.from_path(bundle, device="cpu", num_threads=1)
    return predictor.predict(scan.data, scan.affine, probabilities=True, attention=True, translated=True)


def assert_same_maps(scene, outputs, expected, *, attention: float, probabilities: float, translated: float) -> None:
    """The module's attention, probability and translated-image nodes hold the library's values
    (``expected``: a direct prediction), within the given absolute tolerances."""
    for kind, node in outputs.attention.items():
        np.testing.assert_allclose(scene.volume_to_array(node), expected.attention[kind], atol=attention)
    for index, label in enumerate((0, 1, 2, 4)):
        if label:
            np.testing.assert_allclose(scene.volume_to_array(outputs.probabilities[label]),
                                       expected.probabilities[index], atol=probabilities)
    np.testing.assert_allclose(scene.volume_to_array(outputs.translated), expected.translated, atol=translated)


@pytest.mark.slow
@pytest.mark.parametrize("scan", ["lps_scan", "anisotropic_scan"])
def test_subprocess_segmentation_matches_the_core_library(scan, request, headless, varied_bundle, tmp_path):
    from BiGLSegmentationLib import scene
    from BiGLSegmentationLib.logic import OutputOptions, SegmentationLogic

    from bigl.bundle import annotate_bundle

    if scan == "anisotropic_scan":  # a model whose defaults include the contrast search (no floor: always searched)
        varied_bundle = annotate_bundle(varied_bundle, tmp_path / "searching.safetensors",
                                        inference={"contrast_search": True})
    path = request.getfixturevalue(scan)
    volume = headless.load_volume(path)
    outputs = SegmentationLogic().segment(volume, varied_bundle, device="cpu", threads=1, timeout=300,
                                          options=OutputOptions(**ALL_OUTPUTS))
    expected = _direct_prediction(path, varied_bundle)
    assert len(np.unique(expected.labels)) >= 3, "the test bundle predicts too few labels to compare"

    # segments: fixed names, voxel-exact
    segmentation = outputs.segmentation.GetSegmentation()
    assert {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())} == \
        set(scene.SEGMENT_NAMES.values())
    np.testing.assert_array_equal(scene.segmentation_to_labels(outputs.segmentation, volume), expected.labels)
    for label, segment_id in scene.SEGMENT_IDS.items():
        assert segmentation.GetSegment(segment_id).GetName() == scene.SEGMENT_NAMES[label]

    # every auxiliary volume on the input's grid, holding the core library's values
    reference = scene.ijk_to_ras_matrix(volume)
    assert set(outputs.attention) == {"position", "channel"} and set(outputs.probabilities) == {1, 2, 4}
    for node in outputs.overlays():
        np.testing.assert_array_equal(scene.ijk_to_ras_matrix(node), reference)
        assert scene.grid_shape(node) == scene.grid_shape(volume)
    assert_same_maps(scene, outputs, expected, attention=1e-5, probabilities=1e-5, translated=1e-5)
    # the model's confidence in its tumour comes back with the outputs (the done event of bigl segment)
    assert expected.confidence is not None and outputs.confidence == pytest.approx(expected.confidence, abs=1e-5)
    # ...and so does the contrast view the model's search kept (None for a model that does not search)
    assert (expected.contrast_gamma is None) == (scan == "lps_scan")
    assert outputs.contrast_gamma == expected.contrast_gamma

    # the volume table counts the direct output's voxels
    rows = {row["Region"]: row for row in scene.table_rows(outputs.volumes_table)}
    voxel_ml = abs(np.linalg.det(reference[:3, :3])) / 1000.0
    for key, labels in (("WT", (1, 2, 4)), ("TC", (1, 4)), ("ET", (4,)), ("NCR/NET", (1,)), ("ED", (2,))):
        voxels = int(np.isin(expected.labels, labels).sum())
        assert rows[key]["Voxels"] == voxels
        assert rows[key]["Volume"] == pytest.approx(voxels * voxel_ml, rel=1e-4)


@pytest.mark.slow
def test_running_again_updates_the_same_nodes(lps_scan, headless, varied_bundle):
    from BiGLSegmentationLib import scene
    from BiGLSegmentationLib.logic import OutputOptions, SegmentationLogic

    volume = headless.load_volume(lps_scan)
    logic = SegmentationLogic()
    first = logic.segment(volume, varied_bundle, device="cpu", threads=1, timeout=300,
                          options=OutputOptions(attention=True))
    # the run states the model's modality: no "cannot be checked" warning
    assert not any("cannot be checked" in warning for warning in first.warnings), first.warnings
    nodes = {headless.scene.GetNthNode(i).GetID() for i in range(headless.scene.GetNumberOfNodes())}
    # an unstated modality: bigl segment's warning event comes back with the outputs
    second = logic.segment(volume, varied_bundle, device="cpu", threads=1, timeout=300,
                           options=OutputOptions(attention=True), modality="")
    assert any("cannot be checked" in warning for warning in second.warnings), second.warnings
    assert {headless.scene.GetNthNode(i).GetID() for i in range(headless.scene.GetNumberOfNodes())} == nodes
    assert second.segmentation is first.segmentation and second.volumes_table is first.volumes_table
    assert sorted(scene.find_outputs(volume)) == sorted(
        [scene.ROLE_SEGMENTATION, scene.ROLE_VOLUMES_TABLE, "attention-position", "attention-channel"])


@pytest.mark.slow
def test_polling_reports_progress_and_cancel_stops_the_run(lps_scan, headless, varied_bundle):
    from BiGLSegmentationLib.logic import SegmentationError, SegmentationLogic

    volume = headless.load_volume(lps_scan)
    run = SegmentationLogic().start_segmentation(volume, varied_bundle, device="cpu", threads=1)
    fractions = []
    deadline = time.monotonic() + 120
    status = run.poll()
    while status.running and time.monotonic() < deadline:
        time.sleep(0.05)
        status = run.poll()
        if status.fraction is not None:
            fractions.append(status.fraction)
    assert not status.running
    assert fractions and fractions == sorted(fractions) and fractions[-1] == 1.0
    outputs = run.finish()
    assert not run.files.folder.exists()  # temporary files removed
    assert outputs.segmentation is not None

    run = SegmentationLogic().start_segmentation(volume, varied_bundle, device="cpu", threads=1)
    run.cancel()
    assert not run.status.running and run.cancelled
    assert not run.process.running
    with pytest.raises(SegmentationError, match="cancelled"):
        run.finish()


@pytest.mark.slow
def test_failures_come_back_as_messages_with_a_fix(lps_scan, headless, varied_bundle, tmp_path):
    from BiGLSegmentationLib import scene
    from BiGLSegmentationLib.logic import SegmentationError, SegmentationLogic

    volume = headless.load_volume(lps_scan)
    not_a_model = tmp_path / "weights.safetensors"
    not_a_model.write_bytes(b"garbage")
    with pytest.raises(SegmentationError) as error:
        SegmentationLogic().segment(volume, not_a_model, device="cpu", threads=1, timeout=120)
    assert "weights.safetensors" in error.value.message and error.value.hint.startswith("Fix:")

    blank = headless.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "blank")
    scene.array_to_volume(blank, np.zeros((32, 32, 20), np.int16), scene.ijk_to_ras_matrix(volume))
    with pytest.raises(SegmentationError) as error:
        SegmentationLogic().segment(blank, varied_bundle, device="cpu", threads=1, timeout=120)
    assert "constant" in error.value.message
    assert scene.find_outputs(blank) == {} and scene.find_outputs(volume) == {}

    with pytest.raises(SegmentationError, match="No input"):
        SegmentationLogic().segment(None, varied_bundle)


@pytest.mark.slow
def test_onnx_runtime_segmentation_without_torch(lps_scan, headless, varied_bundle, tmp_path, monkeypatch):
    """The module's run on real MRML nodes, with the subprocess unable to import torch: the model's
    ONNX export segments, and agrees with the PyTorch engine run directly."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from bigl.export import export_bundle
    from BiGLSegmentationLib import scene
    from BiGLSegmentationLib.logic import OutputOptions, SegmentationLogic

    from bigl.testing import make_test_bundle

    # sharpened attention: a nearly uniform map, scaled to [0, 1] per volume, would magnify rounding
    bundle = make_test_bundle(tmp_path / "model" / "sharp.safetensors", sharpen=10.0, attention_sharpen=10.0)
    export_bundle(bundle)
    blocker = tmp_path / "no_torch"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'safetensors'):\n"
        "            raise ImportError(f'{name} is blocked in this test')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(blocker))  # the child keeps it, after the bigl root

    volume = headless.load_volume(lps_scan)
    run = SegmentationLogic().start_segmentation(volume, bundle, device="cpu", threads=1,
                                                 options=OutputOptions(**ALL_OUTPUTS))
    command = run.command()
    assert command[command.index("--engine") + 1] == "auto"  # the module's default: auto picks the export
    assert command[command.index("--modality") + 1] == "t2"
    run.wait(timeout=300)
    log = run.process.log_tail(40)
    assert "ONNX Runtime" in log, log
    outputs = run.finish()
    assert not any("cannot be checked" in warning for warning in outputs.warnings), outputs.warnings
    expected = _direct_prediction(lps_scan, bundle)
    assert len(np.unique(expected.labels)) > 1
    labels = scene.segmentation_to_labels(outputs.segmentation, volume)
    assert (labels == expected.labels).mean() >= 0.999, log
    assert_same_maps(scene, outputs, expected, attention=1e-3, probabilities=1e-4, translated=1e-3)

    # without an export, segmenting where torch cannot be imported says what to do
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes(varied_bundle.read_bytes())
    from BiGLSegmentationLib.logic import SegmentationError

    with pytest.raises(SegmentationError) as error:
        SegmentationLogic().segment(volume, alone, device="cpu", threads=1, timeout=120)
    assert "no ONNX export" in error.value.message, error.value.details
    assert "bigl export" in error.value.hint and "BiGL Training" in error.value.hint, error.value.hint
    assert "--engine torch" not in error.value.hint
