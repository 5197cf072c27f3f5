"""Training data: BraTS-style folders -> preprocessed 2D slices in memory, and the step samplers.

Every volume is preprocessed once (:func:`bigl.data.preprocess.prepare_volume`, the same function
inference uses) and its slices that hold any brain are kept in memory as float16 (half the memory
of float32; the [-1, 1] intensities keep about three decimal digits). When a case is present in both domains on
the same voxel grid (BraTS: T1 and T2 of one subject), both modalities are cropped with one brain
mask, so slice ``k`` of the source and of the target show the same anatomy: these co-registered
pairs are what the paired translator learns from.

Sampling is a pure function of ``(seed, stage, step)``: a resumed run draws exactly the batches
the uninterrupted run would have drawn, whatever happened before. In distributed runs every rank
draws the same global batch and trains on its own shard of it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from bigl.errors import BiGLError, ConfigError
from bigl.training.sections import TrainingConfig

#: Stage codes mixed into the sampling seeds.
STAGE_CODES = {"translator": 1, "adapt": 2}
#: Tries to redraw a target slice that is the counterpart of a source slice of the same batch.
_MAX_REDRAWS = 64


@dataclass
class SliceSet:
    """The slices of one modality over a list of cases."""

    modality: str
    images: np.ndarray  # float16 [n, S, S] in [-1, 1]
    labels: np.ndarray | None  # uint8 class indices [n, S, S]
    case_names: list[str]
    case_index: np.ndarray  # int32 [n]: index into case_names
    slice_index: np.ndarray  # int32 [n]: slice position in its prepared volume
    flip_axis: np.ndarray  # int8 [n]: slice axis (-2 or -1) running left-right, 0 when none does
    case_spacing: np.ndarray | None = None  # float32 [cases, 3]: voxel size in mm of each case's slices [n, S, S]
    keys: np.ndarray = field(init=False)  # int64 [n]: (case, slice) identity shared across domains
    _context_rows: dict[int, np.ndarray] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.keys = np.zeros(len(self.images), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def tumour(self) -> np.ndarray:
        """Indices of slices with any tumour label."""
        if self.labels is None:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self.labels.reshape(len(self.labels), -1).any(axis=1))

    def context_rows(self, channels: int) -> np.ndarray:
        """int64 [n, channels]: the rows of each slice's neighbours (2.5D input, offsets as
        :func:`bigl.data.preprocess.context_offsets`), -1 where the neighbour holds no brain or lies
        outside the volume (the slices without brain were not kept)."""
        from bigl.data.preprocess import context_offsets

        if channels not in self._context_rows:
            n, offsets = len(self), context_offsets(channels)[None, :]
            rows = np.arange(n)[:, None] + offsets
            clipped = np.clip(rows, 0, max(n - 1, 0))
            same = (self.case_index[clipped] == self.case_index[:, None]) & (
                self.slice_index[clipped] - self.slice_index[:, None] == offsets)
            self._context_rows[channels] = np.where((rows >= 0) & (rows < n) & same, rows, -1)
        return self._context_rows[channels]

    def stack(self, indices: np.ndarray, channels: int = 1) -> np.ndarray:
        """float32 [len(indices), channels, S, S]: each slice with its neighbours as channels,
        background where a neighbour holds no brain."""
        from bigl.data.preprocess import BACKGROUND

        indices = np.asarray(indices, dtype=np.int64)
        if channels == 1:
            return self.images[indices].astype(np.float32)[:, None]
        rows = self.context_rows(channels)[indices]
        out = self.images[np.maximum(rows, 0)].astype(np.float32)
        out[rows < 0] = BACKGROUND
        return out

    def case_rows(self) -> list[np.ndarray]:
        """Per case (in ``case_names`` order), its rows in this set, in slice order."""
        order = np.lexsort((self.slice_index, self.case_index))
        bounds = np.searchsorted(self.case_index[order], np.arange(len(self.case_names) + 1))
        return [order[bounds[i]:bounds[i + 1]] for i in range(len(self.case_names))]

    def describe(self) -> dict[str, Any]:
        info = {"modality": self.modality, "cases": len(self.case_names), "case_names": list(self.case_names), "slices": len(self)}
        if self.labels is not None:
            info["tumour_slices"] = int(len(self.tumour))
        return info


@dataclass
class TrainingData:
    """``labelled``: slices with labels the segmenter learns from (source images; target images
    for target-only). ``unlabelled``: the other domain (target images), None for the baselines.
    ``pairs``: [m, 2] indices (source, target) of co-registered slices of the same case."""

    labelled: SliceSet | None
    unlabelled: SliceSet | None
    pairs: np.ndarray

    def __post_init__(self) -> None:
        sets = [s for s in (self.labelled, self.unlabelled) if s is not None]
        names = sorted({name for s in sets for name in s.case_names})
        ids = {name: i for i, name in enumerate(names)}
        for s in sets:
            case_ids = np.asarray([ids[name] for name in s.case_names], dtype=np.int64)
            s.keys = case_ids[s.case_index] * 100_000 + s.slice_index


# --------------------------------------------------------------------------------------------
# case selection


def _select(cases: list, names: list[str] | None, exclude: list[str], max_cases: int | None, key: str) -> list:
    by_name = {case.name: case for case in cases}
    if names is not None:
        absent = [name for name in names if name not in by_name]
        if absent:
            raise ConfigError(
                f"data.{key}: case(s) not found: {', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}",
                f"the data has {len(cases)} usable case(s), e.g. {', '.join(sorted(by_name)[:3])}",
            )
        cases = [by_name[name] for name in names]
    excluded = set(exclude)
    cases = [case for case in cases if case.name not in excluded]
    if max_cases is not None:
        cases = cases[:max_cases]
    return cases


def _find(folder: str | list[str] | None, key: str, modality: str, require_labels: bool) -> list:
    """Cases of one domain: ``folder`` is one data folder or a list of them."""
    from bigl.data.brats import find_cases

    if not folder:
        raise ConfigError(f"config data.{key} is not set", f"give the BraTS-style data folder: data.{key}=/path/to/cases")
    try:
        return find_cases(folder, modalities=(modality,), require_labels=require_labels)
    except BiGLError as exc:
        raise ConfigError(f"data.{key}: {exc.message}", exc.hint) from None


def find_training_cases(config: TrainingConfig | dict, *, need_source: bool, need_target: bool,
                        labelled_role: str | None) -> dict[str, list]:
    """The cases of each domain, selected by the data keys; ConfigError before anything is loaded.

    ``labelled_role`` is the domain whose labels are used ("source", "target" or None).
    """
    data = TrainingConfig.of(config).data
    found: dict[str, list] = {}
    if need_source:
        cases = _find(data.source_dir, "source_dir", data.source_modality, False)
        found["source"] = _select(cases, data.cases, data.exclude, data.max_cases, "cases")
    if need_target:
        cases = _find(data.target_dir, "target_dir", data.target_modality, False)
        names = data.target_cases if data.target_cases is not None else data.cases
        exclude = data.target_exclude + data.exclude
        found["target"] = _select(cases, names, exclude, data.max_cases, "target_cases" if data.target_cases is not None else "cases")
    for role, cases in found.items():
        if not cases:
            raise ConfigError(f"no {role} cases left after data.cases / data.exclude / data.max_cases", "select at least one case")
    if labelled_role is not None:
        unlabelled = [case.name for case in found[labelled_role] if case.labels is None]
        if unlabelled:
            folders = getattr(data, f"{labelled_role}_dir")
            folder = folders if isinstance(folders, str) else ", ".join(folders)
            if labelled_role == "target":
                raise ConfigError(
                    f"method target-only trains on target labels, but {len(unlabelled)} target case(s) in {folder} have none "
                    f"(e.g. {', '.join(unlabelled[:3])})",
                    "add the <case>_seg.nii.gz files, exclude those cases with data.target_exclude, or use method bigl / source-only",
                )
            raise ConfigError(
                f"{len(unlabelled)} source case(s) in {folder} have no label map (e.g. {', '.join(unlabelled[:3])})",
                "the source domain must be labelled: add the <case>_seg.nii.gz files or exclude those cases with data.exclude",
            )
    return found


# --------------------------------------------------------------------------------------------
# loading


class _PreparedCase(NamedTuple):
    """One case of one role, preprocessed: its slices, their labels, the slice axis running
    left-right and the voxel size of the slices in mm."""

    slices: np.ndarray
    labels: np.ndarray | None
    flip_axis: int
    spacing: tuple[float, float, float]


def _prepare_case(jobs: dict[str, tuple[Any, str, bool]], preprocessing) -> dict[str, _PreparedCase]:
    """Preprocess one subject: role -> (case, modality, with labels) to role -> its prepared case.

    Roles on one grid share one brain mask, so their slices line up.
    """
    from bigl.data.io import check_same_grid, same_grid
    from bigl.data.preprocess import brain_mask, left_right_axis, prepare_labels, prepare_volume

    volumes = {role: case.load_image(modality) for role, (case, modality, _) in jobs.items()}
    shared_mask = None
    if len(volumes) == 2:
        first, second = volumes.values()
        if same_grid(first.shape, first.affine, second.shape, second.affine):
            shared_mask = brain_mask(first.data) | brain_mask(second.data)
    result = {}
    for role, (case, modality, with_labels) in jobs.items():
        prepared = prepare_volume(volumes[role].data, preprocessing, mask=shared_mask)
        labels = None
        if with_labels:
            label_volume = case.load_labels()
            check_same_grid({f"{case.name} {modality}": volumes[role], f"{case.name} labels": label_volume})
            labels = prepare_labels(label_volume.data, prepared.geometry)
        result[role] = _PreparedCase(prepared.slices.astype(np.float16), labels,
                                     left_right_axis(volumes[role].affine, preprocessing.slice_axis),
                                     prepared.geometry.slice_spacing(volumes[role].spacing))
    return result


def load_training_data(
    config: TrainingConfig | dict,
    cases: dict[str, list],
    *,
    labelled_role: str | None,
    progress: Callable[[int, int], None] | None = None,
) -> TrainingData:
    """Load and preprocess every selected case (threads: ``data.workers``)."""
    config = TrainingConfig.of(config)
    data, preprocessing = config.data, config.preprocessing
    modality = {"source": data.source_modality, "target": data.target_modality}
    subjects: dict[str, dict[str, tuple[Any, str, bool]]] = {}
    for role, role_cases in cases.items():
        for case in role_cases:
            subjects.setdefault(case.name, {})[role] = (case, modality[role], role == labelled_role)
    names = sorted(subjects)
    parts: dict[str, list[tuple[str, _PreparedCase]]] = {role: [] for role in cases}
    with ThreadPoolExecutor(max_workers=data.workers) as pool:
        for done, (name, result) in enumerate(zip(names, pool.map(lambda n: _prepare_case(subjects[n], preprocessing), names)), 1):
            for role, prepared in result.items():
                parts[role].append((name, prepared))
            if progress is not None:
                progress(done, len(names))

    def build(role: str) -> SliceSet | None:
        if role not in parts:
            return None
        entries = parts[role]
        with_labels = role == labelled_role
        prepared = [case for _, case in entries]
        kept = [_slices_with_brain(case.slices) for case in prepared]
        return SliceSet(
            modality=modality[role],
            images=np.concatenate([case.slices[keep] for case, keep in zip(prepared, kept)]),
            labels=np.concatenate([case.labels[keep] for case, keep in zip(prepared, kept)]) if with_labels else None,
            case_names=[name for name, _ in entries],
            case_index=np.concatenate([np.full(len(keep), i, dtype=np.int32) for i, keep in enumerate(kept)]),
            slice_index=np.concatenate(kept).astype(np.int32),
            flip_axis=np.concatenate([np.full(len(keep), case.flip_axis, dtype=np.int8) for case, keep in zip(prepared, kept)]),
            case_spacing=np.asarray([case.spacing for case in prepared], dtype=np.float32),
        )

    if labelled_role == "target":
        training = TrainingData(labelled=build("target"), unlabelled=None, pairs=np.zeros((0, 2), dtype=np.int64))
    else:
        source, target = build("source"), build("target")
        training = TrainingData(labelled=source, unlabelled=target, pairs=np.zeros((0, 2), dtype=np.int64))
        if source is not None and target is not None:
            training.pairs = _co_registered_pairs(source, target, cases)
    return training


def _slices_with_brain(slices: np.ndarray) -> np.ndarray:
    """Positions of the slices that hold any brain: the all-background slices at the ends of the
    crop teach nothing and would waste a share of every batch."""
    from bigl.data.preprocess import EMPTY_SLICE_MAX

    return np.flatnonzero(slices.reshape(len(slices), -1).max(axis=1) > EMPTY_SLICE_MAX)


def _co_registered_pairs(source: SliceSet, target: SliceSet, cases: dict[str, list]) -> np.ndarray:
    """(source index, target index) of slices of the same case and position, for cases whose two
    modalities are on one grid (so they were cropped alike and have the same number of slices)."""
    from bigl.data.io import files_share_grid

    source_cases = {case.name: case for case in cases["source"]}
    target_cases = {case.name: case for case in cases["target"]}
    target_lookup = {int(key): i for i, key in enumerate(target.keys)}
    pairs = []
    for name in sorted(set(source_cases) & set(target_cases)):
        if not files_share_grid(source_cases[name].images[source.modality], target_cases[name].images[target.modality]):
            continue
        case_id = source.case_names.index(name)
        for i in np.flatnonzero(source.case_index == case_id):
            j = target_lookup.get(int(source.keys[i]))
            if j is not None:
                pairs.append((i, j))
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


# --------------------------------------------------------------------------------------------
# sampling


@dataclass
class Batch:
    """Indices of one global batch and the left-right flips to apply."""

    labelled: np.ndarray
    unlabelled: np.ndarray | None
    flip_labelled: np.ndarray
    flip_unlabelled: np.ndarray | None


class StepSampler:
    """Draws each step's global batch from ``(seed, stage, step)`` alone."""

    def __init__(self, data: TrainingData, *, seed: int, tumour_fraction: float, flip: bool):
        self.data = data
        self.seed = int(seed)
        self.tumour_fraction = float(tumour_fraction)
        self.flip = bool(flip)

    def rng(self, stage: str, step: int, stream: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, STAGE_CODES[stage], int(step), int(stream)])

    def _flips(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.random(n) < 0.5 if self.flip else np.zeros(n, dtype=bool)

    def _labelled(self, rng: np.random.Generator, n: int, prefer_tumour: bool) -> np.ndarray:
        """Source slices; with ``prefer_tumour``, ``round(tumour_fraction * n)`` of them from slices with tumour."""
        labelled = self.data.labelled
        tumour = labelled.tumour
        n_tumour = int(round(self.tumour_fraction * n)) if len(tumour) and prefer_tumour else 0
        chosen = np.concatenate([rng.choice(tumour, n_tumour), rng.integers(0, len(labelled), n - n_tumour)])
        return rng.permutation(chosen)

    def _unlabelled(self, rng: np.random.Generator, n: int, avoid: np.ndarray) -> np.ndarray:
        """Target slices, none of which is the counterpart (same case and slice) of a slice in ``avoid``."""
        unlabelled = self.data.unlabelled
        forbidden = set(int(k) for k in avoid)
        chosen = rng.integers(0, len(unlabelled), n)
        for i in range(n):
            tries = 0
            while int(unlabelled.keys[chosen[i]]) in forbidden:
                tries += 1
                if tries > _MAX_REDRAWS:
                    raise ConfigError(
                        "the target slices are all counterparts of the source slices of the batch",
                        "use more target cases (data.target_cases) or a smaller batch",
                    )
                chosen[i] = rng.integers(0, len(unlabelled))
        return chosen

    def unpaired(self, stage: str, step: int, batch_size: int, stream: int = 0, prefer_tumour: bool = True) -> Batch:
        """Labelled batch and (when there is a target domain) an unpaired target batch."""
        rng = self.rng(stage, step, stream)
        labelled = self._labelled(rng, batch_size, prefer_tumour)
        flip_l = self._flips(rng, batch_size)
        if self.data.unlabelled is None:
            return Batch(labelled, None, flip_l, None)
        unlabelled = self._unlabelled(rng, batch_size, self.data.labelled.keys[labelled])
        return Batch(labelled, unlabelled, flip_l, self._flips(rng, batch_size))

    def paired(self, stage: str, step: int, batch_size: int, stream: int = 0) -> Batch:
        """Co-registered (source, target) slice pairs, flipped together."""
        rng = self.rng(stage, step, stream)
        rows = rng.integers(0, len(self.data.pairs), batch_size)
        flips = self._flips(rng, batch_size)
        return Batch(self.data.pairs[rows, 0], self.data.pairs[rows, 1], flips, flips)


def to_tensors(
    slices: SliceSet, indices: np.ndarray, flips: np.ndarray, device: torch.device, with_labels: bool = False,
    channels: int = 1, labels: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images [B, channels, S, S] float32 (each slice with its neighbours, :meth:`SliceSet.stack`)
    and labels [B, S, S] long on ``device``, mirrored left-right where asked. The labels are the
    set's own (``with_labels``) or ``labels`` given per slice of the set (pseudo-labels)."""
    images = slices.stack(indices, channels)
    if labels is not None:
        labels = labels[indices].copy()
    elif with_labels:
        labels = slices.labels[indices].copy()
    for row, (flip, axis) in enumerate(zip(flips, slices.flip_axis[indices])):
        if flip and axis:
            images[row] = np.flip(images[row], axis=int(axis))
            if labels is not None:
                labels[row] = np.flip(labels[row], axis=int(axis))
    image_tensor = torch.from_numpy(images).to(device)
    label_tensor = None if labels is None else torch.from_numpy(labels).long().to(device)
    return image_tensor, label_tensor
