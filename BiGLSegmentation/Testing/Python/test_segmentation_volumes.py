"""bigl.volumes: tumour volumes in mL from a label map and the voxel spacing."""

from __future__ import annotations

import numpy as np
import pytest

from bigl.errors import InputError
from bigl.volumes import REPORTED_REGIONS, tumour_volumes, voxel_volume_ml


def _labels() -> np.ndarray:
    labels = np.zeros((10, 8, 6), dtype=np.uint8)
    labels[0:2, 0:2, 0:2] = 1  # 8 voxels NCR/NET
    labels[5:8, 0:4, 0:5] = 2  # 60 voxels oedema
    labels[9, 7, 0:3] = 4  # 3 voxels enhancing
    return labels


def test_region_voxels_follow_the_brats_definitions():
    report = {row.key: row for row in tumour_volumes(_labels(), (1.0, 1.0, 1.0))}
    assert [row[0] for row in REPORTED_REGIONS] == list(report)
    assert report["WT"].voxels == 8 + 60 + 3
    assert report["TC"].voxels == 8 + 3
    assert report["ET"].voxels == 3
    assert report["NCR/NET"].voxels == 8
    assert report["ED"].voxels == 60


def test_volumes_scale_with_the_anisotropic_voxel_size():
    spacing = (0.5, 1.2, 3.0)  # 1.8 mm^3 per voxel
    report = {row.key: row for row in tumour_volumes(_labels(), spacing)}
    assert voxel_volume_ml(spacing) == pytest.approx(0.0018)
    assert report["WT"].volume_ml == pytest.approx(71 * 0.0018)
    assert report["ED"].volume_ml == pytest.approx(60 * 0.0018)


def test_empty_map_gives_zero_volumes():
    report = tumour_volumes(np.zeros((4, 4, 4), np.uint8), (1, 1, 1))
    assert all(row.voxels == 0 and row.volume_ml == 0.0 for row in report)


@pytest.mark.parametrize(
    "labels, spacing",
    [
        (np.full((3, 3, 3), 3, np.uint8), (1, 1, 1)),  # BraTS 2023 ET label not mapped
        (np.full((3, 3, 3), 0.5, np.float32), (1, 1, 1)),  # an image, not labels
        (np.zeros((3, 3), np.uint8), (1, 1, 1)),  # 2D
        (np.full((3, 3, 3), -1, np.int16), (1, 1, 1)),
        (np.zeros((3, 3, 3), np.uint8), (1, 0, 1)),
        (np.zeros((3, 3, 3), np.uint8), (1, 1)),
    ],
)
def test_invalid_inputs_raise_input_errors(labels, spacing):
    with pytest.raises(InputError) as error:
        tumour_volumes(labels, spacing)
    assert error.value.hint
