"""Training configuration and the checks that stop a run before its first step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bigl.errors import ConfigError
from bigl.training import load_config, run_training
from bigl.training.config import READY_CONFIGS, config_differences, parse_override
from bigl.training.events import read_events
from bigl.training.sections import TrainingConfig


def smoke(data: Path, *overrides: str) -> dict:
    return load_config("smoke", [f"data.source_dir={data}", f"data.target_dir={data}", *overrides])


def last_error(out: Path) -> dict:
    events = read_events(out / "events.jsonl")
    assert events, "no event was logged"
    assert events[-1]["event"] == "error"
    assert isinstance(events[-1]["time"], float)
    return events[-1]


def expect_refusal(config: dict, out: Path, *, fragment: str, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        run_training(config, out, progress=False, **kwargs)
    assert fragment in str(caught.value)
    error = last_error(out)
    assert fragment in error["message"] + (error["hint"] or "")
    assert not (out / "checkpoints").exists(), "a refused run must not start training"
    return caught.value


@pytest.mark.parametrize("name", READY_CONFIGS)
def test_ready_configs_load_and_fit_their_networks(name):
    config = load_config(name)
    size = config["preprocessing"]["image_size"]
    assert size % 2 ** config["segmenter"]["depth"] == 0
    assert size % 2 ** config["translator"]["n_downsample"] == 0
    assert config["adapt"]["lambda_out"] == 0.001 and config["adapt"]["lambda_gtl"] == 0.1
    assert TrainingConfig.of(config).adapt.levels == ("feature", "position", "channel")


def test_paper_config_follows_the_paper():
    config = load_config("paper")
    adapt = config["adapt"]
    assert adapt["lr"] == 5e-3 and adapt["poly_power"] == 0.75 and adapt["discriminator_lr"] == 5e-5
    assert adapt["epochs"] == 150 and adapt["batch_size"] == 8
    assert config["translator_training"]["lambda_l1"] == 100.0


def test_overrides_parse_json_values_and_keep_paths_as_strings():
    assert parse_override("adapt.iterations=50") == ("adapt.iterations", 50)
    assert parse_override("adapt.output=false") == ("adapt.output", False)
    assert parse_override("data.cases=[\"a\", \"b\"]") == ("data.cases", ["a", "b"])
    assert parse_override("data.source_dir=/data/brats 18") == ("data.source_dir", "/data/brats 18")
    config = load_config("smoke", ["adapt.level_weights.position=0.5", "data.source_modality=T1n", "adapt.lr=1e-3"])
    assert config["adapt"]["level_weights"]["position"] == 0.5
    assert config["data"]["source_modality"] == "t1"
    assert config["adapt"]["lr"] == 1e-3


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("adapt.iteratons=5", "adapt.iterations"),  # typo: the hint names the right key
        ("adapt.level_weights.attention=1", "adapt.level_weights.attention"),
        ("training.lr=1", "training.lr"),
    ],
)
def test_unknown_keys_are_named(override, fragment):
    with pytest.raises(ConfigError) as caught:
        load_config("smoke", [override])
    assert fragment in str(caught.value)


def test_unknown_key_in_a_json_file(tmp_path):
    path = tmp_path / "my.json"
    path.write_text(json.dumps({"adapt": {"lamda_gtl": 0.5}}))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "adapt.lamda_gtl" in caught.value.message and "adapt.lambda_gtl" in caught.value.hint
    path.write_text("{\"adapt\": {\"iterations\": 5,}}")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(path)
    with pytest.raises(ConfigError, match="config not found"):
        load_config(tmp_path / "absent.json")


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("adapt.iterations=-5", "adapt.iterations"),
        ("translator_training.iterations=0", "translator_training.iterations"),
        ("adapt.batch_size=0", "adapt.batch_size"),
        ("preprocessing.image_size=36", "not divisible by 2**segmenter.depth"),
        ("preprocessing.image_size=8", "bottleneck"),
        ("adapt.gan_mode=wgan", "adapt.gan_mode"),
        ("adapt.method=cycada", "adapt.method"),
        ("adapt.output=1", "adapt.output"),
        ("adapt.lr=fast", "adapt.lr"),
        ("data.tumour_fraction=1.5", "data.tumour_fraction"),
        ("data.source_modality=pd", "unknown modality"),
        ("run.device=tpu", "run.device"),
        ("adapt.method=target-only", "data.target_labels"),
        ("segmenter.norm=group", "segmenter"),
        ("translator_training.decay_start=1.5", "translator_training.decay_start: must be in [0, 1], got 1.5"),
        ("translator_training.beta1=1", "translator_training.beta1: must be in [0, 1), got 1"),
        ("translator_training.pool_size=-1", "translator_training.pool_size: must be >= 0"),
        ("translator_training.mode=cyclic", "translator_training.mode: must be one of"),
        ("adapt.pseudo_threshold=0", "adapt.pseudo_threshold: must be in (0, 1)"),
        ("adapt.pseudo_views=flipped", "adapt.pseudo_views"),
        ("adapt.lr=0", "adapt.lr: must be > 0"),
        ("run.threads=0", "run.threads: must be > 0"),
        ("data.max_cases=0", "data.max_cases"),
    ],
)
def test_invalid_values_are_refused(override, fragment):
    with pytest.raises(ConfigError) as caught:
        load_config("smoke", [override])
    assert fragment in str(caught.value)


def test_every_default_keeps_its_own_value_rule():
    """The rules declared beside the defaults (bigl.training.sections) accept the defaults, and every
    rule-bearing key of the ready configs passes it."""
    import dataclasses

    from bigl.training.sections import RULE, SECTION_TYPES

    ruled = 0
    for cls in SECTION_TYPES.values():
        for item in dataclasses.fields(cls):
            rule = item.metadata.get(RULE)
            if rule is not None and item.default is not None:
                assert rule.problem(item.default) is None, (cls.__name__, item.name)
                ruled += 1
    assert ruled >= 40
    assert load_config("smoke", ["data.max_cases=null", "run.threads=null"])["run"]["threads"] is None


def test_run_control_keys_may_change_on_resume_but_nothing_else():
    old = load_config("smoke")
    new = load_config("smoke", ["run.log_every=7", "run.device=cpu", "data.workers=2"])
    assert config_differences(old, new) == []
    changed = load_config("smoke", ["adapt.lambda_gtl=0.5", "run.seed=3"])
    assert config_differences(old, changed) == ["adapt.lambda_gtl", "run.seed"]


def test_a_run_started_before_a_key_existed_resumes_while_the_key_keeps_its_default():
    """A config.json written before preprocessing.intensity existed lacks the key: it matches a config
    that leaves it at its default and differs from one that changes it."""
    old = load_config("smoke")
    for key in ("intensity", "zscore_low", "zscore_high"):
        del old["preprocessing"][key]
    assert config_differences(old, load_config("smoke")) == []
    assert config_differences(old, load_config("smoke", ["preprocessing.intensity=zscore"])) == ["preprocessing.intensity"]


# ------------------------------------------------------------------------------------------
# refusals before training (each leaves an error event in the log)


def test_source_folder_not_set(tmp_path):
    config = load_config("smoke")
    expect_refusal(config, tmp_path / "run", fragment="data.source_dir")


def test_empty_data_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_refusal(smoke(empty), tmp_path / "run", fragment="no BraTS-style cases")


def test_missing_modality(phantom_cohort, tmp_path):
    data = tmp_path / "no_flair"
    shutil.copytree(phantom_cohort, data)
    for path in data.rglob("*_flair.nii.gz"):
        path.unlink()
    expect_refusal(smoke(data, "data.target_modality=flair"), tmp_path / "run", fragment="flair")


def test_unknown_case_name(phantom_cohort, tmp_path):
    expect_refusal(smoke(phantom_cohort, 'data.cases=["Phantom_001", "Nobody_042"]'), tmp_path / "run", fragment="Nobody_042")


def test_target_only_without_target_labels(phantom_cohort, tmp_path):
    data = tmp_path / "unlabelled"
    shutil.copytree(phantom_cohort, data)
    next(data.rglob("*_seg.nii.gz")).unlink()
    config = smoke(data, "adapt.method=target-only", "data.target_labels=true")
    expect_refusal(config, tmp_path / "run", fragment="target-only trains on target labels")


def test_unlabelled_source_cases(phantom_cohort, tmp_path):
    data = tmp_path / "unlabelled"
    shutil.copytree(phantom_cohort, data)
    next(data.rglob("*_seg.nii.gz")).unlink()
    expect_refusal(smoke(data), tmp_path / "run", fragment="no label map")


def test_not_enough_disk(phantom_cohort, tmp_path, monkeypatch):
    real = shutil.disk_usage

    def tiny_disk(path):
        return real(path)._replace(free=10 * 2**20)

    monkeypatch.setattr(shutil, "disk_usage", tiny_disk)
    expect_refusal(smoke(phantom_cohort), tmp_path / "run", fragment="not enough disk space")


def test_disk_estimate_counts_the_weight_average_the_pseudo_labels_and_the_branch_point(phantom_cohort):
    from bigl.training.runner import estimate_disk_bytes

    plain = smoke(phantom_cohort)
    averaged = smoke(phantom_cohort, "adapt.ema_decay=0.99")
    self_training = smoke(phantom_cohort, "adapt.self_training_iterations=10")
    base = estimate_disk_bytes(plain, ["adapt"])
    assert estimate_disk_bytes(averaged, ["adapt"]) > base
    slices = 10_000
    size = self_training["preprocessing"]["image_size"]
    keep = self_training["run"]["keep_checkpoints"] + 1
    one_checkpoint = estimate_disk_bytes(smoke(phantom_cohort, f"run.keep_checkpoints={keep}"), ["adapt"]) - base
    # self-training keeps one more checkpoint (the branch point, before any pseudo-label), and pseudo-labels in the others
    assert estimate_disk_bytes(self_training, ["adapt"]) - base == one_checkpoint > 0
    assert estimate_disk_bytes(self_training, ["adapt"], slices) - base - one_checkpoint == keep * slices * size**2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda(phantom_cohort, tmp_path):
    expect_refusal(smoke(phantom_cohort, "run.device=cuda"), tmp_path / "run", fragment="CUDA")


def test_adapt_stage_needs_a_translator(phantom_cohort, tmp_path):
    error = expect_refusal(smoke(phantom_cohort), tmp_path / "run", fragment="needs the trained translator", stage="adapt")
    assert "--stage translator" in error.hint


def test_baselines_train_no_translator(phantom_cohort, tmp_path):
    expect_refusal(smoke(phantom_cohort, "adapt.method=source-only"), tmp_path / "run", fragment="trains no translator", stage="translator")


def test_existing_run_needs_resume_and_the_same_config(phantom_cohort, tmp_path):
    out = tmp_path / "run"
    run_training(smoke(phantom_cohort, "adapt.iterations=2", "translator_training.iterations=2"), out, progress=False)
    bundle_bytes = (out / "model.safetensors").read_bytes()
    expect_refusal_without_checkpoint_check(smoke(phantom_cohort), out, "already holds a training run")
    expect_refusal_without_checkpoint_check(
        smoke(phantom_cohort, "adapt.iterations=2", "translator_training.iterations=2", "adapt.lambda_gtl=0.5"),
        out,
        "adapt.lambda_gtl",
        resume=True,
    )
    assert (out / "model.safetensors").read_bytes() == bundle_bytes, "a refused run must not touch the results"
    # a finished run resumed with other run-control settings does nothing and keeps the bundle
    run_training(smoke(phantom_cohort, "adapt.iterations=2", "translator_training.iterations=2", "run.log_every=5"),
                 out, resume=True, progress=False)
    assert (out / "model.safetensors").read_bytes() == bundle_bytes


def expect_refusal_without_checkpoint_check(config: dict, out: Path, fragment: str, **kwargs) -> None:
    before = len(read_events(out / "events.jsonl"))
    with pytest.raises(ConfigError) as caught:
        run_training(config, out, progress=False, **kwargs)
    assert fragment in str(caught.value)
    events = read_events(out / "events.jsonl")
    assert len(events) == before + 1 and events[-1]["event"] == "error"


def test_a_refused_run_leaves_the_folder_usable(phantom_cohort, tmp_path):
    disjoint = ['data.cases=["Phantom_001", "Phantom_002"]', 'data.target_cases=["Phantom_003", "Phantom_004"]']
    out = tmp_path / "run"
    expect_refusal(smoke(phantom_cohort, *disjoint, "translator_training.mode=paired"), out, fragment="co-registered")
    assert not (out / "config.json").exists()
    run_training(smoke(phantom_cohort, *disjoint, "translator_training.iterations=2", "adapt.iterations=2"), out, progress=False)
    assert (out / "model.safetensors").is_file()
    assert read_events(out / "events.jsonl")[-1]["event"] == "done"
