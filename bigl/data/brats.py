"""BraTS-style data folders: one folder per case, one NIfTI file per modality plus the labels.

Two naming schemes are recognised (``.nii`` and ``.nii.gz``, any letter case):

* BraTS 2018-2021: ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``
* BraTS 2023+:     ``<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (label 3 = enhancing tumour,
  mapped to the BraTS 2018 value 4 on reading)

The root given to :func:`find_cases` may be a cohort folder (nested folders such as ``HGG/`` and
``LGG/`` are fine) or a single case folder. Files that do not follow either scheme are ignored.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from bigl.data.io import GRID_ATOL, PathLike, Volume, compare_grids, load_volume, read_grid
from bigl.data.naming import MODALITIES, normalise_modality  # noqa: F401 (both part of this module's API)
from bigl.errors import InputError
from bigl.labels import LABELS

NAMINGS: tuple[str, ...] = ("brats2018", "brats2023")

#: File suffix of each canonical modality (and of the labels) in each naming scheme.
FILE_SUFFIXES: dict[str, dict[str, str]] = {
    "brats2018": {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"},
    "brats2023": {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"},
}
SEPARATORS = {"brats2018": "_", "brats2023": "-"}

_SUFFIX_TO_ITEM = {
    naming: {suffix: item for item, suffix in suffixes.items()} for naming, suffixes in FILE_SUFFIXES.items()
}
_FILE_PATTERN = re.compile(r"^(?P<case>.+)(?P<sep>[_-])(?P<suffix>[A-Za-z0-9]+)\.nii(\.gz)?$", re.IGNORECASE)
_MAX_DEPTH = 4


def normalise_modalities(names: Iterable[str] | str) -> tuple[str, ...]:
    """Canonical names of a list (or comma-separated string) of modalities, without duplicates."""
    if isinstance(names, str):
        names = [part for part in names.split(",") if part.strip()]
    result: list[str] = []
    for name in names:
        canonical = normalise_modality(name.strip())
        if canonical not in result:
            result.append(canonical)
    return tuple(result)


@dataclass
class Case:
    """One subject: its image files per canonical modality and its label map, if any."""

    name: str
    folder: Path
    images: dict[str, Path] = field(default_factory=dict)
    labels: Path | None = None
    naming: str = "brats2018"

    def has(self, modality: str) -> bool:
        return normalise_modality(modality) in self.images

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities present, in canonical order."""
        return tuple(m for m in MODALITIES if m in self.images)

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m not in self.images)

    def describe(self) -> str:
        """One line: name, naming scheme, modalities present / missing, labels or not."""
        parts = [f"{self.name} ({self.naming}): {', '.join(self.modalities) or 'no images'}"]
        parts.append("+ labels" if self.labels is not None else "no labels")
        if self.missing:
            parts.append(f"(missing {', '.join(self.missing)})")
        return " ".join(parts)

    __str__ = describe

    def load_image(self, modality: str) -> Volume:
        modality = normalise_modality(modality)
        if modality not in self.images:
            raise InputError(
                f"case {self.name} has no {modality} image (it has {', '.join(self.modalities) or 'none'})",
                f"add {self.name}{SEPARATORS[self.naming]}{FILE_SUFFIXES[self.naming][modality]}.nii.gz "
                f"to {self.folder}, or choose a modality the case has",
            )
        return load_volume(self.images[modality], kind="image")

    def load_labels(self) -> Volume:
        """The label map with BraTS 2018 values 0/1/2/4 (BraTS 2023 label 3 -> 4), as uint8."""
        if self.labels is None:
            raise InputError(
                f"case {self.name} has no label map",
                f"add {self.name}{SEPARATORS[self.naming]}seg.nii.gz to {self.folder}",
            )
        volume = load_volume(self.labels, kind="labels")
        data = volume.data
        present = set(np.unique(data).tolist())
        if self.naming == "brats2023":
            if 4 in present:
                raise InputError(
                    f"{self.labels.name} uses BraTS 2023 naming but contains label 4",
                    "BraTS 2023 files label enhancing tumour 3; rename the case files to the "
                    "2018 scheme (<case>_seg.nii.gz) if its labels are 0/1/2/4",
                )
            data = np.where(data == 3, np.uint8(4), data).astype(np.uint8)
            present = {4 if v == 3 else v for v in present}
        unknown = sorted(present - set(LABELS))
        if unknown:
            hint = "use labels 0 background, 1 NCR/NET, 2 oedema, 4 enhancing tumour"
            if unknown == [3] and self.naming == "brats2018":
                hint = (
                    "BraTS 2018-2021 labels have no 3; if 3 means enhancing tumour (BraTS 2023), "
                    "name the files <case>-seg.nii.gz, <case>-t1n.nii.gz, ..."
                )
            raise InputError(f"{self.labels.name} has labels {unknown} outside BraTS {list(LABELS)}", hint)
        return Volume(data=data, affine=volume.affine, path=volume.path)

    def files(self) -> dict[str, Path]:
        """All files of the case: modality (or ``"labels"``) -> path."""
        files = {m: self.images[m] for m in self.modalities}
        if self.labels is not None:
            files["labels"] = self.labels
        return files

    def check_grid(self, atol: float = GRID_ATOL) -> None:
        """Check (from the headers) that all images and the labels share one voxel grid."""
        grids = {}
        for item, path in self.files().items():
            shape, affine = read_grid(path)
            grids[f"{self.name} {item}"] = (shape, affine, path)
        compare_grids(grids, atol=atol)


def parse_case_file(path: PathLike) -> tuple[str, str, str] | None:
    """``(case, item, naming)`` for a BraTS-style file name, ``item`` a canonical modality or
    ``"seg"``; None for files that follow neither naming scheme."""
    match = _FILE_PATTERN.match(Path(path).name)
    if match is None:
        return None
    case, sep, suffix = match["case"], match["sep"], match["suffix"].lower()
    if suffix == "seg":
        return case, "seg", "brats2023" if sep == "-" else "brats2018"
    for naming in ("brats2018", "brats2023"):
        item = _SUFFIX_TO_ITEM[naming].get(suffix)
        if item is not None:
            return case, item, naming
    return None


def _case_folders(root: Path) -> Iterable[tuple[Path, list[str]]]:
    """Folders under ``root`` (itself included, a few levels deep) with their file names."""
    root_depth = len(root.parts)
    for folder, dirs, files in os.walk(root, followlinks=True):
        depth = len(Path(folder).parts) - root_depth
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < _MAX_DEPTH else []
        yield Path(folder), files


def _cases_in_folder(folder: Path, files: Sequence[str]) -> list[Case]:
    found: dict[str, dict[str, list[tuple[str, Path]]]] = {}
    for file in sorted(files):
        if file.startswith("."):  # hidden files, e.g. macOS "._" resource forks
            continue
        parsed = parse_case_file(file)
        if parsed is None:
            continue
        case, item, naming = parsed
        found.setdefault(case, {}).setdefault(item, []).append((naming, folder / file))
    cases = []
    for name, items in found.items():
        images: dict[str, Path] = {}
        labels = None
        namings: Counter[str] = Counter()
        for item, entries in items.items():
            if len(entries) > 1:
                listed = ", ".join(p.name for _, p in entries)
                raise InputError(
                    f"case {name} in {folder} has several files for {item}: {listed}",
                    "keep one file per modality (remove the duplicate, e.g. the .nii next to the .nii.gz)",
                )
            naming, path = entries[0]
            namings[naming] += 1
            if item == "seg":
                labels = path
            else:
                images[item] = path
        naming = _case_naming(name, folder, items, namings)
        cases.append(Case(name=name, folder=folder, images=images, labels=labels, naming=naming))
    return cases


def _case_naming(name: str, folder: Path, items: dict, namings: Counter) -> str:
    """The naming scheme of a case, from its modality suffixes (the separator only decides for a lone seg)."""
    image_namings = {entries[0][0] for item, entries in items.items() if item != "seg"}
    if len(image_namings) > 1:
        raise InputError(
            f"case {name} in {folder} mixes BraTS 2018 and 2023 file names",
            "name all files of a case in one scheme: <case>_{t1,t1ce,t2,flair,seg} or <case>-{t1n,t1c,t2w,t2f,seg}",
        )
    if image_namings:
        return image_namings.pop()
    return namings.most_common(1)[0][0]


def data_folders(roots: PathLike | Sequence[PathLike]) -> list[Path]:
    """One data folder or a list of them, as a list of paths (``~`` expanded)."""
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    folders = [Path(root).expanduser() for root in roots]
    if not folders:
        raise InputError("no data folder given", "give at least one BraTS-style data folder")
    return folders


def same_folders(a: PathLike | Sequence[PathLike] | None, b: PathLike | Sequence[PathLike] | None) -> bool:
    """Whether two data folder values (one folder or a list) name the same set of folders, however
    spelled (``~``, relative paths, links): then source and target scans are the same scans."""

    def resolved(value) -> frozenset[Path]:
        values = [] if value is None else [value] if isinstance(value, (str, os.PathLike)) else list(value)
        return frozenset(Path(str(v)).expanduser().resolve() for v in values if str(v).strip())

    first = resolved(a)
    return bool(first) and first == resolved(b)


def find_cases(
    root: PathLike | Sequence[PathLike], *, modalities: Sequence[str] | str = (), require_labels: bool = False
) -> list[Case]:
    """All BraTS-style cases under ``root`` (a folder, or a list of folders read as one data set)
    that have ``modalities`` (and labels if required), sorted by name.

    Raises :class:`InputError` when a folder is missing or holds no case, when a case name occurs
    twice (in one folder or across folders), or when no case has what is asked.
    """
    roots = data_folders(root)
    where = str(roots[0]) if len(roots) == 1 else f"the {len(roots)} folders {', '.join(str(r) for r in roots)}"
    wanted = normalise_modalities(modalities)
    cases: list[Case] = []
    for folder_root in roots:
        if not folder_root.exists():
            raise InputError(f"data folder not found: {folder_root}", "check the path")
        if not folder_root.is_dir():
            raise InputError(
                f"{folder_root} is a file, not a data folder", "give the case folder (or the folder holding the case folders)"
            )
        found = [case for folder, files in _case_folders(folder_root) for case in _cases_in_folder(folder, files)]
        if not found:
            raise InputError(
                f"no BraTS-style cases found in {folder_root}",
                "expect one folder per case with <case>_t1.nii.gz, <case>_t2.nii.gz, ..., <case>_seg.nii.gz "
                "(BraTS 2018-2021) or <case>-t1n.nii.gz, <case>-t2w.nii.gz, ..., <case>-seg.nii.gz (BraTS 2023+)",
            )
        cases.extend(found)
    names = Counter(case.name for case in cases)
    duplicated = sorted(name for name, count in names.items() if count > 1)
    if duplicated:
        folders = ", ".join(str(c.folder) for c in cases if c.name == duplicated[0])
        raise InputError(
            f"case {duplicated[0]} appears more than once under {where} ({folders})", "keep one copy of each case"
        )
    selected = [
        case
        for case in cases
        if all(m in case.images for m in wanted) and (case.labels is not None or not require_labels)
    ]
    if not selected:
        needs = list(wanted) + (["labels"] if require_labels else [])
        raise InputError(
            f"none of the {len(cases)} case(s) in {where} has {' + '.join(needs)}; found: {summarise_cases(cases)}",
            "add the missing files, or choose modalities the cases have",
        )
    return sorted(selected, key=lambda case: case.name)


def summarise_cases(cases: Sequence[Case]) -> str:
    """Short summary such as ``"4 cases: t1 4, t2 4, flair 3, labels 4"``."""
    counts = Counter(m for case in cases for m in case.modalities)
    parts = [f"{m} {counts[m]}" for m in MODALITIES if counts[m]]
    parts.append(f"labels {sum(case.labels is not None for case in cases)}")
    return f"{len(cases)} case(s): " + ", ".join(parts)


def case_file_name(case: str, item: str, naming: str = "brats2018", *, compressed: bool = True) -> str:
    """File name of a modality (or ``"seg"``) of a case in a naming scheme, e.g. ``Case_001_t1.nii.gz``."""
    if naming not in NAMINGS:
        raise InputError(f"unknown naming {naming!r}", f"use one of {', '.join(NAMINGS)}")
    key = "seg" if item == "seg" else normalise_modality(item)
    return f"{case}{SEPARATORS[naming]}{FILE_SUFFIXES[naming][key]}.nii" + (".gz" if compressed else "")
