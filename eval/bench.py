"""Cost of LCKV against its base Llama: KV bytes, peak memory, decode throughput, max batch, time to first token.

Every figure is measured for all models in the same process, with the same prompts, interleaving the models
inside each repeat and reporting medians.

Memory, honestly:
- CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call (weights and anything else
  already resident are excluded), and the max batch is found by real OOM under
  ``torch.cuda.set_per_process_memory_fraction(budget / total)``.
- CPU: the process's resident-set high-water mark (``VmHWM``) after resetting it through ``/proc/self/clear_refs``
  and returning freed heap to the OS (``malloc_trim``), minus the resident set before the call. This is what the
  operating system charges for the call (torch tensors, allocator slack, Python objects), measured, not modelled.
  The max batch must satisfy ``weights + measured peak delta <= budget``.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .models import is_lckv, weight_bytes
from .ppl import describe_model

logger = logging.getLogger(__name__)

GB = 1024**3


# ----------------------------------------------------------------------------------------------- memory probes


class PeakMemory:
    """Context manager measuring the peak extra memory of a block (see the module docstring for the method)."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.peak_bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            self._ok = _reset_hwm()
            self._base = _proc_status("VmRSS")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._ok and self._base is not None:
            hwm = _proc_status("VmHWM")
            self.peak_bytes = None if hwm is None else max(0, hwm - self._base)


def cpu_memory_method_available() -> bool:
    """True when the CPU peak-RSS method works on this system (Linux with a writable /proc/self/clear_refs)."""
    return _reset_hwm() and _proc_status("VmHWM") is not None


def _proc_status(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------- KV accounting


def cache_bytes(cache: Any) -> tuple[int, int]:
    """(bytes of all key/value tensors held by a cache, cached sequence length)."""
    total = 0
    seq = 0
    for layer in getattr(cache, "layers", []):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if isinstance(keys, torch.Tensor) and keys.numel() > 0:
            total += keys.numel() * keys.element_size() + values.numel() * values.element_size()
            seq = max(seq, keys.shape[-2])
    return total, seq


def kv_bytes_per_token_formula(model: Any) -> int:
    """2 (K and V) x KV layers x KV heads x head dim x bytes per element."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n_kv = describe_model(model)["num_kv_layers"]
    elem = next(model.parameters()).element_size()
    return 2 * n_kv * config.num_key_value_heads * head_dim * elem


# ----------------------------------------------------------------------------------------------- generation


class _Stamps:
    """A logits processor that only records when each generation step's logits are ready."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _sync(self.device)
        self.times.append(time.perf_counter())
        return scores


@dataclass
class BenchModel:
    """A model under benchmark, with the prefill modes it is timed in."""

    name: str
    ref: str
    model: Any
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def lckv(self) -> bool:
        return is_lckv(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def prompt_batch(tokens: list[int], batch: int, length: int, device: torch.device) -> torch.Tensor:
    """``batch`` different prompts of ``length`` tokens cut from the token stream (wrapping around)."""
    ids = torch.as_tensor(tokens, dtype=torch.long)
    need = batch * length
    if ids.numel() < need:
        ids = ids.repeat(need // ids.numel() + 1)
    return ids[:need].view(batch, length).to(device)


def run_generate(bm: BenchModel, input_ids: torch.Tensor, new_tokens: int, mode: str | None = None) -> dict[str, Any]:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens; returns timings and the cache."""
    from transformers import GenerationConfig, LogitsProcessorList

    model = bm.model
    gen = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0,
        eos_token_id=model.config.eos_token_id,
        return_dict_in_generate=True,
        use_cache=True,
    )
    kwargs: dict[str, Any] = {}
    if bm.lckv and mode:
        kwargs["prefill_mode"] = mode
    stamps = _Stamps(bm.device)
    _sync(bm.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=gen,
            logits_processor=LogitsProcessorList([stamps]),
            **kwargs,
        )
    _sync(bm.device)
    t_end = time.perf_counter()
    batch = input_ids.shape[0]
    ttft = stamps.times[0] - t0
    decode_s = stamps.times[-1] - stamps.times[0]
    steps = len(stamps.times) - 1
    return {
        "ttft_s": ttft,
        "generate_s": t_end - t0,
        "decode_tokens_per_s": batch * steps / decode_s if steps > 0 and decode_s > 0 else None,
        "cache": out.past_key_values,
        "new_tokens": out.sequences.shape[1] - input_ids.shape[1],
    }


def kv_bytes_per_token(bm: BenchModel, tokens: list[int]) -> dict[str, Any]:
    """KV bytes per token read from the cache after a short generate, and from the formula."""
    x = prompt_batch(tokens, 2, 16, bm.device)
    res = run_generate(bm, x, 4, mode="iterative" if bm.lckv else None)
    total, seq = cache_bytes(res["cache"])
    measured = total / (x.shape[0] * seq) if seq else 0.0
    formula = kv_bytes_per_token_formula(bm.model)
    return {
        "cache": measured,
        "formula": formula,
        "agree": abs(measured - formula) < 1e-9,
        "cache_layers_holding_kv": sum(
            1
            for layer in getattr(res["cache"], "layers", [])
            if isinstance(getattr(layer, "keys", None), torch.Tensor) and layer.keys.numel() > 0
        ),
    }


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


# ----------------------------------------------------------------------------------------------- grid


def memory_grid(
    models: list[BenchModel], tokens: list[int], batch_sizes: list[int], lengths: list[int], repeats: int
) -> list[dict[str, Any]]:
    """Peak memory, decode tokens/s and TTFT of ``generate`` for each batch x total length (prompt = half)."""
    rows: dict[tuple[str, int, int], dict[str, list]] = {}
    cells = [(b, n) for n in lengths for b in batch_sizes]
    bar = tqdm(total=len(cells) * repeats * len(models), desc="memory/throughput grid", leave=False)
    for b, n in cells:
        prompt = max(1, n // 2)
        for _ in range(repeats):
            for bm in models:  # interleaved: every repeat runs every model once
                x = prompt_batch(tokens, b, prompt, bm.device)
                with PeakMemory(bm.device) as pm:
                    res = run_generate(bm, x, n - prompt, mode="iterative" if bm.lckv else None)
                total, _ = cache_bytes(res.pop("cache"))
                r = rows.setdefault((bm.name, b, n), {"peak": [], "tps": [], "ttft": [], "gen": [], "kv": []})
                r["peak"].append(pm.peak_bytes)
                r["tps"].append(res["decode_tokens_per_s"])
                r["ttft"].append(res["ttft_s"])
                r["gen"].append(res["generate_s"])
                r["kv"].append(total)
                bar.update(1)
    bar.close()
    out = []
    for (name, b, n), r in rows.items():
        peak = _median(r["peak"])
        out.append(
            {
                "model": name,
                "batch": b,
                "length": n,
                "prompt_len": max(1, n // 2),
                "new_tokens": n - max(1, n // 2),
                "peak_bytes": None if peak is None else int(peak),
                "kv_cache_bytes_at_end": int(r["kv"][-1]),
                "decode_tokens_per_s": _median(r["tps"]),
                "ttft_s": _median(r["ttft"]),
                "generate_s": _median(r["gen"]),
            }
        )
    return out


# ----------------------------------------------------------------------------------------------- max batch


def _prefilled_cache(bm: BenchModel, tokens: list[int], context: int) -> tuple[Any, torch.Tensor]:
    """Cache of one prompt of ``context`` tokens and its next token (prefill in the default mode)."""
    x = prompt_batch(tokens, 1, context, bm.device)
    with torch.inference_mode():
        out = bm.model(input_ids=x, use_cache=True, logits_to_keep=1)
    return out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)


def decode_steps(bm: BenchModel, cache: Any, next_tok: torch.Tensor, context: int, steps: int) -> float:
    """Run ``steps`` greedy decode steps on a filled cache; returns the seconds they took."""
    batch = next_tok.shape[0]
    _sync(bm.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(steps):
            pos = torch.full((batch, 1), context + i, dtype=torch.long, device=bm.device)
            out = bm.model(
                input_ids=next_tok, past_key_values=cache, position_ids=pos, use_cache=True, logits_to_keep=1
            )
            cache = out.past_key_values
            next_tok = out.logits[:, -1].argmax(-1, keepdim=True)
            del out
    _sync(bm.device)
    return time.perf_counter() - t0


def serve_probe(
    bm: BenchModel, tokens: list[int], batch: int, length: int, steps: int, base_cache: tuple[Any, torch.Tensor]
) -> dict[str, Any]:
    """Fill a cache for ``batch`` sequences up to ``length - steps`` tokens and decode ``steps`` tokens.

    The batch's cache is one prefilled prompt repeated ``batch`` times (decode cost does not depend on the KV
    values), so large batches are probed without paying their prefill. Measures peak memory and decode time.
    """
    import copy

    context = length - steps
    cache1, tok1 = base_cache
    with PeakMemory(bm.device) as pm:
        cache = copy.deepcopy(cache1)
        cache.batch_repeat_interleave(batch)
        seconds = decode_steps(bm, cache, tok1.repeat(batch, 1), context, steps)
        del cache
    return {"batch": batch, "peak_bytes": pm.peak_bytes, "seconds": seconds, "tokens_per_s": batch * steps / seconds}


def max_batch(
    bm: BenchModel,
    tokens: list[int],
    budget_bytes: int,
    length: int,
    kv_per_token: float,
    steps: int = 4,
    repeats: int = 3,
    max_batch_cap: int = 1 << 16,
) -> dict[str, Any]:
    """Largest batch whose decode at ``length`` total tokens fits ``budget_bytes``, by binary search.

    Each probe fills a cache for the batch up to ``length - steps`` tokens and decodes ``steps`` tokens. CPU: the
    batch fits when weights + the probe's measured peak is within the budget. CUDA: when the probe runs without
    OOM under a per-process memory cap of the budget. The search starts near the KV-only bound and stops at 1 %
    resolution (``resolution``). The decode throughput at the found batch is the median of the fitting probe and
    ``repeats - 1`` more runs; ``peak_bytes`` is that fitting probe's.
    """
    device = bm.device
    weights = weight_bytes(bm.model)
    if weights >= budget_bytes:
        raise ValueError(f"{bm.name}: its weights ({weights / GB:.2f} GB) exceed the budget: raise --budget-gb")
    context = length - steps
    base_cache = _prefilled_cache(bm, tokens, context)
    probes: list[dict[str, Any]] = []
    cuda = device.type == "cuda"
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), device)

    def fits(b: int) -> bool:
        try:
            p = serve_probe(bm, tokens, b, length, steps, base_cache)
        except torch.OutOfMemoryError:
            gc.collect()
            torch.cuda.empty_cache()
            probes.append({"batch": b, "fits": False, "oom": True})
            return False
        ok = True if cuda else (p["peak_bytes"] is not None and weights + p["peak_bytes"] <= budget_bytes)
        probes.append({**p, "fits": ok, "total_bytes": None if cuda else weights + (p["peak_bytes"] or 0)})
        return ok

    upper_bound = int((budget_bytes - weights) // max(1.0, kv_per_token * length))  # KV alone, no activations
    try:
        bar = tqdm(desc=f"max batch {bm.name}", unit="probe", leave=False)
        lo, hi = 0, min(max(1, upper_bound) + 1, max_batch_cap + 1)  # invariant: lo fits (or 0), hi does not
        guess = max(1, int(upper_bound * 0.9))
        while hi - lo > max(1, lo // 100):
            mid = guess if guess and lo < guess < hi else (lo + hi) // 2
            guess = 0
            if fits(mid):
                lo = mid
            else:
                hi = mid
            bar.update(1)
        bar.close()
        result: dict[str, Any] = {
            "model": bm.name,
            "budget_bytes": budget_bytes,
            "length": length,
            "decode_steps": steps,
            "weights_bytes": weights,
            "method": "cuda-oom" if cuda else "cpu-rss",
            "max_batch": lo,
            "kv_only_bound": upper_bound,
            "resolution": max(1, lo // 100),
            "probes": probes,
            "decode_tokens_per_s": None,
            "peak_bytes": None,
            "kv_cache_bytes": None,
        }
        if lo >= 1:
            best = [p for p in probes if p["batch"] == lo and p["fits"]][-1]
            runs = [best] + [serve_probe(bm, tokens, lo, length, steps, base_cache) for _ in range(repeats - 1)]
            result["decode_tokens_per_s"] = _median([r["tokens_per_s"] for r in runs])
            result["peak_bytes"] = best["peak_bytes"]
            result["kv_cache_bytes"] = int(kv_per_token * lo * length)
    finally:
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    return result


# ----------------------------------------------------------------------------------------------- TTFT


def ttft(
    models: list[BenchModel], tokens: list[int], prompt_len: int, repeats: int, lckv_modes: list[str]
) -> list[dict[str, Any]]:
    """Time to first token of a batch-1 prompt: base once, each LCKV model in each prefill mode; interleaved."""
    runs: dict[tuple[str, str], list[float]] = {}
    jobs = [(bm, mode) for bm in models for mode in (lckv_modes if bm.lckv else ["base"])]
    x_cache: dict[str, torch.Tensor] = {}
    for bm, _ in jobs:
        x_cache.setdefault(str(bm.device), prompt_batch(tokens, 1, prompt_len, bm.device))
    for bm, mode in jobs:  # warm-up, not timed
        run_generate(bm, x_cache[str(bm.device)][:, :16], 1, None if mode == "base" else mode)
    for _ in tqdm(range(repeats), desc="time to first token", leave=False):
        for bm, mode in jobs:
            res = run_generate(bm, x_cache[str(bm.device)], 1, None if mode == "base" else mode)
            runs.setdefault((bm.name, mode), []).append(res["ttft_s"])
    base_name = models[0].name
    base_t = _median(runs.get((base_name, "base"), []))
    out = []
    for (name, mode), ts in runs.items():
        med = _median(ts)
        out.append(
            {
                "model": name,
                "mode": mode,
                "prompt_len": prompt_len,
                "ttft_s": med,
                "runs_s": ts,
                "ratio_to_base": med / base_t if base_t and med is not None else None,
            }
        )
    return out


def kv_cache_fraction_of(bm: BenchModel) -> float:
    return describe_model(bm.model)["kv_fraction"]


def run_timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
