"""The model card (README.md) of a converted checkpoint, and a way to append results to it later."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..layout import kv_layers

RESULTS_MARK = "<!-- lckv:results -->"
NO_RESULTS = "_No results yet: this checkpoint is a conversion, not fine-tuned. Expect it to need fine-tuning._"


def kv_bytes_per_token(num_kv_layers: int, num_kv_heads: int, head_dim: int, bytes_per_value: int) -> int:
    """KV-cache bytes one token costs: keys and values of every KV layer."""
    return 2 * num_kv_layers * num_kv_heads * head_dim * bytes_per_value


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass
class CardInfo:
    """Everything the card says."""

    title: str
    source: str  # what the user passed
    base_model: str | None  # Hub id of the source model, when known
    license: str | None
    layout_spec: str
    kv_sources: list[int]
    source_kv_layers: int  # KV layers of the source (all layers of a plain Llama)
    num_kv_heads: int
    head_dim: int
    dtype: str
    bytes_per_value: int
    kv_init: str
    command: str
    load_path: str  # the Hub repo or local folder to load from
    num_parameters: int


def render_card(info: CardInfo) -> str:
    """The README.md text: front matter, layout, KV-cache size, how to load, how it was made, results."""
    n = len(info.kv_sources)
    kv = kv_layers(info.kv_sources)
    before = kv_bytes_per_token(info.source_kv_layers, info.num_kv_heads, info.head_dim, info.bytes_per_value)
    after = kv_bytes_per_token(len(kv), info.num_kv_heads, info.head_dim, info.bytes_per_value)
    license_ = f"{info.license} (the source model's)" if info.license else "unknown: check the source model's"
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    if info.license:
        front.append(f"license: {info.license}")
    if info.base_model:
        front.append(f"base_model: {info.base_model}")
    front += ["tags:", "- lckv", "- layer-condensed-kv", "- kv-cache-compression", "---"]
    source = f"[{info.base_model}](https://huggingface.co/{info.base_model})" if info.base_model else f"`{info.source}`"
    lines = [
        *front,
        "",
        f"# {info.title}",
        "",
        f"{source} converted to a layer-condensed KV (LCKV) model with `lckv-convert` "
        f"(layout `{info.layout_spec}`): only {len(kv)} of {n} layers compute and cache keys and values, the other layers "
        "attend to the KVs of one of those. The weights are the source model's, minus the key/value projections no "
        "layer reads; it has not been fine-tuned for the new layout, so its quality is below the source's until it is.",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| source | {source} |",
        f"| license | {license_} |",
        f"| parameters | {info.num_parameters / 1e6:,.1f} M |",
        f"| layout | `{info.layout_spec}` |",
        f"| KV layers | {len(kv)} of {n}: {kv} |",
        f"| kv_sources | `{info.kv_sources}` |",
        f"| KV init | `{info.kv_init}` |",
        f"| KV cache per token ({info.dtype}) | {human_bytes(before)} before, {human_bytes(after)} after "
        f"({before / after:.1f}x smaller) |",
        "",
        "KV cache per token = 2 (keys and values) x KV layers x KV heads "
        f"({info.num_kv_heads}) x head dim ({info.head_dim}) x {info.bytes_per_value} bytes.",
        "",
        "## How to load",
        "",
        "The model code travels with the weights (`modeling_lckv.py`, `configuration_lckv.py`, `layout.py`), so "
        "plain transformers loads it with `trust_remote_code=True`:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{info.load_path}")',
        f'model = AutoModelForCausalLM.from_pretrained("{info.load_path}", trust_remote_code=True)',
        'inputs = tokenizer("The Library of Congress", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))",
        "```",
        "",
        "## How it was made",
        "",
        "```bash",
        info.command,
        "```",
        "",
        "## Results",
        "",
        RESULTS_MARK,
        NO_RESULTS,
        "",
    ]
    return "\n".join(lines)


def append_results(folder: str | Path, title: str, results: str | dict) -> None:
    """Add a results section (markdown text, or a dict shown as a table) to a converted model's README.md."""
    readme = Path(folder) / "README.md"
    text = readme.read_text() if readme.is_file() else f"## Results\n\n{RESULTS_MARK}\n"
    if isinstance(results, dict):
        body = "| | |\n|---|---|\n" + "\n".join(f"| {_cell(k)} | {_cell(_fmt(v))} |" for k, v in results.items())
    else:
        body = str(results).strip()
    text = text.replace(NO_RESULTS + "\n", "")
    if RESULTS_MARK not in text:
        text = text.rstrip("\n") + f"\n\n## Results\n\n{RESULTS_MARK}\n"
    text = text.rstrip("\n") + f"\n\n### {title}\n\n{body}\n"
    readme.write_text(text)


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
