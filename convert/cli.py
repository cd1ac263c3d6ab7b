"""``lckv-convert``: turn a Llama checkpoint into an LCKV checkpoint from the command line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
import warnings

EPILOG = """\
examples:
  lckv-convert meta-llama/Llama-3.2-1B --warmup sandwich:2 -o llama-3.2-1b-lckv-s2
  lckv-convert bundled:smollm2-135m --warmup sandwich:2 -o smollm2-lckv-s2
  lckv-convert ./my-llama --warmup cla:2 --dtype bfloat16 -o my-llama-cla2
  lckv-convert model.Q4_K_M.gguf --warmup 0,5,5,5,5,5 -o out
  lckv-convert smollm2-lckv-s2 --reshare --warmup cla:2 -o smollm2-cla2   (an LCKV checkpoint, new layout)

layouts (--warmup): sandwich:W (W warmup layers split bottom/top, the middle reads the top of the
middle block), bottom:W, top:W, cla:K (groups of K layers share the KVs of their first layer),
plain, or an explicit list of source layers, one per layer (0,2,2,3).
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """Usage errors in one line, like every other error of this command."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="lckv-convert",
        description="Convert a Llama checkpoint (Hub id, local folder, .gguf file, or bundled:smollm2-135m) into a "
        "layer-condensed KV (LCKV) checkpoint that loads with transformers' trust_remote_code=True.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="Hub id (org/name), local folder, .gguf file, or bundled:smollm2-135m")
    p.add_argument("--warmup", "--layout", dest="layout", required=True, metavar="SPEC", help="the KV layout")
    p.add_argument("-o", "--output", dest="output", required=True, metavar="DIR", help="output folder (must not exist)")
    p.add_argument(
        "--kv-init",
        choices=["top", "mean"],
        default=None,
        help="k/v projections of a KV layer: its own (top) or the mean over the layers that read it (mean); "
        "default: the one measured better (docs/convert.md)",
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast weights (default: keep)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reload the result and compare perplexity and a greedy continuation with the source "
        "(default: on below 1B parameters)",
    )
    p.add_argument(
        "--check-tokens", type=int, default=256, metavar="N", help="tokens of the built-in text --check scores (256)"
    )
    p.add_argument("--push-to-hub", metavar="ORG/NAME", help="upload the finished folder to this Hub repository")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repository")
    p.add_argument("--reshare", action="store_true", help="the source is an LCKV checkpoint: give it a new layout")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the source's own code (tokenizer) to run; off by default",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress and library warnings")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


@contextlib.contextmanager
def _quiet(verbose: bool):
    """Library warnings and logs off unless asked for; progress bars only on a terminal. Restored on exit."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    saved = hf_logging.get_verbosity(), hub_logging.get_verbosity()
    with warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")
            hf_logging.set_verbosity_error()
            hub_logging.set_verbosity_error()
        bars = not sys.stderr.isatty() and not verbose
        saved_tqdm = os.environ.get("TQDM_DISABLE")
        if bars:
            hf_logging.disable_progress_bar()
            os.environ["TQDM_DISABLE"] = "1"  # libraries' own tqdm bars (GGUF dequantization)
        try:
            yield
        finally:
            hf_logging.set_verbosity(saved[0])
            hub_logging.set_verbosity(saved[1])
            if bars:
                hf_logging.enable_progress_bar()
                if saved_tqdm is None:
                    os.environ.pop("TQDM_DISABLE", None)
                else:
                    os.environ["TQDM_DISABLE"] = saved_tqdm


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 conversion or upload error, 2 usage error)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed in one line
        return int(e.code or 0)
    with _quiet(args.verbose):
        return _run(args, sys.argv[1:] if argv is None else list(argv))


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from ..layout import LayoutError
    from .api import convert
    from .sources import ConvertError

    try:
        result = convert(
            args.src,
            args.layout,
            args.output,
            kv_init=args.kv_init,
            overwrite=args.overwrite,
            check=args.check,
            push_to_hub=args.push_to_hub,
            private=args.private,
            trust_remote_code=args.trust_remote_code,
            reshare=args.reshare,
            dtype=args.dtype,
            command=shlex.join(["lckv-convert", *argv]),
            check_tokens=args.check_tokens,
        )
    except (ConvertError, LayoutError) as e:
        if args.debug:
            raise
        print(f"lckv-convert: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lckv-convert: interrupted (no unfinished output is left behind)", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line unless --debug
        if args.debug:
            raise
        print(f"lckv-convert: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug)", file=sys.stderr)
        return 1
    print(summary(result))
    return 0


def summary(result) -> str:
    """The short table printed at the end."""
    from .card import human_bytes

    rows = [
        ("output", str(result.output_dir)),
        ("source", result.source),
        ("layout", f"{result.layout} -> {len(set(result.kv_sources))} of {len(result.kv_sources)} layers cache KVs"),
        ("kv_sources", str(result.kv_sources)),
        ("kv init", result.kv_init),
        ("parameters", f"{result.num_parameters / 1e6:,.1f} M ({result.dtype})"),
        (
            "KV cache / token",
            f"{human_bytes(result.kv_bytes_before)} -> {human_bytes(result.kv_bytes_after)} "
            f"({result.kv_bytes_before / result.kv_bytes_after:.1f}x smaller)",
        ),
        ("dropped tensors", str(len(result.dropped))),
        ("written", f"{len(result.files)} files, {human_bytes(result.output_bytes)} in {result.seconds:.1f} s"),
    ]
    if result.check is not None:
        rows += list(result.check.rows().items())
    if result.hub_url:
        rows.append(("pushed to", result.hub_url))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
