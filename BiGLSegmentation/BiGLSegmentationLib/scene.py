"""Scene side of the module: volume nodes to NIfTI files and BiGL results to MRML nodes.

Needs Slicer's MRML (``slicer``, ``vtk``) but not Qt or the Slicer application, so it runs
inside Slicer and on a headless scene from the ``slicer-core`` wheel alike. Every function takes
its nodes as arguments and works on ``node.GetScene()``, never on the global ``slicer.mrmlScene``.

Geometry: Slicer's IJK-to-RAS matrix and a NIfTI (nibabel) affine are the same map, voxel indices
(i, j, k) to RAS millimetres, but ``slicer.util.arrayFromVolume`` returns voxels as ``[k, j, i]``
while nibabel arrays are ``[i, j, k]``. :func:`volume_to_array` / :func:`array_to_volume`
transpose between the two, so a volume written here and read by nibabel (or by Slicer) lands
on exactly the same voxels.

Outputs are tagged with attributes (:data:`ROLE_ATTRIBUTE` and :data:`INPUT_ATTRIBUTE`) so that
running the module again on the same input updates its nodes instead of adding new ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer
import slicer.util
import vtk

from bigl.labels import CLASS_NAMES, LABEL_COLORS, LABELS
from bigl.volumes import RegionVolume, tumour_volumes

ROLE_ATTRIBUTE = "BiGL.role"
INPUT_ATTRIBUTE = "BiGL.inputVolumeID"
MODEL_ATTRIBUTE = "BiGL.model"
COLOUR_ATTRIBUTE = "BiGL.colour"

ROLE_SEGMENTATION = "segmentation"
ROLE_VOLUMES_TABLE = "volumes"
ROLE_TRANSLATED = "translated"
ATTENTION_KINDS = ("position", "channel")
TUMOUR_LABELS = tuple(label for label in LABELS if label != 0)

#: Fixed segment IDs per BraTS label (the names and colours come from bigl.labels).
SEGMENT_IDS = {1: "necrotic_core", 2: "edema", 4: "enhancing_tumor"}
SEGMENT_NAMES = {label: CLASS_NAMES[index] for index, label in enumerate(LABELS) if label != 0}

#: Inferno-like ramp (sampled from matplotlib's "inferno") for attention maps.
ATTENTION_RAMP = (
    (0.001, 0.000, 0.014), (0.129, 0.047, 0.291), (0.342, 0.062, 0.429), (0.541, 0.135, 0.415),
    (0.736, 0.216, 0.330), (0.894, 0.353, 0.194), (0.978, 0.558, 0.035), (0.975, 0.798, 0.206),
    (0.988, 0.998, 0.645),
)
#: Values below these are transparent when the map is shown over the scan.
ATTENTION_THRESHOLD = 0.05
PROBABILITY_THRESHOLD = 0.05
GREY_COLOUR_NODE_ID = "vtkMRMLColorTableNodeGrey"


def attention_role(kind: str) -> str:
    return f"attention-{kind}"


def probability_role(label: int) -> str:
    return f"probability-{label}"


# -----------------------------------------------------------------------------------------------
# geometry and arrays


def ijk_to_ras_matrix(volume_node) -> np.ndarray:
    """The volume's IJK-to-RAS matrix (its own, without parent transforms) as a 4x4 array."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def _vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row, column]))
    return matrix


def volume_to_array(volume_node) -> np.ndarray:
    """A copy of the voxels as an ``[i, j, k]`` array (nibabel order)."""
    if volume_node is None or volume_node.GetImageData() is None:
        raise ValueError("the volume has no image data")
    return np.array(slicer.util.arrayFromVolume(volume_node).transpose(2, 1, 0), copy=True)


def array_to_volume(volume_node, data: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    """Set a volume node's voxels from an ``[i, j, k]`` array and its geometry from a matrix."""
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {data.shape}")
    volume_node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras))
    slicer.util.updateVolumeFromArray(volume_node, np.ascontiguousarray(data.transpose(2, 1, 0)))


def export_volume_to_nifti(volume_node, path: str | Path) -> Path:
    """Write a scalar volume node as NIfTI with its exact grid (qform and sform = IJK-to-RAS).

    The node's own geometry is used; a parent transform, if any, is applied to the outputs
    instead (they are placed under the same transform), so results line up in the views.
    """
    import nibabel as nib

    if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ValueError(f"{volume_node.GetName()} is not a scalar (grey-level) volume")
    image_data = volume_node.GetImageData()
    if image_data is None:
        raise ValueError(f"{volume_node.GetName()} has no image data")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"{volume_node.GetName()} has {image_data.GetNumberOfScalarComponents()} components; "
                         "BiGL segments single-channel (grey-level) scans")
    data = volume_to_array(volume_node)
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    affine = ijk_to_ras_matrix(volume_node)
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def read_output(path: str | Path, input_node, *, channels_last: bool = False) -> np.ndarray:
    """Read a NIfTI output and check it lies on the input's grid; returns the ``[i, j, k(, c)]`` array."""
    import nibabel as nib

    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj)
    expected = tuple(grid_shape(input_node))
    if tuple(data.shape[:3]) != expected or (data.ndim == 4) != channels_last:
        raise RuntimeError(f"{Path(path).name} has shape {data.shape}, not the input's grid {expected}")
    difference = float(np.max(np.abs(image.affine - ijk_to_ras_matrix(input_node))))
    if difference > 1e-3:
        raise RuntimeError(f"{Path(path).name} is not on the input's grid (affine differs by {difference:.3g} mm)")
    return np.asarray(data)


def grid_shape(volume_node) -> tuple[int, int, int]:
    """The (i, j, k) dimensions of a volume node."""
    return tuple(int(size) for size in volume_node.GetImageData().GetDimensions())


def voxel_spacing(volume_node) -> tuple[float, float, float]:
    """Voxel size in mm along i, j, k."""
    return tuple(float(s) for s in volume_node.GetSpacing())


# -----------------------------------------------------------------------------------------------
# finding, creating and placing output nodes


def find_output(input_node, role: str):
    """The output node of ``role`` made for ``input_node``, or None."""
    return find_outputs(input_node).get(role)


def find_outputs(input_node) -> dict[str, object]:
    """All output nodes made for ``input_node``, by role."""
    scene = input_node.GetScene()
    found = {}
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        role = node.GetAttribute(ROLE_ATTRIBUTE)
        if role and node.GetAttribute(INPUT_ATTRIBUTE) == input_node.GetID():
            found[role] = node
    return found


def output_node(input_node, role: str, class_name: str, name: str):
    """The existing output of ``role`` for this input, or a new node tagged with it."""
    scene = input_node.GetScene()
    node = find_output(input_node, role)
    if node is not None and not node.IsA(class_name):
        remove_node(node)
        node = None
    if node is None:
        node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
        node.SetAttribute(ROLE_ATTRIBUTE, role)
        node.SetAttribute(INPUT_ATTRIBUTE, input_node.GetID())
    place_beside(node, input_node)
    return node


def place_beside(node, reference_node) -> None:
    """Put ``node`` in the subject hierarchy folder/study of ``reference_node``, under its transform."""
    scene = reference_node.GetScene()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is not None:
        reference_item = _hierarchy_item(hierarchy, reference_node)
        item = _hierarchy_item(hierarchy, node)
        parent = hierarchy.GetItemParent(reference_item)
        if hierarchy.GetItemParent(item) != parent:
            hierarchy.SetItemParent(item, parent)
    if node.IsA("vtkMRMLTransformableNode"):
        node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())


def _hierarchy_item(hierarchy, node) -> int:
    item = hierarchy.GetItemByDataNode(node)
    if not item:  # the Slicer application adds items itself; a bare scene does not
        item = hierarchy.CreateItem(hierarchy.GetSceneItemID(), node)
    return item


def remove_outputs(input_node, keep_roles=()) -> None:
    """Remove this input's outputs except those of ``keep_roles`` (results of an earlier run)."""
    for role, node in find_outputs(input_node).items():
        if role not in keep_roles:
            remove_node(node)


def remove_node(node) -> None:
    """Remove a node with its display and storage nodes (the application does that too; a bare scene does not)."""
    scene = node.GetScene()
    attached = []
    if node.IsA("vtkMRMLDisplayableNode"):
        attached += [node.GetNthDisplayNodeID(index) for index in range(node.GetNumberOfDisplayNodes())]
    if node.IsA("vtkMRMLStorableNode"):
        attached += [node.GetNthStorageNodeID(index) for index in range(node.GetNumberOfStorageNodes())]
    scene.RemoveNode(node)
    for node_id in attached:
        leftover = scene.GetNodeByID(node_id) if node_id else None
        if leftover is not None:
            scene.RemoveNode(leftover)


# -----------------------------------------------------------------------------------------------
# colours


def _colour_node(scene, key: str):
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        if node.IsA("vtkMRMLColorNode") and node.GetAttribute(COLOUR_ATTRIBUTE) == key:
            return node
    return None


def label_colour_table(scene):
    """The colour table of the BraTS labels (names = segment names), made once per scene."""
    node = _colour_node(scene, "labels")
    if node is not None:
        return node
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "BiGL tumour labels")
    node.SetAttribute(COLOUR_ATTRIBUTE, "labels")
    node.SetTypeToUser()
    node.SetNumberOfColors(max(LABELS) + 1)
    node.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for value in range(1, max(LABELS) + 1):
        if value in SEGMENT_NAMES:
            node.SetColor(value, SEGMENT_NAMES[value], *LABEL_COLORS[value], 1.0)
        else:
            node.SetColor(value, "", 0.0, 0.0, 0.0, 0.0)
    return node


def _ramp_colour_node(scene, key: str, name: str, points):
    node = _colour_node(scene, key)
    if node is not None:
        return node
    node = slicer.vtkMRMLProceduralColorNode()
    node.SetName(scene.GenerateUniqueName(name))
    node.SetAttribute(COLOUR_ATTRIBUTE, key)
    function = node.GetColorTransferFunction()
    function.RemoveAllPoints()
    for position, (red, green, blue) in points:
        function.AddRGBPoint(position, red, green, blue)
    scene.AddNode(node)
    return node


def attention_colour_node(scene):
    """An inferno-like colour ramp on [0, 1] for the attention maps."""
    step = 1.0 / (len(ATTENTION_RAMP) - 1)
    return _ramp_colour_node(scene, "attention", "BiGL attention (inferno)",
                             [(index * step, colour) for index, colour in enumerate(ATTENTION_RAMP)])


def probability_colour_node(scene, label: int):
    """A ramp from a dark to the full colour of a tumour label, on [0, 1]."""
    red, green, blue = LABEL_COLORS[label]
    return _ramp_colour_node(scene, f"probability-{label}", f"BiGL probability {SEGMENT_NAMES[label]}",
                             [(0.0, (0.25 * red, 0.25 * green, 0.25 * blue)), (1.0, (red, green, blue))])


# -----------------------------------------------------------------------------------------------
# results into the scene


def update_segmentation(input_node, labels: np.ndarray, *, surface: bool = False, name: str | None = None):
    """Create or update the segmentation of ``input_node`` from a BraTS label map ``[i, j, k]``.

    One segment per tumour sub-region, with fixed IDs (:data:`SEGMENT_IDS`), names and colours,
    present even when empty; the reference geometry is the input volume's. Voxel-exact: each
    segment holds exactly the voxels of its label.
    """
    labels = np.asarray(labels)
    if labels.shape != grid_shape(input_node):
        raise ValueError(f"label map shape {labels.shape} differs from the input's {grid_shape(input_node)}")
    unknown = sorted(set(np.unique(labels).tolist()) - set(LABELS))
    if unknown:
        raise ValueError(f"label map has values {unknown} outside {list(LABELS)}")
    scene = input_node.GetScene()
    segmentation_node = output_node(input_node, ROLE_SEGMENTATION, "vtkMRMLSegmentationNode",
                                    name or f"{input_node.GetName()} BiGL segmentation")
    segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(input_node)
    segmentation = segmentation_node.GetSegmentation()
    segment_ids = vtk.vtkStringArray()
    for label in TUMOUR_LABELS:
        segment_id = SEGMENT_IDS[label]
        segment = segmentation.GetSegment(segment_id)
        if segment is None:
            segmentation.AddEmptySegment(segment_id, SEGMENT_NAMES[label], LABEL_COLORS[label])
        else:
            segment.SetName(SEGMENT_NAMES[label])
            segment.SetColor(*LABEL_COLORS[label])
        segment_ids.InsertNextValue(segment_id)
    # label value n of the temporary map fills the n-th listed segment (and clears it elsewhere)
    positions = np.zeros(max(LABELS) + 1, dtype=np.uint8)
    for position, label in enumerate(TUMOUR_LABELS, start=1):
        positions[label] = position
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "BiGL temporary labels")
    try:
        array_to_volume(labelmap, positions[labels.astype(np.intp)], ijk_to_ras_matrix(input_node))
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
            labelmap, segmentation_node, segment_ids
        ):
            raise RuntimeError("Slicer could not import the label map into the segmentation")
    finally:
        remove_node(labelmap)
    if surface:
        segmentation_node.CreateClosedSurfaceRepresentation()
    else:
        segmentation_node.RemoveClosedSurfaceRepresentation()
    return segmentation_node


def segmentation_to_labels(segmentation_node, reference_volume) -> np.ndarray:
    """The BraTS label map ``[i, j, k]`` of a segmentation on a reference volume's grid.

    Segments are matched to labels by name (:data:`SEGMENT_NAMES`); others are ignored.
    """
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "BiGL temporary export")
    try:
        segmentation = segmentation_node.GetSegmentation()
        segment_ids = vtk.vtkStringArray()
        for index in range(segmentation.GetNumberOfSegments()):
            if segmentation.GetNthSegment(index).GetName() in SEGMENT_NAMES.values():
                segment_ids.InsertNextValue(segmentation.GetNthSegmentID(index))
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, segment_ids, labelmap, reference_volume,
            slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, label_colour_table(scene),
        )
        if not ok:
            raise RuntimeError("Slicer could not export the segmentation to a label map")
        return volume_to_array(labelmap).astype(np.uint8)
    finally:
        remove_node(labelmap)


def save_labels_nifti(segmentation_node, reference_volume, path: str | Path) -> Path:
    """Save a segmentation as a NIfTI BraTS label map (0/1/2/4) on the reference volume's grid."""
    import nibabel as nib

    labels = segmentation_to_labels(segmentation_node, reference_volume)
    affine = ijk_to_ras_matrix(reference_volume)
    image = nib.Nifti1Image(labels, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def update_scalar_output(input_node, data: np.ndarray, *, role: str, name: str, colour_node_id: str,
                         value_range: tuple[float, float], threshold: float | None = None):
    """Create or update a scalar volume on the input's grid, displayed with a colour map."""
    node = output_node(input_node, role, "vtkMRMLScalarVolumeNode", name)
    array_to_volume(node, np.asarray(data, dtype=np.float32), ijk_to_ras_matrix(input_node))
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(colour_node_id)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(*value_range)
    if threshold is None:
        display.ApplyThresholdOff()
    else:
        display.SetThreshold(threshold, max(value_range[1], threshold))
        display.ApplyThresholdOn()
    return node


def update_volume_table(input_node, report: list[RegionVolume]):
    """Create or update the table of tumour volumes (one row per region) for this input."""
    table_node = output_node(input_node, ROLE_VOLUMES_TABLE, "vtkMRMLTableNode",
                             f"{input_node.GetName()} BiGL tumour volumes")
    table = table_node.GetTable()
    was_modifying = table_node.StartModify()
    table_node.RemoveAllColumns()
    columns = {
        "Region": vtk.vtkStringArray(),
        "Description": vtk.vtkStringArray(),
        "Labels": vtk.vtkStringArray(),
        "Volume": vtk.vtkDoubleArray(),
        "Voxels": vtk.vtkIntArray(),
    }
    for column_name, column in columns.items():
        column.SetName(column_name)
    for row in report:
        columns["Region"].InsertNextValue(row.key)
        columns["Description"].InsertNextValue(row.description)
        columns["Labels"].InsertNextValue(", ".join(str(label) for label in row.labels))
        columns["Volume"].InsertNextValue(row.volume_ml)
        columns["Voxels"].InsertNextValue(row.voxels)
    for column in columns.values():
        table.AddColumn(column)
    table_node.SetColumnUnitLabel("Volume", "mL")
    table_node.SetColumnDescription("Volume", "tumour volume in millilitres (voxel count x voxel volume)")
    table_node.SetColumnDescription("Labels", "BraTS labels counted (1 NCR/NET, 2 oedema, 4 enhancing)")
    table_node.SetUseColumnTitleAsColumnHeader(True)
    table_node.EndModify(was_modifying)
    table.Modified()
    return table_node


def table_rows(table_node) -> list[dict[str, object]]:
    """The rows of a table node as dictionaries (column name -> value)."""
    table = table_node.GetTable()
    rows = []
    for row in range(table.GetNumberOfRows()):
        rows.append({
            table.GetColumnName(column): table.GetValue(row, column).ToString()
            if table.GetColumn(column).IsA("vtkStringArray") else table.GetValue(row, column).ToDouble()
            for column in range(table.GetNumberOfColumns())
        })
    return rows


@dataclass
class SegmentationOutputs:
    """The nodes a run created or updated."""

    segmentation: object
    volumes_table: object
    volumes: list[RegionVolume]
    translated: object | None = None
    attention: dict[str, object] = field(default_factory=dict)
    probabilities: dict[int, object] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what bigl segment warned about (implausible scan or result)
    confidence: float | None = None  # the model's mean confidence in the tumour it found (bigl.prediction.tumour_confidence)
    contrast_gamma: float | None = None  # the contrast view the model's contrast search kept (None: no search)

    def overlays(self) -> list[object]:
        """The scalar outputs that can be shown over the input, most telling first."""
        return [*self.attention.values(), *self.probabilities.values(),
                *([self.translated] if self.translated is not None else [])]


def import_results(input_node, labels_path: str | Path, *, attention_paths: dict[str, Path] | None = None,
                   translated_path: str | Path | None = None, probabilities_path: str | Path | None = None,
                   surface: bool = False, model_name: str = "") -> SegmentationOutputs:
    """Put the files written by ``bigl segment`` into the scene, replacing this input's earlier outputs."""
    scene = input_node.GetScene()
    labels = read_output(labels_path, input_node).astype(np.uint8)
    report = tumour_volumes(labels, voxel_spacing(input_node))
    kept = {ROLE_SEGMENTATION, ROLE_VOLUMES_TABLE}
    outputs = SegmentationOutputs(
        segmentation=update_segmentation(input_node, labels, surface=surface),
        volumes_table=update_volume_table(input_node, report),
        volumes=report,
    )
    base = input_node.GetName()
    for kind, path in (attention_paths or {}).items():
        role = attention_role(kind)
        outputs.attention[kind] = update_scalar_output(
            input_node, read_output(path, input_node), role=role, name=f"{base} BiGL {kind} attention",
            colour_node_id=attention_colour_node(scene).GetID(), value_range=(0.0, 1.0),
            threshold=ATTENTION_THRESHOLD,
        )
        kept.add(role)
    if translated_path is not None:
        outputs.translated = update_scalar_output(
            input_node, read_output(translated_path, input_node), role=ROLE_TRANSLATED,
            name=f"{base} BiGL translated", colour_node_id=GREY_COLOUR_NODE_ID, value_range=(-1.0, 1.0),
        )
        kept.add(ROLE_TRANSLATED)
    if probabilities_path is not None:
        maps = read_output(probabilities_path, input_node, channels_last=True)
        if maps.shape[3] != len(LABELS):
            raise RuntimeError(f"the probabilities have {maps.shape[3]} classes, expected {len(LABELS)}")
        for index, label in enumerate(LABELS):
            if label == 0:
                continue
            role = probability_role(label)
            outputs.probabilities[label] = update_scalar_output(
                input_node, maps[..., index], role=role, name=f"{base} BiGL probability {SEGMENT_NAMES[label]}",
                colour_node_id=probability_colour_node(scene, label).GetID(), value_range=(0.0, 1.0),
                threshold=PROBABILITY_THRESHOLD,
            )
            kept.add(role)
    remove_outputs(input_node, keep_roles=kept)
    for node in [outputs.segmentation, outputs.volumes_table, *outputs.overlays()]:
        node.SetAttribute(MODEL_ATTRIBUTE, model_name)
    return outputs
