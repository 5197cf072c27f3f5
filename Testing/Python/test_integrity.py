"""Integrity of the tensor files BiGL writes and reads back (bundles, translator files, checkpoints):
a checksum of the tensor data verified at load, NaN weights refused, resume from the newest
checkpoint that verifies, and files written before checksums existed still loading."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from bigl import tensorfile
from bigl.bundle import annotate_bundle, default_bundle_path, load_bundle, read_metadata, verify_checksum
from bigl.cli import main
from bigl.errors import BundleError, ConfigError
from bigl.training import load_config, run_training
from bigl.training.checkpoint import latest_checkpoint, read_checkpoint
from bigl.training.events import read_events

from test_cli_segment import write_scan
from test_training_resume import _toy as toy_adapt_checkpoint


def header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return 8 + length, json.loads(raw[8:8 + length])


def largest_tensor(path: Path, prefix: str) -> str:
    _, entries = header(path)
    names = [name for name in entries if name.startswith(prefix)]
    return max(names, key=lambda name: entries[name]["data_offsets"][1] - entries[name]["data_offsets"][0])


def damage(path: Path, name: str, *, fill: int | None = None) -> None:
    """Flip the lowest bit of every 4th byte of one tensor (values stay finite), or set them all to ``fill``."""
    start, entries = header(path)
    first, last = (start + offset for offset in entries[name]["data_offsets"])
    raw = bytearray(path.read_bytes())
    if fill is None:
        for i in range(first, last, 4):
            raw[i] ^= 0x01
    else:
        raw[first:last] = bytes([fill]) * (last - first)
    path.write_bytes(bytes(raw))


def without_checksum(source: Path, destination: Path) -> Path:
    """The same tensors and metadata, written the way BiGL did before it recorded checksums."""
    metadata, tensors = tensorfile.read_tensors(source)
    metadata.pop(tensorfile.DIGEST_KEY)
    metadata.pop(tensorfile.HEADER_DIGEST_KEY)
    destination.write_bytes(safetensors_bytes(tensors, metadata=metadata))
    return destination


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    return Path(shutil.copy(tiny_bundle, tmp_path / "model.safetensors"))


# ---------------------------------------------------------------------------------- bundles


def test_a_bundle_records_the_checksum_of_its_tensor_data(bundle_copy):
    start, entries = header(bundle_copy)
    recorded = entries["__metadata__"][tensorfile.DIGEST_KEY]
    assert recorded == hashlib.sha256(bundle_copy.read_bytes()[start:]).hexdigest()
    assert verify_checksum(bundle_copy) is True
    assert read_metadata(bundle_copy)["method"] == "bigl"  # the description is unchanged


def test_flipped_bits_in_one_tensor_are_refused(bundle_copy, tmp_path, capsys):
    damage(bundle_copy, largest_tensor(bundle_copy, "segmenter."))
    with pytest.raises(BundleError, match="is damaged") as caught:
        load_bundle(bundle_copy)
    assert str(bundle_copy) in caught.value.message and "copy it again" in caught.value.hint
    scan = write_scan(tmp_path / "case_t2.nii.gz")
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", "-i", str(scan), "-o", str(out), "-m", str(bundle_copy), "--progress", "none"]) == 2
    assert "is damaged" in capsys.readouterr().err and not out.exists()
    assert main(["info", str(bundle_copy)]) == 2
    assert "is damaged" in capsys.readouterr().err
    with pytest.raises(BundleError, match="is damaged"):
        annotate_bundle(bundle_copy, tmp_path / "annotated.safetensors", metrics={})


def test_a_changed_digit_in_the_header_is_refused(bundle_copy, tmp_path, capsys):
    """The header holds the settings (a checkpoint's step, random states, a bundle's preprocessing):
    a digit changed there still parses, and must not pass as what BiGL wrote."""
    start, _ = header(bundle_copy)
    raw = bytearray(bundle_copy.read_bytes())
    at = raw.index(b'image_size', 8, start)
    digit = next(i for i in range(at, start) if chr(raw[i]).isdigit())
    raw[digit] = ord("7") if raw[digit] != ord("7") else ord("5")
    bundle_copy.write_bytes(bytes(raw))
    json.loads(bytes(raw[8:start]))  # still a valid header
    with pytest.raises(BundleError, match="is damaged") as caught:
        load_bundle(bundle_copy)
    assert "header" in caught.value.message
    assert main(["info", str(bundle_copy)]) == 2 and "is damaged" in capsys.readouterr().err


@pytest.mark.parametrize("checksum", [True, False], ids=["with-checksum", "written-before-checksums"])
def test_weights_overwritten_with_0xff_are_refused(bundle_copy, tmp_path, capsys, checksum):
    path = bundle_copy if checksum else without_checksum(bundle_copy, tmp_path / "old.safetensors")
    damage(path, largest_tensor(path, "translator_t2s."), fill=0xFF)  # 0xFFFFFFFF is a float32 NaN
    with pytest.raises(BundleError, match="damaged") as caught:
        load_bundle(path)
    if not checksum:
        assert "NaN or infinite" in caught.value.message and "translator_t2s." in caught.value.message
    scan = write_scan(tmp_path / "case_t2.nii.gz")
    assert main(["segment", "-i", str(scan), "-o", str(tmp_path / "seg.nii.gz"), "-m", str(path), "--progress", "none"]) == 2
    assert "damaged" in capsys.readouterr().err


def test_bundles_written_before_checksums_still_load(bundle_copy, tmp_path, capsys):
    old = without_checksum(bundle_copy, tmp_path / "old.safetensors")
    assert verify_checksum(old) is False
    new, before = load_bundle(bundle_copy), load_bundle(old)
    for name, tensor in new.segmenter.state_dict().items():
        assert torch.equal(tensor, before.segmenter.state_dict()[name])
    assert main(["info", str(old)]) == 0 and "none recorded" in capsys.readouterr().out
    assert main(["info", str(bundle_copy)]) == 0 and "checksum:      verified" in capsys.readouterr().out


def test_the_shipped_model_carries_a_checksum_that_verifies_and_loads():
    path = default_bundle_path()
    assert tensorfile.DIGEST_KEY in header(path)[1]["__metadata__"]
    assert verify_checksum(path) is True
    load_bundle(path)


def test_annotating_keeps_the_tensor_bytes_and_records_a_checksum(tmp_path, bundle_copy):
    old = without_checksum(bundle_copy, tmp_path / "old.safetensors")
    annotated = annotate_bundle(old, tmp_path / "annotated.safetensors", metrics={"dice": 0.5})
    (old_start, _), (new_start, _) = header(old), header(annotated)
    assert annotated.read_bytes()[new_start:] == old.read_bytes()[old_start:]
    assert verify_checksum(annotated) is True and read_metadata(annotated)["metrics"] == {"dice": 0.5}


# ---------------------------------------------------------------------------------- translator files


def test_a_damaged_translator_file_is_refused(phantom_cohort, tmp_path):
    from bigl.training.loop import DiscriminatorBank
    from bigl.training.translator_stage import TranslatorPair, load_translator, save_translator, translator_discriminators
    from bigl.models import TranslatorConfig

    config = load_config("smoke", [f"data.source_dir={phantom_cohort}", f"data.target_dir={phantom_cohort}"])
    pair = TranslatorPair(TranslatorConfig(**config["translator"]))
    bank = DiscriminatorBank(translator_discriminators(config, "paired"))
    path = save_translator(tmp_path / "translator.safetensors", pair, bank, config=config, mode="paired", iterations=4)
    load_translator(path, config, torch.device("cpu"))
    damage(path, largest_tensor(path, "translator_s2t."))
    with pytest.raises(ConfigError, match="translator file .* is damaged"):
        load_translator(path, config, torch.device("cpu"))


def test_translator_files_must_share_the_intensity_normalisation(phantom_cohort, tmp_path):
    """A translator file written before preprocessing.intensity existed serves a config with the
    default (percentile); a translator of one normalisation never serves a stage 2 of the other."""
    from bigl.bundle import read_translator_file, write_translator_file
    from bigl.models import TranslatorConfig
    from bigl.training.loop import DiscriminatorBank
    from bigl.training.translator_stage import TranslatorPair, load_translator, save_translator, translator_discriminators

    config = load_config("smoke", [f"data.source_dir={phantom_cohort}", f"data.target_dir={phantom_cohort}"])
    pair = TranslatorPair(TranslatorConfig(**config["translator"]))
    bank = DiscriminatorBank(translator_discriminators(config, "paired"))
    path = save_translator(tmp_path / "translator.safetensors", pair, bank, config=config, mode="paired", iterations=4)
    metadata, tensors = read_translator_file(path)
    for key in ("intensity", "zscore_low", "zscore_high"):
        del metadata["preprocessing"][key]
    older = write_translator_file(tmp_path / "older.safetensors", tensors, metadata)
    load_translator(older, config, torch.device("cpu"))
    zscore = load_config("smoke", [f"data.source_dir={phantom_cohort}", f"data.target_dir={phantom_cohort}",
                                   "preprocessing.intensity=zscore"])
    for file in (path, older):
        with pytest.raises(ConfigError, match="does not fit this config: preprocessing"):
            load_translator(file, zscore, torch.device("cpu"))


def test_translator_files_from_a_newer_bigl_or_of_another_kind_are_refused(tmp_path, bundle_copy):
    from bigl.bundle import TRANSLATOR_FORMAT_VERSION, read_translator_file, write_translator_file

    tensors = {"translator_s2t.weight": torch.ones(2, 2)}
    path = write_translator_file(tmp_path / "translator.safetensors", tensors, {"mode": "paired"})
    metadata, read = read_translator_file(path)
    assert metadata["format_version"] == TRANSLATOR_FORMAT_VERSION and metadata["mode"] == "paired"
    assert torch.equal(read["translator_s2t.weight"], tensors["translator_s2t.weight"])
    newer = write_translator_file(tmp_path / "newer.safetensors", tensors, {"format_version": TRANSLATOR_FORMAT_VERSION + 1})
    with pytest.raises(ConfigError, match="newer BiGL") as caught:
        read_translator_file(newer)
    assert "upgrade BiGL" in caught.value.hint
    with pytest.raises(ConfigError, match="invalid format_version"):
        read_translator_file(write_translator_file(tmp_path / "bad.safetensors", tensors, {"format_version": "one"}))
    with pytest.raises(ConfigError, match="not a BiGL translator file") as caught:
        read_translator_file(bundle_copy)  # a model bundle given as adapt.translator_bundle
    assert "not the model" in caught.value.hint
    with pytest.raises(ConfigError, match="not found"):
        read_translator_file(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------- checkpoints


def toy_checkpoint(folder: Path, step: int) -> Path:
    return toy_adapt_checkpoint(step, folder)


@pytest.mark.parametrize("fill", [None, 0xFF], ids=["flipped-bits", "nan"])
def test_a_damaged_checkpoint_is_refused_and_the_previous_one_used(tmp_path, fill):
    toy_checkpoint(tmp_path, 2)
    newest = toy_checkpoint(tmp_path, 4)
    assert read_checkpoint(newest).step == 4
    if fill is not None:  # NaN weights are refused by value, with or without a checksum
        newest.write_bytes(without_checksum(newest, tmp_path / "old.safetensors").read_bytes())
    damage(newest, "model.segmenter.weight", fill=fill)
    with pytest.raises(ConfigError, match="is damaged" + (".*NaN or infinite" if fill is not None else "")):
        read_checkpoint(newest)
    assert latest_checkpoint(tmp_path, "adapt").step == 2


RESUME = ["adapt.method=source-only", "adapt.iterations=6", "run.checkpoint_every=2", "run.keep_checkpoints=2",
          "run.threads=1", "run.sample_every=0"]


@pytest.fixture(scope="module")
def finished_run(phantom_cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    run_training(load_config("smoke", [f"data.source_dir={phantom_cohort}", f"data.target_dir={phantom_cohort}", *RESUME]),
                 out, progress=False)
    return out


def interrupted_copy(finished_run: Path, tmp_path: Path) -> Path:
    """The finished run as if it had stopped just after its last checkpoint."""
    out = Path(shutil.copytree(finished_run, tmp_path / "run"))
    (out / "model.safetensors").unlink()
    return out


def resume(capsys, phantom_cohort: Path, out: Path) -> str:
    assert main(["train", "--config", "smoke", "--data", str(phantom_cohort), "--out", str(out), "--resume",
                 "--no-progress", *RESUME]) == 0
    return capsys.readouterr().err


def test_resume_uses_the_newest_checkpoint_that_verifies_and_says_so(phantom_cohort, finished_run, tmp_path, capsys):
    out = interrupted_copy(finished_run, tmp_path)
    newest = out / "checkpoints" / "adapt_00000006.safetensors"
    damage(newest, largest_tensor(newest, "model.segmenter."))
    err = resume(capsys, phantom_cohort, out)
    assert "skipped checkpoint" in err and "adapt_00000006.safetensors is damaged" in err
    assert "resuming stage adapt at step 4 from checkpoints/adapt_00000004.safetensors" in err
    event = [e for e in read_events(out / "events.jsonl") if e["event"] == "resume"][-1]
    assert event["step"] == 4 and event["checkpoint"] == "checkpoints/adapt_00000004.safetensors"
    assert "damaged" in event["skipped"][0]["message"]
    # resuming from step 4 retrains steps 5-6 exactly: the same weights as the uninterrupted run
    done, reference = load_bundle(out / "model.safetensors"), load_bundle(finished_run / "model.safetensors")
    for name, tensor in reference.segmenter.state_dict().items():
        assert torch.equal(tensor, done.segmenter.state_dict()[name]), name


def test_resume_says_when_no_checkpoint_verifies(phantom_cohort, finished_run, tmp_path, capsys):
    out = interrupted_copy(finished_run, tmp_path)
    for path in (out / "checkpoints").iterdir():
        damage(path, largest_tensor(path, "model.segmenter."), fill=0xFF)
    err = resume(capsys, phantom_cohort, out)
    assert "no adapt checkpoint reads back intact; stage adapt starts again at step 0" in err
    event = [e for e in read_events(out / "events.jsonl") if e["event"] == "resume"][-1]
    assert event["checkpoint"] is None and event["step"] == 0 and len(event["skipped"]) == 2
