"""Recipe switches beyond the paper: augmentation, self-training with pseudo-labels, CPU bfloat16,
several data folders per domain."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bigl.data.brats import find_cases
from bigl.errors import ConfigError, InputError
from bigl.losses import IGNORE_INDEX, segmentation_loss
from bigl.training import augment, load_config, run_training
from bigl.training.adapt_stage import AdaptTrainer
from bigl.training.events import read_events
from bigl.training.loop import RunContext
from bigl.training.runner import TrainingRun

from test_training_resume import SimulatedCrash, assert_same_weights, crash_at

SELF_TRAINING = ["adapt.iterations=4", "adapt.self_training_iterations=4", "adapt.self_training_rounds=2",
                 "translator_training.iterations=3", "run.checkpoint_every=1", "run.threads=1"]


def smoke(data, *overrides: str) -> dict:
    folders = data if isinstance(data, (str, Path)) else json.dumps([str(d) for d in data])
    return load_config("smoke", [f"data.source_dir={folders}", f"data.target_dir={folders}", *overrides])


def crash_then_resume(config: dict, out: Path, at_step: int, monkeypatch, between=None) -> Path:
    """Run until adaptation step ``at_step`` fails (a simulated power cut), call ``between()``
    (e.g. to change the machine), resume; returns the bundle."""
    repair = crash_at(monkeypatch, AdaptTrainer, at_step)
    with pytest.raises(SimulatedCrash):
        run_training(config, out, progress=False)
    repair()
    if between is not None:
        between()
    return run_training(config, out, resume=True, progress=False)


# ------------------------------------------------------------------------------------------
# several data folders


@pytest.fixture(scope="module")
def two_folders(phantom_cohort, tmp_path_factory) -> list[Path]:
    """The phantom cohort split into two data folders (two cases each)."""
    root = tmp_path_factory.mktemp("folders")
    cases = sorted(p for p in phantom_cohort.iterdir() if p.is_dir())
    folders = [root / "site_a", root / "site_b"]
    for i, case in enumerate(cases):
        shutil.copytree(case, folders[i % 2] / case.name)
    return folders


def test_find_cases_reads_several_folders_as_one_data_set(two_folders, phantom_cohort):
    together = find_cases(two_folders, modalities=("t1",))
    assert [c.name for c in together] == [c.name for c in find_cases(phantom_cohort, modalities=("t1",))]
    assert {c.folder.parent for c in together} == set(two_folders)


def test_a_case_in_two_folders_is_refused_naming_both(two_folders, tmp_path):
    twin = tmp_path / "twin"
    first = sorted(p for p in two_folders[0].iterdir())[0]
    shutil.copytree(first, twin / first.name)
    with pytest.raises(InputError, match=first.name) as info:
        find_cases([two_folders[0], twin])
    assert str(twin) in info.value.message and str(two_folders[0]) in info.value.message


def test_a_missing_folder_in_the_list_is_named(two_folders, tmp_path):
    with pytest.raises(InputError, match="not found: .*absent"):
        find_cases([two_folders[0], tmp_path / "absent"])


def test_config_takes_a_list_of_folders_and_refuses_bad_lists(two_folders):
    config = smoke(two_folders)
    assert config["data"]["source_dir"] == [str(d) for d in two_folders]
    for bad in ("[]", "[1, 2]", '["", "x"]'):
        with pytest.raises(ConfigError, match="data.source_dir"):
            load_config("smoke", [f"data.source_dir={bad}"])


def test_bigl_train_repeats_data_folders_into_a_list(two_folders, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "bigl", "train", "--config", "smoke", "--out", str(out), "--no-progress",
            "--data", str(two_folders[0]), "--data", str(two_folders[1]), "adapt.iterations=2", "translator_training.iterations=2"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["source_dir"] == [str(d) for d in two_folders]
    data = next(e for e in read_events(out / "events.jsonl") if e["event"] == "data")
    assert len(data["labelled"]["case_names"]) == 4


# ------------------------------------------------------------------------------------------
# augmentation


def brain_batch(n: int = 6, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Slices with a bright disc of 'brain' (with a gradient) and a label square inside it."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 3) ** 2
    image = torch.where(disc, 0.2 + 0.5 * xx / size, torch.tensor(-1.0))
    labels = torch.zeros(size, size, dtype=torch.long)
    labels[size // 2 - 3:size // 2 + 3, size // 2 - 3:size // 2 + 3] = 2
    return image.expand(n, 1, size, size).clone(), labels.expand(n, size, size).clone()


def test_spatial_augmentation_is_reproducible_and_keeps_labels_with_the_image():
    images, labels = brain_batch()
    a = augment.spatial(images, labels, np.random.default_rng(3))
    b = augment.spatial(images, labels, np.random.default_rng(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    warped, moved = a
    assert not torch.equal(warped, images)  # some slice was transformed
    assert set(moved.unique().tolist()) <= {0, 2}  # nearest-neighbour labels stay labels
    # labels stay on brain: every labelled pixel is inside the warped disc
    assert bool((warped[:, 0][moved == 2] > -0.99).all())
    assert float(warped.min()) >= -1.0 - 1e-6 and float(warped[:, :, 0, 0].max()) == pytest.approx(-1.0)


def test_intensity_augmentation_changes_brain_only():
    images, _ = brain_batch()
    out = augment.intensity(images, np.random.default_rng(5))
    background = images == -1.0
    assert torch.equal(out[background], images[background])
    assert bool((out[~background] > -1.0).all()) and float(out.max()) <= 1.0
    assert not torch.allclose(out[~background], images[~background])
    assert torch.equal(out, augment.intensity(images, np.random.default_rng(5)))


def test_inversion_mirrors_the_brain_of_the_chosen_slices_only():
    images, _ = brain_batch()
    background = images == -1.0
    everything = augment.invert(images, np.random.default_rng(0), 1.0)
    assert torch.equal(everything[background], images[background])
    assert bool((everything[~background] > -1.0).all())
    u, mirrored = (images[~background] + 1) / 2, (everything[~background] + 1) / 2
    torch.testing.assert_close(mirrored, (1 - u).clamp_min(1e-3))
    assert torch.equal(augment.invert(images, np.random.default_rng(0), 0.0), images)
    some = augment.invert(images, np.random.default_rng(3), 0.5)
    changed = [not torch.equal(some[i], images[i]) for i in range(len(images))]
    assert any(changed) and not all(changed)
    assert torch.equal(some, augment.invert(images, np.random.default_rng(3), 0.5))
    torch.testing.assert_close(augment.invert_all(everything)[~background], images[~background].clamp(-1 + 2e-3, 1 - 2e-3))


def test_a_bigl_model_records_its_confidence_on_the_unlabelled_target_scans(phantom_cohort, tmp_path):
    """Label-free, read off the run: each unlabelled target scan's tumour confidence under the
    shipped segmenter (in the event log), their mean and the scans below the floor (in the bundle),
    as a predictor finds them on the scans themselves."""
    from bigl.bundle import read_metadata
    from bigl.inference import BiGLPredictor
    from bigl.plausibility import CONFIDENCE_FLOOR

    bundle = run_training(smoke(phantom_cohort, "adapt.iterations=2", "translator_training.iterations=2", "run.threads=1"),
                          tmp_path / "run", progress=False)
    recorded = read_metadata(bundle)["training"]["target_confidence"]
    (event,) = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e["event"] == "target_confidence"]
    per_scan = event["per_scan"]
    assert recorded["scans"] == len(per_scan) >= 2 and recorded["floor"] == CONFIDENCE_FLOOR
    found = [value for value in per_scan.values() if value is not None]
    assert found and recorded["mean"] == pytest.approx(np.mean(found), abs=1e-4)
    assert recorded["unsure"] == [name for name, value in per_scan.items() if value is None or value < CONFIDENCE_FLOOR]
    predictor = BiGLPredictor.from_path(bundle, device="cpu")
    cases = {case.name: case for case in find_cases(phantom_cohort)}
    for name, value in per_scan.items():
        image = cases[name].load_image("t2")
        confidence = predictor.predict(image.data, image.affine, modality="t2").confidence
        assert (value is None) == (confidence is None)
        if value is not None:
            assert value == pytest.approx(confidence, abs=0.01)  # training keeps the slices in float16
    for method in ("source-only", "target-only"):  # no target scans without labels, nothing to record
        other = run_training(smoke(phantom_cohort, "adapt.iterations=1", "run.threads=1", f"adapt.method={method}",
                                   *(["data.target_labels=true"] if method == "target-only" else [])),
                             tmp_path / method, progress=False)
        assert "target_confidence" not in read_metadata(other)["training"]


def test_tumour_brightening_raises_the_labelled_tumour_of_the_chosen_slices_only():
    images, labels = brain_batch()
    labels[0] = 0  # a slice without tumour has nothing to brighten
    background, tumour = images == -1.0, (labels > 0).unsqueeze(1)
    everything = augment.tumour_brightening(images, labels, np.random.default_rng(0), 1.0)
    assert torch.equal(everything[background], images[background]) and torch.equal(everything[0], images[0])
    lift = everything - images
    low, high = augment.TUMOUR_BRIGHTENING_RANGE
    grow = lambda mask: torch.nn.functional.max_pool2d(mask.float()[None], 3, stride=1, padding=1)[0].bool()  # noqa: E731
    for i in range(1, len(images)):
        interior = ~grow(~tumour[i])  # the tumour less its outer pixel
        inside = lift[i][interior]
        assert 2 * low < float(inside[0]) <= 2 * high + 1e-6  # one shift per slice, drawn in the range
        assert torch.allclose(inside, inside[0])  # the whole interior alike
        edge = lift[i][grow(tumour[i]) & ~interior]
        assert bool((edge > 0).all()) and bool((edge < inside[0]).all())  # a soft edge, either side of the outline
        assert torch.count_nonzero(lift[i][~grow(tumour[i])]) == 0  # beyond it: unchanged
    assert float(everything.max()) <= 1.0
    assert torch.equal(augment.tumour_brightening(images, labels, np.random.default_rng(0), 0.0), images)
    some = augment.tumour_brightening(images, labels, np.random.default_rng(3), 0.5)
    changed = [not torch.equal(some[i], images[i]) for i in range(1, len(images))]
    assert any(changed) and not all(changed)
    assert torch.equal(some, augment.tumour_brightening(images, labels, np.random.default_rng(3), 0.5))


def test_the_tumour_contrast_benchmark_measures_the_brightening():
    """benchmarks/tumour_contrast.py's measure: the tumour's median minus the rest of the brain's,
    raised by exactly the shift a slice's tumour interior was brightened by."""
    from bigl.testing import load_script

    script = load_script(Path(__file__).resolve().parents[2] / "benchmarks" / "tumour_contrast.py")
    images, labels = brain_batch(n=1, size=64)
    images = torch.where(images > -1.0, 0.0, -1.0)  # a flat brain: nothing clipped at the top
    labels[:, 20:44, 20:44] = 2  # a large square, so its median lies in the interior
    before = script.tumour_contrast(images[:, 0].numpy(), labels.numpy())
    assert before == 0.0
    labels[:, 30:34, 30:34] = 1  # a core inside the oedema, the same intensity: the whole tumour counts
    brightened = augment.tumour_brightening(images, labels, np.random.default_rng(1), 1.0)
    shift = float((brightened - images)[0, 0, 32, 32])
    assert shift > 0
    after = script.tumour_contrast(brightened[:, 0].numpy(), labels.numpy())
    assert after == pytest.approx(shift, abs=1e-6)  # the median sits in the interior
    assert np.isnan(script.tumour_contrast(images[:, 0].numpy(), np.zeros_like(labels.numpy())))


def test_the_segmenter_sees_translated_source_slices_with_their_tumour_brightened(phantom_cohort, tmp_path):
    trainer, batch, seen = first_step_inputs(phantom_cohort, tmp_path / "run", "data.augment_tumour_brightening=1.0")
    x_s, fake_t = seen["segmenter_input"].chunk(4)[:2]
    assert torch.equal(x_s, batch["x"])  # the source slices as they are
    lift = fake_t - seen["translated"]
    tumour = (batch["y"] > 0).unsqueeze(1)
    assert tumour.any() and float(lift[tumour].mean()) > 0
    ring = torch.nn.functional.max_pool2d(tumour.float(), 3, stride=1, padding=1).bool()
    assert torch.count_nonzero(lift[~ring]) == 0
    assert trainer.training_metadata()["augmentation"]["tumour_brightening_probability"] == 1.0
    for value in ("1.5", "-0.1", "true"):
        with pytest.raises(ConfigError, match="augment_tumour_brightening"):
            smoke(phantom_cohort, f"data.augment_tumour_brightening={value}")


def first_step_inputs(phantom_cohort, folder, *overrides):
    """What the networks really receive in the first stage-2 step (forward hooks): the stage-2
    trainer, its batch, and the translator's input and output and the segmenter's input."""
    run = TrainingRun(smoke(phantom_cohort, "run.threads=1", *overrides), folder, progress=False)
    run.prepare()
    run.translator_trainer().finish()
    trainer = run.adapt_trainer()
    seen = {}
    hooks = [
        trainer.translators.s2t.register_forward_hook(
            lambda module, inputs, output: seen.update(translator_input=inputs[0].detach().clone(), translated=output.detach().clone())),
        trainer.segmenter.register_forward_pre_hook(lambda module, inputs: seen.update(segmenter_input=inputs[0].detach().clone())),
    ]
    batch = trainer.batch(0)
    trainer.segmenter_step(batch)
    for hook in hooks:
        hook.remove()
    return trainer, batch, seen


def test_the_segmenter_sees_inverted_source_slices_and_the_translator_the_originals(phantom_cohort, tmp_path):
    trainer, batch, seen = first_step_inputs(phantom_cohort, tmp_path / "run", "data.augment_invert=1.0")
    assert torch.equal(seen["translator_input"], batch["x"])
    x_s = seen["segmenter_input"].chunk(4)[0]
    torch.testing.assert_close(x_s, augment.invert_all(batch["x"]))
    assert trainer.training_metadata()["augmentation"]["invert"] == 1.0


def test_inversion_probability_is_checked(phantom_cohort):
    for value in ("1.5", "-0.1", "true"):
        with pytest.raises(ConfigError, match="augment_invert"):
            smoke(phantom_cohort, f"data.augment_invert={value}")


def test_augmented_training_step_uses_the_switches(phantom_cohort, tmp_path, monkeypatch):
    calls = {"spatial": 0, "intensity": 0}
    for name in calls:
        original = getattr(augment, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(augment, name, counting)
    run_training(smoke(phantom_cohort, "adapt.iterations=2", "translator_training.iterations=2", "run.threads=1",
                       "data.augment_spatial=true", "data.augment_intensity=true"), tmp_path / "run", progress=False)
    assert calls["spatial"] == 2  # source batch of each adaptation step
    assert calls["intensity"] == 4  # x_s and x_s->t as the segmenter sees them, each step


def test_the_translator_gets_the_unaugmented_source_and_its_output_keeps_the_source_background(phantom_cohort, tmp_path):
    """The translator gets x_s as sampled; the segmenter x_s and x_s->t each augmented once, x_s->t
    with the source's background."""
    _, batch, seen = first_step_inputs(phantom_cohort, tmp_path / "run", "data.augment_intensity=true")
    assert torch.equal(seen["translator_input"], batch["x"])  # no intensity change before translation
    x_s, x_s2t, x_t, _ = seen["segmenter_input"].chunk(4)
    assert not torch.equal(x_s, batch["x"])
    assert torch.equal(x_s, batch["augment_labelled"](batch["x"]))  # augmented once
    assert torch.equal(x_s2t, batch["augment_translated"](seen["translated"]))  # augmented once, after translation
    background = ~augment.brain_of(batch["x"])
    assert bool((x_s2t[background] == -1.0).all())
    assert torch.equal(x_t, batch["x_t"])  # the real target is not augmented


def test_augmentation_of_a_shard_equals_that_part_of_the_global_batch():
    images, labels = brain_batch(n=4)
    whole, whole_labels = augment.spatial(images, labels, np.random.default_rng(1))
    half, half_labels = augment.spatial(images[2:], labels[2:], np.random.default_rng(1), batch=4, rows=slice(2, 4))
    assert torch.allclose(half, whole[2:]) and torch.equal(half_labels, whole_labels[2:])
    bright = augment.intensity(images, np.random.default_rng(2))
    part = augment.intensity(images[2:], np.random.default_rng(2), batch=4, rows=slice(2, 4))
    assert torch.allclose(part, bright[2:])


# ------------------------------------------------------------------------------------------
# pseudo-label loss


def test_ignored_voxels_take_no_part_in_the_segmentation_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8)
    target = torch.randint(0, 4, (2, 8, 8))
    target[:, :4] = IGNORE_INDEX
    changed = logits.clone()
    changed[:, :, :4] = torch.randn(2, 4, 4, 8) * 5  # only where the target is ignored
    a = segmentation_loss(logits, target, ignore_index=IGNORE_INDEX)
    b = segmentation_loss(changed, target, ignore_index=IGNORE_INDEX)
    assert float(a) == pytest.approx(float(b), rel=1e-5)
    everything_ignored = torch.full_like(target, IGNORE_INDEX)
    logits.requires_grad_(True)
    loss = segmentation_loss(logits, everything_ignored, ignore_index=IGNORE_INDEX)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(logits.grad.abs().sum()) == 0.0
    with pytest.raises(ValueError, match="class indices"):
        segmentation_loss(logits, everything_ignored)  # without ignore_index, 255 is no class


# ------------------------------------------------------------------------------------------
# self-training


def test_self_training_config_is_checked(phantom_cohort):
    with pytest.raises(ConfigError, match="rounds"):
        smoke(phantom_cohort, "adapt.self_training_iterations=2", "adapt.self_training_rounds=3")
    with pytest.raises(ConfigError, match="translator frozen"):
        smoke(phantom_cohort, "adapt.self_training_iterations=5", "adapt.finetune_translator=true")
    with pytest.raises(ConfigError, match="pseudo_threshold"):
        smoke(phantom_cohort, "adapt.pseudo_threshold=1.0")
    with pytest.raises(ConfigError, match="pseudo_views"):
        smoke(phantom_cohort, "adapt.pseudo_views=source")


def test_baselines_train_without_the_self_training_steps(phantom_cohort, tmp_path):
    """A config that self-trains (as the reference config does) trains the baselines too: they have
    no unlabelled scans, so their runs are the adaptation steps alone."""
    config = smoke(phantom_cohort, "adapt.method=source-only", "adapt.iterations=3", "adapt.self_training_iterations=5",
                   "run.threads=1")
    run_training(config, tmp_path / "run", progress=False)
    events = read_events(tmp_path / "run" / "events.jsonl")
    assert [(e["stage"], e["total"]) for e in events if e["event"] == "start"] == [("adapt", 3)]
    plan = next(e for e in events if e["event"] == "plan")
    assert (plan["translator_steps"], plan["adapt_steps"], plan["self_training_steps"]) == (0, 3, 0)


def test_pseudo_labels_from_the_target_view_alone_ignore_the_translation(phantom_cohort, tmp_path, monkeypatch):
    """With pseudo_views "target" the translated view takes no part: a translator that wipes the
    image changes nothing; with "both" it does."""
    pseudo = {}
    for views in ("target", "both"):
        for wipe in (False, True):
            run = TrainingRun(smoke(phantom_cohort, *SELF_TRAINING, f"adapt.pseudo_views={views}"),
                              tmp_path / f"{views}-{wipe}", progress=False)
            run.prepare()
            run.translator_trainer().finish()
            trainer: AdaptTrainer = run.adapt_trainer()
            if wipe:
                monkeypatch.setattr(trainer.translators.t2s, "forward", lambda x: torch.zeros_like(x))
            trainer.make_pseudo_labels(0)
            pseudo[views, wipe] = trainer.pseudo
            monkeypatch.undo()
    np.testing.assert_array_equal(pseudo["target", False], pseudo["target", True])
    assert not np.array_equal(pseudo["both", False], pseudo["both", True])


def test_inverted_pseudo_labels_average_the_mirrored_view_and_ignore_the_translation(phantom_cohort, tmp_path, monkeypatch):
    """pseudo_views "inverted": Phi(x_t) with Phi(mirrored x_t); the translator takes no part."""
    pseudo = {}
    for views, wipe in (("target", False), ("inverted", False), ("inverted", True)):
        run = TrainingRun(smoke(phantom_cohort, *SELF_TRAINING, f"adapt.pseudo_views={views}"), tmp_path / f"{views}-{wipe}",
                          progress=False)
        run.prepare()
        run.translator_trainer().finish()
        trainer: AdaptTrainer = run.adapt_trainer()
        if wipe:
            monkeypatch.setattr(trainer.translators.t2s, "forward", lambda x: torch.zeros_like(x))
        calls = []
        original = augment.invert_all
        monkeypatch.setattr(augment, "invert_all", lambda x: calls.append(len(x)) or original(x))
        trainer.make_pseudo_labels(0)
        monkeypatch.undo()
        pseudo[views, wipe] = trainer.pseudo
        assert sum(calls) == (len(trainer.pseudo) if views == "inverted" else 0)
    np.testing.assert_array_equal(pseudo["inverted", False], pseudo["inverted", True])
    assert not np.array_equal(pseudo["target", False], pseudo["inverted", False])


def test_pseudo_labels_keep_confident_voxels_and_the_most_confident_share_of_each_class(phantom_cohort, tmp_path):
    run = TrainingRun(smoke(phantom_cohort, *SELF_TRAINING, "adapt.pseudo_threshold=0.99",
                            "adapt.pseudo_class_fraction=0.25"), tmp_path / "run", progress=False)
    run.prepare()
    run.translator_trainer().finish()
    trainer: AdaptTrainer = run.adapt_trainer()
    trainer.make_pseudo_labels(0)
    pseudo, unlabelled = trainer.pseudo, run.ctx.data.unlabelled
    assert pseudo.shape == unlabelled.images.shape and pseudo.dtype == np.uint8
    assert set(np.unique(pseudo).tolist()) <= {0, 1, 2, 3, IGNORE_INDEX}
    event = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e["event"] == "pseudo_labels"][-1]
    # an untrained network is nowhere 99 % sure: each class keeps about its most confident quarter
    for share in event["kept_per_class"].values():
        assert 0.2 <= share <= 0.3
    assert event["ignored"] == pytest.approx(float((pseudo == IGNORE_INDEX).mean()), abs=1e-4)


def test_pseudo_label_edges_are_refined_on_each_cases_scan_in_3d():
    """Slices of two cases, in mixed row order, go back into their volumes: the result is the 3D
    refinement of each case (its voxel size included), which moves a too-large tumour to the scan's."""
    from bigl.postprocess import refine_edges
    from bigl.training.adapt_stage import _refine_pseudo_edges
    from bigl.training.data import SliceSet
    from test_postprocess import dice, sphere, tumour_scan

    image, tumour = tumour_scan(10)
    scaled = ((image - image.min()) / (image.max() - image.min()) * 2 - 1).astype(np.float16)
    scaled[image == 0] = -1
    predicted = np.where(sphere(image.shape, (26, 26, 26), 13), 2, 0).astype(np.uint8)
    kept = np.arange(4, 48)  # slices with brain
    order = np.random.default_rng(0).permutation(2 * len(kept))
    images = np.concatenate([scaled[kept], scaled[kept]])[order]
    labels = np.concatenate([predicted[kept], np.zeros_like(predicted[kept])])[order]
    slices = SliceSet(modality="t2", images=images, labels=None, case_names=["a", "b"],
                      case_index=np.repeat([0, 1], len(kept)).astype(np.int32)[order],
                      slice_index=np.concatenate([kept, kept]).astype(np.int32)[order],
                      flip_axis=np.zeros(2 * len(kept), dtype=np.int8),
                      case_spacing=np.array([[1.0, 1.0, 1.0], [2.0, 1.0, 1.0]], dtype=np.float32))
    refined = _refine_pseudo_edges(slices, labels)
    case_a = np.argsort(order)[:len(kept)]  # rows of case a, in slice order
    expected = refine_edges(predicted[kept], scaled[kept].astype(np.float32), (1.0, 1.0, 1.0), brain=scaled[kept] > -1 + 1e-3)
    np.testing.assert_array_equal(refined[case_a], expected)
    assert dice(refined[case_a] > 0, tumour[kept]) > 0.9 > dice(predicted[kept] > 0, tumour[kept])
    assert not refined[np.argsort(order)[len(kept):]].any()  # case b has no tumour: left as it is
    assert labels.max() == 2 and np.array_equal(labels[case_a], predicted[kept])  # the input is left as it was


def test_prepared_slices_know_their_voxel_size():
    from bigl.data.preprocess import SliceGeometry

    geometry = SliceGeometry(original_shape=(240, 240, 155), bbox=((20, 200), (30, 220), (0, 150)), slice_axis=2,
                             square=192, pad=((6, 6), (1, 1)), image_size=96)
    assert geometry.slice_spacing((1.0, 0.9, 3.0)) == (3.0, 2.0, pytest.approx(1.8))


def test_refined_pseudo_labels_keep_the_voxels_the_refinement_moves(phantom_cohort, tmp_path, monkeypatch):
    """With pseudo_refine_edges the moved voxels take the refined class even where the network was
    unsure, every other voxel is as without it, and the event log counts the moves."""
    from bigl.training import adapt_stage

    pseudo, moved = {}, {}
    for refine in (False, True):
        run = TrainingRun(smoke(phantom_cohort, *SELF_TRAINING, "adapt.pseudo_threshold=0.99",
                                f"adapt.pseudo_refine_edges={str(refine).lower()}"), tmp_path / str(refine), progress=False)
        run.prepare()
        run.translator_trainer().finish()
        trainer: AdaptTrainer = run.adapt_trainer()

        def grow(slices, predicted):  # a stand-in refinement: one block of every slice becomes oedema
            out = predicted.copy()
            out[:, :4, :4] = 2
            moved["mask"] = out != predicted
            return out

        monkeypatch.setattr(adapt_stage, "_refine_pseudo_edges", grow)
        trainer.make_pseudo_labels(0)
        monkeypatch.undo()
        pseudo[refine] = trainer.pseudo
        event = [e for e in read_events(tmp_path / str(refine) / "events.jsonl") if e["event"] == "pseudo_labels"][-1]
        assert ("edge_added" in event) == refine
    mask = moved["mask"]
    assert mask.any()
    assert (pseudo[True][mask] == 2).all()
    np.testing.assert_array_equal(pseudo[True][~mask], pseudo[False][~mask])
    assert (pseudo[False][mask] == IGNORE_INDEX).any()  # some were too unsure to be kept without it


def test_self_training_phase_trains_on_pseudo_labels_without_adversarial_terms(phantom_cohort, tmp_path):
    out = tmp_path / "run"
    bundle = run_training(smoke(phantom_cohort, *SELF_TRAINING), out, progress=False)
    events = read_events(out / "events.jsonl")
    rounds = [e["round"] for e in events if e["event"] == "pseudo_labels"]
    assert rounds == [0, 1]
    steps = {e["step"]: e for e in events if e["event"] == "step" and e["stage"] == "adapt"}
    assert "seg_pseudo" not in steps[4]["losses"] and "adv_feature" in steps[4]["losses"]
    assert "seg_pseudo" in steps[5]["losses"] and "adv_feature" not in steps[5]["losses"]
    assert steps[5]["lr"]["segmenter"] == pytest.approx(5e-4)
    from bigl.bundle import load_bundle

    training = load_bundle(bundle).metadata["training"]
    assert training["iterations"] == {"adapt": 4, "self_training": 4, "translator": 3}
    assert training["self_training"]["self_training_rounds"] == 2


def test_every_asked_round_happens_when_rounds_do_not_divide_the_steps(phantom_cohort, tmp_path):
    out = tmp_path / "run"
    run_training(smoke(phantom_cohort, "adapt.iterations=2", "adapt.self_training_iterations=5", "adapt.self_training_rounds=4",
                       "translator_training.iterations=2", "run.threads=1", "run.checkpoint_every=10"), out, progress=False)
    assert [e["round"] for e in read_events(out / "events.jsonl") if e["event"] == "pseudo_labels"] == [0, 1, 2, 3]


def test_resume_inside_self_training_reproduces_the_uninterrupted_run(phantom_cohort, tmp_path, monkeypatch):
    config = smoke(phantom_cohort, *SELF_TRAINING)
    reference = tmp_path / "reference"
    run_training(config, reference, progress=False)
    out = tmp_path / "run"
    crash_then_resume(config, out, 7, monkeypatch)  # second self-training round, its pseudo-labels made at step 6
    rounds = [e["round"] for e in read_events(out / "events.jsonl") if e["event"] == "pseudo_labels"]
    assert rounds == [0, 1]  # the resumed run took round 1's pseudo-labels from the checkpoint
    assert_same_weights(out / "model.safetensors", reference / "model.safetensors")


# ------------------------------------------------------------------------------------------
# CPU bfloat16


def test_cpu_bfloat16_autocast_follows_the_setting_and_the_cpu(phantom_cohort, tmp_path, monkeypatch):
    import bigl.training.loop as loop

    run = TrainingRun(smoke(phantom_cohort, "run.threads=1"), tmp_path / "run", progress=False)
    ctx: RunContext = run.prepare()
    monkeypatch.setattr(loop, "cpu_supports_bf16", lambda: True)
    assert ctx.precision == "bfloat16"
    conv = torch.nn.Conv2d(1, 2, 3)
    with ctx.autocast():
        assert conv(torch.randn(1, 1, 8, 8)).dtype == torch.bfloat16
    asked = ctx.config
    ctx.config = asked.replace("run", cpu_bf16=False)
    assert ctx.precision == "float32"
    ctx.config = asked
    monkeypatch.setattr(loop, "cpu_supports_bf16", lambda: False)
    assert ctx.precision == "float32"
    with ctx.autocast():
        assert conv(torch.randn(1, 1, 8, 8)).dtype == torch.float32


def test_a_bfloat16_run_trains_with_float32_weights(phantom_cohort, tmp_path, monkeypatch):
    import bigl.training.loop as loop

    monkeypatch.setattr(loop, "cpu_supports_bf16", lambda: True)
    out = tmp_path / "run"
    bundle = run_training(smoke(phantom_cohort, "adapt.iterations=2", "translator_training.iterations=2", "run.threads=1"),
                          out, progress=False)
    starts = [e for e in read_events(out / "events.jsonl") if e["event"] == "start"]
    assert {e["precision"] for e in starts} == {"bfloat16"}
    from safetensors import safe_open

    with safe_open(str(bundle), framework="pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float32}


# ------------------------------------------------------------------------------------------
# weight averaging


def test_weight_average_forgets_the_start_and_then_follows_with_the_decay():
    from bigl.training.loop import weight_average

    module = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(100.0)  # the "initial" weights
    average = weight_average(module, 0.9)
    average.update_parameters(module)  # first update copies
    with torch.no_grad():
        module.weight.fill_(0.0)
    for _ in range(60):
        average.update_parameters(module)
    # a plain decay-0.9 average would be at 100 * 0.9**60 = 0.18; the ramp forgets faster
    assert float(average.module.weight.detach()) < 0.18
    for n in (61, 200):  # then the rate is min(0.9, (1 + n) / (10 + n)), n = updates so far
        while int(average.n_averaged) < n:
            average.update_parameters(module)
        before = float(average.module.weight.detach())
        with torch.no_grad():
            module.weight.fill_(1.0)
        average.update_parameters(module)
        rate = min(0.9, (1 + n) / (10 + n))
        assert float(average.module.weight.detach()) == pytest.approx(before + (1.0 - before) * (1.0 - rate), rel=1e-5)


def test_ema_decay_is_checked(phantom_cohort):
    for bad in ("1.0", "-0.1", "true"):
        with pytest.raises(ConfigError, match="adapt.ema_decay"):
            smoke(phantom_cohort, f"adapt.ema_decay={bad}")


def test_an_averaged_run_ships_the_average_and_resumes_exactly(phantom_cohort, tmp_path, monkeypatch):
    from bigl.bundle import load_bundle

    from test_training_resume import tensors

    config = smoke(phantom_cohort, "adapt.iterations=6", "translator_training.iterations=2", "adapt.ema_decay=0.5",
                   "run.checkpoint_every=2", "run.threads=1")
    reference = tmp_path / "reference"
    bundle = run_training(config, reference, progress=False)
    assert "moving average" in load_bundle(bundle).metadata["training"]["model_selection"]
    checkpoint = tensors(sorted((reference / "checkpoints").glob("adapt_*.safetensors"))[-1])
    live = {k.split(".", 2)[-1]: v for k, v in checkpoint.items() if k.startswith("model.segmenter.")}
    averaged = {k.split(".", 3)[-1]: v for k, v in checkpoint.items() if k.startswith("model.segmenter_ema.module.")}
    shipped = {k.split(".", 1)[1]: v for k, v in tensors(bundle).items() if k.startswith("segmenter.")}
    assert live and averaged.keys() == live.keys() and shipped.keys() == live.keys()
    assert all(torch.equal(shipped[k], averaged[k]) for k in shipped)
    assert not all(torch.equal(shipped[k], live[k]) for k in shipped)

    out = tmp_path / "run"
    crash_then_resume(config, out, 5, monkeypatch)
    assert_same_weights(out / "model.safetensors", reference / "model.safetensors")


def test_a_resume_in_another_precision_is_announced_and_recorded(phantom_cohort, tmp_path, monkeypatch):
    import bigl.training.loop as loop
    from bigl.bundle import load_bundle

    config = smoke(phantom_cohort, "adapt.iterations=4", "translator_training.iterations=2", "run.checkpoint_every=2",
                   "run.threads=1")
    out = tmp_path / "run"
    monkeypatch.setattr(loop, "cpu_supports_bf16", lambda: True)
    # resumed on a CPU without bfloat16
    bundle = crash_then_resume(config, out, 3, monkeypatch, between=lambda: monkeypatch.setattr(loop, "cpu_supports_bf16", lambda: False))
    warnings = [e for e in read_events(out / "events.jsonl") if e["event"] == "warning"]
    assert len(warnings) == 1 and "bfloat16 before the interruption and goes on in float32" in warnings[0]["message"]
    assert load_bundle(bundle).metadata["training"]["precision"] == "bfloat16, then float32"


def test_the_dice_switch_reaches_every_segmentation_loss(phantom_cohort, tmp_path, monkeypatch):
    import bigl.training.adapt_stage as adapt_stage

    with pytest.raises(ConfigError, match="adapt.dice"):
        smoke(phantom_cohort, "adapt.dice=focal")
    seen = []
    original = adapt_stage.segmentation_loss

    def recording(*args, dice="generalised", **kwargs):
        seen.append(dice)
        return original(*args, dice=dice, **kwargs)

    monkeypatch.setattr(adapt_stage, "segmentation_loss", recording)
    run_training(smoke(phantom_cohort, *SELF_TRAINING, "adapt.dice=mean"), tmp_path / "run", progress=False)
    assert len(seen) == 4 * 2 + 4 * 3 and set(seen) == {"mean"}  # seg + seg_syn, then + seg_pseudo


def test_intensity_augmented_self_training_alters_what_the_segmenter_sees_of_the_target(phantom_cohort, tmp_path):
    """pseudo_augment_intensity: the self-training batch holds the same slices and pseudo-labels as
    without it, and alters x_t inside the brain as the segmenter sees it, not as the translator
    does; the adversarial phase is untouched."""
    batches, trainers = {}, {}
    for augmented in (False, True):
        run = TrainingRun(smoke(phantom_cohort, *SELF_TRAINING, "adapt.batch_size=8",
                                f"adapt.pseudo_augment_intensity={str(augmented).lower()}"),
                          tmp_path / str(augmented), progress=False)
        run.prepare()
        run.translator_trainer().finish()
        trainer: AdaptTrainer = run.adapt_trainer()
        trainer.make_pseudo_labels(0)
        batches[augmented] = (trainer.batch(0), trainer.batch(trainer.adapt_steps))
        trainers[augmented] = trainer
    (adversarial_plain, plain), (adversarial_augmented, augmented) = batches[False], batches[True]
    assert "augment_target" not in adversarial_augmented and "augment_target" not in plain
    for key in ("x", "x_t", "y_t"):
        assert torch.equal(plain[key], augmented[key])
    altered = augmented["augment_target"](augmented["x_t"])
    brain = plain["x_t"] > -1.0 + 1e-3
    assert brain.any() and (altered[~brain] == -1.0).all()  # what is not brain is background
    changed = (altered - plain["x_t"]).abs()[brain]
    assert (changed > 1e-4).float().mean() > 0.2  # at least one of the transforms hit most slices
    assert altered.min() >= -1.0 and altered.max() <= 1.0

    network = trainers[True].network.eval()
    with torch.no_grad():
        as_is = network(augmented["x"], augmented["x_t"])
        seen = network(augmented["x"], augmented["x_t"], augment_target=augmented["augment_target"])
    assert torch.equal(as_is["fake_s"], seen["fake_s"])  # the translator gets the plain slice
    n = len(augmented["x"])
    assert torch.equal(as_is["logits"][:2 * n], seen["logits"][:2 * n])
    assert not torch.equal(as_is["logits"][2 * n:3 * n], seen["logits"][2 * n:3 * n])  # the segmenter the altered one
