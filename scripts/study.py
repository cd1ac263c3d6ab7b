"""Shared steps of the result scripts (results_grid.py, routing_study.py): run the real CLIs, keep what exists.

Every step writes into a work folder and is skipped when its output is already there, so a stopped study resumes
where it stopped and a rerun only redraws tables and plots.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALICE = Path("/work/shared/data/text/alice29.txt")
if not ALICE.is_file():  # the copy the tests ship
    ALICE = ROOT / "tests" / "data" / "alice29.txt"

logger = logging.getLogger("study")


def sh(cmd: list[str], log: Path) -> None:
    """Run a command, its output into a log file; raise with the log's tail on failure."""
    logger.info("$ %s", " ".join(cmd))
    t0 = time.time()
    with log.open("w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"command failed ({code}), see {log}:\n{tail}")
    logger.info("  done in %.0f s", time.time() - t0)


def finetune(recipe: Path, work: Path, name: str, overrides: list[str]) -> Path:
    """``finetune/run.py RECIPE`` into work/NAME (resumes a stopped run); returns the run folder."""
    out = work / name
    if not (out / "model" / "config.json").is_file():
        sh([sys.executable, "finetune/run.py", str(recipe), f"output.dir={out}", *overrides], work / f"{name}.log")
    return out


def reshare(src: Path, layout: str, dest: Path, kv_init: str, work: Path) -> Path:
    """``lckv-convert SRC --reshare --warmup LAYOUT`` (no training): a trained checkpoint served with another layout."""
    if not (dest / "config.json").is_file():
        cmd = ["lckv-convert", str(src), "--reshare", "--warmup", layout, "-o", str(dest), "--kv-init", kv_init,
               "--no-check"]  # fmt: skip
        sh(cmd, work / f"{dest.name}.log")
    return dest


def ppl(model: Path | str, out: Path, tokens: int, work: Path, mode: str = "iterative") -> float:
    """Held-out perplexity of one model on alice29.txt with ``lckv-eval ppl`` (256-token windows)."""
    report = out / "ppl.json"
    if not report.is_file():
        cmd = ["lckv-eval", "ppl", str(model), "--data", str(ALICE), "--max-tokens", str(tokens), "--window", "256",
               "--modes", mode, "--kv-windows", "0", "--threads", "2", "--out", str(out), "--overwrite", "-q"]  # fmt: skip
        sh(cmd, work / f"{out.name}.log")
    data = json.loads(report.read_text())
    (res,) = data["models"].values()
    modes = res["modes"]
    return float((modes.get(mode) or next(iter(modes.values())))["ppl"])
