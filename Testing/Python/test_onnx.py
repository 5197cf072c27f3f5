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

from bigl import onnxengine, tensorfile  # noqa: E402
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


@pytest.mark.parametrize("options", [{}, {"flip": True}, {"invert_view": True}, {"refine_edges": True},
                                     {"contrast_search": True}],
                         ids=["plain", "flip", "invert-view", "refine-edges", "contrast-search"])
def test_onnx_runtime_agrees_with_torch(exported, options):
    expected, got = _both(exported, **options)
    assert len(np.unique(expected.labels)) > 1, "the test model must predict more than one label"
    assert got.labels.shape == expected.labels.shape and got.labels.dtype == np.uint8
    assert (got.labels == expected.labels).mean() >= 0.999
    assert np.abs(got.probabilities - expected.probabilities).max() <= 1e-4
    for kind in ("position", "channel"):
        assert expected.attention[kind].std() > 0.05, kind  # a real map, not a flat one
        assert np.abs(got.attention[kind] - expected.attention[kind]).max() <= 1e-3, kind
    assert np.abs(got.translated - expected.translated).max() <= 1e-3
    # the tumour confidence (of the plain pass, with or without test-time views) is the engines' alike
    assert expected.confidence is not None and got.confidence == pytest.approx(expected.confidence, abs=1e-4)
    assert got.contrast_gamma == expected.contrast_gamma  # the same view chosen (None without the search)


def test_both_engines_normalise_as_the_bundle_says(exported, tmp_path):
    """A bundle trained with preprocessing.intensity=zscore is segmented with that normalisation by
    both engines: they agree, and the same weights give other scores than with the percentile scale."""
    from bigl.bundle import load_bundle
    from bigl.testing import make_test_bundle

    bundle = make_test_bundle(tmp_path / "zscore.safetensors", sharpen=20.0, attention_sharpen=10.0, intensity="zscore")
    assert load_bundle(bundle).preprocessing.intensity == "zscore"
    export_bundle(bundle)
    expected, got = _both(bundle)
    assert (got.labels == expected.labels).mean() >= 0.999
    assert np.abs(got.probabilities - expected.probabilities).max() <= 1e-4
    percentile, _ = _both(exported)
    assert np.abs(percentile.probabilities - expected.probabilities).max() > 100 * 1e-4


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
    assert info["source_data_sha256"] == tensorfile.data_digest(exported)
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
    from bigl.testing import make_test_bundle

    retrained = make_test_bundle(tmp_path / "model.safetensors", seed=1, sharpen=20.0, attention_sharpen=10.0)
    for name in ("model.onnx", "model.translator.onnx"):
        (tmp_path / name).write_bytes(exported.with_name(name).read_bytes())
    assert choose_engine(retrained, "auto") == ("torch", retrained)
    with pytest.raises(BundleError, match="another version"):
        choose_engine(retrained, "onnx")


def test_metadata_changes_keep_the_export(exported, tmp_path):
    """annotate_bundle changes only the metadata: the export stays current, and running it through
    the bundle uses the bundle's metadata as it is now (here: its inference defaults)."""
    from bigl.bundle import annotate_bundle

    changed = annotate_bundle(exported, tmp_path / "model.safetensors", inference={"flip": True, "postprocess": False},
                              description="annotated after the export")
    for name in ("model.onnx", "model.translator.onnx"):
        (tmp_path / name).write_bytes(exported.with_name(name).read_bytes())
    assert choose_engine(changed, "auto") == ("onnx", tmp_path / "model.onnx")
    predictor = open_predictor(changed, device="cpu")
    assert predictor.engine == "onnx" and predictor.flip is True
    assert predictor.metadata["description"] == "annotated after the export"
    assert OnnxPredictor.from_path(tmp_path / "model.onnx", device="cpu").flip is False  # the export's own copy


def test_an_export_of_a_file_without_a_recorded_digest(exported, tmp_path):
    """Bundles written without bigl_sha256 get the digest of their tensor data computed the same way."""
    import struct

    raw = exported.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    recorded = header["__metadata__"].pop("bigl_sha256")
    header["__metadata__"].pop("bigl_header_sha256")
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    old = tmp_path / "old.safetensors"
    old.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length:])
    assert tensorfile.data_digest(old) == recorded == tensorfile.data_digest(exported)


def test_a_missing_translator_file(exported, tmp_path, monkeypatch):
    from bigl import prediction

    bundle = tmp_path / "model.safetensors"
    bundle.write_bytes(exported.read_bytes())
    (tmp_path / "model.onnx").write_bytes(exported.with_suffix(".onnx").read_bytes())  # no translator file
    problem = onnxengine.export_problem(tmp_path / "model.onnx", bundle)
    assert problem is not None and "model.translator.onnx" in problem and "missing" in problem
    # labels only: the export is fine; the translated image: PyTorch when it is installed
    assert choose_engine(bundle, "auto") == ("onnx", tmp_path / "model.onnx")
    assert choose_engine(bundle, "auto", translated=True) == ("torch", bundle)
    with pytest.raises(BundleError) as info:
        choose_engine(bundle, "onnx", translated=True)
    assert "model.translator.onnx" in info.value.message and "bigl export" in info.value.hint
    # the ONNX file on its own: the translator's absence is named when the translation is asked for
    predictor = OnnxPredictor.from_path(tmp_path / "model.onnx", device="cpu")
    with pytest.raises(BundleError) as info:
        predictor.predict(synthetic_scan(), AFFINE, translated=True, modality="t2")
    assert "model.translator.onnx" in info.value.message and "bigl export" in info.value.hint
    # without PyTorch: a clear error naming the file and the fix, not a silent lack of output
    monkeypatch.setattr(prediction, "_torch_available", lambda: False)
    with pytest.raises(BundleError) as info:
        choose_engine(bundle, "auto", translated=True)
    assert "model.translator.onnx" in info.value.message and "bigl export" in info.value.hint
    assert "--engine torch" not in info.value.hint and "install PyTorch" in info.value.hint
    with pytest.raises(BundleError, match="model.translator.onnx"):
        open_predictor(tmp_path / "model.onnx", device="cpu", translated=True)


# ------------------------------------------------------------------------------------ device auto


class _FakeTorch:
    """A stand-in for the torch module whose CUDA availability the test sets."""

    def __init__(self, cuda: bool):
        self.cuda = type("cuda", (), {"is_available": staticmethod(lambda: cuda)})()


@pytest.mark.parametrize(
    "cuda_provider, torch_installed, torch_cuda, device, expected",
    [
        (False, True, True, "auto", "torch"),  # only PyTorch can use the GPU auto allows
        (False, True, False, "auto", "onnx"),  # no GPU for anyone: ONNX Runtime on the CPU
        (False, False, False, "auto", "onnx"),  # no torch: ONNX Runtime, and torch is never imported
        (True, True, True, "auto", "onnx"),  # onnxruntime-gpu uses the GPU itself
        (False, True, True, "cpu", "onnx"),  # the CPU was asked for
        (False, True, True, "cuda", "torch"),
        (True, True, True, "cuda", "onnx"),
    ],
)
def test_auto_engine_follows_the_device(exported, monkeypatch, cuda_provider, torch_installed, torch_cuda, device,
                                         expected):
    from bigl import prediction

    monkeypatch.setattr(onnxengine, "has_cuda_provider", lambda: cuda_provider)
    monkeypatch.setattr(prediction, "_torch_available", lambda: torch_installed)
    imported = []

    def fake_import(name, *args, **kwargs):
        if name == "torch":
            imported.append(name)
            if not torch_installed:
                raise ImportError("no torch")
            return _FakeTorch(torch_cuda)
        return real_import(name, *args, **kwargs)

    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", fake_import)
    assert choose_engine(exported, "auto", device)[0] == expected
    if not torch_installed:
        assert imported == []


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
    """An output name that leads (through a link) to a model file is refused; the files stay as they were."""
    from bigl.data.io import save_volume

    scan = save_volume(tmp_path / "case_t2.nii.gz", synthetic_scan(), AFFINE)
    for model_file in (exported.with_suffix(".onnx"), exported.with_name("model.translator.onnx")):
        before = model_file.read_bytes()
        link = tmp_path / f"{model_file.name}-link.nii.gz"
        link.symlink_to(model_file)
        code = main(["segment", "-i", str(scan), "-o", str(link), "-m", str(exported), "--progress", "none"])
        assert code == 2
        err = capsys.readouterr().err
        assert "never overwrites its inputs" in err and model_file.name in err and "Traceback" not in err
        assert model_file.read_bytes() == before and link.is_symlink()


# ------------------------------------------------------------------------------------ bad files


def _error(path: Path, **options) -> BundleError:
    """The error loading ``path`` gives; ``bigl segment`` with it exits with status 2 and the
    message and fix on stderr, never a traceback from inside onnxruntime."""
    with pytest.raises((BundleError, ConfigError)) as info:
        OnnxPredictor.from_path(path, device="cpu", **options)
    scan = path.parent / "cli_case_t2.nii.gz"
    if not scan.exists():
        from bigl.data.io import save_volume

        save_volume(scan, synthetic_scan(), AFFINE)
    done = subprocess.run([sys.executable, "-m", "bigl", "segment", "-i", str(scan), "-o",
                           str(path.parent / "cli_seg.nii.gz"), "-m", str(path), "--progress", "none"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "bigl segment: error:" in done.stderr and info.value.message in done.stderr
    assert "Traceback" not in done.stderr and "ONNXRuntimeError" not in done.stderr
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


# ------------------------------------------------------------------------------------ attention scaling


def test_a_near_uniform_map_is_flat_not_amplified_noise():
    from bigl.prediction import min_max

    rng = np.random.default_rng(0)
    uniform = np.full((6, 8, 8), 1 / 225, np.float32)
    # two engines computing the same near-uniform attention: float32 rounding apart
    first = uniform * (1 + 2e-7 * rng.standard_normal(uniform.shape)).astype(np.float32)
    second = uniform * (1 + 2e-7 * rng.standard_normal(uniform.shape)).astype(np.float32)
    assert np.array_equal(min_max(first), np.zeros_like(first)) and np.array_equal(min_max(second), min_max(first))
    real = uniform * (1 + 0.01 * rng.random(uniform.shape)).astype(np.float32)  # 1 % variation: a real map
    scaled = min_max(real)
    assert scaled.min() == 0 and scaled.max() == 1


def test_engines_agree_on_the_attention_of_an_untrained_model(tmp_path):
    """A fresh default-sized network's position attention is uniform but for float rounding (about
    1e-5 of its value): both engines show it as flat, where scaling the rounding to [0, 1] made
    them differ by up to 0.06 here (0.14 in the benchmark of docs/results.md)."""
    import torch

    from bigl.bundle import make_metadata, save_bundle
    from bigl.data.preprocess import PreprocessConfig
    from bigl.models import DualAttentionUNet, SegmenterConfig

    torch.manual_seed(0)
    config = SegmenterConfig()
    bundle = save_bundle(tmp_path / "fresh.safetensors", segmenter=DualAttentionUNet(config), metadata=make_metadata(
        method="source-only", modality="t2", source_modality="t1", segmenter_config=config,
        preprocessing=PreprocessConfig(image_size=64)))
    export_bundle(bundle)
    expected = BiGLPredictor.from_path(bundle, device="cpu").predict(synthetic_scan(), AFFINE, attention=True)
    got = OnnxPredictor.from_path(bundle.with_suffix(".onnx"), device="cpu").predict(synthetic_scan(), AFFINE,
                                                                                     attention=True)
    for kind in ("position", "channel"):
        assert np.abs(got.attention[kind] - expected.attention[kind]).max() <= 1e-3, kind


# ------------------------------------------------------------------------------------ flips


def test_flips_that_cannot_mirror_say_so(exported):
    predictor = OnnxPredictor.from_path(exported.with_suffix(".onnx"), device="cpu", flip=True)
    axial = predictor.predict(synthetic_scan(), AFFINE, modality="t2")
    assert not any("flips" in warning for warning in axial.warnings)
    sagittal = np.array([[0.0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]])  # slices (axis 2) run left-right
    warned = predictor.predict(synthetic_scan(), sagittal, modality="t2").warnings
    assert any("flips" in warning and "no slice was mirrored" in warning for warning in warned)
    unflipped = OnnxPredictor.from_path(exported.with_suffix(".onnx"), device="cpu", flip=False)
    assert not any("flips" in w for w in unflipped.predict(synthetic_scan(), sagittal, modality="t2").warnings)


# ------------------------------------------------------------------------------------ export failures


def test_the_export_check_compares_the_features(exported, tmp_path, monkeypatch):
    from bigl import export

    real_graph = export._segmenter_graph

    def wrong_features(torch, segmenter):
        graph = real_graph(torch, segmenter)

        class Shifted(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.graph = graph

            def forward(self, image):
                logits, features, position, channel = self.graph(image)
                return logits, features * 1.5 + 0.1, position, channel

        return Shifted().eval()

    monkeypatch.setattr(export, "_segmenter_graph", wrong_features)
    with pytest.raises(BundleError, match="features differ"):
        export_bundle(exported, tmp_path / "wrong.onnx")
    assert not (tmp_path / "wrong.onnx").exists()


def test_an_exporter_without_the_dynamo_option(exported, tmp_path, monkeypatch):
    """torch before 2.5 has no ``dynamo`` argument: it is only passed where it exists."""
    import torch

    real_export = torch.onnx.export

    def old_export(model, args, f, *, opset_version, input_names, output_names, dynamic_axes, do_constant_folding):
        return real_export(model, args, f, dynamo=False, opset_version=opset_version, input_names=input_names,
                           output_names=output_names, dynamic_axes=dynamic_axes,
                           do_constant_folding=do_constant_folding)

    monkeypatch.setattr(torch.onnx, "export", old_export)
    files = export_bundle(exported, tmp_path / "old.onnx")
    assert files[0] == tmp_path / "old.onnx" and files[0].is_file()


def test_an_exporter_failure_is_a_bundle_error(exported, tmp_path, monkeypatch):
    import torch

    def failing_export(*args, **kwargs):
        raise torch.onnx.errors.UnsupportedOperatorError("aten::something", 17, 18) if hasattr(
            torch.onnx, "errors") else RuntimeError("unsupported operator aten::something")

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    with pytest.raises(BundleError) as info:
        export_bundle(exported, tmp_path / "failed.onnx")
    assert "export" in info.value.message and "--opset" in info.value.hint
    assert not (tmp_path / "failed.onnx").exists()


def test_a_failed_export_never_fails_a_finished_training(exported, tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from bigl import export
    from bigl.training.events import EventLog, read_events
    from bigl.training.runner import TrainingRun

    def broken(*args, **kwargs):
        raise RuntimeError("the exporter broke in an unexpected way")

    monkeypatch.setattr(export, "export_bundle", broken)
    run = SimpleNamespace(log=EventLog(tmp_path / "events.jsonl"), out_dir=tmp_path)
    TrainingRun._export_onnx(run, exported)  # returns: the training stays a success
    events = read_events(tmp_path / "events.jsonl")
    assert [e["event"] for e in events] == ["warning"]
    assert "RuntimeError" in events[0]["message"] and "bigl export" in events[0]["hint"]
    assert "warning: the ONNX export failed" in capsys.readouterr().out


def test_the_device_is_the_provider_the_session_got(exported, monkeypatch):
    """Asked for CUDA on an onnxruntime that cannot start it, ONNX Runtime runs on the CPU: say so."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    monkeypatch.setattr(onnxengine, "execution_providers",
                        lambda device: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    predictor = OnnxPredictor.from_path(exported.with_suffix(".onnx"), device="cuda")
    assert predictor.device == "cpu"
