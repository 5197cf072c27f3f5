"""ONNX export and the ONNX Runtime engine: agreement with PyTorch, no torch on the inference path,
``bigl export`` / ``bigl segment --engine``, and clear errors for unusable ONNX files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from synthetic import synthetic_scan  # noqa: E402

from bigl import onnxengine  # noqa: E402
from bigl.cli import main  # noqa: E402
from bigl.errors import BundleError, ConfigError  # noqa: E402
from bigl.export import export_bundle  # noqa: E402
from bigl.inference import BiGLPredictor  # noqa: E402
from bigl.onnxengine import OnnxPredictor  # noqa: E402
from bigl.prediction import choose_engine, open_predictor, resize_bilinear  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
AFFINE = np.diag([1.0, 1.2, 2.5, 1.0])


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny bundle whose segmentation and attention are not uniform, and its export beside it."""
    from bigl.testing import make_test_bundle

    bundle = make_test_bundle(tmp_path_factory.mktemp("onnx") / "model.safetensors", sharpen=20.0,
                              attention_sharpen=10.0)
    files = export_bundle(bundle)
    assert files == [bundle.with_suffix(".onnx"), bundle.with_name("model.translator.onnx")]
    return bundle


def _both(bundle: Path, **options):
    torch_result = BiGLPredictor.from_path(bundle, device="cpu", batch_size=8, **options).predict(
        synthetic_scan(), AFFINE, probabilities=True, attention=True, translated=True)
    onnx_result = OnnxPredictor.from_path(bundle.with_suffix(".onnx"), device="cpu", batch_size=5, **options).predict(
        synthetic_scan(), AFFINE, probabilities=True, attention=True, translated=True)
    return torch_result, onnx_result


@pytest.mark.parametrize("flip", [False, True], ids=["plain", "flip"])
def test_onnx_runtime_agrees_with_torch(exported, flip):
    expected, got = _both(exported, flip=flip)
    assert len(np.unique(expected.labels)) > 1, "the test model must predict more than one label"
    assert got.labels.shape == expected.labels.shape and got.labels.dtype == np.uint8
    assert (got.labels == expected.labels).mean() >= 0.999
    assert np.abs(got.probabilities - expected.probabilities).max() <= 1e-4
    for kind in ("position", "channel"):
        assert expected.attention[kind].std() > 0.05, kind  # a real map, not a flat one
        assert np.abs(got.attention[kind] - expected.attention[kind]).max() <= 1e-3, kind
    assert np.abs(got.translated - expected.translated).max() <= 1e-3


def test_progress_and_batches(exported):
    predictor = OnnxPredictor.from_path(exported.with_suffix(".onnx"), device="cpu", batch_size=4)
    calls = []
    first = predictor.predict(synthetic_scan(), translated=True, progress=lambda done, total: calls.append((done, total)))
    total = calls[-1][1]
    assert calls[-1][0] == total and total % 2 == 0 and all(b[0] > a[0] for a, b in zip(calls, calls[1:]))
    assert len(calls) == 2 * -(-total // 2 // 4)
    other = OnnxPredictor.from_path(exported.with_suffix(".onnx"), device="cpu", batch_size=1).predict(synthetic_scan())
    assert np.array_equal(first.labels, other.labels)


def test_resize_bilinear_matches_torch():
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    for before, after in ((4, 32), (32, 45), (45, 32), (7, 7)):
        maps = rng.random((3, 2, before, before)).astype(np.float32)
        expected = F.interpolate(torch.from_numpy(maps), size=(after, after), mode="bilinear", align_corners=False)
        assert np.abs(resize_bilinear(maps, (after, after)) - expected.numpy()).max() < 1e-5


def test_export_metadata_and_dynamic_batch(exported):
    import onnxruntime as ort

    model = onnx.load(str(exported.with_suffix(".onnx")))
    props = {entry.key: entry.value for entry in model.metadata_props}
    from bigl.bundle import read_metadata

    assert json.loads(props["bigl"]) == read_metadata(exported)
    info = json.loads(props["bigl_onnx"])
    assert info["graph"] == "segmenter" and info["translator"] == "model.translator.onnx"
    assert info["source_sha256"] == onnxengine.file_digest(exported)
    session = ort.InferenceSession(str(exported.with_suffix(".onnx")), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(onnxengine.SEGMENTER_OUTPUTS)
    assert isinstance(session.get_inputs()[0].shape[0], str)  # dynamic batch
    for batch in (1, 7):
        logits = session.run(["logits"], {"image": np.zeros((batch, 1, 32, 32), np.float32)})[0]
        assert logits.shape == (batch, 4, 32, 32)


def test_the_onnx_path_imports_no_torch(exported, tmp_path):
    """Segment with the CLI in a fresh process where torch cannot even be imported."""
    scan = tmp_path / "case_t2.nii.gz"
    from bigl.data.io import save_volume

    save_volume(scan, synthetic_scan(), AFFINE)
    script = textwrap.dedent(f"""
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, NoTorch())
        from bigl.cli import main
        code = main(["segment", "-i", {str(scan)!r}, "-o", {str(tmp_path / 'seg.nii.gz')!r}, "-m", {str(exported)!r},
                     "--attention-out", {str(tmp_path / 'attention')!r}, "--translated-out",
                     {str(tmp_path / 'translated.nii.gz')!r}, "--probabilities-out", {str(tmp_path / 'p.nii.gz')!r},
                     "--progress", "none"])
        assert code == 0, code
        assert "torch" not in sys.modules and not any(m.startswith("torch.") for m in sys.modules), "torch was imported"
        print("NO TORCH")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NO TORCH" in done.stdout and "ONNX Runtime" in done.stdout
    assert (tmp_path / "seg.nii.gz").is_file() and (tmp_path / "translated.nii.gz").is_file()


def test_importing_bigl_and_the_engine_imports_no_torch():
    script = ("import sys, bigl, bigl.prediction, bigl.onnxengine, bigl.bundle, bigl.cli, bigl.data; "
              "bigl.cli.build_parser(); assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------------------ choosing an engine


def test_auto_prefers_a_current_export(exported, tmp_path):
    assert choose_engine(exported, "auto") == ("onnx", exported.with_suffix(".onnx"))
    assert choose_engine(exported, "torch") == ("torch", exported)
    assert choose_engine(exported.with_suffix(".onnx"), "auto")[0] == "onnx"
    with pytest.raises(ConfigError, match="torch engine"):
        choose_engine(exported.with_suffix(".onnx"), "torch")
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes(exported.read_bytes())
    assert choose_engine(alone, "auto") == ("torch", alone)  # no export beside it
    with pytest.raises(BundleError) as info:
        choose_engine(alone, "onnx")
    assert "no ONNX export" in info.value.message and "bigl export" in info.value.hint


def test_a_stale_export_is_not_used(exported, tmp_path):
    from bigl.bundle import annotate_bundle

    changed = annotate_bundle(exported, tmp_path / "model.safetensors", inference={"flip": True, "postprocess": False})
    (tmp_path / "model.onnx").write_bytes(exported.with_suffix(".onnx").read_bytes())
    assert choose_engine(changed, "auto") == ("torch", changed)
    with pytest.raises(BundleError, match="another version"):
        choose_engine(changed, "onnx")


def test_cli_export_and_segment_with_each_engine(exported, tmp_path, capsys):
    bundle = tmp_path / "m.safetensors"
    bundle.write_bytes(exported.read_bytes())
    assert main(["export", str(bundle), "--out", str(tmp_path / "out" / "net.onnx")]) == 0
    out = capsys.readouterr().out
    assert "net.onnx" in out and "net.translator.onnx" in out and "reproduces PyTorch" in out
    from bigl.data.io import load_volume, save_volume

    scan = save_volume(tmp_path / "case_t2.nii.gz", synthetic_scan(), AFFINE)
    labels = {}
    for engine, model in (("torch", bundle), ("onnx", tmp_path / "out" / "net.onnx")):
        target = tmp_path / f"{engine}.nii.gz"
        assert main(["segment", "-i", str(scan), "-o", str(target), "-m", str(model), "--engine", engine,
                     "--progress", "none"]) == 0
        assert ("ONNX Runtime" if engine == "onnx" else "PyTorch") in capsys.readouterr().out
        labels[engine] = load_volume(target, kind="labels").data
    assert (labels["torch"] == labels["onnx"]).mean() >= 0.999


def test_segment_never_overwrites_the_export(exported, tmp_path, capsys):
    from bigl.data.io import save_volume

    scan = save_volume(tmp_path / "case_t2.nii.gz", synthetic_scan(), AFFINE)
    before = exported.with_suffix(".onnx").read_bytes()
    code = main(["segment", "-i", str(scan), "-o", str(exported.with_name("model.translator.onnx.nii.gz")),
                 "-m", str(exported), "--progress", "none"])
    assert code == 0  # a NIfTI name beside the model is fine, the model files are untouched
    assert exported.with_suffix(".onnx").read_bytes() == before


# ------------------------------------------------------------------------------------ bad files


def _error(path: Path, **options) -> BundleError:
    with pytest.raises((BundleError, ConfigError)) as info:
        OnnxPredictor.from_path(path, device="cpu", **options)
    assert "Traceback" not in str(info.value) and "ONNXRuntimeError" not in str(info.value)
    return info.value


def test_not_an_onnx_file(tmp_path, exported):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a model at all" * 10)
    assert "not a readable ONNX model" in _error(junk).message
    bundle_as_onnx = tmp_path / "bundle.onnx"
    bundle_as_onnx.write_bytes(exported.read_bytes())
    assert "safetensors" in _error(bundle_as_onnx).message
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert "empty" in _error(empty).message
    assert "not found" in _error(tmp_path / "missing.onnx").message


def test_an_onnx_file_that_is_not_a_bigl_export(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["image"], ["logits"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, 32, 32])])
    path = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    error = _error(path)
    assert "not a BiGL export" in error.message and "bigl export" in error.hint


def _edited(exported: Path, tmp_path: Path, edit) -> Path:
    model = onnx.load(str(exported.with_suffix(".onnx")))
    edit(model)
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    return path


def test_graph_inputs_that_do_not_match_the_metadata(exported, tmp_path):
    def resize_input(model):
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[2].dim_value = dims[3].dim_value = 64

    error = _error(_edited(exported, tmp_path, resize_input))
    assert "does not match its BiGL metadata" in error.message and "[batch, 1, 32, 32]" in error.message

    def rename_input(model):
        model.graph.input[0].name = "x"
        for node in model.graph.node:
            node.input[:] = ["x" if name == "image" else name for name in node.input]

    assert "input 'x'" in _error(_edited(exported, tmp_path, rename_input)).message


def test_an_opset_onnx_runtime_cannot_run(exported, tmp_path):
    def future_opset(model):
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = 99

    error = _error(_edited(exported, tmp_path, future_opset))
    assert "opset 99" in error.message and "cannot run" in error.message
    assert "--opset 17" in error.hint and "upgrade" in error.hint.lower()


def test_the_translator_file_is_not_a_segmenter(exported):
    error = _error(exported.with_name("model.translator.onnx"))
    assert "translator" in error.message and "model.onnx" in error.hint


def test_a_newer_export_format(exported, tmp_path):
    def newer(model):
        for entry in model.metadata_props:
            if entry.key == "bigl_onnx":
                entry.value = json.dumps({**json.loads(entry.value), "format_version": 99, "bigl_version": "9.0"})

    error = _error(_edited(exported, tmp_path, newer))
    assert "newer BiGL" in error.message and "upgrade" in error.hint


def test_onnxruntime_missing(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime" or name.startswith("onnxruntime."):
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(ConfigError) as info:
        onnxengine.require_onnxruntime()
    assert "ONNX Runtime is not installed" in info.value.message and "pip install onnxruntime" in info.value.hint


def test_cuda_without_the_cuda_provider(exported):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ConfigError) as info:
        open_predictor(exported, engine="onnx", device="cuda")
    assert "onnxruntime-gpu" in info.value.hint
