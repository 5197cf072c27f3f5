"""BiGLPredictor: outputs on the input grid, valid probabilities, attention/translation maps,
determinism and clear errors for unusable inputs or requests."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from synthetic import synthetic_scan

from bigl.bundle import load_bundle, make_metadata, save_bundle
from bigl.data.preprocess import PreprocessConfig, SliceGeometry, restore_maps
from bigl.errors import BundleError, ConfigError, InputError
from bigl.inference import BiGLPredictor, out_of_memory_error, restore_on_grid
from bigl.prediction import channel_summary, labels_on_grid, position_summary
from bigl.labels import classes_to_labels
from bigl.models import DualAttentionUNet, SegmenterConfig


@pytest.fixture(scope="module")
def predictor(tiny_bundle):
    return BiGLPredictor(load_bundle(tiny_bundle), device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def full_prediction(predictor):
    return predictor.predict(synthetic_scan(), np.diag([1.0, 1.2, 2.5, 1.0]), probabilities=True,
                             attention=True, translated=True)


def _corner(volume: np.ndarray):
    """A voxel far outside the brain crop of :func:`synthetic_scan`."""
    return volume[..., 0, 0, 0]


def test_labels_on_the_input_grid(full_prediction):
    labels = full_prediction.labels
    assert labels.dtype == np.uint8 and labels.shape == (40, 44, 30)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 4}
    assert np.array_equal(full_prediction.affine, np.diag([1.0, 1.2, 2.5, 1.0]))


def test_probabilities_are_a_distribution_and_give_the_labels(full_prediction):
    probs = full_prediction.probabilities
    assert probs.dtype == np.float32 and probs.shape == (4, 40, 44, 30)
    assert probs.min() >= 0 and np.allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    assert np.array_equal(full_prediction.labels, classes_to_labels(probs.argmax(axis=0)))
    assert np.allclose(_corner(probs), [1, 0, 0, 0])  # outside the brain crop: background for sure
    # an untrained network is not confident anywhere inside the brain
    assert probs[0, 20, 22, 15] < 0.99


def test_attention_maps(full_prediction):
    attention = full_prediction.attention
    assert set(attention) == {"position", "channel"}
    for kind, volume in attention.items():
        assert volume.dtype == np.float32 and volume.shape == (40, 44, 30), kind
        assert volume.min() >= 0 and volume.max() <= 1, kind
        assert volume.max() > 0.9, f"{kind} map is normalised per volume"
        assert _corner(volume) == 0, kind
        assert volume[10:30, 10:34, 8:22].std() > 0, f"{kind} map varies inside the brain"


def test_translated_image(full_prediction):
    image = full_prediction.translated
    assert image.dtype == np.float32 and image.shape == (40, 44, 30)
    assert image.min() >= -1 and image.max() <= 1
    assert _corner(image) == -1
    assert image[10:30, 10:34, 8:22].std() > 0


def test_deterministic(predictor):
    scan = synthetic_scan(seed=3)
    first = predictor.predict(scan, probabilities=True, attention=True)
    second = predictor.predict(scan, probabilities=True, attention=True)
    assert np.array_equal(first.labels, second.labels)
    assert np.array_equal(first.probabilities, second.probabilities)
    for kind in ("position", "channel"):
        assert np.array_equal(first.attention[kind], second.attention[kind])


def test_optional_outputs_are_off_by_default(predictor):
    result = predictor.predict(synthetic_scan())
    assert result.probabilities is None and result.attention is None and result.translated is None


def test_batch_size_does_not_change_the_result(tiny_bundle, predictor):
    scan = synthetic_scan(seed=5)
    one_by_one = BiGLPredictor(load_bundle(tiny_bundle), device="cpu", batch_size=1)
    a = one_by_one.predict(scan, probabilities=True)
    b = predictor.predict(scan, probabilities=True)
    assert np.allclose(a.probabilities, b.probabilities, atol=1e-5)


def test_progress_counts_slices(predictor):
    calls = []
    predictor.predict(synthetic_scan(), translated=True, progress=lambda done, total: calls.append((done, total)))
    totals = {total for _, total in calls}
    assert len(totals) == 1
    total = totals.pop()
    dones = [done for done, _ in calls]
    assert dones == sorted(dones) and dones[-1] == total
    assert total % 2 == 0 and total // 2 <= 30  # two passes over at most the 30 axial slices


def test_image_size_not_a_multiple_of_the_network_stride(tmp_path):
    """Slices are padded for the networks and cropped back (image_size 36, segmenter stride 8)."""
    seg_cfg = SegmenterConfig(base_channels=4, depth=3)
    path = save_bundle(tmp_path / "odd.safetensors", segmenter=DualAttentionUNet(seg_cfg), metadata=make_metadata(
        method="source-only", modality="t2", source_modality="t1", segmenter_config=seg_cfg,
        preprocessing=PreprocessConfig(image_size=36, margin=2)))
    result = BiGLPredictor(load_bundle(path), device="cpu").predict(synthetic_scan(), probabilities=True, attention=True)
    assert result.labels.shape == (40, 44, 30)
    assert np.allclose(result.probabilities.sum(axis=0), 1.0, atol=1e-5)
    with pytest.raises(BundleError, match="translator"):
        BiGLPredictor(load_bundle(path), device="cpu").predict(synthetic_scan(), translated=True)


@pytest.mark.parametrize("image_size, square", [(32, 45), (32, 20), (16, 16)], ids=["up", "down", "same"])
def test_fast_restore_matches_restore_maps(image_size, square):
    geometry = SliceGeometry(original_shape=(50, 60, 12), bbox=((2, 2 + square - 3), (5, 5 + square), (1, 11)),
                             slice_axis=2, square=square, pad=((1, 2), (0, 0)), image_size=image_size)
    rng = np.random.default_rng(0)
    for maps in (rng.random((10, 3, image_size, image_size)), rng.random((10, image_size, image_size))):
        maps = maps.astype(np.float32)
        expected = restore_maps(maps, geometry, fill=0.5)
        got = restore_on_grid(maps, geometry, fill=0.5)
        assert got.shape == expected.shape and got.dtype == np.float32
        assert np.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("image_size, square", [(32, 45), (32, 20), (16, 16)], ids=["up", "down", "same"])
@pytest.mark.parametrize("count", [1, 8, 19])  # inside one chunk of slices, exactly one, across three
def test_labels_on_grid_is_the_argmax_of_the_restored_probabilities(image_size, square, count):
    geometry = SliceGeometry(original_shape=(50, 60, 25), bbox=((2, 2 + square - 3), (5, 5 + square), (3, 3 + count)),
                             slice_axis=2, square=square, pad=((1, 2), (0, 0)), image_size=image_size)
    rng = np.random.default_rng(count)
    logits = rng.normal(size=(count, 4, image_size, image_size)).astype(np.float32) * 3
    maps = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    restored = np.concatenate([restore_on_grid(maps[:, :1], geometry, fill=1.0),
                               restore_on_grid(maps[:, 1:], geometry, fill=0.0)])
    expected = classes_to_labels(np.argmax(restored / restored.sum(axis=0), axis=0))
    got = labels_on_grid(maps, geometry)
    assert got.dtype == np.uint8 and got.shape == (50, 60, 25)
    assert np.array_equal(got, expected)
    assert set(np.unique(got)) == {0, 1, 2, 4}  # every class somewhere: the maps are not one class
    assert not got[:, :, :3].any() and not got[:, :, 3 + count:].any()  # outside the crop: background


def test_labels_on_grid_uses_the_engine_resize():
    geometry = SliceGeometry(original_shape=(20, 20, 3), bbox=((0, 20), (0, 20), (0, 3)), slice_axis=2, square=20,
                             pad=((0, 0), (0, 0)), image_size=10)
    maps = np.zeros((3, 4, 10, 10), np.float32)
    maps[:, 0] = 1.0
    calls = []

    def all_oedema(stack, size):  # a resize that answers "oedema" everywhere, to show it is the one used
        calls.append((stack.shape, size))
        out = np.zeros((*stack.shape[:2], size, size), np.float32)
        out[:, 2] = 1.0
        return out

    assert np.all(labels_on_grid(maps, geometry, resize=all_oedema) == 2)
    assert calls == [((3, 4, 10, 10), 20)]


# ------------------------------------------------------------------------------------ attention summaries


def test_position_summary_is_the_attention_each_position_receives():
    n = 4 * 4
    attention = torch.zeros(1, n, n)
    attention[0, :, 5] = 1.0  # every query attends only to position 5 = (row 1, col 1)
    summary = position_summary(attention.numpy(), (4, 4))
    assert summary.shape == (1, 1, 4, 4)
    expected = np.zeros((4, 4), np.float32)
    expected[1, 1] = 1.0
    assert np.array_equal(summary[0, 0], expected)


def test_channel_summary_weights_features_by_received_channel_attention():
    features = torch.zeros(1, 2, 2, 2)
    features[0, 0, 0, 0] = 3.0  # channel 0 active top-left
    features[0, 1, 1, 1] = -5.0  # channel 1 active bottom-right (magnitude counts)
    attention = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])  # all attention goes to channel 1
    summary = channel_summary(features.numpy(), attention.numpy())
    assert np.array_equal(summary[0, 0], np.array([[0.0, 0.0], [0.0, 5.0]], np.float32))


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "volume, fragment",
    [
        (np.ones((32, 32), np.float32), "2D"),
        (np.ones((8, 8, 8, 3), np.float32), "4D"),
        (np.full((16, 16, 16), np.nan, np.float32), "NaN"),
        (np.zeros((16, 16, 16), np.float32), "constant"),
        (np.random.default_rng(0).choice([0, 1, 2, 4], size=(16, 16, 16)).astype(np.float32), "label map"),
    ],
    ids=["2d", "4d", "nan", "all-zero", "label-map"],
)
def test_unusable_volumes(predictor, volume, fragment):
    with pytest.raises(InputError, match=fragment):
        predictor.predict(volume)


def test_modality_mismatch(predictor):
    with pytest.raises(InputError, match="expects T2, got T1"):
        predictor.predict(synthetic_scan(), modality="T1")
    assert predictor.predict(synthetic_scan(), modality="t2w").labels.shape == (40, 44, 30)


def test_bad_affine(predictor):
    with pytest.raises(InputError, match="4x4"):
        predictor.predict(synthetic_scan(), np.eye(3))


def test_bad_settings(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    with pytest.raises(ConfigError, match="batch size"):
        BiGLPredictor(bundle, device="cpu", batch_size=0)
    with pytest.raises(ConfigError, match="thread"):
        BiGLPredictor(bundle, device="cpu", num_threads=0)
    with pytest.raises(ConfigError, match="device"):
        BiGLPredictor(bundle, device="tpu")


def test_num_threads_is_applied(tiny_bundle):
    before = torch.get_num_threads()
    try:
        BiGLPredictor(load_bundle(tiny_bundle), device="cpu", num_threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_requested_without_cuda(tiny_bundle):
    with pytest.raises(ConfigError) as info:
        BiGLPredictor.from_path(tiny_bundle, device="cuda")
    assert "--device cpu" in info.value.hint


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_cpu(tiny_bundle, full_prediction):
    gpu = BiGLPredictor.from_path(tiny_bundle, device="cuda")
    assert gpu.bundle.device.type == "cuda"
    result = gpu.predict(synthetic_scan(), np.diag([1.0, 1.2, 2.5, 1.0]), probabilities=True, translated=True)
    assert np.allclose(result.probabilities, full_prediction.probabilities, atol=1e-3)
    assert np.allclose(result.translated, full_prediction.translated, atol=1e-3)


# ------------------------------------------------------------------------------------ out of memory

GPU_OUT_OF_MEMORY = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total)")
CPU_OUT_OF_MEMORY = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                                 "memory: you tried to allocate 68719476736 bytes. Error code 12")


@pytest.mark.parametrize("failure, memory, fixes", [
    (GPU_OUT_OF_MEMORY, "GPU", ["--device cpu", "--batch-size (e.g. 2)"]),
    (CPU_OUT_OF_MEMORY, "RAM", ["--batch-size (e.g. 2)", "close other programs"]),
    (MemoryError(), "RAM", ["--batch-size (e.g. 2)"]),
], ids=["cuda", "cpu-allocator", "numpy"])
def test_running_out_of_memory_is_a_config_error_with_a_fix(tiny_bundle, monkeypatch, failure, memory, fixes):
    predictor = BiGLPredictor(load_bundle(tiny_bundle), device="cpu", batch_size=8)

    def exhausted(*args, **kwargs):
        raise failure

    monkeypatch.setattr(BiGLPredictor, "_segment_slices", exhausted)
    with pytest.raises(ConfigError) as info:
        predictor.predict(synthetic_scan(), name="case_t2.nii.gz")
    error = info.value
    assert "out of memory" in error.message and memory in error.message and "case_t2.nii.gz" in error.message
    assert "batch size 8" in error.message
    for fix in fixes:
        assert fix in error.hint, (fix, error.hint)
    if memory == "RAM":
        assert "--device cpu" not in error.hint  # it already runs on the CPU


def test_other_runtime_errors_are_not_mistaken_for_memory(tiny_bundle, monkeypatch):
    predictor = BiGLPredictor(load_bundle(tiny_bundle), device="cpu")

    def broken(*args, **kwargs):
        raise RuntimeError("Expected all tensors to be on the same device")

    monkeypatch.setattr(BiGLPredictor, "_segment_slices", broken)
    with pytest.raises(RuntimeError, match="same device"):
        predictor.predict(synthetic_scan())


def test_out_of_memory_error_without_a_batch_to_shrink():
    error = out_of_memory_error(GPU_OUT_OF_MEMORY, batch_size=1)
    assert "--device cpu" in error.hint and "--batch-size" not in error.hint
    assert out_of_memory_error(ValueError("out of memory")) is None  # only allocation failures count
