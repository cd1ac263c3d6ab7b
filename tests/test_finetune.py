"""Fine-tuning (lckv.finetune): recipe validation, data, losses, resume, NaN stop, QLoRA, DeepSpeed ZeRO-2/3.

Everything is real: tiny random Llamas converted to LCKV, real text, the HF Trainer, peft, bitsandbytes and two
DeepSpeed processes on gloo. The DeepSpeed tests launch one run each (the first launch compiles DeepSpeed's shm
extension once per machine).
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lckv.finetune.data import DataError, build_datasets
from lckv.finetune.recipe import RecipeError, apply_overrides, load_recipe, recipe_from_dict
from lckv.finetune.train import TrainingError, build_deepspeed_config, distill_loss, run
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
TEXT = str(DATA / "asyoulik_head.txt")


def base_recipe(model_dir: Path, out: Path, **sections) -> dict:
    """A small, fast recipe on the tiny Llama: sandwich:2, LoRA, 32-token blocks."""
    r = {
        "model": {"path": str(model_dir), "warmup": "sandwich:2"},
        "data": {"sources": [{"path": TEXT}], "block_size": 32, "max_eval_blocks": 8},
        "method": {"type": "lora", "lora": {"r": 4, "lora_alpha": 8}},
        "lckv": {"forward_passes": 2, "backward_passes": 1},
        "train": {
            "max_steps": 4,
            "batch_size": 2,
            "learning_rate": 3e-3,
            "logging_steps": 1,
            "save_steps": 2,
            "lr_scheduler": "constant",
        },  # fmt: skip
        "eval": {"report": False},
        "output": {"dir": str(out)},
    }
    for key, value in sections.items():
        r.setdefault(key, {}).update(value)
    return r


def eval_loss_of(model, blocks) -> float:
    """Mean next-token loss over packed held-out blocks (what the Trainer reports as eval_loss)."""
    model.eval()
    losses = []
    with torch.no_grad():
        for row in blocks:
            ids = torch.tensor([row["input_ids"]])
            losses.append(model(input_ids=ids, labels=ids).loss.item())
    return sum(losses) / len(losses)


# ----------------------------------------------------------------------------------------------------------------
# recipe validation and overrides (no model is loaded)


def test_recipe_errors_name_every_bad_key(tmp_path):
    bad = {
        "model": {"path": "bundled:smollm2-135m", "warmup": "sandwhich:2"},
        "data": {"sources": [{"path": str(tmp_path / "missing.txt")}], "block_size": 4},
        "method": {"type": "lora", "lora": {"r": 8, "lora_alph": 16}},
        "train": {"lr": 1e-4, "max_steps": "many", "precision": "fp8"},
        "loss": {"type": "distil"},
        "deepspeed": {"zero": 4},
        "output": {"dir": str(tmp_path / "out")},
    }
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(bad)
    msg = str(e.value)
    for needle in [
        "unknown key `train.lr` (did you mean `train.learning_rate`?)",
        "`train.max_steps`: expected an integer",
        "`train.precision`: 'fp8' is not one of",
        "unknown key `method.lora.lora_alph` (did you mean `method.lora.lora_alpha`?)",
        "`data.sources[0].path`: data file",
        "does not exist",
        "`data.block_size` must be at least 8",
        "`deepspeed.zero`: 4 is not one of 2, 3",
        "`loss.type`: 'distil' is not one of lm, distill",
        "`model.warmup`: unknown layout kind 'sandwhich'",
    ]:
        assert needle in msg, f"{needle!r} not in:\n{msg}"


def test_recipe_cross_field_rules(tmp_path, tiny_llama_dir):
    out = tmp_path / "o"
    (tmp_path / "empty.txt").write_text("")
    cases = [
        ({"loss": {"type": "distill"}, "model": {"warmup": None}}, "`loss.teacher`: distillation needs"),
        ({"data": {"sources": [{"path": str(tmp_path / "empty.txt")}]}}, "is empty"),
        ({"train": {"epochs": 1}}, "`train.max_steps` and `train.epochs` are both set"),
        ({"deepspeed": {"offload_params": True, "zero": 2}}, "`deepspeed.offload_params` needs deepspeed.zero: 3"),
        ({"method": {"type": "full", "lora": {}}, "output": {"save_adapter": True}}, "`output.save_adapter` needs"),
        ({"output": {"push_to_hub": "not a repo"}}, "`output.push_to_hub`"),
        ({"method": {"trainable": ["q_proj"]}}, "`method.trainable` applies to method.type full only"),
    ]
    for change, needle in cases:
        r = base_recipe(tiny_llama_dir, out)
        for k, v in change.items():
            r.setdefault(k, {}).update(v)
        with pytest.raises(RecipeError, match=None) as e:
            recipe_from_dict(r)
        assert needle in str(e.value), f"{needle!r} not in {e.value}"


def test_overrides_and_recipe_file(tmp_path, tiny_llama_dir, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base_recipe(tiny_llama_dir, tmp_path / "o")))
    r = load_recipe(path, ["train.learning_rate=1e-5", "data.sources.0.max_rows=50", "deepspeed.zero=3",
                           "method.lora.r=2", "model.warmup=bottom:1"])  # fmt: skip
    assert r.train.learning_rate == 1e-5 and isinstance(r.train.learning_rate, float)
    assert r.data.sources[0].max_rows == 50 and r.deepspeed.zero == 3 and r.method.lora["r"] == 2
    assert r.method.lora["target_modules"]  # defaults kept under the recipe's LoRA keys
    with pytest.raises(RecipeError, match="not of the form key=value"):
        load_recipe(path, ["train.max_steps"])
    with pytest.raises(RecipeError, match="is not an index of a list"):
        apply_overrides({"data": {"sources": [{}]}}, ["data.sources.3.path=x"])
    with pytest.raises(RecipeError, match="unknown key `train.stpes`"):
        load_recipe(path, ["train.stpes=3"])
    # the CLI: --dry-run prints the resolved recipe, a bad recipe exits 2 with the key in the message
    cli = [sys.executable, str(REPO / "finetune" / "run.py"), str(path)]
    ok = subprocess.run([*cli, "train.max_steps=7", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["train"]["max_steps"] == 7
    from lckv.finetune.cli import main

    assert main([str(path), "train.batch_size=0"]) == 2
    assert "`train.batch_size` must be >= 1" in capsys.readouterr().err


def test_deepspeed_templates():
    r = recipe_from_dict(base_recipe(DATA, DATA / "o", deepspeed={"zero": 3, "offload_params": True}))
    cfg = build_deepspeed_config(r)
    zo = cfg["zero_optimization"]
    assert zo["stage"] == 3 and zo["stage3_gather_16bit_weights_on_model_save"] is True
    assert zo["offload_param"]["device"] == "cpu"
    r2 = recipe_from_dict(base_recipe(DATA, DATA / "o", deepspeed={"zero": 2}))
    assert build_deepspeed_config(r2)["zero_optimization"]["stage"] == 2


# ----------------------------------------------------------------------------------------------------------------
# data


def test_data_blocks_held_out_and_chat(tmp_path, tiny_tokenizer, tiny_llama_dir):
    chat = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"question {i} about the forest"},
                          {"role": "assistant", "content": f"answer {i}: the forest of Arden"}]} for i in range(20)]  # fmt: skip
    chat.write_text("\n".join(json.dumps(x) for x in rows))
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    r = recipe_from_dict(
        base_recipe(
            tiny_llama_dir,
            tmp_path / "o",
            data={"sources": [{"path": TEXT}, {"path": str(chat)}], "max_eval_blocks": None},
        )  # fmt: skip
    )
    train, held, stats = build_datasets(r, tok)
    assert all(len(x) == 32 for x in train["input_ids"]) and train["input_ids"] == train["labels"]
    text_src, chat_src = stats.sources
    assert chat_src["kind"] == "chat" and chat_src["train_blocks"] > 0
    # the held-out blocks are exactly the packed last 10% of the lines
    lines = Path(TEXT).read_text().splitlines(keepends=True)
    tail = lines[len(lines) - round(len(lines) * 0.1) :]
    ids = [t for line in tail for t in tok(line, add_special_tokens=False)["input_ids"]]
    assert held[0]["input_ids"] == ids[:32]
    assert text_src["eval_blocks"] == len(ids) // 32
    rendered = tok.decode(train[len(train) - 1]["input_ids"])
    assert "assistant:" in rendered or "user:" in rendered

    (tmp_path / "tiny.txt").write_text("too short\n")
    small = recipe_from_dict(
        base_recipe(tiny_llama_dir, tmp_path / "o", data={"sources": [{"path": str(tmp_path / "tiny.txt")}]})
    )
    with pytest.raises(DataError, match="0 blocks of data.block_size=32"):
        build_datasets(small, tok)
    (tmp_path / "cols.jsonl").write_text('{"body": "x"}\n')
    cols = recipe_from_dict(
        base_recipe(tiny_llama_dir, tmp_path / "o", data={"sources": [{"path": str(tmp_path / "cols.jsonl")}]})
    )
    with pytest.raises(DataError, match="no `text` .* column; its columns are body"):
        build_datasets(cols, tok)


def test_missing_data_fails_before_any_model_loads(tmp_path, tiny_llama_dir):
    r = base_recipe(tiny_llama_dir, tmp_path / "o")
    r["data"]["sources"][0]["path"] = str(tmp_path / "gone.txt")
    with pytest.raises(RecipeError, match="gone.txt does not exist"):
        recipe_from_dict(r)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------------------------
# losses


def test_distill_loss_maths():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    y[0, 3] = -100
    loss, parts = distill_loss(s, s.clone(), y, temperature=2.0)
    assert loss.abs().item() < 1e-6 and parts["kd_loss"] < 1e-6
    loss, _ = distill_loss(s, t, y, temperature=1.0, lm_weight=0.0)
    mask = y[:, 1:] != -100
    kl = torch.nn.functional.kl_div(s[:, :-1].log_softmax(-1), t[:, :-1].log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)  # fmt: skip
    assert torch.allclose(loss, kl[mask].mean(), atol=1e-6)
    _, parts = distill_loss(s, t, y, lm_weight=1.0)
    ce = torch.nn.functional.cross_entropy(s[:, :-1].reshape(-1, 11), y[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(parts["lm_loss"] - ce.item()) < 1e-6


def test_distill_is_zero_when_student_is_teacher(tmp_path, tiny_llama_dir):
    """Plain layout: the converted student computes the teacher's function, so the first KD loss is 0."""
    r = base_recipe(tiny_llama_dir, tmp_path / "o", model={"warmup": "plain"}, loss={"type": "distill"},
                    train={"max_steps": 2}, eval={"before": False, "report": True, "report_max_tokens": 200})  # fmt: skip
    res = run(recipe_from_dict(r))
    first = res["train_losses"][0]
    assert first[0] == 1 and abs(first[1]) < 1e-5
    assert res["train_losses"][1][1] > 0  # the LoRA update moved the student away from the teacher
    # the closing lckv-eval report: fine-tuned vs converted vs base on the held-out text
    ppl = res["lckv_eval"]["ppl"]
    assert set(ppl) == {"model", "converted", "base"}
    conv = ppl["converted"]
    assert abs(conv["iterative"] - conv["sequential"]) < 1e-3 * conv["sequential"]  # plain layout: no iteration
    assert abs(conv["sequential"] - next(iter(ppl["base"].values()))) < 1e-3 * conv["sequential"]
    assert (tmp_path / "o" / "eval" / "ppl.json").is_file()


# ----------------------------------------------------------------------------------------------------------------
# resume, NaN, QLoRA (one process)


class StopAt(TrainerCallback):
    """Stands in for a killed run: training ends right after the checkpoint of ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_gives_the_same_losses(tmp_path, tiny_llama_dir):
    train = {"max_steps": 10, "save_steps": 5, "lr_scheduler": "cosine", "warmup_steps": 2}
    straight = run(recipe_from_dict(base_recipe(tiny_llama_dir, tmp_path / "a", train=train)))
    r = recipe_from_dict(base_recipe(tiny_llama_dir, tmp_path / "b", train=train))
    first = run(r, callbacks=[StopAt(5)])
    assert first["steps"] == 5 and (tmp_path / "b" / "checkpoints" / "checkpoint-5").is_dir()
    second = run(r)  # the same command again: resumes from checkpoint-5
    assert second["steps"] == 10
    a = dict(straight["train_losses"])
    b = dict(second["train_losses"])
    assert sorted(a) == list(range(1, 11)) and sorted(b) == list(range(1, 11))
    for step in range(1, 11):
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])
    assert abs(straight["eval_loss_after"] - second["eval_loss_after"]) < 1e-4
    # once finished, the same command is a no-op that returns the results
    mtime = (tmp_path / "b" / "model" / "model.safetensors").stat().st_mtime
    assert run(r)["eval_loss_after"] == second["eval_loss_after"]
    assert (tmp_path / "b" / "model" / "model.safetensors").stat().st_mtime == mtime
    # a changed recipe in the same folder is refused (nothing silently mixes two runs)
    changed = recipe_from_dict(base_recipe(tiny_llama_dir, tmp_path / "b", train={**train, "learning_rate": 1e-2}))
    with pytest.raises(RecipeError, match="different recipe .*train.learning_rate"):
        run(changed)


class PoisonAt(TrainerCallback):
    """Makes the weights NaN after ``step``: the next loss is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.fill_(float("nan"))


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, tiny_llama_dir):
    r = recipe_from_dict(base_recipe(tiny_llama_dir, tmp_path / "o", train={"max_steps": 8, "save_steps": 2},
                                     eval={"before": False}))  # fmt: skip
    with pytest.raises(TrainingError, match=r"loss is nan at step 4\. The last good checkpoint is .*checkpoint-2"):
        run(r, callbacks=[PoisonAt(3)])
    ckpts = sorted(p.name for p in (tmp_path / "o" / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-2"]


def test_qlora_one_process(tmp_path, tiny_llama_dir, tiny_tokenizer):
    pytest.importorskip("bitsandbytes")
    r = recipe_from_dict(base_recipe(tiny_llama_dir, tmp_path / "o", method={"type": "qlora"},
                                     train={"max_steps": 3}))  # fmt: skip
    res = run(r)
    assert res["steps"] == 3 and math.isfinite(res["eval_loss_after"])
    adapter = tmp_path / "o" / "adapter" / "adapter_model.safetensors"
    assert adapter.stat().st_size > 1000
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "model", trust_remote_code=True)
    assert type(merged).__name__ == "LCKVLlamaForCausalLM"
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_push_failure_is_clear_and_keeps_the_output(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = recipe_from_dict(base_recipe(tiny_llama_dir, tmp_path / "o", train={"max_steps": 1},
                                     output={"push_to_hub": "someone/tiny-lckv"}, eval={"before": False}))  # fmt: skip
    with pytest.raises(
        TrainingError, match=r"push to the Hub \(someone/tiny-lckv\) failed: .*local output in .* is complete"
    ):
        run(r)
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["completed"] is True
    card = (tmp_path / "o" / "model" / "README.md").read_text()
    assert "held-out perplexity after" in card and "push_to_hub: someone/tiny-lckv" in card


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed, two processes on gloo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_deepspeed(recipe: dict, tmp_path: Path) -> dict:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), str(REPO / "finetune" / "run.py"),
           str(path)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=540, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "fine-tuning finished" in proc.stdout
    return json.loads((Path(recipe["output"]["dir"]) / "results.json").read_text())


def _repeated_batch_recipe(model_dir: Path, out: Path, **sections) -> dict:
    # two training blocks, one per process and step: every step sees the same global batch
    r = base_recipe(model_dir, out, **sections)
    r["data"].update(max_train_blocks=2)
    r["train"].update(batch_size=1, max_steps=6, learning_rate=5e-3, save_steps=100)
    return r


def _held_out(recipe: dict, model_dir: Path):
    tok = AutoTokenizer.from_pretrained(model_dir)
    return build_datasets(recipe_from_dict(recipe), tok)[1]


def test_deepspeed_zero2_full(tmp_path, tiny_llama_dir):
    out = tmp_path / "z2"
    recipe = _repeated_batch_recipe(tiny_llama_dir, out, method={"type": "full"}, deepspeed={"zero": 2})
    recipe["method"].pop("lora")
    res = _launch_deepspeed(recipe, tmp_path)
    assert res["zero_stage"] == 2 and res["world_size"] == 2
    losses = [loss for _, loss in res["train_losses"]]
    assert losses[-1] < losses[0] - 0.05, losses
    weights = out / "model" / "model.safetensors"
    assert weights.stat().st_size > 100_000
    model = AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=True)
    held = _held_out(recipe, out / "model")
    assert abs(eval_loss_of(model, held) - res["eval_loss_after"]) < 1e-4


def test_deepspeed_zero3_lora(tmp_path, tiny_llama_dir):
    from peft import PeftModel
    from safetensors.torch import load_file

    out = tmp_path / "z3"
    res = _launch_deepspeed(_repeated_batch_recipe(tiny_llama_dir, out, deepspeed={"zero": 3}), tmp_path)
    assert res["zero_stage"] == 3 and res["world_size"] == 2
    losses = [loss for _, loss in res["train_losses"]]
    assert losses[-1] < losses[0] - 0.05, losses
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(adapter) > 0 and any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    held = _held_out(_repeated_batch_recipe(tiny_llama_dir, out), out / "model")
    merged = AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=True)
    assert abs(eval_loss_of(merged, held) - res["eval_loss_after"]) < 1e-4
    base = AutoModelForCausalLM.from_pretrained(out / "converted", trust_remote_code=True)
    with_adapter = PeftModel.from_pretrained(base, out / "adapter")
    assert abs(eval_loss_of(with_adapter, held) - res["eval_loss_after"]) < 1e-4
