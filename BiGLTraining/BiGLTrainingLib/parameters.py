"""The training form in the scene's parameter node, where Slicer modules keep their panel's state.

One ``vtkMRMLScriptedModuleNode`` per scene, found by its singleton tag ``BiGLTraining`` (the node
that Slicer's ``ScriptedLoadableModuleLogic.getParameterNode()`` of ``BiGLTrainingLogic`` returns),
holds one parameter per :class:`~BiGLTrainingLib.command.TrainingSettings` field, as JSON text, and
the evaluation folder the form shows. The node is saved with the scene, so a saved scene brings back
the form it was trained from; a script can read or set a field with ``GetParameter("adapt_iterations")``.

Qt-free: the widget stores the form here (and in QSettings, for the next Slicer session) when a run
starts, and fills the form from here when the module opens on a scene that has one.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import fields
from typing import Any

from .command import TrainingSettings

MODULE_NAME = "BiGLTraining"
NODE_CLASS = "vtkMRMLScriptedModuleNode"
#: Parameter of the evaluation folder shown in the form (kept even when evaluation is switched off).
EVALUATION_DATA = "evaluation_data"


def parameter_node(scene: Any, *, create: bool = True) -> Any:
    """The scene's BiGL Training parameter node; created (as Slicer's module logic does) when missing
    and ``create`` is true, else None."""
    node = scene.GetSingletonNode(MODULE_NAME, NODE_CLASS)
    if node is not None or not create:
        return node
    node = scene.CreateNodeByClass(NODE_CLASS)
    node.UnRegister(None)  # CreateNodeByClass hands over a reference; the scene keeps its own
    node.SetSingletonTag(MODULE_NAME)
    node.SetAttribute("ModuleName", MODULE_NAME)
    node.SetName(scene.GenerateUniqueName(MODULE_NAME))
    return scene.AddNode(node)


def store_form(scene: Any, settings: TrainingSettings, evaluation_data: str = "") -> Any:
    """Write the form into the parameter node (every field, so that a field set to None is cleared); returns the node."""
    node = parameter_node(scene)
    values = settings.to_dict()
    modified = node.StartModify()
    try:
        for name, value in values.items():
            node.SetParameter(name, json.dumps(value))
        node.SetParameter(EVALUATION_DATA, json.dumps(evaluation_data or ""))
    finally:
        node.EndModify(modified)
    return node


def stored_form(scene: Any) -> tuple[TrainingSettings, str] | None:
    """The form held by the scene's parameter node, with its evaluation folder; None when the scene
    has no such node or it holds no field. A parameter that is not JSON (a scene file edited by hand)
    or not of the field's kind leaves that field at its default."""
    node = parameter_node(scene, create=False)
    if node is None:
        return None
    values: dict[str, Any] = {}
    for name in [item.name for item in fields(TrainingSettings)] + [EVALUATION_DATA]:
        text = node.GetParameter(name)
        if not text:
            continue
        try:
            values[name] = json.loads(text)
        except ValueError:
            continue
    if not set(values) - {EVALUATION_DATA}:
        return None
    return form_from_values(values)


def form_from_values(values: Any) -> tuple[TrainingSettings, str]:
    """The form (and its evaluation folder) from stored ``{field: value}`` JSON, whether from the
    parameter node or from QSettings: unknown keys are ignored, and a value not of its field's
    declared type leaves that field at its default (anything but an object gives the defaults)."""
    values = dict(values) if isinstance(values, dict) else {}
    evaluation_data = values.pop(EVALUATION_DATA, "")
    kinds = typing.get_type_hints(TrainingSettings)
    usable = {name: value for name, value in values.items() if name in kinds and _fits(value, kinds[name])}
    return TrainingSettings.from_dict(usable), evaluation_data if isinstance(evaluation_data, str) else ""


def _fits(value: Any, kind: Any) -> bool:
    """A stored JSON value matches a field's declared type (``int | None``, ``str | list[str] | None``,
    ...): a number where a number belongs (a whole one for ``int``; true/false is no number), text
    where text belongs, a list of the declared items."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arm) for arm in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(kind) or (Any,)
        return isinstance(value, list) and all(_fits(element, item) for element in value)
    if kind is Any:
        return True
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(kind, type) and isinstance(value, kind)
