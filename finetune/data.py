"""Training data: local files or Hub datasets -> tokenized, packed blocks of ``block_size`` tokens.

Plain text is tokenized and concatenated (an EOS between documents, none between the lines of a .txt file) and cut
into blocks; chat data (a ``messages`` column) is rendered with the tokenizer's chat template through TRL's
conversational helpers first. Each source keeps its last ``eval_fraction`` of rows (or a Hub ``eval_split``) as
held-out data. Everything goes through ``datasets`` so tokenization is cached between runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .recipe import DATA_SUFFIXES, DataSource, Recipe, local_path, looks_local

logger = logging.getLogger(__name__)
PACK_ROWS = 20_000  # rows concatenated before cutting into blocks


class DataError(ValueError):
    """Data that cannot be trained on (missing, empty, wrong columns); the message names the source."""


@dataclass
class DataStats:
    """What was loaded, for the log and the final summary."""

    sources: list[dict[str, Any]] = field(default_factory=list)
    train_blocks: int = 0
    eval_blocks: int = 0
    block_size: int = 0

    @property
    def train_tokens(self) -> int:
        return self.train_blocks * self.block_size


def _load_rows(src: DataSource, key: str, recipe: Recipe, split: str):
    """Load one split of a source as a datasets.Dataset."""
    import datasets

    cache_dir = recipe.data.cache_dir
    if looks_local(src.path):
        path = local_path(recipe, src.path)
        if path is None:
            raise DataError(f"{key}: data file {src.path} does not exist")
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in DATA_SUFFIXES) if path.is_dir() else [path]
        if not files:
            raise DataError(f"{key}: folder {path} holds no {', '.join(DATA_SUFFIXES)} files")
        builders = {DATA_SUFFIXES[p.suffix.lower()] for p in files}
        if len(builders) > 1:
            raise DataError(f"{key}: folder {path} mixes file types; list each type as its own source")
        builder = builders.pop()
        kwargs: dict[str, Any] = {}
        if builder == "text":
            kwargs = {"sample_by": "line", "keep_linebreaks": True}
        try:
            return datasets.load_dataset(
                builder, data_files=[str(p) for p in files], split="train", cache_dir=cache_dir, **kwargs
            )
        except Exception as e:  # datasets raises many types for unreadable files
            raise DataError(f"{key}: cannot read {path}: {type(e).__name__}: {e}") from e
    try:
        return datasets.load_dataset(src.path, src.name, split=split, cache_dir=cache_dir)
    except Exception as e:
        raise DataError(
            f"{key}: cannot load Hub dataset {src.path!r} (name={src.name}, split={split}): {type(e).__name__}: "
            f"{e}. Offline? Pass a local .txt/.jsonl/.parquet file instead"
        ) from e


def _render_chat(rows, src: DataSource, key: str, tokenizer, num_proc: int | None):
    """Chat rows (a list of {role, content}) -> a ``text`` column rendered with the model's chat template."""
    from trl.data_utils import maybe_apply_chat_template, maybe_convert_to_chatml

    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{key}: {src.path} holds chat data (`{src.messages_field}`) but the tokenizer has no chat template"
        )
    if src.messages_field != "messages":
        rows = rows.rename_column(src.messages_field, "messages")

    def render(example):
        example = maybe_convert_to_chatml(example)
        return {"text": maybe_apply_chat_template({"messages": example["messages"]}, tokenizer)["text"]}

    return rows.map(
        render, remove_columns=rows.column_names, num_proc=num_proc, desc=f"chat template {Path(src.path).name}"
    )


def _tokenize_and_pack(rows, text_field: str, add_eos: bool, tokenizer, block_size: int, num_proc, desc: str):
    """Tokenize a text column, concatenate it and cut it into blocks (input_ids == labels)."""
    import pyarrow.compute as pc

    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]
        if add_eos and eos is not None:
            ids = [x + [eos] for x in ids]
        return {"input_ids": ids}

    def pack(batch):
        flat = [t for ids in batch["input_ids"] for t in ids]
        n = len(flat) // block_size * block_size
        blocks = [flat[i : i + block_size] for i in range(0, n, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    tokens = rows.map(
        tokenize, batched=True, remove_columns=rows.column_names, num_proc=num_proc, desc=f"tokenize {desc}"
    )
    n_tokens = int(pc.sum(pc.list_value_length(tokens.data.column("input_ids"))).as_py() or 0)
    # large batches keep the stream continuous: only the tail of each batch (< block_size tokens) is dropped
    packed = tokens.map(pack, batched=True, batch_size=PACK_ROWS, num_proc=num_proc, desc=f"pack {desc}")
    return packed, n_tokens


def _spread(ds, n: int | None):
    """At most n rows, spread evenly over the dataset (so every source is represented)."""
    if n is None or len(ds) <= n:
        return ds
    step = len(ds) / n
    return ds.select([int(i * step) for i in range(n)])


def build_datasets(recipe: Recipe, tokenizer, held_out_text: Path | None = None) -> tuple[Any, Any | None, DataStats]:
    """(train, held-out or None, stats) as packed datasets; raises DataError for missing, empty or unusable data.

    ``held_out_text``: also write the held-out rows there as plain text (for the lckv-eval report).
    """
    import datasets

    d = recipe.data
    texts: list[str] = []
    stats = DataStats(block_size=d.block_size)
    train_parts, eval_parts = [], []
    for i, src in enumerate(d.sources):
        key = f"data.sources[{i}] ({src.path})"
        rows = _load_rows(src, key, recipe, src.split)
        if src.max_rows is not None:
            rows = rows.select(range(min(len(rows), src.max_rows)))
        if len(rows) == 0:
            raise DataError(f"{key}: the dataset is empty (0 rows)")
        if src.eval_split:
            held = _load_rows(src, key, recipe, src.eval_split)
            train_rows = rows
        else:
            n_eval = int(round(len(rows) * d.eval_fraction))
            if d.eval_fraction > 0 and n_eval == 0 and len(rows) > 1:
                n_eval = 1
            train_rows = rows.select(range(len(rows) - n_eval))
            held = rows.select(range(len(rows) - n_eval, len(rows))) if n_eval else None
        is_txt = looks_local(src.path) and Path(src.path).suffix.lower() == ".txt"
        cols = rows.column_names
        if src.text_field in cols:
            kind, field_ = "text", src.text_field
        elif src.messages_field in cols:
            kind, field_ = "chat", "text"  # the chat template ends each turn itself: no extra EOS
            train_rows = _render_chat(train_rows, src, key, tokenizer, d.num_proc)
            held = _render_chat(held, src, key, tokenizer, d.num_proc) if held is not None else None
        else:
            raise DataError(
                f"{key}: no `{src.text_field}` (text) or `{src.messages_field}` (chat) column; its columns are "
                f"{', '.join(cols)}: set text_field or messages_field for this source"
            )
        name = Path(src.path).name
        train_rows = train_rows.select_columns([field_])
        add_eos = kind == "text" and not is_txt
        tr, tr_tokens = _tokenize_and_pack(train_rows, field_, add_eos, tokenizer, d.block_size, d.num_proc, name)
        ev, ev_tokens = (None, 0)
        if held is not None and len(held):
            held = held.select_columns([field_])
            if held_out_text is not None:
                texts.append("".join(held[field_]) if is_txt else "\n\n".join(held[field_]))
            ev, ev_tokens = _tokenize_and_pack(held, field_, add_eos, tokenizer, d.block_size, d.num_proc, name)
        stats.sources.append(
            {
                "source": src.path,
                "kind": kind,
                "rows": len(rows),
                "train_tokens": tr_tokens,
                "train_blocks": len(tr),
                "eval_tokens": ev_tokens,
                "eval_blocks": len(ev) if ev is not None else 0,
            }  # fmt: skip
        )
        if len(tr) == 0:
            logger.warning("%s gives no full training block of %d tokens (%d tokens)", key, d.block_size, tr_tokens)
        train_parts.append(tr)
        if ev is not None and len(ev):
            eval_parts.append(ev)

    train = datasets.concatenate_datasets(train_parts)
    if len(train) == 0:
        total = sum(s["train_tokens"] for s in stats.sources)
        raise DataError(
            f"data: the training data gives 0 blocks of data.block_size={d.block_size} tokens ({total} tokens in "
            "total): add data or lower data.block_size"
        )
    if d.max_train_blocks is not None and len(train) > d.max_train_blocks:
        train = train.shuffle(seed=recipe.train.seed).select(range(d.max_train_blocks))
    held_out = datasets.concatenate_datasets(eval_parts) if eval_parts else None
    if held_out is not None:
        held_out = _spread(held_out, d.max_eval_blocks)
    elif d.eval_fraction > 0 or any(s.eval_split for s in d.sources):
        logger.warning("no held-out block of %d tokens could be made: held-out perplexity is skipped", d.block_size)
    if held_out_text is not None and texts:
        held_out_text.parent.mkdir(parents=True, exist_ok=True)
        held_out_text.write_text("\n\n".join(texts), encoding="utf-8")
    stats.train_blocks = len(train)
    stats.eval_blocks = len(held_out) if held_out is not None else 0
    return train, held_out, stats


__all__ = ["DataError", "DataStats", "build_datasets"]
