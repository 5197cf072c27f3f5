"""Typed training config: one frozen dataclass per section, built once from the validated JSON.

Users write JSON files and ``key=value`` overrides (:mod:`bigl.training.config` merges and
validates them into a plain dict, the form stored in ``config.json`` and in every bundle's
training metadata). The training code reads that config through :class:`TrainingConfig`, built
once per run: ``config.adapt.lr`` instead of ``config["adapt"]["lr"]``, with the model sections
as the networks' own dataclasses (:class:`~bigl.models.SegmenterConfig` and friends). The
defaults of every training key live here, as the field defaults; :func:`default_sections` gives
them in the JSON form.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from bigl.data.preprocess import PreprocessConfig
from bigl.modelconfig import SegmenterConfig, TranslatorConfig
from bigl.runplan import iterations_for, self_training_steps

#: Adversarial alignment levels of stage 2, in loss order.
LEVELS = ("feature", "position", "channel")


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
    max_cases: int | None = None
    target_labels: bool = False
    tumour_fraction: float = 0.5
    flip: bool = True
    augment_spatial: bool = False
    augment_intensity: bool = False
    #: Probability that a source slice the segmenter sees has its brain intensities mirrored.
    augment_invert: float = 0.0
    workers: int = 2
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

    mode: str = "auto"
    iterations: int = 2000
    epochs: float | None = None
    batch_size: int = 4
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    decay_start: float = 0.5
    gan_mode: str = "lsgan"
    lambda_l1: float = 100.0
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5
    pool_size: int = 50
    discriminator_channels: int = 64
    discriminator_layers: int = 3


@dataclass(frozen=True)
class AdaptSection(_Schedule):
    """Stage 2, the segmenter with global-to-local alignment, and what follows it (``adapt``; Eq. 3-9)."""

    method: str = "bigl"
    iterations: int = 2000
    epochs: float | None = None
    batch_size: int = 4
    optimizer: str = "sgd"
    lr: float = 5e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.75
    discriminator_lr: float = 5e-5
    discriminator_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    discriminator_channels: int = 64
    gan_mode: str = "lsgan"
    synthetic_weight: float = 1.0
    output: bool = True
    feature: bool = True
    attention: bool = True
    lambda_out: float = 0.001
    lambda_gtl: float = 0.1
    level_weights: dict[str, float] = field(default_factory=lambda: {level: 1.0 for level in LEVELS})
    finetune_translator: bool = False
    lambda_syn: float = 0.01
    translator_lr: float = 2e-5
    translator_bundle: str | None = None
    self_training_iterations: int = 0
    self_training_rounds: int = 1
    self_training_lr: float = 5e-4
    pseudo_threshold: float = 0.9
    pseudo_class_fraction: float = 0.5
    pseudo_views: str = "both"
    ema_decay: float = 0.0
    dice: str = "generalised"

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
    log_every: int = 10
    checkpoint_every: int = 200
    sample_every: int = 500
    keep_checkpoints: int = 2
    threads: int | None = None
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
