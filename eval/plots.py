"""PNG plots of bench and ppl results (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

MB = 1024**2


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    return plt, fig, ax


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def throughput_vs_batch(result: dict[str, Any]) -> Callable[[Path], None] | None:
    """Decode tokens/s against batch size (grid at its longest length), with each model's max-batch point."""
    grid = [r for r in result.get("memory_grid", []) if r.get("decode_tokens_per_s")]
    if not grid and not result.get("max_batch"):
        return None

    def draw(path: Path) -> None:
        plt, fig, ax = _figure()
        length = max((r["length"] for r in grid), default=None)
        for name in result["model_names"]:
            rows = sorted((r for r in grid if r["model"] == name and r["length"] == length), key=lambda r: r["batch"])
            line = None
            if rows:
                (line,) = ax.plot(
                    [r["batch"] for r in rows],
                    [r["decode_tokens_per_s"] for r in rows],
                    "o-",
                    label=f"{name} (generate, {length} tok)",
                )
            for mb in result.get("max_batch", []):
                if mb["model"] == name and mb.get("decode_tokens_per_s"):
                    ax.plot(
                        [mb["max_batch"]],
                        [mb["decode_tokens_per_s"]],
                        "*",
                        ms=12,
                        color=line.get_color() if line else None,
                        label=f"{name} max batch in {mb['budget_bytes'] / 1024**3:g} GiB @ {mb['length']}",
                    )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode tokens / s")
        ax.set_title("Decode throughput vs batch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        _save(plt, fig, path)

    return draw


def memory_vs_length(result: dict[str, Any]) -> Callable[[Path], None] | None:
    """Peak memory of generate (solid) and KV-cache bytes (dashed) against total length, at the largest batch."""
    grid = [r for r in result.get("memory_grid", []) if r.get("peak_bytes") is not None]
    if not grid:
        return None

    def draw(path: Path) -> None:
        plt, fig, ax = _figure()
        batch = max(r["batch"] for r in grid)
        for name in result["model_names"]:
            rows = sorted((r for r in grid if r["model"] == name and r["batch"] == batch), key=lambda r: r["length"])
            if not rows:
                continue
            (line,) = ax.plot(
                [r["length"] for r in rows], [r["peak_bytes"] / MB for r in rows], "o-", label=f"{name} peak"
            )
            ax.plot(
                [r["length"] for r in rows],
                [r["kv_cache_bytes_at_end"] / MB for r in rows],
                "--",
                color=line.get_color(),
                label=f"{name} KV cache",
            )
        ax.set_xlabel("prompt + generated tokens")
        method = str(result.get("memory_method", ""))
        short = "CUDA max allocated" if method.startswith("cuda") else "process peak RSS"
        ax.set_ylabel("MiB above the memory before the call")
        ax.set_title(f"Peak memory of generate(), batch {batch} ({short})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        _save(plt, fig, path)

    return draw


def ppl_vs_kv(points: list[dict[str, Any]]) -> Callable[[Path], None] | None:
    """Perplexity against KV-cache reduction, one point per model (needs at least two layouts)."""
    pts = [p for p in points if p.get("ppl") is not None]
    if len({round(p["kv_fraction"], 6) for p in pts}) < 2:
        return None

    def draw(path: Path) -> None:
        plt, fig, ax = _figure()
        for p in pts:
            x = 1.0 / p["kv_fraction"]
            ax.plot([x], [p["ppl"]], "o")
            ax.annotate(
                f"{p['model']} ({p['mode']})", (x, p["ppl"]), fontsize=7, xytext=(4, 4), textcoords="offset points"
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("KV-cache reduction (x smaller than the base)")
        ax.set_ylabel("perplexity")
        ax.set_title("Perplexity vs KV-cache reduction")
        ax.grid(alpha=0.3)
        _save(plt, fig, path)

    return draw


def kv_convergence_plot(conv: dict[str, dict[str, Any]]) -> Callable[[Path], None] | None:
    """Mean squared KV difference to the fixed point against the pass number, per model."""
    conv = {k: v for k, v in conv.items() if v}
    if not conv:
        return None

    def draw(path: Path) -> None:
        plt, fig, ax = _figure()
        for name, c in conv.items():
            ax.plot(c["passes"], [max(v, 1e-30) for v in c["mse"]], "o-", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("pass k")
        ax.set_ylabel("MSE of upward-source KVs vs fixed point")
        ax.set_title("KV convergence of iterative prefill")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        _save(plt, fig, path)

    return draw
