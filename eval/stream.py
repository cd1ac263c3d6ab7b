"""Streaming (StreamingLLM) perplexity: a long text fed through a sink + window cache, scored token by token.

Scoring: the text is fed in order through ``model.streaming_cache(sink, window)``; token ``t + 1`` is scored from
the logits produced when token ``t`` was fed, so every token is predicted from the sink tokens plus the recent
window (never from the evicted middle). ``chunk`` tokens are fed per forward:

- ``chunk = 1`` is exact StreamingLLM: the cache is evicted after every token, so each prediction sees at most
  ``sink + window`` tokens (itself included).
- ``chunk > 1`` is faster for the base model: the tokens of a chunk attend to the cache and to each other before
  the cache is evicted, so a prediction sees up to ``sink + window + chunk - 1`` tokens. For an LCKV model with
  upward-reading layers a chunk is prefilled iteratively with ``min(m + b, chunk)`` passes, which is exact only
  when ``chunk <= m + b`` (token ``t`` of a chunk is exact after ``t + 1`` passes); larger chunks are the
  approximation the model was trained with, and are no cheaper, because every pass reruns the upward block.

A Llama (not LCKV) model is streamed as the LCKV ``plain`` layout (every layer computes its own KVs), which is
the same function as Llama (tested against transformers' ``LlamaForCausalLM``) and takes the same cache.

Memory at each checkpoint: the bytes of keys and values the cache object holds, the largest cache size seen so
far, and the process peak (CPU: resident-set high-water mark ``VmHWM``, reset through ``/proc/self/clear_refs`` at
the start and at each checkpoint; CUDA: ``max_memory_allocated``, reset likewise). A flat segment peak while the
text grows is the StreamingLLM promise.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .bench import _malloc_trim, _proc_status, _reset_hwm
from .models import convert_in_memory, is_lckv

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINTS = (2048, 8192, 20480)
DEFAULT_SINK = 4


class StreamSpecError(ValueError):
    """A malformed ``--stream`` specification; the message shows the expected form."""


def parse_stream_spec(text: str) -> tuple[int, int]:
    """``"sink=4,window=1024"`` -> ``(4, 1024)``; ``sink`` defaults to 4, ``window`` is required."""
    usage = "--stream expects sink=N,window=M with N >= 0 and M >= 1 (e.g. sink=4,window=1024)"
    values: dict[str, int] = {}
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(sink|window)\s*=\s*(\d+)", part)
        if m is None or m.group(1) in values:
            raise StreamSpecError(f"{usage}; got {text!r}")
        values[m.group(1)] = int(m.group(2))
    if "window" not in values or values["window"] < 1:
        raise StreamSpecError(f"{usage}; got {text!r}")
    return values.get("sink", DEFAULT_SINK), values["window"]


def as_streaming_model(model: Any) -> Any:
    """The model itself when it is LCKV; a Llama converted in memory to the equal ``plain`` LCKV layout otherwise."""
    if is_lckv(model):
        return model
    if getattr(model.config, "model_type", None) != "llama":
        raise StreamSpecError(
            f"streaming needs a Llama or LCKV model, got model_type {getattr(model.config, 'model_type', None)!r}"
        )
    return convert_in_memory(model, "plain")


def _upward(model: Any) -> bool:
    return any(s > i for i, s in enumerate(model.config.kv_sources))


class _Peak:
    """Process peak memory since the last reset (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.available = True

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _malloc_trim()
            self.available = _reset_hwm()

    def read(self) -> dict[str, int | None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return {
                "peak_bytes": torch.cuda.max_memory_allocated(self.device),
                "current_bytes": torch.cuda.memory_allocated(self.device),
            }
        return {
            "peak_bytes": _proc_status("VmHWM") if self.available else None,
            "current_bytes": _proc_status("VmRSS"),
        }


@torch.inference_mode()
def streaming_perplexity(
    model: Any,
    tokens: Sequence[int] | torch.Tensor,
    sink: int = DEFAULT_SINK,
    window: int = 1024,
    chunk: int = 1,
    checkpoints: Sequence[int] | None = DEFAULT_CHECKPOINTS,
    prefill_mode: str | None = "iterative",
    desc: str | None = None,
) -> dict[str, Any]:
    """Per-token streaming perplexity of ``model`` on ``tokens`` with a ``sink`` + ``window`` cache.

    Returns the settings and one entry per checkpoint (text positions; the text end is always one): cumulative and
    segment perplexity, cache bytes and tokens, the largest cache seen so far, and the process peak memory over
    the segment (the peak is reset at the start and at every checkpoint). ``prefill_mode`` applies to LCKV chunks
    of more than one token. A Llama is streamed as the ``plain`` LCKV layout (:func:`as_streaming_model`).
    """
    if chunk < 1:
        raise StreamSpecError(f"--stream-chunk must be at least 1, got {chunk}")
    model = as_streaming_model(model)
    cache = model.streaming_cache(sink=sink, window=window)  # validates sink/window
    device = next(model.parameters()).device
    ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1).to(device)
    n = int(ids.numel())
    if n < 2:
        raise StreamSpecError(f"streaming perplexity needs at least 2 tokens, got {n}")
    stops = sorted({int(c) for c in (checkpoints or ()) if 1 <= int(c) < n} | {n})
    upward = _upward(model)
    passes = int(model.config.forward_passes) + int(model.config.backward_passes)
    kv_layers = model.model.num_kv_layers
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    elem = next(model.parameters()).element_size()
    bytes_per_token = 2 * kv_layers * config.num_key_value_heads * head_dim * elem
    kwargs: dict[str, Any] = {} if prefill_mode is None else {"prefill_mode": prefill_mode}

    peak = _Peak(device)
    peak.reset()
    total = seg_total = 0.0
    count = seg_count = 0
    max_bytes = max_tokens = 0
    pos = 0  # tokens fed so far
    t0 = seg_t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=n - 1, desc=desc, unit="tok", leave=False, disable=desc is None)
    for stop in stops:
        feed_to = min(stop, n - 1)  # the last token predicts nothing, so it is never fed
        while pos < feed_to:
            end = min(pos + chunk, feed_to)
            logits = model(ids[pos:end].unsqueeze(0), past_key_values=cache, use_cache=True, **kwargs).logits[0]
            logp = torch.log_softmax(logits.float(), dim=-1)
            nll = -logp.gather(-1, ids[pos + 1 : end + 1].unsqueeze(-1)).squeeze(-1)
            s = nll.double().sum().item()
            total += s
            seg_total += s
            count += end - pos
            seg_count += end - pos
            max_bytes = max(max_bytes, cache.nbytes())
            max_tokens = max(max_tokens, max(layer.keys.shape[-2] for layer in cache.layers))
            bar.update(end - pos)
            pos = end
        mem = peak.read()
        now = time.perf_counter()
        row = {
            "tokens": stop,
            "scored_tokens": count,
            "loss": total / count,
            "ppl": math.exp(total / count),
            "segment_ppl": math.exp(seg_total / seg_count) if seg_count else None,
            "cache_bytes": cache.nbytes(),
            "cache_tokens": max(layer.keys.shape[-2] for layer in cache.layers),
            "cache_layers": len(cache.layers),
            "max_cache_bytes": max_bytes,
            "max_cache_tokens": max_tokens,
            "segment_peak_bytes": mem["peak_bytes"],
            "current_bytes": mem["current_bytes"],
            "seconds": round(now - t0, 2),
            "segment_tokens_per_s": seg_count / (now - seg_t0) if now > seg_t0 else None,
        }
        rows.append(row)
        logger.info(
            "%s: %d tokens, ppl %.3f, cache %.1f MiB, segment peak %s",
            desc or "stream",
            stop,
            row["ppl"],
            row["cache_bytes"] / 2**20,
            "n/a" if mem["peak_bytes"] is None else f"{mem['peak_bytes'] / 2**20:.0f} MiB",
        )
        seg_total, seg_count, seg_t0 = 0.0, 0, time.perf_counter()
        peak.reset()
    bar.close()
    return {
        "sink": sink,
        "window": window,
        "chunk": chunk,
        "prefill_mode": prefill_mode if chunk > 1 else "sequential (one token per forward)",
        "exact": chunk == 1 or not upward or chunk <= passes,  # the chunked function computed without approximation
        "exact_streamingllm": chunk == 1,  # every prediction sees at most sink + window tokens
        "num_tokens": n,
        "kv_layers": kv_layers,
        "kv_bytes_per_token": bytes_per_token,
        "cache_bound_bytes": (sink + window) * bytes_per_token,
        "memory_method": "cuda max_memory_allocated (absolute), reset at each checkpoint"
        if device.type == "cuda"
        else "process VmHWM (absolute resident set), reset via /proc/self/clear_refs at each checkpoint",
        "checkpoints": rows,
    }
