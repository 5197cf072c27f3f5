"""``bigl phantoms``: write a synthetic BraTS-style cohort (images + labels) for tests and demos."""

from __future__ import annotations

import argparse

from bigl.errors import ConfigError


def _spacing(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected one or three numbers like 1,1,2 (mm), not {text!r}")
    return values  # type: ignore[return-value]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "phantoms",
        help="write synthetic brain-tumour phantoms in the BraTS folder layout",
        description=(
            "Write a cohort of synthetic brain MR phantoms (T1, T1ce, T2, FLAIR with BraTS labels "
            "0/1/2/4) in the BraTS folder layout. The same seed always writes the same files."
        ),
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (created; case folders inside are overwritten)"
    )
    parser.add_argument("--cases", type=int, default=8, metavar="N", help="number of cases (default: 8)")
    parser.add_argument("--size", type=int, default=64, metavar="S", help="voxels per side (default: 64)")
    parser.add_argument("--seed", type=int, default=0, metavar="K", help="random seed (default: 0)")
    parser.add_argument(
        "--modalities",
        default="t1,t1ce,t2,flair",
        metavar="LIST",
        help="comma-separated modalities to write (default: t1,t1ce,t2,flair)",
    )
    parser.add_argument(
        "--naming",
        choices=("brats2018", "brats2023"),
        default="brats2018",
        help="file naming: <case>_t1.nii.gz (brats2018, default) or <case>-t1n.nii.gz (brats2023, enhancing = 3)",
    )
    parser.add_argument("--prefix", default="Phantom", metavar="NAME", help="case name prefix (default: Phantom)")
    parser.add_argument(
        "--spacing",
        type=_spacing,
        default=(1.0, 1.0, 1.0),
        metavar="MM",
        help="voxel size in mm, e.g. 1,1,2 (default: 1,1,1)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bigl.data.brats import find_cases, normalise_modalities, summarise_cases
    from bigl.data.phantoms import write_cohort

    modalities = normalise_modalities(args.modalities)
    if not modalities:
        raise ConfigError("no modality given", "use e.g. --modalities t1,t2")
    folders = write_cohort(
        args.out,
        cases=args.cases,
        size=args.size,
        seed=args.seed,
        modalities=modalities,
        naming=args.naming,
        prefix=args.prefix,
        spacing=args.spacing,
    )
    names = {folder.name for folder in folders}
    written = [case for case in find_cases(args.out) if case.name in names]
    print(f"wrote {summarise_cases(written)} to {args.out}")
    return 0
