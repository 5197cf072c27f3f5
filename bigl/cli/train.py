"""``bigl train``: two-stage BiGL training (translator, then segmentation with adaptation)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from bigl.runfolder import DEVICE_CHOICES


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a BiGL model (or a source-only / target-only baseline)",
        description=(
            "Train BiGL on BraTS-style folders: stage 1 trains the bidirectional image translator, "
            "stage 2 the dual-attention U-Net with global-to-local adaptation. Settings come from a "
            "JSON config (or a ready one: smoke, cpu, reference, paper) and key=value overrides such as "
            "adapt.iterations=500 or data.source_dir=/data/brats. The run folder gets config.json, "
            "events.jsonl (one JSON event per line), checkpoints/, samples/, losses.png, "
            "translator.safetensors and the final bundle model.safetensors. Multi-GPU: "
            "torchrun --nproc_per_node N -m bigl train ... (--out required)."
        ),
        epilog="Example: bigl train --config cpu --data /data/brats18 --out runs/t1-t2 adapt.iterations=500",
    )
    parser.add_argument("--config", "-c", required=True, metavar="FILE|smoke|cpu|reference|paper",
                        help="training config: a JSON file or a ready config name")
    parser.add_argument("--stage", choices=("translator", "adapt", "all"), default="all",
                        help="which stage(s) to run (default all; adapt alone needs a trained translator)")
    parser.add_argument("--out", "-o", type=Path, metavar="DIR",
                        help="run folder (default runs/<config>-<date>-<time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint (finished stages are skipped)")
    parser.add_argument("--branch-from", type=Path, metavar="RUN",
                        help="start from RUN's network at the end of its adversarial phase and train only the "
                             "self-training steps (which may use other adapt.self_training_* / adapt.pseudo_* "
                             "settings), with RUN's translator")
    parser.add_argument("--device", choices=DEVICE_CHOICES, help="sets run.device (default: the config's, auto)")
    parser.add_argument("--data", type=Path, metavar="DIR", action="append",
                        help="BraTS-style folder for both domains (sets data.source_dir and data.target_dir); repeat it to use several")
    parser.add_argument("--source-dir", type=Path, metavar="DIR", action="append",
                        help="labelled source-domain cases (data.source_dir); repeat it to use several folders")
    parser.add_argument("--target-dir", type=Path, metavar="DIR", action="append",
                        help="target-domain cases (data.target_dir); repeat it to use several folders")
    parser.add_argument("--source-modality", metavar="NAME", help="source modality, e.g. t1 (data.source_modality)")
    parser.add_argument("--target-modality", metavar="NAME", help="target modality, e.g. t2 (data.target_modality)")
    parser.add_argument("--method", choices=("bigl", "source-only", "target-only"), help="sets adapt.method")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when not on a terminal)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. adapt.lambda_gtl=0.5")
    parser.set_defaults(func=run)


def _overrides(args: argparse.Namespace) -> list[str]:
    """Flags turned into config overrides; explicit KEY=VALUE overrides come last and win."""
    overrides = []
    if args.data is not None:
        overrides += [f"data.source_dir={_folders(args.data)}", f"data.target_dir={_folders(args.data)}"]
    for flag, key in (("source_dir", "data.source_dir"), ("target_dir", "data.target_dir")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={_folders(getattr(args, flag))}")
    for flag, key in (("source_modality", "data.source_modality"), ("target_modality", "data.target_modality"),
                      ("method", "adapt.method"), ("device", "run.device")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.method == "target-only":
        overrides.append("data.target_labels=true")
    return overrides + list(args.overrides)


def _folders(paths: list[Path]) -> str:
    """One folder as itself, several as a JSON list (the override value of data.*_dir)."""
    return str(paths[0]) if len(paths) == 1 else json.dumps([str(path) for path in paths])


def _out_dir(args: argparse.Namespace) -> Path:
    from bigl.errors import ConfigError

    if args.out is not None:
        return args.out
    if args.resume:
        raise ConfigError("--resume needs --out", "give the run folder to continue: --out DIR")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ConfigError("multi-process training needs --out", "give every process the same run folder: --out DIR")
    name = Path(str(args.config)).stem
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _stop_on_sigterm() -> None:
    """Turn SIGTERM (a GUI's Stop) into KeyboardInterrupt, so the event log records the stop."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run(args: argparse.Namespace) -> int:
    from bigl.errors import BiGLError
    from bigl.training import load_config, run_training
    from bigl.training.events import EVENTS_FILE, EventLog

    out_dir = args.out
    try:
        out_dir = _out_dir(args)
        config = load_config(args.config, _overrides(args))
    except BiGLError as exc:
        if out_dir is not None and int(os.environ.get("RANK", "0") or 0) == 0:
            try:
                EventLog(Path(out_dir) / EVENTS_FILE).write("error", message=exc.message, hint=exc.hint)
            except OSError:
                pass  # an unusable --out: the error itself says so on the terminal
        raise
    _stop_on_sigterm()
    main_process = int(os.environ.get("RANK", "0") or 0) == 0
    if main_process:
        print(f"bigl train: run folder {out_dir} (events in {out_dir / 'events.jsonl'})", file=sys.stderr, flush=True)
    try:
        result = run_training(config, out_dir, stage=args.stage, resume=args.resume, progress=not args.no_progress,
                              branch_from=args.branch_from)
    except KeyboardInterrupt:
        if main_process:
            if args.resume:
                again = "again"
            else:
                again = "with --resume" + ("" if args.out is not None else f" --out {out_dir}")
            print(f"\nbigl train: stopped; to continue from the last checkpoint in {out_dir / 'checkpoints'}, "
                  f"run the same command {again}", file=sys.stderr, flush=True)
        raise
    if main_process:
        print(f"bigl train: wrote {result}")
        _print_target_confidence(result)
    return 0


def _print_target_confidence(bundle) -> None:
    """One line on how sure the model is of the unlabelled target scans it adapted to (label-free),
    for a run that wrote a model and recorded it."""
    from bigl.bundle import read_metadata
    from bigl.runfolder import BUNDLE_FILE

    if bundle is None or Path(bundle).name != BUNDLE_FILE:  # the translator stage writes no model
        return
    recorded = (read_metadata(bundle).get("training") or {}).get("target_confidence")
    if not recorded or recorded.get("mean") is None:
        return
    unsure = recorded["unsure"]
    print(f"bigl train: mean tumour confidence {recorded['mean']:.3f} on the {recorded['scans']} unlabelled target scans; "
          + (f"{len(unsure)} below {recorded['floor']:g} ({', '.join(unsure)})" if unsure else f"none below {recorded['floor']:g}")
          + " (label-free: to compare runs of one recipe, docs/results.md \"Choosing a seed without labels\")")
