"""The comparisons of docs/results.md on the bundled SmolLM2-135M, every run with the same fine-tuning budget.

Each experiment is ``recipes/smollm2-135m-sandwich2-lora.yaml`` with a few recipe overrides (converted on the fly
from the bundled model, then fine-tuned for ``--steps`` steps of 4 x 128 tokens); its converted and fine-tuned
checkpoints are scored on alice29.txt (never trained on) with ``lckv-eval ppl``. The tables:

- layout trade-off: sandwich:2, sandwich:6, sandwich:14, cla:2, bottom:2, top:2 (KV reduction vs perplexity),
- loss: LM vs distillation from the original model,
- KV initialisation: ``mean`` vs ``top`` (before and after fine-tuning),
- method: LoRA vs full fine-tuning (with LM loss and with distillation),
- step cost of the iterative loop: m+b = 3+1 and 7+2 against the plain layout (every layer its own KVs: Llama's
  compute), and the perplexity each reaches.

Writes docs/results/grid.json, grid.md and two plots. A stopped run resumes (finished steps are skipped)::

    python scripts/results_grid.py --steps 30
    python scripts/results_grid.py --steps 30 --only sandwich2,cla2     # a subset
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from study import ROOT, finetune, logger, ppl

from lckv.layout import kv_layers, parse_layout

RECIPE = ROOT / "recipes" / "smollm2-135m-sandwich2-lora.yaml"
BASE = "bundled:smollm2-135m"
NUM_LAYERS = 30


@dataclass
class Experiment:
    name: str
    layout: str = "sandwich:2"
    overrides: list[str] = field(default_factory=list)  # recipe keys on top of RECIPE
    groups: tuple[str, ...] = ()  # the tables it appears in

    @property
    def kv_layers(self) -> int:
        return len(kv_layers(parse_layout(self.layout, NUM_LAYERS)))


LAYOUTS = ("sandwich:2", "sandwich:6", "sandwich:14", "cla:2", "bottom:2", "top:2")
EXPERIMENTS = [
    Experiment("sandwich2", groups=("layout", "loss", "init", "method", "passes")),
    Experiment("plain", "plain", groups=("passes",)),
    Experiment("sandwich2-distill", overrides=["loss.type=distill"], groups=("loss", "method")),
    Experiment("sandwich2-full", overrides=["method.type=full", "train.learning_rate=2e-4"], groups=("method",)),
    Experiment(
        "sandwich2-full-distill",
        overrides=["method.type=full", "train.learning_rate=2e-4", "loss.type=distill"],
        groups=("method",),
    ),  # fmt: skip
    *[Experiment(s.replace(":", ""), s, groups=("layout",)) for s in LAYOUTS if s != "sandwich:2"],
    Experiment("sandwich2-topinit", overrides=["model.kv_init=top"], groups=("init",)),
    Experiment("sandwich2-7+2", overrides=["lckv.forward_passes=7", "lckv.backward_passes=2"], groups=("passes",)),
]


def run(e: Experiment, work: Path, steps: int, tokens: int) -> dict:
    common = [f"train.max_steps={steps}", "train.save_steps=1000", "train.logging_steps=5", "eval.report=false",
              f"eval.steps={max(steps // 3, 1)}", f"model.warmup={e.layout}"]  # fmt: skip
    out = finetune(RECIPE, work, e.name, [*common, *e.overrides])
    res = json.loads((out / "results.json").read_text())
    return {
        "name": e.name, "layout": e.layout, "overrides": e.overrides, "groups": list(e.groups),
        "kv_layers": e.kv_layers, "kv_reduction": NUM_LAYERS / e.kv_layers,
        "ppl_converted": ppl(out / "converted", work / f"ppl-{e.name}-converted", tokens, work),
        "ppl_finetuned": ppl(out / "model", work / f"ppl-{e.name}-finetuned", tokens, work),
        "heldout_ppl_before": res.get("eval_ppl_before"), "heldout_ppl_after": res.get("eval_ppl_after"),
        "heldout_ppls": res.get("eval_ppls"), "train_losses": res.get("train_losses"),
        "s_per_step": res.get("s_per_step"), "train_time_s": res.get("train_time_s"),
        "steps": res.get("steps"), "tokens_seen": res.get("tokens_seen"),
        "trainable_parameters": res.get("trainable_parameters"),
    }  # fmt: skip


def recovery(base: float, converted: float, finetuned: float) -> float:
    """Fraction of the conversion's loss gap closed by fine-tuning (1 = back to the base model's loss)."""
    gap = math.log(converted) - math.log(base)
    return (math.log(converted) - math.log(finetuned)) / gap if gap > 0 else float("nan")


def tables(rows: list[dict], base: float, plain_step: float | None) -> str:
    by = {r["name"]: r for r in rows}

    def line(r: dict, label: str) -> str:
        rec = recovery(base, r["ppl_converted"], r["ppl_finetuned"])
        step = r.get("s_per_step")
        cost = f"{step:.2f} ({step / plain_step:.2f}x)" if plain_step and step else f"{step or 0:.2f}"
        return (f"| {label} | {r['kv_layers']}/{NUM_LAYERS} ({r['kv_reduction']:.1f}x) | {r['ppl_converted']:,.1f} | "
                f"{r['ppl_finetuned']:,.1f} | {r['ppl_finetuned'] / base:.2f}x | {'-' if math.isnan(rec) else f'{rec:.2f}'} | "
                f"{cost} |")  # fmt: skip

    head = ("| run | KV layers (reduction) | converted ppl | fine-tuned ppl | vs base | loss recovery | s/step "
            "(vs plain) |\n|---|---|---|---|---|---|---|")  # fmt: skip
    method = {"sandwich2": "LoRA, LM", "sandwich2-distill": "LoRA, distill", "sandwich2-full": "full, LM",
              "sandwich2-full-distill": "full, distill"}  # fmt: skip
    passes = {"plain": "plain layout (Llama's compute)", "sandwich2-7+2": "sandwich:2, m+b = 7+2"}
    sections = {
        "layout": ("Layout trade-off (LoRA, LM loss, m+b = 3+1, `mean` init)", lambda r: r["layout"]),
        "loss": ("LM loss vs distillation (sandwich:2, LoRA)", lambda r: "distill" if "distill" in r["name"] else "LM"),
        "init": ("KV initialisation (sandwich:2, LoRA, LM)", lambda r: "top" if "topinit" in r["name"] else "mean"),
        "method": ("LoRA vs full fine-tuning (sandwich:2)", lambda r: method.get(r["name"], r["name"])),
        "passes": ("Iterative training cost (LoRA, LM)", lambda r: passes.get(r["name"], "sandwich:2, m+b = 3+1")),
    }
    out = [f"Base model (no sharing, not fine-tuned): **{base:.2f}** on the same tokens.\n"]
    for key, (title, label) in sections.items():
        hits = [r for r in rows if key in r["groups"]]
        if hits:
            out += [f"### {title}\n", head, *(line(r, label(r)) for r in hits), ""]
    missing = [e.name for e in EXPERIMENTS if e.name not in by]
    if missing:
        out.append(f"Not run yet: {', '.join(missing)}.")
    return "\n".join(out)


def plot(rows: list[dict], base: float, docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lay = sorted((r for r in rows if "layout" in r["groups"]), key=lambda r: r["kv_reduction"])
    if lay:
        ax.plot([r["kv_reduction"] for r in lay], [r["ppl_converted"] for r in lay], "x", label="converted")
        ax.plot([r["kv_reduction"] for r in lay], [r["ppl_finetuned"] for r in lay], "o", label="fine-tuned")
        for r in lay:
            ax.annotate(r["layout"], (r["kv_reduction"], r["ppl_finetuned"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)  # fmt: skip
    ax.axhline(base, color="grey", ls="--", label=f"base ({base:.1f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([2, 3, 4, 6, 10], labels=["2x", "3x", "4x", "6x", "10x"], minor=False)
    ax.set_xticks([], minor=True)
    ax.set_xlabel("KV cache reduction (vs the base model)")
    ax.set_ylabel("perplexity, alice29.txt (held out)")
    steps = rows[0]["steps"] if rows else 0
    ax.set_title(f"SmolLM2-135M: layout vs perplexity after {steps} LoRA steps")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(docs / "layout_tradeoff.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if {"loss", "method", "passes"} & set(r["groups"]) and r.get("heldout_ppls"):
            pts = ([(0, r["heldout_ppl_before"])] if r.get("heldout_ppl_before") else []) + [tuple(p) for p in
                                                                                           r["heldout_ppls"]]  # fmt: skip
            pts = sorted(dict(pts).items())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=r["name"], markersize=4)
    ax.set_yscale("log")
    ax.set_xlabel("fine-tuning step (4 x 128 tokens)")
    ax.set_ylabel("held-out perplexity (16 blocks of the training books)")
    ax.set_title("Recovery per step: loss, method and iteration settings")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(docs / "recovery_curves.png", dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/results-grid", help="folder for models, logs and reports")
    p.add_argument("--steps", type=int, default=30, help="fine-tuning steps of every run (the shared budget)")
    p.add_argument("--tokens", type=int, default=2048, help="alice29.txt tokens scored (256-token windows)")
    p.add_argument("--only", default=None, help="comma list of experiment names (default: all, in order)")
    p.add_argument("--docs", default="docs/results", help="where grid.json, grid.md and the plots go")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    names = [e.name for e in EXPERIMENTS]
    only = a.only.split(",") if a.only else names
    unknown = sorted(set(only) - set(names))
    if unknown:
        p.error(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    work = (ROOT / a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    docs = ROOT / a.docs
    docs.mkdir(parents=True, exist_ok=True)

    base = ppl(BASE, work / "ppl-base", a.tokens, work)
    saved = docs / "grid.json"
    old = json.loads(saved.read_text())["rows"] if saved.is_file() else []
    rows = {r["name"]: r for r in old if r.get("steps") == a.steps}
    for e in EXPERIMENTS:
        if e.name in only:
            rows[e.name] = run(e, work, a.steps, a.tokens)
            logger.info("%-24s converted %.1f  fine-tuned %.1f", e.name, rows[e.name]["ppl_converted"],
                        rows[e.name]["ppl_finetuned"])  # fmt: skip
            ordered = [rows[n] for n in names if n in rows]
            plain = rows.get("plain", {}).get("s_per_step")
            saved.write_text(json.dumps({"steps": a.steps, "tokens": a.tokens, "base_ppl": base,
                                         "rows": ordered}, indent=2))  # fmt: skip
            (docs / "grid.md").write_text(tables(ordered, base, plain) + "\n")
            plot(ordered, base, docs)
    print((docs / "grid.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
