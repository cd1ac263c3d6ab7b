"""Measure lckv-convert on the bundled SmolLM2-135M (the numbers in docs/convert.md).

For each layout and ``--kv-init``: convert in a child process and record its peak RSS (``wait4``), then
score the result on alice29.txt (held out from all training) in ``window``-token windows, in sequential
mode (exact, what decoding computes) and iterative mode (parallel prefill), next to the source model.

    python -m lckv.convert.measure --tokens 2048 --json runs/convert_measure.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SRC = "bundled:smollm2-135m"
ALICE = [Path("/work/shared/data/text/alice29.txt"), Path(__file__).resolve().parent.parent / "tests/data/alice29.txt"]


# A small launcher runs the command and reports its peak RSS from wait4. Spawning straight from a big process
# would count that process's pages: Linux keeps the pre-exec high-water mark of a forked child in ru_maxrss.
_LAUNCHER = """
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL if sys.argv[1] == "-" else None)
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "peak_rss_bytes": usage.ru_maxrss * 1024}))
"""


def peak_rss(cmd: list[str], env: dict | None = None) -> tuple[int, int, str]:
    """Run ``cmd``; return (exit status, its peak resident memory in bytes, its output)."""
    with tempfile.TemporaryFile() as log:
        res = subprocess.run([sys.executable, "-c", _LAUNCHER, "+", *cmd], stdout=subprocess.PIPE, stderr=log, env=env)
        log.seek(0)
        lines = res.stdout.decode().strip().splitlines()
        stats = json.loads(lines[-1])
        return stats["returncode"], stats["peak_rss_bytes"], "\n".join(lines[:-1]) + log.read().decode()


def convert_in_child(layout: str, kv_init: str, out: Path) -> dict:
    """Run the CLI in a child process; return its wall time and peak resident memory."""
    cmd = [sys.executable, "-m", "lckv.convert.cli", SRC, "--warmup", layout, "--kv-init", kv_init]
    cmd += ["-o", str(out), "--no-check", "--overwrite"]
    t0 = time.time()
    code, peak, output = peak_rss(cmd)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[-2000:]}")
    return {"seconds": time.time() - t0, "peak_rss_bytes": peak}


def import_baseline_rss() -> int:
    """Peak RSS of a child that only imports the converter (Python + torch + transformers)."""
    code, peak, _ = peak_rss(
        [sys.executable, "-c", "import lckv.convert.api, transformers.modeling_gguf_pytorch_utils"]
    )
    return peak


def alice_ids(tokenizer, tokens: int) -> torch.Tensor:
    path = next(p for p in ALICE if p.is_file())
    text = path.read_text(encoding="utf-8", errors="replace")
    start = text.find("CHAPTER I")
    ids = tokenizer(text[max(start, 0) :], add_special_tokens=False)["input_ids"][:tokens]
    return torch.tensor(ids, dtype=torch.long)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", nargs="+", default=["sandwich:2", "cla:2"])
    p.add_argument("--tokens", type=int, default=2048, help="alice29 tokens scored")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--workdir", type=Path, default=None, help="where converted models go (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--no-ppl", action="store_true", help="only convert and measure memory")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from ..layout import has_upward
    from .check import load_converted, load_source_model, perplexity
    from .sources import resolve_source

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lckv-measure-"))
    results: dict = {"source": SRC, "tokens": args.tokens, "window": args.window, "runs": []}
    results["import_baseline_rss_bytes"] = import_baseline_rss()

    for layout in args.layouts:
        for kv_init in ("top", "mean"):
            out = workdir / f"{layout.replace(':', '-')}-{kv_init}"
            run = {"layout": layout, "kv_init": kv_init, **convert_in_child(layout, kv_init, out)}
            run["output_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            print(json.dumps(run), flush=True)
            if args.no_ppl:
                results["runs"].append(run)
                continue
            tok = AutoTokenizer.from_pretrained(out)
            ids = alice_ids(tok, args.tokens)
            model = load_converted(out)
            t0 = time.time()
            run["ppl_sequential"] = perplexity(model, ids, args.window, prefill_mode="sequential")
            if has_upward(model.config.kv_sources):
                run["ppl_iterative"] = perplexity(model, ids, args.window, prefill_mode="iterative")
            run["eval_seconds"] = time.time() - t0
            print(json.dumps(run), flush=True)
            results["runs"].append(run)
            del model

    source = resolve_source(SRC)
    reader = source.reader()
    results["source_bytes_fp32"] = sum(t.numel() * t.element_size() for t in reader.tensors.values())
    results["gguf_file_bytes"] = source.gguf_path.stat().st_size
    if not args.no_ppl:
        model = load_source_model(source, reader)
        results["source_ppl"] = perplexity(model, alice_ids(tok, args.tokens), args.window)
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}), flush=True)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return 0


def markdown(results: dict) -> str:
    """The tables of docs/convert.md."""
    mb = 1024**2
    lines = []
    if "source_ppl" in results:
        lines += [
            f"Source perplexity: **{results['source_ppl']:.2f}** ({results['tokens']} tokens of alice29.txt, "
            f"{results['window']}-token windows).",
            "",
            "| layout | kv init | perplexity, sequential (exact) | perplexity, iterative prefill |",
            "|---|---|---|---|",
        ]
        for r in results["runs"]:
            it = f"{r['ppl_iterative']:,.1f}" if "ppl_iterative" in r else "same (no upward reads)"
            lines.append(f"| `{r['layout']}` | `{r['kv_init']}` | {r['ppl_sequential']:,.1f} | {it} |")
        lines.append("")
    lines += [
        "| layout | kv init | conversion time | peak RSS | output weights |",
        "|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| `{r['layout']}` | `{r['kv_init']}` | {r['seconds']:.0f} s | {r['peak_rss_bytes'] / mb:,.0f} MiB | "
            f"{r['output_bytes'] / mb:,.0f} MiB |"
        )
    lines += [
        "",
        f"Model: {results['source_bytes_fp32'] / mb:,.0f} MiB of float32 weights once dequantized "
        f"({results['gguf_file_bytes'] / mb:,.0f} MiB GGUF file); a child that only imports the converter peaks at "
        f"{results['import_baseline_rss_bytes'] / mb:,.0f} MiB.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
