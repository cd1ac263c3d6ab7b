"""Report writing: environment record, Markdown tables, and an output folder that appears only when complete."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class OutputError(RuntimeError):
    """The output folder cannot be written; the message names the fix."""


def environment(device: str = "cpu") -> dict[str, Any]:
    """Versions, device and thread settings, so every figure can be traced to where it was measured."""
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for pkg in ("peft", "datasets", "lckv"):
        try:
            from importlib.metadata import version

            env[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - optional packages
            env[pkg] = None
    env["git_commit"] = _git_commit()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        env["gpu"] = torch.cuda.get_device_name(idx)
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(idx).total_memory
        env["cuda"] = torch.version.cuda
    return env


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def fmt(x: Any, digits: int = 3) -> str:
    """Compact number formatting for tables (None -> '-')."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        if x != 0 and abs(x) < 10**-(digits):
            return f"{x:.{digits}g}"
        if abs(x) >= 100:
            return f"{x:,.1f}"
        return f"{x:,.{digits}f}"
    return str(x)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def default_out_dir(command: str) -> Path:
    return Path(f"lckv-eval-{command}-{time.strftime('%Y%m%d-%H%M%S')}")


def prepare_out_dir(out: str | Path | None, command: str, overwrite: bool) -> Path:
    """Check the output folder can be written before any model loads."""
    path = Path(out) if out else default_out_dir(command)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise OutputError(f"output folder {path} exists and is not empty: pass --overwrite or another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK):
        raise OutputError(f"cannot write to {path.parent}: choose another --out")
    return path


def write_outputs(out: Path, files: dict[str, str | bytes | Callable[[Path], None]]) -> Path:
    """Write all files into a temporary sibling folder, then rename it to ``out`` (replacing an old one).

    Values are text, bytes, or a callable that writes the file at the path it is given (plots).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, content in files.items():
            target = tmp / name
            if callable(content):
                content(target)
            elif isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2, sort_keys=False, default=_json_default) + "\n"


def _json_default(o: Any) -> Any:
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
