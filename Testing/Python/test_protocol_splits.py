"""The measuring protocol (benchmarks/protocol.py): every split scores cases it never trains on, the
report cases stay out of every development split's training, an output folder keeps the split it
was made for, and a branch trains from the first setting's run of the same seed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bigl.testing import load_script

REPO = Path(__file__).resolve().parents[2]


def _protocol_module():
    return load_script(REPO / "benchmarks" / "protocol.py")


def _args(out: Path, split: str) -> argparse.Namespace:
    return argparse.Namespace(out=out, split=split, config=None, mode="quick", data=[str(out.parent)], threads=2,
                              setting=["reference="], branch=[], inference=[], seeds=[0], baselines=False, ensemble=False)


@pytest.mark.parametrize("split", ["dev", "sites", "report"])
def test_each_split_scores_five_cases_it_leaves_out_of_training(tmp_path, split):
    script = _protocol_module()
    protocol = script.Protocol(_args(tmp_path / split, split))
    assert len(protocol.scored) == 5 and set(protocol.scored) <= set(protocol.excluded)
    assert set(script.REPORT_CASES) <= set(protocol.excluded)
    excluded = json.loads(next(o for o in protocol.data_overrides if o.startswith("data.exclude=")).split("=", 1)[1])
    assert excluded == protocol.excluded
    if split != "report":
        assert not set(protocol.scored) & set(script.REPORT_CASES)
        # the other development split's cases train
        others = [cases for name, cases in script.SPLITS.items() if name not in (split, "report")]
        assert not set(protocol.excluded) & {case for cases in others for case in cases}


def test_the_splits_share_no_case():
    script = _protocol_module()
    cases = [case for scored in script.SPLITS.values() for case in scored]
    assert len(cases) == len(set(cases)) == 15


def test_a_folder_made_for_one_split_refuses_another(tmp_path):
    script = _protocol_module()
    script.Protocol(_args(tmp_path / "p", "dev"))
    with pytest.raises(SystemExit, match="another split"):
        script.Protocol(_args(tmp_path / "p", "sites"))


def test_a_branch_trains_from_the_first_settings_run_of_the_same_seed(tmp_path, monkeypatch):
    script = _protocol_module()
    args = _args(tmp_path / "p", "dev")
    args.setting, args.branch, args.seeds = ["base=adapt.dice=regions"], ["refined=adapt.pseudo_refine_edges=true"], [0, 1]
    protocol = script.Protocol(args)
    trained, scored = [], []
    monkeypatch.setattr(protocol, "command", lambda argv, log: trained.append(argv))
    monkeypatch.setattr(protocol, "score", lambda name, seed, model, results: scored.append((name, seed, model)))
    protocol.run()
    branches = [argv for argv in trained if "--branch-from" in argv]
    assert len(branches) == 2
    for seed, argv in enumerate(branches):
        assert argv[argv.index("--branch-from") + 1] == str(protocol.out / "base" / f"seed{seed}")
        assert argv[argv.index("--out") + 1] == str(protocol.out / "refined" / f"seed{seed}")
        assert {"adapt.dice=regions", "adapt.pseudo_refine_edges=true", f"run.seed={seed}"} <= set(argv)
    assert ("refined", 1, protocol.out / "refined" / "seed1" / "model.safetensors") in scored
    manifest = json.loads((protocol.out / "manifest.json").read_text())
    assert manifest["branches"] == {"refined": "base"}
    assert manifest["settings"]["refined"] == ["adapt.dice=regions", "adapt.pseudo_refine_edges=true"]
    args.branch = ["base=adapt.pseudo_threshold=0.5"]
    with pytest.raises(SystemExit, match="not both"):
        script.Protocol(args)
