"""``lckv-eval``: perplexity recovery (``ppl``) and serving cost (``bench``) of LCKV models against their base Llama."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("lckv.eval")

EPILOG_PPL = """\
windows: the token stream is cut into windows [begin, begin+window) with begin = 0, stride, 2*stride, ...;
each window scores only the tokens the previous window did not (from max(begin+1, previous end) to its end),
as in the Hugging Face perplexity guide. Every model sees the same windows; ppl = exp(mean NLL).
models: folders (Llama or LCKV), LoRA adapter folders (the base named in adapter_config.json, or
LCKV_ADAPTER_BASE=PATH, is loaded and the adapter merged), .gguf files, bundled:smollm2-135m, Hub ids.
recovery = (loss_converted - loss_model) / (loss_converted - loss_base), per mode; needs --base and --converted.
examples:
  lckv-eval ppl out/finetuned --base bundled:smollm2-135m --converted out/converted --data alice29.txt
  lckv-eval ppl out/lora-adapter --data hub:wikitext:wikitext-2-raw-v1:test --modes iterative,sequential,converge
streaming (StreamingLLM, docs/streaming.md): --stream sink=4,window=1024 feeds the text through a cache of 4 sink
+ 1024 recent tokens per KV layer and scores every token from that context; ppl, cache bytes and peak memory are
reported at --checkpoints. convert:LAYOUT converts --base (or --convert-from) in memory; a Llama streams as the
equal plain LCKV layout. --stream-chunk 1 is exact; larger chunks are faster for the base (see the docs).
  lckv-eval ppl convert:sandwich:2 --base bundled:smollm2-135m --data kjv.txt --max-tokens 20480 \\
      --stream sink=4,window=1024 --base-stream-chunk 32
"""

EPILOG_BENCH = """\
LCKV models are checkpoint folders, or convert:LAYOUT to convert BASE in memory exactly as lckv-convert would
(no fine-tuning: for cost measurements), e.g. convert:sandwich:2. BASE may be random:FOLDER (FOLDER's
config.json with random weights) to measure cost on a machine that cannot hold the checkpoint.
example:
  lckv-eval bench bundled:smollm2-135m convert:sandwich:2 convert:sandwich:10 --data alice29.txt --threads 2
"""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _mode_list(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("iterative", "sequential", "converge")]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"modes are iterative, sequential, converge; got {text!r}")
    return modes


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--trust-remote-code", action="store_true", help="load LCKV folders with their own bundled code")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder when a model folder has none")
    p.add_argument("--out", default=None, help="output folder (default lckv-eval-<command>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and the summary table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lckv-eval", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "ppl",
        help="perplexity, LCKV mode gap, recovery and KV convergence",
        epilog=EPILOG_PPL,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model to evaluate: folder, LoRA adapter folder, .gguf, bundled:smollm2-135m, Hub id")
    p.add_argument("--base", help="the base Llama (for recovery and ppl ratio)")
    p.add_argument("--converted", help="the LCKV model right after conversion, before fine-tuning (for recovery)")
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="text files, folders of .txt, or hub:NAME[:CONFIG]:SPLIT (e.g. hub:wikitext:wikitext-2-raw-v1:test)",
    )
    p.add_argument("--window", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: the window)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the data")
    p.add_argument(
        "--modes",
        type=_mode_list,
        default=["iterative", "sequential"],
        help="LCKV prefill modes to evaluate (default iterative,sequential; add converge)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward (default 4)")
    p.add_argument(
        "--stream",
        default=None,
        metavar="sink=N,window=M",
        help="StreamingLLM perplexity instead of windows: feed the text through a cache of N sink + M recent tokens "
        "per KV layer and score every token (a Llama streams as the equal plain LCKV layout)",
    )
    p.add_argument(
        "--stream-chunk",
        type=int,
        default=1,
        help="tokens per forward when streaming (default 1 = exact StreamingLLM; more = faster for the base, the "
        "chunk's tokens also see each other before eviction)",
    )
    p.add_argument(
        "--base-stream-chunk",
        type=int,
        default=None,
        help="--stream-chunk for the --base model only (default: the same)",
    )
    p.add_argument(
        "--convert-from",
        default=None,
        help="the Llama that convert:LAYOUT models are made from in memory (default: --base; streaming only)",
    )
    p.add_argument(
        "--checkpoints",
        type=_int_list,
        default=[2048, 8192, 20480],
        help="text positions where streaming ppl and memory are reported (default 2048,8192,20480; the end always)",
    )
    p.add_argument(
        "--kv-windows", type=int, default=1, help="windows for the KV-convergence trace (0 = skip; default 1)"
    )
    p.add_argument(
        "--kv-window",
        type=int,
        default=128,
        help="tokens per KV-convergence window (its fixed point costs that many passes; default 128)",
    )
    _common(p)

    b = sub.add_parser(
        "bench",
        help="KV bytes, peak memory, throughput, max batch and TTFT vs the base",
        epilog=EPILOG_BENCH,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("base", help="the base Llama")
    b.add_argument("lckv", nargs="+", help="LCKV models: folders or convert:LAYOUT")
    b.add_argument("--batch-sizes", type=_int_list, default=[1, 4], help="grid batch sizes (default 1,4)")
    b.add_argument(
        "--lengths",
        type=_int_list,
        default=[128, 256],
        help="grid total lengths, half prompt and half generated (default 128,256)",
    )
    b.add_argument("--budget-gb", type=float, default=4.0, help="memory budget for the max-batch search (GiB)")
    b.add_argument("--budget-length", type=int, default=1024, help="total tokens per sequence in that search")
    b.add_argument("--prompt-len", type=int, default=512, help="prompt length for time to first token")
    b.add_argument("--repeats", type=int, default=3, help="repeats per figure; medians are reported")
    b.add_argument(
        "--ttft-modes",
        type=_mode_list,
        default=["iterative", "sequential", "converge"],
        help="LCKV prefill modes timed for TTFT",
    )
    b.add_argument(
        "--data", nargs="+", default=None, help="text for prompts (default: fixed random tokens) and for --ppl-tokens"
    )
    b.add_argument(
        "--ppl-tokens",
        type=int,
        default=0,
        help="also compute perplexity on the first N tokens of --data (for the ppl vs KV plot)",
    )
    b.add_argument(
        "--kv-init",
        choices=["top", "mean"],
        default=None,
        help="k/v projections of convert:LAYOUT models (default: lckv-convert's default)",
    )
    b.add_argument("--skip", default="", help="comma list of parts to skip: grid, maxbatch, ttft")
    _common(b)
    return parser


def _setup(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda but torch sees no GPU: use --device cpu or install a CUDA build of torch")


class UsageError(ValueError):
    """A bad combination of options."""


def _known_errors() -> tuple[type[BaseException], ...]:
    from lckv.layout import LayoutError

    from .data import DataError
    from .models import ModelLoadError
    from .report import OutputError
    from .stream import StreamSpecError

    return (DataError, ModelLoadError, OutputError, LayoutError, UsageError, StreamSpecError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        known = _known_errors()
    except ImportError as e:
        print(f"lckv-eval: error: lckv is not installed correctly ({e}): pip install -e .", file=sys.stderr)
        return 2
    try:
        _setup(args)
        if args.command == "ppl":
            return ppl_command(args)
        return bench_command(args)
    except known as e:
        print(f"lckv-eval: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lckv-eval: interrupted", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------------------------- ppl


def ppl_command(args: argparse.Namespace) -> int:
    from .data import load_text, make_windows, tokenize
    from .models import load_model
    from .plots import kv_convergence_plot
    from .ppl import evaluate_model, kv_convergence, recovery
    from .report import prepare_out_dir, to_json, write_outputs

    stride = args.stride or args.window
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    for ref in (args.model, args.converted):
        if ref and ref.startswith("convert:") and not (args.base or args.convert_from):
            raise UsageError(f"{ref} converts a Llama in memory: pass --base or --convert-from")
    if args.stream is not None:
        return stream_command(args)
    if any(r and r.startswith("convert:") for r in (args.model, args.converted)):
        raise UsageError("convert:LAYOUT models are supported with --stream only: convert with lckv-convert first")
    out_dir = prepare_out_dir(args.out, "ppl", args.overwrite)
    text, sources = load_text(args.data)  # data errors surface before any model loads
    make_windows(10**6, args.window, stride)  # validates --window/--stride

    refs = {"model": args.model, "base": args.base, "converted": args.converted}
    results: dict[str, Any] = {}
    convergence: dict[str, Any] = {}
    tokens: list[int] | None = None
    vocab: dict[str, int] | None = None
    for role, ref in refs.items():
        if ref is None:
            continue
        logger.info("loading %s model %s", role, ref)
        model, tok = load_model(
            ref, args.device, args.dtype, trust_remote_code=args.trust_remote_code, tokenizer=args.tokenizer
        )
        if tokens is None:
            tokens = tokenize(text, tok, args.max_tokens)
            vocab = tok.get_vocab()
            logger.info("%d tokens, %d windows", len(tokens), len(make_windows(len(tokens), args.window, stride)))
        elif tok.get_vocab() != vocab:
            raise UsageError(
                f"the {role} model's tokenizer differs from the evaluated model's: perplexities would "
                "not be comparable; pass --tokenizer to use one tokenizer for all"
            )
        results[role] = {
            "ref": ref,
            **evaluate_model(model, tokens, args.window, stride, args.modes, args.batch_size, role),
        }
        if args.kv_windows > 0 and role in ("model", "converted"):
            convergence[role] = kv_convergence(model, tokens, min(args.kv_window, len(tokens)), args.kv_windows)
        del model
        gc.collect()

    rec = recovery(results["model"], results["base"], results.get("converted")) if "base" in results else None
    windows = make_windows(len(tokens), args.window, stride)
    data = {
        "window": args.window,
        "stride": stride,
        "num_windows": len(windows),
        "scored_tokens": sum(w.num_scored for w in windows),
        "scoring": "windows [begin, begin+window), begin = 0, stride, ...; each window scores positions "
        "max(begin+1, previous window end) .. end-1 given its earlier tokens; no special tokens added",
    }
    result = ppl_report(args, sources, tokens, data, models=results, recovery=rec, kv_convergence=convergence or None)
    md = ppl_markdown(result)
    files: dict[str, Any] = {"ppl.json": to_json(result), "ppl.md": md}
    plot = kv_convergence_plot(convergence)
    if plot:
        files["kv_convergence.png"] = plot
    write_outputs(out_dir, files)
    print(md)
    print(f"\nwrote {out_dir}/ppl.json, ppl.md" + (", kv_convergence.png" if plot else ""))
    return 0


def ppl_report(
    args: argparse.Namespace, sources: list[str], tokens: list[int], data: dict[str, Any], **sections
) -> dict:
    """The ppl.json document, shared by windowed and streaming perplexity: command, argv, environment, data, sections."""
    from .report import environment

    head = {"sources": sources, "num_tokens": len(tokens), "max_tokens": args.max_tokens}
    return {
        "command": "ppl",
        "argv": args.argv,
        "environment": environment(args.device),
        "data": {**head, **data},
        **sections,
    }


def stream_command(args: argparse.Namespace) -> int:
    """``lckv-eval ppl --stream``: streaming perplexity and memory for the model (and --base side by side)."""
    from .data import load_text, tokenize
    from .models import convert_in_memory, load_model
    from .ppl import describe_model
    from .report import prepare_out_dir, to_json, write_outputs
    from .stream import StreamSpecError, parse_stream_spec, streaming_perplexity

    sink, window = parse_stream_spec(args.stream)
    chunks = {"model": args.stream_chunk, "base": args.base_stream_chunk or args.stream_chunk}
    chunks["converted"] = args.stream_chunk
    if min(chunks.values()) < 1:
        raise StreamSpecError("--stream-chunk and --base-stream-chunk must be at least 1")
    out_dir = prepare_out_dir(args.out, "ppl", args.overwrite)
    text, sources = load_text(args.data)

    def load(ref: str):
        return load_model(
            ref, args.device, args.dtype, trust_remote_code=args.trust_remote_code, tokenizer=args.tokenizer
        )

    base_model = base_tok = source = None
    if args.base:  # loaded first: convert:LAYOUT models are made from it
        logger.info("loading base model %s", args.base)
        base_model, base_tok = load(args.base)
        source = (base_model, base_tok)
    if args.convert_from and args.convert_from != args.base:
        logger.info("loading %s to convert from", args.convert_from)
        source = load(args.convert_from)
    order = [("base", args.base), ("model", args.model), ("converted", args.converted)]
    results: dict[str, Any] = {}
    tokens: list[int] | None = None
    vocab: dict[str, int] | None = None
    for role, ref in order:
        if ref is None:
            continue
        if role == "base":
            model, tok = base_model, base_tok
        elif ref.startswith("convert:"):
            logger.info("converting the base to %s in memory", ref.split(":", 1)[1])
            model, tok = convert_in_memory(source[0], ref.split(":", 1)[1]), source[1]
        else:
            logger.info("loading %s model %s", role, ref)
            model, tok = load(ref)
        if tok is None:
            raise UsageError(f"{ref} has no tokenizer: pass --tokenizer PATH")
        if tokens is None:
            tokens = tokenize(text, tok, args.max_tokens)
            vocab = tok.get_vocab()
            logger.info("%d tokens, streaming with sink %d, window %d", len(tokens), sink, window)
        elif tok.get_vocab() != vocab:
            raise UsageError(
                f"the {role} model's tokenizer differs from the others': perplexities would not be comparable; "
                "pass --tokenizer to use one tokenizer for all"
            )
        info = describe_model(model)
        results[role] = {
            "ref": ref,
            **info,
            "streamed_as": "LCKV layout" if info["lckv"] else "plain LCKV layout (the same function as the Llama)",
            "stream": streaming_perplexity(
                model, tokens, sink, window, chunks[role], args.checkpoints, desc=f"{role} stream"
            ),
        }
        if role != "base":
            del model
        gc.collect()
    ordered = {r: results[r] for r in ("model", "base", "converted") if r in results}
    data = {
        "scoring": "streaming: tokens fed in order through a sink + window cache, --stream-chunk per forward; "
        "token t+1 scored from the logits of token t; no special tokens added",
    }
    stream = {"sink": sink, "window": window, "checkpoints": args.checkpoints}
    result = ppl_report(args, sources, tokens, data, stream=stream, models=ordered, recovery=None, kv_convergence=None)
    md = stream_markdown(result)
    write_outputs(out_dir, {"ppl.json": to_json(result), "ppl.md": md})
    print(md)
    print(f"\nwrote {out_dir}/ppl.json, ppl.md")
    return 0


def stream_markdown(result: dict[str, Any]) -> str:
    """The streaming table: one row per model and checkpoint."""
    from .report import markdown_table

    MiB = 2**20
    d, st = result["data"], result["stream"]
    base_ppl = {}
    if "base" in result["models"]:
        base_ppl = {c["tokens"]: c["ppl"] for c in result["models"]["base"]["stream"]["checkpoints"]}
    rows = []
    for role, r in result["models"].items():
        s = r["stream"]
        for c in s["checkpoints"]:
            rows.append(
                [
                    role,
                    r["ref"],
                    f"{r['num_kv_layers']}/{r['num_layers']}",
                    s["chunk"],
                    c["tokens"],
                    c["ppl"],
                    c["segment_ppl"],
                    f"{base_ppl[c['tokens']] and c['ppl'] / base_ppl[c['tokens']]:.3g}x"
                    if c["tokens"] in base_ppl
                    else "-",
                    c["cache_bytes"] / MiB,
                    c["cache_tokens"],
                    c["max_cache_bytes"] / MiB,
                    None if c["segment_peak_bytes"] is None else c["segment_peak_bytes"] / MiB,
                    round(c["segment_tokens_per_s"] or 0, 1),
                    c["seconds"],
                ]
            )
    notes = [
        f"Streaming perplexity on {', '.join(d['sources'])}: {d['num_tokens']:,} tokens, sink {st['sink']}, "
        f"window {st['window']}; every token is predicted from the sink + window cache (chunk 1 = exact "
        "StreamingLLM; a chunk of N also sees its own earlier tokens before eviction).",
        "",
        markdown_table(
            [
                "role",
                "model",
                "KV layers",
                "chunk",
                "tokens",
                "ppl",
                "segment ppl",
                "ppl / base",
                "cache MiB",
                "cache tokens/layer",
                "max cache MiB",
                "peak MiB (segment)",
                "tok/s",
                "seconds",
            ],
            rows,
        ),
        "",
        "Peak = "
        + next(iter(result["models"].values()))["stream"]["memory_method"]
        + "; cache bound per model: "
        + ", ".join(f"{role} {r['stream']['cache_bound_bytes'] / MiB:.3g} MiB" for role, r in result["models"].items())
        + ".",
    ]
    inexact = [role for role, r in result["models"].items() if not r["stream"]["exact"]]
    if inexact:
        notes.append(
            f"Approximate ({', '.join(inexact)}): upward LCKV chunks longer than m+b are prefilled with m+b passes."
        )
    return "\n".join(notes)


def ppl_markdown(result: dict[str, Any]) -> str:
    from .report import fmt, markdown_table

    d = result["data"]
    rows = []
    for role, r in result["models"].items():
        for mode, m in r["modes"].items():
            rows.append(
                [role, r["ref"], r["num_kv_layers"], mode, m["ppl"], m["loss"], m["scored_tokens"], m["seconds"]]
            )
    parts = [
        f"Perplexity on {', '.join(d['sources'])}: {d['num_tokens']:,} tokens, window {d['window']}, "
        f"stride {d['stride']}, {d['scored_tokens']:,} tokens scored.",
        "",
        markdown_table(["role", "model", "KV layers", "mode", "ppl", "loss (nats)", "tokens", "seconds"], rows),
    ]
    gaps = [(role, r["gap"]) for role, r in result["models"].items() if r.get("gap")]
    if gaps:
        parts += ["", "Iterative vs sequential (exact) prefill:"]
        parts += [
            f"- {role}: ppl gap {fmt(g['ppl_iterative_minus_sequential'], 4)} ({100 * g['relative_ppl']:+.2f}%)"
            for role, g in gaps
        ]
    if result.get("recovery"):
        parts += [
            "",
            markdown_table(
                ["mode", "loss model", "loss converted", "loss base", "loss recovery", "ppl model / ppl base"],
                [
                    [mode, e["loss_model"], e["loss_converted"], e["loss_base"], e["loss_recovery"], e["ppl_ratio"]]
                    for mode, e in result["recovery"].items()
                ],
            ),
        ]
    for role, c in (result.get("kv_convergence") or {}).items():
        if c:
            parts += [
                "",
                f"KV convergence ({role}, MSE vs the {c['fixed_point_passes']}-pass fixed point, "
                f"{c['windows']} window(s) of {c['window']} tokens): "
                + ", ".join(f"k={k}: {v:.3g}" for k, v in zip(c["passes"], c["mse"])),
            ]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------- bench


def bench_command(args: argparse.Namespace) -> int:
    import torch

    from . import bench as B
    from .data import load_text, tokenize
    from .models import convert_in_memory, load_model
    from .plots import memory_vs_length, ppl_vs_kv, throughput_vs_batch
    from .ppl import describe_model, evaluate_model
    from .report import environment, prepare_out_dir, to_json, write_outputs

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    bad = skip - {"grid", "maxbatch", "ttft"}
    if bad:
        raise UsageError(f"--skip takes grid, maxbatch, ttft; got {', '.join(sorted(bad))}")
    if args.ppl_tokens and not args.data:
        raise UsageError("--ppl-tokens needs --data")
    if args.budget_length < 8 or args.prompt_len < 1 or args.repeats < 1:
        raise UsageError("--budget-length must be >= 8, --prompt-len and --repeats >= 1")
    out_dir = prepare_out_dir(args.out, "bench", args.overwrite)
    text = load_text(args.data)[0] if args.data else None

    base_model, tok = load_model(
        args.base, args.device, args.dtype, trust_remote_code=args.trust_remote_code, tokenizer=args.tokenizer
    )
    models = [B.BenchModel("base", args.base, base_model)]
    for ref in args.lckv:
        if ref.startswith("convert:"):
            layout = ref.split(":", 1)[1]
            logger.info("converting the base to %s in memory", layout)
            m = convert_in_memory(base_model, layout, kv_init=args.kv_init)
            name = layout
        else:
            m, _ = load_model(
                ref, args.device, args.dtype, trust_remote_code=args.trust_remote_code, tokenizer=args.tokenizer
            )
            name = Path(ref).name or ref
        names = [x.name for x in models]
        models.append(B.BenchModel(name if name not in names else f"{name}#{len(models)}", ref, m))
    for bm in models:
        bm.info = describe_model(bm.model)
        if bm.model.config.vocab_size != base_model.config.vocab_size:
            raise UsageError(f"{bm.ref} has a different vocabulary from the base: compare models of one family")

    need = max([args.prompt_len, args.budget_length] + args.lengths) * max(args.batch_sizes + [1])
    if text is not None and tok is None:
        raise UsageError(f"{args.base} has no tokenizer for --data: pass --tokenizer PATH")
    if text is not None:
        tokens = tokenize(text, tok, max(need, args.ppl_tokens or 0))
        prompt_source = "data"
    else:
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(3, base_model.config.vocab_size, (need,), generator=g).tolist()
        prompt_source = "random tokens (seed 0)"

    memory_method = (
        "cuda max_memory_allocated above the pre-call allocation"
        if args.device.startswith("cuda")
        else "process peak RSS (VmHWM after clear_refs + malloc_trim) above the pre-call RSS"
    )
    if not args.device.startswith("cuda") and not B.cpu_memory_method_available():
        logger.warning("cannot reset the RSS high-water mark here (/proc/self/clear_refs): peak memory is not reported")
        memory_method = "unavailable (no /proc/self/clear_refs)"

    result: dict[str, Any] = {
        "command": "bench",
        "argv": args.argv,
        "environment": environment(args.device),
        "settings": {
            "device": args.device,
            "dtype": str(next(base_model.parameters()).dtype),
            "batch_sizes": args.batch_sizes,
            "lengths": args.lengths,
            "budget_gb": args.budget_gb,
            "budget_length": args.budget_length,
            "prompt_len": args.prompt_len,
            "repeats": args.repeats,
            "ttft_modes": args.ttft_modes,
            "prompts": prompt_source,
            "kv_init": args.kv_init or _default_kv_init(),
            "skip": sorted(skip),
        },
        "memory_method": memory_method,
        "model_names": [bm.name for bm in models],
        "models": [],
        "memory_grid": [],
        "max_batch": [],
        "ttft": [],
        "ppl": [],
    }
    for bm in models:
        kv = B.kv_bytes_per_token(bm, tokens)
        if not kv["agree"]:
            logger.warning(
                "%s: KV bytes/token from the cache (%s) and the formula (%s) disagree",
                bm.name,
                kv["cache"],
                kv["formula"],
            )
        result["models"].append(
            {
                "name": bm.name,
                "ref": bm.ref,
                **bm.info,
                "weights_bytes": B.weight_bytes(bm.model),
                "kv_bytes_per_token": kv,
            }
        )
    kv_of = {m["name"]: m["kv_bytes_per_token"]["cache"] for m in result["models"]}

    if "grid" not in skip:
        result["memory_grid"] = B.memory_grid(models, tokens, args.batch_sizes, args.lengths, args.repeats)
    if "ttft" not in skip:
        result["ttft"] = B.ttft(models, tokens, args.prompt_len, args.repeats, args.ttft_modes)
    if "maxbatch" not in skip:
        budget = int(args.budget_gb * B.GB)
        for bm in models:
            try:
                mb = B.max_batch(bm, tokens, budget, args.budget_length, kv_of[bm.name], repeats=args.repeats)
            except ValueError as e:
                raise UsageError(str(e)) from None
            result["max_batch"].append(mb)
        base_tps = result["max_batch"][0]["decode_tokens_per_s"]
        for mb in result["max_batch"]:
            mb["throughput_vs_base"] = (
                mb["decode_tokens_per_s"] / base_tps if base_tps and mb["decode_tokens_per_s"] else None
            )
    if args.ppl_tokens:
        for bm in models:
            modes = ["sequential"] if bm.info["upward"] else ["iterative"]
            r = evaluate_model(bm.model, tokens[: args.ppl_tokens], 256, 256, modes, 4, bm.name)
            for mode, m in r["modes"].items():
                result["ppl"].append({"model": bm.name, "mode": mode, "kv_fraction": bm.info["kv_fraction"], **m})

    md = bench_markdown(result)
    files: dict[str, Any] = {"bench.json": to_json(result), "bench.md": md}
    for fname, plot in (
        ("throughput_vs_batch.png", throughput_vs_batch(result)),
        ("memory_vs_length.png", memory_vs_length(result)),
        ("ppl_vs_kv.png", ppl_vs_kv(result["ppl"])),
    ):
        if plot:
            files[fname] = plot
    write_outputs(out_dir, files)
    print(md)
    print(f"\nwrote {out_dir}/ ({', '.join(files)})")
    return 0


def _default_kv_init() -> str:
    try:
        from lckv.convert import DEFAULT_KV_INIT
    except ImportError:
        return "top"
    return DEFAULT_KV_INIT


def bench_markdown(result: dict[str, Any]) -> str:
    from .report import markdown_table

    MB = 1024**2
    s = result["settings"]
    env = result["environment"]
    ttft = {(t["model"], t["mode"]): t for t in result["ttft"]}
    mb = {m["model"]: m for m in result["max_batch"]}
    base_ttft = ttft.get((result["model_names"][0], "base"))
    rows = []
    for m in result["models"]:
        name = m["name"]
        kv = m["kv_bytes_per_token"]
        x = mb.get(name, {})

        def t(mode: str, name: str = name) -> str:
            e = ttft.get((name, mode)) or (ttft.get((name, "base")) if mode == "iterative" else None)
            if not e or e["ttft_s"] is None:
                return "-"
            return (
                f"{e['ttft_s']:.3f} s ({e['ratio_to_base']:.2f}x)" if e.get("ratio_to_base") else f"{e['ttft_s']:.3f} s"
            )

        rows.append(
            [
                name,
                f"{m['num_kv_layers']}/{m['num_layers']}",
                int(round(kv["cache"])),
                kv["formula"],
                "yes" if kv["agree"] else "NO",
                x.get("max_batch"),
                None if x.get("decode_tokens_per_s") is None else round(x["decode_tokens_per_s"], 1),
                None if x.get("throughput_vs_base") is None else f"{x['throughput_vs_base']:.2f}x",
                t("iterative") if m["lckv"] else t("base"),
                t("sequential") if m["lckv"] else "-",
                t("converge") if m["lckv"] else "-",
            ]
        )
    head = (
        f"Device {env['device']} ({env.get('gpu') or env.get('cpu')}), {env['torch_threads']} threads, "
        f"dtype {s['dtype']}, torch {env['torch']}, transformers {env['transformers']}; medians of "
        f"{s['repeats']} interleaved repeats; prompts: {s['prompts']}."
    )
    budget = f"max batch in {s['budget_gb']:g} GiB @ {s['budget_length']} tok"
    parts = [
        head,
        "",
        markdown_table(
            [
                "model",
                "KV layers",
                "KV B/token (cache)",
                "KV B/token (formula)",
                "agree",
                budget,
                "decode tok/s @ max batch",
                "vs base",
                f"TTFT {s['prompt_len']} tok: iterative/base",
                "TTFT sequential",
                "TTFT converge",
            ],
            rows,
        ),
    ]
    if base_ttft is None and result["ttft"]:
        parts.append("(no base TTFT)")
    if result["memory_grid"]:
        parts += [
            "",
            f"generate() over batch x (prompt + generated) length; peak = {result['memory_method']}:",
            "",
            markdown_table(
                ["model", "batch", "length", "peak MiB", "KV cache MiB", "decode tok/s", "TTFT s"],
                [
                    [
                        g["model"],
                        g["batch"],
                        g["length"],
                        None if g["peak_bytes"] is None else g["peak_bytes"] / MB,
                        g["kv_cache_bytes_at_end"] / MB,
                        g["decode_tokens_per_s"],
                        g["ttft_s"],
                    ]
                    for g in sorted(
                        result["memory_grid"],
                        key=lambda g: (g["length"], g["batch"], result["model_names"].index(g["model"])),
                    )
                ],
            ),
        ]
    if result["max_batch"]:
        parts += [
            "",
            "Max batch: "
            + "; ".join(
                f"{m['model']}: {m['max_batch']} (weights {m['weights_bytes'] / MB:.0f} MiB + measured peak "
                f"{(m['peak_bytes'] or 0) / MB:.0f} MiB, of which KV {m.get('kv_cache_bytes', 0) / MB:.0f} MiB; "
                f"{len(m['probes'])} probes, {m['method']})"
                for m in result["max_batch"]
            ),
        ]
    if result["ppl"]:
        parts += [
            "",
            markdown_table(
                ["model", "mode", "KV fraction", "ppl", "tokens"],
                [[p["model"], p["mode"], p["kv_fraction"], p["ppl"], p["scored_tokens"]] for p in result["ppl"]],
            ),
        ]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
