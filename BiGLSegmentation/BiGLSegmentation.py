"""BiGL Segmentation: brain tumour sub-regions on a scan of the modality a BiGL model was adapted to.

The module is thin: the work is done by ``BiGLSegmentationLib`` (Qt-free, tested with pytest on a
headless MRML scene) and by the ``bigl`` core library shipped inside the extension, which runs
in a separate process so that Slicer stays responsive.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = Path(__file__).resolve().parent


def _makeCoreLibraryImportable() -> None:
    """The built extension ships ``bigl`` beside this file; a source checkout has it one level up."""
    try:
        import bigl  # noqa: F401
    except ImportError:
        if (MODULE_DIR.parent / "bigl" / "__init__.py").is_file():
            sys.path.insert(0, str(MODULE_DIR.parent))


_makeCoreLibraryImportable()

from BiGLSegmentationLib import dependencies  # noqa: E402
from BiGLSegmentationLib.logic import OutputOptions, SegmentationError, SegmentationLogic, modality_warning  # noqa: E402
from bigl.runfolder import DEVICE_CHOICES  # noqa: E402

try:  # Slicer 5.2+; the logic works without it (it only wraps the parameter node for the GUI)
    from slicer import vtkMRMLScalarVolumeNode
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
except ImportError:  # pragma: no cover - older Slicer
    parameterNodeWrapper = None

SAMPLE_NAME = "BiGLPhantom_t2"
SAMPLE_PATH = MODULE_DIR / "Resources" / "SampleData" / f"{SAMPLE_NAME}.nii.gz"
MODELS_FOLDER_SETTING = "BiGL/ModelsFolder"
IMPORT_MODEL_ITEM = "__import__"
DEVICE_LABELS = {"auto": "Automatic (GPU when available)", "cpu": "CPU", "cuda": "GPU (CUDA)"}
POLL_INTERVAL_MS = 250


#
# BiGLSegmentation
#


class BiGLSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "BiGL Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["The BiGL developers"]
        self.parent.helpText = """
Segments a brain tumour into necrotic / non-enhancing core, oedema and enhancing tumour on a scan
of the modality the model was adapted to (T2 for the default model), with a BiGL model:
Bidirectional Global-to-Local unsupervised domain adaptation, trained on labelled scans of another
modality. Also reports the tumour volumes (WT, TC, ET) and can show the network's position and
channel attention, the class probabilities and the scan translated to the source modality.
<br><br>Models are .safetensors bundles made by <code>bigl train</code>; import them with
"Import model from file...". Inference runs in a separate process (CPU or GPU).
"""
        self.parent.acknowledgementText = """
Implements He et al., "Cross-Modality Brain Tumor Segmentation via Bidirectional Global-to-Local
Unsupervised Domain Adaptation". The sample scan is a synthetic phantom made by BiGL.
"""
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Add the T2 phantom shipped with the module to the Sample Data module (no download needed)."""
    import SampleData

    if not SAMPLE_PATH.is_file():
        logging.warning(f"BiGL sample scan missing: {SAMPLE_PATH}")
        return
    checksum = slicer.util.computeChecksum("SHA256", str(SAMPLE_PATH))
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="BiGL",
        sampleName=SAMPLE_NAME,
        thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / f"{SAMPLE_NAME}.png"),
        uris=SAMPLE_PATH.as_uri(),
        fileNames=f"{SAMPLE_NAME}-{checksum[:12]}.nii.gz",  # a changed phantom gets a new cache entry
        checksums=f"SHA256:{checksum}",
        nodeNames=SAMPLE_NAME,
    )


def ensurePythonPackages(requester: str, computationBackend: str | None = None, *,
                         training: bool = False) -> dependencies.DependencyReport:
    """Install BiGL's packages after asking (used by both BiGL modules): for segmentation ONNX
    Runtime and the core packages, never PyTorch; with ``training`` also PyTorch (through the
    PyTorch extension) and the training packages.

    Offers a restart when Slicer had already loaded an updated package and says what is still
    missing; ``report.ready`` tells whether the caller can go ahead.
    """
    try:
        report = dependencies.ensure_dependencies(
            confirm=lambda question: slicer.util.confirmOkCancelDisplay(question, requester),
            computation_backend=computationBackend,
            requester=requester,
            testing=slicer.app.testingEnabled(),
            training=training,
            extensions_manager=slicer.app.extensionsManagerModel() if training else None,
        )
    except RuntimeError as exc:  # PyTorch cannot be installed without the PyTorch extension
        slicer.util.errorDisplay(str(exc), requester)
        return dependencies.DependencyReport(missing=["torch"])
    if report.restart_recommended and slicer.util.confirmYesNoDisplay(
        "Python packages that Slicer had already loaded were updated. Restart Slicer now?", requester
    ):
        slicer.util.restart()
    if not report.ready:
        slicer.util.warningDisplay("BiGL cannot run without these Python packages: " + ", ".join(report.missing), requester)
    return report


def modelsFolder() -> Path:
    """The user's model folder: the BiGL/ModelsFolder setting, else <Slicer settings folder>/BiGL/models."""
    configured = qt.QSettings().value(MODELS_FOLDER_SETTING)
    if configured:
        return Path(str(configured))
    return Path(slicer.app.slicerUserSettingsFilePath).parent / "BiGL" / "models"


#
# BiGLSegmentationParameterNode
#

if parameterNodeWrapper is not None:

    @parameterNodeWrapper
    class BiGLSegmentationParameterNode:
        """The choices the module remembers (saved with the scene)."""

        inputVolume: vtkMRMLScalarVolumeNode
        modelPath: str = ""  # "" = the first available model (the shipped default)
        device: Annotated[str, Choice(list(DEVICE_CHOICES))] = "auto"
        attentionMaps: bool = False
        probabilityMaps: bool = False
        translatedImage: bool = False
        showSurface: bool = False
        overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5

else:  # pragma: no cover
    BiGLSegmentationParameterNode = None


#
# BiGLSegmentationWidget
#


class BiGLSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._models = []
        self._updatingModels = False
        self._gpuStatus = None
        self._modelName = ""
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.timeout.connect(self.onPollRun)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/BiGLSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = BiGLSegmentationLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateApplyButton)
        self.ui.overlayComboBox.connect("currentIndexChanged(int)", self.onOverlayChanged)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.modelsFolderPathLineEdit.currentPath = str(self.logic.models_folder)
        self.ui.modelsFolderPathLineEdit.connect("currentPathChanged(QString)", self.onModelsFolderChanged)
        self.ui.progressBar.visible = False

        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.cancelRun()
        self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        if self.ui.modelsFolderPathLineEdit.currentPath != str(modelsFolder()):  # changed by BiGL Training
            self.ui.modelsFolderPathLineEdit.currentPath = str(modelsFolder())
        self.initializeParameterNode()
        if self._gpuStatus is None:
            qt.QTimer.singleShot(0, self.updateDeviceChoices)  # imports torch once: after the panel shows

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.cancelRun()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # parameter node ------------------------------------------------------------------------

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume and not firstVolume.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.updateDeviceChoices(checkGpu=False)
            self.selectModel(self._parameterNode.modelPath)
        self.updateApplyButton()

    # models ----------------------------------------------------------------------------------

    def refreshModels(self, select: str | None = None) -> None:
        """Fill the model list: available models, then "Import model from file...".

        Listing reads the bundles' headers only (no PyTorch or safetensors needed), so the list is
        complete before BiGL's Python packages are installed.
        """
        self._models = self.logic.models()
        self._updatingModels = True
        try:
            self.ui.modelComboBox.clear()
            for choice in self._models:
                self.ui.modelComboBox.addItem(choice.label, str(choice.path))
                self.ui.modelComboBox.setItemData(self.ui.modelComboBox.count - 1, choice.tooltip, qt.Qt.ToolTipRole)
            if self._models:
                self.ui.modelComboBox.insertSeparator(self.ui.modelComboBox.count)
            self.ui.modelComboBox.addItem("Import model from file...", IMPORT_MODEL_ITEM)
        finally:
            self._updatingModels = False
        if not self._models:
            self.ui.modelInfoLabel.text = ("No model yet: import a .safetensors bundle made by 'bigl train' "
                                           f"(it is copied to {self.logic.models_folder}).")
        self.selectModel(select if select is not None else (self._parameterNode.modelPath if self._parameterNode else ""))

    def selectModel(self, path: str) -> None:
        from BiGLSegmentationLib.models import find_model

        choice = find_model(self._models, path) or (self._models[0] if self._models else None)
        self._updatingModels = True
        try:
            index = self.ui.modelComboBox.findData(str(choice.path)) if choice else -1
            self.ui.modelComboBox.setCurrentIndex(max(index, 0) if choice else -1)
        finally:
            self._updatingModels = False
        self.showModelInfo(choice)

    def currentModel(self):
        path = self.ui.modelComboBox.currentData
        return next((choice for choice in self._models if str(choice.path) == path), None)

    def showModelInfo(self, choice) -> None:
        if choice is None:
            return
        from bigl.bundle import describe_adaptation

        text = describe_adaptation(choice.metadata)
        volume = self.ui.inputSelector.currentNode()
        warning = modality_warning(volume.GetName(), choice.metadata) if volume else None
        self.ui.modelInfoLabel.text = f"{text}.\n{warning}" if warning else f"{text}."

    def onModelChanged(self, index: int) -> None:
        if self._updatingModels:
            return
        if self.ui.modelComboBox.itemData(index) == IMPORT_MODEL_ITEM:
            self.importModel()
            return
        choice = self.currentModel()
        if self._parameterNode and choice is not None:
            self._parameterNode.modelPath = "" if choice.is_default else str(choice.path)
        self.showModelInfo(choice)

    def importModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), "Import a BiGL model", "", "BiGL model bundle (*.safetensors);;All files (*)"
        )
        imported = None
        if path:
            with slicer.util.tryWithErrorDisplay("This file cannot be used as a BiGL model.", waitCursor=True):
                imported = self.logic.import_model(path)
        self.refreshModels(select=str(imported.path) if imported else None)
        if imported is not None and self._parameterNode:
            self._parameterNode.modelPath = str(imported.path)

    def onModelsFolderChanged(self, path: str) -> None:
        if not path:
            return
        self.logic.setModelsFolder(path)
        self.refreshModels()

    # device ----------------------------------------------------------------------------------

    def updateDeviceChoices(self, checkGpu: bool = True) -> None:
        """Friendly labels for the device choices; GPU greyed out, with the reason, when unusable."""
        combo = self.ui.deviceComboBox
        for index, device in enumerate(DEVICE_CHOICES):
            if index < combo.count:
                combo.setItemText(index, DEVICE_LABELS[device])
        if checkGpu:
            self._gpuStatus = dependencies.gpu_status()
        if self._gpuStatus is None or combo.count < 3:
            return
        gpuIndex = 2
        enabledFlags = qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled
        # QComboBox keeps item flags in this role; 0 greys the item out
        combo.setItemData(gpuIndex, int(enabledFlags) if self._gpuStatus.available else 0, qt.Qt.UserRole - 1)
        reason = f"GPU: {self._gpuStatus.reason}" if self._gpuStatus.available else f"Unavailable: {self._gpuStatus.reason}"
        combo.setItemData(gpuIndex, reason, qt.Qt.ToolTipRole)
        combo.toolTip = f"Where the network runs. {reason}."
        if not self._gpuStatus.available and self._parameterNode and self._parameterNode.device == "cuda":
            self._parameterNode.device = "auto"

    # running ---------------------------------------------------------------------------------

    def updateApplyButton(self, *_) -> None:
        if self._run is not None:
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.toolTip = "Stop the segmentation"
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = "Segment"
        volume = self.ui.inputSelector.currentNode()
        self.ui.applyButton.enabled = volume is not None
        self.ui.applyButton.toolTip = "Segment the tumour in the input volume" if volume else "Select an input volume"
        if volume is not None:
            self.showModelInfo(self.currentModel())

    def onApplyButton(self) -> None:
        if self._run is not None:
            self.cancelRun()
            self.ui.statusLabel.text = "Cancelled."
            return
        with slicer.util.tryWithErrorDisplay("Cannot start the segmentation.", waitCursor=True):
            self.startRun()

    def startRun(self) -> None:
        parameters = self._parameterNode
        volume = parameters.inputVolume
        if volume is None:
            raise ValueError("Select the scan to segment.")
        if not self.ensureDependencies():
            return
        if not self._models:
            self.refreshModels()
        model = self.currentModel()
        if model is None:
            raise ValueError("No model is available. Import a model bundle (.safetensors) with "
                             "'Import model from file...' in the model list.")
        warning = modality_warning(volume.GetName(), model.metadata)
        if warning and not slicer.util.confirmOkCancelDisplay(f"{warning}\n\nSegment anyway?", "BiGL Segmentation"):
            return
        options = OutputOptions(
            attention=parameters.attentionMaps,
            probabilities=parameters.probabilityMaps,
            translated=parameters.translatedImage,
            surface=parameters.showSurface,
        )
        self._run = self.logic.start_segmentation(volume, model.path, device=parameters.device, options=options,
                                                  modality=model.modality if model.modality != "?" else None)
        self._modelName = model.name
        self.ui.progressBar.visible = True
        self.ui.progressBar.setRange(0, 0)  # busy until the first progress event
        self.ui.statusLabel.text = self._run.status.message
        self.updateApplyButton()
        self._timer.start()

    def ensureDependencies(self) -> bool:
        """Install missing packages after asking; False when the run cannot go ahead."""
        report = ensurePythonPackages("BiGL Segmentation", "cpu" if self._parameterNode.device == "cpu" else None)
        if report.installed:
            self._gpuStatus = None
            self.refreshModels()
            self.updateDeviceChoices()
        return report.ready

    def onPollRun(self) -> None:
        if self._run is None:
            self._timer.stop()
            return
        status = self._run.poll()
        fraction = status.fraction
        if fraction is not None:
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = f"{status.message} ({self._run.elapsed_seconds:.0f} s)"
        if not status.running:
            self._timer.stop()
            self.finishRun()

    def finishRun(self) -> None:
        run, self._run = self._run, None
        try:
            with slicer.util.WaitCursor():
                outputs = run.finish(model_name=self._modelName)
        except SegmentationError as exc:
            self.ui.statusLabel.text = "Failed."
            slicer.util.errorDisplay(str(exc), "BiGL Segmentation", detailedText=exc.details or None)
            return
        except Exception as exc:  # a slot must not let errors vanish into the console
            logging.exception("BiGL Segmentation: loading the results failed")
            self.ui.statusLabel.text = "Failed."
            slicer.util.errorDisplay(f"Loading the results failed: {exc}", "BiGL Segmentation")
            return
        finally:
            self.ui.progressBar.visible = False
            self.updateApplyButton()
        self.showOutputs(outputs, run.elapsed_seconds)
        if outputs.warnings:
            slicer.util.warningDisplay("The segmentation finished with warnings:\n\n" + "\n\n".join(outputs.warnings),
                                       "BiGL Segmentation")

    def cancelRun(self) -> None:
        if self._run is not None:
            self._timer.stop()
            self._run.cancel()
            self._run = None
            self.ui.progressBar.visible = False
            self.updateApplyButton()

    # results ---------------------------------------------------------------------------------

    def showOutputs(self, outputs, seconds: float) -> None:
        volumes = {row.key: row.volume_ml for row in outputs.volumes}
        sure = "" if outputs.confidence is None else f" Model confidence {outputs.confidence:.2f}."
        if outputs.contrast_gamma not in (None, 1.0):
            sure += f" Segmented at contrast gamma {outputs.contrast_gamma:g} (the model was unsure of the scan as it is)."
        self.ui.statusLabel.text = (f"Done in {seconds:.0f} s: WT {volumes['WT']:.1f} mL, "
                                    f"TC {volumes['TC']:.1f} mL, ET {volumes['ET']:.1f} mL.{sure}")
        self.ui.volumesTableView.setMRMLTableNode(outputs.volumes_table)
        self.ui.overlayComboBox.blockSignals(True)
        self.ui.overlayComboBox.clear()
        self.ui.overlayComboBox.addItem("None", "")
        for node in outputs.overlays():
            self.ui.overlayComboBox.addItem(node.GetName(), node.GetID())
        self.ui.overlayComboBox.setCurrentIndex(1 if outputs.overlays() else 0)
        self.ui.overlayComboBox.blockSignals(False)
        self.ui.resultsCollapsibleButton.collapsed = False
        display = outputs.segmentation.GetDisplayNode()
        if display is not None:
            display.SetVisibility3D(self._parameterNode.showSurface)
        self.onOverlayChanged()
        if self._parameterNode.showSurface:
            slicer.util.resetThreeDViews()

    def onOverlayChanged(self, *_) -> None:
        nodeId = self.ui.overlayComboBox.currentData
        overlay = slicer.mrmlScene.GetNodeByID(nodeId) if nodeId else None
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        slicer.util.setSliceViewerLayers(
            background=volume if volume is not None else "keep-current",
            foreground=overlay,
            foregroundOpacity=self.ui.opacitySliderWidget.value,
        )

    def onOpacityChanged(self, value: float) -> None:
        slicer.util.setSliceViewerLayers(foregroundOpacity=value)


#
# BiGLSegmentationLogic
#


class BiGLSegmentationLogic(ScriptedLoadableModuleLogic, SegmentationLogic):
    """The module logic: :class:`BiGLSegmentationLib.logic.SegmentationLogic` with the parameter node."""

    def __init__(self, models_folder=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        SegmentationLogic.__init__(self, models_folder or modelsFolder())

    def setModelsFolder(self, path) -> None:
        """Use ``path`` as the models folder and remember it (the setting both BiGL modules read)."""
        qt.QSettings().setValue(MODELS_FOLDER_SETTING, str(path))
        self.models_folder = Path(path)

    def getParameterNode(self):
        node = super().getParameterNode()
        return BiGLSegmentationParameterNode(node) if BiGLSegmentationParameterNode is not None else node


#
# BiGLSegmentationTest
#


class BiGLSegmentationTest(ScriptedLoadableModuleTest):
    """Whole-flow tests inside Slicer: sample phantom -> segment (logic, then GUI) -> check the scene."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentSamplePhantom()
        self.setUp()
        self.test_WidgetSegmentsAndCancels()

    def _loadSample(self):
        import SampleData

        registerSampleData()
        volume = SampleData.downloadSample(SAMPLE_NAME)
        self.assertIsNotNone(volume, "the sample phantom could not be loaded")
        return volume

    def _modelPath(self, logic) -> str:
        """The shipped model, else a tiny untrained one (the flow is tested, not the accuracy)."""
        choices = logic.models()
        if choices:
            return str(choices[0].path)
        from bigl.testing import make_test_bundle

        return str(make_test_bundle(Path(slicer.app.temporaryPath) / "BiGLSelfTest" / "tiny.safetensors"))

    def _checkDependencies(self):
        report = dependencies.ensure_dependencies(
            confirm=lambda question: slicer.util.confirmOkCancelDisplay(question), testing=slicer.app.testingEnabled()
        )
        self.assertTrue(report.ready, "install BiGL's Python packages first (open the module and press Segment "
                                      f"once, outside testing mode); missing: {', '.join(report.missing)}")

    def test_SegmentSamplePhantom(self):
        from BiGLSegmentationLib import scene

        self.delayDisplay("Segmenting the sample phantom with the logic")
        self._checkDependencies()
        volume = self._loadSample()
        logic = BiGLSegmentationLogic()
        model = self._modelPath(logic)
        options = OutputOptions(attention=True, probabilities=True, translated=True, surface=True)
        outputs = logic.segment(volume, model, device="cpu", options=options, timeout=900)

        segmentation = outputs.segmentation.GetSegmentation()
        names = sorted(segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments()))
        self.assertEqual(names, sorted(scene.SEGMENT_NAMES.values()))
        labels = scene.segmentation_to_labels(outputs.segmentation, volume)
        self.assertEqual(labels.shape, scene.grid_shape(volume))
        rows = {row["Region"]: row for row in scene.table_rows(outputs.volumes_table)}
        self.assertEqual(int(rows["WT"]["Voxels"]), int((labels > 0).sum()))
        self.assertEqual(set(outputs.attention), {"position", "channel"})
        reference = scene.ijk_to_ras_matrix(volume)
        for node in outputs.overlays():
            self.assertLess(abs(scene.ijk_to_ras_matrix(node) - reference).max(), 1e-6, node.GetName())

        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        again = logic.segment(volume, model, device="cpu", options=options, timeout=900)
        self.assertEqual(again.segmentation.GetID(), outputs.segmentation.GetID())
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Logic test passed")

    def test_WidgetSegmentsAndCancels(self):
        self.delayDisplay("Segmenting through the module panel")
        self._checkDependencies()
        volume = self._loadSample()
        slicer.util.selectModule("BiGLSegmentation")
        widget = slicer.util.getModuleWidget("BiGLSegmentation")
        model = self._modelPath(widget.logic)
        if not widget.logic.models():  # no shipped model: offer the test model from its folder
            widget.logic.models_folder = Path(model).parent
        widget.refreshModels(select=model)
        widget.ui.inputSelector.setCurrentNode(volume)
        widget.ui.deviceComboBox.setCurrentIndex(1)  # CPU

        widget.ui.applyButton.click()
        self.assertEqual(widget.ui.applyButton.text, "Cancel")
        deadline = time.monotonic() + 900
        while widget._run is not None and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertIsNone(widget._run, "the segmentation did not finish in time")
        self.assertTrue(widget.ui.statusLabel.text.startswith("Done"), widget.ui.statusLabel.text)
        from BiGLSegmentationLib import scene

        segmentation = scene.find_output(volume, scene.ROLE_SEGMENTATION)
        self.assertIsNotNone(segmentation)

        widget.ui.applyButton.click()  # start again, then cancel at once
        widget.ui.applyButton.click()
        self.assertIsNone(widget._run)
        self.assertEqual(widget.ui.applyButton.text, "Segment")
        self.assertEqual(scene.find_output(volume, scene.ROLE_SEGMENTATION).GetID(), segmentation.GetID())
        self.delayDisplay("Widget test passed")
