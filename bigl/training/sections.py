"""Typed training config: one frozen dataclass per section, built once from the validated JSON.

Users write JSON files and ``key=value`` overrides (:mod:`bigl.training.config` merges and
validates them into a plain dict, the form stored in ``config.json`` and in every bundle's
training metadata). The training code reads that config through :class:`TrainingConfig`, built
once per run: ``config.adapt.lr`` instead of ``config["adapt"]["lr"]``, with the model sections
as the networks' own dataclasses (:class:`~bigl.models.SegmenterConfig` and friends). The
defaults of every training key live here, as the field defaults; :func:`default_sections` gives
them in the JSON form, and the allowed values of a key sit beside its default (:func:`positive`,
:func:`within`, :func:`one_of`), which :func:`bigl.training.config.validate_config` checks; the rules
that tie several keys together stay there.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from bigl.data.preprocess import PreprocessConfig
from bigl.modelconfig import SegmenterConfig, TranslatorConfig
from bigl.runfolder import DICE_LOSSES, METHODS, TRANSLATOR_MODES
from bigl.runplan import iterations_for, self_training_steps

#: Adversarial alignment levels of stage 2, in loss order.
LEVELS = ("feature", "position", "channel")
GAN_MODES = ("lsgan", "bce")
OPTIMISERS = ("sgd", "adam")
#: Views whose predictions make the self-training pseudo-labels.
PSEUDO_VIEWS = ("both", "target", "inverted")
#: Field metadata key of a value rule.
RULE = "rule"


# ------------------------------------------------------------------------------ value rules
@dataclass(frozen=True)
class Bounds:
    """The range of a number key: ``low`` / ``high`` (None: open-ended), each end included unless
    marked open; ``hint`` says what a sensible value is."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    hint: str = "see docs/training.md"

    def problem(self, value: float) -> str | None:
        """What is wrong with ``value`` (``"must be > 0, got -1"``), or None."""
        below = self.low is not None and (value < self.low or (self.low_open and value == self.low))
        above = self.high is not None and (value > self.high or (self.high_open and value == self.high))
        if not (below or above):
            return None
        if self.high is None:
            return f"must be {'>' if self.low_open else '>='} {self.low:g}, got {value}"
        opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"must be in {opening}{self.low:g}, {self.high:g}{closing}, got {value}"


@dataclass(frozen=True)
class Choice:
    """The names a text key takes."""

    choices: tuple[str, ...]
    note: str = ""

    def problem(self, value: str) -> str | None:
        return None if value in self.choices else f"must be one of {', '.join(self.choices)}, got {json.dumps(value)}"

    @property
    def hint(self) -> str:
        return self.note or f"use one of: {', '.join(self.choices)}"


def positive(default: Any, *, zero: bool = False, hint: str = "use a positive value") -> Any:
    """A number field that must be > 0 (>= 0 with ``zero``); null passes where the field is nullable."""
    return field(default=default, metadata={RULE: Bounds(low=0, low_open=not zero, hint=hint)})


def within(default: float, low: float, high: float, *, hint: str, low_open: bool = False, high_open: bool = False) -> Any:
    """A number field in [low, high] (ends excluded where marked open)."""
    return field(default=default, metadata={RULE: Bounds(low, high, low_open, high_open, hint)})


def one_of(default: str, choices: tuple[str, ...], note: str = "") -> Any:
    """A text field that takes one of ``choices``."""
    return field(default=default, metadata={RULE: Choice(tuple(choices), note)})


@dataclass(frozen=True)
class DataSection:
    """Where the scans are and how the training batches are drawn (``data``)."""

    #: One folder, or a list of folders read as one data set.
    source_dir: str | list[str] | None = None
    source_modality: str = "t1"
    target_dir: str | list[str] | None = None
    target_modality: str = "t2"
    cases: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    target_cases: list[str] | None = None
    target_exclude: list[str] = field(default_factory=list)
    max_cases: int | None = positive(None)
    target_labels: bool = False
    tumour_fraction: float = within(0.5, 0.0, 1.0, hint="0.5 draws half of each source batch from slices with tumour")
    flip: bool = True
    augment_spatial: bool = False
    augment_intensity: bool = False
    #: Probability that a source slice the segmenter sees has its brain intensities mirrored.
    augment_invert: float = within(0.0, 0.0, 1.0, hint="0 (off) or e.g. 0.5: the segmenter sees half of the source "
                                   "slices with their brain intensities mirrored")
    #: Probability that a translated source slice (x_s->t) the segmenter sees has its tumour brightened.
    augment_tumour_brightening: float = within(0.0, 0.0, 1.0, hint="0 (off) or e.g. 0.5: the segmenter sees half of the "
                                               "translated source slices with their tumour brightened")
    workers: int = positive(2)
    allow_same_modality: bool = False


class _Schedule:
    """A stage whose length is ``iterations``, or ``epochs`` passes when that is set."""

    def steps(self, dataset_slices: int) -> int:
        """``iterations``, or the steps that ``epochs`` passes over ``dataset_slices`` take
        (:func:`bigl.runplan.iterations_for`; for stage 2 without the self-training steps)."""
        return iterations_for(dataclasses.asdict(self), dataset_slices)


@dataclass(frozen=True)
class TranslatorTrainingSection(_Schedule):
    """Stage 1, the bidirectional image translator (``translator_training``; Eq. 1-2)."""

    mode: str = one_of("auto", TRANSLATOR_MODES)
    iterations: int = 2000
    epochs: float | None = None
    batch_size: int = positive(4)
    lr: float = positive(2e-4)
    beta1: float = within(0.5, 0.0, 1.0, high_open=True, hint="Adam's beta1; 0.5 as CycleGAN")
    beta2: float = within(0.999, 0.0, 1.0, high_open=True, hint="Adam's beta2; 0.999 as CycleGAN")
    #: Fraction of the steps after which the learning rate decays linearly to 0 (1: no decay).
    decay_start: float = within(0.5, 0.0, 1.0, hint="0.5 decays over the second half of the steps, as CycleGAN")
    gan_mode: str = one_of("lsgan", GAN_MODES)
    lambda_l1: float = positive(100.0, zero=True)
    lambda_cycle: float = positive(10.0, zero=True)
    lambda_identity: float = positive(0.5, zero=True)
    pool_size: int = positive(50, zero=True, hint="50 as CycleGAN, 0 for no pool")
    discriminator_channels: int = positive(64)
    discriminator_layers: int = positive(3)


@dataclass(frozen=True)
class AdaptSection(_Schedule):
    """Stage 2, the segmenter with global-to-local alignment, and what follows it (``adapt``; Eq. 3-9)."""

    method: str = one_of("bigl", METHODS)
    iterations: int = 2000
    epochs: float | None = None
    batch_size: int = positive(4)
    optimizer: str = one_of("sgd", OPTIMISERS)
    lr: float = positive(5e-3)
    momentum: float = positive(0.9, zero=True)
    weight_decay: float = positive(5e-4, zero=True)
    poly_power: float = positive(0.75, zero=True)
    discriminator_lr: float = positive(5e-5)
    discriminator_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    discriminator_channels: int = positive(64)
    gan_mode: str = one_of("lsgan", GAN_MODES)
    synthetic_weight: float = positive(1.0, zero=True)
    output: bool = True
    feature: bool = True
    attention: bool = True
    lambda_out: float = positive(0.001, zero=True)
    lambda_gtl: float = positive(0.1, zero=True)
    level_weights: dict[str, float] = field(default_factory=lambda: {level: 1.0 for level in LEVELS})
    finetune_translator: bool = False
    lambda_syn: float = positive(0.01, zero=True)
    translator_lr: float = positive(2e-5)
    translator_bundle: str | None = None
    self_training_iterations: int = positive(0, zero=True)
    self_training_rounds: int = positive(1)
    self_training_lr: float = positive(5e-4)
    pseudo_threshold: float = within(0.9, 0.0, 1.0, low_open=True, high_open=True,
                                     hint="0.9 keeps voxels predicted with >= 90 % probability")
    pseudo_class_fraction: float = within(0.5, 0.0, 1.0, hint="0.5 keeps at least the more confident half of each class's predicted voxels")
    pseudo_views: str = one_of("both", PSEUDO_VIEWS, "both averages Phi(x_t) and Phi(x_t->s); target takes Phi(x_t) alone; "
                               "inverted averages Phi(x_t) and Phi of x_t with mirrored intensities")
    pseudo_refine_edges: bool = False
    pseudo_augment_intensity: bool = False
    ema_decay: float = within(0.0, 0.0, 1.0, high_open=True,
                              hint="0 ships the last weights; 0.99 ships their exponential moving average over about the last 100 steps")
    dice: str = one_of("generalised", DICE_LOSSES, "generalised (the default), mean (every class weighs the same) "
                       "or regions (the WT / TC / ET Dice that BraTS scores)")

    @property
    def self_training_steps(self) -> int:
        """Self-training steps that run (none for the baselines: :func:`bigl.runplan.self_training_steps`)."""
        return self_training_steps({"method": self.method, "self_training_iterations": self.self_training_iterations})

    @property
    def levels(self) -> tuple[str, ...]:
        """Adversarial alignment levels that train: switch on and weight > 0 (method bigl only)."""
        if self.method != "bigl":
            return ()
        switches = {"feature": self.feature, "position": self.attention, "channel": self.attention}
        return tuple(level for level in LEVELS if switches[level] and self.level_weights[level] > 0)


@dataclass(frozen=True)
class RunSection:
    """How the run is driven and logged (``run``): none of it changes what is computed but the seed."""

    seed: int = 0
    device: str = "auto"
    amp: bool = False
    cpu_bf16: bool = True
    log_every: int = positive(10)
    checkpoint_every: int = positive(200)
    sample_every: int = positive(500, zero=True)
    keep_checkpoints: int = positive(2)
    threads: int | None = positive(None)
    progress: bool = True


#: Section name -> its dataclass, in the order of a config file.
SECTION_TYPES: dict[str, type] = {
    "data": DataSection,
    "preprocessing": PreprocessConfig,
    "segmenter": SegmenterConfig,
    "translator": TranslatorConfig,
    "translator_training": TranslatorTrainingSection,
    "adapt": AdaptSection,
    "run": RunSection,
}


def default_sections() -> dict[str, dict[str, Any]]:
    """Every key with its default value, in the JSON form (section -> key -> value)."""
    return {name: dataclasses.asdict(cls()) for name, cls in SECTION_TYPES.items()}


@dataclass(frozen=True)
class TrainingConfig:
    """A validated training config, typed; :meth:`to_dict` gives back the JSON form it was built from."""

    data: DataSection
    preprocessing: PreprocessConfig
    segmenter: SegmenterConfig
    translator: TranslatorConfig
    translator_training: TranslatorTrainingSection
    adapt: AdaptSection
    run: RunSection
    _json: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def of(cls, config: TrainingConfig | Mapping[str, Any]) -> TrainingConfig:
        """``config`` itself, or built from a validated config dict (:func:`bigl.training.config.validate_config`)."""
        if isinstance(config, TrainingConfig):
            return config
        sections = {name: SECTION_TYPES[name](**copy.deepcopy(dict(config[name]))) for name in SECTION_TYPES}
        return cls(**sections, _json=copy.deepcopy(dict(config)))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (a copy): what ``config.json`` and the bundles' training metadata hold."""
        return copy.deepcopy(self._json)

    def section_dict(self, section: str) -> dict[str, Any]:
        """One section in the JSON form (a copy), as recorded in files (e.g. ``preprocessing``)."""
        return copy.deepcopy(self._json[section])

    def replace(self, section: str, **changes: Any) -> TrainingConfig:
        """A copy with some keys of one section changed (both forms stay in step)."""
        updated = dataclasses.replace(getattr(self, section), **changes)
        values = self.to_dict()
        values[section].update(changes)
        return dataclasses.replace(self, **{section: updated}, _json=values)
