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
    evaluation_data = values.pop(EVALUATION_DATA, "")
    if not values:
        return None
    default = TrainingSettings()
    usable = {name: value for name, value in values.items() if _fits(value, getattr(default, name))}
    return TrainingSettings.from_dict(usable), evaluation_data if isinstance(evaluation_data, str) else ""


def _fits(value: Any, default: Any) -> bool:
    """A stored value can go into a field with this default: None for an optional field, the
    default's own kind otherwise (a list stays a list, text stays text)."""
    if value is None:
        return default is None
    if default is None:
        return not isinstance(value, dict)
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))
