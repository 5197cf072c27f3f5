"""Several models as one: the arg-max of their class probabilities, averaged on the scan's grid.

Runs of one recipe with different seeds mostly agree, and where one of them fails (a run that
lost the tumour) the others outvote it: on the development cases three seeds averaged scored
about what the good seeds score, far above the failed one (docs/results.md, "Several seeds as one
model"). Every member segments the scan with its own preprocessing, engine and test-time options,
so models of different image sizes or normalisations can be combined; they must segment the same
modality. No PyTorch here: members of the ONNX Runtime engine need none.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bigl.errors import ConfigError
from bigl.labels import classes_to_labels
from bigl.prediction import Prediction, Predictor, ProgressCallback


class EnsemblePredictor(Predictor):
    """A :class:`~bigl.prediction.Predictor` over several predictors (``members``).

    The labels are the arg-max of the members' mean class probabilities on the input grid (then
    ``refine_edges`` and ``postprocess``, when on: None takes each from the members, on when every
    member has it on).
    The attention maps and the translated image are the first member's; the tumour confidence is
    the mean of the members' (each on its own slices), and its floor the first member's. With the
    contrast search each member searches on its own (``contrast_gamma`` is then None). The description
    (``metadata``, modality, preprocessing) is the first member's; ``members`` names them all.
    """

    engine = "ensemble"

    def __init__(self, members: Sequence[Predictor], *, postprocess: bool | None = None,
                 refine_edges: bool | None = None):
        members = list(members)
        if len(members) < 2:
            raise ConfigError(f"an ensemble needs at least two models, got {len(members)}",
                              "give --model once for a single model, or two or more times for an ensemble")
        modalities = sorted({member.modality for member in members})
        if len(modalities) > 1:
            listing = "; ".join(f"{member.model_path}: {member.modality.upper()}" for member in members)
            raise ConfigError(f"the models of an ensemble must segment one modality, these segment {', '.join(m.upper() for m in modalities)} ({listing})",
                              "combine models trained for the same target modality")
        self.members = members
        first = members[0]
        if postprocess is None:
            postprocess = all(member.postprocess for member in members)
        if refine_edges is None:
            refine_edges = all(member.refine_edges for member in members)
        self._setup(first.metadata, first.model_path, first.batch_size, flip=False, postprocess=postprocess,
                    refine_edges=refine_edges)
        # What the records of a run say: on when every member does it (each member applies its own).
        self.flip = all(member.flip for member in members)
        self.invert_view = all(member.invert_view for member in members)
        self.contrast_search = all(member.contrast_search for member in members)
        self.device = first.device

    @property
    def has_translator(self) -> bool:
        return self.members[0].has_translator

    @property
    def model_paths(self) -> list:
        return [member.model_path for member in self.members]

    def _predict(self, data: np.ndarray, affine: np.ndarray, *, probabilities: bool, attention: bool,
                 translated: bool, progress: ProgressCallback | None, contrast_gamma: float | None = None) -> Prediction:
        total = None
        first = None
        count = len(self.members)
        confidences = []
        for index, member in enumerate(self.members):
            result = member._predict(data, affine, probabilities=True, attention=attention and index == 0,
                                     translated=translated and index == 0, contrast_gamma=contrast_gamma,
                                     progress=None if progress is None else _member_progress(progress, index, count))
            confidences.append(result.confidence)
            if total is None:
                total, first = result.probabilities, result
            else:
                total += result.probabilities
        total /= count
        labels = self._finish_labels(classes_to_labels(np.argmax(total, axis=0)).astype(np.uint8), data, affine)
        found = [value for value in confidences if value is not None]
        return Prediction(labels=labels, affine=affine, probabilities=total if probabilities else None,
                          attention=first.attention, translated=first.translated,
                          confidence=float(np.mean(found)) if found else None, contrast_gamma=contrast_gamma)


def _member_progress(progress: ProgressCallback, index: int, count: int) -> ProgressCallback:
    """One member's (done, total) as a share of the whole ensemble's work."""
    def report(done: int, total: int) -> None:
        progress(index * total + done, count * total)

    return report
