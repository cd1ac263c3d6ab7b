"""Random cross-layer routing study on the bundled SmolLM2-135M (issue 7; results in docs/routing.md).

Trains, with the same budget (steps x batch x block), one LoRA model with random KV routing on a plain conversion
and one LoRA model for each fixed layout; then scores held-out perplexity (alice29.txt, never trained on) with
``lckv-eval ppl`` for several downward layouts:

- untrained: the plain conversion reshared to each layout (``--kv-init mean``: the converter's training-free
  default, and ``top``: the dropped layers' projections simply removed),
- routing-trained: the one trained model reshared to each layout (``lckv-convert --reshare``, no training),
- trained for this layout: a separate fine-tune per layout (converted with ``mean`` init, no routing).

Every step is skipped when its output exists, so a rerun only redraws the table and plot::

    python scripts/routing_study.py --steps 48
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from study import ROOT, finetune, logger, ppl, reshare

from lckv.layout import kv_layers, parse_layout

RECIPE = ROOT / "recipes" / "smollm2-135m-routing-lora.yaml"
NUM_LAYERS = 30
# hand-written: layers 0 and 1 keep their own KVs (the first layers differ most), then groups of five share the
# first layer of the group: 8 KV layers of 30, as many as cla:4 but placed unevenly
HAND = "0,1," + ",".join(str(2 + 5 * ((i - 2) // 5)) for i in range(2, NUM_LAYERS))
LAYOUTS = {"plain": "plain", "cla:2": "cla:2", "cla:3": "cla:3", "cla:4": "cla:4", "hand": HAND}
REGIMES = ["untrained (mean init)", "untrained (top init)", "routing-trained", "trained for this layout"]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = dict(zip(REGIMES, ("s--", "x:", "o-", "D-")))
    for regime, style in styles.items():
        pts = sorted((r["kv_reduction"], r["ppl"], r["layout"]) for r in rows if r["regime"] == regime)
        if not pts:
            continue
        line = [q for q in pts if q[2] != "hand"]  # the uniform layouts as a line, the hand layout on its own
        (h,) = ax.plot([q[0] for q in line], [q[1] for q in line], style, label=regime, markersize=7)
        hand = [q for q in pts if q[2] == "hand"]
        if hand:
            ax.plot([q[0] for q in hand], [q[1] for q in hand], "*", color=h.get_color(), markersize=12)
        if regime == "routing-trained":
            for x, y, name in pts:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, -12), fontsize=8)
    ax.set_xlabel("KV cache reduction (x, vs plain Llama)")
    ax.set_ylabel("perplexity, alice29.txt (held out)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: one routing-trained model, many layouts (stars: hand layout)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: list[dict]) -> str:
    regimes = [g for g in REGIMES if any(r["regime"] == g for r in rows)]
    head = "| layout | KV layers | KV reduction | " + " | ".join(regimes) + " |"
    lines = [head, "|" + "---|" * (3 + len(regimes))]
    for name, spec in LAYOUTS.items():
        ks = parse_layout(spec, NUM_LAYERS)
        k = len(kv_layers(ks))
        cells = []
        for regime in regimes:
            hit = [r for r in rows if r["regime"] == regime and r["layout"] == name]
            cells.append(f"{hit[0]['ppl']:.2f}" if hit else "-")
        lines.append(f"| {name} | {k}/{NUM_LAYERS} | {NUM_LAYERS / k:.2f}x | "
                     + " | ".join(cells) + " |")  # fmt: skip
    lines.append(f"\nhand = `{HAND}` (layers 0 and 1 own, then groups of five read their first layer)")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/routing-study", help="folder for models, logs and reports")
    p.add_argument("--steps", type=int, default=16, help="LoRA steps of each fine-tune (the same budget for all)")
    p.add_argument("--tokens", type=int, default=2048, help="alice29.txt tokens scored (256-token windows)")
    p.add_argument("--top-init", action="store_true", help="also score the untrained model reshared with top init")
    p.add_argument("--docs", default="docs/routing", help="where the JSON and the plot go")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    root = (ROOT / a.work).resolve()
    work = root / f"steps-{a.steps}"  # the trained models and their scores; the untrained ones are shared
    work.mkdir(parents=True, exist_ok=True)
    docs = ROOT / a.docs
    docs.mkdir(parents=True, exist_ok=True)

    common = [f"train.max_steps={a.steps}", "eval.report=false", "eval.steps=null", "eval.before=false",
              "train.save_steps=1000", "train.logging_steps=5"]  # fmt: skip
    runs = {"routing": finetune(RECIPE, work, "routing", common)}
    for name, spec in LAYOUTS.items():
        if name != "plain":
            fixed = [*common, "routing=null", f"model.warmup={spec}", "model.kv_init=mean"]
            runs[name] = finetune(RECIPE, work, "fixed-" + name.replace(":", ""), fixed)
    plain = runs["routing"] / "converted"  # the untrained plain conversion the routing run started from

    rows: list[dict] = []

    def add(regime: str, name: str, model: Path, out: Path) -> None:
        ks = parse_layout(LAYOUTS[name], NUM_LAYERS)
        value = ppl(model, out, a.tokens, out.parent)
        rows.append({"regime": regime, "layout": name, "kv_sources": ks, "kv_layers": len(kv_layers(ks)),
                     "kv_reduction": NUM_LAYERS / len(kv_layers(ks)), "ppl": value})  # fmt: skip
        logger.info("%-24s %-6s ppl %.3f", regime, name, value)

    for name, spec in LAYOUTS.items():
        tag = name.replace(":", "")
        for init in ("mean", "top") if a.top_init else ("mean",):
            m = plain if name == "plain" else reshare(plain, spec, root / f"untrained-{init}-{tag}", init, root)
            add(
                f"untrained ({init} init)", name, m, root / f"ppl-untrained-{'mean' if name == 'plain' else init}-{tag}"
            )
        m = runs["routing"] / "model"
        if name != "plain":
            m = reshare(m, spec, work / f"routing-{tag}", "top", work)
        add("routing-trained", name, m, work / f"ppl-routing-{tag}")
        if name != "plain":
            add("trained for this layout", name, runs[name] / "model", work / f"ppl-fixed-{tag}")

    results = {k: json.loads((r / "results.json").read_text()) for k, r in runs.items()}
    budget = {k: {f: r.get(f) for f in ("steps", "tokens_seen", "train_time_s", "s_per_step", "eval_ppl_after",
                                        "train_loss_last")} for k, r in results.items()}  # fmt: skip
    draws = [json.loads(x) for x in (runs["routing"] / "routing_log.jsonl").read_text().splitlines()]
    shared = [sum(s != i for i, s in enumerate(d["kv_sources"])) for d in draws]
    summary = {"steps": a.steps, "tokens": a.tokens, "layouts": LAYOUTS, "budget": budget, "rows": rows,
               "routing_draws": len(draws), "mean_shared_layers_per_draw": sum(shared) / max(len(shared), 1)}  # fmt: skip
    (docs / "study.json").write_text(json.dumps(summary, indent=2))
    plot(rows, docs / "ppl_vs_kv.png")
    text = table(rows)
    (docs / "table.md").write_text(text + "\n")
    print(text)
    print(json.dumps(budget, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
