"""Two-stage BiGL training: the bidirectional translator, then segmentation with global-to-local
adaptation (docs/training.md). ``load_config`` builds a validated config, ``run_training`` runs it."""

from __future__ import annotations

from bigl.training.config import load_config
from bigl.training.runner import run_training

__all__ = ["load_config", "run_training"]
