"""Perplexity over fixed windows, LCKV prefill modes, recovery after fine-tuning, and KV convergence.

How tokens are scored is documented in :mod:`lckv.eval.data` (``make_windows``): every model in a run sees the
same windows, and perplexity is ``exp(sum of NLL / number of scored tokens)``, summed in float64.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import Window, make_windows
from .models import is_lckv

logger = logging.getLogger(__name__)

LCKV_MODES = ("iterative", "sequential", "converge")
BASE_MODE = "base"


def _forward_logits(model: Any, input_ids: torch.Tensor, mode: str | None) -> torch.Tensor:
    kwargs: dict[str, Any] = {"use_cache": False}
    if mode is not None and mode != BASE_MODE:
        kwargs["prefill_mode"] = mode
    return model(input_ids=input_ids, **kwargs).logits


@torch.inference_mode()
def window_nll(
    model: Any,
    tokens: list[int] | torch.Tensor,
    windows: list[Window],
    mode: str | None = None,
    batch_size: int = 1,
    desc: str | None = None,
) -> tuple[float, int]:
    """Sum of negative log-likelihoods (nats, float64) and the number of scored tokens over the windows."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(tokens, dtype=torch.long)
    # batch windows of equal length (all but possibly the last are full-length)
    groups: dict[int, list[Window]] = {}
    for w in windows:
        groups.setdefault(w.length, []).append(w)
    batches = [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    total = 0.0
    count = 0
    bar = tqdm(total=sum(w.num_scored for w in windows), desc=desc, unit="tok", leave=False, disable=desc is None)
    for batch in batches:
        x = torch.stack([ids[w.begin : w.end] for w in batch]).to(device)
        logits = _forward_logits(model, x, mode)
        for row, w in enumerate(batch):
            rel = torch.arange(w.score_from - w.begin, w.length, device=device)  # scored positions in the window
            logp = torch.log_softmax(logits[row, rel - 1].float(), dim=-1)
            nll = -logp.gather(-1, x[row, rel].unsqueeze(-1)).squeeze(-1)
            total += nll.double().sum().item()
            count += int(rel.numel())
        bar.update(sum(w.num_scored for w in batch))
    bar.close()
    return total, count


def perplexity(
    model: Any,
    tokens: list[int],
    window: int = 256,
    stride: int | None = None,
    mode: str | None = None,
    batch_size: int = 1,
    desc: str | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``tokens`` with the documented windowing; ``mode`` is an LCKV prefill mode."""
    windows = make_windows(len(tokens), window, stride or window)
    t0 = time.perf_counter()
    total, count = window_nll(model, tokens, windows, mode, batch_size, desc)
    loss = total / count
    return {
        "loss": loss,
        "ppl": math.exp(loss),
        "scored_tokens": count,
        "windows": len(windows),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def model_modes(model: Any, requested: list[str]) -> list[str]:
    """Modes to evaluate: the requested LCKV prefill modes for LCKV models, ``base`` for anything else."""
    if not is_lckv(model):
        return [BASE_MODE]
    bad = [m for m in requested if m not in LCKV_MODES]
    if bad:
        raise ValueError(f"unknown mode {bad[0]!r}: use iterative, sequential, converge")
    return list(requested)


def describe_model(model: Any) -> dict[str, Any]:
    """Layout facts of a model for reports."""
    config = model.config
    num_layers = config.num_hidden_layers
    info: dict[str, Any] = {"lckv": is_lckv(model), "num_layers": num_layers, "class": type(model).__name__}
    if is_lckv(model):
        sources = list(config.kv_sources)
        kv = sorted(set(sources))
        info.update(
            kv_sources=sources,
            num_kv_layers=len(kv),
            kv_fraction=len(kv) / num_layers,
            upward=any(s > i for i, s in enumerate(sources)),
            forward_passes=getattr(config, "forward_passes", None),
            backward_passes=getattr(config, "backward_passes", None),
            converge_tol=getattr(config, "converge_tol", None),
        )
    else:
        info.update(kv_sources=list(range(num_layers)), num_kv_layers=num_layers, kv_fraction=1.0, upward=False)
    return info


def evaluate_model(
    model: Any, tokens: list[int], window: int, stride: int, modes: list[str], batch_size: int, name: str
) -> dict[str, Any]:
    """Perplexity of one model in each of its modes, plus the iterative-vs-sequential gap for LCKV models."""
    result: dict[str, Any] = describe_model(model)
    result["modes"] = {}
    for mode in model_modes(model, modes):
        result["modes"][mode] = perplexity(model, tokens, window, stride, mode, batch_size, desc=f"{name} {mode}")
        logger.info("%s %s: ppl %.4f", name, mode, result["modes"][mode]["ppl"])
    m = result["modes"]
    if "iterative" in m and "sequential" in m:
        result["gap"] = {
            "ppl_iterative_minus_sequential": m["iterative"]["ppl"] - m["sequential"]["ppl"],
            "loss_iterative_minus_sequential": m["iterative"]["loss"] - m["sequential"]["loss"],
            "relative_ppl": m["iterative"]["ppl"] / m["sequential"]["ppl"] - 1.0,
        }
    return result


def primary_mode(result: dict[str, Any]) -> str:
    """The mode that stands for a model in comparisons: the exact ``sequential`` when measured."""
    for mode in ("sequential", BASE_MODE, "iterative", "converge"):
        if mode in result["modes"]:
            return mode
    return next(iter(result["modes"]))


def recovery(model_res: dict[str, Any], base_res: dict[str, Any], conv_res: dict[str, Any] | None) -> dict[str, Any]:
    """Recovery of the fine-tuned ``model`` per mode.

    ``loss_recovery = (loss_converted - loss_model) / (loss_converted - loss_base)`` (1 = back to the base model,
    0 = no better than the converted model before fine-tuning) and ``ppl_ratio = ppl_model / ppl_base``. Modes are
    matched between the model and the converted model; the base has one mode.
    """
    base_mode = primary_mode(base_res)
    base = base_res["modes"][base_mode]
    out: dict[str, Any] = {}
    for mode, r in model_res["modes"].items():
        entry: dict[str, Any] = {
            "loss_model": r["loss"],
            "loss_base": base["loss"],
            "ppl_ratio": r["ppl"] / base["ppl"],
            "loss_converted": None,
            "loss_recovery": None,
        }
        if conv_res is not None:
            conv_mode = mode if mode in conv_res["modes"] else primary_mode(conv_res)
            loss_conv = conv_res["modes"][conv_mode]["loss"]
            entry["loss_converted"] = loss_conv
            denom = loss_conv - base["loss"]
            entry["loss_recovery"] = (loss_conv - r["loss"]) / denom if abs(denom) > 1e-12 else None
        out[mode] = entry
    return out


@torch.inference_mode()
def kv_convergence(
    model: Any, tokens: list[int], window: int, num_windows: int = 1, passes: int | None = None
) -> dict[str, Any] | None:
    """Mean squared difference between the upward-source KVs after pass k and at the fixed point, k = 1..m+b.

    The fixed point is the last pass of an iterative forward run with ``window`` passes: a token's KVs are exact
    after (its position + 1) passes, because an upward-reading layer sees only earlier tokens. Averaged over the
    first ``num_windows`` windows of the data; ``None`` for models without upward-reading layers.
    """
    info = describe_model(model)
    if not info["lckv"] or not info["upward"]:
        return None
    config = model.config
    m, b = int(config.forward_passes), int(config.backward_passes)
    passes = passes or (m + b)
    total_passes = max(window, passes + 1)
    device = next(model.parameters()).device
    windows = [w for w in make_windows(len(tokens), window, window) if w.length == window][:num_windows]
    if not windows:
        return None
    ids = torch.as_tensor(tokens, dtype=torch.long)
    sq = torch.zeros(passes, dtype=torch.float64)
    per_source: dict[int, torch.Tensor] = {}
    ref_sq = 0.0
    saved = (config.forward_passes, config.backward_passes)
    try:
        config.forward_passes, config.backward_passes = total_passes - 1, 1
        for w in tqdm(windows, desc="KV convergence", leave=False):
            x = ids[w.begin : w.end].unsqueeze(0).to(device)
            out = model(input_ids=x, use_cache=False, prefill_mode="iterative", output_pass_kvs=True)
            trace = out.pass_kvs
            fixed = trace[-1]
            for k in range(min(passes, len(trace))):
                for src, (key, value) in trace[k].items():
                    fk, fv = fixed[src]
                    d = ((key.double() - fk.double()) ** 2).mean() + ((value.double() - fv.double()) ** 2).mean()
                    d = (d / 2).item()
                    sq[k] += d / len(trace[k])
                    per_source.setdefault(int(src), torch.zeros(passes, dtype=torch.float64))[k] += d
            ref_sq += sum(
                ((fk.double() ** 2).mean() + (fv.double() ** 2).mean()).item() / 2 for fk, fv in fixed.values()
            ) / len(fixed)
    finally:
        config.forward_passes, config.backward_passes = saved
    n = len(windows)
    mse = (sq / n).tolist()
    ref = ref_sq / n
    return {
        "passes": list(range(1, passes + 1)),
        "mse": mse,
        "relative_mse": [v / ref if ref > 0 else None for v in mse],
        "mse_by_source": {src: (v / n).tolist() for src, v in sorted(per_source.items())},
        "fixed_point_passes": total_passes,
        "fixed_point_mean_square": ref,
        "windows": n,
        "window": window,
        "m_plus_b": m + b,
    }
