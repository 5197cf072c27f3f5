"""Branching a run at the end of its adversarial phase (``bigl train --branch-from``): the branch
point survives checkpoint pruning, a branch that changes nothing reproduces its parent exactly,
one that changes the self-training trains only those steps, and anything else is refused."""

from __future__ import annotations

import shutil

import pytest

from bigl.bundle import read_metadata
from bigl.cli import main
from bigl.errors import ConfigError
from bigl.runfolder import checkpoint_name
from bigl.training import run_training
from bigl.training.events import read_events

from test_training_recipe import SELF_TRAINING, smoke
from test_training_resume import assert_same_weights

#: 4 adversarial steps then 4 self-training steps; checkpoints every 3 steps, the newest 2 kept
BRANCHED = [*SELF_TRAINING, "run.checkpoint_every=3", "run.keep_checkpoints=2"]


@pytest.fixture(scope="module")
def parent(phantom_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("branch") / "parent"
    run_training(smoke(phantom_cohort, *BRANCHED), out, progress=False)
    return out


def adapt_checkpoints(run) -> list[str]:
    return sorted(path.name for path in (run / "checkpoints").glob("adapt_*.safetensors"))


def test_the_end_of_the_adversarial_phase_outlives_pruning(parent):
    assert adapt_checkpoints(parent) == [checkpoint_name("adapt", step) for step in (4, 6, 8)]


def test_a_branch_that_changes_nothing_reproduces_its_parent(parent, phantom_cohort, tmp_path):
    out = tmp_path / "same"
    bundle = run_training(smoke(phantom_cohort, *BRANCHED), out, branch_from=parent, progress=False)
    assert_same_weights(bundle, parent / "model.safetensors")
    events = read_events(out / "events.jsonl")
    assert [(e["parent"], e["step"]) for e in events if e["event"] == "branch"] == [(str(parent), 4)]
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert min(steps) == 5 and max(steps) == 8  # the self-training steps alone
    assert read_metadata(bundle)["training"]["branched_from"] == {"run": str(parent), "step": 4}


def test_a_branch_trains_other_self_training_settings_from_the_same_network(parent, phantom_cohort, tmp_path):
    out = tmp_path / "other"
    argv = ["train", "--config", "smoke", "--data", str(phantom_cohort), "--out", str(out), "--branch-from", str(parent),
            "--no-progress", *BRANCHED,
            "adapt.self_training_iterations=6", "adapt.pseudo_threshold=0.5", "adapt.pseudo_refine_edges=true"]
    assert main(argv) == 0
    metadata = read_metadata(out / "model.safetensors")["training"]
    assert metadata["iterations"]["self_training"] == 6 and metadata["self_training"]["pseudo_refine_edges"]
    assert metadata["config"]["adapt"]["translator_bundle"] == str(parent / "translator.safetensors")
    assert not (out / "translator.safetensors").exists()
    assert [e["step"] for e in read_events(out / "events.jsonl") if e["event"] == "step"][-1] == 10
    # interrupted or finished, the same command with --resume goes on in the branch's own folder
    assert main([*argv, "--resume"]) == 0


@pytest.mark.parametrize("change, named", [
    ("adapt.lr=0.01", "adapt.lr"),
    ("run.seed=3", "run.seed"),
    ("adapt.self_training_iterations=0", "has none"),
])
def test_a_branch_may_not_change_what_came_before_its_branch_point(parent, phantom_cohort, tmp_path, change, named):
    with pytest.raises(ConfigError, match=named):
        run_training(smoke(phantom_cohort, *BRANCHED, change), tmp_path / "refused", branch_from=parent, progress=False)
    assert not (tmp_path / "refused" / "checkpoints").exists()


def test_a_parent_without_its_branch_point_or_self_training_is_refused_with_the_fix(parent, phantom_cohort, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(parent, old)
    (old / "checkpoints" / checkpoint_name("adapt", 4)).unlink()
    with pytest.raises(ConfigError, match="no checkpoint of the end of its adversarial phase") as caught:
        run_training(smoke(phantom_cohort, *BRANCHED), tmp_path / "a", branch_from=old, progress=False)
    assert "train the parent" in caught.value.hint
    with pytest.raises(ConfigError, match="not a BiGL run folder"):
        run_training(smoke(phantom_cohort, *BRANCHED), tmp_path / "b", branch_from=tmp_path, progress=False)
