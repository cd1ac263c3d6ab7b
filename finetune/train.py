"""Run a recipe with the HF Trainer: conversion, data, model, (distillation) training, resume, saving, summary."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import socket
import time
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from .data import DataStats, build_datasets
from .model import (
    apply_method,
    converted_checkpoint,
    load_student,
    load_teacher,
    resolve_dtype,
    teacher_path,
    trainable_summary,
    zero3_init_disabled,
)
from .recipe import RESUMABLE_CHANGES, Recipe, RecipeError, diff_recipes, local_path

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run stopped (NaN loss, ...); the message says at which step and what was kept."""


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, value: float):
        self.step, self.value = step, value
        super().__init__(f"loss is {value} at step {step}")


# ----------------------------------------------------------------------------------------------------------------
# losses


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    lm_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``(1 - lm_weight) * T^2 * KL(teacher || student) + lm_weight * CE`` over the next-token positions of ``labels``.

    Logits are ``[B, T, V]``; position t predicts token t+1, positions whose label is -100 are ignored.
    """
    s = student_logits[:, :-1].float()
    t = teacher_logits[:, :-1].float()
    y = labels[:, 1:]
    mask = (y != -100).float()
    s_logp = F.log_softmax(s / temperature, dim=-1)
    t_logp = F.log_softmax(t / temperature, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # [B, T-1]
    kd = (kl * mask).sum() / mask.sum().clamp(min=1) * temperature**2
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1), ignore_index=-100)
    loss = (1.0 - lm_weight) * kd + lm_weight * ce
    return loss, {"kd_loss": kd.item(), "lm_loss": ce.item()}


# ----------------------------------------------------------------------------------------------------------------
# the Trainer


def _trainer_class():
    from transformers import Trainer

    class LCKVTrainer(Trainer):
        """HF Trainer plus: distillation loss, NaN stop, tokens/s and perplexity in the logs."""

        def __init__(self, *args, teacher=None, loss_cfg=None, tokens_per_step: int = 0, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher
            self.loss_cfg = loss_cfg
            self.tokens_per_step = tokens_per_step
            self._parts: dict[str, list[float]] = defaultdict(list)
            self._last_log: tuple[float, int] | None = None
            self.eval_hook = None  # called with (step, metrics) after each evaluation
            if teacher is not None:
                # the distillation loss is a per-micro-batch mean: let the Trainer scale it for accumulation
                self.model_accepts_loss_kwargs = False

        def evaluate(self, *args, **kwargs):
            metrics = super().evaluate(*args, **kwargs)
            if self.eval_hook is not None:
                self.eval_hook(self.state.global_step, metrics)
            return metrics

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.teacher is None or not model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs["labels"]
            fwd = {k: v for k, v in inputs.items() if k != "labels"}
            outputs = model(**fwd)
            with torch.no_grad():
                teacher_logits = self.teacher(**fwd).logits
            loss, parts = distill_loss(
                outputs.logits, teacher_logits, labels, self.loss_cfg.temperature, self.loss_cfg.lm_weight
            )
            for k, v in parts.items():
                self._parts[k].append(v)
            return (loss, outputs) if return_outputs else loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self._last_log is None:
                self._last_log = (time.time(), self.state.global_step)
            loss = super().training_step(model, inputs, num_items_in_batch)
            bad = torch.tensor(0.0 if bool(torch.isfinite(loss).all()) else 1.0, device=loss.device)
            if self.args.world_size > 1:
                torch.distributed.all_reduce(bad)
            if bad.item() > 0:
                raise NonFiniteLoss(self.state.global_step + 1, float(loss.detach().float().mean()))
            return loss

        def log(self, logs: dict[str, float], *args, **kwargs) -> None:
            if "loss" in logs and self._last_log is not None:
                now, step = time.time(), self.state.global_step
                t0, s0 = self._last_log
                if step > s0 and now > t0:
                    logs["tokens_per_s"] = round((step - s0) * self.tokens_per_step / (now - t0), 1)
                    logs["s_per_step"] = round((now - t0) / (step - s0), 3)
                logs["tokens_seen"] = step * self.tokens_per_step
                for k, v in self._parts.items():
                    if v:
                        logs[k] = round(sum(v) / len(v), 4)
                self._parts.clear()
                self._last_log = (now, step)
            if "eval_loss" in logs:
                logs["eval_ppl"] = round(math.exp(min(logs["eval_loss"], 50.0)), 4)
            super().log(logs, *args, **kwargs)

    return LCKVTrainer


# ----------------------------------------------------------------------------------------------------------------
# configuration of the run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_environment(recipe: Recipe) -> None:
    """Env that DeepSpeed needs before it is imported: CPU accelerator, and a one-process 'launch' without a launcher."""
    uses_ds = recipe.deepspeed.zero is not None or recipe.deepspeed.config is not None
    if uses_ds and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if uses_ds and "RANK" not in os.environ and "LOCAL_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def deepspeed_template(stage: int) -> dict[str, Any]:
    """A shipped ZeRO template (finetune/deepspeed_configs/zero{stage}.json)."""
    text = resources.files(__package__).joinpath("deepspeed_configs", f"zero{stage}.json").read_text()
    return json.loads(text)


def build_deepspeed_config(recipe: Recipe) -> dict[str, Any] | None:
    """The DeepSpeed dict handed to TrainingArguments (None without DeepSpeed)."""
    ds = recipe.deepspeed
    if ds.config is not None:
        cfg = json.loads(local_path(recipe, ds.config).read_text())
    elif ds.zero is not None:
        cfg = deepspeed_template(ds.zero)
        zo = cfg["zero_optimization"]
        if ds.offload_optimizer:
            zo["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
            cfg["zero_force_ds_cpu_optimizer"] = False  # the Trainer's torch AdamW runs on the offloaded states
        if ds.offload_params:
            zo["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    else:
        return None
    zo = cfg.setdefault("zero_optimization", {})
    if zo.get("stage") == 3 and not zo.get("stage3_gather_16bit_weights_on_model_save"):
        logger.warning("ZeRO-3: setting stage3_gather_16bit_weights_on_model_save=true (else saved weights are empty)")
        zo["stage3_gather_16bit_weights_on_model_save"] = True
    return cfg


def resolve_precision(name: str, on_gpu: bool) -> str:
    if name != "auto":
        if name in ("bf16", "fp16") and not on_gpu:
            logger.warning("train.precision=%s on CPU: expect it to be slower than fp32", name)
        return name
    if not on_gpu:
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def make_training_args(recipe: Recipe, out: Path, ds_config: dict | None, precision: str, on_gpu: bool, has_eval: bool):
    """TrainingArguments from the recipe (creating them starts the distributed backend)."""
    from transformers import TrainingArguments

    t, e = recipe.train, recipe.eval
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    kw: dict[str, Any] = dict(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=e.batch_size or t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        seed=t.seed,
        data_seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not on_gpu,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if (e.steps and has_eval) else "no",
        eval_steps=e.steps if (e.steps and has_eval) else None,
        prediction_loss_only=True,
        report_to=[],
        deepspeed=ds_config,
        remove_unused_columns=False,
        dataloader_drop_last=False,
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )
    if t.max_steps is not None:
        kw["max_steps"] = t.max_steps
    else:
        kw["num_train_epochs"] = t.epochs if t.epochs is not None else 1.0
    if t.gradient_checkpointing:
        key = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
        kw[key] = True
        kw[f"{key}_kwargs"] = {"use_reentrant": False}
    return TrainingArguments(**{k: v for k, v in kw.items() if k in fields})


# ----------------------------------------------------------------------------------------------------------------
# output folder: recipe, resume, results


def check_output_dir(recipe: Recipe, out: Path, is_main: bool) -> bool:
    """Compare with a run already in ``out``; returns True when it is resumed. Writes recipe.yaml (main process)."""
    saved = out / "recipe.yaml"
    resumed = False
    if saved.is_file():
        old = yaml.safe_load(saved.read_text()) or {}
        changed = [k for k in diff_recipes(old, recipe.to_dict()) if not k.startswith(RESUMABLE_CHANGES)]
        if changed and not recipe.output.overwrite:
            raise RecipeError(
                [
                    f"`output.dir` {out} holds a run with a different recipe (changed: {', '.join(changed)}): "
                    "use a new output.dir, or output.overwrite=true to start over there"
                ],
                "recipe",
            )
        if changed and is_main:
            logger.warning("output.overwrite: starting over in %s (changed: %s)", out, ", ".join(changed))
            for name in ("checkpoints", "results.json", "model", "adapter"):
                p = out / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            if any(k.startswith("model.") for k in changed):
                shutil.rmtree(out / "converted", ignore_errors=True)
        resumed = not changed
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        header = f"# resolved recipe of this run (from {recipe.source_file})\n"
        _atomic_write(saved, header + recipe.to_yaml())
    return resumed


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished folder into place (the old one goes only once the new one is complete)."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dest)


def _barrier(args) -> None:
    if args.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ----------------------------------------------------------------------------------------------------------------
# saving


def save_outputs(trainer, recipe: Recipe, out: Path, ckpt: Path, tokenizer, dtype: torch.dtype) -> dict[str, str]:
    """Adapter and/or full (merged) weights into out/adapter and out/model; every process must call this."""
    args = trainer.args
    is_main = args.process_index == 0
    saved: dict[str, str] = {}
    if recipe.uses_lora:
        adapter_tmp = out / ".adapter.tmp"
        if is_main:
            shutil.rmtree(adapter_tmp, ignore_errors=True)
        _barrier(args)
        trainer.save_model(str(adapter_tmp))  # gathers ZeRO-3 shards (stage3_gather_16bit_weights_on_model_save)
        _barrier(args)
        if is_main:
            cfg_path = adapter_tmp / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = str(ckpt.resolve()) if ckpt.exists() else str(ckpt)
            cfg_path.write_text(json.dumps(cfg, indent=2))
            if recipe.output.save_merged:
                merged_tmp = out / ".model.tmp"
                shutil.rmtree(merged_tmp, ignore_errors=True)
                merge_adapter(ckpt, adapter_tmp, merged_tmp, dtype, recipe)
                tokenizer.save_pretrained(merged_tmp)
                _replace_dir(merged_tmp, out / "model")
                saved["model"] = str(out / "model")
            if recipe.output.save_adapter is not False:
                tokenizer.save_pretrained(adapter_tmp)
                (adapter_tmp / "training_args.bin").unlink(missing_ok=True)
                _replace_dir(adapter_tmp, out / "adapter")
                saved["adapter"] = str(out / "adapter")
            else:
                shutil.rmtree(adapter_tmp, ignore_errors=True)
    else:
        model_tmp = out / ".model.tmp"
        if is_main:
            shutil.rmtree(model_tmp, ignore_errors=True)
        _barrier(args)
        trainer.save_model(str(model_tmp))
        _barrier(args)
        if is_main:
            tokenizer.save_pretrained(model_tmp)
            (model_tmp / "training_args.bin").unlink(missing_ok=True)
            _replace_dir(model_tmp, out / "model")
            saved["model"] = str(out / "model")
    _barrier(args)
    return saved


def merge_adapter(base: Path, adapter: Path, dest: Path, dtype: torch.dtype, recipe: Recipe) -> None:
    """Merge a LoRA adapter into its (unquantized) LCKV base and save it with the remote code."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with zero3_init_disabled():
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    if recipe.lckv.forward_passes is not None:
        model.config.forward_passes = recipe.lckv.forward_passes
    if recipe.lckv.backward_passes is not None:
        model.config.backward_passes = recipe.lckv.backward_passes
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(dest))


def write_model_card(folder: Path, recipe: Recipe, results: dict[str, Any], kind: str) -> None:
    """README.md with how to load, the results and the full recipe (travels to the Hub with the weights)."""
    before, after = results.get("eval_ppl_before"), results.get("eval_ppl_after")
    load = (
        "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
        f"base = AutoModelForCausalLM.from_pretrained(BASE, trust_remote_code=True)  # {results.get('base', '')}\n"
        "model = PeftModel.from_pretrained(base, PATH)"
        if kind == "adapter"
        else "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)"
    )
    rows = [
        ("model", recipe.model.path),
        ("layout", f"{recipe.model.warmup or 'as converted'} ({results.get('layout', '')})"),
        ("method", recipe.method.type),
        ("loss", recipe.loss.type),
        ("steps", results.get("steps")),
        ("tokens seen", results.get("tokens_seen")),
        ("train loss (last log)", results.get("train_loss_last")),
        ("held-out perplexity before", before),
        ("held-out perplexity after", after),
        ("wall time (s)", results.get("wall_time_s")),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    text = (
        "---\nlibrary_name: transformers\ntags: [lckv, layer-condensed-kv-cache]\n---\n\n"
        f"# {recipe.name or Path(recipe.output.dir).name}\n\n"
        "An LCKV (layer-condensed KV cache) model fine-tuned with `lckv` "
        f"({'LoRA adapter' if kind == 'adapter' else 'full weights'}).\n\n"
        f"```python\n{load}\n```\n\n## Results\n\n| | |\n|---|---|\n{table}\n\n"
        f"## Recipe\n\n```yaml\n{recipe.to_yaml()}```\n"
    )
    (folder / "README.md").write_text(text, encoding="utf-8")


def push_to_hub(folder: Path, repo_id: str, private: bool) -> str:
    """Upload a finished folder; the token comes from the environment / login and is never printed."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="lckv fine-tune")
    except Exception as e:  # connection, auth, ...: the local output is kept either way
        raise TrainingError(
            f"push to the Hub ({repo_id}) failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
            f"the local output in {folder} is complete: upload it later with `huggingface-cli upload {repo_id} {folder}`"
        ) from None
    return str(getattr(info, "commit_url", repo_id))


def final_report(recipe: Recipe, model_dir: Path, converted: Path, base: str | None, data: list[str], out: Path):
    """The ``lckv-eval ppl`` report (fine-tuned vs converted vs base Llama) into out/eval; None when unavailable."""
    try:
        from ..eval.cli import main as eval_main
    except ImportError:
        logger.info("lckv.eval is not installed: no final lckv-eval report (held-out perplexity is in results.json)")
        return None
    e = recipe.eval
    argv = ["ppl", str(model_dir), "--converted", str(converted), "--data", *data, "--out", str(out / "eval"),
            "--overwrite", "--modes", ",".join(e.report_modes), "--kv-windows", "0", "--quiet"]  # fmt: skip
    if base is not None:
        argv += ["--base", base]
    if e.report_max_tokens is not None:
        argv += ["--max-tokens", str(e.report_max_tokens)]
    logger.info("final report: lckv-eval %s", " ".join(argv))
    try:
        code = eval_main(argv)
    except Exception as ex:  # the training result stands even when the report fails
        logger.warning("lckv-eval report failed: %s", ex)
        return None
    report = out / "eval" / "ppl.json"
    if code != 0 or not report.is_file():
        logger.warning("lckv-eval report failed (exit %s)", code)
        return None
    return json.loads(report.read_text())


# ----------------------------------------------------------------------------------------------------------------
# the run


def run(recipe: Recipe, callbacks: list | None = None) -> dict[str, Any]:
    """Run a validated recipe end to end; returns the results (also written to output/results.json)."""
    from transformers import AutoTokenizer, default_data_collator, set_seed
    from transformers import logging as hf_logging

    wall0 = time.time()
    setup_environment(recipe)
    out = Path(recipe.output.dir)
    on_gpu = torch.cuda.is_available()
    ds_config = build_deepspeed_config(recipe)
    dtype = resolve_dtype(recipe.model.dtype, on_gpu, recipe.method.type, ds_config is not None)
    precision = resolve_precision(recipe.train.precision, on_gpu)
    has_eval = recipe.data.eval_fraction > 0 or any(s.eval_split for s in recipe.data.sources)
    args = make_training_args(recipe, out, ds_config, precision, on_gpu, has_eval)
    is_main = args.process_index == 0
    if ds_config is not None:
        import deepspeed

        # accelerate starts torch.distributed on CPU without telling deepspeed.comm; ZeRO-3 model init needs both
        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    if not is_main:
        hf_logging.set_verbosity_error()
        logging.getLogger("lckv").setLevel(logging.WARNING)

    with args.main_process_first(desc="output folder"):
        resumed = check_output_dir(recipe, out, is_main)
    done = _finished_results(recipe, out) if resumed else None
    if done is not None:
        logger.info("%s already holds this finished run (%d steps): nothing to do; raise train.max_steps to go on, "
                    "or output.overwrite=true with a changed recipe to start over", out, done["steps"])  # fmt: skip
        if is_main and recipe.output.push_to_hub and done.get("pushed") is None:
            folder = Path(done["saved"].get("model") or done["saved"]["adapter"])
            done["pushed"] = push_to_hub(folder, recipe.output.push_to_hub, recipe.output.hub_private)
            _atomic_write(out / "results.json", json.dumps(done, indent=2, default=str))
        _barrier(args)
        return done
    with args.main_process_first(desc="conversion"):
        ckpt = converted_checkpoint(recipe, out, dtype)

    held_out_file = out / "held_out.txt"
    tok_ref = recipe.model.tokenizer or str(ckpt)
    tok_local = local_path(recipe, tok_ref)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_local) if tok_local else tok_ref)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with args.main_process_first(desc="data"):
        train_ds, eval_ds, stats = build_datasets(recipe, tokenizer, held_out_file if is_main else None)
    _log_data(stats)

    device_map = None
    if recipe.method.type == "qlora" and ds_config is None:
        device_map = {"": args.device.index or 0} if on_gpu else {"": "cpu"}
    set_seed(recipe.train.seed)  # LoRA initialization draws random numbers: same recipe, same start
    model = load_student(recipe, ckpt, dtype, device_map)
    if recipe.routing is not None:
        callbacks = [*(callbacks or []), routing_callback(recipe, model.config, out)]
    model = apply_method(model, recipe, recipe.train.gradient_checkpointing)
    trainable, total, patterns = trainable_summary(model)
    logger.info(
        "method %s: training %s of %s parameters (%.2f%%): %s",
        recipe.method.type,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(total, 1),
        ", ".join(patterns[:12]) + (" ..." if len(patterns) > 12 else ""),
    )
    teacher = None
    if recipe.loss.type == "distill":
        tdtype = resolve_dtype(recipe.loss.teacher_dtype or recipe.model.dtype, on_gpu, recipe.method.type, True)
        tpath = teacher_path(recipe, ckpt)
        logger.info("distillation teacher: %s (%s, frozen)", tpath, str(tdtype).removeprefix("torch."))
        teacher = load_teacher(recipe, tpath, tdtype, args.device, model.config.vocab_size)

    world = args.world_size
    tokens_per_step = recipe.train.batch_size * recipe.train.grad_accum * world * recipe.data.block_size
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        callbacks=callbacks,
        teacher=teacher,
        loss_cfg=recipe.loss,
        tokens_per_step=tokens_per_step,
    )

    results_path = out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if resumed and results_path.is_file() else {}
    results.update(
        recipe=recipe.to_dict(), converted_checkpoint=str(ckpt), world_size=world, precision=precision,
        dtype=str(dtype).removeprefix("torch."), trainable_parameters=trainable, total_parameters=total,
        layout=_layout_text(model), data=dataclasses.asdict(stats), completed=False,
    )  # fmt: skip
    last = _last_checkpoint(out / "checkpoints")
    if recipe.routing is not None and is_main:
        _prune_routing_log(out / "routing_log.jsonl", _checkpoint_step(last) if last else 0)
    if last:
        logger.info("resuming from %s", last)
    if is_main:
        _atomic_write(results_path, json.dumps(results, indent=2, default=str))

    def on_eval(step: int, metrics: dict[str, float]) -> None:
        if step == 0 and "eval_loss_before" not in results:
            results["eval_loss_before"] = metrics["eval_loss"]
            results["eval_ppl_before"] = math.exp(metrics["eval_loss"])
            if is_main:
                _atomic_write(results_path, json.dumps(results, indent=2, default=str))

    trainer.eval_hook = on_eval
    # the "before" perplexity is measured inside train() (eval_on_start), where DeepSpeed is initialized
    trainer.args.eval_on_start = bool(eval_ds is not None and recipe.eval.before and "eval_loss_before" not in results)

    t_train = time.time()
    step0 = trainer.state.global_step if last is None else _checkpoint_step(last)
    try:
        train_out = trainer.train(resume_from_checkpoint=last)
    except NonFiniteLoss as e:
        good = _last_checkpoint(out / "checkpoints")
        raise TrainingError(
            f"stopped: loss is {e.value} at step {e.step}. The last good checkpoint is "
            f"{good or 'none (no checkpoint was saved yet)'}; lower train.learning_rate (or check the data) and run "
            "the same command again to resume from it"
        ) from None
    train_time = time.time() - t_train
    steps_now = trainer.state.global_step - step0

    if eval_ds is not None:
        m = trainer.evaluate()
        results["eval_loss_after"] = m["eval_loss"]
        results["eval_ppl_after"] = math.exp(m["eval_loss"])
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    results.update(
        steps=trainer.state.global_step,
        tokens_seen=trainer.state.global_step * tokens_per_step,
        train_loss_last=train_logs[-1]["loss"] if train_logs else None,
        train_loss_mean=train_out.training_loss,
        train_losses=[(h["step"], h["loss"]) for h in train_logs],
        eval_ppls=[(h["step"], h["eval_ppl"]) for h in trainer.state.log_history if "eval_ppl" in h],
        train_time_s=round(train_time, 1),
        s_per_step=_median_step_time(trainer.state.log_history)
        or (round(train_time / steps_now, 3) if steps_now else None),
    )
    engine = getattr(trainer, "deepspeed", None)
    if engine is not None and hasattr(engine, "zero_optimization_stage"):
        results["zero_stage"] = engine.zero_optimization_stage()
    saved = save_outputs(trainer, recipe, out, ckpt, tokenizer, dtype)
    results["saved"] = saved
    results["wall_time_s"] = round(time.time() - wall0, 1)
    if is_main:
        if "model" in saved:
            results["base"] = str(ckpt)
            write_model_card(Path(saved["model"]), recipe, results, "model")
        if "adapter" in saved:
            results["base"] = str(ckpt)
            write_model_card(Path(saved["adapter"]), recipe, results, "adapter")
        if recipe.eval.report and "model" in saved:
            files = [str(local_path(recipe, f)) for f in recipe.eval.report_data or []]
            if not files and held_out_file.is_file():
                files = [str(held_out_file)]
            if files:
                base = teacher_path(recipe, ckpt) if (recipe.loss.teacher or recipe.is_source_model) else None
                report = final_report(recipe, Path(saved["model"]), ckpt, base, files, out)
                if report is not None:
                    results["lckv_eval"] = _report_summary(report)
        results["completed"] = True
        _atomic_write(results_path, json.dumps(results, indent=2, default=str))
        if recipe.output.push_to_hub:
            folder = Path(saved.get("model") or saved["adapter"])
            results["pushed"] = push_to_hub(folder, recipe.output.push_to_hub, recipe.output.hub_private)
            _atomic_write(results_path, json.dumps(results, indent=2, default=str))
    _barrier(args)
    return results


def routing_callback(recipe: Recipe, config, out: Path):
    """The random-routing callback of a recipe's ``routing`` section (draws logged to out/routing_log.jsonl)."""
    from ..routing import RoutingCallback, RoutingConfig

    sources = list(getattr(config, "kv_sources", []) or [])
    n = config.num_hidden_layers
    if sources != list(range(n)):
        missing = sorted(set(range(n)) - set(sources)) if sources else "all"
        raise RecipeError(
            [f"`routing`: the model lacks k/v projections of layers {missing}; routing needs every layer's: train a "
             "plain conversion (model.warmup: plain) and pick the layout at deployment with lckv-convert --reshare"]
        )  # fmt: skip
    ro = recipe.routing
    cfg = RoutingConfig(p_share=ro.p_share, source=ro.source, layouts=list(ro.layouts),
                        seed=recipe.train.seed if ro.seed is None else ro.seed)  # fmt: skip
    cfg.validate(n)
    logger.info("random routing: p_share %s, source %s, seed %d (draws in %s)", cfg.p_share, cfg.source, cfg.seed,
                out / "routing_log.jsonl")  # fmt: skip
    return RoutingCallback(cfg, out / "routing_log.jsonl")


def _prune_routing_log(path: Path, step: int) -> None:
    """Keep the draws of steps before ``step`` (where training restarts), so the log lists each step once."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] < step]
    _atomic_write(path, "".join(line + "\n" for line in keep))


def _finished_results(recipe: Recipe, out: Path) -> dict[str, Any] | None:
    """results.json of a completed run with these max_steps whose saved folders are all there, else None."""
    path = out / "results.json"
    if recipe.train.max_steps is None or not path.is_file():
        return None
    res = json.loads(path.read_text())
    saved = res.get("saved") or {}
    if not res.get("completed") or res.get("steps") != recipe.train.max_steps or not saved:
        return None
    return res if all(Path(p).is_dir() for p in saved.values()) else None


def _report_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The perplexities per model and mode (and recovery) from an lckv-eval ppl report."""
    models = {
        role: {mode: round(r["ppl"], 4) for mode, r in res.get("modes", {}).items()}
        for role, res in report.get("models", {}).items()
    }
    return {"ppl": models, "recovery": report.get("recovery"), "tokens": report.get("data", {}).get("num_tokens")}


def _median_step_time(history: list[dict[str, Any]]) -> float | None:
    """Median seconds per step over the logged intervals (the first, with start-up costs, left out)."""
    logged = [h["s_per_step"] for h in history if "s_per_step" in h]
    times = sorted(logged[1:] or logged)
    return times[len(times) // 2] if times else None


def _checkpoint_step(path: str) -> int:
    try:
        return int(Path(path).name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return 0


def _layout_text(model) -> str:
    cfg = model.config
    sources = list(getattr(cfg, "kv_sources", range(cfg.num_hidden_layers)))
    k = len(set(sources))
    return f"{k} of {len(sources)} layers cache KVs"


def _log_data(stats: DataStats) -> None:
    for s in stats.sources:
        logger.info(
            "data %s (%s): %d rows -> %d train blocks, %d held-out blocks",
            s["source"], s["kind"], s["rows"], s["train_blocks"], s["eval_blocks"],
        )  # fmt: skip
    logger.info(
        "data: %d train blocks (%s tokens), %d held-out blocks of %d tokens",
        stats.train_blocks, f"{stats.train_tokens:,}", stats.eval_blocks, stats.block_size,
    )  # fmt: skip


def summary_table(results: dict[str, Any]) -> str:
    """The closing table printed by the CLI."""

    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v) if isinstance(v, float) else str(v)

    rows = [
        ("layout", results.get("layout")),
        ("steps", results.get("steps")),
        ("tokens seen", f"{results.get('tokens_seen', 0):,}"),
        ("train loss (last log)", f(results.get("train_loss_last"), "{:.4f}")),
        ("held-out ppl before", f(results.get("eval_ppl_before"))),
        ("held-out ppl after", f(results.get("eval_ppl_after"))),
        ("train time", f"{results.get('train_time_s', 0):.0f} s ({f(results.get('s_per_step'), '{:.2f}')} s/step)"),
        ("wall time", f"{results.get('wall_time_s', 0):.0f} s"),
    ]
    rows += [(f"saved {k}", v) for k, v in results.get("saved", {}).items()]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows)


__all__ = ["NonFiniteLoss", "TrainingError", "build_deepspeed_config", "distill_loss", "run", "summary_table"]
