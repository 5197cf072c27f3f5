"""The check a user sees before any training starts: what data was found, what is wrong, how long it takes.

Pure Python over the BiGL core (``bigl.data.brats``); it reads NIfTI headers only, so checking a
few hundred BraTS cases takes seconds. Each domain (source, target) is one data folder or a list
of folders read as one data set, as ``data.source_dir`` / ``data.target_dir`` of the run; the
report says what each folder holds and what the domain comes to. Problems are of two kinds:
*errors* stop the run from starting (no labelled source case, no target case, nothing to adapt, a
missing folder, a case name found in two folders of a domain), *warnings* do not (cases left out:
source cases without labels, cases whose files do not share a voxel grid or cannot be read; the
run skips them through ``data.exclude`` / ``data.target_exclude``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence


from bigl.data.brats import MODALITIES, Case, data_folders, find_cases, normalise_modality, same_folders
from bigl.data.io import files_share_grid, read_grid
from bigl.errors import BiGLError

from bigl.runplan import RunEstimate, config_value, estimate_run

#: The config key through which the run skips the cases the check leaves out, per role.
EXCLUDE_KEYS = {"source": "data.exclude", "target": "data.target_exclude"}


@dataclass
class Problem:
    """One finding of the check: ``level`` is "error" (blocks the start) or "warning"."""

    level: str
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        text = f"{self.level.upper()}: {self.message}"
        return text + (f"\n  fix: {self.hint}" if self.hint else "")


@dataclass
class FolderReport:
    """What one data folder holds for one role (source or target)."""

    role: str
    root: Path
    modality: str
    cases_found: int = 0
    #: Names of every case found in the folder (usable or not).
    case_names: list[str] = field(default_factory=list)
    cases_by_modality: dict[str, int] = field(default_factory=dict)
    labelled: int = 0
    #: Names of the cases the run will use.
    usable: list[str] = field(default_factory=list)
    #: Case name -> why it is left out (grid problem, unreadable header).
    excluded: dict[str, str] = field(default_factory=dict)
    #: Slices along the slice axis over the usable cases (an upper bound: the run crops to the brain).
    slices: int = 0
    #: False when the folder could not be read (missing, not a folder, no case in it).
    scanned: bool = True

    def summary(self) -> str:
        counts = ", ".join(f"{m} {n}" for m, n in self.cases_by_modality.items() if n) or "no images"
        text = (
            f"{self.role} ({self.modality}) in {self.root}: {self.cases_found} case(s) found ({counts}; "
            f"labels {self.labelled}); {len(self.usable)} usable, up to {self.slices} slices"
        )
        if self.excluded:
            text += f"; {len(self.excluded)} left out"
        return text


@dataclass
class DomainReport:
    """One role (source or target): its folders, each with its own report, read as one data set."""

    role: str
    modality: str
    folders: list[FolderReport] = field(default_factory=list)
    #: False when the training method does not read this role (source-only, target-only runs).
    used: bool = True

    @property
    def roots(self) -> list[Path]:
        return [folder.root for folder in self.folders]

    @property
    def cases_found(self) -> int:
        return sum(folder.cases_found for folder in self.folders)

    @property
    def cases_by_modality(self) -> dict[str, int]:
        return {m: sum(folder.cases_by_modality.get(m, 0) for folder in self.folders) for m in MODALITIES}

    @property
    def labelled(self) -> int:
        return sum(folder.labelled for folder in self.folders)

    @property
    def usable(self) -> list[str]:
        """Names of the cases the run will use, over all folders, sorted."""
        return sorted(name for folder in self.folders for name in folder.usable)

    @property
    def excluded(self) -> dict[str, str]:
        """Case name -> why it is left out, over all folders."""
        return {name: reason for folder in self.folders for name, reason in folder.excluded.items()}

    @property
    def slices(self) -> int:
        return sum(folder.slices for folder in self.folders)

    def where(self) -> str:
        """The folder, or "the N <role> folders (a, b)" for several."""
        if len(self.folders) == 1:
            return str(self.folders[0].root)
        return f"the {len(self.folders)} {self.role} folders ({', '.join(str(root) for root in self.roots)})"

    def summary(self) -> str:
        """One line per folder, and the total when there are several."""
        if not self.folders:
            return f"{self.role} ({self.modality}): no folder checked"
        lines = [folder.summary() for folder in self.folders]
        if len(self.folders) > 1:
            text = (
                f"{self.role} ({self.modality}) in all {len(self.folders)} folders: {self.cases_found} case(s) found "
                f"(labels {self.labelled}); {len(self.usable)} usable, up to {self.slices} slices"
            )
            lines.append(text + (f"; {len(self.excluded)} left out" if self.excluded else ""))
        return "\n".join(lines)


@dataclass
class DatasetReport:
    source: DomainReport
    target: DomainReport
    problems: list[Problem] = field(default_factory=list)
    estimate: RunEstimate | None = None
    paired_cases: int = 0

    @property
    def ok(self) -> bool:
        """True when nothing blocks the run (warnings allowed)."""
        return not self.errors

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "warning"]

    @property
    def excluded_cases(self) -> list[str]:
        """Every case left out in either role (for the run's ``data.exclude``)."""
        return sorted(set(self.source.excluded) | set(self.target.excluded))

    def as_text(self) -> str:
        lines = [report.summary() for report in (self.source, self.target) if report.used]
        if self.paired_cases:
            lines.append(f"cases with both modalities (translator pairs): {self.paired_cases}")
        for report in (self.source, self.target):
            for folder in report.folders:
                where = f" in {folder.root}" if len(report.folders) > 1 else ""
                for name, reason in folder.excluded.items():
                    lines.append(f"left out ({report.role}) {name}{where}: {reason}")
        if self.estimate is not None:
            lines.append(self.estimate.summary())
        lines.extend(str(p) for p in self.problems)
        lines.append("ready to train" if self.ok else "NOT ready: fix the errors above first")
        return "\n".join(lines)


def _folder_list(role: str, folders: Any) -> tuple[list[Path], list[Problem]]:
    """``data.<role>_dir`` as a list of folders: one folder or a list of them (blank entries
    ignored, a folder listed twice reported once)."""
    if folders is None or isinstance(folders, (str, os.PathLike)) or not isinstance(folders, Sequence):
        folders = [folders]
    paths, problems = [], []
    for entry in folders:
        if entry is None or (isinstance(entry, str) and not entry.strip()):
            continue
        if isinstance(entry, (str, os.PathLike)):
            paths.append(entry)
        else:
            problems.append(Problem("error", f"{role} data: {entry!r} is not a folder path", f"give the {role} folders as paths"))
    kept, seen = [], set()
    for path in data_folders(paths) if paths else []:
        key = os.path.normcase(os.path.abspath(path))
        if key in seen:
            problems.append(
                Problem("error", f"{role} data: the folder {path} is listed twice", f"keep the folder once in the {role} folders")
            )
            continue
        seen.add(key)
        kept.append(path)
    return kept, problems


def _scan_folder(
    role: str,
    root: Path,
    modality: str,
    *,
    require_labels: bool,
    slice_axis: int,
    check_grids: bool,
    skip: set[str],
) -> tuple[FolderReport, list[Case], list[Problem]]:
    """What one folder holds: its report, the cases the run will use, and why it cannot be read."""
    report = FolderReport(role=role, root=root, modality=modality)
    try:
        cases = find_cases(root)
    except BiGLError as exc:
        report.scanned = False
        return report, [], [Problem("error", f"{role} data: {exc.message}", exc.hint)]
    report.cases_found = len(cases)
    report.case_names = [case.name for case in cases]
    report.cases_by_modality = {m: sum(case.has(m) for case in cases) for m in MODALITIES}
    report.labelled = sum(case.has(modality) and case.labels is not None for case in cases)
    usable = []
    for case in cases:
        if case.name in skip or not case.has(modality):
            continue
        if require_labels and case.labels is None:
            report.excluded[case.name] = f"no label map (the {role} must be labelled)"
            continue
        if check_grids:
            try:
                case.check_grid()
            except BiGLError as exc:
                report.excluded[case.name] = exc.message
                continue
        try:
            shape, _ = read_grid(case.images[modality])
        except BiGLError as exc:
            report.excluded[case.name] = exc.message
            continue
        report.slices += int(shape[slice_axis])
        usable.append(case)
    report.usable = [case.name for case in usable]
    return report, usable, []


def _duplicate_cases(domain: DomainReport) -> list[Problem]:
    """A case name in two folders of one domain: the run cannot tell the cases apart."""
    where: dict[str, list[Path]] = {}
    for folder in domain.folders:
        for name in folder.case_names:
            where.setdefault(name, []).append(folder.root)
    duplicated = sorted(name for name, roots in where.items() if len(roots) > 1)
    if not duplicated:
        return []
    listed = "; ".join(f"{name} in {' and '.join(str(root) for root in where[name])}" for name in duplicated[:5])
    more = f" (and {len(duplicated) - 5} more)" if len(duplicated) > 5 else ""
    return [
        Problem(
            "error",
            f"{domain.role} data: {len(duplicated)} case name(s) found in more than one {domain.role} folder: {listed}{more}",
            f"case names must be unique across the {domain.role} folders: remove the copies, "
            "or remove a folder that holds (or lies inside) another one from the list",
        )
    ]


def _scan_domain(
    role: str,
    folders: list[Path],
    modality: str,
    *,
    require_labels: bool,
    slice_axis: int,
    check_grids: bool,
    excluded_by_user: Iterable[str],
) -> tuple[DomainReport, list[Case], list[Problem]]:
    """Every folder of one role, read as one data set."""
    domain = DomainReport(role=role, modality=modality)
    skip = set(excluded_by_user)
    usable: list[Case] = []
    problems: list[Problem] = []
    for root in folders:
        report, cases, found = _scan_folder(
            role, root, modality, require_labels=require_labels, slice_axis=slice_axis, check_grids=check_grids, skip=skip
        )
        domain.folders.append(report)
        usable += cases
        problems += found
    problems += _duplicate_cases(domain)
    needs = f"a {modality} image" + (" and a label map" if require_labels else "")
    scanned = [folder for folder in domain.folders if folder.scanned]
    if scanned and not usable:
        problems.append(
            Problem(
                "error",
                f"{role} data: none of the {domain.cases_found} case(s) in {domain.where()} has {needs} that can be used",
                f"choose the {role} modality the cases have "
                f"({', '.join(m for m, n in domain.cases_by_modality.items() if n) or 'none found'})"
                + (", and give labelled cases (<case>_seg.nii.gz) as source" if require_labels else ""),
            )
        )
    elif len(domain.folders) > 1:
        for folder in scanned:
            if not folder.usable:
                problems.append(
                    Problem(
                        "warning",
                        f"{role} data: none of the {folder.cases_found} case(s) in {folder.root} has {needs} that can be used",
                        f"the run uses the other {role} folders; remove this one from the list, or fix its cases",
                    )
                )
    if domain.excluded:
        problems.append(
            Problem(
                "warning",
                f"{role} data: {len(domain.excluded)} case(s) left out: {', '.join(sorted(domain.excluded))}",
                f"the run skips them ({EXCLUDE_KEYS[role]}"
                + ("; a case of that name in the target folders is skipped too" if role == "source" else "")
                + "); fix their files (see the list above) to include them",
            )
        )
    return domain, usable, problems


def _same_grid(source: Case, target: Case, source_modality: str, target_modality: str) -> bool:
    try:
        return files_share_grid(source.images[source_modality], target.images[target_modality])
    except BiGLError:
        return False


#: Which roles a training method reads, and whether their labels are needed.
METHOD_ROLES = {
    "bigl": {"source": True, "target": False},
    "source-only": {"source": True},
    "target-only": {"target": True},
}


def check_datasets(
    source_dir: str | Path | Sequence[str | Path] | None,
    source_modality: str,
    target_dir: str | Path | Sequence[str | Path] | None,
    target_modality: str,
    *,
    config: Mapping[str, Any] | None = None,
    exclude: Iterable[str] = (),
    target_exclude: Iterable[str] = (),
    check_grids: bool = True,
    device: str | None = None,
    gpus: int = 1,
) -> DatasetReport:
    """Scan the source (labelled) and target (unlabelled) folders; never raises for user mistakes.

    ``source_dir`` and ``target_dir`` are one folder each, or a list of folders read as one data
    set (as ``data.source_dir`` / ``data.target_dir`` of a run): case names must be unique across
    the folders of a role, and every folder must exist and hold cases.
    ``config`` (a resolved training config) supplies the method, the slice axis, the translator
    mode and the sizes for the estimate; without it a BiGL run is assumed and nothing is estimated.
    ``exclude`` skips cases in both roles, ``target_exclude`` in the target only (as the run does).
    """
    problems: list[Problem] = []
    method = config_value(config, "adapt.method", "bigl")
    roles = METHOD_ROLES.get(method, METHOD_ROLES["bigl"])
    modalities = {}
    unknown_modality = set()
    for role, name in (("source", source_modality), ("target", target_modality)):
        try:
            modalities[role] = normalise_modality(name)
        except BiGLError as exc:
            if role in roles:
                problems.append(Problem("error", f"{role} modality: {exc.message}", exc.hint))
            modalities[role] = str(name)
            unknown_modality.add(role)
    slice_axis = int(config_value(config, "preprocessing.slice_axis", 2))
    folders = {"source": source_dir, "target": target_dir}
    skipped = {"source": list(exclude), "target": list(exclude) + list(target_exclude)}
    reports: dict[str, DomainReport] = {}
    cases: dict[str, list[Case]] = {}
    for role in ("source", "target"):
        reports[role], cases[role] = DomainReport(role=role, modality=modalities[role], used=role in roles), []
        if role not in roles:
            continue
        roots, found = _folder_list(role, folders[role])
        problems += found
        if not roots and not found:
            problems.append(Problem("error", f"no {role} data folder chosen", f"choose the {role} folder (or folders)"))
        if not roots or role in unknown_modality:
            continue
        reports[role], cases[role], found = _scan_domain(
            role, roots, modalities[role], require_labels=roles[role], slice_axis=slice_axis,
            check_grids=check_grids, excluded_by_user=skipped[role],
        )  # fmt: skip
        problems += found
    report = DatasetReport(source=reports["source"], target=reports["target"], problems=problems)

    allow_same = bool(((config or {}).get("data") or {}).get("allow_same_modality", False))
    if (method == "bigl" and modalities["source"] == modalities["target"] and not allow_same
            and same_folders(folders["source"], folders["target"])):  # the rule of bigl train
        problems.append(
            Problem(
                "error",
                f"source and target are both {modalities['source']} from the same folder(s): there is no domain gap "
                "to adapt across",
                "choose the labelled modality as source and the modality to segment as target (e.g. t1 -> t2); "
                "to adapt between scanners of one modality, choose separate source and target folders",
            )
        )
    if method == "bigl":
        target_by_name = {case.name: case for case in cases["target"]}
        report.paired_cases = sum(
            1
            for case in cases["source"]
            if case.name in target_by_name
            and _same_grid(case, target_by_name[case.name], modalities["source"], modalities["target"])
        )
        mode = config_value(config, "translator_training.mode", "auto")
        if mode == "paired" and cases["source"] and cases["target"] and not report.paired_cases:
            problems.append(
                Problem(
                    "error",
                    "the paired translator needs cases that have both the source and the target image "
                    "on one voxel grid (same case name, co-registered), and none was found",
                    "choose the unpaired (or auto) translator, or give folders where cases hold both modalities",
                )
            )
    processes = max(1, int(gpus))
    for section in ("translator_training", "adapt"):
        batch = config_value(config, f"{section}.batch_size")
        if processes > 1 and isinstance(batch, int) and batch % processes:
            problems.append(
                Problem(
                    "error",
                    f"{section}.batch_size {batch} cannot be split over {processes} GPUs (each takes an equal share)",
                    f"use a batch size that is a multiple of {processes}, or fewer GPUs",
                )
            )
    if config is not None and not report.errors:
        report.estimate = estimate_run(
            config, report.source.slices, report.target.slices, device=device, gpus=gpus
        )
    return report
