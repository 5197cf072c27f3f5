"""The result of ``bigl evaluate`` as a Slicer table: Dice and HD95 per tumour region, mean ± std.

``bigl evaluate --out DIR`` writes ``DIR/summary.json`` (see :func:`bigl.evaluate.evaluate_bundle`):
``{"method", "modality", "n_cases", "summary": {"mean": {region: {"dice", "hd95"}}, "std": ...}}``
with Dice as a fraction and HD95 in mm. The table shows Dice in percent, like Tables 1-2 of the
paper, with an ``Average`` row over the three regions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import vtk

from bigl.errors import InputError

REGIONS = ("WT", "TC", "ET")
COLUMNS = ("Region", "Dice mean (%)", "Dice std (%)", "HD95 mean (mm)", "HD95 std (mm)")
SUMMARY_FILE = "summary.json"


def read_summary(path: str | Path) -> dict[str, Any]:
    """The evaluation result in ``path`` (a ``summary.json`` or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / SUMMARY_FILE
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"no evaluation result at {path}: {exc.strerror or exc}", "run the evaluation again") from None
    except ValueError as exc:
        raise InputError(f"{path} is not a readable evaluation result ({exc})", "run the evaluation again") from None
    if not isinstance(result, dict) or not isinstance(result.get("summary"), dict):
        raise InputError(f"{path} holds no evaluation summary", "run `bigl evaluate --out` again")
    return result


def _score(summary: dict, statistic: str, region: str, metric: str) -> float:
    try:
        value = summary[statistic][region][metric]
    except (KeyError, TypeError):
        return math.nan
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def summary_rows(result: dict[str, Any]) -> list[tuple[str, float, float, float, float]]:
    """``(region, dice mean %, dice std %, hd95 mean, hd95 std)`` for WT, TC, ET and their average."""
    summary = result["summary"]
    rows = []
    for region in REGIONS:
        rows.append((
            region,
            100.0 * _score(summary, "mean", region, "dice"),
            100.0 * _score(summary, "std", region, "dice"),
            _score(summary, "mean", region, "hd95"),
            _score(summary, "std", region, "hd95"),
        ))  # fmt: skip
    rows.append(("Average", *(sum(row[i] for row in rows) / len(REGIONS) for i in range(1, 5))))
    return rows


def evaluation_table_node(scene, result: dict[str, Any], name: str | None = None, node=None):
    """A ``vtkMRMLTableNode`` holding :func:`summary_rows` (``node`` is reused when given)."""
    if name is None:
        name = f"BiGL evaluation: {result.get('method', 'model')} on {str(result.get('modality', '?')).upper()}"
    if node is None or not scene.IsNodePresent(node):
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    else:
        node.SetName(name)
    node.RemoveAllColumns()
    region = vtk.vtkStringArray()
    region.SetName(COLUMNS[0])
    node.AddColumn(region)
    for title in COLUMNS[1:]:
        column = vtk.vtkDoubleArray()
        column.SetName(title)
        node.AddColumn(column)
    table = node.GetTable()
    for row in summary_rows(result):
        table.GetColumn(0).InsertNextValue(row[0])
        for i, value in enumerate(row[1:], start=1):
            table.GetColumn(i).InsertNextValue(value)
    table.Modified()
    node.SetAttribute("BiGLTraining.Cases", str(result.get("n_cases", "")))
    node.Modified()
    return node
