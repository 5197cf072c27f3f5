"""One optimisation step of each stage: what changes, what stays, which losses exist; samplers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bigl.errors import ConfigError
from bigl.training import load_config
from bigl.training.runner import TrainingRun
from bigl.training.translator_stage import translator_batch

DISJOINT = ['data.cases=["Phantom_001", "Phantom_002"]', 'data.target_cases=["Phantom_003", "Phantom_004"]']


@pytest.fixture
def prepare(phantom_cohort: Path, tmp_path: Path):
    """Prepared run (data loaded, nothing trained) for the smoke config plus overrides."""
    counter = iter(range(100))

    def make(*overrides: str, stage: str = "all") -> TrainingRun:
        config = load_config(
            "smoke", [f"data.source_dir={phantom_cohort}", f"data.target_dir={phantom_cohort}", "run.threads=1", *overrides]
        )
        run = TrainingRun(config, tmp_path / f"run{next(counter)}", stage=stage, progress=False)
        run.prepare()
        return run

    return make


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> float:
    """Fraction of the parameter tensors that differ from the snapshot."""
    now = dict(module.named_parameters())
    return sum(not torch.equal(now[name], value) for name, value in before.items()) / len(before)


def adapt_trainer(run: TrainingRun):
    """Stage-2 trainer of a prepared bigl run, with an (untrained) translator file in place."""
    if run.config.adapt.method == "bigl":
        run.translator_trainer().finish()
    return run.adapt_trainer()


# ------------------------------------------------------------------------------------------
# stage 1


@pytest.mark.parametrize("mode", ["paired", "unpaired"])
def test_translator_steps_update_generators_then_discriminators(prepare, mode):
    run = prepare(f"translator_training.mode={mode}")
    trainer = run.translator_trainer()
    assert trainer.mode == mode
    batch = translator_batch(run.ctx, mode, "translator", 0, 2)
    generators, discriminators = snapshot(trainer.generators), snapshot(trainer.bank)

    losses, out = trainer.generator_step(batch)
    assert changed(trainer.generators, generators) > 0.9
    assert changed(trainer.bank, discriminators) == 0.0, "the generator step must not move the discriminators"
    expected = {"g_adv", "g_l1", "total"} if mode == "paired" else {"g_adv", "g_cycle", "g_identity", "total"}
    assert set(losses) == expected
    if mode == "paired":
        lambda_l1 = run.config.translator_training.lambda_l1
        assert torch.isclose(losses["total"], losses["g_adv"] + lambda_l1 * losses["g_l1"])

    generators = snapshot(trainer.generators)
    trainer.discriminator_step(batch, out, 0)
    assert changed(trainer.bank, discriminators) > 0.9
    assert changed(trainer.generators, generators) == 0.0, "the discriminator step must not move the generators"


def test_paired_discriminators_are_conditional(prepare):
    run = prepare("translator_training.mode=paired")
    trainer = run.translator_trainer()
    assert trainer.bank.nets["image_t"].in_channels == 2
    unpaired = prepare("translator_training.mode=unpaired").translator_trainer()
    assert unpaired.bank.nets["image_t"].in_channels == 1


def test_auto_mode_follows_the_data(prepare):
    assert prepare().translator_trainer().mode == "paired"
    assert prepare(*DISJOINT).translator_trainer().mode == "unpaired"
    with pytest.raises(ConfigError, match="co-registered"):
        prepare(*DISJOINT, "translator_training.mode=paired").translator_trainer()


def test_image_pool_mixes_in_older_fakes():
    from bigl.training.translator_stage import ImagePool

    pool = ImagePool(3)
    rng = np.random.default_rng(0)
    first = torch.arange(3.0).view(3, 1, 1, 1)
    assert torch.equal(pool.query(first, rng), first)  # filling: returned as they are
    returned = torch.cat([pool.query(torch.full((1, 1, 1, 1), 10.0 + i), rng) for i in range(40)])
    assert set(returned.flatten().tolist()) & {0.0, 1.0, 2.0}, "old fakes come back"
    assert set(returned.flatten().tolist()) & {10.0 + i for i in range(40)}, "new fakes pass too"
    state = pool.state()
    restored = ImagePool(3)
    restored.load(state, torch.device("cpu"))
    assert torch.equal(restored.state(), state)


def test_translator_learning_rate_is_constant_then_decays_linearly(prepare):
    trainer = prepare("translator_training.iterations=100").translator_trainer()
    assert trainer.lr_factor(0) == 1.0 and trainer.lr_factor(49) == 1.0
    assert trainer.lr_factor(75) == pytest.approx(0.5)
    assert 0 < trainer.lr_factor(99) < 0.03


# ------------------------------------------------------------------------------------------
# stage 2


def test_adapt_steps_touch_only_their_own_networks(prepare):
    trainer = adapt_trainer(prepare())
    translators_before = snapshot(trainer.translators)
    assert not any(p.requires_grad for p in trainer.translators.parameters())
    batch = trainer.batch(0)
    segmenter, discriminators = snapshot(trainer.segmenter), snapshot(trainer.bank)

    losses, out = trainer.segmenter_step(batch)
    assert changed(trainer.segmenter, segmenter) > 0.9
    assert changed(trainer.bank, discriminators) == 0.0, "the segmenter step must not move the discriminators"
    assert all(p.grad is None for p in trainer.bank.parameters())
    assert not trainer.translators.training, "the frozen translator runs in eval mode"

    segmenter = snapshot(trainer.segmenter)
    trainer.discriminator_step(batch, out)
    assert changed(trainer.bank, discriminators) > 0.9
    assert changed(trainer.segmenter, segmenter) == 0.0, "the discriminator step must not move the segmenter"

    trainer.train_step(1)
    assert changed(trainer.translators, translators_before) == 0.0, "the translator stays frozen"
    assert all(p.grad is None for p in trainer.translators.parameters())


def test_each_domain_discriminator_sees_its_real_and_fake_maps(prepare):
    trainer = adapt_trainer(prepare())
    batch = trainer.batch(0)
    out = trainer.network(batch["x"], batch["x_t"])
    pairs = trainer.discriminator_pairs(batch, out)
    for level, key in (("feature", "features"), ("position", "position_attention"), ("channel", "channel_attention")):
        m_s, m_s2t, m_t, m_t2s = out[key].detach().chunk(4)
        assert torch.equal(pairs[f"{level}_s"][0], m_s) and torch.equal(pairs[f"{level}_s"][1], m_t2s)
        assert torch.equal(pairs[f"{level}_t"][0], m_s2t) and torch.equal(pairs[f"{level}_t"][1], m_t)
    # the segmenter saw [x_s, x_s->t, x_t, x_t->s] in this order
    with torch.no_grad():
        assert torch.equal(out["fake_t"], trainer.translators.s2t(batch["x"]))
        assert torch.equal(out["fake_s"], trainer.translators.t2s(batch["x_t"]))


def test_total_loss_composes_the_weighted_terms(prepare):
    trainer = adapt_trainer(
        prepare("adapt.synthetic_weight=0.5", "adapt.lambda_out=0.2", "adapt.lambda_gtl=0.3", "adapt.level_weights.position=2")
    )
    losses, _ = trainer.segmenter_step(trainer.batch(0))
    expected = (
        losses["seg"]
        + 0.5 * losses["seg_syn"]
        + 0.2 * losses["out"]
        + 0.3 * (losses["adv_feature"] + 2 * losses["adv_position"] + losses["adv_channel"])
    )
    assert torch.isclose(losses["total"], expected, rtol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "levels", "output"),
    [
        ((), ("feature", "position", "channel"), True),
        (("adapt.output=false",), ("feature", "position", "channel"), False),
        (("adapt.feature=false",), ("position", "channel"), True),
        (("adapt.attention=false",), ("feature",), True),
        (("adapt.level_weights.channel=0",), ("feature", "position"), True),
        (("adapt.feature=false", "adapt.attention=false", "adapt.output=false"), (), False),
    ],
)
def test_ablation_switches_remove_their_terms_and_discriminators(prepare, overrides, levels, output):
    trainer = adapt_trainer(prepare(*overrides))
    assert trainer.levels == levels
    expected_nets = {f"{level}_{domain}" for level in levels for domain in "st"}
    if levels:
        assert set(trainer.bank.nets) == expected_nets
        assert sum(p.numel() for g in trainer.opt_d.param_groups for p in g["params"]) == sum(
            p.numel() for p in trainer.bank.parameters()
        )
    else:
        assert trainer.bank is None and trainer.opt_d is None
    losses = trainer.train_step(0)
    all_levels = ("feature", "position", "channel")
    for level in all_levels:
        assert (f"adv_{level}" in losses) == (level in levels)
        assert (f"d_{level}" in losses) == (level in levels)
    assert ("out" in losses) == output
    assert {"seg", "seg_syn", "total"} <= set(losses)
    assert set(trainer.checkpoint_modules()) == ({"segmenter", "discriminators"} if levels else {"segmenter"})


def test_source_only_baseline_uses_no_translator_and_no_target(prepare):
    run = prepare("adapt.method=source-only")
    assert run.stages == ["adapt"]
    assert run.ctx.data.unlabelled is None and run.ctx.data.labelled.modality == "t1"
    trainer = run.adapt_trainer()
    assert trainer.translators is None and trainer.bank is None
    losses = trainer.train_step(0)
    assert set(losses) == {"seg", "total"}


def test_target_only_trains_on_target_labels(prepare):
    run = prepare("adapt.method=target-only", "data.target_labels=true")
    labelled = run.ctx.data.labelled
    assert labelled.modality == "t2" and labelled.labels is not None and len(labelled.tumour) > 0
    trainer = run.adapt_trainer()
    batch = trainer.batch(0)
    assert set(batch) == {"x", "y"}
    assert set(trainer.train_step(0)) == {"seg", "total"}


def test_finetuning_the_translator_updates_it_with_its_own_losses(prepare):
    trainer = adapt_trainer(prepare("adapt.finetune_translator=true"))
    assert {"image_s", "image_t"} <= set(trainer.bank.nets)
    before = snapshot(trainer.translators)
    batch = trainer.batch(0)
    losses, out = trainer.segmenter_step(batch)
    assert "translator_g" in losses
    assert changed(trainer.translators, before) > 0.9
    assert "translator_d" in trainer.discriminator_step(batch, out)


def test_poly_learning_rate(prepare):
    trainer = adapt_trainer(prepare("adapt.iterations=100", "adapt.feature=false", "adapt.attention=false"))
    assert trainer.segmenter_lr(0) == pytest.approx(5e-3)
    assert trainer.segmenter_lr(50) == pytest.approx(5e-3 * 0.5**0.75)
    trainer.train_step(50)
    assert trainer.opt_seg.param_groups[0]["lr"] == pytest.approx(5e-3 * 0.5**0.75)
    assert isinstance(trainer.opt_seg, torch.optim.SGD) and trainer.opt_seg.defaults["momentum"] == 0.9
    adam = adapt_trainer(prepare("adapt.optimizer=adam"))
    assert isinstance(adam.opt_seg, torch.optim.Adam)
    assert adam.learning_rates(10)["discriminators"] == 5e-5


# ------------------------------------------------------------------------------------------
# sampling


def test_sampler_never_pairs_a_slice_with_its_counterpart(prepare):
    run = prepare('data.cases=["Phantom_001"]', "adapt.batch_size=8")
    data, sampler = run.ctx.data, run.ctx.sampler
    assert len(data.pairs) == len(data.labelled), "same subject, same grid: every slice has its counterpart"
    for step in range(200):
        batch = sampler.unpaired("adapt", step, 8)
        assert not set(data.labelled.keys[batch.labelled]) & set(data.unlabelled.keys[batch.unlabelled])


def test_sampler_prefers_tumour_slices_and_depends_only_on_seed_and_step(prepare):
    run = prepare("data.tumour_fraction=0.75")
    data, sampler = run.ctx.data, run.ctx.sampler
    tumour = set(data.labelled.tumour.tolist())
    assert 0 < len(tumour) < len(data.labelled)
    for step in range(50):
        batch = sampler.unpaired("adapt", step, 8)
        assert sum(int(i) in tumour for i in batch.labelled) >= 6
    first, again = sampler.unpaired("adapt", 7, 8), sampler.unpaired("adapt", 7, 8)
    assert np.array_equal(first.labelled, again.labelled) and np.array_equal(first.unlabelled, again.unlabelled)
    other = sampler.unpaired("adapt", 8, 8)
    assert not np.array_equal(first.labelled, other.labelled)
    translator = sampler.unpaired("translator", 7, 8, prefer_tumour=False)
    assert not np.array_equal(first.labelled, translator.labelled)


def test_paired_batches_are_co_registered(prepare):
    run = prepare()
    data = run.ctx.data
    batch = run.ctx.sampler.paired("translator", 3, 8)
    assert np.array_equal(data.labelled.keys[batch.labelled], data.unlabelled.keys[batch.unlabelled])
    assert np.array_equal(batch.flip_labelled, batch.flip_unlabelled)


def test_training_slices_are_the_prepared_slices_that_hold_brain(prepare, phantom_cohort):
    from bigl.data.brats import find_cases
    from bigl.data.preprocess import BACKGROUND, brain_mask, prepare_volume

    run = prepare()
    source = run.ctx.data.labelled
    case = next(c for c in find_cases(phantom_cohort, modalities=("t1", "t2")) if c.name == source.case_names[0])
    t1, t2 = case.load_image("t1"), case.load_image("t2")
    prepared = prepare_volume(t1.data, run.config.preprocessing, mask=brain_mask(t1.data) | brain_mask(t2.data))
    holds_brain = prepared.slices.reshape(len(prepared.slices), -1).max(axis=1) > BACKGROUND + 1e-3
    assert not holds_brain.all(), "the phantom crop should have empty end slices for this test to mean anything"
    rows = np.flatnonzero(source.case_index == 0)
    assert np.array_equal(source.slice_index[rows], np.flatnonzero(holds_brain))
    assert np.allclose(source.images[rows].astype(np.float32), prepared.slices[holds_brain], atol=2e-3)
