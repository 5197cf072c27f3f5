"""Model bundles: round trip, metadata, and a BundleError (never a torch traceback) for bad files."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bigl import bundle as bundle_module
from bigl.bundle import (
    annotate_bundle,
    FORMAT_VERSION,
    default_bundle_path,
    describe_adaptation,
    list_bundles,
    load_bundle,
    make_metadata,
    parameter_counts,
    read_metadata,
    save_bundle,
)
from bigl.data.preprocess import PreprocessConfig
from bigl.errors import BundleError, ConfigError, InputError
from bigl.models import DualAttentionUNet, ResnetGenerator, SegmenterConfig, TranslatorConfig

SEG_CFG = SegmenterConfig(base_channels=4, depth=2)
TR_CFG = TranslatorConfig(base_channels=4, n_downsample=1, n_blocks=1)
PRE_CFG = PreprocessConfig(image_size=16, margin=2)


def _metadata(**overrides) -> dict:
    values = dict(method="bigl", modality="T2", source_modality="t1", segmenter_config=SEG_CFG,
                  translator_config=TR_CFG, preprocessing=PRE_CFG, description="test")
    values.update(overrides)
    return make_metadata(**values)


@pytest.fixture()
def saved(tmp_path):
    """A freshly saved bundle with non-trivial weights, and the networks it was saved from."""
    torch.manual_seed(1)
    networks = {"segmenter": DualAttentionUNet(SEG_CFG), "translator_s2t": ResnetGenerator(TR_CFG),
                "translator_t2s": ResnetGenerator(TR_CFG)}
    with torch.no_grad():  # the attention gammas start at 0; make them matter for the round trip
        networks["segmenter"].attention.position.gamma.fill_(0.7)
        networks["segmenter"].attention.channel.gamma.fill_(-0.3)
    for net in networks.values():
        net.eval()
    path = save_bundle(tmp_path / "model.safetensors", metadata=_metadata(), **networks)
    return path, networks


def _rewrite(path: Path, out: Path, *, metadata=None, edit_tensors=None, raw_header=None) -> Path:
    """Copy a bundle with edited metadata and/or tensors (using safetensors directly)."""
    tensors = load_file(str(path))
    if edit_tensors:
        edit_tensors(tensors)
    header = raw_header if raw_header is not None else {"bigl": json.dumps(metadata or read_metadata(path))}
    save_file(tensors, str(out), metadata=header)
    return out


# ------------------------------------------------------------------------------------ round trip


def test_round_trip_gives_identical_outputs(saved):
    path, networks = saved
    loaded = load_bundle(path)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        for name, original in networks.items():
            reloaded = getattr(loaded, name)
            assert not reloaded.training
            assert torch.equal(original(x), reloaded(x)), name
    assert all(not p.requires_grad for p in loaded.segmenter.parameters())
    assert loaded.path == path


def test_metadata_describes_the_model(saved):
    path, _ = saved
    meta = read_metadata(path)
    assert meta["format"] == "bigl-bundle" and meta["format_version"] == FORMAT_VERSION
    assert meta["modality"] == "t2" and meta["source_modality"] == "t1"  # normalised names
    assert SegmenterConfig.from_dict(meta["segmenter"]) == SEG_CFG
    assert TranslatorConfig.from_dict(meta["translator"]) == TR_CFG
    assert PreprocessConfig.from_dict(meta["preprocessing"]) == PRE_CFG
    assert meta["labels"] == [0, 1, 2, 4] and len(meta["class_names"]) == 4
    assert meta["method"] == "bigl" and meta["description"] == "test"
    loaded = load_bundle(path)
    assert loaded.modality == "t2" and loaded.preprocessing == PRE_CFG and loaded.segmenter_config == SEG_CFG


def test_metrics_and_training_config_are_kept(tmp_path):
    meta = _metadata(translator_config=None, method="source-only", training={"epochs": 3},
                     metrics={"WT": {"dice": 0.81}})
    path = save_bundle(tmp_path / "m.safetensors", segmenter=DualAttentionUNet(SEG_CFG), metadata=meta)
    assert read_metadata(path)["metrics"] == {"WT": {"dice": 0.81}}
    loaded = load_bundle(path)
    assert loaded.translator_s2t is None and loaded.translator_t2s is None


def test_parameter_counts_from_header(saved):
    path, networks = saved
    counts = parameter_counts(path)
    for name, net in networks.items():
        assert counts[name] == sum(p.numel() for p in net.parameters())


def test_tiny_bundle_fixture_loads(tiny_bundle):
    loaded = load_bundle(tiny_bundle)
    assert loaded.translator_t2s is not None and loaded.method == "bigl"


def test_make_metadata_rejects_bad_values():
    with pytest.raises(ConfigError, match="method"):
        _metadata(method="magic")
    with pytest.raises(InputError, match="modality"):
        _metadata(modality="pet")
    with pytest.raises(ConfigError, match="colour"):
        _metadata(segmenter_config={**SEG_CFG.to_dict(), "colour": "red"})


# ------------------------------------------------------------------------------------ saving


def test_save_rejects_networks_that_do_not_match_the_metadata(tmp_path):
    other = DualAttentionUNet(SegmenterConfig(base_channels=8, depth=2))
    target = tmp_path / "bad.safetensors"
    with pytest.raises(BundleError, match="shape"):
        save_bundle(target, segmenter=other, metadata=_metadata())
    with pytest.raises(BundleError, match="translator"):
        save_bundle(target, segmenter=DualAttentionUNet(SEG_CFG), translator_t2s=ResnetGenerator(TR_CFG),
                    metadata=_metadata(translator_config=None))
    assert not target.exists()


def test_save_is_atomic(saved, monkeypatch):
    path, networks = saved
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(bundle_module.os, "replace", failing_replace)
    with pytest.raises(InputError, match="cannot write .*disk full"):  # a message, not a traceback
        save_bundle(path, metadata=_metadata(description="new"), **networks)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left


def test_save_creates_parent_folders_and_overwrites(saved, tmp_path):
    path, networks = saved
    target = save_bundle(tmp_path / "a" / "b" / "m.safetensors", metadata=_metadata(description="v2"), **networks)
    assert read_metadata(target)["description"] == "v2"
    save_bundle(target, metadata=_metadata(description="v3"), **networks)
    assert read_metadata(target)["description"] == "v3"


# ------------------------------------------------------------------------------------ bad files


def _expect_bundle_error(path, *fragments):
    for reader in (load_bundle, read_metadata):
        with pytest.raises(BundleError) as info:
            reader(path)
        text = str(info.value).lower()
        for fragment in fragments:
            assert fragment.lower() in text, (fragment, text)
        assert info.value.hint, "a BundleError always says how to fix it"


def test_missing_file(tmp_path):
    _expect_bundle_error(tmp_path / "nope.safetensors", "not found", "nope.safetensors")


def test_folder_instead_of_file(tmp_path):
    _expect_bundle_error(tmp_path, "folder")


@pytest.mark.parametrize("content", [os.urandom(4096), b"this is a text file, not a model\n" * 20, b""],
                         ids=["random-bytes", "text", "empty"])
def test_not_a_safetensors_file(tmp_path, content):
    path = tmp_path / "weird.safetensors"
    path.write_bytes(content)
    _expect_bundle_error(path, "weird.safetensors", "not a readable model bundle")


def test_truncated_file(saved):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect_bundle_error(path, "truncated")


def test_extra_bytes_after_the_tensors(saved):
    path, _ = saved
    path.write_bytes(path.read_bytes() + b"\0" * 16)
    _expect_bundle_error(path, "not a readable model bundle", "bytes of data")


def _with_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header in place (tensor data unchanged)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length:])


@pytest.mark.parametrize("edit, fragment", [
    (lambda h: h[next(k for k in h if k != "__metadata__")].update(shape=[1, 2, 3, 4, 5]), "invalid"),
    (lambda h: h[next(k for k in h if k != "__metadata__")].update(dtype="X9"), "invalid"),
    (lambda h: h["__metadata__"].update(bigl=7), "map of strings"),
    (lambda h: [v["data_offsets"].reverse() for k, v in h.items() if k != "__metadata__"], "invalid"),
], ids=["shape-vs-size", "dtype", "metadata-not-text", "offsets"])
def test_malformed_header(saved, edit, fragment):
    path, _ = saved
    _with_header(path, edit)
    _expect_bundle_error(path, "not a readable model bundle", fragment)


def test_header_functions_need_neither_torch_nor_safetensors(tiny_bundle, tmp_path):
    """A GUI lists models before PyTorch is installed: the header functions import neither."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "tiny.safetensors").write_bytes(tiny_bundle.read_bytes())
    (folder / "broken.safetensors").write_bytes(b"\x00" * 64)
    code = (
        "import json, sys\n"
        "sys.modules['torch'] = None\n"
        "sys.modules['safetensors'] = None\n"
        "from bigl.bundle import list_bundles, parameter_counts, read_metadata\n"
        f"found = list_bundles({str(folder)!r})\n"
        f"print(json.dumps({{'listed': [p.name for p, _ in found], 'metadata': read_metadata({str(tiny_bundle)!r}),\n"
        f"                  'counts': parameter_counts({str(tiny_bundle)!r})}}))\n"
    )
    repo = Path(bundle_module.__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["listed"] == ["tiny.safetensors"]
    assert out["metadata"] == read_metadata(tiny_bundle) and out["metadata"]["modality"] == "t2"
    bundle = load_bundle(tiny_bundle)
    assert out["counts"] == {name: sum(p.numel() for p in net.parameters()) for name, net in bundle.networks().items()}


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"state": Payload()}))
    _expect_bundle_error(path, "pickle")
    torch_file = tmp_path / "model.pth"
    torch.save({"weights": torch.zeros(3)}, torch_file)
    _expect_bundle_error(torch_file, "pickle")
    assert not marker.exists()


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(path), metadata={"format": "pt"})
    _expect_bundle_error(path, "not a BiGL bundle", "another tool")
    save_file({"conv.weight": torch.zeros(2, 2)}, str(path))
    _expect_bundle_error(path, "not a BiGL bundle")


def test_translator_file_is_not_a_model(saved, tmp_path):
    path, _ = saved
    translator_file = _rewrite(path, tmp_path / "translator.safetensors",
                               raw_header={"bigl": json.dumps({"format": "bigl-translator", "format_version": 1})})
    _expect_bundle_error(translator_file, "translator file", "model.safetensors")


def test_invalid_metadata_json(saved, tmp_path):
    path, _ = saved
    bad = _rewrite(path, tmp_path / "bad.safetensors", raw_header={"bigl": "{not json"})
    _expect_bundle_error(bad, "not valid JSON")


def test_newer_format_version(saved, tmp_path):
    path, _ = saved
    meta = {**read_metadata(path), "format_version": FORMAT_VERSION + 1, "bigl_version": "9.0.0"}
    newer = _rewrite(path, tmp_path / "newer.safetensors", metadata=meta)
    _expect_bundle_error(newer, "newer BiGL", "upgrade")


def test_config_and_weights_disagree(saved, tmp_path):
    path, _ = saved
    meta = read_metadata(path)
    meta["segmenter"]["base_channels"] = 8
    wrong = _rewrite(path, tmp_path / "wrong.safetensors", metadata=meta)
    with pytest.raises(BundleError, match="wrong shape"):
        load_bundle(wrong)


def test_missing_tensor(saved, tmp_path):
    path, _ = saved
    victim = next(name for name in load_file(str(path)) if name.startswith("segmenter.") and name.endswith("weight"))
    edited = _rewrite(path, tmp_path / "missing.safetensors", edit_tensors=lambda t: t.pop(victim))
    with pytest.raises(BundleError, match="missing tensor") as info:
        load_bundle(edited)
    assert victim in str(info.value)


def test_unknown_config_key(saved, tmp_path):
    path, _ = saved
    meta = read_metadata(path)
    meta["segmenter"]["hyper_mode"] = True
    odd = _rewrite(path, tmp_path / "odd.safetensors", metadata=meta)
    with pytest.raises(BundleError, match="hyper_mode"):
        load_bundle(odd)


def test_segmenter_with_another_label_set(tmp_path):
    seg_cfg = SegmenterConfig(base_channels=4, depth=2, num_classes=3)
    meta = _metadata(segmenter_config=seg_cfg, translator_config=None)
    with pytest.raises(BundleError, match="3 classes"):
        save_bundle(tmp_path / "three.safetensors", segmenter=DualAttentionUNet(seg_cfg), metadata=meta)


def test_translator_weights_without_translator_config(saved, tmp_path):
    path, _ = saved
    meta = {**read_metadata(path), "translator": None}
    odd = _rewrite(path, tmp_path / "odd.safetensors", metadata=meta)
    with pytest.raises(BundleError, match="no translator config"):
        load_bundle(odd)


def test_no_segmenter_weights(saved, tmp_path):
    path, _ = saved

    def drop_segmenter(tensors):
        for name in [n for n in tensors if n.startswith("segmenter.")]:
            del tensors[name]

    edited = _rewrite(path, tmp_path / "noseg.safetensors", edit_tensors=drop_segmenter)
    with pytest.raises(BundleError, match="no segmenter"):
        load_bundle(edited)


# ------------------------------------------------------------------------------------ finding bundles


def test_list_bundles_skips_invalid_files(saved, tmp_path):
    path, _ = saved
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "good.safetensors").write_bytes(path.read_bytes())
    (folder / "broken.safetensors").write_bytes(path.read_bytes()[:100])
    save_file({"w": torch.zeros(1)}, str(folder / "foreign.safetensors"))
    (folder / "notes.txt").write_text("hello")
    found = list_bundles(folder)
    assert [p.name for p, _ in found] == ["good.safetensors"]
    assert found[0][1]["modality"] == "t2"
    assert list_bundles(tmp_path / "absent") == []


def test_default_bundle_path(monkeypatch, tmp_path, saved):
    monkeypatch.setattr(bundle_module, "DEFAULT_BUNDLE_PATH", tmp_path / "resources" / "default_model.safetensors")
    with pytest.raises(BundleError, match="no default model") as info:
        default_bundle_path()
    assert "bigl train" in info.value.hint and "--model" in info.value.hint
    shipped = tmp_path / "resources" / "default_model.safetensors"
    shipped.parent.mkdir()
    shipped.write_bytes(saved[0].read_bytes())
    assert default_bundle_path() == shipped


def test_the_default_path_is_inside_the_package():
    assert bundle_module.DEFAULT_BUNDLE_PATH.parent == Path(bundle_module.__file__).parent / "resources"


# ------------------------------------------------------------------------------------ devices


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_requested_without_cuda(saved):
    with pytest.raises(ConfigError) as info:
        load_bundle(saved[0], device="cuda")
    assert "--device cpu" in info.value.hint


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_loads_on_gpu(saved):
    path, networks = saved
    loaded = load_bundle(path, device="cuda")
    assert loaded.device.type == "cuda"
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = networks["segmenter"](x)
        got = loaded.segmenter(x.cuda()).cpu()
    assert torch.allclose(expected, got, atol=1e-4)
    assert load_bundle(path, device="auto").device.type == "cuda"


def test_annotate_bundle_records_metrics_and_keeps_the_weights(saved, tmp_path):
    path, _ = saved
    before = read_metadata(path)
    out = annotate_bundle(path, tmp_path / "annotated.safetensors", metrics={"t2": {"WT": {"dice": 0.8}}},
                          training={"report_cases": ["A", "B"]}, description="reference model")
    after = read_metadata(out)
    assert after["metrics"] == {"t2": {"WT": {"dice": 0.8}}} and after["description"] == "reference model"
    assert after["training"]["report_cases"] == ["A", "B"]
    assert {k: v for k, v in after["training"].items() if k != "report_cases"} == (before["training"] or {})
    assert after["segmenter"] == before["segmenter"] and after["method"] == before["method"]
    original, annotated = load_file(str(path)), load_file(str(out))
    assert original.keys() == annotated.keys() and all(torch.equal(original[k], annotated[k]) for k in original)
    with pytest.raises(BundleError, match="JSON"):
        annotate_bundle(path, tmp_path / "bad.safetensors", metrics={"dice": float("nan")})
    assert not (tmp_path / "bad.safetensors").exists()


def test_describe_adaptation_reads_like_the_training_method():
    assert describe_adaptation({"modality": "t2", "source_modality": "t1", "method": "bigl"}) == \
        "segments T2, adapted from T1 (BiGL)"
    assert "no adaptation" in describe_adaptation({"modality": "t2", "source_modality": "t1", "method": "source-only"})
    assert "T2 labels" in describe_adaptation({"modality": "t2", "method": "target-only"})
