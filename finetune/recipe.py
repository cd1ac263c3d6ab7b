"""Fine-tuning recipes: a YAML file is the single source of truth for a run, ``key=value`` overrides it.

The schema is a tree of dataclasses. :func:`load_recipe` reads the YAML, applies overrides, checks every key
(unknown keys, types, choices, cross-field rules, files that must exist) and raises one :class:`RecipeError`
listing every problem, each naming its key, before any model or dataset is touched.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BUNDLED_MODELS = {"bundled:smollm2-135m"}
DTYPES = ("auto", "float32", "bfloat16", "float16")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)
DATA_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
DEFAULT_LORA = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


class RecipeError(ValueError):
    """A recipe that cannot run; the message lists every problem with the key it is about."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


# ----------------------------------------------------------------------------------------------------------------
# schema


@dataclass
class ModelSection:
    """The model to fine-tune: a converted LCKV checkpoint, or a source Llama converted on the fly."""

    path: str = ""  # LCKV checkpoint folder / Hub id, or a source Llama (folder, Hub id, .gguf, bundled:smollm2-135m)
    warmup: str | list[int] | None = None  # layout spec (sandwich:2, ...): convert the source Llama on the fly
    kv_init: str | None = None  # top | mean (converter default when null)
    dtype: str = "auto"  # weights dtype for training: auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16
    attn_implementation: str = "sdpa"
    tokenizer: str | None = None  # defaults to the model's own tokenizer
    revision: str | None = None
    trust_remote_code: bool = False  # only for a *source* model that needs it; LCKV checkpoints use lckv's code


@dataclass
class DataSource:
    """One data source: a local .txt/.jsonl/.json/.parquet/.csv file or a Hub dataset."""

    path: str = ""
    name: str | None = None  # Hub dataset config name
    split: str = "train"
    text_field: str = "text"  # column with plain text (tokenized and packed)
    messages_field: str = "messages"  # column with chat messages (rendered with the chat template, then packed)
    eval_split: str | None = None  # Hub split to hold out instead of the last eval_fraction of the rows
    max_rows: int | None = None  # use only the first max_rows rows (before the held-out split)


@dataclass
class DataSection:
    sources: list[DataSource] = field(default_factory=list)
    block_size: int = 512  # tokens per packed training sequence
    eval_fraction: float = 0.1  # the last fraction of each source's rows is held out for evaluation
    max_train_blocks: int | None = None
    max_eval_blocks: int | None = 64  # bound the cost of each evaluation
    num_proc: int | None = None  # processes for tokenization (datasets.map)
    cache_dir: str | None = None  # datasets cache (default: HF_DATASETS_CACHE)


@dataclass
class MethodSection:
    type: str = "lora"  # full | lora | qlora
    trainable: str | list[str] = "all"  # full: "all" or regexes of parameter names to train (others frozen)
    lora: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_LORA))  # peft.LoraConfig keys
    quantization: dict[str, Any] = field(default_factory=dict)  # qlora: transformers.BitsAndBytesConfig keys


@dataclass
class LCKVSection:
    forward_passes: int | None = None  # m: passes without gradient per upward block (null: model config)
    backward_passes: int | None = None  # b: passes with gradient after them (null: model config)


@dataclass
class RoutingSection:
    """Random cross-layer KV routing (lckv.routing): each step, each layer i > 0 reads a preceding layer's KVs with
    probability p_share. Needs a model with every layer's k/v projections (model.warmup: plain)."""

    p_share: float = 0.5
    source: str = "uniform_preceding"  # uniform_preceding | previous | kv_layers_of (draw from layouts' KV layers)
    layouts: list[str] = field(default_factory=list)  # downward layouts for kv_layers_of, e.g. [cla:2, cla:3]
    seed: int | None = None  # null: train.seed


@dataclass
class LossSection:
    type: str = "lm"  # lm (next-token cross entropy) | distill (KL to the original Llama's logits)
    temperature: float = 1.0
    lm_weight: float = 0.0  # distill: loss = (1 - lm_weight) * T^2 * KL + lm_weight * CE
    teacher: str | None = None  # distill: teacher Llama (default: model.path when it is a source Llama)
    teacher_dtype: str | None = None  # distill: dtype of the frozen teacher (default: the student's)


@dataclass
class TrainSection:
    max_steps: int | None = None  # optimizer steps (set this or epochs)
    epochs: float | None = None
    batch_size: int = 4  # per device
    grad_accum: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    precision: str = "auto"  # auto (fp32 on CPU, bf16 on GPU) | fp32 | bf16 | fp16
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    save_steps: int = 50  # checkpoint every N steps (the run resumes from the last one)
    save_total_limit: int | None = 2
    optim: str = "adamw_torch"


@dataclass
class DeepSpeedSection:
    zero: int | None = None  # null: no DeepSpeed; 2 or 3: a shipped ZeRO template
    offload_optimizer: bool = False  # optimizer states to CPU (compiles DeepSpeed's cpu_adam on first use)
    offload_params: bool = False  # ZeRO-3 only: parameters to CPU
    config: str | None = None  # path to your own DeepSpeed JSON (instead of zero/offload)


@dataclass
class EvalSection:
    steps: int | None = None  # held-out perplexity every N steps (null: only before and after)
    batch_size: int | None = None  # default: train.batch_size
    before: bool = True  # held-out perplexity of the starting model
    report: bool = True  # at the end, the lckv-eval ppl report (fine-tuned vs converted vs base)
    report_data: list[str] | None = None  # text files for that report (default: the held-out text of data)
    report_max_tokens: int | None = 4096
    report_modes: list[str] = field(default_factory=lambda: ["iterative", "sequential"])


@dataclass
class OutputSection:
    dir: str = ""
    save_adapter: bool | None = None  # default: true for lora/qlora
    save_merged: bool = True  # full weights (LoRA merged in) that load with trust_remote_code=True
    push_to_hub: str | None = None  # ORG/NAME: upload the result with the recipe and results in the model card
    hub_private: bool = True
    overwrite: bool = False  # start over in a folder holding a run with a different recipe


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    method: MethodSection = field(default_factory=MethodSection)
    lckv: LCKVSection = field(default_factory=LCKVSection)
    routing: RoutingSection | None = None  # null: no random routing
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    eval: EvalSection = field(default_factory=EvalSection)
    output: OutputSection = field(default_factory=OutputSection)
    name: str | None = None
    description: str | None = None
    source_file: str | None = field(default=None, metadata={"internal": True})
    recipe_dir: str | None = field(default=None, metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what is written to recipe.yaml and the model card)."""
        d = dataclasses.asdict(self)
        d.pop("source_file", None)
        d.pop("recipe_dir", None)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)

    @property
    def is_source_model(self) -> bool:
        """True when model.path is a plain Llama that is converted before training."""
        return self.model.warmup is not None

    @property
    def uses_lora(self) -> bool:
        return self.method.type in ("lora", "qlora")


# ----------------------------------------------------------------------------------------------------------------
# parsing: dict -> dataclasses with type checks


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {str: "text", int: "an integer", float: "a number", bool: "true/false", type(None): "null"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Convert ``value`` to annotation ``tp`` (strings from overrides included); record a problem on failure."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):  # an optional section: report its own keys
            return _coerce(value, inner[0], key, problems)
        errs: list[str] = []
        for a in args:
            if a is type(None):
                continue
            trial: list[str] = []
            out = _coerce(value, a, key, trial)
            if not trial:
                return out
            errs += trial
        problems.append(f"`{key}`: expected {_type_name(tp)}, got {value!r}")
        return None
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            problems.append(f"`{key}`: expected a mapping of keys, got {value!r}")
            return tp()
        return _build(tp, value, key, problems)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and item_tp in (str, int):
            value = [value] if not (isinstance(value, str) and "," in value) else value.split(",")
        if not isinstance(value, list):
            problems.append(f"`{key}`: expected {_type_name(tp)}, got {value!r}")
            return []
        return [_coerce(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            problems.append(f"`{key}`: expected a mapping, got {value!r}")
            return {}
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        problems.append(f"`{key}`: expected true or false, got {value!r}")
        return None
    if tp is int:
        if isinstance(value, bool):
            problems.append(f"`{key}`: expected an integer, got {value!r}")
            return None
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        problems.append(f"`{key}`: expected an integer, got {value!r}")
        return None
    if tp is float:
        if isinstance(value, bool):
            problems.append(f"`{key}`: expected a number, got {value!r}")
            return None
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(f"`{key}`: expected a number, got {value!r}")
        return None
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"`{key}`: expected text, got {value!r}")
        return None
    return value


ALIASES = {"lr": "learning_rate", "steps": "max_steps", "epoch": "epochs", "num_epochs": "epochs",
           "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
           "scheduler": "lr_scheduler", "lr_scheduler_type": "lr_scheduler", "stage": "zero", "output_dir": "dir",
           "warmup_ratio": "warmup_steps", "layout": "warmup", "files": "sources", "seq_len": "block_size",
           "max_length": "block_size", "method": "type", "kind": "type"}  # fmt: skip


def _suggest(key: str, allowed: list[str]) -> list[str]:
    if ALIASES.get(key) in allowed:
        return [ALIASES[key]]
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return close or [a for a in allowed if key in a or a in key][:1]


def _public_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = _public_fields(cls)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = _suggest(str(key), list(fields))
            hint = f" (did you mean `{prefix + '.' if prefix else ''}{close[0]}`?)" if close else ""
            problems.append(f"unknown key `{full}`{hint}; allowed here: {', '.join(fields)}")
            continue
        kwargs[key] = _coerce(value, hints[key], full, problems)
    obj = cls(**{k: v for k, v in kwargs.items() if v is not None or _allows_none(hints[k])})
    return obj


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


# ----------------------------------------------------------------------------------------------------------------
# overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.0.c=value`` -> (["a", "b", "0", "c"], parsed YAML value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError([f"override {text!r} is not of the form key=value (e.g. train.max_steps=100)"], "overrides")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict/list tree; list items are addressed by index (data.sources.0.path)."""
    data = copy.deepcopy(data)
    problems: list[str] = []
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(path):
            last = i == len(path) - 1
            where = ".".join(path[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    problems.append(f"override `{text}`: `{where}` is not an index of a list of {len(node)} item(s)")
                    break
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if not isinstance(node.get(part), (dict, list)):
                        node[part] = {}
                    node = node[part]
            else:
                problems.append(f"override `{text}`: `{'.'.join(path[:i])}` is a value, not a section")
                break
    if problems:
        raise RecipeError(problems, "overrides")
    return data


# ----------------------------------------------------------------------------------------------------------------
# semantic validation


def resolve_path(path: str, recipe_dir: Path | None) -> Path | None:
    """A local path: as given (relative to the current folder), else relative to the recipe's folder; None if absent."""
    p = Path(os.path.expanduser(path))
    if p.exists():
        return p
    if recipe_dir is not None and not p.is_absolute() and (recipe_dir / p).exists():
        return recipe_dir / p
    return None


def looks_local(path: str) -> bool:
    """True for strings meant as local paths rather than Hub ids (``org/name``)."""
    return (
        path.startswith(("/", "./", "../", "~"))
        or Path(path).suffix.lower() in DATA_SUFFIXES
        or path.endswith(".gguf")
        or path.count("/") > 1
        or os.path.exists(path)
    )


def _check_choice(value: Any, choices: tuple, key: str, problems: list[str]) -> None:
    if value not in choices:
        problems.append(f"`{key}`: {value!r} is not one of {', '.join(map(str, choices))}")


def _check_layout_syntax(spec: Any, problems: list[str]) -> None:
    from ..layout import LayoutError, parse_layout

    if isinstance(spec, list):
        return  # the length is checked against the model's layers once its config is read
    text = str(spec).strip().lower()
    if "," in text or text.isdigit() or text in ("plain", "llama", "none"):
        return
    kind, _, arg = text.partition(":")
    try:
        parse_layout(spec, 4096 if kind != "cla" else 8)
    except LayoutError as e:
        problems.append(f"`model.warmup`: {e}")


def _validate(r: Recipe, recipe_dir: Path | None, problems: list[str]) -> None:
    m = r.model
    if not m.path:
        problems.append(
            "`model.path` is required: a converted LCKV checkpoint or a Llama to convert (with model.warmup)"
        )
    elif m.path.startswith("bundled:") and m.path not in BUNDLED_MODELS:
        problems.append(
            f"`model.path`: unknown bundled model {m.path!r}; available: {', '.join(sorted(BUNDLED_MODELS))}"
        )
    elif looks_local(m.path) and not m.path.startswith("bundled:") and resolve_path(m.path, recipe_dir) is None:
        problems.append(f"`model.path`: {m.path} does not exist")
    if m.path.startswith("bundled:") and m.warmup is None:
        problems.append(
            "`model.warmup`: the bundled model is a plain Llama: give a layout to convert it to (e.g. sandwich:2)"
        )
    if m.warmup is not None:
        _check_layout_syntax(m.warmup, problems)
    if m.kv_init is not None:
        _check_choice(m.kv_init, ("top", "mean"), "model.kv_init", problems)
        if m.warmup is None:
            problems.append("`model.kv_init` only applies when converting (set model.warmup, or remove kv_init)")
    _check_choice(m.dtype, DTYPES, "model.dtype", problems)
    _check_choice(m.attn_implementation, ("sdpa", "eager", "flash_attention_2", "flex_attention"),
                  "model.attn_implementation", problems)  # fmt: skip

    d = r.data
    if not d.sources:
        problems.append("`data.sources` is empty: list at least one file or Hub dataset (path: ...)")
    for i, s in enumerate(d.sources):
        key = f"data.sources[{i}]"
        if not s.path:
            problems.append(f"`{key}.path` is required")
            continue
        suffix = Path(s.path).suffix.lower()
        if looks_local(s.path):
            found = resolve_path(s.path, recipe_dir)
            if found is None:
                tried = f" (also tried {recipe_dir / s.path})" if recipe_dir and not Path(s.path).is_absolute() else ""
                problems.append(f"`{key}.path`: data file {s.path} does not exist{tried}")
            elif found.is_file() and found.stat().st_size == 0:
                problems.append(f"`{key}.path`: data file {found} is empty")
            elif found.is_file() and suffix not in DATA_SUFFIXES:
                problems.append(f"`{key}.path`: {found} has an unsupported suffix; use {', '.join(DATA_SUFFIXES)}")
        if s.max_rows is not None and s.max_rows < 1:
            problems.append(f"`{key}.max_rows` must be >= 1")
    if d.block_size < 8:
        problems.append(f"`data.block_size` must be at least 8 tokens, got {d.block_size}")
    if not 0.0 <= d.eval_fraction < 1.0:
        problems.append(f"`data.eval_fraction` must be in [0, 1), got {d.eval_fraction}")
    for k in ("max_train_blocks", "max_eval_blocks", "num_proc"):
        v = getattr(d, k)
        if v is not None and v < 1:
            problems.append(f"`data.{k}` must be >= 1 or null, got {v}")

    me = r.method
    _check_choice(me.type, ("full", "lora", "qlora"), "method.type", problems)
    if me.type != "full" and me.trainable != "all":
        problems.append("`method.trainable` applies to method.type full only (LoRA trains method.lora.target_modules)")
    if isinstance(me.trainable, str) and me.trainable != "all":
        problems.append("`method.trainable` must be `all` or a list of parameter-name regexes")
    if isinstance(me.trainable, list):
        for i, pat in enumerate(me.trainable):
            try:
                re.compile(pat)
            except re.error as e:
                problems.append(f"`method.trainable[{i}]`: bad regex {pat!r}: {e}")
    if me.type in ("lora", "qlora"):
        me.lora = {**DEFAULT_LORA, **me.lora}  # recipe keys override the defaults
        _validate_lora(me.lora, problems)
    if me.quantization and me.type != "qlora":
        problems.append("`method.quantization` applies to method.type qlora only")
    if me.type == "qlora":
        _validate_quantization(me.quantization, problems)

    lk = r.lckv
    if lk.forward_passes is not None and lk.forward_passes < 0:
        problems.append(f"`lckv.forward_passes` must be >= 0, got {lk.forward_passes}")
    if lk.backward_passes is not None and lk.backward_passes < 1:
        problems.append(f"`lckv.backward_passes` must be >= 1, got {lk.backward_passes}")

    if r.routing is not None:
        _validate_routing(r, problems)

    lo = r.loss
    _check_choice(lo.type, ("lm", "distill"), "loss.type", problems)
    if lo.temperature <= 0:
        problems.append(f"`loss.temperature` must be > 0, got {lo.temperature}")
    if not 0.0 <= lo.lm_weight <= 1.0:
        problems.append(f"`loss.lm_weight` must be in [0, 1], got {lo.lm_weight}")
    if lo.teacher_dtype is not None:
        _check_choice(lo.teacher_dtype, DTYPES, "loss.teacher_dtype", problems)
    if lo.type == "distill" and lo.teacher is None and not r.is_source_model:
        problems.append(
            "`loss.teacher`: distillation needs the original Llama; set loss.teacher, or give model.path as the "
            "source Llama with model.warmup so it is converted on the fly and used as teacher"
        )
    if lo.type == "distill" and lo.teacher and looks_local(lo.teacher) and resolve_path(lo.teacher, recipe_dir) is None:
        if not lo.teacher.startswith("bundled:"):
            problems.append(f"`loss.teacher`: {lo.teacher} does not exist")
    if lo.type != "distill" and (lo.teacher is not None or lo.teacher_dtype is not None):
        problems.append("`loss.teacher`/`loss.teacher_dtype` apply to loss.type distill only")

    t = r.train
    if t.max_steps is not None and t.epochs is not None:
        problems.append("`train.max_steps` and `train.epochs` are both set: keep one")
    if t.max_steps is not None and t.max_steps < 1:
        problems.append(f"`train.max_steps` must be >= 1, got {t.max_steps}")
    if t.epochs is not None and t.epochs <= 0:
        problems.append(f"`train.epochs` must be > 0, got {t.epochs}")
    for k in ("batch_size", "grad_accum", "logging_steps", "save_steps"):
        if getattr(t, k) < 1:
            problems.append(f"`train.{k}` must be >= 1, got {getattr(t, k)}")
    if t.learning_rate <= 0:
        problems.append(f"`train.learning_rate` must be > 0, got {t.learning_rate}")
    if t.warmup_steps < 0 or t.weight_decay < 0 or t.max_grad_norm < 0:
        problems.append("`train.warmup_steps`, `train.weight_decay` and `train.max_grad_norm` must be >= 0")
    _check_choice(t.lr_scheduler, SCHEDULERS, "train.lr_scheduler", problems)
    _check_choice(t.precision, PRECISIONS, "train.precision", problems)
    if t.save_total_limit is not None and t.save_total_limit < 1:
        problems.append("`train.save_total_limit` must be >= 1 or null (keep all)")

    ds = r.deepspeed
    if ds.zero is not None:
        _check_choice(ds.zero, (2, 3), "deepspeed.zero", problems)
    if ds.config is not None:
        if ds.zero is not None or ds.offload_optimizer or ds.offload_params:
            problems.append("`deepspeed.config` replaces deepspeed.zero/offload_*: set those in your JSON instead")
        found = resolve_path(ds.config, recipe_dir)
        if found is None:
            problems.append(f"`deepspeed.config`: {ds.config} does not exist")
        else:
            try:
                json.loads(found.read_text())
            except json.JSONDecodeError as e:
                problems.append(f"`deepspeed.config`: {found} is not valid JSON: {e}")
    if (ds.offload_optimizer or ds.offload_params) and ds.zero is None:
        problems.append("`deepspeed.offload_*` needs deepspeed.zero set to 2 or 3")
    if ds.offload_params and ds.zero == 2:
        problems.append("`deepspeed.offload_params` needs deepspeed.zero: 3 (ZeRO-2 does not partition parameters)")
    if me.type == "qlora" and (ds.zero is not None or ds.config is not None) and t.precision == "fp16":
        problems.append("`train.precision`: fp16 with QLoRA under DeepSpeed is not supported; use bf16 or fp32")

    e = r.eval
    if e.steps is not None and e.steps < 1:
        problems.append(f"`eval.steps` must be >= 1 or null, got {e.steps}")
    for i, f in enumerate(e.report_data or []):
        if resolve_path(f, recipe_dir) is None:
            problems.append(f"`eval.report_data[{i}]`: {f} does not exist")
    for m in e.report_modes:
        _check_choice(m, ("iterative", "sequential", "converge"), "eval.report_modes", problems)
    if e.report_max_tokens is not None and e.report_max_tokens < 16:
        problems.append(f"`eval.report_max_tokens` must be >= 16 or null, got {e.report_max_tokens}")
    if e.batch_size is not None and e.batch_size < 1:
        problems.append(f"`eval.batch_size` must be >= 1 or null, got {e.batch_size}")

    o = r.output
    if not o.dir:
        problems.append("`output.dir` is required: the folder for checkpoints, weights, recipe and results")
    elif Path(o.dir).exists() and not Path(o.dir).is_dir():
        problems.append(f"`output.dir`: {o.dir} is a file")
    if o.save_adapter and not r.uses_lora:
        problems.append("`output.save_adapter` needs method.type lora or qlora")
    if not o.save_merged and not (o.save_adapter if o.save_adapter is not None else r.uses_lora):
        problems.append("`output`: save_merged and save_adapter are both off; nothing would be saved")
    if o.push_to_hub is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", o.push_to_hub):
        problems.append(f"`output.push_to_hub`: {o.push_to_hub!r} is not a repo id of the form ORG/NAME")


def _validate_routing(r: Recipe, problems: list[str]) -> None:
    from ..layout import LayoutError, is_downward, parse_layout
    from ..routing import SOURCES

    ro = r.routing
    if not 0.0 <= ro.p_share <= 1.0:
        problems.append(f"`routing.p_share` must be in [0, 1], got {ro.p_share}")
    _check_choice(ro.source, SOURCES, "routing.source", problems)
    if ro.source == "kv_layers_of" and not ro.layouts:
        problems.append("`routing.layouts`: source kv_layers_of draws from the KV layers of layouts: list some, "
                        "e.g. [cla:2, cla:3]")  # fmt: skip
    if ro.layouts and ro.source != "kv_layers_of":
        problems.append("`routing.layouts` applies to routing.source kv_layers_of only")
    for i, spec in enumerate(ro.layouts):
        try:  # the real layer count is known once the model config is read; 32 checks the syntax and direction
            if not is_downward(parse_layout(spec, 32)):
                problems.append(f"`routing.layouts[{i}]`: {spec!r} reads layers above; routing layouts share downward")
        except LayoutError as e:
            problems.append(f"`routing.layouts[{i}]`: {e}")
    if r.is_source_model and not _is_plain_spec(r.model.warmup):
        problems.append(
            f"`model.warmup`: routing needs every layer's k/v projections, but {r.model.warmup!r} drops some; "
            "train a plain conversion (model.warmup: plain) and pick the layout at deployment with lckv-convert --reshare"
        )


def _is_plain_spec(spec: Any) -> bool:
    if isinstance(spec, list):
        return all(int(s) == i for i, s in enumerate(spec))
    text = str(spec).strip().lower()
    if text in ("plain", "llama", "none"):
        return True
    parts = [p.strip() for p in text.split(",")]
    return all(p.isdigit() for p in parts) and [int(p) for p in parts] == list(range(len(parts)))


def _validate_lora(lora: dict[str, Any], problems: list[str]) -> None:
    try:
        from peft import LoraConfig
    except ImportError:
        problems.append("`method.type`: lora/qlora need peft: pip install 'lckv[finetune]'")
        return
    allowed = {f.name for f in dataclasses.fields(LoraConfig)} - {"peft_type", "task_type", "base_model_name_or_path"}
    bad = [k for k in lora if k not in allowed]
    for k in bad:
        close = _suggest(k, sorted(allowed))
        hint = f" (did you mean `method.lora.{close[0]}`?)" if close else ""
        problems.append(f"unknown key `method.lora.{k}`{hint}: use peft.LoraConfig keys")
    if bad:
        return
    try:
        LoraConfig(**lora)
    except Exception as e:  # peft raises ValueError/TypeError for bad values
        problems.append(f"`method.lora`: peft rejects it: {e}")


def _validate_quantization(q: dict[str, Any], problems: list[str]) -> None:
    import inspect

    from transformers import BitsAndBytesConfig

    allowed = set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
    for k in q:
        if k not in allowed:
            close = _suggest(k, sorted(allowed))
            hint = f" (did you mean `method.quantization.{close[0]}`?)" if close else ""
            problems.append(f"unknown key `method.quantization.{k}`{hint}: use transformers.BitsAndBytesConfig keys")
    if q.get("load_in_8bit"):
        problems.append("`method.quantization.load_in_8bit`: qlora loads the base in 4 bits; remove load_in_8bit")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        problems.append("`method.type`: qlora needs bitsandbytes: pip install 'lckv[finetune]'")


# ----------------------------------------------------------------------------------------------------------------
# entry points


def recipe_from_dict(data: dict[str, Any], source: str = "recipe", recipe_dir: Path | None = None) -> Recipe:
    """Build and fully validate a recipe from a nested dict; raise RecipeError listing every problem."""
    if not isinstance(data, dict):
        raise RecipeError([f"the recipe must be a mapping of sections, got {type(data).__name__}"], source)
    problems: list[str] = []
    recipe = _build(Recipe, data, "", problems)
    try:
        _validate(recipe, recipe_dir, problems)
    except Exception as e:  # a value already reported above can trip a later check
        if not problems:
            raise
        problems.append(f"(further checks skipped: {e})")
    if problems:
        raise RecipeError(problems, source)
    recipe.source_file = source
    recipe.recipe_dir = str(recipe_dir) if recipe_dir else None
    return recipe


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML, apply ``key=value`` overrides and validate everything (no model is loaded)."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError([f"recipe file {path} does not exist"], str(path))
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise RecipeError([f"not valid YAML: {e}"], str(path)) from None
    data = apply_overrides(data, list(overrides or []))
    return recipe_from_dict(data, str(path), p.resolve().parent)


def local_path(recipe: Recipe, path: str) -> Path | None:
    """Resolve a recipe's local path (current folder first, then the recipe's folder)."""
    return resolve_path(path, Path(recipe.recipe_dir) if recipe.recipe_dir else None)


def diff_recipes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipe dicts."""
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        full = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_recipes(a, b, full + ".")
        elif a != b:
            out.append(full)
    return out


# keys that may change when a run is restarted in the same folder (extend training, evaluate differently, publish)
RESUMABLE_CHANGES = ("train.max_steps", "train.epochs", "train.logging_steps", "eval.", "output.push_to_hub",
                     "output.hub_private", "output.save_", "output.overwrite", "name", "description")  # fmt: skip


__all__ = [
    "Recipe",
    "RecipeError",
    "apply_overrides",
    "diff_recipes",
    "load_recipe",
    "recipe_from_dict",
    "resolve_path",
]
