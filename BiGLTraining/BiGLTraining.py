"""BiGL Training: adapt a brain tumour segmenter to a new MRI modality from 3D Slicer.

The module is a thin Qt layer over :mod:`BiGLTrainingLib` (no Qt there, tested without Slicer):
it fills a :class:`~BiGLTrainingLib.command.TrainingSettings` from the form, runs the dataset
check, starts ``bigl train`` as a separate process through
:class:`~BiGLTrainingLib.logic.TrainingLogic` and polls it from a timer, so Slicer stays
responsive while the two stages (image translator, then adaptation) run.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from pathlib import Path

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

import BiGLSegmentation  # noqa: F401  (importing it makes the core library importable in a source checkout)
from BiGLTrainingLib.logic import TrainingLogic  # noqa: E402

#: Where the form is remembered between sessions (QSettings).
SETTINGS_KEY = "BiGLTraining/LastSettings"
#: Milliseconds between two polls of the training process.
POLL_INTERVAL_MS = 500
LOG_VIEW_LINES = 2000
#: The data folders of the form: role -> settings field (one folder or a list of folders each).
DATA_ROLES = {"source": "source_dir", "target": "target_dir"}

def selectItemData(comboBox, value):
    """Select the combo box item whose data is ``value`` (no change when there is none)."""
    index = comboBox.findData(value)
    if index >= 0:
        comboBox.currentIndex = index


class BiGLTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "BiGL Training"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["BiGLSegmentation"]
        self.parent.contributors = ["The BiGL developers"]
        self.parent.helpText = (
            "Train a BiGL model: a bidirectional image translator between a labelled source modality "
            "(e.g. T1) and an unlabelled target modality (e.g. T2), then a segmenter adapted to the target "
            "with global-to-local adversarial alignment. Choose the folders and a preset, press Check data, "
            "then Start training. The trained model appears in BiGL Segmentation's model list. "
            "See docs/slicer-training.md in the BiGL repository."
        )
        self.parent.acknowledgementText = (
            "Implements He et al., 'Cross-Modality Brain Tumor Segmentation via Bidirectional "
            "Global-to-Local Unsupervised Domain Adaptation'."
        )


class _MainWindowCloseGuard(qt.QObject):
    """Asks before Slicer's main window closes while training runs."""

    def __init__(self, widget):
        qt.QObject.__init__(self)
        self.widget = widget

    def eventFilter(self, watched, event):
        if event.type() == qt.QEvent.Close and not self.widget.confirmStopForQuit():
            event.ignore()
            return True
        return False


class BiGLTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.timer = None
        self.closeGuard = None
        self._presetConfig = None
        self._formFilled = False
        self._shownCharts = set()
        self._errorShown = False

    # ------------------------------------------------------------------------------- setup
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/BiGLTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        from BiGLTrainingLib.command import DEVICE_CHOICES, MODALITY_CHOICES, PRESETS, TRANSLATOR_MODE_CHOICES

        self.logic = BiGLTrainingLogic()
        self.logic.on_log = self.appendLog

        for combo in (self.ui.sourceModalityComboBox, self.ui.targetModalityComboBox):
            for modality in MODALITY_CHOICES:
                combo.addItem(modality.upper(), modality)
        for presetId, (_, label) in PRESETS.items():
            self.ui.presetComboBox.addItem(label, presetId)
        for mode in TRANSLATOR_MODE_CHOICES:
            self.ui.translatorModeComboBox.addItem(mode, mode)
        for device in DEVICE_CHOICES:
            self.ui.deviceComboBox.addItem(device, device)
        self.ui.logTextEdit.setMaximumBlockCount(LOG_VIEW_LINES)
        self.ui.modelsFolderPathLineEdit.currentPath = str(self.modelsFolder())

        self.ui.presetComboBox.currentIndexChanged.connect(self.onPresetChanged)
        self.ui.customConfigPathLineEdit.currentPathChanged.connect(self.onPresetChanged)
        self.ui.outputDirPathLineEdit.currentPathChanged.connect(self.updateButtons)
        for role in DATA_ROLES:
            pathLineEdit, addButton, listWidget, removeButton = self.folderWidgets(role)
            addButton.connect("clicked()", lambda role=role: self.onAddFolder(role))
            removeButton.connect("clicked()", lambda role=role: self.onRemoveFolders(role))
            listWidget.itemSelectionChanged.connect(self.updateFolderButtons)
            pathLineEdit.currentPathChanged.connect(self.updateFolderButtons)
        self.ui.modelsFolderPathLineEdit.currentPathChanged.connect(self.onModelsFolderChanged)
        self.ui.checkDataButton.clicked.connect(self.onCheckData)
        self.ui.startButton.clicked.connect(self.onStart)
        self.ui.stopButton.clicked.connect(self.onStop)
        self.ui.resumeButton.clicked.connect(self.onResume)
        self.ui.showCurvesButton.clicked.connect(self.onShowCurves)
        self.ui.evaluateButton.clicked.connect(self.onEvaluate)

        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.timeout.connect(self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        slicer.app.aboutToQuit.connect(self.onAboutToQuit)
        mainWindow = slicer.util.mainWindow()
        if mainWindow is not None:
            self.closeGuard = _MainWindowCloseGuard(self)
            mainWindow.installEventFilter(self.closeGuard)

        self.restoreForm()
        self.updateFolderButtons()
        self.updateButtons()

    def cleanup(self):
        if self.timer is not None:
            self.timer.stop()
        self.removeObservers()
        slicer.app.aboutToQuit.disconnect(self.onAboutToQuit)
        mainWindow = slicer.util.mainWindow()
        if mainWindow is not None and self.closeGuard is not None:
            mainWindow.removeEventFilter(self.closeGuard)
        if self.logic is not None:
            self.logic.shutdown()

    # ----------------------------------------------------------------------- dependencies
    def ensureDependencies(self):
        """PyTorch (through the PyTorch extension, offered when it is missing) and BiGL's training
        packages, installed after asking (BiGL Segmentation's installer)."""
        from BiGLSegmentation import ensurePythonPackages

        computationBackend = "cpu" if self.ui.deviceComboBox.currentData == "cpu" else None
        return ensurePythonPackages("BiGL Training", computationBackend, training=True).ready

    # ------------------------------------------------------------------------------ form
    @staticmethod
    def modelsFolder():
        """The models folder BiGL Segmentation lists (one setting shared by both modules)."""
        from BiGLSegmentation import modelsFolder

        return modelsFolder()

    @staticmethod
    def segmentationWidget():
        """BiGL Segmentation's widget (created if its panel was never opened), or None."""
        try:
            return slicer.util.getModuleWidget("BiGLSegmentation")
        except (RuntimeError, AttributeError):
            return None

    def onModelsFolderChanged(self, path):
        """One models folder for both modules, kept by BiGL Segmentation's logic (its panel shows the
        change when it is next entered)."""
        from BiGLSegmentation import BiGLSegmentationLogic

        if not path:
            return
        BiGLSegmentationLogic().setModelsFolder(path)
        self.logic.models_folder = Path(path)

    def presetId(self):
        return self.ui.presetComboBox.currentData

    def loadPresetConfig(self):
        """The chosen preset's config, or None (with the reason in the note) when it cannot be read yet."""
        self._presetConfig = None
        if self.presetId() == "custom" and not self.ui.customConfigPathLineEdit.currentPath:
            self.ui.presetNoteLabel.text = "Choose a JSON config file."
            return None
        try:
            self._presetConfig = self.logic.preset_config(self.formSettings())
        except ImportError:
            self.ui.presetNoteLabel.text = "The preset's values are shown once BiGL's packages are installed (Check data)."
            return None
        except Exception as exc:  # a broken custom config: say why, keep the form
            self.ui.presetNoteLabel.text = f"Cannot read the config: {exc}"
            return None
        self.ui.presetNoteLabel.text = self.presetNote(self._presetConfig)
        return self._presetConfig

    def onPresetChanged(self, *_):
        """Show the chosen preset's values in the form; the data choices stay as they are."""
        self.ui.customConfigPathLineEdit.setEnabled(self.presetId() == "custom")
        config = self.loadPresetConfig()
        if config is not None:
            self.fillFromConfig(config)

    def fillFromConfig(self, config):
        from BiGLTrainingLib.command import TrainingSettings

        current = self.formSettings()
        shown = TrainingSettings.from_config(config)
        for name in ("source_dir", "target_dir", "source_modality", "target_modality", "exclude", "target_exclude"):
            value = getattr(current, name)
            if value:
                setattr(shown, name, value)
        self.fillForm(shown)

    def ensurePresetLoaded(self):
        """Before a check or a run: the preset read, and the form filled if it never was."""
        if self._presetConfig is None and self.loadPresetConfig() is not None and not self._formFilled:
            self.fillFromConfig(self._presetConfig)
        return self._presetConfig is not None

    @staticmethod
    def presetNote(config):
        notes = []
        for section, title in (("translator_training", "translator"), ("adapt", "adaptation")):
            epochs = config[section].get("epochs")
            if epochs is not None:
                notes.append(f"this config runs the {title} for {epochs} epochs; setting its iterations replaces that")
        device = config["run"]["device"]
        notes.append(f"device in the config: {device}")
        return "; ".join(notes)

    def fillForm(self, settings):
        from BiGLTrainingLib.command import HYPER_PARAMETERS

        ui = self.ui
        for role, name in DATA_ROLES.items():
            if getattr(settings, name):
                self.setFolders(role, getattr(settings, name))
        if settings.source_modality:
            selectItemData(ui.sourceModalityComboBox, settings.source_modality)
        if settings.target_modality:
            selectItemData(ui.targetModalityComboBox, settings.target_modality)
        for name in HYPER_PARAMETERS:
            value = getattr(settings, name)
            if value is not None:
                self.setFieldValue(name, value)
        if settings.device:
            selectItemData(ui.deviceComboBox, settings.device.split(":")[0])
        ui.gpusSpinBox.value = max(1, int(settings.gpus or 1))
        if settings.adapt_iterations is not None:
            self._formFilled = True

    def formSettings(self):
        """The form as TrainingSettings; values equal to the preset's are dropped from the command later.

        Until the form was filled (from the preset or the last session) its hyper-parameter fields hold
        placeholders, and the preset's own values are used instead.
        """
        from BiGLTrainingLib.command import HYPER_PARAMETERS, TrainingSettings

        ui = self.ui
        evaluationDir = ui.evaluationDirPathLineEdit.currentPath
        settings = TrainingSettings(
            output_dir=ui.outputDirPathLineEdit.currentPath,
            preset=self.presetId() or "cpu",
            custom_config=ui.customConfigPathLineEdit.currentPath,
            source_dir=self.chosenFolders("source"),
            source_modality=ui.sourceModalityComboBox.currentData,
            target_dir=self.chosenFolders("target"),
            target_modality=ui.targetModalityComboBox.currentData,
            device=ui.deviceComboBox.currentData,
            gpus=ui.gpusSpinBox.value,
            extra_overrides=self.extraOverrides(),
            evaluation_dir=(evaluationDir or None) if ui.evaluateAfterTrainingCheckBox.checked else None,
        )
        if not self._formFilled:
            return settings
        for name in HYPER_PARAMETERS:
            setattr(settings, name, self.fieldValue(name))
        return settings

    def fieldWidget(self, name):
        from BiGLTrainingLib.command import FIELDS

        return getattr(self.ui, FIELDS[name].widget)

    def fieldValue(self, name):
        """A Parameters field as the form shows it (BiGLTrainingLib.command.FIELDS says which widget)."""
        from BiGLTrainingLib.command import CHOICE, FIELDS, SWITCH

        widget, kind = self.fieldWidget(name), FIELDS[name].kind
        if kind == SWITCH:
            return widget.checked
        if kind == CHOICE:
            return widget.currentData
        return widget.value

    def setFieldValue(self, name, value):
        from BiGLTrainingLib.command import CHOICE, FIELDS, SWITCH

        widget, kind = self.fieldWidget(name), FIELDS[name].kind
        if kind == SWITCH:
            widget.checked = bool(value)
        elif kind == CHOICE:
            selectItemData(widget, value)
        else:
            widget.value = value

    # ------------------------------------------------------------------------ data folders
    def folderWidgets(self, role):
        """(path field, Add folder button, folder list, Remove button) of the source or target data."""
        ui = self.ui
        if role == "source":
            return ui.sourceDirPathLineEdit, ui.sourceDirAddButton, ui.sourceDirsListWidget, ui.sourceDirRemoveButton
        return ui.targetDirPathLineEdit, ui.targetDirAddButton, ui.targetDirsListWidget, ui.targetDirRemoveButton

    def listedFolders(self, role):
        listWidget = self.folderWidgets(role)[2]
        return [listWidget.item(row).text() for row in range(listWidget.count)]

    def chosenFolders(self, role):
        """The role's data setting: the listed folders and the one in the path field if not added yet
        (None, one folder as a string, or a list)."""
        from BiGLTrainingLib.command import folder_value

        return folder_value(self.listedFolders(role) + [self.folderWidgets(role)[0].currentPath])

    def setFolders(self, role, folders):
        """Show ``folders`` (one folder or a list) in the role's list; the path field is emptied."""
        from BiGLTrainingLib.command import folder_list, folder_value

        pathLineEdit, _, listWidget, _ = self.folderWidgets(role)
        listWidget.clear()
        for folder in folder_list(folder_value(folders)):
            listWidget.addItem(folder)
        pathLineEdit.currentPath = ""
        self.updateFolderButtons()

    def onAddFolder(self, role):
        path = self.folderWidgets(role)[0].currentPath
        if path:
            self.setFolders(role, self.listedFolders(role) + [path])

    def onRemoveFolders(self, role):
        listWidget = self.folderWidgets(role)[2]
        for item in listWidget.selectedItems():
            listWidget.takeItem(listWidget.row(item))
        self.updateFolderButtons()

    def updateFolderButtons(self, *_):
        for role in DATA_ROLES:
            pathLineEdit, addButton, listWidget, removeButton = self.folderWidgets(role)
            addButton.enabled = bool(pathLineEdit.currentPath)
            removeButton.enabled = len(listWidget.selectedItems()) > 0

    def extraOverrides(self):
        """The extra key=value overrides; quotes group a value with spaces (data.source_dir="/a b")."""
        text = self.ui.extraOverridesLineEdit.text
        try:
            return shlex.split(text)
        except ValueError:  # an unbalanced quote: take the words as they are
            return text.split()

    def saveForm(self):
        """Keep the form in the scene's parameter node (saved with the scene) and in QSettings (the next session's start)."""
        from BiGLTrainingLib.parameters import EVALUATION_DATA

        settings = self.formSettings()
        evaluationData = self.ui.evaluationDirPathLineEdit.currentPath
        self.logic.save_form(settings, evaluationData)
        values = settings.to_dict()
        values[EVALUATION_DATA] = evaluationData
        qt.QSettings().setValue(SETTINGS_KEY, json.dumps(values))

    def restoreForm(self):
        """The form of the scene's parameter node, else as it was last used (or the CPU preset's values the first time)."""
        from BiGLTrainingLib.parameters import form_from_values

        stored = self.logic.saved_form()
        if stored is not None:
            settings, evaluationData = stored
        else:
            values = {}
            saved = qt.QSettings().value(SETTINGS_KEY)
            if saved:
                try:
                    values = json.loads(saved)
                except ValueError:
                    values = {}
            settings, evaluationData = form_from_values(values)
        self.ui.presetComboBox.blockSignals(True)
        self.ui.presetComboBox.currentIndex = max(0, self.ui.presetComboBox.findData(settings.preset))
        self.ui.presetComboBox.blockSignals(False)
        self.ui.customConfigPathLineEdit.setEnabled(settings.preset == "custom")
        self.ui.customConfigPathLineEdit.currentPath = settings.custom_config or ""
        self.ui.outputDirPathLineEdit.currentPath = settings.output_dir or ""
        self.ui.evaluationDirPathLineEdit.currentPath = evaluationData
        self.ui.evaluateAfterTrainingCheckBox.checked = bool(settings.evaluation_dir)
        self.ui.extraOverridesLineEdit.text = shlex.join(settings.extra_overrides)
        config = self.loadPresetConfig()
        if settings.adapt_iterations is None and config is not None:
            self.fillFromConfig(config)
        self.fillForm(settings)  # only the fields the last session set

    # --------------------------------------------------------------------------- actions
    def onCheckData(self):
        if not self.ensureDependencies():
            return
        self.ensurePresetLoaded()
        from bigl.errors import BiGLError

        with slicer.util.WaitCursor():
            try:
                report = self.logic.check_data(self.formSettings())
            except BiGLError as exc:
                self.ui.dataReportTextEdit.setPlainText(f"ERROR: {exc}")
                return
        self.ui.dataReportTextEdit.setPlainText(report.as_text())

    def onStart(self):
        self._startRun(resume=False)

    def onResume(self):
        self._startRun(resume=True)

    def _startRun(self, resume):
        if not self.ensureDependencies():
            return
        self.ensurePresetLoaded()
        from bigl.errors import BiGLError

        settings = self.formSettings()
        self.saveForm()
        modelsFolder = self.ui.modelsFolderPathLineEdit.currentPath
        self.logic.models_folder = Path(modelsFolder) if modelsFolder and self.ui.registerModelCheckBox.checked else None
        self.ui.logTextEdit.clear()
        self._shownCharts = set()
        self._errorShown = False
        try:
            with slicer.util.WaitCursor():
                if resume:
                    self.logic.resume(settings)
                else:
                    self.logic.start(settings)
        except BiGLError as exc:
            slicer.util.errorDisplay(str(exc), windowTitle="BiGL Training")
            self.updateButtons()
            return
        self.timer.start()
        self.updateButtons()
        self.updateProgress()

    def onStop(self):
        from BiGLTrainingLib.logic import resume_point

        if not self.logic.busy:
            return
        point = resume_point(self.logic.run_folder) if self.logic.run_folder else None
        question = "Stop training?" + (f" Resume will continue from {point}." if point else "")
        if not slicer.app.testingEnabled() and not slicer.util.confirmYesNoDisplay(question):
            return
        self.logic.request_stop()  # the timer's polls see the tree go (and kill it after a timeout)
        self.updateProgress()
        self.updateButtons()

    def onEvaluate(self):
        from bigl.errors import BiGLError

        data = self.ui.evaluationDirPathLineEdit.currentPath
        if not data:
            slicer.util.errorDisplay("Choose the labelled evaluation data folder first.")
            return
        try:
            self.logic.start_evaluation(data, self.ui.targetModalityComboBox.currentData, bundle=self.trainedBundle())
        except BiGLError as exc:
            slicer.util.errorDisplay(str(exc), windowTitle="BiGL Training")
            return
        self.timer.start()
        self.updateButtons()

    def trainedBundle(self):
        """The model of the last finished run, else the one in the output folder, else None."""
        from bigl.runfolder import BUNDLE_FILE

        if self.logic is not None and self.logic.bundle is not None:
            return self.logic.bundle
        output = self.ui.outputDirPathLineEdit.currentPath
        candidate = Path(output) / BUNDLE_FILE if output else None
        return candidate if candidate is not None and candidate.is_file() else None

    def onShowCurves(self):
        curves = self.logic.curves
        if curves is None:
            return
        stage = self.logic.state.current_stage or (curves.stages[-1] if curves.stages else None)
        chart = curves.chart_node(stage) if stage else None
        if chart is not None:
            slicer.modules.plots.logic().ShowChartInLayout(chart)

    # ---------------------------------------------------------------------------- polling
    def onTimer(self):
        if self.logic.poll():
            self.updateProgress()
            self.showNewCharts()
        if not self.logic.busy:
            self.timer.stop()
            self.onRunEnded()
        self.updateButtons()

    def showNewCharts(self):
        stage = self.logic.state.current_stage
        if self.logic.curves is None or not stage or stage in self._shownCharts:
            return
        chart = self.logic.curves.chart_node(stage)
        if chart is not None:
            self._shownCharts.add(stage)
            slicer.modules.plots.logic().ShowChartInLayout(chart)

    def onRunEnded(self):
        from BiGLTrainingLib.logic import FAILED, FINISHED

        self.updateProgress()
        if self.logic.evaluation_table is not None:
            self.ui.evaluationTableView.setMRMLTableNode(self.logic.evaluation_table)
        if self.logic.status == FINISHED and self.logic.registered_bundle is not None:
            self.refreshSegmentationModels()
        if self.logic.status == FAILED and self.logic.error is not None and not self._errorShown:
            self._errorShown = True
            if not slicer.app.testingEnabled():
                slicer.util.errorDisplay(str(self.logic.error), windowTitle="BiGL Training failed")

    def refreshSegmentationModels(self):
        """Let an open BiGL Segmentation panel list (and select) the new model."""
        segmentationWidget = self.segmentationWidget()
        if segmentationWidget is not None:
            segmentationWidget.refreshModels(select=str(self.logic.registered_bundle))

    def appendLog(self, line):
        self.ui.logTextEdit.appendPlainText(line)

    def updateProgress(self):
        from bigl.runplan import format_duration
        from BiGLTrainingLib.eventlog import format_losses

        state = self.logic.state
        for stage, bar in (("translator", self.ui.translatorProgressBar), ("adapt", self.ui.adaptProgressBar)):
            progress = state.stages.get(stage)
            if progress is None:
                continue
            bar.value = int(round(100 * progress.fraction))
            text = f"%p%  {progress.step}/{progress.total or '?'}"
            if progress.status == "running" and progress.eta_s is not None:
                text += f"  ETA {format_duration(progress.eta_s)}"
            bar.format = text
        current = state.stages.get(state.current_stage or "")
        self.ui.lossesLabel.text = format_losses(current.losses) if current is not None else ""
        self.ui.statusLabel.text = self.logic.status_text()

    def updateButtons(self, *_):
        from BiGLTrainingLib.logic import resume_point

        busy = self.logic is not None and self.logic.busy
        output = self.ui.outputDirPathLineEdit.currentPath
        point = resume_point(output) if output and not busy else None
        self.ui.startButton.enabled = not busy
        self.ui.stopButton.enabled = busy and not self.logic.stopping
        self.ui.resumeButton.enabled = point is not None
        self.ui.resumeButton.toolTip = f"Continue the run in the output folder from {point}" if point else "No stopped run in the output folder"
        self.ui.checkDataButton.enabled = not busy
        self.ui.evaluateButton.enabled = not busy and self.trainedBundle() is not None
        for section in (self.ui.dataCollapsibleButton, self.ui.parametersCollapsibleButton):
            section.enabled = not busy

    # ------------------------------------------------------------------ closing while busy
    def confirmStopForQuit(self):
        """True when Slicer may quit: nothing runs, or the user agreed to stop it."""
        if self.logic is None or not self.logic.busy:
            return True
        if not slicer.util.confirmYesNoDisplay(
            "BiGL training is still running. Stop it and quit Slicer?\n"
            "(The run can be resumed later from its last checkpoint.)"
        ):
            return False
        self.logic.shutdown()
        return True

    def onAboutToQuit(self):
        if self.logic is not None:
            self.logic.shutdown()

    def onSceneStartClose(self, caller, event):
        if self.logic is None or not self.logic.busy or slicer.app.testingEnabled():
            return
        if slicer.util.confirmYesNoDisplay(
            "BiGL training is running. Stop it? (No: it keeps running and its loss curves are "
            "drawn again in the new scene.)"
        ):
            self.logic.request_stop()

    def onSceneEndImport(self, caller, event):
        """A loaded scene that holds a training form brings it back (not while a run uses the form)."""
        if self.logic is not None and not self.logic.busy and self.logic.saved_form() is not None:
            self.restoreForm()
            self.updateFolderButtons()
            self.updateButtons()

    def onSceneEndClose(self, caller, event):
        if self.logic is not None and self.logic.busy:
            self.logic.rebuild_curves()
            self._shownCharts = set()


class BiGLTrainingLogic(ScriptedLoadableModuleLogic, TrainingLogic):
    """The module logic, usable from a script without the panel
    (``BiGLTraining.BiGLTrainingLogic().start(settings)``): :class:`BiGLTrainingLib.logic.TrainingLogic`
    on Slicer's scene, running ``bigl`` with PythonSlicer in Slicer's startup environment, and
    registering finished models in BiGL Segmentation's models folder (or ``models_folder``)."""

    def __init__(self, models_folder=None):
        from BiGLSegmentation import modelsFolder
        from BiGLSegmentationLib.logic import python_executable

        ScriptedLoadableModuleLogic.__init__(self)
        TrainingLogic.__init__(
            self,
            slicer.mrmlScene,
            python=python_executable(),
            env=slicer.util.startupEnvironment(),
            models_folder=models_folder or modelsFolder(),
        )


class BiGLTrainingTest(ScriptedLoadableModuleTest):
    """Smoke training on generated phantoms inside Slicer: start, follow, stop, resume, register.

    Runs a few minutes on a CPU. In Slicer: enable Developer mode (Edit > Application Settings >
    Developer), open the module and press "Reload and Test", or type
    ``slicer.selfTests["BiGLTraining"]()`` in the Python console (docs/slicer-training.md).
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_widget_builds()
        self.setUp()
        self.test_train_stop_resume_register()

    def _packagesInstalled(self):
        from BiGLSegmentationLib.dependencies import ensure_dependencies

        report = ensure_dependencies(confirm=lambda question: False, testing=True, training=True)  # only looks
        if not report.ready:
            self.delayDisplay(f"Skipped: BiGL's packages are not installed in this Slicer (missing: "
                              f"{', '.join(report.missing)}); press Check data in the module once to install them")
        return report.ready

    def _workFolder(self):
        folder = Path(slicer.app.temporaryPath) / "BiGLTrainingSelfTest"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def test_widget_builds(self):
        """The panel builds, its names resolve, the data check reports phantoms as ready, and several
        source folders (added, pending in the path field, removed) are checked as one data set."""
        if not self._packagesInstalled():
            return
        from bigl.data.phantoms import write_cohort
        from BiGLTrainingLib.command import TrainingSettings

        folder = self._workFolder()
        cases, more = str(folder / "cases"), str(folder / "more")
        write_cohort(folder / "cases", cases=3, size=48, modalities=("t1", "t2"))
        write_cohort(folder / "more", cases=2, size=48, seed=1, modalities=("t1", "t2"), prefix="More")
        slicer.util.selectModule("BiGLTraining")
        widget = slicer.modules.bigltraining.widgetRepresentation().self()
        widget.ui.presetComboBox.currentIndex = widget.ui.presetComboBox.findData("cpu")  # refills the form
        widget.setFolders("source", [])  # whatever the last session left
        widget.setFolders("target", [])
        widget.ui.sourceDirPathLineEdit.currentPath = cases
        widget.ui.targetDirPathLineEdit.currentPath = cases
        widget.ui.sourceModalityComboBox.currentIndex = widget.ui.sourceModalityComboBox.findData("t1")
        widget.ui.targetModalityComboBox.currentIndex = widget.ui.targetModalityComboBox.findData("t2")
        self.assertEqual(widget.formSettings().source_dir, cases)  # one folder, not added: a plain string
        widget.onCheckData()
        report = widget.ui.dataReportTextEdit.toPlainText()
        self.assertIn("ready to train", report, report)
        self.assertIn("3 usable", report)

        widget.setFolders("source", [])  # (filling the form from the preset moves a pending path into the list)
        widget.ui.sourceDirPathLineEdit.currentPath = cases
        self.assertTrue(widget.ui.sourceDirAddButton.enabled, "Add folder stays disabled with a path in the field")
        widget.ui.sourceDirAddButton.click()
        self.assertEqual(widget.listedFolders("source"), [cases])
        self.assertEqual(widget.ui.sourceDirPathLineEdit.currentPath, "")
        widget.ui.sourceDirPathLineEdit.currentPath = more  # used without pressing Add
        self.assertEqual(widget.formSettings().source_dir, [cases, more])
        widget.onCheckData()
        report = widget.ui.dataReportTextEdit.toPlainText()
        self.assertIn("ready to train", report, report)
        self.assertIn("in all 2 folders", report)
        self.assertIn("5 usable", report)
        saved = TrainingSettings.from_dict(json.loads(json.dumps(widget.formSettings().to_dict())))
        widget.setFolders("source", [])
        widget.fillForm(saved)  # what restoring the form does
        self.assertEqual(widget.listedFolders("source"), [cases, more])
        widget.ui.sourceDirsListWidget.setCurrentRow(0)
        widget.ui.sourceDirRemoveButton.click()
        self.assertEqual(widget.formSettings().source_dir, more)
        self.delayDisplay("Widget, data check and several folders OK")

    def test_train_stop_resume_register(self):
        if not self._packagesInstalled():
            return
        from bigl.data.phantoms import write_cohort
        from BiGLTrainingLib.command import TrainingSettings
        from BiGLTrainingLib.logic import FINISHED, STOPPED

        folder = self._workFolder()
        write_cohort(folder / "cases", cases=3, size=48, modalities=("t1", "t2"))
        logic = BiGLTrainingLogic(models_folder=folder / "models")
        settings = TrainingSettings(
            output_dir=str(folder / "run"),
            preset="custom",
            custom_config="smoke",
            source_dir=str(folder / "cases"),
            source_modality="t1",
            target_dir=str(folder / "cases"),
            target_modality="t2",
            device="cpu",
        )
        logic.start(settings)
        deadline = time.monotonic() + 600
        while logic.state.stages["translator"].checkpoint is None and logic.busy:
            self.assertLess(time.monotonic(), deadline, "no checkpoint within 10 minutes")
            logic.poll()
            slicer.app.processEvents()
            time.sleep(0.2)
        logic.stop()
        self.assertEqual(logic.status, STOPPED, "\n".join(logic.log))
        self.delayDisplay("Stopped after the first checkpoint")

        logic.resume(settings)
        while logic.busy:
            self.assertLess(time.monotonic(), deadline + 600, "training did not finish")
            logic.poll()
            slicer.app.processEvents()
            time.sleep(0.2)
        self.assertEqual(logic.status, FINISHED, "\n".join(logic.log))
        self.assertTrue(logic.registered_bundle is not None and logic.registered_bundle.is_file())
        table = logic.curves.table_node("adapt")
        self.assertGreater(table.GetNumberOfRows(), 0)
        self.assertGreater(logic.curves.chart_node("adapt").GetNumberOfPlotSeriesNodes(), 0)
        self.delayDisplay(f"Trained and registered {logic.registered_bundle.name}")
