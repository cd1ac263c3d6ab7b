"""Which output tensor comes from which source tensors: a pure function over tensor names and a layout.

A Llama checkpoint maps to an LCKV checkpoint name for name, except that the k/v projections of layers
whose KVs no layer reads are dropped, and (``kv_init="mean"``) a KV layer's k/v projections become the
mean of those of every layer that reads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..layout import kv_layers

KV_INITS = ("top", "mean")

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_PARTS = {
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.o_proj.weight",
    "self_attn.o_proj.bias",
    "mlp.gate_proj.weight",
    "mlp.gate_proj.bias",
    "mlp.up_proj.weight",
    "mlp.up_proj.bias",
    "mlp.down_proj.weight",
    "mlp.down_proj.bias",
}
_KV_PARTS = {p for p in _LAYER_PARTS if p.startswith(("self_attn.k_proj", "self_attn.v_proj"))}
_REQUIRED_LAYER_PARTS = {
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
}
_TOP = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
# buffers some old checkpoints saved; the model recomputes them
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class MappingError(ValueError):
    """The source tensors do not fit the layout or are not a Llama's (the message names the fix)."""


@dataclass(frozen=True)
class Recipe:
    """One output tensor: ``name`` is the copy of ``sources[0]`` or, with several sources, their mean."""

    name: str
    sources: tuple[str, ...]

    @property
    def is_mean(self) -> bool:
        return len(self.sources) > 1


def layer_of(name: str) -> int | None:
    """The layer index of a per-layer tensor name, else None."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def natural_key(name: str) -> tuple:
    """Sort key that orders ``model.layers.10`` after ``model.layers.9``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def plan_tensors(
    names: list[str],
    kv_sources: list[int],
    kv_init: str = "top",
    tie_word_embeddings: bool = False,
) -> tuple[list[Recipe], list[str]]:
    """Map source tensor names to output recipes for ``kv_sources``; return (recipes, dropped names).

    Recipes keep the order of ``names``; a mean is placed where the KV layer's own tensor was.
    Raises MappingError for unknown tensors, missing tensors, or k/v projections the layout needs but
    the source lacks (for example an LCKV source reshared to a layout that reads other layers).
    """
    if kv_init not in KV_INITS:
        raise MappingError(f"unknown kv init {kv_init!r}: use one of {', '.join(KV_INITS)}")
    num_layers = len(kv_sources)
    present = set(names)
    kv_set = set(kv_layers(kv_sources))
    readers: dict[int, list[int]] = {s: [i for i, src in enumerate(kv_sources) if src == s] for s in kv_set}

    for name in names:
        layer = layer_of(name)
        if _IGNORED.search(name):
            continue
        if layer is None:
            if name not in _TOP:
                raise MappingError(f"unexpected tensor {name!r}: this is not a Llama checkpoint lckv can convert")
        elif layer >= num_layers or _LAYER.match(name).group(2) not in _LAYER_PARTS:
            raise MappingError(
                f"unexpected tensor {name!r} for a {num_layers}-layer Llama: this is not a checkpoint lckv can convert"
            )

    missing = [n for n in ("model.embed_tokens.weight", "model.norm.weight") if n not in present]
    if not tie_word_embeddings and "lm_head.weight" not in present:
        missing.append("lm_head.weight")
    for i in range(num_layers):
        missing += [
            f"model.layers.{i}.{p}" for p in sorted(_REQUIRED_LAYER_PARTS) if f"model.layers.{i}.{p}" not in present
        ]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise MappingError(
            f"the source checkpoint lacks {', '.join(missing[:3])}{more}: it is incomplete or not a Llama"
        )

    lacking = sorted(s for s in kv_set if f"model.layers.{s}.self_attn.k_proj.weight" not in present)
    if lacking:
        has = sorted({layer_of(n) for n in names if n.endswith("self_attn.k_proj.weight")})
        raise MappingError(
            f"the layout reads the KVs of layers {lacking}, which have no k/v projections in the source: "
            f"choose a layout whose KV layers are among {has}"
        )
    if kv_init == "mean":
        no_kv = sorted(
            {i for s in kv_set for i in readers[s] if f"model.layers.{i}.self_attn.k_proj.weight" not in present}
        )
        if no_kv:
            raise MappingError(
                f"--kv-init mean averages the k/v projections of the reading layers, but layers {no_kv} have none "
                "in the source (an LCKV checkpoint): use --kv-init top"
            )

    recipes: list[Recipe] = []
    dropped: list[str] = []
    for name in names:
        if _IGNORED.search(name):
            dropped.append(name)
            continue
        if name == "lm_head.weight" and tie_word_embeddings:
            dropped.append(name)
            continue
        layer = layer_of(name)
        part = _LAYER.match(name).group(2) if layer is not None else None
        if part not in _KV_PARTS:
            recipes.append(Recipe(name, (name,)))
        elif layer not in kv_set:
            dropped.append(name)
        elif kv_init == "top" or len(readers[layer]) == 1:
            recipes.append(Recipe(name, (name,)))
        else:
            recipes.append(Recipe(name, tuple(f"model.layers.{i}.{part}" for i in readers[layer])))
    return recipes, dropped
