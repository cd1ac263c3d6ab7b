"""Loading models for evaluation: plain Llama, LCKV folders, LoRA adapters, GGUF files and the bundled SmolLM2.

Everything returns ``(model, tokenizer)`` with the model in eval mode on the requested device, so ``ppl`` and
``bench`` treat every source the same way.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# config keys that describe a checkpoint rather than the architecture; dropped when building an LCKV config
_NON_ARCH_KEYS = (
    "model_type",
    "architectures",
    "auto_map",
    "transformers_version",
    "quantization_config",
    "_name_or_path",
    "dtype",
    "torch_dtype",
    "kv_sources",
)


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the fix."""


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """Map a dtype name to a torch dtype; ``auto``/None means float32 on CPU and bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use one of float32, bfloat16, float16, auto") from None


def is_lckv(model_or_config: Any) -> bool:
    """True for LCKV models/configs (installed or remote-code classes alike: no isinstance on config classes)."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "kv_sources", None) is not None


def bundled_gguf_path(name: str) -> Path:
    """The GGUF file of a bundled model (lckv-convert locates it, without importing its package)."""
    from ..convert.sources import ConvertError
    from ..convert.sources import bundled_gguf_path as locate

    try:
        return locate(name)
    except ConvertError as e:
        raise ModelLoadError(str(e)) from None


def _cache_root() -> Path:
    return Path(os.environ.get("LCKV_CACHE_DIR", Path.home() / ".cache" / "lckv"))


def _plain_llama_from_gguf(gguf: Path, dtype: torch.dtype):
    """Dequantize a GGUF Llama into a plain ``LlamaForCausalLM`` (one that save_pretrained accepts) + tokenizer.

    Uses lckv-convert's source reader (one copy of the weights in memory); falls back to transformers' GGUF
    loading when that is unavailable.
    """
    from transformers import AutoTokenizer

    logger.info("loading %s (dequantizing GGUF, about a minute)", gguf)
    try:
        from lckv.convert.check import load_source_model
        from lckv.convert.sources import ConvertError, resolve_source
    except ImportError:
        model = _gguf_via_transformers(gguf)
    else:
        try:
            src = resolve_source(str(gguf))
            model = load_source_model(src, src.reader())
        except ConvertError as e:
            raise ModelLoadError(str(e)) from None
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model.to(dtype), tokenizer


def _gguf_via_transformers(gguf: Path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if getattr(config, "model_type", None) != "llama":
        raise ModelLoadError(f"{gguf} holds a {config.model_type!r} model; only Llama-architecture GGUF files work")
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    return model.eval()


def load_bundled(name: str, dtype: torch.dtype = torch.float32, cache: bool = True):
    """Load a bundled model; the dequantized weights are cached as safetensors (``$LCKV_CACHE_DIR``) for fast reloads."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    gguf = bundled_gguf_path(name)
    stat = gguf.stat()
    folder = _cache_root() / f"{name.split(':', 1)[1]}-{stat.st_size}-{int(stat.st_mtime)}"
    if cache and (folder / "config.json").is_file():
        model = LlamaForCausalLM.from_pretrained(str(folder), dtype=dtype)
        return model, AutoTokenizer.from_pretrained(str(folder))
    model, tokenizer = _plain_llama_from_gguf(gguf, torch.float32)
    if cache:
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            try:
                tmp.rename(folder)
            except OSError:  # another process cached it first
                shutil.rmtree(tmp, ignore_errors=True)
            logger.info("cached the dequantized %s in %s", name, folder)
        except OSError as e:
            logger.warning("could not cache %s in %s (%s); the next load dequantizes again", name, folder, e)
    return model.to(dtype), tokenizer


def _load_tokenizer(*candidates: str | Path | None):
    from transformers import AutoTokenizer

    errors = []
    for c in candidates:
        if c is None:
            continue
        try:
            return AutoTokenizer.from_pretrained(str(c))
        except Exception as e:  # noqa: BLE001 - try the next candidate, report all
            errors.append(f"{c}: {type(e).__name__}")
    raise ModelLoadError(f"no tokenizer found ({'; '.join(errors)}): pass --tokenizer PATH")


def _load_adapter(folder: Path, device: str, dtype: torch.dtype, trust_remote_code: bool, tokenizer: str | None):
    """Load base + LoRA adapter from a peft folder and merge the adapter into the weights."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelLoadError(f"{folder} is a LoRA adapter: pip install peft to load it") from None
    cfg = json.loads((folder / "adapter_config.json").read_text())
    base_ref = os.environ.get("LCKV_ADAPTER_BASE") or cfg.get("base_model_name_or_path")
    if not base_ref:
        raise ModelLoadError(f"{folder}/adapter_config.json names no base model: set LCKV_ADAPTER_BASE=PATH")
    if not base_ref.startswith("bundled:") and not Path(base_ref).exists() and (folder / base_ref).exists():
        base_ref = str(folder / base_ref)
    base, base_tok = load_model(base_ref, "cpu", dtype, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    tok = _load_tokenizer(tokenizer) if tokenizer else None
    if tok is None:
        try:
            tok = _load_tokenizer(folder)
        except ModelLoadError:
            tok = base_tok
    return model.to(device).eval(), tok


def load_model(
    path_or_id: str | Path,
    device: str = "cpu",
    dtype: str | torch.dtype | None = "float32",
    *,
    trust_remote_code: bool = False,
    tokenizer: str | None = None,
):
    """Load ``(model, tokenizer)`` from a Llama/LCKV folder, a LoRA adapter folder, a ``.gguf`` file,
    ``bundled:smollm2-135m`` or a Hub id (when online).

    LCKV folders load with the installed ``lckv`` classes, or with the folder's own code when
    ``trust_remote_code`` is set. LoRA adapters are merged into their base (named in adapter_config.json).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    import lckv  # noqa: F401 - registers the LCKV classes with the Auto* factories

    torch_dtype = resolve_dtype(dtype, device)
    ref = str(path_or_id)
    if ref.startswith("random:"):
        return load_random(ref.split(":", 1)[1], device, torch_dtype, tokenizer=tokenizer)
    if ref.startswith("bundled:"):
        model, tok = load_bundled(ref, torch_dtype)
        if tokenizer:
            tok = _load_tokenizer(tokenizer)
        return model.to(device).eval(), tok
    path = Path(ref)
    if ref.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        model, tok = _plain_llama_from_gguf(path, torch_dtype)
        return model.to(device).eval(), (_load_tokenizer(tokenizer) if tokenizer else tok)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return _load_adapter(path, device, torch_dtype, trust_remote_code, tokenizer)
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_model(ggufs[0], device, torch_dtype, tokenizer=tokenizer)
        raise ModelLoadError(
            f"{path} has no config.json (not a model folder): give a checkpoint folder or a .gguf file"
        )
    if not path.exists() and (ref.startswith((".", "/", "~")) or ref.count("/") > 1):
        raise ModelLoadError(f"model path {ref} does not exist")
    try:
        config = AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            ref, config=config, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    except OSError as e:
        raise ModelLoadError(
            f"could not load {ref} ({str(e).splitlines()[0]}): give a local folder, a .gguf file or bundled:smollm2-135m "
            "(the Hub needs network)"
        ) from None
    tok = _load_tokenizer(tokenizer, ref) if tokenizer else _load_tokenizer(ref)
    return model.to(device).eval(), tok


def load_random(folder: str | Path, device: str, dtype: torch.dtype, *, tokenizer: str | None = None, seed: int = 0):
    """A model with the architecture of ``folder/config.json`` (or a config file) and random weights.

    For cost benchmarks only (memory, throughput, TTFT do not depend on the weight values), e.g. on a machine
    that cannot hold the real checkpoint. The tokenizer comes from the same folder when it has one.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(folder)
    config_dir = path.parent if path.is_file() else path
    if not (config_dir / "config.json").is_file():
        raise ModelLoadError(f"random:{folder} needs a folder (or file) with a config.json")
    config = AutoConfig.from_pretrained(str(config_dir))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        tok = _load_tokenizer(tokenizer or config_dir)
    except ModelLoadError:
        tok = None
        logger.warning("random:%s has no tokenizer: prompts will be random tokens", folder)
    return model.to(device).eval(), tok


def lckv_config_from(base_config: Any, kv_sources: list[int], **overrides: Any):
    """An ``LCKVLlamaConfig`` with the architecture of a Llama config and the given layout."""
    from lckv import LCKVLlamaConfig

    d = {k: v for k, v in base_config.to_dict().items() if k not in _NON_ARCH_KEYS}
    d.update(overrides)
    return LCKVLlamaConfig(kv_sources=list(kv_sources), **d)


def convert_in_memory(model: Any, layout: str | list[int], kv_init: str | None = None, **config_overrides: Any):
    """Convert a loaded Llama to an LCKV model in memory, mapping tensors exactly as ``lckv-convert`` does.

    ``kv_init`` is ``top`` (a KV layer keeps its own k/v projections) or ``mean`` (the mean of its readers'),
    defaulting to lckv-convert's default. Without ``lckv.convert`` only ``top`` is available.
    """
    from lckv import LCKVLlamaForCausalLM, parse_layout

    kv_sources = parse_layout(layout, model.config.num_hidden_layers)
    config = lckv_config_from(model.config, kv_sources, **config_overrides)
    source = model.state_dict()
    try:
        from lckv.convert import DEFAULT_KV_INIT
        from lckv.convert.mapping import MappingError, plan_tensors
    except ImportError:
        if kv_init not in (None, "top"):
            raise ModelLoadError(f"kv_init {kv_init!r} needs lckv.convert; only 'top' is built in") from None
        kv = set(kv_sources)
        recipes = [
            (name, (name,))
            for name in source
            if not any(
                f"layers.{i}.self_attn.{p}_proj." in name for i in range(len(kv_sources)) if i not in kv for p in "kv"
            )
        ]
    else:
        try:
            plan, _ = plan_tensors(
                list(source), kv_sources, kv_init or DEFAULT_KV_INIT, bool(config.tie_word_embeddings)
            )
        except MappingError as e:
            raise ModelLoadError(str(e)) from None
        recipes = [(r.name, r.sources) for r in plan]
    state = {}
    for name, sources in recipes:
        if len(sources) == 1:
            state[name] = source[sources[0]]
        else:
            state[name] = (sum(source[s].float() for s in sources) / len(sources)).to(source[sources[0]].dtype)
    param = next(model.parameters())
    lckv_model = LCKVLlamaForCausalLM(config).to(device=param.device, dtype=param.dtype)
    missing, unexpected = lckv_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelLoadError(
            f"converted tensors do not fit the LCKV model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if config.tie_word_embeddings:
        lckv_model.tie_weights()
    return lckv_model.eval()


def weight_bytes(model: Any) -> int:
    """Bytes of parameters and buffers (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
