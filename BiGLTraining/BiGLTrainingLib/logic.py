"""The BiGLTraining module logic: run ``bigl train`` beside Slicer and show what it does.

Nothing here imports Qt or needs the Slicer application: the widget calls :meth:`TrainingLogic.poll`
from a timer, tests call it in a loop (or :meth:`TrainingLogic.wait`). One poll

* reads the new lines of the run's event log (``events.jsonl``) and console log,
* updates the per-stage progress (:class:`~BiGLTrainingLib.eventlog.TrainingState`), the
  size-capped log and the loss tables and charts (:class:`~BiGLTrainingLib.curves.LossCurves`),
* notices when the process has ended: then the final bundle is copied into the models folder that
  BiGLSegmentation lists, and an evaluation is started when one was asked for.

A run folder holds everything of a run (docs/architecture.md, "Training"): ``config.json``,
``events.jsonl``, ``checkpoints/``, ``model.safetensors``; the module adds ``console.log`` (what
the trainer printed) and ``evaluation/`` (``bigl evaluate`` output).
"""

from __future__ import annotations

import collections
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from bigl.errors import BiGLError, InputError
from bigl.runfolder import BUNDLE_FILE, CONFIG_FILE, CONSOLE_LOG, EVENTS_FILE, TRANSLATOR_FILE, latest_checkpoint_name

from BiGLSegmentationLib.logic import child_environment

from bigl.runplan import config_value, format_duration

from .command import (
    TrainingSettings,
    evaluate_command,
    train_command,
)
from .curves import LossCurves
from .evaluation import evaluation_table_node, read_summary
from .eventlog import EventLogReader, FileTail, TrainingState, format_event
from .parameters import store_form, stored_form
from .process import DEFAULT_STOP_TIMEOUT_S, TrainingProcess

if TYPE_CHECKING:
    from .datasetcheck import DatasetReport

#: Lines the log view keeps (older ones are dropped).
DEFAULT_LOG_LINES = 2000
EVALUATION_FOLDER = "evaluation"
EVALUATION_LOG = "evaluation.log"

IDLE, RUNNING, STOPPED, FAILED, FINISHED = "idle", "running", "stopped", "failed", "finished"


def resume_point(run_folder: str | os.PathLike) -> str | None:
    """Where a stopped run would continue (``"adapt step 200"``), or None when there is nothing to resume."""
    folder = Path(run_folder).expanduser()
    if not (folder / CONFIG_FILE).is_file() or (folder / BUNDLE_FILE).is_file():
        return None
    latest = latest_checkpoint_name(folder)
    if latest is not None:
        return f"{latest[0]} step {latest[1]}"
    if (folder / TRANSLATOR_FILE).is_file():
        return "adaptation start (translator done)"
    return "the start (no checkpoint yet)"


def register_bundle(bundle: str | os.PathLike, models_folder: str | os.PathLike, name: str) -> Path:
    """Copy a trained bundle into the models folder BiGLSegmentation lists, as ``<name>.safetensors``.

    BiGLSegmentation's :func:`import_model` does the work (validation without unpickling, a name
    safe for file systems, atomic copy, a number added when another model has the name, no
    duplicate of the same file). Raises :class:`bigl.errors.BundleError` for a file that is not a
    valid bundle.
    """
    from BiGLSegmentationLib.models import import_model

    return Path(import_model(bundle, models_folder, name=name).path)


class TrainingLogic:
    """Starts, follows, stops and resumes one training run at a time (plus its optional evaluation).

    ``scene``: the MRML scene for the loss tables/charts and the evaluation table (None: no nodes).
    ``python``: the interpreter that runs ``bigl`` (in Slicer: PythonSlicer). ``env``: the base
    environment of the child (in Slicer: the startup environment); ``bigl`` is put on its path.
    ``models_folder``: where finished bundles are registered for BiGLSegmentation (None: not copied).
    """

    def __init__(
        self,
        scene=None,
        *,
        python: str | None = None,
        env: Mapping[str, str] | None = None,
        models_folder: str | os.PathLike | None = None,
        log_lines: int = DEFAULT_LOG_LINES,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT_S,
    ):
        self.scene = scene
        self.python = python or sys.executable
        self.base_env = dict(env) if env is not None else None
        self.models_folder = Path(models_folder).expanduser() if models_folder else None
        self.stop_timeout = stop_timeout
        self.log: collections.deque[str] = collections.deque(maxlen=log_lines)
        #: Called with each new log line (the widget appends it to its log view).
        self.on_log: Callable[[str], None] | None = None
        self.status = IDLE
        self.state = TrainingState()
        self.settings: TrainingSettings | None = None
        self.run_folder: Path | None = None
        self.command: list[str] | None = None
        self.process: TrainingProcess | None = None
        self.curves: LossCurves | None = None
        self.error: BiGLError | None = None
        self.bundle: Path | None = None
        self.registered_bundle: Path | None = None
        self.evaluation_process: TrainingProcess | None = None
        self.evaluation_result: dict | None = None
        self.evaluation_table = None
        self._evaluation_out: Path | None = None
        self._events: EventLogReader | None = None
        self._console: FileTail | None = None
        self._evaluation_console: FileTail | None = None
        self._evaluation_request: tuple[str, str] | None = None

    # ----------------------------------------------------------------------------------- checks
    @property
    def running(self) -> bool:
        """True from the start until a poll has taken in the end of the training process."""
        return self.status == RUNNING

    @property
    def evaluating(self) -> bool:
        """True from the start of an evaluation until a poll has taken in its end."""
        return self.evaluation_process is not None

    @property
    def busy(self) -> bool:
        return self.running or self.evaluating

    # ------------------------------------------------------------------------------ the form
    def save_form(self, settings: TrainingSettings, evaluation_data: str = "") -> None:
        """Keep the form in the scene's parameter node (:mod:`.parameters`; nothing without a scene)."""
        if self.scene is not None:
            store_form(self.scene, settings, evaluation_data)

    def saved_form(self) -> tuple[TrainingSettings, str] | None:
        """The form kept in the scene's parameter node and its evaluation folder, or None."""
        return stored_form(self.scene) if self.scene is not None else None

    def preset_config(self, settings: TrainingSettings) -> dict[str, Any]:
        """The preset's own config (no overrides), e.g. to fill the form."""
        from bigl.training.config import load_config

        return load_config(settings.config_source)

    def check_data(self, settings: TrainingSettings) -> DatasetReport:
        """The dataset check for these settings (ConfigError when the settings themselves are invalid)."""
        from .datasetcheck import check_datasets

        config = settings.resolve_config()
        return check_datasets(
            config_value(config, "data.source_dir"),
            config_value(config, "data.source_modality"),
            config_value(config, "data.target_dir"),
            config_value(config, "data.target_modality"),
            config=config,
            exclude=config_value(config, "data.exclude", []),
            target_exclude=config_value(config, "data.target_exclude", []),
            device=settings.device,
            gpus=settings.gpus,
        )

    # ------------------------------------------------------------------------------ start/stop
    def start(self, settings: TrainingSettings, *, check: bool = True) -> list[str]:
        """Start a new run into ``settings.output_dir``; returns the command.

        With ``check`` the dataset check runs first: its errors raise :class:`InputError` before
        anything starts, and the cases it leaves out are passed on as ``data.exclude`` /
        ``data.target_exclude``.
        """
        self._refuse_if_busy()
        out = self._output_folder(settings)
        if (out / CONFIG_FILE).exists():
            point = resume_point(out)
            raise InputError(
                f"the output folder {out} already holds a training run",
                (f"press Resume to continue it from {point}, or " if point else "") + "choose an empty output folder",
            )
        settings = TrainingSettings.from_dict(settings.to_dict())
        if check:
            report = self.check_data(settings)
            if not report.ok:
                raise InputError(
                    "the data cannot be used for training:\n" + "\n".join(str(p) for p in report.errors),
                    "fix the problems listed by Check data, then start again",
                )
            if report.source.excluded:
                settings.exclude = sorted(set(settings.exclude or []) | set(report.source.excluded))
            if report.target.excluded:
                settings.target_exclude = sorted(set(settings.target_exclude or []) | set(report.target.excluded))
        else:
            settings.resolve_config()  # ConfigError before anything starts
        command = train_command(settings, python=self.python, preset_config=self.preset_config(settings))
        self._launch(settings, out, command, resume=False)
        return command

    def resume(self, settings: TrainingSettings) -> list[str]:
        """Continue the run in ``settings.output_dir`` from its last checkpoint (``--resume``)."""
        self._refuse_if_busy()
        out = self._output_folder(settings)
        if resume_point(out) is None:
            if (out / BUNDLE_FILE).is_file():
                raise InputError(f"the run in {out} has finished", "start a new run in another output folder")
            raise InputError(f"there is no stopped run in {out} to resume", "choose the output folder of a stopped run")
        command = train_command(settings, python=self.python, resume=True)
        self._launch(settings, out, command, resume=True)
        return command

    def request_stop(self) -> None:
        """Ask training (and evaluation) to end, without waiting: the following polls see the
        process trees go, and kill what is left after ``stop_timeout`` seconds. The run can be
        resumed later from its last checkpoint."""
        self._evaluation_request = None
        for process in (self.process if self.running else None, self.evaluation_process):
            if process is not None:
                process.terminate(self.stop_timeout)

    def stop(self) -> None:
        """Stop and wait until everything has ended."""
        self.request_stop()
        self.wait(timeout=self.stop_timeout + 60)

    @property
    def stopping(self) -> bool:
        return any(p is not None and p.stopping for p in (self.process if self.running else None, self.evaluation_process))

    def wait(self, timeout: float | None = None, interval: float = 0.2) -> str:
        """Poll until training and evaluation have ended (for tests and the self-test); returns the status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.poll()
            if not self.busy:
                return self.status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"training still running after {timeout} s (status {self.status})")
            time.sleep(interval)

    def shutdown(self) -> None:
        """Stop everything (module cleanup, application quit)."""
        if self.busy:
            self.stop()

    def _refuse_if_busy(self) -> None:
        if self.busy:
            raise InputError("a training run or evaluation is still running", "stop it first, or wait until it ends")

    @staticmethod
    def _output_folder(settings: TrainingSettings) -> Path:
        if not settings.output_dir:
            raise InputError("no output folder chosen", "choose a folder for the run (checkpoints, logs, the trained model)")
        out = Path(settings.output_dir).expanduser().absolute()
        if out.exists() and not out.is_dir():
            raise InputError(f"the output folder {out} is a file", "choose a folder")
        return out

    def _launch(self, settings: TrainingSettings, out: Path, command: list[str], *, resume: bool) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.settings = settings
        self.run_folder = out
        self.command = command
        self.status = RUNNING
        self.state = TrainingState()
        self.error = None
        self.bundle = self.registered_bundle = None
        self.evaluation_result = None
        self._evaluation_request = None
        if settings.evaluation_dir:
            self._evaluation_request = (settings.evaluation_dir, settings.evaluation_modality or "")
        self._events = EventLogReader(out / EVENTS_FILE)
        if not resume:  # what an earlier, failed start left in the log is not this run's
            self._events.skip_to_end()
        self._console = FileTail(out / CONSOLE_LOG, from_end=True)
        if self.scene is not None:
            self.curves = LossCurves(self.scene, prefix=f"BiGL {out.name}", run_folder=str(out))
            self.curves.adopt_existing()
        self._log(("resuming" if resume else "starting") + f" training in {out}")
        self.process = TrainingProcess(command, log_path=out / CONSOLE_LOG, cwd=out, env=child_environment(self.base_env))
        try:
            self.process.start()
        except OSError as exc:
            self.status = FAILED
            self.error = InputError(f"cannot start {command[0]}: {exc.strerror or exc}", "check the Python executable")
            raise self.error from None

    def rebuild_curves(self) -> None:
        """Draw the loss curves again from the whole event log (after the scene was closed)."""
        if self.scene is None or self.run_folder is None:
            return
        self.curves = LossCurves(self.scene, prefix=f"BiGL {self.run_folder.name}", run_folder=str(self.run_folder))
        self.curves.adopt_existing()
        self.curves.add_events(EventLogReader(self.run_folder / EVENTS_FILE).read(final=True))

    # ------------------------------------------------------------------------------------- poll
    def poll(self) -> bool:
        """Take in what happened since the last call; True when anything changed."""
        changed = False
        if self.process is not None and self.status == RUNNING:
            code = self.process.poll()
            events = self._events.read(final=code is not None)
            if events:
                changed = True
                self.state.apply_all(events)
                if self.curves is not None:
                    self.curves.add_events(events)
                for event in events:
                    self._log(format_event(event))
            for line in self._console.read_text(final=code is not None):
                changed = True
                self._log(line)
            if code is not None:
                changed = True
                self._training_ended(code)
        if self.evaluation_process is not None and self._evaluation_console is not None:
            code = self.evaluation_process.poll()
            for line in self._evaluation_console.read_text(final=code is not None):
                changed = True
                self._log(f"[evaluate] {line}")
            if code is not None:
                changed = True
                self._evaluation_ended(code)
        return changed

    def _training_ended(self, code: int) -> None:
        stopped = self.process.stopped
        if code == 0 and self.state.done:
            self.status = FINISHED
            bundle = Path(self.state.bundle or BUNDLE_FILE)
            self.bundle = bundle if bundle.is_absolute() else self.run_folder / bundle
            self._log(f"training finished: {self.bundle}")
            self._register()
            if self._evaluation_request is not None:
                data, modality = self._evaluation_request
                self._evaluation_request = None
                self.start_evaluation(data, modality or None)
        elif stopped:
            self.status = STOPPED
            point = resume_point(self.run_folder)
            self._log("training stopped" + (f"; Resume continues from {point}" if point else ""))
        else:
            self.status = FAILED
            message = self.state.error_message or f"bigl train ended with exit status {code}"
            hint = self.state.error_hint or f"see the log above and {self.run_folder / CONSOLE_LOG}"
            self.error = BiGLError(message, hint)
            self._log(f"training failed: {message}")

    def _register(self) -> None:
        if self.models_folder is None or self.bundle is None:
            return
        try:
            self.registered_bundle = register_bundle(self.bundle, self.models_folder, self.run_folder.name)
            self._log(f"model added to the BiGLSegmentation model list: {self.registered_bundle}")
        except (BiGLError, OSError) as exc:
            self._log(f"could not add the model to {self.models_folder}: {exc}")

    # ------------------------------------------------------------------------------- evaluation
    def start_evaluation(
        self,
        data_dir: str | os.PathLike,
        modality: str | None = None,
        *,
        bundle: str | os.PathLike | None = None,
        out_dir: str | os.PathLike | None = None,
    ) -> list[str]:
        """Run ``bigl evaluate`` on a labelled folder (default: the last trained bundle, into ``<run>/evaluation``)."""
        if self.evaluating:
            raise InputError("an evaluation is already running", "wait until it ends")
        bundle = Path(bundle) if bundle is not None else self.bundle
        if bundle is None:
            raise InputError("no trained model to evaluate yet", "finish a training run first, or choose a bundle")
        if not modality:
            modality = (self.settings.target_modality if self.settings else None) or _bundle_modality(bundle)
        if out_dir is None:  # beside the model: <run>/evaluation for a trained one
            out_dir = bundle.parent / EVALUATION_FOLDER
        out = Path(out_dir).expanduser().absolute()
        out.mkdir(parents=True, exist_ok=True)
        device = self.settings.device if self.settings else None
        command = evaluate_command(bundle, Path(data_dir).expanduser(), modality, out, python=self.python, device=device)
        self._evaluation_out = out
        self.evaluation_result = None
        self._evaluation_console = FileTail(out / EVALUATION_LOG, from_end=True)
        self.evaluation_process = TrainingProcess(command, log_path=out / EVALUATION_LOG, cwd=out,
                                                  env=child_environment(self.base_env))  # fmt: skip
        self._log(f"evaluating {bundle.name} on {data_dir} ({modality})")
        self.evaluation_process.start()
        return command

    def _evaluation_ended(self, code: int) -> None:
        process, self.evaluation_process = self.evaluation_process, None
        if code != 0:
            self._log("evaluation stopped" if process.stopped else f"evaluation failed (exit status {code})")
            return
        try:
            self.evaluation_result = read_summary(self._evaluation_out)
        except BiGLError as exc:
            self._log(f"evaluation result unreadable: {exc}")
            return
        if self.scene is not None:
            self.evaluation_table = evaluation_table_node(self.scene, self.evaluation_result, node=self.evaluation_table)
        self._log(f"evaluation done: {self.evaluation_result.get('n_cases')} case(s), {self._evaluation_out}")

    # ------------------------------------------------------------------------------------- text
    def _log(self, text: str) -> None:
        for line in text.splitlines() or [""]:
            self.log.append(line)
            if self.on_log is not None:
                self.on_log(line)

    def status_text(self) -> str:
        """One line for the module's status label."""
        if self.stopping:
            return "stopping..."
        if self.status == RUNNING:
            stage = self.state.stages.get(self.state.current_stage or "")
            if stage is None:
                return "starting..."
            text = f"{stage.title}: step {stage.step}/{stage.total or '?'}"
            if stage.eta_s is not None:
                text += f", ETA {format_duration(stage.eta_s)}"
            return text
        if self.evaluating:
            return "evaluating the trained model..."
        if self.status == FINISHED:
            return f"finished: {self.registered_bundle or self.bundle}"
        if self.status == STOPPED:
            return "stopped (Resume continues from the last checkpoint)"
        if self.status == FAILED:
            return f"failed: {self.error.message if self.error else 'see the log'}"
        return "idle"


def _bundle_modality(bundle: Path) -> str:
    from bigl.bundle import read_metadata

    return str(read_metadata(bundle).get("modality", "t2"))
