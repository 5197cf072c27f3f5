"""No-learning baselines: make a target-modality image look like the source modality, then segment
it with the source-only model.

``invert-histmatch`` -- T1 and T2 order the brain tissues roughly in opposite directions (CSF dark
in T1 and bright in T2; oedema dark-ish in T1, bright in T2), so inside the brain the target image
is negated and its histogram matched (:func:`skimage.exposure.match_histograms`) to a reference
histogram of the source modality. Background voxels are left as they are. Since histogram matching
only uses the rank of each voxel, negating is the same as any other decreasing intensity map.

The reference is the distribution of brain voxels pooled over the source-modality *training*
images, given as a data folder + modality (:func:`reference_from_folder`). MRI intensities have
arbitrary units per scan, so each image is divided by the 99.5th percentile of its brain voxels
before pooling, and every image contributes the same number of voxels (a fixed random subset of
large brains). The pooled distribution is stored as quantiles (:class:`ReferenceHistogram`) and
can be saved to / loaded from a small JSON file, so the baseline can be rerun without the source
images. The segmenter renormalises its input anyway (percentiles inside the brain), so only the
shape of the reference histogram matters, not its units.

This is a lower bound for image-translation methods: a global monotone intensity map with no
spatial context (tumour sub-regions whose contrast does not simply invert between the modalities
stay wrong).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from bigl.errors import InputError

#: Names accepted by :func:`make_baseline` (``bigl evaluate --baseline``).
BASELINES: tuple[str, ...] = ("invert-histmatch",)
#: Percentile of each image's brain voxels that is scaled to 1 before pooling.
SCALE_PERCENTILE = 99.5
REFERENCE_FORMAT = "bigl-reference-histogram"


@dataclass
class ReferenceHistogram:
    """Quantiles (at evenly spaced probabilities 0..1) of pooled, per-image scaled brain intensities."""

    modality: str
    quantiles: np.ndarray
    cases: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.quantiles = np.asarray(self.quantiles, dtype=np.float64)
        if self.quantiles.ndim != 1 or self.quantiles.size < 2 or not np.all(np.isfinite(self.quantiles)):
            raise InputError(
                "a reference histogram needs at least two finite quantiles",
                "compute it again from the source training images (bigl.baselines.reference_from_folder)",
            )
        if np.any(np.diff(self.quantiles) < 0):
            raise InputError("reference quantiles are not sorted", "compute the reference again from the source images")

    def to_dict(self) -> dict:
        return {
            "format": REFERENCE_FORMAT,
            "modality": self.modality,
            "cases": list(self.cases),
            "quantiles": [float(q) for q in self.quantiles],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ReferenceHistogram":
        if not isinstance(data, dict) or data.get("format") != REFERENCE_FORMAT:
            raise InputError(
                "not a BiGL reference histogram",
                "give a JSON file written by `bigl evaluate --baseline ...` (reference.json) or a source data folder",
            )
        return cls(modality=str(data.get("modality", "")), quantiles=np.asarray(data.get("quantiles", [])),
                   cases=list(data.get("cases", [])))

    def save(self, path: str | Path) -> Path:
        from bigl.files import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceHistogram":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read reference histogram {path}: {exc}",
                             "give a reference.json written by `bigl evaluate --baseline ...` or a source data folder") from None
        try:
            return cls.from_dict(data)
        except InputError as exc:
            raise InputError(f"{path}: {exc.message}", exc.hint) from None


def scaled_brain_voxels(volume: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Brain voxels of an image divided by their :data:`SCALE_PERCENTILE` percentile (float64, 1D)."""
    from bigl.data.preprocess import brain_mask

    volume = np.asarray(volume)
    mask = brain_mask(volume) if mask is None else np.asarray(mask, dtype=bool)
    voxels = volume[mask].astype(np.float64)
    if voxels.size == 0:
        raise InputError("the image has no brain voxels (it is empty or constant)", "check that the right image was given")
    return voxels / brain_scale(voxels)


def brain_scale(voxels: np.ndarray) -> float:
    """The scan's robust maximum: the :data:`SCALE_PERCENTILE` percentile of its brain voxels' magnitude (1 if 0)."""
    return float(np.percentile(np.abs(voxels), SCALE_PERCENTILE)) or 1.0


def reference_from_volumes(
    volumes: Sequence[np.ndarray],
    modality: str,
    *,
    names: Sequence[str] = (),
    n_quantiles: int = 1001,
    voxels_per_image: int = 200_000,
    seed: int = 0,
) -> ReferenceHistogram:
    """Pool the scaled brain voxels of source-modality images into a :class:`ReferenceHistogram`."""
    if not volumes:
        raise InputError(f"no {modality} images to build the reference histogram from", "give source training images")
    rng = np.random.default_rng(seed)
    pooled = []
    for volume in volumes:
        voxels = scaled_brain_voxels(volume)
        if voxels.size > voxels_per_image:
            voxels = rng.choice(voxels, size=voxels_per_image, replace=False)
        pooled.append(voxels)
    quantiles = np.quantile(np.concatenate(pooled), np.linspace(0.0, 1.0, n_quantiles))
    return ReferenceHistogram(modality=modality, quantiles=quantiles, cases=list(names))


def reference_from_folder(
    data_dir: str | Path,
    modality: str,
    *,
    cases: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    n_quantiles: int = 1001,
    voxels_per_image: int = 200_000,
    seed: int = 0,
) -> ReferenceHistogram:
    """Reference histogram of ``modality`` over the cases of a data folder (the source training images).

    ``cases`` restricts it to those case names (e.g. the training split), otherwise every case with
    that modality is used; ``exclude`` leaves cases out (e.g. the report cases). Labels are not needed.
    """
    from bigl.data.brats import find_cases, normalise_modality

    modality = normalise_modality(modality)
    found = find_cases(data_dir, modalities=(modality,))
    if cases is not None:
        wanted = set(cases)
        unknown = sorted(wanted - {case.name for case in found})
        if unknown:
            raise InputError(f"cases {', '.join(unknown)} have no {modality} image in {data_dir}",
                             "give case names of the source training images")
        found = [case for case in found if case.name in wanted]
    excluded = set(exclude)
    found = [case for case in found if case.name not in excluded]
    if not found:
        raise InputError(f"no {modality} image is left in {data_dir} after the exclusions", "exclude fewer cases")
    volumes = [case.load_image(modality).data for case in found]
    return reference_from_volumes(volumes, modality, names=[case.name for case in found], n_quantiles=n_quantiles,
                                  voxels_per_image=voxels_per_image, seed=seed)


def load_reference(
    source: str | Path, modality: str | None = None, *, cases: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> ReferenceHistogram:
    """A reference from a JSON file (:meth:`ReferenceHistogram.save`) or from a folder of source images."""
    source = Path(source).expanduser()
    if source.is_file():
        reference = ReferenceHistogram.load(source)
        if modality is not None and reference.modality:
            from bigl.data.brats import normalise_modality

            if normalise_modality(modality) != reference.modality:
                raise InputError(
                    f"reference {source} holds {reference.modality} intensities, not {normalise_modality(modality)}",
                    "give the reference of the source modality, or drop --reference-modality",
                )
        return reference
    if modality is None:
        raise InputError(
            "the modality of the reference images is not known",
            "give --reference-modality (the source modality the model was trained on, e.g. t1)",
        )
    return reference_from_folder(source, modality, cases=cases, exclude=exclude)


class InvertHistMatch:
    """Transform ``volume -> volume``: inside the brain, negate and match to the reference histogram.

    The reference holds brain intensities divided by each scan's own robust maximum
    (:func:`scaled_brain_voxels`); the matched brain is multiplied back by this scan's, so the
    result stays in the input's units. Voxels outside the brain mask keep their values: were the
    brain in reference units (about 0-1) beside them, any bright non-brain voxel left in a real
    scan would outshine it and the next brain mask would lose the brain.
    """

    name = "invert-histmatch"

    def __init__(self, reference: ReferenceHistogram):
        self.reference = reference

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        from skimage.exposure import match_histograms

        from bigl.data.preprocess import brain_mask

        volume = np.asarray(volume)
        mask = brain_mask(volume)
        if not mask.any():
            raise InputError("the image has no brain voxels (it is empty or constant)", "check that the right image was given")
        out = volume.astype(np.float32, copy=True)
        brain = volume[mask].astype(np.float64)
        out[mask] = match_histograms(-brain, self.reference.quantiles) * brain_scale(brain)
        return out

    def __repr__(self) -> str:
        return f"InvertHistMatch(reference={self.reference.modality}, {len(self.reference.cases)} cases)"


def make_baseline(name: str, reference: ReferenceHistogram) -> Callable[[np.ndarray], np.ndarray]:
    """The input transform of a named baseline (see :data:`BASELINES`)."""
    if name == "invert-histmatch":
        return InvertHistMatch(reference)
    raise InputError(f"unknown baseline {name!r}", f"use one of {', '.join(BASELINES)}")
