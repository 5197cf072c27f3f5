"""Scene functions on real MRML nodes (headless slicer-core): geometry, segments, tables, round trips."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import slicer_support

pytestmark = [
    pytest.mark.skipif(slicer_support.SKIP_REASON is not None, reason=slicer_support.SKIP_REASON or ""),
    pytest.mark.slicer,
]


def _labels(shape, seed=0) -> np.ndarray:
    """A label map with all three tumour labels in blocks that differ along every axis."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[2:9, 3:7, 1:5] = 2
    labels[4:7, 4:6, 2:4] = 1
    labels[6:8, 5:6, 3:5] = 4
    labels[rng.random(shape) > 0.995] = 4  # scattered single voxels catch any axis swap
    return labels


@pytest.mark.parametrize("scan", ["lps_scan", "anisotropic_scan"])
def test_loaded_volume_exports_to_the_same_voxels_and_affine(scan, request, headless, tmp_path):
    from BiGLSegmentationLib import scene

    path = request.getfixturevalue(scan)
    original = nib.load(str(path))
    volume = headless.load_volume(path)
    np.testing.assert_allclose(scene.ijk_to_ras_matrix(volume), original.affine, atol=1e-4)
    assert scene.grid_shape(volume) == original.shape

    exported = nib.load(str(scene.export_volume_to_nifti(volume, tmp_path / "exported.nii.gz")))
    assert exported.shape == original.shape
    np.testing.assert_array_equal(np.asarray(exported.dataobj), np.asarray(original.dataobj))
    np.testing.assert_allclose(exported.affine, original.affine, atol=1e-4)
    assert exported.header.get_data_dtype() == original.header.get_data_dtype()
    # a voxel maps to the same RAS point in Slicer and in nibabel
    index = np.array([3, 5, 7, 1.0])
    np.testing.assert_allclose(scene.ijk_to_ras_matrix(volume) @ index, exported.affine @ index, atol=1e-3)


def test_export_refuses_label_maps(headless, tmp_path):
    from BiGLSegmentationLib import scene

    labelmap = headless.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    scene.array_to_volume(labelmap, np.zeros((4, 5, 6), np.uint8), np.eye(4))
    with pytest.raises(ValueError, match="not a scalar"):
        scene.export_volume_to_nifti(labelmap, tmp_path / "x.nii.gz")


def test_segmentation_has_fixed_segments_and_exact_voxels(anisotropic_scan, headless):
    from BiGLSegmentationLib import scene

    volume = headless.load_volume(anisotropic_scan)
    labels = _labels(scene.grid_shape(volume))
    node = scene.update_segmentation(volume, labels)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3
    for label, segment_id in scene.SEGMENT_IDS.items():
        segment = segmentation.GetSegment(segment_id)
        assert segment.GetName() == scene.SEGMENT_NAMES[label]
        np.testing.assert_allclose(segment.GetColor(), scene.LABEL_COLORS[label], atol=1e-6)
    np.testing.assert_array_equal(scene.segmentation_to_labels(node, volume), labels)
    assert node.GetAttribute(scene.ROLE_ATTRIBUTE) == scene.ROLE_SEGMENTATION
    assert node.GetAttribute(scene.INPUT_ATTRIBUTE) == volume.GetID()


def test_updating_replaces_voxels_keeps_empty_segments_and_the_node(lps_scan, headless):
    from BiGLSegmentationLib import scene

    volume = headless.load_volume(lps_scan)
    first = scene.update_segmentation(volume, _labels(scene.grid_shape(volume)))
    only_oedema = np.zeros(scene.grid_shape(volume), np.uint8)
    only_oedema[10:12, 10:12, 10:12] = 2
    second = scene.update_segmentation(volume, only_oedema)
    assert second is first
    assert second.GetSegmentation().GetNumberOfSegments() == 3  # empty segments stay, with their names
    np.testing.assert_array_equal(scene.segmentation_to_labels(second, volume), only_oedema)


def test_segmentation_rejects_labels_off_the_grid_or_outside_brats(lps_scan, headless):
    from BiGLSegmentationLib import scene

    volume = headless.load_volume(lps_scan)
    with pytest.raises(ValueError, match="shape"):
        scene.update_segmentation(volume, np.zeros((3, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="outside"):
        scene.update_segmentation(volume, np.full(scene.grid_shape(volume), 3, np.uint8))


def test_outputs_sit_beside_the_input_in_the_subject_hierarchy(lps_scan, headless):
    import slicer

    from BiGLSegmentationLib import scene

    volume = headless.load_volume(lps_scan)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(headless.scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient 1")
    study = hierarchy.CreateStudyItem(patient, "MR study")
    volume_item = hierarchy.GetItemByDataNode(volume) or hierarchy.CreateItem(study, volume)
    hierarchy.SetItemParent(volume_item, study)
    transform = headless.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    volume.SetAndObserveTransformNodeID(transform.GetID())

    segmentation = scene.update_segmentation(volume, _labels(scene.grid_shape(volume)))
    table = scene.update_volume_table(volume, [])
    for node in (segmentation, table):
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study
    assert segmentation.GetTransformNodeID() == transform.GetID()


def test_volume_table_lists_regions_in_millilitres(anisotropic_scan, headless):
    from bigl.volumes import tumour_volumes
    from BiGLSegmentationLib import scene

    volume = headless.load_volume(anisotropic_scan)
    labels = _labels(scene.grid_shape(volume))
    table = scene.update_volume_table(volume, tumour_volumes(labels, scene.voxel_spacing(volume)))
    rows = {row["Region"]: row for row in scene.table_rows(table)}
    voxel_ml = 0.9 * 1.2 * 1.8 / 1000
    expected = {"WT": (labels > 0).sum(), "TC": np.isin(labels, (1, 4)).sum(), "ET": (labels == 4).sum(),
                "NCR/NET": (labels == 1).sum(), "ED": (labels == 2).sum()}
    assert set(rows) == set(expected)
    for key, voxels in expected.items():
        assert rows[key]["Voxels"] == voxels
        assert rows[key]["Volume"] == pytest.approx(voxels * voxel_ml, rel=1e-5)
    assert table.GetColumnUnitLabel("Volume") == "mL"
    again = scene.update_volume_table(volume, tumour_volumes(np.zeros_like(labels), scene.voxel_spacing(volume)))
    assert again is table and table.GetNumberOfRows() == 5 and table.GetNumberOfColumns() == 5


def test_scalar_outputs_take_the_input_geometry_and_a_colour_map(anisotropic_scan, headless):
    from BiGLSegmentationLib import scene

    volume = headless.load_volume(anisotropic_scan)
    data = np.random.default_rng(0).random(scene.grid_shape(volume)).astype(np.float32)
    colour = scene.attention_colour_node(headless.scene)
    node = scene.update_scalar_output(volume, data, role="attention-position", name="attention",
                                      colour_node_id=colour.GetID(), value_range=(0.0, 1.0), threshold=0.05)
    np.testing.assert_array_equal(scene.ijk_to_ras_matrix(node), scene.ijk_to_ras_matrix(volume))
    np.testing.assert_array_equal(scene.volume_to_array(node), data)
    display = node.GetDisplayNode()
    assert display.GetColorNodeID() == colour.GetID()
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(0.05)
    assert scene.attention_colour_node(headless.scene) is colour  # one colour node per scene


def test_segmentation_round_trips_through_seg_nrrd_and_a_brats_label_nifti(anisotropic_scan, headless, tmp_path):
    import slicer

    from BiGLSegmentationLib import scene

    volume = headless.load_volume(anisotropic_scan)
    labels = _labels(scene.grid_shape(volume))
    segmentation = scene.update_segmentation(volume, labels)

    storage = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "tumour.seg.nrrd"))
    assert storage.WriteData(segmentation)
    reloaded = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reloaded")
    reader = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(str(tmp_path / "tumour.seg.nrrd"))
    assert reader.ReadData(reloaded)
    names = {reloaded.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(reloaded.GetSegmentation().GetNumberOfSegments())}
    assert names == set(scene.SEGMENT_NAMES.values())
    np.testing.assert_array_equal(scene.segmentation_to_labels(reloaded, volume), labels)

    path = scene.save_labels_nifti(segmentation, volume, tmp_path / "tumour_seg.nii.gz")
    image = nib.load(str(path))
    np.testing.assert_array_equal(np.asarray(image.dataobj), labels)
    assert set(np.unique(np.asarray(image.dataobj)).tolist()) == {0, 1, 2, 4}
    np.testing.assert_allclose(image.affine, nib.load(str(anisotropic_scan)).affine, atol=1e-4)
    labelmap = headless.load_volume(path, "reloaded labels", labelmap=True)
    np.testing.assert_array_equal(scene.volume_to_array(labelmap), labels)
    from_file = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "from labels")
    labelmap.GetDisplayNode().SetAndObserveColorNodeID(scene.label_colour_table(headless.scene).GetID())
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, from_file)
    np.testing.assert_array_equal(scene.segmentation_to_labels(from_file, volume), labels)


def test_import_results_replaces_outputs_instead_of_adding(anisotropic_scan, headless, tmp_path):
    from BiGLSegmentationLib import scene

    volume = headless.load_volume(anisotropic_scan)
    affine = scene.ijk_to_ras_matrix(volume)
    shape = scene.grid_shape(volume)
    labels_path = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(_labels(shape), affine), str(labels_path))
    attention = {kind: tmp_path / f"scan_attention_{kind}.nii.gz" for kind in scene.ATTENTION_KINDS}
    for path in attention.values():
        nib.save(nib.Nifti1Image(np.random.default_rng(1).random(shape).astype(np.float32), affine), str(path))

    first = scene.import_results(volume, labels_path, attention_paths=attention)
    count = headless.scene.GetNumberOfNodes()
    second = scene.import_results(volume, labels_path, attention_paths=attention)
    assert headless.scene.GetNumberOfNodes() == count
    assert second.segmentation is first.segmentation and second.attention["position"] is first.attention["position"]

    scene.import_results(volume, labels_path)  # attention no longer asked for: its stale maps go
    assert set(scene.find_outputs(volume)) == {scene.ROLE_SEGMENTATION, scene.ROLE_VOLUMES_TABLE}
    assert headless.scene.GetNodeByID(first.attention["position"].GetID()) is None


def test_import_results_refuses_files_on_another_grid(lps_scan, headless, tmp_path):
    from BiGLSegmentationLib import scene

    volume = headless.load_volume(lps_scan)
    shifted = scene.ijk_to_ras_matrix(volume)
    shifted[0, 3] += 5.0
    path = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(scene.grid_shape(volume), np.uint8), shifted), str(path))
    with pytest.raises(RuntimeError, match="grid"):
        scene.import_results(volume, path)


def test_headless_scene_has_the_module_logics_slicer_registers(headless):
    for name in slicer_support.REQUIRED_LOGICS + ("Colors", "Tables"):
        assert headless.app_logic.GetModuleLogic(name) is not None, name
        assert headless.logic(name).GetMRMLScene() is headless.scene, name
    assert headless.scene.GetNodeByID("vtkMRMLColorTableNodeGrey") is not None
    with pytest.raises(KeyError, match="no Nope logic"):
        headless.logic("Nope")
