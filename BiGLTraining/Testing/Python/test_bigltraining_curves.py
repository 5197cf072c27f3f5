"""Loss curves and the evaluation summary as real MRML table / plot nodes (slicer-core, no Qt)."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.slicer


def step(stage, n, **losses):
    return {"event": "step", "stage": stage, "step": n, "total": 100, "losses": losses}


def column(table_node, name):
    import slicer.util

    return slicer.util.arrayFromTableColumn(table_node, name)


def test_one_table_and_chart_per_stage(headless_slicer):
    from BiGLTrainingLib.curves import LossCurves

    curves = LossCurves(headless_slicer.scene, prefix="BiGL run1", run_folder="/runs/run1")
    changed = curves.add_events([
        {"event": "start", "stage": "translator", "total": 100},
        step("translator", 10, g_adv=1.0, d=0.5),
        step("translator", 20, g_adv=0.8, d=0.4),
        {"event": "checkpoint", "stage": "translator", "step": 20, "path": "c"},
        step("adapt", 10, seg=2.0),
    ])  # fmt: skip
    assert changed == {"translator", "adapt"}
    translator = curves.table_node("translator")
    assert translator.GetNumberOfRows() == 2
    assert translator.GetColumnName(0) == "step"
    np.testing.assert_array_equal(column(translator, "step"), [10, 20])
    np.testing.assert_allclose(column(translator, "g_adv"), [1.0, 0.8])
    np.testing.assert_allclose(column(translator, "d"), [0.5, 0.4])
    assert curves.table_node("adapt").GetNumberOfRows() == 1

    chart = curves.chart_node("translator")
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    names = set()
    for i in range(chart.GetNumberOfPlotSeriesNodes()):
        series = chart.GetNthPlotSeriesNode(i)
        assert series.GetTableNode() is translator
        assert series.GetXColumnName() == "step"
        names.add(series.GetYColumnName())
    assert names == {"g_adv", "d"}
    assert headless_slicer.scene.GetNodesByClass("vtkMRMLTableNode").GetNumberOfItems() == 2


def test_late_loss_gets_nan_before_it_appears_and_missing_values_are_nan(headless_slicer):
    from BiGLTrainingLib.curves import LossCurves

    curves = LossCurves(headless_slicer.scene)
    curves.add_events([step("adapt", 1, seg=1.0), step("adapt", 2, seg=0.9, adv=0.3), step("adapt", 3, adv=0.2)])
    table = curves.table_node("adapt")
    np.testing.assert_allclose(column(table, "adv"), [math.nan, 0.3, 0.2])
    np.testing.assert_allclose(column(table, "seg"), [1.0, 0.9, math.nan])
    assert curves.chart_node("adapt").GetNumberOfPlotSeriesNodes() == 2


def test_resumed_steps_replace_the_rows_from_that_step_on(headless_slicer):
    """A resume repeats the steps after the last checkpoint: the curve must stay a function of the step."""
    from BiGLTrainingLib.curves import LossCurves

    curves = LossCurves(headless_slicer.scene)
    curves.add_events([step("adapt", n, seg=10.0 - n) for n in (10, 20, 30, 40)])
    curves.add_events([step("adapt", n, seg=100.0 + n) for n in (30, 40, 50)])  # resumed from step 20
    table = curves.table_node("adapt")
    np.testing.assert_array_equal(column(table, "step"), [10, 20, 30, 40, 50])
    np.testing.assert_allclose(column(table, "seg"), [0.0, -10.0, 130.0, 140.0, 150.0])


def test_events_without_usable_numbers_are_ignored(headless_slicer):
    from BiGLTrainingLib.curves import LossCurves

    curves = LossCurves(headless_slicer.scene)
    assert curves.add_events([
        {"event": "step", "stage": "adapt", "step": "x", "losses": {"seg": 1.0}},
        {"event": "step", "stage": "adapt", "step": 5, "losses": {"seg": "high"}},
        {"event": "step", "stage": None, "step": 5, "losses": {"seg": 1.0}},
        {"event": "step", "stage": "adapt", "step": float("nan"), "losses": {"seg": 1.0}},
    ]) == set()  # fmt: skip
    assert curves.table_node("adapt") is None
    assert headless_slicer.scene.GetNodesByClass("vtkMRMLTableNode").GetNumberOfItems() == 0


def test_nodes_come_back_after_the_scene_is_closed(headless_slicer):
    from BiGLTrainingLib.curves import LossCurves

    curves = LossCurves(headless_slicer.scene)
    curves.add_events([step("adapt", 1, seg=1.0)])
    headless_slicer.close()
    assert curves.table_node("adapt") is None
    curves.add_events([step("adapt", 2, seg=0.5)])
    table = curves.table_node("adapt")
    assert table is not None and headless_slicer.scene.IsNodePresent(table)
    np.testing.assert_array_equal(column(table, "step"), [2])


def test_a_later_session_takes_over_the_nodes_of_the_same_run(headless_slicer):
    from BiGLTrainingLib.curves import LossCurves

    first = LossCurves(headless_slicer.scene, prefix="BiGL a", run_folder="/runs/a")
    first.add_events([step("adapt", 1, seg=1.0, adv=0.1)])
    other = LossCurves(headless_slicer.scene, prefix="BiGL b", run_folder="/runs/b")
    other.add_events([step("adapt", 1, seg=5.0)])
    again = LossCurves(headless_slicer.scene, prefix="BiGL a", run_folder="/runs/a")
    again.adopt_existing()
    assert again.table_node("adapt") is first.table_node("adapt")
    assert again.table_node("adapt").GetNumberOfRows() == 0  # emptied: the log is replayed into it
    assert set(again.series_nodes("adapt")) == {"seg", "adv"}
    again.add_events([step("adapt", 1, seg=1.0, adv=0.1)])
    assert headless_slicer.scene.GetNodesByClass("vtkMRMLPlotChartNode").GetNumberOfItems() == 2
    assert other.table_node("adapt").GetNumberOfRows() == 1  # another run's nodes are left alone
    again.remove_nodes()
    assert headless_slicer.scene.GetNodesByClass("vtkMRMLPlotChartNode").GetNumberOfItems() == 1


def test_evaluation_summary_table(headless_slicer, tmp_path):
    import json

    from BiGLTrainingLib.evaluation import COLUMNS, evaluation_table_node, read_summary, summary_rows
    from bigl.errors import InputError

    result = {
        "method": "BiGL", "modality": "t2", "n_cases": 4,
        "summary": {
            "mean": {"WT": {"dice": 0.8, "hd95": 10.0}, "TC": {"dice": 0.7, "hd95": 20.0}, "ET": {"dice": 0.6, "hd95": 30.0}},
            "std": {"WT": {"dice": 0.1, "hd95": 1.0}, "TC": {"dice": 0.2, "hd95": 2.0}, "ET": {"dice": 0.3, "hd95": 3.0}},
        },
    }  # fmt: skip
    (tmp_path / "summary.json").write_text(json.dumps(result))
    rows = summary_rows(read_summary(tmp_path))
    assert [row[0] for row in rows] == ["WT", "TC", "ET", "Average"]
    np.testing.assert_allclose(rows[3][1:], [70.0, 20.0, 20.0, 2.0])
    node = evaluation_table_node(headless_slicer.scene, result)
    assert node.GetNumberOfRows() == 4 and node.GetNumberOfColumns() == len(COLUMNS)
    assert node.GetCellText(0, 0) == "WT" and float(node.GetCellText(0, 1)) == pytest.approx(80.0)
    assert node.GetAttribute("BiGLTraining.Cases") == "4"
    assert "t2".upper() in node.GetName()
    again = evaluation_table_node(headless_slicer.scene, result, node=node)
    assert again is node and node.GetNumberOfRows() == 4  # refilled, not appended

    (tmp_path / "summary.json").write_text("{broken")
    with pytest.raises(InputError):
        read_summary(tmp_path)
    with pytest.raises(InputError):
        read_summary(tmp_path / "absent")
