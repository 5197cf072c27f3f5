"""Loss curves as Slicer plots: one table, one chart per training stage, updated while training runs.

Each stage gets a ``vtkMRMLTableNode`` with a ``step`` column and one column per loss named in its
step events, a ``vtkMRMLPlotSeriesNode`` per loss (x = step) and a ``vtkMRMLPlotChartNode`` holding
them. A loss that first appears later gets a new column filled with NaN for earlier rows. When the
log goes back in steps (a resumed run repeats the steps after its last checkpoint), the rows from
that step on are dropped first, so every curve stays a function of the step. Only MRML and VTK are
used, so this runs (and is tested) with the slicer-core wheel, without the Slicer application.
"""

from __future__ import annotations

import math
from typing import Iterable

import vtk

from .eventlog import STAGE_TITLES, numeric_items

STEP_COLUMN = "step"
#: Attribute naming the run folder and the stage on every node made here (to find them again).
RUN_ATTRIBUTE = "BiGLTraining.RunFolder"
STAGE_ATTRIBUTE = "BiGLTraining.Stage"
#: Line colours (Slicer's default plot palette order, colour-blind friendly Tableau 10).
PALETTE = (
    (0.12, 0.47, 0.71), (1.00, 0.50, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.58, 0.40, 0.74),
    (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.50, 0.50, 0.50), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81),
)  # fmt: skip


class _StageCurves:
    """The nodes of one stage."""

    def __init__(self, scene, stage: str, prefix: str, run_folder: str):
        self.scene = scene
        self.stage = stage
        self.prefix = prefix
        self.run_folder = run_folder
        self.table_node = None
        self.chart_node = None
        self.series: dict[str, object] = {}

    # -- nodes -------------------------------------------------------------------------------
    def _tag(self, node) -> None:
        node.SetAttribute(RUN_ATTRIBUTE, self.run_folder)
        node.SetAttribute(STAGE_ATTRIBUTE, self.stage)

    def _present(self, node) -> bool:
        return node is not None and self.scene.IsNodePresent(node)

    def ensure_nodes(self) -> None:
        """Create the table and chart (again, if the scene was closed meanwhile)."""
        if self._present(self.table_node) and self._present(self.chart_node):
            return
        self.series = {}
        title = f"{self.prefix} {self.stage}"
        self.table_node = self.scene.AddNewNodeByClass("vtkMRMLTableNode", f"{title} losses")
        self._tag(self.table_node)
        step = vtk.vtkDoubleArray()
        step.SetName(STEP_COLUMN)
        self.table_node.AddColumn(step)
        self.chart_node = self.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{title} loss chart")
        self._tag(self.chart_node)
        self.chart_node.SetTitle(f"{STAGE_TITLES.get(self.stage, self.stage)} ({self.prefix})")
        self.chart_node.SetXAxisTitle("iteration")
        self.chart_node.SetYAxisTitle("loss")

    def _column(self, name: str):
        return self.table_node.GetTable().GetColumnByName(name)

    def _add_loss(self, name: str) -> None:
        rows = self.table_node.GetNumberOfRows()
        column = vtk.vtkDoubleArray()
        column.SetName(name)
        column.SetNumberOfTuples(rows)
        column.Fill(math.nan)
        self.table_node.AddColumn(column)
        series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{self.prefix} {self.stage} {name}")
        self._tag(series)
        series.SetAndObserveTableNodeID(self.table_node.GetID())
        series.SetXColumnName(STEP_COLUMN)
        series.SetYColumnName(name)
        series.SetPlotType(series.PlotTypeScatter)
        series.SetMarkerStyle(series.MarkerStyleNone)
        series.SetLineStyle(series.LineStyleSolid)
        series.SetColor(*PALETTE[len(self.series) % len(PALETTE)])
        self.chart_node.AddAndObservePlotSeriesNodeID(series.GetID())
        self.series[name] = series

    # -- data --------------------------------------------------------------------------------
    def loss_names(self) -> list[str]:
        table = self.table_node.GetTable()
        return [table.GetColumnName(i) for i in range(table.GetNumberOfColumns()) if table.GetColumnName(i) != STEP_COLUMN]

    def steps(self) -> list[float]:
        column = self._column(STEP_COLUMN)
        return [column.GetValue(i) for i in range(column.GetNumberOfTuples())]

    def _truncate_from(self, step: float) -> None:
        """Drop the rows whose step is >= ``step`` (the steps are increasing)."""
        steps = self.steps()
        keep = len(steps)
        while keep and steps[keep - 1] >= step:
            keep -= 1
        if keep == len(steps):
            return
        table = self.table_node.GetTable()
        for i in range(table.GetNumberOfColumns()):
            table.GetColumn(i).SetNumberOfTuples(keep)
        table.Modified()

    def add(self, step: float, losses: dict[str, float]) -> None:
        self._truncate_from(step)
        for name in losses:
            if self._column(name) is None:
                self._add_loss(name)
        table = self.table_node.GetTable()
        for i in range(table.GetNumberOfColumns()):
            column = table.GetColumn(i)
            name = column.GetName()
            column.InsertNextValue(step if name == STEP_COLUMN else losses.get(name, math.nan))

    def clear(self) -> None:
        if not self._present(self.table_node):
            return
        table = self.table_node.GetTable()
        for i in range(table.GetNumberOfColumns()):
            table.GetColumn(i).SetNumberOfTuples(0)
        table.Modified()
        self.table_node.Modified()

    def remove(self) -> None:
        for node in [*self.series.values(), self.chart_node, self.table_node]:
            if self._present(node):
                self.scene.RemoveNode(node)
        self.series = {}
        self.table_node = self.chart_node = None


class LossCurves:
    """The loss tables and charts of one training run, fed with its step events."""

    def __init__(self, scene, *, prefix: str = "BiGL", run_folder: str = ""):
        self.scene = scene
        self.prefix = prefix
        self.run_folder = run_folder
        self._stages: dict[str, _StageCurves] = {}

    def _stage(self, stage: str) -> _StageCurves:
        if stage not in self._stages:
            self._stages[stage] = _StageCurves(self.scene, stage, self.prefix, self.run_folder)
        curves = self._stages[stage]
        curves.ensure_nodes()
        return curves

    @property
    def stages(self) -> list[str]:
        return list(self._stages)

    def table_node(self, stage: str):
        curves = self._stages.get(stage)
        return curves.table_node if curves is not None and curves._present(curves.table_node) else None

    def chart_node(self, stage: str):
        curves = self._stages.get(stage)
        return curves.chart_node if curves is not None and curves._present(curves.chart_node) else None

    def series_nodes(self, stage: str) -> dict[str, object]:
        curves = self._stages.get(stage)
        return dict(curves.series) if curves is not None else {}

    def add_events(self, events: Iterable[dict]) -> set[str]:
        """Add the step events (others are ignored); returns the stages whose curves changed."""
        changed: set[str] = set()
        for event in events:
            if event.get("event") != "step" or not isinstance(event.get("stage"), str):
                continue
            step = event.get("step")
            if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
                continue
            losses = numeric_items(event.get("losses"))
            if not losses:
                continue
            self._stage(event["stage"]).add(float(step), losses)
            changed.add(event["stage"])
        for stage in changed:
            table_node = self._stages[stage].table_node
            table_node.GetTable().Modified()
            table_node.Modified()
        return changed

    def clear(self) -> None:
        """Empty the tables (keeps the nodes, so views showing them stay put)."""
        for curves in self._stages.values():
            curves.clear()

    def remove_nodes(self) -> None:
        for curves in self._stages.values():
            curves.remove()
        self._stages = {}

    def adopt_existing(self) -> None:
        """Take over the nodes an earlier session made for the same run folder (emptied)."""
        if not self.run_folder:
            return
        tables = self.scene.GetNodesByClass("vtkMRMLTableNode")
        for i in range(tables.GetNumberOfItems()):
            table_node = tables.GetItemAsObject(i)
            stage = table_node.GetAttribute(STAGE_ATTRIBUTE)
            if table_node.GetAttribute(RUN_ATTRIBUTE) != self.run_folder or not stage or stage in self._stages:
                continue
            chart_node = self._find(("vtkMRMLPlotChartNode",), stage)
            if chart_node is None:
                continue
            curves = _StageCurves(self.scene, stage, self.prefix, self.run_folder)
            curves.table_node, curves.chart_node = table_node, chart_node
            for j in range(chart_node.GetNumberOfPlotSeriesNodes()):
                series = chart_node.GetNthPlotSeriesNode(j)
                if series is not None:
                    curves.series[series.GetYColumnName()] = series
            self._stages[stage] = curves
            curves.clear()

    def _find(self, classes: tuple[str, ...], stage: str):
        for class_name in classes:
            nodes = self.scene.GetNodesByClass(class_name)
            for i in range(nodes.GetNumberOfItems()):
                node = nodes.GetItemAsObject(i)
                if node.GetAttribute(RUN_ATTRIBUTE) == self.run_folder and node.GetAttribute(STAGE_ATTRIBUTE) == stage:
                    return node
        return None
