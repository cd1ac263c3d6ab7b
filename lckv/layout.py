"""Layout maths for depth-wise KV sharing: pure functions over lists of ints, no torch.

A layout is ``kv_sources``: one entry per layer, ``kv_sources[i]`` is the layer whose keys and
values layer ``i`` attends to. A layer computes KVs iff some layer names it, and a named layer
names itself. Sources above a layer (``s > i``) read the previous tokens only (LCKV); sources
below (``s < i``) read the same tokens (cross-layer attention, CLA).

This file is copied next to every converted checkpoint as remote code: it imports nothing of ours.
"""

from __future__ import annotations

import math
import random

LAYOUT_HELP = (
    "use one of: bottom:W, top:W, sandwich:W, cla:K, plain, or an explicit comma-separated list "
    "of source layers such as 0,2,2,3"
)


class LayoutError(ValueError):
    """An invalid layout spec or kv_sources list (the message says how to fix it)."""


def validate_kv_sources(kv_sources: list[int], num_layers: int | None = None) -> list[int]:
    """Check a kv_sources list and return it as a list of ints; raise LayoutError naming the fix."""
    sources = [int(s) for s in kv_sources]
    n = len(sources)
    if num_layers is not None and n != num_layers:
        raise LayoutError(
            f"kv_sources has {n} entries but the model has {num_layers} layers: give one source per layer"
        )
    if n == 0:
        raise LayoutError("kv_sources is empty: give one source layer per layer")
    for i, s in enumerate(sources):
        if not 0 <= s < n:
            raise LayoutError(f"kv_sources[{i}] = {s} is not a layer index in 0..{n - 1}")
    for i, s in enumerate(sources):
        if sources[s] != s:
            raise LayoutError(
                f"layer {i} reads layer {s}, but layer {s} reads layer {sources[s]}: a layer whose KVs are read "
                f"must compute its own, so set kv_sources[{s}] = {s}"
            )
    return sources


def parse_layout(spec: str | list[int], num_layers: int) -> list[int]:
    """Turn a layout spec (``sandwich:2``, ``bottom:w``, ``top:w``, ``cla:k``, ``plain`` or ``0,2,2``) into kv_sources."""
    if num_layers < 1:
        raise LayoutError(f"a model needs at least one layer, got {num_layers}")
    if isinstance(spec, (list, tuple)):
        return validate_kv_sources(list(spec), num_layers)
    text = str(spec).strip().lower().replace(" ", "")
    if text in ("plain", "llama", "none"):
        return list(range(num_layers))
    if "," in text or text.isdigit():
        try:
            sources = [int(x) for x in text.split(",") if x != ""]
        except ValueError:
            raise LayoutError(f"bad layout list {spec!r}: {LAYOUT_HELP}") from None
        return validate_kv_sources(sources, num_layers)
    kind, sep, arg = text.partition(":")
    if not sep or not arg.isdigit():
        raise LayoutError(f"unknown layout {spec!r}: {LAYOUT_HELP}")
    w = int(arg)
    L = num_layers
    if kind == "cla":
        if w < 1:
            raise LayoutError(f"cla:{w}: the group size must be at least 1")
        return [w * (i // w) for i in range(L)]
    if kind not in ("bottom", "top", "sandwich"):
        raise LayoutError(f"unknown layout kind {kind!r} in {spec!r}: {LAYOUT_HELP}")
    if w >= L:
        raise LayoutError(
            f"{kind}:{w} needs fewer warmup layers than the model's {L} layers: use a number from 0 to {L - 1}"
        )
    if kind == "bottom":
        bottom, top = w, 0
    elif kind == "top":
        bottom, top = 0, w
    else:
        bottom, top = math.ceil(w / 2), w // 2
    head = L - top - 1  # the top layer of the middle block, read by the whole block
    return [i if (i < bottom or i >= head) else head for i in range(L)]


def kv_layers(kv_sources: list[int]) -> list[int]:
    """The layers that compute (and cache) keys and values, in order."""
    return sorted(set(kv_sources))


def kv_cache_fraction(kv_sources: list[int]) -> float:
    """Fraction of a plain Llama's KV-cache bytes this layout caches."""
    return len(kv_layers(kv_sources)) / len(kv_sources)


def has_upward(kv_sources: list[int]) -> bool:
    """True when some layer reads a layer above it (needs iteration in parallel mode)."""
    return any(s > i for i, s in enumerate(kv_sources))


def is_downward(kv_sources: list[int]) -> bool:
    """True when every layer reads itself or a preceding layer (servable by engines that share downward only)."""
    return not has_upward(kv_sources)


def iteration_plan(kv_sources: list[int]) -> list[tuple[int, int, bool]]:
    """Split layers into consecutive segments ``(first, last, iterate)``.

    A layer ``i`` reading ``s > i`` makes layers ``i..s`` a cycle (s's input depends on i's output);
    overlapping cycles merge. Cyclic segments are iterated, all other layers run once.
    """
    n = len(kv_sources)
    cycles = sorted((i, s) for i, s in enumerate(kv_sources) if s > i)
    merged: list[list[int]] = []
    for a, b in cycles:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    plan: list[tuple[int, int, bool]] = []
    cur = 0
    for a, b in merged:
        if a > cur:
            plan.append((cur, a - 1, False))
        plan.append((a, b, True))
        cur = b + 1
    if cur < n:
        plan.append((cur, n - 1, False))
    return plan


def vllm_sharing_map(kv_sources: list[int]) -> dict[int, int]:
    """For downward layouts: {layer: earlier target layer} as vLLM's ``kv_sharing_target_layer_name`` expects."""
    if has_upward(kv_sources):
        raise LayoutError(
            "this layout reads KVs of layers above (LCKV): vLLM shares only with earlier layers, serve it with lckv's model code"
        )
    return {i: s for i, s in enumerate(kv_sources) if s != i}


def sample_routing(
    num_layers: int,
    p_share: float,
    source: str = "uniform_preceding",
    rng: random.Random | None = None,
    layouts: list[list[int]] | None = None,
) -> list[int]:
    """Draw one random downward layout for routing training (Stochastic KV Routing).

    Each layer ``i > 0`` independently, with probability ``p_share``, reads a preceding layer instead of
    its own KVs: a uniformly drawn one (``uniform_preceding``), layer ``i-1`` (``previous``), or the
    source a randomly chosen target layout gives it (``kv_layers_of``). The draw is made a valid layout
    (a layer that is read reads itself).
    """
    if not 0.0 <= p_share <= 1.0:
        raise LayoutError(f"routing p_share must be in [0, 1], got {p_share}")
    rng = rng or random.Random()
    sources = list(range(num_layers))
    if source == "kv_layers_of":
        if not layouts:
            raise LayoutError("routing source kv_layers_of needs a list of layouts")
        target = layouts[rng.randrange(len(layouts))]
    for i in range(1, num_layers):
        if rng.random() >= p_share:
            continue
        if source == "uniform_preceding":
            sources[i] = rng.randrange(i)
        elif source == "previous":
            sources[i] = i - 1
        elif source == "kv_layers_of":
            sources[i] = target[i] if target[i] <= i else i
        else:
            raise LayoutError(f"unknown routing source {source!r}: use uniform_preceding, previous or kv_layers_of")
    return sources


def describe(kv_sources: list[int]) -> str:
    """One-line human summary of a layout."""
    n = len(kv_sources)
    k = len(kv_layers(kv_sources))
    return f"{k} of {n} layers cache KVs ({100 * (1 - k / n):.0f}% smaller KV cache); kv_sources={kv_sources}"
