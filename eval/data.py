"""Evaluation text: local files or Hub datasets, tokenized once and cut into scoring windows.

Windowing (the same for every model in a run, as in the Hugging Face perplexity guide): the token stream is cut
into windows ``[begin, begin + window)`` with ``begin = 0, stride, 2 * stride, ...`` until a window reaches the end.
Position ``p`` is scored (its negative log-likelihood given the tokens of its window before it) in the first window
that contains it with ``p > begin``; a window scores positions ``max(begin + 1, end of the previous window)`` up to
its own end. So every token except the very first is scored exactly once when ``stride <= window - 1``; with
``stride == window`` the windows are disjoint and the first token of each window is context only (not scored).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HUB_PREFIX = "hub:"
DEFAULT_HUB_DATA = "hub:wikitext:wikitext-2-raw-v1:test"


class DataError(ValueError):
    """Unusable evaluation data; the message names the fix."""


@dataclass(frozen=True)
class Window:
    """One scoring window: model input ``tokens[begin:end]``, scored positions ``[score_from, end)``."""

    begin: int
    end: int
    score_from: int

    @property
    def length(self) -> int:
        return self.end - self.begin

    @property
    def num_scored(self) -> int:
        return self.end - self.score_from


def make_windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    """The scoring windows over a stream of ``num_tokens`` tokens (see the module docstring)."""
    if window < 2:
        raise DataError(f"--window must be at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise DataError(f"--stride must be between 1 and the window ({window}), got {stride}")
    if num_tokens < 2:
        raise DataError(f"the data has {num_tokens} token(s); perplexity needs at least 2: give more text")
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        score_from = max(begin + 1, prev_end)
        if end > score_from:
            windows.append(Window(begin, end, score_from))
        prev_end = end
        if end == num_tokens:
            break
    return windows


def parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """``hub:NAME[:CONFIG]:SPLIT`` -> (name, config, split)."""
    parts = spec[len(HUB_PREFIX) :].split(":")
    if len(parts) == 2 and all(parts):
        return parts[0], None, parts[1]
    if len(parts) == 3 and all(parts):
        return parts[0], parts[1], parts[2]
    raise DataError(f"bad hub dataset {spec!r}: write hub:NAME[:CONFIG]:SPLIT, e.g. {DEFAULT_HUB_DATA}")


def load_hub_text(spec: str) -> str:
    """Text of a Hub dataset split, rows joined with blank lines (as the HF perplexity guide does)."""
    name, config, split = parse_hub_spec(spec)
    try:
        import datasets
    except ImportError:
        raise DataError("Hub datasets need the datasets package: pip install 'lckv[eval]'") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - any failure becomes one actionable line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(
            f"could not load Hub dataset {name} ({config or 'default'}, {split}): {first}; offline? give local text "
            "files with --data FILE"
        ) from None
    column = "text" if "text" in ds.column_names else None
    if column is None:
        strings = [c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"]
        if not strings:
            raise DataError(f"Hub dataset {name} has no text column (columns: {', '.join(ds.column_names)})")
        column = strings[0]
    text = "\n\n".join(ds[column])
    if not text.strip():
        raise DataError(f"Hub dataset {name} split {split} has no text")
    return text


def load_text(sources: list[str] | str) -> tuple[str, list[str]]:
    """Read and join the evaluation text; returns (text, resolved source names).

    Each source is a text file, a folder (its ``*.txt`` files, sorted) or ``hub:NAME[:CONFIG]:SPLIT``.
    Several sources are joined with blank lines in the order given.
    """
    if isinstance(sources, str):
        sources = [s for s in sources.split(",") if s]
    if not sources:
        raise DataError("no evaluation data: pass --data FILE [FILE ...] or --data hub:NAME[:CONFIG]:SPLIT")
    parts: list[str] = []
    names: list[str] = []
    for src in sources:
        if src.startswith(HUB_PREFIX):
            parts.append(load_hub_text(src))
            names.append(src)
            continue
        path = Path(src).expanduser()
        files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise DataError(f"data folder {path} has no .txt files")
        for f in files:
            if not f.exists():
                raise DataError(f"data file {f} does not exist: check the --data path")
            if not f.is_file():
                raise DataError(f"data path {f} is not a file")
            text = f.read_text(encoding="utf-8", errors="replace")
            if not text.strip():
                raise DataError(f"data file {f} is empty: give a file with text")
            parts.append(text)
            names.append(str(f))
    return "\n\n".join(parts), names


def tokenize(text: str, tokenizer: Any, max_tokens: int | None = None) -> list[int]:
    """Token ids of the whole text (no special tokens added), cut to ``max_tokens``.

    With ``max_tokens``, only a prefix of the text long enough for that many tokens is tokenized.
    """
    if max_tokens is not None and max_tokens < 2:
        raise DataError(f"--max-tokens must be at least 2, got {max_tokens}")
    chars = len(text) if max_tokens is None else min(len(text), 16 * max_tokens + 1024)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        if max_tokens is None or len(ids) >= max_tokens or chars >= len(text):
            break
        chars = min(len(text), chars * 2)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise DataError(f"the data has {len(ids)} token(s); perplexity needs at least 2: give more text")
    return list(ids)
