#!/usr/bin/env python3
"""Measuring protocol for recipe choices: several settings x several seeds on a fixed split.

    python benchmarks/protocol.py --out runs/protocol --mode quick --seeds 0 1 2 \\
        --data ../shared/data/brats18 --data ../shared/data/brats-extra \\
        --setting paper= --setting augment="data.augment_spatial=true;data.augment_intensity=true"

Splits (fixed here, before any run):
- the five REPORT_CASES are never trained on and are scored only with ``--split report`` (the
  final table);
- ``--split dev`` (the default, for every choice) trains on all other cases except the
  DEVELOPMENT_CASES and scores those;
- ``--split sites`` trains on all cases except the report cases and the SITE_DEVELOPMENT_CASES and
  scores those: a second development split of old BraTS 2013 and CBICA scans, the two contributing
  groups whose report scans the ``dev`` split's choices failed on;
- ``--split report`` trains on all non-report cases (development cases included) and scores the
  report cases.

Modes: ``quick`` = the ``cpu`` config (64 px, minutes per run on 2 cores) for screening, ``full`` =
the ``reference`` config (96 px) for the final table; ``--config`` picks another. Each setting is
``name=key=value;key=value`` (an empty override list is the config as it is). Settings that leave
stage 1 alone share one translator per seed (trained once, ``adapt.translator_bundle``), so they
differ only in what they change. ``--inference "NAME=--flip;--postprocess"`` scores the same models
again with inference options (rows ``setting + NAME``). ``--ensemble`` also scores each setting's
models of all seeds as one ensemble (:mod:`bigl.ensemble`, row ``setting (ensemble)``).
``--branch "NAME=adapt.pseudo_threshold=0.8"`` trains, for each seed, a branch of the first
setting's run at the end of its adversarial phase (``bigl train --branch-from``): the same adapted
network, with only the self-training settings changed, so the comparison is paired and costs the
self-training steps alone. ``--baselines`` adds source-only and the no-learning
invert + histogram-match baseline (source-only model on the inverted T2) for each seed; its T1
reference histogram comes from the training cases of the first ``--data`` folder.

Every run is ``bigl train`` + ``bigl evaluate`` (commands in ``OUT/commands.txt``); a finished run
is not run again, an interrupted one continues with ``--resume``. The table (``OUT/table.md``,
``OUT/table.json``) gives per setting the Dice of WT / TC / ET and their mean as
mean +- std over seeds (of the per-seed case means) and mean +- std over all case x seed scores.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPORT_CASES = ["Brats18_2013_2_1", "Brats18_CBICA_AQN_1", "Brats18_TCIA01_425_1", "Brats18_TCIA02_606_1", "Brats18_TCIA10_639_1"]
#: Development cases (scored for choices): the three of the earlier translator study and two of the
#: extra BraTS 2019/2021 cases, fixed before any run of this protocol.
DEVELOPMENT_CASES = ["Brats18_2013_11_1", "Brats18_CBICA_ABM_1", "Brats18_TCIA01_201_1", "BraTS2021_00005", "BraTS19_CBICA_ASK_1"]
#: Second development split, fixed before any run on it: two BraTS 2013 and three CBICA cases that
#: are in neither list above, chosen by site and by label-free T2 intensity statistics close to
#: those of the report scans of the same groups (no label of any case was read to pick them).
SITE_DEVELOPMENT_CASES = ["Brats18_2013_20_1", "Brats18_2013_23_1", "Brats18_CBICA_ALU_1", "Brats18_CBICA_AME_1",
                          "BraTS19_CBICA_BHQ_1"]
#: Cases scored by each split; every split but ``report`` also leaves the report cases out of training.
SPLITS = {"dev": DEVELOPMENT_CASES, "sites": SITE_DEVELOPMENT_CASES, "report": REPORT_CASES}
MODES = {"quick": "cpu", "full": "reference"}
REGIONS = ("WT", "TC", "ET")
#: Override prefixes that change stage 1 (such a setting trains its own translator); precision
#: changes both stages.
_STAGE1_PREFIXES = ("translator.", "translator_training.", "preprocessing.", "data.", "run.cpu_bf16", "run.amp")
_STAGE2_DATA_KEYS = ("data.augment_spatial", "data.augment_intensity", "data.augment_invert", "data.augment_tumour_brightening",
                     "data.tumour_fraction", "data.workers")


def parse_setting(text: str) -> tuple[str, list[str]]:
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--setting {text!r}: write NAME=key=value;key=value (or NAME= for no override)")
    return name, [item for item in rest.split(";") if item]


def own_translator(overrides: list[str]) -> bool:
    keys = [item.split("=", 1)[0] for item in overrides]
    return any(key.startswith(_STAGE1_PREFIXES) and key not in _STAGE2_DATA_KEYS for key in keys)


class Protocol:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.config = args.config or MODES[args.mode]
        self.bigl = [sys.executable, "-m", "bigl"]
        self.scored = SPLITS[args.split]
        self.excluded = REPORT_CASES if args.split == "report" else REPORT_CASES + self.scored
        folders = [str(Path(d).resolve()) for d in args.data]
        self.data_overrides = [
            f"data.source_dir={json.dumps(folders)}", f"data.target_dir={json.dumps(folders)}",
            "data.source_modality=t1", "data.target_modality=t2", f"data.exclude={json.dumps(self.excluded)}",
            f"run.threads={args.threads}", "run.progress=false", "run.sample_every=0",
        ]
        self.folders = folders
        self._check_manifest()

    def _check_manifest(self) -> None:
        """One output folder holds one protocol: the same split, config and data every time, and
        each setting name always the same overrides, so that finished runs found there are reused
        only when they belong to it. New settings are added to the manifest."""
        manifest = {"split": self.args.split, "config": self.config, "data": self.folders,
                    "excluded": self.excluded, "scored": self.scored}
        settings = dict(parse_setting(text) for text in self.args.setting)
        base, base_overrides = parse_setting(self.args.setting[0])
        branches = {name: base_overrides + overrides for name, overrides in map(parse_setting, self.args.branch)}
        clash = sorted(set(branches) & set(settings))
        if clash:
            raise SystemExit(f"{', '.join(clash)}: a name is a --setting or a --branch, not both")
        settings.update(branches)
        path = self.out / "manifest.json"
        old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else dict(manifest)
        changed = [key for key in manifest if old.get(key) != manifest[key]]
        if changed:
            raise SystemExit(f"{self.out} holds a protocol with another {', '.join(changed)}; use another --out")
        known = old.get("settings", {})
        redefined = [name for name, overrides in settings.items() if name in known and known[name] != overrides]
        if redefined:
            raise SystemExit(f"{self.out} holds setting(s) {', '.join(redefined)} with other overrides "
                             f"({'; '.join(f'{n}: {known[n]}' for n in redefined)}); give the new ones another name")
        manifest["settings"] = {**known, **settings}
        if branches:
            manifest["branches"] = {**old.get("branches", {}), **{name: base for name in branches}}
        path.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")

    def command(self, argv: list[str], log: Path) -> None:
        with open(self.out / "commands.txt", "a", encoding="utf-8") as handle:
            handle.write(" ".join(shlex.quote(a) for a in ["bigl", *argv[3:]]) + "\n")
        log.parent.mkdir(parents=True, exist_ok=True)
        started = time.time()
        with open(log, "a", encoding="utf-8") as handle:
            result = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        print(f"  {time.time() - started:7.1f} s  {' '.join(argv[3:5])} -> {log.parent.name} (exit {result.returncode})", flush=True)
        if result.returncode:
            raise SystemExit(f"command failed (exit {result.returncode}); see {log}")

    def train(self, folder: Path, overrides: list[str], stage: str = "all", branch_from: Path | None = None) -> Path:
        stage_file = "translator.safetensors" if stage == "translator" else "model.safetensors"
        if (folder / stage_file).exists():
            return folder / stage_file
        resume = ["--resume"] if (folder / "config.json").exists() else []
        branch = ["--branch-from", str(branch_from)] if branch_from is not None else []
        argv = [*self.bigl, "train", "--config", self.config, "--out", str(folder), "--stage", stage, *resume, *branch,
                *self.data_overrides, *overrides]
        self.command(argv, folder.parent / f"{folder.name}.log")
        return folder / stage_file

    def evaluate(self, model: Path | list[Path], folder: Path, extra: list[str] = ()) -> dict:
        """Score a model (or, for a list, the ensemble of the models) on the scored cases."""
        summary = folder / "summary.json"
        if not summary.exists():
            models = [arg for m in (model if isinstance(model, list) else [model]) for arg in ("--model", str(m))]
            argv = [*self.bigl, "evaluate", *models, *sum((["--data", d] for d in self.folders), []),
                    "--modality", "t2", "--cases", ",".join(self.scored), "--out", str(folder), "--no-save-predictions",
                    "--figure-cases", "0", "--threads", str(self.args.threads), *extra]
            self.command(argv, folder.parent / f"{folder.name}.log")
        return json.loads(summary.read_text(encoding="utf-8"))

    def score(self, name: str, seed: int, model: Path, results: dict) -> None:
        """Evaluate a setting's model of one seed, plain and with each --inference variant."""
        results.setdefault(name, {})[seed] = self.evaluate(model, self.out / name / f"eval-seed{seed}")
        for variant, flags in (parse_setting(text) for text in self.args.inference):
            results.setdefault(f"{name} + {variant}", {})[seed] = self.evaluate(
                model, self.out / name / f"eval-{variant}-seed{seed}", flags)

    def run(self) -> dict:
        results: dict[str, dict[int, dict]] = {}
        seeds = self.args.seeds
        settings = [parse_setting(text) for text in self.args.setting]
        for seed in seeds:
            seed_overrides = [f"run.seed={seed}"]
            translator = None
            if any(not own_translator(o) for _, o in settings):
                print(f"seed {seed}: shared translator", flush=True)
                translator = self.train(self.out / "translators" / f"seed{seed}", seed_overrides, stage="translator")
            for name, overrides in settings:
                print(f"seed {seed}: {name} {' '.join(overrides)}", flush=True)
                run_dir = self.out / name / f"seed{seed}"
                shared = [] if own_translator(overrides) else [f"adapt.translator_bundle={translator}"]
                model = self.train(run_dir, seed_overrides + shared + overrides, stage="all" if not shared else "adapt")
                self.score(name, seed, model, results)
            base, base_overrides = settings[0]
            for name, overrides in (parse_setting(text) for text in self.args.branch):
                print(f"seed {seed}: {name}, a branch of {base}: {' '.join(overrides)}", flush=True)
                shared = [] if own_translator(base_overrides) else [f"adapt.translator_bundle={translator}"]
                model = self.train(self.out / name / f"seed{seed}", seed_overrides + shared + base_overrides + overrides,
                                   stage="adapt", branch_from=self.out / base / f"seed{seed}")
                self.score(name, seed, model, results)
            if self.args.baselines:
                run_dir = self.out / "source-only" / f"seed{seed}"
                model = self.train(run_dir, seed_overrides + ["adapt.method=source-only"], stage="adapt")
                results.setdefault("source-only", {})[seed] = self.evaluate(model, self.out / "source-only" / f"eval-seed{seed}")
                reference = self.out / "invert-histmatch" / "reference.json"
                reference_args = (["--reference-data", str(reference)] if reference.exists() else
                                  ["--reference-data", self.folders[0], "--reference-modality", "t1",
                                   "--reference-exclude", ",".join(self.excluded)])
                results.setdefault("invert-histmatch", {})[seed] = self.evaluate(
                    model, self.out / "invert-histmatch" / f"eval-seed{seed}", ["--baseline", "invert-histmatch", *reference_args])
                if not reference.exists():
                    found = self.out / "invert-histmatch" / f"eval-seed{seed}" / "reference.json"
                    if found.exists():
                        reference.write_bytes(found.read_bytes())
        if self.args.ensemble and len(seeds) > 1:
            label = "+".join(str(seed) for seed in seeds)
            for name in [name for name, _ in settings] + [parse_setting(text)[0] for text in self.args.branch]:
                models = [self.out / name / f"seed{seed}" / "model.safetensors" for seed in seeds]
                print(f"seeds {label}: {name} as one ensemble", flush=True)
                results[f"{name} (ensemble)"] = {label: self.evaluate(models, self.out / name / f"eval-ensemble-{label}")}
        table = summarise(results)
        (self.out / "table.json").write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
        (self.out / "table.md").write_text(format_table(table, self), encoding="utf-8")
        return table


def summarise(results: dict[str, dict[int, dict]]) -> dict:
    """Per setting and region: mean +- std over seeds (of case means) and over case x seed scores."""
    table = {}
    for name, by_seed in results.items():
        entry: dict = {"seeds": sorted(by_seed), "regions": {}}
        for region in (*REGIONS, "mean"):
            per_seed, per_case = [], []
            for seed, result in sorted(by_seed.items()):
                scores = []
                for case, regions in result["cases"].items():
                    value = np.mean([regions[r]["dice"] for r in REGIONS]) if region == "mean" else regions[region]["dice"]
                    scores.append(100.0 * float(value))
                per_case += scores
                per_seed.append(float(np.mean(scores)))
            entry["regions"][region] = {
                "seed_mean": float(np.mean(per_seed)), "seed_std": _sample_std(per_seed),
                "case_mean": float(np.mean(per_case)), "case_std": _sample_std(per_case),
                "per_seed": [round(v, 2) for v in per_seed],
            }
        table[name] = entry
    return table


def _sample_std(values: list[float]) -> float:
    """Sample standard deviation (ddof=1); 0 for a single value."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def format_table(table: dict, protocol: Protocol) -> str:
    args = protocol.args
    lines = [
        f"Protocol: split {args.split} (scored: {', '.join(protocol.scored)}), config {protocol.config}, seeds {args.seeds}",
        "",
        "Dice % on T2: mean ± sample std over seeds (of the per-seed case means) / ± sample std over all case x seed "
        "scores; per-seed means",
        "",
        "| setting | WT | TC | ET | mean | WT per seed |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, entry in table.items():
        cells = [f"{r['seed_mean']:.1f} ± {r['seed_std']:.1f} / ± {r['case_std']:.1f}" for r in (entry["regions"][k] for k in (*REGIONS, "mean"))]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {', '.join(f'{v:.1f}' for v in entry['regions']['WT']['per_seed'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--data", action="append", required=True, help="data folder (repeat for several)")
    parser.add_argument("--mode", choices=sorted(MODES), default="quick")
    parser.add_argument("--config", help="a ready config or JSON file instead of the mode's")
    parser.add_argument("--split", choices=tuple(SPLITS), default="dev")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--setting", action="append", required=True, help="NAME=key=value;key=value")
    parser.add_argument("--branch", action="append", default=[],
                        help="NAME=key=value;key=value: a branch of the first --setting's runs at the end of their "
                             "adversarial phase, with other self-training settings (adapt.self_training_*, adapt.pseudo_*)")
    parser.add_argument("--baselines", action="store_true", help="also source-only and invert + histogram match")
    parser.add_argument("--inference", action="append", default=[],
                        help="NAME=--flag;--flag: also score every setting's models with these bigl evaluate flags "
                             "(e.g. 'tta+post=--flip;--postprocess')")
    parser.add_argument("--ensemble", action="store_true",
                        help="also score each setting's models of all --seeds as one ensemble (bigl evaluate with "
                             "--model repeated), the row 'SETTING (ensemble)'")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    protocol = Protocol(args)
    protocol.run()
    print((protocol.out / "table.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
