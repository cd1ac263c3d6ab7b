"""The result scripts (scripts/results_grid.py, scripts/routing_study.py): every run they launch is a valid recipe,
and the tables they publish compute recovery as documented. The runs themselves are the published results."""

from __future__ import annotations

import importlib
import math
import sys

import pytest
from conftest import REPO
from lckv.finetune.recipe import load_recipe

from lckv.layout import parse_layout


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        yield importlib.import_module("results_grid"), importlib.import_module("routing_study")
    finally:
        sys.path.remove(str(REPO / "scripts"))


def test_grid_experiments_are_valid_recipes(scripts):
    grid, _ = scripts
    names = [e.name for e in grid.EXPERIMENTS]
    assert len(names) == len(set(names))
    assert {e.layout for e in grid.EXPERIMENTS if "layout" in e.groups} == set(grid.LAYOUTS)
    for e in grid.EXPERIMENTS:
        r = load_recipe(grid.RECIPE, [f"model.warmup={e.layout}", "train.max_steps=3", *e.overrides])
        assert r.model.warmup == e.layout
        assert e.kv_layers == len(set(parse_layout(e.layout, grid.NUM_LAYERS)))


def test_grid_recovery_and_table(scripts):
    grid, _ = scripts
    assert grid.recovery(10.0, 1000.0, 10.0) == pytest.approx(1.0)
    assert grid.recovery(10.0, 1000.0, 100.0) == pytest.approx(0.5)
    assert grid.recovery(10.0, 1000.0, 1000.0) == pytest.approx(0.0)
    assert math.isnan(grid.recovery(10.0, 5.0, 5.0))
    row = {"name": "sandwich2", "layout": "sandwich:2", "groups": ["layout", "passes"], "kv_layers": 3,
           "kv_reduction": 10.0, "ppl_converted": 1000.0, "ppl_finetuned": 100.0, "s_per_step": 6.0}  # fmt: skip
    plain = dict(row, name="plain", layout="plain", groups=["passes"], kv_layers=30, kv_reduction=1.0, s_per_step=3.0)
    text = grid.tables([row, plain], base=10.0, plain_step=3.0)
    assert "| sandwich:2 | 3/30 (10.0x) | 1,000.0 | 100.0 | 10.00x | 0.50 | 6.00 (2.00x) |" in text
    assert "Not run yet:" in text and "sandwich2-distill" in text


def test_routing_study_fixed_runs_are_valid_recipes(scripts):
    _, study = scripts
    assert len(set(parse_layout(study.HAND, 30))) == 8
    for spec in study.LAYOUTS.values():
        r = load_recipe(study.RECIPE, ["routing=null", f"model.warmup={spec}", "model.kv_init=mean"])
        assert r.routing is None
        assert parse_layout(r.model.warmup, 30) == parse_layout(spec, 30)


@pytest.mark.parametrize("quick", [False, True])
def test_main_job_chain(quick, tmp_path):
    """The main job's command chain (--dry-run prints it): the four real tools, a valid fine-tuning recipe."""
    import shlex
    import subprocess

    args = ["bash", str(REPO / "scripts" / "main_job.sh"), "--dry-run", *(["--quick"] if quick else []), str(tmp_path)]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    cmds = [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]
    assert [c[0] for c in cmds] == ["lckv-convert", "python", "lckv-eval", "lckv-eval"]
    assert cmds[0][1:4] == ["bundled:smollm2-135m", "--warmup", "sandwich:2"]
    assert cmds[2][1] == "ppl" and cmds[3][1] == "bench"
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
    recipe, overrides = cmds[1][2], cmds[1][3:]
    (tmp_path / "converted").mkdir()  # stands in for step 1's output, which the recipe check requires to exist
    r = load_recipe(REPO / recipe, overrides)
    assert r.loss.type == "distill" and r.loss.teacher == "bundled:smollm2-135m"
    assert r.train.max_steps == (12 if quick else 200)
    assert r.output.dir == str(tmp_path / "finetuned")
    bad = subprocess.run(["bash", str(REPO / "scripts" / "main_job.sh"), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr
